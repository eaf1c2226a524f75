"""``python -m bench.run``: every caption path on the same images and model, in one run, as a table of ratios.

(a) the engine in-process, (b) the queue end to end through a real worker, (c) a naive task-per-image Celery
app, (d) the Hugging Face pipeline, (e) and (f): (a) and (b) with the fast speed profile; then what each profile
and piece costs in held-out WER of the fine-tuned demo model, and the producer's enqueue rate and Redis bytes
per pending item.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.corpus import MODELS, build_model, make_images
from bench.report import agreement, latency_check, producer_checks, ratios, write_outputs
from bench.result import PathResult, best_of

#: Model load and warm-up (torch.compile of git-base's encoder included) on a busy 2-core machine fit in this.
READY_TIMEOUT_S = 1800


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures; ``--smoke`` shrinks it to seconds (tiny model, few images, batch sizes 1 and 4)."""

    models: tuple[str, ...]
    images: int
    batch_sizes: tuple[int, ...]
    max_length: int
    dtype: str
    producer_items: int
    rounds: int
    out: Path
    workdir: Path | None
    smoke: bool
    #: Extra CAPTIONER_* settings for the (b) worker, to try a knob against the same baselines.
    worker_env: tuple[tuple[str, str], ...] = ()
    #: Single-image calls sent one after another to measure a service's latency at light load.
    latency_calls: int = 20
    #: Measure the fast profile too: (e) in process and (f) end to end.
    fast: bool = True
    #: Pieces switched on or off on top of fast for (e), (f) and the quality run (CAPTIONER_PIECES syntax).
    fast_pieces: str = ""
    #: Held-out images scored per variant on the fine-tuned demo model (0: no quality run).
    quality_images: int = 600


