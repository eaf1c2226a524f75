"""Expand what a user names (files, directories, globs, URL/path lists) into image references, lazily.

Nothing here opens an image: a directory is filtered by image file extensions, so a corrupt file named
.jpg is still enqueued and gets its own decode_error row instead of vanishing silently.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ItemError, SourceError
from common.messages import ContainerSpec, is_url
from media.objects import ObjectStore, is_object_uri, parse_uri, store_errors
from producer.container_sources import (
    _BRACES,
    arrow_specs,
    dataset_specs,
    expand_braces,
    is_saved_dataset,
    is_shard,
    parquet_specs,
    saved_dataset_specs,
    shard_spec,
)

#: Extensions of the formats the worker decodes (see Settings.allowed_formats).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
IMAGE_EXTENSIONS_TUPLE = tuple(sorted(IMAGE_EXTENSIONS))
#: Leading bytes of the formats the worker decodes, for files whose name says nothing (``sniff``).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
#: Files read as lists of references, one per line or row.
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".csv", ".tsv", ".jsonl", ".ndjson", ".parquet"})


@dataclass(frozen=True)
class Containers:
    """How container sources are read: the object store's protocols (listing needs no allowed prefix), and for
    ``--dataset`` arguments the split, whether to download, and the files per container."""

    store: ObjectStore = field(default_factory=lambda: ObjectStore((), ("s3", "gs"), 1 << 30))
    dataset: bool = False
    split: str = "train"
    download: bool = False
    per_part: int = 64


#: What an argument expands to: image references, and containers (shards, row groups) workers read whole.
Ref = str | ContainerSpec


def expand(
    arg: str,
    *,
    column: str | None = None,
    follow_links: bool = False,
    sniff: bool = False,
    containers: Containers | None = None,
) -> Iterator[Ref]:
    """References named by one argument: a URL, an object URI or prefix, an image file, a list file, a directory, a
    glob; WebDataset shards (``.tar``, ``{000..009}`` ranges), Parquet or Arrow files with an image-bytes column,
    ``save_to_disk`` folders and, with ``containers.dataset``, 🤗 datasets become containers."""
    opts = containers or Containers()
    if opts.dataset:
        yield from dataset_specs(arg, split=opts.split, column=column, download=opts.download, per_part=opts.per_part)
        return
    if is_url(arg) or is_object_uri(arg):
        for one in expand_braces(arg):
            yield from _remote(one, column, opts)
        return
    path = Path(arg).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        yield from saved_dataset_specs(path.resolve(), column)
    elif path.is_dir():
        yield from walk_images(path, follow_links=follow_links, sniff=sniff)
    elif path.is_file():
        yield from _file(path, column, opts)
    elif glob.has_magic(arg) or _BRACES.search(arg):
        matched = False
        for pattern in expand_braces(arg):
            for hit in sorted(glob.iglob(os.path.expanduser(pattern), recursive=True)):
                matched = True
                yield from expand(hit, column=column, follow_links=follow_links, sniff=sniff, containers=opts)
        if not matched:
            raise SourceError(f"{arg}: the pattern matches no file")
    elif path.exists():
        raise SourceError(f"{arg}: not a regular file or directory")
    else:
        raise SourceError(f"{arg}: no such file, directory or URL")


def _file(path: Path, column: str | None, opts: Containers) -> Iterator[Ref]:
    suffix, ref = path.suffix.lower(), str(path.resolve())
    if is_shard(ref):
        yield shard_spec(ref)
    elif suffix == ".arrow":
        yield from arrow_specs(ref, column, opts.store)
    elif suffix == ".parquet" and (specs := parquet_specs(ref, column, opts.store)) is not None:
        yield from specs
    elif suffix in LIST_EXTENSIONS:
        for item in read_list(path, column=column):
            yield shard_spec(item) if is_shard(item) else item
    else:
        yield ref


def _remote(ref: str, column: str | None, opts: Containers) -> Iterator[Ref]:
    """A URL or an object: a shard, a Parquet/Arrow object, an image, or (objects) a prefix listed recursively."""
    if is_shard(ref):
        yield shard_spec(ref)
        return
    if is_url(ref):
        yield ref
        return
    lower = ref.lower()
    if lower.endswith(".arrow"):
        yield from arrow_specs(ref, column, opts.store)
    elif lower.endswith(".parquet"):
        specs = parquet_specs(ref, column, opts.store)
        if specs is None:
            raise SourceError(f"{ref}: lists of references are read from local files; this object has no image column")
        yield from specs
    elif lower.endswith(IMAGE_EXTENSIONS_TUPLE):
        yield ref
    elif glob.has_magic(ref):
        yield from _object_glob(ref, opts)
    else:
        yield from list_prefix(ref, opts.store)


def list_prefix(ref: str, store: ObjectStore) -> Iterator[str]:
    """The images under an object prefix, recursively, in key order, streamed page by page; SourceError when the
    bucket or the prefix does not exist."""
    folder = ref if ref.endswith("/") or ref.count("/") == 2 else ref + "/"
    try:
        yield from store.iter_objects(folder, IMAGE_EXTENSIONS_TUPLE)
    except ItemError as exc:
        raise SourceError(str(exc)) from None


def _object_glob(ref: str, opts: Containers) -> Iterator[Ref]:
    try:
        uri = parse_uri(ref, opts.store.protocols)
        with store_errors(ref):
            hits = sorted(opts.store.filesystem(uri.protocol).glob(uri.path))
    except ItemError as exc:
        raise SourceError(str(exc)) from None
    if not hits:
        raise SourceError(f"{ref}: the pattern matches no object")
    for hit in hits:
        yield from _remote(f"{uri.protocol}://{hit}", None, opts)


def check_object(arg: str, store: ObjectStore) -> None:
    """SourceError now, in one line, when an object prefix's bucket or prefix does not exist (or access is refused)."""
    try:
        parse_uri(arg, store.protocols)
        if glob.has_magic(arg) or _BRACES.search(arg):
            return
        lower = arg.lower()
        single = is_shard(arg) or lower.endswith((".parquet", ".arrow", *IMAGE_EXTENSIONS_TUPLE))
        store.check_prefix(arg if single or arg.endswith("/") or arg.count("/") == 2 else arg + "/")
    except ItemError as exc:
        raise SourceError(str(exc)) from None


