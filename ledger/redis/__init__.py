"""The ledger in Redis (the default): ``keys`` (the key layout), ``rows`` (the compact row), ``scripts`` (Lua, one
per write), ``connection`` (client and scripts) and ``ledger`` (``RedisLedger``, every contract)."""

from __future__ import annotations

from common.connections import settings_client
from common.settings import Settings
from ledger.redis.ledger import RedisLedger

__all__ = ["RedisLedger", "redis_ledger"]


def redis_ledger(settings: Settings) -> RedisLedger:
    """The Redis ledger the settings name (URL, TLS options, key prefix)."""
    return RedisLedger(settings_client(settings), settings.key_prefix)
