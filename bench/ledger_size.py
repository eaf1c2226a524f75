"""``python -m bench.ledger_size``: what a job costs its ledger, per item, in Redis and in PostgreSQL.

A throwaway redis-server holds the queue (and the ledger, for the Redis backend). The producer enqueues ``--items``
references of a realistic shape; the figure "per pending item" is Redis's growth then (manifest and chunk
messages). Then the chunk messages are taken off the queue and answered the way workers answer them (an
attempt begun, a row written per item, a ``--caption-chars`` caption each), through the ledger's own API, so the
figure "per captioned item" is everything Redis (or PostgreSQL) still holds per item when the job is done.
No model runs: this measures the ledger, not captioning.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
import uuid
from typing import Any

from common.messages import ChunkMessage, GenParams, ItemResult, ItemStatus
from common.settings import Settings
from ledger import Ledger
from producer.jobs import JobClient
from producer.local import LocalRedis

#: A reference of the shape a large archive has: a dated folder under a mount point.
REF_TEMPLATE = "/data/archive/2024/{folder:04d}/img-{i:08d}.jpg"
CAPTION = "a photograph of a red circle on a white background, near the top left corner of it"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _refs(n: int) -> list[str]:
    return [REF_TEMPLATE.format(folder=i // 1000, i=i) for i in range(n)]


def _drain(redis_client: Any, queue: str) -> list[ChunkMessage]:
    """Every chunk message on the queue, taken off it (Celery's JSON body: [args, kwargs, embed], base64)."""
    out = []
    while raw := redis_client.rpop(queue):
        message = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append(ChunkMessage.model_validate(kwargs))
    return out


def _answer(ledger: Ledger, messages: list[ChunkMessage], caption: str) -> float:
    """Write a row per item of every message, as a worker does; returns the rows written per second."""
    started = time.perf_counter()
    n = 0
    for msg in messages:
        ids = [it.id for it in msg.items]
        ledger.begin_attempt(msg.job_id, ids)
        now = time.time()
        rows = [
            ItemResult(
                id=it.id,
                ref=it.src.ref,
                status=ItemStatus.OK,
                caption=caption,
                model_version="git-base@v1",
                params=msg.params,
                finished_at=now,
            )
            for it in msg.items
        ]
        ledger.record(msg.job_id, rows)
        n += len(rows)
    return n / (time.perf_counter() - started)


def measure(backend: str, n: int, caption_chars: int, chunk_size: int) -> dict[str, Any]:
    caption = (CAPTION * (caption_chars // len(CAPTION) + 1))[:caption_chars]
    with LocalRedis() as server:
        fields: dict[str, Any] = {
            "broker_url": server.url(0),
            "key_prefix": f"bench_{uuid.uuid4().hex[:6]}",
            "caption_queue": "bench-captions",
        }
        if backend == "postgresql":
            fields["ledger_url"] = PG_URL
        client = JobClient(Settings(**fields))
        redis_client = client.app.connection_for_write().default_channel.client
        ledger = client.ledger
        used = lambda: int(redis_client.info("memory")["used_memory"])  # noqa: E731
        disk = ledger.bytes_used if backend == "postgresql" else (lambda: 0)
        redis_before, disk_before = used(), disk()
        started = time.perf_counter()
        # As `captioner enqueue /data/archive` does: references are kept relative to the folder enqueued.
        client.enqueue(
            _refs(n), job_id="bench-job", params=GenParams(max_length=50), chunk_size=chunk_size, base="/data/archive/"
        )

        enqueue_s = time.perf_counter() - started
        redis_pending = used()
        messages = _drain(redis_client, "bench-captions")
        rate = _answer(ledger, messages, caption)
        info = client.status("bench-job")
        if (info.state.value, info.ok) != ("done", n):
            raise RuntimeError(f"the bench job ended {info.state.value} with {info.ok} of {n} captioned")
        redis_done, disk_done = used(), disk()
        rows_key = f"{fields['key_prefix']}:job:bench-job:res"
        rows_bytes = int(redis_client.memory_usage(rows_key, samples=0) or 0) if backend == "redis" else 0
        peak = int(redis_client.info("memory")["used_memory_peak"])
        out = {
            "backend": backend,
            "items": n,
            "caption_chars": caption_chars,
            "ref_example": _refs(1)[0],
            "enqueue_items_per_s": round(n / enqueue_s),
            "rows_written_per_s": round(rate),
            "redis_bytes_per_pending_item": round((redis_pending - redis_before) / n, 1),
            "redis_bytes_per_captioned_item": round((redis_done - redis_before) / n, 1),
            "redis_bytes_per_row": round(rows_bytes / n, 1) if backend == "redis" else None,
            "redis_peak_bytes": peak,
            "postgres_bytes_per_item": round((disk_done - disk_before) / n, 1) if backend == "postgresql" else None,
        }
        if backend == "postgresql":
            from ledger.postgres import PostgresLedger

            assert isinstance(ledger, PostgresLedger)
            ledger._run(f"DROP SCHEMA IF EXISTS {ledger.schema} CASCADE")
        client.close()
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_size", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--caption-chars", type=int, default=60)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--backend", choices=["redis", "postgresql", "both"], default="both")
    args = parser.parse_args(argv)
    backends = ["redis", "postgresql"] if args.backend == "both" else [args.backend]
    for backend in backends:
        print(json.dumps(measure(backend, args.items, args.caption_chars, args.chunk_size)), flush=True)


if __name__ == "__main__":
    main()
