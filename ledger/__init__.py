"""The job ledger: the durable record of every job and item (the Celery result backend is only a cache).

``ledger_from_settings`` gives the backend the settings name: Redis by default, PostgreSQL when
``CAPTIONER_LEDGER_URL`` is a postgresql:// URL (jobs larger than Redis memory).
"""

from __future__ import annotations

from common.settings import Settings
from ledger.base import (
    MAX_CORRECTION_CHARS,
    MAX_REVIEW_IDS,
    PAGE_SCAN_BUDGET,
    REVIEW_MARKS,
    Attempt,
    ItemFilter,
    JobInfo,
    Ledger,
    Page,
    Recorded,
    check_job_id,
)
from ledger.redis_ledger import RedisLedger, redis_ledger

__all__ = [
    "MAX_CORRECTION_CHARS",
    "MAX_REVIEW_IDS",
    "PAGE_SCAN_BUDGET",
    "REVIEW_MARKS",
    "Attempt",
    "ItemFilter",
    "JobInfo",
    "Ledger",
    "Page",
    "Recorded",
    "RedisLedger",
    "check_job_id",
    "ledger_from_settings",
]


def ledger_from_settings(settings: Settings) -> Ledger:
    """The job ledger the settings name: PostgreSQL for a postgresql:// ``ledger_url``, else Redis."""
    url = settings.ledger_url_str
    if url:
        from ledger.pg_ledger import PostgresLedger

        return PostgresLedger(url, settings.key_prefix)
    return redis_ledger(settings)
