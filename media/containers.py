"""Reading containers: WebDataset tar shards, Parquet row groups, slices of Arrow files and shards of 🤗 datasets,
member by member, sequentially, with the bytes of each image in hand and never decoded here. A member that cannot
be used carries its error (``too_large``, ``decode_error``); a container that cannot be opened, or that ends early
(a truncated shard), yields one member named ``*`` standing for the members that could not be read.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import IO, Any, NamedTuple

from common.errors import DecodeError, Forbidden, ItemError, TooLarge
from common.messages import ContainerSpec, is_url
from common.settings import Settings
from media.images import FetchGuard, ImagePolicy, default_guard, fetch_url
from media.objects import is_object_uri
from media.paths import LocalFiles

log = logging.getLogger(__name__)

#: Member extensions taken as the sample's image (the first one present), in WebDataset's naming.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "jpe")
#: Member extensions kept beside a tar sample's caption (its text, metadata, class), when small.
_SIDE_EXTS = ("txt", "json", "cls", "caption")
#: Largest serialised ``extra`` a row keeps (columns of a source row); larger values are left out, named.
MAX_EXTRA_BYTES = 4096
#: The key of the item that stands for a container's members that could not be read.
UNREAD = "*"


class Blob(NamedTuple):
    """An image whose bytes are already in hand (a member of a shard or a Parquet row, read once by the container
    reader), or the error that reading it met (too large, truncated). ``extra``: the row's other columns."""

    ref: str
    data: bytes | None
    error: ItemError | None = None
    extra: dict[str, Any] | None = None


@dataclass
class Member:
    """One member as read: its key in the container and its bytes (or the error reading it met)."""

    key: str
    blob: Blob


# --- reading ----------------------------------------------------------------------------------------


def read_members(spec: ContainerSpec, policy: ImagePolicy, settings: Settings, guard: FetchGuard) -> Iterator[Member]:
    """The members of a container in order; an error opening or reading it ends with one ``UNREAD`` member."""
    count = 0
    try:
        if spec.kind == "tar":
            with open_container(spec.ref, policy, settings, guard) as fh:
                for member in _tar_members(spec, fh, settings.max_image_bytes):
                    count += 1
                    yield member
        elif spec.kind in ("parquet", "arrow"):
            with open_container(spec.ref, policy, settings, guard) as fh:
                reader = _parquet_members if spec.kind == "parquet" else _arrow_members
                for member in reader(spec, fh, settings.max_image_bytes):
                    count += 1
                    yield member
        else:
            for member in _hf_members(spec, policy, settings):
                count += 1
                yield member
    except ItemError as exc:
        yield _unread(spec, exc, count)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # a truncated or corrupt container
        yield _unread(spec, DecodeError(f"{type(exc).__name__}: {exc}"), count)
    except Exception as exc:  # pyarrow and datasets raise many unrelated classes for bad files
        yield _unread(spec, DecodeError(f"{type(exc).__name__}: {exc}"[:400]), count)


def _unread(spec: ContainerSpec, exc: ItemError, count: int) -> Member:
    where = f"after {count} member(s)" if count else "before any member"
    error = type(exc)(f"{spec.ref}: read stopped {where}; the rest could not be read: {exc}"[:480])
    error.transient = exc.transient
    return Member(UNREAD, Blob(spec.member_ref(UNREAD), None, error))


@contextlib.contextmanager
def open_container(ref: str, policy: ImagePolicy, settings: Settings, guard: FetchGuard) -> Iterator[IO[bytes]]:
    """A reader of a container file by the workers' rules: a path under an allowed root, an object under an allowed
    prefix (both streamed), or an http(s) URL through the URL guard (fetched whole, within the container cap)."""
    if is_url(ref):
        yield io.BytesIO(fetch_url(ref, policy, guard=guard))
    elif is_object_uri(ref):
        if policy.objects is None:
            raise Forbidden(f"{ref}: object storage is off")
        with policy.objects.open(ref) as fh:
            yield fh  # type: ignore[misc]
    else:
        with LocalFiles(policy.allowed_roots, settings.max_container_bytes).open(ref) as fh:
            yield fh


