"""Training checkpoints on disk: pickle-free (weights and optimizer tensors in safetensors, the rest JSON), resumable,
rotated, and the final model directory with its version file.

Layout of a run directory::

    <run>/checkpoints/step-<N>/   model (save_pretrained), processor, optimizer.safetensors, rng_state.safetensors,
                                  train_config.json, trainer_state.json (written last: without it, no checkpoint)
    <run>/final/                  the chosen checkpoint's model files, train_config.json and captioner.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError
from common.store import LOWER_IS_BETTER
from common.store import META as VERSION_FILE
from training.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINAL = "final"
CONFIG_FILE = "train_config.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
#: In a checkpoint of a LoRA run: the adapters' weights (the base model's are not repeated).
ADAPTER_RUN = "adapter_model.safetensors"


def fresh_state(fingerprint: str) -> dict[str, Any]:
    return {"step": 0, "history": [], "dataset_fingerprint": fingerprint, "last_loss": None, "processes": 1}


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit() or not (path / STATE_FILE).is_file():
        return None
    return int(name[5:])


def checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (an interrupted save is a ``.tmp`` folder and never listed)."""
    found = [(_step_of(p), p) for p in ckpt_root.iterdir() if p.is_dir()] if ckpt_root.is_dir() else []
    return sorted((step, p) for step, p in found if step is not None)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = checkpoints(ckpt_root)
    return found[-1][1] if found else None


def last_saved(ckpt_root: Path) -> int | None:
    found = checkpoints(ckpt_root)
    return found[-1][0] if found else None


def read_state(checkpoint: Path, fingerprint: str) -> dict[str, Any]:
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("dataset_fingerprint") != fingerprint:
        raise ConfigError(
            f"{checkpoint} was trained on another dataset (fingerprint {state.get('dataset_fingerprint')} != "
            f"{fingerprint}); use a new output directory, or delete {checkpoint.parent} to start over"
        )
    return state


def save_checkpoint(
    engine: Any,
    adapters: Any,
    optimizer: Any,
    scaler: Any,
    state: dict[str, Any],
    cfg: TrainConfig,
    ckpt_root: Path,
    step: int,
) -> Path:
    """Weights (the LoRA adapters only, for a LoRA run), processor, optimizer and RNG state, config and counters;
    written to a temp folder, then renamed."""
    from safetensors.torch import save_file

    target = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    quiet_progress_bars()
    if adapters is not None:
        from training.lora import save_adapters

        save_adapters(adapters, tmp)
    else:
        engine.model.save_pretrained(tmp, safe_serialization=True)
    engine.processor.save_pretrained(tmp)
    tensors, scalars = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / RNG_FILE))
    saved = {
        **state,
        "optimizer": {"param_groups": optimizer.state_dict()["param_groups"], "scalars": scalars},
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2), encoding="utf-8")
    # The state file is written last: a folder without it is not a checkpoint (see _step_of).
    (tmp / STATE_FILE).write_text(json.dumps(saved, indent=2), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def quiet_progress_bars() -> None:
    """No "Writing model shards" / "Loading weights" bars from transformers: one per checkpoint or evaluation
    clutters a worker's log and the demo's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as ``"<param>.<name>"`` tensors (safetensors) and scalars (JSON): nothing is pickled."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, scalars


def load_training_state(checkpoint: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Optimizer moments and step counts, and the RNG, as the checkpoint left them (``state`` is its state file)."""
    from safetensors.torch import load_file

    per_param: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(checkpoint / OPTIMIZER_FILE)).items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    saved = state.pop("optimizer")
    for key, value in saved["scalars"].items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    rng = load_file(str(checkpoint / RNG_FILE))
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1) if f"cuda.{i}" in rng]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    log.info("resumed from %s at step %d", checkpoint, state["step"])


def warn_on_changed_order(checkpoint: Path, cfg: TrainConfig, processes: int) -> None:
    """Resuming with another batch size, accumulation, seed or process count is allowed, but the data order
    changes mid-epoch (and with it the global batch, unless batch_size makes up for the processes)."""
    try:
        saved = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        saved_cfg = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    changed = [k for k in ("batch_size", "grad_accum", "seed") if saved_cfg.get(k) != getattr(cfg, k)]
    if saved.get("processes", 1) != processes:
        changed.append(f"processes {saved.get('processes', 1)} -> {processes}")
    if changed:
        log.warning("resuming %s with changed %s: the rest of this epoch sees a different order", checkpoint, changed)


def _score(metrics: dict[str, float], cfg: TrainConfig) -> float | None:
    value = metrics.get(cfg.metric_for_best)
    if value is None:
        return None
    return value if cfg.metric_for_best in LOWER_IS_BETTER else -value


def best_step(ckpt_root: Path, cfg: TrainConfig, state: dict[str, Any]) -> int | None:
    """The saved step whose evaluation scored best on ``metric_for_best`` (earliest on ties)."""
    saved = {step for step, _ in checkpoints(ckpt_root)}
    ranked = [
        (score, rec["step"])
        for rec in state["history"]
        if rec["step"] in saved and (score := _score(rec["metrics"], cfg)) is not None
    ]
    return min(ranked)[1] if ranked else None


def rotate(ckpt_root: Path, cfg: TrainConfig, state: dict[str, Any]) -> None:
    """Delete the oldest checkpoints beyond ``save_total_limit``, never the best or the latest."""
    found = checkpoints(ckpt_root)
    keep = {best_step(ckpt_root, cfg, state), found[-1][0] if found else None}
    extra = len(found) - cfg.save_total_limit
    for step, path in found:
        if extra <= 0:
            break
        if step not in keep:
            shutil.rmtree(path)
            extra -= 1


def finalize(
    out_dir: Path, ckpt_root: Path, cfg: TrainConfig, state: dict[str, Any], engine: Any = None, adapters: Any = None
) -> Path:
    """The chosen checkpoint as a full model in ``out_dir/final``, with ``train_config.json`` and a version file.

    A full fine-tune's checkpoint files are copied; a LoRA run's adapters are loaded into ``adapters`` (the live
    peft wrapper) and merged into the base weights, so the version loads anywhere without peft.
    """
    best = best_step(ckpt_root, cfg, state) if cfg.load_best_at_end else None
    chosen = ckpt_root / f"step-{best}" if best is not None else latest_checkpoint(ckpt_root)
    assert chosen is not None, "training always saves its last step"
    final, tmp = out_dir / FINAL, out_dir / f"{FINAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if (chosen / ADAPTER_RUN).is_file():
        from training.lora import load_adapters, merged

        load_adapters(adapters, chosen)
        quiet_progress_bars()
        merged(adapters).save_pretrained(tmp, safe_serialization=True)
        engine.processor.save_pretrained(tmp)
    else:
        skip = {OPTIMIZER_FILE, RNG_FILE, STATE_FILE}
        shutil.copytree(chosen, tmp, ignore=lambda _dir, names: [n for n in names if n in skip])
    (tmp / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2), encoding="utf-8")
    step = int(chosen.name.removeprefix("step-"))
    metrics = next((r["metrics"] for r in reversed(state["history"]) if r["step"] == step), {})
    marker = {
        # The weights' own hash: two runs never share a version unless they produced the same weights.
        "version": f"{out_dir.name}@step-{step}-{_weights_hash(tmp)}",
        "base_model": cfg.base_model,
        "step": step,
        "dataset_fingerprint": state["dataset_fingerprint"],
        "metrics": metrics,
    }
    (tmp / VERSION_FILE).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("final model (step %d) written to %s", step, final)
    return final


def _weights_hash(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(model_dir.glob("*.safetensors")):
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:12]
