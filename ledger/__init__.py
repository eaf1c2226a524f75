"""The job ledger: the durable record of every job and item (the Celery result backend is only a cache).

``contracts`` says what each caller uses (jobs, items and rows, review, the reuse cache, training runs) and
``Ledger`` holds them all; ``records`` holds the records they hand out (``TrainingRun`` among them). Backends:
``ledger.redis`` (the default) and ``ledger.postgres`` (``CAPTIONER_LEDGER_URL`` is a postgresql:// URL: jobs
larger than Redis memory), each with its stored layout apart from its connection handling.
"""

from __future__ import annotations

from common.settings import Settings
from ledger.contracts import ItemLedger, JobLedger, Ledger, LedgerConnection, ReuseCache, ReviewLedger, TrainingRuns
from ledger.records import (
    MAX_CORRECTION_CHARS,
    MAX_REVIEW_IDS,
    PAGE_SCAN_BUDGET,
    REVIEW_MARKS,
    Attempt,
    ItemFilter,
    JobInfo,
    Page,
    Recorded,
    TrainingRun,
    TrainResult,
    check_job_id,
)
from ledger.redis import RedisLedger, redis_ledger

__all__ = [
    "MAX_CORRECTION_CHARS",
    "MAX_REVIEW_IDS",
    "PAGE_SCAN_BUDGET",
    "REVIEW_MARKS",
    "Attempt",
    "ItemFilter",
    "ItemLedger",
    "JobInfo",
    "JobLedger",
    "Ledger",
    "LedgerConnection",
    "Page",
    "Recorded",
    "RedisLedger",
    "ReuseCache",
    "ReviewLedger",
    "TrainResult",
    "TrainingRun",
    "TrainingRuns",
    "check_job_id",
    "ledger_from_settings",
]


def ledger_from_settings(settings: Settings) -> Ledger:
    """The job ledger the settings name: PostgreSQL for a postgresql:// ``ledger_url``, else Redis."""
    url = settings.ledger_url_str
    if url:
        from ledger.postgres import PostgresLedger

        return PostgresLedger(url, settings.key_prefix)
    return redis_ledger(settings)
