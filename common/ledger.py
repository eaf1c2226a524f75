"""Job and item state in Redis: the durable record of every job (the Celery result backend is only a cache).

Keys, all under ``<prefix>:``:
  jobs                 ZSET   job id -> created time
  job:<id>             HASH   kind, name, params (caption jobs), state, created, finished, n_total, n_ok, n_error,
                              n_cancelled
  job:<id>:src         HASH   item id -> source reference (the manifest)
  job:<id>:res         HASH   item id -> result row (JSON); absent = pending
  job:<id>:att         HASH   item id -> attempts started; <id>:f attempts finished; <id>:s attempts run alone
                              (only while an item is unsettled: a final row removes its fields)
  job:<id>:rev         HASH   item id -> review (JSON: corrected, mark, reviewer, reviewed_at), beside the row, so
                              the model's caption is never overwritten

Result writes are one Lua script per batch of rows: keyed by item id, counters move only when an item's
status changes, and a caption, once written, is never replaced. Redelivered or duplicated work therefore
cannot produce a second row or a double count.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import redis

from common.connections import settings_client
from common.errors import BrokerUnavailable, InvalidReview, NotCaptioned, UnknownItem, UnknownJob
from common.messages import GenParams, ItemResult, ItemStatus, JobKind, JobState

if TYPE_CHECKING:
    from common.settings import Settings

# A shebang makes Redis (7+) refuse the whole script at maxmemory. Without one, Redis checks memory only at a
# script's first write, and a script that starts by deleting (HDEL) could then grow past maxmemory unchecked.
_OOM_CHECKED = "#!lua\n"

# KEYS: job hash, results hash, attempts hash.  ARGV: now, then (id, status, row-json) triples.
# Returns the number of rows whose status changed; finishes the job when every item has a row. A row is the
# end of its item's attempt: its attempt counters go (a retry starts them afresh).
_RECORD = """
local changed = 0
for i = 2, #ARGV, 3 do
  local id, st, body = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  redis.call('HDEL', KEYS[3], id, id .. ':f', id .. ':s')
  local prev = redis.call('HGET', KEYS[2], id)
  local prevst = false
  if prev then prevst = cjson.decode(prev)['status'] end
  if st == 'ok' and prevst ~= 'ok' then
    local flags = cjson.decode(body)['flags']
    if type(flags) == 'table' then
      for _, f in ipairs(flags) do redis.call('HINCRBY', KEYS[1], 'flag_' .. f, 1) end
    end
  end
  if prevst == 'ok' then
    -- a caption is final: exactly one row per item, whatever is redelivered
  elseif prevst == st then
    redis.call('HSET', KEYS[2], id, body)
  else
    if prevst then redis.call('HINCRBY', KEYS[1], 'n_' .. prevst, -1) end
    redis.call('HSET', KEYS[2], id, body)
    redis.call('HINCRBY', KEYS[1], 'n_' .. st, 1)
    changed = changed + 1
  end
end
__FINISH__
return {changed, finished}
"""

# Marks a job done once every manifest item has a row, unless the producer is still adding items ('open').
_FINISH = """
local finished = 0
local h = redis.call('HMGET', KEYS[1], 'n_total', 'n_ok', 'n_error', 'n_cancelled', 'state', 'open')
local total = tonumber(h[1] or '0') or 0
local settled = (tonumber(h[2] or '0') or 0) + (tonumber(h[3] or '0') or 0) + (tonumber(h[4] or '0') or 0)
if total > 0 and settled >= total and h[5] == 'running' and not h[6] then
  redis.call('HSET', KEYS[1], 'state', 'done', 'finished', ARGV[1])
  finished = 1
