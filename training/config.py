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

#: Metrics that training and promotion can rank by (training.scores.caption_metrics returns them).
METRIC_NAMES = ("wer", "cer", "bleu4", "rouge_l", "cider")
#: Names resolve_precision understands; whether fp16 is possible is only known on the worker's device.
PRECISIONS = ("auto", "no", "none", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
SCHEDULERS = ("linear", "cosine", "constant")
REPORTERS = ("none", "tensorboard")
#: transformers' TrainingArguments names accepted as aliases of our options (same-named options need none):
#: max_steps, learning_rate, weight_decay, max_grad_norm, warmup_steps, warmup_ratio, gradient_checkpointing,
#: eval_steps, save_steps, save_total_limit, seed and report_to are ours as they are.
HF_ALIASES = {
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler",
    "load_best_model_at_end": "load_best_at_end",
    "metric_for_best_model": "metric_for_best",
    "logging_steps": "log_steps",
}
#: TrainingArguments' precision flags: true picks that half type for mixed_precision; both false is "no".
HALF_FLAGS = ("fp16", "bf16")


@dataclass
class TrainConfig:
    """Every training knob; saved as ``train_config.json`` next to each checkpoint and the final weights."""

    # Hub id or local save_pretrained directory to start from (safetensors only).
    base_model: str = "microsoft/git-base"
    learning_rate: float = 5e-5
    # "linear" decays to 0 at the last step (the HF Trainer default), "cosine" along a half cosine to 0,
    # "constant" keeps it flat; all after warmup.
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    # Warmup as a fraction of all steps (used when warmup_steps is 0; giving both is a mistake).
    warmup_ratio: float = 0.0
    # AdamW decoupled decay, applied to weight matrices only (not biases, norms or other 1-d tensors).
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 50
    # Images per forward pass and process; an optimizer step sees batch_size * grad_accum * num_processes images.
    batch_size: int = 32
    grad_accum: int = 2
    # Processes of a distributed (data parallel) run, one per GPU, or CPU processes (gloo) where no GPU is;
    # None: the training worker's CAPTIONER_TRAIN_PROCESSES. A run may resume with another count.
    num_processes: int | None = None
    # Recompute activations in the backward pass: less memory for longer batches, about a third more compute.
    gradient_checkpointing: bool = False
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
    # "tensorboard": event files (loss, learning rate, evaluation metrics, sample captions) in the run directory.
    report_to: str = "none"
    # LoRA adapters (peft) instead of a full fine-tune when > 0: their rank. Stored versions are always full
    # models (the adapters merged in), so caption workers never need peft.
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # Comma-separated module names that get adapters: GIT's text attention (query, value) and its image
    # encoder's (q_proj, v_proj). Left at this default, another family gets its own text-side attention
    # (model/families.py, each adapter's lora_targets).
    lora_target_modules: str = "query,value,q_proj,v_proj"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A checked config from JSON-like values: unknown keys, wrong types and bad values are ConfigErrors."""
        data = canonical_options(data)
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
            raise ConfigError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, not {self.lr_scheduler!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            raise ConfigError(
                "warmup_steps and warmup_ratio both set; give one (warmup_ratio is used when steps are 0)"
            )
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"num_processes must be at least 1, got {self.num_processes}")
        if self.report_to not in REPORTERS:
            raise ConfigError(f"report_to must be one of {', '.join(REPORTERS)}, not {self.report_to!r}")
        if self.lora_r < 0 or self.lora_alpha < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("LoRA needs lora_r >= 0 (0: off), lora_alpha >= 1 and lora_dropout in [0, 1)")
        if self.lora_r and not self.lora_modules():
            raise ConfigError("lora_target_modules names no module (comma-separated names, e.g. query,value)")
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

    def lora_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


def canonical_options(data: dict[str, Any]) -> dict[str, Any]:
    """Options with TrainingArguments aliases replaced by our names; unknown keys and clashes are ConfigErrors.

    A clash is two names for one option with different values (``batch_size=8`` and
    ``per_device_train_batch_size=4``, ``fp16`` and ``bf16`` both true, ``bf16=true`` with ``mixed_precision=no``).
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(k for k in data if k not in known and k not in HF_ALIASES and k not in HALF_FLAGS)
    if unknown:
        names = ", ".join(sorted(known | set(HF_ALIASES) | set(HALF_FLAGS)))
        raise ConfigError(f"unknown training option(s): {', '.join(unknown)} (known: {names})")
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}

    def put(written: str, key: str, value: Any) -> None:
        if key in out and out[key] != value:
            raise ConfigError(
                f"{given_as[key]}={out[key]!r} and {written}={value!r} set the same option ({key}); give one"
            )
        out[key], given_as[key] = value, written

    for key, value in data.items():
        if key not in HALF_FLAGS:
            put(key, HF_ALIASES.get(key, key), value)
    halves = {k: data[k] for k in HALF_FLAGS if k in data}
    for key, value in halves.items():
        _check_type(key, value, bool)
    if halves:
        on = [k for k, v in halves.items() if v]
        if len(on) > 1:
            raise ConfigError("fp16 and bf16 are both true; choose one (or --set mixed_precision=...)")
        put(on[0] if on else "/".join(halves), "mixed_precision", on[0] if on else "no")
    return out


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
    target = HF_ALIASES.get(key, key)
    if target not in hints and key not in HALF_FLAGS:
        known = sorted({*hints, *HF_ALIASES, *HALF_FLAGS})
        raise ConfigError(f"--set {key}: no such training option (known: {', '.join(known)})")
    allowed = _allowed(bool if key in HALF_FLAGS else hints[target])
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
