"""Captions by image file: caption files beside the images (sidecar), an imagefolder ``metadata.jsonl``, kohya JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from common.errors import ConfigError, ItemError
from exports.captions import task_caption
from exports.rows import ExportSummary, Options, caption_skip, file_name, file_skip, kept
from media.paths import write_beside


def write_metadata(rows: Iterable[Mapping[str, Any]], fh: IO[str], opts: Options) -> int:
    """Imagefolder ``metadata.jsonl``: {"file_name", "text"} per ok row with a local image."""

    def entry(row: Mapping[str, Any]) -> dict[str, str] | str:
        reason = caption_skip(row, opts.exclude_flags, task=opts.task)
        return reason or {"file_name": file_name(str(row["ref"]), opts.base), "text": task_caption(row, opts.task)}

    count = 0
    for record in kept(rows, opts.skipped, entry):
        fh.write(json.dumps(record, ensure_ascii=False))
        fh.write("\n")
        count += 1
    fh.flush()
    return count


def write_kohya(rows: Iterable[Mapping[str, Any]], fh: IO[str], opts: Options) -> int:
    """One JSON object {absolute image path: {"caption": caption}}, written entry by entry.

    Keys are unique for the rows of one job (item ids derive from the reference); were a path to repeat,
    JSON readers keep its last entry.
    """

    def entry(row: Mapping[str, Any]) -> tuple[str, str] | str:
        reason = caption_skip(row, opts.exclude_flags, task=opts.task)
        if reason is not None:
            return reason
        return os.path.abspath(str(row["ref"])), task_caption(row, opts.task) or ""

    count = 0
    fh.write("{")
    for path, caption in kept(rows, opts.skipped, entry):
        key, value = json.dumps(path, ensure_ascii=False), json.dumps({"caption": caption}, ensure_ascii=False)
        fh.write(f"{',' if count else ''}\n  {key}: {value}")
        count += 1
    fh.write("\n}\n" if count else "}\n")
    fh.flush()
    return count


def export_sidecars(
    rows: Iterable[Mapping[str, Any]], *, sidecar_ext: str, overwrite: bool, opts: Options
) -> ExportSummary:
    """``<image stem><sidecar_ext>`` beside each image of an ok row (existing ones kept unless ``overwrite``)."""
    if not sidecar_ext.startswith(".") or len(sidecar_ext) < 2 or "/" in sidecar_ext or os.sep in sidecar_ext:
        raise ConfigError(f"sidecar extension must look like '.txt', got {sidecar_ext!r}")
    written = sum(kept(rows, opts.skipped, lambda row: _write_sidecar(row, sidecar_ext, overwrite, opts)))
    return ExportSummary(rows_written=written, files_written=written)


def _write_sidecar(row: Mapping[str, Any], ext: str, overwrite: bool, opts: Options) -> int | str:
    """Write one sidecar: 1 when written, else the reason it was skipped."""
    reason = caption_skip(row, opts.exclude_flags, task=opts.task)
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
        return file_skip(exc)
    return 1 if written else "exists"
