"""``RedisLedger``: every ledger contract over one Redis database, under a key prefix (layout: ``keys``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

import msgpack
import redis

from common.errors import UnknownJob
from common.messages import GenParams, ItemResult, ItemStatus, JobKind, JobState
from ledger import codec, records
from ledger.contracts import Ledger
from ledger.records import Attempt, ItemFilter, JobInfo, Page, Recorded, bad_cursor, check_page_limit
from ledger.redis import rows as rowform
from ledger.redis.connection import Connection
from ledger.redis.keys import SUFFIXES, Keys

_STATUS_CHAR = {ItemStatus.OK: "o", ItemStatus.ERROR: "e", ItemStatus.CANCELLED: "c"}


def _text(value: object) -> str:
    """A Redis reply (bytes from a client without decode_responses) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLedger(Ledger):
    """The ledger in one Redis database, under a key prefix."""

    def __init__(self, client: redis.Redis, prefix: str = "captioner") -> None:
        self.r = client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.conn = Connection(client)
        # Per job, never changing once set: (reference base, creation time), and provenance indexes assigned.
        self._consts: dict[str, tuple[str, float]] = {}
        self._pv_index: dict[tuple[str, str], int] = {}

    def job_key(self, job_id: str, suffix: str | None = None) -> str:
        return self.keys.job(job_id, suffix)

    def _keys(self, job_id: str) -> list[str]:
        return self.keys.script_keys(job_id)

    # --- connection -----------------------------------------------------------------------------
    def ping(self) -> None:
        self.conn.ping()

    def close(self) -> None:
        self.conn.close()

    def bytes_used(self) -> int:
        return self.conn.bytes_used()

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
        pipe.zadd(self.keys.jobs(), {job_id: now}, nx=True)
        pipe.execute()
        return bool(created)

    def seal(self, job_id: str) -> bool:
        return bool(self.conn.seal(keys=self._keys(job_id), args=[repr(time.time())]))

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
        ids = [_text(i) for i in self.r.zrevrange(self.keys.jobs(), 0, limit - 1)]
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
                **{k: json.loads(raw[k.encode()]) for k in records.SHOWN_FIELDS if k.encode() in raw},
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

    def get_fields(self, job_id: str, names: Iterable[str]) -> dict[str, Any]:
        names = list(names)
        raw = self.r.hmget(self.job_key(job_id), names) if names else []
        return {n: json.loads(cast(bytes, v)) for n, v in zip(names, raw, strict=True) if v}

    def expire_job(self, job_id: str, ttl_s: int) -> None:
        pipe = self.r.pipeline()
        for key in (self.job_key(job_id), *(self.job_key(job_id, s) for s in SUFFIXES)):
            pipe.expire(key, ttl_s)
        pipe.execute()

    def ttl(self, job_id: str) -> float | None:
        left = int(self.r.ttl(self.job_key(job_id)))
        return None if left < 0 else float(left)

    # --- locks ----------------------------------------------------------------------------------
    def try_lock(self, job_id: str, owner: str, ttl_s: int) -> bool:
        return bool(self.conn.lock(keys=[self.job_key(job_id, "lock")], args=[owner, int(ttl_s)]))

    def unlock(self, job_id: str, owner: str) -> None:
        self.conn.unlock(keys=[self.job_key(job_id, "lock")], args=[owner])

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
            # Like the rows: a file name that is not UTF-8 (surrogate escapes) is kept as its bytes.
            args += [codec.id_bytes(iid), codec.pack_ref(ref, base).encode("utf-8", "surrogateescape")]
        if not args:
            return 0
        keys = [self.job_key(job_id, "src"), self.job_key(job_id), self.job_key(job_id, "res")]
        return int(self.conn.add_items(keys=keys, args=args))

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
            out[iid] = rowform.status_of(row) if row else ItemStatus.PENDING if ref is not None else None
        return out

    def begin_attempt(self, job_id: str, ids: list[str]) -> dict[str, Attempt]:
        if not ids:
            return {}
        raw = [codec.id_bytes(i) for i in ids]
        flat = [int(n) for n in self.conn.begin(keys=[self.job_key(job_id, "att")], args=raw)]
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
            cached = int(self.conn.provenance(keys=[self.job_key(job_id, "pv")], args=[key]))
            self._pv_index[(job_id, key)] = cached
        return cached

    def record(self, job_id: str, rows: list[ItemResult]) -> Recorded:
        if not rows:
            return Recorded(0, False)
        base, created = self._job_consts(job_id)
        argv: list[bytes | str | int] = [repr(time.time())]
        for row in rows:
            prov = codec.Provenance(row.model_version, row.params, row.profile, row.family)
            pv = self._provenance_index(job_id, prov)
            body = rowform.encode(row, base=base, created=created, provenance=pv)
            quality = codec.quality_bits(row.flags) if row.status is ItemStatus.OK else 0
            argv += [codec.id_bytes(row.id), _STATUS_CHAR[row.status], quality, body]
        changed, finished, refused = self.conn.record(keys=self._keys(job_id), args=argv)
        return Recorded(int(changed), bool(finished), int(refused))

    def requeue(self, job_id: str, ids: list[str], *, flagged: bool = False, captioned: bool = False) -> int:
        if not ids:
            return 0
        keys = self._keys(job_id)[:6]
        mode = "all" if captioned else "flagged" if flagged else "failed"
        args: list[str | bytes] = [mode, *(codec.id_bytes(i) for i in ids)]
        return int(self.conn.requeue(keys=keys, args=args))

    def _provenance_table(self, job_id: str) -> list[codec.Provenance]:
        raw = cast("dict[bytes, bytes]", self.r.hgetall(self.job_key(job_id, "pv")))
        table = [codec.Provenance(None, None)] * len(raw)
        for key, idx in raw.items():
            table[int(idx)] = codec.Provenance.from_key(key)
        return table

    def _decoder(self, job_id: str) -> Any:
        (base, created), table = self._job_consts(job_id), self._provenance_table(job_id)

        def decode(raw_id: bytes, stored: bytes) -> dict[str, Any]:
            return rowform.decode(codec.id_text(raw_id), stored, base=base, created=created, provenance=table)

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
        return bool(self.conn.close_container(keys=self._keys(job_id), args=[repr(time.time()), container_id]))

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
        found = self.r.hmget(self.keys.reuse(key), digests)
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
        pipe.hset(self.keys.reuse(key), mapping=cast("dict[Any, Any]", packed))
        pipe.expire(self.keys.reuse(key), ttl_s)
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
        budget = records.PAGE_SCAN_BUDGET
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

    def review_rows(self, job_id: str, item_ids: list[str]) -> list[dict[str, Any] | None]:
        self.job(job_id)
        return self._rows_of_fields(job_id, [codec.id_bytes(i) for i in item_ids])

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
