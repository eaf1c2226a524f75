"""Captioning families besides GIT: one small adapter per family, and the engine that serves any of them.

``load_engine`` reads a checkpoint's ``model_type`` and loads what it is: GIT on ``model.engine.CaptionEngine``
(its exact fast decoder, untouched), every other family on ``FamilyEngine`` through its adapter. An adapter says
three things: how to load the model and processor (safetensors only, never remote code), how to turn a batch of
images and one prompt into ``generate`` inputs, and where the caption lies in what ``generate`` returns. The
engine keeps GIT's contract: a list in, a list of the same length out, checked; greedy captions equal
transformers' ``generate`` one image at a time in the same dtype (tests/test_families.py proves it per family).

``max_length`` means what it means for GIT: the caption's tokens plus a start token, plus the prompt's tokens where
the caption continues the prompt (BLIP, ViT->BERT decoders); where the prompt is an instruction (Florence-2 task
tokens, chat VLMs, BLIP-2, PaliGemma) the caption gets ``max_length - 1`` new tokens and does not repeat it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from common.errors import CaptionerError, ConfigError, EngineError, ModelLoadError
from common.messages import GenParams
from model import engine as git_engine
from model import profiles
from model.engine import Generated, RowSampler

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


# --- adapters ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """``generate`` inputs for one batch, and how many leading positions of each returned row are not caption."""

    inputs: dict[str, Any]
    skip: int  # decoder-only models return the input ids first; encoder-decoders return decoder ids only
    prefix: int  # tokens before the caption that count against max_length (start token, prompt prefix)


@dataclass(frozen=True)
class TrainBatch:
    """Forward inputs for one training batch and its labels, aligned with the logits the forward returns: the logits
    at position t predict ``labels[:, t + 1]``; every position that is not caption (padding, start token, prompt,
    image tokens, chat turns before the answer) is -100."""

    inputs: dict[str, Any]
    labels: torch.Tensor


class Family:
    """How one captioning family loads, builds a batch's inputs for a prompt, and where its caption lies."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    #: The prompt used when a request gives none (None: the model captions without one).
    default_prompt: ClassVar[str | None] = None
    #: True: the caption continues the prompt and includes it (GIT's way); False: the prompt is an instruction.
    prompt_is_prefix: ClassVar[bool] = False

    def model_class(self) -> Any:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def load_processor(self, source: str, revision: Any) -> Any:
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=False)
        except ImportError as exc:  # a processor half that needs a package the worker extra does not bring
            raise ModelLoadError(f"{source!r}: {missing_package(exc)}") from None

    def prompt(self, params: GenParams) -> str | None:
        return params.prompt if params.prompt else self.default_prompt

    def prefix_ids(self, processor: Any, prompt: str | None) -> list[int]:
        """The tokens before the caption that max_length counts: a start token, and the prompt when it is a prefix."""
        if not (prompt and self.prompt_is_prefix):
            return [0]
        return [0, *processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]]

    def batch(
        self, processor: Any, images: list[Image], prompt: str | None, device: torch.device, dtype: torch.dtype
    ) -> Batch:
        raise NotImplementedError

    def eos_ids(self, model: Any, processor: Any) -> set[int]:
        return {int(t) for t in git_engine._as_list(model.generation_config.eos_token_id)}

    def bind(self, model: Any) -> None:
        """Take what ``batch`` needs from the loaded model's config (nothing, for most families)."""

    # --- training (training/finetune.py) ---

    #: Which layers get LoRA adapters by default: a regex over module names (peft's ``target_modules``), the
    #: attention projections of the text side. None: the family is not fine-tuned by ``captioner train``.
    lora_targets: ClassVar[str | None] = None

    def train_batch(
        self,
        processor: Any,
        images: list[Image],
        captions: list[str],
        prompt: str | None,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> TrainBatch:
        """Inputs and labels that teach the model to answer ``prompt`` about each image with its caption, as
        ``batch`` asks at captioning time; ``max_tokens`` bounds each caption's tokens, its start and end included."""
        raise NotImplementedError(f"{self.name} is not fine-tuned here")


def _to(features: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors onto the device; floating ones (pixels) in the model's dtype, ids and masks as they are."""
    out = {}
    for key, value in dict(features).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        out[key] = value
    return out


def _caption_ids(tokenizer: Any, caption: str, end: int | None, room: int) -> list[int]:
    """A caption's tokens with the end token the model stops on, at most ``room`` of them (the end kept)."""
    ids = list(tokenizer(caption, add_special_tokens=False)["input_ids"])
    if end is None:
        return ids[:room]
    return [*ids[: max(room - 1, 0)], end]


def _append_answers(inputs: dict[str, Any], answers: list[list[int]], pad: int) -> TrainBatch:
    """Decoder-only training rows: each prompt row of ``inputs`` (what generation starts from) followed by its
    answer tokens, right-padded; only the answers are labelled. Per-token companions of ``input_ids`` grow with
    them: the attention mask (1 on answers), ``token_type_ids`` (1 on answers: PaliGemma's suffix, which it
    attends causally), anything else with zeros."""
    ids = inputs["input_ids"]
    rows, length = ids.shape
    width = length + max(len(a) for a in answers)
    new_ids = torch.full((rows, width), pad, dtype=ids.dtype, device=ids.device)
    labels = torch.full((rows, width), -100, dtype=torch.long, device=ids.device)
    answer = torch.zeros((rows, width), dtype=torch.bool, device=ids.device)
    new_ids[:, :length] = ids
    for row, tokens in enumerate(answers):
        span = torch.tensor(tokens, dtype=ids.dtype, device=ids.device)
        new_ids[row, length : length + len(tokens)] = span
        labels[row, length : length + len(tokens)] = span
        answer[row, length : length + len(tokens)] = True
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if key == "labels":  # PaliGemma's processor labels its prompt with -100 rows: ours replace them
            continue
        if key != "input_ids" and isinstance(value, torch.Tensor) and value.shape[:2] == (rows, length):
            grown = torch.zeros((rows, width), dtype=value.dtype, device=value.device)
            grown[:, :length] = value
            if key in ("attention_mask", "token_type_ids"):
                grown[answer] = 1
            value = grown
        out[key] = value
    out["input_ids"] = new_ids
    return TrainBatch(out, labels)


def _decoder_rows(start: list[int], captions: list[list[int]], pad: int, device: torch.device) -> TrainBatch:
    """Training rows of a decoder that attends to the image: ``start`` (its start token and a prompt prefix), then
    each caption, right-padded, as ``decoder_input_ids``; labels are the captions only."""
    width = len(start) + max(len(c) for c in captions)
    ids = torch.full((len(captions), width), pad, dtype=torch.long)
    labels = torch.full((len(captions), width), -100, dtype=torch.long)
    for row, tokens in enumerate(captions):
        ids[row, : len(start) + len(tokens)] = torch.tensor([*start, *tokens])
        labels[row, len(start) : len(start) + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    mask = (labels != -100).long()
    mask[:, : len(start)] = 1
    return TrainBatch(
        {"decoder_input_ids": ids.to(device), "decoder_attention_mask": mask.to(device)}, labels.to(device)
    )


class Blip(Family):
    """BLIP: a ViT and a BERT decoder; the caption starts with ``[DEC]`` and continues the prompt, if one is given."""

    name, model_types, prompt_is_prefix = "blip", ("blip",), True

    def model_class(self) -> Any:
        from transformers import BlipForConditionalGeneration

        return BlipForConditionalGeneration

    def batch(
        self, processor: Any, images: list[Image], prompt: str | None, device: torch.device, dtype: torch.dtype
    ) -> Batch:
        # Every row shares the prompt, so no padding is needed and batching stays exact.
        text = [prompt] * len(images) if prompt else None
        features = processor(images=images, text=text, return_tensors="pt")
        return Batch(_to(features, device, dtype), 0, len(self.prefix_ids(processor, prompt)))

    lora_targets = r".*text_decoder\..*\.(query|value)$"

    def train_batch(
        self,
        processor: Any,
        images: list[Image],
        captions: list[str],
        prompt: str | None,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> TrainBatch:
        # [DEC], the prompt, the caption, [SEP]: generation starts from [DEC] (BLIP's generate swaps it for [CLS])
        # and stops at [SEP]; BLIP's own recipe swaps the first token the same way.
        tokenizer = processor.tokenizer
        start = [self._start, *self.prefix_ids(processor, prompt)[1:]]
        rows = [_caption_ids(tokenizer, c, self._end, max_tokens - 1) for c in captions]
        text = _decoder_rows(start, rows, tokenizer.pad_token_id, device)
        features = dict(processor.image_processor(images=images, return_tensors="pt"))
        features["input_ids"] = text.inputs["decoder_input_ids"]
        features["attention_mask"] = text.inputs["decoder_attention_mask"]
        return TrainBatch(_to(features, device, dtype), text.labels)

    def bind(self, model: Any) -> None:
        self._start = int(model.config.text_config.bos_token_id)
        self._end = int(model.config.text_config.sep_token_id)


class Blip2(Family):
    """BLIP-2: a ViT, a Q-former and a decoder-only language model that answers after the query tokens."""

    name, model_types = "blip-2", ("blip-2",)

    def model_class(self) -> Any:
        from transformers import Blip2ForConditionalGeneration

        return Blip2ForConditionalGeneration

    def batch(
        self, processor: Any, images: list[Image], prompt: str | None, device: torch.device, dtype: torch.dtype
    ) -> Batch:
        features = dict(processor(images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt"))
        if "input_ids" not in features:
            # What Blip2ForConditionalGeneration.generate starts from without a prompt, made here so its length
            # (where the caption begins in the returned rows) is known.
            start = self._start
            features["input_ids"] = torch.tensor([start] * len(images), dtype=torch.long)
            features["attention_mask"] = torch.ones_like(features["input_ids"])
        return Batch(_to(features, device, dtype), int(features["input_ids"].shape[1]), 1)

    def bind(self, model: Any) -> None:
        config = model.config
        self._start = [config.image_token_index] * config.num_query_tokens + [config.text_config.bos_token_id]

    lora_targets = r".*language_model\..*\.(q_proj|v_proj)$"

    def train_batch(
        self,
        processor: Any,
        images: list[Image],
        captions: list[str],
        prompt: str | None,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> TrainBatch:
        # The query tokens (and the question), as generation starts; the caption and the end token after them.
        inputs = self.batch(processor, images, prompt, device, dtype).inputs
        tokenizer = processor.tokenizer
        answers = [_caption_ids(tokenizer, c, tokenizer.eos_token_id, max_tokens - 1) for c in captions]
        return _append_answers(inputs, answers, tokenizer.pad_token_id)


class Florence2(Family):
    """Florence-2: a DaViT encoder and a BART encoder-decoder; the prompt is a task token such as ``<CAPTION>``."""

    name, model_types, default_prompt = "florence-2", ("florence2",), "<CAPTION>"

    def model_class(self) -> Any:
        from transformers import Florence2ForConditionalGeneration

        return Florence2ForConditionalGeneration

    def batch(
        self, processor: Any, images: list[Image], prompt: str | None, device: torch.device, dtype: torch.dtype
    ) -> Batch:
        features = processor(images=images, text=[prompt or ""] * len(images), return_tensors="pt")
        return Batch(_to(features, device, dtype), 0, 1)

    lora_targets = r".*language_model\..*\.(q_proj|v_proj)$"

    def train_batch(
        self,
        processor: Any,
        images: list[Image],
        captions: list[str],
        prompt: str | None,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> TrainBatch:
        # The task prompt is the encoder's input, as at captioning time; the caption is the decoder's target.
        batch = self.batch(processor, images, prompt, device, dtype).inputs
        tokenizer = processor.tokenizer
        rows = [_encoded(tokenizer, c, self._start, tokenizer.eos_token_id, max_tokens - 1) for c in captions]
        decoder = _decoder_rows([self._start], rows, tokenizer.pad_token_id, device)
        return TrainBatch({**batch, **decoder.inputs}, decoder.labels)

    def bind(self, model: Any) -> None:
        start = model.generation_config.decoder_start_token_id
        self._start = int(start if start is not None else model.config.text_config.decoder_start_token_id)


def _encoded(tokenizer: Any, caption: str, start: int, end: int, room: int) -> list[int]:
    """A caption as the tokenizer encodes it with its own special tokens (BART's ``<s> ... </s>``), less a leading
    decoder start token (the decoder's first input already), ending in ``end``, at most ``room`` tokens."""
    ids = list(tokenizer(caption)["input_ids"])
    if ids and ids[0] == start:
        ids = ids[1:]
    if ids and ids[-1] == end:
        ids = ids[:-1]
    return [*ids[: max(room - 1, 0)], end]


class VisionEncoderDecoder(Family):
    """``VisionEncoderDecoderModel`` (ViT->GPT-2, ViT->BERT): an image processor and a tokenizer, no processor class;
    a prompt becomes the start of the decoder's input, which the caption continues."""

    name, model_types, prompt_is_prefix = "vision-encoder-decoder", ("vision-encoder-decoder",), True

    def model_class(self) -> Any:
        from transformers import VisionEncoderDecoderModel

        return VisionEncoderDecoderModel

    def load_processor(self, source: str, revision: Any) -> Any:
        from transformers import AutoImageProcessor, AutoTokenizer

        image = AutoImageProcessor.from_pretrained(source, revision=revision, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
        return ImageTextPair(image, tokenizer)

    def batch(
        self, processor: Any, images: list[Image], prompt: str | None, device: torch.device, dtype: torch.dtype
    ) -> Batch:
        features = dict(processor.image_processor(images=images, return_tensors="pt"))
        prefix = self.prefix_ids(processor, prompt)
        if prompt:
            start = [self._start, *prefix[1:]]
            features["decoder_input_ids"] = torch.tensor([start] * len(images), dtype=torch.long)
        return Batch(_to(features, device, dtype), 0, len(prefix))

    def bind(self, model: Any) -> None:
        self._start = int(model.config.decoder_start_token_id)
        self._end = int(git_engine._as_list(model.generation_config.eos_token_id or model.config.eos_token_id)[0])

    # A BERT decoder's attention (query, value), a GPT-2 decoder's fused projection (c_attn).
    lora_targets = r"^decoder\..*\.(query|value|q_proj|v_proj|c_attn)$"

    def train_batch(
        self,
        processor: Any,
        images: list[Image],
        captions: list[str],
        prompt: str | None,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> TrainBatch:
        features = dict(processor.image_processor(images=images, return_tensors="pt"))
        start = [self._start, *self.prefix_ids(processor, prompt)[1:]]
        rows = [_encoded(processor.tokenizer, c, self._start, self._end, max_tokens - 1) for c in captions]
        pad = processor.tokenizer.pad_token_id
        decoder = _decoder_rows(start, rows, self._end if pad is None else pad, device)
        return TrainBatch({**_to(features, device, dtype), **decoder.inputs}, decoder.labels)


class ChatVLM(Family):
    """Chat VLMs under ``AutoModelForImageTextToText`` (LLaVA, SmolVLM/Idefics3, Qwen2/2.5/3-VL, InternVL, Gemma 3,
    PaliGemma...): the prompt goes through the processor's chat template (PaliGemma, which has none, takes it as
    plain text), rows are padded on the left, and the caption is what follows the input."""

    name, default_prompt = "chat", "Describe this image in one sentence."

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type

    def load_processor(self, source: str, revision: Any) -> Any:
        processor = super().load_processor(source, revision)
        processor.tokenizer.padding_side = "left"  # decoder-only: every row's last token is where its answer starts
        return processor

    def prompt(self, params: GenParams) -> str | None:
        if params.prompt:
            return params.prompt
        return "caption en" if self.model_type == "paligemma" else self.default_prompt

    def batch(
        self, processor: Any, images: list[Image], prompt: str | None, device: torch.device, dtype: torch.dtype
    ) -> Batch:
        text = self.chat_text(processor, prompt or "")
        features = processor(
            images=[[im] for im in images], text=[text] * len(images), padding=True, return_tensors="pt"
        )
        return Batch(_to(features, device, dtype), int(features["input_ids"].shape[1]), 1)

    lora_targets = r".*(language_model|text_model)\..*\.(q_proj|v_proj)$"

    def train_batch(
        self,
        processor: Any,
        images: list[Image],
        captions: list[str],
        prompt: str | None,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> TrainBatch:
        # The user turn as generation sees it (left-padded), then the assistant's answer: the caption and the
        # template's end of turn, the only tokens in the loss.
        inputs = self.batch(processor, images, prompt, device, dtype).inputs
        tokenizer = processor.tokenizer
        answers = [self.answer_ids(processor, prompt or "", c, max_tokens - 1) for c in captions]
        return _append_answers(inputs, answers, tokenizer.pad_token_id)

    @classmethod
    def answer_ids(cls, processor: Any, prompt: str, caption: str, room: int) -> list[int]:
        """The assistant turn's tokens after the generation prompt, as the chat template writes it (the caption and
        the end of turn, the trailing newline dropped); without a template, the caption and the end token."""
        tokenizer = processor.tokenizer
        if getattr(processor, "chat_template", None):
            user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            turn = [{"role": "assistant", "content": [{"type": "text", "text": caption}]}]
            asked = cls.chat_text(processor, prompt)
            whole = str(processor.apply_chat_template(user + turn, tokenize=False))
            if whole.startswith(asked):
                ids = list(tokenizer(whole[len(asked) :].rstrip(), add_special_tokens=False)["input_ids"])
                return [*ids[: max(room - 1, 0)], ids[-1]] if len(ids) > room else ids
        return _caption_ids(tokenizer, caption, tokenizer.eos_token_id, room)

    @staticmethod
    def chat_text(processor: Any, prompt: str) -> str:
        """One user turn: an image and the prompt, through the processor's chat template when it has one."""
        if not getattr(processor, "chat_template", None):  # PaliGemma: the image token, then the prompt as it is
            return getattr(processor, "image_token", "") + prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return str(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


class ImageTextPair:
    """An image processor and a tokenizer for checkpoints saved without a processor class (VisionEncoderDecoder)."""

    def __init__(self, image_processor: Any, tokenizer: Any) -> None:
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def save_pretrained(self, folder: Any) -> None:
        """Both halves into one folder (training checkpoints), where ``load_processor`` finds them again."""
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


#: model_type -> its adapter; every other image-text-to-text model_type is served as a chat VLM.
FAMILIES: dict[str, type[Family]] = {
    t: cls for cls in (Blip, Blip2, Florence2, VisionEncoderDecoder) for t in cls.model_types
}


def family_for(model_type: str) -> Family:
    """The adapter for a checkpoint's ``model_type``; ``ModelLoadError`` when nothing here captions with it."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]()
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return ChatVLM(model_type)
    known = sorted({"git", *FAMILIES, *MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES})
    raise ModelLoadError(
        f"model_type {model_type!r} is not a captioning model this worker serves; it serves {', '.join(known)}"
    )


# --- loading ------------------------------------------------------------------------------------------------

#: Packages transformers' processors ask for that only some families need, and the extra that brings them.
PROCESSOR_PACKAGES = {"torchvision": "vlm", "num2words": "vlm"}


def missing_package(exc: ImportError) -> str:
    """What to install when a processor cannot be built: Qwen2/2.5/3-VL, InternVL and SmolVLM processors carry a
    video processor that transformers builds on torchvision, even to caption still images."""
    text = str(exc)
    for package, extra in PROCESSOR_PACKAGES.items():
        if package.lower() in text.lower():
            return f"its processor needs {package}: pip install 'captioner[{extra}]'"
    return f"its processor could not be built: {text.strip().splitlines()[0] if text.strip() else type(exc).__name__}"


def model_type_of(cfg: git_engine.EngineConfig) -> str:
    """The checkpoint's ``model_type``, read from its config before any weights (a local config.json directly)."""
    local = git_engine._local_dir(cfg.model)
    if local is not None:
        try:
            return str(json.loads((local / "config.json").read_text(encoding="utf-8"))["model_type"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{local} has no readable config.json with a model_type ({exc})") from None
    from transformers import AutoConfig

    try:
        revision, _ = git_engine._resolve_hub_revision(cfg.model, cfg.revision)
        return str(AutoConfig.from_pretrained(cfg.model, revision=revision, trust_remote_code=False).model_type)
    except Exception as exc:
        raise git_engine._load_error(cfg.model, exc) from exc


def load_engine(cfg: git_engine.EngineConfig) -> Any:
    """The engine for what the checkpoint is: GIT on its exact fast path, any other family on ``FamilyEngine``."""
    if cfg.decoder not in ("auto", "fast", "hf"):
        raise ConfigError(f"unknown decoder {cfg.decoder!r}: use auto, fast or hf")
    model_type = model_type_of(cfg)
    if model_type == "git":
        return git_engine.CaptionEngine.load(cfg)
    return FamilyEngine.load(cfg, family_for(model_type))


def _load_model(family: Family, source: str, revision: Any, dtype: torch.dtype) -> tuple[Any, Any]:
    """Weights (safetensors only, never remote code) and processor; a checkpoint missing weights is refused."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
    model, info = family.model_class().from_pretrained(
        source,
        config=config,
        revision=revision,
        use_safetensors=True,
        dtype=dtype,
        output_loading_info=True,
        trust_remote_code=False,
    )
    # transformers fills missing or mis-shaped weights with random values and only warns: refuse instead.
    broken = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
    if broken:
        raise ModelLoadError(
            f"model {source!r} lacks or mis-shapes {len(broken)} weight(s) (e.g. {', '.join(broken[:3])}); "
            f"it is not a complete {family.name} checkpoint"
        )
    model.eval()
    processor = family.load_processor(source, revision)
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        raise ModelLoadError(f"model {source!r}: its processor {type(processor).__name__} has no image processor")
    return model, processor


# --- the engine ---------------------------------------------------------------------------------------------


class FamilyEngine:
    """A loaded captioning model of any family but GIT. Same surface as ``CaptionEngine``: ``prepare`` on decode
    threads (images stay PIL images: the processor makes pixels and prompt together), ``generate`` on the model
    thread, one caption per image, checked."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        family: Family,
        *,
        name: str,
        version: str,
        pieces: profiles.Pieces | None = None,
    ) -> None:
        self.model, self.processor, self.family = model, processor, family
        self.name, self.version = name, version
        self.device: torch.device = model.device
        self.dtype: torch.dtype = model.dtype
        self.pieces = pieces or profiles.Pieces()
        for piece in self.pieces.in_use:
            self.pieces.drop(piece, f"speed pieces run on GIT's decoder only; {family.name} runs exact")
        family.bind(model)
        self._eos = family.eos_ids(model, processor)

    @property
    def family_name(self) -> str:
        """The family this checkpoint belongs to (``blip``, ``florence-2``, a chat VLM's model_type...)."""
        return self.family.model_type if isinstance(self.family, ChatVLM) else self.family.name

    @property
    def profile(self) -> str:
        return self.pieces.provenance

    @property
    def input_edge(self) -> int:
        size = getattr(self.processor.image_processor, "size", None) or {}
        size = dict(size)
        return int(size.get("shortest_edge") or size.get("height") or 224)

    @classmethod
    def load(cls, cfg: git_engine.EngineConfig, family: Family) -> FamilyEngine:
        """Load a checkpoint of ``family`` onto the configured device and dtype."""
        device = git_engine.resolve_device(cfg.device)
        pieces = profiles.Pieces.asked(cfg.requested_pieces(device.type))
        dtype = git_engine.resolve_dtype(cfg.dtype, device)
        started = time.perf_counter()
        local = git_engine._local_dir(cfg.model)
        try:
            if local is not None:
                files = git_engine._weight_files(local)
                version = git_engine._local_version(local, git_engine._fingerprint(files))
                source, revision = str(local), None
            else:
                source = cfg.model
                revision, commit = git_engine._resolve_hub_revision(cfg.model, cfg.revision)
                version = f"{cfg.model}@{cfg.revision or commit or 'main'}"
            model, processor = _load_model(family, source, revision, dtype)
            model.to(device)
        except CaptionerError:
            raise
        except Exception as exc:
            raise git_engine._load_error(cfg.model, exc) from exc
        engine = cls(model, processor, family, name=cfg.model, version=version, pieces=pieces)
        log.info(
            "model %s loaded: family=%s version=%s device=%s dtype=%s in %.1fs",
            cfg.model,
            engine.family_name,
            version,
            device,
            str(engine.dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        return engine

    def warm_up(self, max_batch: int, params: GenParams, sizes: list[int] | None = None) -> float:
        return 0.0  # nothing compiled or captured

    def prepare(self, images: list[Image]) -> list[Image]:
        """The images as RGB, ready for the processor (which runs with the prompt, on the model thread)."""
        return [im if im.mode == "RGB" else im.convert("RGB") for im in images]

    def stack(self, prepared: list[list[Image]]) -> list[Image]:
        return [im for part in prepared for im in part]

    def prompt_ids(self, prompt: str | None) -> torch.Tensor:
        """The tokens before the caption that count against max_length, shape (1, n): a start token, and the
        prompt's tokens where the caption continues it."""
        return torch.tensor([self.family.prefix_ids(self.processor, prompt)], dtype=torch.long)

    def generate(self, images: list[Image], params: GenParams) -> list[str]:
        return [c.text for c in self.generate_detailed(images, params)]

    def caption(self, images: list[Image], params: GenParams) -> list[str]:
        captions = self.generate(self.prepare(images), params)
        if len(captions) != len(images):
            raise EngineError(f"{len(captions)} captions for {len(images)} images; results not aligned")
        return captions

    def generate_detailed(
        self, images: list[Image], params: GenParams, seeds: list[int] | None = None
    ) -> list[Generated]:
        """One caption per image, in order, with its length in tokens as max_length counts them and whether it
        ended on its own; a count mismatch raises ``EngineError``.

        ``seeds``: one per image when ``params`` sample: each row draws from its own generator (``RowSampler``),
        so an image's caption depends on its seed alone, never on its batch-mates; greedy and beam search ignore
        them."""
        sampler = None
        if params.sampling:
            count = len(images) if isinstance(images, list) else 0
            seeds = seeds if seeds is not None else [0] * count
            if len(seeds) != count:
                raise EngineError(f"{len(seeds)} seeds for {count} images")
            sampler = RowSampler(seeds, params.temperature or 1.0, params.top_p or 1.0)
        return self._generate(images, params, sampler)

    def sample_detailed(
        self, images: list[Image], params: GenParams, n: int, *, seed: int, temperature: float, top_p: float
    ) -> list[Generated]:
        """``n`` sampled captions of one image (best of N): the image ``n`` times in one batch, candidate ``i``
        drawn under ``candidate_seeds(seed, n)[i]``, so the candidates are reproducible for the seed (and the first
        ones are the same whatever ``n``)."""
        if not isinstance(images, list) or len(images) != 1:
            got = len(images) if isinstance(images, list) else type(images).__name__
            raise EngineError(f"sampling takes a list of one image, got {got}")
        sampler = RowSampler(candidate_seeds(seed, n), temperature, top_p)
        out = self._generate(images * n, params, sampler)
        if len(out) != n:
            raise EngineError(f"the model returned {len(out)} samples for {n}; results not aligned")
        return out

    def _generate(self, images: list[Image], params: GenParams, sampler: RowSampler | None) -> list[Generated]:
        if not isinstance(images, list):
            raise EngineError(f"{self.family_name} takes a list of images, got {type(images).__name__}")
        if not images:
            return []
        prompt = self.family.prompt(params)
        try:
            batch = self.family.batch(self.processor, images, prompt, self.device, self.dtype)
        except (ValueError, TypeError, KeyError) as exc:  # the processor refuses this prompt (a misplaced task token)
            raise EngineError(f"{self.family_name} cannot caption with prompt {prompt!r}: {exc}") from exc
        new_tokens = params.max_length - batch.prefix
        if new_tokens < 1:
            raise EngineError(f"max_length {params.max_length} leaves no room after {batch.prefix} prompt token(s)")
        try:
            with torch.inference_mode():
                sequences = self.model.generate(**batch.inputs, **generation_kwargs(params, new_tokens, sampler))
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        if sequences.shape[0] != len(images):
            raise EngineError(f"the model returned {sequences.shape[0]} captions for {len(images)} images")
        return [self._one(row, batch) for row in sequences.tolist()]

    def _one(self, row: list[int], batch: Batch) -> Generated:
        if batch.skip:  # decoder-only: the caption is what follows the input; a start token counts as for GIT
            new = row[batch.skip :]
            for position, token in enumerate(new):
                if token in self._eos:
                    return Generated(self._decode(new[:position]), batch.prefix + position + 1, True)
            return Generated(self._decode(new), batch.prefix + len(new), False)
        tokens, ended = git_engine._length(row, self._eos)
        return Generated(self._decode(row[:tokens]), tokens, ended)

    def _decode(self, ids: list[int]) -> str:
        return str(self.processor.tokenizer.decode(ids, skip_special_tokens=True)).strip()


def generation_kwargs(params: GenParams, new_tokens: int, sampler: RowSampler | None = None) -> dict[str, Any]:
    """Greedy (or beam) search for ``new_tokens`` at most: what a checkpoint's generation_config says about sampling
    or extra rows must not change a caption the recorded params are meant to determine.

    With ``sampler`` the search is greedy over its output, which leaves one token per row: it runs after every
    processor the checkpoint's generation_config asks for (transformers appends custom ones last), and
    ``do_sample=False`` keeps the checkpoint's own temperature, top-k and top-p out."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": new_tokens,
        "num_beams": params.num_beams,
        "do_sample": False,
        "num_return_sequences": 1,
    }
    if sampler is not None:
        from transformers import LogitsProcessorList

        kwargs["num_beams"] = 1
        kwargs["logits_processor"] = LogitsProcessorList([sampler])
    return kwargs


def candidate_seeds(seed: int, n: int) -> list[int]:
    """The seeds of best of N's candidates of one image: candidate ``i``'s derives from the image's seed and ``i``."""
    return [
        int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") >> 1 for i in range(n)
    ]
