"""The fleet with real Redis and real worker processes: the backlog a scaler reads equals what waits (priorities on,
prefetched messages in the unacked hash), scale to zero and back, `captioner workers` listing and draining a worker
that loses nothing, and SIGTERM under the Kubernetes manifests' own settings and grace period."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from cli.main import cli
from common.connections import PRIORITY_SEP, PRIORITY_STEPS, priority_lists, queue_depths
from common.messages import TASK_CAPTION, TASK_CAPTION_CHUNK, TASK_TRAIN
from producer.jobs import JobClient
from producer.local import WorkerProcess
from runtime.celery_app import create_app
from runtime.queues import UNACKED_KEY, count_queues, messages_naming
from tests.conftest import RECOVERY_DB, _free_port, redis_url, settings_from, shape_files, snapshot, tally
from tests.test_recovery import wait_for


def fleet_env(worker_env: dict[str, str], **extra: str) -> dict[str, str]:
    """A broker DB and queues of this test's own (the recovery DB, flushed), no short visibility timeout."""
    queue = f"captions-fleet-{uuid.uuid4().hex[:8]}"
    env = {
        **worker_env,
        "CAPTIONER_BROKER_URL": redis_url(RECOVERY_DB),
        "CAPTIONER_RESULT_BACKEND": redis_url(RECOVERY_DB),
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_INTERACTIVE_QUEUE": f"{queue}-now",
        "CAPTIONER_TRAINING_QUEUE": f"training-fleet-{uuid.uuid4().hex[:8]}",
        **extra,
    }
    redis.Redis.from_url(env["CAPTIONER_BROKER_URL"]).flushdb()
    return env


def test_our_priority_lists_and_unacked_key_are_kombus() -> None:
    """The names the scaler counts are the ones kombu writes: its Channel's separator, steps and unacked hash."""
    from kombu.transport.redis import Channel

    assert (PRIORITY_SEP, list(PRIORITY_STEPS), UNACKED_KEY) == (
        Channel.sep,
        Channel.priority_steps,
        Channel.unacked_key,
    )
    transport = create_app().conf.broker_transport_options
    assert not {"sep", "priority_steps", "unacked_key"} & set(transport), "our configuration must keep kombu's"


def _scrape(port: int) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("captioner_") and "{" in line:
            name, rest = line.split("{", 1)
            labels, value = rest.rsplit("} ", 1)
            out[(name, labels.split('"')[1])] = float(value)
        elif line.startswith("captioner_"):
            name, value = line.rsplit(" ", 1)
            out[(name, "")] = float(value)
    return out


