"""What an install gives: a producer-only install (`pip install captioner`, no extras) runs every sender command
without a traceback, a missing extra is one line naming it, and the rooms' import rules hold and catch a break."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from PIL import Image

from producer.local import LocalRedis

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution these requirements install, following the extras they ask for (celery[redis] brings
    kombu[redis], which brings redis and packaging) and no others."""
    seen: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        for extra in ["", *req.extras]:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            for inner in map(Requirement, requires):
                if inner.marker is None or inner.marker.evaluate({"extra": extra}):
                    todo.append(inner)
    return {name for name, _ in seen}


def _optional_modules() -> list[str]:
    """Top-level modules installed here that a producer-only install would not have: those of every distribution
    outside the base dependencies' closure (the extras, the dev tools and whatever they pulled in)."""
    base = _closure(PYPROJECT["project"]["dependencies"]) | {"captioner", "pip", "setuptools"}
    blocked = []
    for module, dists in metadata.packages_distributions().items():
        names = {d.lower().replace("_", "-") for d in dists}
        if module.isidentifier() and not names & base and module not in sys.stdlib_module_names:
            blocked.append(module)
    return sorted(blocked)


# A producer-only interpreter: the optional modules cannot be imported, as on a machine that never installed them.
_RUN = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = set({blocked!r})


class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
sys.argv = ["captioner", *{argv!r}]
from cli.main import main

main()
"""


def _producer_only(argv: list[str], env: dict[str, str], blocked: list[str]) -> subprocess.CompletedProcess[str]:
    code = _RUN.format(blocked=blocked, argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_the_blocked_set_covers_every_extra() -> None:
    blocked = set(_optional_modules())
    for module in (
        "torch",
        "transformers",
        "PIL",
        "httpx2",
        "prometheus_client",
        "psycopg",
        "fsspec",
        "s3fs",
        "starlette",
        "uvicorn",
        "jinja2",
        "jiwer",
        "accelerate",
        "peft",
        "datasets",
    ):
        assert module in blocked, module
    for module in ("celery", "kombu", "redis", "click", "pydantic", "rich", "pyarrow", "msgpack"):
        assert module not in blocked, module


def test_extras_named_by_the_cli_are_the_pyproject_extras() -> None:
    """The modules `captioner worker`/`review`/`demo` check before starting are those their extras install."""
    from cli.base import EXTRAS

    provided = metadata.packages_distributions()
    extras = PYPROJECT["project"]["optional-dependencies"]

    def modules_of(extra: str) -> set[str]:
        out: set[str] = set()
        for req in extras[extra]:
            if req.startswith("captioner["):
                for inner in req[len("captioner[") : -1].split(","):
                    out |= modules_of(inner)
                continue
            dist = _name(req)
            out |= {m for m, ds in provided.items() if dist in {d.lower().replace("_", "-") for d in ds}}
        return out

    for extra, modules in EXTRAS.items():
        assert set(modules) == modules_of(extra) - {"torchgen", "functorch"}, extra


def test_a_producer_only_install_runs_every_sender_command(tmp_path: Path) -> None:
    """enqueue, status, wait, export (jsonl/csv/parquet), train, evaluate, models, jobs, config and doctor run with
    no extra installed; worker, review and demo say in one line which extra they need. Never a traceback."""
    blocked = _optional_modules()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 90, 40, 40)).save(folder / f"{i}.png")
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"file_name": str(folder / f"{i}.png"), "text": "a square"}) + "\n" for i in range(2))
    )
    store = tmp_path / "store"
    store.mkdir()
    with LocalRedis() as server:
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
            "CAPTIONER_MODEL_STORE": str(store),
            "CAPTIONER_ALLOWED_ROOTS": str(tmp_path),
            "HF_HUB_OFFLINE": "1",
        }
        run = lambda *argv: _producer_only(list(argv), env, blocked)  # noqa: E731
        enq = run("enqueue", str(folder), "--job-id", "only-producer", "--json")
        assert enq.returncode == 0, enq.stderr
        assert json.loads(enq.stdout)["job_id"] == "only-producer"
        results = {
            "status": run("status", "only-producer"),
            "wait": run("wait", "only-producer", "--timeout", "0.2"),
            "jobs": run("jobs"),
            "config": run("config"),
            "doctor": run("doctor"),
            "models": run("models"),
            "train": run("train", str(data), "--max-steps", "1"),
            "evaluate": run("evaluate", "current", str(data), "--timeout", "1"),
        }
        for fmt in ("jsonl", "csv", "parquet"):
            results[f"export {fmt}"] = run("export", "only-producer", "--format", fmt, "-o", str(tmp_path / f"o.{fmt}"))
        needs = {"worker": "captioner[worker]", "review": "captioner[review]", "demo": "captioner[train]"}
        for command, extra in needs.items():
            results[command] = proc = run(command)
            assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], command
            assert extra in proc.stderr, (command, proc.stderr)
    for command, proc in results.items():
        assert "Traceback" not in proc.stdout + proc.stderr, (command, proc.stderr)
        assert proc.returncode in (0, 1), (command, proc.returncode, proc.stderr)
        if proc.returncode and command != "doctor":  # the doctor's exit 1 comes with its report of checks
            assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), (
                command,
                proc.stderr,
            )
    assert "caption workers" in results["doctor"].stdout
    assert results["jobs"].returncode == 0 and "only-producer" in results["jobs"].stdout
    assert results["train"].returncode == 0, results["train"].stderr  # checked here, sent to the training queue
    assert "no training worker" in results["evaluate"].stderr


def test_layer_rules_catch_a_planted_import(tmp_path: Path) -> None:
    """The import rules of make test fail on the imports they forbid: a room importing the caption worker, the
    producer importing the review page, anything importing the CLI, a sender importing the model."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is not installed (pip install -e '.[dev]')")
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT,
        tree,
        ignore=shutil.ignore_patterns(
            ".*", "tests", "bench", "docs", "deploy", "*.egg-info", "node_modules", "__pycache__"
        ),
    )
    clean = subprocess.run([lint], cwd=tree, capture_output=True, text=True, env={"PYTHONPATH": str(tree)})
    assert clean.returncode == 0, clean.stdout
    plants = {
        "training/scores.py": "import worker.service",
        "producer/sources.py": "import review.server",
        "review/pages.py": "import cli.base",
        "exports/rows.py": "import model.engine",
    }
    for path, line in plants.items():
        target = tree / path
        original = target.read_text()
        target.write_text(original + f"\n{line}  # planted\n")
        broken = subprocess.run([lint], cwd=tree, capture_output=True, text=True, env={"PYTHONPATH": str(tree)})
        target.write_text(original)
        assert broken.returncode != 0 and "BROKEN" in broken.stdout, (path, broken.stdout)
