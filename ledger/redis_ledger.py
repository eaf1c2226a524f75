"""The ledger in Redis (the default): compact rows, one Lua script per write, every write idempotent by item id.

Keys, all under ``<prefix>:job:<id>`` (item ids are stored as 8 bytes, see ``codec.id_bytes``):

  (the job)    HASH   kind, name, params, state, created, finished, open, base, n_total, n_ok, n_error,
                      n_cancelled, flag_<name> (captions per quality flag), extra and JSON fields (progress, result)
  :src         HASH   item -> reference: the manifest of items without a row (pending or in flight)
  :res         HASH   item -> row (``codec``): a settled item, its reference moved here from :src
  :pv          HASH   provenance (model version, params, profile) -> its index in rows
  :att         HASH   item -> attempts started; <item>:f finished; <item>:s run alone (while unsettled)
  :err / :flg  SET    items whose row is an error / a caption with quality flags (retry and review find them)
  :rev         HASH   item -> review (correction, mark, reviewer, time, rejection reason, version)
  :rlog        HASH   <item>:<version> -> that review change (JSON): the item's review history
  :ctr         HASH   container -> spec: shards and row groups whose items are not all known yet
  :lock        STRING the training runner holding the job

and ``<prefix>:jobs`` (ZSET of job ids by creation) and ``<prefix>:reuse:<key>`` (HASH image digest -> caption).
An item lives in exactly one of :src and :res, so its reference is stored once. A caption, once written, is
never replaced; counters move only when an item's status changes; rows for items in neither hash are refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

import msgpack
import redis

from common.connections import settings_client
from common.errors import BrokerUnavailable, UnknownJob
from common.messages import GenParams, ItemResult, ItemStatus, JobKind, JobState
from common.settings import Settings
from ledger import base, codec
from ledger.base import (
    Attempt,
    ItemFilter,
    JobInfo,
    Ledger,
    Page,
    Recorded,
    bad_cursor,
    check_job_id,
    check_page_limit,
)

# A shebang makes Redis (7+) refuse the whole script at maxmemory. Without one, Redis checks memory only at a
# script's first write, and a script that starts by deleting (HDEL) could then grow past maxmemory unchecked.
_OOM_CHECKED = "#!lua\n"

# Marks a job done once every manifest item has a row and no container is open, unless the producer is still
# adding items ('open'). KEYS[1] is the job hash, KEYS[7] the containers hash; ARGV[1] is now.
_FINISH = """
local finished = 0
local h = redis.call('HMGET', KEYS[1], 'n_total', 'n_ok', 'n_error', 'n_cancelled', 'state', 'open')
local total = tonumber(h[1] or '0') or 0
local settled = (tonumber(h[2] or '0') or 0) + (tonumber(h[3] or '0') or 0) + (tonumber(h[4] or '0') or 0)
if total > 0 and settled >= total and h[5] == 'running' and not h[6] and redis.call('HLEN', KEYS[7]) == 0 then
  redis.call('HSET', KEYS[1], 'state', 'done', 'finished', ARGV[1])
  finished = 1
end
"""

# A stored row's first byte holds its status (bits 0-1: 1 ok, 2 error, 3 cancelled) and quality flags (bits 2-4).
_STATUS_FIELD = """local names = {o = 'n_ok', e = 'n_error', c = 'n_cancelled'}
local codes = {[1] = 'o', [2] = 'e', [3] = 'c'}
local function status_of(row) return codes[string.byte(row, 1) % 4] end
local function quality_of(row) return math.floor(string.byte(row, 1) / 4) % 8 end
"""
_FLAG_NAMES = (
    "local flagnames = {"
    + ", ".join(f"'{f}'" for f in codec.FLAG_BITS)
    + """}
local function countflags(job, bits, delta)
  for b = 1, #flagnames do
    if bit.band(bits, bit.lshift(1, b - 1)) ~= 0 then redis.call('HINCRBY', job, 'flag_' .. flagnames[b], delta) end
  end
end
"""
)

# KEYS: job, src, res, att, err, flg, ctr.  ARGV: now, then (id, status byte, flag byte, row) quads.
# Returns {rows whose status changed, 1 if the job finished, rows refused (item not in the job)}.
_RECORD = (
    _STATUS_FIELD
    + _FLAG_NAMES
    + """
