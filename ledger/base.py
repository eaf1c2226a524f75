"""What every ledger backend offers, and the small records it hands out. No Redis, no SQL here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from common import messages
from common.errors import InvalidMessage, InvalidReview
from common.messages import GenParams, ItemResult, ItemStatus, JobKind, JobState


def check_job_id(job_id: str) -> str:
    """``job_id`` if it is a valid job id (``common.messages.check_job_id``), else InvalidMessage: ids name ledger
    keys and tables, so no id may reach another job's."""
    try:
        return messages.check_job_id(job_id)
    except (ValueError, TypeError) as exc:
        raise InvalidMessage(str(exc)) from None


class Attempt(NamedTuple):
    """One item's attempt counts, as ``begin_attempt`` leaves them."""

    started: int  # attempts begun, this one included
    finished: int  # attempts that ended (a row, or a transient failure sent again)
    alone: int  # attempts run by themselves

    @property
    def suspect(self) -> bool:
        """An earlier attempt never ended: its worker died while holding the item. It may be what killed it."""
        return self.started - 1 > self.finished


class Recorded(NamedTuple):
    changed: int  # rows whose status changed (new rows, or a failure replaced by a caption)
    finished: bool  # this write settled the job's last item: completion callbacks fire once, here
    refused: int = 0  # rows for items the job does not hold (not in its manifest): dropped, never added


@dataclass
class JobInfo:
    """A job's counters and metadata as stored in the ledger."""

    id: str
    name: str
    state: JobState
    #: Generation parameters of a caption job; None for a training job.
    params: GenParams | None
    created: float
    finished: float | None
    total: int
    ok: int
    error: int
    cancelled: int
    kind: JobKind = JobKind.CAPTION
    #: Captions per quality flag (empty, truncated, repetition).
    flags: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Containers (shards, row groups) whose items are not all known yet.
    containers: int = 0

    @property
    def pending(self) -> int:
        return max(0, self.total - self.ok - self.error - self.cancelled)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind.value,
            "state": self.state.value,
            "params": self.params.model_dump() if self.params else None,
            "created": self.created,
            "finished": self.finished,
            "total": self.total,
            "ok": self.ok,
            "error": self.error,
            "cancelled": self.cancelled,
            "pending": self.pending,
            "containers": self.containers,
            "flags": self.flags,
            **self.extra,
        }


@dataclass(frozen=True)
class ItemFilter:
    """Which items a review page shows; every field left None matches everything."""

    status: ItemStatus | None = None
    error_class: str | None = None
    #: A quality flag, or "any" for captions with any flag.
    flag: str | None = None
    model_version: str | None = None
    #: Case-insensitive substring of the caption or its correction.
    text: str | None = None
    #: True: corrected items only; False: uncorrected only.
    corrected: bool | None = None

    @property
    def empty(self) -> bool:
        """No field set: every item matches."""
        return self == ItemFilter()

    def matches(self, row: dict[str, Any]) -> bool:
        if self.status is not None and row["status"] != self.status.value:
            return False
        if self.error_class is not None and row.get("error_class") != self.error_class:
            return False
        flags = row.get("flags") or ()
        if self.flag is not None and (not flags if self.flag == "any" else self.flag not in flags):
            return False
        if self.model_version is not None and row.get("model_version") != self.model_version:
            return False
        if self.corrected is not None and ("corrected" in row) != self.corrected:
            return False
        if self.text:
            needle = self.text.lower()
            hay = f"{row.get('caption') or ''}\n{row.get('corrected') or ''}".lower()
            if needle not in hay:
                return False
        return True


@dataclass
class Page:
    """One page of a job's items for review."""

    rows: list[dict[str, Any]]
    #: Opaque; pass it back for the next page. None: the end.
    cursor: str | None
    #: Items examined to fill this page (bounded: never the whole job per page).
    scanned: int


#: Longest correction a reviewer may store (characters; a caption is a sentence or two).
MAX_CORRECTION_CHARS = 2000
#: Most items a filtered page examines in one call; past it the page ends early with a cursor to continue.
PAGE_SCAN_BUDGET = 10_000
#: Most items one page holds, and one bulk review call may name.
MAX_REVIEW_IDS = 1000
#: Review marks: a human's verdict on the model's caption.
REVIEW_MARKS = ("accepted", "rejected")


def check_page_limit(limit: int) -> None:
    from common.errors import InvalidReview

    if not 1 <= limit <= MAX_REVIEW_IDS:
        raise InvalidReview(f"a page holds 1 to {MAX_REVIEW_IDS} items, not {limit}")


