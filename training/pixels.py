"""Pixel values for training and evaluation: images read under the workers' image policy, preprocessed as the
caption engine does, cached in memory when the dataset fits; unreadable images are left out with a warning.

For GIT a cached row is its pixel values; for another family it is the decoded RGB image (its processor makes
pixels together with the prompt, per batch), and a batch is a list of images."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from common.errors import ItemError, SourceError
from common.messages import Source
from common.settings import Settings, get_settings
from media.images import ImagePolicy, load_image
from model.engine import CaptionEngine
from model.families import FamilyEngine
from training.data import Example

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One training or evaluation image: its index in the run (seeds its caption draw), reference, captions."""

    index: int
    image: str
    captions: list[str]


def local_image_policy(examples: list[Example], settings: Settings | None = None) -> ImagePolicy:
    """The workers' image policy (formats, byte and pixel caps, URL rules: all from the settings), reading local
    files only in the dataset's own folders, whatever CAPTIONER_ALLOWED_ROOTS says: the dataset was named by whoever
    submitted the job, as a caption job's images are."""
    # Real paths: a dataset may link its files elsewhere (the HF cache does), and reads check the link's target.
    local = [ex.image for ex in examples if not ex.image.startswith(("http:", "https:"))]
    parents = sorted({os.path.dirname(os.path.realpath(image)) for image in local})
    roots: list[Path] = []
    for parent in parents:
        # Sorted order puts a folder before its subfolders, so each root is kept once.
        if not roots or not Path(parent).is_relative_to(roots[-1]):
            roots.append(Path(parent))
    return replace(ImagePolicy.from_settings(settings or get_settings()), allowed_roots=tuple(roots))


def image_source(image: str) -> Source:
    return Source(url=image) if image.startswith(("http:", "https:")) else Source(path=image)


class PixelSource:
    """Pixel values per example: decoded once and kept when the dataset fits the cache budget, else per batch."""

    def __init__(
        self, engine: CaptionEngine | FamilyEngine, policy: ImagePolicy, *, threads: int, cache_mb: int
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.threads = threads
        self.images = isinstance(engine, FamilyEngine)
        if self.images:  # decoded images, estimated at the size the processor resizes to
            self.bytes_per_image = 3 * 4 * engine.input_edge**2
        else:
            size = engine.model.config.vision_config.image_size
            self.bytes_per_image = 3 * size * size * 4
        self.budget = cache_mb * 1024 * 1024
        self.cache: dict[str, Any] = {}
        self.next_index = 0

    def admit(self, examples: list[Example], what: str) -> list[Item]:
        """Items for ``examples``; with the cache on, every image is read now and unreadable ones are dropped."""
        items = [Item(self.next_index + i, ex.image, list(ex.captions)) for i, ex in enumerate(examples)]
        self.next_index += len(items)
        if (len(self.cache) + len(items)) * self.bytes_per_image > self.budget:
            return items
        loaded = self._load([item.image for item in items])
        kept = []
        for item, tensor in zip(items, loaded, strict=True):
            if tensor is not None:
                self.cache[item.image] = tensor
                kept.append(item)
        if len(kept) < len(items):
            skipped = len(items) - len(kept)
            log.warning("%s: %d of %d images could not be read and are skipped", what, skipped, len(items))
        return kept

    def pixels(self, batch: list[Item]) -> tuple[Any, list[Item]]:
        """Stacked pixel values and the items they belong to: an uncached image that fails now is left out."""
        missing = [item.image for item in batch if item.image not in self.cache]
        fresh = dict(zip(missing, self._load(missing), strict=True)) if missing else {}
        rows = [(item, self.cache.get(item.image, fresh.get(item.image))) for item in batch]
        kept = [(item, row) for item, row in rows if row is not None]
        if not kept:
            raise SourceError(f"none of {len(batch)} images in a batch could be read, e.g. {batch[0].image}")
        if self.images:
            return [row for _, row in kept], [item for item, _ in kept]
        return torch.stack([row for _, row in kept]), [item for item, _ in kept]

    def _load(self, images: list[str]) -> list[Any]:
        def one(image: str) -> Any:
            try:
                image_rgb = load_image(image_source(image), self.policy)
            except ItemError as exc:
                log.warning("image %s skipped: %s: %s", image, exc.code, exc)
                return None
            # The caption engine's own preprocessing (bit for bit the processor's), so training sees what serving sees.
            return self.engine.prepare([image_rgb])[0]

        if len(images) <= 1 or self.threads == 1:
            return [one(image) for image in images]
        # A pool per call: thread start-up is noise next to decoding a batch, and nothing outlives the call.
        with ThreadPoolExecutor(min(self.threads, len(images)), thread_name_prefix="train-images") as pool:
            return list(pool.map(one, images))
