"""Whole-view operations of the review page: a filtered view's items in a chosen order with its total, and bulk
actions on everything a filter matches, run as one background job with progress (not a loop over pages).

A sorted or counted view needs every matching item once: the ids (with the few fields an order needs) are read
through the ledger's bounded pages and kept for ``VIEW_TTL_S``, so paging through a 10,000-item view reads the
job once, not once per page.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidReview
from ledger import MAX_REVIEW_IDS, ItemFilter, Ledger

#: Orders a view can be read in: the ledger's own (fastest), file name, flags first, least confident first.
SORTS = {
    "": "as stored",
    "name": "file name",
    "flag": "flagged first",
    "confidence": "least confident first",
    "reviewed": "recently reviewed first",
}
#: Seconds a computed view (its ordered ids) is reused; an edit in the page refreshes it.
VIEW_TTL_S = 30.0
#: Most items a sorted or counted view holds; past it the page says so and shows the ledger's order.
MAX_VIEW_ITEMS = 200_000
#: Views kept at once (each a list of ids and sort keys: about 100 bytes an item).
MAX_VIEWS = 8


def _sort_key(sort: str, row: dict[str, Any]) -> tuple[Any, ...]:
    name = str(row.get("ref") or "").rsplit("/", 1)[-1]
    if sort == "name":
        return (name, row["id"])
    if sort == "flag":
        return (0 if row.get("flags") else 1, row.get("status") != "error", name)
    if sort == "confidence":
        conf = row.get("confidence")
        return (conf is None, conf if conf is not None else 0.0, name)  # rows without a confidence last
    if sort == "reviewed":
        return (-(row.get("reviewed_at") or 0.0), name)
    return ()


@dataclass
class View:
    """The ordered ids of one job's filtered view, as of ``made``."""

    ids: list[str]
    complete: bool
    made: float = field(default_factory=time.monotonic)


class Views:
    """Computes and caches views; thread-safe (handlers call it from the thread pool)."""

    def __init__(self) -> None:
        self._views: dict[tuple[str, ItemFilter, str], View] = {}
        self._lock = threading.Lock()

    def forget(self, job_id: str) -> None:
        """Drop a job's views (after a write that may move items between filters)."""
        with self._lock:
            for key in [k for k in self._views if k[0] == job_id]:
                del self._views[key]

    def get(self, ledger: Ledger, job_id: str, filt: ItemFilter, sort: str) -> View:
        if sort not in SORTS:
            raise InvalidReview(f"sort must be one of {', '.join(k or '(none)' for k in SORTS)}, not {sort!r}")
        key = (job_id, filt, sort)
        with self._lock:
            view = self._views.get(key)
        if view is not None and time.monotonic() - view.made < VIEW_TTL_S:
            return view
        rows: list[tuple[tuple[Any, ...], str]] = []
        cursor: str | None = None
        complete = True
        while True:
            page = ledger.page(job_id, cursor=cursor, limit=MAX_REVIEW_IDS, filt=filt)
            rows.extend((_sort_key(sort, r), r["id"]) for r in page.rows)
            cursor = page.cursor
            if cursor is None:
                break
            if len(rows) >= MAX_VIEW_ITEMS:
                complete = False
                break
        if sort:
            rows.sort(key=lambda pair: pair[0])
        view = View([i for _, i in rows], complete)
        with self._lock:
            if len(self._views) >= MAX_VIEWS:
                del self._views[min(self._views, key=lambda k: self._views[k].made)]
            self._views[key] = view
        return view


@dataclass
class Bulk:
    """One bulk action's progress, as ``GET /api/bulk/<id>`` shows it."""

    id: str
    job_id: str
    action: str
    total: int = 0
    done: int = 0
    changed: int = 0
    state: str = "running"
    error: str | None = None
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("id", "job_id", "action", "total", "done", "changed", "state", "error", "started")
        }


#: What a bulk action does: accept, reject (with a reason), clear marks, or caption again.
BULK_ACTIONS = ("accept", "reject", "unmark", "again")
#: Bulk actions kept for their progress to be read (the oldest finished ones go first).
MAX_BULKS = 50


class Bulks:
    """Runs bulk actions in background threads, one ``MAX_REVIEW_IDS`` batch at a time, counting as they go."""

    def __init__(self) -> None:
        self._bulks: dict[str, Bulk] = {}
        self._lock = threading.Lock()

    def get(self, bulk_id: str) -> Bulk:
        with self._lock:
            bulk = self._bulks.get(bulk_id)
        if bulk is None:
            from common.errors import UnknownJob

            raise UnknownJob(f"no bulk action {bulk_id!r} (they are kept until the page restarts)")
        return bulk

    def start(self, job_id: str, action: str, ids: list[str], run_batch: Any) -> Bulk:
        """Start ``run_batch(batch) -> changed`` over ``ids`` in batches; returns the bulk to follow."""
        if action not in BULK_ACTIONS:
            raise InvalidReview(f"action must be one of {', '.join(BULK_ACTIONS)}, not {action!r}")
        bulk = Bulk(id=uuid.uuid4().hex[:12], job_id=job_id, action=action, total=len(ids))
        with self._lock:
            finished = [b for b in self._bulks.values() if b.state != "running"]
            while len(self._bulks) >= MAX_BULKS and finished:
                del self._bulks[finished.pop(0).id]
            self._bulks[bulk.id] = bulk

        def run() -> None:
            try:
                for start in range(0, len(ids), MAX_REVIEW_IDS):
                    batch = ids[start : start + MAX_REVIEW_IDS]
                    bulk.changed += int(run_batch(batch) or 0)
                    bulk.done += len(batch)
                bulk.state = "done"
            except Exception as exc:  # the bulk says why it stopped; what it did so far stays done
                bulk.error, bulk.state = str(exc), "failed"

        threading.Thread(target=run, name=f"bulk-{bulk.id}", daemon=True).start()
        return bulk
