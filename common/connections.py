"""Redis connections, made one way for every program: bounded timeouts, certificate checks for rediss://, and
the errors that mean "Redis is briefly unavailable" rather than "this is a bug".

The ledger, the Celery app's broker and backend options, the doctor and queue depths all come through here.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

import redis

from common.settings import Settings

#: Redis failures that pass by themselves: a restart, a network blip, memory freed after maxmemory. Writes that
#: meet one are retried (the message stays unacknowledged meanwhile); anything else is a bug or a refusal.
RETRYABLE_REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
)

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def redis_client(url: str, **tls: Any) -> redis.Redis:
    """A Redis client with bounded timeouts, so an unreachable Redis is an error, not a hang."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30, **tls)


def tls_options(settings: Settings, url: str = "rediss://") -> dict[str, Any]:
    """redis-py's certificate options for ``url`` when it is rediss:// (Settings refuses rediss:// without them).

    The same names serve Celery's ``broker_use_ssl`` and ``redis_backend_use_ssl``.
    """
    if not url.startswith("rediss://"):
        return {}
    opts: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[settings.redis_ssl_cert_reqs or "required"]}
    if settings.redis_ssl_ca_certs is not None:
        opts["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    return opts


def settings_client(settings: Settings, url: str | None = None) -> redis.Redis:
    """A client for the ledger Redis (or ``url``) with the settings' TLS options: the one way clients are made."""
    url = url or settings.redis_url_str
    return redis_client(url, **tls_options(settings, url))


#: kombu's Redis transport keeps a queue in one list per priority step: the queue's name (step 0, and messages without
#: a priority), and the name + PRIORITY_SEP + step for the others (kombu.transport.redis.Channel's defaults, which our
#: Celery configuration keeps).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)


def priority_lists(queue: str) -> list[str]:
    """The Redis lists holding ``queue``'s waiting messages, one per priority step."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue of a Redis broker, every priority's list counted (not those workers hold)."""
    pipe = client.pipeline(transaction=False)
    names = list(queues)
    for name in names:
        for key in priority_lists(name):
            pipe.llen(key)
    sizes = [int(n) for n in pipe.execute()]
    steps = len(PRIORITY_STEPS)
    return {name: sum(sizes[i * steps : (i + 1) * steps]) for i, name in enumerate(names)}
