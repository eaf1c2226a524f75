"""The Celery app of training workers: the caption app's broker, serialisation and routing, with the training
tasks instead of the caption tasks (``captioner worker --training``, or ``celery -A training.celery_app worker``)."""

from __future__ import annotations

from runtime.celery_app import create_app

app = create_app(include=("training.tasks",))
