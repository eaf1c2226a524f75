"""A fine-tune as its sender sees it: the request checked before anything is sent, against the training workers'
offers, and recorded in the ledger before its message goes. No torch: the producer and the CLI import this, never
the training loop."""

from __future__ import annotations

import os
import time
from typing import Any

from common.errors import ConfigError
from common.messages import JobKind, TrainRequest
from ledger import Ledger, TrainingRun


def check_train_request(req: TrainRequest) -> None:
    """Everything about a fine-tune request that can be checked without its data: config keys, types, values."""
    from training.config import METRIC_NAMES, TrainConfig

    TrainConfig.from_dict(req.config)
    if req.require_no_worse is not None:
        if not req.promote:
            raise ConfigError("require_no_worse (--require-no-worse) only applies with promote (--promote)")
        if req.require_no_worse not in METRIC_NAMES:
            raise ConfigError(
                f"require_no_worse must name a metric ({', '.join(METRIC_NAMES)}), not {req.require_no_worse!r}"
            )


def is_hub_id(dataset: str) -> bool:
    return not os.path.exists(dataset) and not dataset.startswith((".", "/", "~"))


def needs_worker_check(req: TrainRequest) -> bool:
    """Whether the request asks for something only a training worker can say it has."""
    cfg = req.config
    return bool(
        (cfg.get("num_processes") or 1) > 1
        or cfg.get("lora_r")
        or cfg.get("report_to") == "tensorboard"
        or is_hub_id(req.dataset)
    )


def check_against_workers(req: TrainRequest, workers: list[dict[str, Any]]) -> None:
    """The request against the best that the answering training workers offer; a ConfigError says what is missing."""
    cfg = req.config
    processes = cfg.get("num_processes") or 1
    most = max(workers, key=lambda w: w.get("devices", 0))
    if processes > most.get("devices", 1):
        raise ConfigError(
            f"{processes} training processes asked for, but the training workers have at most "
            f"{most['devices']} {most.get('device_kind', 'device')}(s)"
        )
    wanted = [
        ("peft", "lora", bool(cfg.get("lora_r"))),
        ("tensorboard", "train", cfg.get("report_to") == "tensorboard"),
        ("datasets", "datasets", is_hub_id(req.dataset)),
    ]
    for package, extra, asked in wanted:
        if asked and not any(w.get(package) for w in workers):
            raise ConfigError(
                f"{'LoRA' if package == 'peft' else package} is asked for, but no training worker has "
                f"{package} installed (pip install 'captioner[{extra}]' there)"
            )


def open_train_job(ledger: Ledger, req: TrainRequest) -> bool:
    """Record a training job before its message is sent (so a lost message can be found and resumed).

    Submitting a job id again re-opens it: a failed or cancelled job runs again from its last checkpoint.
    """
    created = ledger.open_job(req.job_id, f"train {req.dataset}", None, kind=JobKind.TRAIN)
    ledger.update_training_run(req.job_id, TrainingRun(request=req, sent=time.time(), started=None, result=None))
    ledger.seal(req.job_id)
    return created
