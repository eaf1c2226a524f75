"""Fine-tune and evaluate as ledger jobs: run once, report progress, stop on cancel, resume after a crash.

A training job is never redelivered by the broker (its message is acked on receipt, because it runs far
longer than any visibility timeout). Instead a lock with a heartbeat marks the one runner, and a training
worker that starts finds running jobs whose lock has lapsed and resumes them from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from worker.errors import ConfigError
from worker.ledger import Ledger
from worker.messages import EvaluateRequest, GenParams, JobState, TrainRequest
from worker.settings import Settings
from worker.store import ModelStore

log = logging.getLogger(__name__)

def _store(settings: Settings) -> ModelStore:
    if settings.model_store is None:
        raise ConfigError("training needs CAPTIONER_MODEL_STORE (a directory for model versions)")
    return ModelStore(settings.model_store)


def open_train_job(ledger: Ledger, req: TrainRequest) -> bool:
    """Record a training job before its message is sent (so a lost message can be found and resumed)."""
    created = ledger.open_job(req.job_id, f"train {req.dataset}", GenParams(), {"kind": "train"})
    ledger.set_fields(req.job_id, request=req.model_dump())
    ledger.seal(req.job_id)
    return created


class _Heartbeat:
    """Keeps the job lock alive and answers 'should I stop?' from the ledger, at most once a second."""

    def __init__(self, ledger: Ledger, job_id: str, ttl_s: int) -> None:
        self.ledger, self.job_id, self.ttl_s = ledger, job_id, ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self._stop = threading.Event()
        self._last_check, self._cancelled = 0.0, False
        self._thread = threading.Thread(target=self._beat, daemon=True, name="train-heartbeat")

    def acquire(self) -> bool:
        if not self.ledger.try_lock(self.job_id, self.owner, self.ttl_s):
            return False
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            self.ledger.try_lock(self.job_id, self.owner, self.ttl_s)

    def cancelled(self) -> bool:
        now = time.monotonic()
        if now - self._last_check >= 1.0:
            self._last_check = now
            self._cancelled = self.ledger.state(self.job_id) is JobState.CANCELLED
        return self._cancelled

    def release(self) -> None:
        self._stop.set()
        self.ledger.unlock(self.job_id, self.owner)


def run_train(settings: Settings, ledger: Ledger, req: TrainRequest) -> dict[str, Any]:
    """Steps: 1 take the lock, 2 load data, 3 train (resuming), 4 store the version, 5 promote if asked."""
    from training.data import dataset_fingerprint, load_examples, split_examples
    from training.finetune import TrainConfig, train

    store = _store(settings)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if ledger.state(req.job_id) is None:
        open_train_job(ledger, req)
    if ledger.state(req.job_id) is not JobState.RUNNING:
        return {"job_id": req.job_id, "status": "skipped", "reason": f"job is {ledger.state(req.job_id)}"}
    beat = _Heartbeat(ledger, req.job_id, settings.train_lock_ttl_s)
    if not beat.acquire():  # 1. somebody else runs it: never twice
        return {"job_id": req.job_id, "status": "skipped", "reason": "already running elsewhere"}
    ledger.set_fields(req.job_id, started=time.time())
    try:
        examples = load_examples(req.dataset, column=req.column, text_column=req.text_column)  # 2.
        cfg = TrainConfig.from_dict(req.config)
        train_set, eval_set = split_examples(examples, cfg.test_fraction, cfg.seed)
        run_dir = store.root / ".runs" / req.job_id

        def progress(p: dict[str, Any]) -> None:
            ledger.set_fields(req.job_id, progress=p)

        result = train(cfg, train_set, eval_set, run_dir, on_progress=progress, should_stop=beat.cancelled)  # 3.
        if result.status == "cancelled":
            return {"job_id": req.job_id, "status": "cancelled", "steps": result.steps}
        meta = {  # 4.
            "base_model": cfg.base_model,
            "dataset": req.dataset,
            "dataset_fingerprint": dataset_fingerprint(examples),
            "eval_fingerprint": dataset_fingerprint(eval_set),
            "params": dataclasses.asdict(cfg),
            "metrics": result.best_metrics,
            "steps": result.steps,
            "job_id": req.job_id,
        }
        version = store.add(Path(result.final_dir), meta)
        promoted = False
        if req.promote:  # 5.
            store.promote(version.version, require_no_worse=req.require_no_worse)
            promoted = True
        summary = {"job_id": req.job_id, "status": "done", "version": version.version, "promoted": promoted,
                   "metrics": result.best_metrics, "steps": result.steps}  # fmt: skip
        ledger.set_fields(req.job_id, result=summary)
        ledger.set_state(req.job_id, JobState.DONE)
        return summary
    finally:
        beat.release()


def run_evaluate(settings: Settings, req: EvaluateRequest) -> dict[str, Any]:
    """Score a stored version on a dataset with generated captions; the result is kept with the version."""
    from training.data import dataset_fingerprint, load_examples
    from training.finetune import evaluate_model

    store = _store(settings)
    version = store.current() if req.version == "current" else store.get(req.version)
    if version is None:
        raise ConfigError("no promoted model to evaluate")
    examples = load_examples(req.dataset, column=req.column, text_column=req.text_column)
    if req.max_samples:
        examples = examples[: req.max_samples]
    report = evaluate_model(version.path, examples, max_length=req.max_length)
    metrics = {k: v for k, v in report.items() if isinstance(v, int | float) and k != "n"}
    store.record_evaluation(version.version, dataset_fingerprint(examples), metrics)
    return {"version": version.version, "dataset": req.dataset, **report}


def orphaned_train_jobs(ledger: Ledger, limit: int = 1000) -> list[TrainRequest]:
    """Training jobs that started, are still marked running, and whose runner is gone (lock lapsed)."""
    found = []
    for info in ledger.jobs(limit):
        if info.extra.get("kind") != "train" or info.state is not JobState.RUNNING:
            continue
        if ledger.get_field(info.id, "started") and not ledger.locked(info.id):
            request = ledger.get_field(info.id, "request")
            if request:
                found.append(TrainRequest.model_validate(request))
    return found
