"""What the ledger offers, cut by who uses it: one contract per caller, and ``Ledger``, one object holding them all.

  Jobs          the producer's job client, the worker's callbacks, the review page's job list (``JobLedger``)
  Items         the producer (manifest, retries, export) and the worker's chunk protocol (``ItemLedger``)
  Review        the review page and review exports: corrections and marks beside the model's caption
  ReuseCache    the worker's caption reuse by image digest
  TrainingRuns  training workers: one runner's lock, and the typed record of a run (``TrainingRun``)

Each backend (``ledger.redis``, ``ledger.postgres``) implements ``Ledger``; a caller that needs one part annotates
with that contract. The same behaviour holds for both backends: the tests run one suite against each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

from common.messages import GenParams, ItemResult, ItemStatus, JobKind, JobState
from ledger.records import (
    TRAINING_FIELDS,
    Attempt,
    ItemFilter,
    JobInfo,
    Page,
    Recorded,
    TrainingRun,
    check_correction,
    check_marks,
    check_reason,
    check_version,
    not_captioned,
)


class LedgerConnection(ABC):
    """Reaching the ledger's server: every caller opens one, ``captioner doctor`` sizes it."""

    @abstractmethod
    def ping(self) -> None:
        """Raise ``BrokerUnavailable`` with the reason when the ledger cannot be reached."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def bytes_used(self) -> int:
        """Memory (Redis) or disk (PostgreSQL) the ledger's server reports as used, for sizing figures."""


class JobLedger(ABC):
    """Jobs: their counters, state, options and lifetime. Every job, caption or training, is one of these."""

    @abstractmethod
    def open_job(
        self,
        job_id: str,
        name: str,
        params: GenParams | None,
        extra: dict[str, Any] | None = None,
        *,
        kind: JobKind = JobKind.CAPTION,
        base: str = "",
    ) -> bool:
        """Create the job if new, or reopen it (a resumed enqueue, a retry); True when it was created.

        Reopening keeps the stored options (``extra``) unless new ones are given, and holds the job back from
        'done' until ``seal``; its next end notifies again. ``base`` (kept from creation on) is a prefix most
        references share: they are stored without it.
        """

    @abstractmethod
    def seal(self, job_id: str) -> bool:
        """The producer has added every item: the job may now finish. True when this call finished it."""

    @abstractmethod
    def job(self, job_id: str) -> JobInfo:
        """The job, or ``UnknownJob``."""

    @abstractmethod
    def exists(self, job_id: str) -> bool: ...

    @abstractmethod
    def jobs(self, limit: int = 50) -> list[JobInfo]:
        """The most recently created jobs, newest first."""

    @abstractmethod
    def is_open(self, job_id: str) -> bool:
        """Whether the producer is still adding items (between ``open_job`` and ``seal``)."""

    @abstractmethod
    def state(self, job_id: str) -> JobState | None: ...

    @abstractmethod
    def set_state(self, job_id: str, state: JobState) -> None: ...

    @abstractmethod
    def set_fields(self, job_id: str, **fields: Any) -> None:
        """Job fields stored as JSON, one value each: the completion callbacks' marks (``done_task_sent``,
        ``webhook_error``) and, through ``TrainingRuns``, a training run's record."""

    @abstractmethod
    def get_fields(self, job_id: str, names: Iterable[str]) -> dict[str, Any]:
        """The named job fields that are stored (one round trip); missing ones are left out."""

    def get_field(self, job_id: str, name: str) -> Any:
        """One job field; None when it is not stored."""
        return self.get_fields(job_id, [name]).get(name)

    @abstractmethod
    def expire_job(self, job_id: str, ttl_s: int) -> None:
        """Forget a finished job after ``ttl_s`` seconds."""

    @abstractmethod
    def ttl(self, job_id: str) -> float | None:
        """Seconds until the job is forgotten; None when it is kept until deleted."""


