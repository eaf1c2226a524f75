"""Tiny random checkpoints of every captioning family besides GIT, built offline and saved like hub models.

Each builder saves a model of a few hundred thousand parameters (the BERT-vocabulary ones about two million) with
its processor, so the engine loads it through the same ``from_pretrained`` path as a hub checkpoint. BLIP and
ViT->BERT use GIT's bert-base-uncased vocabulary (``tiny.find_bert_vocab``); the others get a word-level tokenizer
of the synthetic captions' words, their chat words and the family's special tokens, built with ``tokenizers`` in
milliseconds. Chat templates are plain Jinja strings. Weights are drawn with a wide init (as ``tiny_git_config``)
so random captions depend on the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.synthetic import vocabulary
from training.tiny import find_bert_vocab

#: Words every word-level tokenizer knows besides the synthetic captions' own: chat roles and prompt words.
CHAT_WORDS = (
    "user",
    "assistant",
    "system",
    "describe",
    "this",
    "image",
    "in",
    "one",
    "sentence",
    "caption",
    "en",
    "what",
    "does",
    "the",
    "show",
    "detail",
    "with",
    "paragraph",
    "is",
    "shown",
    ".",
    ",",
    ":",
    "?",
    "\n",
)
HIDDEN, HEADS, LAYERS, IMAGE_SIZE, PATCH = 32, 2, 2, 32, 8
INIT = 0.5


def chat_template(image: str, end: str = "</s>") -> str:
    """A chat template of the common shape (``role: content`` turns ending in ``end``), ``image`` where an image is."""
    return (
        "{% for message in messages %}{{ message['role'] }}:"
        "{% if message['content'] is string %} {{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image + "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + end + "\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )


def word_tokenizer(
    named: dict[str, str] | None = None,
    specials: tuple[str, ...] = (),
    *,
    bos: str = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    unk: str = "<unk>",
) -> Any:
    """A word-level fast tokenizer: specials first, then the caption and chat words (lower-cased).

    ``named`` special tokens become attributes processors look for (``{"image_token": "<image>"}`` ->
    ``tokenizer.image_token`` and ``tokenizer.image_token_id``); ``specials`` are further unsplittable tokens."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    named = named or {}
    specials = tuple(dict.fromkeys([*named.values(), *specials]))
    tokens = list(dict.fromkeys([pad, bos, eos, unk, *specials]))
    words = [w for w in dict.fromkeys([*vocabulary(), *CHAT_WORDS]) if w not in tokens]
    vocab = {token: i for i, token in enumerate([*tokens, *words])}
    core = Tokenizer(WordLevel(vocab, unk_token=unk))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no prefix ever occurs
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=4096,
        extra_special_tokens=named,
        additional_special_tokens=[t for t in specials if t not in named.values()],
    )


def _bert_tokenizer(*, extra: dict[str, str] | None = None) -> Any:
    from transformers import BertTokenizerFast
    from transformers.models.bert.tokenization_bert import load_vocab

    tokenizer = BertTokenizerFast(vocab=load_vocab(str(find_bert_vocab())), do_lower_case=True, model_max_length=512)
    if extra:
        tokenizer.add_special_tokens(extra)
    return tokenizer


def _vision(**over: Any) -> dict[str, Any]:
    cfg = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "initializer_range": INIT,
    }
    cfg.update(over)
    return cfg


def _text(vocab_size: int, **over: Any) -> dict[str, Any]:
    cfg = {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "initializer_range": INIT,
        "max_position_embeddings": 512,
    }
    cfg.update(over)
    return cfg


def _save(out_dir: Path, model_cls: Any, config: Any, processor: Any, seed: int, init: float = INIT) -> Path:
    """Build ``model_cls(config)`` with a fixed seed (leaving the caller's RNG alone), save it and ``processor``."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        _widen(model, init)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    if isinstance(processor, tuple):
        for part in processor:
            part.save_pretrained(out_dir)
    else:
        processor.save_pretrained(out_dir)
    return out_dir


def _widen(model: Any, init: float = INIT) -> None:
    """Redraw every weight matrix with a wide normal init: models whose init ignores ``initializer_range`` would
    otherwise caption every image alike, and tests could not tell images apart. Training wants a narrower one
    (``init=0.1``, as the GIT demo): the wide init saturates the decoder and learns slowly."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "norm" not in name:
                param.normal_(0.0, init)


