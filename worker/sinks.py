"""Streamed, atomic exports of result rows: JSON Lines, CSV, Parquet, and caption sidecar files next to images."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import secrets
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from worker.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "parquet", "sidecar")
#: Formats a reader exists for (sidecars are plain caption text, nothing to read back as rows).
READABLE_FORMATS = ("jsonl", "csv", "parquet")

#: Columns of the flat formats (CSV, Parquet): the row with ``params`` spread out and ``timings`` dropped.
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
)
_PARAM_COLUMNS = ("max_length", "num_beams", "prompt")
_INT_COLUMNS = frozenset({"max_length", "num_beams", "attempts"})
_FLOAT_COLUMNS = frozenset({"finished_at"})

# References that are not local files: URLs and the ``b64:<sha1>`` stand-in for inline bytes.
_NON_LOCAL_PREFIXES = ("http://", "https://", "b64:")


@dataclass
class ExportSummary:
    """What an export did. ``path`` is the file written, or None for stdout and sidecars."""

    rows_written: int = 0
    files_written: int = 0
    skipped: int = 0
    path: Path | None = None
    #: Why rows were skipped (sidecars only): not_ok, not_local, missing_image, exists, name_clash.
    skipped_by_reason: dict[str, int] = field(default_factory=dict)


# --- public API -------------------------------------------------------------------------------


def export_rows(
    rows: Iterable[Mapping[str, Any]],
    fmt: str,
    out: Path | str | None,
    *,
    sidecar_ext: str = ".txt",
    overwrite: bool = False,
    batch_rows: int = 10_000,
) -> ExportSummary:
    """Write ``rows`` (ItemResult dicts) as ``fmt``, one row at a time.

    ``out`` of None or "-" means stdout (jsonl and csv only). A file is written to a temporary name in
    its directory and renamed into place when complete, so readers never see a partial export; an
    existing ``out`` is refused unless ``overwrite``. For ``sidecar``, ``out`` is ignored and each ok row
    with a local image gets ``<image stem><sidecar_ext>`` beside it (existing ones kept unless ``overwrite``).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be at least 1, got {batch_rows}")
    if fmt == "sidecar":
        summary = _export_sidecars(rows, sidecar_ext=sidecar_ext, overwrite=overwrite)
    elif out is None or str(out) == "-":
        if fmt == "parquet":
            raise ConfigError("parquet cannot be written to stdout; give an output file path")
        # sys.stdout looked up now, not at import, so redirections (and pytest's capture) are honoured.
        summary = ExportSummary(rows_written=_WRITERS[fmt](rows, sys.stdout, batch_rows))
    else:
        summary = _export_file(rows, fmt, Path(out), overwrite=overwrite, batch_rows=batch_rows)
    log.info(
        "export %s: %d rows, %d files, %d skipped%s",
        fmt,
        summary.rows_written,
        summary.files_written,
        summary.skipped,
        f" -> {summary.path}" if summary.path else "",
    )
    return summary


def read_rows(path: Path | str, fmt: str) -> Iterator[dict[str, Any]]:
    """Stream rows back from an export: full rows for jsonl, ``FLAT_COLUMNS`` dicts for csv and parquet.

    Flat rows come back with the types ``flatten_row`` gives (int, float, str or None), so they compare
    equal to ``flatten_row(original)``. CSV cannot tell an empty string from None: both read as None.
    """
    if fmt not in READABLE_FORMATS:
        raise ConfigError(f"cannot read rows from format {fmt!r}; readable: {', '.join(READABLE_FORMATS)}")
    path = Path(path)
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "csv":
        return _read_csv(path)
    return _read_parquet(path)


def flatten_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One ItemResult dict as the flat CSV/Parquet record: params spread out, timings dropped."""
    row = _as_mapping(row)
    params = row.get("params") or {}
    if hasattr(params, "model_dump"):
        params = params.model_dump()
    flat: dict[str, Any] = {}
    for name in FLAT_COLUMNS:
        value = params.get(name) if name in _PARAM_COLUMNS else row.get(name)
        flat[name] = _coerce(name, value)
    return flat


# --- atomic files -----------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_target(final: Path, *, overwrite: bool, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success fsync it and move it into place, else remove it.

    The temporary file lives in the same directory so the final rename never crosses filesystems.
    Without ``overwrite`` the move is a hard link, which fails rather than replacing a file that
    appeared while we were writing.
    """
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
    try:
        # os.open with 0o666 (not mkstemp's 0o600) so the export gets the usual umask-based permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileNotFoundError:
        raise ConfigError(f"output directory {final.parent} does not exist") from None
    os.close(fd)
    try:
        yield tmp
        _fsync_path(tmp)
        _move_into_place(tmp, final, overwrite=overwrite)
        if sync_dir:
            # Makes the rename itself survive a power cut, not only the file's bytes.
            _fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, final: Path, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # atomic create-if-absent; raises FileExistsError instead of clobbering
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links (some network and FUSE mounts): check, then rename.
        if final.exists():
            raise FileExistsError(final) from None
        os.replace(tmp, final)


# --- single-file formats ----------------------------------------------------------------------


