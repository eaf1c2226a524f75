"""GIT load + batched generate: a list of images in, a list of captions of the same length out, checked."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from common.errors import CaptionerError, ConfigError, EngineError, ModelLoadError, UnsafeCheckpoint
from common.messages import GenParams
from common.store import META
from model import fastgen, profiles
from model.preprocess import ClipPreprocess

if TYPE_CHECKING:
    from PIL.Image import Image

    from common.settings import Settings

log = logging.getLogger(__name__)

#: Written next to the weights by training; its "version" wins over the computed fingerprint.
VERSION_FILE = META
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
#: Weight files that are Python pickles: loading one can run arbitrary code, so they are refused unopened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: The safetensors reader refuses headers above 100 MB; so do we, before allocating them.
MAX_HEADER_BYTES = 100_000_000
#: Data blocks hashed into the version fingerprint: constant cost however large the weights are.
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES = 256, 4096

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class EngineConfig:
    """What to load and where: a hub id or local save_pretrained directory, device and dtype names, decoder."""

    model: str
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    # "fast": model/fastgen.py for greedy requests (same ids as HF); "hf": transformers' generate; "auto": fast
    # when the model allows it. Beam search always runs HF generate.
    decoder: str = "auto"
    # "eager": transformers' attention in the image encoder (exact); "sdpa": PyTorch's fused kernel (faster; a
    # caption can differ on near-ties in half precision).
    encoder_attention: str = "eager"
    # Speed profile, "exact" or "fast", and pieces switched on or off on top of it ("+sdpa,-int8"): see
    # model/profiles.py. encoder_attention="sdpa" and jpeg_draft=True switch their piece on as well.
    profile: str = "exact"
    pieces: str = ""
    jpeg_draft: bool = False
    # Where torch.compile keeps its artefacts so a restart reuses them; None: torch's default (under /tmp).
    compile_cache_dir: str | None = None
    # Share of the GPU's memory the allocator may take (below 1 when workers share a GPU).
    cuda_memory_fraction: float = 1.0

    @classmethod
    def from_settings(cls, s: Settings) -> EngineConfig:
        cache = str(s.compile_cache_dir) if s.compile_cache_dir else None
        return cls(
            model=s.model,
            revision=s.model_revision,
            device=s.device,
            dtype=s.dtype,
            decoder=s.decoder,
            encoder_attention=s.encoder_attention,
            profile=s.profile,
            pieces=s.pieces,
            jpeg_draft=s.jpeg_draft,
            compile_cache_dir=cache,
            cuda_memory_fraction=s.cuda_memory_fraction,
        )

    def requested_pieces(self, device_type: str) -> tuple[str, ...]:
        """The speed pieces this config asks for on a device type; unknown names raise ``ConfigError``."""
        extra = [name for name, on in (("sdpa", self.encoder_attention == "sdpa"), ("draft", self.jpeg_draft)) if on]
        return profiles.requested(self.profile, self.pieces, device_type, extra=extra)


# --- device and dtype ------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when visible, else CPU; ``cpu``, ``cuda``, ``cuda:N`` are checked against this machine."""
    text = name.strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but no CUDA device is visible; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def _cpu_has_native_bf16() -> bool:
    # A private torch op: if it moves or breaks, fp32 is the safe answer, not a crash.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def half_dtype(device: torch.device) -> torch.dtype | None:
    """The half type ``device`` computes fast: bf16 on GPUs that have it, else fp16; bf16 on CPUs with native
    support, else None (fp32 is faster there). The one rule for inference dtypes and training mixed precision."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            # Pre-Ampere GPUs only emulate bf16 (slowly); fp16 is their fast half type.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    # Emulated bf16 on CPU is slower than fp32; with AVX512-BF16/AMX it is faster (measured on git-base).
    return torch.bfloat16 if _cpu_has_native_bf16() else None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> the device's fast half type (``half_dtype``), else fp32; other names as written."""
    text = name.strip().lower()
    if text != "auto":
        try:
            return _DTYPES[text]
        except KeyError:
            raise ConfigError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16") from None
    return half_dtype(device) or torch.float32


# --- checkpoint checks and version -----------------------------------------------------------------


