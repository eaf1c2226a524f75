"""Celery apps: broker, JSON-only serialisation, routing and ack policy, one configuration for every program.
Imports no torch. Senders build an app here with no task module; the caption worker's app (``worker.celery_app``)
and the training worker's (``training.celery_app``) add their task modules.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger
from kombu import Exchange, Queue

from common.connections import queue_depths as _depths
from common.connections import tls_options
from common.messages import CAPTION_TASKS, INTERACTIVE_TASKS, TRAINING_TASKS
from common.settings import Settings, get_settings
from runtime.logs import configure as configure_logs


def celery_config(settings: Settings) -> dict[str, Any]:
    """Everything Celery needs from our settings, in one place."""
    routes = {name: {"queue": settings.caption_queue} for name in CAPTION_TASKS}
    routes |= {name: {"queue": settings.interactive_queue_name} for name in INTERACTIVE_TASKS}
    routes |= {name: {"queue": settings.training_queue} for name in TRAINING_TASKS}
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        # Take from the queues in the order the worker lists them (interactive before bulk), not in turn.
        "queue_order_strategy": "priority",
        # kombu 5.7: sweep for messages of dead workers every interval (default is ~100 s).
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        # A worker killed during its own sweep leaves the sweep's mutex behind; kombu's default (300 s)
        # would stop every other worker from restoring anything for five minutes.
        "unacked_mutex_expire": max(10, 3 * settings.unacked_restore_interval_s),
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
    }
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url_str,
        "result_backend": settings.result_backend_str,
        # JSON only, both ways: a pickle body is refused before anything in it can run.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Ack after the results are recorded; a crash means redelivery, and writes are idempotent.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker waits for Redis to come back, forever
        "task_routes": routes,
        "task_default_queue": settings.caption_queue,
        # A plain `celery -A worker.celery_app worker` consumes both caption queues, interactive first.
        "task_queues": [Queue(name, Exchange(name, "direct"), routing_key=name) for name in settings.caption_queues],
        # ... and in threads: one model per process, shared by every thread's batches. Prefork would fork a
        # loaded model (and its CUDA context) into children, which breaks; _warm_up refuses it.
        "worker_pool": "threads",
        "worker_concurrency": settings.concurrency,
        "result_expires": settings.result_expires_s,
        "result_extended": True,
        "task_track_started": True,
        # Events on, so Flower and `celery events` see every task.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    tls = tls_options(settings)
    if settings.broker_url_str.startswith("rediss://"):
        conf["broker_use_ssl"] = tls
    if settings.result_backend_str.startswith("rediss://"):
        conf["redis_backend_use_ssl"] = tls
    return conf


@after_setup_logger.connect
def _log_format(logger: logging.Logger, **kwargs: Any) -> None:
    """Every worker's log lines carry job and task ids; JSON lines when CAPTIONER_LOG_JSON is on."""
    configure_logs(logger, as_json=get_settings().log_json)


def queue_depths(app: Celery, settings: Settings) -> dict[str, int]:
    """Messages waiting in each of the deployment's queues, read through the app's broker connection."""
    with app.connection_for_read() as conn:
        return _depths(conn.default_channel.client, settings.queues)


def create_app(settings: Settings | None = None, *, include: tuple[str, ...] = ()) -> Celery:
    """A Celery app with our configuration; ``include`` names the task modules a worker of it imports at start.

    Senders (the producer, other services) need no task module: they send by name.
    """
    settings = settings or get_settings()
    if settings.broker_url_str.startswith(("redis://", "rediss://")):
        # kombu's Redis transport, except that a malformed or oversized message is dropped (logged, counted).
        from runtime import broker

        broker.install()
    app = Celery("captioner", include=list(include))
    app.conf.update(celery_config(settings))
    return app
