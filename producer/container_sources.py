"""Container sources for the producer: WebDataset shards, Parquet files with an image-bytes column, Arrow files,
🤗 datasets (save_to_disk folders, imagefolders, hub ids). Each becomes one or more ``ContainerSpec`` (a shard, a
row group, a file, a dataset shard) that workers read once. Reads metadata only, never an image. No torch."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import SourceError
from common.messages import TAR_SUFFIXES, ContainerSpec, is_url
from media.objects import ObjectStore, is_object_uri

#: File names read as WebDataset shards.
#: Columns that hold image bytes, guessed in this order when --column is not given.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_shard(ref: str) -> bool:
    return ref.lower().split("?", 1)[0].endswith(TAR_SUFFIXES)


def expand_braces(text: str) -> Iterator[str]:
    """WebDataset's shard lists: ``shard-{000..009}.tar`` names ten shards (zero padding kept)."""
    match = _BRACES.search(text)
    if not match:
        yield text
        return
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") else 0
    for n in range(int(lo), int(hi) + 1):
        yield from expand_braces(text[: match.start()] + str(n).zfill(width) + text[match.end() :])


def shard_spec(ref: str) -> ContainerSpec:
    return ContainerSpec(kind="tar", ref=ref)


def is_image_bytes(kind: Any) -> bool:
    """Whether an Arrow type holds image bytes: binary, or a 🤗 Image struct with a ``bytes`` field."""
    import pyarrow as pa

    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return bool(pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)


def image_column(names: list[str], types: dict[str, Any], column: str | None, where: str) -> str | None:
    """The image-bytes column to read (the one named, or the first guess present); None when the file has none."""
    if column is not None:
        return column if column in types and is_image_bytes(types[column]) else None
    return next((c for c in IMAGE_COLUMNS if c in types and is_image_bytes(types[c])), None) or next(
        (c for c in names if is_image_bytes(types[c])), None
    )


def parquet_specs(ref: str, column: str | None, store: ObjectStore) -> list[ContainerSpec] | None:
    """One container per row group of a Parquet file whose image column holds bytes; None when it holds none (the
    file is then a list of references)."""
    import pyarrow.parquet as pq

    try:
        with _open(ref, store) as fh:
            meta = pq.ParquetFile(fh)
            schema = meta.schema_arrow
            groups = meta.metadata.num_row_groups
    except SourceError:
        raise
    except Exception as exc:  # pyarrow raises several unrelated classes for a bad file
        raise SourceError(f"{ref}: not a readable Parquet file ({exc})") from None
    types = {f.name: f.type for f in schema}
    col = image_column(schema.names, types, column, ref)
    if col is None:
        return None
    return [ContainerSpec(kind="parquet", ref=ref, column=col, part=i) for i in range(groups)]


def arrow_specs(ref: str, column: str | None, store: ObjectStore) -> list[ContainerSpec]:
    """One container per Arrow IPC file (file or stream format) with an image-bytes column."""
    import pyarrow as pa

    try:
        with _open(ref, store) as fh:
            head = fh.read(6)
            fh.seek(0)
            schema = (pa.ipc.open_file(fh) if head == b"ARROW1" else pa.ipc.open_stream(fh)).schema
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{ref}: not a readable Arrow file ({exc})") from None
    col = image_column(schema.names, {f.name: f.type for f in schema}, column, ref)
    if col is None:
        raise SourceError(
            f"{ref}: no column of image bytes (name one with --column); columns: {', '.join(schema.names)}"
        )
    return [ContainerSpec(kind="arrow", ref=ref, column=col)]


def is_saved_dataset(path: Path) -> bool:
    """Whether a folder is a 🤗 dataset written by ``save_to_disk`` (one split)."""
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def saved_dataset_specs(path: Path, column: str | None) -> list[ContainerSpec]:
    """The Arrow files of a ``save_to_disk`` folder, loaded with 🤗 datasets to find its files and image column."""
    try:
        import datasets
    except ImportError:
        raise SourceError(
            f"{path}: reading a saved 🤗 dataset needs the datasets package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise SourceError(f"{path}: not a readable saved dataset: {type(exc).__name__}: {exc}"[:300]) from None
    if isinstance(ds, datasets.DatasetDict):
        raise SourceError(f"{path}: holds several splits ({', '.join(ds)}); enqueue one split's folder")
    images = [name for name, feat in ds.features.items() if isinstance(feat, datasets.Image)]
    col = column or (images[0] if images else None)
    if col is None or col not in ds.features:
        raise SourceError(f"{path}: no image column (name one with --column); columns: {', '.join(ds.features)}")
    files = [f["filename"] for f in ds.cache_files]
    return [ContainerSpec(kind="arrow", ref=str(Path(f).resolve()), column=col) for f in files]


def dataset_specs(ref: str, *, split: str, column: str | None, download: bool, per_part: int) -> list[ContainerSpec]:
    """A 🤗 dataset named by folder (an imagefolder; a ``save_to_disk`` folder reads as Arrow files) or hub id, as
    containers of about ``per_part`` files each; a hub id is streamed, never downloaded unless ``download``."""
    path = Path(ref).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        return saved_dataset_specs(path.resolve(), column)
    try:
        import datasets
    except ImportError:
        raise SourceError("--dataset needs the datasets package (pip install 'captioner[datasets]')") from None
    local = path.is_dir()
    name = str(path.resolve()) if local else ref
    try:
        if local:
            ds = datasets.load_dataset("imagefolder", data_dir=name, split=split, streaming=True)
        else:
            ds = datasets.load_dataset(ref, split=split, streaming=True)
    except Exception as exc:  # the hub, the network and the loaders raise many unrelated classes
        raise SourceError(
            f"{ref}: cannot load the dataset: {type(exc).__name__}: {' '.join(str(exc).split())}"[:400]
        ) from None
    features = ds.features or {}
    col = column or next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    if col is None or col not in features:
        raise SourceError(f"{ref}: no image column (name one with --column); columns: {', '.join(features)}")
    shards = max(1, int(ds.num_shards))
    parts = max(1, -(-shards // per_part)) if local else shards
    return [
        ContainerSpec(kind="hf", ref=name, split=split, column=col, part=i, parts=parts, download=download)
        for i in range(parts)
    ]


class _Opened:
    def __init__(self, ref: str, store: ObjectStore) -> None:
        self.ref, self.store = ref, store
        self._cm: Any = None

    def __enter__(self) -> Any:
        if is_object_uri(self.ref):
            self._cm = self.store.open(self.ref, checked=False)
            return self._cm.__enter__()
        if is_url(self.ref):
            raise SourceError(f"{self.ref}: Parquet and Arrow files are read from local paths or object stores")
        self._cm = open(self.ref, "rb")
        return self._cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)


def _open(ref: str, store: ObjectStore) -> _Opened:
    return _Opened(ref, store)


def spec_json(spec: ContainerSpec) -> str:
    return json.dumps(spec.model_dump(exclude_defaults=True), separators=(",", ":"), sort_keys=True)


def member_container(ref: str) -> str | None:
    """The container reference of a member's reference (``<container>#<key>``), or None for a plain reference."""
    head, sep, _ = ref.rpartition("#")
    if not sep:
        return None
    lower = head.lower()
    if lower.startswith("hf:") or lower.endswith((*TAR_SUFFIXES, ".parquet", ".arrow")):
        return head
    return None


def local_abs(ref: str) -> str:
    return ref if is_url(ref) or is_object_uri(ref) else os.path.abspath(ref)