def _clip_pil(size: int = IMAGE_SIZE, **over: Any) -> Any:
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **over)


# --- encoder-decoder and Q-former families -------------------------------------------------------------------


def build_tiny_blip(out_dir: Path, *, seed: int = 0, init: float = INIT, words: bool = False) -> Path:
    """BLIP (``BlipForConditionalGeneration``): ViT + BERT decoder with cross-attention, BERT vocab + ``[DEC]``;
    with ``words`` a word-level vocabulary instead (``<s>`` as its ``[DEC]``, ``</s>`` as its ``[SEP]``), whose
    small output layer a LoRA on the attention alone can steer within a test's few steps."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tokenizer = word_tokenizer() if words else _bert_tokenizer(extra={"bos_token": "[DEC]"})
    sep = tokenizer.eos_token_id if words else tokenizer.sep_token_id
    text = _text(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=sep,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sep,
    )
    config = BlipConfig(text_config=text, vision_config=_vision(), projection_dim=HIDDEN)
    image = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return _save(out_dir, BlipForConditionalGeneration, config, BlipProcessor(image, tokenizer), seed, init)


def build_tiny_vision_encoder_decoder(out_dir: Path, *, seed: int = 0, init: float = INIT, words: bool = False) -> Path:
    """``VisionEncoderDecoderModel``: a ViT encoder and a BERT decoder with cross-attention (ViT->BERT style); with
    ``words`` a word-level vocabulary (``<s>`` starts the decoder) instead of BERT's."""
    from transformers import (
        BertConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessorPil,
    )

    tokenizer = word_tokenizer() if words else _bert_tokenizer()
    vision = ViTConfig(**_vision())
    decoder = BertConfig(**_text(len(tokenizer)), is_decoder=True, add_cross_attention=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vision, decoder)
    special = {
        "decoder_start_token_id": tokenizer.bos_token_id if words else tokenizer.cls_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id if words else tokenizer.sep_token_id,
    }
    for key, value in special.items():
        setattr(config, key, value)
    image = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    out = _save(out_dir, VisionEncoderDecoderModel, config, (image, tokenizer), seed, init)
    _set_generation(out, **special)
    return out


def _set_generation(out_dir: Path, **values: Any) -> None:
    from transformers import GenerationConfig

    GenerationConfig(**values).save_pretrained(out_dir)


def build_tiny_florence2(out_dir: Path, *, seed: int = 0, init: float = INIT) -> Path:
    """Florence-2 (``Florence2ForConditionalGeneration``): a DaViT encoder and a BART encoder-decoder; task tokens
    (``<CAPTION>``...) become the processor's task prompts."""
    from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    tokenizer = word_tokenizer(
        {"image_token": "<image>"}, ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
    )
    size = 64  # DaViT downsamples by 32: a 2x2 feature map plus one pooled token
    vision = {
        "depths": [1, 1, 1, 1],
        "embed_dim": [16, 16, 32, 32],
        "num_heads": [1, 1, 2, 2],
        "num_groups": [1, 1, 2, 2],
        "window_size": 2,
        "projection_dim": HIDDEN,
        "drop_path_rate": 0.0,
        "initializer_range": INIT,
    }
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=2 * HIDDEN,
        decoder_ffn_dim=2 * HIDDEN,
        max_position_embeddings=512,
        init_std=INIT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=None,
    )
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id)
    image = _clip_pil(size, image_seq_length=5)
    processor = Florence2Processor(image_processor=image, tokenizer=tokenizer)
    out = _save(out_dir, Florence2ForConditionalGeneration, config, processor, seed, init)
    _set_generation(
        out,
        decoder_start_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out


def build_tiny_blip2(out_dir: Path, *, seed: int = 0, init: float = INIT) -> Path:
    """BLIP-2 (``Blip2ForConditionalGeneration``): ViT, Q-former (4 queries) and an OPT decoder."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    # Blip2Processor adds its own <image> token (with a tokenizer.image_token of type str it fails on a prompt).
    tokenizer = word_tokenizer()
    queries = 4
    image = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image, tokenizer, num_query_tokens=queries)
    qformer = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": 2 * HIDDEN,
        "encoder_hidden_size": HIDDEN,
        "initializer_range": INIT,
    }
    text = {
        "model_type": "opt",
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "ffn_dim": 2 * HIDDEN,
        "word_embed_proj_dim": HIDDEN,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Blip2Config(
        vision_config=_vision(),
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=INIT,
    )
    out = _save(out_dir, Blip2ForConditionalGeneration, config, processor, seed, init)
    _set_generation(
        out,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out


def _llama(tokenizer: Any, **over: Any) -> dict[str, Any]:
    cfg = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "max_position_embeddings": 512,
        "initializer_range": INIT,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    cfg.update(over)
    return cfg


def _chat_generation(out: Path, tokenizer: Any) -> Path:
    _set_generation(
        out,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out


def build_tiny_llava(out_dir: Path, *, seed: int = 0, init: float = INIT) -> Path:
    """LLaVA (``LlavaForConditionalGeneration``): CLIP vision tower, projector, Llama decoder, a chat template."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = word_tokenizer({"image_token": "<image>"})
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **_vision()},
        text_config=_llama(tokenizer),
        image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    processor = LlavaProcessor(
        image_processor=_clip_pil(),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template("<image>"),
    )
    return _chat_generation(_save(out_dir, LlavaForConditionalGeneration, config, processor, seed, init), tokenizer)


