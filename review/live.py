"""Live figures for the jobs list: progress with rate and ETA over server-sent events, workers online with the
model each serves, queue depths."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from common.messages import JobKind
from ledger import JobInfo
from review.context import Review, review_of

#: Seconds between two progress events.
EVENT_INTERVAL_S = 1.0
#: Seconds of history the rate is measured over.
RATE_WINDOW_S = 15.0
#: Seconds a workers look-up is reused (each asks every worker and waits for answers).
WORKERS_TTL_S = 5.0
JOBS_SHOWN = 50


class RateTracker:
    """Items settled per second for each job, over the last ``RATE_WINDOW_S`` of samples."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def rate(self, job_id: str, settled: int, now: float) -> float | None:
        samples = self._samples.setdefault(job_id, deque())
        samples.append((now, settled))
        while len(samples) > 2 and now - samples[0][0] > RATE_WINDOW_S:
            samples.popleft()
        (t0, n0) = samples[0]
        return (settled - n0) / (now - t0) if now > t0 else None


def job_summary(info: JobInfo, rates: RateTracker | None = None, now: float | None = None) -> dict[str, Any]:
    """One job as the jobs list shows it: counters, done fraction, rate and ETA (training: step and ETA)."""
    out: dict[str, Any] = {k: v for k, v in info.as_dict().items() if k in _SUMMARY_FIELDS}
    if info.kind is JobKind.TRAIN:
        p = info.extra.get("progress") or {}
        total = p.get("total_steps") or 0
        out.update(done=p.get("step") or 0, total=total, rate=None, eta_s=p.get("eta_s"), loss=p.get("loss"))
        out["version"] = (info.extra.get("result") or {}).get("version")
        return out
    settled = info.ok + info.error + info.cancelled
    rate = rates.rate(info.id, settled, now or time.time()) if rates else None
    running = info.state.value == "running"
    eta = info.pending / rate if running and rate and rate > 0 else None
    out.update(done=settled, rate=rate if running else None, eta_s=eta)
    return out


_SUMMARY_FIELDS = ("id", "name", "kind", "state", "total", "ok", "error", "cancelled", "pending", "created")


async def job_events(request: Request) -> StreamingResponse:
    """Server-sent events: every second, the jobs list (or the one job ``?job=``) with rate and ETA."""
    ctx = review_of(request)
    only = request.query_params.get("job")

    def load() -> list[JobInfo]:
        return [ctx.ledger.job(only)] if only else ctx.ledger.jobs(JOBS_SHOWN)

    if only:
        await run_in_threadpool(load)  # an unknown job is a 404 now, not a stream of errors

    async def stream() -> AsyncIterator[str]:
        rates = RateTracker()
        while not await request.is_disconnected():
            now = time.time()
            infos = await run_in_threadpool(load)
            yield f"data: {json.dumps([job_summary(i, rates, now) for i in infos])}\n\n"
            await asyncio.sleep(EVENT_INTERVAL_S)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"x-accel-buffering": "no"})


def workers_snapshot(ctx: Review) -> dict[str, Any]:
    """Caption workers with the model version each serves, training workers, and queue depths (blocking)."""
    from producer.jobs import workers_info
    from runtime.celery_app import queue_depths

    now = time.monotonic()
    if ctx.workers_cache and now - ctx.workers_cache[0] < WORKERS_TTL_S:
        return ctx.workers_cache[1]
    app = ctx.client.app
    answers = workers_info(app, timeout=1.0)
    caption = [
        {"name": host, **{k: info.get(k) for k in ("model_version", "device", "dtype", "items")}}
        for host, info in sorted(answers.items())
        if "loaded" in info
    ]
    training = ctx.client.training_workers(timeout=1.0)
    snapshot = {
        "caption": caption,
        "training": [{"name": name} for name in training],
        "queues": queue_depths(app, ctx.settings),
    }
    ctx.workers_cache = (now, snapshot)
    return snapshot


async def workers(request: Request) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(workers_snapshot, review_of(request)))