def check_correction(text: str) -> str:
    """A correction as stored: stripped, not empty, within MAX_CORRECTION_CHARS."""
    from common.errors import InvalidReview

    text = (text or "").strip()
    if not text:
        raise InvalidReview("a correction cannot be empty (clear it instead)")
    if len(text) > MAX_CORRECTION_CHARS:
        raise InvalidReview(f"a correction holds at most {MAX_CORRECTION_CHARS} characters, not {len(text)}")
    return text


def check_marks(item_ids: list[str], mark: str | None) -> None:
    from common.errors import InvalidReview

    if mark is not None and mark not in REVIEW_MARKS:
        raise InvalidReview(f"a mark is one of {', '.join(REVIEW_MARKS)} (or none), not {mark!r}")
    if len(item_ids) > MAX_REVIEW_IDS:
        raise InvalidReview(f"at most {MAX_REVIEW_IDS} items per call, not {len(item_ids)}")


#: Longest reason a rejection may carry.
MAX_REASON_CHARS = 500


def check_reason(reason: str | None) -> str | None:
    from common.errors import InvalidReview

    reason = (reason or "").strip() or None
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise InvalidReview(f"a reason holds at most {MAX_REASON_CHARS} characters, not {len(reason)}")
    return reason


def _check_version(row: dict[str, Any], item_id: str, base_version: int | None) -> None:
    from common.errors import ReviewConflict

    if base_version is not None and base_version != int(row.get("review_version") or 0):
        raise ReviewConflict(f"item {item_id} was changed by {row.get('reviewer') or 'someone'} since you opened it",
                             row)  # fmt: skip


def bad_cursor(cursor: str) -> Exception:
    from common.errors import InvalidReview

    return InvalidReview(f"bad page cursor {cursor[:40]!r}; start from the first page")


def not_captioned(job_id: str, item_id: str) -> Exception:
    from common.errors import NotCaptioned

    return NotCaptioned(f"item {item_id} of job {job_id} has no caption yet (pending, failed or cancelled)")


