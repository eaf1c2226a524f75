"""Paths (a) and (d): the engine and the Hugging Face pipeline in this process, each at its best batch size."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.corpus import caption_tokens
from bench.result import PathResult, batches, generated_tokens
from common.messages import GenParams, Source
from common.settings import Settings
from media.images import ImagePolicy, load_image


def count_tokens(obj: Any, method: str, pad_id: int, sink: list[int]) -> None:
    """Wrap ``obj.<method>`` (which returns GIT token ids) so each call adds its rows' generated counts to ``sink``."""
    generate = getattr(obj, method)

    def counting(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        sink.extend(generated_tokens(out, pad_id))
        return out

    setattr(obj, method, counting)


def quiet_transformers() -> None:
    """No progress bars or deprecation chatter from transformers in the benchmark's output."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


class EnginePath:
    """(a) CaptionEngine over batches of the files, with decode, prepare and generate timed apart."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str,
        max_length: int,
        settings: Settings,
        key: str = "a",
        profile: str = "exact",
        pieces: str = "",
        sizes: tuple[int, ...] = (32,),
    ) -> None:
        from dataclasses import replace

        from model.engine import CaptionEngine, EngineConfig

        # The worker's own settings (device, decoder, ...) with this model, dtype and profile: (b) and (f) run the same.
        update = {"model": str(model_dir), "dtype": dtype, "profile": profile, "pieces": pieces}
        cfg = EngineConfig.from_settings(settings.model_copy(update=update))
        self.key = key
        self.engine = CaptionEngine.load(cfg)
        self.params = GenParams(max_length=max_length)
        # Compiled pieces are built here, as a worker builds them at start: never inside a timed run.
        self.warm_up_s = self.engine.warm_up(max(sizes), self.params, list(sizes))  # every size of the sweep
        draft = self.engine.input_edge if "draft" in self.engine.pieces else 0
        self.policy = replace(ImagePolicy.from_settings(settings), draft_edge=draft)
        self.tokens: list[int] = []
        # The engine's hook that returns ids, whichever decoder (its own fast one or HF generate) runs.
        count_tokens(self.engine, "_generate_ids", self.engine.processor.tokenizer.pad_token_id, self.tokens)

    def _decode(self, paths: list[Path]) -> list[Any]:
        return [load_image(Source(path=str(p)), self.policy) for p in paths]

    def measure(self, paths: list[Path], batch_sizes: list[int]) -> PathResult:
        """Every batch size over all ``paths`` after a small warm-up; the fastest is the result."""
        self.engine.caption(self._decode(paths[:2]), self.params)  # warm-up, not timed
        runs: dict[int, tuple[float, dict[str, float], list[str], float, list[int]]] = {}
        for size in batch_sizes:
            stages = {"decode": 0.0, "preprocess": 0.0, "generate": 0.0}
            captions: list[str] = []
            self.tokens.clear()
            cpu, started = time.process_time(), time.perf_counter()
            for chunk in batches(paths, size):
                t0 = time.perf_counter()
                images = self._decode(chunk)
                t1 = time.perf_counter()
                pixel_values = self.engine.prepare(images)  # caption() is exactly prepare() then generate()
                t2 = time.perf_counter()
                captions += self.engine.generate(pixel_values, self.params)
                t3 = time.perf_counter()
                stages["decode"] += t1 - t0
                stages["preprocess"] += t2 - t1
                stages["generate"] += t3 - t2
            runs[size] = (time.perf_counter() - started, stages, captions, time.process_time() - cpu, list(self.tokens))
        best = min(runs, key=lambda b: runs[b][0])
        seconds, stages, captions, cpu_s, tokens = runs[best]
        return PathResult(
            key=self.key,
            images=len(paths),
            seconds=seconds,
            batch_size=best,
            dtype=str(self.engine.dtype).removeprefix("torch."),
            mean_tokens=caption_tokens(self.engine.processor.tokenizer, captions),
            stages_ms={k: v * 1000 / len(paths) for k, v in stages.items()},
            sweep={b: len(paths) / runs[b][0] for b in batch_sizes},
            extra={
                "device": str(self.engine.device),
                "decoder": "hf" if getattr(self.engine, "_fast", None) is None else "fast (model/fastgen.py)",
                "profile": self.engine.profile,
                "fallbacks": dict(self.engine.pieces.fallbacks),
                "warm_up_s": round(self.warm_up_s, 1),
                "cpu_ms_per_image": round(cpu_s * 1000 / len(paths), 1),
                "generated_tokens": round(sum(tokens) / len(tokens), 2),
            },
            captions=captions,
        )


class PipelinePath:
    """(d) ``pipeline("image-text-to-text")`` on the file paths (it decodes them itself).

    transformers 5 turned "image-to-text" into an alias of "image-text-to-text", which insists on a text per
    image and passes ``token_type_ids`` that GIT's generate refuses. The closest working call gives each image
    the text "[CLS]" without special tokens and without token type ids: GIT's own start token, so the model
    sees exactly what an un-prompted ``generate`` sees.
    """

    def __init__(self, model_dir: Path, *, dtype: str, max_length: int, device: str) -> None:
        import torch
        from transformers import pipeline

        quiet_transformers()
        self.pipe = pipeline("image-text-to-text", model=str(model_dir), dtype=getattr(torch, dtype), device=device)
        self.kwargs: dict[str, Any] = {
            "return_full_text": False,
            "processor_kwargs": {"add_special_tokens": False, "return_token_type_ids": False},
            "generate_kwargs": {"max_length": max_length, "do_sample": False},
        }
        self.tokens: list[int] = []
        count_tokens(self.pipe.model, "generate", self.pipe.tokenizer.pad_token_id, self.tokens)

    def _call(self, refs: list[str], size: int) -> list[str]:
        # Given lists of images and texts, this pipeline runs them all as one generate call and ignores
        # batch_size (measured: 8 images at batch_size=1 reach the vision tower as one (8, 3, 224, 224) batch),
        # so the batches are cut here: one pipeline call per batch of ``size`` images.
        captions: list[str] = []
        for chunk in batches(refs, size):
            out = self.pipe(images=chunk, text=["[CLS]"] * len(chunk), **self.kwargs)
            captions += [(row[0] if isinstance(row, list) else row)["generated_text"].strip() for row in out]
        return captions

    def measure(self, paths: list[Path], batch_sizes: list[int]) -> PathResult:
        """Every batch size over all ``paths`` after a small warm-up; the fastest is the result."""
        refs = [str(p) for p in paths]
        self._call(refs[:2], 2)  # warm-up, not timed
        runs: dict[int, tuple[float, list[str], float, list[int]]] = {}
        for size in batch_sizes:
            self.tokens.clear()
            cpu, started = time.process_time(), time.perf_counter()
            captions = self._call(refs, size)
            runs[size] = (time.perf_counter() - started, captions, time.process_time() - cpu, list(self.tokens))
        best = min(runs, key=lambda b: runs[b][0])
        seconds, captions, cpu_s, tokens = runs[best]
        return PathResult(
            key="d",
            images=len(paths),
            seconds=seconds,
            batch_size=best,
            dtype=str(self.pipe.model.dtype).removeprefix("torch."),
            mean_tokens=caption_tokens(self.pipe.tokenizer, captions),
            sweep={b: len(paths) / runs[b][0] for b in batch_sizes},
            extra={
                "task": "image-text-to-text (what image-to-text now resolves to)",
                "cpu_ms_per_image": round(cpu_s * 1000 / len(paths), 1),
                "generated_tokens": round(sum(tokens) / len(tokens), 2),
            },
            captions=captions,
        )
