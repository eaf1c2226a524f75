"""``PostgresLedger``: every ledger contract in one PostgreSQL database (tables: ``schema``; connections: ``pool``).

Every write is one transaction that locks the items it touches (in id order) before the job row, so concurrent
workers never deadlock, counters move with the items' statuses, and a caption once written is never replaced.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from common.errors import UnknownJob
from common.messages import GenParams, ItemResult, ItemStatus, JobKind, JobState
from ledger import codec, records
from ledger.contracts import Ledger
from ledger.postgres import text
from ledger.postgres.pool import Pool
from ledger.postgres.schema import FINISH, FLAG_COLUMNS, schema_name
from ledger.records import Attempt, ItemFilter, JobInfo, Page, Recorded, bad_cursor, check_job_id, check_page_limit

_STATUS_CHAR = {ItemStatus.OK: "o", ItemStatus.ERROR: "e", ItemStatus.CANCELLED: "c"}
_CHAR_STATUS = {v: k for k, v in _STATUS_CHAR.items()}
_COUNTER = {"o": "n_ok", "e": "n_error", "c": "n_cancelled"}
_ROW_COLUMNS = "id, ref, status, caption, error, error_class, pv, attempts, finished, flagbits, extra, review, captions"


class PostgresLedger(Ledger):
    """The ledger in one PostgreSQL database, in a schema of its own (see ``schema.schema_name``)."""

    def __init__(self, url: str, prefix: str = "captioner", *, max_connections: int = 8) -> None:
        self.prefix = prefix
        self.schema = schema_name(prefix)
        self.pool = Pool(url, self.schema, max_connections=max_connections)
        self._pv_index: dict[tuple[str, str], int] = {}

    # --- plumbing -------------------------------------------------------------------------------
    def _sql(self, text: str) -> str:
        return self.pool.sql(text)

    def _connection(self) -> Any:
        return self.pool.connection()

    def _one(self, sql: str, params: Any = None) -> Any:
        return self.pool.one(sql, params)

    def _all(self, sql: str, params: Any = None) -> list[Any]:
        return self.pool.all(sql, params)

    def _run(self, sql: str, params: Any = None) -> int:
        return self.pool.run(sql, params)

    # --- connection -----------------------------------------------------------------------------
    def ping(self) -> None:
        self.pool.ping()

    def close(self) -> None:
        self.pool.close()

    def bytes_used(self) -> int:
        return self.pool.bytes_used()

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
        check_job_id(job_id)
        self._purge_expired()
        escaped = text.unsafe(name)
        row = self._one(
            """
            INSERT INTO {s}.jobs (id, kind, name, params, state, created, open, base, extra, fields)
            VALUES (%(id)s, %(kind)s, %(name)s, %(params)s, 'running', %(now)s, true, %(base)s, %(extra)s, %(marks)s)
            ON CONFLICT (id) DO UPDATE SET
              kind = EXCLUDED.kind, name = EXCLUDED.name, params = COALESCE(EXCLUDED.params, {s}.jobs.params),
              state = 'running', open = true, finished = NULL,
              fields = ({s}.jobs.fields - 'done_task_sent' - %(mark)s) || EXCLUDED.fields,
              extra = COALESCE(EXCLUDED.extra, {s}.jobs.extra)
            RETURNING (xmax = 0) AS created
            """,
            {
                "id": job_id,
                "kind": kind.value,
                "name": text.escape(name) if escaped else name,
                "params": text.object_in(params.model_dump(mode="json")) if params is not None else None,
                "now": time.time(),
                # Never read back (references are stored whole here): kept for the record, escaped.
                "base": text.escape(base),
                "extra": text.object_in(extra) if extra else None,
                "mark": text.NAME_MARK,
                "marks": json.dumps({text.NAME_MARK: True} if escaped else {}),
            },
        )
        return bool(row[0])

    def _purge_expired(self) -> None:
        self._run("DELETE FROM {s}.jobs WHERE expires IS NOT NULL AND expires < %s", (time.time(),))

    def seal(self, job_id: str) -> bool:
        with self._connection() as conn, conn.transaction():
            conn.execute(self._sql("UPDATE {s}.jobs SET open = false WHERE id = %s"), (check_job_id(job_id),))
            return self._finish(conn, job_id)

    def _finish(self, conn: Any, job_id: str) -> bool:
        return conn.execute(self._sql(FINISH), {"job": job_id, "now": time.time()}).fetchone() is not None

    _JOB_COLUMNS = (
        "id, kind, name, params, state, created, finished, n_total, n_ok, n_error, n_cancelled, "
        + ", ".join(FLAG_COLUMNS.values())
        + ", extra, fields, (SELECT count(*) FROM {s}.containers c WHERE c.job_id = jobs.id)"
    )

    def _info(self, row: Any) -> JobInfo:
        (job_id, kind, name, params, state, created, finished, total, ok, error, cancelled, *rest) = row
        flag_counts, (extra, fields, containers) = rest[: len(FLAG_COLUMNS)], rest[len(FLAG_COLUMNS) :]
        return JobInfo(
            id=job_id,
            name=text.unescape(name) if text.NAME_MARK in fields else name,
            state=JobState(state),
            kind=JobKind(kind),
            params=GenParams.model_validate(text.object_out(params)) if params else None,
            created=float(created),
            finished=float(finished) if finished else None,
            total=int(total),
            ok=int(ok),
            error=int(error),
            cancelled=int(cancelled),
            flags={f: int(n) for f, n in zip(FLAG_COLUMNS, flag_counts, strict=True) if n},
            extra={
                **(text.object_out(extra) or {}),
                **{k: text.field_out(fields[k]) for k in records.SHOWN_FIELDS if k in fields},
            },
            containers=int(containers),
        )

    def job(self, job_id: str) -> JobInfo:
        row = self._one(f"SELECT {self._JOB_COLUMNS} FROM {{s}}.jobs WHERE id = %s", (check_job_id(job_id),))
        if row is None:
            raise UnknownJob(f"no job {job_id!r} in the ledger (captioner jobs lists them)")
        return self._info(row)

    def exists(self, job_id: str) -> bool:
        return self._one("SELECT 1 FROM {s}.jobs WHERE id = %s", (check_job_id(job_id),)) is not None

    def jobs(self, limit: int = 50) -> list[JobInfo]:
        self._purge_expired()
        rows = self._all(f"SELECT {self._JOB_COLUMNS} FROM {{s}}.jobs ORDER BY created DESC LIMIT %s", (limit,))
        return [self._info(r) for r in rows]

    def is_open(self, job_id: str) -> bool:
        row = self._one("SELECT open FROM {s}.jobs WHERE id = %s", (check_job_id(job_id),))
        return bool(row and row[0])

    def state(self, job_id: str) -> JobState | None:
        row = self._one("SELECT state FROM {s}.jobs WHERE id = %s", (check_job_id(job_id),))
        return JobState(row[0]) if row else None

    def set_state(self, job_id: str, state: JobState) -> None:
        finished = time.time() if state is JobState.DONE else None
        self._run(
            "UPDATE {s}.jobs SET state = %s, finished = COALESCE(%s, finished) WHERE id = %s",
            (state.value, finished, check_job_id(job_id)),
        )

    def set_fields(self, job_id: str, **fields: Any) -> None:
        values = text.fields_in(fields)
        self._run("UPDATE {s}.jobs SET fields = fields || %s::jsonb WHERE id = %s", (values, check_job_id(job_id)))

    def get_fields(self, job_id: str, names: Iterable[str]) -> dict[str, Any]:
        names = list(names)
        row = self._one("SELECT fields FROM {s}.jobs WHERE id = %s", (check_job_id(job_id),))
        fields = row[0] if row else {}
        return {n: text.field_out(fields[n]) for n in names if n in fields}

    def expire_job(self, job_id: str, ttl_s: int) -> None:
        self._run("UPDATE {s}.jobs SET expires = %s WHERE id = %s", (time.time() + ttl_s, check_job_id(job_id)))

    def ttl(self, job_id: str) -> float | None:
        row = self._one("SELECT expires FROM {s}.jobs WHERE id = %s", (check_job_id(job_id),))
        return None if not row or row[0] is None else max(0.0, float(row[0]) - time.time())

    # --- locks ----------------------------------------------------------------------------------
    def try_lock(self, job_id: str, owner: str, ttl_s: int) -> bool:
        now = time.time()
        row = self._one(
            """
            INSERT INTO {s}.locks (job_id, owner, expires) VALUES (%(job)s, %(owner)s, %(until)s)
            ON CONFLICT (job_id) DO UPDATE SET owner = EXCLUDED.owner, expires = EXCLUDED.expires
            WHERE {s}.locks.owner = EXCLUDED.owner OR {s}.locks.expires < %(now)s
            RETURNING 1
            """,
            {"job": check_job_id(job_id), "owner": text.escape(owner), "until": now + ttl_s, "now": now},
        )
        return row is not None

    def unlock(self, job_id: str, owner: str) -> None:
        self._run("DELETE FROM {s}.locks WHERE job_id = %s AND owner = %s", (check_job_id(job_id), text.escape(owner)))

    def locked(self, job_id: str) -> bool:
        row = self._one(
            "SELECT 1 FROM {s}.locks WHERE job_id = %s AND expires >= %s", (check_job_id(job_id), time.time())
        )
        return row is not None

    # --- items ----------------------------------------------------------------------------------
    def _base(self, job_id: str) -> str:
        """References are stored whole here: disk is cheap, and the relative form's marker is no valid text."""
        return ""

    def add_items(self, job_id: str, items: Iterable[tuple[str, str]]) -> int:
        base = self._base(job_id)
        pairs = dict(items)
        if not pairs:
            return 0
        ids = [codec.id_bytes(i) for i in pairs]
        refs = [codec.pack_ref(r, base) for r in pairs.values()]
        bits = [text.ESCAPED_BIT if text.unsafe(r) else 0 for r in refs]
        refs = [text.text_in(r, bool(b)) for r, b in zip(refs, bits, strict=True)]
        with self._connection() as conn, conn.transaction():
            inserted = conn.execute(
                self._sql(
                    "INSERT INTO {s}.items (job_id, id, ref, flagbits) "
                    "SELECT %s, * FROM unnest(%s::bytea[], %s::text[], %s::smallint[]) ON CONFLICT DO NOTHING"
                ),
                (job_id, ids, refs, bits),
            ).rowcount
            if inserted:
                conn.execute(self._sql("UPDATE {s}.jobs SET n_total = n_total + %s WHERE id = %s"), (inserted, job_id))
        return int(inserted)

    def statuses(self, job_id: str, ids: list[str]) -> dict[str, ItemStatus | None]:
        if not ids:
            return {}
        rows = self._all(
            "SELECT id, status FROM {s}.items WHERE job_id = %s AND id = ANY(%s)",
            (check_job_id(job_id), [codec.id_bytes(i) for i in ids]),
        )
        found = {codec.id_text(bytes(r[0])): _CHAR_STATUS.get(r[1] or "", ItemStatus.PENDING) for r in rows}
        return {i: found.get(i) for i in ids}

    def begin_attempt(self, job_id: str, ids: list[str]) -> dict[str, Attempt]:
        if not ids:
            return {}
        rows = self._all(
            "UPDATE {s}.items SET att_started = att_started + 1 WHERE job_id = %s AND id = ANY(%s) "
            "RETURNING id, att_started, att_finished, att_alone",
            (check_job_id(job_id), [codec.id_bytes(i) for i in sorted(ids)]),
        )
        found = {codec.id_text(bytes(r[0])): Attempt(int(r[1]), int(r[2]), int(r[3])) for r in rows}
        return {i: found.get(i, Attempt(1, 0, 0)) for i in ids}

    def end_attempts(self, job_id: str, ids: list[str]) -> None:
        if ids:
            self._run(
                "UPDATE {s}.items SET att_finished = att_finished + 1 WHERE job_id = %s AND id = ANY(%s)",
                (check_job_id(job_id), [codec.id_bytes(i) for i in sorted(ids)]),
            )

    def begin_alone(self, job_id: str, item: str) -> None:
        self._run(
            "UPDATE {s}.items SET att_alone = att_alone + 1 WHERE job_id = %s AND id = %s",
            (check_job_id(job_id), codec.id_bytes(item)),
        )

    def attempts_open(self, job_id: str) -> int:
        row = self._one(
            "SELECT count(*) FROM {s}.items WHERE job_id = %s AND status IS NULL AND att_started > att_finished",
            (check_job_id(job_id),),
        )
        return int(row[0])

    def _provenance_index(self, job_id: str, prov: codec.Provenance) -> int:
        key = prov.key()
        cached = self._pv_index.get((job_id, key))
        if cached is not None:
            return cached
        with self._connection() as conn, conn.transaction():
            row = conn.execute(self._sql("SELECT provenance FROM {s}.jobs WHERE id = %s FOR UPDATE"), (job_id,))
            table = list((row.fetchone() or [[]])[0])
            if key in table:
                index = table.index(key)
            else:
                index = len(table)
                conn.execute(
                    self._sql("UPDATE {s}.jobs SET provenance = provenance || %s::jsonb WHERE id = %s"),
                    (json.dumps([key]), job_id),
                )
        self._pv_index[(job_id, key)] = index
        return index

    def record(self, job_id: str, rows: list[ItemResult]) -> Recorded:
        if not rows:
            return Recorded(0, False)
        check_job_id(job_id)
        base = self._base(job_id)
        by_id = {codec.id_bytes(r.id): r for r in rows}
        pv = {
            id(r): self._provenance_index(job_id, codec.Provenance(r.model_version, r.params, r.profile, r.family))
            for r in rows
        }
        counters: dict[str, int] = {}
        changed = refused = 0
        updates: list[tuple[Any, ...]] = []
        with self._connection() as conn, conn.transaction():
            held = conn.execute(
                self._sql("SELECT id, status FROM {s}.items WHERE job_id = %s AND id = ANY(%s) ORDER BY id FOR UPDATE"),
                (job_id, sorted(by_id)),
            ).fetchall()
            current = {bytes(r[0]): r[1] for r in held}
            for raw, row in by_id.items():
                if raw not in current:
                    refused += 1
                    continue
                prev, new = current[raw], _STATUS_CHAR[row.status]
                if prev == "o":
                    continue  # a caption is final
                if prev != new:
                    changed += 1
                    counters[_COUNTER[new]] = counters.get(_COUNTER[new], 0) + 1
                    if prev:
                        counters[_COUNTER[prev]] = counters.get(_COUNTER[prev], 0) - 1
                bits = codec.flag_byte(row)
                if new == "o":
                    for name, bit in codec.FLAG_BITS.items():
                        if bits & bit:
                            counters[FLAG_COLUMNS[name]] = counters.get(FLAG_COLUMNS[name], 0) + 1
                updates.append(_item_values(row, raw, new, bits, pv[id(row)], base, job_id))
            if updates:
                conn.cursor().executemany(
                    self._sql(
                        "UPDATE {s}.items SET ref = %s, status = %s, caption = %s, error = %s, error_class = %s, "
                        "pv = %s, attempts = %s, finished = %s, flagbits = %s, extra = %s, captions = %s, "
                        "att_started = 0, att_finished = 0, att_alone = 0 WHERE job_id = %s AND id = %s"
                    ),
                    updates,
                )
            if counters:
                sets = ", ".join(f"{c} = {c} + %s" for c in counters)
                conn.execute(self._sql(f"UPDATE {{s}}.jobs SET {sets} WHERE id = %s"), (*counters.values(), job_id))
            finished = self._finish(conn, job_id)
        return Recorded(changed, finished, refused)

    def requeue(self, job_id: str, ids: list[str], *, flagged: bool = False, captioned: bool = False) -> int:
        if not ids:
            return 0
        check_job_id(job_id)
        counters: dict[str, int] = {}
        back: list[bytes] = []
        with self._connection() as conn, conn.transaction():
            held = conn.execute(
                self._sql(
                    "SELECT id, status, flagbits FROM {s}.items WHERE job_id = %s AND id = ANY(%s) ORDER BY id "
                    "FOR UPDATE"
                ),
                (job_id, sorted(codec.id_bytes(i) for i in ids)),
            ).fetchall()
            for raw, status, bits in held:
                quality = bits & codec.QUALITY_MASK
                if status is None or (status == "o" and not captioned and not (flagged and quality)):
                    continue
                back.append(bytes(raw))
                counters[_COUNTER[status]] = counters.get(_COUNTER[status], 0) - 1
                if status == "o":
                    for name, bit in codec.FLAG_BITS.items():
                        if bits & bit:
                            counters[FLAG_COLUMNS[name]] = counters.get(FLAG_COLUMNS[name], 0) - 1
            if back:
                conn.execute(
                    self._sql(
                        "UPDATE {s}.items SET status = NULL, caption = NULL, error = NULL, error_class = NULL, "
                        "pv = NULL, attempts = NULL, finished = NULL, flagbits = flagbits & %s "
                        "WHERE job_id = %s AND id = ANY(%s)"
                    ),
                    (text.ESCAPED_BIT, job_id, back),  # the reference stays, escaped or not
                )
            # Attempt counts start afresh: an operator's retry is a fresh start, not a step towards poison.
            conn.execute(
                self._sql(
                    "UPDATE {s}.items SET att_started = 0, att_finished = 0, att_alone = 0 "
                    "WHERE job_id = %s AND id = ANY(%s) AND status IS NULL"
                ),
                (job_id, sorted(codec.id_bytes(i) for i in ids)),
            )
            if counters:
                sets = ", ".join(f"{c} = {c} + %s" for c in counters)
                conn.execute(self._sql(f"UPDATE {{s}}.jobs SET {sets} WHERE id = %s"), (*counters.values(), job_id))
        return len(back)

    def _decoder(self, job_id: str) -> Any:
        base = self._base(job_id)
        row = self._one("SELECT provenance FROM {s}.jobs WHERE id = %s", (job_id,))
        table = [codec.Provenance.from_key(k) for k in (row[0] if row else [])]

        def decode(values: tuple[Any, ...]) -> dict[str, Any]:
            return _row_from_columns(values, base, table)

        return decode

    def _stream(self, job_id: str, where: str, params: tuple[Any, ...] = ()) -> Iterator[dict[str, Any]]:
        """Rows of the job's items matching ``where``, streamed through a server-side cursor."""
        decode = self._decoder(job_id)
        with self._connection() as conn, conn.transaction():
            cursor = conn.cursor(name=f"ledger-{threading.get_ident()}-{time.monotonic_ns()}")
            cursor.itersize = 2000
            cursor.execute(
                self._sql(f"SELECT {_ROW_COLUMNS} FROM {{s}}.items WHERE job_id = %s AND {where} ORDER BY id"),
                (job_id, *params),
            )
            for values in cursor:
                yield decode(values)

    def iter_results(self, job_id: str) -> Iterator[dict[str, Any]]:
        yield from self._stream(check_job_id(job_id), "status IS NOT NULL")

    def iter_pending(self, job_id: str) -> Iterator[tuple[str, str]]:
        for row in self._stream(check_job_id(job_id), "status IS NULL"):
            yield row["id"], row["ref"]

    def iter_status(self, job_id: str, status: ItemStatus) -> Iterator[dict[str, Any]]:
        if status is ItemStatus.PENDING:
            yield from self._stream(check_job_id(job_id), "status IS NULL")
        else:
            yield from self._stream(check_job_id(job_id), "status = %s", (_STATUS_CHAR[status],))

    def iter_flagged(self, job_id: str, flags: frozenset[str] | None = None) -> Iterator[tuple[str, str]]:
        for row in self._stream(check_job_id(job_id), "(flagbits & 7) <> 0 AND status = 'o'"):
            if flags is None or set(row.get("flags") or ()) & flags:
                yield row["id"], row["ref"]

    # --- containers -----------------------------------------------------------------------------
    def add_containers(self, job_id: str, items: Iterable[tuple[str, str]]) -> int:
        pairs = dict(items)
        if not pairs:
            return 0
        return self._run(
            "INSERT INTO {s}.containers (job_id, id, spec) SELECT %s, * FROM unnest(%s::text[], %s::text[]) "
            "ON CONFLICT DO NOTHING",
            (check_job_id(job_id), list(pairs), list(pairs.values())),
        )

    def close_container(self, job_id: str, container_id: str) -> bool:
        with self._connection() as conn, conn.transaction():
            conn.execute(
                self._sql("DELETE FROM {s}.containers WHERE job_id = %s AND id = %s"),
                (check_job_id(job_id), container_id),
            )
            return self._finish(conn, job_id)

    def container(self, job_id: str, container_id: str) -> str | None:
        row = self._one(
            "SELECT spec FROM {s}.containers WHERE job_id = %s AND id = %s", (check_job_id(job_id), container_id)
        )
        return None if row is None else str(row[0])

    def iter_containers(self, job_id: str) -> Iterator[tuple[str, str]]:
        rows = self._all("SELECT id, spec FROM {s}.containers WHERE job_id = %s ORDER BY id", (check_job_id(job_id),))
        yield from ((cid, spec) for cid, spec in rows)

    # --- reuse ----------------------------------------------------------------------------------
    def reuse_get(self, key: str, digests: list[bytes]) -> dict[bytes, tuple[str, list[str]]]:
        if not digests:
            return {}
        rows = self._all(
            "SELECT digest, caption, flags FROM {s}.reuse WHERE key = %s AND digest = ANY(%s) AND expires > %s",
            (text.escape(key), digests, time.time()),
        )
        return {bytes(d): _reused_out(c, list(f)) for d, c, f in rows}

    def reuse_put(self, key: str, entries: dict[bytes, tuple[str, list[str]]], ttl_s: int) -> None:
        if not entries:
            return
        until = time.time() + ttl_s
        stored_key = text.escape(key)  # only ever compared: escaped always, the same key the same text
        with self._connection() as conn:
            conn.cursor().executemany(
                self._sql(
                    "INSERT INTO {s}.reuse (key, digest, caption, flags, expires) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (key, digest) DO UPDATE SET caption = EXCLUDED.caption, flags = EXCLUDED.flags, "
                    "expires = EXCLUDED.expires"
                ),
                [(stored_key, d, *_reused_in(c, f), until) for d, (c, f) in entries.items()],
            )
            conn.execute(self._sql("UPDATE {s}.reuse SET expires = %s WHERE key = %s"), (until, stored_key))

    # --- review ---------------------------------------------------------------------------------
    def page(self, job_id: str, *, cursor: str | None = None, limit: int = 50, filt: ItemFilter | None = None) -> Page:
        """Keyset pages in item id order. Indexed filters (status, errors, flags, corrections) walk their partial
        index; the others examine at most ``PAGE_SCAN_BUDGET`` items per page and return a cursor to go on."""
        check_page_limit(limit)
        self.job(job_id)
        filt = filt or ItemFilter()
        where, params = ["job_id = %s"], list[Any]([job_id])
        if filt.status is ItemStatus.PENDING:
            where.append("status IS NULL")
        elif filt.status is None and not filt.matches({"id": "", "ref": "", "status": ItemStatus.PENDING.value}):
            where.append("status IS NOT NULL")  # nothing pending can match (a caption search, a version)
        elif filt.status is not None:
            where.append("status = %s")
            params.append(_STATUS_CHAR[filt.status])
        if filt.error_class:
            where.append("status = 'e'")
        if filt.flag:
            where.append("(flagbits & 7) <> 0")
        if filt.corrected:
            where.append("review IS NOT NULL")
        if cursor:
            try:
                after = bytes.fromhex(cursor)
            except ValueError:
                raise bad_cursor(cursor) from None
            where.append("id > %s")
            params.append(after)
        decode = self._decoder(job_id)
        fetch = records.PAGE_SCAN_BUDGET if self._needs_scan(filt) else limit
        rows = self._all(
            f"SELECT {_ROW_COLUMNS} FROM {{s}}.items WHERE {' AND '.join(where)} ORDER BY id LIMIT %s",
            (*params, fetch),
        )
        out: list[dict[str, Any]] = []
        scanned = 0
        for values in rows:
            scanned += 1
            row = decode(values)
            if filt.matches(row):
                out.append(row)
                if len(out) == limit:
                    break
        more = scanned < len(rows) or len(rows) == fetch
        last = bytes(rows[scanned - 1][0]).hex() if scanned else None
        return Page(out, last if more and last else None, scanned)

    @staticmethod
    def _needs_scan(filt: ItemFilter) -> bool:
        """Filters the partial indexes do not answer: these look inside rows and reviews, a bounded number a page."""
        specific_flag = filt.flag is not None and filt.flag != "any"
        return bool(filt.text or filt.model_version or filt.error_class or specific_flag or filt.corrected is False)

    def item(self, job_id: str, item_id: str) -> dict[str, Any] | None:
        self.job(job_id)
        values = self._one(
            f"SELECT {_ROW_COLUMNS} FROM {{s}}.items WHERE job_id = %s AND id = %s", (job_id, codec.id_bytes(item_id))
        )
        return None if values is None else self._decoder(job_id)(values)

    def review_rows(self, job_id: str, item_ids: list[str]) -> list[dict[str, Any] | None]:
        self.job(job_id)
        if not item_ids:
            return []
        decode = self._decoder(job_id)
        found = self._all(
            f"SELECT {_ROW_COLUMNS} FROM {{s}}.items WHERE job_id = %s AND id = ANY(%s)",
            (job_id, [codec.id_bytes(i) for i in item_ids]),
        )
        rows = {row["id"]: row for row in map(decode, found)}
        return [rows.get(i) for i in item_ids]

    def reviewed(self, job_id: str) -> Iterator[dict[str, Any]]:
        self.job(job_id)
        rows = self._stream(check_job_id(job_id), "review IS NOT NULL AND status = 'o'")
        # A review cleared back to nothing stays (it holds the item's version) but is no longer reviewed.
        yield from (r for r in rows if "corrected" in r or "mark" in r)

    def _log_review(self, job_id: str, item_id: str, version: int, entry: dict[str, Any]) -> bool:
        # The entry is JSON in bytea, not jsonb: a correction may hold any string, NUL included.
        sql = "INSERT INTO {s}.review_log (job_id, id, version, entry) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"
        return self._run(sql, (job_id, codec.id_bytes(item_id), version, json.dumps(entry).encode())) == 1

    def _put_review(self, job_id: str, item_id: str, packed: bytes) -> None:
        self._run(
            "UPDATE {s}.items SET review = %s WHERE job_id = %s AND id = %s", (packed, job_id, codec.id_bytes(item_id))
        )

    def review_history(self, job_id: str, item_id: str) -> list[dict[str, Any]]:
        self.job(job_id)
        rows = self._all(
            "SELECT entry FROM {s}.review_log WHERE job_id = %s AND id = %s ORDER BY version",
            (job_id, codec.id_bytes(item_id)),
        )
        return [json.loads(bytes(r[0])) for r in rows]


