"""🤗 datasets as containers: an imagefolder under an allowed root, or a hub dataset (``CAPTIONER_HUB_DATASETS``),
streamed shard by shard (downloaded whole only when the job asked). Images are read undecoded: bytes, or a path
read under the workers' rules. Imported only by workers that take such a container (extra ``datasets``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from common.errors import FetchError, Forbidden, ItemError
from common.messages import ContainerSpec
from common.settings import Settings
from media.images import ImagePolicy
from media.paths import LocalFiles


def load(spec: ContainerSpec, policy: ImagePolicy, settings: Settings) -> Any:
    """The dataset split a spec names, images left undecoded; Forbidden for a folder outside the allowed roots or a
    hub id the worker may not stream."""
    try:
        import datasets
    except ImportError:
        raise FetchError("🤗 datasets is not installed on this worker (pip install 'captioner[datasets]')") from None
    local = os.path.isabs(spec.ref)
    if local:
        with LocalFiles(policy.allowed_roots, policy.max_bytes).folder(spec.ref):
            pass  # under an allowed root, a real folder
    elif not settings.hub_datasets:
        raise Forbidden(f"{spec.ref}: hub datasets are off on this worker (CAPTIONER_HUB_DATASETS)")
    try:
        if local:
            ds = datasets.load_dataset(
                "imagefolder", data_dir=spec.ref, split=spec.split or "train", streaming=not spec.download
            )
        else:
            ds = datasets.load_dataset(spec.ref, split=spec.split or "train", streaming=not spec.download)
    except Exception as exc:  # the hub, the network and the loaders raise many unrelated classes
        raise FetchError(f"{spec.ref}: cannot load the dataset: {type(exc).__name__}: {exc}"[:400]) from None
    column = spec.column or "image"
    if column not in (ds.features or {}):
        raise FetchError(f"{spec.ref}: no image column {column!r}")
    return ds.cast_column(column, datasets.Image(decode=False))


def iter_shard(spec: ContainerSpec, policy: ImagePolicy, settings: Settings) -> Iterator[tuple[str, dict, Any]]:
    """(key, the row's other columns, the image cell or the error reading it) for each row of the spec's shard. The
    key is the image's path relative to the folder where there is one, else the shard and the row's place in it."""
    ds = load(spec, policy, settings)
    if spec.parts and spec.parts > 1:
        ds = ds.shard(num_shards=spec.parts, index=spec.part or 0)
    files = LocalFiles(policy.allowed_roots, policy.max_bytes)
    column = spec.column or "image"
    for n, row in enumerate(ds):
        cell = row.pop(column)
        path = cell.get("path") if isinstance(cell, dict) else None
        key = os.path.relpath(path, spec.ref) if path and os.path.isabs(spec.ref) else f"{spec.part or 0}.{n}"
        if isinstance(cell, dict) and cell.get("bytes") is None and path:
            cell = _read(files, path)
        yield key, row, cell


def _read(files: LocalFiles, path: str) -> bytes | ItemError:
    try:
        return files.read(path)
    except ItemError as exc:
        return exc
