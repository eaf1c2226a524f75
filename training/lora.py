"""LoRA adapters through peft (the ``lora`` extra): added for training, saved as safetensors in checkpoints, and
merged into the base weights when a version is made, so a stored version is a full model that loads without peft."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from training.config import TrainConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: lora_target_modules' default (GIT's module names): a run that keeps it gets each family's own targets.
DEFAULT_TARGETS = next(f.default for f in fields(TrainConfig) if f.name == "lora_target_modules")


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "LoRA (lora_r > 0) needs peft on the training worker: pip install 'captioner[lora]', or train in full "
            "(lora_r=0)"
        ) from None
    return peft


def add_adapters(model: Any, cfg: TrainConfig, family_targets: str | None = None) -> Any:
    """Wrap ``model`` with LoRA adapters on ``cfg.lora_target_modules``; only the adapters are trainable.

    ``family_targets`` (a family's regex over module names, model/families.py) replaces the default module names,
    which are GIT's: a family's text-side attention gets the adapters unless the run names its own modules.

    peft replaces the targeted layers inside ``model`` itself, so the caption engine holding ``model`` generates
    with the adapters (evaluation during training), and the returned wrapper saves and merges them.
    """
    peft = require_peft()
    if family_targets and cfg.lora_target_modules == DEFAULT_TARGETS:
        if not any(re.fullmatch(family_targets, name) for name, _ in model.named_modules()):
            raise ConfigError(
                f"the family's LoRA targets {family_targets!r} match no layer of the model; name them "
                "with lora_target_modules"
            )
        lora = peft.LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=family_targets,
            bias="none",
        )
        return peft.get_peft_model(model, lora)
    wanted = set(cfg.lora_modules())
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not wanted & present:
        raise ConfigError(
            f"lora_target_modules {sorted(wanted)} match no layer of the model (e.g. query, value, q_proj, v_proj)"
        )
    lora = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=sorted(wanted & present),
        bias="none",
    )
    return peft.get_peft_model(model, lora)


def save_adapters(wrapped: Any, folder: Path) -> None:
    """The adapters' tensors (safetensors) and their LoRA settings (JSON)."""
    import peft
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in peft.get_peft_model_state_dict(wrapped).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    settings = wrapped.peft_config["default"].to_dict()
    (folder / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2, default=sorted), encoding="utf-8")


def load_adapters(wrapped: Any, folder: Path) -> None:
    import peft
    from safetensors.torch import load_file

    result = peft.set_peft_model_state_dict(wrapped, load_file(str(folder / ADAPTER_WEIGHTS)))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ConfigError(f"{folder} holds adapters for other layers ({missing[:3]}); use a new run directory")


def merged(wrapped: Any) -> Any:
    """The base model with the adapters folded into its weights: a plain GIT model again."""
    return wrapped.merge_and_unload()