def check(arg: str, *, column: str | None = None, containers: Containers | None = None) -> None:
    """Raise ``SourceError`` now if ``arg`` cannot be expanded: a missing path, an empty glob, an unreadable
    directory, a list file whose format or column is wrong. Cheap (reads at most one reference of a list), so
    the CLI checks every argument before a job is opened: a bad third argument leaves no half-recorded job."""
    opts = containers or Containers()
    if is_url(arg) or opts.dataset:
        return
    if is_object_uri(arg):
        check_object(arg, opts.store)
        return
    path = Path(arg).expanduser()
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise SourceError(f"{arg}: directory not readable")
    elif (path.is_file() and (is_shard(str(path)) or path.suffix.lower() == ".arrow")) or (
        path.is_file() and path.suffix.lower() == ".parquet" and parquet_specs(str(path), column, opts.store)
    ):
        return
    elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        next(read_list(path, column=column), None)
    elif path.is_file():
        return
    elif glob.has_magic(arg) or _BRACES.search(arg):
        if not any(next(glob.iglob(os.path.expanduser(p), recursive=True), None) for p in expand_braces(arg)):
            raise SourceError(f"{arg}: the pattern matches no file")
    elif path.exists():
        raise SourceError(f"{arg}: not a regular file or directory")
    else:
        raise SourceError(f"{arg}: no such file, directory or URL")


