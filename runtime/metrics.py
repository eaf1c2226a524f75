"""Prometheus metrics of a worker: caption throughput, batch sizes, stage latency, errors, queue depth, model;
and, in their own section, the training job a training worker runs (step, loss, latest eval WER)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

IMAGES = Counter("captioner_images_total", "Images finished, by status (ok, error, cancelled).", ["status"])
ERRORS = Counter("captioner_errors_total", "Images that failed, by error class.", ["error_class"])
RETRIES = Counter("captioner_retries_total", "Items sent again after a transient failure.")
BROKER_DROPPED = Counter(
    "captioner_broker_messages_dropped_total", "Broker messages dropped because their envelope does not decode."
)
BATCH_SIZE = Histogram(
    "captioner_batch_size", "Images per model batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
STAGE = Histogram(
    "captioner_stage_seconds",
    "Seconds per stage: load (fetch+decode+preprocess, per image), infer (per batch), write (per chunk).",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_DEPTH = Gauge("captioner_queue_depth", "Messages waiting in a queue.", ["queue"])
MODEL = Info("captioner_model", "The model this worker serves.")
GPU_MEMORY = Gauge("captioner_gpu_memory_bytes", "CUDA memory of this worker.", ["kind"])
PROFILE = Info("captioner_speed_profile", "The speed pieces this worker's engine uses now (exact: none).")
WARM_UP = Gauge("captioner_warm_up_seconds", "Seconds the engine's start-up warm-up took (compiled pieces; 0: none).")


def observe_batch(size: int, seconds: float) -> None:
    BATCH_SIZE.observe(size)
    STAGE.labels("infer").observe(seconds)


def observe_rows(rows: Iterable[object]) -> None:
    for row in rows:
        status = getattr(row, "status", None)
        IMAGES.labels(getattr(status, "value", str(status))).inc()
        error_class = getattr(row, "error_class", None)
        if error_class and error_class != "cancelled":
            ERRORS.labels(error_class).inc()
        load_ms = getattr(row, "timings", {}).get("load_ms")
        if load_ms is not None:
            STAGE.labels("load").observe(load_ms / 1000)


def set_model(version: str, device: str, dtype: str, profile: str | None = None) -> None:
    """The served model; ``profile`` is the speed pieces in use ("exact", "fast:sdpa,compile")."""
    MODEL.info({"version": version, "device": device, "dtype": dtype})
    PROFILE.info({"profile": profile or "exact"})


_serving = threading.Lock()
_served: list[int] = []


def serve(port: int, addr: str, queue_depth: Callable[[], dict[str, int]], every_s: float = 5.0) -> bool:
    """Start the HTTP endpoint and a sampler for queue depth and GPU memory; False if the port is taken.

    Once per process: a worker consuming both the caption and the training queue serves one endpoint.
    """
    if not port:
        return False
    with _serving:
        if _served:
            return True
        try:
            start_http_server(port, addr=addr)
        except OSError as exc:  # a second worker on the host: it runs on, without an endpoint of its own
            log.warning("metrics endpoint not started on %s:%d: %s (set CAPTIONER_METRICS_PORT)", addr, port, exc)
            return False
        _served.append(port)
    threading.Thread(target=_sample, args=(queue_depth, every_s), name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return True


def _sample(queue_depth: Callable[[], dict[str, int]], every_s: float) -> None:
    stop = threading.Event()
    while not stop.wait(every_s):
        try:
            for queue, depth in queue_depth().items():
                QUEUE_DEPTH.labels(queue).set(depth)
            _sample_gpu()
        except Exception as exc:  # a Redis blip must not kill the sampler
            log.debug("metrics sample failed: %s", exc)


def _sample_gpu() -> None:
    import sys

    torch = sys.modules.get("torch")  # only when the engine already imported it
    if torch is not None and torch.cuda.is_available():
        GPU_MEMORY.labels("allocated").set(torch.cuda.memory_allocated())
        GPU_MEMORY.labels("reserved").set(torch.cuda.memory_reserved())


# --- training workers ---------------------------------------------------------------------------
# One training job at a time per training worker (one pool thread); its series carry the job id, and the previous
# job's series are dropped when the next one starts, so the label set stays small.

TRAIN_STEP = Gauge("captioner_train_step", "Optimizer steps done by the training job this worker runs.", ["job_id"])
TRAIN_TOTAL_STEPS = Gauge("captioner_train_total_steps", "Optimizer steps the training job will run.", ["job_id"])
TRAIN_LOSS = Gauge("captioner_train_loss", "Training loss, mean over the last log_steps steps.", ["job_id"])
TRAIN_EVAL_WER = Gauge("captioner_train_eval_wer", "WER of the latest evaluation (generated captions).", ["job_id"])
TRAIN_JOBS = Counter("captioner_train_jobs_total", "Training jobs ended on this worker, by outcome.", ["outcome"])
TRAIN_ORPHAN_SCANS = Counter("captioner_train_orphan_scans_total", "Scans for training jobs whose runner died.")
_TRAIN_GAUGES = (TRAIN_STEP, TRAIN_TOTAL_STEPS, TRAIN_LOSS, TRAIN_EVAL_WER)


def training_started(job_id: str) -> None:
    for gauge in _TRAIN_GAUGES:
        gauge.clear()
    TRAIN_STEP.labels(job_id).set(0)


def observe_training(job_id: str, progress: dict[str, Any]) -> None:
    """One progress record of training.finetune.train (values may be None before the first report)."""
    for gauge, value in (
        (TRAIN_STEP, progress.get("step")),
        (TRAIN_TOTAL_STEPS, progress.get("total_steps")),
        (TRAIN_LOSS, progress.get("loss")),
        (TRAIN_EVAL_WER, (progress.get("metrics") or {}).get("wer")),
    ):
        if isinstance(value, int | float):
            gauge.labels(job_id).set(value)


def training_ended(outcome: str) -> None:
    TRAIN_JOBS.labels(outcome).inc()
