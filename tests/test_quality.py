"""Caption quality flags: each flag on the captions it is meant for, and silence on normal captions."""

from __future__ import annotations

import time

import pytest

from common.messages import QUALITY_FLAGS as FLAGS
from model.flags import quality_flags

NORMAL = [
    "a red circle on the left of a white background",
    "a man holding a dog and a cat",
    "a man on a horse and a man on a bike",  # a 3-gram twice is allowed: several similar objects
    "a black and white photo of a black and white cat",
    "two dogs playing with a ball in the grass",
    "a bowl of soup next to a bowl of salad on a wooden table",
    "people people",  # a word twice in a row is not a loop
    "café au lait on a table, with a croissant",
]


def flags(caption: str, generated_tokens: int | None = 10, max_length: int = 50) -> list[str]:
    return quality_flags(caption, generated_tokens=generated_tokens, max_length=max_length)


def test_flag_names_are_the_contract() -> None:
    assert FLAGS == ("empty", "truncated", "repetition")


@pytest.mark.parametrize("caption", NORMAL)
@pytest.mark.parametrize("generated_tokens", [12, None])
def test_normal_captions_have_no_flags(caption: str, generated_tokens: int | None) -> None:
    assert flags(caption, generated_tokens) == []


@pytest.mark.parametrize("caption", ["", "   ", "\n\t "])
def test_empty(caption: str) -> None:
    assert flags(caption, 2) == ["empty"]
    assert flags(caption, None) == ["empty"]


def test_truncated_by_exact_token_count() -> None:
    caption = "a red circle on the left of a white background"
    assert flags(caption, generated_tokens=49, max_length=50) == []
    assert flags(caption, generated_tokens=50, max_length=50) == ["truncated"]
    assert flags(caption, generated_tokens=12, max_length=12) == ["truncated"]
    # The exact count wins over the text: a long caption that ended before the limit is not truncated.
    assert flags("a dog on a", generated_tokens=5, max_length=6) == []


def test_truncated_heuristic_without_token_count() -> None:
    caption = "a red circle on the left of a white background"  # 10 words: at least 11 tokens with [CLS]
    assert flags(caption, None, max_length=11) == ["truncated"]
    assert flags(caption, None, max_length=20) == []
    # Ending on an article near the limit reads as cut mid-phrase; far from the limit it does not.
    cut = "a man sitting on a bench next to a"  # 9 words, 10 estimated tokens
    assert flags(cut, None, max_length=12) == ["truncated"]
    assert flags(cut, None, max_length=50) == []
    assert flags("a man sitting on a bench next to a dog", None, max_length=12) == []


@pytest.mark.parametrize(
    "caption",
    [
        "a red red red circle",
        "a red, red, Red circle",  # case and punctuation ignored
        "a cat on a mat on a mat on a mat",
        "a cat on a mat on a mat",  # a phrase immediately repeated
        "a dog on a bed a dog on a bed",
        "a tree next to a house and a tree next to a house and a tree next to a house",
        "the the the",
    ],
)
def test_repetition(caption: str) -> None:
    assert flags(caption) == ["repetition"]


def test_flags_combine_in_contract_order() -> None:
    looped = "a cat on a mat on a mat on a mat on a mat"
    assert flags(looped, generated_tokens=20, max_length=20) == ["truncated", "repetition"]
    assert flags("  ", generated_tokens=20, max_length=20) == ["empty", "truncated"]


def test_cost_grows_linearly_on_long_degenerate_captions() -> None:
    """Ratios measured in one run, not a wall-clock bound: four times the words must cost well under the 16 times
    a quadratic search for loops would (linear: about 4)."""

    def worst(n: int) -> list[str]:  # no loop found early: every detector reads the whole caption
        return [" ".join(f"w{i}" for i in range(n)), " ".join(f"w{i % 7}" for i in range(n))]

    def best_of_seven(n: int) -> float:
        cases, times = worst(n), []
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(20):
                for caption in cases:
                    flags(caption, None, max_length=512)
            times.append(time.perf_counter() - started)
        return min(times)

    assert best_of_seven(512) / best_of_seven(128) < 10
