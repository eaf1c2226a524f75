"""Fine-tune and evaluate as ledger jobs: run once, report progress, stop on cancel, end on failure, resume a crash.

A training job is never redelivered by the broker (its message is acked when it starts, because it runs far
longer than any visibility timeout). Instead a lock with a heartbeat marks the one runner, and training
workers look for running jobs whose runner is gone (lock lapsed or released) and send them again; they resume
from their last checkpoint. A worker that is shut down stops its job at the next step with a checkpoint and
releases the lock, so the next training worker resumes it at once. A job whose code raises ends FAILED with its
error and is never sent again by itself.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from common.errors import CaptionerError, ConfigError
from common.messages import EvaluateRequest, JobKind, JobState, TrainOutcome, TrainRequest
from common.settings import Settings
from common.store import ModelStore
from ledger import Ledger, TrainingRun, TrainResult
from training.requests import check_train_request, open_train_job  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

# Set when this worker process is shutting down: a running fine-tune checkpoints and hands its job back.
SHUTTING_DOWN = threading.Event()


def _store(settings: Settings) -> ModelStore:
    if settings.model_store is None:
        raise ConfigError(
            "training needs CAPTIONER_MODEL_STORE (a writable directory for model versions); set it "
            "on the training worker and start it again"
        )
    return ModelStore(settings.model_store)


def check_training_worker(settings: Settings) -> None:
    """What a training worker needs before it takes a job, checked at start-up: a ``ConfigError`` says what is
    missing, and the worker does not start (a job it took would fail, or worse, come back every few minutes)."""
    store = _store(settings)
    try:
        store.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=store.root, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"CAPTIONER_MODEL_STORE {store.root} is not a writable directory ({exc.strerror or exc}); fix it or "
            "point the setting elsewhere, then start the training worker again"
        ) from None
    if settings.train_processes > 1:
        from training.distributed import check_processes

        check_processes(settings.train_processes)


def worker_capabilities() -> dict[str, Any]:
    """What this training worker offers a job: devices for processes, and the optional packages it has."""
    import importlib.util

    from training.distributed import devices

    count, kind = devices()
    have = {name: importlib.util.find_spec(name) is not None for name in ("peft", "datasets", "tensorboard")}
    return {"devices": count, "device_kind": kind, **have}


class _Heartbeat:
    """Keeps the job lock alive and tells the runner when to stop: a user's cancel, or a lost lock.

    The lock is lost when another owner holds it, or when no refresh has succeeded for a whole TTL (it may
    have lapsed, and another worker may be resuming the job). Redis errors are logged and retried.
    """

    def __init__(self, ledger: Ledger, job_id: str, ttl_s: float) -> None:
        self.ledger, self.job_id, self.ttl_s = ledger, job_id, ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._renewed = 0.0  # monotonic time a successful refresh *started*: the lock lives ttl_s from then
        self._last_check, self._cancelled = 0.0, False
        # The thread runs in a copy of this context, so its log lines carry the job id too.
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=ctx.run, args=(self._beat,), daemon=True, name="train-heartbeat")

    def acquire(self) -> bool:
        started = time.monotonic()
        if not self.ledger.try_lock(self.job_id, self.owner, self.ttl_s):
            return False
        self._renewed = started
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4) and not self._lost.is_set():
            self.beat_once()

    def beat_once(self) -> None:
        """Refresh the lock once; on failure keep trying until a whole TTL has passed without a refresh."""
        started = time.monotonic()
        try:
            held = self.ledger.try_lock(self.job_id, self.owner, self.ttl_s)
        except redis.RedisError as exc:
            log.warning("job %s: could not refresh the training lock (%s); trying again", self.job_id, exc)
        else:
            if held:
                self._renewed = started
            else:
                log.error("job %s: another runner holds the training lock; stopping at the next step", self.job_id)
                self._lost.set()
        self.lost()

    def lost(self) -> bool:
        """True once the lock is someone else's or may have lapsed (checked here too: the beat may be stuck)."""
        if not self._lost.is_set() and time.monotonic() - self._renewed >= self.ttl_s:
            log.error(
                "job %s: the training lock was not refreshed for %gs; stopping at the next step",
                self.job_id,
                self.ttl_s,
            )
            self._lost.set()
        return self._lost.is_set()

    def cancelled(self) -> bool:
        now = time.monotonic()
        if now - self._last_check >= 1.0:
            self._last_check = now
            try:
                self._cancelled = self.ledger.state(self.job_id) is JobState.CANCELLED
            except redis.RedisError as exc:  # a blip: ask again next time, keep training meanwhile
                log.warning("job %s: could not read the job state (%s)", self.job_id, exc)
        return self._cancelled

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.ledger.unlock(self.job_id, self.owner)  # only if still ours
        except redis.RedisError as exc:
            log.warning("job %s: could not release the training lock (%s); it lapses by itself", self.job_id, exc)


