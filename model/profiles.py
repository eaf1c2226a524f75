"""Speed profiles: which approximate pieces run on top of the exact path, chosen once and reported everywhere.

``exact`` (the default) runs nothing approximate: captions equal transformers' greedy output in the same dtype.
``fast`` turns on, per device type, the pieces that measured faster there (bench/README.md has the figures and
what each costs in caption agreement and held-out WER). Every piece can be switched alone on top of either
profile (``CAPTIONER_PIECES=+sdpa,-int8``). A piece the device or model cannot use falls back to the exact way
for that piece, with a log line saying which and why; what runs is reported as one provenance string
(``exact`` or ``fast:sdpa,compile``) in every result row, ``captioner doctor`` and the worker's metrics.

No torch here: the settings check names with it at start-up, before anything heavy is imported.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from common.errors import ConfigError

log = logging.getLogger(__name__)

#: Every piece, in the order provenance strings list them, with what it does.
PIECES: dict[str, str] = {
    "sdpa": "PyTorch's fused attention (scaled_dot_product_attention) in the image encoder and the decoder",
    "compile": "torch.compile of the image encoder and the decoder prefill (on CPU with frozen, prepacked weights)",
    "int8": "dynamic int8 quantisation of the linear layers, activations in float32 (CPU only)",
    "cudagraphs": "the decode step replayed as CUDA graphs, one per batch bucket (CUDA only)",
    "draft": "JPEG draft decoding at the smallest DCT scale that still covers the model's input",
}
PROFILES = ("exact", "fast")
#: What ``fast`` turns on, by device type: the pieces that measured faster there at a small cost (bench/README.md).
#: Not compile on CPU: where bf16 matrix units set the pace it measured 0.94-1.09x of exact, for minutes of warm-up.
FAST_PIECES: dict[str, tuple[str, ...]] = {
    "cpu": ("sdpa", "draft"),
    "cuda": ("sdpa", "compile", "cudagraphs", "draft"),
}
EXACT = "exact"


def parse_adjustments(text: str) -> dict[str, bool]:
    """``"+sdpa,-int8,compile"`` -> ``{"sdpa": True, "int8": False, "compile": True}``; unknown names raise.

    A bare name or ``+name`` turns a piece on, ``-name`` turns it off; later entries win.
    """
    out: dict[str, bool] = {}
    for raw in text.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        on = not entry.startswith("-")
        name = entry.lstrip("+-")
        if name not in PIECES:
            raise ConfigError(f"unknown speed piece {name!r} in {text!r}: use {', '.join(PIECES)} (+name or -name)")
        out[name] = on
    return out


def check_profile(profile: str) -> str:
    """The profile name, lower-cased; an unknown one raises ``ConfigError`` naming the known ones."""
    name = profile.strip().lower()
    if name not in PROFILES:
        raise ConfigError(f"unknown speed profile {profile!r}: use {' or '.join(PROFILES)}")
    return name


def requested(profile: str, adjustments: str, device_type: str, *, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The pieces asked for on a device type: the profile's, then ``extra`` (older switches), then adjustments."""
    chosen = set(FAST_PIECES.get(device_type, ()) if check_profile(profile) == "fast" else ())
    chosen.update(extra)
    for name, on in parse_adjustments(adjustments).items():
        (chosen.add if on else chosen.discard)(name)
    return ordered(chosen)


def ordered(pieces: Iterable[str]) -> tuple[str, ...]:
    """``pieces`` in the canonical order of ``PIECES``."""
    given = set(pieces)
    return tuple(name for name in PIECES if name in given)


def provenance(pieces: Iterable[str]) -> str:
    """``exact`` when no approximate piece runs, else ``fast:<pieces in use>``: what every result row records."""
    names = ordered(pieces)
    return f"fast:{','.join(names)}" if names else EXACT


def pieces_of(provenance_text: str) -> tuple[str, ...]:
    """The pieces a provenance string names (``exact`` -> none)."""
    if provenance_text == EXACT:
        return ()
    return ordered(parse_adjustments(provenance_text.removeprefix("fast:")))


@dataclass
class Pieces:
    """The pieces a worker's engine uses now, and those that fell back to exact, each with why.

    A piece drops out at load (the device or model cannot use it) or at run time (a compiled call failed); it never
    comes back until the process restarts, so the provenance of later rows stays true.
    """

    in_use: tuple[str, ...] = ()
    fallbacks: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def asked(cls, names: Iterable[str]) -> Pieces:
        return cls(in_use=ordered(names))

    def __contains__(self, name: object) -> bool:
        return name in self.in_use

    def drop(self, name: str, why: str) -> None:
        """Stop using ``name`` (the exact way runs for it from now on), with one log line saying which and why."""
        with self._lock:
            if name not in self.in_use:
                return
            self.in_use = tuple(p for p in self.in_use if p != name)
            self.fallbacks[name] = why
        log.warning("speed piece %s is off: %s; the exact path runs for it", name, why)

    @property
    def provenance(self) -> str:
        return provenance(self.in_use)

    def as_dict(self) -> dict[str, object]:
        return {"profile": self.provenance, "pieces": list(self.in_use), "fallbacks": dict(self.fallbacks)}
