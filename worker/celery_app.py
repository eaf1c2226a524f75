"""The caption worker's Celery app (``celery -A worker.celery_app worker``, ``captioner worker``): the shared
configuration with the caption tasks."""

from __future__ import annotations

from runtime.celery_app import create_app

app = create_app(include=("worker.tasks",))
