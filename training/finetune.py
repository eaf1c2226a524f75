"""Fine-tune GIT on captioned images: a plain PyTorch loop with safetensors checkpoints, resume and generated-text eval.

The seed recipe (HF image-captioning guide) with its two flaws fixed: padding positions are -100 in the labels
(they never enter the loss), and evaluation scores captions the model *generates*, not teacher-forced argmax.
Checkpoints hold no pickles: weights and optimizer tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError, SourceError
from training.checkpoints import (
    CHECKPOINTS,
    best_step,
    finalize,
    fresh_state,
    last_saved,
    latest_checkpoint,
    load_training_state,
    read_state,
    rotate,
    save_checkpoint,
    warn_on_changed_order,
)
from training.config import TrainConfig
from training.data import Example, dataset_fingerprint
from training.evaluation import evaluate_items
from training.pixels import Item, PixelSource, local_image_policy
from worker.engine import CaptionEngine, EngineConfig, half_dtype, resolve_device
from worker.images import ImagePolicy

log = logging.getLogger(__name__)


class TrainStatus(StrEnum):
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    # Another runner holds the job's lock (ours lapsed): stopped without writing anything more.
    LOST_LOCK = "lost_lock"


@dataclass
class TrainResult:
    """What a training run produced. ``final_dir`` is None when the run was cancelled or lost its lock."""

    final_dir: Path | None
    best_metrics: dict[str, float]
    steps: int
    status: TrainStatus
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None


def _noop(_: dict[str, Any]) -> None:
    return None


def _never() -> bool:
    return False


# --- the loop --------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    train_set: list[Example],
    eval_set: list[Example],
    out_dir: Path,
    *,
    on_progress: Callable[[dict[str, Any]], None] = _noop,
    should_stop: Callable[[], bool] = _never,
    lost: Callable[[], bool] = _never,
    image_policy: ImagePolicy | None = None,
) -> TrainResult:
    """Fine-tune ``cfg.base_model`` on ``train_set``, evaluating on ``eval_set``; resumes from ``out_dir``.

    ``should_stop`` (a user's cancel) ends the run at the next step with a checkpoint; ``lost`` (the run
    directory now belongs to another runner) ends it at the next step, before any further write.
    """
    # 1. Check the config, pick device and precision, find a checkpoint to resume from.
    _check_config(cfg, train_set, eval_set)
    out_dir = Path(out_dir)
    ckpt_root = out_dir / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    fingerprint = dataset_fingerprint(train_set)
    resume = latest_checkpoint(ckpt_root)
    state = read_state(resume, fingerprint) if resume else fresh_state(fingerprint)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.mixed_precision, device)
    torch.manual_seed(cfg.seed)

    # 2. Model and processor: the latest checkpoint's when resuming, else the base model (safetensors only).
    engine = CaptionEngine.load(EngineConfig(model=str(resume or cfg.base_model), device=cfg.device, dtype="float32"))
    model = engine.model
    log.info("training %s on %s (%s), resume=%s", cfg.base_model, device, amp_dtype or "fp32", resume)

    # 3. Images -> pixel values, cached in memory when they fit; unreadable images are dropped with a warning.
    policy = image_policy or local_image_policy(train_set + eval_set)
    pixels = PixelSource(engine, policy, threads=cfg.loader_threads, cache_mb=cfg.pixel_cache_mb)
    train_items = pixels.admit(train_set, "train")
    eval_items = pixels.admit(eval_set[: cfg.eval_max_samples] if cfg.eval_max_samples else eval_set, "eval")
    if not train_items:
        raise SourceError("no training image could be read; check the dataset paths")

    # 4. Optimizer (+ fp16 loss scaler); their state and the RNG come back from the checkpoint.
    optimizer = _make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    if resume:
        load_training_state(resume, optimizer, scaler, state)
        warn_on_changed_order(resume, cfg)
    micro_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    step = int(state["step"])
    clock = _Clock(cfg, total_steps, step)
    autocast = _autocast(device, amp_dtype)

    def evaluate_now() -> dict[str, Any]:
        started = time.perf_counter()
        metrics, samples, _ = evaluate_items(engine, pixels, eval_items, max_length=cfg.max_length,
                                             batch_size=cfg.eval_batch_size, autocast=autocast)  # fmt: skip
        clock.eval_done(time.perf_counter() - started)
        record = {"step": step, "epoch": step / steps_per_epoch, "metrics": metrics}
        state["history"].append(record)
        on_progress({**_progress(clock, step, steps_per_epoch, state), **record, "kind": "eval", "samples": samples})
        log.info("eval step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    def save_now() -> Path:
        path = save_checkpoint(engine, optimizer, scaler, state, cfg, ckpt_root, step)
        rotate(ckpt_root, cfg, state)
        return path

    def gone() -> TrainResult | None:
        if not lost():
            return None
        log.warning("training lock lost at step %d: another runner owns %s; stopping without writing", step, out_dir)
        return _result(None, ckpt_root, step, TrainStatus.LOST_LOCK, state, cfg)

    if cfg.eval_on_start and step == 0 and eval_items and not state["history"]:
        evaluate_now()

    # 5. The loop: one optimizer step = grad_accum micro-batches; eval, save and stop checks between steps.
    model.train()
    running, running_n = 0.0, 0
    order: list[int] = []
    order_epoch = -1
    while step < total_steps:
        if stopped := gone():
            return stopped
        if should_stop():
            if last_saved(ckpt_root) != step:
                save_now()
            log.info("training stopped at step %d with a checkpoint; running again with the same out_dir resumes", step)
            return _result(None, ckpt_root, step, TrainStatus.CANCELLED, state, cfg)
        started = time.perf_counter()
        lr = _lr_at(cfg, step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if order_epoch != epoch:
            order, order_epoch = _epoch_order(len(train_items), cfg.seed, epoch), epoch
        micro = range(in_epoch * cfg.grad_accum, min((in_epoch + 1) * cfg.grad_accum, micro_per_epoch))
        step_loss = 0.0
        for m in micro:
            batch = [train_items[i] for i in order[m * cfg.batch_size : (m + 1) * cfg.batch_size]]
            loss = _micro_step(engine, pixels, batch, cfg, epoch, autocast, device)
            (scaler.scale(loss / len(micro)) if scaler else loss / len(micro)).backward()
            step_loss += float(loss.detach()) / len(micro)
        _optimizer_step(model, optimizer, scaler, cfg)
        step += 1
        state["step"] = step
        running, running_n = running + step_loss, running_n + 1
        clock.step_done(time.perf_counter() - started)

        # 6. Report, evaluate and save on their schedules; the last step always gets both.
        last = step == total_steps
        if step % cfg.log_steps == 0 or last:
            state["last_loss"] = running / running_n
            on_progress({**_progress(clock, step, steps_per_epoch, state), "kind": "train", "lr": lr})
            running, running_n = 0.0, 0
        if eval_items and (step % cfg.eval_steps == 0 or last):
            evaluate_now()
            model.train()
        if step % cfg.save_steps == 0 or last:
            if stopped := gone():
                return stopped
            save_now()

    # 7. The best (or last) checkpoint becomes out_dir/final, with its config and a version marker.
    if stopped := gone():
        return stopped
    if last_saved(ckpt_root) is None:  # max_steps=0: nothing ran, the base model is the result
        save_now()
    final = finalize(out_dir, ckpt_root, cfg, state)
    return _result(final, ckpt_root, step, TrainStatus.COMPLETED, state, cfg)


def _check_config(cfg: TrainConfig, train_set: list[Example], eval_set: list[Example]) -> None:
    cfg.check()
    if not train_set:
        raise ConfigError("the training set is empty")
    if cfg.load_best_at_end and not eval_set:
        raise ConfigError("load_best_at_end needs an evaluation set; give one or set load_best_at_end=False")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` on ``device``; None means plain fp32.

    ``auto`` is the device's fast half type (``worker.engine.half_dtype``, the rule the caption engine uses) on
    GPUs; on CPU it stays fp32: autocast there pays only with native bf16 units, and fp32 keeps CPU runs
    exactly reproducible. Ask for ``bf16`` to train in bf16 on such a CPU.
    """
    text = name.strip().lower()
    if text in ("no", "none", "fp32", "float32"):
        return None
    if text == "auto":
        return half_dtype(device) if device.type == "cuda" else None
    if text in ("bf16", "bfloat16"):
        return torch.bfloat16
    if text in ("fp16", "float16"):
        if device.type != "cuda":
            raise ConfigError("mixed_precision fp16 needs a CUDA device; use bf16 or no on CPU")
        return torch.float16
    raise ConfigError(f"unknown mixed_precision {name!r}: use auto, bf16, fp16 or no")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Callable[[], AbstractContextManager[Any]]:
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def encode_captions(tokenizer: Any, captions: list[str], max_tokens: int, *, pad_to: int | None = None) -> dict:
    """``input_ids``, ``attention_mask`` and ``labels`` with every padding position set to -100.

    The seed recipe left pads in the labels, so the model was also trained to predict [PAD] after [SEP]
    and the loss depended on how much padding a batch happened to get.
    """
    enc = tokenizer(
        captions,
        padding="max_length" if pad_to else "longest",
        max_length=pad_to or max_tokens,
        truncation=True,
        return_tensors="pt",
    )
    if pad_to and pad_to > max_tokens:
        # Padding beyond max_tokens (tests compare losses across padding lengths) must not lengthen captions.
        short = tokenizer(captions, truncation=True, max_length=max_tokens)["input_ids"]
        if any(len(ids) != int(mask.sum()) for ids, mask in zip(short, enc["attention_mask"], strict=True)):
            raise ValueError("a caption is longer than max_tokens; pad_to must not change truncation")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _micro_step(
    engine: CaptionEngine,
    pixels: PixelSource,
    batch: list[Item],
    cfg: TrainConfig,
    epoch: int,
    autocast: Callable[[], AbstractContextManager[Any]],
    device: torch.device,
) -> torch.Tensor:
    captions = draw_captions(batch, cfg.seed, epoch)
    enc = encode_captions(engine.processor.tokenizer, captions, cfg.max_target_tokens)
    pixel_values, kept = pixels.pixels(batch)
    if len(kept) < len(batch):
        kept_ids = {id(item) for item in kept}
        captions = [c for item, c in zip(batch, captions, strict=True) if id(item) in kept_ids]
        enc = encode_captions(engine.processor.tokenizer, captions, cfg.max_target_tokens)
    with autocast():
        return caption_loss(
            engine.model,
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            pixel_values=pixel_values.to(device, non_blocking=True),
            labels=enc["labels"].to(device),
        )