def _split_name(name: str) -> tuple[str, str]:
    """A tar member's WebDataset key and extension: the path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_groups(fh: IO[bytes], max_bytes: int) -> Iterator[tuple[str, dict[str, bytes | ItemError]]]:
    """A WebDataset shard's samples as (key, {extension: bytes, or why they were not read}), grouped by key as the
    members come (one pass, streaming); only images and small text members are read."""
    key: str | None = None
    sample: dict[str, bytes | ItemError] = {}
    with tarfile.open(fileobj=fh, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = _split_name(info.name)
            if k != key:
                if key is not None:
                    yield key, sample
                key, sample = k, {}
            if info.size > max_bytes and ext in IMAGE_EXTS:
                sample[ext] = TooLarge(f"member {info.name} is {info.size} bytes, over the limit of {max_bytes}")
            elif ext in IMAGE_EXTS or (ext in _SIDE_EXTS and info.size <= MAX_EXTRA_BYTES):
                member = tar.extractfile(info)
                sample[ext] = member.read() if member is not None else b""
    if key is not None:
        yield key, sample


def _tar_members(spec: ContainerSpec, fh: IO[bytes], max_bytes: int) -> Iterator[Member]:
    """Samples of a WebDataset shard with an image, as members of ``spec``."""
    for key, parts in _tar_groups(fh, max_bytes):
        if member := _sample(spec, key, parts):
            yield member


def container_images(ref: str, settings: Settings) -> Iterator[tuple[str, str, bytes | ItemError]]:
    """(key, image extension, its bytes or why they were not read) of every member of the container ``ref``, in
    order: the samples of a tar shard, the rows of a Parquet or Arrow file (keys are row numbers, as when they were
    captioned). What an export repacks. Read as a worker reads it (an allowed root or prefix, the URL guard, the
    container's cap and deadline, the image cap per member); a container that cannot be opened or read to its end
    raises (an ``ItemError``, or the ``tarfile``/``OSError``/pyarrow error of a truncated one)."""
    image_policy = ImagePolicy.from_settings(settings)
    policy = replace(image_policy, max_bytes=settings.max_container_bytes, total_timeout_s=settings.container_timeout_s)
    with open_container(ref, policy, settings, default_guard()) as fh:
        if ref.lower().endswith((".parquet", ".arrow")):
            yield from _table_images(ref, fh, settings.max_image_bytes)
            return
        for key, parts in _tar_groups(fh, settings.max_image_bytes):
            ext = next((e for e in IMAGE_EXTS if e in parts), None)
            if ext is not None:
                yield key, ext, parts[ext]


def _table_images(ref: str, fh: IO[bytes], max_bytes: int) -> Iterator[tuple[str, str, bytes | ItemError]]:
    """The image cells of a Parquet or Arrow file, row by row, one row group or record batch in memory at a time. The
    image column is ``image``, or the only column holding bytes (the column chosen at enqueue is not recorded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if ref.lower().endswith(".parquet"):
        pf = pq.ParquetFile(fh)
        column = _image_column(ref, pf.schema_arrow)
        tables: Iterator[Any] = (pf.read_row_group(i, columns=[column]) for i in range(pf.num_row_groups))
    else:
        head = fh.read(6)
        fh.seek(0)
        batches = pa.ipc.open_file(fh) if head == b"ARROW1" else pa.ipc.open_stream(fh)
        column = _image_column(ref, batches.schema)
        tables = (
            (batches.get_batch(i) for i in range(batches.num_record_batches)) if head == b"ARROW1" else iter(batches)
        )
    row = 0
    for table in tables:
        for cell in table.column(column).to_pylist():
            data, error = _image_cell(cell, f"row {row}", max_bytes)
            yield str(row), _image_ext(data) if data is not None else "img", data if error is None else error
            row += 1


def _image_column(ref: str, schema: Any) -> str:
    import pyarrow as pa

    if "image" in schema.names:
        return "image"
    holding_bytes = [
        f.name
        for f in schema
        if pa.types.is_binary(f.type)
        or pa.types.is_large_binary(f.type)
        or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)
    ]
    if len(holding_bytes) != 1:
        raise DecodeError(f"{ref}: no column named image, and {len(holding_bytes)} columns holding bytes, not one")
    return holding_bytes[0]


#: PIL's format names whose usual file extension is not their name in lower case.
_FORMAT_EXTS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}


def _image_ext(data: bytes) -> str:
    """The file extension of an image's bytes, from their header (``img`` when PIL does not know them)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            name = str(image.format or "")
    except Exception:  # not an image PIL reads: the sample still carries its bytes
        return "img"
    return _FORMAT_EXTS.get(name, name.lower() or "img")


def _sample(spec: ContainerSpec, key: str, parts: dict[str, bytes | ItemError]) -> Member | None:
    """A sample's image (its first image member) with its small text members as ``extra``; None without an image."""
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        return None
    image = parts[ext]
    extra = {e: _text_value(e, v) for e, v in parts.items() if e in _SIDE_EXTS and isinstance(v, bytes)}
    ref = spec.member_ref(key)
    if isinstance(image, ItemError):
        return Member(key, Blob(ref, None, image, clean_extra(extra)))
    return Member(key, Blob(ref, image, None, clean_extra(extra)))


