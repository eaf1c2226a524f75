"""Caption metrics on generated text: WER, CER (jiwer), BLEU-4 (sacrebleu), ROUGE-L (rouge-score), CIDEr if available.

Text is normalised the same way for every metric: lower case, punctuation replaced by spaces, whitespace
collapsed. GIT's tokenizer is uncased and decodes "dog." as "dog ." so without this a correct caption would
score errors for case and spacing artefacts that say nothing about the model.

With several references per image:
- WER and CER use, per image, the reference the prediction is closest to (lowest sentence WER; ties -> the
  earlier reference), then pool errors over the corpus (sum of edits / sum of reference length, as jiwer does).
  The "first reference" choice would punish a caption that matches another valid reference word for word;
  with one reference per image both choices are the same.
- BLEU-4 uses all references at once (sacrebleu corpus BLEU, 0..100).
- ROUGE-L is the F-measure against the best reference, averaged over images (0..1).
- CIDEr (pycocoevalcap, optional extra) uses all references; it needs no Java, only its tokenizer does.
"""

from __future__ import annotations

import re
import unicodedata

_PUNCT_OR_SPACE = re.compile(r"[\s\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Lower case, punctuation -> space, whitespace collapsed: the form every metric compares."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return _PUNCT_OR_SPACE.sub(" ", text).strip()


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus metrics of generated captions against one or more references per image.

    Returns ``wer``, ``cer`` (0 = perfect, can exceed 1), ``bleu4`` (0..100), ``rouge_l`` (0..1) and
    ``cider`` when pycocoevalcap is installed. Empty input gives an empty dict.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists; they must align")
    if not predictions:
        return {}
    preds = [normalize(p) for p in predictions]
    refs = [[normalize(r) for r in rs] or [""] for rs in references]
    metrics = _error_rates(preds, refs)
    metrics["bleu4"] = _bleu4(preds, refs)
    metrics["rouge_l"] = _rouge_l(preds, refs)
    cider = _cider(preds, refs)
    if cider is not None:
        metrics["cider"] = cider
    return metrics


def _error_rates(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    import jiwer

    word_edits = word_total = char_edits = char_total = 0
    for pred, candidates in zip(preds, refs, strict=True):
        best: tuple[float, int, int, str] | None = None
        for ref in candidates:
            out = jiwer.process_words(ref, pred)
            edits = out.substitutions + out.deletions + out.insertions
            length = out.substitutions + out.deletions + out.hits
            # An empty reference has rate = number of inserted words (never a division by zero).
            rate = edits / length if length else float(edits)
            if best is None or rate < best[0]:
                best = (rate, edits, length, ref)
        assert best is not None
        _, edits, length, ref = best
        word_edits += edits
        word_total += length
        chars = jiwer.process_characters(ref, pred)
        char_edits += chars.substitutions + chars.deletions + chars.insertions
        char_total += chars.substitutions + chars.deletions + chars.hits
    return {
        "wer": word_edits / word_total if word_total else float(word_edits),
        "cer": char_edits / char_total if char_total else float(char_edits),
    }


def _bleu4(preds: list[str], refs: list[list[str]]) -> float:
    import sacrebleu

    width = max(len(rs) for rs in refs)
    # sacrebleu wants one stream per reference position; None marks "this image has fewer references".
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(width)]
    return float(sacrebleu.corpus_bleu(preds, streams).score)


def _rouge_l(preds: list[str], refs: list[list[str]]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    total = 0.0
    for pred, candidates in zip(preds, refs, strict=True):
        total += max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in candidates)
    return total / len(preds)


def _cider(preds: list[str], refs: list[list[str]]) -> float | None:
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return None
    gts = {i: rs for i, rs in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)
