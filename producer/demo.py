"""`captioner demo`: the main job on an embedded default, offline, on any machine with Redis or redis-server.

It makes sample images and a small GIT, starts a real worker on a queue of its own, enqueues the images
as a bulk job, waits, exports the results and prints them; then stops what it started.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import redis

from producer.local import LocalRedis, WorkerProcess
from worker.messages import GenParams
from worker.settings import Settings


def _redis_or_local(settings: Settings, stack: ExitStack) -> Settings:
    """The configured Redis when it answers; otherwise a throwaway redis-server, if one is installed."""
    try:
        redis.Redis.from_url(settings.broker_url_str, socket_connect_timeout=2).ping()
        return settings
    except redis.RedisError:
        local = stack.enter_context(LocalRedis())
        click.echo(f"no Redis at the configured URL; started redis-server on port {local.port}", err=True)
        return settings.model_copy(update={"broker_url": local.url(0), "redis_url": None, "result_backend": None})


def run_demo(settings: Settings, *, n_images: int, workdir: Path | None, as_json: bool) -> dict[str, Any]:
    from producer.jobs import JobClient
    from training.synthetic import make_shapes
    from training.tiny import build_tiny_git
    from worker.sinks import export_rows

    started = time.perf_counter()
    with ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="captioner-demo-")))
        root = root.resolve()
        root.mkdir(parents=True, exist_ok=True)
        settings = _redis_or_local(settings, stack)
        # A queue and key prefix of its own: a demo never takes (or leaves) work for other workers.
        tag = uuid.uuid4().hex[:8]
        settings = settings.model_copy(
            update={"caption_queue": f"captioner-demo-{tag}", "key_prefix": f"{settings.key_prefix}-demo"}
        )
        say = (lambda *_: None) if as_json else (lambda msg: click.echo(msg, err=True))
        say(f"making {n_images} sample images and a small GIT in {root}")
        samples = make_shapes(root / "images", n_images, seed=1)
        model_dir = build_tiny_git(root / "model", seed=0)
        env = {
            "CAPTIONER_BROKER_URL": settings.broker_url_str,
            "CAPTIONER_RESULT_BACKEND": settings.result_backend_str,
            "CAPTIONER_REDIS_URL": settings.redis_url_str,
            "CAPTIONER_KEY_PREFIX": settings.key_prefix,
            "CAPTIONER_CAPTION_QUEUE": settings.caption_queue,
            "CAPTIONER_MODEL": str(model_dir),
            "CAPTIONER_ALLOWED_ROOTS": str(root),
            "HF_HUB_OFFLINE": "1",
        }
        say("starting a caption worker")
        proc = WorkerProcess(env, log=root / "worker.log")
        stack.callback(proc.terminate)
        proc.start().wait_ready()
        client = JobClient(settings)
        stack.callback(client.close)
        job_id = f"demo-{tag}"
        params = GenParams(max_length=20)
        report = client.enqueue((str(p) for p, _ in samples), job_id=job_id, name="demo", params=params, chunk_size=8)
        say(f"enqueued {report.items} images as job {job_id}; captioning...")
        info = client.wait(job_id, timeout=300, on_tick=lambda _: None)
        export_rows(client.results(job_id), "jsonl", root / "captions.jsonl")
        rows = sorted(client.results(job_id), key=lambda r: r["ref"])
        summary = {
            "job": info.as_dict(),
            "seconds": round(time.perf_counter() - started, 2),
            "results": [{"image": Path(r["ref"]).name, "caption": r.get("caption"), "status": r["status"]}
                        for r in rows],
            "export": str(root / "captions.jsonl") if workdir else None,
        }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print_table(summary, dict((p.name, c) for p, c in samples))
    return summary


def _print_table(summary: dict[str, Any], truth: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("image", "caption (small untrained GIT)", "reference text", title="captioner demo")
    for row in summary["results"]:
        table.add_row(row["image"], row["caption"] or f"[red]{row['status']}", truth.get(row["image"], ""))
    Console().print(table)
    job = summary["job"]
    click.echo(f"{job['ok']} of {job['total']} captioned in {summary['seconds']}s (job {job['id']})")
