"""The ledger in PostgreSQL, for jobs larger than Redis memory: ``schema`` (tables and their DDL), ``text`` (text
PostgreSQL cannot hold, stored escaped), ``pool`` (connections) and ``ledger`` (``PostgresLedger``)."""

from __future__ import annotations

from ledger.postgres.ledger import PostgresLedger

__all__ = ["PostgresLedger"]