end
"""
_RECORD = _RECORD.replace("__FINISH__", _FINISH)
# KEYS: job hash, results hash, attempts hash.  ARGV: mode, then item ids going back on the queue.
# Their failed or cancelled rows are removed (counters follow), so they count as pending again; in mode
# 'flagged' captions carrying quality flags are removed too (they are to be captioned again), in mode 'all' every
# caption (a reviewer's "caption again").
_REQUEUE = """
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local prev = redis.call('HGET', KEYS[2], id)
  if prev then
    local row = cjson.decode(prev)
    local st = row['status']
    local flags = row['flags']
    local flagged = type(flags) == 'table' and #flags > 0
    if st ~= 'ok' or ARGV[1] == 'all' or (ARGV[1] == 'flagged' and flagged) then
      redis.call('HDEL', KEYS[2], id)
      redis.call('HINCRBY', KEYS[1], 'n_' .. st, -1)
      if st == 'ok' and flagged then
        for _, f in ipairs(flags) do redis.call('HINCRBY', KEYS[1], 'flag_' .. f, -1) end
      end
      n = n + 1
    end
  end
  redis.call('HDEL', KEYS[3], id, id .. ':f', id .. ':s')
end
return n
"""

# KEYS: manifest hash, job hash.  ARGV: (id, ref) pairs.  New manifest entries and the job's total move together.
_ADD_ITEMS = """
local new = 0
for i = 1, #ARGV, 2 do
  new = new + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
if new > 0 then redis.call('HINCRBY', KEYS[2], 'n_total', new) end
return new
"""

# KEYS: attempts hash.  ARGV: item ids starting an attempt.  Returns, per id: attempts started (this one
# included), attempts finished, attempts run alone. started - 1 > finished: an earlier attempt never ended
# (its worker died holding it).
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

# KEYS: job hash.  ARGV: now.  The producer calls this when it has added its last item.
_SEAL = "redis.call('HDEL', KEYS[1], 'open')\n" + _FINISH + "return finished\n"

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


class Attempt(NamedTuple):
    """One item's attempt counts, as ``begin_attempt`` leaves them."""

    started: int  # attempts begun, this one included
    finished: int  # attempts that ended (a row, or a transient failure sent again)
    alone: int  # attempts run by themselves

    @property
    def suspect(self) -> bool:
        """An earlier attempt never ended: its worker died while holding the item. It may be what killed it."""
        return self.started - 1 > self.finished


class Recorded(NamedTuple):
    changed: int  # rows whose status changed (new rows, or a failure replaced by a caption)
    finished: bool  # this write settled the job's last item: completion callbacks fire once, here


@dataclass
class JobInfo:
    """A job's counters and metadata as stored in the ledger."""

    id: str
    name: str
    state: JobState
    #: Generation parameters of a caption job; None for a training job.
    params: GenParams | None
    created: float
    finished: float | None
    total: int
    ok: int
    error: int
    cancelled: int
    kind: JobKind = JobKind.CAPTION
    #: Captions per quality flag (empty, truncated, repetition).
    flags: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        return max(0, self.total - self.ok - self.error - self.cancelled)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "kind": self.kind.value,
            "params": self.params.model_dump() if self.params else None,
            "created": self.created,
            "finished": self.finished,
            "total": self.total,
            "ok": self.ok,
            "error": self.error,
            "cancelled": self.cancelled,
            "pending": self.pending,
            "flags": self.flags,
            **self.extra,
        }


# --- review (see the section at the end of Ledger) -----------------------------------------------------------

#: Longest correction accepted, in characters (a caption is a sentence or two; GIT's longest is 512 tokens).
MAX_CORRECTION_CHARS = 2000
#: Review marks: a human's verdict on the model's caption.
REVIEW_MARKS = ("accepted", "rejected")
#: Most items a filtered page examines in one call; past it the page ends early with a cursor to continue.
PAGE_SCAN_BUDGET = 10_000
#: Most items one bulk review call may name.
MAX_REVIEW_IDS = 1000