def build_tiny_paligemma(out_dir: Path, *, seed: int = 0, init: float = INIT) -> Path:
    """PaliGemma (``PaliGemmaForConditionalGeneration``): SigLIP, Gemma; plain-text prompts (``caption en``)."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tokenizer = word_tokenizer({"image_token": "<image>"})
    tokens = (IMAGE_SIZE // PATCH) ** 2
    text = _llama(tokenizer, model_type="gemma", head_dim=HIDDEN // HEADS, num_key_value_heads=1)
    vision = {"model_type": "siglip_vision_model", **_vision(), "projection_dim": HIDDEN}
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    image = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=tokens)
    processor = PaliGemmaProcessor(image_processor=image, tokenizer=tokenizer)
    return _chat_generation(_save(out_dir, PaliGemmaForConditionalGeneration, config, processor, seed, init), tokenizer)


QWEN_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


#: Qwen-VL version -> (config, model, processor, video processor) class names in transformers.
QWEN_CLASSES = {
    "2": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "2.5": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "3": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}


def build_tiny_qwen_vl(out_dir: Path, *, version: str = "2.5", seed: int = 0, init: float = INIT) -> Path:
    """Qwen2-VL, Qwen2.5-VL or Qwen3-VL: a ViT with 2x2 patch merging (2.5: windowed attention; 3: deepstack
    features), M-RoPE, a Qwen2/Qwen3 decoder, Qwen's chat template shape; the processors need their video
    processor (torchvision) even for images.

    The image processor resizes every image to the same pixel count, so all images of a batch have the same
    number of image tokens."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    config_cls, model_cls, processor_cls, video_cls = (getattr(transformers, n) for n in QWEN_CLASSES[version])
    tokenizer = word_tokenizer(QWEN_TOKENS, eos="<|im_end|>")
    head_dim = HIDDEN // HEADS
    quarter = head_dim // 8  # M-RoPE splits half a head's rotary dimensions into time, height and width
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "head_dim": head_dim,
        "max_position_embeddings": 512,
        "initializer_range": INIT,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [quarter, quarter * 3 // 2, quarter * 3 // 2],
            **({"mrope_interleaved": True} if version == "3" else {}),
        },
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    patch, merge = 4, 2
    vision: dict[str, Any] = {
        "depth": LAYERS,
        "hidden_size": HIDDEN,
        "num_heads": HEADS,
        "patch_size": patch,
        "spatial_merge_size": merge,
        "temporal_patch_size": 2,
        "initializer_range": INIT,
    }
    if version == "2":
        vision.update(embed_dim=HIDDEN, mlp_ratio=2)
    else:
        vision.update(intermediate_size=2 * HIDDEN, out_hidden_size=HIDDEN)
    if version == "2.5":
        vision.update(window_size=2 * patch * merge, fullatt_block_indexes=[LAYERS - 1])
    if version == "3":
        vision.update(num_position_embeddings=(IMAGE_SIZE // patch) ** 2, deepstack_visual_indexes=[0])
    ids = {
        name.removesuffix("_token") + "_token_id": tokenizer.convert_tokens_to_ids(tok)
        for name, tok in QWEN_TOKENS.items()
    }
    config = config_cls(text_config=text, vision_config=vision, **ids)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    sizes = {"patch_size": patch, "merge_size": merge, "temporal_patch_size": 2}
    image = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, **sizes)
    video = video_cls(size={"shortest_edge": pixels, "longest_edge": pixels}, **sizes)
    template = chat_template("<|vision_start|><|image_pad|><|vision_end|>", end="<|im_end|>")
    processor = processor_cls(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=template)
    return _chat_generation(_save(out_dir, model_cls, config, processor, seed, init), tokenizer)


INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def build_tiny_internvl(out_dir: Path, *, seed: int = 0, init: float = INIT) -> Path:
    """InternVL (``InternVLForConditionalGeneration``): InternViT, pixel shuffle, a Qwen2 decoder; the image tiled
    by its aspect ratio (``crop_to_patches``), each tile ``<img>`` + context tokens + ``</img>``."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = word_tokenizer(INTERNVL_TOKENS, eos="<|im_end|>")
    ratio = 0.5
    seq_len = int((IMAGE_SIZE // PATCH) ** 2 * ratio**2)
    vision = _vision(image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[PATCH, PATCH])
    text = _llama(tokenizer, model_type="qwen2")
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=seq_len,
        downsample_ratio=ratio,
    )
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image = GotOcr2ImageProcessorPil(size=size, crop_to_patches=True, max_patches=4)
    processor = InternVLProcessor(
        image_processor=image,
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=seq_len,
        chat_template=chat_template("<IMG_CONTEXT>", end="<|im_end|>"),
    )
    return _chat_generation(_save(out_dir, InternVLForConditionalGeneration, config, processor, seed, init), tokenizer)


IDEFICS3_TOKENS = (
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)


def build_tiny_idefics3(out_dir: Path, *, seed: int = 0, init: float = INIT, split: bool = False) -> Path:
    """Idefics3 (``Idefics3ForConditionalGeneration``, SmolVLM's architecture): a SigLIP-style encoder, pixel
    shuffle, a Llama decoder, a chat template; one global image per picture, or with ``split`` also tiles whose
    count follows the image's aspect ratio (as SmolVLM does), so rows of a batch differ in length and are padded."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = word_tokenizer(specials=IDEFICS3_TOKENS, eos="<end_of_utterance>")
    scale = 2
    seq_len = (IMAGE_SIZE // PATCH) ** 2 // scale**2
    vision = {k: v for k, v in _vision().items()}
    config = Idefics3Config(
        vision_config=vision,
        text_config=_llama(tokenizer),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    longest = 2 * IMAGE_SIZE if split else IMAGE_SIZE  # split: up to 2x2 tiles of IMAGE_SIZE, plus the global image
    image = Idefics3ImageProcessorPil(
        do_image_splitting=split, size={"longest_edge": longest}, max_image_size={"longest_edge": IMAGE_SIZE}
    )
    processor = Idefics3Processor(
        image_processor=image,
        tokenizer=tokenizer,
        image_seq_len=seq_len,
        chat_template=chat_template("<image>", end="<end_of_utterance>"),
    )
    return _chat_generation(_save(out_dir, Idefics3ForConditionalGeneration, config, processor, seed, init), tokenizer)


def build_tiny_smolvlm(out_dir: Path, *, seed: int = 0, init: float = INIT, split: bool = False) -> Path:
    """SmolVLM (``SmolVLMForConditionalGeneration``) with its own processor (which needs ``num2words`` and a video
    processor): Idefics3's architecture and image tiling, SmolVLM's prompt layout."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    named = {
        "image_token": "<image>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    }
    tokenizer = word_tokenizer(named, IDEFICS3_TOKENS, eos="<end_of_utterance>")
    scale = 2
    seq_len = (IMAGE_SIZE // PATCH) ** 2 // scale**2
    config = SmolVLMConfig(
        vision_config=_vision(),
        text_config=_llama(tokenizer),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    longest = 2 * IMAGE_SIZE if split else IMAGE_SIZE
    sizes = {"size": {"longest_edge": longest}, "max_image_size": {"longest_edge": IMAGE_SIZE}}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessorPil(do_image_splitting=split, **sizes),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(**sizes),
        image_seq_len=seq_len,
        chat_template=chat_template("<image>", end="<end_of_utterance>"),
    )
    return _chat_generation(_save(out_dir, SmolVLMForConditionalGeneration, config, processor, seed, init), tokenizer)
