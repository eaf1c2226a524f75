"""Reaching the PostgreSQL ledger: a connection pool opened on first use, which creates the tables if missing."""

from __future__ import annotations

import threading
from typing import Any

from common.errors import BrokerUnavailable
from ledger.postgres import schema as tables


class Pool:
    """Pooled connections to one database, with statements written against ``{s}`` (the ledger's schema)."""

    def __init__(self, url: str, schema: str, *, max_connections: int = 8) -> None:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError:
            from common.errors import ConfigError

            raise ConfigError("a postgresql:// ledger needs psycopg (pip install 'captioner[postgres]')") from None
        self.schema = schema
        self._pool = ConnectionPool(
            url, min_size=1, max_size=max_connections, open=False, kwargs={"connect_timeout": 5}, name="ledger"
        )
        self._ready = threading.Lock()
        self._opened = False

    def sql(self, text: str) -> str:
        return text.replace("{s}", self.schema)

    def connection(self) -> Any:
        """A pooled connection (a context manager); the tables are created on first use."""
        if not self._opened:
            with self._ready:
                if not self._opened:
                    try:
                        self._pool.open(wait=True, timeout=10)
                    except Exception as exc:
                        raise BrokerUnavailable(f"cannot reach the ledger PostgreSQL: {exc}") from None
                    with self._pool.connection() as conn:
                        tables.create(conn, self.schema)
                    self._opened = True
        return self._pool.connection()

    def one(self, sql: str, params: Any = None) -> Any:
        with self.connection() as conn:
            return conn.execute(self.sql(sql), params).fetchone()

    def all(self, sql: str, params: Any = None) -> list[Any]:
        with self.connection() as conn:
            return list(conn.execute(self.sql(sql), params).fetchall())

    def run(self, sql: str, params: Any = None) -> int:
        with self.connection() as conn:
            return int(conn.execute(self.sql(sql), params).rowcount)

    def ping(self) -> None:
        try:
            self.one("SELECT 1")
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"cannot reach the ledger PostgreSQL: {exc}") from None

    def close(self) -> None:
        self._pool.close()

    def bytes_used(self) -> int:
        sizes = self.one("SELECT " + " + ".join(f"pg_total_relation_size('{{s}}.{t}')" for t in tables.TABLES))
        return int(sizes[0])