def _local_dir(model: str) -> Path | None:
    """The directory ``model`` names, None for a hub id; a path-like name that is no directory is an error."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    # "org/name" is a hub id; anything more path-like that does not exist is a typo, not a hub lookup
    # (which would retry the network for half a minute before failing).
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or path.exists():
        raise ModelLoadError(f"model {model!r} is not a directory (give a save_pretrained directory or a hub id)")
    return None


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a local checkpoint; refuses pickle-only directories."""
    index = model_dir / SAFE_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnsafeCheckpoint(f"{index} is not a valid safetensors index ({exc}); re-save the model") from None
        files = [model_dir / name for name in names]
        for file in files:
            # Shard names come from the index: keep them inside the model directory.
            if file.parent != model_dir or not file.is_file():
                raise UnsafeCheckpoint(f"{index} lists {file.name!r}, which is not a file in {model_dir}")
        return files
    if (model_dir / SAFE_WEIGHTS).is_file():
        return [model_dir / SAFE_WEIGHTS]
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpoint(
            f"{model_dir} has only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded; "
            "only safetensors are accepted. Convert once where the file is trusted: "
            "GitForCausalLM.from_pretrained(dir, use_safetensors=False).save_pretrained(dir)"
        )
    raise ModelLoadError(f"{model_dir} has no {SAFE_WEIGHTS}: not a save_pretrained model directory")


def _read_header(file: Path) -> tuple[bytes, int]:
    """The JSON header of a safetensors file and the file size, checked so truncation or tampering is refused."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise UnsafeCheckpoint(f"{file} is truncated ({size} bytes); re-copy or re-save the model")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise UnsafeCheckpoint(f"{file}: header length {length} does not fit a {size}-byte file (truncated?)")
        header = fh.read(length)
    try:
        entries = json.loads(header)
        spans = sorted(tuple(v["data_offsets"]) for k, v in entries.items() if k != "__metadata__")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UnsafeCheckpoint(f"{file}: safetensors header is not valid ({exc}); the file was altered") from None
    # Tensors must tile the data section exactly, as the safetensors reader requires.
    end = 0
    for start, stop in spans:
        if start != end or stop < start:
            raise UnsafeCheckpoint(f"{file}: tensor offsets overlap or leave gaps; the file was altered")
        end = stop
    if 8 + length + end != size:
        raise UnsafeCheckpoint(f"{file}: header describes {8 + length + end} bytes, file has {size} (truncated?)")
    return header, size


def _fingerprint(files: list[Path]) -> str:
    """12 hex of sha256 over headers, sizes and evenly spaced data blocks of the weight files.

    Constant cost (about 1 MiB read) yet it changes whenever training changes the weights, since training
    moves essentially every block; an edit of a few bytes between samples would escape it (captioner.json
    is the authoritative version when one is present).
    """
    digest = hashlib.sha256()
    for file in files:
        header, size = _read_header(file)
        digest.update(file.name.encode() + b"\0" + struct.pack("<Q", size) + header)
        data_start, data_len = 8 + len(header), size - 8 - len(header)
        with open(file, "rb") as fh:
            step = max(1, data_len // FINGERPRINT_BLOCKS)
            for offset in range(0, data_len, step):
                fh.seek(data_start + offset)
                digest.update(fh.read(FINGERPRINT_BLOCK_BYTES))
            fh.seek(max(data_start, size - FINGERPRINT_BLOCK_BYTES))
            digest.update(fh.read())
    return digest.hexdigest()[:12]


def _local_version(model_dir: Path, fingerprint: str) -> str:
    """``captioner.json``'s "version" when training wrote one, else ``<dirname>@<fingerprint>``."""
    marker = model_dir / VERSION_FILE
    if marker.is_file():
        try:
            version = json.loads(marker.read_text(encoding="utf-8")).get("version")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{marker} is not a JSON object ({exc}); fix or remove it") from None
        if version:
            return str(version)
    return f"{model_dir.name}@{fingerprint}"


def _resolve_hub_revision(model_id: str, revision: str | None) -> tuple[Any, str | None]:
    """Pin a hub revision to one commit (so config, weights and processor match); the commit, when cheap."""
    try:
        from transformers.utils.hub import resolve_revision

        resolved = resolve_revision(model_id, revision)
    except Exception:  # best effort, as in transformers itself: the load below reports real problems
        return revision, None
    return resolved, getattr(resolved, "resolved", None)


