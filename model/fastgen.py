"""Exact greedy decoding for GIT (``GitForCausalLM``): the token ids of ``model.generate(num_beams=1)``, sooner.

The algorithm, and where it saves work over transformers' eager ``generate``:

1. Encode: the image encoder and visual projection run once per batch, through the model's own modules.
2. Prefill: one decoder pass over ``[image tokens | BOS (+ prompt)]`` writes every layer's keys and values into a
   preallocated cache (per layer ``[rows, heads, image tokens + 64 text slots, head_dim]``, doubled on the rare
   longer caption), so a step writes one slot where ``DynamicCache`` re-copies the whole cache with ``torch.cat``.
   The mask is GIT's: image tokens see each other both ways and never text; text sees every image token and the
   text up to itself. In the last layer only the last position runs its query, attention output and MLP: nothing
   else reads them.
3. Decode: each step embeds just the new token at its text position, attends its query to the cache (no mask: a
   new token may see everything before it), and projects only it to logits; argmax picks the token. No logits
   processors, stopping-criteria objects or per-step 4D masks.
4. Rows that emit [SEP] leave the batch (their cache rows are dropped), so one runaway caption no longer makes every
   row pay for its length. HF keeps computing finished rows; the output is padded exactly as HF pads it, and it is
   as wide as HF's (the input plus the steps until the last row ends or ``max_length`` is reached).

Speed pieces (model/profiles.py), each off by default and each giving up exactness for speed:
- ``fused_attention``: PyTorch's ``scaled_dot_product_attention`` instead of HF's eager arithmetic in the decoder.
- ``compile_prefill``: the image encoder and the prefill run as one ``torch.compile``d function for requests
  without a prompt, at the batch sizes in ``compiled_sizes`` (the engine's warm-up compiles them at start; other
  sizes run eagerly rather than stall a worker for a compile); if compiling or a compiled call fails, the eager
  path takes over for good and ``on_fallback`` is told why.
- ``cuda_graphs``: the decode step at fixed shapes (rows padded to a power-of-two bucket, the cache sized for the
  whole caption, attention masked past the current position), captured once per shape as a CUDA graph and replayed.
  Without CUDA the same static step runs eagerly (tests compare its ids with HF's on a CPU).

Exactness (no piece on): embeddings, linear layers, layer norms and activations are the model's own modules, and
attention is HF's eager arithmetic op for op, so the numbers match HF's up to the float rounding of different matrix
shapes (fewer rows after a drop); the tests compare ids with ``model.generate`` token for token, in fp32, bf16 and fp16.
``unsupported_reason`` refuses models and generation configs whose output this module would not reproduce (video
GIT, logits processors or extra stopping criteria in the generation config, ...). Callers then use HF ``generate``,
as they do for beam search and sampling: this module always decodes greedily.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: Smallest and largest row buckets of the static (CUDA graph) decode step: rows are padded up to a power of two.
MIN_BUCKET, MAX_BUCKET = 1, 4096

#: Text slots the cache starts with (the default max_length of 50 fits); longer captions double it as they grow.
TEXT_SLOTS = 64

#: Generation-config fields that cannot change greedy ids here (ids and flags we honour, sampling-only knobs that
#: greedy decoding ignores, bookkeeping; do_sample and num_beams are the caller's routing). Any other field set
#: away from its default makes HF add a logits processor or stopping criterion, so the model goes to HF.
_HARMLESS_GENERATION_FIELDS = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        "max_length",
        "do_sample",
        "num_beams",
        "num_return_sequences",
        "use_cache",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "min_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "transformers_version",
        "_from_model_config",
        "_commit_hash",
    }
)
#: Of those, the ones whose value still matters: without the cache HF recomputes everything, in other shapes.
_REQUIRED_GENERATION_VALUES = {"use_cache": True}


@dataclass
class DecodeStats:
    """Counters of the last ``generate`` call (tests read them; logs may)."""

    rows: int = 0  # rows in the batch
    steps: int = 0  # tokens appended after the input ids (HF runs this many forward passes, each over all rows)
    row_steps: int = 0  # sum over those passes of the rows actually computed (HF: rows * steps)
    rows_dropped: int = 0  # finished rows removed from the batch (and its cache) before the last pass
    compactions: int = 0  # times the cache was copied to remove finished rows
    cache_grows: int = 0  # times the cache was copied into a longer one (captions past TEXT_SLOTS tokens)
    static_steps: int = 0  # decode steps run by the static step (CUDA graphs, or its eager twin)
    graph_replays: int = 0  # of those, steps replayed from a captured CUDA graph
    encode_s: float = 0.0  # image encoder + visual projection (filled only when timing is on)
    prefill_s: float = 0.0  # decoder pass over image tokens and the input ids
    decode_s: float = 0.0  # every decode step after the first token


def unsupported_reason(model: Any) -> str | None:
    """Why this module cannot reproduce ``model.generate`` for ``model``, or None when it can (greedy only)."""
    config = getattr(model, "config", None)
    if type(model).__name__ != "GitForCausalLM" or getattr(config, "model_type", None) != "git":
        return f"{type(model).__name__} is not a GitForCausalLM"
    if config.num_image_with_embedding is not None:
        return "video GIT (num_image_with_embedding) is not supported"
    if config._attn_implementation != "eager":
        return f"attention implementation {config._attn_implementation!r} is not GIT's eager one"
    if config.chunk_size_feed_forward:
        return "chunked feed-forward is not supported"
    if model.training:
        return "the model is in training mode (dropout on); call model.eval()"
    if model.generation_config.bos_token_id is None:
        return "generation_config has no bos_token_id"
    return _generation_config_reason(model.generation_config)


def _generation_config_reason(gen: Any) -> str | None:
    """Refuse generation configs that make HF add logits processors or stopping criteria we do not mirror."""
    changed = gen.to_diff_dict()
    unknown = sorted(set(changed) - _HARMLESS_GENERATION_FIELDS)
    if unknown:
        return f"generation_config sets {unknown[0]}={changed[unknown[0]]!r}, which only HF generate applies"
    for name, value in _REQUIRED_GENERATION_VALUES.items():
        if name in changed and changed[name] != value:
            return f"generation_config sets {name}={changed[name]!r}"
    return None


def _eos_ids(gen: Any) -> list[int]:
    eos = gen.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


#: Called with (piece, why) when a piece stops being used at run time (a compiled call that failed).
OnFallback = Callable[[str, str], None]


class GitGreedyDecoder:
    """Greedy decoding of one loaded ``GitForCausalLM``; ``generate`` returns what HF greedy ``generate`` returns
    when no speed piece is on."""

    def __init__(
        self,
        model: Any,
        *,
        fused_attention: bool = False,
        static_steps: bool = False,
        on_fallback: OnFallback | None = None,
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast GIT decoder cannot run this model: {reason}")
        self.model = model
        self.git = model.git
        self.layers = list(self.git.encoder.layer)
        first = self.layers[0].attention.self
        self.heads = first.num_attention_heads
        self.head_dim = first.attention_head_size
        self.sqrt_head_dim = math.sqrt(self.head_dim)
        self.image_tokens = first.image_patch_tokens
        self.max_positions = int(model.config.max_position_embeddings)
        gen = model.generation_config
        self.bos = int(gen.bos_token_id)
        self.eos = _eos_ids(gen)
        # HF pads finished rows with pad_token_id, or with the first EOS id when there is none.
        pad = gen.pad_token_id if gen.pad_token_id is not None else (self.eos[0] if self.eos else None)
        self.pad = int(pad) if pad is not None else 0
        self.stats = DecodeStats()
        self.fused_attention = fused_attention
        #: The compiled encoder + prefill (``compile_prefill``), None when it is off or fell back.
        self.compiled: Callable[..., Any] | None = None
        #: Batch sizes the compiled function runs at (compiled on their first run, which warm-up makes).
        self.compiled_sizes: set[int] = set()
        #: Fixed-shape decode steps (CUDA graphs on CUDA), None for the dynamic loop.
        self.static: _StaticSteps | None = _StaticSteps(self) if static_steps else None
        self.on_fallback = on_fallback or (lambda piece, why: None)
        #: Synchronise and time the three stages into ``stats`` (bench only: the syncs cost a little).
        self.timing = False

    def compile_prefill(self, **options: Any) -> None:
        """Compile the image encoder and the prefill as one function; eager stays the fallback.

        One graph per batch size, not a dynamic one: on CPU with frozen weights in bf16, inductor specialised every
        size anyway (measured), and a size met for the first time while serving would stall the worker for a compile.
        """
        self.compiled = torch.compile(self._encode_prefill, dynamic=False, **options)

    def request_reason(self, input_len: int, max_length: int) -> str | None:
        """Why a request must go to HF (mostly ones HF refuses with its own error), else None."""
        if self.model.training:
            return "the model is in training mode (dropout on)"
        if input_len >= max_length:
            return f"input length {input_len} >= max_length {max_length} (HF raises ValueError)"
        if max_length - 1 > self.max_positions:
            return f"max_length {max_length} exceeds the model's {self.max_positions} text positions"
        return None

    @torch.inference_mode()
    def generate(
        self, pixel_values: torch.Tensor, max_length: int, input_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids ``[rows, length]`` (input first, pad after [SEP]), as greedy ``model.generate`` returns them.

        ``input_ids``: ``[rows, n]`` starting with BOS, the same length in every row and unpadded (HF would need an
        attention mask otherwise); None means BOS alone. ``max_length`` counts text tokens, input included, as in HF.
        """
        rows = pixel_values.shape[0]
        device = self.model.device
        if input_ids is None:
            input_ids = torch.full((rows, 1), self.bos, dtype=torch.long, device=device)
        input_ids = input_ids.to(device)
        reason = self.request_reason(input_ids.shape[1], max_length)
        if reason is not None:
            raise ValueError(f"the fast GIT decoder cannot run this request: {reason}")
        self.stats = DecodeStats(rows=rows)
        # The static steps copy the prefix into caches of their own: then the prefill's needs no room to grow.
        text_slots = input_ids.shape[1] if self.static else min(max_length - 1, max(TEXT_SLOTS, input_ids.shape[1]))
        hidden, cache = self._start(pixel_values.to(device), input_ids, self.image_tokens + text_slots)
        clock = self._clock()
        if self.static is not None:
            out = self.static.decode(hidden, input_ids, cache, max_length)
        else:
            out = self._decode_loop(hidden, input_ids, cache, max_length)
        self.stats.decode_s = self._clock() - clock if self.timing else 0.0
        return out

    def _start(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, capacity: int) -> tuple[Any, list[Any]]:
        """Encoder and prefill: the last position's hidden state, and a cache of ``capacity`` slots with the prefix."""
        # Prompted requests run eagerly: compiled for [BOS] alone, a prompt's length would recompile (minutes on a
        # CPU) in the middle of serving.
        if self.compiled is not None and input_ids.shape[1] == 1 and pixel_values.shape[0] in self.compiled_sizes:
            clock = self._clock()
            try:
                hidden, prefix = self.compiled(pixel_values, input_ids)
            except Exception as exc:  # a backend that cannot compile this model or shape: eager from now on
                self.compiled = None
                self.on_fallback("compile", f"torch.compile failed: {_cause(exc)}")
            else:
                self.stats.prefill_s = self._clock() - clock if self.timing else 0.0  # encoder included
                if prefix[0].shape[2] == capacity:
                    return hidden, prefix
                cache = self._new_cache(pixel_values.shape[0], capacity, prefix[0].dtype, prefix[0].device)
                for full, part in zip(cache, prefix, strict=True):
                    full[:, :, : part.shape[2]] = part
                return hidden, cache
        clock = self._clock()
        image_embeds = self._encode_images(pixel_values)
        encoded = self._clock()
        cache = self._new_cache(pixel_values.shape[0], capacity, image_embeds.dtype, image_embeds.device)
        hidden = self._prefill(image_embeds, input_ids, cache)
        if self.timing:
            self.stats.encode_s, self.stats.prefill_s = encoded - clock, self._clock() - encoded
        return hidden, cache

    def _encode_prefill(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> tuple[Any, list[Any]]:
        """Encoder and prefill into a cache that holds just the prefix: the function ``compile_prefill`` compiles."""
        image_embeds = self._encode_images(pixel_values)
        capacity = image_embeds.shape[1] + input_ids.shape[1]
        cache = self._new_cache(pixel_values.shape[0], capacity, image_embeds.dtype, image_embeds.device)
        return self._prefill(image_embeds, input_ids, cache), cache

    def _clock(self) -> float:
        """Wall time after the device's queued work (only when timing; otherwise 0, at no cost)."""
        if not self.timing:
            return 0.0
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()

    # --- the three stages ---------------------------------------------------------------------

    def _encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens ``[rows, image_tokens, hidden]``: the model's own vision encoder and projection."""
        features = self.git.image_encoder(pixel_values).last_hidden_state
        return self.git.visual_projection(features)

    def _prefill(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        """Run the decoder over [image tokens | input ids], filling the cache; the last position's hidden state."""
        text_len = input_ids.shape[1]
        positions = torch.arange(text_len, device=input_ids.device).expand_as(input_ids)
        text = self.git.embeddings(input_ids=input_ids, position_ids=positions)
        hidden = torch.cat([image_embeds, text], dim=1)
        mask = _git_mask(image_embeds.shape[1], text_len, hidden.dtype, hidden.device)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            # The last layer's outputs feed only the first token's logits: of its positions, only the last one
            # needs a query and an MLP (HF runs them for all; for git-base this skips ~1/7 of the decoder prefill).
            outputs_from = hidden.shape[1] - 1 if index == last else 0
            hidden = self._layer(layer, hidden, cache[2 * index], cache[2 * index + 1], 0, mask, outputs_from)
        return hidden[:, -1:]

    def _decode_loop(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, cache: list[torch.Tensor], max_length: int
    ) -> torch.Tensor:
        """Pick tokens until every row has emitted [SEP] or max_length is reached, dropping finished rows in bulk."""
        rows, input_len = input_ids.shape
        device = input_ids.device
        out = torch.full((rows, max_length), self.pad, dtype=torch.long, device=device)
        out[:, :input_len] = input_ids
        alive = torch.arange(rows, device=device)  # the original row of each row in the batch
        running = torch.ones(rows, dtype=torch.bool, device=device)  # in the batch and not finished
        eos = torch.tensor(self.eos, dtype=torch.long, device=device)
        positions = torch.arange(max_length, device=device)
        length = input_len
        while True:
            # Argmax over fp32 logits, as HF does (the cast is exact, so ties resolve the same way too).
            tokens = self.model.output(hidden[:, -1]).float().argmax(dim=-1)
            # Finished rows not yet dropped get pad, as every finished row does in HF.
            out[alive, length] = torch.where(running, tokens, self.pad)
            length += 1
            self.stats.steps += 1
            self.stats.row_steps += alive.numel()
            if length >= max_length:
                break
            running &= ~torch.isin(tokens, eos)
            left = int(running.sum())  # the one host sync per step (HF makes the same one)
            if left == 0:
                break
            if _worth_dropping(alive.numel(), left):
                keep = running.nonzero().squeeze(1)
                self.stats.rows_dropped += alive.numel() - left
                self.stats.compactions += 1
                alive, tokens, running = alive[keep], tokens[keep], running[keep]
                cache = [kv[keep] for kv in cache]
            cache = self._with_room(cache, self.image_tokens + length, self.image_tokens + max_length - 1)
            hidden = self._step(tokens, length - 1, positions, cache)
        return out[:, :length]

    def _step(
        self, tokens: torch.Tensor, position: int, positions: torch.Tensor, cache: list[torch.Tensor]
    ) -> torch.Tensor:
        """One decoder pass for the newest token of each row, at text ``position``; its hidden state."""
        ids = tokens[:, None]
        # Slicing a device-side arange, not torch.tensor(position): no host-to-device copy per step.
        hidden = self.git.embeddings(input_ids=ids, position_ids=positions[position : position + 1].expand_as(ids))
        slot = self.image_tokens + position
        for index, layer in enumerate(self.layers):
            hidden = self._layer(layer, hidden, cache[2 * index], cache[2 * index + 1], slot, None)
        return hidden

    # --- one decoder layer --------------------------------------------------------------------

    def _layer(
        self,
        layer: Any,
        hidden: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        outputs_from: int = 0,
    ) -> torch.Tensor:
        """A ``GitLayer`` over ``hidden``, whose keys and values it writes into the cache at ``start``.

        Attention sees the cache up to and including ``hidden``. Only positions ``outputs_from:`` are carried on
        through the query, attention output and MLP, and returned: the others still give their keys and values.
        """
        attention = layer.attention.self
        end = start + hidden.shape[1]
        keys[:, :, start:end] = self._heads(attention.key(hidden))
        values[:, :, start:end] = self._heads(attention.value(hidden))
        if outputs_from:
            hidden = hidden[:, outputs_from:]
            mask = None if mask is None else mask[outputs_from:]
        query = self._heads(attention.query(hidden))
        context = self._attend(query, keys[:, :, :end], values[:, :, :end], mask)
        context = context.transpose(1, 2).reshape(hidden.shape)
        attended = layer.attention.output(context, hidden)
        return layer.output(layer.intermediate(attended), attended)

    def _attend(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """HF's eager attention arithmetic, op for op: scores / sqrt(d) + mask, softmax in the model dtype.

        Not ``scaled_dot_product_attention`` unless ``fused_attention`` asks for it: its fused softmax keeps fp32
        probabilities where HF rounds them to bf16/fp16, and with near-tied logits that flips greedy picks (measured:
        25 of 40 bf16 cases differed on a random tiny GIT, 0 of 40 with this).
        """
        if self.fused_attention:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
        if keys.device.type == "cpu" and keys.dtype != torch.float32:
            # oneDNN's half-precision batched matmul is ~4x slower on a strided K^T (a slice of the preallocated
            # cache) than on a dense one; copying the slice first is faster and gives the same values (measured).
            keys = keys.contiguous()
        scores = torch.matmul(query, keys.transpose(-1, -2)) / self.sqrt_head_dim
        if mask is not None:
            scores = scores + mask
        return torch.matmul(torch.softmax(scores, dim=-1), values)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, length, hidden]`` -> ``[rows, heads, length, head_dim]``."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _new_cache(
        self, rows: int, capacity: int, dtype: torch.dtype, device: torch.device, *, zeros: bool = False
    ) -> list[torch.Tensor]:
        """Every layer's keys and values, ``[K0, V0, K1, ...]``, each ``[rows, heads, capacity, head_dim]``."""
        shape = (rows, self.heads, capacity, self.head_dim)
        make = torch.zeros if zeros else torch.empty
        return [make(shape, dtype=dtype, device=device) for _ in range(2 * len(self.layers))]

    def _with_room(self, cache: list[torch.Tensor], needed: int, limit: int) -> list[torch.Tensor]:
        """``cache``, or a copy with twice its text slots (at most ``limit`` in all) when ``needed`` does not fit.

        Allocating for max_length up front would hold memory for 512 tokens when captions end after 15; doubling
        keeps the copies rare (log2 of the length) and never happens at the default max_length.
        """
        capacity = cache[0].shape[2]
        if needed <= capacity:
            return cache
        self.stats.cache_grows += 1
        longer = min(limit, self.image_tokens + 2 * (capacity - self.image_tokens))
        grown = self._new_cache(cache[0].shape[0], longer, cache[0].dtype, cache[0].device)
        for old, new in zip(cache, grown, strict=True):
            new[:, :, :capacity] = old
        return grown


def _cause(exc: BaseException) -> str:
    """The innermost error a compiler wrapper carries, on one line (inductor appends paragraphs of advice)."""
    while getattr(exc, "inner_exception", None) is not None:
        exc = exc.inner_exception  # type: ignore[attr-defined]
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}"


