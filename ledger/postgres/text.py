"""Text PostgreSQL cannot hold, stored losslessly: NUL (in ``text`` and ``jsonb``) and lone surrogates.

Redis keeps any string; PostgreSQL refuses NUL in text ("PostgreSQL text fields cannot contain NUL") and the
``\\u0000`` escape in jsonb ("\\u0000 cannot be converted to text"). A reference read from a list, a Parquet text
column or a shard's ``.txt`` member can hold either, so each value that needs it is stored escaped, with a mark
beside it that rows written before never carry (no migration, and what was stored before reads as it was):

  text   escaped with ``escape``: DLE (U+0010) starts an escape: DLE DLE is DLE, DLE ``0`` is NUL, DLE ``u`` and
         four hex digits a lone surrogate. The mark: bit ``ESCAPED_BIT`` of an item's ``flagbits``, the key
         ``NAME_MARK`` in a job's fields, ``ESCAPED_FLAG`` among a reused caption's flags.
  jsonb  a value whose JSON text holds such an escape is stored as that JSON text: a jsonb string where an object
         (an item's or a job's ``extra``, a job's ``params``) always was, or ``{"\\u0010": text}`` for a job field.
"""

from __future__ import annotations

import json
import re
from typing import Any, overload

ESC = "\x10"
#: An item's ``flagbits`` bit: its reference, caption and error are stored escaped.
ESCAPED_BIT = 1 << 7
#: A job field present when the job's name is stored escaped.
NAME_MARK = ESC + "name"
#: Among a reused caption's flags: the caption is stored escaped.
ESCAPED_FLAG = ESC
#: The key of a job field's wrapper (a JSON text that PostgreSQL's jsonb could not hold as it is).
FIELD_WRAPPER = ESC

_NEEDS = re.compile("[\x00\x10\ud800-\udfff]")
_UNSAFE = re.compile("[\x00\ud800-\udfff]")
_ESCAPED = re.compile("\x10(\x10|0|u[0-9a-f]{4})")
#: In JSON text from json.dumps (ASCII): NUL and surrogate escapes, which jsonb refuses alone.
_JSON_UNSAFE = re.compile(r"\\u(0000|d[89a-f])")


def unsafe(text: str) -> bool:
    """Whether PostgreSQL text cannot hold ``text`` as it is (a NUL, a lone surrogate)."""
    return _UNSAFE.search(text) is not None


def escape(text: str) -> str:
    """``text`` with every DLE, NUL and surrogate escaped (see the module docstring); reversed by ``unescape``."""
    if _NEEDS.search(text) is None:
        return text
    return _NEEDS.sub(_escape_char, text)


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char == ESC:
        return ESC + ESC
    if char == "\x00":
        return ESC + "0"
    return f"{ESC}u{ord(char):04x}"


def unescape(text: str) -> str:
    if ESC not in text:
        return text
    return _ESCAPED.sub(_unescape_match, text)


def _unescape_match(match: re.Match[str]) -> str:
    code = match.group(1)
    if code == ESC:
        return ESC
    if code == "0":
        return "\x00"
    return chr(int(code[1:], 16))


@overload
def text_in(value: str, escaped: bool) -> str: ...
@overload
def text_in(value: None, escaped: bool) -> None: ...
def text_in(value: str | None, escaped: bool) -> str | None:
    """A text column's value as stored in a row marked ``escaped`` or not."""
    return value if value is None or not escaped else escape(value)


@overload
def text_out(value: str, escaped: bool) -> str: ...
@overload
def text_out(value: None, escaped: bool) -> None: ...
def text_out(value: str | None, escaped: bool) -> str | None:
    return value if value is None or not escaped else unescape(value)


def json_text(value: Any) -> tuple[str, bool]:
    """``value`` as JSON text, and whether jsonb could not hold it as it is (then store it wrapped)."""
    text = json.dumps(value, default=str)
    return text, _JSON_UNSAFE.search(text) is not None


def object_in(value: dict[str, Any] | None) -> str | None:
    """A JSON object (``extra``, ``params``) as jsonb input: itself, or a jsonb string of its JSON text."""
    if value is None:
        return None
    text, wrap = json_text(value)
    return json.dumps(text) if wrap else text


def object_out(value: Any) -> Any:
    """The inverse of ``object_in``: a stored string is the JSON text of the object (objects were never strings)."""
    return json.loads(value) if isinstance(value, str) else value


def fields_in(fields: dict[str, Any]) -> str:
    """Job fields as one jsonb object to merge: each value itself, or wrapped as ``{DLE: its JSON text}``."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        text, wrap = json_text(value)
        out[name] = {FIELD_WRAPPER: text} if wrap else json.loads(text)
    return json.dumps(out)


def field_out(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1 and FIELD_WRAPPER in value:
        return json.loads(value[FIELD_WRAPPER])
    return value
