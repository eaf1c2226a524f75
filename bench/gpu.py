"""``python -m bench.gpu``: the GPU measurement in one command (``bench/gpu.sh`` runs it after the gpu tests).

1. In process, git-base shapes (random weights), bf16, exact and fast, batch 1 to 512: images/s of ``generate`` on
   prepared pixel batches (the model side alone), the split between encoder, prefill and decode, and the peak GPU
   memory of each batch size.
2. End to end through a redis-server and a real caption worker, exact then fast: JPEGs enqueued as one job, timed
   from the enqueue to the ledger's finish, with the worker's own stage times (what bounds it).
3. A real CUDA out-of-memory: a worker allowed a small share of the GPU is handed an oversized batch; it halves
   the batch until it fits and goes on, and every item of the job is captioned.

Results: ``gpu.json`` and ``gpu.md`` in ``--out``, and the markdown between the GPU markers of bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.corpus import build_model, make_images

README_START, README_END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
OOM_LINE = re.compile(r"out of memory at batch (\d+); batches now at most (\d+)")
#: The worker's decode threads on a 16-core GPU host (the model thread and Celery's threads need the rest).
DECODE_THREADS = 12


def say(msg: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8,32,128,512", help="in-process batch sizes (default 1,8,32,128,512)")
    p.add_argument("--max-length", type=int, default=20, help="caption length in tokens (default 20)")
    p.add_argument("--images", type=int, default=4096, help="JPEGs per end-to-end job (default 4096)")
    p.add_argument("--e2e-batch", type=int, default=512, help="the end-to-end worker's CAPTIONER_MAX_BATCH_SIZE")
    p.add_argument("--oom-batch", type=int, default=2048, help="the oversized batch of the out-of-memory drill")
    p.add_argument("--oom-fraction", type=float, default=0.04, help="share of GPU memory the drill's worker may use")
    p.add_argument("--profiles", default="exact,fast", help="profiles measured (default exact,fast)")
    p.add_argument("--out", type=Path, default=Path("bench/results-gpu"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/captioner-gpu-bench"))
    p.add_argument("--readme", type=Path, help="write the results between the GPU markers of this README")
    return p.parse_args(argv)


# --- 1. in process ---------------------------------------------------------------------------------


def sweep(model_dir: Path, profile: str, sizes: list[int], max_length: int, cache: Path) -> dict[str, Any]:
    """images/s, encoder/prefill/decode split and peak memory per batch size, for one profile."""
    import torch

    from common.messages import GenParams
    from model.engine import CaptionEngine, EngineConfig

    engine = CaptionEngine.load(
        EngineConfig(
            model=str(model_dir), device="cuda", dtype="bfloat16", profile=profile, compile_cache_dir=str(cache)
        )
    )
    params = GenParams(max_length=max_length)
    warm_s = engine.warm_up(max(sizes), params, sizes)
    decoder = engine._fast
    rows = []
    for size in sizes:
        pixels = engine.stack([torch.randn(size, 3, 224, 224)])  # pinned: the copy to the GPU is a DMA
        engine.generate_detailed(pixels, params)  # shapes met once before timing (allocator, cuBLAS plans)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        batches = max(3, min(40, 2048 // size))
        started = time.perf_counter()
        for _ in range(batches):
            engine.generate_detailed(pixels, params)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated()
        split = {}
        if decoder is not None:  # one more batch with each stage synchronised and timed
            decoder.timing = True
            engine.generate_detailed(pixels, params)
            decoder.timing = False
            s = decoder.stats
            split = {
                "encoder_ms": s.encode_s * 1000,
                "prefill_ms": s.prefill_s * 1000,
                "decode_ms": s.decode_s * 1000,
                "steps": s.steps,
                "graph_replays": s.graph_replays,
            }
        rows.append(
            {
                "batch": size,
                "images_per_s": round(size * batches / seconds, 1),
                "ms_per_batch": round(seconds * 1000 / batches, 2),
                "peak_memory_gib": round(peak / 2**30, 2),
                **{k: round(v, 2) if isinstance(v, float) else v for k, v in split.items()},
            }
        )
        say(f"{profile} bs{size}: {rows[-1]}")
    out = {
        "profile": engine.profile,
        "fallbacks": dict(engine.pieces.fallbacks),
        "warm_up_s": round(warm_s, 1),
        "rows": rows,
    }
    del engine
    torch.cuda.empty_cache()
    return out


# --- 2. and 3. through Redis and a worker --------------------------------------------------------------


def corpus(work: Path, n: int) -> list[Path]:
    """``n`` JPEG paths: 256 distinct images (64..1024 px) under hard links, so decoding costs what photos cost."""
    unique, _ = make_images(work / "unique", min(n, 256))
    folder = work / f"images-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img-{i:06d}.jpg"
        if not path.exists():
            os.link(unique[i % len(unique)], path)
        paths.append(path)
    return paths


def end_to_end(
    model_dir: Path,
    paths: list[Path],
    profile: str,
    batch: int,
    max_length: int,
    work: Path,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One job of ``paths`` through a LocalRedis and a real worker (model load and warm-up not timed)."""
    from transformers import AutoTokenizer

    from bench.queued import QueueRun
    from producer.local import LocalRedis

    env = {
        "CAPTIONER_DEVICE": "cuda",
        "CAPTIONER_PROFILE": profile,
        "CAPTIONER_DECODE_THREADS": str(DECODE_THREADS),
        "CAPTIONER_CONCURRENCY": str(max(4, 2 * batch // 64)),
        "CAPTIONER_COMPILE_CACHE_DIR": str(work / "cc"),
        "CAPTIONER_METRICS_PORT": "0",
        **(extra or {}),
    }
    with ExitStack() as stack:
        redis = stack.enter_context(LocalRedis())
        log = work / f"worker-{profile}-{batch}-{int(time.time())}.log"
        run = QueueRun(
            redis,
            model_dir,
            paths[0].parent,
            dtype="bfloat16",
            batch_size=batch,
            max_length=max_length,
            log=log,
            extra_env=env,
            key="f" if profile == "fast" else "b",
        )
        stack.callback(run.stop)
        run.start()
        run.ready(1800, warm_up=paths[:2])
        result = run.measure(paths, AutoTokenizer.from_pretrained(str(model_dir)))
    text = log.read_text(errors="replace")
    ooms = [(int(a), int(b)) for a, b in OOM_LINE.findall(text)]
    return {
        "profile": result.extra.get("profile"),
        "images": result.images,
        "images_per_s": round(result.images_per_s, 1),
        "mean_batch": result.extra.get("mean_batch"),
        "stages_ms_per_image": {k: round(v, 3) for k, v in result.stages_ms.items()},
        "cpu_ms_per_image": result.extra.get("cpu_ms_per_image"),
        "oom_halvings": ooms,
        "captioned": sum(1 for c in result.captions if c),
        "log": str(log),
    }


# --- report ------------------------------------------------------------------------------------------


def device_line() -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    driver = ""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip()
    return (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
        f"driver {driver or '?'}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"{os.cpu_count()} CPU cores"
    )


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        f"### GPU: {meta['device']}",
        "",
        f"Measured on {meta['date']} with `{meta['command']}` at "
        f"`{meta['code']}` ({meta['seconds']:.0f} s in all). git-base shapes, random weights, bf16, "
        f"max_length {meta['max_length']} (random weights never end early: every caption is max_length - 1 "
        "tokens).",
        "",
    ]
    for prof in data["inprocess"]:
        lines += [
            f"#### in process, {prof['profile']} (warm-up {prof['warm_up_s']} s)"
            + (f"; fell back: {prof['fallbacks']}" if prof["fallbacks"] else ""),
            "",
            "| batch | images/s | ms/batch | encoder ms | prefill ms | decode ms | peak GPU memory GiB |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in prof["rows"]:
            lines.append(
                f"| {r['batch']} | {r['images_per_s']} | {r['ms_per_batch']} "
                f"| {r.get('encoder_ms', '-')} | {r.get('prefill_ms', '-')} | {r.get('decode_ms', '-')} "
                f"| {r['peak_memory_gib']} |"
            )
        lines.append("")
    lines += [
        "#### end to end (redis-server + worker + JobClient)",
        "",
        "| profile | images | images/s | mean batch | ms/image by stage | CPU ms/image |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in data["end_to_end"]:
        stages = ", ".join(f"{k} {v}" for k, v in r["stages_ms_per_image"].items())
        lines.append(
            f"| {r['profile']} | {r['images']} | {r['images_per_s']} | {r['mean_batch']} | {stages} "
            f"| {r['cpu_ms_per_image']} |"
        )
    oom = data.get("oom")
    if oom:
        halvings = ", ".join(f"{a} -> {b}" for a, b in oom["oom_halvings"]) or "none (the batch fitted)"
        lines += [
            "",
            f"Out-of-memory drill: a worker allowed {oom['fraction']:.0%} of the GPU, max batch "
            f"{oom['batch']}: CUDA out of memory, halvings {halvings}; {oom['captioned']}/{oom['images']} "
            f"captioned, mean batch {oom['mean_batch']}.",
        ]
    tests = data.get("gpu_tests")
    if tests:
        lines += ["", f"gpu tests (`pytest -m gpu tests/test_gpu.py`): {tests}"]
    return "\n".join(lines) + "\n"


def into_readme(readme: Path, text: str) -> None:
    """Replace what lies between the GPU markers of ``readme`` with ``text``."""
    body = readme.read_text(encoding="utf-8")
    start, end = body.index(README_START) + len(README_START), body.index(README_END)
    readme.write_text(body[:start] + "\n" + text + body[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        say("no CUDA device: this benchmark measures the GPU path only")
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    profiles = [p.strip() for p in a.profiles.split(",") if p.strip()]
    say("building git-base-shaped random weights")
    model_dir = build_model("git-base", work / "git-base")
    data: dict[str, Any] = {"inprocess": [], "end_to_end": []}
    for profile in profiles:
        say(f"in process, {profile}, batch sizes {sizes}")
        data["inprocess"].append(sweep(model_dir, profile, sizes, a.max_length, work / "cc"))
    say(f"writing {a.images} JPEG paths")
    paths = corpus(work, max(a.images, a.oom_batch))
    for profile in profiles:
        say(f"end to end, {profile}, max batch {a.e2e_batch}")
        data["end_to_end"].append(end_to_end(model_dir, paths[: a.images], profile, a.e2e_batch, a.max_length, work))
    say(f"out-of-memory drill: {a.oom_fraction:.0%} of the GPU, batch {a.oom_batch}")
    oom = end_to_end(
        model_dir,
        paths[: a.oom_batch],
        "exact",
        a.oom_batch,
        a.max_length,
        work,
        {
            "CAPTIONER_CUDA_MEMORY_FRACTION": str(a.oom_fraction),
            "CAPTIONER_FILL_WAIT_MS": "30000",
            "CAPTIONER_CONCURRENCY": str(a.oom_batch // 64),
        },
    )
    data["oom"] = {**oom, "fraction": a.oom_fraction, "batch": a.oom_batch}
    tests_log = a.out / "gpu-tests.log"
    if tests_log.is_file():
        tail = [line for line in tests_log.read_text(errors="replace").splitlines() if line.strip()]
        data["gpu_tests"] = tail[-1] if tail else None
    code = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    data["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "device": device_line(),
        "code": code or None,
        "command": shlex.join(["bench/gpu.sh", *argv]),
        "max_length": a.max_length,
        "seconds": time.perf_counter() - started,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    text = markdown(data)
    (a.out / "gpu.md").write_text(text, encoding="utf-8")
    if a.readme:
        into_readme(a.readme, text)
    print(text)
    say(f"done in {data['meta']['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