def bucket(rows: int) -> int:
    """The power of two at or above ``rows``: the row count the static decode step runs at."""
    return min(MAX_BUCKET, max(MIN_BUCKET, 1 << (max(rows, 1) - 1).bit_length()))


class _StaticShape:
    """One fixed shape of the decode step: its zero-filled cache, token and position buffers, and on CUDA its graph.

    The step reads the previous tokens from ``tokens`` and writes the next ones back into it, so a replay needs no
    copy in or out; only the position is filled before each replay.
    """

    def __init__(
        self, dec: GitGreedyDecoder, rows: int, capacity: int, dtype: torch.dtype, device: torch.device, pool: Any
    ) -> None:
        self.dec, self.rows, self.capacity = dec, rows, capacity
        self.cache = dec._new_cache(rows, capacity, dtype, device, zeros=True)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(capacity, device=device)
        self.allow = torch.zeros((), dtype=dtype, device=device)
        self.block = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.graph: Any = None
        if device.type == "cuda":
            self.graph = self._capture(pool)

    def _capture(self, pool: Any) -> Any:
        # CUDA's recipe: warm the step up on a side stream (allocator, cuBLAS handles), then capture it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._body()
        return graph

    def load(self, cache: list[torch.Tensor], used: int, rows: torch.Tensor | None, tokens: torch.Tensor) -> None:
        """Copy the first ``used`` slots of ``cache`` (its rows ``rows``, or all) and their last tokens in."""
        n = tokens.shape[0]
        for mine, theirs in zip(self.cache, cache, strict=True):
            mine.zero_()  # pad rows and slots past the prefix: zeros keep their attention finite
            mine[:n, :, :used] = theirs[:, :, :used] if rows is None else theirs[rows, :, :used]
        self.tokens.zero_()
        self.tokens[:n] = tokens

    def step(self, position: int) -> torch.Tensor:
        """Feed ``tokens`` at text ``position``; the next token of every row (the same tensor, updated)."""
        self.pos.fill_(position)
        if self.graph is not None:
            self.graph.replay()
            self.dec.stats.graph_replays += 1
        else:
            self._body()
        return self.tokens

    def _body(self) -> None:
        dec = self.dec
        ids = self.tokens[:, None]
        hidden = dec.git.embeddings(input_ids=ids, position_ids=self.pos.view(1, 1).expand(self.rows, 1))
        slot = self.pos + dec.image_tokens
        # Everything up to and including the new token's slot; later slots (zeros) get the dtype's minimum.
        mask = torch.where(self.slots > slot, self.block, self.allow).view(1, 1, 1, self.capacity)
        for index, layer in enumerate(dec.layers):
            keys, values = self.cache[2 * index], self.cache[2 * index + 1]
            attention = layer.attention.self
            keys.index_copy_(2, slot, dec._heads(attention.key(hidden)))
            values.index_copy_(2, slot, dec._heads(attention.value(hidden)))
            query = dec._heads(attention.query(hidden))
            context = dec._attend(query, keys, values, mask).transpose(1, 2).reshape(hidden.shape)
            attended = layer.attention.output(context, hidden)
            hidden = layer.output(layer.intermediate(attended), attended)
        self.tokens.copy_(dec.model.output(hidden[:, -1]).float().argmax(dim=-1))