def _exporter(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "workers", "backlog", f"--serve={port}", "--addr=127.0.0.1"],
        env={**__import__("os").environ, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def test_a_message_is_found_at_any_priority(worker_env: dict[str, str]) -> None:
    """The training worker's orphan scan asks which jobs still have a message: one sent by another service with a
    priority sits in another list than the queue's own, and must count as waiting all the same."""
    env = fleet_env(worker_env)
    queue = env["CAPTIONER_TRAINING_QUEUE"]
    broker = redis.Redis.from_url(env["CAPTIONER_BROKER_URL"])
    app = create_app(settings_from(env))
    for job, priority in (("plain", None), ("urgent", 9), ("low", 3)):
        options = {} if priority is None else {"priority": priority}
        app.send_task(TASK_TRAIN, kwargs={"job_id": job}, queue=queue, ignore_result=True, **options)
    assert broker.llen(queue) < 3, "every message in the queue's own list: the priorities prove nothing"
    needles = {f"'job_id': {job!r}" for job in ("plain", "urgent", "low", "gone")}
    assert messages_naming(broker, queue, needles) == needles - {"'job_id': 'gone'"}
    assert messages_naming(broker, queue, []) == set()


def test_the_backlog_counts_every_priority_and_the_prefetched_messages_and_scales_to_zero_and_back(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.conftest import image_server

    env = fleet_env(
        worker_env, CAPTIONER_CONCURRENCY="2", CAPTIONER_PREFETCH_MULTIPLIER="2", CAPTIONER_URL_TOTAL_TIMEOUT_S="120"
    )
    s = settings_from(env)
    bulk = s.caption_queue
    broker = redis.Redis.from_url(env["CAPTIONER_BROKER_URL"])
    app = create_app(s)
    png = Path(shape_files(tmp_path, "png", 1, seed=1)[0]).read_bytes()
    hold = threading.Event()
    asked: list[str] = []

    def answer(path: str) -> bool:
        asked.append(path)
        return hold.wait(120)

    port = _free_port()
    exporter = _exporter(env, port, tmp_path / "exporter.log")
    with image_server(png, answer) as base:
        priorities = [0, 1, 3, 4, 5, 6, 7, 8, 9, 9, 3]
        for i, p in enumerate(priorities):
            app.send_task(TASK_CAPTION, args=[f"{base}/img-{i}.png"], queue=bulk, priority=p, ignore_result=True)
        n = len(priorities)
        lists = {k.decode() for k in broker.keys(f"{bulk}*")}
        assert lists == set(priority_lists(bulk)), "priorities on: kombu keeps the queue in one list per step"
        assert broker.llen(bulk) < n, "the queue's own list alone misses the other priorities"
        assert count_queues(broker, [bulk])[bulk].as_dict() == {"ready": n, "reserved": 0, "backlog": n}
        assert queue_depths(broker, [bulk])[bulk] == n

        worker = WorkerProcess(env, log=tmp_path / "worker.log").start()
        try:
            worker.wait_ready()
            # The worker takes concurrency x prefetch = 4 messages: 2 running (their fetch held), 2 prefetched.
            wait_for(
                lambda: count_queues(broker, [bulk])[bulk].reserved == 4 and len(asked) >= 2,
                60,
                "four messages in the worker's hands",
            )
            count = count_queues(broker, [bulk])[bulk]
            in_lists = sum(broker.llen(k) for k in priority_lists(bulk))
            assert (count.ready, count.reserved, count.backlog) == (in_lists, broker.hlen(UNACKED_KEY), n)
            assert count.ready == n - 4
            # What KEDA's query reads: the exporter's gauge, read at the scrape.
            wait_for(lambda: exporter.poll() is None and _port_open(port), 60, "the exporter")
            scraped = _scrape(port)
            assert scraped[("captioner_queue_backlog", bulk)] == n
            assert (scraped[("captioner_queue_ready", bulk)], scraped[("captioner_queue_reserved", bulk)]) == (n - 4, 4)
            # ... and the CLI's figures agree.
            out = CliRunner().invoke(cli, ["workers", "backlog", "--json"], env=env)
            assert out.exit_code == 0, out.output
            assert json.loads(out.output)["queues"][bulk] == {"ready": n - 4, "reserved": 4, "backlog": n}

            hold.set()  # the images come: every message is captioned and acked
            wait_for(lambda: _scrape(port)[("captioner_queue_backlog", bulk)] == 0, 120, "an empty backlog")
            # Nothing waits and nothing is in hand: KEDA scales the workers to zero (SIGTERM).
            assert worker.terminate(timeout=60) == 0
        finally:
            worker.terminate()

        # Work arrives again: the backlog wakes the scaler, and a new worker (from zero) takes it all.
        for i in range(3):
            app.send_task(TASK_CAPTION, args=[f"{base}/again-{i}.png"], queue=bulk, priority=6, ignore_result=True)
        assert _scrape(port)[("captioner_queue_backlog", bulk)] == 3
        with WorkerProcess(env, log=tmp_path / "again.log") as again:
            again.wait_ready()
            wait_for(lambda: _scrape(port)[("captioner_queue_backlog", bulk)] == 0, 120, "the new worker's work")
    exporter.terminate()
    assert exporter.wait(30) == 0


def _port_open(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        return True
    except OSError:
        return False


def test_training_jobs_running_count_for_the_training_scaler(worker_env: dict[str, str], settings) -> None:
    """A fine-tune acks its message when it starts: the exporter counts RUNNING training jobs instead."""
    from common.messages import JobKind, JobState
    from ledger import ledger_from_settings

    env = fleet_env(worker_env)
    s = settings_from(env)
    out = CliRunner().invoke(cli, ["workers", "backlog", "--json"], env=env)
    assert json.loads(out.output)["training_jobs_running"] == 0
    ledger = ledger_from_settings(s)
    ledger.open_job("train-1", "fine-tune", None, kind=JobKind.TRAIN)
    ledger.set_state("train-1", JobState.RUNNING)
    out = CliRunner().invoke(cli, ["workers", "backlog", "--json"], env=env)
    assert json.loads(out.output)["training_jobs_running"] == 1
    ledger.set_state("train-1", JobState.DONE)
    out = CliRunner().invoke(cli, ["workers", "backlog", "--json"], env=env)
    assert json.loads(out.output)["training_jobs_running"] == 0
    ledger.close()


def test_workers_lists_and_drains_a_worker_that_loses_nothing(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path, settings
) -> None:
    env = fleet_env(worker_env, CAPTIONER_MAX_LENGTH="40", CAPTIONER_MAX_BATCH_SIZE="4", CAPTIONER_CONCURRENCY="2")
    refs = shape_files(session_root, "drain", 120, seed=8)
    client = JobClient(settings_from(env))
    a = WorkerProcess(env, log=tmp_path / "a.log").start()
    b = WorkerProcess(env, log=tmp_path / "b.log").start()
    try:
        a.wait_ready()
        b.wait_ready()
        client.enqueue(refs, job_id="job-drain", chunk_size=4)
        wait_for(
            lambda: client.status("job-drain").ok >= 8 and client.ledger.attempts_open("job-drain") > 0,
            120,
            "the first captions, and items in hand",
        )
        listed = CliRunner().invoke(cli, ["workers", "list", "--json"], env=env)
        assert listed.exit_code == 0, listed.output
        rows = {r["node"]: r for r in json.loads(listed.output)}
        assert {a.name, b.name} <= set(rows)
        for w in (a, b):
            row = rows[w.name]
            assert row["kind"] == "caption" and row["state"] == "serving"
            assert row["model_version"] and row["queues"] == list(settings_from(env).caption_queues)
            assert row["host"] == w.name.split("@", 1)[1] and row["items_per_s"] is not None
        human = CliRunner().invoke(cli, ["workers", "list"], env=env)
        assert a.name in human.output and "ITEMS/S" in human.output

        drained = CliRunner().invoke(cli, ["workers", "drain", a.name, "--json", "--timeout", "120"], env=env)
        assert drained.exit_code == 0, drained.output
        answer = json.loads(drained.output)
        assert answer["ok"] == "draining" and answer["exited"] is True
        assert set(answer["queues"]) == set(settings_from(env).caption_queues)
        assert a.proc is not None and a.proc.wait(30) == 0  # a clean exit, after what it held
        log_a = a.log_path.read_text()
        assert "drained: nothing in hand" in log_a
        after = CliRunner().invoke(cli, ["workers", "list", "--json"], env=env)
        assert a.name not in {r["node"] for r in json.loads(after.output)}
        before = snapshot(client, "job-drain")
        info = client.wait("job-drain", timeout=180, on_tick=lambda _: None)
    finally:
        a.terminate()
        b.terminate()
    rows_ = list(client.results("job-drain"))
    figures = tally(
        "drain of one worker mid-job (captioner workers drain)",
        refs,
        rows_,
        info,
        before=before,
        happened="the drained worker stopped taking chunks, finished those it held and exited 0; the "
        "other worker finished the job",
    )
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert (info.ok, info.error) == (len(refs), 0)
    # Finished, not handed back: no item of the drained worker was attempted a second time.
    assert figures["attempted_twice"] == 0
    # Every chunk the drained worker took, it finished itself (none handed back), and it took none after the drain.
    task = re.escape(TASK_CAPTION_CHUNK)
    received = re.findall(rf"Task {task}\[([0-9a-f-]+)\] received", log_a)
    succeeded = re.findall(rf"Task {task}\[([0-9a-f-]+)\] succeeded", log_a)
    assert received and sorted(received) == sorted(succeeded)
    assert " received" not in log_a.split("draining: stopped consuming", 1)[1]
    client.close()


def test_drain_of_an_unknown_worker_is_one_line(worker_env: dict[str, str]) -> None:
    env = fleet_env(worker_env)
    out = CliRunner().invoke(cli, ["workers", "drain", "caption@nowhere", "--no-wait"], env=env)
    assert out.exit_code == 1 and "no worker named 'caption@nowhere'" in out.output
    assert "Traceback" not in out.output


def manifest_settings(overlay: str = "gpu") -> tuple[dict[str, str], int]:
    """The caption workers' CAPTIONER_* sizing from the rendered manifests, and their grace period."""
    from tests.test_deploy import env_of, objects

    deployment = objects(overlay, "Deployment")["caption-worker"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = env_of(overlay, container)
    keep = (
        "CAPTIONER_CONCURRENCY",
        "CAPTIONER_PREFETCH_MULTIPLIER",
        "CAPTIONER_VISIBILITY_TIMEOUT_S",
        "CAPTIONER_CHUNK_SIZE",
        "CAPTIONER_MAX_BATCH_SIZE",
    )
    grace = int(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    return {k: env[k] for k in keep if k in env}, grace


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_sigterm_with_the_manifests_settings_finishes_within_the_grace_period_and_loses_nothing(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path, overlay: str, settings
) -> None:
    sizing, grace = manifest_settings(overlay)
    env = fleet_env(worker_env, **sizing, CAPTIONER_MAX_LENGTH="40")
    chunk = int(sizing["CAPTIONER_CHUNK_SIZE"])
    held = int(sizing["CAPTIONER_CONCURRENCY"]) * int(sizing["CAPTIONER_PREFETCH_MULTIPLIER"])
    refs = shape_files(session_root, f"grace-{overlay}", chunk * (held + 3), seed=9)
    client = JobClient(settings_from(env))
    first = WorkerProcess(env, log=tmp_path / "first.log").start()
    first.wait_ready()
    client.enqueue(refs, job_id="job-grace", chunk_size=chunk)
    wait_for(
        lambda: client.status("job-grace").ok >= chunk // 2 and client.ledger.attempts_open("job-grace") > 0,
        180,
        "captions, and items in hand",
    )
    # What the kubelet does: SIGTERM, then SIGKILL after the grace period (terminate's timeout). Exit 0 means the
    # worker finished in time.
    assert first.terminate(timeout=grace) == 0
    at_stop = client.status("job-grace")
    assert 0 < at_stop.ok < len(refs), "the SIGTERM must land mid-job"
    before = snapshot(client, "job-grace")
    with WorkerProcess(env, log=tmp_path / "second.log") as second:
        second.wait_ready()
        info = client.wait("job-grace", timeout=300, on_tick=lambda _: None)
    rows = list(client.results("job-grace"))
    client.close()
    figures = tally(
        f"SIGTERM mid-job with the {overlay} manifests' settings and grace period ({grace} s)",
        refs,
        rows,
        info,
        before=before,
        happened="the pod's worker finished its chunks in hand within the "
        "grace period and exited 0; the rest went to the next worker",
    )
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert (info.ok, info.error) == (len(refs), 0)
    assert figures["attempted_twice"] == 0


def test_a_slurm_task_told_to_stop_finishes_its_chunks_and_exits_0(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path, settings
) -> None:
    """deploy/slurm/caption-workers.sbatch run as Slurm runs it (bash, SLURM_* set), then what --signal=B:TERM does at
    the time limit: SIGTERM to the batch shell alone. It passes it on; the worker finishes its chunks, both exit 0."""
    import os
    import signal

    env = fleet_env(
        worker_env,
        CAPTIONER_MAX_LENGTH="40",
        CAPTIONER_MAX_BATCH_SIZE="4",
        CAPTIONER_CONCURRENCY="2",
        CAPTIONER_DEVICE="cpu",
        CAPTIONER_CHUNK_SIZE="4",
    )
    slurm = {
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_LOCALID": "0",
        "ENV_FILE": str(tmp_path / "none"),
        "VENV": str(tmp_path / "none"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    log = tmp_path / "task.log"
    script = Path(__file__).resolve().parent.parent / "deploy" / "slurm" / "caption-workers.sbatch"
    task = subprocess.Popen(
        ["bash", str(script)],
        env={**os.environ, **env, **slurm, "CAPTIONER_METRICS_PORT": "0"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    refs = shape_files(session_root, "slurm", 80, seed=10)
    client = JobClient(settings_from(env))
    try:
        wait_for(lambda: b" ready." in log.read_bytes() or task.poll() is not None, 120, "the task's worker")
        assert task.poll() is None, log.read_text()
        assert "caption@4242-3." in log.read_text()
        client.enqueue(refs, job_id="job-slurm", chunk_size=4)
        wait_for(
            lambda: client.status("job-slurm").ok >= 8 and client.ledger.attempts_open("job-slurm") > 0,
            120,
            "captions, and items in hand",
        )
        task.send_signal(signal.SIGTERM)  # the batch shell only, as --signal=B:TERM@120 does
        assert task.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)
    assert "Warm shutdown" in log.read_text()
    before = snapshot(client, "job-slurm")
    assert 0 < len(before) < len(refs), "the stop must land mid-job"
    with WorkerProcess(env, log=tmp_path / "next.log") as nxt:
        nxt.wait_ready()
        info = client.wait("job-slurm", timeout=180, on_tick=lambda _: None)
    rows = list(client.results("job-slurm"))
    client.close()
    figures = tally(
        "SIGTERM to a Slurm array task (--signal=B:TERM), then another worker",
        refs,
        rows,
        info,
        before=before,
        happened="the batch script passed the signal on; the worker finished its chunks in hand and the task exited 0",
    )
    assert (figures["lost"], figures["counters_off"], figures["replaced"], figures["attempted_twice"]) == (0, 0, 0, 0)
