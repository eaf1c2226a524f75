"""Container messages in the caption worker: a shard, row group or dataset shard read once (``media.containers``),
its members added to the job's manifest in batches, captioned through the chunk protocol from the bytes already read
(what is captioned is skipped on a redelivery), then the container closed, which may settle the job."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace

from common.messages import ContainerMessage, ContainerSpec, ItemStatus, JobState, item_id
from common.settings import Settings
from media.containers import UNREAD, Member, read_members
from worker.chunks import ChunkOutcome, ChunkRunner

log = logging.getLogger(__name__)


class ContainerRunner:
    """Runs container messages on a process's chunk runner (same service, ledger and durable writes)."""

    def __init__(self, chunks: ChunkRunner, settings: Settings) -> None:
        self.chunks, self.settings = chunks, settings
        policy = chunks.service.policy
        # Containers are larger than images: their own byte cap and deadline; members keep the image cap.
        self.policy = replace(
            policy, max_bytes=settings.max_container_bytes, total_timeout_s=settings.container_timeout_s
        )

    def run(self, msg: ContainerMessage) -> ChunkOutcome:
        ledger, total = self.chunks.ledger, ChunkOutcome(job_id=msg.job_id, items=0)
        started = time.perf_counter()
        raw = ledger.container(msg.job_id, msg.container)
        if raw is None:  # closed already (a redelivery), or never recorded: nothing to do
            log.info("container job=%s id=%s is not open; nothing to do", msg.job_id, msg.container)
            return total
        spec = ContainerSpec.model_validate_json(raw)
        if ledger.state(msg.job_id) is not JobState.CANCELLED:
            unread_seen = False
            for batch in _batched(
                read_members(spec, self.policy, self.settings, self.chunks.service.fetches), self.settings.chunk_size
            ):
                unread_seen |= any(m.key == UNREAD for m in batch)
                self._caption(msg, spec, batch, total)
            if not unread_seen:
                self._settle_unread(msg, spec, total)
        finished = self.chunks._durably(ledger.close_container, msg.job_id, msg.container)
        if finished:
            self.chunks.job_finished(msg.job_id)
        log.info(
            "container job=%s ref=%s items=%d ok=%d error=%d skipped=%d total_ms=%.0f",
            msg.job_id,
            spec.ref,
            total.items,
            total.ok,
            total.error,
            total.skipped,
            (time.perf_counter() - started) * 1000,
        )
        return total

    def _caption(self, msg: ContainerMessage, spec: ContainerSpec, batch: list[Member], total: ChunkOutcome) -> None:
        items = {item_id(m.blob.ref): m.blob for m in batch}  # a key twice in one container is one item
        self.chunks._durably(self.chunks.ledger.add_items, msg.job_id, [(i, b.ref) for i, b in items.items()])
        out = self.chunks.run_items(msg.job_id, list(items.items()), msg.params, kind="container")
        for name in ("items", "ok", "error", "skipped", "refused"):
            setattr(total, name, getattr(total, name) + getattr(out, name))

    def _settle_unread(self, msg: ContainerMessage, spec: ContainerSpec, total: ChunkOutcome) -> None:
        """An earlier run's ``#*`` row (a truncated read) stays pending after ``retry`` once the container reads
        whole: it is settled as cancelled, saying so, so the job can finish."""
        iid = item_id(spec.member_ref(UNREAD))
        if self.chunks.ledger.statuses(msg.job_id, [iid])[iid] is ItemStatus.PENDING:
            from common.errors import Cancelled
            from worker.service import error_row

            whole = Cancelled("the container was read whole on a later run: no member was missing")
            row = error_row({"id": iid, "ref": spec.member_ref(UNREAD), "params": msg.params}, whole)
            self.chunks._write(msg.job_id, [row], total)


def _batched(members: Iterator[Member], size: int) -> Iterator[list[Member]]:
    batch: list[Member] = []
    for member in members:
        batch.append(member)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
