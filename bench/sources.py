"""Source figures: the enqueue rate from an S3 listing (moto's S3 server on 127.0.0.1) and from a shard list, and the
speed gained by caption reuse on an archive with 30% duplicates through a real worker (reuse off vs on, one run).

    python -m bench.sources --objects 3000 --shards 10000 --images 120
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.messages import GenParams
from common.settings import Settings
from producer.jobs import JobClient
from producer.local import LocalRedis, WorkerProcess, free_port
from producer.sources import Containers, expand


def _moto() -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    import socket

    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, env


def _rate(client: JobClient, refs: Any, job_id: str, n: int) -> dict[str, Any]:
    started = time.perf_counter()
    report = client.enqueue(refs, job_id=job_id, params=GenParams(max_length=20))
    seconds = time.perf_counter() - started
    return {"items": n, "seconds": round(seconds, 2), "per_s": round(n / seconds, 1), "messages": report.messages}


def enqueue_rates(redis: LocalRedis, n_objects: int, n_shards: int) -> dict[str, Any]:
    import s3fs

    proc, env = _moto()
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        fs.pipe({f"bench/in/d{i // 1000:03d}/{i:07d}.jpg": b"x" for i in range(n_objects)})
        settings = Settings(broker_url=redis.url(1), redis_url=redis.url(2), max_queued_chunks=0)
        client = JobClient(settings)
        store_opts = Containers()
        listing = _rate(client, expand("s3://bench/in/", containers=store_opts), "s3-listing", n_objects)
        shards = expand(f"https://shards.example.org/train/shard-{{000000..{n_shards - 1:06d}}}.tar")
        shard_list = _rate(client, shards, "shard-list", n_shards)
        client.close()
        return {"s3_listing": listing, "shard_list": shard_list}
    finally:
        proc.terminate()
        del env


def reuse_ratio(redis: LocalRedis, work: Path, n_images: int, kind: str = "tiny") -> dict[str, Any]:
    """The same archive (30% of its images duplicates of others) captioned by a worker with reuse off, then one with
    reuse on (a fresh cache): wall time of each job, and their ratio. ``kind``: the model (bench.corpus.MODELS)."""
    from bench.corpus import build_model
    from training.synthetic import make_shapes

    model = build_model(kind, work / f"{kind}-git")
    distinct = int(n_images * 0.7)
    made = make_shapes(work / "distinct", distinct, seed=5, size=32)
    archive = work / "archive"
    archive.mkdir(exist_ok=True)
    rng = random.Random(0)
    sources = [p for p, _ in made] + [rng.choice(made)[0] for _ in range(n_images - distinct)]
    rng.shuffle(sources)
    for i, src in enumerate(sources):
        (archive / f"{i:05d}.png").write_bytes(src.read_bytes())
    out: dict[str, Any] = {"model": kind, "images": n_images, "duplicates": n_images - distinct}
    for label, reuse in (("off", "false"), ("on", "true")):
        queue = f"bench-reuse-{label}"
        env = {
            "CAPTIONER_BROKER_URL": redis.url(3),
            "CAPTIONER_REDIS_URL": redis.url(4),
            "CAPTIONER_MODEL": str(model),
            "CAPTIONER_ALLOWED_ROOTS": str(work),
            "CAPTIONER_CAPTION_QUEUE": queue,
            "CAPTIONER_DTYPE": "float32",
            "CAPTIONER_REUSE_CAPTIONS": reuse,
            "CAPTIONER_METRICS_PORT": "0",
            "CAPTIONER_CONCURRENCY": "1",
            "CAPTIONER_TORCH_THREADS": "1",
            "CAPTIONER_MAX_LENGTH": "20",
            "HF_HUB_OFFLINE": "1",
        }
        worker = WorkerProcess(env, log=work / f"worker-{label}.log").start()
        try:
            worker.wait_ready()
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                client = JobClient(Settings())
            finally:
                os.environ.clear()
                os.environ.update(saved)
            started = time.perf_counter()
            client.enqueue(expand(str(archive)), job_id=f"reuse-{label}", params=GenParams(max_length=20), chunk_size=8)
            info = client.wait(f"reuse-{label}", timeout=600, on_tick=lambda _: None, poll_s=0.1)
            seconds = time.perf_counter() - started
            reused = sum(1 for r in client.results(f"reuse-{label}") if r.get("reused"))
            out[f"reuse_{label}"] = {"seconds": round(seconds, 2), "ok": info.ok, "reused": reused}
            client.close()
        finally:
            worker.terminate()
    out["speedup"] = round(out["reuse_off"]["seconds"] / out["reuse_on"]["seconds"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=3000)
    parser.add_argument("--shards", type=int, default=10000)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument(
        "--reuse-model",
        choices=["tiny", "git-base"],
        default="tiny",
        help="the model of the reuse run (git-base: its shapes, random weights)",
    )
    args = parser.parse_args()
    with LocalRedis() as redis, tempfile.TemporaryDirectory(prefix="bench-sources-") as tmp:
        figures = {
            "enqueue": enqueue_rates(redis, args.objects, args.shards),
            "reuse": reuse_ratio(redis, Path(tmp), args.images, args.reuse_model),
        }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
