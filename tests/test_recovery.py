"""Crash recovery with real processes: a worker killed with SIGKILL mid-job loses nothing and doubles nothing."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import redis

from producer.jobs import JobClient
from producer.local import WorkerProcess
from tests.conftest import RECOVERY_DB, reconciling, redis_url, settings_from, shape_files, snapshot, tally


def recovery_env(worker_env: dict[str, str]) -> dict[str, str]:
    queue = f"captions-recovery-{uuid.uuid4().hex[:8]}"
    return {
        **worker_env,
        "CAPTIONER_BROKER_URL": redis_url(RECOVERY_DB),
        "CAPTIONER_RESULT_BACKEND": redis_url(RECOVERY_DB),
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_INTERACTIVE_QUEUE": f"{queue}-now",
        "CAPTIONER_VISIBILITY_TIMEOUT_S": "5",
        "CAPTIONER_UNACKED_RESTORE_INTERVAL_S": "1",
        "CAPTIONER_MAX_LENGTH": "40",  # long captions: the job lasts long enough to be killed in the middle
        "CAPTIONER_MAX_BATCH_SIZE": "4",
        "CAPTIONER_CONCURRENCY": "2",
    }


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_mid_job_then_restart_captions_every_item_exactly_once(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path, settings
) -> None:
    from training.synthetic import make_shapes

    env = recovery_env(worker_env)
    redis.Redis.from_url(env["CAPTIONER_BROKER_URL"]).flushdb()
    s = settings_from(env)
    folder = session_root / f"recovery-{uuid.uuid4().hex[:6]}"
    refs = [str(p) for p, _ in make_shapes(folder, 120, seed=5, size=32)]
    first = WorkerProcess(env, log=tmp_path / "first.log").start()
    first.wait_ready()
    client = JobClient(s)
    client.enqueue(refs, job_id="job-kill", chunk_size=4)
    # Killed between two chunks, a worker holds nothing; wait until it holds items (their attempts begun).
    wait_for(
        lambda: client.status("job-kill").ok >= 12 and client.ledger.attempts_open("job-kill") > 0,
        120,
        "the first captions, and items in hand",
    )
    assert first.kill() == -9
    killed_at = client.status("job-kill")
    assert 0 < killed_at.ok < len(refs), "the kill must land mid-job"
    before = snapshot(client, "job-kill")

    second = WorkerProcess(env, log=tmp_path / "second.log").start()
    try:
        second.wait_ready()
        resent: list[int] = []
        info = client.wait(
            "job-kill", timeout=180, on_tick=lambda _: None, on_stall=reconciling(client, resent), stall_s=8
        )
    finally:
        second.terminate()
    rows = list(client.results("job-kill"))
    twice = sum(1 for r in rows if r["attempts"] >= 2)
    figures = tally(
        "kill -9 of the caption worker mid-job, then a new worker",
        refs,
        rows,
        info,
        before=before,
        reconciled=sum(resent),
        happened=f"its {twice} unacked items came back after the visibility "
        "timeout (5 s here) and were captioned by the new worker, each by itself",
    )
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert info.state.value == "done"
    assert (info.total, info.ok, info.error) == (len(refs), len(refs), 0)
    assert sorted(r["ref"] for r in rows) == sorted(refs)
    # The messages the dead worker held came back: some items were attempted twice, and still have one row.
    assert twice > 0
    client.close()


def _freeze(worker: WorkerProcess, sig: int) -> None:
    assert worker.proc is not None
    os.killpg(worker.proc.pid, sig)


def test_two_workers_one_killed_and_replaced_repeatedly(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path, settings
) -> None:
    """Three times: one worker killed with SIGKILL, a replacement started. The survivor is frozen (SIGSTOP) from
    just before the kill until the replacement is up, so every kill lands mid-job however fast the machine. The
    last survivor stays frozen until the replacement has finished the job (its messages redelivered after the
    visibility timeout); thawed and stopped, it finishes the chunks it held, captioning their items a second
    time: the ledger must keep the first captions and count each item once."""
    env = recovery_env(worker_env)
    redis.Redis.from_url(env["CAPTIONER_BROKER_URL"]).flushdb()
    refs = shape_files(session_root, "churn", 160, seed=8)
    workers = [WorkerProcess(env, log=tmp_path / f"w{i}.log").start() for i in range(2)]
    for w in workers:
        w.wait_ready()
    client = JobClient(settings_from(env))
    client.enqueue(refs, job_id="job-churn", chunk_size=4)
    before: dict[str, dict] = {}  # each item's first captioned row seen
    at_kills: list[int] = []
    resent: list[int] = []
    try:
        for round_ in range(3):
            target = client.status("job-churn").ok + 12
            wait_for(lambda t=target: client.status("job-churn").ok >= t, 120, "progress")
            victim, survivor = workers[round_ % 2], workers[1 - round_ % 2]
            _freeze(survivor, signal.SIGSTOP)
            victim.kill()
            at_kills.append(client.status("job-churn").ok)
            assert 0 < at_kills[-1] < len(refs), f"kill {round_ + 1} landed at ok={at_kills[-1]} of {len(refs)}"
            workers[round_ % 2] = WorkerProcess(env, log=tmp_path / f"r{round_}.log").start()
            workers[round_ % 2].wait_ready()
            for item, row in snapshot(client, "job-churn").items():
                before.setdefault(item, row)
            if round_ < 2:
                _freeze(survivor, signal.SIGCONT)
        info = client.wait(
            "job-churn", timeout=240, on_tick=lambda _: None, on_stall=reconciling(client, resent), stall_s=8
        )
        for item, row in snapshot(client, "job-churn").items():
            before.setdefault(item, row)
    finally:
        for w in workers:
            _freeze(w, signal.SIGCONT)
        for w in workers:
            w.terminate()  # warm: the thawed survivor finishes (and writes) the chunks it held
    rows = list(client.results("job-churn"))
    info = client.status("job-churn")  # counters once every worker has written all it will
    client.close()
    figures = tally(
        "two workers, one killed with SIGKILL and replaced, three times",
        refs,
        rows,
        info,
        before=before,
        reconciled=sum(resent),
        happened=f"killed at {', '.join(map(str, at_kills))} captioned, the survivor frozen until the "
        "replacement was up (the last one until the job was done, then thawed to finish what it held); "
        "each victim's messages went to the survivor or the replacement, no item was charged as "
        "poison",
    )
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert (info.state.value, info.ok, info.error) == ("done", len(refs), 0)
