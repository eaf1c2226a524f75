"""What a result row becomes in an export: the flat record, the caption a dataset gets, and why a row is left out."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from common.errors import FetchError, Forbidden, ItemError, TooLarge
from common.messages import caption_of, is_url
from common.uris import is_object_uri
from media.paths import LocalFiles

#: Columns of the flat formats (CSV, Parquet): the row with ``params`` spread out, ``timings`` dropped and
#: ``flags`` (quality flags, see model.flags) joined by commas; null when a row has none. The review columns
#: (``corrected``, ``mark``, ``reason``, ``reviewer``, ``reviewed_at``) sit beside the model's ``caption``.
FLAT_COLUMNS = (
    "id",
    "ref",
    "status",
    "caption",
    "error_class",
    "error",
    "model_version",
    "max_length",
    "num_beams",
    "prompt",
    "attempts",
    "finished_at",
    "flags",
    "corrected",
    "mark",
    "reason",
    "reviewer",
    "reviewed_at",
    "extra",
    "clip_score",
    "duplicate_of",
)
PARAM_COLUMNS = ("max_length", "num_beams", "prompt")
INT_COLUMNS = frozenset({"max_length", "num_beams", "attempts"})
FLOAT_COLUMNS = frozenset({"finished_at", "reviewed_at", "clip_score"})

#: ``<container>#<member key>``: the reference of a member of a shard, a Parquet or Arrow file, or a 🤗 dataset.
_MEMBER_REF = re.compile(r"(?is)(hf:[^#]+|.+?(?:\.tar|\.tgz|\.tar\.gz|\.parquet|\.arrow))#(.+)")

T = TypeVar("T")


@dataclass
class ExportSummary:
    """What an export did. ``path`` is the file written (the shard folder for webdataset), or None for stdout
    and sidecars. ``rows_written`` counts rows, caption entries or samples; ``files_written`` files or shards."""

    rows_written: int = 0
    files_written: int = 0
    skipped: int = 0
    path: Path | None = None
    #: Why rows were skipped (caption formats only; docs/exports.md lists the reasons).
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    #: Where an export to an object store went (``s3://...``): the object, or the shard folder.
    location: str | None = None


#: What reads a container for a webdataset export (``media.containers.container_images`` bound to the settings):
#: (member key, image extension, bytes or the error) per member, in order.
ContainerReader = Callable[[str], Iterator[tuple[str, str, "bytes | ItemError"]]]


@dataclass
class Options:
    """What the per-format writers need besides the rows; ``skipped`` collects their reasons."""

    batch_rows: int = 10_000
    #: Folder that metadata.jsonl file names are made relative to (None: absolute names).
    base: str | None = None
    exclude_flags: frozenset[str] = frozenset()
    #: The files sidecar and webdataset exports may touch (None: those formats refuse to run).
    local: LocalFiles | None = None
    #: Reads a URL or an object for webdataset exports, by the workers' image policy (None: skipped as not_local).
    remote: Callable[[str], bytes] | None = None
    #: Reads a container for webdataset exports (None: its members are skipped as container_member).
    containers: ContainerReader | None = None
    #: Leave out ok rows whose CLIPScore is below this, or that have none (``--min-clip-score``).
    min_clip_score: float | None = None
    skipped: Counter[str] = field(default_factory=Counter)
    #: The job's task names: the flat formats' ``caption_<name>`` columns (exports/captions.py).
    tasks: tuple[str, ...] = ()
    #: The task whose caption the caption formats write (None: the row's caption, or its correction).
    task: str | None = None


def kept(rows: Iterable[Any], skipped: Counter[str], take: Callable[[Mapping[str, Any]], T | str]) -> Iterator[T]:
    """What ``take`` makes of each row, in order; a row it answers with a reason (a str) is counted in ``skipped``
    under that reason instead. The one loop by which every caption format skips and counts."""
    for row in rows:
        got = take(as_mapping(row))
        if isinstance(got, str):
            skipped[got] += 1
        else:
            yield got


def above_min_score(rows: Iterable[Any], opts: Options) -> Iterator[Any]:
    """The rows, less ok rows scored below ``opts.min_clip_score`` or not scored (skipped as low_clip_score);
    error rows pass on to the formats, which keep or skip them as they always do."""
    if opts.min_clip_score is None:
        yield from rows
        return
    floor = opts.min_clip_score

    def take(row: Mapping[str, Any]) -> Mapping[str, Any] | str:
        if str(row.get("status")) != "ok":
            return row
        score = row.get("clip_score")
        return row if score is not None and float(score) >= floor else "low_clip_score"

    yield from kept(rows, opts.skipped, take)


def resolve_duplicates(
    rows: Iterable[Any], lookup: Callable[[str, str], Mapping[str, Any] | None], job_id: str
) -> Iterator[Mapping[str, Any]]:
    """Rows of near-duplicates written before their representative's caption was known get it now (and its
    score), from ``lookup(job, item)``; one whose representative has no caption stays empty."""
    for row in rows:
        row = as_mapping(row)
        if row.get("duplicate_of") and not row.get("caption") and str(row.get("status")) == "ok":
            try:
                rep = lookup(str(row.get("duplicate_job") or job_id), str(row["duplicate_of"]))
            except Exception:  # the other job expired or was deleted
                rep = None
            if rep and str(rep.get("status")) == "ok" and rep.get("caption"):
                row = {**row, "caption": rep.get("corrected") or rep["caption"], "clip_score": rep.get("clip_score")}
        yield row


def as_mapping(row: Any) -> Mapping[str, Any]:
    """A row as a dict: ItemResult models are dumped the way they travel as JSON (enums as strings)."""
    if hasattr(row, "model_dump"):
        dumped: Mapping[str, Any] = row.model_dump(mode="json")
        return dumped
    return cast("Mapping[str, Any]", row)


def flatten_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One ItemResult dict as the flat CSV/Parquet record: params spread out, timings dropped, flags joined.

    ``flags`` becomes "truncated,repetition", or None for no flags (absent or empty: CSV could not keep the two
    apart); ``split_flags`` turns it back into a list.
    """
    row = as_mapping(row)
    params = row.get("params") or {}
    if hasattr(params, "model_dump"):
        params = params.model_dump()
    return {name: coerce(name, params.get(name) if name in PARAM_COLUMNS else row.get(name)) for name in FLAT_COLUMNS}


