"""Fine-tune a captioner on captioned images: our loop on accelerate (device placement, mixed precision, data
parallel), with resumable pickle-free checkpoints (training/checkpoints.py) and generated-caption evaluation.

GIT trains on its own path (labels from ``encode_captions``, the loss projected on scored positions only); every
other family (model/families.py) builds its inputs and labels through its adapter's ``train_batch``, so training
asks the model what captioning asks it (the same prompt, the same chat turn), and evaluation captions through the
family's engine, as a caption worker does.

The seed recipe (HF image-captioning guide) with its flaws fixed: padding positions are -100 in the labels (they
never enter the loss), evaluation scores captions the model *generates*, not teacher-forced argmax, and under
gradient accumulation (and across processes) the loss is a mean over the tokens of the whole accumulated batch,
not a mean of per-micro-batch means, which weighed a short caption's tokens more than a long one's.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError, ModelLoadError, SourceError
from common.messages import GenParams
from media.images import ImagePolicy
from model.engine import CaptionEngine, EngineConfig, half_dtype, resolve_device
from model.families import FamilyEngine, family_for, model_type_of
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

log = logging.getLogger(__name__)

#: Where report_to=tensorboard writes its event files, inside the run directory.
TENSORBOARD_DIR = "tensorboard"


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

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "final_dir": None if self.final_dir is None else str(self.final_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        final = data.get("final_dir")
        return cls(
            **{**data, "final_dir": None if final is None else Path(final), "status": TrainStatus(data["status"])}
        )


def _noop(_: dict[str, Any]) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class MicroBatch:
    """One forward pass's inputs and how many of its label tokens are scored."""

    inputs: dict[str, torch.Tensor]
    tokens: int


