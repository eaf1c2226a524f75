"""Curation scores: CLIPScore equal to torchmetrics' on a tiny random CLIP; perceptual hashes that find resized,
re-encoded and cropped copies and keep different pictures apart; the band index finds every pair within reach."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.curation import ClipScorer, bands, hamming, phash
from training.tiny_clip import build_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def _pictures(n: int, seed: int) -> list[Image.Image]:
    from training.synthetic import COLOURS, POSITIONS, SHAPES, draw_shape

    rng = random.Random(seed)
    return [
        draw_shape(
            rng.choice(SHAPES), rng.choice(list(COLOURS)[1:]), rng.choice(list(POSITIONS)), "white", size=48, rng=rng
        )
        for _ in range(n)
    ]


def test_clipscore_equals_torchmetrics(tiny_clip: Path) -> None:
    from torchmetrics.functional.multimodal import clip_score

    scorer = ClipScorer.load(tiny_clip)

    class ReturnsTensors(torch.nn.Module):
        """transformers 5 returns embeddings as ``pooler_output``; torchmetrics 1.9 expects the tensor itself."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.config = model, model.config

        def get_image_features(self, *args: object, **kwargs: object) -> torch.Tensor:
            return self.inner.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args: object, **kwargs: object) -> torch.Tensor:
            return self.inner.get_text_features(*args, **kwargs).pooler_output

    images = _pictures(4, seed=1)
    captions = [
        ["a red circle on a white background", "a blue square"],
        ["a green triangle"],
        ["x"],
        ["a yellow star " * 40],
    ]
    ours = scorer.scores(images, captions)
    reference = ReturnsTensors(scorer.model)
    for image, cands, got in zip(images, captions, ours, strict=True):
        pixels = torch.from_numpy(__import__("numpy").asarray(image)).permute(2, 0, 1)
        for caption, score in zip(cands, got, strict=True):
            want = float(clip_score(pixels, caption, model_name_or_path=lambda: (reference, scorer.processor)))
            assert score == pytest.approx(want, abs=1e-4), (caption, score, want)
    assert any(s > 0 for row in ours for s in row)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_phash_finds_copies_and_keeps_different_pictures_apart() -> None:
    from skimage import data  # real photographs shipped with scikit-image

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]
    for photo in photos:
        w, h = photo.size
        copies = [
            photo.resize((w // 2, h // 2)),
            _jpeg(photo, 40),
            photo.crop((w // 40, h // 40, w - w // 40, h - h // 40)),
        ]
        for copy in copies:
            assert hamming(phash(photo), phash(copy)) <= 12  # the default phash distance
    for i, a in enumerate(photos):
        for b in photos[i + 1 :]:
            assert hamming(phash(a), phash(b)) > 16


def test_bands_find_every_pair_within_the_distance() -> None:
    rng = random.Random(0)
    for distance in (0, 3, 8, 12):
        for _ in range(300):
            a = rng.getrandbits(64)
            flips = rng.sample(range(64), rng.randint(0, distance))
            b = a
            for bit in flips:
                b ^= 1 << bit
            assert any(x == y for x, y in zip(bands(a, distance), bands(b, distance), strict=True))
