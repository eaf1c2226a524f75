"""The PostgreSQL ledger's tables: their DDL, the schema they live in, and creating them on first use.

Tables live in a schema named after the key prefix (``captioner``; other characters than letters, digits and
``_`` become ``_``):

  jobs        one row per job: counters, state, options, JSON fields, the provenance table, expiry
  items       one row per item: reference, and once settled its row (status, caption or error, provenance index,
              attempts, flags), attempt counts while unsettled, the review (correction, mark, reviewer, time)
  containers  shards and row groups whose items are not all known yet
  locks       the training runner holding each job
  reuse       captions by image digest, per model version and parameters

Text that PostgreSQL cannot hold (NUL, lone surrogates) is stored escaped, marked per row: ``ledger.postgres.text``.
"""

from __future__ import annotations

import re
from typing import Any

from ledger import codec

#: Per-flag caption counters of a job (``jobs.f_<flag>``).
FLAG_COLUMNS = {name: f"f_{name}" for name in codec.FLAG_BITS}
#: The tables, in the order they are created (the last one's presence says the schema is complete).
TABLES = ("jobs", "items", "containers", "review_log", "locks", "reuse")
#: The items column added last: a schema without it gets the statements again (each one IF NOT EXISTS).
NEWEST_COLUMN = "captions"

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.jobs (
  id text PRIMARY KEY,
  kind text NOT NULL,
  name text NOT NULL,
  params jsonb,
  state text NOT NULL,
  created double precision NOT NULL,
  finished double precision,
  open boolean NOT NULL DEFAULT true,
  base text NOT NULL DEFAULT '',
  n_total bigint NOT NULL DEFAULT 0,
  n_ok bigint NOT NULL DEFAULT 0,
  n_error bigint NOT NULL DEFAULT 0,
  n_cancelled bigint NOT NULL DEFAULT 0,
  {flag_columns},
  extra jsonb,
  fields jsonb NOT NULL DEFAULT '{{}}',
  provenance jsonb NOT NULL DEFAULT '[]',
  expires double precision
);
CREATE INDEX IF NOT EXISTS jobs_created ON {s}.jobs (created DESC);
CREATE TABLE IF NOT EXISTS {s}.items (
  job_id text NOT NULL REFERENCES {s}.jobs (id) ON DELETE CASCADE,
  id bytea NOT NULL,
  ref text NOT NULL,
  status "char",
  caption text,
  error text,
  error_class smallint,
  pv smallint,
  attempts integer,
  finished double precision,
  flagbits smallint NOT NULL DEFAULT 0,
  extra jsonb,
  att_started integer NOT NULL DEFAULT 0,
  att_finished integer NOT NULL DEFAULT 0,
  att_alone integer NOT NULL DEFAULT 0,
  review bytea,
  PRIMARY KEY (job_id, id)
);
CREATE INDEX IF NOT EXISTS items_pending ON {s}.items (job_id, id) WHERE status IS NULL;
CREATE INDEX IF NOT EXISTS items_errors ON {s}.items (job_id, id) WHERE status = 'e';
CREATE INDEX IF NOT EXISTS items_flagged ON {s}.items (job_id, id) WHERE (flagbits & 7) <> 0;
CREATE INDEX IF NOT EXISTS items_reviewed ON {s}.items (job_id, id) WHERE review IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.containers (
  job_id text NOT NULL REFERENCES {s}.jobs (id) ON DELETE CASCADE,
  id text NOT NULL,
  spec text NOT NULL,
  PRIMARY KEY (job_id, id)
);
-- The captions of a row's second and later tasks (codec.other_captions); added to tables made before it existed.
ALTER TABLE {s}.items ADD COLUMN IF NOT EXISTS captions jsonb;
CREATE TABLE IF NOT EXISTS {s}.review_log (
  job_id text NOT NULL REFERENCES {s}.jobs (id) ON DELETE CASCADE,
  id bytea NOT NULL,
  version integer NOT NULL,
  entry bytea NOT NULL,
  PRIMARY KEY (job_id, id, version)
);
CREATE TABLE IF NOT EXISTS {s}.locks (job_id text PRIMARY KEY, owner text NOT NULL, expires double precision NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.reuse (
  key text NOT NULL,
  digest bytea NOT NULL,
  caption text NOT NULL,
  flags text[] NOT NULL,
  expires double precision NOT NULL,
  PRIMARY KEY (key, digest)
);
"""

#: Marks a job done once every item has a row and no container is open, unless the producer is still adding.
FINISH = """
UPDATE {s}.jobs SET state = 'done', finished = %(now)s
WHERE id = %(job)s AND state = 'running' AND NOT open AND n_total > 0 AND n_ok + n_error + n_cancelled >= n_total
  AND NOT EXISTS (SELECT 1 FROM {s}.containers WHERE job_id = %(job)s)
RETURNING 1
"""


def schema_name(prefix: str) -> str:
    """The PostgreSQL schema for a key prefix: letters, digits and underscores, lower case."""
    name = re.sub(r"[^a-z0-9_]", "_", prefix.lower()) or "captioner"
    return name if name[0].isalpha() else f"c_{name}"


def ddl(schema: str) -> str:
    """The statements that create the schema and its tables."""
    flags = ",\n  ".join(f"{c} bigint NOT NULL DEFAULT 0" for c in FLAG_COLUMNS.values())
    return SCHEMA.replace("{flag_columns}", flags).format(s=schema)


def tables_exist(conn: Any, schema: str) -> bool:
    """Whether every table of this schema exists: a schema made by an older version gets the tables added since
    (every statement is IF NOT EXISTS), once."""
    names = [f"{schema}.{t}" for t in TABLES]
    found = conn.execute("SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest(%s::text[]) AS n", (names,))
    if not found.fetchone()[0]:
        return False
    newest = conn.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = %s AND table_name = 'items' "
        "AND column_name = %s",
        (schema, NEWEST_COLUMN),
    )
    return newest.fetchone() is not None


def create(conn: Any, schema: str) -> None:
    """Create the tables when they are missing, one creator at a time across processes.

    Only when missing: CREATE INDEX IF NOT EXISTS takes a share lock on its table even when the index exists,
    which deadlocks against workers writing rows. The advisory lock serializes creators, who check again under it.
    """
    if not tables_exist(conn, schema):
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema,))
        if not tables_exist(conn, schema):
            conn.execute(ddl(schema))