# --- the engine ------------------------------------------------------------------------------------


class Generated(NamedTuple):
    """One generated caption: its text, its length in tokens as max_length counts them, and whether it ended."""

    text: str
    tokens: int
    ended: bool  # it emitted its end token; False: generation stopped at max_length


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


def _length(ids: list[int], eos: set[int]) -> tuple[int, bool]:
    """Tokens up to and including the first end token (BOS and prompt count, padding does not), and whether one came."""
    for position, token in enumerate(ids[1:], 1):
        if token in eos:
            return position + 1, True
    return len(ids), False


class CaptionEngine:
    """A loaded GIT model and its processor. ``prepare`` runs on decode threads, ``generate`` on one model thread."""

    #: The captioning family, as ``model.families.FamilyEngine`` names its own.
    family_name = "git"

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str,
        version: str,
        decoder: str = "auto",
        pieces: profiles.Pieces | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.name = name
        self.version = version
        self.device: torch.device = model.device
        self.dtype: torch.dtype = model.dtype
        self._max_positions: int = int(model.config.max_position_embeddings)
        #: The speed pieces in use and the ones that fell back, with why (model/profiles.py).
        self.pieces = pieces or profiles.Pieces()
        self._fast = _fast_decoder(model, decoder, name, self.pieces)
        # The processor's own numbers with less work per image, when it is the PIL CLIP processor GIT ships with.
        self._preprocess = ClipPreprocess.matching(processor.image_processor)
        self._eos = {int(t) for t in _as_list(model.generation_config.eos_token_id)}

    @property
    def profile(self) -> str:
        """What runs, as every result row records it: ``exact``, or ``fast:<pieces in use>``."""
        return self.pieces.provenance

    @classmethod
    def load(cls, cfg: EngineConfig) -> CaptionEngine:
        """Load a GIT checkpoint (safetensors only, never remote code) onto the configured device and dtype."""
        if cfg.encoder_attention not in ("eager", "sdpa"):  # before any download or read
            raise ConfigError(f"unknown encoder attention {cfg.encoder_attention!r}: use eager or sdpa")
        device = resolve_device(cfg.device)
        pieces = profiles.Pieces.asked(cfg.requested_pieces(device.type))
        if device.type == "cuda" and cfg.cuda_memory_fraction < 1:
            torch.cuda.set_per_process_memory_fraction(cfg.cuda_memory_fraction, device)
        dtype = resolve_dtype(cfg.dtype, device)
        if "int8" in pieces and device.type == "cpu" and dtype != torch.float32:
            # Dynamically quantised linear layers take and give float32: the rest of the model runs in it too.
            log.info("int8: the model runs in float32 around its int8 linear layers (asked for %s)", dtype)
            dtype = torch.float32
        started = time.perf_counter()
        local = _local_dir(cfg.model)
        try:
            if local is not None:
                # The fingerprint reads every safetensors header, so truncation or tampering is refused here.
                version = _local_version(local, _fingerprint(_weight_files(local)))
                source, revision = str(local), None
            else:
                source = cfg.model
                revision, commit = _resolve_hub_revision(cfg.model, cfg.revision)
                version = f"{cfg.model}@{cfg.revision or commit or 'main'}"
            model, processor = _load_pretrained(source, revision, dtype)
            # GIT refuses SDPA as a whole (its text attention mask), but its vision tower asks its own config which
            # attention to run, and transformers' SDPA path there takes no mask: the same computation, fused.
            model.config.vision_config._attn_implementation = "sdpa" if "sdpa" in pieces else "eager"
            model.to(device)
        except CaptionerError:
            raise
        except Exception as exc:
            raise _load_error(cfg.model, exc) from exc
        if "int8" in pieces:
            _quantize_int8(model, pieces)
        engine = cls(model, processor, name=cfg.model, version=version, decoder=cfg.decoder, pieces=pieces)
        if "compile" in pieces:
            engine._compile(cfg.compile_cache_dir)
        log.info(
            "model %s loaded: version=%s device=%s dtype=%s profile=%s in %.1fs",
            cfg.model,
            version,
            device,
            str(engine.dtype).removeprefix("torch."),
            engine.profile,
            time.perf_counter() - started,
        )
        return engine

    def _compile(self, cache_dir: str | None) -> None:
        """torch.compile the encoder and prefill (compiled on first use, or by ``warm_up``); off when it cannot be."""
        if self._fast is None:
            self.pieces.drop("compile", "it compiles the fast greedy decoder's prefill, which this model does not use")
            return
        try:
            _configure_inductor(cache_dir, self.device)
            self._fast.compile_prefill()
        except Exception as exc:  # no compiler backend on this platform, an unsupported torch build
            self.pieces.drop("compile", f"torch.compile is unavailable: {type(exc).__name__}: {exc}")

    def warm_up(self, max_batch: int, params: GenParams, sizes: list[int] | None = None) -> float:
        """Compile and capture now what would otherwise be built on first use (the compiled prefill, CUDA graphs),
        on blank images at the batch sizes that need it; the seconds taken (0 when no such piece is on).

        Run at worker start, so no request pays for it; a piece that fails here falls back to exact, with a log line.
        ``sizes`` adds batch sizes to compile (a benchmark's sweep); a worker's batches fill to ``max_batch``.
        """
        if self._fast is None or not (self._fast.compiled or self._fast.static):
            return 0.0
        sizes = sorted(set(sizes or []) | set(self.warm_up_sizes(max_batch)), reverse=True)
        started = time.perf_counter()
        edge = self.model.config.vision_config.image_size
        for rows in sizes:
            if self._fast.compiled is not None:
                self._fast.compiled_sizes.add(rows)
            self.generate_detailed(torch.zeros((rows, 3, edge, edge), dtype=torch.float32), params)
        took = time.perf_counter() - started
        log.info(
            "warm-up: profile %s, batch sizes %s, max_length %d: %.1fs", self.profile, sizes, params.max_length, took
        )
        return took

    def warm_up_sizes(self, max_batch: int) -> list[int]:
        """Batch sizes whose first run compiles or captures something: the compiled prefill runs at the largest batch
        (what bulk work fills) and at 1 (a lone request), other sizes run eager; CUDA graphs are captured per
        power-of-two row bucket."""
        if self._fast is None:
            return []
        sizes: set[int] = set()
        if self._fast.compiled is not None:
            sizes |= {1, max_batch}
        if self._fast.static is not None:
            sizes |= {fastgen.bucket(1) << i for i in range(fastgen.bucket(max_batch).bit_length())}
        return sorted(sizes, reverse=True)

    def prepare(self, images: list[Image]) -> torch.Tensor:
        """Pixel values for ``images`` (CPU, float32), one row per image; thread-safe, meant for decode threads."""
        if not images:
            size = self.model.config.vision_config.image_size
            return torch.empty((0, 3, size, size), dtype=torch.float32)
        if self._preprocess is not None:
            pixel_values = torch.from_numpy(np.stack([self._preprocess(im) for im in images]))
        else:
            pixel_values = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
            pixel_values = torch.as_tensor(pixel_values).to(torch.float32).contiguous()
        if pixel_values.shape[0] != len(images):
            raise EngineError(f"the image processor returned {pixel_values.shape[0]} rows for {len(images)} images")
        return pixel_values

    @property
    def input_edge(self) -> int:
        """The side the image processor resizes to (its shortest edge): smaller decodes lose nothing the model sees."""
        if self._preprocess is not None:
            return self._preprocess.shortest_edge
        size = getattr(self.processor.image_processor, "size", None) or {}
        return int(dict(size).get("shortest_edge") or self.model.config.vision_config.image_size)

    def stack(self, prepared: list[torch.Tensor]) -> torch.Tensor:
        """One batch from rows ``prepare`` made; on CUDA in pinned memory, so the copy to the GPU is a DMA."""
        if self.device.type != "cuda":
            return torch.cat(prepared)
        shape = (sum(int(p.shape[0]) for p in prepared), *prepared[0].shape[1:])
        return torch.cat(prepared, out=torch.empty(shape, dtype=prepared[0].dtype, pin_memory=True))

    def generate(self, pixel_values: torch.Tensor, params: GenParams) -> list[str]:
        """One caption per row of ``pixel_values``, in order; a count mismatch raises ``EngineError``."""
        return [c.text for c in self.generate_detailed(pixel_values, params)]

    def generate_detailed(self, pixel_values: torch.Tensor, params: GenParams) -> list[Generated]:
        """Like ``generate``, with each caption's length in tokens and whether it ended on its own (EOS)."""
        if pixel_values.ndim != 4:
            raise EngineError(f"pixel_values must be (batch, 3, H, W), got shape {tuple(pixel_values.shape)}")
        count = int(pixel_values.shape[0])
        if count == 0:
            return []
        if params.max_length > self._max_positions:
            raise EngineError(f"max_length {params.max_length} exceeds the model's {self._max_positions} positions")
        try:
            with torch.inference_mode():
                sequences = self._generate_ids(pixel_values, params)
        except torch.OutOfMemoryError:
            # Give the cached blocks back before the batcher halves the batch and tries again.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        captions = self._decode(sequences)
        if len(captions) != count:
            raise EngineError(f"the model returned {len(captions)} captions for {count} images; results not aligned")
        rows = sequences.tolist()
        return [Generated(text, *_length(row, self._eos)) for text, row in zip(captions, rows, strict=True)]

    def caption(self, images: list[Image], params: GenParams) -> list[str]:
        """Captions for ``images``, same length and order."""
        captions = self.generate(self.prepare(images), params)
        if len(captions) != len(images):
            raise EngineError(f"{len(captions)} captions for {len(images)} images; results not aligned")
        return captions

    # --- hooks (small on purpose, so tests and subclasses can replace one step) --------------------

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """``[CLS] + prompt tokens`` (no trailing [SEP], or GIT would treat the caption as finished), shape (1, n)."""
        tokenizer = self.processor.tokenizer
        ids = [tokenizer.cls_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        return torch.tensor([ids], dtype=torch.long)

    def _generate_ids(self, pixel_values: torch.Tensor, params: GenParams) -> torch.Tensor:
        count = pixel_values.shape[0]
        # --- fast greedy decoder (model/fastgen.py): the ids HF generate would return, fewer wasted steps ---
        if self._fast is not None and params.num_beams == 1:
            ids = self.prompt_ids(params.prompt).to(self.device).repeat(count, 1) if params.prompt else None
            # Requests HF refuses (max_length not above the prompt's length) go to HF, which raises as before.
            if self._fast.request_reason(1 if ids is None else ids.shape[1], params.max_length) is None:
                pixel_values = pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True)
                return self._fast.generate(pixel_values, params.max_length, ids)
        # --- HF generate ---
        kwargs: dict[str, Any] = {
            "pixel_values": pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True),
            "max_length": params.max_length,
            "num_beams": params.num_beams,
            # A checkpoint's generation_config must not turn on sampling or extra rows: the params
            # recorded with each result have to determine its caption, one caption per image.
            "do_sample": False,
            "num_return_sequences": 1,
        }
        if params.prompt:
            # Every row shares the prompt, so no padding is needed and batching stays exact.
            input_ids = self.prompt_ids(params.prompt).to(self.device).repeat(count, 1)
            kwargs["input_ids"] = input_ids
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        # The KV cache stays on (never use_cache=False): without it the image encoder re-runs every step.
        return self.model.generate(**kwargs)

    def _decode(self, sequences: torch.Tensor) -> list[str]:
        texts = self.processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [text.strip() for text in texts]


