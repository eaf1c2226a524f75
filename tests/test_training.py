"""Training on real things made small: caption metrics by hand, dataset loaders on real files, label masking,
and a tiny GIT fine-tuned on synthetic shapes (it learns, checkpoints are safetensors, resume continues,
cancel leaves a checkpoint)."""

from __future__ import annotations

import csv
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import torch
from safetensors.torch import load_file

from common.errors import ConfigError, SourceError
from common.messages import GenParams, Source
from media.images import load_image
from model.engine import CaptionEngine, EngineConfig
from tests.conftest import LEDGER_DB, redis_url
from training.checkpoints import CHECKPOINTS, CONFIG_FILE, OPTIMIZER_FILE, STATE_FILE, rotate
from training.config import TrainConfig
from training.data import Example, check_columns, dataset_fingerprint, load_examples, split_examples
from training.evaluation import evaluate_model
from training.finetune import TrainStatus, caption_loss, encode_captions, train
from training.pixels import local_image_policy
from training.scores import caption_metrics, normalize
from training.synthetic import make_shapes
from training.tiny import build_tiny_git


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model gains little from two, and on a busy 2-core machine a second
    spinning thread makes steps several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- metrics, computed by hand -----------------------------------------------------------------------


def test_identical_captions_score_perfectly() -> None:
    m = caption_metrics(["a red circle on a white background"], [["a red circle on a white background"]])
    assert m["wer"] == 0.0 and m["cer"] == 0.0
    assert m["bleu4"] == pytest.approx(100.0)
    assert m["rouge_l"] == pytest.approx(1.0)


def test_one_substitution_in_four_words() -> None:
    m = caption_metrics(["a red dog sat"], [["a red cat sat"]])
    assert m["wer"] == pytest.approx(1 / 4)
    # "cat" -> "dog": 3 substituted characters of 13 ("a red cat sat", spaces count).
    assert m["cer"] == pytest.approx(3 / 13)
    # LCS = "a red sat" (3 of 4 tokens each side): P = R = F = 3/4.
    assert m["rouge_l"] == pytest.approx(0.75)
    # n-gram precisions 3/4, 1/3, 0/2, 0/1; sacrebleu's default "exp" smoothing turns the zero counts into
    # 1/(2*2) and 1/(4*1); equal lengths -> no brevity penalty: BLEU = (3/4 * 1/3 * 1/4 * 1/4) ** (1/4).
    assert m["bleu4"] == pytest.approx(100 * (3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)


def test_case_punctuation_and_spacing_are_normalised() -> None:
    # GIT's uncased tokenizer decodes "dog." as "dog ." - neither case nor that space is a word error.
    assert normalize("  A  Red dog . ") == "a red dog"
    m = caption_metrics(["a red dog ."], [["A red dog."]])
    assert m["wer"] == 0.0 and m["rouge_l"] == pytest.approx(1.0)


def test_several_references_use_the_closest_and_errors_pool_over_the_corpus() -> None:
    refs = [["a cat on a mat", "a red dog sat"], ["blue sky"]]
    m = caption_metrics(["a red dog sat", "blue sky"], refs)
    assert m["wer"] == 0.0 and m["bleu4"] == pytest.approx(100.0) and m["rouge_l"] == pytest.approx(1.0)
    # Pooled: (1 error in 4 words + 0 in 2) / 6 words, not the mean of per-caption rates (0.125).
    m = caption_metrics(["a red dog sat", "blue sky"], [["a red cat sat"], ["blue sky"]])
    assert m["wer"] == pytest.approx(1 / 6)


def test_empty_prediction_and_misaligned_input() -> None:
    m = caption_metrics([""], [["a red circle"]])
    assert m["wer"] == 1.0 and m["rouge_l"] == 0.0 and m["bleu4"] == 0.0
    assert caption_metrics([], []) == {}
    with pytest.raises(ValueError, match="align"):
        caption_metrics(["a"], [])


def test_cider_only_when_pycocoevalcap_is_installed() -> None:
    m = caption_metrics(["a red circle on a white background"], [["a red circle on a white background"]])
    assert ("cider" in m) == (importlib.util.find_spec("pycocoevalcap") is not None)


# --- datasets ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes6(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Path, str]]]:
    root = tmp_path_factory.mktemp("shapes6")
    return root, make_shapes(root, 6, seed=3)


def test_imagefolder_with_metadata_jsonl(shapes6: tuple[Path, list[tuple[Path, str]]]) -> None:
    root, rows = shapes6
    examples = load_examples(str(root))
    assert [(Path(ex.image), ex.captions) for ex in examples] == [(p, [c]) for p, c in rows]
    assert all(Path(ex.image).is_absolute() for ex in examples)


def test_symlinked_images_load_and_are_readable(shapes6: tuple[Path, list[tuple[Path, str]]], tmp_path: Path) -> None:
    # The HF cache keeps files in blobs/ and links them into snapshots/: the link is the dataset's file.
    _, rows = shapes6
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "a.png").symlink_to(rows[0][0])
    (tmp_path / "snap" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "linked"}) + "\n")
    examples = load_examples(str(tmp_path / "snap"))
    assert examples == [Example(str(tmp_path / "snap" / "a.png"), ["linked"])]
    assert load_image(Source(path=examples[0].image), local_image_policy(examples)).size == (64, 64)


