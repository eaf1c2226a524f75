"""The Redis broker transport of every Celery app here: kombu's own, except that a message whose envelope does not
decode (``LPUSH captions-now '{not json'``, a list, an envelope without properties), or that is larger than any
message a sender of ours makes (``CAPTIONER_MAX_MESSAGE_BYTES``, checked on the bytes Redis answered, before kombu
decodes the JSON), is dropped with a log line and a counter instead of ending or swamping the worker.

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


class OversizedMessage(ValueError):
    """A broker message larger than CAPTIONER_MAX_MESSAGE_BYTES: dropped before its JSON is decoded."""


def _size_checked(inner: Any, limit: int) -> Any:
    """A redis-py response callback for BRPOP and RPOP that refuses a popped message over ``limit`` bytes (the bytes
    are read already; what is spared is decoding them into objects, several times their size), then defers to
    ``inner``, the client's own callback."""

    def check(response: Any, **options: Any) -> Any:
        parts = response if isinstance(response, list | tuple) else [response]
        for part in parts:
            if isinstance(part, bytes | str) and len(part) > limit:
                raise OversizedMessage(
                    f"a message of {len(part)} bytes, over CAPTIONER_MAX_MESSAGE_BYTES ({limit}): larger than any "
                    "chunk, container or call a sender of ours makes"
                )
        return inner(response, **options) if inner is not None else response

    return check


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; a message that cannot be decoded or delivered as a message is dropped, logged."""

    def _create_client(self, asynchronous: bool = False) -> Any:
        from common.settings import get_settings

        client = super()._create_client(asynchronous=asynchronous)
        limit = get_settings().max_message_bytes
        for command in ("BRPOP", "RPOP"):
            client.set_response_callback(command, _size_checked(client.response_callbacks.get(command), limit))
        return client

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
