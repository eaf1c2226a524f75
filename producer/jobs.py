"""Create, follow, retry and cancel ledger jobs; the producer's side of the queue contract. No torch."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from common.connections import queue_depths
from common.errors import BrokerUnavailable, CaptionerError, ConfigError, NothingToEnqueue, SourceError, UnknownItem
from common.messages import (
    TASK_CAPTION_CHUNK,
    TASK_CAPTION_CONTAINER,
    TASK_EVALUATE,
    TASK_NOTIFY,
    TASK_TRAIN,
    ContainerSpec,
    EvaluateRequest,
    GenParams,
    ItemStatus,
    JobKind,
    JobState,
    TrainRequest,
    check_job_id,
    item_id,
)
from common.settings import Settings
from ledger import JobInfo, ledger_from_settings
from media.objects import ObjectStore
from producer.container_sources import member_container


def ref_base(ref: str) -> str:
    """The folder part of a reference (up to its last slash), shared by its neighbours in a listing."""
    cut = ref.rfind("/")
    return ref[: cut + 1] if cut > 0 else ""


def derive_job_id(sources: Iterable[str], params: GenParams, salt: str = "") -> str:
    """The same sources with the same parameters name the same job, so re-running an enqueue resumes it."""
    h = hashlib.blake2b(digest_size=6)
    for part in (*sources, params.model_dump_json(), salt):
        h.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return "job-" + h.hexdigest()


@dataclass
class EnqueueReport:
    job_id: str
    created: bool
    items: int  # references seen (duplicates included)
    new: int  # new to the manifest
    sent: int  # items put on the queue (not yet captioned)
    skipped: int  # already captioned: a resumed job does not caption them again
    messages: int
    seconds: float
    #: Seconds the producer waited for workers because the queue was full (see ``max_queued_chunks``).
    held_s: float = 0.0
    #: Containers (shards, row groups) sent: their members are counted by the workers that read them.
    containers: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: The queue depth is read every this many chunk messages (cheap next to sending them).
_DEPTH_CHECK_EVERY = 100

#: kombu's Redis transport keeps delivered, unacknowledged messages in this sorted set (by delivery time).
UNACKED_INDEX = "unacked_index"


class JobClient:
    """Talks to the ledger and the broker on behalf of the CLI and of Python services."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        from runtime.celery_app import create_app

        self.settings = settings
        self.ledger = ledger_from_settings(settings)
        self.app = app or create_app(settings)

    def check(self) -> None:
        """Fail early, before anything is written, when the ledger or the broker is not there."""
        self.ledger.ping()
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=5)
        except OperationalError as exc:
            raise BrokerUnavailable(f"cannot reach the broker: {exc}") from None

    # --- enqueue --------------------------------------------------------------------------------
    def enqueue(
        self,
        refs: Iterable[str | ContainerSpec],
        *,
        job_id: str,
        name: str = "",
        params: GenParams | None = None,
        chunk_size: int | None = None,
        extra: dict[str, Any] | None = None,
        on_progress: Callable[[int], None] | None = None,
        base: str | None = None,
        on_hold: Callable[[int], None] | None = None,
    ) -> EnqueueReport:
        """Add references to a job (created or resumed) and queue the ones not yet captioned, in chunks.

        ``base`` is a prefix most references share (the folder or bucket prefix enqueued): the ledger stores them
        without it. None: the first reference's folder. While the caption queue holds more than
        ``max_queued_chunks`` messages, the producer waits for workers (``on_hold`` is told the depth once per wait),
        so the broker's memory stays bounded whatever the archive's size.
        """
        params = params or GenParams(**self.settings.gen_params())
        size = chunk_size or self.settings.chunk_size
        started = time.perf_counter()
        _valid_id(job_id)
        self.check()
        it = iter(refs)
        first = next(it, None)  # nothing is written for an empty source list
        if first is None:
            raise NothingToEnqueue("the sources hold no image files or URLs")
        first_ref = first.ref if isinstance(first, ContainerSpec) else first
        created = self.ledger.open_job(
            job_id, name or job_id, params, extra, base=ref_base(first_ref) if base is None else base
        )
        report = EnqueueReport(job_id, created, 0, 0, 0, 0, 0, 0.0)
        try:
            with self.app.producer_or_acquire() as producer:
                for chunk in _chunks(itertools.chain([first], it), size):
                    self._enqueue_chunk(job_id, chunk, params, created, producer, report)
                    if on_progress:
                        on_progress(report.items)
                    if report.messages and report.messages % _DEPTH_CHECK_EVERY == 0:
                        report.held_s += self._hold_back(on_hold)
        except SourceError as exc:  # a list file broken half-way: what came before it is queued
            raise SourceError(
                f"{exc}; job {job_id} has {report.items} item(s) so far and stays open: fix the source and run the "
                "same command again to resume (captioned items are skipped)"
            ) from None
        except (OperationalError, redis.ResponseError) as exc:
            if "maxmemory" in str(exc) or "OOM" in str(exc):
                raise BrokerUnavailable(
                    f"Redis is out of memory (maxmemory reached) after {report.items} item(s) of job {job_id}; "
                    "nothing was dropped silently: free memory or raise maxmemory, then re-run the same command "
                    "to resume"
                ) from None
            raise BrokerUnavailable(f"the broker stopped answering while enqueueing job {job_id}: {exc}") from None
        finally:
            report.seconds = time.perf_counter() - started
        if self.ledger.seal(job_id):  # everything was captioned already: the job ends here, not in a worker
            self._fire(TASK_NOTIFY, {"job_id": job_id}, self.settings.caption_queue)
        return report

    def _hold_back(self, on_hold: Callable[[int], None] | None) -> float:
        """Wait while the caption queue is over ``max_queued_chunks``; returns the seconds waited."""
        limit = self.settings.max_queued_chunks
        if not limit:
            return 0.0
        started, told = time.monotonic(), False
        while (depth := self.queue_depth()) > limit:
            if on_hold and not told:
                on_hold(depth)
                told = True
            time.sleep(1.0)
        return time.monotonic() - started

    def queue_depth(self) -> int:
        """Chunk messages waiting in the bulk caption queue."""
        with self.app.connection_for_read() as conn:
            return queue_depths(conn.default_channel.client, [self.settings.caption_queue])[self.settings.caption_queue]

    def _enqueue_chunk(
        self, job_id: str, refs: list[Any], params: GenParams, created: bool, producer: Any, report: EnqueueReport
    ) -> None:
        specs = [r for r in refs if isinstance(r, ContainerSpec)]
        if specs:
            self._send_containers(job_id, specs, params, producer)
            report.containers += len(specs)
            report.messages += len(specs)
            refs = [r for r in refs if not isinstance(r, ContainerSpec)]
            if not refs:
                return
        pairs = dict((item_id(ref), ref) for ref in refs)  # the same reference twice is one item
        report.items += len(refs)
        report.new += self.ledger.add_items(job_id, pairs.items())
        if not created:  # a resumed job: leave out what is already captioned
            status = self.ledger.statuses(job_id, list(pairs))
            done = [i for i, s in status.items() if s is ItemStatus.OK]
            report.skipped += len(done)
            for i in done:
                del pairs[i]
            self.ledger.requeue(job_id, [i for i, s in status.items() if s is not ItemStatus.OK])
        if pairs:
            self._send(job_id, pairs, params, producer)
            report.sent += len(pairs)
            report.messages += 1

    def _send_containers(self, job_id: str, specs: list[ContainerSpec], params: GenParams, producer: Any) -> None:
        """Record containers (open until a worker has read them whole) and send one message each. A container read
        before is read again: its captioned members are skipped."""
        self.ledger.add_containers(job_id, [(spec.id, spec.json_key()) for spec in specs])
        for spec in specs:
            body = {"job_id": job_id, "container": spec.id, "params": params.model_dump(exclude_none=True)}
            self._fire(TASK_CAPTION_CONTAINER, body, self.settings.caption_queue, producer)

    def _send(self, job_id: str, pairs: dict[str, str], params: GenParams, producer: Any = None) -> None:
        _valid_id(job_id)  # workers refuse a chunk of any other id: say so here, not through a job that never ends
        body = {
            "job_id": job_id,
            "items": [ref if i == item_id(ref) else {"id": i, "src": ref} for i, ref in pairs.items()],
            "params": params.model_dump(exclude_none=True),
        }
        self._fire(TASK_CAPTION_CHUNK, body, self.settings.caption_queue, producer)

    def _fire(self, task: str, body: dict[str, Any], queue: str, producer: Any = None) -> None:
        """Send a task whose record is the ledger, not a Celery result. ``ignore_result`` matters on this side too:
        without it Celery subscribes this client to the task's result channel as it sends (a SUBSCRIBE per chunk,
        and an UNSUBSCRIBE when the unused AsyncResult is collected)."""
        self.app.send_task(task, kwargs=body, queue=queue, producer=producer, ignore_result=True)

    def submit_training(self, req: TrainRequest, *, then_check: Callable[[TrainRequest], None] | None = None) -> None:
        """Check the request's config here (a mistake is one error now, not a job failing on a worker), and with
        ``then_check`` what the caller checks besides (its data, the training workers); record the fine-tune in the
        ledger (so a lost message can be found and resumed), then queue it."""
        from training.requests import check_train_request, open_train_job

        check_train_request(req)
        if then_check is not None:
            then_check(req)
        self.check()
        open_train_job(self.ledger, req)
        self._fire(TASK_TRAIN, req.model_dump(), self.settings.training_queue)

    def evaluate(self, req: EvaluateRequest, *, timeout: float = 3600) -> dict[str, Any]:
        """Score a model version on the training queue and return its report (metrics, ``n``, samples, info).

        Fails in one line, before anything is sent, when no training worker answers; after ``timeout`` seconds
        the evaluation is withdrawn (revoked), so a worker that reaches it later skips it.
        """
        from celery.exceptions import TimeoutError as CeleryTimeout

        self.check()
        queue = self.settings.training_queue
        if not self.training_workers():
            raise CaptionerError(
                f"no training worker answers on the queue {queue!r}; start one (captioner worker --training)"
            )
        result = self.app.send_task(TASK_EVALUATE, kwargs=req.model_dump(), queue=queue)
        try:
            return result.get(timeout=timeout)
        except CeleryTimeout:
            result.revoke()
            raise CaptionerError(
                f"no evaluation result after {timeout:g}s (the training worker runs one job at a time and may be "
                "fine-tuning); it was withdrawn: try again later or with a larger --timeout"
            ) from None
        except CaptionerError:
            raise
        except Exception as exc:  # the worker's exception, rebuilt by Celery under whatever class it could find
            raise CaptionerError(f"evaluation failed on the worker: {type(exc).__name__}: {exc}") from None
        finally:  # a result given up on stays subscribed to its channel until collected: leave it now
            self.app.backend.remove_pending_result(result)

    def training_capabilities(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """What each answering training worker offers (devices, optional packages); empty when none answers."""
        replies = self.app.control.broadcast("captioner_train_info", reply=True, timeout=timeout) or []
        return [info for reply in replies for info in reply.values() if isinstance(info, dict) and "devices" in info]

    def training_workers(self, timeout: float = 2.0) -> list[str]:
        """Names of the workers that answer and consume the training queue (none: nothing would run a job)."""
        replies = self.app.control.inspect(timeout=timeout).active_queues() or {}
        queue = self.settings.training_queue
        return sorted(name for name, queues in replies.items() if any(q.get("name") == queue for q in queues))

    # --- follow ---------------------------------------------------------------------------------
    def status(self, job_id: str) -> JobInfo:
        return self.ledger.job(job_id)

    def jobs(self, limit: int = 50) -> list[JobInfo]:
        return self.ledger.jobs(limit)

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_tick: Callable[[JobInfo], None],
        on_stall: Callable[[JobInfo], None] | None = None,
        stall_s: float = 30.0,
    ) -> JobInfo:
        """Poll until the job is done, failed or cancelled (and settled); raise ``CaptionerError`` on timeout.

        ``on_stall`` is called (once per stall) when a caption job has made no progress for ``stall_s`` while no
        caption message is queued or in flight anywhere: its pending items' messages were lost by the broker
        (see ``reconcile``), and waiting longer will not finish it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last, since, told = -1, time.monotonic(), False
        while True:
            info = self.ledger.job(job_id)
            on_tick(info)
            if info.state in (JobState.DONE, JobState.FAILED) or (
                info.state is JobState.CANCELLED and info.pending == 0
            ):
                return info
            settled = info.ok + info.error + info.cancelled
            if settled != last:
                last, since, told = settled, time.monotonic(), False
            elif on_stall and not told and time.monotonic() - since > stall_s and self.stalled(info):
                told = True
                on_stall(info)
            if deadline is not None and time.monotonic() > deadline:
                raise CaptionerError(f"job {job_id} still has {info.pending} pending item(s) after {timeout:g}s")
            time.sleep(poll_s)

    def stalled(self, info: JobInfo) -> bool:
        """A caption job with pending items, and not one caption message queued or unacknowledged anywhere."""
        if info.kind is JobKind.TRAIN or info.pending == 0 or info.state is not JobState.RUNNING:
            return False
        if self.ledger.is_open(info.id):
            return False  # the producer is still adding items
        with self.app.connection_for_read() as conn:
            broker = conn.default_channel.client
            waiting = sum(queue_depths(broker, self.settings.caption_queues).values())
            return waiting == 0 and int(broker.zcard(UNACKED_INDEX)) == 0

    # --- act ------------------------------------------------------------------------------------
    def retry(
        self,
        job_id: str,
        *,
        include_cancelled: bool = False,
        flagged: frozenset[str] | None = None,
        params: GenParams | None = None,
        chunk_size: int | None = None,
        ids: list[str] | None = None,
    ) -> int:
        """Queue again the items that failed (and cancelled ones if asked), or with ``flagged`` the captions
        carrying those quality flags (an empty set: any flag), or with ``ids`` exactly those items whatever their
        status (a reviewer's "caption again"), optionally with other parameters."""
        info = self._caption_job(job_id, "retry")
        if ids is not None:
            items: Iterable[tuple[str, str]] = [
                (i, str(self._known_item(job_id, i)["ref"])) for i in dict.fromkeys(ids)
            ]
        elif flagged is not None:
            items = self.ledger.iter_flagged(job_id, flagged or None)
        else:
            want = [ItemStatus.ERROR] + ([ItemStatus.CANCELLED] if include_cancelled else [])
            items = ((row["id"], row["ref"]) for status in want for row in self.ledger.iter_status(job_id, status))
        todo = list(items)  # settle the selection before rows start to change under it
        # Open, as during an enqueue: the job cannot end after the first re-sent chunk while later ones are
        # still to be made pending again.
        self.ledger.open_job(job_id, info.name, info.params)
        sent = 0
        try:
            with self.app.producer_or_acquire() as producer:
                plain, members = _split_members(todo)
                for chunk in _chunks(plain, chunk_size or self.settings.chunk_size):
                    pairs = dict(chunk)
                    self.ledger.requeue(job_id, list(pairs), flagged=flagged is not None, captioned=ids is not None)
                    self._send(job_id, pairs, params or info.params, producer)
                    sent += len(pairs)
                sent += self._retry_members(job_id, members, params or info.params, producer, flagged, ids)
        finally:
            if self.ledger.seal(job_id):
                self._fire(TASK_NOTIFY, {"job_id": job_id}, self.settings.caption_queue)
        return sent

    def _retry_members(
        self,
        job_id: str,
        members: dict[str, list[str]],
        params: GenParams,
        producer: Any,
        flagged: frozenset[str] | None,
        ids: list[str] | None,
    ) -> int:
        """Members of containers go back through their containers: made pending, then each container is read again
        (its captioned members are skipped)."""
        from producer.sources import Containers, expand

        store = ObjectStore.from_settings(self.settings)
        column = (self.ledger.job(job_id).extra or {}).get("column")
        for container, member_ids in members.items():
            self.ledger.requeue(job_id, member_ids, flagged=flagged is not None, captioned=ids is not None)
            if container.startswith("hf:"):
                dataset, _, split = container[3:].rpartition("/")
                opts = Containers(store=store, dataset=True, split=split, per_part=self.settings.chunk_size)
            else:
                dataset, opts = container, Containers(store=store)
            specs = [s for s in expand(dataset, column=column, containers=opts) if isinstance(s, ContainerSpec)]
            self._send_containers(job_id, specs, params, producer)
        return sum(len(v) for v in members.values())

    def reconcile(self, job_id: str, *, chunk_size: int | None = None) -> int:
        """Send again every manifest item that has no row yet (a message the broker lost, a producer that died
        mid-enqueue). Items still queued are sent twice; the ledger keeps one row each."""
        info = self._caption_job(job_id, "reconcile")
        if info.state is JobState.CANCELLED:
            return 0
        sent = 0
        with self.app.producer_or_acquire() as producer:
            # Open containers first: their messages may be lost too, and their pending members are theirs to caption.
            specs = [ContainerSpec.model_validate_json(spec) for _, spec in self.ledger.iter_containers(job_id)]
            for spec in specs:
                self._send_containers(job_id, [spec], info.params, producer)
                sent += 1
            owned = {spec.ref for spec in specs}
            pending = ((i, ref) for i, ref in self.ledger.iter_pending(job_id) if member_container(ref) not in owned)
            for chunk in _chunks(pending, chunk_size or self.settings.chunk_size):
                self._send(job_id, dict(chunk), info.params, producer)
                sent += len(chunk)
        self.ledger.seal(job_id)
        return sent

    def _known_item(self, job_id: str, item: str) -> dict[str, Any]:
        row = self.ledger.item(job_id, item)
        if row is None:
            raise UnknownItem(f"job {job_id} has no item {item!r}")
        return row

    def _caption_job(self, job_id: str, what: str) -> JobInfo:
        """The job, which must be a caption job: a training job has no items to re-send."""
        info = self.ledger.job(job_id)
        if info.kind is not JobKind.CAPTION or info.params is None:
            raise ConfigError(f"job {job_id} is a {info.kind.value} job; {what} applies to caption jobs")
        return info

    def failures(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        """Failed items grouped by error class, each with its reference, message and attempts."""
        self.ledger.job(job_id)
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in self.ledger.iter_status(job_id, ItemStatus.ERROR):
            entry = {k: row.get(k) for k in ("id", "ref", "error", "attempts", "transient")}
            groups.setdefault(row.get("error_class") or "unknown", []).append(entry)
        return groups

    def cancel(self, job_id: str) -> JobInfo:
        """Stop the job: queued chunks are dropped by the workers as they reach them."""
        self.ledger.job(job_id)
        self.ledger.set_state(job_id, JobState.CANCELLED)
        return self.ledger.job(job_id)

    def results(self, job_id: str) -> Iterator[dict[str, Any]]:
        self.ledger.job(job_id)
        return self.ledger.iter_results(job_id)

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.ledger.close()


def _valid_id(job_id: str) -> None:
    try:
        check_job_id(job_id)
    except ValueError as exc:
        raise ConfigError(f"{exc} (workers refuse chunks of such a job; enqueue it under a valid --job-id)") from None


def workers_info(app: Celery, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
    """Each caption worker's answer to ``captioner_info``: the model version it serves and its batch figures."""
    replies = app.control.broadcast("captioner_info", reply=True, timeout=timeout) or []
    return {host: info for reply in replies for host, info in reply.items()}


def _split_members(items: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """Plain items, and container members grouped by their container's reference."""
    plain: list[tuple[str, str]] = []
    members: dict[str, list[str]] = {}
    for iid, ref in items:
        container = member_container(ref)
        if container is None:
            plain.append((iid, ref))
        else:
            members.setdefault(container, []).append(iid)
    return plain, members


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
