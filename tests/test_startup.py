"""A caption worker that cannot work says why in one line at start-up and exits non-zero, through the CLI as a new
user would start it; and the parts that know nothing of queues import neither Celery nor Redis."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from producer.local import WorkerProcess
from tests.test_recovery import wait_for
from training.tiny_families import build_tiny_qwen_vl

ROOT = Path(__file__).resolve().parent.parent


def _make_not_git(tiny_model: Path, target: Path) -> Path:
    """A save_pretrained directory whose config is another architecture's (a BERT checkpoint, say)."""
    shutil.copytree(tiny_model, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    return target


# Started with this folder on PYTHONPATH, an interpreter finds none of the named packages, as if never installed.
_SITECUSTOMIZE = """
import sys
from importlib.machinery import PathFinder


class NotInstalled(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in {packages!r} else PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [NotInstalled if f is PathFinder else f for f in sys.meta_path]
"""


def _without(folder: Path, *packages: str) -> Path:
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(packages=set(packages)))
    return folder


def test_a_caption_worker_that_cannot_work_refuses_to_start_in_one_line(
    worker_env: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    """Each setting below, given to `captioner worker` as a user starts it: exit 1, one line that says why, no
    traceback, never 'ready'. The workers start side by side (each imports torch; the machine has cores)."""
    (tmp_path / "store").mkdir()
    cases = {
        "missing model directory": ({"CAPTIONER_MODEL": str(tmp_path / "no-such-model")}, "is not a directory"),
        "a checkpoint of no captioning family": (
            {"CAPTIONER_MODEL": str(_make_not_git(tiny_model, tmp_path / "bert"))},
            "model_type 'bert' is not a captioning model",
        ),
        "@current without a store": (
            {"CAPTIONER_MODEL": "@current"},
            "CAPTIONER_MODEL=@current needs CAPTIONER_MODEL_STORE",
        ),
        "@current with nothing promoted": (
            {"CAPTIONER_MODEL": "@current", "CAPTIONER_MODEL_STORE": str(tmp_path / "store")},
            "no promoted model in",
        ),
        "an unknown device": ({"CAPTIONER_DEVICE": "tpu"}, "unknown device 'tpu'"),
        "a Qwen2.5-VL checkpoint on an install without torchvision": (
            {
                "CAPTIONER_MODEL": str(build_tiny_qwen_vl(tmp_path / "qwen", version="2.5")),
                "PYTHONPATH": str(_without(tmp_path / "no-torchvision", "torchvision")),
            },
            "its processor needs torchvision: pip install 'captioner[vlm]'",
        ),
    }
    base = {k: v for k, v in worker_env.items() if k != "CAPTIONER_MODEL_STORE"}
    workers = {
        case: WorkerProcess({**base, **setting}, log=tmp_path / f"worker-{i}.log").start()
        for i, (case, (setting, _)) in enumerate(cases.items())
    }
    try:
        for case, worker in workers.items():
            wait_for(
                lambda w=worker: w.proc.poll() is not None or b" ready." in w.log_path.read_bytes(),
                180,
                f"the worker with {case} to exit or to start serving",
            )
        codes = {case: worker.proc.poll() for case, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.terminate()
    for case, (_, reason) in cases.items():
        output = workers[case].log_path.read_text()
        said = [line for line in output.splitlines() if "cannot start a caption worker" in line]
        assert codes[case] == 1, f"{case}: exit {codes[case]}\n{output[-3000:]}"
        assert len(said) == 1 and reason in said[0], f"{case}:\n{output[-3000:]}"
        assert "Traceback" not in output and " ready." not in output, f"{case}:\n{output[-3000:]}"


def test_the_parts_that_know_no_queues_import_neither_celery_nor_redis() -> None:
    """The engine, image loading, the batcher and the service are plain Python; common/ is shared by every program
    and only its ledger and connection helpers may talk to Redis (and none of it to Celery)."""
    shared = sorted(
        f"common.{p.stem}"
        for p in (ROOT / "common").glob("*.py")
        if p.stem != "__init__" and not p.stem.startswith(("ledger", "connections"))
    )
    plain = [
        *shared,
        "media.images",
        "model.flags",
        "worker.batcher",
        "model.preprocess",
        "model.fastgen",
        "model.engine",
        "model.endpoint",
        "model.families",
        "worker.service",
    ]
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
