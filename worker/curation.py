"""Curation inside the caption worker (docs/curation.md): CLIPScore of every caption right after generation, best of
N sampled captions, and near-duplicates found before captioning so a group of copies is captioned once.

The scorer is loaded once per process, lazily, on the engine's device, and scores a whole engine batch at once.
The near-duplicate index lives in Redis (the ledger's, or the broker's beside a PostgreSQL ledger), so it is
shared by every worker and survives their restarts; a Lua script claims a group atomically.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from common.errors import ConfigError, InvalidInput, ItemError
from common.messages import Curation, GenParams, ItemResult, ItemStatus, sample_seed
from common.settings import Settings
from common.store import resolve_model

if TYPE_CHECKING:
    import redis
    from PIL import Image

    from model.curation import ClipScorer
    from model.engine import CaptionEngine, Generated
    from model.families import FamilyEngine

log = logging.getLogger(__name__)

#: The default thresholds: 12 bits of 64 for perceptual hashes (resized, re-encoded and lightly cropped copies of
#: scikit-image's photos land within 12, different photos beyond 16; tests/test_curation.py), cosine 0.95 for CLIP.
DEFAULT_PHASH_BITS = 12
DEFAULT_CLIP_COS = 0.95
#: Bits of the random-hyperplane hash (SimHash) of a CLIP embedding; its fixed seed makes every worker agree.
SIMHASH_BITS = 64
_SIMHASH_SEED = 20_260_101
#: Members of one band looked at per claim: bounds a claim's cost on a huge archive (a copy beyond it is missed).
MAX_BAND_SCAN = 4096


class Held(NamedTuple):
    """An item in the engine's queue when its job asks for CLIP: what the engine prepared (GIT's pixels, another
    family's images), the decoded image for CLIP, and its item id (best of N derives its seed from it)."""

    pixels: Any
    image: Image.Image
    item: str


class Scored(NamedTuple):
    """What curation adds to one image's caption."""

    generated: Generated
    clip_score: float
    candidates: list[float] | None = None
    sample_seed: int | None = None


class Scorers:
    """CLIP scorers of this process, one per checkpoint, each loaded once on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._made: dict[str, ClipScorer] = {}
        self._lock = threading.Lock()

    def get(self, curation: Curation, device: str) -> ClipScorer:
        ref = curation.scorer_ref(self.settings.clip_model)
        if not ref:
            raise InvalidInput("the job asks for CLIP, and names no checkpoint, and CAPTIONER_CLIP_MODEL is unset")
        return self.load(ref, device)

    def load(self, ref: str, device: str) -> ClipScorer:
        with self._lock:
            if ref not in self._made:
                from model.curation import ClipScorer

                try:
                    path = resolve_model(ref, self.settings.model_store)
                    self._made[ref] = ClipScorer.load(path, device=device)
                except ConfigError as exc:  # a job naming a wrong checkpoint: its rows say so, the worker lives on
                    raise InvalidInput(f"CLIP checkpoint: {exc}") from None
                log.info("CLIP scorer loaded from %s on %s", ref, device)
            return self._made[ref]


def generate_scored(
    engine: CaptionEngine | FamilyEngine, scorers: Scorers, held: list[Held], params: GenParams
) -> list[Scored]:
    """Captions of one engine batch with their CLIPScores: greedy (or beam) in one batch, or N samples per image
    (best of N, each image by itself with its own seed) keeping the highest-scoring. Same length out as in."""
    curation = params.curation
    assert curation is not None
    scorer = scorers.get(curation, str(engine.device))
    images = [h.image for h in held]
    if not curation.best_of:
        generated = engine.generate_detailed(engine.stack([h.pixels for h in held]), params)
        scores = scorer.scores(images, [[g.text] for g in generated])
        return [Scored(g, s[0]) for g, s in zip(generated, scores, strict=True)]
    seeds = [sample_seed(curation.seed, h.item) for h in held]
    samples = [
        engine.sample_detailed(
            h.pixels, params, curation.best_of, seed=seed, temperature=curation.temperature, top_p=curation.top_p
        )
        for h, seed in zip(held, seeds, strict=True)
    ]
    scores = scorer.scores(images, [[g.text for g in cands] for cands in samples])
    out = []
    for cands, cand_scores, seed in zip(samples, scores, seeds, strict=True):
        best = max(range(len(cands)), key=lambda i: cand_scores[i])  # the first of equal scores
        out.append(Scored(cands[best], cand_scores[best], [round(s, 4) for s in cand_scores], seed))
    return out


def wants_images(params: GenParams) -> bool:
    return params.curation is not None and params.curation.needs_images()


# --- near-duplicates --------------------------------------------------------------------------------------------

# KEYS[1]: member -> "hi:lo" hash of every representative; KEYS[2..]: one set per band value. ARGV: member, the
# hash's high and low 32 bits, the distance, the TTL, the scan cap. Returns the representative: an earlier one
# within the distance, else the member itself, now claimed (its hash and bands written in the same script, so two
# workers never both become representatives of one group).
_CLAIM = """#!lua
local function popcount(x)
  local c = 0
  while x ~= 0 do x = bit.band(x, x - 1); c = c + 1 end
  return c
