"""Deterministic synthetic captioned images (coloured shapes on plain backgrounds) in imagefolder layout."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

#: Every word here is a whole word of the bert-base-uncased vocab, so captions never tokenize to [UNK].
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (130, 40, 170),
    "pink": (245, 130, 190),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
#: Position -> (phrase in the caption, centre as fractions of the image size).
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "left": ("on the left of", (0.27, 0.5)),
    "right": ("on the right of", (0.73, 0.5)),
    "top": ("at the top of", (0.5, 0.27)),
    "bottom": ("at the bottom of", (0.5, 0.73)),
    "center": ("in the center of", (0.5, 0.5)),
}
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "yellow", "blue")


def vocabulary() -> list[str]:
    """Every word a caption of ``caption_for`` can hold, each once (for a tokenizer of these words only)."""
    words: list[str] = []
    for shape in SHAPES:
        for colour in COLOURS:
            for position in POSITIONS:
                words += caption_for(shape, colour, position, "white").split()
    words += [*BACKGROUNDS, "a", "an"]
    return list(dict.fromkeys(words))


def caption_for(shape: str, colour: str, position: str, background: str) -> str:
    """The template caption, e.g. ``a red circle on the left of a white background``."""
    where = POSITIONS[position][0]
    return f"{_article(colour)} {colour} {shape} {where} {_article(background)} {background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        t = r * 0.35
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(
    shape: str,
    colour: str,
    position: str,
    background: str,
    *,
    size: int = 64,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> Image.Image:
    """One RGB image of ``shape`` in ``colour`` at ``position`` on ``background``; ``jitter`` moves and scales it."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[position][1]
    # Small random shifts and scales vary the pixels without making the caption wrong.
    cx = (fx + rng.uniform(-jitter, jitter)) * size
    cy = (fy + rng.uniform(-jitter, jitter)) * size
    r = size * 0.17 * (1 + rng.uniform(-jitter, jitter) * 2)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return image


def make_shapes(out_dir: Path, n: int, *, seed: int = 0, size: int = 64, fmt: str = "png") -> list[tuple[Path, str]]:
    """Write ``n`` captioned shape images and an imagefolder ``metadata.jsonl``; the same seed gives the same files."""
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"fmt must be 'png' or 'jpeg', not {fmt!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    suffix = ".png" if fmt == "png" else ".jpg"
    rows: list[tuple[Path, str]] = []
    with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(n):
            shape = rng.choice(SHAPES)
            position = rng.choice(tuple(POSITIONS))
            background = rng.choice(BACKGROUNDS)
            # The shape's colour always differs from the background, or the image would contradict its caption.
            colour = rng.choice([c for c in COLOURS if c != background])
            image = draw_shape(shape, colour, position, background, size=size, jitter=0.04, rng=rng)
            path = out_dir / f"{i:06d}{suffix}"
            if fmt == "png":
                image.save(path, format="PNG", compress_level=1)
            else:
                image.save(path, format="JPEG", quality=90)
            text = caption_for(shape, colour, position, background)
            meta.write(json.dumps({"file_name": path.name, "text": text}) + "\n")
            rows.append((path, text))
    return rows