def split_flags(value: str | None) -> list[str]:
    """The ``flags`` column of a flat row back as a list (None and "" are no flags)."""
    return [flag for flag in (value or "").split(",") if flag]


def coerce(name: str, value: Any) -> Any:
    """A flat column's value as its type: int, float, str (``extra`` as one JSON text cell), or None."""
    if value is None:
        return None
    if name == "extra":  # the columns a source row carried (Parquet, datasets)
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    if name == "flags":
        # A list from a row, a string from a file (or a row flattened already).
        text = value if isinstance(value, str) else ",".join(str(flag) for flag in value)
        return text or None
    if name in INT_COLUMNS:
        return int(value)
    if name in FLOAT_COLUMNS:
        return float(value)
    return str(value)


def caption_text(row: Mapping[str, Any]) -> str:
    """The caption a dataset gets from a row: the reviewer's correction when there is one, else the model's."""
    return str(row.get("corrected") or row["caption"])


def caption_skip(
    row: Mapping[str, Any],
    exclude_flags: frozenset[str],
    *,
    remote: bool = False,
    members: bool = False,
    task: str | None = None,
) -> str | None:
    """Why a row gives no caption entry, or None when it does. ``remote``: URLs and objects are read again;
    ``members``: members of containers are repacked (else skipped: their names are not paths); ``task``: the row
    must have that task's caption (else ``no_task``)."""
    if str(row.get("status")) != "ok" or row.get("caption") is None:
        return "not_ok"
    if task is not None and caption_of(dict(row), task) is None:
        return "no_task"
    if row.get("mark") == "rejected":
        return "rejected"
    if exclude_flags:
        flags = row.get("flags") or ()
        if not exclude_flags.isdisjoint(split_flags(flags) if isinstance(flags, str) else flags):
            return "flagged"
    ref = str(row.get("ref") or "")
    # URLs, objects and the ``b64:<sha1>`` stand-in for inline bytes are not local files.
    if not ref or ref.startswith("b64:") or (not remote and (is_url(ref) or is_object_uri(ref))):
        return "not_local"
    # A member key is the container's own name for it (``a/../../b`` in a tar): never a path to write or name.
    if not members and container_member(ref) is not None:
        return "container_member"
    return None


def container_member(ref: str) -> tuple[str, str] | None:
    """(container, member key) when ``ref`` names a member of a container, else None."""
    match = _MEMBER_REF.fullmatch(ref)
    return (match.group(1), match.group(2)) if match else None


def file_skip(exc: ItemError) -> str:
    """The skip reason of a file the local rules refused."""
    if isinstance(exc, Forbidden):
        return "forbidden"
    if isinstance(exc, TooLarge):
        return "too_large"
    return "missing_image" if isinstance(exc, FetchError) else "unreadable"


def file_name(ref: str, base: str | None) -> str:
    """``ref`` relative to ``base`` when it lies inside it (POSIX separators), else absolute."""
    image = os.path.abspath(ref)
    if base is not None:
        relative = os.path.relpath(image, base)
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return Path(relative).as_posix()
    return Path(image).as_posix()
