"""The promotion gate on a named dataset, as a fine-tune from the review page (or `captioner train --promote
--require-no-worse wer --gate-dataset DIR`) asks for it: the training runner scores the new version and the current
one on that dataset and promotes only when the new one is no worse there. A version trained on a few reviewed items
used to be compared on its own tiny split, or promoted with no gate at all."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from common.errors import ConfigError
from common.messages import TrainOutcome, TrainRequest
from common.store import ModelStore
from ledger import RedisLedger
from producer.local import LocalRedis
from tests.conftest import settings_from
from training.jobs import check_train_request, open_train_job, run_train


def test_a_version_worse_on_the_gate_dataset_stays_unpromoted_and_says_why(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    from training.synthetic import make_shapes
    from training.tiny import build_tiny_git

    data, held = session_root / f"gate-{uuid.uuid4().hex[:6]}", session_root / f"held-{uuid.uuid4().hex[:6]}"
    make_shapes(data, 8, seed=8, size=32)
    make_shapes(held, 6, seed=9, size=32)
    store = ModelStore(tmp_path / "store")
    base = build_tiny_git(tmp_path / "base", seed=0)
    current = store.add(base, {"base_model": "tiny"}, "v-current").version
    store.promote(current)
    settings = settings_from({**worker_env, "CAPTIONER_MODEL_STORE": str(store.root), "CAPTIONER_TORCH_THREADS": "1"})
    config = {
        "base_model": str(base),
        "max_steps": 2,
        "eval_steps": 1000,
        "save_steps": 1000,
        "batch_size": 4,
        "max_length": 8,
        "learning_rate": 0.5,
    }
    with pytest.raises(ConfigError, match="gate_dataset"):
        check_train_request(TrainRequest(job_id="t", dataset=str(data), promote=True, gate_dataset=str(held)))
    with LocalRedis() as server:
        ledger = RedisLedger(redis.Redis.from_url(server.url(1)), "gate")
        req = TrainRequest(
            job_id="train-gate",
            dataset=str(data),
            config=config,
            promote=True,
            require_no_worse="wer",
            gate_dataset=str(held),
        )
        open_train_job(ledger, req)
        summary = run_train(settings, ledger, req)
        ledger.r.close()
    assert summary["status"] == TrainOutcome.DONE
    gate = summary["gate"]
    assert gate["dataset"] == str(held) and gate["current"]["version"] == current
    new, old = gate["new"]["wer"], gate["current"]["wer"]
    assert new > old, "a learning rate of 0.5 for 2 steps (seeded) ruins the model: the gate has something to refuse"
    versions = {v.version: v for v in store.list()}
    # Both were scored on the held-out set, recorded with its name and size.
    for v in (summary["version"], current):
        last = versions[v].meta["evaluations"][-1]
        assert (last["dataset"], last["n"]) == (str(held), 6)
    assert summary["promoted"] is False and "worse than v-current on wer" in summary["promotion"]
    assert store.current().version == current
