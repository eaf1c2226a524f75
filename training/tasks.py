"""Thin Celery adapters for the training queue: fine-tune and evaluate. Acked when they start (see training.jobs)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import celeryd_after_setup, worker_shutting_down
from celery.worker.control import inspect_command

from common.errors import ConfigError
from common.messages import TASK_EVALUATE, TASK_TRAIN, EvaluateRequest, TrainRequest, parse_message
from common.settings import get_settings
from ledger import Ledger, TrainingRun, ledger_from_settings
from runtime import metrics
from runtime.celery_app import queue_depths
from runtime.logs import current_job
from runtime.queues import UNACKED_KEY, messages_naming
from training.celery_app import app
from training.jobs import (
    SHUTTING_DOWN,
    check_training_worker,
    orphaned_train_jobs,
    run_evaluate,
    run_train,
    worker_capabilities,
)

log = logging.getLogger(__name__)


def _ledger() -> Ledger:
    return ledger_from_settings(get_settings())


# acks_late=False: a fine-tune outlives any visibility timeout, so late acks would run it twice. The early ack
# needs a pool that keeps the consumer's loop running while the task does: the training worker runs one thread
# (`captioner worker --training`); under the solo pool the ack would wait for the task to return.
@app.task(name=TASK_TRAIN, acks_late=False)
def train(**payload: Any) -> dict:
    """Fine-tune a model on a dataset; progress, cancel and resume go through the ledger."""
    req = parse_message(TrainRequest, payload)
    token = current_job.set(req.job_id)  # type: ignore[attr-defined]
    try:
        return run_train(get_settings(), _ledger(), req)  # type: ignore[arg-type]
    finally:
        current_job.reset(token)


@app.task(name=TASK_EVALUATE, acks_late=False)
def evaluate(**payload: Any) -> dict:
    """Score a model version with generated captions (WER, CER, BLEU-4, ROUGE-L)."""
    req = parse_message(EvaluateRequest, payload)
    token = current_job.set(f"evaluate:{req.version}")  # type: ignore[attr-defined]
    try:
        return run_evaluate(get_settings(), req)  # type: ignore[arg-type]
    finally:
        current_job.reset(token)


@inspect_command()
def captioner_train_info(state: Any, **kwargs: Any) -> dict[str, Any]:
    """`celery inspect captioner_train_info`: the devices and optional packages of this training worker."""
    return worker_capabilities()


@celeryd_after_setup.connect
def _resume_orphans(sender: str, instance: Any, **kwargs: Any) -> None:
    """A training worker checks what it needs, picks up training jobs whose runner died, and serves its metrics."""
    s = get_settings()
    if s.training_queue not in set(instance.app.amqp.queues.consume_from or {}):
        return
    try:
        check_training_worker(s)
    except ConfigError as exc:
        # SystemExit, not an exception: Celery logs and swallows exceptions raised by signal handlers.
        log.critical("%s", exc)
        raise SystemExit(2) from None
    threading.Thread(target=_watch_orphans, name="train-orphans", daemon=True).start()
    metrics.serve(s.metrics_port, s.metrics_addr, _queue_depths)


@worker_shutting_down.connect
def _hand_back(**kwargs: Any) -> None:
    """Warm shutdown: a running fine-tune stops at its next step with a checkpoint, for the next worker."""
    SHUTTING_DOWN.set()


def _watch_orphans() -> None:
    """Now and every half lock-lifetime: a runner that died leaves its lock to lapse, then we resume it."""
    s = get_settings()
    while True:
        try:
            ledger = _ledger()
            for req in orphaned_train_jobs(ledger, grace_s=2 * s.train_lock_ttl_s, waiting=_waiting):
                log.info("resuming training job %s from its last checkpoint", req.job_id)
                ledger.update_training_run(req.job_id, TrainingRun(sent=time.time()))
                train.apply_async(kwargs=req.model_dump(), queue=s.training_queue)
        except Exception:
            log.exception("could not scan for orphaned training jobs")
        else:
            metrics.TRAIN_ORPHAN_SCANS.inc()
        time.sleep(s.train_lock_ttl_s / 2)


def _waiting(job_ids: list[str]) -> set[str]:
    """Job ids with a train message still queued or reserved by a worker (Celery's kwargsrepr header names it)."""
    needles = {f"'job_id': {job_id!r}": job_id for job_id in job_ids}
    with app.connection_for_read() as conn:
        unacked = conn.transport_options.get("unacked_key", UNACKED_KEY)
        found = messages_naming(conn.default_channel.client, get_settings().training_queue, needles, unacked)
    return {needles[f] for f in found}


def _queue_depths() -> dict[str, int]:
    return queue_depths(app, get_settings())
