"""The caption service inside one worker process: sources -> images -> batched engine -> result rows.

Plain Python: no Celery here. Tasks call ``CaptionService`` and decide only on acks and retries. The model
is loaded once, lazily, on first use (or by ``warm_up`` when the worker starts).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from common.connections import RETRYABLE_REDIS_ERRORS
from common.errors import Cancelled, EngineError, ItemError, Poison
from common.messages import (
    ChunkItem,
    ChunkMessage,
    GenParams,
    ItemResult,
    ItemStatus,
    JobState,
    Source,
    item_id,
    source_from_wire,
)
from common.settings import Settings
from common.store import ModelStore, resolve_model
from worker import metrics
from worker.batcher import MicroBatcher
from worker.images import ImagePolicy, load_image
from worker.quality import quality_flags

if TYPE_CHECKING:
    from common.ledger import Attempt, Ledger
    from worker.engine import CaptionEngine

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: Ledger write failures that pass: Redis restarting, a network blip, memory freed after maxmemory.
_RETRYABLE_WRITE = RETRYABLE_REDIS_ERRORS

EngineFactory = Callable[[], "CaptionEngine"]


def _default_engine_factory(settings: Settings) -> EngineFactory:
    def load() -> CaptionEngine:
        from worker.engine import CaptionEngine, EngineConfig  # torch is imported here, not at module load

        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        # Every engine setting from one place; only the model name is resolved here (@current -> a version).
        cfg = replace(EngineConfig.from_settings(settings), model=resolve_model(settings.model, settings.model_store))
        return CaptionEngine.load(cfg)

    return load


class Captioned(NamedTuple):
    """What the model thread hands back for one image."""

    caption: str
    version: str
    flags: list[str] | None
    batch_ms: float  # wall time of the model batch it ran in
    profile: str | None = None  # the speed pieces the batch ran with ("exact", "fast:sdpa,compile")


@dataclass
class ChunkOutcome:
    """What one chunk did, for the task's return value and the log line."""

    job_id: str
    items: int
    ok: int = 0
    error: int = 0
    skipped: int = 0
    retry: list[str] | None = None
    #: Attempts already made on the items to retry (sets the backoff).
    retry_attempt: int = 0
    load_ms: float = 0.0
    infer_ms: float = 0.0
    write_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class CaptionService:
    """Owns the engine, the batcher and the decode pool of one worker process."""

    def __init__(
        self,
        settings: Settings,
        *,
        ledger: Ledger | None = None,
        engine_factory: EngineFactory | None = None,
        on_job_done: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_job_done = on_job_done
        self.policy = ImagePolicy.from_settings(settings)
        self.ledger = ledger
        self._engine_factory = engine_factory or _default_engine_factory(settings)
        self._engine: CaptionEngine | None = None
        self._lock = threading.Lock()
        #: Held while a suspect item runs by itself, so no other suspect shares its fate (see _triage).
        self._alone = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stopped = threading.Event()
        #: Seconds the engine's warm-up took at start (compiled and captured pieces; 0 when none).
        self.warm_up_s = 0.0
        self._reported_profile: str | None = None
        self._pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.batcher: MicroBatcher[GenParams] = MicroBatcher(
            self._run_batch,
            max_batch=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            key=GenParams.key,
            name="engine",
            on_batch=metrics.observe_batch,
            fill_wait_s=settings.fill_wait_ms / 1000,
        )

    # --- the engine -----------------------------------------------------------------------------
    @property
    def engine(self) -> CaptionEngine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    started = time.perf_counter()
                    engine = self._engine_factory()
                    log.info(
                        "model loaded version=%s device=%s dtype=%s in %.1fs",
                        engine.version,
                        engine.device,
                        engine.dtype,
                        time.perf_counter() - started,
                    )
                    if "draft" in getattr(engine, "pieces", ()):  # CAPTIONER_JPEG_DRAFT, or the profile's piece
                        self.policy = replace(self.policy, draft_edge=engine.input_edge)
                    self._engine = engine
        return self._engine

    def swap_engine(self, engine: CaptionEngine) -> None:
        """Serve a new model from the next batch on; batches in flight finish on the old one."""
        with self._lock:
            self._engine = engine

    def warm_up(self) -> str:
        version = self.engine.version
        # Compiled and graph-captured pieces are built now, at start, not on the first request.
        params = GenParams(max_length=self.settings.max_length)
        if hasattr(self.engine, "warm_up"):
            self.warm_up_s = self.engine.warm_up(self.settings.max_batch_size, params)
        if self.settings.model == "@current" and self._watcher is None:
            self._watcher = threading.Thread(target=self._follow_store, name="model-watch", daemon=True)
            self._watcher.start()
        return version

    def check_promoted(self) -> bool:
        """Load the store's promoted version if it is not the one served; True when it swapped."""
        current = ModelStore(self.settings.model_store).current() if self.settings.model_store else None
        if current is None or (self._engine is not None and self._engine.version == current.version):
            return False
        engine = self._engine_factory()  # loads beside the old model; batches keep running meanwhile
        if hasattr(engine, "warm_up"):  # its compiled pieces too, before it takes a batch
            engine.warm_up(self.settings.max_batch_size, GenParams(max_length=self.settings.max_length))
        old = self._engine.version if self._engine else None
        self.swap_engine(engine)
        metrics.set_model(engine.version, str(engine.device), str(engine.dtype).removeprefix("torch."),
                          getattr(engine, "profile", None))  # fmt: skip
        log.info("model swapped %s -> %s (promoted)", old, engine.version)
        return True

    def _follow_store(self) -> None:
        while not self._stopped.wait(self.settings.model_poll_s):
            try:
                self.check_promoted()
            except Exception:  # a half-written or bad version must not stop the worker serving the old one
                log.exception("could not load the promoted model; still serving the previous one")

    def _run_batch(self, items: list[Any], params: GenParams) -> list[Captioned]:
        engine = self.engine  # one engine per batch: a swap lands between batches, never inside one
        if self.settings.fault_oom_above and len(items) > self.settings.fault_oom_above:
            raise MemoryError(f"out of memory (injected: batch {len(items)} > {self.settings.fault_oom_above})")
        started = time.perf_counter()
        generated = engine.generate_detailed(engine.stack(items), params)
        batch_ms = round((time.perf_counter() - started) * 1000, 2)
        profile = getattr(engine, "profile", None)  # after the batch: a piece that failed in it is not counted
        if profile != self._reported_profile:
            self._reported_profile = profile
            metrics.set_model(engine.version, str(engine.device), str(engine.dtype).removeprefix("torch."), profile)
        out = []
        for gen in generated:
            # A caption that ended on its own is not cut, even when its end token fell on the last position.
            tokens = gen.tokens - 1 if gen.ended else gen.tokens
            flags = quality_flags(gen.text, generated_tokens=tokens, max_length=params.max_length) or None
            out.append(Captioned(gen.text, engine.version, flags, batch_ms, profile))
        return out

    # --- captioning -----------------------------------------------------------------------------
    def _prepare(self, src: Source, params: GenParams, group: Hashable | None) -> tuple[Future[Any], float]:
        started = time.perf_counter()
        if self.settings.fault_kill_ref and self.settings.fault_kill_ref in src.ref:
            log.error("drill: %s kills this worker (CAPTIONER_FAULT_KILL_REF)", src.ref)
            os._exit(137)  # as abrupt as the OOM killer or a segfaulting decoder
        try:
            pixels = self.engine.prepare([load_image(src, self.policy)])
        except BaseException:
            self.batcher.arrived()  # announced in caption_items, and not coming: batches stop waiting for it
            raise
        return self.batcher.submit(pixels, params, group=group, expected=True), (time.perf_counter() - started) * 1000

    def caption_items(
        self,
        items: list[tuple[str, Source]],
        params: GenParams,
        attempts: dict[str, int] | None = None,
        *,
        alone: bool = False,
    ) -> list[ItemResult]:
        """One result row per item, same order. Per-item failures are rows; nothing here raises for them.

        ``alone``: each item is a model batch by itself (suspects of killing a worker; see ``_triage``).
        """
        self.engine  # noqa: B018 - load before fanning out, so decode threads don't all wait on the lock
        self.batcher.expect(len(items))
        # A copy of this thread's context per item: decode threads log with the task's job and task ids.
        prepared = [
            self._pool.submit(copy_context().run, self._prepare, src, params, ("alone", iid) if alone else None)
            for iid, src in items
        ]
        rows: list[ItemResult] = []
        for (iid, src), fut in zip(items, prepared, strict=True):
            base = {"id": iid, "ref": src.ref, "params": params, "attempts": (attempts or {}).get(iid, 1)}
            try:
                caption_future, load_ms = fut.result()
                done: Captioned = caption_future.result()
            except ItemError as exc:
                rows.append(_error_row(base, exc))
                continue
            except Exception as exc:  # a bug, not bad input: keep the batch alive, say so loudly
                log.exception("unexpected failure on %s", src.ref)
                rows.append(_error_row(base, EngineError(f"{type(exc).__name__}: {exc}")))
                continue
            rows.append(
                ItemResult(
                    **base,
                    status=ItemStatus.OK,
                    caption=done.caption,
                    flags=done.flags,
                    model_version=done.version,
                    profile=done.profile,
                    timings={"load_ms": round(load_ms, 2), "infer_ms": done.batch_ms},
                    finished_at=time.time(),
                )
            )
        return rows

    def caption_sources(self, sources: list[Source], params: GenParams) -> list[ItemResult]:
        return self.caption_items([(item_id(s.ref), s) for s in sources], params)

    # --- ledger jobs ----------------------------------------------------------------------------
    def run_chunk(self, msg: ChunkMessage) -> ChunkOutcome:
        """Caption a chunk of a job and record every row before returning (the task acks after)."""
        assert self.ledger is not None, "run_chunk needs a ledger"
        ledger, out = self.ledger, ChunkOutcome(job_id=msg.job_id, items=len(msg.items))
        started = time.perf_counter()
        status = ledger.statuses(msg.job_id, [it.id for it in msg.items])
        todo = [it for it in msg.items if status[it.id] is not ItemStatus.OK]  # a redelivery skips what is done
        out.skipped = len(msg.items) - len(todo)
        if not todo:
            return out
        if ledger.state(msg.job_id) is JobState.CANCELLED:
            rows = [_error_row(_base(it, msg.params), Cancelled("job cancelled")) for it in todo]
            self._write(msg.job_id, rows, out)
            return out
        attempts = self._durably(ledger.begin_attempt, msg.job_id, [it.id for it in todo])
        counts = {i: a.started for i, a in attempts.items()}
        poison, work, alone = self._triage(todo, msg.params, attempts)
        infer_before = self.batcher.stats.infer_s
        rows = poison + self.caption_items(work, msg.params, counts)
        self._settle(msg.job_id, rows, out)
        for iid, src in alone:  # each by itself, recorded at once: if it kills the worker, it is alone in dying
            with self._alone:  # counted and recorded while it holds the lock: waiting for it is no attempt
                self._durably(ledger.begin_alone, msg.job_id, iid)
                row = self.caption_items([(iid, src)], msg.params, counts, alone=True)
                self._settle(msg.job_id, row, out)
            rows += row
        out.load_ms = sum(r.timings.get("load_ms", 0.0) for r in rows)
        out.infer_ms = (self.batcher.stats.infer_s - infer_before) * 1000  # model time while this chunk ran
        out.retry_attempt = max((r.attempts for r in rows if r.id in set(out.retry or ())), default=0)
        log.info(
            "chunk job=%s items=%d ok=%d error=%d skipped=%d alone=%d load_ms=%.0f infer_ms=%.0f write_ms=%.1f "
            "total_ms=%.0f",
            msg.job_id, out.items, out.ok, out.error, out.skipped, len(alone), out.load_ms, out.infer_ms,
            out.write_ms, (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        return out

    def _settle(self, job_id: str, rows: list[ItemResult], out: ChunkOutcome) -> None:
        """Write final rows; transient failures with attempts left are not written but sent again (by the task)."""
        limit = self.settings.max_attempts
        retry = sorted(r.id for r in rows if r.transient and r.attempts < limit)
        if retry:
            out.retry = sorted({*(out.retry or ()), *retry})
            metrics.RETRIES.inc(len(retry))
            self._durably(self.ledger.end_attempts, job_id, retry)  # type: ignore[union-attr]
        final = [r for r in rows if r.id not in set(retry)]
        if final:
            self._write(job_id, final, out)

    def _triage(
        self, todo: list[ChunkItem], params: GenParams, attempts: dict[str, Attempt]
    ) -> tuple[list[ItemResult], list[tuple[str, Source]], list[tuple[str, Source]]]:
        """Poison rows, items for the shared batches, and suspects to run alone.

        A suspect's earlier attempt never ended: its worker died holding it, with batch-mates beside it. Each
        suspect runs by itself, so the item that kills workers is the only one charged for it: it becomes
        poison after ``max_attempts`` deaths, and the innocent ones finish on their solo attempt.
        """
        limit = self.settings.max_attempts
        poison: list[ItemResult] = []
        work: list[tuple[str, Source]] = []
        alone: list[tuple[str, Source]] = []
        for it in todo:
            att = attempts[it.id]
            crashes = att.started - 1 - att.finished
            if att.suspect and att.alone >= limit - 1:
                text = f"its worker died {crashes} time(s) while captioning it ({att.alone} alone); not tried again"
                poison.append(_error_row(_base(it, params, att.started), Poison(text)))
            elif att.suspect:
                alone.append((it.id, source_from_wire(it.src)))
            elif att.started > limit:
                poison.append(_error_row(_base(it, params, att.started), Poison(f"gave up after {limit} attempts")))
            else:
                work.append((it.id, source_from_wire(it.src)))
        return poison, work, alone

    def _write(self, job_id: str, rows: list[ItemResult], out: ChunkOutcome) -> None:
        """Record rows durably; fire completion once if these rows settled the job."""
        assert self.ledger is not None
        started = time.perf_counter()
        recorded = self._durably(self.ledger.record, job_id, rows)
        metrics.observe_rows(rows)  # final rows only: an item retried after a transient failure counts once
        if recorded.finished:
            if self.on_job_done:
                self.on_job_done(job_id)
            if self.settings.ledger_ttl_s:
                self.ledger.expire_job(job_id, self.settings.ledger_ttl_s)
        took = (time.perf_counter() - started) * 1000
        out.write_ms += took
        metrics.STAGE.labels("write").observe(took / 1000)
        ok = sum(r.status is ItemStatus.OK for r in rows)
        out.ok += ok
        out.error += len(rows) - ok

    def _durably(self, write: Callable[..., _T], *args: Any) -> _T:
        """``write(*args)``, retried in place while Redis is unreachable or at maxmemory.

        The captions are done and the message is still ours (unacked): waiting here, not failing, is what
        loses nothing. Past ``write_retry_s`` the error goes up, and the task is retried or redelivered.
        """
        deadline = time.monotonic() + self.settings.write_retry_s
        delay = 0.2
        while True:
            try:
                return write(*args)
            except _RETRYABLE_WRITE as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("ledger write failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def close(self) -> None:
        self._stopped.set()
        self.batcher.stop(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _base(item: ChunkItem, params: GenParams, attempts: int = 1) -> dict[str, Any]:
    return {"id": item.id, "ref": source_from_wire(item.src).ref, "params": params, "attempts": attempts}


def _error_row(base: dict[str, Any], exc: ItemError) -> ItemResult:
    status = ItemStatus.CANCELLED if isinstance(exc, Cancelled) else ItemStatus.ERROR
    return ItemResult(
        **base,
        status=status,
        error_class=exc.code,
        error=str(exc)[:500],
        transient=exc.transient or None,
        finished_at=time.time(),
    )