def _item_values(
    row: ItemResult, raw: bytes, status: str, bits: int, pv: int, base: str, job_id: str
) -> tuple[Any, ...]:
    error_class = None
    if row.status is not ItemStatus.OK:
        error_class = codec.error_index(row.error_class)
    ref = codec.pack_ref(row.ref, base)
    caption = row.caption if row.status is ItemStatus.OK else None
    error = None if row.status is ItemStatus.OK else (row.error or "")
    # Text PostgreSQL cannot hold: the row's text is stored escaped, and marked so (see ledger.postgres.text).
    escaped = any(t is not None and text.unsafe(t) for t in (ref, caption, error))
    if escaped:
        bits |= text.ESCAPED_BIT
    return (
        text.text_in(ref, escaped),
        status,
        text.text_in(caption, escaped),
        text.text_in(error, escaped),
        error_class,
        pv,
        row.attempts,
        round(row.finished_at, 1) if row.finished_at else None,  # the precision the Redis rows keep
        bits,
        text.object_in(extra) if (extra := codec.extra_with_confidence(row)) else None,
        text.object_in(others) if (others := codec.other_captions(row)) is not None else None,
        job_id,
        raw,
    )


def _row_from_columns(values: tuple[Any, ...], base: str, table: list[codec.Provenance]) -> dict[str, Any]:
    """An items table row as the row dict the Redis ledger gives for the same item."""
    raw, ref, status, caption, error, error_class, pv, attempts, finished, bits, extra, review, others = values
    escaped = bool(bits & text.ESCAPED_BIT)
    ref, caption, error = text.text_out(ref, escaped), text.text_out(caption, escaped), text.text_out(error, escaped)
    row: dict[str, Any] = {"id": codec.id_text(bytes(raw)), "ref": codec.unpack_ref(ref, base)}
    if status is None:
        row["status"] = ItemStatus.PENDING.value
        return row
    row["status"] = _CHAR_STATUS[status].value
    if status == "o":
        row["caption"] = caption
        flags = [name for name, bit in codec.FLAG_BITS.items() if bits & bit]
        if flags:
            row["flags"] = flags
    else:
        row["error_class"] = codec.error_code(error_class)
        row["error"] = error
    codec.add_provenance(row, table, pv)
    row["attempts"] = attempts
    codec.add_marks(row, transient=bool(bits & codec.TRANSIENT_BIT), reused=bool(bits & codec.REUSED_BIT))
    if finished:
        row["finished_at"] = float(finished)
    codec.put_extra(row, text.object_out(extra) if extra else None)
    if status == "o" and (names := codec.task_names(table, pv)):
        row["captions"] = dict(zip(names, [caption, *(text.object_out(others) or ())], strict=False))
    if review:
        row.update(codec.decode_review(bytes(review)))
    return row


def _reused_in(caption: str, flags: list[str]) -> tuple[str, list[str]]:
    """A reused caption and its flags as stored: escaped, with ``ESCAPED_FLAG`` among the flags, when needed."""
    escaped = text.unsafe(caption) or any(text.unsafe(f) or f == text.ESCAPED_FLAG for f in flags)
    if not escaped:
        return caption, flags
    return text.escape(caption), [*(text.escape(f) for f in flags), text.ESCAPED_FLAG]


def _reused_out(caption: str, flags: list[str]) -> tuple[str, list[str]]:
    if text.ESCAPED_FLAG not in flags:
        return caption, flags
    return text.unescape(caption), [text.unescape(f) for f in flags if f != text.ESCAPED_FLAG]
