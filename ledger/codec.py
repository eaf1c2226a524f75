"""Stored forms both ledger backends share: item ids as bytes, references relative to a job's base, error classes
as indexes, quality flags as bits, provenance (model version, parameters, profile) as a per-job table, reviews as
msgpack. The Redis ledger's compact row is ``ledger.redis.rows``; PostgreSQL keeps the same parts in columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgpack

from common.errors import ITEM_ERROR_CODES
from common.messages import QUALITY_FLAGS, GenParams, ItemResult, ItemStatus

#: Bits of a quality-flag set, in QUALITY_FLAGS order; with the transient and reused marks, the PostgreSQL
#: ledger's ``flagbits``.
FLAG_BITS = {name: 1 << i for i, name in enumerate(QUALITY_FLAGS)}
TRANSIENT_BIT = 1 << 5
REUSED_BIT = 1 << 6
QUALITY_MASK = sum(FLAG_BITS.values())
#: What an absolute reference starts with when the job has a base and the reference is not under it.
_ABSOLUTE = "\x00"
_ERROR_INDEX = {code: i for i, code in enumerate(ITEM_ERROR_CODES)}


@dataclass(frozen=True)
class Provenance:
    """What made a caption, shared by many rows of a job: model version, generation parameters, speed profile, and
    the model family when it is not GIT."""

    model_version: str | None
    params: GenParams | None
    profile: str | None = None
    family: str | None = None

    def key(self) -> str:
        """The triple (with the family, when one is set) as one stable string: the key of the job's provenance
        table. GIT rows keep the three-part key written before families existed."""
        params = self.params.model_dump(exclude_none=True) if self.params else None
        parts = [self.model_version, params, self.profile] + ([self.family] if self.family else [])
        return json.dumps(parts, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_key(cls, key: str | bytes) -> Provenance:
        version, params, profile, *family = json.loads(key)
        return cls(version, GenParams.model_validate(params) if params else None, profile, *family[:1])


def id_bytes(item_id: str) -> bytes:
    """An item id as the ledger keys it: the 8 bytes of a canonical id (16 hex digits, what ``item_id`` makes),
    else 0xFE + its UTF-8 text (a byte UTF-8 never holds), padded so that it is never 8 bytes long."""
    if len(item_id) == 16:
        try:
            raw = bytes.fromhex(item_id)
        except ValueError:
            raw = b""
        if raw.hex() == item_id:
            return raw
    text = item_id.encode()
    return b"\xfe" + text + (b"\xfe" if len(text) == 7 else b"")


def id_text(raw: bytes) -> str:
    """The inverse of ``id_bytes``."""
    return raw.hex() if len(raw) == 8 else raw.replace(b"\xfe", b"").decode()


def pack_ref(ref: str, base: str) -> str:
    """A reference as stored: relative to the job's base when it lies under it, else NUL + the reference. A
    reference whose stored form would itself start with NUL is marked too, so that it reads back whole."""
    if base and ref.startswith(base) and not ref.startswith(_ABSOLUTE, len(base)):
        return ref[len(base) :]
    return _ABSOLUTE + ref if base or ref.startswith(_ABSOLUTE) else ref


def unpack_ref(stored: str, base: str) -> str:
    return stored[1:] if stored.startswith(_ABSOLUTE) else base + stored


def error_index(code: str | None) -> int:
    """An error class as its index in ITEM_ERROR_CODES (-1 when unknown)."""
    return _ERROR_INDEX.get(code or "", -1)


def error_code(index: int | None) -> str:
    return ITEM_ERROR_CODES[index] if index is not None and 0 <= index < len(ITEM_ERROR_CODES) else "unknown"


def quality_bits(flags: list[str] | None) -> int:
    return sum(FLAG_BITS[f] for f in flags or () if f in FLAG_BITS)


def flag_byte(row: ItemResult) -> int:
    """Quality flags and the transient and reused marks in one byte (the PostgreSQL ledger's ``flagbits``)."""
    return quality_bits(row.flags) | (TRANSIENT_BIT if row.transient else 0) | (REUSED_BIT if row.reused else 0)


#: The key a row's confidence travels under inside its stored extra (both ledgers), taken out again on reading.
CONFIDENCE_KEY = "_confidence"


#: Row fields of curation (scores, best of N, near-duplicates), stored in the extra map under a key no source
#: column has, as the confidence is, so both backends keep them and old rows read as before.
CURATION_FIELDS = ("clip_score", "candidates", "sample_seed", "duplicate_of", "duplicate_job")
CURATION_KEY = "_curation"


def extra_with_confidence(row: ItemResult) -> dict[str, Any] | None:
    """The extra a row is stored with: its source columns, plus its confidence and curation fields when it has any."""
    extra = row.extra
    if row.confidence is not None and row.status is ItemStatus.OK:
        extra = {**(extra or {}), CONFIDENCE_KEY: round(float(row.confidence), 4)}
    curation = {k: getattr(row, k) for k in CURATION_FIELDS if getattr(row, k, None) is not None}
    if curation:
        extra = {**(extra or {}), CURATION_KEY: curation}
    return extra


def put_extra(row: dict[str, Any], extra: dict[str, Any] | None) -> None:
    """Set a decoded row's ``extra`` and ``confidence`` from what was stored."""
    if not extra:
        return
    if CONFIDENCE_KEY in extra or CURATION_KEY in extra:
        extra = dict(extra)
        if CONFIDENCE_KEY in extra:
            row["confidence"] = extra.pop(CONFIDENCE_KEY)
        row.update(extra.pop(CURATION_KEY, None) or {})
    if extra:
        row["extra"] = extra


# --- several captions per item (jobs with tasks) --------------------------------------------------
# The tasks' names are in the job's provenance table (the params), so a row stores only the texts of the tasks after
# the first, in order (the first is the caption); rows of one-task and task-less jobs store nothing more.


def task_names(table: list[Provenance], index: int | None) -> list[str]:
    """The task names of a row's provenance, in order ([] when its job asked one caption without tasks)."""
    prov = table[index] if index is not None and 0 <= index < len(table) else None
    tasks = prov.params.tasks if prov is not None and prov.params is not None else None
    return [t.name for t in tasks or ()]


def other_captions(row: ItemResult) -> list[str] | None:
    """The captions a row stores besides its caption: those of its second and later tasks (None when it has none)."""
    tasks = row.params.tasks if row.params is not None else None
    if row.status is not ItemStatus.OK or not tasks or len(tasks) < 2:
        return None
    captions = row.captions or {}
    return [captions.get(t.name, "") for t in tasks[1:]]


def add_provenance(row: dict[str, Any], table: list[Provenance], index: int | None) -> None:
    """A row's model version, parameters and profile, from its job's provenance table."""
    prov = table[index] if index is not None and 0 <= index < len(table) else Provenance(None, None)
    if prov.model_version is not None:
        row["model_version"] = prov.model_version
    if prov.params is not None:
        row["params"] = prov.params.model_dump(exclude_none=True)
    if prov.profile:
        row["profile"] = prov.profile
    if prov.family:
        row["family"] = prov.family


def add_marks(row: dict[str, Any], *, transient: bool, reused: bool) -> None:
    if transient:
        row["transient"] = True
    if reused:
        row["reused"] = True


# --- review marks and corrections ----------------------------------------------------------------


def encode_review(
    text: str | None, mark: str | None, reviewer: str, at: float, reason: str | None = None, version: int = 0
) -> bytes:
    """A review as stored; ``reason`` (why a caption was rejected) and ``version`` (how many review writes the item
    has had) are appended only when set, so older four-field reviews still read."""
    fields: list[Any] = [text, mark, reviewer, round(at, 1)]
    if reason is not None or version:
        fields += [reason, version]
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def decode_review(stored: bytes) -> dict[str, Any]:
    """The review fields a row gains: ``corrected``, ``mark``, ``reviewer``, ``reviewed_at``, ``reason`` and
    ``review_version`` (None left out)."""
    text, mark, reviewer, at, *more = msgpack.unpackb(stored, raw=False)
    reason, version = [*more, None, None][:2]
    fields = {
        "corrected": text,
        "mark": mark,
        "reviewer": reviewer,
        "reviewed_at": at,
        "reason": reason,
        "review_version": version or None,
    }
    return {k: v for k, v in fields.items() if v is not None}