def _fast_decoder(
    model: Any, decoder: str, name: str, pieces: profiles.Pieces | None = None
) -> fastgen.GitGreedyDecoder | None:
    """The fast greedy decoder when ``decoder`` asks for it and the model allows it; None means HF generate."""
    if decoder not in ("auto", "fast", "hf"):
        raise ConfigError(f"unknown decoder {decoder!r}: use auto, fast or hf")
    pieces = pieces or profiles.Pieces()
    reason = "decoder hf was asked for" if decoder == "hf" else fastgen.unsupported_reason(model)
    if reason is None:
        graphs = "cudagraphs" in pieces and _cuda_graphs_usable(model, pieces)
        return fastgen.GitGreedyDecoder(
            model, fused_attention="sdpa" in pieces, static_steps=graphs, on_fallback=pieces.drop
        )
    if decoder == "fast":
        raise ConfigError(f"decoder 'fast' cannot run model {name!r}: {reason}; use decoder auto or hf")
    if decoder == "auto":
        log.info("model %s: fast decoder off (%s); HF generate is used", name, reason)
    for piece in ("cudagraphs",):  # it lives in the fast decoder only (sdpa still runs in the image encoder)
        if piece in pieces:
            pieces.drop(piece, f"it replays the fast greedy decoder's step, which is off ({reason})")
    return None


