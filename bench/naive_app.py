"""Path (c), the baseline a newcomer writes: one Celery task per image, fp32, batch 1, ``model.generate``.

Its own tiny Celery app, JSON only, run as a solo-pool worker: ``celery -A bench.naive_app worker --pool=solo``.
The broker and result backend come from Celery's own ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND``. The
model is loaded on the first task (the benchmark sends one warm-up task before timing), never at import.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery

TASK = "bench.naive.caption"

_models: dict[str, tuple[Any, Any]] = {}
_lock = threading.Lock()


def create_app(broker: str | None = None, backend: str | None = None) -> Celery:
    """The naive app; with no URLs Celery reads them from its environment variables (the worker's case)."""
    app = Celery("bench_naive", broker=broker, backend=backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return app


app = create_app()


def _load(model: str) -> tuple[Any, Any]:
    """Processor and fp32 model, loaded once per process (what the newcomer's module-level load amounts to)."""
    with _lock:
        if model not in _models:
            import torch
            from transformers import AutoModelForCausalLM, AutoProcessor

            processor = AutoProcessor.from_pretrained(model)
            net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
            net.eval()
            _models[model] = (processor, net)
    return _models[model]


@app.task(name=TASK)
def caption(path: str, model: str, max_length: int = 50) -> dict[str, Any]:
    """One image file in, its caption out (plus its token count and stage timings, for the benchmark)."""
    from PIL import Image

    processor, net = _load(model)
    t0 = time.perf_counter()
    image = Image.open(path).convert("RGB")
    t1 = time.perf_counter()
    pixel_values = processor(images=image, return_tensors="pt").pixel_values
    t2 = time.perf_counter()
    ids = net.generate(pixel_values=pixel_values, max_length=max_length)
    t3 = time.perf_counter()
    text = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    ms = {"decode_ms": t1 - t0, "preprocess_ms": t2 - t1, "generate_ms": t3 - t2}
    timings = {k: round(v * 1000, 2) for k, v in ms.items()}
    return {"caption": text, "tokens": int(ids.shape[1]) - 1, "timings": timings}
