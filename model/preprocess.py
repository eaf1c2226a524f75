"""CLIP image preprocessing for GIT, the same numbers as transformers' PIL processor with less work per image.

transformers' PIL backend turns each image into a NumPy array, back into a PIL image to resize it, into an array
again, and normalises in several passes. Here the RGB image is resized once by PIL with the same filter and size,
cropped by slicing, and rescaled and normalised with the same NumPy operations in the same order and dtypes, so
the pixel values are bit for bit the processor's (tests/test_engine.py compares them). Processors this does not
cover (another backend, padding, a fixed resize) are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ClipPreprocess:
    """Resize (shortest edge), centre crop, rescale, normalise: one RGB PIL image in, a CHW float32 array out."""

    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    resample: int
    rescale: float
    mean: np.ndarray  # float32, shape (3,)
    std: np.ndarray

    @classmethod
    def matching(cls, image_processor: Any) -> ClipPreprocess | None:
        """The preprocessing ``image_processor`` does, when it is one this reproduces exactly; else None."""
        p = image_processor
        size = getattr(p, "size", None) or {}
        crop = getattr(p, "crop_size", None) or {}
        size = dict(size) if not isinstance(size, dict) else size
        crop = dict(crop) if not isinstance(crop, dict) else crop
        if getattr(p, "backend", None) != "pil":
            return None  # torchvision's resize antialiases differently: its numbers are its own
        if not (p.do_resize and p.do_center_crop and p.do_rescale and p.do_normalize) or getattr(p, "do_pad", False):
            return None
        if set(k for k, v in size.items() if v) != {"shortest_edge"} or not (crop.get("height") and crop.get("width")):
            return None
        resample = int(p.resample) if p.resample is not None else int(Image.Resampling.BILINEAR)
        mean, std = np.asarray(p.image_mean, dtype=np.float32), np.asarray(p.image_std, dtype=np.float32)
        if mean.shape != (3,) or std.shape != (3,):
            return None
        return cls(
            int(size["shortest_edge"]),
            (int(crop["height"]), int(crop["width"])),
            resample,
            float(p.rescale_factor),
            mean,
            std,
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = _rgb(image)
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)  # transformers' rounding (get_resize_output_image_size)
        new_w, new_h = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample=self.resample, reducing_gap=None)
        pixels = _center_crop(np.asarray(image), *self.crop)
        # Same operations, order and dtypes as transformers' rescale (float64 product, then float32) and
        # normalize (float32 mean and std): the results are identical, not merely close.
        scaled = (pixels.astype(np.float64) * self.rescale).astype(np.float32)
        return ((scaled - self.mean) / self.std).transpose(2, 0, 1)


def _rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparency composited on white; an RGB image without it is used as is."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' center_crop on an HWC array: the same offsets, and zero padding when the image is smaller."""
    height, width = pixels.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    top_pad, left_pad = -(-(new_h - height) // 2), -(-(new_w - width) // 2)  # ceil, as transformers does
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]
