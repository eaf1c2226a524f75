"""Fine-tuning every captioning family besides GIT: a tiny random model of each (training/tiny_families.py), trained
on synthetic shapes in full or with LoRA, learns (training loss and held-out WER of generated captions go down),
checkpoints in safetensors, resumes, and leaves a stored version that a caption worker loads with ``load_engine``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.messages import GenParams, TrainOutcome, TrainRequest
from common.store import ModelStore
from ledger import RedisLedger
from model.engine import EngineConfig
from model.families import ChatVLM, FamilyEngine, TrainBatch, load_engine
from tests.conftest import LEDGER_DB, redis_url, settings_from
from training import tiny_families
from training.checkpoints import ADAPTER_RUN, CHECKPOINTS
from training.config import TrainConfig
from training.data import Example, load_examples, split_examples
from training.evaluation import evaluate_model
from training.finetune import train
from training.synthetic import make_shapes

#: family name (as the engine reports it) -> its tiny builder.
BUILDERS: dict[str, Callable[..., Path]] = {
    "blip": tiny_families.build_tiny_blip,
    "blip-2": tiny_families.build_tiny_blip2,
    "florence-2": tiny_families.build_tiny_florence2,
    "vision-encoder-decoder": tiny_families.build_tiny_vision_encoder_decoder,
    "llava": tiny_families.build_tiny_llava,
    "idefics3": tiny_families.build_tiny_idefics3,
    "paligemma": tiny_families.build_tiny_paligemma,
    "qwen2_vl": partial(tiny_families.build_tiny_qwen_vl, version="2"),
    "qwen2_5_vl": partial(tiny_families.build_tiny_qwen_vl, version="2.5"),
    "qwen3_vl": partial(tiny_families.build_tiny_qwen_vl, version="3"),
    "internvl": tiny_families.build_tiny_internvl,
    "smolvlm": tiny_families.build_tiny_smolvlm,
}
#: (family, LoRA): the encoder-decoder families both ways, BLIP-2 and chat VLMs with LoRA on their language model.
CASES = [
    ("blip", False),
    ("blip", True),
    ("florence-2", False),
    ("florence-2", True),
    ("vision-encoder-decoder", False),
    ("vision-encoder-decoder", True),
    ("blip-2", True),
    ("llava", True),
    ("idefics3", True),
    ("paligemma", True),
    ("qwen2_vl", True),
    ("qwen2_5_vl", True),
    ("qwen3_vl", True),
    ("internvl", True),
    ("smolvlm", True),
]
#: Settings that learn in seconds on a 2-core CPU; LoRA trains fewer weights and takes a larger step.
FAST = {
    "lr_scheduler": "constant",
    "batch_size": 16,
    "grad_accum": 1,
    "max_length": 16,
    "eval_batch_size": 32,
    "log_steps": 5,
    "device": "cpu",
    "mixed_precision": "no",
    "eval_on_start": True,
}
#: Optimizer steps of a full run and of a LoRA run (which trains far fewer weights).
STEPS = {False: 60, True: 100}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; tiny models gain nothing from more threads
    yield
    torch.set_num_threads(before)


#: BLIP and ViT->BERT are also built with the real BERT vocabulary (30,522 words), for their labels.
WORDS = ("blip", "vision-encoder-decoder")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny bases to train: init 0.1 as the GIT demo (the captioning tests' wide 0.5 saturates the decoders and
    learns slowly), word-level vocabularies for all (a LoRA on the attention cannot steer a random 30k-word output
    layer within a test's steps; a real checkpoint's output layer is trained already)."""
    root = tmp_path_factory.mktemp("family-bases")
    out = {}
    for name, build in BUILDERS.items():
        out[name] = build(root / name, seed=0, init=0.1, **({"words": True} if name in WORDS else {}))
    for name in WORDS:
        out[f"{name}-bert"] = BUILDERS[name](root / f"{name}-bert", seed=0, init=0.1)
    return out


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Example], list[Example]]:
    root = tmp_path_factory.mktemp("family-shapes")
    make_shapes(root, 200, seed=0, size=32)
    return split_examples(load_examples(str(root)), 0.12, seed=42)