def _copy_images(rows: list[tuple[Path, str]], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for path, _ in rows:
        (folder / path.name).write_bytes(path.read_bytes())
        names.append(path.name)
    return names


def test_imagefolder_with_csv_and_parquet_metadata_and_caption_lists(
    shapes6: tuple[Path, list[tuple[Path, str]]], tmp_path: Path
) -> None:
    _, rows = shapes6
    names = _copy_images(rows[:2], tmp_path / "csv")
    with open(tmp_path / "csv" / "metadata.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "text"])
        writer.writerow([names[0], "one caption, with a comma"])
        writer.writerow([names[1], json.dumps(["first caption", "second caption"])])
    examples = load_examples(str(tmp_path / "csv"))
    assert [ex.captions for ex in examples] == [["one caption, with a comma"], ["first caption", "second caption"]]

    names = _copy_images(rows[:2], tmp_path / "pq")
    table = pa.table({"file_name": names, "caption": [["a", "b", "c"], ["d"]]})
    pq.write_table(table, tmp_path / "pq" / "metadata.parquet")
    examples = load_examples(str(tmp_path / "pq"))
    assert [ex.captions for ex in examples] == [["a", "b", "c"], ["d"]]
    assert all(Path(ex.image).parent == tmp_path / "pq" for ex in examples)


def test_imagefolder_jsonl_list_captions_and_named_columns(
    shapes6: tuple[Path, list[tuple[Path, str]]], tmp_path: Path
) -> None:
    _, rows = shapes6
    names = _copy_images(rows[:2], tmp_path / "train")
    lines = [{"img": names[0], "alt": ["x one", "x two"], "text": "ignored"}, {"img": names[1], "alt": "y"}]
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    # The metadata file may sit in a split folder; file names are relative to that folder.
    examples = load_examples(str(tmp_path), column="img", text_column="alt")
    assert [ex.captions for ex in examples] == [["x one", "x two"], ["y"]]
    with pytest.raises(ConfigError, match="no image column 'nope'"):
        load_examples(str(tmp_path), column="nope")


def test_imagefolder_refuses_missing_files_and_escapes(
    shapes6: tuple[Path, list[tuple[Path, str]]], tmp_path: Path
) -> None:
    _, rows = shapes6
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(SourceError, match="not found"):
        load_examples(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    escape = f"../../{rows[0][0].parent.name}/{rows[0][0].name}"
    (tmp_path / "b" / "metadata.jsonl").write_text(json.dumps({"file_name": escape, "text": "x"}) + "\n")
    with pytest.raises(SourceError, match="outside"):
        load_examples(str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    with pytest.raises(SourceError, match="metadata"):
        load_examples(str(tmp_path / "c"))


def test_manifests_csv_and_jsonl(shapes6: tuple[Path, list[tuple[Path, str]]], tmp_path: Path) -> None:
    _, rows = shapes6
    _copy_images(rows[:2], tmp_path / "imgs")
    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerow([f"imgs/{rows[0][0].name}", "first"])
        writer.writerow(["https://example.com/cat.jpg", "a cat"])
        writer.writerow([f"imgs/{rows[0][0].name}", "first, again"])  # same image: one example, two captions
    examples = load_examples(str(manifest))
    assert examples == [
        Example(str(tmp_path / "imgs" / rows[0][0].name), ["first", "first, again"]),
        Example("https://example.com/cat.jpg", ["a cat"]),
    ]
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"path": str(tmp_path / "imgs" / rows[1][0].name), "text": ["p", "q"]}))
    assert load_examples(str(jsonl))[0].captions == ["p", "q"]


def test_unknown_hub_dataset_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode for the case where `datasets` is installed: the error must come fast, not after retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SourceError, match=r"datasets|network") as info:
        load_examples("nobody-here/no-such-captions")
    assert "imagefolder" in str(info.value) or "network" in str(info.value)
    with pytest.raises(SourceError, match="no such file"):
        load_examples("./missing/list.jsonl")


def _image_rows(rows: list[tuple[Path, str]]) -> dict[str, list]:
    return {"image": [{"bytes": p.read_bytes(), "path": p.name} for p, _ in rows], "text": [c for _, c in rows]}


