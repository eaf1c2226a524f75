"""What one measured path reports: throughput, batch size, dtype, caption length and per-image stage timings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

#: The four caption paths, in the order they are run and reported.
PATHS = {
    "a": "engine in-process (CaptionEngine, best batch)",
    "b": "queue end to end (LocalRedis + worker + JobClient)",
    "c": "naive Celery (task per image, fp32, batch 1)",
    "d": "HF pipeline in-process (best batch and dtype)",
    "e": "engine in-process, fast profile (best batch)",
    "f": "queue end to end, fast profile",
}


@dataclass
class PathResult:
    """One path's measurement; ``captions`` follow the order of the benchmark's image list."""

    key: str
    images: int
    seconds: float
    batch_size: int
    dtype: str
    mean_tokens: float
    #: Milliseconds per image for each stage the path exposes (decode, preprocess, generate, write, ...).
    stages_ms: dict[str, float] = field(default_factory=dict)
    #: Images per second for every batch size tried (paths a and d pick the best).
    sweep: dict[int, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.key,
            "name": PATHS[self.key],
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 3),
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "mean_tokens": round(self.mean_tokens, 2),
            "stages_ms_per_image": {k: round(v, 2) for k, v in self.stages_ms.items()},
            "sweep_images_per_s": {str(b): round(v, 3) for b, v in self.sweep.items()},
            **self.extra,
            "captions_sample": self.captions[:3],
        }


def proc_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc; 0.0 where that cannot be read."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def generated_tokens(sequences: Any, pad_id: int) -> list[int]:
    """Tokens each row of a GIT ``generate`` output added after its start token (pads after [SEP] excluded)."""
    return [int(n) for n in (sequences[:, 1:] != pad_id).sum(dim=1)]


def best_of(rounds: list[PathResult]) -> PathResult:
    """The fastest round of a path; its sweep keeps each batch size's best, and every round's rate is kept.

    Best-of-rounds, with the paths interleaved round by round, is what keeps a busy machine's changing
    background load from deciding the ratios.
    """
    best = max(rounds, key=lambda r: r.images_per_s)
    sweep = {b: max(r.sweep.get(b, 0.0) for r in rounds) for b in best.sweep}
    extra = {**best.extra, "rounds_images_per_s": [round(r.images_per_s, 3) for r in rounds]}
    return replace(best, sweep=sweep, extra=extra)


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