def _config(base: Path, lora: bool, **over: object) -> TrainConfig:
    steps = STEPS[lora]
    opts: dict[str, object] = {
        **FAST,
        "learning_rate": 1e-2 if lora else 3e-3,
        "max_steps": steps,
        "eval_steps": steps,
        "save_steps": steps,
        "lora_r": 16 if lora else 0,
        "lora_alpha": 32,
    }
    return TrainConfig(base_model=str(base), **{**opts, **over})  # type: ignore[arg-type]


@pytest.mark.parametrize(("family", "lora"), CASES, ids=[f"{f}-{'lora' if lo else 'full'}" for f, lo in CASES])
def test_each_family_learns_the_shapes_and_its_version_loads_in_a_caption_worker(
    family: str, lora: bool, bases: dict[str, Path], split: tuple[list[Example], list[Example]], tmp_path: Path
) -> None:
    train_set, eval_set = split
    events: list[dict] = []
    result = train(_config(bases[family], lora), train_set, eval_set, tmp_path, on_progress=events.append)
    losses = [e["loss"] for e in events if e["kind"] == "train"]
    wers = [r["metrics"]["wer"] for r in result.history]
    print(f"{family} lora={lora}: loss {losses[0]:.3f}->{losses[-1]:.3f}, held-out WER {wers[0]:.3f}->{wers[-1]:.3f}")
    assert [r["step"] for r in result.history] == [0, STEPS[lora]]
    assert losses[-1] < 0.75 * losses[0], f"{family}: training loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert wers[-1] < wers[0] - 0.25, f"{family}: held-out WER {wers[0]:.3f} -> {wers[-1]:.3f}"

    # Checkpoints: safetensors and JSON only; a LoRA run keeps its adapters, not the base weights.
    [ckpt] = (tmp_path / CHECKPOINTS).iterdir()
    names = {p.name for p in ckpt.iterdir()}
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))], names
    assert (ADAPTER_RUN in names) == lora and ("model.safetensors" in names) != lora

    # The stored version is a full model of the same family: a caption worker's load_engine serves it (no peft
    # files), and its greedy captions on the held-out images score what training measured at its last step.
    assert result.final_dir is not None
    assert not (result.final_dir / ADAPTER_RUN).exists()
    engine = load_engine(EngineConfig(model=str(result.final_dir), device="cpu", dtype="float32"))
    assert isinstance(engine, FamilyEngine) and engine.family_name == family
    report = evaluate_model(result.final_dir, eval_set, max_length=16, device="cpu")
    assert report["wer"] == pytest.approx(result.best_metrics["wer"]) and report["n"] == len(eval_set)


def _labelled(batch: TrainBatch, tokenizer: object) -> list[str]:
    return [
        tokenizer.decode(row[row != -100].tolist(), skip_special_tokens=True).strip()  # type: ignore[attr-defined]
        for row in batch.labels
    ]


