"""Thin Celery adapters: parse the message, call the service, return rows, decide on retry. No logic here."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from celery import Task
from celery.exceptions import Reject
from celery.signals import celeryd_after_setup, worker_shutting_down
from celery.worker.control import inspect_command

from common.connections import RETRYABLE_REDIS_ERRORS
from common.errors import CaptionerError, ConfigError, InvalidMessage
from common.memory import machine_memory_bytes
from common.messages import (
    TASK_CAPTION,
    TASK_CAPTION_CHUNK,
    TASK_CAPTION_CONTAINER,
    TASK_CAPTION_MANY,
    TASK_NOTIFY,
    CaptionManyRequest,
    CaptionRequest,
    ChunkItem,
    ChunkMessage,
    ContainerMessage,
    check_job_id,
    parse_message,
    source_from_wire,
)
from common.settings import get_settings
from ledger import ledger_from_settings
from runtime import metrics
from runtime.celery_app import queue_depths
from runtime.logs import job_context
from worker.celery_app import app
from worker.chunks import ChunkOutcome, ChunkRunner
from worker.container_runner import ContainerRunner
from worker.service import CaptionService

log = logging.getLogger(__name__)
T = TypeVar("T")

# Infrastructure blips: retried with backoff until Redis answers again (or has memory again).
_INFRA_ERRORS = RETRYABLE_REDIS_ERRORS
#: The interpreter's thread switch interval in caption workers (see _warm_up).
GIL_SWITCH_S = 0.0005
#: Retries of a chunk that failed for any other reason (a bug): then its items stay pending for reconcile.
_BUG_RETRIES = 3


class _Lazy(Generic[T]):
    """One heavy object of this process, built on first use (never at import: no model load before the worker is
    set up), once, under a lock all of them share; ``made`` is it, or None while nobody asked."""

    _lock = threading.RLock()  # reentrant: the chunk runner is built on the service, the container runner on both

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self.made: T | None = None

    def __call__(self) -> T:
        if self.made is None:
            with self._lock:
                if self.made is None:
                    self.made = self._build()
        return self.made


def _new_service() -> CaptionService:
    settings = get_settings()
    return CaptionService(settings, reuse=ledger_from_settings(settings) if settings.reuse_captions else None)


def _new_chunks() -> ChunkRunner:
    settings = get_settings()
    return ChunkRunner(service(), ledger_from_settings(settings), settings, on_job_done=_job_done)


#: The process's one CaptionService (model, batcher, decode pool).
service = _Lazy(_new_service)
#: The process's chunk runner: the service's batches, written to the ledger.
chunks = _Lazy(_new_chunks)
#: The process's container runner, on its chunk runner.
containers = _Lazy(lambda: ContainerRunner(chunks(), get_settings()))


def _payload(**fields: Any) -> dict[str, Any]:
    """Keyword arguments as a payload; parameters the caller left out take this worker's defaults."""
    payload = {k: v for k, v in fields.items() if v is not None}
    if isinstance(payload.get("params", {}), dict):
        payload["params"] = get_settings().gen_params(payload.get("params"))
    return payload


def _backoff(attempt: int) -> int:
    return min(2 ** max(attempt, 1), 60)


def _run_or_give_back(task: Task, what: str, job_id: str, run: Callable[[], ChunkOutcome], left: str) -> ChunkOutcome:
    """``run()`` a chunk or a container of a ledger job, with the failure rules both share. ``left`` says what
    remains when a bug outlives its retries."""
    try:
        return run()
    except _INFRA_ERRORS as exc:
        # Redis down or full past CAPTIONER_WRITE_RETRY_S. Not a retry (publishing a copy needs the Redis that
        # just failed): the message goes back to its queue, or, if even that fails, stays unacked and returns
        # after the visibility timeout. Either way nothing is lost.
        log.warning("%s of job %s given back: %s: %s", what, job_id, type(exc).__name__, exc)
        raise Reject(exc, requeue=True) from None
    except InvalidMessage:
        raise
    except Exception as exc:
        # Not bad input (that is a row) nor Redis (above): a bug. A few tries, then what the message held stays as
        # it was (pending items, an open container), which `captioner reconcile JOB` sends again once it is fixed.
        if task.request.retries >= _BUG_RETRIES:
            log.exception("%s of job %s failed %d times; %s", what, job_id, _BUG_RETRIES + 1, left)
            raise
        log.exception("%s of job %s failed; trying again", what, job_id)
        raise task.retry(exc=exc, countdown=_backoff(task.request.retries + 1), max_retries=_BUG_RETRIES) from None


