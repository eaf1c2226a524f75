"""Every captioning family besides GIT: a tiny random model of each, built offline, captions exactly as transformers'
own greedy ``generate`` does one image at a time in float32, in the engine and through a real worker process."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.errors import ModelLoadError
from common.messages import GenParams
from ledger import Ledger
from model.engine import CaptionEngine, EngineConfig
from model.families import FamilyEngine, load_engine
from training import tiny_families

#: family name -> its tiny builder; the names are what the engine reports as ``family_name``.
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
MAX_LENGTH = 12


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; tiny models gain nothing from more threads
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / f"tiny-{name}", seed=0) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from training.synthetic import make_shapes

    folder = tmp_path_factory.mktemp("family-shapes")
    return [p for p, _ in make_shapes(folder, 6, seed=5, size=48)]


def _load(path: Path) -> FamilyEngine:
    engine = load_engine(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    assert isinstance(engine, FamilyEngine)
    return engine


def reference_captions(
    family: str, model_dir: Path, paths: list[Path], prompt: str | None = None, max_length: int = MAX_LENGTH
) -> list[str]:
    """transformers' own way, one image at a time, float32: each family as its model card shows it."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        Blip2ForConditionalGeneration,
        BlipForConditionalGeneration,
        Florence2ForConditionalGeneration,
        VisionEncoderDecoderModel,
    )

    out = []
    if family == "vision-encoder-decoder":
        model = VisionEncoderDecoderModel.from_pretrained(model_dir).eval()
        image_processor, tokenizer = (
            AutoImageProcessor.from_pretrained(model_dir),
            AutoTokenizer.from_pretrained(model_dir),
        )
        for path in paths:
            pixels = image_processor(images=Image.open(path).convert("RGB"), return_tensors="pt").pixel_values
            kwargs = {}
            if prompt:
                start = [model.config.decoder_start_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
                kwargs["decoder_input_ids"] = torch.tensor([start])
            with torch.inference_mode():
                ids = model.generate(pixel_values=pixels, max_length=max_length, **kwargs)
            out.append(tokenizer.decode(ids[0], skip_special_tokens=True).strip())
        return out
    cls = {
        "blip": BlipForConditionalGeneration,
        "blip-2": Blip2ForConditionalGeneration,
        "florence-2": Florence2ForConditionalGeneration,
    }.get(family, AutoModelForImageTextToText)
    model = cls.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    for path in paths:
        image = Image.open(path).convert("RGB")
        if family == "blip":  # the caption continues the prompt; max_length counts [DEC] and the prompt
            inputs, budget, skip = (
                processor(images=image, text=prompt, return_tensors="pt"),
                {"max_length": max_length},
                0,
            )
        elif family == "florence-2":
            inputs = processor(images=image, text=prompt or "<CAPTION>", return_tensors="pt")
            budget, skip = {"max_length": max_length}, 0
        elif family == "blip-2":
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            budget = {"max_new_tokens": max_length - 1}
            skip = inputs["input_ids"].shape[1] if "input_ids" in inputs else model.config.num_query_tokens + 1
        elif family == "paligemma":
            inputs = processor(images=image, text="<image>" + (prompt or "caption en"), return_tensors="pt")
            budget, skip = {"max_new_tokens": max_length - 1}, inputs["input_ids"].shape[1]
        else:  # chat VLMs: the image and the prompt in one user turn, through the processor's chat template
            text = prompt or "Describe this image in one sentence."
            messages = [
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}
            ]
            inputs = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            budget, skip = {"max_new_tokens": max_length - 1}, inputs["input_ids"].shape[1]
        with torch.inference_mode():
            ids = model.generate(**inputs, **budget)
        out.append(processor.tokenizer.decode(ids[0, skip:], skip_special_tokens=True).strip())
    return out