local changed, refused = 0, 0
for i = 2, #ARGV, 4 do
  local id, st, bits, body = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local prev = redis.call('HGET', KEYS[3], id)
  if not prev and redis.call('HEXISTS', KEYS[2], id) == 0 then
    refused = refused + 1
  else
    redis.call('HDEL', KEYS[4], id, id .. ':f', id .. ':s')
    local prevst = prev and status_of(prev)
    if prevst ~= 'o' then  -- a caption is final: exactly one row per item, whatever is redelivered
      redis.call('HSET', KEYS[3], id, body)
      redis.call('HDEL', KEYS[2], id)
      if prevst ~= st then
        if prevst then redis.call('HINCRBY', KEYS[1], names[prevst], -1) end
        redis.call('HINCRBY', KEYS[1], names[st], 1)
        changed = changed + 1
      end
      if prevst == 'e' and st ~= 'e' then redis.call('SREM', KEYS[5], id) end
      if st == 'e' then redis.call('SADD', KEYS[5], id) end
      if st == 'o' and bit.band(bits, 7) ~= 0 then
        redis.call('SADD', KEYS[6], id)
        countflags(KEYS[1], bits, 1)
      end
    end
  end
end
"""
    + _FINISH
    + "return {changed, finished, refused}\n"
)

# The reference a stored row holds: after the header, three varints (provenance, attempts, finished) and its length.
_REF_OF = """
local function varint(s, pos)
  local n, mul = 0, 1
  while true do
    local b = string.byte(s, pos)
    pos = pos + 1
    n = n + (b % 128) * mul
    if b < 128 then return n, pos end
    mul = mul * 128
  end
end
local function ref_of(row)
  local pos = 2
  for _ = 1, 3 do
    local _, next_pos = varint(row, pos)
    pos = next_pos
  end
  local len, start = varint(row, pos)
  return string.sub(row, start, start + len - 1)
end
"""

# KEYS: job, src, res, att, err, flg.  ARGV: mode ('failed', 'flagged' or 'all'), then item ids going back on the
# queue. Their failed or cancelled rows (in mode 'flagged' also captions with quality flags, in mode 'all' every
# caption) are removed, counters follow, and the reference moves back to the manifest: the item is pending again.
_REQUEUE = (
    _STATUS_FIELD
    + _FLAG_NAMES
    + _REF_OF
    + """
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local prev = redis.call('HGET', KEYS[3], id)
  if prev then
    local st, bits = status_of(prev), quality_of(prev)
    local flagged = bits ~= 0
    if st ~= 'o' or ARGV[1] == 'all' or (ARGV[1] == 'flagged' and flagged) then
      redis.call('HSET', KEYS[2], id, ref_of(prev))
      redis.call('HDEL', KEYS[3], id)
      redis.call('HINCRBY', KEYS[1], names[st], -1)
      redis.call('SREM', KEYS[5], id)
      if st == 'o' then
        redis.call('SREM', KEYS[6], id)
        countflags(KEYS[1], bits, -1)
      end
      n = n + 1
    end
  end
  redis.call('HDEL', KEYS[4], id, id .. ':f', id .. ':s')
end
return n
"""
)

# KEYS: src, job, res.  ARGV: (id, ref) pairs.  New manifest entries and the job's total move together.
_ADD_ITEMS = """
local new = 0
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0 then
    new = new + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if new > 0 then redis.call('HINCRBY', KEYS[2], 'n_total', new) end
