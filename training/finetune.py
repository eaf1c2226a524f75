"""Fine-tune GIT on captioned images: a plain PyTorch loop with safetensors checkpoints, resume and generated-text eval.

The seed recipe (HF image-captioning guide) with its two flaws fixed: padding positions are -100 in the labels
(they never enter the loss), and evaluation scores captions the model *generates*, not teacher-forced argmax.
Checkpoints hold no pickles: weights and optimizer tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError, ItemError, SourceError
from common.messages import GenParams, Source
from common.settings import DEFAULT_FORMATS
from common.store import LOWER_IS_BETTER
from common.store import META as VERSION_FILE
from training.config import TrainConfig
from training.data import Example, dataset_fingerprint
from training.metrics import caption_metrics
from worker.engine import CaptionEngine, EngineConfig, half_dtype, resolve_device
from worker.images import ImagePolicy, load_image

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINAL = "final"
CONFIG_FILE = "train_config.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
#: Captions shown with each evaluation.
SAMPLE_COUNT = 4


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
    resume = _latest_checkpoint(ckpt_root)
    state = _read_state(resume, fingerprint) if resume else _fresh_state(fingerprint)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.mixed_precision, device)
    torch.manual_seed(cfg.seed)

    # 2. Model and processor: the latest checkpoint's when resuming, else the base model (safetensors only).
    engine = CaptionEngine.load(EngineConfig(model=str(resume or cfg.base_model), device=cfg.device, dtype="float32"))
    model = engine.model
    log.info("training %s on %s (%s), resume=%s", cfg.base_model, device, amp_dtype or "fp32", resume)

    # 3. Images -> pixel values, cached in memory when they fit; unreadable images are dropped with a warning.
    policy = image_policy or local_image_policy(train_set + eval_set)
    pixels = _PixelSource(engine, policy, cfg)
    train_items = pixels.admit(train_set, "train")
    eval_items = pixels.admit(eval_set[: cfg.eval_max_samples] if cfg.eval_max_samples else eval_set, "eval")
    if not train_items:
        raise SourceError("no training image could be read; check the dataset paths")

    # 4. Optimizer (+ fp16 loss scaler); their state and the RNG come back from the checkpoint.
    optimizer = _make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    if resume:
        _load_training_state(resume, optimizer, scaler, state)
        _warn_on_changed_order(resume, cfg)
    micro_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    step = int(state["step"])
    clock = _Clock(cfg, total_steps, step)
    autocast = _autocast(device, amp_dtype)

    def evaluate_now() -> dict[str, Any]:
        started = time.perf_counter()
        metrics, samples = _evaluate(engine, pixels, eval_items, cfg, autocast)
        clock.eval_done(time.perf_counter() - started)
        record = {"step": step, "epoch": step / steps_per_epoch, "metrics": metrics}
        state["history"].append(record)
        on_progress({**_progress(clock, step, steps_per_epoch, state), **record, "kind": "eval", "samples": samples})
        log.info("eval step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    def save_now() -> Path:
        path = _save_checkpoint(engine, optimizer, scaler, state, cfg, ckpt_root, step)
        _rotate(ckpt_root, cfg, state)
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
            if _last_saved(ckpt_root) != step:
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
    if _last_saved(ckpt_root) is None:  # max_steps=0: nothing ran, the base model is the result
        save_now()
    final = _finalize(out_dir, ckpt_root, cfg, state)
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
    pixels: _PixelSource,
    batch: list[_Item],
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


def draw_captions(batch: list[_Item], seed: int, epoch: int) -> list[str]:
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


# --- images ------------------------------------------------------------------------------------------


@dataclass
class _Item:
    index: int
    image: str
    captions: list[str]


def local_image_policy(examples: list[Example]) -> ImagePolicy:
    """Reading rights for a dataset: its own folders only, public URLs only, the worker's default limits."""
    # Real paths: a dataset may link its files elsewhere (the HF cache does), and reads check the link's target.
    local = [ex.image for ex in examples if not ex.image.startswith(("http:", "https:"))]
    parents = sorted({os.path.dirname(os.path.realpath(image)) for image in local})
    roots: list[Path] = []
    for parent in parents:
        # Sorted order puts a folder before its subfolders, so each root is kept once.
        if not roots or not Path(parent).is_relative_to(roots[-1]):
            roots.append(Path(parent))
    return ImagePolicy(
        allowed_roots=tuple(roots),
        max_bytes=32 * 1024 * 1024,
        max_pixels=64_000_000,
        formats=DEFAULT_FORMATS,
        connect_timeout_s=5.0,
        total_timeout_s=20.0,
        max_redirects=5,
        allow_private=False,
    )


def _source(image: str) -> Source:
    return Source(url=image) if image.startswith(("http:", "https:")) else Source(path=image)