def test_datasets_save_to_disk_parquet_and_imagefolder_load_for_real(
    shapes6: tuple[Path, list[tuple[Path, str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """🤗 datasets on local data: a save_to_disk folder, a parquet file (streamed), an imagefolder built by datasets
    and saved; image bytes land once in the cache, named by content, and columns are checked by name."""
    import datasets

    root, rows = shapes6
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(_image_rows(rows[:4]), features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "set.parquet"))
    from_folder = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    from_folder.save_to_disk(str(tmp_path / "folder-saved"))
    expected = sorted((p.read_bytes(), [c]) for p, c in rows[:4])
    for spec in (tmp_path / "saved", tmp_path / "set.parquet"):
        examples = load_examples(str(spec))
        assert sorted((Path(ex.image).read_bytes(), ex.captions) for ex in examples) == expected
        assert all(Path(ex.image).is_relative_to(tmp_path / "cache") for ex in examples)
    folder = load_examples(str(tmp_path / "folder-saved"))
    assert sorted((Path(ex.image).read_bytes(), ex.captions) for ex in folder) == sorted(
        (p.read_bytes(), [c]) for p, c in rows
    )
    with pytest.raises(ConfigError, match="no text column 'alt'"):
        load_examples(str(tmp_path / "set.parquet"), text_column="alt")
    for spec in (tmp_path / "saved", tmp_path / "set.parquet"):
        with pytest.raises(ConfigError, match="no image column 'img'"):
            check_columns(str(spec), column="img")


def test_kohya_folder_of_images_and_same_stem_captions(
    shapes6: tuple[Path, list[tuple[Path, str]]], tmp_path: Path
) -> None:
    _, rows = shapes6
    names = _copy_images(rows[:3], tmp_path / "k" / "10_shapes")
    (tmp_path / "k" / "10_shapes" / Path(names[0]).with_suffix(".txt").name).write_text("one\ntwo\n")
    (tmp_path / "k" / "10_shapes" / Path(names[1]).with_suffix(".txt").name).write_text("three")
    examples = load_examples(str(tmp_path / "k"))  # the third image has no caption file: left out
    assert [(Path(ex.image).name, ex.captions) for ex in examples] == [
        (names[0], ["one", "two"]),
        (names[1], ["three"]),
    ]
    with pytest.raises(ConfigError, match="kohya"):
        check_columns(str(tmp_path / "k"), text_column="caption")


def test_split_is_deterministic_disjoint_and_order_independent() -> None:
    examples = [Example(f"/data/{i:03d}.png", [f"caption {i}"]) for i in range(50)]
    train_a, test_a = split_examples(examples, 0.1, seed=42)
    _, test_b = split_examples(list(reversed(examples)), 0.1, seed=42)
    assert len(test_a) == 5 and len(train_a) == 45
    assert {ex.image for ex in test_a} == {ex.image for ex in test_b}
    assert not {ex.image for ex in test_a} & {ex.image for ex in train_a}
    assert {ex.image for ex in split_examples(examples, 0.1, seed=7)[1]} != {ex.image for ex in test_a}
    assert len(split_examples(examples[:2], 0.1)[1]) == 1  # at least one on each side
    assert dataset_fingerprint(examples) == dataset_fingerprint(list(reversed(examples)))
    changed = [*examples[:-1], Example(examples[-1].image, ["another caption"])]
    assert dataset_fingerprint(changed) != dataset_fingerprint(examples)


# --- labels and loss -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The demo's settings: 16-px patches (4 image tokens + CLS, cheap steps) and init_range 0.1. The tests'
    # default 0.5 saturates the decoder (template learned slower); 0.02 (git-base's) leaves the vision tower
    # too weak to learn where a shape is for thousands of steps.
    return build_tiny_git(tmp_path_factory.mktemp("tiny") / "git", seed=0, init_range=0.1, patch_size=16)


def test_pads_are_minus_100_and_never_change_the_loss(tiny_dir: Path) -> None:
    engine = CaptionEngine.load(EngineConfig(model=str(tiny_dir), device="cpu", dtype="float32"))
    model, tokenizer = engine.model, engine.processor.tokenizer
    captions = ["a red circle", "a blue square on the left of a white background"]
    short = encode_captions(tokenizer, captions, 32)
    long = encode_captions(tokenizer, captions, 32, pad_to=40)
    for enc in (short, long):
        pads = enc["attention_mask"] == 0
        assert pads.any() and (enc["labels"][pads] == -100).all()
        assert torch.equal(enc["labels"][~pads], enc["input_ids"][~pads])
        assert (enc["input_ids"][pads] == tokenizer.pad_token_id).all()
    pixel_values = torch.randn(2, 3, 32, 32)
    loss_short = caption_loss(model, pixel_values=pixel_values, **short)
    loss_long = caption_loss(model, pixel_values=pixel_values, **long)
    assert loss_long.item() == pytest.approx(loss_short.item(), rel=1e-5)
    # Same value as GIT's own loss (which projects every position, then drops the masked ones).
    own = model(pixel_values=pixel_values, **long).loss
    assert own.item() == pytest.approx(loss_short.item(), rel=1e-5)
    # The seed recipe's flaw for contrast: with pads left in the labels the loss depends on the padding.
    flawed = model(pixel_values=pixel_values, input_ids=long["input_ids"], labels=long["input_ids"]).loss
    assert abs(flawed.item() - loss_short.item()) > 1e-3


def test_two_accumulated_batches_of_4_give_the_gradients_of_one_batch_of_8(tiny_dir: Path) -> None:
    """Under accumulation the loss is normalised over the tokens of the whole accumulated batch: a mean per
    micro-batch, averaged, would weigh the short captions' tokens (first four) twice as much as the long ones'."""
    from training.finetune import CaptionLoss, MicroBatch, accumulate, make_accelerator

    engine = CaptionEngine.load(EngineConfig(model=str(tiny_dir), device="cpu", dtype="float32"))
    model = engine.model.eval()  # no dropout: both runs must see the same function
    captions = [
        "a dot",
        "a red dot",
        "a circle",
        "a blue one",
        "a red circle on the left of a white background",
        "a blue square at the top of a gray background",
        "a green triangle at the bottom of a black background",
        "an orange diamond in the middle of a gray background",
    ]
    enc = encode_captions(engine.processor.tokenizer, captions, 32)
    size = model.config.vision_config.image_size
    inputs = {**enc, "pixel_values": torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))}
    acc = make_accelerator(TrainConfig(mixed_precision="no", device="cpu"))

    def gradients(parts: list[slice]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        batches = [
            MicroBatch({k: v[part] for k, v in inputs.items()}, int((enc["labels"][part, 1:] != -100).sum()))
            for part in parts
        ]
        loss = accumulate(acc, CaptionLoss(model), batches)
        assert loss == pytest.approx(caption_loss(model, **inputs).item(), rel=1e-5)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    one, two = gradients([slice(0, 8)]), gradients([slice(0, 4), slice(4, 8)])
    assert one.keys() == two.keys() and len(one) > 10
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-7)


# --- training ------------------------------------------------------------------------------------------

#: Settings that learn fast on a 2-core CPU (see the numbers in test_tiny_git_learns_the_shapes).
FAST = {
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",
    "batch_size": 16,
    "grad_accum": 1,
    "max_length": 16,
    "eval_batch_size": 32,
    "log_steps": 20,
}


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Example], list[Example]]:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 600, seed=0)
    return split_examples(load_examples(str(root)), 0.1, seed=42)