class Ledger(ABC):
    """Job and item state: the durable record of every job. Every write is idempotent by item id.

    Two backends: Redis (the default, ``ledger.redis_ledger``) and PostgreSQL (``CAPTIONER_LEDGER_URL``,
    ``ledger.pg_ledger``) for jobs larger than Redis memory. The same behaviour holds for both; the tests
    run one suite against each.
    """

    # --- connection -----------------------------------------------------------------------------
    @abstractmethod
    def ping(self) -> None:
        """Raise ``BrokerUnavailable`` with the reason when the ledger cannot be reached."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def bytes_used(self) -> int:
        """Memory (Redis) or disk (PostgreSQL) the ledger's server reports as used, for sizing figures."""

    # --- jobs -----------------------------------------------------------------------------------
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
        """Free-form job fields (a training job's request and progress), stored as JSON."""

    @abstractmethod
    def get_field(self, job_id: str, name: str) -> Any: ...

    @abstractmethod
    def expire_job(self, job_id: str, ttl_s: int) -> None:
        """Forget a finished job after ``ttl_s`` seconds."""

    @abstractmethod
    def ttl(self, job_id: str) -> float | None:
        """Seconds until the job is forgotten; None when it is kept until deleted."""

    # --- locks (training runners) ------------------------------------------------------------------
    @abstractmethod
    def try_lock(self, job_id: str, owner: str, ttl_s: int) -> bool:
        """Take or refresh a job's lock for one runner (one atomic step); it lapses ttl_s after the last call."""

    @abstractmethod
    def unlock(self, job_id: str, owner: str) -> None:
        """Release the lock only if ``owner`` still holds it."""

    @abstractmethod
    def locked(self, job_id: str) -> bool: ...

    # --- items ----------------------------------------------------------------------------------
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

    # --- captions reused by content ------------------------------------------------------------------
    @abstractmethod
    def reuse_get(self, key: str, digests: list[bytes]) -> dict[bytes, tuple[str, list[str]]]:
        """Captions made before for these image digests under ``key`` (model version + parameters)."""

    @abstractmethod
    def reuse_put(self, key: str, entries: dict[bytes, tuple[str, list[str]]], ttl_s: int) -> None:
        """Remember captions by image digest under ``key`` for ``ttl_s`` seconds after the last write."""

    # --- review -------------------------------------------------------------------------------------
    @abstractmethod
    def page(self, job_id: str, *, cursor: str | None = None, limit: int = 50, filt: ItemFilter | None = None) -> Page:
        """One page of a job's items matching ``filt``; pass ``Page.cursor`` back for the next one."""

    @abstractmethod
    def item(self, job_id: str, item_id: str) -> dict[str, Any] | None:
        """One item's row with its review fields (pending: id, ref and status only); None when not in the job."""

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
            _check_version(row, item_id, base_version)
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
        self.job(job_id)
        rows = self._items(job_id, item_ids)
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
        row = self._captioned(job_id, item_id)
        version = int(row.get("review_version") or 0)
        history = {e["version"]: e for e in self.review_history(job_id, item_id)}
        if version == 0 or (version > 1 and version - 1 not in history):
            raise InvalidReview(f"item {item_id} has no earlier review to go back to")
        before = history.get(version - 1) or {}
        return self._review(job_id, item_id, row, before.get("corrected"), before.get("mark"), before.get("reason"),
                            reviewer, base_version)  # fmt: skip

    def _review(
        self, job_id: str, item_id: str, row: dict[str, Any], text: str | None, mark: str | None,
        reason: str | None, reviewer: str, base_version: int | None, *, reread: bool = True,
    ) -> dict[str, Any]:  # fmt: skip
        """Write one review as the item's next version: its history entry first (the entry's version is unique,
        so of two writers on the same version one wins and the other gets ``ReviewConflict``), then the review."""
        import time

        from ledger import codec

        for _ in range(3):
            _check_version(row, item_id, base_version)
            version = int(row.get("review_version") or 0) + 1
            at = time.time()
            entry = {"version": version, "at": round(at, 1), "reviewer": reviewer, "corrected": text, "mark": mark,
                     "reason": reason}  # fmt: skip
            if self._log_review(job_id, item_id, version, entry):
                self._put_review(job_id, item_id, codec.encode_review(text, mark, reviewer, at, reason, version))
                return self._captioned(job_id, item_id) if reread else row
            row = self._captioned(job_id, item_id)
            if base_version is None:
                continue  # nobody named a version: write on top of the newer one
            break
        from common.errors import ReviewConflict

        raise ReviewConflict(f"item {item_id} was changed by {row.get('reviewer') or 'someone'} meanwhile", row)

    @abstractmethod
    def _log_review(self, job_id: str, item_id: str, version: int, entry: dict[str, Any]) -> bool:
        """Add ``entry`` as version ``version`` of the item's review history; False when that version exists."""

    @abstractmethod
    def _put_review(self, job_id: str, item_id: str, packed: bytes) -> None:
        """Store an item's current review (``codec.encode_review``)."""

    @abstractmethod
    def review_history(self, job_id: str, item_id: str) -> list[dict[str, Any]]:
        """The item's review changes, oldest first: version, at, reviewer, corrected, mark, reason."""

    def review_progress(self, job_id: str) -> dict[str, Any]:
        """Reviewed items (a correction or a mark) of a job, in all and per reviewer (the last one to touch each)."""
        per: dict[str, int] = {}
        for row in self.reviewed(job_id):
            who = str(row.get("reviewer") or "")
            per[who] = per.get(who, 0) + 1
        return {"reviewed": sum(per.values()), "by_reviewer": dict(sorted(per.items()))}

    def _captioned(self, job_id: str, item_id: str) -> dict[str, Any]:
        row = self.item(job_id, item_id)
        if row is None:
            from common.errors import UnknownItem

            raise UnknownItem(f"job {job_id} has no item {item_id!r}")
        if row["status"] != ItemStatus.OK.value:
            raise not_captioned(job_id, item_id)
        return row

    def items(self, job_id: str, item_ids: list[str]) -> list[dict[str, Any] | None]:
        """Rows (with their review fields) of several items at once, in order; None where the job has no such id."""
        self.job(job_id)
        return self._items(job_id, item_ids)

    def _items(self, job_id: str, item_ids: list[str]) -> list[dict[str, Any] | None]:
        """``item`` for several ids at once (backends read them in one round trip)."""
        return [self.item(job_id, i) for i in item_ids]

    @abstractmethod
    def _store_review(self, job_id: str, item_id: str, text: str | None, mark: str | None, reviewer: str) -> None:
        """Write (or with neither text nor mark, remove) one item's review."""

    @abstractmethod
    def reviewed(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Rows that carry a correction or a mark."""