class _PixelSource:
    """Pixel values per example: decoded once and kept when the dataset fits the cache budget, else per batch."""

    def __init__(self, engine: CaptionEngine, policy: ImagePolicy, cfg: TrainConfig) -> None:
        self.engine = engine
        self.policy = policy
        self.threads = cfg.loader_threads
        size = engine.model.config.vision_config.image_size
        self.bytes_per_image = 3 * size * size * 4
        self.budget = cfg.pixel_cache_mb * 1024 * 1024
        self.cache: dict[str, torch.Tensor] = {}
        self.next_index = 0

    def admit(self, examples: list[Example], what: str) -> list[_Item]:
        """Items for ``examples``; with the cache on, every image is read now and unreadable ones are dropped."""
        items = [_Item(self.next_index + i, ex.image, list(ex.captions)) for i, ex in enumerate(examples)]
        self.next_index += len(items)
        if (len(self.cache) + len(items)) * self.bytes_per_image > self.budget:
            return items
        loaded = self._load([item.image for item in items])
        kept = []
        for item, tensor in zip(items, loaded, strict=True):
            if tensor is not None:
                self.cache[item.image] = tensor
                kept.append(item)
        if len(kept) < len(items):
            skipped = len(items) - len(kept)
            log.warning("%s: %d of %d images could not be read and are skipped", what, skipped, len(items))
        return kept

    def pixels(self, batch: list[_Item]) -> tuple[torch.Tensor, list[_Item]]:
        """Stacked pixel values and the items they belong to: an uncached image that fails now is left out."""
        missing = [item.image for item in batch if item.image not in self.cache]
        fresh = dict(zip(missing, self._load(missing), strict=True)) if missing else {}
        rows = [(item, self.cache.get(item.image, fresh.get(item.image))) for item in batch]
        kept = [(item, row) for item, row in rows if row is not None]
        if not kept:
            raise SourceError(f"none of {len(batch)} images in a batch could be read, e.g. {batch[0].image}")
        return torch.stack([row for _, row in kept]), [item for item, _ in kept]

    def _load(self, images: list[str]) -> list[torch.Tensor | None]:
        def one(image: str) -> torch.Tensor | None:
            try:
                image_rgb = load_image(_source(image), self.policy)
            except ItemError as exc:
                log.warning("image %s skipped: %s: %s", image, exc.code, exc)
                return None
            # The engine's own preprocessing, minus its pinning (thousands of small pinned tensors hurt on CUDA).
            out = self.engine.processor.image_processor(images=[image_rgb], return_tensors="pt")["pixel_values"]
            return torch.as_tensor(out[0]).to(torch.float32).contiguous()

        if len(images) <= 1 or self.threads == 1:
            return [one(image) for image in images]
        # A pool per call: thread start-up is noise next to decoding a batch, and nothing outlives the call.
        with ThreadPoolExecutor(min(self.threads, len(images)), thread_name_prefix="train-images") as pool:
            return list(pool.map(one, images))


# --- evaluation -------------------------------------------------------------------------------------


def _evaluate(
    engine: CaptionEngine,
    pixels: _PixelSource,
    items: list[_Item],
    cfg: TrainConfig,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics of generated captions (greedy, as the caption worker runs them) and a few samples."""
    engine.model.eval()
    params = GenParams(max_length=cfg.max_length)
    predictions: list[str] = []
    scored: list[_Item] = []
    for start in range(0, len(items), cfg.eval_batch_size):
        pixel_values, kept = pixels.pixels(items[start : start + cfg.eval_batch_size])
        with autocast():
            predictions.extend(engine.generate(pixel_values, params))
        scored.extend(kept)
    references = [item.captions for item in scored]
    samples = [
        {"image": item.image, "prediction": pred, "references": item.captions[:3]}
        for item, pred in zip(scored[:SAMPLE_COUNT], predictions, strict=False)
    ]
    return caption_metrics(predictions, references), samples


def evaluate_model(
    model_dir: Path,
    examples: list[Example],
    *,
    max_length: int = 50,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    image_policy: ImagePolicy | None = None,
) -> dict[str, Any]:
    """Generated-caption metrics of a saved model on ``examples`` (greedy, through the caption engine).

    Returns the metrics of ``caption_metrics``, ``n`` (images scored), ``samples`` (a few predictions with
    their references) and ``info`` (``failed`` unreadable images, ``seconds``, the model ``version``).
    """
    started = time.perf_counter()
    engine = CaptionEngine.load(EngineConfig(model=str(model_dir), device=device, dtype=dtype))
    policy = image_policy or local_image_policy(examples)
    params = GenParams(max_length=max_length)
    predictions: list[str] = []
    references: list[list[str]] = []
    used: list[Example] = []
    failed = 0
    for start in range(0, len(examples), batch_size):
        images, batch = [], []
        for ex in examples[start : start + batch_size]:
            try:
                images.append(load_image(_source(ex.image), policy))
                batch.append(ex)
            except ItemError as exc:
                log.warning("image %s skipped: %s: %s", ex.image, exc.code, exc)
                failed += 1
        if images:
            predictions.extend(engine.caption(images, params))
            references.extend(ex.captions for ex in batch)
            used.extend(batch)
    metrics: dict[str, Any] = caption_metrics(predictions, references)
    metrics["n"] = len(predictions)
    # Everything else that is a number lives under "info", so the top level is metrics + n only.
    metrics["info"] = {"failed": failed, "seconds": round(time.perf_counter() - started, 3), "version": engine.version}
    metrics["samples"] = [
        {"image": ex.image, "prediction": pred, "references": ex.captions[:3]}
        for ex, pred in zip(used[:SAMPLE_COUNT], predictions, strict=False)
    ]
    return metrics


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


# --- checkpoints -------------------------------------------------------------------------------------


def _fresh_state(fingerprint: str) -> dict[str, Any]:
    return {"step": 0, "history": [], "dataset_fingerprint": fingerprint, "last_loss": None}


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit() or not (path / STATE_FILE).is_file():
        return None
    return int(name[5:])


def _checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (an interrupted save is a ``.tmp`` folder and never listed)."""
    found = [(_step_of(p), p) for p in ckpt_root.iterdir() if p.is_dir()] if ckpt_root.is_dir() else []
    return sorted((step, p) for step, p in found if step is not None)


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = _checkpoints(ckpt_root)
    return found[-1][1] if found else None


def _last_saved(ckpt_root: Path) -> int | None:
    found = _checkpoints(ckpt_root)
    return found[-1][0] if found else None


def _read_state(checkpoint: Path, fingerprint: str) -> dict[str, Any]:
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("dataset_fingerprint") != fingerprint:
        raise ConfigError(
            f"{checkpoint} was trained on another dataset (fingerprint {state.get('dataset_fingerprint')} != "
            f"{fingerprint}); use a new output directory, or delete {checkpoint.parent} to start over"
        )
    return state


def _save_checkpoint(
    engine: CaptionEngine,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    state: dict[str, Any],
    cfg: TrainConfig,
    ckpt_root: Path,
    step: int,
) -> Path:
    """Weights, processor, optimizer and RNG state, config and counters; written to a temp folder, then renamed."""
    from safetensors.torch import save_file

    target = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    quiet_progress_bars()
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


def _load_training_state(checkpoint: Path, optimizer: torch.optim.Optimizer, scaler: Any, state: dict) -> None:
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
    scaler_state = state.pop("scaler", None)
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    rng = load_file(str(checkpoint / RNG_FILE))
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1) if f"cuda.{i}" in rng]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    log.info("resumed from %s at step %d", checkpoint, state["step"])


