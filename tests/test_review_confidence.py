"""The per-caption confidence review sorts by ("least confident first"): the fast GIT decoder's mean log-probability
of the tokens it picked equals the one computed from HF generate's own scores, rows ending early included; it travels
with the row through both ledgers and comes back out of them as ``confidence``, never as a source column."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from PIL import Image

from common.messages import GenParams, ItemResult, ItemStatus
from ledger import Ledger
from model.fastgen import GitGreedyDecoder
from training import synthetic, tiny


@pytest.fixture(scope="module")
def model_and_pixels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, torch.Tensor]:
    from transformers import AutoProcessor, GitForCausalLM

    folder = tiny.build_tiny_git(tmp_path_factory.mktemp("confidence") / "tiny", seed=0)
    model = GitForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():  # rows end after different numbers of tokens: the mean must stop at each row's end
        model = copy.deepcopy(model)
        model.output.bias[tiny.SEP_ID] += 10.0
    rows = synthetic.make_shapes(tmp_path_factory.mktemp("shapes"), 5, seed=11, size=48)
    images = [Image.open(path).convert("RGB") for path, _ in rows]
    pixels = torch.as_tensor(
        AutoProcessor.from_pretrained(folder).image_processor(images, return_tensors="pt")["pixel_values"]
    )
    # Eight rows: a row that ends alone stays in the batch (finished) until a quarter of it has, as the decoder does.
    noise = torch.randn(3, *pixels.shape[1:], generator=torch.Generator().manual_seed(7))
    return model, torch.cat([pixels, noise])


def test_the_decoders_confidence_is_the_mean_log_probability_of_its_tokens(model_and_pixels) -> None:
    model, pixels = model_and_pixels
    decoder = GitGreedyDecoder(model)
    with torch.inference_mode():
        ids = decoder.generate(pixels, 30)
        hf = model.generate(
            pixel_values=pixels,
            max_length=30,
            do_sample=False,
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert ids.tolist() == hf.sequences.tolist()
    expected = []
    for row in range(pixels.shape[0]):
        picked = []
        for step, scores in enumerate(hf.scores):
            token = int(hf.sequences[row, step + 1])
            picked.append(float(torch.log_softmax(scores[row].float(), dim=-1)[token]))
            if token == tiny.SEP_ID:
                break
        expected.append(sum(picked) / len(picked))
    assert decoder.last_confidence == pytest.approx(expected, abs=1e-4)
    made = [int((r == tiny.SEP_ID).nonzero()[0]) if (r == tiny.SEP_ID).any() else ids.shape[1] - 1 for r in ids]
    assert len(set(made)) > 1, "rows should end at different lengths for this test to mean anything"
    assert decoder.stats.row_steps > sum(made), "some finished row should stay in the batch for a step or more"


def test_confidence_travels_with_the_row_through_both_ledgers(ledger: Ledger) -> None:
    ledger.open_job("job-conf", "conf", GenParams())
    ledger.add_items("job-conf", [("a" * 16, "/d/a.png"), ("b" * 16, "/d/b.png")])
    ledger.record(
        "job-conf",
        [
            ItemResult(id="a" * 16, ref="/d/a.png", status=ItemStatus.OK, caption="x", confidence=-0.123456),
            ItemResult(
                id="b" * 16, ref="/d/b.png", status=ItemStatus.OK, caption="y", extra={"label": "cat"}, confidence=-2.5
            ),
        ],
    )
    a, b = ledger.item("job-conf", "a" * 16), ledger.item("job-conf", "b" * 16)
    assert a["confidence"] == -0.1235 and "extra" not in a
    assert b["confidence"] == -2.5 and b["extra"] == {"label": "cat"}
