"""Reaching the Redis ledger: the client, the ledger's scripts registered on it, and the server's health."""

from __future__ import annotations

import redis

from common.errors import BrokerUnavailable
from ledger.redis import scripts as lua


class Connection:
    """One Redis client and the ledger's scripts on it (sent by digest, loaded again if the server lost them)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        oom = lua.OOM_CHECKED
        self.record = client.register_script(oom + lua.RECORD)
        self.seal = client.register_script(oom + lua.SEAL)
        self.close_container = client.register_script(oom + lua.CLOSE_CONTAINER)
        self.requeue = client.register_script(oom + lua.REQUEUE)
        self.add_items = client.register_script(oom + lua.ADD_ITEMS)
        self.begin = client.register_script(oom + lua.BEGIN)
        self.provenance = client.register_script(oom + lua.PROVENANCE)
        # A lock's few bytes must stay refreshable at maxmemory: losing it would stop a fine-tune mid-run.
        self.lock = client.register_script("#!lua flags=allow-oom\n" + lua.LOCK)
        self.unlock = client.register_script("#!lua flags=allow-oom\n" + lua.UNLOCK)

    def ping(self) -> None:
        try:
            self.r.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot reach the ledger Redis: {exc}") from None

    def close(self) -> None:
        self.r.close()

    def bytes_used(self) -> int:
        return int(self.r.info("memory")["used_memory"])