@pytest.fixture(scope="module")
def trained(
    tiny_dir: Path, shapes_split: tuple[list[Example], list[Example]], tmp_path_factory: pytest.TempPathFactory
) -> dict:
    train_set, eval_set = shapes_split
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(base_model=str(tiny_dir), **FAST, max_steps=150, eval_steps=50, save_steps=50, save_total_limit=2)
    events: list[dict] = []
    started = time.perf_counter()
    result = train(cfg, train_set, eval_set, out, on_progress=events.append)
    return {"result": result, "out": out, "events": events, "seconds": time.perf_counter() - started, "cfg": cfg}


def test_tiny_git_learns_the_shapes(tiny_dir: Path, trained: dict, shapes_split: tuple) -> None:
    _, eval_set = shapes_split
    before = evaluate_model(tiny_dir, eval_set, max_length=16, device="cpu")["wer"]
    result = trained["result"]
    after = evaluate_model(result.final_dir, eval_set, max_length=16, device="cpu")
    assert result.status == TrainStatus.COMPLETED and result.steps == 150
    assert after["n"] == len(eval_set) and after["samples"]
    # Measured on a 2-core VM (1 torch thread, 13 s of CPU for the 150 steps): WER 1.26 before (random
    # words up to max_length), 0.43 / 0.34 / 0.33 at steps 50 / 100 / 150. By then the model writes the
    # template with the right colours and background; shape and position come only after ~1500 steps.
    # 0.5 leaves room for seed and platform noise yet fails a model that did not learn the template, and
    # "0.3 below the start" fails a run whose starting point was already good (nothing was learned).
    assert after["wer"] < 0.5, (before, after["wer"], trained["seconds"])
    assert after["wer"] < before - 0.3, (before, after["wer"])
    assert result.best_metrics["wer"] == pytest.approx(after["wer"])


def test_progress_reports_loss_eta_and_generated_metrics(trained: dict) -> None:
    events = trained["events"]
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [50, 100, 150]
    assert all({"wer", "cer", "bleu4", "rouge_l"} <= set(e["metrics"]) for e in evals)
    assert all(e["eta_s"] is not None and e["samples"] for e in evals)
    losses = [e["loss"] for e in events if e["kind"] == "train"]
    assert losses[-1] < losses[0]
    # Every record carries the latest evaluation, so a later loss report never hides it from `captioner status`.
    for e in (e for e in events if e["kind"] == "train"):
        earlier = [v for v in evals if v["step"] < e["step"]]  # an eval at the same step is reported after it
        assert (e["metrics"], e["metrics_step"]) == (
            (earlier[-1]["metrics"], earlier[-1]["step"]) if earlier else (None, None)
        )
    assert any(e["kind"] == "train" and e["metrics"] for e in events)
    assert events[-1]["eta_s"] == 0
    json.dumps(events)  # the training task stores progress in Redis as JSON