# ignore_result: the ledger is the record of a chunk; a result per chunk would only cost Redis memory and a write.
@app.task(name=TASK_CAPTION_CHUNK, bind=True, ignore_result=True)
def caption_chunk(self: Task, job_id: Any = None, items: Any = None, params: Any = None, **extra: Any) -> dict:
    """Caption a chunk of a ledger job; rows are in Redis before this returns (and the message is acked)."""
    msg = cast(ChunkMessage, parse_message(ChunkMessage, _payload(job_id=job_id, items=items, params=params, **extra)))
    with job_context(msg.job_id, self.request.id):
        outcome = _run_or_give_back(self, "chunk", msg.job_id, lambda: chunks().run(msg), "its items stay pending")
        if outcome.retry:
            again = [it for it in msg.items if it.id in set(outcome.retry)]
            _resend(self, msg, again, outcome.retry_attempt)
        return outcome.as_dict()


# Like chunks: rows reach the ledger before the ack; a redelivery skips captioned members; a closed container: no-op.
@app.task(name=TASK_CAPTION_CONTAINER, bind=True, ignore_result=True)
def caption_container(self: Task, job_id: Any = None, container: Any = None, params: Any = None, **extra: Any) -> dict:
    """Caption the members of one container (a shard, a row group) of a ledger job, read once, sequentially."""
    msg = cast(
        ContainerMessage,
        parse_message(ContainerMessage, _payload(job_id=job_id, container=container, params=params, **extra)),
    )
    with job_context(msg.job_id, self.request.id):
        outcome = _run_or_give_back(self, "container", msg.job_id, lambda: containers().run(msg), "it stays open")
        return outcome.as_dict()


def _resend(task: Task, msg: ChunkMessage, items: list[ChunkItem], attempt: int) -> None:
    """Send transient failures again as a new chunk, later each time (2 s, 4 s, 8 s ... up to 60 s)."""
    body = {"job_id": msg.job_id, "items": [it.wire() for it in items], "params": msg.params.model_dump()}
    task.apply_async(kwargs=body, countdown=_backoff(attempt))
    log.info("chunk job=%s retrying %d transient item(s) in %ds", msg.job_id, len(items), _backoff(attempt))


@app.task(name=TASK_CAPTION, bind=True, autoretry_for=_INFRA_ERRORS, retry_backoff=True, max_retries=None)
def caption(self: Task, source: Any = None, params: Any = None, **extra: Any) -> dict:
    """One image in, one result row out (status ok with a caption, or error with its class)."""
    req = parse_message(CaptionRequest, _payload(source=source, params=params, **extra))
    with job_context(None, self.request.id):
        row = service().caption_sources([req.src()], req.params)[0]  # type: ignore[attr-defined]
    row.attempts = self.request.retries + 1
    if row.transient and self.request.retries + 1 < get_settings().max_attempts:
        metrics.RETRIES.inc()
        raise self.retry(countdown=_backoff(self.request.retries + 1), max_retries=get_settings().max_attempts)
    metrics.observe_rows([row])
    return row.model_dump(mode="json", exclude_none=True)


@app.task(name=TASK_CAPTION_MANY, bind=True, autoretry_for=_INFRA_ERRORS, retry_backoff=True, max_retries=None)
def caption_many(self: Task, sources: Any = None, params: Any = None, **extra: Any) -> list[dict]:
    """A list of images in, a list of result rows out, same order and length."""
    req = cast(CaptionManyRequest, parse_message(CaptionManyRequest, _payload(sources=sources, params=params, **extra)))
    limit = get_settings().max_list_items
    if len(req.sources) > limit:
        raise InvalidMessage(
            f"CaptionManyRequest: {len(req.sources)} images, over this worker's {limit} per call "
            "(CAPTIONER_MAX_LIST_ITEMS): a call running past the visibility timeout would be delivered again and "
            "captioned twice; split the list, or send it as a job (captioner.caption_chunk.v1, JobClient.enqueue)"
        )
    srcs = [source_from_wire(s) for s in req.sources]
    with job_context(None, self.request.id):
        rows = service().caption_sources(srcs, req.params)
    metrics.observe_rows(rows)
    return [r.model_dump(mode="json", exclude_none=True) for r in rows]


def _job_done(job_id: str) -> None:
    """Completion work runs as its own task, with its own retries, after the chunk's ack."""
    notify_done.apply_async(kwargs={"job_id": job_id}, queue=get_settings().caption_queue)


