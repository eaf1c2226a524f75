"""The compact form of result rows in the Redis ledger: what is per job is stored once per job, what is per item in
as few bytes as the caption allows (the 60-character caption of a typical row fits a 96-byte allocation).

A stored row is a header byte, four varints, the reference, and the text (the caption, or the error message),
which runs to the end of the value::

    header | provenance | attempts | finished | ref length | ref | [error class] | [extra] | text

The header holds the status (2 bits), the quality flags (3 bits) and the transient, reused and has-extra marks,
so the ledger's Lua scripts read an item's status and flags from one byte. ``provenance`` indexes the job's
table of (model version, parameters, profile) triples. ``finished`` is tenths of a second after the job's
creation, plus one (0: not recorded). ``ref`` is stored relative to the job's base when it lies under it (else
NUL and the full reference). ``error class`` indexes ``ITEM_ERROR_CODES``. ``extra`` (columns a source row
carries to the export) is a length and a msgpack map. Timings are not stored: the worker's logs and metrics have
them.
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
#: The Redis row's header byte: status in bits 0-1, quality flags in bits 2-4, then these marks.
_STATUS_CODE = {ItemStatus.OK: 1, ItemStatus.ERROR: 2, ItemStatus.CANCELLED: 3}
_CODE_STATUS = {v: k for k, v in _STATUS_CODE.items()}
_H_TRANSIENT, _H_REUSED, _H_EXTRA = 1 << 5, 1 << 6, 1 << 7
#: What an absolute reference starts with when the job has a base and the reference is not under it.
_ABSOLUTE = "\x00"
_ERROR_INDEX = {code: i for i, code in enumerate(ITEM_ERROR_CODES)}


@dataclass(frozen=True)
class Provenance:
    """What made a caption, shared by many rows of a job: model version, generation parameters, speed profile."""

    model_version: str | None
    params: GenParams | None
    profile: str | None = None

    def key(self) -> str:
        """The triple as one stable string: the key of the job's provenance table."""
        params = self.params.model_dump(exclude_none=True) if self.params else None
        return json.dumps([self.model_version, params, self.profile], separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_key(cls, key: str | bytes) -> Provenance:
        version, params, profile = json.loads(key)
        return cls(version, GenParams.model_validate(params) if params else None, profile)


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
    """A reference as stored: relative to the job's base when it lies under it, else NUL + the reference."""
    if base and ref.startswith(base):
        return ref[len(base) :]
    return _ABSOLUTE + ref if base else ref


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


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode(row: ItemResult, *, base: str, created: float, provenance: int) -> bytes:
    """A row as stored in Redis (see the module docstring)."""
    header = _STATUS_CODE[row.status] | quality_bits(row.flags if row.status is ItemStatus.OK else None) << 2
    extra = stored_extra(row)
    header |= (_H_TRANSIENT if row.transient else 0) | (_H_REUSED if row.reused else 0) | (_H_EXTRA if extra else 0)
    # Tenths of a second after the job's creation, plus one: 0 stands for "not recorded".
    finished = max(1, round((row.finished_at - created) * 10) + 1) if row.finished_at else 0
    ref = pack_ref(row.ref, base).encode("utf-8", "surrogateescape")
    out = [bytes([header]), _varint(provenance), _varint(row.attempts), _varint(finished), _varint(len(ref)), ref]
    if row.status is not ItemStatus.OK:
        out.append(_varint(error_index(row.error_class) + 1))
    if extra:
        packed = msgpack.packb(extra, use_bin_type=True)
        out += [_varint(len(packed)), packed]
    text = row.caption if row.status is ItemStatus.OK else row.error
    out.append((text or "").encode())
    return b"".join(out)


#: Row fields of curation (scores, best of N, near-duplicates), stored in the extra map under a key no source
#: column has, so both backends keep them without a new column or header bit and old rows read as before.
CURATION_FIELDS = ("clip_score", "candidates", "sample_seed", "duplicate_of", "duplicate_job")
_CURATION_KEY = "\x1fcuration"  # not NUL: PostgreSQL's jsonb refuses \u0000


def stored_extra(row: ItemResult) -> dict[str, Any] | None:
    """The extra map as stored: the source row's columns, plus the row's curation fields when it has any."""
    curation = {k: getattr(row, k) for k in CURATION_FIELDS if getattr(row, k, None) is not None}
    if not curation:
        return row.extra
    return {**(row.extra or {}), _CURATION_KEY: curation}


def split_extra(row: dict[str, Any], extra: dict[str, Any] | None) -> None:
    """Set a decoded row's ``extra`` and curation fields from the stored extra map (the inverse of stored_extra)."""
    if not extra:
        return
    extra = dict(extra)
    row.update(extra.pop(_CURATION_KEY, None) or {})
    if extra:
        row["extra"] = extra


def status_of(stored: bytes) -> ItemStatus:
    return _CODE_STATUS[stored[0] & 3]


def decode(item_id: str, stored: bytes, *, base: str, created: float, provenance: list[Provenance]) -> dict[str, Any]:
    """A stored row as the row dict exports and services see (None fields left out)."""
    header = stored[0]
    status = _CODE_STATUS[header & 3]
    pv, pos = _read_varint(stored, 1)
    attempts, pos = _read_varint(stored, pos)
    finished, pos = _read_varint(stored, pos)
    length, pos = _read_varint(stored, pos)
    ref, pos = stored[pos : pos + length].decode("utf-8", "surrogateescape"), pos + length
    row: dict[str, Any] = {"id": item_id, "ref": unpack_ref(ref, base), "status": status.value}
    error_class = None
    if status is not ItemStatus.OK:
        code, pos = _read_varint(stored, pos)
        error_class = error_code(code - 1)
    extra = None
    if header & _H_EXTRA:
        length, pos = _read_varint(stored, pos)
        extra, pos = msgpack.unpackb(stored[pos : pos + length], raw=False), pos + length
    text = stored[pos:].decode()
    if status is ItemStatus.OK:
        row["caption"] = text
        flags = [name for name, bit in FLAG_BITS.items() if (header >> 2) & bit]
        if flags:
            row["flags"] = flags
    else:
        row["error_class"] = error_class
        row["error"] = text
    add_provenance(row, provenance, pv)
    row["attempts"] = attempts
    add_marks(row, transient=bool(header & _H_TRANSIENT), reused=bool(header & _H_REUSED))
    if finished:
        row["finished_at"] = round(created + (finished - 1) / 10, 1)
    split_extra(row, extra)
    return row


def add_provenance(row: dict[str, Any], table: list[Provenance], index: int | None) -> None:
    """A row's model version, parameters and profile, from its job's provenance table."""
    prov = table[index] if index is not None and 0 <= index < len(table) else Provenance(None, None)
    if prov.model_version is not None:
        row["model_version"] = prov.model_version
    if prov.params is not None:
        row["params"] = prov.params.model_dump(exclude_none=True)
    if prov.profile:
        row["profile"] = prov.profile


def add_marks(row: dict[str, Any], *, transient: bool, reused: bool) -> None:
    if transient:
        row["transient"] = True
    if reused:
        row["reused"] = True


# --- review marks and corrections ----------------------------------------------------------------


def encode_review(text: str | None, mark: str | None, reviewer: str, at: float) -> bytes:
    packed: bytes = msgpack.packb([text, mark, reviewer, round(at, 1)], use_bin_type=True)
    return packed


def decode_review(stored: bytes) -> dict[str, Any]:
    """The review fields a row gains: ``corrected``, ``mark``, ``reviewer``, ``reviewed_at`` (None left out)."""
    text, mark, reviewer, at = msgpack.unpackb(stored, raw=False)
    fields = {"corrected": text, "mark": mark, "reviewer": reviewer, "reviewed_at": at}
    return {k: v for k, v in fields.items() if v is not None}
