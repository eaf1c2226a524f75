"""The Redis broker transport of every Celery app here: kombu's own, except that a message whose envelope does not
decode (``LPUSH captions-now '{not json'``, a list, an envelope without properties) is dropped with a log line and a
counter instead of ending the worker.

kombu's Redis channel pops a message with BRPOP and decodes its JSON envelope inside its event loop; an exception there
reaches Celery as "Unrecoverable error" and the worker exits (celery/celery#1113, #4308). The message is already off
the list and no unacked copy was written (that happens only once the envelope is a message), so dropping it loses
nothing a sender could have meant; a body that is an envelope's but does not decode is Celery's to handle (it logs
and acks it), and a task payload of the wrong shape is ours (``InvalidMessage``).
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

#: What decoding or unpacking a malformed envelope raises (JSONDecodeError and UnicodeDecodeError are ValueErrors).
MALFORMED = (ValueError, KeyError, TypeError, AttributeError, IndexError)


def _dropped(where: str, exc: BaseException) -> None:
    from runtime import metrics

    metrics.BROKER_DROPPED.inc()
    log.error(
        "dropped a broker message whose envelope does not decode (%s): %s: %s",
        where,
        type(exc).__name__,
        str(exc)[:200],
    )


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; a message that cannot be decoded or delivered as a message is dropped, logged."""

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except MALFORMED as exc:
            _dropped("BRPOP", exc)
            return False

    def _get(self, queue: str) -> Any:
        try:
            return super()._get(queue)
        except MALFORMED as exc:
            _dropped(f"RPOP {queue}", exc)
            raise Empty() from None


class Transport(kombu_redis.Transport):
    Channel = Channel


#: The transport's path, as kombu's alias table names transports.
TRANSPORT = f"{__name__}:Transport"


def install() -> None:
    """Make redis:// and rediss:// broker URLs mean this transport in this process, through kombu's own alias table
    (a name Celery resolves per connection), so URLs, log lines ("Cannot connect to redis://...") and every other
    kombu user in the process stay as they were."""
    from kombu import transport

    for scheme in ("redis", "rediss"):
        transport.TRANSPORT_ALIASES[scheme] = TRANSPORT
        transport._transport_cache.pop(scheme, None)  # resolved before: resolve again to this class
