"""A caption worker that cannot work says why in one line at start-up and exits non-zero, through the CLI as a new
user would start it; and the parts that know nothing of queues import neither Celery nor Redis."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from producer.local import WorkerProcess
from tests.test_recovery import wait_for

ROOT = Path(__file__).resolve().parent.parent


def _make_not_git(tiny_model: Path, target: Path) -> Path:
    """A save_pretrained directory whose config is another architecture's (a BERT checkpoint, say)."""
    shutil.copytree(tiny_model, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    return target


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ({"CAPTIONER_MODEL": "MISSING"}, "is not a directory"),
        ({"CAPTIONER_MODEL": "NOT_GIT"}, "is a 'bert' checkpoint, not GIT"),
        ({"CAPTIONER_MODEL": "@current"}, "CAPTIONER_MODEL=@current needs CAPTIONER_MODEL_STORE"),
        ({"CAPTIONER_MODEL": "@current", "CAPTIONER_MODEL_STORE": "STORE"}, "no promoted model in"),
        ({"CAPTIONER_DEVICE": "tpu"}, "unknown device 'tpu'"),
    ],
    ids=[
        "missing-model-dir",
        "not-a-git-checkpoint",
        "current-without-store",
        "current-never-promoted",
        "unknown-device",
    ],
)
def test_a_caption_worker_that_cannot_work_refuses_to_start_in_one_line(
    worker_env: dict[str, str], tiny_model: Path, tmp_path: Path, setting: dict[str, str], reason: str
) -> None:
    env = dict(worker_env)
    env.pop("CAPTIONER_MODEL_STORE", None)
    for key, value in setting.items():
        if value == "MISSING":
            value = str(tmp_path / "no-such-model")
        elif value == "NOT_GIT":
            value = str(_make_not_git(tiny_model, tmp_path / "bert"))
        elif value == "STORE":
            (tmp_path / "store").mkdir()
            value = str(tmp_path / "store")
        env[key] = value
    worker = WorkerProcess(env, log=tmp_path / "worker.log").start()  # `captioner worker`, as a user starts it
    try:
        wait_for(lambda: worker.proc.poll() is not None or b" ready." in worker.log_path.read_bytes(), 180,
                 "the worker to exit or to start serving")  # fmt: skip
        code = worker.proc.poll()
    finally:
        worker.terminate()
    output = worker.log_path.read_text()
    said = [line for line in output.splitlines() if "cannot start a caption worker" in line]
    assert code == 1, output[-3000:]
    assert len(said) == 1 and reason in said[0], output[-3000:]
    assert "Traceback" not in output and " ready." not in output, output[-3000:]


def test_the_parts_that_know_no_queues_import_neither_celery_nor_redis() -> None:
    """The engine, image loading, the batcher and the service are plain Python; common/ is shared by every program
    and only its ledger and connection helpers may talk to Redis (and none of it to Celery)."""
    shared = sorted(
        f"common.{p.stem}" for p in (ROOT / "common").glob("*.py")
        if p.stem != "__init__" and not p.stem.startswith(("ledger", "connections"))
    )  # fmt: skip
    plain = [*shared, "worker.images", "worker.quality", "worker.batcher", "worker.preprocess", "worker.fastgen",
             "worker.engine", "worker.service"]  # fmt: skip
    assert {"common.messages", "common.settings", "common.errors", "common.store"} <= set(plain)
    code = (
        "import importlib, json, sys\n"
        f"for name in {plain!r}:\n"
        "    importlib.import_module(name)\n"
        "    bad = sorted(m for m in ('celery', 'kombu', 'redis') if m in sys.modules)\n"
        "    if bad:\n"
        "        print(json.dumps([name, bad])); sys.exit(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"imported by (module, [culprits]): {proc.stdout}{proc.stderr[-2000:]}"
