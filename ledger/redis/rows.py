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

from typing import Any

import msgpack

from common.messages import ItemResult, ItemStatus
from ledger import codec
from ledger.codec import (
    FLAG_BITS,
    Provenance,
    add_marks,
    add_provenance,
    error_code,
    error_index,
    pack_ref,
    quality_bits,
    unpack_ref,
)

#: The header byte: status in bits 0-1, quality flags in bits 2-4, then these marks.
_STATUS_CODE = {ItemStatus.OK: 1, ItemStatus.ERROR: 2, ItemStatus.CANCELLED: 3}
_CODE_STATUS = {v: k for k, v in _STATUS_CODE.items()}
_H_TRANSIENT, _H_REUSED, _H_EXTRA = 1 << 5, 1 << 6, 1 << 7


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
    row = row.model_copy(update={"extra": codec.extra_with_confidence(row), "confidence": None})
    header = _STATUS_CODE[row.status] | quality_bits(row.flags if row.status is ItemStatus.OK else None) << 2
    header |= (_H_TRANSIENT if row.transient else 0) | (_H_REUSED if row.reused else 0) | (_H_EXTRA if row.extra else 0)
    # Tenths of a second after the job's creation, plus one: 0 stands for "not recorded".
    finished = max(1, round((row.finished_at - created) * 10) + 1) if row.finished_at else 0
    ref = pack_ref(row.ref, base).encode("utf-8", "surrogateescape")
    out = [bytes([header]), _varint(provenance), _varint(row.attempts), _varint(finished), _varint(len(ref)), ref]
    if row.status is not ItemStatus.OK:
        out.append(_varint(error_index(row.error_class) + 1))
    if row.extra:
        packed = msgpack.packb(row.extra, use_bin_type=True)
        out += [_varint(len(packed)), packed]
    text = row.caption if row.status is ItemStatus.OK else row.error
    out.append((text or "").encode("utf-8", "surrogateescape"))  # an error naming a file that is not UTF-8
    return b"".join(out)


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
    text = stored[pos:].decode("utf-8", "surrogateescape")
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
    codec.put_extra(row, extra)
    return row
