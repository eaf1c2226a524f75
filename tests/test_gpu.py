"""The CUDA paths: decode steps replayed as CUDA graphs, fused attention, the compiled prefill and a real CUDA
out-of-memory that the batcher halves its way past. Marked ``gpu``: deselected by default, run by bench/gpu.sh;
skipped where no CUDA device is visible, so no CPU run ever fails on them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from common.messages import GenParams
from model.engine import CaptionEngine, EngineConfig
from model.fastgen import GitGreedyDecoder
from training import tiny
from worker.batcher import MicroBatcher

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_git(tmp_path_factory.mktemp("gpu") / "tiny", seed=0)


def _model(model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import GitForCausalLM

    return GitForCausalLM.from_pretrained(model_dir, dtype=dtype).eval().to("cuda")


def _hf(model: Any, pixels: torch.Tensor, max_length: int) -> list[list[int]]:
    with torch.inference_mode():
        return model.generate(pixel_values=pixels, max_length=max_length, num_beams=1, do_sample=False).tolist()


def test_cuda_graph_steps_give_hf_ids_in_fp32(tiny_dir: Path) -> None:
    model = _model(tiny_dir)
    pixels = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(1)).cuda()
    decoder = GitGreedyDecoder(model, static_steps=True)
    assert decoder.generate(pixels, 20).tolist() == _hf(model, pixels, 20)
    assert decoder.stats.graph_replays == decoder.stats.static_steps == 18  # every step after the first, replayed
    assert decoder.generate(pixels[:3], 20).tolist() == _hf(model, pixels[:3], 20)  # another bucket, its own graph
    assert {rows for rows, _, _ in decoder.static.shapes} == {8, 4}  # type: ignore[union-attr]


def test_cuda_graph_steps_shrink_their_bucket_as_rows_end(tiny_dir: Path) -> None:
    model = copy.deepcopy(_model(tiny_dir))
    with torch.no_grad():
        model.output.bias[tiny.SEP_ID] += 10.0  # rows end after different numbers of tokens
    pixels = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)).cuda()
    decoder = GitGreedyDecoder(model, static_steps=True)
    assert decoder.generate(pixels, 30).tolist() == _hf(model, pixels, 30)
    assert decoder.stats.compactions >= 1 and decoder.stats.graph_replays > 0


def test_fused_attention_on_cuda(tiny_dir: Path) -> None:
    model = _model(tiny_dir)
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3)).cuda()
    for options in ({"fused_attention": True}, {"fused_attention": True, "static_steps": True}):
        assert GitGreedyDecoder(model, **options).generate(pixels, 16).tolist() == _hf(model, pixels, 16)


def test_fast_profile_on_cuda_uses_every_cuda_piece_after_its_warm_up(tiny_dir: Path) -> None:
    engine = CaptionEngine.load(EngineConfig(model=str(tiny_dir), device="cuda", dtype="bfloat16", profile="fast"))
    assert engine.profile == "fast:sdpa,compile,cudagraphs,draft", engine.pieces.fallbacks
    params = GenParams(max_length=12)
    assert engine.warm_up(16, params) > 0 and engine.warm_up_sizes(16) == [16, 8, 4, 2, 1]
    assert engine._fast is not None and engine._fast.compiled is not None
    captured = set(engine._fast.static.shapes)  # type: ignore[union-attr]
    pixels = torch.randn(11, 3, 32, 32)
    captions = engine.generate(pixels, params)
    assert len(captions) == 11 and set(engine._fast.static.shapes) == captured  # nothing new built for a request
    assert engine.profile == "fast:sdpa,compile,cudagraphs,draft"  # no piece fell back while running


def test_a_real_cuda_out_of_memory_halves_the_batch_and_goes_on(tiny_dir: Path) -> None:
    """A small share of the GPU, a batch far past it: the engine frees the allocator's cache and the batcher halves
    until the batch fits; every image still gets its caption."""
    engine = CaptionEngine.load(
        EngineConfig(model=str(tiny_dir), device="cuda", dtype="float32", cuda_memory_fraction=0.001)
    )
    budget = 0.001 * torch.cuda.get_device_properties(0).total_memory
    rows = int(4 * budget / (tiny.VOCAB_SIZE * 4))  # one step's float32 logits alone are four times the budget
    params = GenParams(max_length=8)
    batcher: MicroBatcher[GenParams] = MicroBatcher(
        lambda items, p: engine.generate(torch.cat(items), p), max_batch=rows, max_wait_s=5.0
    )
    try:
        pixels = torch.randn(rows, 3, 32, 32)
        futures = [batcher.submit(pixels[i : i + 1], params) for i in range(rows)]
        captions = [f.result(timeout=600) for f in futures]
    finally:
        batcher.stop(timeout=60)
    assert len(captions) == rows and all(isinstance(c, str) for c in captions)
    assert batcher.ceiling is not None and batcher.ceiling < rows and batcher.stats.splits >= 1
