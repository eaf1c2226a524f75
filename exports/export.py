"""Streamed, atomic exports of result rows: JSONL, CSV, Parquet, sidecar captions, and training-ready datasets.

The dataset formats feed captions onward: an imagefolder ``metadata.jsonl`` (🤗 datasets, ``training/``),
WebDataset tar shards, and a kohya-style metadata JSON.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import secrets
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common.errors import ConfigError, FetchError, Forbidden, ItemError, TooLarge
from common.messages import TAR_SUFFIXES, is_url
from exports.captions import peek_tasks, task_caption, task_cells, task_columns, task_members
from media.objects import ObjectStore, is_object_uri
from media.paths import LocalFiles, write_beside

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "parquet", "sidecar", "metadata", "webdataset", "kohya")
#: Formats a reader exists for (the others hold captions only, nothing to read back as rows; a
#: ``metadata.jsonl`` is plain JSON Lines and reads back as its {"file_name", "text"} dicts with "jsonl").
READABLE_FORMATS = ("jsonl", "csv", "parquet")

#: Columns of the flat formats (CSV, Parquet): the row with ``params`` spread out, ``timings`` dropped and
#: ``flags`` (quality flags, see model.flags) joined by commas; null when a row has none. The review columns
#: (``corrected``, ``mark``, ``reviewer``, ``reviewed_at``) sit beside the model's ``caption``.
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
    "reviewer",
    "reviewed_at",
    "extra",
)
_PARAM_COLUMNS = ("max_length", "num_beams", "prompt")
#: Columns of several captions per image (``caption_<task>``), after FLAT_COLUMNS (exports/captions.py).
_TASK_PREFIX = "caption_"
_INT_COLUMNS = frozenset({"max_length", "num_beams", "attempts"})
_FLOAT_COLUMNS = frozenset({"finished_at", "reviewed_at"})

# WebDataset splits a member name at its first dot into key and extension, so keys carry no dots or slashes.
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHARD_NAME = "shard-%06d.tar"


@dataclass
class ExportSummary:
    """What an export did. ``path`` is the file written (the shard folder for webdataset), or None for stdout
    and sidecars. ``rows_written`` counts rows, caption entries or samples; ``files_written`` files or shards."""

    rows_written: int = 0
    files_written: int = 0
    skipped: int = 0
    path: Path | None = None
    #: Why rows were skipped (caption formats only): not_ok, rejected, flagged, not_local, missing_image, unreadable,
    #: forbidden (outside the allowed roots, a link leading out, not a regular file), too_large, exists,
    #: name_clash, bad_key, container_member (a member of a 🤗 dataset).
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    #: Where an export to an object store went (``s3://...``): the object, or the shard folder.
    location: str | None = None


#: What reads a container for a webdataset export (``media.containers.container_images`` bound to the settings).
ContainerReader = Callable[[str], Iterator[tuple[str, str, "bytes | ItemError"]]]


@dataclass
class _Options:
    """What the per-format writers need besides the rows; ``skipped`` collects their reasons."""

    batch_rows: int = 10_000
    #: Folder that metadata.jsonl file names are made relative to (None: absolute names).
    base: str | None = None
    exclude_flags: frozenset[str] = frozenset()
    #: The files sidecar and webdataset exports may touch (None: those formats refuse to run).
    local: LocalFiles | None = None
    #: Reads the bytes of a URL or an object for webdataset exports, by the workers' image policy (None: such rows
    #: are skipped as not_local).
    remote: Callable[[str], bytes] | None = None
    #: Reads a tar shard, a Parquet or an Arrow file for webdataset exports: (key, image extension, bytes or the
    #: error) per member, in order (None: members of containers are skipped as container_member).
    containers: ContainerReader | None = None
    skipped: Counter[str] = field(default_factory=Counter)
    #: The job's task names: the flat formats' ``caption_<name>`` columns (exports/captions.py).
    tasks: tuple[str, ...] = ()
    #: The task whose caption the caption formats write (None: the row's caption, or its correction).
    task: str | None = None


# --- public API -------------------------------------------------------------------------------


def export_rows(
    rows: Iterable[Mapping[str, Any]],
    fmt: str,
    out: Path | str | None,
    *,
    sidecar_ext: str = ".txt",
    overwrite: bool = False,
    batch_rows: int = 10_000,
    shard_size: int = 10_000,
    exclude_flags: Iterable[str] = (),
    local: LocalFiles | None = None,
    remote: Callable[[str], bytes] | None = None,
    containers: ContainerReader | None = None,
    tasks: Iterable[str] | None = None,
    task: str | None = None,
) -> ExportSummary:
    """Write ``rows`` (ItemResult dicts) as ``fmt``, one row at a time.

    Rows of jobs with several captions per image (``captions``, by task) carry them: whole in JSONL, as the columns
    ``caption_<task>`` of CSV and Parquet (``tasks``: their names, in order; None: the first row's), as members
    ``<key>.<task>.txt`` of WebDataset samples; the caption formats write the caption of ``task`` (default: the
    row's caption) and skip rows without one as ``no_task``.

    ``out`` of None or "-" means stdout (jsonl, csv, metadata, kohya). A file is written to a temporary name
    in its directory and renamed into place when complete, so readers never see a partial export; an
    existing ``out`` is refused unless ``overwrite``. For ``sidecar``, ``out`` is ignored and each ok row
    with a local image gets ``<image stem><sidecar_ext>`` beside it (existing ones kept unless ``overwrite``).

    The caption formats (sidecar, metadata, webdataset, kohya) take ok rows with local image paths only,
    and skip rows carrying any of ``exclude_flags`` (quality flags) and rows a reviewer rejected; a reviewer's
    correction, when there is one, is the caption they write. ``metadata`` writes an imagefolder
    ``metadata.jsonl`` (``out`` may be its folder); ``webdataset`` writes tar shards of at most ``shard_size``
    samples into the folder ``out`` or after the pattern ``out`` (``shards/train-%05d.tar``), all renamed
    into place only once every shard is complete (with ``overwrite``, higher-numbered shards an older export
    left are removed); ``kohya`` writes one JSON object {absolute image path: {"caption": caption}}.

    ``sidecar`` and ``webdataset`` touch files beside the images, long after a worker checked their paths: each
    file is checked again as it is written or read, by the workers' rules (``local``: real path under an allowed
    root, a regular file, no link leading out), and skipped as ``forbidden`` when it fails them. They need
    ``local``; CSV cells that a spreadsheet would run as a formula are neutralised (see ``_cell``).

    ``webdataset`` fetches URLs and objects again with ``remote``, and repacks the members of tar shards, Parquet
    and Arrow files by reading each container once with ``containers``, after the other rows (the rows of a container
    are set aside on disk until then, so a job of any size needs the memory of one container's rows); members of
    🤗 datasets are skipped as ``container_member``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be at least 1, got {batch_rows}")
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    opts = _Options(batch_rows=batch_rows, exclude_flags=frozenset(exclude_flags), local=local, remote=remote,
                    containers=containers, task=task)  # fmt: skip
    if fmt in ("csv", "parquet"):
        if tasks is None:
            tasks, rows = peek_tasks(rows)
        opts.tasks = tuple(tasks)
    if (fmt == "sidecar" and (local is None or not local.roots)) or (
        fmt == "webdataset" and (local is None or not local.roots) and remote is None
    ):
        raise ConfigError(
            f"{fmt} exports read or write files beside the images, which must lie under CAPTIONER_ALLOWED_ROOTS "
            "(none set here): set it as on the workers"
        )
    if fmt == "sidecar":
        summary = _export_sidecars(rows, sidecar_ext=sidecar_ext, overwrite=overwrite, opts=opts)
    elif fmt == "webdataset":
        summary = _export_webdataset(rows, out, shard_size=shard_size, overwrite=overwrite, opts=opts)
    elif out is None or str(out) == "-":
        if fmt == "parquet":
            raise ConfigError("parquet cannot be written to stdout; give an output file path")
        # sys.stdout looked up now, not at import, so redirections (and pytest's capture) are honoured.
        summary = ExportSummary(rows_written=_WRITERS[fmt](rows, sys.stdout, opts))
    else:
        summary = _export_file(rows, fmt, Path(out), overwrite=overwrite, opts=opts)
    summary.skipped = sum(opts.skipped.values())
    summary.skipped_by_reason = dict(opts.skipped)
    log.info(
        "export %s: %d rows, %d files, %d skipped%s",
        fmt,
        summary.rows_written,
        summary.files_written,
        summary.skipped,
        f" -> {summary.path}" if summary.path else "",
    )
    return summary


def export_to_store(
    rows: Iterable[Mapping[str, Any]],
    fmt: str,
    uri: str,
    store: ObjectStore,
    *,
    overwrite: bool = False,
    **options: Any,
) -> ExportSummary:
    """``export_rows`` to an object store (``s3://bucket/out/job.jsonl``; a folder or shard pattern for webdataset;
    a folder ending in ``/`` takes the default file name). The export is written to a local temporary folder,
    complete, then uploaded: an object store shows each object whole or not at all, and shards uploaded before a
    failure are removed, so a failed export leaves nothing under the final names."""
    if fmt == "sidecar":
        raise ConfigError("sidecar exports write caption files beside local images; give no -o for them")
    with tempfile.TemporaryDirectory(prefix="captioner-export-") as tmp:
        if fmt == "webdataset":
            folder, name = (uri.rsplit("/", 1)[0] + "/", uri.rsplit("/", 1)[1]) if "%" in uri else (
                uri.rstrip("/") + "/", _SHARD_NAME)  # fmt: skip
            summary = export_rows(rows, fmt, Path(tmp) / "shards" / name, overwrite=True, **options)
            files = sorted((Path(tmp) / "shards").glob("*.tar")) if (Path(tmp) / "shards").is_dir() else []
            targets = [folder + f.name for f in files]
            _upload_all(store, list(zip(files, targets, strict=True)), overwrite)
            summary.location = folder
        else:
            target = uri + _store_file_name(fmt) if uri.endswith("/") else uri
            if not overwrite and store.exists(target, checked=False):  # before the first row, as for files
                raise ConfigError(f"{target} already exists; pass overwrite (--overwrite) to replace it")
            local = Path(tmp) / target.rsplit("/", 1)[-1]
            summary = export_rows(rows, fmt, local, overwrite=True, **options)
            _upload_all(store, [(local, target)], overwrite)
            summary.location = target
    summary.path = None
    return summary


def _store_file_name(fmt: str) -> str:
    return {"metadata": "metadata.jsonl", "kohya": "kohya.json"}.get(fmt, f"export.{fmt}")


def _upload_all(store: ObjectStore, pairs: list[tuple[Path, str]], overwrite: bool) -> None:
    """Upload every file or none: on a failure, the objects already uploaded are removed again."""
    if not overwrite and (clash := next((t for _, t in pairs if store.exists(t, checked=False)), None)):
        raise ConfigError(f"{clash} already exists; pass overwrite (--overwrite) to replace it")
    done: list[str] = []
    try:
        for local, target in pairs:
            store.upload(str(local), target, overwrite=True, checked=False)
            done.append(target)
    except BaseException:
        for target in done:
            with contextlib.suppress(Exception):
                store.remove(target, checked=False)
        raise


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
    """One ItemResult dict as the flat CSV/Parquet record: params spread out, timings dropped, flags joined.

    ``flags`` becomes "truncated,repetition", or None for no flags (absent or empty: CSV could not keep the two
    apart); ``split_flags`` turns it back into a list.
    """
    row = _as_mapping(row)
    params = row.get("params") or {}
    if hasattr(params, "model_dump"):
        params = params.model_dump()
    flat: dict[str, Any] = {}
    for name in FLAT_COLUMNS:
        value = params.get(name) if name in _PARAM_COLUMNS else row.get(name)
        flat[name] = _coerce(name, value)
    return flat


def split_flags(value: str | None) -> list[str]:
    """The ``flags`` column of a flat row back as a list (None and "" are no flags)."""
    return [flag for flag in (value or "").split(",") if flag]


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
    rows: Iterable[Mapping[str, Any]], fmt: str, out: Path, *, overwrite: bool, opts: _Options
) -> ExportSummary:
    if fmt == "metadata" and out.is_dir():
        out = out / "metadata.jsonl"  # the name datasets' imagefolder loader looks for
    # Checked before the first row is pulled: a long export should not fail at its very end.
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; give a file path")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite (--overwrite) to replace it")
    opts.base = os.path.abspath(out.parent)
    try:
        with _atomic_target(out, overwrite=overwrite) as tmp:
            if fmt == "parquet":
                count = _write_parquet(rows, tmp, opts)
            else:
                # newline="" lets the csv module write its own line endings and quote embedded newlines.
                with open(tmp, "w", encoding="utf-8", newline="") as fh:
                    count = _WRITERS[fmt](rows, fh, opts)
    except FileExistsError:
        raise ConfigError(f"{out} appeared while exporting; pass overwrite (--overwrite) to replace it") from None
    return ExportSummary(rows_written=count, files_written=1, path=out)


