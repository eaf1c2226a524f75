#!/usr/bin/env bash
# The whole GPU measurement in one command, on a machine with one CUDA GPU (about 8 minutes on an H100-class
# GPU): the gpu-marked tests (CUDA graphs, fused attention, compile, a real out-of-memory), then bench.gpu
# (in process at batch 1..512, exact and fast, with the encoder / prefill / decode split and GPU memory per batch;
# end to end through a redis-server and a worker; the out-of-memory drill). Results: bench/results-gpu/ and the
# GPU section of bench/README.md. Extra arguments go to `python -m bench.gpu`. Then the endpoint backend:
# `transformers serve` with a tiny random LLaVA on the GPU, captioned through a worker and driven directly at the
# same concurrency (bench.endpoint; results-gpu/endpoint.md). GPU_BENCH_ENDPOINT=0 skips it. Last, bench.families:
# every captioning family in process against transformers' generate, fp32 and bf16.
#
# A GPU host without the project's dependencies or redis-server (no network) gets them from .gpu/, which
# bench/gpu_prepare.sh fills on a machine with a package index: wheels in .gpu/wheels, Debian packages in .gpu/debs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${GPU_BENCH_OUT:-bench/results-gpu}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ -d .gpu/wheels ] && ! "$PY" -c "import celery, pydantic_settings, redis, httpx2, fastapi, openai" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/captioner-site .gpu/wheels/*.whl
  # Pure-Python packages only (celery, redis, pydantic...): torch, numpy and transformers stay the host's.
  export PYTHONPATH="$PYTHONPATH:/tmp/captioner-site"
fi
if ! command -v redis-server >/dev/null && [ -d .gpu/debs ]; then
  for deb in .gpu/debs/*.deb; do dpkg -x "$deb" /tmp/captioner-redis; done
  export PATH="/tmp/captioner-redis/usr/bin:$PATH"
  export LD_LIBRARY_PATH="/tmp/captioner-redis/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"

# Tests first: the measurement below relies on what they check. Their failure is reported, not fatal.
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT_DIR/gpu-tests.log" || true
"$PY" -m bench.gpu --out "$OUT_DIR" --readme bench/README.md "$@" 2>&1 | tee "$OUT_DIR/gpu-bench.log"

# The endpoint backend's orchestration overhead (needs transformers' serving extra: fastapi, uvicorn, openai).
if [ "${GPU_BENCH_ENDPOINT:-1}" != 0 ]; then
  if "$PY" -c "from transformers.utils.import_utils import is_serve_available as a; assert a()" 2>/dev/null; then
    "$PY" -m bench.endpoint --device cuda --images 256 --concurrency 32 --max-length 32 --rounds 2 \
      --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/endpoint-bench.log" || true
  else
    echo "bench.endpoint skipped: transformers serve needs fastapi, uvicorn and openai (bench/gpu_prepare.sh)" \
      | tee "$OUT_DIR/endpoint-bench.log"
  fi
fi
# Every captioning family (tiny random models built offline: no hub needed) against transformers' generate.
for dtype in float32 bfloat16; do
  "$PY" -m bench.families --device cuda --dtype "$dtype" --images 256 --batch 64 --out "$OUT_DIR/families-$dtype.json" \
    2>&1 | tee "$OUT_DIR/families-$dtype.log" || true
done
# What scale-to-zero costs on this GPU: a caption worker's start to its first message, git-base shapes (the figure
# docs/operations.md, "Kubernetes", leaves for a GPU). Reported, not fatal.
"$PY" -m bench.load_time --device cuda --rounds 3 2>&1 | tee "$OUT_DIR/load-time.log" || true
