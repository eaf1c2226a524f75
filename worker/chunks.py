"""The chunk protocol: caption a chunk of a ledger job so that redelivery, crashes and Redis outages lose nothing.

Steps for one chunk: skip what is captioned already (a redelivery), record an attempt for the rest before any
work (so a crash counts), triage (poison, shared batches, suspects run alone), caption through the
``CaptionService``, settle (transient failures go back to the queue, everything else becomes a row), and write
the rows durably before the task acks. Plain Python: the Celery task only parses the message and acts on the
outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from common.connections import RETRYABLE_REDIS_ERRORS
from common.errors import Cancelled, Poison
from common.messages import ChunkMessage, GenParams, ItemResult, ItemStatus, JobState
from common.settings import Settings
from runtime import metrics
from worker.service import CaptionService, ItemSource, error_row, row_base

if TYPE_CHECKING:
    from ledger import Attempt, Ledger

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass
class ChunkOutcome:
    """What one chunk did, for the task's return value and the log line."""

    job_id: str
    items: int
    ok: int = 0
    error: int = 0
    skipped: int = 0
    #: Items the message named that its job does not hold.
    refused: int = 0
    retry: list[str] | None = None
    #: Attempts already made on the items to retry (sets the backoff).
    retry_attempt: int = 0
    #: Transient failures are written as rows too (members of a container cannot be sent again by themselves).
    final_transients: bool = False
    load_ms: float = 0.0
    infer_ms: float = 0.0
    write_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class ChunkRunner:
    """Runs chunks of ledger jobs on one process's ``CaptionService``; rows are in the ledger before ``run`` returns."""

    def __init__(
        self,
        service: CaptionService,
        ledger: Ledger,
        settings: Settings,
        *,
        on_job_done: Callable[[str], None] | None = None,
    ) -> None:
        self.service, self.ledger, self.settings = service, ledger, settings
        self.on_job_done = on_job_done
        #: Held while a suspect item runs by itself, so no other suspect shares its fate (see _triage).
        self._alone = threading.Lock()

    def run(self, msg: ChunkMessage) -> ChunkOutcome:
        """Caption a chunk of a job and record every row before returning (the task acks after)."""
        return self.run_items(msg.job_id, [(it.id, it.src) for it in msg.items], msg.params)

    def run_items(
        self, job_id: str, items: list[tuple[str, ItemSource]], params: GenParams, *, kind: str = "chunk"
    ) -> ChunkOutcome:
        """Caption items of a job (references to fetch, or bytes in hand) and record every row before returning.

        Items in hand (``kind`` "container") have every row written, transient ones too: they cannot be sent again
        by themselves, and the container's next run captions what failed (``captioner retry``)."""
        ledger, out = self.ledger, ChunkOutcome(job_id=job_id, items=len(items), final_transients=kind != "chunk")
        started = time.perf_counter()
        status = ledger.statuses(job_id, [iid for iid, _ in items])
        unknown = [iid for iid, _ in items if status[iid] is None]
        if unknown:  # a message may only name items of its job's manifest: nothing is added behind its back
            out.refused = len(unknown)
            log.warning(
                "chunk of job %s names %d item(s) not in the job (e.g. %s); refused", job_id, len(unknown), unknown[0]
            )
        todo = [(iid, src) for iid, src in items if status[iid] not in (ItemStatus.OK, None)]  # redelivery: skip done
        out.skipped = len(items) - len(todo) - out.refused
        if not todo:
            return out
        if ledger.state(job_id) is JobState.CANCELLED:
            rows = [error_row(row_base(*it, params), Cancelled("job cancelled")) for it in todo]
            self._write(job_id, rows, out)
            return out
        attempts = self._durably(ledger.begin_attempt, job_id, [iid for iid, _ in todo])
        counts = {i: a.started for i, a in attempts.items()}
        poison, work, alone = self._triage(todo, params, attempts)
        batcher = self.service.batcher
        infer_before = batcher.stats.infer_s
        rows = poison + self.service.caption_items(work, params, counts)
        self._settle(job_id, rows, out)
        for iid, src in alone:  # each by itself, recorded at once: if it kills the worker, it is alone in dying
            with self._alone:  # counted and recorded while it holds the lock: waiting for it is no attempt
                self._durably(ledger.begin_alone, job_id, iid)
                row = self.service.caption_items([(iid, src)], params, counts, alone=True)
                self._settle(job_id, row, out)
            rows += row
        out.load_ms = sum(r.timings.get("load_ms", 0.0) for r in rows)
        out.infer_ms = (batcher.stats.infer_s - infer_before) * 1000  # model time while this chunk ran
        out.retry_attempt = max((r.attempts for r in rows if r.id in set(out.retry or ())), default=0)
        log.info(
            "%s job=%s items=%d ok=%d error=%d skipped=%d alone=%d load_ms=%.0f infer_ms=%.0f write_ms=%.1f "
            "total_ms=%.0f",
            kind,
            job_id,
            out.items,
            out.ok,
            out.error,
            out.skipped,
            len(alone),
            out.load_ms,
            out.infer_ms,
            out.write_ms,
            (time.perf_counter() - started) * 1000,
        )
        return out

    def _settle(self, job_id: str, rows: list[ItemResult], out: ChunkOutcome) -> None:
        """Write final rows; transient failures with attempts left are not written but sent again (by the task).
        With ``final_transients`` (container members, which cannot travel alone) every row is written."""
        limit = self.settings.max_attempts
        retry = [] if out.final_transients else sorted(r.id for r in rows if r.transient and r.attempts < limit)
        if retry:
            out.retry = sorted({*(out.retry or ()), *retry})
            metrics.RETRIES.inc(len(retry))
            self._durably(self.ledger.end_attempts, job_id, retry)
        final = [r for r in rows if r.id not in set(retry)]
        if final:
            self._write(job_id, final, out)

    def _triage(
        self, todo: list[tuple[str, ItemSource]], params: GenParams, attempts: dict[str, Attempt]
    ) -> tuple[list[ItemResult], list[tuple[str, ItemSource]], list[tuple[str, ItemSource]]]:
        """Poison rows, items for the shared batches, and suspects to run alone.

        A suspect's earlier attempt never ended: its worker died holding it, with batch-mates beside it. Each
        suspect runs by itself, so the item that kills workers is the only one charged for it: it becomes
        poison after ``max_attempts`` deaths, and the innocent ones finish on their solo attempt.
        """
        limit = self.settings.max_attempts
        poison: list[ItemResult] = []
        work: list[tuple[str, ItemSource]] = []
        alone: list[tuple[str, ItemSource]] = []
        for it in todo:
            att = attempts[it[0]]
            crashes = att.started - 1 - att.finished
            if att.suspect and att.alone >= limit - 1:
                text = f"its worker died {crashes} time(s) while captioning it ({att.alone} alone); not tried again"
                poison.append(error_row(row_base(*it, params, att.started), Poison(text)))
            elif att.suspect:
                alone.append(it)
            elif att.started > limit:
                poison.append(error_row(row_base(*it, params, att.started), Poison(f"gave up after {limit} attempts")))
            else:
                work.append(it)
        return poison, work, alone

    def _write(self, job_id: str, rows: list[ItemResult], out: ChunkOutcome) -> None:
        """Record rows durably; fire completion once if these rows settled the job."""
        started = time.perf_counter()
        recorded = self._durably(self.ledger.record, job_id, rows)
        out.refused += recorded.refused  # requeued or removed from the manifest since this chunk began
        metrics.observe_rows(rows)  # final rows only: an item retried after a transient failure counts once
        if recorded.finished:
            self.job_finished(job_id)
        took = (time.perf_counter() - started) * 1000
        out.write_ms += took
        metrics.STAGE.labels("write").observe(took / 1000)
        ok = sum(r.status is ItemStatus.OK for r in rows)
        out.ok += ok
        out.error += len(rows) - ok

    def job_finished(self, job_id: str) -> None:
        """A write settled the job's last item: completion callbacks (once, here) and the finished job's expiry."""
        if self.on_job_done:
            self.on_job_done(job_id)
        if self.settings.ledger_ttl_s:
            self.ledger.expire_job(job_id, self.settings.ledger_ttl_s)

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
            except RETRYABLE_REDIS_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("ledger write failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