@pytest.mark.parametrize("family", [*BUILDERS, *(f"{name}-bert" for name in WORDS)])
def test_only_the_caption_is_labelled(family: str, bases: dict[str, Path]) -> None:
    """Labels are the caption tokens (and the end token): no padding, start token, prompt, image token or user turn;
    for chat VLMs the prompt part of each row is exactly what generation starts from."""
    engine = load_engine(EngineConfig(model=str(bases[family]), device="cpu", dtype="float32"))
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (40, 32), (30, 30, 200))]
    captions = ["a red circle on the left of a white background", "a blue star"]
    prompt = engine.family.prompt(GenParams())
    batch = engine.family.train_batch(engine.processor, images, captions, prompt, 32, engine.device, engine.dtype)
    assert _labelled(batch, engine.processor.tokenizer) == captions
    with torch.no_grad():
        logits = engine.model(**batch.inputs).logits
    assert logits.shape[:2] == batch.labels.shape
    ends = [int(row[row != -100][-1]) for row in batch.labels]
    assert all(end in engine.family.eos_ids(engine.model, engine.processor) for end in ends), ends
    if isinstance(engine.family, ChatVLM):
        asked = engine.family.batch(engine.processor, images, prompt, engine.device, engine.dtype).inputs
        width = asked["input_ids"].shape[1]
        assert torch.equal(batch.inputs["input_ids"][:, :width], asked["input_ids"])
        assert (batch.labels[:, :width] == -100).all()
    if "token_type_ids" in batch.inputs:  # PaliGemma: the answer is the suffix (causal), the prompt the prefix
        assert torch.equal(batch.inputs["token_type_ids"].bool(), batch.labels != -100)
    # max_tokens bounds a caption, its end token kept.
    short = engine.family.train_batch(engine.processor, images, captions, prompt, 4, engine.device, engine.dtype)
    assert [int((row != -100).sum()) for row in short.labels] <= [3, 3]


def test_a_lora_chat_run_resumes_where_it_stopped(
    bases: dict[str, Path], split: tuple[list[Example], list[Example]], tmp_path: Path
) -> None:
    train_set, eval_set = split
    cfg = {"eval_on_start": False, "eval_steps": 10, "save_steps": 10}
    first = train(_config(bases["llava"], True, **cfg, max_steps=10), train_set, eval_set, tmp_path / "resumed")
    assert first.steps == 10
    events: list[dict] = []
    again = train(
        _config(bases["llava"], True, **cfg, max_steps=20),
        train_set,
        eval_set,
        tmp_path / "resumed",
        on_progress=events.append,
    )
    straight = train(_config(bases["llava"], True, **cfg, max_steps=20), train_set, eval_set, tmp_path / "straight")
    assert min(e["step"] for e in events) > 10, "the resumed run started over"
    assert again.history[-1]["metrics"] == pytest.approx(straight.history[-1]["metrics"])
    assert again.history[-1]["step"] == straight.history[-1]["step"] == 20


def test_a_family_trains_on_the_training_queue_into_the_model_store(
    bases: dict[str, Path], worker_env: dict[str, str], tmp_path: Path
) -> None:
    """``captioner train --base-model DIR``'s job: run_train on the ledger stores the family's version."""
    from common.connections import redis_client
    from training.jobs import run_train
    from training.requests import open_train_job

    data = tmp_path / "data"
    make_shapes(data, 40, seed=3, size=32)
    ledger = RedisLedger(redis_client(redis_url(LEDGER_DB)), f"t-{uuid.uuid4().hex[:6]}")
    settings = settings_from({**worker_env, "CAPTIONER_MODEL_STORE": str(tmp_path / "store")})
    config = {
        "base_model": str(bases["florence-2"]),
        "max_steps": 6,
        "eval_steps": 3,
        "save_steps": 3,
        "batch_size": 8,
        "max_length": 12,
        "lora_r": 4,
        "device": "cpu",
    }
    req = TrainRequest(job_id=f"train-florence-{uuid.uuid4().hex[:6]}", dataset=str(data), config=config)
    open_train_job(ledger, req)
    summary = run_train(settings, ledger, req)
    ledger.r.close()
    assert summary["status"] == TrainOutcome.DONE, summary
    version = ModelStore(tmp_path / "store").get(summary["version"])
    assert version.meta["base_model"] == str(bases["florence-2"]) and "wer" in version.metrics
    engine = load_engine(EngineConfig(model=str(version.path), device="cpu", dtype="float32"))
    assert isinstance(engine, FamilyEngine) and engine.family_name == "florence-2"
    assert len(engine.generate([Image.new("RGB", (32, 32), (200, 30, 30))], GenParams(max_length=12))) == 1
    # Its model card (captioner push-to-hub) names what it is.
    from training.modelcard import model_card

    card = model_card(version, "someone/tiny-florence")
    assert "- florence2" in card and "(`Florence2ForConditionalGeneration`)" in card and "GIT" not in card