def test_checkpoints_are_safetensors_only_and_rotated(trained: dict) -> None:
    out: Path = trained["out"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")]
    steps = sorted(p.name for p in (out / CHECKPOINTS).iterdir())
    assert len(steps) <= 2 and "step-150" in steps  # save_total_limit=2, the latest is always kept
    ckpt = out / CHECKPOINTS / "step-150"
    assert {"model.safetensors", OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE} <= {p.name for p in ckpt.iterdir()}
    assert any(key.endswith(".exp_avg") for key in load_file(str(ckpt / OPTIMIZER_FILE)))
    final = trained["result"].final_dir
    assert json.loads((final / CONFIG_FILE).read_text())["learning_rate"] == FAST["learning_rate"]
    assert not (final / OPTIMIZER_FILE).exists()
    marker = json.loads((final / "captioner.json").read_text())
    assert marker["step"] == trained["result"].best_step  # load_best_at_end: final holds the best checkpoint
    engine = CaptionEngine.load(EngineConfig(model=str(final), device="cpu", dtype="float32"))
    assert engine.version == marker["version"] and engine.version.startswith(out.name + "@step-")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sdpa_in_the_image_encoder_captions_a_trained_model_as_eager_does(
    trained: dict, shapes_split: tuple, dtype: str
) -> None:
    """CAPTIONER_ENCODER_ATTENTION=sdpa: the same math as transformers' eager attention, fused and rounded
    differently: in fp32 a trained model's captions are the same; in bf16 its near-ties can flip some (53 of
    these 60 agreed in one run), so there only the closeness of the image tokens is asserted."""
    from PIL import Image

    _, eval_set = shapes_split
    images = [Image.open(e.image).convert("RGB") for e in eval_set]
    final, params = str(trained["result"].final_dir), GenParams(max_length=16)
    eager = CaptionEngine.load(EngineConfig(model=final, device="cpu", dtype=dtype))
    sdpa = CaptionEngine.load(EngineConfig(model=final, device="cpu", dtype=dtype, encoder_attention="sdpa"))
    assert sdpa.model.config.vision_config._attn_implementation == "sdpa"
    assert eager.model.config.vision_config._attn_implementation == "eager"
    pixels = eager.prepare(images[:8]).to(eager.dtype)
    with torch.inference_mode():
        a, b = (e.model.git.image_encoder(pixels).last_hidden_state.float() for e in (eager, sdpa))
    assert not torch.equal(a, b), "the setting must change the kernel"
    assert torch.allclose(a, b, atol=1e-4 if dtype == "float32" else 0.1)
    if dtype == "float32":
        assert sdpa.caption(images, params) == eager.caption(images, params)


def test_lora_adapters_learn_and_the_version_is_a_plain_full_model(
    tiny_dir: Path, shapes_split: tuple, tmp_path: Path
) -> None:
    """LoRA (peft): only the adapters train, checkpoints hold them alone (safetensors), and the final model has
    them merged in: a plain GIT the caption engine loads, with no LoRA layer and the untargeted weights as before."""
    train_set, eval_set = shapes_split
    cfg = TrainConfig(
        **{**FAST, "learning_rate": 1e-2, "log_steps": 5},
        base_model=str(tiny_dir),
        max_steps=40,
        eval_steps=40,
        save_steps=40,
        lora_r=8,
        lora_alpha=16,
    )
    events: list[dict] = []
    result = train(cfg, train_set[:128], eval_set[:8], tmp_path, on_progress=events.append)
    losses = [e["loss"] for e in events if e["kind"] == "train"]
    # Measured: 10.46 -> 9.36 over these 40 steps (frozen random weights, attention adapters only); without
    # learning the loss stays within noise of where it started.
    assert result.status == TrainStatus.COMPLETED and losses[-1] < losses[0] - 0.5, losses
    ckpt = tmp_path / CHECKPOINTS / "step-40"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert all("lora_" in key for key in load_file(str(ckpt / "adapter_model.safetensors")))
    final = result.final_dir
    assert not (final / "adapter_model.safetensors").exists() and not (final / "adapter_config.json").exists()
    engine = CaptionEngine.load(EngineConfig(model=str(final), device="cpu", dtype="float32"))
    assert type(engine.model).__name__ == "GitForCausalLM"
    assert not [name for name, _ in engine.model.named_modules() if "lora" in name.lower()]
    base, tuned = _weights(tiny_dir), _weights(final)
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(
        k.endswith(("query.weight", "value.weight", "q_proj.weight", "v_proj.weight")) for k in changed
    ), sorted(changed)[:5]
    assert engine.caption(
        [load_image(Source(path=eval_set[0].image), local_image_policy(eval_set))], GenParams(max_length=8)
    )


def test_tensorboard_event_files_hold_loss_lr_metrics_and_samples(
    tiny_dir: Path, shapes_split: tuple, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_set, eval_set = shapes_split
    cfg = TrainConfig(
        **{**FAST, "log_steps": 2},
        base_model=str(tiny_dir),
        max_steps=4,
        eval_steps=2,
        save_steps=2,
        report_to="tensorboard",
    )
    events: list[dict] = []
    train(cfg, train_set[:32], eval_set[:4], tmp_path, on_progress=events.append)
    assert {e["tensorboard"] for e in events} == {str(tmp_path / "tensorboard")}
    board = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    scalars = board.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/wer", "eval/bleu4"} <= set(scalars)
    assert [e.step for e in board.Scalars("eval/wer")] == [2, 4]
    losses = {e.step: e.value for e in board.Scalars("train/loss")}
    assert losses == pytest.approx({e["step"]: e["loss"] for e in events if e["kind"] == "train"})
    text = board.Tensors("eval/samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "reference:" in text


def test_rotation_keeps_the_best_and_the_latest(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        (tmp_path / f"step-{step}").mkdir()
        (tmp_path / f"step-{step}" / STATE_FILE).write_text("{}")
    (tmp_path / "step-25.tmp").mkdir()  # an interrupted save is never a checkpoint
    history = [{"step": s, "metrics": {"wer": w}} for s, w in ((5, 0.2), (10, 0.5), (15, 0.4), (20, 0.3))]
    rotate(tmp_path, TrainConfig(save_total_limit=2), {"history": history})
    assert sorted(p.name for p in tmp_path.iterdir() if (p / STATE_FILE).exists()) == ["step-20", "step-5"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_resume_continues_where_it_stopped(tiny_dir: Path, shapes_split: tuple, tmp_path: Path) -> None:
    train_set, eval_set = shapes_split
    train_set, eval_set = train_set[:64], eval_set[:8]
    base = {**FAST, "base_model": str(tiny_dir), "eval_steps": 5, "save_steps": 5, "grad_accum": 2, "batch_size": 8}
    first = train(TrainConfig(**base, max_steps=10), train_set, eval_set, tmp_path / "resumed")
    assert first.steps == 10
    events: list[dict] = []
    second = train(
        TrainConfig(**base, max_steps=20), train_set, eval_set, tmp_path / "resumed", on_progress=events.append
    )
    assert second.steps == 20 and events[0]["step"] > 10  # no step was run twice
    assert [h["step"] for h in second.history] == [5, 10, 15, 20]
    # A run without the interruption ends with the same weights: optimizer moments, RNG and data order came back.
    straight = train(TrainConfig(**base, max_steps=20), train_set, eval_set, tmp_path / "straight")
    resumed_w = _weights(tmp_path / "resumed" / CHECKPOINTS / "step-20")
    straight_w = _weights(tmp_path / "straight" / CHECKPOINTS / "step-20")
    assert resumed_w.keys() == straight_w.keys()
    for key in straight_w:
        torch.testing.assert_close(resumed_w[key], straight_w[key], rtol=1e-4, atol=1e-5)
    assert second.best_metrics == straight.best_metrics or second.best_step == straight.best_step


def test_should_stop_cancels_with_a_checkpoint(tiny_dir: Path, shapes_split: tuple, tmp_path: Path) -> None:
    train_set, eval_set = shapes_split
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    cfg = TrainConfig(**FAST, base_model=str(tiny_dir), max_steps=100, eval_steps=50, save_steps=50)
    result = train(cfg, train_set[:32], eval_set[:4], tmp_path, should_stop=stop_after_three)
    assert result.status == TrainStatus.CANCELLED and result.status == "cancelled"
    assert result.steps == 3 and result.final_dir is None
    assert (tmp_path / CHECKPOINTS / "step-3" / "model.safetensors").is_file()
    # Running again resumes from that checkpoint and finishes.
    done = train(cfg.__class__(**{**cfg.__dict__, "max_steps": 6}), train_set[:32], eval_set[:4], tmp_path)
    assert done.status == TrainStatus.COMPLETED and done.steps == 6 and done.final_dir is not None


def test_a_run_stopped_under_two_processes_resumes_in_one(
    tiny_dir: Path, shapes_split: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run cancelled under two processes (torchrun, gloo) resumes in one process from the checkpoint the cancel
    wrote, and finishes: no step run twice, the change of process count logged and recorded."""
    import logging

    from training.distributed import run

    train_set, eval_set = shapes_split[0][:32], shapes_split[1][:4]
    policy = local_image_policy(train_set + eval_set)
    opts = {**FAST, "batch_size": 4, "log_steps": 1, "eval_steps": 1000, "save_steps": 1000}
    cfg = TrainConfig(**opts, base_model=str(tiny_dir), max_steps=2000)  # stopped long before its end
    seen: list[dict] = []
    first = run(
        cfg,
        train_set,
        eval_set,
        tmp_path,
        processes=2,
        on_progress=seen.append,
        should_stop=lambda: any(e["kind"] == "train" for e in seen),
        lost=lambda: False,
        image_policy=policy,
        torch_threads=1,
    )
    assert first.status == TrainStatus.CANCELLED and 1 <= first.steps < 1000
    end = first.steps + 6
    stopped = tmp_path / CHECKPOINTS / f"step-{first.steps}"
    assert json.loads((stopped / STATE_FILE).read_text())["processes"] == 2
    events: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="training.checkpoints"):
        done = run(
            TrainConfig(**opts, base_model=str(tiny_dir), max_steps=end),
            train_set,
            eval_set,
            tmp_path,
            processes=1,
            on_progress=events.append,
            should_stop=lambda: False,
            lost=lambda: False,
            image_policy=policy,
        )
    assert done.status == TrainStatus.COMPLETED and done.steps == end and done.final_dir is not None
    assert [e["step"] for e in events if e["kind"] == "train"] == list(range(first.steps + 1, end + 1))
    assert "processes 2 -> 1" in caplog.text
    assert json.loads((tmp_path / CHECKPOINTS / f"step-{end}" / STATE_FILE).read_text())["processes"] == 1


def test_bad_settings_fail_before_any_work(tiny_dir: Path, tmp_path: Path) -> None:
    ex = [Example("/nowhere.png", ["x"])]
    with pytest.raises(ConfigError, match="multiple of eval_steps"):
        train(TrainConfig(base_model=str(tiny_dir), eval_steps=30, save_steps=50), ex, ex, tmp_path)
    with pytest.raises(ConfigError, match="mixed_precision"):
        train(TrainConfig(base_model=str(tiny_dir), mixed_precision="fp8"), ex, ex, tmp_path)


def test_lost_lock_stops_at_the_next_step_without_writing(tiny_dir: Path, shapes_split: tuple, tmp_path: Path) -> None:
    train_set, eval_set = shapes_split
    checks = {"n": 0}

    def lost_after_four() -> bool:  # another runner took the job while this one ran
        checks["n"] += 1
        return checks["n"] > 4

    cfg = TrainConfig(**FAST, base_model=str(tiny_dir), max_steps=50, eval_steps=2, save_steps=2)
    result = train(cfg, train_set[:32], eval_set[:4], tmp_path, lost=lost_after_four)
    assert result.status == TrainStatus.LOST_LOCK and result.final_dir is None
    # Checks run before each step and before each save: steps 1-2, save 2, step 3 ran, then it stopped -
    # without the checkpoint a user's cancel would have written, and without a final model.
    assert result.steps == 3
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["step-2"]
    assert not (tmp_path / "final").exists()


# --- the recipe and its caption draw ----------------------------------------------------------------------


def test_recipe_defaults_are_pinned() -> None:
    """The HF captioning guide's recipe, which the issue asks to keep as the defaults."""
    cfg = TrainConfig()
    assert (cfg.base_model, cfg.learning_rate, cfg.epochs, cfg.batch_size, cfg.grad_accum) == (
        "microsoft/git-base",
        5e-5,
        50,
        32,
        2,
    )
    assert (cfg.eval_steps, cfg.save_steps, cfg.save_total_limit, cfg.load_best_at_end) == (50, 50, 3, True)
    assert (cfg.test_fraction, cfg.mixed_precision, cfg.max_length, cfg.metric_for_best) == (0.1, "auto", 50, "wer")


def test_one_caption_is_drawn_per_image_and_epoch() -> None:
    from training.finetune import draw_captions
    from training.pixels import Item

    captions = [f"caption number {k}" for k in range(5)]
    batch = [Item(i, f"/img/{i}.png", captions) for i in range(8)]
    epochs = [draw_captions(batch, seed=42, epoch=e) for e in range(40)]
    assert draw_captions(batch, seed=42, epoch=3) == epochs[3]  # seeded: a resumed run draws the same
    assert draw_captions(batch, seed=7, epoch=3) != epochs[3]
    per_image = [[drawn[i] for drawn in epochs] for i in range(len(batch))]
    assert all(len(set(seen[:5])) > 1 for seen in per_image), "the draw must change from epoch to epoch"
    assert all(set(seen) == set(captions) for seen in per_image), "every caption is used over enough epochs"
    assert len({tuple(drawn) for drawn in epochs[:5]}) == 5  # images draw independently, not in lockstep
    single = [Item(0, "/img/one.png", ["only"])]
    assert draw_captions(single, seed=1, epoch=9) == ["only"]


# --- the config, checked without torch ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"eval_steps": 30}, r"save_steps \(50\) to be a multiple of eval_steps \(30\)"),
        ({"epochs": "5"}, "epochs must be an integer, got str"),
        ({"epochs": True}, "epochs must be an integer, got bool"),
        ({"max_steps": 2.5}, "max_steps must be an integer or null"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"batch_sise": 8}, "unknown training option.*batch_sise"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"metric_for_best": "accuracy"}, "metric_for_best"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"grad_accum": 0}, "grad_accum must be at least 1"),
    ],
)
def test_train_config_from_dict_refuses_mistakes(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_train_config_accepts_json_values() -> None:
    cfg = TrainConfig.from_dict({"learning_rate": 1, "max_steps": None, "eval_steps": 25, "save_steps": 100})
    assert cfg.learning_rate == 1 and cfg.max_steps is None and cfg.save_steps == 100


def test_set_overrides_are_typed_and_checked() -> None:
    from training.config import parse_override

    assert parse_override("grad_accum=4") == ("grad_accum", 4)
    assert parse_override("test-fraction=0.2") == ("test_fraction", 0.2)
    assert parse_override("load_best_at_end=false") == ("load_best_at_end", False)
    assert parse_override("max_steps=none") == ("max_steps", None)
    assert parse_override("mixed_precision=bf16") == ("mixed_precision", "bf16")
    assert parse_override("learning_rate=3e-3") == ("learning_rate", 3e-3)
    for item, match in (
        ("grad_accum=two", "must be an integer"),
        ("nope=1", "no such training option"),
        ("seed", "KEY=VALUE"),
        ("eval_on_start=maybe", "true or false"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_override(item)


# --- datasets from our own exports ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["beside the images", "elsewhere"])
def test_exported_metadata_feeds_training(
    shapes6: tuple[Path, list[tuple[Path, str]]], tmp_path: Path, where: str
) -> None:
    """`captioner export JOB --format metadata` written next to the images (relative names) or anywhere else
    (absolute names) loads back as an imagefolder and as a manifest."""
    from click.testing import CliRunner

    from cli.main import cli
    from common.messages import GenParams, ItemResult, ItemStatus, item_id
    from ledger import RedisLedger

    _, rows = shapes6
    images = tmp_path / "images"
    names = _copy_images(rows, images)
    ledger = RedisLedger(redis.Redis.from_url(redis_url(LEDGER_DB)), "captioner-test-export")
    ledger.r.flushdb()
    refs = [str(images / n) for n in names]
    ledger.open_job("job-meta", "meta", GenParams())
    ledger.add_items("job-meta", [(item_id(r), r) for r in refs])
    ledger.record(
        "job-meta",
        [ItemResult(id=item_id(r), ref=r, status=ItemStatus.OK, caption=f"caption {i}") for i, r in enumerate(refs)],
    )
    folder = images if where == "beside the images" else tmp_path / "export"
    folder.mkdir(exist_ok=True)
    env = {"CAPTIONER_BROKER_URL": redis_url(LEDGER_DB), "CAPTIONER_KEY_PREFIX": "captioner-test-export"}
    out = CliRunner().invoke(cli, ["export", "job-meta", "--format", "metadata", "-o", str(folder)], env=env)
    assert out.exit_code == 0, out.output
    written = [json.loads(line)["file_name"] for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert all(Path(name).is_absolute() == (where == "elsewhere") for name in written)
    expected = sorted((r, [f"caption {i}"]) for i, r in enumerate(refs))
    for spec in (folder, folder / "metadata.jsonl"):
        assert sorted((ex.image, ex.captions) for ex in load_examples(str(spec))) == expected


def test_a_word_vocabulary_git_knows_every_caption_word_and_reloads(tmp_path: Path) -> None:
    """The demo's GIT: a tokenizer of the synthetic captions' words only, saved and loaded like any model."""
    from training.synthetic import caption_for, vocabulary
    from training.tiny import build_word_git

    model_dir = build_word_git(tmp_path / "words", vocabulary(), image_size=48, patch_size=16, dropout=0.0)
    engine = CaptionEngine.load(EngineConfig(model=str(model_dir), device="cpu", dtype="float32"))
    tokenizer = engine.processor.tokenizer
    assert engine.model.config.vocab_size == len(tokenizer) == 5 + len(vocabulary())
    caption = caption_for("diamond", "orange", "top", "gray")
    ids = tokenizer(caption)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == len(caption.split()) + 2  # one token a word
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    image = load_image(
        Source(path=make_shapes(tmp_path / "img", 1, size=48)[0][0].as_posix()),
        local_image_policy([Example(str(tmp_path / "img" / "000000.png"), ["x"])]),
    )
    [out] = engine.caption([image], GenParams(max_length=8))
    assert set(out.split()) <= set(vocabulary())