def _warn_on_changed_order(checkpoint: Path, cfg: TrainConfig) -> None:
    """Resuming with another batch size, accumulation or seed is allowed, but the data order changes mid-epoch."""
    try:
        saved = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    changed = [k for k in ("batch_size", "grad_accum", "seed") if saved.get(k) != getattr(cfg, k)]
    if changed:
        log.warning("resuming %s with changed %s: the rest of this epoch sees a different order", checkpoint, changed)


def _score(metrics: dict[str, float], cfg: TrainConfig) -> float | None:
    value = metrics.get(cfg.metric_for_best)
    if value is None:
        return None
    return value if cfg.metric_for_best in LOWER_IS_BETTER else -value


def _best_step(ckpt_root: Path, cfg: TrainConfig, state: dict[str, Any]) -> int | None:
    """The saved step whose evaluation scored best on ``metric_for_best`` (earliest on ties)."""
    saved = {step for step, _ in _checkpoints(ckpt_root)}
    ranked = [
        (score, rec["step"])
        for rec in state["history"]
        if rec["step"] in saved and (score := _score(rec["metrics"], cfg)) is not None
    ]
    return min(ranked)[1] if ranked else None


def _rotate(ckpt_root: Path, cfg: TrainConfig, state: dict[str, Any]) -> None:
    """Delete the oldest checkpoints beyond ``save_total_limit``, never the best or the latest."""
    found = _checkpoints(ckpt_root)
    keep = {_best_step(ckpt_root, cfg, state), found[-1][0] if found else None}
    extra = len(found) - cfg.save_total_limit
    for step, path in found:
        if extra <= 0:
            break
        if step not in keep:
            shutil.rmtree(path)
            extra -= 1


def _finalize(out_dir: Path, ckpt_root: Path, cfg: TrainConfig, state: dict[str, Any]) -> Path:
    """Copy the chosen checkpoint's model files to ``out_dir/final`` with ``train_config.json`` and a version."""
    best = _best_step(ckpt_root, cfg, state) if cfg.load_best_at_end else None
    chosen = ckpt_root / f"step-{best}" if best is not None else _latest_checkpoint(ckpt_root)
    assert chosen is not None, "training always saves its last step"
    final, tmp = out_dir / FINAL, out_dir / f"{FINAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
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


def _result(
    final: Path | None, ckpt_root: Path, step: int, status: TrainStatus, state: dict[str, Any], cfg: TrainConfig
) -> TrainResult:
    """The outcome; ``best_*`` describe the best *saved* checkpoint (the one ``final`` holds with load_best_at_end)."""
    best = _best_step(ckpt_root, cfg, state)
    metrics = next((r["metrics"] for r in reversed(state["history"]) if r["step"] == best), {})
    return TrainResult(
        final_dir=final,
        best_metrics=dict(metrics),
        steps=step,
        status=status,
        history=list(state["history"]),
        best_step=best,
    )