def parse_args(argv: list[str]) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="seconds-long run: tiny model, 8 images, batch sizes 1,4")
    p.add_argument("--model", choices=[*MODELS, "both"], help="random-weight model shape (default: both; smoke: tiny)")
    p.add_argument("--images", type=int, help="JPEGs to caption on every path (default 32; smoke 8)")
    p.add_argument("--batch-sizes", help="comma-separated batch sizes tried by (a) and (d) (default 1,8,16,32)")
    p.add_argument("--max-length", type=int, help="caption length in tokens on every path (default 20; smoke 12)")
    p.add_argument("--dtype", default="auto", help="dtype of (a) and (b): auto, float32, bfloat16, float16")
    p.add_argument("--rounds", type=int, help="rounds of all four paths, best kept per path (default 2; smoke 1)")
    p.add_argument("--producer-items", type=int, help="items per producer measurement (default 50000; smoke 5000)")
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="CAPTIONER_NAME=VALUE",
        help="extra setting for the (b) worker, e.g. CAPTIONER_MAX_WAIT_MS=200 (repeatable)",
    )
    p.add_argument("--no-fast", action="store_true", help="skip the fast profile's paths (e) and (f)")
    p.add_argument("--fast-pieces", help="pieces on/off on top of fast, e.g. -compile (default none; smoke -compile)")
    p.add_argument(
        "--quality-images",
        type=int,
        help="held-out images per variant for the WER of the demo model (default 600; smoke 0: skipped)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where JSON, markdown and chart go")
    p.add_argument("--workdir", type=Path, help="keep images and models here and reuse them (default: a temp dir)")
    a = p.parse_args(argv)
    model = a.model or ("tiny" if a.smoke else "both")
    sizes = a.batch_sizes or ("1,4" if a.smoke else "1,8,16,32")
    try:
        batch_sizes = tuple(int(x) for x in sizes.split(",") if x.strip())
    except ValueError:
        p.error(f"--batch-sizes must be integers separated by commas, not {sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        p.error("--batch-sizes needs at least one size of 1 or more")
    if any("=" not in pair for pair in a.worker_env):
        p.error("--worker-env takes NAME=VALUE")
    images = a.images or (8 if a.smoke else 32)
    max_length = a.max_length or (12 if a.smoke else 20)
    if images < 2 or max_length < 2:
        p.error("--images and --max-length must be at least 2")
    return BenchConfig(
        models=MODELS if model == "both" else (model,),
        images=images,
        batch_sizes=batch_sizes,
        max_length=max_length,
        dtype=a.dtype,
        producer_items=a.producer_items or (5000 if a.smoke else 50_000),
        rounds=max(1, a.rounds or (1 if a.smoke else 2)),
        worker_env=tuple(tuple(pair.split("=", 1)) for pair in a.worker_env),
        out=a.out,
        workdir=a.workdir,
        smoke=a.smoke,
        latency_calls=5 if a.smoke else 20,
        fast=not a.no_fast,
        # Compiling takes minutes on a small CPU: the smoke run checks the fast paths without it.
        fast_pieces=a.fast_pieces if a.fast_pieces is not None else ("-compile" if a.smoke else ""),
        quality_images=a.quality_images if a.quality_images is not None else (0 if a.smoke else 600),
    )


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure_model(kind: str, cfg: BenchConfig, work: Path, paths: list[Path], settings: Any) -> dict[str, PathResult]:
    """The four paths on one model, interleaved round by round (a, d in-process; b, c through worker processes)."""
    from transformers import AutoTokenizer

    from bench.inprocess import EnginePath, PipelinePath, quiet_transformers
    from model.engine import resolve_device, resolve_dtype

    quiet_transformers()
    say(f"{kind}: building random weights")
    model_dir = build_model(kind, work / "models" / kind)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    device = resolve_device(settings.device)
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    best_dtype = str(resolve_dtype("auto", device)).removeprefix("torch.")
    sizes = list(cfg.batch_sizes)
    engine = EnginePath(model_dir, dtype=dtype, max_length=cfg.max_length, settings=settings)
    fast = None
    if cfg.fast:
        say(f"{kind}: (e) loading the engine with the fast profile {cfg.fast_pieces} (compiling is not timed)")
        fast = EnginePath(
            model_dir,
            dtype=dtype,
            max_length=cfg.max_length,
            settings=settings,
            key="e",
            profile="fast",
            pieces=cfg.fast_pieces,
            sizes=tuple(sizes),
        )
    pipe = PipelinePath(model_dir, dtype=best_dtype, max_length=cfg.max_length, device=str(device))
    keys = "abcdef" if fast else "abcd"
    rounds: dict[str, list[PathResult]] = {key: [] for key in keys}
    with ExitStack() as stack:
        workers = None
        for n in range(1, cfg.rounds + 1):
            say(f"{kind} round {n}/{cfg.rounds}: (a) engine in-process, {dtype}, batch sizes {sizes}")
            rounds["a"].append(engine.measure(paths, sizes))
            if fast:
                say(f"{kind}: (a) {_rate(rounds['a'][-1])}; (e) engine in-process, {fast.engine.profile}")
                rounds["e"].append(fast.measure(paths, sizes))
            say(
                f"{kind}: ({'e' if fast else 'a'}) {_rate(rounds['e' if fast else 'a'][-1])}; (d) HF pipeline, "
                f"{best_dtype}, batch sizes {sizes}"
            )
            rounds["d"].append(pipe.measure(paths, sizes))
            say(f"{kind}: (d) {_rate(rounds['d'][-1])}")
            if workers is None:
                # The worker batches at (a)'s best size of the first round; workers idle while (a), (d) run.
                workers = _start_workers(stack, kind, cfg, work, model_dir, paths, dtype, rounds["a"][0].batch_size)
            queue, naive, fast_queue = workers
            say(f"{kind}: (b) queue end to end, {dtype}, max batch {queue.batch_size}")
            rounds["b"].append(queue.measure(paths, tokenizer))
            if fast_queue is not None:
                say(f"{kind}: (b) {_rate(rounds['b'][-1])}; (f) queue end to end, fast profile")
                rounds["f"].append(fast_queue.measure(paths, tokenizer))
            say(
                f"{kind}: ({'f' if fast_queue else 'b'}) {_rate(rounds['f' if fast_queue else 'b'][-1])}; (c) naive "
                "Celery, float32, batch 1"
            )
            rounds["c"].append(naive.measure(model_dir, paths, max_length=cfg.max_length, tokenizer=tokenizer))
            say(f"{kind}: (c) {_rate(rounds['c'][-1])}")
        say(f"{kind}: single-image latency, {cfg.latency_calls} calls one at a time")
        latency = queue.latency(paths, cfg.latency_calls)
    best = {key: best_of(rounds[key]) for key in keys}
    best["b"].extra["latency"] = latency
    return best


def _rate(r: PathResult) -> str:
    return f"{r.images_per_s:.2f} images/s at batch {r.batch_size}"


def _start_workers(
    stack: ExitStack,
    kind: str,
    cfg: BenchConfig,
    work: Path,
    model_dir: Path,
    paths: list[Path],
    dtype: str,
    batch_size: int,
) -> tuple[Any, Any]:
    """A LocalRedis, the caption worker of (b) and the naive worker of (c), started together; both ready."""
    from bench.queued import NaiveWorker, QueueRun
    from producer.local import LocalRedis

    say(f"{kind}: starting redis-server, a caption worker and a naive worker (start-up is not timed)")
    redis = stack.enter_context(LocalRedis())
    queue = QueueRun(
        redis,
        model_dir,
        paths[0].parent,
        dtype=dtype,
        batch_size=batch_size,
        max_length=cfg.max_length,
        log=work / f"worker-{kind}.log",
        extra_env=dict(cfg.worker_env),
    )
    naive = NaiveWorker(redis, log=work / f"naive-worker-{kind}.log")
    stack.callback(naive.terminate)
    stack.callback(queue.stop)
    fast = None
    if cfg.fast:
        env = {
            "CAPTIONER_PROFILE": "fast",
            "CAPTIONER_PIECES": cfg.fast_pieces,
            "CAPTIONER_COMPILE_CACHE_DIR": str(work / "compile-cache"),
            **dict(cfg.worker_env),
        }
        fast = QueueRun(
            redis,
            model_dir,
            paths[0].parent,
            dtype=dtype,
            batch_size=batch_size,
            max_length=cfg.max_length,
            log=work / f"worker-{kind}-fast.log",
            extra_env=env,
            key="f",
        )
        stack.callback(fast.stop)
    queue.start()
    naive.start()
    queue.ready(READY_TIMEOUT_S, warm_up=paths[:2])
    naive.wait_ready(READY_TIMEOUT_S)
    if fast is not None:  # started once the others are loaded: its compile has the cores to itself
        fast.start()
        fast.ready(READY_TIMEOUT_S, warm_up=paths[:2])
    return queue, naive, fast


def _code_version() -> str | None:
    """The commit measured, with ``-dirty`` when the working tree has changes (they are measured too)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _meta(argv: list[str], origin: str, cfg: BenchConfig) -> dict[str, Any]:
    import celery
    import torch
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": shlex.join(["python", "-m", "bench.run", *argv]),
        "code": _code_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "celery": celery.__version__,
        "images_origin": origin,
        "max_length": cfg.max_length,
        "rounds": cfg.rounds,
        "worker_env": dict(cfg.worker_env),
        "fast_pieces": cfg.fast_pieces,
        "smoke": cfg.smoke,
    }


def run(cfg: BenchConfig, argv: list[str]) -> dict[str, Any]:
    from bench.producer_rate import measure_producer
    from common.settings import Settings

    started, load_before = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    with ExitStack() as stack:
        work = cfg.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="captioner-bench-")))
        work = work.resolve()
        say(f"writing {cfg.images} JPEGs (64..1024 px) to {work / 'images'}")
        paths, origin = make_images(work / "images", cfg.images)
        settings = Settings(
            allowed_roots=[str(work / "images")], max_length=cfg.max_length, compile_cache_dir=work / "compile-cache"
        )
        data: dict[str, Any] = {"meta": _meta(argv, origin, cfg), "models": {}}
        results: dict[str, dict[str, PathResult]] = {}
        for kind in cfg.models:
            results[kind] = measure_model(kind, cfg, work, paths, settings)
            data["models"][kind] = {
                "max_length": cfg.max_length,
                "images": cfg.images,
                "paths": {k: r.as_dict() for k, r in results[kind].items()},
                "ratios": ratios(results[kind]),
                "latency": latency_check(results[kind]["b"].extra["latency"]),
                "captions": agreement(results[kind]),
            }
        if cfg.quality_images:
            from bench.quality import measure_quality
            from model.engine import resolve_device, resolve_dtype
            from model.profiles import PIECES

            device = resolve_device(settings.device)
            dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
            usable = tuple(p for p in PIECES if p != "cudagraphs" or device.type == "cuda")
            data["quality"] = measure_quality(
                work / "quality",
                images=cfg.quality_images,
                dtype=dtype,
                pieces=usable,
                fast_pieces=cfg.fast_pieces,
                say=say,
            )
        say(f"producer: enqueue {cfg.producer_items:,} files from a directory, then as many URLs from a list")
        producer = measure_producer(work / "producer", cfg.producer_items, max_length=cfg.max_length)
        producer["checks"] = producer_checks(producer)
        data["producer"] = producer
    data["meta"]["loadavg_before"] = load_before
    data["meta"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    data["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    files = write_outputs(cfg.out, data, results)
    print((cfg.out / "bench.md").read_text(encoding="utf-8"))
    say(f"done in {data['meta']['seconds']}s: " + ", ".join(str(p) for p in files.values()))
    return data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random local weights only: never wait on the hub
    run(cfg, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