def draw_captions(batch: list[Item], seed: int, epoch: int) -> list[str]:
    """One caption per image, drawn afresh each epoch and seeded by (seed, epoch, image): resume replays it."""
    return [random.Random(f"{seed}:{epoch}:{item.index}").choice(item.captions) for item in batch]


def caption_loss(
    model: Any,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the caption tokens whose label is not -100 (GIT's own loss, cheaper).

    ``GitForCausalLM(labels=...)`` projects every position onto the 30522-word vocabulary, the image tokens
    and padding included, then discards them: for git-base that is 197 of ~220 positions per image. Here only
    the positions that are scored are projected (roughly 15% of git-base's FLOPs and most of its logit memory).
    """
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False
    ).last_hidden_state
    # The last T positions are the text; position t predicts token t + 1.
    text = hidden[:, -input_ids.shape[1] : -1]
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(text[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _optimizer_step(model: Any, optimizer: Any, scaler: Any, cfg: TrainConfig) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _make_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a pure function, so resume needs no scheduler state."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler == "constant":
        return cfg.learning_rate
    span = max(1, total - cfg.warmup_steps)
    return cfg.learning_rate * max(0.0, (total - step) / span)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:order:{epoch}").shuffle(order)
    return order


# --- progress ----------------------------------------------------------------------------------------


class _Clock:
    """ETA from measured step times (recent-weighted) and measured evaluation times."""

    def __init__(self, cfg: TrainConfig, total: int, start_step: int) -> None:
        self.cfg, self.total = cfg, total
        self.started = time.perf_counter()
        self.step_s: float | None = None
        self.eval_s: float | None = None
        self.start_step = start_step

    def step_done(self, seconds: float) -> None:
        # The first step pays for lazy initialisation; an average that forgets it quickly keeps the ETA honest.
        self.step_s = seconds if self.step_s is None else 0.9 * self.step_s + 0.1 * seconds

    def eval_done(self, seconds: float) -> None:
        self.eval_s = seconds if self.eval_s is None else 0.5 * self.eval_s + 0.5 * seconds

    def eta(self, step: int) -> float | None:
        if self.step_s is None:
            return None
        left = self.total - step
        evals_left = left // self.cfg.eval_steps + (1 if left % self.cfg.eval_steps else 0)
        return left * self.step_s + evals_left * (self.eval_s or 0.0)


def _progress(clock: _Clock, step: int, steps_per_epoch: int, state: dict[str, Any]) -> dict[str, Any]:
    """Where the run stands; ``metrics`` is the latest evaluation (at ``metrics_step``), None before the first."""
    eta = clock.eta(step)
    latest = state["history"][-1] if state["history"] else {}
    return {
        "step": step,
        "total_steps": clock.total,
        "epoch": round(step / steps_per_epoch, 4),
        "loss": state.get("last_loss"),
        "metrics": latest.get("metrics"),
        "metrics_step": latest.get("step"),
        "eta_s": None if eta is None else round(eta, 2),
        "step_time_s": None if clock.step_s is None else round(clock.step_s, 4),
        "elapsed_s": round(time.perf_counter() - clock.started, 2),
    }


def _result(
    final: Path | None, ckpt_root: Path, step: int, status: TrainStatus, state: dict[str, Any], cfg: TrainConfig
) -> TrainResult:
    """The outcome; ``best_*`` describe the best *saved* checkpoint (the one ``final`` holds with load_best_at_end)."""
    best = best_step(ckpt_root, cfg, state)
    metrics = next((r["metrics"] for r in reversed(state["history"]) if r["step"] == best), {})
    return TrainResult(
        final_dir=final,
        best_metrics=dict(metrics),
        steps=step,
        status=status,
        history=list(state["history"]),
        best_step=best,
    )