def _cuda_graphs_usable(model: Any, pieces: profiles.Pieces) -> bool:
    if model.device.type != "cuda":
        pieces.drop("cudagraphs", f"CUDA graphs need a CUDA device; this model runs on {model.device.type}")
        return False
    return True


def _quantize_int8(model: Any, pieces: profiles.Pieces) -> None:
    """Dynamic int8 quantisation of every linear layer (CPU only); off, with the reason, where it cannot run."""
    if model.device.type != "cpu":
        pieces.drop("int8", f"dynamic int8 quantisation runs on CPU only; this model runs on {model.device.type}")
        return
    try:
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch marks its eager quantisation API deprecated; it still runs
            warnings.simplefilter("ignore")
            quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    except Exception as exc:  # no quantised engine in this torch build, an unsupported platform
        pieces.drop("int8", f"dynamic quantisation failed: {type(exc).__name__}: {exc}")


def _configure_inductor(cache_dir: str | None, device: torch.device) -> None:
    """Point inductor's on-disk cache at ``cache_dir`` (restarts reuse compiled code) and, on CPU, freeze weights."""
    import os

    import torch._inductor.config as inductor

    if cache_dir:
        # Inductor reads its cache location from this variable when it first compiles (no other knob exists).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    inductor.fx_graph_cache = True
    if device.type == "cpu":
        # Weights become constants: oneDNN prepacks them and fuses linear + pointwise ops (inference only).
        inductor.freezing = True