# --- the engine, family by family ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(BUILDERS))
def test_batched_greedy_equals_transformers_one_at_a_time(
    family: str, family_models: dict[str, Path], shapes: list[Path]
) -> None:
    engine = _load(family_models[family])
    assert engine.family_name == family
    images = [Image.open(p) for p in shapes]
    got = engine.generate_detailed(
        engine.stack([engine.prepare([im]) for im in images]), GenParams(max_length=MAX_LENGTH)
    )
    want = reference_captions(family, family_models[family], shapes)
    assert [g.text for g in got] == want
    assert len(set(want)) > 1, f"the tiny {family} captions every image alike: equality would prove little"
    for g in got:  # max_length bounds every caption as it bounds GIT's
        assert 1 < g.tokens <= MAX_LENGTH and (g.ended or g.tokens == MAX_LENGTH)


@pytest.mark.parametrize(
    ("family", "prompt"),
    [
        ("blip", "a picture of"),
        ("vision-encoder-decoder", "a photo of"),
        ("florence-2", "<DETAILED_CAPTION>"),
        ("florence-2", "<MORE_DETAILED_CAPTION>"),
        ("blip-2", "describe this image:"),
        ("llava", "What does this image show?"),
        ("idefics3", "Describe this image in detail."),
        ("paligemma", "caption en"),
        ("qwen2_5_vl", "What does this image show?"),
        ("qwen3_vl", "Describe this image in detail."),
        ("internvl", "What is shown in this image?"),
        ("smolvlm", "Describe this image in one sentence."),
    ],
)
def test_prompt_per_call_equals_transformers(
    family: str, prompt: str, family_models: dict[str, Path], shapes: list[Path]
) -> None:
    engine = _load(family_models[family])
    params = GenParams(max_length=MAX_LENGTH, prompt=prompt)
    got = engine.caption([Image.open(p) for p in shapes[:3]], params)
    assert got == reference_captions(family, family_models[family], shapes[:3], prompt=prompt)
    if family in ("blip", "vision-encoder-decoder"):  # the caption continues the prompt, as GIT's does
        assert all(c.startswith(prompt) for c in got), got


def test_prompt_is_per_call_not_per_model(family_models: dict[str, Path], shapes: list[Path]) -> None:
    engine = _load(family_models["florence-2"])
    image = [Image.open(shapes[0])]
    plain = engine.caption(image, GenParams(max_length=MAX_LENGTH))
    detailed = engine.caption(image, GenParams(max_length=MAX_LENGTH, prompt="<DETAILED_CAPTION>"))
    assert engine.caption(image, GenParams(max_length=MAX_LENGTH)) == plain  # nothing of the last call stays
    assert plain == reference_captions("florence-2", family_models["florence-2"], shapes[:1])
    assert detailed == reference_captions("florence-2", family_models["florence-2"], shapes[:1], "<DETAILED_CAPTION>")


@pytest.mark.parametrize(
    ("family", "build"),
    [
        ("idefics3", partial(tiny_families.build_tiny_idefics3, split=True)),
        ("smolvlm", partial(tiny_families.build_tiny_smolvlm, split=True)),
        ("internvl", tiny_families.build_tiny_internvl),
    ],
)
def test_left_padded_rows_of_different_lengths_equal_one_at_a_time(
    family: str, build: Callable[..., Path], tmp_path: Path, shapes: list[Path]
) -> None:
    """Images split into tiles by aspect ratio (Idefics3 and SmolVLM; InternVL's dynamic tiling): rows of one
    batch have different lengths, so the shorter ones are padded on the left, and the captions still equal
    transformers' one by one."""
    model_dir = build(tmp_path / f"{family}-tiled")
    paths = []
    for n, (path, size) in enumerate(
        zip(shapes, [(96, 32), (32, 32), (64, 96), (48, 48), (96, 64), (32, 96)], strict=True)
    ):
        paths.append(tmp_path / f"{n}.png")
        Image.open(path).convert("RGB").resize(size).save(paths[-1])
    engine = _load(model_dir)
    images = [Image.open(p) for p in paths]
    batch = engine.family.batch(
        engine.processor, images, engine.family.prompt(GenParams()), engine.device, engine.dtype
    )
    assert len(set(batch.inputs["attention_mask"].sum(1).tolist())) > 1, "no row was padded: the test proves nothing"
    got = engine.caption(images, GenParams(max_length=MAX_LENGTH))
    assert got == reference_captions(family, model_dir, paths)


