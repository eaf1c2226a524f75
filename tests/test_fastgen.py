"""The fast greedy GIT decoder returns exactly the ids of HF ``model.generate``: batch sizes, lengths, prompts,
rows ending early (and dropped from the batch), half precision, a multi-head git-base-like shape; plus its
fallbacks and the engine's ``decoder`` option."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from common.errors import ConfigError
from common.messages import GenParams
from common.settings import Settings
from model.engine import CaptionEngine, EngineConfig
from model.fastgen import GitGreedyDecoder, unsupported_reason
from training import synthetic, tiny

CLS, SEP = tiny.CLS_ID, tiny.SEP_ID
PROMPT_IDS = [CLS, 1037, 2417, 4418]  # [CLS] a red circle


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: tiny models gain nothing from more, and a busy 2-core machine punishes spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import GitForCausalLM

    return GitForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_git(tmp_path_factory.mktemp("fastgen") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> Any:
    return _load(tiny_dir)


@pytest.fixture(scope="module")
def base_like(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """git-base's layout made small: 2 layers, 128 wide, 4 heads of 32, patch 16 at 64 px (17 image tokens)."""
    config = tiny.tiny_git_config(image_size=64, patch_size=16, hidden_size=128, layers=2, init_range=0.2)
    config.num_attention_heads = config.vision_config.num_attention_heads = 4
    return _load(tiny.build_random_git(tmp_path_factory.mktemp("fastgen") / "base-like", config, seed=3))


