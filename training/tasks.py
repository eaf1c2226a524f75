"""Thin Celery adapters for the training queue: fine-tune and evaluate. Acked on receipt (see training.jobs)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import celeryd_after_setup

from training.jobs import orphaned_train_jobs, run_evaluate, run_train
from worker.celery_app import app
from worker.ledger import Ledger, ledger_from_settings
from worker.messages import TASK_EVALUATE, TASK_TRAIN, EvaluateRequest, TrainRequest, parse_message
from worker.settings import get_settings

log = logging.getLogger(__name__)


def _ledger() -> Ledger:
    return ledger_from_settings(get_settings())


# acks_late=False: a fine-tune outlives any visibility timeout, so late acks would run it twice.
@app.task(name=TASK_TRAIN, acks_late=False)
def train(**payload: Any) -> dict:
    """Fine-tune a model on a dataset; progress, cancel and resume go through the ledger."""
    req = parse_message(TrainRequest, payload)
    return run_train(get_settings(), _ledger(), req)  # type: ignore[arg-type]


@app.task(name=TASK_EVALUATE, acks_late=False)
def evaluate(**payload: Any) -> dict:
    """Score a model version with generated captions (WER, CER, BLEU-4, ROUGE-L)."""
    req = parse_message(EvaluateRequest, payload)
    return run_evaluate(get_settings(), req)  # type: ignore[arg-type]


@celeryd_after_setup.connect
def _resume_orphans(sender: str, instance: Any, **kwargs: Any) -> None:
    """A training worker that starts picks up training jobs whose runner died (their checkpoints remain)."""
    s = get_settings()
    if s.training_queue not in set(instance.app.amqp.queues.consume_from or {}):
        return
    threading.Thread(target=_watch_orphans, name="train-orphans", daemon=True).start()


def _watch_orphans() -> None:
    """Now and every half lock-lifetime: a runner that died leaves its lock to lapse, then we resume it."""
    s = get_settings()
    while True:
        try:
            for req in orphaned_train_jobs(_ledger()):
                log.info("resuming training job %s from its last checkpoint", req.job_id)
                train.apply_async(kwargs=req.model_dump(), queue=s.training_queue)
        except Exception:
            log.exception("could not scan for orphaned training jobs")
        time.sleep(s.train_lock_ttl_s / 2)