class CaptionLoss(torch.nn.Module):
    """GIT under a forward that returns the summed token loss: the module accelerate wraps for data parallel (a
    gradient sync happens in the wrapper's forward, so the loss must be computed inside one)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        total, _ = caption_loss_terms(self.model, **inputs)
        return total


class FamilyLoss(torch.nn.Module):
    """Any other family under a forward that returns the summed token loss (as ``CaptionLoss`` for GIT)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        total, _ = family_loss_terms(self.model, labels, **inputs)
        return total


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
    directory now belongs to another runner) ends it at the next step, before any further write. Under a
    distributed launcher (training/distributed.py) every process runs this; the first one evaluates, reports,
    checkpoints and decides when to stop, for all of them.
    """
    # 1. Check the config; accelerate picks device, precision and (under a launcher) the process group.
    _check_config(cfg, train_set, eval_set)
    acc = make_accelerator(cfg)
    main, world = acc.is_main_process, acc.num_processes
    out_dir = Path(out_dir)
    ckpt_root = out_dir / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    fingerprint = dataset_fingerprint(train_set)
    resume = latest_checkpoint(ckpt_root)
    state = read_state(resume, fingerprint) if resume else fresh_state(fingerprint)
    torch.manual_seed(cfg.seed)

    # 2. Model and processor: the checkpoint's when resuming, else the base model (safetensors only); LoRA
    #    adapters on top when asked. ``engine.model`` stays the plain module: it generates for evaluation.
    engine, adapters = _load_model(cfg, resume, acc.device)
    model = engine.model
    log.info("training %s on %s x%d (%s), resume=%s", cfg.base_model, acc.device, world, acc.mixed_precision, resume)

    # 3. Images -> pixel values, cached in memory when they fit; unreadable images are dropped with a warning.
    policy = image_policy or local_image_policy(train_set + eval_set)
    pixels = PixelSource(engine, policy, threads=cfg.loader_threads, cache_mb=cfg.pixel_cache_mb)
    train_items = pixels.admit(train_set, "train")
    eval_items = pixels.admit(eval_set[: cfg.eval_max_samples] if cfg.eval_max_samples else eval_set, "eval")
    if not train_items:
        raise SourceError("no training image could be read; check the dataset paths")

    # 4. Optimizer; its state and the RNG come back from the checkpoint; then accelerate wraps both.
    optimizer = _make_optimizer(model, cfg)
    scaler_state = state.pop("scaler", None)
    if resume:
        load_training_state(resume, optimizer, state)
        warn_on_changed_order(resume, cfg, world)
    state["processes"] = world
    loss_module, optimizer = acc.prepare(
        FamilyLoss(model) if isinstance(engine, FamilyEngine) else CaptionLoss(model), optimizer
    )
    if acc.scaler is not None and scaler_state:
        acc.scaler.load_state_dict(scaler_state)
    plan = _Plan(len(train_items), cfg, world)
    step = int(state["step"])
    clock = _Clock(cfg, plan.total_steps, step)
    report = _Reporter(cfg, out_dir) if main else None

    def evaluate_now() -> None:
        started = time.perf_counter()
        metrics, samples, _ = evaluate_items(
            engine, pixels, eval_items, max_length=cfg.max_length, batch_size=cfg.eval_batch_size, autocast=acc.autocast
        )
        clock.eval_done(time.perf_counter() - started)
        record = {"step": step, "epoch": step / plan.steps_per_epoch, "metrics": metrics}
        state["history"].append(record)
        on_progress({**_progress(clock, plan, step, state, report), **record, "kind": "eval", "samples": samples})
        if report:
            report.evaluation(step, metrics, samples)
        log.info("eval step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def save_now() -> None:
        save_checkpoint(engine, adapters, optimizer, acc.scaler, state, cfg, ckpt_root, step)
        rotate(ckpt_root, cfg, state)

    def end(status: TrainStatus, final: Path | None = None) -> TrainResult:
        acc.wait_for_everyone()
        if report:
            report.close()
        return _result(final, ckpt_root, step, status, state, cfg)

    if main and cfg.eval_on_start and step == 0 and eval_items and not state["history"]:
        evaluate_now()

    # 5. The loop: one optimizer step = grad_accum micro-batches per process; stop checks before each step.
    model.train()
    running, running_n = 0.0, 0
    while step < plan.total_steps:
        stop, gone = _agree(acc, main and should_stop(), main and lost())
        if gone:
            log.warning(
                "training lock lost at step %d: another runner owns %s; stopping without writing", step, out_dir
            )
            return end(TrainStatus.LOST_LOCK)
        if stop:
            if main and last_saved(ckpt_root) != step:
                save_now()
            log.info("training stopped at step %d with a checkpoint; running again with the same out_dir resumes", step)
            return end(TrainStatus.CANCELLED)
        started = time.perf_counter()
        lr = lr_at(cfg, step, plan.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch = step // plan.steps_per_epoch
        shares = plan.micro_items(step, acc.process_index)
        batches = [micro_batch(engine, pixels, [train_items[i] for i in share], cfg, epoch) for share in shares]
        step_loss = accumulate(acc, loss_module, batches)
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        state["step"] = step
        running, running_n = running + step_loss, running_n + 1
        clock.step_done(time.perf_counter() - started)

        # 6. Report, evaluate and save on their schedules (the first process only); the last step gets all three.
        last = step == plan.total_steps
        if main and (step % cfg.log_steps == 0 or last):
            state["last_loss"] = running / running_n
            on_progress({**_progress(clock, plan, step, state, report), "kind": "train", "lr": lr})
            if report:
                report.train(step, state["last_loss"], lr)
            running, running_n = 0.0, 0
        if main and eval_items and (step % cfg.eval_steps == 0 or last):
            evaluate_now()
        if main and (step % cfg.save_steps == 0 or last) and lost():
            log.warning("training lock lost at step %d; stopping without writing", step)
            if world > 1:
                _agree(acc, False, True)
            return end(TrainStatus.LOST_LOCK)
        if main and (step % cfg.save_steps == 0 or last):
            save_now()
        # The first process's word on a lock lost at the save reaches the others.
        if world > 1 and (step % cfg.save_steps == 0 or last) and _agree(acc, False, False)[1]:
            return end(TrainStatus.LOST_LOCK)

    # 7. The best (or last) checkpoint becomes out_dir/final, a full model with its config and version file.
    if _agree(acc, False, main and lost())[1]:
        return end(TrainStatus.LOST_LOCK)
    final = None
    if main:
        if last_saved(ckpt_root) is None:  # max_steps=0: nothing ran, the base model is the result
            save_now()
        final = finalize(out_dir, ckpt_root, cfg, state, engine, adapters)
    return end(TrainStatus.COMPLETED, final)


def _agree(acc: Any, stop: bool, gone: bool) -> tuple[bool, bool]:
    """The first process's stop and lost-lock flags, seen by every process (a collective: all must call it)."""
    if acc.num_processes == 1:
        return stop, gone
    flags = acc.reduce(torch.tensor([float(stop), float(gone)], device=acc.device), reduction="sum")
    return bool(flags[0] > 0), bool(flags[1] > 0)


