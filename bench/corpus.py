"""The benchmark's inputs: real JPEGs at mixed resolutions, and the random GIT checkpoints they are captioned with."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

#: Longest side of the generated JPEGs, cycled: thumbnails to camera-sized, so decode and resize cost vary.
SIZES = (64, 160, 256, 384, 512, 768, 1024)
#: Width/height ratios, cycled with the sizes (landscape, square, portrait).
ASPECTS = (4 / 3, 1.0, 3 / 4, 16 / 9, 2 / 3)
#: scikit-image's bundled photos that need no download (RGB, or grey converted to RGB).
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "moon",
    "clock",
    "grass",
    "gravel",
    "brick",
)
MODELS = ("tiny", "git-base")


def _photos(n: int) -> list[Image.Image]:
    """Up to ``n`` of scikit-image's sample photos when it is importable (it is no dependency), else none."""
    try:
        import skimage.data as data
    except ImportError:
        return []
    out: list[Image.Image] = []
    for name in PHOTOS:
        if len(out) >= n:
            break
        try:
            out.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
        except Exception:  # a photo that needs a download or moved: the others are enough
            continue
    return out


def _shapes(tmp: Path, n: int) -> list[Image.Image]:
    """Fallback sources: the synthetic coloured shapes, drawn large so every target size is a downscale."""
    from training.synthetic import make_shapes

    rows = make_shapes(tmp, n, seed=7, size=1024, fmt="png")
    return [Image.open(path).convert("RGB") for path, _ in rows]


def _fit(image: Image.Image, long_side: int, aspect: float, rng: random.Random) -> Image.Image:
    """A random crop of ``image`` with the given aspect ratio, resized so its longer side is ``long_side``."""
    w, h = image.size
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    cw, ch = min(cw, w), min(ch, h)
    scale = rng.uniform(0.6, 1.0)  # crop a random part, so repeated photos still differ
    cw, ch = max(8, round(cw * scale)), max(8, round(ch * scale))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = image.crop((x, y, x + cw, y + ch))
    if aspect >= 1:
        size = (long_side, max(8, round(long_side / aspect)))
    else:
        size = (max(8, round(long_side * aspect)), long_side)
    return crop.resize(size, Image.Resampling.BICUBIC)


def make_images(out_dir: Path, n: int, *, seed: int = 0) -> tuple[list[Path], str]:
    """Write ``n`` JPEGs of mixed sizes (64..1024 px) to ``out_dir``; returns their paths and where they came from."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources, origin = _photos(n), "scikit-image sample photos"
    if not sources:
        scratch = out_dir / ".shapes"
        sources, origin = _shapes(scratch, 12), "synthetic shapes (training.synthetic)"
        shutil.rmtree(scratch, ignore_errors=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        image = _fit(sources[i % len(sources)], SIZES[i % len(SIZES)], ASPECTS[i % len(ASPECTS)], rng)
        path = out_dir / f"img-{i:05d}.jpg"
        image.save(path, format="JPEG", quality=90)
        paths.append(path.resolve())
    return paths, origin


def build_model(kind: str, out_dir: Path) -> Path:
    """A random GIT of ``kind`` (tiny, or git-base-shaped: 176.6M parameters) saved like a hub model, or reused."""
    from training.tiny import build_random_git, build_tiny_git, git_base_config

    if (out_dir / "model.safetensors").is_file():
        return out_dir
    if kind == "tiny":
        return build_tiny_git(out_dir, seed=0)
    if kind == "git-base":
        return build_random_git(out_dir, git_base_config(), seed=0)
    raise ValueError(f"unknown model {kind!r}: use one of {', '.join(MODELS)}")


def caption_tokens(tokenizer: Any, captions: list[str]) -> float:
    """Mean caption length in tokens (re-tokenized text, no special tokens): the work each path really did."""
    if not captions:
        return 0.0
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    return sum(len(x) for x in ids) / len(captions)