def _export_file(
    rows: Iterable[Mapping[str, Any]], fmt: str, out: Path, *, overwrite: bool, batch_rows: int
) -> ExportSummary:
    # Checked before the first row is pulled: a long export should not fail at its very end.
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; give a file path")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite (--overwrite) to replace it")
    try:
        with _atomic_target(out, overwrite=overwrite) as tmp:
            if fmt == "parquet":
                count = _write_parquet(rows, tmp, batch_rows)
            else:
                # newline="" lets the csv module write its own line endings and quote embedded newlines.
                with open(tmp, "w", encoding="utf-8", newline="") as fh:
                    count = _WRITERS[fmt](rows, fh, batch_rows)
    except FileExistsError:
        raise ConfigError(f"{out} appeared while exporting; pass overwrite (--overwrite) to replace it") from None
    return ExportSummary(rows_written=count, files_written=1, path=out)


def _write_jsonl(rows: Iterable[Mapping[str, Any]], fh: IO[str], _batch_rows: int) -> int:
    count = 0
    for row in rows:
        fh.write(json.dumps(_as_mapping(row), ensure_ascii=False, separators=(",", ":"), default=str))
        fh.write("\n")
        count += 1
    fh.flush()
    return count


def _write_csv(rows: Iterable[Mapping[str, Any]], fh: IO[str], _batch_rows: int) -> int:
    writer = csv.writer(fh, quoting=csv.QUOTE_MINIMAL)
    writer.writerow(FLAT_COLUMNS)
    count = 0
    for row in rows:
        flat = flatten_row(row)
        writer.writerow(["" if flat[name] is None else flat[name] for name in FLAT_COLUMNS])
        count += 1
    fh.flush()
    return count


def _parquet_schema() -> Any:
    import pyarrow as pa  # imported here: only Parquet needs it, and it is a heavy import for the CLI

    types = {name: pa.string() for name in FLAT_COLUMNS}
    types.update({name: pa.int32() for name in _INT_COLUMNS})
    types["finished_at"] = pa.float64()  # Unix seconds, as ItemResult records them
    return pa.schema([pa.field(name, types[name], nullable=True) for name in FLAT_COLUMNS])


def _write_parquet(rows: Iterable[Mapping[str, Any]], path: Path, batch_rows: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema()
    count = 0
    with pq.ParquetWriter(str(path), schema, compression="zstd") as writer:
        columns: dict[str, list[Any]] = {name: [] for name in FLAT_COLUMNS}
        for row in rows:
            flat = flatten_row(row)
            for name in FLAT_COLUMNS:
                columns[name].append(flat[name])
            count += 1
            if len(columns["id"]) >= batch_rows:
                writer.write_batch(pa.record_batch(list(columns.values()), schema=schema))
                columns = {name: [] for name in FLAT_COLUMNS}
        if columns["id"] or count == 0:
            # An empty export still gets one (empty) batch so the file carries its schema.
            writer.write_batch(pa.record_batch(list(columns.values()), schema=schema))
    return count


_WRITERS = {"jsonl": _write_jsonl, "csv": _write_csv}


# --- sidecars ---------------------------------------------------------------------------------


def _export_sidecars(rows: Iterable[Mapping[str, Any]], *, sidecar_ext: str, overwrite: bool) -> ExportSummary:
    if not sidecar_ext.startswith(".") or len(sidecar_ext) < 2 or "/" in sidecar_ext or os.sep in sidecar_ext:
        raise ConfigError(f"sidecar extension must look like '.txt', got {sidecar_ext!r}")
    summary = ExportSummary()
    skipped: Counter[str] = Counter()
    for row in rows:
        reason = _write_sidecar(_as_mapping(row), sidecar_ext, overwrite)
        if reason is None:
            summary.rows_written += 1
            summary.files_written += 1
        else:
            skipped[reason] += 1
    summary.skipped = sum(skipped.values())
    summary.skipped_by_reason = dict(skipped)
    return summary


def _write_sidecar(row: Mapping[str, Any], ext: str, overwrite: bool) -> str | None:
    """Write one sidecar; return None when written, else the reason it was skipped."""
    if str(row.get("status")) != "ok" or row.get("caption") is None:
        return "not_ok"
    ref = str(row.get("ref") or "")
    if not ref or ref.lower().startswith(_NON_LOCAL_PREFIXES):
        return "not_local"
    image = Path(ref)
    # Refs are paths as the worker saw them; in another container or host they may not exist.
    if not image.is_file():
        return "missing_image"
    target = image.with_suffix(ext)
    if target == image:
        return "name_clash"  # e.g. captioning notes.txt with ext .txt would replace the input itself
    if target.exists() and not overwrite:
        return "exists"
    try:
        # No directory fsync per sidecar: a rename lost to a power cut only means a re-export, never a
        # partial file, and one fsync per directory entry would make million-image exports crawl.
        with _atomic_target(target, overwrite=overwrite, sync_dir=False) as tmp:
            tmp.write_text(str(row["caption"]) + "\n", encoding="utf-8")
    except FileExistsError:
        return "exists"
    return None


# --- readers ----------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _read_csv(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as fh:
        for record in csv.DictReader(fh):
            yield {name: _coerce(name, record.get(name) or None) for name in FLAT_COLUMNS}


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    try:
        for batch in parquet.iter_batches(batch_size=10_000, columns=list(FLAT_COLUMNS)):
            yield from batch.to_pylist()
    finally:
        parquet.close()


# --- helpers ----------------------------------------------------------------------------------


def _as_mapping(row: Any) -> Mapping[str, Any]:
    # ItemResult models are accepted too, dumped the way they travel as JSON (enums as strings).
    if hasattr(row, "model_dump"):
        return row.model_dump(mode="json")
    return row


def _coerce(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _INT_COLUMNS:
        return int(value)
    if name in _FLOAT_COLUMNS:
        return float(value)
    return str(value)
