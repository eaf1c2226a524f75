"""The model store: a directory of versioned models and a pointer to the promoted one. No torch.

Training writes versions here; caption workers read from it.

Layout::

    <store>/<version>/            save_pretrained output (safetensors) + processor + captioner.json
    <store>/CURRENT               the promoted version's name (replaced atomically)

``captioner.json`` holds the version, base model, dataset fingerprint, training parameters, metrics and
creation time; evaluations append to it. Workers started with ``CAPTIONER_MODEL=@current`` follow CURRENT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

#: The version file beside a model's weights: its version, base model, data fingerprint, parameters and metrics.
#: Training writes it, the store keeps it, and the caption engine reports its "version".
META = "captioner.json"
CURRENT = "CURRENT"
#: Metrics where lower is better; every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"wer", "cer", "loss"})


@dataclass
class ModelVersion:
    version: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.meta.get("metrics") or {})

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "path": str(self.path), **self.meta}


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelStore:
    """Versioned models in a directory; promotion is one atomic file replace."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def new_version_name(self, tag: str = "") -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return f"v{stamp}-{os.urandom(3).hex()}" + (f"-{tag}" if tag else "")

    def add(self, model_dir: Path, meta: dict[str, Any], version: str | None = None) -> ModelVersion:
        """Copy a saved model into the store under a new version, with its metadata beside the weights."""
        version = version or self.new_version_name()
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / version
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{version}."))
        try:
            for item in Path(model_dir).iterdir():
                if item.is_file() and item.suffix not in {".bin", ".pt", ".pth", ".pkl"}:
                    shutil.copy2(item, staging / item.name)
            meta = {**meta, "version": version, "created": meta.get("created", time.time())}
            (staging / META).write_text(json.dumps(meta, indent=2, default=str))
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ModelVersion(version, target, meta)

    def get(self, version: str) -> ModelVersion:
        path = self.root / version
        if not (path / META).is_file():
            raise ConfigError(f"no model version {version!r} in {self.root} (captioner models lists them)")
        return ModelVersion(version, path, json.loads((path / META).read_text()))

    def list(self) -> list[ModelVersion]:
        if not self.root.is_dir():
            return []
        found = [self.get(p.name) for p in self.root.iterdir() if (p / META).is_file() and not p.name.startswith(".")]
        return sorted(found, key=lambda v: v.meta.get("created", 0))

    def current(self) -> ModelVersion | None:
        pointer = self.root / CURRENT
        if not pointer.is_file():
            return None
        return self.get(pointer.read_text().strip())

    def promote(self, version: str, *, require_no_worse: str | None = None) -> ModelVersion:
        """Point CURRENT at ``version``; with a metric name, refuse when it scores worse than the current one."""
        new = self.get(version)
        old = self.current()
        if require_no_worse and old is not None and old.version != version:
            self._gate(new, old, require_no_worse)
        _atomic_write(self.root / CURRENT, version + "\n")
        return new

    @staticmethod
    def _gate(new: ModelVersion, old: ModelVersion, metric: str) -> None:
        a, b = new.metrics.get(metric), old.metrics.get(metric)
        if a is None:
            raise ConfigError(f"{new.version} has no {metric!r} score; evaluate it first (captioner evaluate)")
        if b is None:
            return
        same_data = new.meta.get("eval_fingerprint") == old.meta.get("eval_fingerprint")
        if not same_data:
            raise ConfigError(
                f"{new.version} and {old.version} were scored on different datasets; evaluate both on the same one"
            )
        worse = a > b if metric in LOWER_IS_BETTER else a < b
        if worse:
            raise ConfigError(f"{new.version} is worse than {old.version} on {metric}: {a:.4f} vs {b:.4f}")

    def record_evaluation(
        self,
        version: str,
        fingerprint: str,
        metrics: dict[str, float],
        samples: Sequence[dict[str, Any]] | None = None,
        *,
        dataset: str | None = None,
        n: int | None = None,
    ) -> ModelVersion:
        """Store an evaluation with the version (and a few of its captions beside their references, when given);
        the latest one is its headline ``metrics``. ``dataset`` and ``n`` name what it was measured on."""
        mv = self.get(version)
        meta = dict(mv.meta)
        entry: dict[str, Any] = {"fingerprint": fingerprint, "metrics": metrics, "at": time.time()}
        if dataset is not None:
            entry["dataset"], entry["n"] = dataset, n
        if samples:
            entry["samples"] = list(samples)
        meta.setdefault("evaluations", []).append(entry)
        meta["metrics"], meta["eval_fingerprint"] = metrics, fingerprint
        _atomic_write(mv.path / META, json.dumps(meta, indent=2, default=str))
        return ModelVersion(version, mv.path, meta)


def resolve_model(model: str, store_root: Path | None) -> str:
    """``@current`` / ``@<version>`` name models in the store; anything else is a hub id or a directory."""
    if not model.startswith("@"):
        return model
    if store_root is None:
        raise ConfigError(f"CAPTIONER_MODEL={model} needs CAPTIONER_MODEL_STORE")
    store = ModelStore(store_root)
    if model == "@current":
        current = store.current()
        if current is None:
            raise ConfigError(f"no promoted model in {store.root} yet (captioner promote VERSION)")
        return str(current.path)
    return str(store.get(model[1:]).path)