def test_a_prompt_the_processor_refuses_is_named(family_models: dict[str, Path], shapes: list[Path]) -> None:
    from common.errors import EngineError

    engine = _load(family_models["florence-2"])
    with pytest.raises(EngineError, match="florence-2 cannot caption with prompt '<CAPTION> of a dog'"):
        engine.caption([Image.open(shapes[0])], GenParams(max_length=MAX_LENGTH, prompt="<CAPTION> of a dog"))


def test_prefix_prompt_counts_against_max_length(family_models: dict[str, Path]) -> None:
    engine = _load(family_models["blip"])
    assert engine.prompt_ids("a picture of").shape == (1, 4)  # [DEC] + three words, as GIT counts [CLS] + prompt
    assert _load(family_models["llava"]).prompt_ids("describe this image in detail").shape == (1, 1)


def test_empty_batch_and_alignment(family_models: dict[str, Path], shapes: list[Path]) -> None:
    engine = _load(family_models["llava"])
    assert engine.generate_detailed([], GenParams()) == []
    assert len(engine.caption([Image.open(p) for p in shapes], GenParams(max_length=6))) == len(shapes)


def test_git_still_loads_on_its_fast_decoder(tiny_model: Path) -> None:
    engine = load_engine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32"))
    assert isinstance(engine, CaptionEngine) and engine._fast is not None


def test_a_speed_piece_falls_back_with_its_reason(family_models: dict[str, Path]) -> None:
    engine = load_engine(EngineConfig(model=str(family_models["blip"]), device="cpu", dtype="float32", pieces="+sdpa"))
    assert engine.profile == "exact" and "blip runs exact" in engine.pieces.fallbacks["sdpa"]


def test_not_a_captioning_checkpoint_is_named() -> None:
    from training.tiny import find_bert_vocab

    with pytest.raises(ModelLoadError, match="'bert' is not a captioning model"):
        load_engine(EngineConfig(model=str(find_bert_vocab().parent), dtype="float32"))


def test_pickle_only_family_checkpoint_refused(family_models: dict[str, Path], tmp_path: Path) -> None:
    from common.errors import UnsafeCheckpoint

    copy = Path(shutil.copytree(family_models["blip"], tmp_path / "blip-pickle"))
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match="only pickle weights"):
        load_engine(EngineConfig(model=str(copy), dtype="float32"))


