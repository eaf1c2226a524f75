"""Worker log lines: job and task ids on every line, plain or JSON (CAPTIONER_LOG_JSON)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

current_job: ContextVar[str] = ContextVar("current_job", default="-")
#: The Celery task id, for threads the task hands work to (decode threads have no current_task of their own).
current_task_id: ContextVar[str] = ContextVar("current_task_id", default="-")


@contextmanager
def job_context(job_id: str | None, task_id: str | None = None) -> Iterator[None]:
    """Job and task ids on the lines logged inside, in this thread and in work it submits with a copied context."""
    job_token = current_job.set(job_id or "-")
    task_token = current_task_id.set(task_id or "-")
    try:
        yield
    finally:
        current_task_id.reset(task_token)
        current_job.reset(job_token)


class ContextFilter(logging.Filter):
    """Adds ``job_id`` and ``task_id`` to every record (``-`` outside a task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from celery import current_task

        task = current_task._get_current_object() if current_task else None
        record.task_id = getattr(getattr(task, "request", None), "id", None) or current_task_id.get()
        record.job_id = current_job.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "job_id": getattr(record, "job_id", "-"),
            "task_id": getattr(record, "task_id", "-"),
            "process": record.processName,
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


PLAIN = "[%(asctime)s: %(levelname)s/%(processName)s] job=%(job_id)s task=%(task_id)s %(message)s"


def configure(logger: logging.Logger, *, as_json: bool) -> None:
    """Give every handler of ``logger`` the context filter and our format."""
    formatter = JsonFormatter() if as_json else logging.Formatter(PLAIN)
    for handler in logger.handlers:
        handler.addFilter(ContextFilter())
        handler.setFormatter(formatter)
