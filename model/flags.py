"""Cheap checks on a generated caption: empty, cut at the length limit, or stuck in a repetition loop. No torch."""

from __future__ import annotations

import itertools
import re
from collections import Counter

# Word pieces a BERT-style tokenizer (GIT's) makes at least one token of: each word and each punctuation mark.
_PIECES = re.compile(r"\w+|[^\w\s]")
# Words for the repetition checks: punctuation ignored, so "red, red, red" is still a run.
_WORDS = re.compile(r"\w+(?:'\w+)?")
# Words a finished caption does not end on; a caption cut by the length limit often does ("a dog on a").
_DANGLING = frozenset(
    "a an the of on in at to with and or but by for from into onto over under near next its their his her "  # noqa: SIM905
    "is are was were".split()
)

#: Without a token count, a caption ending on a dangling word counts as truncated once its estimated length
#: reaches this share of ``max_length`` (wordpieces outnumber words, so the estimate runs low).
DANGLING_SHARE = 0.75
#: A word this many times in a row is a loop ("a red red red circle"); twice happens in normal text.
RUN_LENGTH = 3
#: A word n-gram of this length ...
NGRAM = 3
#: ... occurring this many times anywhere is a loop. Twice is allowed: captions of several similar objects
#: repeat a 3-gram legitimately ("a man on a horse and a man on a bike").
NGRAM_REPEATS = 3


def quality_flags(caption: str, *, generated_tokens: int | None, max_length: int) -> list[str]:
    """The flags (a subset of ``common.messages.QUALITY_FLAGS``, in that order) that apply to one generated caption.

    ``generated_tokens`` is the length of the sequence ``generate`` returned, counted the way ``max_length``
    counts it ([CLS] and prompt included, padding excluded); pass None when it is not known and a
    heuristic on the text is used instead (see ``is_truncated``).
    """
    flags: list[str] = []
    if is_empty(caption):
        flags.append("empty")
    if is_truncated(caption, generated_tokens=generated_tokens, max_length=max_length):
        flags.append("truncated")
    if is_repetitive(caption):
        flags.append("repetition")
    return flags


def is_empty(caption: str) -> bool:
    """``empty``: nothing but whitespace (the model produced only special tokens, or only the prompt's space)."""
    return not caption.strip()


def is_truncated(caption: str, *, generated_tokens: int | None, max_length: int) -> bool:
    """``truncated``: generation stopped at ``max_length`` rather than on its end token, so the caption is cut.

    With ``generated_tokens`` the answer is exact: ``generated_tokens >= max_length``. (A sequence whose end
    token fell exactly on the last position also counts; callers that know it ended may pass one less.)
    Without it the caption's length in tokens is estimated from below as 1 ([CLS]) plus one per word and
    per punctuation mark, and the caption is flagged when that estimate reaches ``max_length``, or when it
    reaches ``DANGLING_SHARE`` of it and the caption ends on an article, preposition, conjunction or
    auxiliary ("... next to a"). The heuristic misses cuts of captions with many multi-piece words.
    """
    if generated_tokens is not None:
        return generated_tokens >= max_length
    pieces = _PIECES.findall(caption)
    if not pieces:
        return False
    estimate = 1 + len(pieces)
    if estimate >= max_length:
        return True
    return estimate >= DANGLING_SHARE * max_length and pieces[-1].lower() in _DANGLING


def is_repetitive(caption: str) -> bool:
    """``repetition``: the caption loops, as greedy decoding of a weak or mis-fit model does.

    Flagged when any of these hold (case and punctuation ignored):
    a word ``RUN_LENGTH`` (3) or more times in a row ("a red red red circle");
    a word ``NGRAM``-gram (3) occurring ``NGRAM_REPEATS`` (3) or more times ("on a mat on a mat on a mat");
    a phrase of two or more words immediately followed by itself ("a dog on a bed a dog on a bed").
    """
    words = [w.lower() for w in _WORDS.findall(caption)]
    return _has_run(words) or _has_frequent_ngram(words) or _has_tandem(words)


def _has_run(words: list[str]) -> bool:
    run = 1
    for previous, word in itertools.pairwise(words):
        run = run + 1 if word == previous else 1
        if run >= RUN_LENGTH:
            return True
    return False


def _has_frequent_ngram(words: list[str]) -> bool:
    grams = Counter(zip(*(words[i:] for i in range(NGRAM)), strict=False))
    return any(count >= NGRAM_REPEATS for count in grams.values())


def _has_tandem(words: list[str]) -> bool:
    """A span ``words[i:i+n]`` equal to ``words[i+n:i+2n]`` for some n >= 2."""
    n_words = len(words)
    if any(words[i : i + 2] == words[i + 2 : i + 4] for i in range(n_words - 3)):
        return True
    # A tandem of period n >= 3 starts with a 3-gram that recurs n words later, so only the earlier
    # occurrences of each 3-gram are candidates (each occurs at most twice once _has_frequent_ngram passed).
    seen: dict[tuple[str, ...], list[int]] = {}
    for q in range(n_words - 2):
        gram = tuple(words[q : q + 3])
        for p in seen.get(gram, ()):
            n = q - p
            if n >= 3 and q + n <= n_words and words[p:q] == words[q : q + n]:
                return True
        seen.setdefault(gram, []).append(q)
    return False
