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

from pydantic import ValidationError

from common.connections import RETRYABLE_REDIS_ERRORS
from common.errors import Cancelled, InvalidInput, InvalidMessage, Poison
from common.messages import (
    MAX_ITEMS_PER_MESSAGE,
    ChunkItem,
    ChunkMessage,
    GenParams,
    ItemResult,
    ItemStatus,
    JobState,
    item_id,
    parse_message,
)
from common.settings import Settings
from runtime import metrics
from worker import curation
from worker.service import CaptionService, ItemSource, error_row, row_base

if TYPE_CHECKING:
    from ledger import Attempt, Ledger

log = logging.getLogger(__name__)

_T = TypeVar("_T")


#: Characters of a refused reference a row keeps (a 1 MB URL is named by its start and its length).
REF_PREVIEW_CHARS = 256


@dataclass(frozen=True)
class BadItem:
    """An item of a chunk that does not parse (a reference over the bounds, a source of the wrong shape): it gets a
    named error row under its id, and the chunk's other items are captioned."""

    id: str
    ref: str
    error: str


def parse_chunk(payload: dict[str, Any]) -> tuple[ChunkMessage, list[BadItem]]:
    """A chunk message and its items that do not parse, apart. The item count is checked before any item is
    parsed (a million-item message is refused as it is, not after building a million sources); an item with no
    id to record it under makes the whole message invalid, as before."""
    items = payload.get("items")
    if not isinstance(items, list):
        return parse_message(ChunkMessage, payload), []  # type: ignore[return-value]
    if len(items) > MAX_ITEMS_PER_MESSAGE:
        raise InvalidMessage(f"ChunkMessage: items: {len(items)} items, over {MAX_ITEMS_PER_MESSAGE} per message")
    good: list[Any] = []
    bad: list[BadItem] = []
    for raw in items:
        try:
            ChunkItem.model_validate({"id": item_id(raw), "src": raw} if isinstance(raw, str) else raw)
            good.append(raw)
        except (ValidationError, TypeError, ValueError) as exc:
            found = _bad_item(raw, exc)
            if found is None:
                raise InvalidMessage(f"ChunkMessage: an item with no id to record it under: {str(exc)[:200]}") from None
            bad.append(found)
    if not bad:
        return parse_message(ChunkMessage, payload), []  # type: ignore[return-value]
    msg = parse_message(ChunkMessage, {**payload, "items": good or ["/"]})  # job id and params checked all the same
    return (msg if good else msg.model_copy(update={"items": []})), bad  # type: ignore[union-attr]


def _bad_item(raw: Any, exc: Exception) -> BadItem | None:
    if isinstance(raw, str):
        iid, ref = item_id(raw), raw
    elif isinstance(raw, dict) and isinstance(raw.get("id"), str) and 0 < len(raw["id"]) <= 64:
        iid, src = raw["id"], raw.get("src")
        ref = src if isinstance(src, str) else str(type(src).__name__)
    else:
        return None
    first = exc.errors()[0] if isinstance(exc, ValidationError) else {"msg": str(exc)}
    preview = ref if len(ref) <= REF_PREVIEW_CHARS else f"{ref[:REF_PREVIEW_CHARS]}... ({len(ref)} characters)"
    return BadItem(iid, preview, f"the item does not parse: {first.get('msg')}"[:300])


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
        self._dups: curation.NearDuplicates | None = None  # the near-duplicate index, made on first use

    def run(self, msg: ChunkMessage, bad: list[BadItem] | None = None) -> ChunkOutcome:
        """Caption a chunk of a job and record every row before returning (the task acks after). Items that do not
        parse get their named row; an item whose id is not its reference's names another item's image: refused."""
        items, wrong = [], 0
        for it in msg.items:
            if it.id == item_id(it.src.ref):
                items.append((it.id, it.src))
            else:
                wrong += 1
        out = self.run_items(msg.job_id, items, msg.params) if items else ChunkOutcome(job_id=msg.job_id, items=0)
        if wrong:  # a message may not give a pending item another image than its own
            out.refused += wrong
            log.warning(
                "chunk of job %s pairs %d id(s) with a reference that is not theirs; refused", msg.job_id, wrong
            )
        if bad:
            self._bad_rows(msg.job_id, bad, msg.params, out)
        return out

    def _bad_rows(self, job_id: str, bad: list[BadItem], params: GenParams, out: ChunkOutcome) -> None:
        """Rows for items that do not parse, when the job holds them and they are not captioned already."""
        out.items += len(bad)
        status = self.ledger.statuses(job_id, [b.id for b in bad])
        unknown = sum(status[b.id] is None for b in bad)
        if unknown:
            out.refused += unknown
            log.warning("chunk of job %s names %d unparsable item(s) not in the job; refused", job_id, unknown)
        rows = [
            error_row({"id": b.id, "ref": b.ref, "params": params}, InvalidInput(b.error))
            for b in bad
            if status[b.id] not in (None, ItemStatus.OK)
        ]
        out.skipped += sum(status[b.id] is ItemStatus.OK for b in bad)
        if rows:
            self._write(job_id, rows, out)
            log.info("chunk job=%s: %d item(s) that do not parse recorded as invalid_input", job_id, len(rows))

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
        work, dups = self._near_duplicates(job_id, work, params)
        rows = poison + self.service.caption_items(work, params, counts)
        if dups:  # after their representatives: a representative captioned in this chunk gives them its caption
            base = lambda iid, src: row_base(iid, src, params, counts.get(iid, 1))  # noqa: E731
            rows += curation.duplicate_rows(job_id, dups, rows, self.ledger.item, base)
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

    def _near_duplicates(
        self, job_id: str, work: list[tuple[str, ItemSource]], params: GenParams
    ) -> tuple[list[tuple[str, ItemSource]], list[curation.Duplicate]]:
        """Items to caption, and near-duplicates of a group's representative (when the job asks for them)."""
        if not work or params.curation is None or not params.curation.near_duplicates:
            return work, []
        if self._dups is None:
            self._dups = curation.NearDuplicates(
                *curation.index_client(self.ledger, self.settings), self.settings, self.service.scorers
            )
        device = str(getattr(self.service.engine, "device", "cpu"))
        return self._dups.split(job_id, work, params, self.service.decode_source, device)

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