def walk_images(root: Path, *, follow_links: bool = False, sniff: bool = False) -> Iterator[str]:
    """Image files under a directory, recursively, in a stable (sorted) order, as absolute paths.

    By name: an image extension. With ``sniff``, a file with another name counts too when its first bytes are
    an image signature (cameras and scrapers leave files like ``IMG_0001`` or ``photo.jpg_large``); that costs
    one small read per such file, so it is off by default.
    """
    root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links, onerror=_raise):
        dirnames.sort()
        for name in sorted(filenames):
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_EXTENSIONS or (
                sniff and suffix not in LIST_EXTENSIONS and _looks_like_image(os.path.join(dirpath, name))
            ):
                yield os.path.join(dirpath, name)


def _looks_like_image(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _raise(err: OSError) -> None:
    raise SourceError(f"{err.filename}: {err.strerror}")


def _local_ref(base: Path, ref: str) -> str:
    """A list line naming a local file, absolute. A path no file can have (a NUL in it) is kept as written, made
    absolute without asking the file system: the worker gives it its row, naming the error, and the rest go on."""
    if "\x00" in ref:
        return os.path.normpath(base / ref)
    return str((base / ref).resolve())


def read_list(path: Path, *, column: str | None = None) -> Iterator[str]:
    """References from a list file; relative paths are taken relative to the list file's folder."""
    suffix = path.suffix.lower()
    try:
        if suffix in {".txt", ".lst"}:
            refs = _read_lines(path)
        elif suffix in {".csv", ".tsv"}:
            refs = _read_csv(path, column, delimiter="\t" if suffix == ".tsv" else ",")
        elif suffix in {".jsonl", ".ndjson"}:
            refs = _read_jsonl(path, column)
        else:
            refs = _read_parquet(path, column)
        base = path.resolve().parent
        for ref in refs:
            ref = ref.strip()
            if ref:
                yield ref if is_url(ref) else _local_ref(base, ref)
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not UTF-8 text") from None


# utf-8-sig: a byte-order mark (Windows editors write one) is dropped instead of sticking to the first reference.


def _read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8-sig") as fh:
        for line in fh:
            if not line.lstrip().startswith("#"):
                yield line.rstrip("\n")


def _pick(columns: list[str], column: str | None, path: Path) -> str:
    if column:
        if column not in columns:
            raise SourceError(f"{path}: no column {column!r} (columns: {', '.join(columns)})")
        return column
    for guess in ("path", "url", "file_name", "image", "src"):
        if guess in columns:
            return guess
    if len(columns) == 1:
        return columns[0]
    raise SourceError(f"{path}: say which column holds the image references (--column); columns: {', '.join(columns)}")


def _read_csv(path: Path, column: str | None, *, delimiter: str) -> Iterator[str]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        name = _pick(list(reader.fieldnames or []), column, path)
        for row in reader:
            yield row.get(name) or ""


def _read_jsonl(path: Path, column: str | None) -> Iterator[str]:
    with path.open(encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if isinstance(obj, str):
                yield obj
                continue
            if not isinstance(obj, dict):
                raise SourceError(f"{path}:{n}: expected an object or a string")
            name = _pick(list(obj), column, path)
            value = obj.get(name)
            if value is not None and not isinstance(value, str):
                raise SourceError(f"{path}:{n}: {name!r} is {type(value).__name__}, not text (a path or URL)")
            yield value or ""


def _read_parquet(path: Path, column: str | None) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated classes for a bad file
        raise SourceError(f"{path}: not a readable Parquet file ({exc})") from None
    name = _pick(pf.schema_arrow.names, column, path)
    kind = pf.schema_arrow.field(name).type
    if not _is_text(kind):
        raise SourceError(f"{path}: column {name!r} holds {kind}, not text (paths or URLs); name another with --column")
    for batch in pf.iter_batches(columns=[name], batch_size=65_536):
        for value in batch.column(0).to_pylist():
            yield value or ""


def _is_text(kind: Any) -> bool:
    """Whether a Parquet column of this Arrow type holds strings (plain, large, view or dictionary-encoded)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return bool(
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or getattr(pa.types, "is_string_view", lambda _: False)(kind)
    )
