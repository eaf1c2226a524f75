"""One export: pick the format's writer, run the rows through it, put the result in place (docs/exports.md)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from exports.captions import peek_tasks
from exports.files import export_sidecars, write_kohya, write_metadata
from exports.place import atomic_target, check_target, upload_all
from exports.rows import ContainerReader, ExportSummary, Options, above_min_score
from exports.tables import write_csv, write_jsonl, write_parquet
from exports.webdataset import SHARD_NAME, export_webdataset
from media.objects import ObjectStore
from media.paths import LocalFiles

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "parquet", "sidecar", "metadata", "webdataset", "kohya")

#: The formats written as one stream of text, to a file or to stdout.
_WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "metadata": write_metadata, "kohya": write_kohya}


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
    min_clip_score: float | None = None,
) -> ExportSummary:
    """Write ``rows`` (ItemResult dicts) as ``fmt``, one row at a time, to ``out`` (None or "-": stdout).

    A file appears whole or not at all, and an existing one is replaced only with ``overwrite``. ``local`` holds
    the workers' file rules (sidecar and webdataset check every file again as they touch it); ``remote`` and
    ``containers`` read images again for webdataset. Rows with several captions (``captions``, by task) carry them
    all (CSV/Parquet columns ``caption_<task>``: ``tasks`` names them, None: the first row's); the caption formats
    write ``task``'s. docs/exports.md tells each format and skip reason.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be at least 1, got {batch_rows}")
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    opts = Options(
        batch_rows,
        exclude_flags=frozenset(exclude_flags),
        local=local,
        remote=remote,
        containers=containers,
        task=task,
        min_clip_score=min_clip_score,
    )
    rows = above_min_score(rows, opts)
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
        summary = export_sidecars(rows, sidecar_ext=sidecar_ext, overwrite=overwrite, opts=opts)
    elif fmt == "webdataset":
        summary = export_webdataset(rows, out, shard_size=shard_size, overwrite=overwrite, opts=opts)
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


def _export_file(
    rows: Iterable[Mapping[str, Any]], fmt: str, out: Path, *, overwrite: bool, opts: Options
) -> ExportSummary:
    if fmt == "metadata" and out.is_dir():
        out = out / "metadata.jsonl"  # the name datasets' imagefolder loader looks for
    check_target(out, overwrite=overwrite)  # before the first row is pulled: a long export should not fail at its end
    opts.base = os.path.abspath(out.parent)
    try:
        with atomic_target(out, overwrite=overwrite) as tmp:
            if fmt == "parquet":
                count = write_parquet(rows, tmp, opts)
            else:
                # newline="" lets the csv module write its own line endings and quote embedded newlines.
                with open(tmp, "w", encoding="utf-8", newline="") as fh:
                    count = _WRITERS[fmt](rows, fh, opts)
    except FileExistsError:
        check_target(out, overwrite=False)  # says what stands there now
        raise ConfigError(f"{out} appeared while exporting; pass overwrite (--overwrite) to replace it") from None
    return ExportSummary(rows_written=count, files_written=1, path=out)


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
    a folder ending in ``/`` takes the default file name): written whole to a local temporary folder, then uploaded
    all or none, so a failed export leaves nothing under the final names."""
    if fmt == "sidecar":
        raise ConfigError("sidecar exports write caption files beside local images; give no -o for them")
    with tempfile.TemporaryDirectory(prefix="captioner-export-") as tmp:
        if fmt == "webdataset":
            head, _, tail = uri.rpartition("/")
            folder, name = (head + "/", tail) if "%" in uri else (uri.rstrip("/") + "/", SHARD_NAME)
            summary = export_rows(rows, fmt, Path(tmp) / "shards" / name, overwrite=True, **options)
            files = sorted((Path(tmp) / "shards").glob("*.tar")) if (Path(tmp) / "shards").is_dir() else []
            upload_all(store, [(f, folder + f.name) for f in files], overwrite)
            summary.location = folder
        else:
            target = uri + _store_file_name(fmt) if uri.endswith("/") else uri
            if not overwrite and store.exists(target, checked=False):  # before the first row, as for files
                raise ConfigError(f"{target} already exists; pass overwrite (--overwrite) to replace it")
            local = Path(tmp) / target.rsplit("/", 1)[-1]
            summary = export_rows(rows, fmt, local, overwrite=True, **options)
            upload_all(store, [(local, target)], overwrite)
            summary.location = target
    summary.path = None
    return summary


def _store_file_name(fmt: str) -> str:
    return {"metadata": "metadata.jsonl", "kohya": "kohya.json"}.get(fmt, f"export.{fmt}")
