"""Scores of generated captions: the one evaluation path, used inside the training loop and by the evaluate job.

Captions are generated greedily through the caption engine, as caption workers run them (not teacher-forced
argmax, the seed recipe's flaw), and scored with ``training.scores.caption_metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from common.errors import SourceError
from common.messages import GenParams
from media.images import ImagePolicy
from model.engine import CaptionEngine, EngineConfig
from model.families import FamilyEngine, load_engine
from training.data import Example
from training.pixels import Item, PixelSource, local_image_policy
from training.scores import caption_metrics

#: Captions shown with each evaluation.
SAMPLE_COUNT = 4


def evaluate_items(
    engine: CaptionEngine | FamilyEngine,
    pixels: PixelSource,
    items: list[Item],
    *,
    max_length: int,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> tuple[dict[str, float], list[dict[str, Any]], int]:
    """Metrics of generated captions on ``items``, a few samples, and how many items were scored (readable)."""
    was_training = engine.model.training
    engine.model.eval()
    params = GenParams(max_length=max_length)
    predictions: list[str] = []
    scored: list[Item] = []
    for start in range(0, len(items), batch_size):
        try:
            pixel_values, kept = pixels.pixels(items[start : start + batch_size])
        except SourceError:  # not one image of this batch could be read: they count as failed, the rest is scored
            continue
        with autocast():
            predictions.extend(engine.generate(pixel_values, params))
        scored.extend(kept)
    engine.model.train(was_training)
    samples = [
        {"image": item.image, "prediction": pred, "references": item.captions[:3]}
        for item, pred in zip(scored[:SAMPLE_COUNT], predictions, strict=False)
    ]
    return caption_metrics(predictions, [item.captions for item in scored]), samples, len(scored)


def evaluate_model(
    model_dir: Path,
    examples: list[Example],
    *,
    max_length: int = 50,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    image_policy: ImagePolicy | None = None,
) -> dict[str, Any]:
    """Generated-caption metrics of a saved model on ``examples`` (the evaluate job).

    Returns the metrics of ``caption_metrics``, ``n`` (images scored), ``samples`` (a few predictions with
    their references) and ``info`` (``failed`` unreadable images, ``seconds``, the model ``version``).
    """
    started = time.perf_counter()
    # Whatever family the version is, loaded as a caption worker loads it.
    engine = load_engine(EngineConfig(model=str(model_dir), device=device, dtype=dtype))
    # No cache: each image is read once anyway, and batch by batch keeps memory flat on large eval sets.
    pixels = PixelSource(engine, image_policy or local_image_policy(examples), threads=4, cache_mb=0)
    items = pixels.admit(examples, "eval")
    metrics, samples, n = evaluate_items(engine, pixels, items, max_length=max_length, batch_size=batch_size)
    report: dict[str, Any] = {**metrics, "n": n}
    # Everything else that is a number lives under "info", so the top level is metrics + n only.
    report["info"] = {
        "failed": len(items) - n,
        "seconds": round(time.perf_counter() - started, 3),
        "version": engine.version,
    }
    report["samples"] = samples
    return report