end
local member, hi, lo = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local dist, ttl, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('HEXISTS', KEYS[1], member) == 1 then return member end
for i = 2, #KEYS do
  local seen = 0
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    seen = seen + 1
    if seen > cap then break end
    local h = redis.call('HGET', KEYS[1], m)
    if h then
      local sep = string.find(h, ':', 1, true)
      local mh, ml = tonumber(string.sub(h, 1, sep - 1)), tonumber(string.sub(h, sep + 1))
      if popcount(bit.bxor(mh, hi)) + popcount(bit.bxor(ml, lo)) <= dist then return m end
    end
  end
end
redis.call('HSET', KEYS[1], member, ARGV[2] .. ':' .. ARGV[3])
redis.call('EXPIRE', KEYS[1], ttl)
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], member)
  redis.call('EXPIRE', KEYS[i], ttl)
end
return member
"""


def parse_near_duplicates(spec: str) -> tuple[str, float]:
    """``phash[:BITS]`` -> ("phash", bits); ``clip[:COS]`` -> ("clip", cosine)."""
    kind, _, value = spec.partition(":")
    if kind == "phash":
        return kind, float(int(value) if value else DEFAULT_PHASH_BITS)
    return kind, float(value) if value else DEFAULT_CLIP_COS


def clip_bits(cosine: float) -> int:
    """The Hamming distance of two SimHashes whose embeddings are ``cosine`` apart: each bit differs with
    probability angle / pi (Charikar 2002), so the expected distance is 64 * arccos(cos) / pi."""
    return min(SIMHASH_BITS - 1, round(SIMHASH_BITS * math.acos(max(-1.0, min(1.0, cosine))) / math.pi))


def simhash(embeddings: Any) -> list[int]:
    """64-bit random-hyperplane hashes of L2-normalised embeddings (one row each); the planes are fixed."""
    import torch

    gen = torch.Generator().manual_seed(_SIMHASH_SEED)
    planes = torch.randn(embeddings.shape[-1], SIMHASH_BITS, generator=gen)
    out = []
    for row in (embeddings.float() @ planes > 0).tolist():
        value = 0
        for bit in row:
            value = (value << 1) | int(bit)
        out.append(value)
    return out


class Duplicate(NamedTuple):
    """An item not captioned: a near-duplicate of ``rep_id`` in job ``rep_job``."""

    item: str
    src: Any
    rep_job: str
    rep_id: str


class NearDuplicates:
    """Groups a chunk's images by perceptual hash or CLIP embedding against an index in Redis: per job, or with
    caption reuse on (CAPTIONER_REUSE_CAPTIONS) one index across jobs. Keys expire CAPTIONER_REUSE_TTL_S after
    their last claim, so the index is bounded by the images seen in that time (about 64 bytes of hash and a set
    member per band each)."""

    def __init__(self, client: redis.Redis, prefix: str, settings: Settings, scorers: Scorers) -> None:
        self.r, self.prefix, self.settings, self.scorers = client, prefix, settings, scorers
        self._claim = self.r.register_script(_CLAIM)

    def _keys(self, job_id: str, kind: str, threshold: float, hashed: int, bits: int) -> list[str]:
        from model.curation import bands

        scope = "reuse" if self.settings.reuse_captions else f"job:{job_id}"
        base = f"{self.prefix}:{scope}:nd:{kind}:{threshold:g}"
        return [f"{base}:h"] + [f"{base}:b{i}:{v}" for i, v in enumerate(bands(hashed, bits))]

    def hashes(self, images: list[Image.Image], kind: str, curation: Curation, device: str) -> list[int]:
        if kind == "phash":
            from model.curation import phash

            return [phash(image) for image in images]
        scorer = self.scorers.get(curation, device)
        return simhash(scorer.image_embeddings(images))

    def split(
        self,
        job_id: str,
        items: list[tuple[str, Any]],
        params: GenParams,
        decode: Callable[[Any], Image.Image],
        device: str,
    ) -> tuple[list[tuple[str, Any]], list[Duplicate]]:
        """(items to caption, near-duplicates of a representative). An item whose image cannot be read is left to
        caption: the service gives it its error row as usual."""
        assert params.curation is not None and params.curation.near_duplicates
        kind, threshold = parse_near_duplicates(params.curation.near_duplicates)
        bits = int(threshold) if kind == "phash" else clip_bits(threshold)
        decoded: list[tuple[tuple[str, Any], Image.Image]] = []
        todo: list[tuple[str, Any]] = []
        for it in items:
            try:
                decoded.append((it, decode(it[1])))
            except ItemError:
                todo.append(it)
        hashes = self.hashes([image for _, image in decoded], kind, params.curation, device)
        dups: list[Duplicate] = []
        ttl = max(self.settings.reuse_ttl_s, self.settings.ledger_ttl_s)
        for (it, _), hashed in zip(decoded, hashes, strict=True):
            member = f"{job_id}/{it[0]}"
            hi, lo = hashed >> 32, hashed & 0xFFFFFFFF
            keys = self._keys(job_id, kind, threshold, hashed, bits)
            rep = self._claim(keys=keys, args=[member, hi, lo, bits, ttl, MAX_BAND_SCAN])
            rep = rep.decode() if isinstance(rep, bytes) else str(rep)
            if rep == member:
                todo.append(it)
            else:
                rep_job, _, rep_id = rep.partition("/")
                dups.append(Duplicate(it[0], it[1], rep_job, rep_id))
        return todo, dups


def duplicate_rows(
    job_id: str,
    dups: list[Duplicate],
    captioned: list[ItemResult],
    lookup: Callable[[str, str], dict[str, Any] | None],
    base_of: Callable[[str, Any], dict[str, Any]],
) -> list[ItemResult]:
    """Rows of near-duplicates: ``duplicate_of`` their representative, with its caption (and score) copied when it
    is known (captioned in this chunk, or recorded before), else an empty caption the export resolves."""
    import time

    here = {r.id: r for r in captioned if r.status is ItemStatus.OK}
    rows = []
    for dup in dups:
        rep: dict[str, Any] | None = None
        if dup.rep_job == job_id and dup.rep_id in here:
            rep = here[dup.rep_id].model_dump()
        else:
            try:
                rep = lookup(dup.rep_job, dup.rep_id)
            except Exception:  # another job expired or deleted: the export resolves what it can
                rep = None
        ok = rep is not None and str(rep.get("status")) == ItemStatus.OK.value and not rep.get("duplicate_of")
        rows.append(
            ItemResult(
                **base_of(dup.item, dup.src),
                status=ItemStatus.OK,
                caption=str(rep.get("caption") or "") if ok and rep else "",
                clip_score=rep.get("clip_score") if ok and rep else None,
                model_version=rep.get("model_version") if ok and rep else None,
                duplicate_of=dup.rep_id,
                duplicate_job=dup.rep_job if dup.rep_job != job_id else None,
                finished_at=time.time(),
            )
        )
    return rows


def row_fields(scored: Scored | None) -> dict[str, Any]:
    """The row fields of a scored caption (none for a plain one)."""
    if scored is None:
        return {}
    return {
        "clip_score": round(scored.clip_score, 4),
        "candidates": scored.candidates,
        "sample_seed": scored.sample_seed,
    }


def index_client(ledger: Any, settings: Settings) -> tuple[redis.Redis, str]:
    """Where the near-duplicate index lives: the Redis ledger's own server, or beside a PostgreSQL ledger the Redis
    the broker uses (the queues' server: every worker reaches it, and it outlives any worker)."""
    from common.connections import settings_client

    client = getattr(ledger, "r", None)
    if client is None:
        client = settings_client(settings, settings.broker_url_str)
    return client, str(getattr(ledger, "prefix", settings.key_prefix))