@dataclass(frozen=True)
class ItemFilter:
    """Which items a review page shows; every field left None matches everything."""

    status: ItemStatus | None = None  # ok / error / cancelled / pending
    error_class: str | None = None  # one of ITEM_ERROR_CODES
    flag: str | None = None  # a quality flag (QUALITY_FLAGS) or "any"
    model_version: str | None = None
    text: str | None = None  # case-insensitive substring of the caption or its correction
    corrected: bool | None = None  # True: corrected items only; False: uncorrected only

    @property
    def empty(self) -> bool:
        return self == ItemFilter()

    def matches(self, row: dict[str, Any]) -> bool:
        if self.status is not None and row.get("status") != self.status.value:
            return False
        if self.error_class is not None and row.get("error_class") != self.error_class:
            return False
        flags = row.get("flags") or ()
        if self.flag is not None and not (flags if self.flag == "any" else self.flag in flags):
            return False
        if self.model_version is not None and row.get("model_version") != self.model_version:
            return False
        if self.corrected is not None and ("corrected" in row) is not self.corrected:
            return False
        if self.text:
            needle = self.text.casefold()
            texts = (row.get("caption") or "", row.get("corrected") or "")
            return any(needle in t.casefold() for t in texts)
        return True


@dataclass
class Page:
    """One page of a job's items: rows, the cursor of the next page (None at the end), items examined."""

    rows: list[dict[str, Any]]
    cursor: str | None
    scanned: int


# KEYS: manifest, results, reviews.  ARGV: now, reviewer, op, value, then item ids.  op 'correct' sets the
# correction to value, 'uncorrect' removes it, 'mark' sets the mark to value ('' removes it). An unknown id
# refuses the whole call ({-1, id}); items without a caption are left alone. Returns {changed, first item
# without a caption or ''}. An entry with neither a correction nor a mark is removed.
_REVIEW = """
for i = 5, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then return {-1, ARGV[i]} end
end
local field = 'mark'
if ARGV[3] ~= 'mark' then field = 'corrected' end
local value = ARGV[4]
if ARGV[3] == 'uncorrect' then value = '' end
local changed, uncaptioned = 0, ''
for i = 5, #ARGV do
  local id = ARGV[i]
  local row = redis.call('HGET', KEYS[2], id)
  if not row or cjson.decode(row)['status'] ~= 'ok' then
    if uncaptioned == '' then uncaptioned = id end
  else
    local raw = redis.call('HGET', KEYS[3], id)
    local rev = {}
    if raw then rev = cjson.decode(raw) end
    if (rev[field] or '') ~= value then
      if value == '' then rev[field] = nil else rev[field] = value end
      changed = changed + 1
      if rev['corrected'] == nil and rev['mark'] == nil then
        redis.call('HDEL', KEYS[3], id)
      else
        rev['reviewer'] = ARGV[2]
        rev['reviewed_at'] = tonumber(ARGV[1])
        redis.call('HSET', KEYS[3], id, cjson.encode(rev))
      end
    end
  end
end
return {changed, uncaptioned}
"""


def ledger_from_settings(settings: Settings) -> Ledger:
    """The job ledger the settings name (URL, TLS options, key prefix)."""
    return Ledger(settings_client(settings), settings.key_prefix)