def _text_value(ext: str, data: bytes) -> Any:
    text = data.decode("utf-8", "replace")
    if ext == "json":
        with contextlib.suppress(ValueError):
            return json.loads(text)
    return text


def _image_cell(value: Any, where: str, max_bytes: int) -> tuple[bytes | None, ItemError | None]:
    """The bytes of an image cell: binary, or a 🤗 Image struct {"bytes", "path"}; an error row's cause otherwise."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return None, DecodeError(f"{where}: the image cell is empty")
    if not isinstance(value, bytes | bytearray | memoryview):
        return None, DecodeError(f"{where}: the image cell holds {type(value).__name__}, not bytes")
    if len(value) > max_bytes:
        return None, TooLarge(f"{where}: the image cell is {len(value)} bytes, over the limit of {max_bytes}")
    return bytes(value), None


def _rows_as_members(spec: ContainerSpec, rows: list[dict[str, Any]], first: int, max_bytes: int) -> Iterator[Member]:
    column = spec.column or "image"
    for n, row in enumerate(rows):
        key = str(first + n)
        if column not in row:
            raise DecodeError(f"{spec.ref}: no column {column!r}")
        data, error = _image_cell(row.pop(column), f"row {key}", max_bytes)
        yield Member(key, Blob(spec.member_ref(key), data, error, clean_extra(row)))


def _parquet_members(spec: ContainerSpec, fh: IO[bytes], max_bytes: int) -> Iterator[Member]:
    """The rows of one row group; a row's key is its index in the file."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fh)
    group = spec.part or 0
    first = sum(pf.metadata.row_group(i).num_rows for i in range(group))
    table = pf.read_row_group(group)
    yield from _rows_as_members(spec, table.to_pylist(), first, max_bytes)


def _arrow_members(spec: ContainerSpec, fh: IO[bytes], max_bytes: int) -> Iterator[Member]:
    """The rows [start, stop) of an Arrow IPC file or stream (what ``save_to_disk`` writes), batch by batch."""
    import pyarrow as pa

    head = fh.read(6)
    fh.seek(0)
    batches = pa.ipc.open_file(fh) if head == b"ARROW1" else pa.ipc.open_stream(fh)
    start, stop = spec.start or 0, spec.stop
    seen = 0
    for batch in (batches.get_batch(i) for i in range(batches.num_record_batches)) if head == b"ARROW1" else batches:
        lo, hi = seen, seen + batch.num_rows
        seen = hi
        if hi <= start:
            continue
        if stop is not None and lo >= stop:
            return
        part = batch.slice(max(0, start - lo), (min(hi, stop) if stop is not None else hi) - max(lo, start))
        yield from _rows_as_members(spec, part.to_pylist(), max(lo, start), max_bytes)


def _hf_members(spec: ContainerSpec, policy: ImagePolicy, settings: Settings) -> Iterator[Member]:
    """One shard of a 🤗 dataset (an imagefolder or a hub id), streamed unless ``download``; images by path are read
    under the workers' rules."""
    from media.datasets import iter_shard

    for key, row, cell in iter_shard(spec, policy, settings):
        data, error = (None, cell) if isinstance(cell, ItemError) else _image_cell(cell, f"row {key}", policy.max_bytes)
        yield Member(key, Blob(spec.member_ref(key), data, error, clean_extra(row)))


def clean_extra(row: dict[str, Any]) -> dict[str, Any] | None:
    """The other columns of a source row as JSON-safe values (integers, text, lists, structs; bytes left out), within
    MAX_EXTRA_BYTES: columns that do not fit are named in ``_omitted``."""
    out: dict[str, Any] = {}
    omitted: list[str] = []
    size = 2
    for name, value in row.items():
        safe = _json_safe(value)
        if safe is _DROP:
            omitted.append(str(name))
            continue
        cost = len(json.dumps({str(name): safe}, ensure_ascii=False, default=str))
        if size + cost > MAX_EXTRA_BYTES:
            omitted.append(str(name))
            continue
        out[str(name)] = safe
        size += cost
    if omitted:
        out["_omitted"] = omitted
    return out or None


_DROP = object()


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return _DROP  # image bytes of another column, embeddings: never into the ledger
    if isinstance(value, dict):
        items = {str(k): _json_safe(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _DROP}
    if isinstance(value, list | tuple):
        return [v for v in (_json_safe(v) for v in value) if v is not _DROP]
    return str(value)  # dates, decimals: as text
