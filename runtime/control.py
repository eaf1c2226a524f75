"""Remote control of a worker for rolling upgrades: ``captioner_drain`` (``captioner workers drain NODE``).

A drained worker stops consuming every queue at once, finishes the messages it already holds (prefetched ones
included, URL fetches included: unlike SIGTERM it abandons nothing), then shuts down warmly and exits 0. Whatever is
still unacked at exit (a countdown retry it was holding) goes back to its queue, as on any warm shutdown. Registered
in a worker process by importing this module (worker.tasks does).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.platforms import EX_OK
from celery.worker import state as worker_state
from celery.worker.control import control_command, inspect_command

log = logging.getLogger(__name__)

#: Set once a drain has been asked for; `captioner workers list` shows it.
DRAINING = threading.Event()
_POLL_S = 0.2


@control_command()
def captioner_drain(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Stop consuming, finish the messages in hand, then warm-shut down (exit 0)."""
    consumer = state.consumer
    if DRAINING.is_set():
        return {"ok": "already draining"}
    DRAINING.set()
    queues = [q.name for q in consumer.task_consumer.queues]
    for queue in queues:
        consumer.cancel_task_queue(queue)  # in the consumer's own thread: control commands run there
    held = len(worker_state.reserved_requests) + len(worker_state.active_requests)
    log.warning(
        "draining: stopped consuming %s; exiting once the %d message(s) in hand are done",
        ", ".join(queues) or "nothing",
        held,
    )
    threading.Thread(target=_exit_when_idle, name="drain", daemon=True).start()
    return {"ok": "draining", "queues": queues, "in_hand": held}


@inspect_command()
def captioner_draining(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Whether this worker is draining, and the messages it still holds."""
    return {
        "draining": DRAINING.is_set(),
        "in_hand": len(worker_state.reserved_requests) + len(worker_state.active_requests),
    }


def _exit_when_idle() -> None:
    """Wait until nothing is reserved or running, then ask the consumer loop for a warm shutdown."""
    idle = threading.Event()
    while not idle.wait(_POLL_S):
        if not worker_state.reserved_requests and not worker_state.active_requests:
            idle.set()
    log.warning("drained: nothing in hand; shutting down")
    worker_state.should_stop = EX_OK  # read by the consumer loop (state.maybe_shutdown) at its next turn