class Ledger:
    """Reads and writes job state. Every write is idempotent by item id."""

    def __init__(self, client: redis.Redis, prefix: str = "captioner") -> None:
        self.r = client
        self.prefix = prefix
        self._record = client.register_script(_OOM_CHECKED + _RECORD)
        self._seal = client.register_script(_OOM_CHECKED + _SEAL)
        self._requeue = client.register_script(_OOM_CHECKED + _REQUEUE)
        self._add_items = client.register_script(_OOM_CHECKED + _ADD_ITEMS)
        self._begin = client.register_script(_OOM_CHECKED + _BEGIN)
        self._review = client.register_script(_OOM_CHECKED + _REVIEW)
        # A lock's few bytes must stay refreshable at maxmemory: losing it would stop a fine-tune mid-run.
        self._lock = client.register_script("#!lua flags=allow-oom\n" + _LOCK)
        self._unlock = client.register_script("#!lua flags=allow-oom\n" + _UNLOCK)

    # --- keys -----------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def job_key(self, job_id: str) -> str:
        return self._k("job", job_id)

    def ping(self) -> None:
        """Raise ``BrokerUnavailable`` with the reason when Redis cannot be reached."""
        try:
            self.r.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot reach the ledger Redis: {exc}") from None

    # --- jobs -----------------------------------------------------------------------------------
    def open_job(
        self,
        job_id: str,
        name: str,
        params: GenParams | None,
        extra: dict[str, Any] | None = None,
        *,
        kind: JobKind = JobKind.CAPTION,
    ) -> bool:
        """Create the job if new, or reopen it (a resumed enqueue, a retry); returns True when it was created.

        Reopening keeps the stored options (``extra``) unless new ones are given; its next end notifies again.
        """
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
        pipe.hdel(key, "finished", "done_task_sent")
        pipe.zadd(self._k("jobs"), {job_id: now}, nx=True)
        pipe.execute()
        return bool(created)

    def seal(self, job_id: str) -> bool:
        """The producer has added every item: the job may now finish. True when this call finished it."""
        return bool(self._seal(keys=[self.job_key(job_id)], args=[repr(time.time())]))

    def add_items(self, job_id: str, items: Iterable[tuple[str, str]]) -> int:
        """Add (item id, reference) pairs to the manifest; returns how many were new.

        One script: the manifest and the job's total never disagree, even when Redis refuses the write at
        maxmemory or the producer dies in between (a short total would finish the job early).
        """
        args = [part for pair in dict(items).items() for part in pair]
        if not args:
            return 0
        return int(self._add_items(keys=[self._k("job", job_id, "src"), self.job_key(job_id)], args=args))

    def job(self, job_id: str) -> JobInfo:
        raw = self.r.hgetall(self.job_key(job_id))
        if not raw or b"created" not in raw:
            raise UnknownJob(f"no job {job_id!r} in the ledger (captioner jobs lists them)")
        return self._info(job_id, cast("dict[bytes, bytes]", raw))

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

    def set_state(self, job_id: str, state: JobState) -> None:
        fields = {"state": state.value}
        if state is JobState.DONE:
            fields["finished"] = repr(time.time())
        self.r.hset(self.job_key(job_id), mapping=cast("dict[Any, Any]", fields))

    def set_fields(self, job_id: str, **fields: Any) -> None:
        """Free-form job fields (a training job's request and progress), stored as JSON."""
        self.r.hset(self.job_key(job_id), mapping={k: json.dumps(v, default=str) for k, v in fields.items()})

    def get_field(self, job_id: str, name: str) -> Any:
        raw = self.r.hget(self.job_key(job_id), name)
        return json.loads(raw) if raw else None

    def try_lock(self, job_id: str, owner: str, ttl_s: int) -> bool:
        """Take or refresh a job's lock for one runner (one atomic script); it lapses ttl_s after the last call.

        False when another owner holds it. Check and set are one step, so a lock that lapses between them
        can never be refreshed by its old owner after a new one took it.
        """
        key = self._k("job", job_id, "lock")
        return bool(self._lock(keys=[key], args=[owner, int(ttl_s)]))

    def unlock(self, job_id: str, owner: str) -> None:
        """Release the lock only if ``owner`` still holds it (compare and delete in one script)."""
        self._unlock(keys=[self._k("job", job_id, "lock")], args=[owner])

    def locked(self, job_id: str) -> bool:
        return bool(self.r.exists(self._k("job", job_id, "lock")))

    def state(self, job_id: str) -> JobState | None:
        raw = self.r.hget(self.job_key(job_id), "state")
        return JobState(_text(raw)) if raw else None

    # --- items ----------------------------------------------------------------------------------
    def statuses(self, job_id: str, ids: list[str]) -> dict[str, ItemStatus]:
        """Current status of each id (pending when no row exists)."""
        if not ids:
            return {}
        rows = self.r.hmget(self._k("job", job_id, "res"), ids)
        return {
            i: ItemStatus(json.loads(row)["status"]) if row else ItemStatus.PENDING
            for i, row in zip(ids, rows, strict=True)
        }

    def begin_attempt(self, job_id: str, ids: list[str]) -> dict[str, Attempt]:
        """Count one more attempt for each item (before work starts, so a crash counts too)."""
        if not ids:
            return {}
        flat = [int(n) for n in self._begin(keys=[self._k("job", job_id, "att")], args=ids)]
        return {i: Attempt(*flat[3 * k : 3 * k + 3]) for k, i in enumerate(ids)}

    def end_attempts(self, job_id: str, ids: list[str]) -> None:
        """Attempts that ended without a row (a transient failure sent again): not a crash."""
        if ids:
            key = self._k("job", job_id, "att")
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hincrby(key, f"{i}:f", 1)
            pipe.execute()

    def begin_alone(self, job_id: str, item: str) -> None:
        """Count an attempt that runs by itself (see ``Attempt.suspect``)."""
        self.r.hincrby(self._k("job", job_id, "att"), f"{item}:s", 1)

    def requeue(self, job_id: str, ids: list[str], *, flagged: bool = False, captioned: bool = False) -> int:
        """Make items pending again before they are re-sent: drop their failed or cancelled rows (and with
        ``flagged``, captions with quality flags; with ``captioned``, every caption) and their attempt counts (an
        operator's retry is a fresh start, not a step towards poison)."""
        if not ids:
            return 0
        keys = [self.job_key(job_id), self._k("job", job_id, "res"), self._k("job", job_id, "att")]
        mode = "all" if captioned else "flagged" if flagged else "failed"
        return int(self._requeue(keys=keys, args=[mode, *ids]))

    def iter_flagged(self, job_id: str, flags: frozenset[str] | None = None) -> Iterator[tuple[str, str]]:
        """(item id, reference) of captions carrying any quality flag (or any of ``flags``)."""
        for row in self.iter_results(job_id):
            have = set(row.get("flags") or ())
            if have and (flags is None or have & flags):
                yield row["id"], row["ref"]

    def record(self, job_id: str, rows: list[ItemResult]) -> Recorded:
        """Durably write result rows (one atomic script): how many changed status, and whether the job ended."""
        if not rows:
            return Recorded(0, False)
        argv: list[str] = [repr(time.time())]
        for row in rows:
            argv += [row.id, row.status.value, row.model_dump_json(exclude_none=True)]
        keys = [self.job_key(job_id), self._k("job", job_id, "res"), self._k("job", job_id, "att")]
        changed, finished = self._record(keys=keys, args=argv)
        return Recorded(int(changed), bool(finished))

    def iter_results(self, job_id: str, count: int = 1000) -> Iterator[dict[str, Any]]:
        """Every written row once, streamed with HSCAN (order is Redis's), with its review fields when reviewed.

        HSCAN may return a field twice when the hash is resized between calls, which happens only while
        rows are being written: for a job still running, ids already yielded are remembered and skipped.
        """
        return self._with_reviews(job_id, self._iter_rows(job_id, count), count)

    def _iter_rows(self, job_id: str, count: int) -> Iterator[dict[str, Any]]:
        seen: set[bytes] | None = None if self.state(job_id) is not JobState.RUNNING else set()
        for item, raw in self.r.hscan_iter(self._k("job", job_id, "res"), count=count):
            if seen is not None:
                if item in seen:
                    continue
                seen.add(item)
            yield json.loads(raw)

    def iter_sources(self, job_id: str, count: int = 1000) -> Iterator[tuple[str, str]]:
        for item, ref in self.r.hscan_iter(self._k("job", job_id, "src"), count=count):
            yield item.decode(), ref.decode("utf-8", "surrogateescape")

    def iter_unfinished(
        self, job_id: str, *, want: frozenset[ItemStatus] = frozenset({ItemStatus.PENDING, ItemStatus.ERROR})
    ) -> Iterator[tuple[str, str]]:
        """Manifest items whose current status is in ``want`` (pending, failed, cancelled...)."""
        batch: list[tuple[str, str]] = []
        for pair in self.iter_sources(job_id):
            batch.append(pair)
            if len(batch) >= 1000:
                yield from self._filter(job_id, batch, want)
                batch = []
        yield from self._filter(job_id, batch, want)

    def _filter(
        self, job_id: str, batch: list[tuple[str, str]], want: frozenset[ItemStatus]
    ) -> Iterator[tuple[str, str]]:
        status = self.statuses(job_id, [i for i, _ in batch])
        for item, ref in batch:
            if status[item] in want:
                yield item, ref

    def expire_job(self, job_id: str, ttl_s: int) -> None:
        keys = [self.job_key(job_id)] + [self._k("job", job_id, s) for s in ("src", "res", "att", "rev")]
        pipe = self.r.pipeline()
        for key in keys:
            pipe.expire(key, ttl_s)
        pipe.execute()

    # --- review: pages of items, corrections beside the model's caption, marks ------------------------------
    def page(self, job_id: str, *, cursor: str | None = None, limit: int = 50, filt: ItemFilter = ItemFilter()) -> Page:
        """Up to ``limit`` items matching ``filt``, from ``cursor`` on (None: the first page).

        Walks the manifest (or, for ``corrected=True``, the reviews) with HSCAN from the cursor, so a page costs
        the items it examines, never the job's size. A filtered page examines at most ``PAGE_SCAN_BUDGET`` items
        and may end short with a cursor to continue; ``cursor`` is None only when the whole job was walked.
        Items added while a job is being enqueued may show up twice (HSCAN's guarantee), never not at all.
        """
        if not 1 <= limit <= MAX_REVIEW_IDS:
            raise InvalidReview(f"a page holds 1 to {MAX_REVIEW_IDS} items, not {limit}")
        if not self.exists(job_id):
            raise UnknownJob(f"no job {job_id!r} in the ledger (captioner jobs lists them)")
        walk = self._k("job", job_id, "rev" if filt.corrected else "src")
        scan_cursor, skip = _parse_cursor(cursor)
        count = limit if filt.empty else min(500, PAGE_SCAN_BUDGET)
        rows: list[dict[str, Any]] = []
        scanned = 0
        while True:
            next_cursor, found = self.r.hscan(walk, scan_cursor, count=count)
            ids = [_text(k) for k in found][skip:]
            for n, row in enumerate(self._items(job_id, ids), start=skip + 1):
                scanned += 1
                if filt.matches(row):
                    rows.append(row)
                    if len(rows) == limit:
                        more = n < len(found) or next_cursor != 0
                        at = f"{scan_cursor}.{n}" if n < len(found) else f"{next_cursor}.0"
                        return Page(rows, at if more else None, scanned)
            if next_cursor == 0:
                return Page(rows, None, scanned)
            scan_cursor, skip = next_cursor, 0
            if scanned >= PAGE_SCAN_BUDGET:
                return Page(rows, f"{scan_cursor}.0", scanned)

    def item(self, job_id: str, item_id: str) -> dict[str, Any] | None:
        """The item's row with its review fields; pending items are {"id", "ref", "status": "pending"}; None: no
        such item in the job."""
        rows = self._items(job_id, [item_id])
        return rows[0] if rows else None

    def set_correction(self, job_id: str, item_id: str, text: str, reviewer: str) -> dict[str, Any]:
        """Store a reviewer's caption beside the model's (which stays as it was); returns the updated row."""
        text = text.strip()
        if not text:
            raise InvalidReview("a correction cannot be empty (clear it instead)")
        if len(text) > MAX_CORRECTION_CHARS:
            raise InvalidReview(f"a correction holds at most {MAX_CORRECTION_CHARS} characters, not {len(text)}")
        self._apply_review(job_id, [item_id], "correct", text, reviewer, strict=True)
        return self._item_or_raise(job_id, item_id)

    def clear_correction(self, job_id: str, item_id: str, reviewer: str) -> dict[str, Any]:
        """Remove the item's correction (the model's caption is what remains); returns the updated row."""
        self._apply_review(job_id, [item_id], "uncorrect", "", reviewer, strict=True)
        return self._item_or_raise(job_id, item_id)

    def set_mark(self, job_id: str, item_ids: list[str], mark: str | None, reviewer: str) -> int:
        """Mark items "accepted" or "rejected" (None: unmark); returns how many changed.

        An unknown id refuses the whole call (nothing changes); items without a caption are skipped.
        """
        if mark is not None and mark not in REVIEW_MARKS:
            raise InvalidReview(f"a mark is one of {', '.join(REVIEW_MARKS)}, not {mark!r}")
        if len(item_ids) > MAX_REVIEW_IDS:
            raise InvalidReview(f"at most {MAX_REVIEW_IDS} items per call, not {len(item_ids)}")
        return self._apply_review(job_id, item_ids, "mark", mark or "", reviewer, strict=False)

    def reviewed(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Rows that carry a correction or a mark (what ``export --reviewed-only`` writes)."""
        self.job(job_id)
        batch: list[str] = []
        for item, _ in self.r.hscan_iter(self._k("job", job_id, "rev"), count=1000):
            batch.append(_text(item))
            if len(batch) >= 1000:
                yield from self._items(job_id, batch)
                batch = []
        yield from self._items(job_id, batch)

    def _apply_review(self, job_id: str, ids: list[str], op: str, value: str, reviewer: str, *, strict: bool) -> int:
        if not self.exists(job_id):
            raise UnknownJob(f"no job {job_id!r} in the ledger (captioner jobs lists them)")
        if not ids:
            return 0
        keys = [self._k("job", job_id, s) for s in ("src", "res", "rev")]
        args = [repr(round(time.time(), 3)), reviewer, op, value, *ids]
        changed, where = self._review(keys=keys, args=args)
        if int(changed) < 0:
            raise UnknownItem(f"job {job_id} has no item {_text(where)!r}")
        if strict and _text(where):
            raise NotCaptioned(f"item {_text(where)} of job {job_id} has no caption yet (pending, failed or cancelled)")
        return int(changed)

    def _item_or_raise(self, job_id: str, item_id: str) -> dict[str, Any]:
        row = self.item(job_id, item_id)
        if row is None:
            raise UnknownItem(f"job {job_id} has no item {item_id!r}")
        return row

    def _items(self, job_id: str, ids: list[str]) -> list[dict[str, Any]]:
        """Rows of manifest items (pending ones as {"id", "ref", "status"}) with their review fields, in order;
        ids not in the manifest are left out."""
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for part in ("src", "res", "rev"):
            pipe.hmget(self._k("job", job_id, part), ids)
        refs, results, reviews = pipe.execute()
        rows = []
        for item, ref, raw, review in zip(ids, refs, results, reviews, strict=True):
            if ref is None:
                continue
            row = (
                json.loads(raw)
                if raw
                else {"id": item, "ref": ref.decode("utf-8", "surrogateescape"), "status": "pending"}
            )
            rows.append({**row, **json.loads(review)} if review else row)
        return rows

    def _with_reviews(self, job_id: str, rows: Iterator[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
        """``rows`` with their review fields merged in, fetched a batch at a time (nothing when none exist)."""
        key = self._k("job", job_id, "rev")
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= count:
                yield from _merge(batch, self.r.hmget(key, [r["id"] for r in batch]) if self.r.exists(key) else [])
                batch = []
        if batch:
            yield from _merge(batch, self.r.hmget(key, [r["id"] for r in batch]) if self.r.exists(key) else [])


def _merge(rows: list[dict[str, Any]], reviews: list[Any]) -> Iterator[dict[str, Any]]:
    for row, review in itertools.zip_longest(rows, reviews):
        yield {**row, **json.loads(review)} if review else row


def _parse_cursor(cursor: str | None) -> tuple[int, int]:
    """An opaque page cursor: the HSCAN cursor of a batch and how many of its items earlier pages took."""
    if not cursor:
        return 0, 0
    try:
        scan, skip = (int(part) for part in cursor.split("."))
    except ValueError:
        raise InvalidReview(f"bad page cursor {cursor!r}; start from the first page") from None
    if scan < 0 or skip < 0:
        raise InvalidReview(f"bad page cursor {cursor!r}; start from the first page")
    return scan, skip


def _text(value: object) -> str:
    """A Redis reply (bytes from a client without decode_responses) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