class _StaticSteps:
    """The decode loop on fixed shapes (row bucket x cache capacity), each captured once as a CUDA graph on CUDA.

    Rows are padded to a power-of-two bucket and the cache holds the whole caption, so every step has the same
    shapes and a replay costs one launch instead of hundreds. When at most half a bucket is still running, the
    running rows move to the smaller bucket (as the dynamic loop drops finished rows).
    """

    def __init__(self, dec: GitGreedyDecoder) -> None:
        self.dec = dec
        self.shapes: dict[tuple[int, int, torch.dtype], _StaticShape] = {}
        self.pool: Any = None

    def shape(self, rows: int, capacity: int, dtype: torch.dtype, device: torch.device) -> _StaticShape:
        key = (rows, capacity, dtype)
        if key not in self.shapes:
            if device.type == "cuda" and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every graph
            self.shapes[key] = _StaticShape(self.dec, rows, capacity, dtype, device, self.pool)
        return self.shapes[key]

    def decode(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, cache: list[torch.Tensor], max_length: int
    ) -> torch.Tensor:
        """What ``_decode_loop`` returns, from fixed-shape steps."""
        dec, stats = self.dec, self.dec.stats
        rows, input_len = input_ids.shape
        device = input_ids.device
        out = torch.full((rows, max_length), dec.pad, dtype=torch.long, device=device)
        out[:, :input_len] = input_ids
        eos = torch.tensor(dec.eos, dtype=torch.long, device=device)
        tokens = dec.model.output(hidden[:, -1]).float().argmax(dim=-1)
        out[:, input_len] = tokens
        length = input_len + 1
        stats.steps, stats.row_steps = 1, rows
        running = ~torch.isin(tokens, eos)
        if length >= max_length or not bool(running.any()):
            return out[:, :length]
        capacity = dec.image_tokens + max_length - 1
        shape = self.shape(bucket(rows), capacity, cache[0].dtype, device)
        shape.load(cache, dec.image_tokens + input_len, None, tokens)
        alive = torch.arange(rows, device=device)
        while True:
            picked = shape.step(length - 1)[: alive.numel()]
            out[alive, length] = torch.where(running, picked, dec.pad)
            length += 1
            stats.steps += 1
            stats.static_steps += 1
            stats.row_steps += shape.rows
            if length >= max_length:
                break
            running &= ~torch.isin(picked, eos)
            left = int(running.sum())  # the one host sync per step, as in the dynamic loop
            if left == 0:
                break
            if bucket(left) < shape.rows:
                keep = running.nonzero().squeeze(1)
                smaller = self.shape(bucket(left), capacity, cache[0].dtype, device)
                smaller.load(shape.cache, dec.image_tokens + length - 1, keep, picked[keep].clone())
                stats.rows_dropped += alive.numel() - left
                stats.compactions += 1
                alive, running, shape = alive[keep], running[keep], smaller
        return out[:, :length]


def _worth_dropping(rows: int, running: int) -> bool:
    """Whether to compact the cache now: once a quarter of the batch has finished.

    Dropping a row saves its share of every later step but costs a copy of the kept rows' cache. On a CPU with
    git-base in bf16 a step costs ~13 ms + 1.2 ms per row and the copy ~0.9 ms per kept row (measured), so
    compacting for a single finished row of 32 would pay off only after ~23 more steps; at a quarter, after ~2.
    """
    return rows - running >= max(1, rows // 4)


def _git_mask(image_tokens: int, text_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``[query, key]`` mask of GIT's prefill: 0 where attention is allowed, the dtype's minimum elsewhere.

    Image tokens see every image token (bidirectional) and no text; text tokens see every image token and the text
    up to themselves. This is the mask HF builds from ``block_sequence_ids`` (images one block, text causal), with
    the same fill value, so masked scores round the same way.
    """
    total = image_tokens + text_len
    allowed = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    allowed[:image_tokens, :image_tokens] = True
    mask = torch.zeros(total, total, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