@app.task(name=TASK_NOTIFY, bind=True, max_retries=5, ignore_result=True)
def notify_done(self: Task, job_id: str) -> dict:
    """Send a finished job's summary to the Celery task and/or webhook it named at enqueue."""
    from common.errors import CaptionerError
    from media.images import ImagePolicy
    from worker.callbacks import post_webhook

    try:
        check_job_id(job_id)  # as for chunks: no id reads another job's keys
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"notify_done: {exc}") from None
    settings = get_settings()
    ledger = chunks().ledger
    info = ledger.job(job_id)
    summary = info.as_dict()
    sent: dict[str, Any] = {"job_id": job_id}
    task_name = info.extra.get("on_done_task")
    # Sent once: a retry for the webhook below must not send the completion task a second time.
    if task_name and ledger.get_field(job_id, "done_task_sent") is None:
        app.send_task(task_name, kwargs={"job": summary}, queue=info.extra.get("on_done_queue"))
        ledger.set_fields(job_id, done_task_sent=time.time())
        sent["task"] = task_name
    if url := info.extra.get("webhook"):
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        policy = ImagePolicy.from_settings(settings)
        try:
            guard = chunks().service.fetches  # a stopping worker abandons it too (then it is retried)
            sent["webhook_status"] = post_webhook(url, summary, secret=secret, policy=policy, guard=guard)
        except CaptionerError as exc:
            if getattr(exc, "transient", False) and self.request.retries < self.max_retries:
                raise self.retry(countdown=_backoff(self.request.retries + 1)) from None
            ledger.set_fields(job_id, webhook_error=str(exc))
            log.warning("job %s: webhook failed: %s", job_id, exc)
            sent["webhook_error"] = str(exc)
    return sent


@inspect_command()
def captioner_info(state: Any, **kwargs: Any) -> dict[str, Any]:
    """`celery inspect captioner_info`: the model version this worker serves, and its batching figures."""
    svc = service.made
    if svc is None or svc._engine is None:
        return {"model_version": None, "loaded": False}
    eng, stats = svc._engine, svc.batcher.stats
    return {
        "loaded": True,
        "model": svc.settings.model,
        "model_version": eng.version,
        "family": getattr(eng, "family_name", "git"),
        "device": str(eng.device),
        "dtype": str(eng.dtype).removeprefix("torch."),
        "max_batch_size": svc.batcher.max_batch,
        # For `captioner doctor`: the worst case of this worker's decode threads against its machine's memory.
        "decode_threads": svc.settings.decode_threads,
        "decode_concurrency": svc.decode_slots(),
        "image_memory_bytes": svc.settings.image_memory_bytes,
        "memory_bytes": machine_memory_bytes(),
        # ... and how long its largest list call takes at its own speed, against its visibility timeout.
        "max_list_items": svc.settings.max_list_items,
        "visibility_timeout_s": svc.settings.visibility_timeout_s,
        # The speed profile in use ("exact", "fast:sdpa,compile"), its pieces, and pieces that fell back (why).
        **(eng.pieces.as_dict() if hasattr(eng, "pieces") else {}),
        "warm_up_s": round(svc.warm_up_s, 2),
        "batches": stats.batches,
        "items": stats.items,
        "infer_s": round(stats.infer_s, 3),
    }


@celeryd_after_setup.connect
def _warm_up(sender: str, instance: Any, **kwargs: Any) -> None:
    """Load the model before consuming, so the first message never waits for it (caption workers only)."""
    settings = get_settings()
    queues = set(instance.app.amqp.queues.consume_from or {}) or set(settings.caption_queues)
    if queues & set(settings.caption_queues):
        pool = getattr(instance.pool_cls, "__module__", str(instance.pool_cls))
        if "prefork" in pool or "eventlet" in pool or "gevent" in pool:
            # SystemExit, not an exception: Celery logs and swallows exceptions raised by signal handlers.
            log.critical(
                "%s",
                ConfigError(
                    f"caption workers run one model per process in threads; this worker's pool is "
                    f"{pool.rsplit('.', 1)[-1]} (use `captioner worker`, or `celery worker --pool threads`)"
                ),
            )
            raise SystemExit(2)
        # The model thread makes thousands of short calls that each release and retake the GIL; at Python's
        # default 5 ms switch interval every retake can wait behind a decode thread's Python code. 0.5 ms keeps
        # it fed (measured: tiny model, service 0.74 -> 0.99 of the in-process engine on 2 cores).
        sys.setswitchinterval(GIL_SWITCH_S)
        svc = service()
        try:
            version = svc.warm_up()
        except CaptionerError as exc:
            # A model that does not load (missing, not GIT, no promoted version), a device that is not there or an
            # unknown speed profile or piece fails every job it would take: say so in one line and do not start.
            # SystemExit, as above.
            log.critical("cannot start a caption worker: %s", exc)
            raise SystemExit(1) from None
        engine = svc.engine
        metrics.set_model(
            version, str(engine.device), str(engine.dtype).removeprefix("torch."), getattr(engine, "profile", None)
        )
        metrics.WARM_UP.set(svc.warm_up_s)
        metrics.serve(settings.metrics_port, settings.metrics_addr, _queue_depths)
        log.info(
            "worker %s serves model %s; %d decode threads, %d decoding at once",
            sender,
            version,
            settings.decode_threads,
            svc.decode_slots(),
        )


def _queue_depths() -> dict[str, int]:
    return queue_depths(app, get_settings())


@worker_shutting_down.connect
def _stop(**kwargs: Any) -> None:
    if service.made is not None:
        log.info("shutting down: finishing batches in flight, abandoning URL fetches in flight")
        service.made.abandon_fetches()