@pytest.fixture(scope="module")
def pixels(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """Eight varied 32 px inputs: processed shape images, a flat grey one, and noise."""
    from transformers import AutoProcessor

    rows = synthetic.make_shapes(tmp_path_factory.mktemp("shapes"), 5, seed=11, size=48)
    images = [Image.open(path).convert("RGB") for path, _ in rows] + [Image.new("RGB", (40, 30), (128, 128, 128))]
    processed = AutoProcessor.from_pretrained(tiny_dir).image_processor(images, return_tensors="pt")["pixel_values"]
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    return torch.cat([torch.as_tensor(processed), noise])


def with_eos_bias(model: Any, bias: float) -> Any:
    """A copy whose [SEP] logit is raised so that rows end after different numbers of tokens."""
    boosted = copy.deepcopy(model)
    with torch.no_grad():
        boosted.output.bias[SEP] += bias
    return boosted


def hf_ids(model: Any, pixel_values: torch.Tensor, max_length: int, input_ids: torch.Tensor | None = None) -> Any:
    kwargs: dict[str, Any] = {"pixel_values": pixel_values, "max_length": max_length, "do_sample": False}
    if input_ids is not None:
        kwargs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    with torch.inference_mode():
        return model.generate(num_beams=1, **kwargs)


def assert_same_as_hf(
    model: Any, pixel_values: torch.Tensor, max_length: int, input_ids: torch.Tensor | None = None, **options: Any
) -> GitGreedyDecoder:
    """Fast ids == HF ids, token for token and in shape; the decoder (built with ``options``) is returned."""
    pixel_values = pixel_values.to(model.dtype)
    decoder = GitGreedyDecoder(model, **options)
    expected = hf_ids(model, pixel_values, max_length, input_ids)
    got = decoder.generate(pixel_values, max_length, input_ids)
    assert got.dtype == expected.dtype == torch.long
    assert got.tolist() == expected.tolist()
    return decoder


def caption_lengths(ids: torch.Tensor) -> list[int]:
    """Tokens up to and including [SEP] (the whole row when it never ends)."""
    return [int((row == SEP).nonzero()[0]) + 1 if (row == SEP).any() else len(row) for row in ids]


# --- equality with HF generate -------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [5, 20, 50])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_same_ids_as_hf(tiny_model: Any, pixels: torch.Tensor, batch: int, max_length: int) -> None:
    decoder = assert_same_as_hf(tiny_model, pixels[:batch], max_length)
    assert decoder.stats.steps == max_length - 1  # this random model never says [SEP]: full length


def test_long_captions_grow_the_cache(tiny_model: Any, pixels: torch.Tensor) -> None:
    decoder = assert_same_as_hf(tiny_model, pixels[:3], 150)  # 64 text slots, then 128, then 149
    assert decoder.stats.cache_grows == 2 and decoder.stats.steps == 149


def test_rows_are_independent_of_their_batch(tiny_model: Any, pixels: torch.Tensor) -> None:
    decoder = GitGreedyDecoder(tiny_model)
    together = decoder.generate(pixels, 20)
    alone = torch.cat([decoder.generate(pixels[i : i + 1], 20) for i in range(len(pixels))])
    assert together.tolist() == alone.tolist()
    assert len({tuple(row) for row in together.tolist()}) > 4  # the images really give different captions


@pytest.mark.parametrize("max_length", [5, 16])
def test_prompt(tiny_model: Any, pixels: torch.Tensor, max_length: int) -> None:
    prompt = torch.tensor([PROMPT_IDS] * 4)
    decoder = assert_same_as_hf(tiny_model, pixels[:4], max_length, prompt)
    assert decoder.stats.steps == max_length - len(PROMPT_IDS)


def test_rows_ending_early_leave_the_batch(tiny_model: Any, pixels: torch.Tensor) -> None:
    model = with_eos_bias(tiny_model, 10.0)
    decoder = assert_same_as_hf(model, pixels, 30)
    ids = decoder.generate(pixels, 30)
    lengths = caption_lengths(ids)
    assert len(set(lengths)) >= 3 and min(lengths) < 10 < max(lengths)  # ragged, as the test needs
    stats = decoder.stats
    assert stats.compactions >= 1 and stats.rows_dropped >= 2
    assert stats.row_steps < stats.rows * stats.steps  # finished rows stopped costing work
    assert ids.shape[1] == max(lengths)  # as wide as the longest caption, like HF
    assert all((row[n:] == 0).all() for row, n in zip(ids, lengths, strict=True))  # pad after [SEP]


def test_a_lone_early_row_stays_until_enough_finish(tiny_model: Any, pixels: torch.Tensor) -> None:
    # Make a token only row 0 ever says the stop token: one row of eight ends early. That is not worth a cache
    # copy, so the row rides along, its tokens masked to pad, until the others end.
    said = GitGreedyDecoder(tiny_model).generate(pixels, 30)[:, 1:]
    row = said[0].tolist()
    stop = next(t for t in row[2:20] if not (said[1:] == t).any())  # ends row 0 at its first occurrence
    model = copy.deepcopy(tiny_model)
    model.generation_config.eos_token_id = stop
    decoder = assert_same_as_hf(model, pixels, 30)
    ids = decoder.generate(pixels, 30)
    end = row.index(stop) + 2  # [CLS] + tokens up to the stop token
    assert ids[0, end - 1] == stop and (ids[0, end:] == 0).all() and ids.shape[1] == 30
    assert decoder.stats.compactions == 0 and decoder.stats.row_steps == 8 * 29


def test_all_rows_ending_stops_early(tiny_model: Any, pixels: torch.Tensor) -> None:
    model = with_eos_bias(tiny_model, 14.0)
    decoder = assert_same_as_hf(model, pixels, 50)
    assert decoder.stats.steps < 20 and all((row == SEP).any() for row in decoder.generate(pixels, 50))


def test_eos_list_and_missing_pad(tiny_model: Any, pixels: torch.Tensor) -> None:
    # Two stop ids and no pad id: HF then pads with the first stop id.
    model = copy.deepcopy(tiny_model)
    first = int(GitGreedyDecoder(model).generate(pixels[:1], 3)[0, 1])  # row 0's first token
    model.generation_config.eos_token_id = [SEP, first]
    model.generation_config.pad_token_id = None
    decoder = assert_same_as_hf(model, pixels, 20)
    ids = decoder.generate(pixels, 20)
    assert decoder.pad == SEP and ids[0, 1] == first and (ids[0, 2:] == SEP).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(tiny_dir: Path, pixels: torch.Tensor, dtype: torch.dtype) -> None:
    model = _load(tiny_dir, dtype)
    assert_same_as_hf(model, pixels, 20)
    assert_same_as_hf(model, pixels[:3], 12, torch.tensor([PROMPT_IDS] * 3))
    assert_same_as_hf(with_eos_bias(model, 10.0), pixels, 30)


def test_git_base_like_shape(base_like: Any) -> None:
    pixel_values = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    decoder = assert_same_as_hf(base_like, pixel_values[:1], 20)
    assert decoder.heads == 4 and decoder.head_dim == 32 and decoder.image_tokens == 17
    assert_same_as_hf(base_like, pixel_values, 20)
    assert_same_as_hf(base_like, pixel_values[:2], 9, torch.tensor([PROMPT_IDS] * 2))
    for bias in (6.5, 7.0):  # [SEP] raised to within reach: rows end after 3 to 15 tokens, one runs on
        decoder = assert_same_as_hf(with_eos_bias(base_like, bias), pixel_values, 25)
        assert decoder.stats.compactions >= 2 and decoder.stats.steps == 24


# --- what goes to HF instead -----------------------------------------------------------------------


def test_unsupported_models_and_configs(tiny_model: Any) -> None:
    assert unsupported_reason(tiny_model) is None
    assert "not a GitForCausalLM" in unsupported_reason(object())
    penalised = copy.deepcopy(tiny_model)
    penalised.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty" in unsupported_reason(penalised)
    with pytest.raises(ValueError, match="repetition_penalty"):
        GitGreedyDecoder(penalised)
    video = copy.deepcopy(tiny_model)
    video.config.num_image_with_embedding = 2
    assert "video" in unsupported_reason(video)
    training = copy.deepcopy(tiny_model).train()
    assert "training" in unsupported_reason(training)


def test_requests_hf_refuses_are_refused(tiny_model: Any, pixels: torch.Tensor) -> None:
    decoder = GitGreedyDecoder(tiny_model)
    assert decoder.request_reason(1, 1) and decoder.request_reason(4, 4) and decoder.request_reason(1, 514)
    assert decoder.request_reason(1, 2) is None and decoder.request_reason(1, 513) is None
    with pytest.raises(ValueError, match="max_length"):
        decoder.generate(pixels[:1], 1)
    with pytest.raises(ValueError, match="max_length"):
        hf_ids(tiny_model, pixels[:1], 1)


# --- the engine's decoder option -------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    colours = [(220, 30, 30), (30, 160, 50), (30, 60, 220), (240, 220, 30), (15, 15, 15)]
    return [Image.new("RGB", (32 + 7 * i, 32), colour) for i, colour in enumerate(colours)]


def _engine(tiny_dir: Path, decoder: str) -> CaptionEngine:
    return CaptionEngine.load(EngineConfig(model=str(tiny_dir), dtype="float32", decoder=decoder))


def test_engine_decoders_agree(tiny_dir: Path, images: list[Image.Image]) -> None:
    hf, fast, auto = (_engine(tiny_dir, name) for name in ("hf", "fast", "auto"))
    assert hf._fast is None and fast._fast is not None and auto._fast is not None
    for params in (GenParams(max_length=20), GenParams(max_length=12, prompt="a red circle"), GenParams()):
        expected = hf.caption(images, params)
        assert fast.caption(images, params) == expected == auto.caption(images, params)


def test_engine_routes_greedy_to_fast_and_beams_to_hf(
    tiny_dir: Path, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tiny_dir, "auto")
    calls: list[int] = []
    real_generate = engine.model.generate

    def counting_generate(**kwargs: Any) -> Any:
        calls.append(kwargs["num_beams"])
        return real_generate(**kwargs)

    monkeypatch.setattr(engine.model, "generate", counting_generate)
    engine.caption(images, GenParams(max_length=10))
    assert calls == [] and engine._fast.stats.rows == len(images)
    engine.caption(images, GenParams(max_length=10, num_beams=2))
    assert calls == [2]
    # A prompt that fills max_length never gets here from a message (GenParams and the service refuse it first);
    # built without those checks, the engine hands it to HF, whose own refusal it raises, as without fastgen.
    with pytest.raises(ValueError, match="max_length"):
        engine.caption(images, GenParams.model_construct(max_length=4, num_beams=1, prompt="a red circle"))
    assert calls == [2, 1]


def test_engine_decoder_option_checks(tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unknown decoder"):
        _engine(tiny_dir, "turbo")
    engine = _engine(tiny_dir, "hf")
    engine.model.generation_config.no_repeat_ngram_size = 2  # a logits processor only HF applies
    with pytest.raises(ConfigError, match="no_repeat_ngram_size"):
        CaptionEngine(engine.model, engine.processor, name="x", version="1", decoder="fast")
    assert CaptionEngine(engine.model, engine.processor, name="x", version="1", decoder="auto")._fast is None


def test_decoder_setting_reaches_the_engine_config() -> None:
    assert Settings().decoder == "auto"
    assert EngineConfig.from_settings(Settings(decoder="hf")).decoder == "hf"
    assert EngineConfig(model="m").decoder == "auto"


# --- speed pieces: fused attention, the static (CUDA graph) step, compile's fallback ------------------


@pytest.mark.parametrize(
    "options", [{"fused_attention": True}, {"static_steps": True}, {"static_steps": True, "fused_attention": True}]
)
def test_pieces_keep_hf_ids_in_fp32(tiny_model: Any, pixels: torch.Tensor, options: dict[str, bool]) -> None:
    """In fp32 the fused kernel and the masked full-cache attention round like HF's eager arithmetic: same ids."""
    decoder = assert_same_as_hf(tiny_model, pixels, 20, **options)
    assert decoder.stats.static_steps == (18 if options.get("static_steps") else 0)  # every step after the first
    assert_same_as_hf(tiny_model, pixels[:3], 12, torch.tensor([PROMPT_IDS] * 3), **options)


def test_static_steps_pad_rows_to_a_bucket_and_shrink_it(tiny_model: Any, pixels: torch.Tensor) -> None:
    """Seven rows run in a bucket of 8; as rows end, the running ones move to smaller buckets; ids stay HF's."""
    model = with_eos_bias(tiny_model, 10.0)
    decoder = assert_same_as_hf(model, pixels[:7], 30, static_steps=True)
    assert decoder.static is not None
    buckets = sorted({rows for rows, _, _ in decoder.static.shapes})
    assert buckets[-1] == 8 and len(buckets) >= 2  # 7 rows padded to 8, then at least one smaller bucket
    assert {capacity for _, capacity, _ in decoder.static.shapes} == {decoder.image_tokens + 29}
    stats = decoder.stats
    assert stats.compactions >= 1 and stats.rows_dropped >= 2 and stats.graph_replays == 0  # no CUDA here
    with torch.inference_mode():  # what a diverged batch could leave behind in the reused caches
        for shape in decoder.static.shapes.values():
            for kv in shape.cache:
                kv.fill_(float("nan"))
    again = decoder.generate(pixels[:7], 30)  # shapes are reused, their old contents never leak into a new batch
    assert again.tolist() == hf_ids(model, pixels[:7], 30).tolist()


def test_bucket_is_the_next_power_of_two() -> None:
    from model.fastgen import MAX_BUCKET, bucket

    assert [bucket(n) for n in (0, 1, 2, 3, 5, 8, 9, 500)] == [1, 1, 2, 4, 8, 8, 16, 512]
    assert bucket(10**6) == MAX_BUCKET


@pytest.mark.slow  # dynamo traces the whole encoder and prefill before the backend runs: a minute on 2 busy cores
def test_a_compiled_prefill_that_cannot_be_built_falls_back_for_good(tiny_model: Any, pixels: torch.Tensor) -> None:
    """A compiler backend that fails (here: the name of none) leaves the exact path running and says why, once."""
    dropped: list[tuple[str, str]] = []
    decoder = GitGreedyDecoder(tiny_model, on_fallback=lambda piece, why: dropped.append((piece, why)))
    decoder.compiled = torch.compile(decoder._encode_prefill, backend=_failing_backend)
    decoder.compiled_sizes.add(3)
    expected = hf_ids(tiny_model, pixels[:3], 10).tolist()
    assert decoder.generate(pixels[:3], 10).tolist() == expected
    assert decoder.compiled is None and [p for p, _ in dropped] == ["compile"]
    assert "RuntimeError: no C++ compiler on this host" in dropped[0][1]
    assert decoder.generate(pixels[:3], 10).tolist() == expected and len(dropped) == 1


def _failing_backend(graph: Any, example_inputs: Any) -> Any:
    """A torch.compile backend as a host without a C++ compiler behaves: tracing works, building the code fails."""
    raise RuntimeError("no C++ compiler on this host")
