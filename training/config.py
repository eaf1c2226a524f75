"""The fine-tune's knobs as one dataclass, checked without torch: the producer validates a job before sending it.

``TrainConfig.from_dict`` refuses unknown keys and wrong types, ``check`` everything that needs no data and no
device; ``parse_override`` turns a command line's ``KEY=VALUE`` into a typed field value.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from common.errors import ConfigError

#: Metrics that training and promotion can rank by (training.metrics.caption_metrics returns them).
METRIC_NAMES = ("wer", "cer", "bleu4", "rouge_l", "cider")
#: Names resolve_precision understands; whether fp16 is possible is only known on the worker's device.
PRECISIONS = ("auto", "no", "none", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
SCHEDULERS = ("linear", "constant")


@dataclass
class TrainConfig:
    """Every training knob; saved as ``train_config.json`` next to each checkpoint and the final weights."""

    # Hub id or local save_pretrained directory to start from (safetensors only).
    base_model: str = "microsoft/git-base"
    learning_rate: float = 5e-5
    # "linear" decays to 0 at the last step (the HF Trainer default); "constant" keeps it flat; both after warmup.
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    # AdamW decoupled decay, applied to weight matrices only (not biases, norms or other 1-d tensors).
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 50
    # Images per forward pass; an optimizer step sees batch_size * grad_accum images.
    batch_size: int = 32
    grad_accum: int = 2
    # "auto": bf16 autocast on GPUs that have it, fp16 (+ loss scaling) on older GPUs, none on CPU.
    # Also "bf16", "fp16" (CUDA only) or "no".
    mixed_precision: str = "auto"
    eval_steps: int = 50
    save_steps: int = 50
    # Checkpoints kept; the best and the latest are never deleted.
    save_total_limit: int = 3
    load_best_at_end: bool = True
    metric_for_best: str = "wer"
    # Used by callers that split one dataset (training.data.split_examples); train() takes both sets.
    test_fraction: float = 0.1
    seed: int = 42
    # Optimizer steps to stop at (smoke runs, demos); None = epochs * steps per epoch.
    max_steps: int | None = None
    # Generation length at evaluation (tokens, prompt included), as the engine's GenParams.max_length.
    max_length: int = 50
    # Caption tokens per training label ([CLS] and [SEP] included); longer captions are truncated.
    max_target_tokens: int = 32
    # Evaluate on the first N eval examples only (None = all).
    eval_max_samples: int | None = None
    eval_batch_size: int = 16
    # Evaluate once before the first step, so progress shows where training started.
    eval_on_start: bool = False
    # Report training loss to on_progress every N steps.
    log_steps: int = 10
    device: str = "auto"
    # Preprocessed pixel values are kept in memory when the whole dataset fits in this many MiB.
    pixel_cache_mb: int = 1024
    # Threads that read and preprocess images when they are not cached.
    loader_threads: int = 4

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A checked config from JSON-like values: unknown keys, wrong types and bad values are ConfigErrors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            _check_type(name, value, hints[name])
        cfg = cls(**data)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Everything that can be wrong without looking at the data or the device."""
        positive = ("epochs", "batch_size", "grad_accum", "eval_steps", "save_steps", "save_total_limit", "log_steps")
        for name in (*positive, "max_length", "max_target_tokens", "eval_batch_size", "loader_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training option {name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "pixel_cache_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"training option {name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("weight_decay and max_grad_norm must be >= 0 (max_grad_norm 0: no clipping)")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 or None, got {self.max_steps}")
        if self.eval_max_samples is not None and self.eval_max_samples < 1:
            raise ConfigError(f"eval_max_samples must be at least 1 or None, got {self.eval_max_samples}")
        if self.max_target_tokens < 3:
            raise ConfigError("max_target_tokens must leave room for [CLS], one word and [SEP] (at least 3)")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"lr_scheduler must be 'linear' or 'constant', not {self.lr_scheduler!r}")
        if self.mixed_precision.strip().lower() not in PRECISIONS:
            raise ConfigError(f"unknown mixed_precision {self.mixed_precision!r}: use auto, bf16, fp16 or no")
        if self.metric_for_best not in METRIC_NAMES:
            raise ConfigError(f"metric_for_best must be one of {', '.join(METRIC_NAMES)}, not {self.metric_for_best!r}")
        if self.load_best_at_end and self.save_steps % self.eval_steps:
            # As in the HF Trainer: a checkpoint can only be ranked when an evaluation ran at its step.
            raise ConfigError(
                f"load_best_at_end needs save_steps ({self.save_steps}) to be a multiple of eval_steps "
                f"({self.eval_steps}); set both (e.g. --eval-steps {self.eval_steps} --set save_steps="
                f"{self.eval_steps}) or --set load_best_at_end=false"
            )


def _allowed(hint: Any) -> tuple[type, ...]:
    """The Python types a field accepts (``int | None`` -> int, NoneType); an int is a valid float."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    out: list[type] = []
    for arg in args:
        out += [int, float] if arg is float else [arg]
    return tuple(out)


def _check_type(name: str, value: Any, hint: Any) -> None:
    allowed = _allowed(hint)
    # bool is an int subclass: `epochs: true` is a mistake, not 1.
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        words = {int: "an integer", float: "a number", str: "text", bool: "true or false", type(None): "null"}
        kinds = [words[t] for t in allowed if not (t is int and float in allowed)]
        raise ConfigError(f"training option {name} must be {' or '.join(kinds)}, got {type(value).__name__} {value!r}")


def parse_override(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from a command line -> (field, typed value); unknown keys and bad values are ConfigErrors."""
    key, sep, text = item.partition("=")
    key, text = key.strip().replace("-", "_"), text.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set grad_accum=4")
    hints = typing.get_type_hints(TrainConfig)
    if key not in hints:
        raise ConfigError(f"--set {key}: no such training option (known: {', '.join(sorted(hints))})")
    allowed = _allowed(hints[key])
    if type(None) in allowed and text.lower() in ("none", "null", ""):
        return key, None
    try:
        if bool in allowed:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return key, lowered in ("true", "1", "yes", "on")
        if int in allowed and float not in allowed:
            return key, int(text)
        if float in allowed:
            return key, float(text)
    except ValueError:
        want = "true or false" if bool in allowed else "an integer" if float not in allowed else "a number"
        raise ConfigError(f"--set {key}={text}: {key} must be {want}") from None
    return key, text