class ItemLedger(ABC):
    """Items and their rows: the manifest the producer adds, the attempts and rows the worker writes, the streams
    that exports and retries read, and the containers (shards, row groups) whose items a worker discovers."""

    @abstractmethod
    def add_items(self, job_id: str, items: Iterable[tuple[str, str]]) -> int:
        """Add (item id, reference) pairs to the manifest; returns how many were new to the job."""

    @abstractmethod
    def statuses(self, job_id: str, ids: list[str]) -> dict[str, ItemStatus | None]:
        """Each id's status: pending, a row's status, or None when the job holds no such item."""

    @abstractmethod
    def begin_attempt(self, job_id: str, ids: list[str]) -> dict[str, Attempt]:
        """Count one more attempt for each item (before work starts, so a crash counts too)."""

    @abstractmethod
    def end_attempts(self, job_id: str, ids: list[str]) -> None:
        """Attempts that ended without a row (a transient failure sent again): not a crash."""

    @abstractmethod
    def begin_alone(self, job_id: str, item: str) -> None:
        """Count an attempt that runs by itself (see ``Attempt.suspect``)."""

    @abstractmethod
    def attempts_open(self, job_id: str) -> int:
        """Items with an attempt begun and not ended (held by a worker now, or by one that died)."""

    @abstractmethod
    def record(self, job_id: str, rows: list[ItemResult]) -> Recorded:
        """Durably write result rows in one atomic step: counters move only when an item's status changes, a
        caption once written is never replaced, and rows for items the job does not hold are refused."""

    @abstractmethod
    def requeue(self, job_id: str, ids: list[str], *, flagged: bool = False, captioned: bool = False) -> int:
        """Make items pending again before they are re-sent: their failed or cancelled rows go (with ``flagged``,
        captions with quality flags; with ``captioned``, every caption: a reviewer's "caption again"), and so do
        their attempt counts. Reviews stay."""

    @abstractmethod
    def iter_results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every written row once, with its review fields, streamed."""

    @abstractmethod
    def iter_pending(self, job_id: str) -> Iterator[tuple[str, str]]:
        """(item id, reference) of every item without a row."""

    @abstractmethod
    def iter_status(self, job_id: str, status: ItemStatus) -> Iterator[dict[str, Any]]:
        """The rows with this status (pending items as id, ref and status), with their review fields."""

    @abstractmethod
    def iter_flagged(self, job_id: str, flags: frozenset[str] | None = None) -> Iterator[tuple[str, str]]:
        """(item id, reference) of captions carrying any quality flag (or any of ``flags``)."""

    @abstractmethod
    def item(self, job_id: str, item_id: str) -> dict[str, Any] | None:
        """One item's row with its review fields (pending: id, ref and status only); None when not in the job."""

    # --- containers: shards and row groups whose items a worker discovers ---------------------------
    @abstractmethod
    def add_containers(self, job_id: str, items: Iterable[tuple[str, str]]) -> int:
        """Add (container id, spec JSON) pairs; the job cannot finish while any is open. Returns how many were new."""

    @abstractmethod
    def close_container(self, job_id: str, container_id: str) -> bool:
        """Every item of the container is in the manifest now; True when this settled the job."""

    @abstractmethod
    def iter_containers(self, job_id: str) -> Iterator[tuple[str, str]]:
        """(container id, spec JSON) of the containers not closed yet."""

    @abstractmethod
    def container(self, job_id: str, container_id: str) -> str | None:
        """The spec JSON of an open container; None when it is closed or the job never had it."""


