"""Scores for choosing which captions to keep and which images to caption at all: CLIPScore (how well a caption
matches its image, reference-free), CLIP image embeddings and perceptual hashes for near-duplicates.

CLIPScore is torchmetrics' definition: ``100 * max(cos(E_image, E_caption), 0)`` with the CLIP model's projected,
L2-normalised embeddings (Hessel et al. 2021 scale the same cosine by 2.5 instead of 100). Captions longer than the
text tower's positions are cut to them, as torchmetrics does. Checkpoints load as safetensors, no remote code.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError, EngineError

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: Bits of a perceptual hash (imagehash's phash with its default 8x8 size).
PHASH_BITS = 64


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns the projected embedding as ``pooler_output``; 4.x returned the tensor itself."""
    return output if not hasattr(output, "pooler_output") else output.pooler_output


@dataclass
class ClipScorer:
    """A CLIP model held once per process: CLIPScore of (image, caption) pairs and image embeddings, batched."""

    model: Any
    processor: Any
    device: str = "cpu"

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str = "float32") -> ClipScorer:
        """A CLIP checkpoint from a directory (a model store version) or a hub id; ConfigError if it is not one."""
        import torch
        from transformers import AutoConfig, CLIPModel, CLIPProcessor

        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read a CLIP checkpoint at {path}: {exc}") from None
        if config.model_type != "clip":
            raise ConfigError(f"{path} is a {config.model_type!r} checkpoint; CLIPScore needs a 'clip' one")
        model = CLIPModel.from_pretrained(str(path), use_safetensors=True, dtype=getattr(torch, dtype))
        processor = CLIPProcessor.from_pretrained(str(path))
        return cls(model.to(device).eval(), processor, device)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # one forward at a time: the worker's threads share the model

    def _max_positions(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised projected image embeddings, one row per image."""
        import torch

        with self._lock, torch.inference_mode():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            out = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
            return (out / out.norm(p=2, dim=-1, keepdim=True)).float().cpu()

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected caption embeddings, one row per caption (cut to the text tower's positions)."""
        import torch

        with self._lock, torch.inference_mode():
            enc = self.processor(text=list(texts), return_tensors="pt", padding=True)
            n = self._max_positions()
            ids, mask = enc["input_ids"][..., :n], enc["attention_mask"][..., :n]
            out = _features(
                self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            )
            return (out / out.norm(p=2, dim=-1, keepdim=True)).float().cpu()

    def scores(self, images: Sequence[Image.Image], captions: Sequence[Sequence[str]]) -> list[list[float]]:
        """CLIPScore of every candidate caption of every image: ``captions[i]`` are image i's candidates (one for
        a plain job, N for best of N). Same lengths out as in, checked."""
        if len(images) != len(captions):
            raise EngineError(f"{len(images)} images but {len(captions)} caption lists")
        if not images:
            return []
        image_emb = self.image_embeddings(images)
        flat = [c for cands in captions for c in cands]
        text_emb = self.text_embeddings(flat) if flat else image_emb[:0]
        out: list[list[float]] = []
        at = 0
        for i, cands in enumerate(captions):
            cos = text_emb[at : at + len(cands)] @ image_emb[i]
            out.append([max(100.0 * float(c), 0.0) for c in cos])
            at += len(cands)
        if [len(o) for o in out] != [len(c) for c in captions]:
            raise EngineError("CLIPScore returned a different number of scores than captions")
        return out


def phash(image: Image.Image) -> int:
    """The image's 64-bit perceptual hash (imagehash's DCT hash): resizes, re-encodings and small crops land a few
    bits apart, different pictures about half the bits apart."""
    import imagehash

    bits = imagehash.phash(image).hash.flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def bands(value: int, max_distance: int, bits: int = PHASH_BITS) -> list[int]:
    """The hash cut into ``max_distance + 1`` bands: two hashes at most ``max_distance`` bits apart agree exactly on
    at least one band (pigeonhole), so an index of bands finds every candidate with exact look-ups."""
    n = max_distance + 1
    if not 1 <= n <= bits:
        raise ConfigError(f"a near-duplicate distance must be between 0 and {bits - 1} bits")
    out = []
    start = 0
    for i in range(n):
        width = bits // n + (1 if i < bits % n else 0)
        out.append((value >> (bits - start - width)) & ((1 << width) - 1))
        start += width
    return out
