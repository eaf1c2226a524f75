"""The small records the ledger hands out and takes, and the limits every backend applies. No Redis, no SQL here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from common import messages
from common.errors import InvalidMessage
from common.messages import GenParams, ItemStatus, JobKind, JobState, TrainOutcome, TrainRequest


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


#: Job fields shown with the job (``JobInfo.extra``): a training run's progress and result, a webhook's error.
SHOWN_FIELDS = ("progress", "result", "webhook_error")
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


def check_version(row: dict[str, Any], item_id: str, base_version: int | None) -> None:
    """``ReviewConflict`` (carrying the newer row) when the item's review is newer than the one the reviewer saw."""
    from common.errors import ReviewConflict

    if base_version is not None and base_version != int(row.get("review_version") or 0):
        raise ReviewConflict(
            f"item {item_id} was changed by {row.get('reviewer') or 'someone'} since you opened it", row
        )


def bad_cursor(cursor: str) -> Exception:
    from common.errors import InvalidReview

    return InvalidReview(f"bad page cursor {cursor[:40]!r}; start from the first page")


def not_captioned(job_id: str, item_id: str) -> Exception:
    from common.errors import NotCaptioned

    return NotCaptioned(f"item {item_id} of job {job_id} has no caption yet (pending, failed or cancelled)")


class TrainResult(BaseModel):
    """How a training run ended, as its job shows it (``result``): the outcome and what goes with it."""

    # What a summary adds beside these (a future field, one written by an older version) is kept as it is.
    model_config = ConfigDict(extra="allow")

    job_id: str
    status: TrainOutcome
    steps: int | None = None
    version: str | None = None
    promoted: bool | None = None
    #: "not promoted: why", when the promotion gate said no.
    promotion: str | None = None
    metrics: dict[str, Any] | None = None
    #: One line: why a failed run failed.
    error: str | None = None
    #: Why a run was skipped.
    reason: str | None = None


class TrainingRun(BaseModel):
    """A training job's record beside its counters: what was asked, when it was sent and started, how far it got,
    the version it stored and how it ended. Each field is stored as one JSON value in the job's fields (the same
    names and shapes as before the record had a type), so the job views show ``progress`` and ``result`` as they
    are. Writing a record writes only the fields set in it: ``TrainingRun(started=now)`` leaves the rest alone."""

    model_config = ConfigDict(extra="ignore")

    request: TrainRequest | None = None
    #: When the request was last sent to the training queue (first submission, or a resume of an orphan).
    sent: float | None = None
    #: When a runner last took the job's lock and began.
    started: float | None = None
    #: The trainer's last progress report (step, total_steps, loss, eta_s, ...), a view for people.
    progress: dict[str, Any] | None = None
    #: The model version this run stored (a crash after storing it never stores it twice).
    version: str | None = None
    result: TrainResult | None = None
    #: When the run ended (cancelled or failed; a finished job's own time is its ``finished``).
    finished: float | None = None

    def stored(self) -> dict[str, Any]:
        """The fields set in this record, as the JSON values the ledger stores."""
        out: dict[str, Any] = {}
        for name in self.model_fields_set:
            value = getattr(self, name)
            if isinstance(value, TrainRequest):
                value = value.model_dump(mode="json")  # whole, defaults included, as it is sent
            elif isinstance(value, TrainResult):
                value = value.model_dump(mode="json", exclude_unset=True)  # the keys the run gave, no more
            out[name] = value
        return out


#: The job fields a training run is stored in.
TRAINING_FIELDS = tuple(TrainingRun.model_fields)
