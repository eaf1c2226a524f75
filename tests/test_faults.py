"""Faults and hostile messages against real workers: nothing lost, nothing duplicated, nothing let in."""

from __future__ import annotations

import pickle
import re
import uuid
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from common.errors import InvalidMessage
from common.messages import TASK_CAPTION, GenParams, item_id
from producer.jobs import JobClient
from producer.local import WorkerProcess
from runtime.celery_app import create_app
from tests.conftest import settings_from, shape_files, snapshot, tally
from tests.test_recovery import recovery_env, wait_for


class _Boom:
    """Unpickling this would create a file: proof that a pickle body ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path(self.marker).touch, ())


def test_pickle_bodies_are_discarded_unrun_and_the_worker_keeps_serving(
    settings, images: Path, tmp_path: Path, caption_worker: WorkerProcess
) -> None:
    marker = tmp_path / "pickle-ran"
    body = pickle.dumps(((), {"source": str(next(images.glob("*.jpg")))}, {}, _Boom(str(marker))))
    with Connection(settings.broker_url_str) as conn:
        Producer(conn).publish(
            body,
            routing_key=settings.caption_queue,
            exchange=Exchange(settings.caption_queue, type="direct"),
            declare=[Queue(settings.caption_queue)],
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": TASK_CAPTION, "id": str(uuid.uuid4()), "lang": "py"},
            serializer=None,
        )
    app = create_app(settings)
    row = app.send_task(TASK_CAPTION, args=[str(next(images.glob("*.jpg")))]).get(timeout=60)
    assert row["status"] == "ok"
    wait_for(
        lambda: "Refusing to deserialize untrusted content of type pickle" in caption_worker.log_tail(200),
        10,
        "the worker to refuse the pickle body",
    )
    assert not marker.exists(), "a pickle body was deserialised"


@pytest.mark.usefixtures("caption_worker")
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "source"),
        ({"source": 42}, "source"),
        ({"source": "/x", "params": {"max_length": "long"}}, "max_length"),
        ({"source": "/x", "params": {"num_beams": 99}}, "num_beams"),
        ({"source": "x" * 100_000}, "source"),
        ({"source": {"b64": "!!notbase64!!"}}, None),
    ],
)
def test_malformed_messages_get_a_clear_error(settings, kwargs: dict, message: str | None) -> None:
    app = create_app(settings)
    result = app.send_task(TASK_CAPTION, kwargs=kwargs)
    if message is None:  # well-formed message, bad item: an error row, not a failed task
        row = result.get(timeout=30)
        assert (row["status"], row["error_class"]) == ("error", "invalid_input")
        return
    with pytest.raises(InvalidMessage, match=message):  # the worker's named error, rebuilt by Celery
        result.get(timeout=30)


def test_unknown_task_version_is_dropped_and_the_worker_keeps_serving(
    settings, images: Path, caption_worker: WorkerProcess
) -> None:
    app = create_app(settings)
    app.send_task("captioner.caption.v99", kwargs={"source": "/x"}, queue=settings.caption_queue)
    row = app.send_task(TASK_CAPTION, args=[str(next(images.glob("*.jpg")))]).get(timeout=60)
    assert row["status"] == "ok"
    assert "Received unregistered task of type 'captioner.caption.v99'" in caption_worker.log_tail(200)


def _job_with_items(client: JobClient, job_id: str, refs: list[str]) -> dict[str, str]:
    pairs = {item_id(r): r for r in refs}
    client.ledger.open_job(job_id, job_id, GenParams(max_length=12))
    client.ledger.add_items(job_id, pairs.items())
    client.ledger.seal(job_id)
    return pairs


@pytest.mark.usefixtures("caption_worker")
def test_reconcile_requeues_items_whose_message_was_lost(client: JobClient, images: Path) -> None:
    refs = [str(p) for p in sorted(images.glob("*.jpg"))]
    pairs = _job_with_items(client, "job-lost", refs)  # manifest written, messages "lost" before sending
    client._send("job-lost", dict(list(pairs.items())[:4]), GenParams(max_length=12))
    wait_for(lambda: client.status("job-lost").ok == 4, 60, "the four sent items")
    assert client.status("job-lost").pending == 6
    assert client.reconcile("job-lost") == 6
    info = client.wait("job-lost", timeout=60, on_tick=lambda _: None)
    assert (info.ok, info.pending, info.state.value) == (10, 0, "done")


@pytest.mark.usefixtures("caption_worker")
def test_failures_lists_failed_items_by_class_with_attempts(client: JobClient, images: Path, tmp_path: Path) -> None:
    (images / "bad.jpg").write_text("not an image")
    refs = [str(p) for p in sorted(images.glob("*.jpg"))] + [str(tmp_path / "outside.jpg"), "ftp://x/y.jpg"]
    client.enqueue(refs, job_id="job-failures")
    client.wait("job-failures", timeout=60, on_tick=lambda _: None)
    groups = client.failures("job-failures")
    # ftp:// is no URL scheme we fetch, so it is read as a path, and no allowed root holds it.
    assert {k: len(v) for k, v in groups.items()} == {"decode_error": 1, "forbidden": 2}
    assert all(item["attempts"] == 1 for items in groups.values() for item in items)


def test_out_of_memory_batches_are_split_and_every_item_is_captioned(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path, settings
) -> None:
    env = {
        **recovery_env(worker_env),
        "CAPTIONER_MAX_BATCH_SIZE": "16",
        "CAPTIONER_FAULT_OOM_ABOVE": "3",
        "CAPTIONER_MAX_LENGTH": "12",
        "CAPTIONER_MAX_WAIT_MS": "2000",
    }
    redis.Redis.from_url(env["CAPTIONER_BROKER_URL"]).flushdb()
    refs = shape_files(session_root, "oom", 16, seed=2)
    with WorkerProcess(env, log=tmp_path / "oom.log") as proc:
        proc.wait_ready()
        client = JobClient(settings_from(env))
        client.enqueue(refs, job_id="job-oom", chunk_size=16)
        info = client.wait("job-oom", timeout=120, on_tick=lambda _: None)
        figures = tally(
            "out of memory at batch > 3 (injected): halve and retry",
            refs,
            list(client.results("job-oom")),
            info,
            happened="each failing batch was split in halves until it fit; the worker kept 3 as its ceiling",
        )
        client.close()
    assert (figures["lost"], figures["counters_off"]) == (0, 0)
    assert (info.ok, info.error) == (16, 0)
    log = proc.log_path.read_text()
    # A long batching wait fills batches past the injected limit of 3 even on a busy machine.
    assert re.search(r"out of memory at batch ([4-9]|1[0-6]);", log) and "batches now at most" in log


def test_sigterm_mid_job_is_a_warm_shutdown_and_nothing_is_lost(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:

    env = recovery_env(worker_env)
    redis.Redis.from_url(env["CAPTIONER_BROKER_URL"]).flushdb()
    refs = shape_files(session_root, "term", 80, seed=6)
    client = JobClient(settings_from(env))
    first = WorkerProcess(env, log=tmp_path / "first.log").start()
    first.wait_ready()
    client.enqueue(refs, job_id="job-term", chunk_size=4)
    wait_for(lambda: client.status("job-term").ok >= 8, 120, "the first captions")
    assert first.terminate(timeout=120) == 0  # warm shutdown: tasks in hand finish, then a clean exit
    at_stop = client.status("job-term")
    assert 0 < at_stop.ok < len(refs), "the SIGTERM must land mid-job"
    before = snapshot(client, "job-term")
    log = first.log_path.read_text()
    with WorkerProcess(env, log=tmp_path / "second.log") as second:
        second.wait_ready()
        info = client.wait("job-term", timeout=180, on_tick=lambda _: None)
    rows = list(client.results("job-term"))
    client.close()
    figures = tally(
        "SIGTERM mid-job (warm shutdown), then a new worker",
        refs,
        rows,
        info,
        before=before,
        happened="the worker finished its chunks in hand and exited 0; the rest went to the new worker",
    )
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert (info.ok, info.error) == (len(refs), 0)
    # Warm: what it held was finished and acknowledged, not left for redelivery.
    assert "Warm shutdown" in log and figures["attempted_twice"] == 0