def run_train(settings: Settings, ledger: Ledger, req: TrainRequest) -> dict[str, Any]:
    """Steps: 1 take the lock, 2 load data, 3 train (resuming), 4 store the version, 5 promote if asked.

    The outcome is a ``TrainOutcome`` (common/messages.py says what each means); on ``failed`` the error is
    raised again for Celery. A killed worker leaves the job RUNNING with a lapsing lock, and the orphan scan
    resumes it.
    """
    if ledger.state(req.job_id) is None:
        open_train_job(ledger, req)
    if ledger.state(req.job_id) is not JobState.RUNNING:
        return {"job_id": req.job_id, "status": TrainOutcome.SKIPPED, "reason": f"job is {ledger.state(req.job_id)}"}
    beat = _Heartbeat(ledger, req.job_id, settings.train_lock_ttl_s)
    if not beat.acquire():  # 1. somebody else runs it: never twice
        return {"job_id": req.job_id, "status": TrainOutcome.SKIPPED, "reason": "already running elsewhere"}
    # Only now torch: its first import takes seconds on a busy machine, and until the lock is taken the orphan
    # scan cannot tell this job (acked, in hand) from one whose message was lost.
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    from runtime import metrics  # the training worker's stack (prometheus_client); senders of a job never need it

    ledger.update_training_run(req.job_id, TrainingRun(started=time.time()))
    metrics.training_started(req.job_id)
    try:
        summary = _fine_tune(settings, _store(settings), ledger, req, beat)
    except Exception as exc:
        if beat.lost():  # the job is another runner's now: its outcome is not ours to record
            summary = {"job_id": req.job_id, "status": TrainOutcome.LOST_LOCK, "error": f"{type(exc).__name__}: {exc}"}
        else:
            _record_failure(ledger, req.job_id, exc)
            metrics.training_ended(TrainOutcome.FAILED)
            raise
    finally:
        beat.release()
    metrics.training_ended(summary["status"])
    return summary


def _fine_tune(
    settings: Settings, store: ModelStore, ledger: Ledger, req: TrainRequest, beat: _Heartbeat
) -> dict[str, Any]:
    """Steps 2-5 of run_train, under the lock."""
    from training import distributed
    from training.checkpoints import quiet_progress_bars
    from training.config import TrainConfig
    from training.data import dataset_fingerprint, load_examples, split_examples
    from training.finetune import TrainStatus
    from training.pixels import local_image_policy

    quiet_progress_bars()
    cfg = TrainConfig.from_dict(req.config)
    distributed.check_processes(cfg.num_processes or settings.train_processes)
    if cfg.lora_r:
        from training.lora import require_peft

        require_peft()
    done = {"job_id": req.job_id}
    version = _stored_version(store, ledger, req.job_id)  # a crash after step 4: never store it twice
    if version is None:
        examples = load_examples(req.dataset, column=req.column, text_column=req.text_column)  # 2.
        train_set, eval_set = split_examples(examples, cfg.test_fraction, cfg.seed)
        run_dir = store.root / ".runs" / req.job_id

        def progress(p: dict[str, Any]) -> None:
            from runtime import metrics

            metrics.observe_training(req.job_id, p)
            try:
                ledger.update_training_run(req.job_id, TrainingRun(progress=p))
            except redis.RedisError as exc:  # progress is a view; a blip must not end a long run
                log.warning("job %s: progress not recorded (%s)", req.job_id, exc)

        result = distributed.run(
            cfg,
            train_set,
            eval_set,
            run_dir,
            on_progress=progress,  # 3.
            processes=cfg.num_processes or settings.train_processes,
            should_stop=lambda: SHUTTING_DOWN.is_set() or beat.cancelled(),
            lost=beat.lost,
            image_policy=local_image_policy(examples, settings),
            torch_threads=settings.torch_threads,
        )
        if result.status is TrainStatus.CANCELLED and not beat.cancelled():
            log.info(
                "training job %s interrupted at step %d by the worker's shutdown; the next training worker "
                "resumes it from this step",
                req.job_id,
                result.steps,
            )
            return {**done, "status": TrainOutcome.INTERRUPTED, "steps": result.steps}
        if result.status is TrainStatus.CANCELLED:
            cancelled = {**done, "status": TrainOutcome.CANCELLED, "steps": result.steps}
            ledger.update_training_run(req.job_id, TrainingRun(result=TrainResult(**cancelled), finished=time.time()))
            return cancelled
        if result.status is TrainStatus.LOST_LOCK or beat.lost():
            return {**done, "status": TrainOutcome.LOST_LOCK, "steps": result.steps}
        meta = {  # 4.
            "base_model": cfg.base_model,
            "dataset": req.dataset,
            "dataset_fingerprint": dataset_fingerprint(examples),
            "eval_fingerprint": dataset_fingerprint(eval_set),
            "train_examples": len(train_set),
            "eval_examples": len(eval_set),
            "processes": cfg.num_processes or settings.train_processes,
            "params": dataclasses.asdict(cfg),
            "metrics": result.best_metrics,
            "steps": result.steps,
            "job_id": req.job_id,
        }
        assert result.final_dir is not None
        version = store.add(Path(result.final_dir), meta).version
        ledger.update_training_run(req.job_id, TrainingRun(version=version))
    mv = store.get(version)
    summary = {
        **done,
        "status": TrainOutcome.DONE,
        "version": version,
        "promoted": False,
        "metrics": mv.metrics,
        "steps": mv.meta.get("steps"),
    }
    if req.promote:  # 5.
        try:
            store.promote(version, require_no_worse=req.require_no_worse)
            summary["promoted"] = True
        except ConfigError as exc:  # the gate said no: the version stays, the job is done, never re-run
            summary["promotion"] = f"not promoted: {exc}"
            log.info("job %s: %s", req.job_id, summary["promotion"])
    ledger.update_training_run(req.job_id, TrainingRun(result=TrainResult(**summary)))
    ledger.set_state(req.job_id, JobState.DONE)
    return summary


