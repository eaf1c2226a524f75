"""A tiny random chat VLM (LLaVA: CLIP vision tower + Llama text model) built offline, saved like a hub model.

For a local OpenAI-compatible server in tests and benchmarks (``transformers serve DIR``). Its tokenizer knows the
synthetic captions' words (``training.synthetic``) plus an ``<image>`` token, and its chat template is plain Jinja,
so it needs no hub. Wide initial weights make its greedy answers depend on the image ("white red diamond").
"""

from __future__ import annotations

from pathlib import Path

#: The chat template: one line per message, images as <image>, then the assistant's turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_llava(out_dir: Path, *, seed: int = 0, image_size: int = 32, hidden: int = 32) -> Path:
    """Save a random ``LlavaForConditionalGeneration`` and its processor to ``out_dir`` (safetensors)."""
    import torch
    from transformers import (
        BertTokenizerFast,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.utils import logging as hf_logging

    from training.synthetic import vocabulary
    from training.tiny import word_vocab

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    vocab = word_vocab([*vocabulary(), "describe", "this", "image", "in", "one", "sentence", "."])
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    patch = image_size // 2
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        initializer_range=0.5,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def chat_generate(model_dir: Path, images: list, prompt: str, max_new_tokens: int) -> list[str]:
    """transformers' greedy answer for each image, one at a time, as a server applying the chat template gives it."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    out = []
    for image in images:
        enc = processor(images=[image], text=[text], return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(processor.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out