return new
"""

# KEYS: attempts hash.  ARGV: item ids starting an attempt.  Returns, per id: attempts started (this one
# included), attempts finished, attempts run alone.
_BEGIN = """
local out = {}
for i = 1, #ARGV do
  local id = ARGV[i]
  out[#out + 1] = redis.call('HINCRBY', KEYS[1], id, 1)
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[1], id .. ':f') or '0')
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[1], id .. ':s') or '0')
end
return out
"""

# KEYS: job, src, res, att, err, flg, ctr (the record script's).  ARGV: now.
_SEAL = "redis.call('HDEL', KEYS[1], 'open')\n" + _FINISH + "return finished\n"
# KEYS: the same.  ARGV: now, container id.
_CLOSE_CONTAINER = "redis.call('HDEL', KEYS[7], ARGV[2])\n" + _FINISH + "return finished\n"

# KEYS: provenance hash.  ARGV: provenance key.  Its index, given the next free one if new.
_PROVENANCE = """
local idx = redis.call('HGET', KEYS[1], ARGV[1])
if idx then return tonumber(idx) end
idx = redis.call('HLEN', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], idx)
return idx
"""

# KEYS: lock key.  ARGV: owner, ttl seconds.  Take a free lock or refresh our own; 0 when another owner has it.
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""
# KEYS: lock key.  ARGV: owner.  Delete the lock only if we still hold it.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: Free-form job fields (set_fields) shown with the job: a training job's progress and result, webhook errors.
_JSON_FIELDS = ("progress", "result", "webhook_error")
_SUFFIXES = ("src", "res", "pv", "att", "err", "flg", "rev", "ctr", "rlog")
_STATUS_CHAR = {ItemStatus.OK: "o", ItemStatus.ERROR: "e", ItemStatus.CANCELLED: "c"}


def _text(value: object) -> str:
    """A Redis reply (bytes from a client without decode_responses) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLedger(Ledger):
    """The ledger in one Redis database, under a key prefix."""

    def __init__(self, client: redis.Redis, prefix: str = "captioner") -> None:
        self.r = client
        self.prefix = prefix
        self._record = client.register_script(_OOM_CHECKED + _RECORD)
        self._seal = client.register_script(_OOM_CHECKED + _SEAL)
        self._close = client.register_script(_OOM_CHECKED + _CLOSE_CONTAINER)
        self._requeue = client.register_script(_OOM_CHECKED + _REQUEUE)
        self._add_items = client.register_script(_OOM_CHECKED + _ADD_ITEMS)
        self._begin = client.register_script(_OOM_CHECKED + _BEGIN)
        self._provenance = client.register_script(_OOM_CHECKED + _PROVENANCE)
        # A lock's few bytes must stay refreshable at maxmemory: losing it would stop a fine-tune mid-run.
        self._lock = client.register_script("#!lua flags=allow-oom\n" + _LOCK)
        self._unlock = client.register_script("#!lua flags=allow-oom\n" + _UNLOCK)
        # Per job, never changing once set: (reference base, creation time), and provenance indexes assigned.
        self._consts: dict[str, tuple[str, float]] = {}
        self._pv_index: dict[tuple[str, str], int] = {}

    # --- keys -----------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def job_key(self, job_id: str, suffix: str | None = None) -> str:
        check_job_id(job_id)
        return self._k("job", job_id) if suffix is None else self._k("job", job_id, suffix)

    def _keys(self, job_id: str) -> list[str]:
        """The record/seal scripts' KEYS: job, src, res, att, err, flg, ctr."""
        return [self.job_key(job_id), *(self.job_key(job_id, s) for s in ("src", "res", "att", "err", "flg", "ctr"))]

    # --- connection -----------------------------------------------------------------------------
    def ping(self) -> None:
        try:
            self.r.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot reach the ledger Redis: {exc}") from None

    def close(self) -> None:
        self.r.close()

    def bytes_used(self) -> int:
        return int(self.r.info("memory")["used_memory"])

    # --- jobs -----------------------------------------------------------------------------------
    def open_job(
        self,
        job_id: str,
        name: str,
        params: GenParams | None,
        extra: dict[str, Any] | None = None,
        *,
        kind: JobKind = JobKind.CAPTION,
        base: str = "",
    ) -> bool:
        key = self.job_key(job_id)
        now = time.time()
        created = self.r.hsetnx(key, "created", repr(now))
        # 'open' holds the job back from 'done' while the producer is still adding items (see seal()).
        fields = {"name": name, "kind": kind.value, "state": JobState.RUNNING.value, "open": "1"}
        if params is not None:
            fields["params"] = params.model_dump_json()
        if extra:
            fields["extra"] = json.dumps(extra)
        pipe = self.r.pipeline()
        pipe.hset(key, mapping=cast("dict[Any, Any]", fields))
        pipe.hsetnx(key, "base", base)  # references already stored relative to a base keep it
        pipe.hdel(key, "finished", "done_task_sent")
        pipe.zadd(self._k("jobs"), {job_id: now}, nx=True)
        pipe.execute()
        return bool(created)

    def seal(self, job_id: str) -> bool:
        return bool(self._seal(keys=self._keys(job_id), args=[repr(time.time())]))

    def job(self, job_id: str) -> JobInfo:
        raw = cast("dict[bytes, bytes]", self.r.hgetall(self.job_key(job_id)))
        if not raw or b"created" not in raw:
            raise UnknownJob(f"no job {job_id!r} in the ledger (captioner jobs lists them)")
        info = self._info(job_id, raw)
        info.containers = int(self.r.hlen(self.job_key(job_id, "ctr")))
        return info

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self.job_key(job_id)))

    def jobs(self, limit: int = 50) -> list[JobInfo]:
        ids = [_text(i) for i in self.r.zrevrange(self._k("jobs"), 0, limit - 1)]
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.hgetall(self.job_key(job_id))
        return [self._info(job_id, raw) for job_id, raw in zip(ids, pipe.execute(), strict=True) if raw]

    @staticmethod
    def _info(job_id: str, raw: dict[bytes, bytes]) -> JobInfo:
        def num(name: str) -> int:
            return int(raw.get(name.encode(), b"0"))

        finished = raw.get(b"finished")
        flags = {k.decode()[5:]: int(v) for k, v in raw.items() if k.startswith(b"flag_") and int(v)}
        return JobInfo(
            id=job_id,
            flags=flags,
            name=raw.get(b"name", b"").decode(),
            state=JobState(raw.get(b"state", b"running").decode()),
            kind=JobKind(raw.get(b"kind", b"caption").decode()),
            params=GenParams.model_validate_json(raw[b"params"]) if b"params" in raw else None,
            created=float(raw.get(b"created", b"0")),
            finished=float(finished) if finished else None,
            total=num("n_total"),
            ok=num("n_ok"),
            error=num("n_error"),
            cancelled=num("n_cancelled"),
            extra={
                **(json.loads(raw[b"extra"]) if b"extra" in raw else {}),
                **{k: json.loads(raw[k.encode()]) for k in _JSON_FIELDS if k.encode() in raw},
            },
        )

    def is_open(self, job_id: str) -> bool:
        return bool(self.r.hexists(self.job_key(job_id), "open"))

    def state(self, job_id: str) -> JobState | None:
        raw = self.r.hget(self.job_key(job_id), "state")
        return JobState(_text(raw)) if raw else None

    def set_state(self, job_id: str, state: JobState) -> None:
        fields = {"state": state.value}
        if state is JobState.DONE:
            fields["finished"] = repr(time.time())
        self.r.hset(self.job_key(job_id), mapping=cast("dict[Any, Any]", fields))

    def set_fields(self, job_id: str, **fields: Any) -> None:
        mapping = {k: json.dumps(v, default=str) for k, v in fields.items()}
        self.r.hset(self.job_key(job_id), mapping=cast("dict[Any, Any]", mapping))

    def get_field(self, job_id: str, name: str) -> Any:
        raw = self.r.hget(self.job_key(job_id), name)
        return json.loads(cast(bytes, raw)) if raw else None

    def expire_job(self, job_id: str, ttl_s: int) -> None:
        pipe = self.r.pipeline()
        for key in (self.job_key(job_id), *(self.job_key(job_id, s) for s in _SUFFIXES)):
            pipe.expire(key, ttl_s)
        pipe.execute()

    def ttl(self, job_id: str) -> float | None:
        left = int(self.r.ttl(self.job_key(job_id)))
        return None if left < 0 else float(left)

    # --- locks ----------------------------------------------------------------------------------
    def try_lock(self, job_id: str, owner: str, ttl_s: int) -> bool:
        return bool(self._lock(keys=[self.job_key(job_id, "lock")], args=[owner, int(ttl_s)]))

    def unlock(self, job_id: str, owner: str) -> None:
        self._unlock(keys=[self.job_key(job_id, "lock")], args=[owner])

    def locked(self, job_id: str) -> bool:
        return bool(self.r.exists(self.job_key(job_id, "lock")))

    # --- items ----------------------------------------------------------------------------------
    def _job_consts(self, job_id: str) -> tuple[str, float]:
        """The job's reference base and creation time (fixed once the job exists; remembered from then on)."""
        if job_id not in self._consts:
            base, created = self.r.hmget(self.job_key(job_id), ["base", "created"])
            if created is None:
                return "", time.time()  # not created yet: remember nothing the job may still get
            self._consts[job_id] = (_text(base) if base else "", float(created))
        return self._consts[job_id]

    def _base(self, job_id: str) -> str:
        return self._job_consts(job_id)[0]

    def add_items(self, job_id: str, items: Iterable[tuple[str, str]]) -> int:
        base = self._base(job_id)
        args: list[bytes | str] = []
        for iid, ref in dict(items).items():
            args += [codec.id_bytes(iid), codec.pack_ref(ref, base)]
        if not args:
            return 0
        keys = [self.job_key(job_id, "src"), self.job_key(job_id), self.job_key(job_id, "res")]
        return int(self._add_items(keys=keys, args=args))

    def statuses(self, job_id: str, ids: list[str]) -> dict[str, ItemStatus | None]:
        if not ids:
            return {}
        raw = [codec.id_bytes(i) for i in ids]
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(self.job_key(job_id, "res"), raw)
        pipe.hmget(self.job_key(job_id, "src"), raw)
        rows, refs = pipe.execute()
        out: dict[str, ItemStatus | None] = {}
        for iid, row, ref in zip(ids, rows, refs, strict=True):
            out[iid] = codec.status_of(row) if row else ItemStatus.PENDING if ref is not None else None
        return out

    def begin_attempt(self, job_id: str, ids: list[str]) -> dict[str, Attempt]:
        if not ids:
            return {}
        raw = [codec.id_bytes(i) for i in ids]
        flat = [int(n) for n in self._begin(keys=[self.job_key(job_id, "att")], args=raw)]
        return {i: Attempt(*flat[3 * k : 3 * k + 3]) for k, i in enumerate(ids)}

    def end_attempts(self, job_id: str, ids: list[str]) -> None:
        if ids:
            key = self.job_key(job_id, "att")
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hincrby(key, codec.id_bytes(i) + b":f", 1)
            pipe.execute()

    def begin_alone(self, job_id: str, item: str) -> None:
        self.r.hincrby(self.job_key(job_id, "att"), codec.id_bytes(item) + b":s", 1)

    def attempts_open(self, job_id: str) -> int:
        counts = cast("dict[bytes, bytes]", self.r.hgetall(self.job_key(job_id, "att")))
        started = {k: int(v) for k, v in counts.items() if not k.endswith((b":f", b":s"))}
        return sum(1 for k, n in started.items() if n > int(counts.get(k + b":f", b"0")))

    def _provenance_index(self, job_id: str, prov: codec.Provenance) -> int:
        key = prov.key()
        cached = self._pv_index.get((job_id, key))
        if cached is None:
            cached = int(self._provenance(keys=[self.job_key(job_id, "pv")], args=[key]))
            self._pv_index[(job_id, key)] = cached
        return cached

    def record(self, job_id: str, rows: list[ItemResult]) -> Recorded:
        if not rows:
            return Recorded(0, False)
        base, created = self._job_consts(job_id)
        argv: list[bytes | str | int] = [repr(time.time())]
        for row in rows:
            pv = self._provenance_index(job_id, codec.Provenance(row.model_version, row.params, row.profile))
            body = codec.encode(row, base=base, created=created, provenance=pv)
            quality = codec.quality_bits(row.flags) if row.status is ItemStatus.OK else 0
            argv += [codec.id_bytes(row.id), _STATUS_CHAR[row.status], quality, body]
        changed, finished, refused = self._record(keys=self._keys(job_id), args=argv)
        return Recorded(int(changed), bool(finished), int(refused))

    def requeue(self, job_id: str, ids: list[str], *, flagged: bool = False, captioned: bool = False) -> int:
        if not ids:
            return 0
        keys = self._keys(job_id)[:6]
        mode = "all" if captioned else "flagged" if flagged else "failed"
        args: list[str | bytes] = [mode, *(codec.id_bytes(i) for i in ids)]
        return int(self._requeue(keys=keys, args=args))

    def _provenance_table(self, job_id: str) -> list[codec.Provenance]:
        raw = cast("dict[bytes, bytes]", self.r.hgetall(self.job_key(job_id, "pv")))
        table = [codec.Provenance(None, None)] * len(raw)
        for key, idx in raw.items():
            table[int(idx)] = codec.Provenance.from_key(key)
        return table

    def _decoder(self, job_id: str) -> Any:
        (base, created), table = self._job_consts(job_id), self._provenance_table(job_id)

        def decode(raw_id: bytes, stored: bytes) -> dict[str, Any]:
            return codec.decode(codec.id_text(raw_id), stored, base=base, created=created, provenance=table)

        return decode

    def _scan(self, key: str, *, dedupe: bool = True, count: int = 1000) -> Iterator[tuple[bytes, bytes]]:
        """HSCAN, each field once: while a hash is being written, a resize can return a field twice, so the fields
        yielded are remembered unless ``dedupe`` is off (a hash nobody writes to any more)."""
        seen: set[bytes] | None = set() if dedupe else None
        for field, value in self.r.hscan_iter(key, count=count):
            if seen is not None:
                if field in seen:
                    continue
                seen.add(field)
            yield field, value

    def iter_results(self, job_id: str) -> Iterator[dict[str, Any]]:
        decode = self._decoder(job_id)
        rev_key = self.job_key(job_id, "rev")
        has_reviews = bool(self.r.exists(rev_key))
        batch: list[tuple[bytes, bytes]] = []
        # A finished job's rows no longer change, and remembering 100 million ids would cost gigabytes.
        running = self.state(job_id) is JobState.RUNNING
        for pair in self._scan(self.job_key(job_id, "res"), dedupe=running):
            batch.append(pair)
            if len(batch) >= 1000:
                yield from self._with_reviews(job_id, batch, decode, has_reviews)
                batch = []
        yield from self._with_reviews(job_id, batch, decode, has_reviews)

    def _with_reviews(
        self, job_id: str, batch: list[tuple[bytes, bytes]], decode: Any, has_reviews: bool
    ) -> Iterator[dict[str, Any]]:
        reviews = self.r.hmget(self.job_key(job_id, "rev"), [f for f, _ in batch]) if has_reviews and batch else []
        for k, (field, stored) in enumerate(batch):
            row = decode(field, stored)
            if has_reviews and reviews[k]:
                row.update(codec.decode_review(cast(bytes, reviews[k])))
            yield row

    def iter_pending(self, job_id: str) -> Iterator[tuple[str, str]]:
        base = self._base(job_id)
        for field, ref in self._scan(self.job_key(job_id, "src")):
            yield codec.id_text(field), codec.unpack_ref(ref.decode("utf-8", "surrogateescape"), base)

    def iter_status(self, job_id: str, status: ItemStatus) -> Iterator[dict[str, Any]]:
        if status is ItemStatus.PENDING:
            for iid, ref in self.iter_pending(job_id):
                yield {"id": iid, "ref": ref, "status": status.value}
        elif status is ItemStatus.ERROR:
            for _, row in self._member_rows(job_id, "err"):
                yield row
        else:
            for row in self.iter_results(job_id):
                if row["status"] == status.value:
                    yield row

    def iter_flagged(self, job_id: str, flags: frozenset[str] | None = None) -> Iterator[tuple[str, str]]:
        for iid, row in self._member_rows(job_id, "flg"):
            if flags is None or set(row.get("flags") or ()) & flags:
                yield iid, row["ref"]

    def _member_rows(self, job_id: str, suffix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Rows of the items in one of the job's sets (errors, flagged), in batches."""
        decode = self._decoder(job_id)
        members = list(self.r.sscan_iter(self.job_key(job_id, suffix), count=1000))
        for start in range(0, len(members), 1000):
            part = members[start : start + 1000]
            for field, stored in zip(part, self.r.hmget(self.job_key(job_id, "res"), part), strict=True):
                if stored:
                    yield codec.id_text(field), decode(field, stored)

    # --- containers -----------------------------------------------------------------------------
    def add_containers(self, job_id: str, items: Iterable[tuple[str, str]]) -> int:
        key = self.job_key(job_id, "ctr")
        pipe = self.r.pipeline()
        count = 0
        for cid, spec in items:
            pipe.hsetnx(key, cid, spec)
            count += 1
        return sum(int(n) for n in pipe.execute()) if count else 0

    def close_container(self, job_id: str, container_id: str) -> bool:
        return bool(self._close(keys=self._keys(job_id), args=[repr(time.time()), container_id]))

    def iter_containers(self, job_id: str) -> Iterator[tuple[str, str]]:
        for cid, spec in self._scan(self.job_key(job_id, "ctr")):
            yield cid.decode(), spec.decode()

    def container(self, job_id: str, container_id: str) -> str | None:
        spec = self.r.hget(self.job_key(job_id, "ctr"), container_id)
        return None if spec is None else _text(spec)

    # --- reuse ----------------------------------------------------------------------------------
    def reuse_get(self, key: str, digests: list[bytes]) -> dict[bytes, tuple[str, list[str]]]:
        if not digests:
            return {}
        found = self.r.hmget(self._k("reuse", key), digests)
        out: dict[bytes, tuple[str, list[str]]] = {}
        for digest, raw in zip(digests, found, strict=True):
            if raw:
                caption, flags = msgpack.unpackb(raw, raw=False)
                out[digest] = (caption, list(flags))
        return out

    def reuse_put(self, key: str, entries: dict[bytes, tuple[str, list[str]]], ttl_s: int) -> None:
        if not entries:
            return
        packed = {d: msgpack.packb([c, f], use_bin_type=True) for d, (c, f) in entries.items()}
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self._k("reuse", key), mapping=cast("dict[Any, Any]", packed))
        pipe.expire(self._k("reuse", key), ttl_s)
        pipe.execute()

    # --- review ---------------------------------------------------------------------------------
    def page(self, job_id: str, *, cursor: str | None = None, limit: int = 50, filt: ItemFilter | None = None) -> Page:
        """Walks the smallest structure that holds every item the filter can match, with HSCAN/SSCAN from the
        cursor: errors their set, flagged captions theirs, corrections the review hash, otherwise the rows and
        then the manifest (pending items). The cursor is "phase.scan position.matches already shown from that
        batch", so pages come out exactly ``limit`` long."""
        check_page_limit(limit)
        self.job(job_id)
        filt = filt or ItemFilter()
        phases = self._page_phases(filt)
        phase, pos, skip = _parse_cursor(cursor, len(phases))
        budget = base.PAGE_SCAN_BUDGET
        rows: list[dict[str, Any]] = []
        scanned = 0
        while True:
            start = pos
            count = max(limit, 10) if filt.empty else min(500, budget)
            pos, fields = self._scan_batch(job_id, phases[phase], start, count)
            shown = 0
            for row in self._rows_of_fields(job_id, fields):
                scanned += 1
                if row is None or not filt.matches(row):
                    continue
                shown += 1
                if shown <= skip:
                    continue
                if len(rows) == limit:  # this batch holds more: the next page starts inside it
                    return Page(rows, f"{phase}.{start}.{shown - 1}", scanned)
                rows.append(row)
            skip = 0
            if pos == 0:
                if phase + 1 == len(phases):
                    return Page(rows, None, scanned)
                phase += 1
            if len(rows) == limit or scanned >= budget:
                return Page(rows, f"{phase}.{pos}.0", scanned)

    @staticmethod
    def _page_phases(filt: ItemFilter) -> list[str]:
        """Which of the job's hashes and sets to walk, in order, for a filter."""
        if filt.status is ItemStatus.ERROR or filt.error_class:
            return ["err"]
        if filt.flag:
            return ["flg"]
        if filt.corrected:
            return ["rev"]
        settled = [] if filt.status is ItemStatus.PENDING else ["res"]
        pending = ["src"] if filt.matches({"id": "", "ref": "", "status": ItemStatus.PENDING.value}) else []
        return settled + pending or ["res"]

    def _scan_batch(self, job_id: str, source: str, pos: int, count: int) -> tuple[int, list[bytes]]:
        key = self.job_key(job_id, source)
        if source in ("err", "flg"):
            pos, members = self.r.sscan(key, pos, count=count)
            return int(pos), [cast(bytes, m) for m in members]
        pos, pairs = self.r.hscan(key, pos, count=count)
        return int(pos), list(cast("dict[bytes, bytes]", pairs))

    def _rows_of_fields(self, job_id: str, fields: list[bytes]) -> list[dict[str, Any] | None]:
        """Rows (settled or pending) with their review fields, in order; None where the job holds no such item."""
        if not fields:
            return []
        base, decode = self._base(job_id), self._decoder(job_id)
        pipe = self.r.pipeline(transaction=False)
        for part in ("res", "src", "rev"):
            pipe.hmget(self.job_key(job_id, part), fields)
        stored, refs, reviews = pipe.execute()
        out: list[dict[str, Any] | None] = []
        for field, body, ref, review in zip(fields, stored, refs, reviews, strict=True):
            if body:
                row = decode(field, body)
            elif ref is not None:
                row = {
                    "id": codec.id_text(field),
                    "ref": codec.unpack_ref(ref.decode("utf-8", "surrogateescape"), base),
                    "status": ItemStatus.PENDING.value,
                }
            else:
                out.append(None)
                continue
            if review:
                row.update(codec.decode_review(review))
            out.append(row)
        return out

    def item(self, job_id: str, item_id: str) -> dict[str, Any] | None:
        self.job(job_id)
        return self._rows_of_fields(job_id, [codec.id_bytes(item_id)])[0]

    def _items(self, job_id: str, item_ids: list[str]) -> list[dict[str, Any] | None]:
        return self._rows_of_fields(job_id, [codec.id_bytes(i) for i in item_ids])

    def _store_review(self, job_id: str, item_id: str, text: str | None, mark: str | None, reviewer: str) -> None:
        key, raw = self.job_key(job_id, "rev"), codec.id_bytes(item_id)
        if text is None and mark is None:
            self.r.hdel(key, raw)
        else:
            self.r.hset(key, raw, codec.encode_review(text, mark, reviewer, time.time()))

    def reviewed(self, job_id: str) -> Iterator[dict[str, Any]]:
        self.job(job_id)
        batch: list[bytes] = []

        def kept(rows: list[dict[str, Any] | None]) -> Iterator[dict[str, Any]]:
            # A review cleared back to nothing stays (it holds the item's version) but is no longer reviewed.
            return (r for r in rows if r and r["status"] == "ok" and ("corrected" in r or "mark" in r))

        for field, _ in self._scan(self.job_key(job_id, "rev")):
            batch.append(field)
            if len(batch) >= 1000:
                yield from kept(self._rows_of_fields(job_id, batch))
                batch = []
        yield from kept(self._rows_of_fields(job_id, batch))

    def _log_review(self, job_id: str, item_id: str, version: int, entry: dict[str, Any]) -> bool:
        field = codec.id_bytes(item_id) + b":%d" % version
        return bool(self.r.hsetnx(self.job_key(job_id, "rlog"), field, json.dumps(entry)))

    def _put_review(self, job_id: str, item_id: str, packed: bytes) -> None:
        self.r.hset(self.job_key(job_id, "rev"), codec.id_bytes(item_id), packed)

    def review_history(self, job_id: str, item_id: str) -> list[dict[str, Any]]:
        row = self.item(job_id, item_id) or {}
        last = int(row.get("review_version") or 0)
        if not last:
            return []
        raw = codec.id_bytes(item_id)
        stored = self.r.hmget(self.job_key(job_id, "rlog"), [raw + b":%d" % v for v in range(1, last + 1)])
        return [json.loads(e) for e in cast("list[bytes | None]", stored) if e]


def _parse_cursor(cursor: str | None, phases: int) -> tuple[int, int, int]:
    """A page cursor: (phase, scan position, matches of that batch already shown); InvalidReview when malformed."""
    if not cursor:
        return 0, 0, 0
    try:
        phase, pos, skip = (int(part) for part in cursor.split("."))
    except ValueError:
        raise bad_cursor(cursor) from None
    if not 0 <= phase < phases or pos < 0 or skip < 0:
        raise bad_cursor(cursor)
    return phase, pos, skip


def redis_ledger(settings: Settings) -> RedisLedger:
    """The Redis ledger the settings name (URL, TLS options, key prefix)."""
    return RedisLedger(settings_client(settings), settings.key_prefix)