def test_family_checkpoint_missing_weights_refused(family_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy = Path(shutil.copytree(family_models["llava"], tmp_path / "llava-short"))
    weights = load_file(copy / "model.safetensors")
    dropped = next(k for k in weights if "multi_modal_projector" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks or mis-shapes 1 weight"):
        load_engine(EngineConfig(model=str(copy), dtype="float32"))


# --- through a real worker process -----------------------------------------------------------------------------


def test_one_worker_captions_a_folder_with_each_family_promoted_in_turn(
    worker_env: dict[str, str], family_models: dict[str, Path], tiny_model: Path, session_root: Path, tmp_path: Path
) -> None:
    """A worker serving ``@current`` swaps to each promoted family between batches, GIT last, and every family's
    captions of a folder equal transformers' greedy generate one image at a time (fp32)."""
    import uuid

    from common.store import ModelStore
    from producer.jobs import JobClient
    from producer.local import WorkerProcess
    from tests.conftest import MAX_LENGTH as WORKER_MAX_LENGTH
    from tests.conftest import direct_captions, settings_from
    from tests.test_recovery import wait_for
    from training.synthetic import make_shapes

    store = ModelStore(tmp_path / "store")
    order = [*BUILDERS, "git"]
    for family in order:
        store.add(tiny_model if family == "git" else family_models[family], {"base_model": family}, f"v-{family}")
    store.promote(f"v-{order[0]}")
    folder = session_root / f"families-{uuid.uuid4().hex[:6]}"
    paths = [p for p, _ in make_shapes(folder, 5, seed=9, size=40)]
    queue = f"captions-families-{uuid.uuid4().hex[:8]}"
    env = {
        **worker_env,
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_INTERACTIVE_QUEUE": f"{queue}-now",
        "CAPTIONER_MODEL": "@current",
        "CAPTIONER_MODEL_STORE": str(store.root),
        "CAPTIONER_MODEL_POLL_S": "0.2",
    }
    log = tmp_path / "worker.log"
    client = JobClient(settings_from(env))
    with WorkerProcess(env, log=log) as worker:
        worker.wait_ready()
        for n, family in enumerate(order):
            if n:
                store.promote(f"v-{family}")
                wait_for(lambda f=family: f"-> v-{f} (promoted)" in log.read_text(), 60, f"the swap to {family}")
            job = f"job-{family}-{uuid.uuid4().hex[:6]}"
            client.enqueue([str(p) for p in paths], job_id=job, chunk_size=3)
            client.wait(job, timeout=120, on_tick=lambda _: None)
            rows = {r["ref"]: r for r in client.results(job)}
            assert {r["model_version"] for r in rows.values()} == {f"v-{family}"}, family
            assert {r.get("family") for r in rows.values()} == {None if family == "git" else family}
            got = [rows[str(p)]["caption"] for p in paths]
            if family == "git":
                want = [direct_captions(tiny_model, paths)[str(p)] for p in paths]
            else:
                want = reference_captions(family, family_models[family], paths, max_length=WORKER_MAX_LENGTH)
            assert got == want, family
    client.close()


def test_hub_id_of_a_family_loads_from_cache_with_commit_version(
    family_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shapes: list[Path]
) -> None:
    from tests.test_engine import HUB_COMMIT, _fake_hub_repo

    _fake_hub_repo(tmp_path, "tiny-florence", family_models["florence-2"], monkeypatch)
    engine = load_engine(EngineConfig(model="acme/tiny-florence", device="cpu", dtype="float32"))
    assert isinstance(engine, FamilyEngine) and engine.version == f"acme/tiny-florence@{HUB_COMMIT}"
    image = [Image.open(shapes[0])]
    assert engine.caption(image, GenParams(max_length=MAX_LENGTH)) == _load(family_models["florence-2"]).caption(
        image, GenParams(max_length=MAX_LENGTH)
    )


def test_rows_keep_their_family_in_both_ledgers_and_git_keys_stay_as_before(ledger: Ledger) -> None:
    """The family travels in the job's provenance table (Redis and PostgreSQL); a GIT row's key keeps its three
    parts, so provenance written before families existed reads back the same."""
    import json

    from common.messages import ItemResult, ItemStatus, item_id
    from ledger.codec import Provenance
    from tests.test_ledger import new_job

    blip = Provenance("v-blip", GenParams(max_length=12), "exact", "blip")
    git = Provenance("v-git", GenParams(max_length=12), "exact")
    assert Provenance.from_key(blip.key()) == blip and Provenance.from_key(git.key()) == git
    assert len(json.loads(git.key())) == 3
    refs = ["/data/a.jpg", "/data/b.jpg"]
    new_job(ledger, "fam", refs)
    rows = [
        ItemResult(
            id=item_id(r),
            ref=r,
            status=ItemStatus.OK,
            caption="a caption",
            model_version=v,
            params=GenParams(max_length=12),
            profile="exact",
            family=f,
        )
        for r, v, f in ((refs[0], "v-blip", "blip"), (refs[1], "v-git", None))
    ]
    ledger.record("fam", rows)
    back = {r["ref"]: r for r in ledger.iter_results("fam")}
    assert back[refs[0]]["family"] == "blip" and "family" not in back[refs[1]]
