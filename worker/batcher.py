"""Micro-batching: items from many callers share model calls, up to a size, within a bounded wait.

One thread owns the model. Callers ``submit`` prepared items and get futures; the thread takes the
oldest waiting parameter group, waits at most ``max_wait_s`` from its first item for the batch to fill,
runs it, and resolves the futures. Callers may announce items still being fetched and decoded (``expect``):
while some are, a short batch waits for them up to ``fill_wait_s``, so a chunk's first batch is not cut to
the few images decoded first. A failing batch is split in halves and retried, so one bad item (or an
out-of-memory at this size) costs only itself; the size that last failed is remembered as a ceiling.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from common.errors import EngineError

log = logging.getLogger(__name__)

P = TypeVar("P")  # the parameters a batch shares (GenParams)

#: run(items, params) -> one output per item, same order.
RunBatch = Callable[[list[Any], P], Sequence[Any]]


@dataclass
class _Pending:
    item: Any
    future: Future[Any]
    enqueued: float


@dataclass
class BatchStats:
    """Totals since start, for logs and metrics."""

    batches: int = 0
    items: int = 0
    infer_s: float = 0.0
    splits: int = 0
    last_size: int = 0
    last_infer_s: float = 0.0


class MicroBatcher(Generic[P]):
    """Collects items into batches per parameter key and runs them on one thread."""

    def __init__(
        self,
        run: RunBatch[P],
        *,
        max_batch: int,
        max_wait_s: float,
        key: Callable[[P], Hashable] = lambda p: p,
        name: str = "batcher",
        on_batch: Callable[[int, float], None] | None = None,
        fill_wait_s: float = 0.0,
    ) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.fill_wait_s = max(fill_wait_s, max_wait_s)
        self._coming = 0  # announced items not yet submitted (being fetched or decoded)
        self._key = key
        self._on_batch = on_batch
        self._groups: OrderedDict[Hashable, tuple[P, deque[_Pending]]] = OrderedDict()
        self._cond = threading.Condition()
        self._stopping = False
        self.stats = BatchStats()
        #: Largest size known to fail (OOM); batches stay below it until the process restarts.
        self.ceiling: int | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- callers --------------------------------------------------------------------------------
    def expect(self, n: int) -> None:
        """``n`` items are on their way (each later ``submit(..., expected=True)`` or ``arrived()``)."""
        with self._cond:
            self._coming += n

    def arrived(self) -> None:
        """An announced item will not come (its decode failed)."""
        with self._cond:
            self._coming = max(0, self._coming - 1)
            self._cond.notify()

    def submit(self, item: Any, params: P, *, group: Hashable | None = None, expected: bool = False) -> Future[Any]:
        """Queue ``item``; it shares batches with items of the same parameter key (or of ``group``, if given).

        ``expected``: the item was announced with ``expect``.
        """
        fut: Future[Any] = Future()
        with self._cond:
            if expected:
                self._coming = max(0, self._coming - 1)
            if self._stopping:
                raise RuntimeError("batcher is stopped")
            k = self._key(params) if group is None else group
            group = self._groups.get(k)
            if group is None:
                group = self._groups[k] = (params, deque())
            group[1].append(_Pending(item, fut, time.monotonic()))
            self._cond.notify()
        return fut

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        with self._cond:
            return sum(len(q) for _, q in self._groups.values())

    # --- the model thread -----------------------------------------------------------------------
    def _limit(self) -> int:
        return min(self.max_batch, self.ceiling) if self.ceiling else self.max_batch

    def _take(self) -> tuple[P, list[_Pending]] | None:
        """Block until a batch is due; return it, or None when stopping with nothing left."""
        with self._cond:
            while True:
                if not self._groups:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                k, (params, queue) = next(iter(self._groups.items()))  # the oldest group goes first
                # Images still being decoded may fill this batch: wait for them a little longer.
                due = queue[0].enqueued + (self.fill_wait_s if self._coming else self.max_wait_s)
                now = time.monotonic()
                if len(queue) < self._limit() and now < due and not self._stopping:
                    self._cond.wait(due - now)
                    continue
                batch = [queue.popleft() for _ in range(min(len(queue), self._limit()))]
                if not queue:
                    del self._groups[k]
                else:
                    self._groups.move_to_end(k)  # let other parameter groups have a turn
                return params, batch

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            params, batch = taken
            self._run_split(batch, params)

    def _run_split(self, batch: list[_Pending], params: P) -> None:
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if live:
            self._run_or_halve(live, params)

    def _run_or_halve(self, batch: list[_Pending], params: P) -> None:
        start = time.perf_counter()
        try:
            out = self._run([p.item for p in batch], params)
            if len(out) != len(batch):
                raise EngineError(f"engine returned {len(out)} captions for {len(batch)} images")
        except Exception as exc:
            if len(batch) == 1:
                log.warning("item failed on its own: %s: %s", type(exc).__name__, exc)
                # Out of memory alone may pass on a later attempt (memory freed, another worker): transient.
                err = (
                    exc
                    if isinstance(exc, EngineError)
                    else EngineError(f"{type(exc).__name__}: {exc}", transient=_is_oom(exc))
                )
                batch[0].future.set_exception(err)
                return
            if _is_oom(exc):
                self.ceiling = max(1, len(batch) // 2)
                log.warning("out of memory at batch %d; batches now at most %d", len(batch), self.ceiling)
            self.stats.splits += 1
            mid = len(batch) // 2
            self._run_or_halve(batch[:mid], params)
            self._run_or_halve(batch[mid:], params)
            return
        took = time.perf_counter() - start
        s = self.stats
        s.batches, s.items, s.infer_s = s.batches + 1, s.items + len(batch), s.infer_s + took
        s.last_size, s.last_infer_s = len(batch), took
        log.debug("batch size=%d infer_ms=%.1f", len(batch), took * 1000)
        if self._on_batch:
            self._on_batch(len(batch), took)
        for pending, caption in zip(batch, out, strict=True):
            pending.future.set_result(caption)


def _is_oom(exc: BaseException) -> bool:
    """CUDA and CPU allocators say 'out of memory' in different classes; match on the words."""
    text = f"{type(exc).__name__} {exc}".lower()
    return "out of memory" in text or "outofmemory" in text
