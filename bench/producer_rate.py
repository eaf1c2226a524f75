"""Producer figures with no worker: enqueue rate from a directory and from a URL list, Redis bytes per pending item."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis as redis_lib

from common.messages import GenParams
from common.settings import Settings
from producer.jobs import JobClient
from producer.local import LocalRedis
from producer.sources import expand

#: A URL of typical length for a large archive.
URL_TEMPLATE = "https://images.example.org/archive/2024/06/{i:08d}.jpg"


def _used_memory(client: JobClient) -> int:
    return client.ledger.bytes_used()


def _listing(root: Path, n: int) -> Path:
    """``n`` empty ``.jpg`` files (the producer lists names; it never opens images), 1,000 per sub-directory."""
    folder = root / f"listing-{n}"  # one per size, so a kept --workdir never mixes listings of two runs
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == n:
        return folder  # a kept --workdir: the same listing again
    for i in range(n):
        sub = folder / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:08d}.jpg").touch()
    return folder


def _url_list(root: Path, n: int) -> Path:
    path = root / "urls.txt"
    path.write_text("".join(URL_TEMPLATE.format(i=i) + "\n" for i in range(n)), encoding="utf-8")
    return path


def _enqueue(client: JobClient, source: Path, n: int, job_id: str, max_length: int) -> dict[str, Any]:
    """Time what ``captioner enqueue SOURCE`` does (expand + manifest + chunk messages); measure Redis growth."""
    mem_before = _used_memory(client)
    started = time.perf_counter()
    report = client.enqueue(expand(str(source)), job_id=job_id, params=GenParams(max_length=max_length))
    seconds = time.perf_counter() - started
    mem_after = _used_memory(client)
    if report.sent != n:
        raise RuntimeError(f"enqueue of {source} sent {report.sent} of {n} items")
    refs = [next(iter(expand(str(source))))]
    return {
        "items": n,
        "seconds": round(seconds, 3),
        "items_per_s": round(n / seconds, 1),
        "messages": report.messages,
        "redis_bytes_per_item": round((mem_after - mem_before) / n, 1),
        "ref_example": refs[0],
        "ref_chars": len(refs[0]),
    }


def measure_producer(workdir: Path, n: int, *, max_length: int) -> dict[str, Any]:
    """Enqueue ``n`` files from a directory, then ``n`` URLs from a list, into a fresh redis-server with no worker."""
    folder, urls = _listing(workdir, n), _url_list(workdir, n)
    with LocalRedis() as redis:
        settings = Settings(
            broker_url=redis.url(0),
            result_backend=redis.url(0),
            redis_url=redis.url(1),
            key_prefix="bench",
            caption_queue="bench-producer",
        )
        client = JobClient(settings)
        try:
            # A one-item job first: connections, the queue's bindings and the jobs index exist before measuring.
            warm = workdir / "warm.txt"
            warm.write_text(URL_TEMPLATE.format(i=-1) + "\n", encoding="utf-8")
            client.enqueue(expand(str(warm)), job_id="bench-warm", params=GenParams(max_length=max_length))
            out = {
                "directory": _enqueue(client, folder, n, "bench-dir", max_length),
                "url_list": _enqueue(client, urls, n, "bench-urls", max_length),
                "chunk_size": settings.chunk_size,
            }
            # Nothing consumed them: every chunk message is still in the broker's list (a sanity check).
            broker = redis_lib.Redis.from_url(redis.url(0))
            out["queued_messages"] = int(broker.llen(settings.caption_queue))
            broker.close()
        finally:
            client.close()
    return out
