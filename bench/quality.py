"""What a speed profile costs in caption quality: held-out WER of the fine-tuned demo model, per profile and dtype.

The demo model (`captioner demo`'s small GIT, trained on synthetic shapes) is trained once in the bench's work
directory, in process, with the demo's own recipe; later runs reuse it. Held-out images are drawn by the same
generator with another seed, at twice the model's input size and saved as JPEG, so JPEG draft decoding has
something to skip. Every variant captions the same images; each is scored with
``training.scores.caption_metrics`` (WER, the real criterion) and compared caption by caption with ``exact``
in the same dtype.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

#: Held-out images are drawn at this many times the model's 48-pixel input, so draft decoding can act (1/2 scale).
HELD_OUT_SCALE = 2
TRAIN_IMAGES, TRAIN_STEPS = 2000, 2000


@dataclass(frozen=True)
class Variant:
    """One way of captioning: a dtype, a profile and piece adjustments (model/profiles.py)."""

    name: str
    dtype: str
    profile: str = "exact"
    pieces: str = ""


def variants(dtype: str, pieces: tuple[str, ...], fast_pieces: str = "") -> list[Variant]:
    """exact and fast in ``dtype``, exact in float32 (the dtype's own cost), and each piece alone on exact."""
    out = [
        Variant("exact", dtype),
        Variant("fast" + (f" {fast_pieces}" if fast_pieces else ""), dtype, "fast", fast_pieces),
    ]
    if dtype != "float32":
        out.append(Variant("exact float32", "float32"))
    out += [Variant(f"+{p} alone", dtype, "exact", f"+{p}") for p in pieces]
    return out


def demo_model(work: Path, *, steps: int = TRAIN_STEPS, train_images: int = TRAIN_IMAGES) -> Path:
    """The fine-tuned demo model in ``work`` (trained there the first time, with `captioner demo`'s recipe)."""
    from cli.demo import DEMO_TRAINING, IMAGE_SIZE, _demo_model
    from training.config import TrainConfig
    from training.data import load_examples
    from training.finetune import train
    from training.synthetic import make_shapes

    final = work / "trained" / "final"
    if (final / "model.safetensors").is_file():
        return final
    make_shapes(work / "train", train_images, seed=1, size=IMAGE_SIZE)
    make_shapes(work / "eval", 60, seed=3, size=IMAGE_SIZE)
    base = _demo_model(work / "base")
    every = max(25, (steps // 4) // 25 * 25)
    cfg = TrainConfig(
        **{**DEMO_TRAINING, "base_model": str(base), "max_steps": steps, "eval_steps": every, "save_steps": every}
    )
    result = train(cfg, load_examples(str(work / "train")), load_examples(str(work / "eval")), work / "trained")
    if result.final_dir is None:
        raise RuntimeError(f"training the demo model ended {result.status}; see {work / 'trained'}")
    return Path(result.final_dir)


def held_out(work: Path, n: int) -> list[tuple[Path, str]]:
    """``n`` held-out JPEGs (seed 2, the demo's held-out seed) with their reference captions."""
    from cli.demo import IMAGE_SIZE
    from training.synthetic import make_shapes

    folder = work / f"held-out-{n}"
    index = folder / "refs.json"
    if index.is_file():
        return [(Path(p), c) for p, c in json.loads(index.read_text(encoding="utf-8"))]
    rows = make_shapes(folder, n, seed=2, size=IMAGE_SIZE * HELD_OUT_SCALE, fmt="jpeg")
    index.write_text(json.dumps([[str(p), c] for p, c in rows]), encoding="utf-8")
    return rows


def score(
    model_dir: Path, images: list[tuple[Path, str]], variant: Variant, *, batch: int = 32, max_length: int = 20
) -> dict[str, Any]:
    """Caption ``images`` with ``variant`` in process; WER and friends, images/s, the pieces that really ran."""
    from common.messages import GenParams, Source
    from common.settings import Settings
    from media.images import ImagePolicy, load_image
    from model.engine import CaptionEngine, EngineConfig
    from training.scores import caption_metrics

    engine = CaptionEngine.load(
        EngineConfig(model=str(model_dir), dtype=variant.dtype, profile=variant.profile, pieces=variant.pieces)
    )
    params = GenParams(max_length=max_length)
    warm_s = engine.warm_up(batch, params)
    draft = engine.input_edge if "draft" in engine.pieces else 0
    policy = replace(ImagePolicy.from_settings(Settings(allowed_roots=[images[0][0].parent])), draft_edge=draft)
    captions: list[str] = []
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        chunk = [load_image(Source(path=str(p)), policy) for p, _ in images[i : i + batch]]
        captions += engine.caption(chunk, params)
    seconds = time.perf_counter() - started
    metrics = caption_metrics(captions, [[c] for _, c in images])
    return {
        "variant": variant.name,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "profile": engine.profile,
        "fallbacks": dict(engine.pieces.fallbacks),
        "images": len(images),
        **{k: round(v, 4) for k, v in metrics.items()},
        "images_per_s": round(len(images) / seconds, 1),
        "warm_up_s": round(warm_s, 1),
        "captions": captions,
    }


def measure_quality(
    work: Path, *, images: int, dtype: str, pieces: tuple[str, ...], say: Any, fast_pieces: str = ""
) -> dict[str, Any]:
    """Every variant on the same held-out images; agreement with exact in the same dtype, WER beside exact's."""
    say(f"quality: the fine-tuned demo model in {work} (trained there once), {images} held-out images")
    model_dir = demo_model(work)
    rows = held_out(work, images)
    results: list[dict[str, Any]] = []
    for variant in variants(dtype, pieces, fast_pieces):
        say(f"quality: {variant.name} ({variant.dtype}, profile {variant.profile} {variant.pieces})".replace(" )", ")"))
        results.append(score(model_dir, rows, variant))
    ref = results[0]  # exact in the asked dtype: every other variant (float32 included) is compared with it
    for r in results:
        same = sum(a == b for a, b in zip(ref["captions"], r["captions"], strict=True))
        r["agree_with_exact"] = f"{same}/{len(rows)}"
        r["wer_minus_exact"] = round(r["wer"] - ref["wer"], 4)
    for r in results:
        r["captions_sample"] = r.pop("captions")[:3]
    return {"model": str(model_dir), "images": len(rows), "scale": HELD_OUT_SCALE, "variants": results}
