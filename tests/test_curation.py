"""Curation scores: CLIPScore equal to torchmetrics' on a tiny random CLIP; perceptual hashes that find resized,
re-encoded and cropped copies and keep different pictures apart; the band index finds every pair within reach."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.curation import ClipScorer, bands, hamming, phash
from training.tiny_clip import build_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def _pictures(n: int, seed: int) -> list[Image.Image]:
    from training.synthetic import COLOURS, POSITIONS, SHAPES, draw_shape

    rng = random.Random(seed)
    return [
        draw_shape(
            rng.choice(SHAPES), rng.choice(list(COLOURS)[1:]), rng.choice(list(POSITIONS)), "white", size=48, rng=rng
        )
        for _ in range(n)
    ]


def test_clipscore_equals_torchmetrics(tiny_clip: Path) -> None:
    from torchmetrics.functional.multimodal import clip_score

    scorer = ClipScorer.load(tiny_clip)

    class ReturnsTensors(torch.nn.Module):
        """transformers 5 returns embeddings as ``pooler_output``; torchmetrics 1.9 expects the tensor itself."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.config = model, model.config

        def get_image_features(self, *args: object, **kwargs: object) -> torch.Tensor:
            return self.inner.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args: object, **kwargs: object) -> torch.Tensor:
            return self.inner.get_text_features(*args, **kwargs).pooler_output

    images = _pictures(4, seed=1)
    captions = [
        ["a red circle on a white background", "a blue square"],
        ["a green triangle"],
        ["x"],
        ["a yellow star " * 40],
    ]
    ours = scorer.scores(images, captions)
    reference = ReturnsTensors(scorer.model)
    for image, cands, got in zip(images, captions, ours, strict=True):
        pixels = torch.from_numpy(__import__("numpy").asarray(image)).permute(2, 0, 1)
        for caption, score in zip(cands, got, strict=True):
            want = float(clip_score(pixels, caption, model_name_or_path=lambda: (reference, scorer.processor)))
            assert score == pytest.approx(want, abs=1e-4), (caption, score, want)
    assert any(s > 0 for row in ours for s in row)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_phash_finds_copies_and_keeps_different_pictures_apart() -> None:
    from skimage import data  # real photographs shipped with scikit-image

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]
    for photo in photos:
        w, h = photo.size
        copies = [
            photo.resize((w // 2, h // 2)),
            _jpeg(photo, 40),
            photo.crop((w // 40, h // 40, w - w // 40, h - h // 40)),
        ]
        for copy in copies:
            assert hamming(phash(photo), phash(copy)) <= 12  # the default phash distance
    for i, a in enumerate(photos):
        for b in photos[i + 1 :]:
            assert hamming(phash(a), phash(b)) > 16


def test_bands_find_every_pair_within_the_distance() -> None:
    rng = random.Random(0)
    for distance in (0, 3, 8, 12):
        for _ in range(300):
            a = rng.getrandbits(64)
            flips = rng.sample(range(64), rng.randint(0, distance))
            b = a
            for bit in flips:
                b ^= 1 << bit
            assert any(x == y for x, y in zip(bands(a, distance), bands(b, distance), strict=True))


def test_curation_fields_round_trip_in_both_ledgers_and_old_rows_read_as_before(ledger) -> None:
    from common.messages import Curation, GenParams, ItemResult, ItemStatus

    params = GenParams(max_length=12, curation=Curation(score="clip", best_of=4, seed=3))
    ledger.open_job("job-cur", "", params)
    ledger.add_items("job-cur", [("a", "/x/a.jpg"), ("b", "/x/b.jpg"), ("c", "/x/c.jpg")])
    rows = [
        ItemResult(
            id="a",
            ref="/x/a.jpg",
            status=ItemStatus.OK,
            caption="a cat",
            params=params,
            clip_score=31.25,
            candidates=[12.5, 31.25, 0.0, 7.0],
            sample_seed=99,
            extra={"url": "u"},
        ),
        ItemResult(
            id="b",
            ref="/x/b.jpg",
            status=ItemStatus.OK,
            caption="",
            params=params,
            duplicate_of="a",
            duplicate_job="job-old",
        ),
        ItemResult(id="c", ref="/x/c.jpg", status=ItemStatus.OK, caption="a dog", params=GenParams(max_length=12)),
    ]
    ledger.record("job-cur", rows)
    got = {r["id"]: r for r in ledger.iter_results("job-cur")}
    assert got["a"]["clip_score"] == 31.25 and got["a"]["candidates"] == [12.5, 31.25, 0.0, 7.0]
    assert got["a"]["sample_seed"] == 99 and got["a"]["extra"] == {"url": "u"}
    assert got["a"]["params"]["curation"]["best_of"] == 4
    assert got["b"]["duplicate_of"] == "a" and got["b"]["duplicate_job"] == "job-old" and "extra" not in got["b"]
    assert set(got["c"]) & {"clip_score", "duplicate_of", "extra", "candidates"} == set()
    assert "curation" not in got["c"]["params"]
    assert ledger.item("job-cur", "a")["clip_score"] == 31.25


def test_export_resolves_late_duplicates_and_filters_by_score(ledger, tmp_path: Path) -> None:
    from common.messages import ItemResult, ItemStatus
    from exports import export_rows
    from exports.rows import resolve_duplicates

    ledger.open_job("job-late", "", None)
    ledger.add_items("job-late", [("rep", "/x/rep.jpg"), ("dup", "/x/dup.jpg"), ("low", "/x/low.jpg")])
    ledger.record(
        "job-late",
        [  # the duplicate was written while its representative was still being captioned
            ItemResult(id="dup", ref="/x/dup.jpg", status=ItemStatus.OK, caption="", duplicate_of="rep"),
            ItemResult(id="low", ref="/x/low.jpg", status=ItemStatus.OK, caption="a blur", clip_score=3.5),
        ],
    )
    ledger.record(
        "job-late", [ItemResult(id="rep", ref="/x/rep.jpg", status=ItemStatus.OK, caption="a cat", clip_score=30.0)]
    )
    rows = {r["id"]: r for r in resolve_duplicates(ledger.iter_results("job-late"), ledger.item, "job-late")}
    assert rows["dup"]["caption"] == "a cat" and rows["dup"]["clip_score"] == 30.0
    out = tmp_path / "kept.jsonl"
    rows_in = resolve_duplicates(ledger.iter_results("job-late"), ledger.item, "job-late")
    summary = export_rows(rows_in, "jsonl", out, min_clip_score=30.0)
    kept = sorted(__import__("json").loads(line)["id"] for line in out.read_text().splitlines())
    assert kept == ["dup", "rep"] and summary.skipped_by_reason == {"low_clip_score": 1}