def _write_jsonl(rows: Iterable[Mapping[str, Any]], fh: IO[str], _opts: _Options) -> int:
    count = 0
    for row in rows:
        fh.write(json.dumps(_as_mapping(row), ensure_ascii=False, separators=(",", ":"), default=str))
        fh.write("\n")
        count += 1
    fh.flush()
    return count


def _write_csv(rows: Iterable[Mapping[str, Any]], fh: IO[str], _opts: _Options) -> int:
    writer = csv.writer(fh, quoting=csv.QUOTE_MINIMAL)
    writer.writerow(FLAT_COLUMNS + task_columns(_opts.tasks))
    count = 0
    for row in rows:
        flat = flatten_row(row)
        cells = [flat[name] for name in FLAT_COLUMNS] + task_cells(_as_mapping(row), _opts.tasks)
        writer.writerow(["" if value is None else _cell(value) for value in cells])
        count += 1
    fh.flush()
    return count


#: First characters that make a spreadsheet take a cell for a formula (=, +, -, @), and tab and carriage return,
#: which some strip before looking.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: a text cell starting like a formula gets a leading ``'`` (what
    OWASP advises for CSV injection). A cell of quotes before such a start gets one more, so that ``_uncell``
    gives back exactly the original."""
    if isinstance(value, str) and value.lstrip("'").startswith(_FORMULA_START):
        return "'" + value
    return value


def _uncell(value: str | None) -> str | None:
    """The text ``_cell`` was given."""
    if value and value.startswith("'") and value.lstrip("'").startswith(_FORMULA_START):
        return value[1:]
    return value


def _parquet_schema(tasks: tuple[str, ...] = ()) -> Any:
    import pyarrow as pa  # imported here: only Parquet needs it, and it is a heavy import for the CLI

    types = {name: pa.string() for name in FLAT_COLUMNS + task_columns(tasks)}
    types.update({name: pa.int32() for name in _INT_COLUMNS})
    types["finished_at"] = types["reviewed_at"] = pa.float64()  # Unix seconds, as ItemResult records them
    return pa.schema([pa.field(name, kind, nullable=True) for name, kind in types.items()])


def _write_parquet(rows: Iterable[Mapping[str, Any]], path: Path, opts: _Options) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    batch_rows = opts.batch_rows
    schema = _parquet_schema(opts.tasks)
    count = 0
    with pq.ParquetWriter(str(path), schema, compression="zstd") as writer:
        columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        for row in rows:
            flat = flatten_row(row)
            flat.update(zip(task_columns(opts.tasks), task_cells(_as_mapping(row), opts.tasks), strict=True))
            for name in schema.names:
                columns[name].append(flat[name])
            count += 1
            if len(columns["id"]) >= batch_rows:
                writer.write_batch(pa.record_batch(list(columns.values()), schema=schema))
                columns = {name: [] for name in schema.names}
        if columns["id"] or count == 0:
            # An empty export still gets one (empty) batch so the file carries its schema.
            writer.write_batch(pa.record_batch(list(columns.values()), schema=schema))
    return count


def _write_metadata(rows: Iterable[Mapping[str, Any]], fh: IO[str], opts: _Options) -> int:
    """Imagefolder ``metadata.jsonl``: {"file_name", "text"} per ok row with a local image."""
    count = 0
    for row in rows:
        row = _as_mapping(row)
        reason = _caption_skip(row, opts.exclude_flags, task=opts.task)
        if reason is not None:
            opts.skipped[reason] += 1
            continue
        record = {"file_name": _file_name(str(row["ref"]), opts.base), "text": task_caption(row, opts.task)}
        fh.write(json.dumps(record, ensure_ascii=False))
        fh.write("\n")
        count += 1
    fh.flush()
    return count


def _write_kohya(rows: Iterable[Mapping[str, Any]], fh: IO[str], opts: _Options) -> int:
    """One JSON object {absolute image path: {"caption": caption}}, written entry by entry.

    Keys are unique for the rows of one job (item ids derive from the reference); were a path to repeat,
    JSON readers keep its last entry.
    """
    count = 0
    fh.write("{")
    for row in rows:
        row = _as_mapping(row)
        reason = _caption_skip(row, opts.exclude_flags, task=opts.task)
        if reason is not None:
            opts.skipped[reason] += 1
            continue
        key = json.dumps(os.path.abspath(str(row["ref"])), ensure_ascii=False)
        value = json.dumps({"caption": task_caption(row, opts.task)}, ensure_ascii=False)
        fh.write(f"{',' if count else ''}\n  {key}: {value}")
        count += 1
    fh.write("\n}\n" if count else "}\n")
    fh.flush()
    return count


_WRITERS = {"jsonl": _write_jsonl, "csv": _write_csv, "metadata": _write_metadata, "kohya": _write_kohya}


# --- sidecars ---------------------------------------------------------------------------------


def _export_sidecars(
    rows: Iterable[Mapping[str, Any]], *, sidecar_ext: str, overwrite: bool, opts: _Options
) -> ExportSummary:
    if not sidecar_ext.startswith(".") or len(sidecar_ext) < 2 or "/" in sidecar_ext or os.sep in sidecar_ext:
        raise ConfigError(f"sidecar extension must look like '.txt', got {sidecar_ext!r}")
    summary = ExportSummary()
    for row in rows:
        reason = _write_sidecar(_as_mapping(row), sidecar_ext, overwrite, opts)
        if reason is None:
            summary.rows_written += 1
            summary.files_written += 1
        else:
            opts.skipped[reason] += 1
    return summary


def _write_sidecar(row: Mapping[str, Any], ext: str, overwrite: bool, opts: _Options) -> str | None:
    """Write one sidecar; return None when written, else the reason it was skipped."""
    reason = _caption_skip(row, opts.exclude_flags, task=opts.task)
    if reason is not None:
        return reason
    assert opts.local is not None
    image = str(row["ref"])
    name = Path(image).with_suffix(ext).name
    if name == Path(image).name:
        return "name_clash"  # e.g. captioning notes.txt with ext .txt would replace the input itself
    try:
        # Refs are paths as the worker saw them: checked again now, the image and the folder written into.
        opts.local.check(image)
        with opts.local.folder(os.path.dirname(image) or ".") as folder:
            # No directory fsync per sidecar: a rename lost to a power cut only means a re-export, never a
            # partial file, and one fsync per directory entry would make million-image exports crawl.
            text = task_caption(row, opts.task) or ""
            written = write_beside(folder, name, (text + "\n").encode(), overwrite=overwrite)
    except ItemError as exc:
        return _file_skip(exc)
    return None if written else "exists"


def _file_skip(exc: ItemError) -> str:
    """The skip reason of a file the local rules refused."""
    if isinstance(exc, Forbidden):
        return "forbidden"
    if isinstance(exc, TooLarge):
        return "too_large"
    return "missing_image" if isinstance(exc, FetchError) else "unreadable"


# --- webdataset ------------------------------------------------------------------------------


def _export_webdataset(
    rows: Iterable[Mapping[str, Any]], out: Path | str | None, *, shard_size: int, overwrite: bool, opts: _Options
) -> ExportSummary:
    folder, name = _shard_pattern(out)
    # Checked before the first row is pulled, as for single files; later shards are checked before renaming.
    if (folder / (name % 0)).exists() and not overwrite:
        raise ConfigError(f"{folder / (name % 0)} already exists; pass overwrite (--overwrite) to replace it")
    shards = _ShardSet(folder, name, shard_size)
    count = 0
    try:
        with tempfile.TemporaryDirectory(prefix="captioner-members-") as spill_dir:
            set_aside = _MemberRows(Path(spill_dir))
            for row in rows:
                row = _as_mapping(row)
                members = _sample(row, opts)
                if isinstance(members, tuple):  # a container member: packed when its container is read
                    set_aside.add(*members, row)
                    continue
                if isinstance(members, str):
                    opts.skipped[members] += 1
                    continue
                shards.add(str(row["id"]), members, mtime=float(row.get("finished_at") or 0))
                count += 1
            for container, by_key in set_aside.by_container():
                count += _repack(container, by_key, shards, opts)
        written = shards.commit(overwrite=overwrite)
    finally:
        shards.discard()
    return ExportSummary(rows_written=count, files_written=written, path=folder)


def _repack(container: str, by_key: dict[str, Mapping[str, Any]], out: _ShardSet, opts: _Options) -> int:
    """Read ``container`` (a tar shard, a Parquet or an Arrow file) once and add a sample for each of its members that
    has a row in ``by_key``."""
    assert opts.containers is not None
    count = 0
    try:
        for key, ext, data in opts.containers(container):
            row = by_key.pop(key, None)
            if row is None:
                continue  # not exported (not captioned, filtered out) or a key already packed
            if isinstance(data, ItemError):
                opts.skipped[_file_skip(data)] += 1
                continue
            out.add(str(row["id"]), _members(row, ext, data, opts.task), mtime=float(row.get("finished_at") or 0))
            count += 1
    except ItemError as exc:  # the container could not be opened or fetched
        opts.skipped[_file_skip(exc)] += len(by_key)
        by_key.clear()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # broke off (truncated since captioning)
        log.warning("export: %s could not be read to its end (%s: %s)", container, type(exc).__name__, exc)
        opts.skipped["unreadable"] += len(by_key)
        by_key.clear()
    if by_key:  # members no longer in the container
        opts.skipped["missing_image"] += len(by_key)
    return count


class _MemberRows:
    """The rows of container members, grouped by container: held in memory up to ``limit`` rows, then appended to
    one JSON-lines file per container in ``folder``."""

    def __init__(self, folder: Path, limit: int = 20_000) -> None:
        self.folder, self.limit = folder, limit
        self.held: dict[str, list[str]] = {}
        self.files: dict[str, Path] = {}
        self.count = 0

    def add(self, container: str, key: str, row: Mapping[str, Any]) -> None:
        line = json.dumps({"key": key, "row": row}, ensure_ascii=False, separators=(",", ":"), default=str)
        self.held.setdefault(container, []).append(line)
        self.count += 1
        if self.count >= self.limit:
            self._spill()

    def by_container(self) -> Iterator[tuple[str, dict[str, Mapping[str, Any]]]]:
        """Each container with its rows by member key (the first row of a key kept), in the order they first came."""
        for container in [*self.files, *(c for c in self.held if c not in self.files)]:
            lines = self.held.pop(container, [])
            if container in self.files:
                lines = self.files[container].read_text(encoding="utf-8").splitlines() + lines
            by_key: dict[str, Mapping[str, Any]] = {}
            for line in lines:
                entry = json.loads(line)
                by_key.setdefault(entry["key"], entry["row"])
            yield container, by_key

    def _spill(self) -> None:
        for container, lines in self.held.items():
            path = self.files.setdefault(container, self.folder / f"{len(self.files)}.jsonl")
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
        self.held, self.count = {}, 0


def _shard_pattern(out: Path | str | None) -> tuple[Path, str]:
    """(folder, file name pattern with one integer field) from a folder or a pattern like ``dir/train-%05d.tar``."""
    if out is None or str(out) == "-":
        raise ConfigError("webdataset needs an output folder or shard pattern (e.g. shards/shard-%06d.tar), not stdout")
    path = Path(out)
    if "%" in path.name:
        try:
            first, second = path.name % 0, path.name % 1
        except (TypeError, ValueError):
            first = second = ""
        if first == second or "/" in first or os.sep in first:
            raise ConfigError(f"shard pattern {path.name!r} needs exactly one integer field, e.g. shard-%06d.tar")
        folder, name = path.parent, path.name
    elif path.suffix == ".tar" and not path.is_dir():
        raise ConfigError(f"{path}: give a folder, or a shard pattern with an integer field like shard-%06d.tar")
    elif path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; webdataset writes shards into a folder")
    else:
        folder, name = path, _SHARD_NAME
    # The shard folder itself may be new; its parent must exist, as for every other output.
    if not (folder.is_dir() or folder.parent.is_dir()):
        raise ConfigError(f"output directory {folder.parent} does not exist")
    return folder, name


def _sample(row: Mapping[str, Any], opts: _Options) -> list[tuple[str, bytes]] | tuple[str, str] | str:
    """The (extension, bytes) members of one sample; (container, member key) for a member of a tar shard, a
    Parquet or an Arrow file, repacked later; or the reason the row is skipped."""
    image = str(row.get("ref") or "")
    container = container_member(image)
    reason = _caption_skip(row, opts.exclude_flags, remote=opts.remote is not None or container is not None,
                           task=opts.task)  # fmt: skip
    if reason is not None:
        return reason
    if not _SAFE_KEY.fullmatch(str(row.get("id") or "")):
        return "bad_key"
    if container is not None:
        # A member of a shard, a row group or a dataset: its bytes are in that container, which is read again (a
        # dataset, by name from a hub, is not).
        repacked = opts.containers is not None and container[0].lower().endswith((*TAR_SUFFIXES, ".parquet", ".arrow"))
        return container if repacked else "container_member"
    remote = is_url(image) or is_object_uri(image)
    ext = Path(image.split("?", 1)[0]).suffix.lower().lstrip(".") or "img"
    if ext in ("txt", "json") or not re.fullmatch(r"[a-z0-9]{1,8}", ext):
        return "name_clash" if ext in ("txt", "json") else "bad_key"
    try:
        # Read whole, now, by the workers' rules (images are capped in size): the path was checked when it was
        # captioned, and a link put there since must not carry another file into the shards. URLs and objects are
        # fetched again through the same image policy (allowed prefixes, the URL guard, the byte cap).
        if remote:
            assert opts.remote is not None
            data = opts.remote(image)
        elif opts.local is not None and opts.local.roots:
            data = opts.local.read(image)
        else:
            return "forbidden"  # a local file, and no allowed root to read it under
    except ItemError as exc:
        return _file_skip(exc)
    except OSError:
        return "unreadable"
    return _members(row, ext, data, opts.task)


def _members(row: Mapping[str, Any], ext: str, data: bytes, task: str | None = None) -> list[tuple[str, bytes]]:
    """A sample's members: the image, its caption (``txt``), its row (``json``) and each task's caption
    (``<task>.txt``)."""
    row_json = json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str)
    text = task_caption(row, task) or ""
    return [(ext, data), ("txt", text.encode()), ("json", row_json.encode()), *task_members(row)]


#: ``<container>#<member key>``: the reference of a member of a shard, a Parquet or Arrow file, or a 🤗 dataset.
_MEMBER_REF = re.compile(r"(?is)(hf:[^#]+|.+?(?:\.tar|\.tgz|\.tar\.gz|\.parquet|\.arrow))#(.+)")


def container_member(ref: str) -> tuple[str, str] | None:
    """(container, member key) when ``ref`` names a member of a container, else None."""
    match = _MEMBER_REF.fullmatch(ref)
    return (match.group(1), match.group(2)) if match else None


class _ShardSet:
    """Tar shards written to temporary names, renamed into place together once every one is complete."""

    def __init__(self, folder: Path, name: str, shard_size: int) -> None:
        self.folder, self.name, self.shard_size = folder, name, shard_size
        self.temps: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def add(self, key: str, members: list[tuple[str, bytes]], *, mtime: float) -> None:
        if self._tar is None or self._in_shard >= self.shard_size:
            self._open_next()
        assert self._tar is not None
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1

    def commit(self, *, overwrite: bool) -> int:
        """Move every shard into place; with ``overwrite``, remove higher-numbered shards of an older export."""
        self._close()
        finals = [self.folder / (self.name % i) for i in range(len(self.temps))]
        if not overwrite and (clash := next((f for f in finals if f.exists()), None)):
            raise ConfigError(f"{clash} already exists; pass overwrite (--overwrite) to replace it")
        placed: list[Path] = []
        try:
            for tmp, final in zip(self.temps, finals, strict=True):
                _fsync_path(tmp)
                _move_into_place(tmp, final, overwrite=overwrite)
                placed.append(final)
        except FileExistsError:
            for final in placed:
                final.unlink(missing_ok=True)
            raise ConfigError(f"shards appeared in {self.folder} while exporting; pass overwrite") from None
        if overwrite:
            stale = len(finals)
            while (old := self.folder / (self.name % stale)).is_file():
                old.unlink()
                stale += 1
        if (finals or overwrite) and self.folder.is_dir():
            _fsync_path(self.folder)  # the renames themselves survive a power cut
        return len(finals)

    def discard(self) -> None:
        """Remove whatever temporary shards remain (all of them when the export failed)."""
        with contextlib.suppress(Exception):
            self._close()
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)

    def _open_next(self) -> None:
        self._close()
        self.folder.mkdir(exist_ok=True)
        final = self.folder / (self.name % len(self.temps))
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        self.temps.append(tmp)
        self._tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed in _close)
        self._in_shard = 0

    def _close(self) -> None:
        if self._tar is not None:
            tar, self._tar = self._tar, None
            tar.close()


# --- readers ----------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _read_csv(path: Path) -> Iterator[dict[str, Any]]:
    # Files written before a column existed (flags) read it as None.
    with open(path, encoding="utf-8", newline="") as fh:
        for record in csv.DictReader(fh):
            row = {name: _coerce(name, _uncell(record.get(name)) or None) for name in FLAT_COLUMNS}
            row.update({k: _uncell(v) or None for k, v in record.items() if k.startswith(_TASK_PREFIX)})
            yield row


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    tasks = [name for name in parquet.schema_arrow.names if name.startswith(_TASK_PREFIX)]
    present = [name for name in FLAT_COLUMNS if name in parquet.schema_arrow.names] + tasks
    missing = dict.fromkeys(name for name in FLAT_COLUMNS if name not in present)  # older files lack flags
    try:
        for batch in parquet.iter_batches(batch_size=10_000, columns=present):
            for record in batch.to_pylist():
                yield {name: record[name] if name in record else missing[name] for name in [*FLAT_COLUMNS, *tasks]}
    finally:
        parquet.close()


# --- helpers ----------------------------------------------------------------------------------


def _as_mapping(row: Any) -> Mapping[str, Any]:
    # ItemResult models are accepted too, dumped the way they travel as JSON (enums as strings).
    if hasattr(row, "model_dump"):
        return row.model_dump(mode="json")
    return row


def caption_text(row: Mapping[str, Any]) -> str:
    """The caption a dataset gets from a row: the reviewer's correction when there is one, else the model's."""
    return str(row.get("corrected") or row["caption"])


def _caption_skip(
    row: Mapping[str, Any], exclude_flags: frozenset[str], *, remote: bool = False, task: str | None = None
) -> str | None:
    """Why a row gives no caption entry (not_ok, rejected, flagged, not_local, no_task), or None when it does."""
    if str(row.get("status")) != "ok" or row.get("caption") is None:
        return "not_ok"
    if task is not None and task_caption(row, task) is None:
        return "no_task"
    if row.get("mark") == "rejected":
        return "rejected"
    if exclude_flags:
        flags = row.get("flags") or ()
        if not exclude_flags.isdisjoint(split_flags(flags) if isinstance(flags, str) else flags):
            return "flagged"
    ref = str(row.get("ref") or "")
    # URLs, objects and the ``b64:<sha1>`` stand-in for inline bytes are not local files (webdataset exports fetch
    # URLs and objects again when given a reader for them).
    if not ref or ref.startswith("b64:") or (not remote and (is_url(ref) or is_object_uri(ref))):
        return "not_local"
    return None


def _file_name(ref: str, base: str | None) -> str:
    """``ref`` relative to ``base`` when it lies inside it (POSIX separators), else absolute."""
    image = os.path.abspath(ref)
    if base is not None:
        relative = os.path.relpath(image, base)
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return Path(relative).as_posix()
    return Path(image).as_posix()


def _coerce(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "extra":  # the columns a source row carried (Parquet, datasets), as one JSON text cell
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    if name == "flags":
        # A list from a row, a string from a file (or a row flattened already).
        text = value if isinstance(value, str) else ",".join(str(flag) for flag in value)
        return text or None
    if name in _INT_COLUMNS:
        return int(value)
    if name in _FLOAT_COLUMNS:
        return float(value)
    return str(value)