class ReviewLedger(ABC):
    """A reviewer's corrections and marks, stored beside the model's caption (never over it), and the pages the
    review page walks."""

    @abstractmethod
    def page(self, job_id: str, *, cursor: str | None = None, limit: int = 50, filt: ItemFilter | None = None) -> Page:
        """One page of a job's items matching ``filt``; pass ``Page.cursor`` back for the next one."""

    @abstractmethod
    def review_rows(self, job_id: str, item_ids: list[str]) -> list[dict[str, Any] | None]:
        """Each item's row with its review fields, in order (one round trip); None where the job holds no such item.
        ``UnknownJob`` when there is no such job."""

    @abstractmethod
    def reviewed(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Rows that carry a correction or a mark."""

    @abstractmethod
    def _log_review(self, job_id: str, item_id: str, version: int, entry: dict[str, Any]) -> bool:
        """Add ``entry`` as version ``version`` of the item's review history; False when that version exists."""

    @abstractmethod
    def _put_review(self, job_id: str, item_id: str, packed: bytes) -> None:
        """Store an item's current review (``codec.encode_review``)."""

    @abstractmethod
    def review_history(self, job_id: str, item_id: str) -> list[dict[str, Any]]:
        """The item's review changes, oldest first: version, at, reviewer, corrected, mark, reason."""

    def items(self, job_id: str, item_ids: list[str]) -> list[dict[str, Any] | None]:
        """Rows (with their review fields) of several items at once, in order; None where the job has no such id."""
        return self.review_rows(job_id, item_ids)

    def set_correction(
        self, job_id: str, item_id: str, text: str, reviewer: str, *, base_version: int | None = None
    ) -> dict[str, Any]:
        """Store a reviewer's caption beside the model's (never over it); returns the updated row. A text equal to
        the model's caption is no correction (any earlier one is cleared); one equal to the stored correction
        changes nothing. With ``base_version`` (the ``review_version`` the reviewer saw), a newer review refuses
        the write with ``ReviewConflict`` carrying the newer row."""
        text = check_correction(text)
        row = self._captioned(job_id, item_id)
        new = None if text == (row.get("caption") or "").strip() else text
        if new == row.get("corrected"):
            check_version(row, item_id, base_version)
            return row
        return self._review(job_id, item_id, row, new, row.get("mark"), row.get("reason"), reviewer, base_version)

    def clear_correction(
        self, job_id: str, item_id: str, reviewer: str, *, base_version: int | None = None
    ) -> dict[str, Any]:
        """Remove the correction (the model's caption is what remains); returns the updated row."""
        row = self._captioned(job_id, item_id)
        if "corrected" not in row:
            return row
        return self._review(job_id, item_id, row, None, row.get("mark"), row.get("reason"), reviewer, base_version)

    def set_mark(
        self, job_id: str, item_ids: list[str], mark: str | None, reviewer: str, *, reason: str | None = None
    ) -> int:
        """Mark captions accepted or rejected (None clears); returns how many changed. An id the job does not hold
        refuses the whole call (nothing changes); items without a caption are skipped. ``reason`` (a rejection's
        why, at most ``MAX_REASON_CHARS``) is kept with a rejection only."""
        check_marks(item_ids, mark)
        reason = check_reason(reason) if mark == "rejected" else None
        rows = self.review_rows(job_id, item_ids)
        unknown = [i for i, row in zip(item_ids, rows, strict=True) if row is None]
        if unknown:
            from common.errors import UnknownItem

            raise UnknownItem(f"job {job_id} has no item {unknown[0]!r}")
        changed = 0
        for item_id, row in zip(item_ids, rows, strict=True):
            if row is None or row["status"] != ItemStatus.OK.value:
                continue
            if row.get("mark") != mark or row.get("reason") != reason:
                self._review(job_id, item_id, row, row.get("corrected"), mark, reason, reviewer, None, reread=False)
                changed += 1
        return changed

    def undo_review(
        self, job_id: str, item_id: str, reviewer: str, *, base_version: int | None = None
    ) -> dict[str, Any]:
        """Put the item's review back as it was before its last change (itself a change in the history, so undo
        twice is redo); refused when there is nothing to undo."""
        from common.errors import InvalidReview

        row = self._captioned(job_id, item_id)
        version = int(row.get("review_version") or 0)
        history = {e["version"]: e for e in self.review_history(job_id, item_id)}
        if version == 0 or (version > 1 and version - 1 not in history):
            raise InvalidReview(f"item {item_id} has no earlier review to go back to")
        before = history.get(version - 1) or {}
        return self._review(
            job_id,
            item_id,
            row,
            before.get("corrected"),
            before.get("mark"),
            before.get("reason"),
            reviewer,
            base_version,
        )

    def _review(
        self,
        job_id: str,
        item_id: str,
        row: dict[str, Any],
        text: str | None,
        mark: str | None,
        reason: str | None,
        reviewer: str,
        base_version: int | None,
        *,
        reread: bool = True,
    ) -> dict[str, Any]:
        """Write one review as the item's next version: its history entry first (the entry's version is unique,
        so of two writers on the same version one wins and the other gets ``ReviewConflict``), then the review."""
        import time

        from common.errors import ReviewConflict
        from ledger import codec

        for _ in range(3):
            check_version(row, item_id, base_version)
            version = int(row.get("review_version") or 0) + 1
            at = time.time()
            entry = {
                "version": version,
                "at": round(at, 1),
                "reviewer": reviewer,
                "corrected": text,
                "mark": mark,
                "reason": reason,
            }
            if self._log_review(job_id, item_id, version, entry):
                self._put_review(job_id, item_id, codec.encode_review(text, mark, reviewer, at, reason, version))
                return self._captioned(job_id, item_id) if reread else row
            row = self._captioned(job_id, item_id)
            if base_version is None:
                continue  # nobody named a version: write on top of the newer one
            break
        raise ReviewConflict(f"item {item_id} was changed by {row.get('reviewer') or 'someone'} meanwhile", row)

    def review_progress(self, job_id: str) -> dict[str, Any]:
        """Reviewed items (a correction or a mark) of a job, in all and per reviewer (the last one to touch each)."""
        per: dict[str, int] = {}
        for row in self.reviewed(job_id):
            who = str(row.get("reviewer") or "")
            per[who] = per.get(who, 0) + 1
        return {"reviewed": sum(per.values()), "by_reviewer": dict(sorted(per.items()))}

    def _captioned(self, job_id: str, item_id: str) -> dict[str, Any]:
        row = self.review_rows(job_id, [item_id])[0]
        if row is None:
            from common.errors import UnknownItem

            raise UnknownItem(f"job {job_id} has no item {item_id!r}")
        if row["status"] != ItemStatus.OK.value:
            raise not_captioned(job_id, item_id)
        return row


class ReuseCache(ABC):
    """Captions by image digest: the same bytes are captioned once per model version and parameters."""

    @abstractmethod
    def reuse_get(self, key: str, digests: list[bytes]) -> dict[bytes, tuple[str, list[str]]]:
        """Captions made before for these image digests under ``key`` (model version + parameters)."""

    @abstractmethod
    def reuse_put(self, key: str, entries: dict[bytes, tuple[str, list[str]]], ttl_s: int) -> None:
        """Remember captions by image digest under ``key`` for ``ttl_s`` seconds after the last write."""


class TrainingRuns(ABC):
    """A training job's runner lock and its typed record (``TrainingRun``), kept in the job's fields."""

    @abstractmethod
    def try_lock(self, job_id: str, owner: str, ttl_s: int) -> bool:
        """Take or refresh a job's lock for one runner (one atomic step); it lapses ttl_s after the last call."""

    @abstractmethod
    def unlock(self, job_id: str, owner: str) -> None:
        """Release the lock only if ``owner`` still holds it."""

    @abstractmethod
    def locked(self, job_id: str) -> bool: ...

    @abstractmethod
    def set_fields(self, job_id: str, **fields: Any) -> None: ...

    @abstractmethod
    def get_fields(self, job_id: str, names: Iterable[str]) -> dict[str, Any]: ...

    def update_training_run(self, job_id: str, run: TrainingRun) -> None:
        """Write the fields set in ``run`` (others stay as stored)."""
        stored = run.stored()
        if stored:
            self.set_fields(job_id, **stored)

    def training_run(self, job_id: str) -> TrainingRun:
        """The job's training record (every field None for a job that has none)."""
        return TrainingRun.model_validate(self.get_fields(job_id, TRAINING_FIELDS))


class Ledger(LedgerConnection, JobLedger, ItemLedger, ReviewLedger, ReuseCache, TrainingRuns):
    """Job and item state: the durable record of every job, every contract in one object. Every write is
    idempotent by item id. Two backends: Redis (the default, ``ledger.redis``) and PostgreSQL
    (``CAPTIONER_LEDGER_URL``, ``ledger.postgres``) for jobs larger than Redis memory."""