def _load_pretrained(source: str, revision: Any, dtype: torch.dtype) -> tuple[Any, Any]:
    """Config check, weights (safetensors only) and processor, through the same from_pretrained path as the hub."""
    from transformers import AutoConfig, AutoProcessor, GitForCausalLM

    # trust_remote_code stays False: a checkpoint must never bring code with it.
    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
    if config.model_type != "git":
        raise ModelLoadError(f"model {source!r} is a {config.model_type!r} checkpoint, not GIT (model_type 'git')")
    model, info = GitForCausalLM.from_pretrained(
        source, config=config, revision=revision, use_safetensors=True, dtype=dtype, output_loading_info=True
    )
    # transformers fills missing or mis-shaped weights with random values and only warns: captions
    # would be garbage with nothing failing, so such a checkpoint is refused.
    broken = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
    if broken:
        raise ModelLoadError(
            f"model {source!r} lacks or mis-shapes {len(broken)} weight(s) (e.g. {', '.join(broken[:3])}); "
            "it is not a complete GIT checkpoint"
        )
    if info["unexpected_keys"]:
        log.warning("model %s: %d unused weight(s) ignored", source, len(info["unexpected_keys"]))
    model.eval()
    processor = AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=False)
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
        raise ModelLoadError(f"model {source!r}: its processor {type(processor).__name__} is not a GIT processor")
    return model, processor


def _load_error(model: str, exc: Exception) -> ModelLoadError:
    """Name the model and say what to do; safetensors failures are reported as unsafe checkpoints."""
    if type(exc).__name__ == "SafetensorError":
        return UnsafeCheckpoint(f"model {model!r}: a safetensors file is truncated or altered ({exc}); fetch it again")
    if isinstance(exc, OSError) and "safetensors" in str(exc):
        # transformers' own advice here ("do not set use_safetensors=True") is the unsafe way out.
        return UnsafeCheckpoint(
            f"model {model!r} has no safetensors weights; pickled weights can run code when loaded and are refused. "
            "Use a revision that has model.safetensors, or convert the weights where they are trusted"
        )
    return ModelLoadError(f"model {model!r} could not be loaded: {type(exc).__name__}: {exc}")
