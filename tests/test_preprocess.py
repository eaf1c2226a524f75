"""model/preprocess.py gives the same pixel values as transformers' CLIP processor, bit for bit, on every shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocess import ClipPreprocess
from training.tiny import build_git_processor


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(7)

    def noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
        bands = len(mode) if mode != "P" else 1
        return Image.fromarray(rng.integers(0, 256, (h, w, bands) if bands > 1 else (h, w), dtype=np.uint8), mode)

    images = [noise(1024, 768), noise(640, 961), noise(225, 224), noise(224, 224), noise(31, 500), noise(20, 7)]
    images += [noise(300, 200, "RGBA"), noise(150, 99, "L"), noise(99, 150, "LA")]
    keyed = noise(120, 80)
    keyed.info["transparency"] = (0, 0, 0)  # an RGB PNG with a transparent colour
    palette = noise(64, 90, "P")
    palette.info["transparency"] = 3
    return [*images, keyed, palette]


@pytest.mark.parametrize("size", [32, 224])
def test_same_pixel_values_as_the_transformers_processor(size: int) -> None:
    processor = build_git_processor(size).image_processor
    fast = ClipPreprocess.matching(processor)
    assert fast is not None
    for image in _images():
        expected = torch.as_tensor(processor(images=[image], return_tensors="pt")["pixel_values"])[0]
        got = torch.from_numpy(fast(image))
        assert got.dtype == expected.dtype == torch.float32
        assert torch.equal(got, expected), f"{image.mode} {image.size}: max diff {(got - expected).abs().max()}"


def test_processors_it_does_not_reproduce_are_left_alone() -> None:
    processor = build_git_processor(32).image_processor
    assert ClipPreprocess.matching(processor) is not None
    for change in (
        {"do_center_crop": False},
        {"do_normalize": False},
        {"size": {"height": 32, "width": 32}},
        {"do_pad": True},
    ):
        other = build_git_processor(32).image_processor
        for key, value in change.items():
            setattr(other, key, value)
        assert ClipPreprocess.matching(other) is None, change
