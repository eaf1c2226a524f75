"""Thumbnails made on the fly from an item's source under the workers' image policy, kept in a bounded LRU.

The browser names a job and an item id, never a path or URL: the reference comes from the ledger, and it is read
exactly as a caption worker would read it (allowed roots, SSRF guard, byte and pixel caps, formats).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import threading
from typing import NamedTuple

from cachetools import LRUCache

from common.errors import ItemError
from common.messages import Source
from common.settings import Settings

#: Longest side of a thumbnail in the grid, in the item view, and at full resolution on demand (capped: the
#: image policy's pixel cap bounds the decode; this bounds what is sent); nothing else is made.
SIZES = {"s": 256, "l": 768, "f": 4096}
JPEG_QUALITY = 82
#: Images decoded at once: a page of 50 thumbnails must not decode 50 large photos side by side.
PARALLEL_DECODES = 4


class Thumb(NamedTuple):
    """A JPEG, or the reason there is none (error class and message)."""

    data: bytes
    error: str | None = None


class Thumbnails:
    """Makes and caches thumbnails; the cache holds at most ``max_bytes`` of them (failures cost their message)."""

    def __init__(self, settings: Settings, max_bytes: int) -> None:
        from media.images import ImagePolicy  # the image stack is imported by the page only, never by the CLI

        self.policy = ImagePolicy.from_settings(settings)
        self._cache: LRUCache[tuple[str, str, str], Thumb] = LRUCache(
            maxsize=max(max_bytes, 1), getsizeof=lambda t: len(t.data) + len(t.error or "") + 64
        )
        self._lock = threading.Lock()
        self._decodes = threading.BoundedSemaphore(PARALLEL_DECODES)
        self.max_bytes = max_bytes

    @property
    def cached_bytes(self) -> int:
        return int(self._cache.currsize)

    def get(self, job_id: str, item_id: str, ref: str, size: str) -> Thumb:
        """The item's thumbnail at ``size`` ("s" or "l"), from the cache or made now (blocking: call it in a thread)."""
        key = (job_id, item_id, size)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        thumb = self._make(ref, SIZES[size])
        if self.max_bytes:
            # A thumbnail larger than the whole cache is served, not kept.
            with self._lock, contextlib.suppress(ValueError):
                self._cache[key] = thumb
        return thumb

    def _make(self, ref: str, edge: int) -> Thumb:
        from media.images import load_image

        if ref.startswith("b64:"):
            return Thumb(b"", "inline image: its bytes were never kept")
        # JPEGs decode at the smallest DCT scale that still covers the thumbnail: a fraction of a full decode.
        policy = dataclasses.replace(self.policy, draft_edge=edge)
        try:
            with self._decodes:
                image = load_image(Source.parse(ref), policy)
                image.thumbnail((edge, edge))
                out = io.BytesIO()
                image.save(out, "JPEG", quality=JPEG_QUALITY)
        except ItemError as exc:
            return Thumb(b"", f"{exc.code}: {exc}")
        return Thumb(out.getvalue())