def _stored_version(store: ModelStore, ledger: Ledger, job_id: str) -> str | None:
    version = ledger.training_run(job_id).version
    if not version:
        return None
    try:
        return store.get(version).version
    except ConfigError:  # deleted from the store since: train (or rather, finalize) again
        return None


def _record_failure(ledger: Ledger, job_id: str, exc: Exception) -> None:
    """The job ends FAILED with its error; if Redis is down too, it stays RUNNING and is resumed later."""
    error = f"{exc}" if isinstance(exc, CaptionerError) else f"{type(exc).__name__}: {exc}"
    error = " ".join(error.split())  # one line: library errors (hub, OS) often span several
    log.error("training job %s failed: %s", job_id, error, exc_info=not isinstance(exc, CaptionerError))
    try:
        failed = TrainResult(job_id=job_id, status=TrainOutcome.FAILED, error=error)
        ledger.update_training_run(job_id, TrainingRun(result=failed, finished=time.time()))
        ledger.set_state(job_id, JobState.FAILED)
    except redis.RedisError as write_error:
        log.error("job %s: could not record the failure (%s); it will be resumed", job_id, write_error)


def run_evaluate(settings: Settings, req: EvaluateRequest) -> dict[str, Any]:
    """Score a stored version on a dataset with generated captions; the result is kept with the version."""
    from training.checkpoints import quiet_progress_bars
    from training.data import dataset_fingerprint, load_examples
    from training.evaluation import evaluate_model
    from training.pixels import local_image_policy

    quiet_progress_bars()
    store = _store(settings)
    version = store.current() if req.version == "current" else store.get(req.version)
    if version is None:
        raise ConfigError("no promoted model to evaluate")
    examples = load_examples(req.dataset, column=req.column, text_column=req.text_column)
    if req.max_samples:
        examples = examples[: req.max_samples]
    report = evaluate_model(
        version.path, examples, max_length=req.max_length, image_policy=local_image_policy(examples, settings)
    )
    metrics_ = {k: v for k, v in report.items() if isinstance(v, int | float) and k != "n"}
    samples = report.get("samples")  # a few generated captions beside their references, shown by captioner review
    store.record_evaluation(version.version, dataset_fingerprint(examples), metrics_, samples=samples)
    return {"version": version.version, "dataset": req.dataset, **report}


def orphaned_train_jobs(
    ledger: Ledger,
    *,
    grace_s: float,
    waiting: Callable[[list[str]], set[str]] = lambda ids: set(),
    limit: int = 1000,
) -> list[TrainRequest]:
    """Training jobs to send again: RUNNING, with no runner's lock and no message of theirs in the broker.

    Either started (their runner died, its lock lapsed; they resume from their last checkpoint), or never
    started ``grace_s`` after they were sent (the message was lost after the job was recorded, or the worker
    died between receiving it and taking the lock). ``waiting`` says which of some job ids still have a
    message queued or reserved by a worker. Done, cancelled and failed jobs never come back.
    """
    now = time.time()
    candidates: list[TrainRequest] = []
    for info in ledger.jobs(limit):
        if info.kind is not JobKind.TRAIN or info.state is not JobState.RUNNING or ledger.locked(info.id):
            continue
        run = ledger.training_run(info.id)
        started = run.started or 0.0
        sent = max(info.created, run.sent or 0.0)
        # Unstarted: give the message time to arrive. Started: once re-sent, give that message time too.
        if (not started or sent > started) and now - sent < grace_s:
            continue
        if run.request is not None:
            candidates.append(run.request)
    if not candidates:
        return []
    queued = waiting([req.job_id for req in candidates])
    return [req for req in candidates if req.job_id not in queued]
