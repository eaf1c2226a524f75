"""A tiny random CLIP built offline (BERT's vocab, CLIP's image processor), for CLIPScore and near-duplicate tests
and the demo: the same classes and ``from_pretrained`` path as a real CLIP checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_tiny_clip(out_dir: Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """Save a CLIPModel of a few hundred thousand parameters with its processor under ``out_dir``; returns it."""
    import torch
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor
    from transformers.models.bert.tokenization_bert import load_vocab

    from training.tiny import find_bert_vocab

    vocab = load_vocab(str(find_bert_vocab()))
    tokenizer: Any = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=64)
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "image_size": image_size,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir
