"""The model card (README.md) of a stored version, written before it is pushed to the hub. No torch.

Everything in it comes from the version's ``captioner.json``: base model, data fingerprint and size, training
options, evaluation metrics with the set they were measured on, and what the model is for and not for.
"""

from __future__ import annotations

import json
from typing import Any

from common.store import ModelVersion

CARD_FILE = "README.md"


def model_card(mv: ModelVersion, repo_id: str) -> str:
    """Markdown with a YAML header the hub reads (library, pipeline, base model, metrics)."""
    meta, metrics = mv.meta, mv.metrics
    params: dict[str, Any] = meta.get("params") or {}
    base = meta.get("base_model") or params.get("base_model") or "unknown"
    evaluations = meta.get("evaluations") or []
    model_type, architecture = _architecture(mv)
    header = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-to-text",
        "tags:",
        "- image-captioning",
        f"- {model_type}",
        "- captioner",
    ]
    if base and "/" in base and not base.startswith(("/", ".")):
        header.append(f"base_model: {base}")
    header.append("---")
    lines = [
        *header,
        "",
        f"# {repo_id}",
        "",
        f"A {'GIT' if model_type == 'git' else model_type} captioning model (`{architecture}`), version "
        f"`{mv.version}`, fine-tuned by captioner from "
        f"`{base}`.",
        "",
    ]
    lines += [
        "## Training data",
        "",
        f"- dataset: `{meta.get('dataset', 'unknown')}`",
        f"- fingerprint: `{meta.get('dataset_fingerprint', 'unknown')}` (sha256 over image references and captions)",
        f"- size: {_count(meta.get('train_examples'))} training and {_count(meta.get('eval_examples'))} held-out "
        f"images (eval set fingerprint `{meta.get('eval_fingerprint', 'unknown')}`)",
        "",
    ]
    lines += [
        "## Training options",
        "",
        "```json",
        json.dumps(params, indent=2, sort_keys=True, default=str),
        "```",
        "",
        f"Steps: {meta.get('steps', 'unknown')}. Processes: {meta.get('processes', 1)}.",
        "",
    ]
    lines += [
        "## Evaluation",
        "",
        "Captions generated greedily (as the caption workers run them) and scored against the references; "
        "WER and CER: lower is better; BLEU-4 (0-100) and ROUGE-L (0-1): higher is better.",
        "",
        "| metric | value | eval set |",
        "| --- | --- | --- |",
    ]
    fingerprint = meta.get("eval_fingerprint", "unknown")
    lines += [f"| {name} | {value:.4f} | `{fingerprint}` |" for name, value in sorted(metrics.items())]
    for ev in evaluations[:-1]:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(ev.get("metrics", {}).items()))
        lines.append(f"| (earlier) {scores} | | `{ev.get('fingerprint')}` |")
    lines += [
        "",
        "## Intended use and limits",
        "",
        "Intended for short descriptive captions of images like those it was trained on (see the dataset "
        "above), served by captioner's caption workers or `transformers` directly.",
        "It is not for images unlike its training data, for identifying people, or for any decision about "
        "a person; captions can be wrong or biased in the ways its training captions are, and the scores "
        "above hold only for data like the eval set they name.",
        "",
    ]
    return "\n".join(lines)


def _architecture(mv: ModelVersion) -> tuple[str, str]:
    """The version's ``model_type`` and model class from its config.json (GIT's when it cannot be read)."""
    try:
        config = json.loads((mv.path / "config.json").read_text(encoding="utf-8"))
        return str(config["model_type"]), str((config.get("architectures") or ["unknown"])[0])
    except (OSError, ValueError, KeyError, TypeError):
        return "git", "GitForCausalLM"


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) else "an unknown number of"