def make_accelerator(cfg: TrainConfig) -> Any:
    """An ``accelerate.Accelerator`` for this run: the device asked for, the precision resolved here (one rule
    with the caption engine), and the process group when a launcher started this process."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    # Launched by torchrun (training/distributed.py) when its WORLD_SIZE says so, as accelerate itself decides.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        # A training worker runs many jobs in one process, each with its own precision: accelerate's state is a
        # process-wide singleton, so a single-process run starts from a clean one.
        AcceleratorState._reset_state(reset_partial_state=True)
    device = resolve_device("auto" if distributed else cfg.device)
    if device.type == "cuda" and device.index is not None and not distributed:
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.mixed_precision, device)
    names = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}
    # Some GIT weights may take no part in a loss (a LoRA run's frozen ones are excluded anyway): tell DDP.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=names[precision], kwargs_handlers=[ddp])


def _load_model(
    cfg: TrainConfig, resume: Path | None, device: torch.device
) -> tuple[CaptionEngine | FamilyEngine, Any]:
    """The caption engine to train (fp32 weights on ``device``) and, for LoRA, the peft wrapper holding adapters.

    GIT loads on ``CaptionEngine``; any other family (told by the checkpoint's ``model_type``) on ``FamilyEngine``,
    whose adapter builds the training inputs."""
    from training.checkpoints import ADAPTER_RUN

    lora = cfg.lora_r > 0
    if lora:
        from training.lora import require_peft

        require_peft()  # before the model is read: the one line that says what to install
    start = cfg.base_model if lora or resume is None else str(resume)
    if resume is not None and lora != (resume / ADAPTER_RUN).is_file():
        raise ConfigError(
            f"{resume} is a {'full' if lora else 'LoRA'} checkpoint; resume it with lora_r "
            f"{'0' if lora else '> 0'} or use a new run directory"
        )
    engine = _load_engine(EngineConfig(model=start, device=str(device), dtype="float32"))
    if cfg.gradient_checkpointing:
        engine.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not lora:
        return engine, None
    from training.lora import add_adapters, load_adapters

    family = engine.family if isinstance(engine, FamilyEngine) else None
    adapters = add_adapters(engine.model, cfg, family.lora_targets if family else None)
    if resume is not None:
        load_adapters(adapters, resume)
    trainable = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %d trainable parameters", cfg.lora_r, cfg.lora_target_modules, trainable)
    return engine, adapters


def _load_engine(cfg: EngineConfig) -> CaptionEngine | FamilyEngine:
    """GIT's engine, or the family's for any other trainable ``model_type``; a family without training inputs is a
    ``ConfigError``. A checkpoint whose type cannot be read goes to GIT's loader, which names what is wrong."""
    try:
        model_type = model_type_of(cfg)
    except ModelLoadError:
        model_type = "git"
    if model_type == "git":
        return CaptionEngine.load(cfg)
    family = family_for(model_type)
    if family.lora_targets is None:
        raise ConfigError(
            f"{cfg.model} is a {family.name} checkpoint, which captioner train does not fine-tune; "
            "docs/models.md says how to fine-tune it"
        )
    return FamilyEngine.load(cfg, family)


def _check_config(cfg: TrainConfig, train_set: list[Example], eval_set: list[Example]) -> None:
    cfg.check()
    if not train_set:
        raise ConfigError("the training set is empty")
    if cfg.load_best_at_end and not eval_set:
        raise ConfigError("load_best_at_end needs an evaluation set; give one or set load_best_at_end=False")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` on ``device``; None means plain fp32.

    ``auto`` is the device's fast half type (``model.engine.half_dtype``, the rule the caption engine uses) on
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


# --- one step ------------------------------------------------------------------------------------------


class _Plan:
    """Which images each process sees at each step: a seeded order per epoch, cut into global micro-batches of
    ``batch_size * processes`` images, each shared out between the processes; ``grad_accum`` of them a step."""

    def __init__(self, n: int, cfg: TrainConfig, world: int) -> None:
        self.n, self.cfg, self.world = n, cfg, world
        size = cfg.batch_size * world
        # Every process needs at least one image in each micro-batch (they meet in each backward pass), so a
        # last micro-batch with fewer images than processes is dropped.
        self.micro_per_epoch = n // size + (1 if n % size >= world else 0) if world > 1 else math.ceil(n / size)
        if self.micro_per_epoch == 0:
            raise ConfigError(f"{n} training image(s) cannot feed {world} processes; use fewer processes")
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self._order: tuple[int, list[int]] = (-1, [])

    def micro_items(self, step: int, rank: int) -> list[list[int]]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.n, self.cfg.seed, epoch))
        order, size, ga = self._order[1], self.cfg.batch_size * self.world, self.cfg.grad_accum
        micro = range(in_epoch * ga, min((in_epoch + 1) * ga, self.micro_per_epoch))
        return [order[m * size : (m + 1) * size][rank :: self.world] for m in micro]


def micro_batch(
    engine: CaptionEngine | FamilyEngine, pixels: PixelSource, items: list[Item], cfg: TrainConfig, epoch: int
) -> MicroBatch:
    """Pixels and labels of one micro-batch (its images' captions drawn for this epoch)."""
    if isinstance(engine, FamilyEngine):
        return family_micro_batch(engine, pixels, items, cfg, epoch)
    pixel_values, kept = pixels.pixels(items)
    captions = draw_captions(kept, cfg.seed, epoch)
    enc = encode_captions(engine.processor.tokenizer, captions, cfg.max_target_tokens)
    device = engine.model.device
    inputs = {k: v.to(device) for k, v in enc.items()}
    inputs["pixel_values"] = pixel_values.to(device, non_blocking=True)
    return MicroBatch(inputs, int((enc["labels"][:, 1:] != -100).sum()))


def family_micro_batch(
    engine: FamilyEngine, pixels: PixelSource, items: list[Item], cfg: TrainConfig, epoch: int
) -> MicroBatch:
    """Inputs and labels of one micro-batch through the family's adapter, with the prompt its captions are made
    with (the family's default: evaluation and caption workers use it too)."""
    images, kept = pixels.pixels(items)
    captions = draw_captions(kept, cfg.seed, epoch)
    prompt = engine.family.prompt(GenParams(max_length=cfg.max_length))
    batch = engine.family.train_batch(
        engine.processor, images, captions, prompt, cfg.max_target_tokens, engine.model.device, torch.float32
    )
    return MicroBatch({**batch.inputs, "labels": batch.labels}, int((batch.labels[:, 1:] != -100).sum()))


def family_loss_terms(model: Any, labels: torch.Tensor, **inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the positions whose label is not -100, and their count: the logits at
    position t predict ``labels[:, t + 1]`` (families.TrainBatch). Computed here rather than by the model's own
    ``labels`` argument, whose loss is a mean (and BLIP's label-smoothed)."""
    logits = model(**inputs).logits
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape[:2])} do not line up with labels {tuple(labels.shape)}")
    targets = labels[:, 1:]
    keep = targets != -100
    scored = logits[:, :-1][keep]
    return torch.nn.functional.cross_entropy(scored.float(), targets[keep], reduction="sum"), int(keep.sum())


def accumulate(acc: Any, loss_module: Any, batches: list[MicroBatch]) -> float:
    """Backward passes of one optimizer step, with the loss normalised over the label tokens of the whole step
    (every micro-batch, every process); returns that mean token loss.

    A mean per micro-batch, then averaged (what ``accelerator.accumulate`` and the old Trainer did), weighs a
    token of a short-caption micro-batch more than one of a long-caption batch; this sums token losses and
    divides once, so two accumulated batches of 4 give the gradient of one batch of 8. Data parallel averages
    the processes' gradients, hence the factor ``num_processes``.
    """
    tokens = torch.tensor(float(sum(b.tokens for b in batches)), device=acc.device)
    total = float(acc.reduce(tokens, reduction="sum")) if acc.num_processes > 1 else float(tokens)
    loss_sum = torch.zeros((), device=acc.device)
    for i, batch in enumerate(batches):
        # Gradients are synchronised once per step, in the last backward pass.
        sync = acc.no_sync(loss_module) if i < len(batches) - 1 else nullcontext()
        with sync, acc.autocast():
            summed = loss_module(**batch.inputs)
        acc.backward(summed * (acc.num_processes / max(total, 1.0)))
        loss_sum += summed.detach().float()
    if acc.num_processes > 1:
        loss_sum = acc.reduce(loss_sum, reduction="sum")
    return float(loss_sum) / max(total, 1.0)


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


def draw_captions(batch: list[Item], seed: int, epoch: int) -> list[str]:
    """One caption per image, drawn afresh each epoch and seeded by (seed, epoch, image): resume replays it."""
    return [random.Random(f"{seed}:{epoch}:{item.index}").choice(item.captions) for item in batch]


def caption_loss_terms(
    model: Any,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the caption tokens whose label is not -100, and their count.

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
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


def caption_loss(model: Any, **inputs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored caption tokens (GIT's own loss, cheaper)."""
    total, count = caption_loss_terms(model, **inputs)
    return total / max(count, 1)


def _make_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a pure function, so resume needs no scheduler state."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    if warmup and step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if cfg.lr_scheduler == "constant":
        return cfg.learning_rate
    span = max(1, total - warmup)
    if cfg.lr_scheduler == "cosine":
        return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return cfg.learning_rate * max(0.0, (total - step) / span)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
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


def _progress(clock: _Clock, plan: _Plan, step: int, state: dict[str, Any], report: _Reporter | None) -> dict:
    """Where the run stands; ``metrics`` is the latest evaluation (at ``metrics_step``), None before the first."""
    eta = clock.eta(step)
    latest = state["history"][-1] if state["history"] else {}
    return {
        "step": step,
        "total_steps": clock.total,
        "epoch": round(step / plan.steps_per_epoch, 4),
        "loss": state.get("last_loss"),
        "metrics": latest.get("metrics"),
        "metrics_step": latest.get("step"),
        "eta_s": None if eta is None else round(eta, 2),
        "step_time_s": None if clock.step_s is None else round(clock.step_s, 4),
        "elapsed_s": round(time.perf_counter() - clock.started, 2),
        "processes": plan.world,
        "tensorboard": str(report.path) if report and report.path else None,
    }


class _Reporter:
    """report_to=tensorboard: loss, learning rate, evaluation metrics and sample captions as event files."""

    def __init__(self, cfg: TrainConfig, out_dir: Path) -> None:
        self.path: Path | None = None
        self._writer: Any = None
        if cfg.report_to != "tensorboard":
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "report_to tensorboard needs the tensorboard package on the training worker "
                "(pip install 'captioner[train]')"
            ) from None
        self.path = out_dir / TENSORBOARD_DIR
        self._writer = SummaryWriter(str(self.path))

    def train(self, step: int, loss: float, lr: float) -> None:
        if self._writer:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/learning_rate", lr, step)

    def evaluation(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        if not self._writer:
            return
        for name, value in metrics.items():
            self._writer.add_scalar(f"eval/{name}", value, step)
        lines = [f"- {s['prediction']!r} (reference: {s['references'][0]!r})" for s in samples if s["references"]]
        self._writer.add_text("eval/samples", "\n".join(lines), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()


def _result(
    final: Path | None, ckpt_root: Path, step: int, status: TrainStatus, state: dict[str, Any], cfg: TrainConfig
) -> TrainResult:
    """The outcome; ``best_*`` describe the best *saved* checkpoint (the one ``final`` holds with load_best_at_end)."""
    best = best_step(ckpt_root, cfg, state) if ckpt_root.is_dir() else None
    metrics = next((r["metrics"] for r in reversed(state["history"]) if r["step"] == best), {})
    return TrainResult(
        final_dir=final,
        best_metrics=dict(metrics),
        steps=step,
        status=status,
        history=list(state["history"]),
        best_step=best,
    )
