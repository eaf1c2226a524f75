"""Redis faults, each against a redis-server of the test's own (the machine's shared Redis is never stopped)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from cli.main import cli
from common.errors import ConfigError
from common.settings import Settings
from producer.jobs import JobClient
from producer.local import LocalRedis, WorkerProcess
from tests.conftest import note_fault, reconciling, settings_from, shape_files, snapshot, tally
from tests.test_recovery import wait_for


def own_redis_env(worker_env: dict[str, str], server: LocalRedis) -> dict[str, str]:
    return {
        **worker_env,
        "CAPTIONER_BROKER_URL": server.url(0),
        "CAPTIONER_RESULT_BACKEND": server.url(0),
        "CAPTIONER_REDIS_URL": server.url(1),
        # Long enough that no chunk outlives it on a busy 2-core machine: recovery here must come from
        # the restart itself (messages restored on reconnect), not from redelivery after a timeout.
        "CAPTIONER_VISIBILITY_TIMEOUT_S": "60",
        "CAPTIONER_UNACKED_RESTORE_INTERVAL_S": "1",
        "CAPTIONER_MAX_LENGTH": "30",
        "CAPTIONER_MAX_BATCH_SIZE": "4",
    }


def test_redis_killed_and_restarted_mid_job_with_aof_loses_nothing(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    refs = shape_files(session_root, "rf", 60, seed=7)
    with LocalRedis(appendonly=True) as server:
        env = own_redis_env(worker_env, server)
        with WorkerProcess(env, log=tmp_path / "w.log") as proc:
            proc.wait_ready()
            client = JobClient(settings_from(env))
            client.enqueue(refs, job_id="job-redis-restart", chunk_size=4)
            wait_for(lambda: client.status("job-redis-restart").ok >= 8, 120, "the first captions")
            before = snapshot(client, "job-redis-restart")
            server.kill()
            server.start()  # same port and directory: the append-only file brings the queue and ledger back
            assert client.status("job-redis-restart").pending > 0, "the restart must land mid-job"
            # A message popped by BRPOP in the instant Redis died never reached kombu's unacked set (celery #7950):
            # the broker cannot give it back. When the job stalls with nothing queued or in flight, what is still
            # pending is exactly that loss, and reconcile sends it again from the manifest.
            resent: list[int] = []
            info = client.wait(
                "job-redis-restart",
                timeout=240,
                on_tick=lambda _: None,
                on_stall=reconciling(client, resent),
                stall_s=8,
            )
            rows = list(client.results("job-redis-restart"))
            client.close()
    figures = tally(
        "Redis killed and restarted mid-job (AOF on)",
        refs,
        rows,
        info,
        before=before,
        reconciled=sum(resent),
        happened="the worker reconnected and went on; the AOF kept queue and ledger",
    )
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert (info.ok, info.error, info.total) == (60, 0, 60)


def test_worker_started_before_redis_waits_and_then_serves(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    refs = shape_files(session_root, "rf", 4, seed=7)
    server = LocalRedis()
    env = own_redis_env(worker_env, server)
    server.kill()  # the worker starts with no Redis to talk to
    proc = WorkerProcess(env, log=tmp_path / "w.log").start()
    try:
        wait_for(lambda: "Cannot connect to redis" in proc.log_tail(100), 60, "the worker to notice Redis is down")
        assert proc.proc is not None and proc.proc.poll() is None, "the worker must keep waiting, not exit"
        server.start()
        proc.wait_ready(timeout=120)
        client = JobClient(settings_from(env))
        client.enqueue(refs, job_id="job-late-redis")
        info = client.wait("job-late-redis", timeout=120, on_tick=lambda _: None)
        figures = tally(
            "a worker started while Redis is down",
            refs,
            list(client.results("job-late-redis")),
            info,
            happened="it logged the refused connection, kept retrying, and served once Redis came up",
        )
        client.close()
        assert (figures["lost"], figures["counters_off"], info.ok) == (0, 0, 4)
    finally:
        proc.terminate()
        server.stop()


def test_producer_fails_loudly_at_maxmemory_and_says_so(session_root: Path, tmp_path: Path) -> None:
    refs = tmp_path / "urls.txt"
    refs.write_text("".join(f"https://example.org/{'x' * 200}/{i}.jpg\n" for i in range(20_000)))
    with LocalRedis(maxmemory="2mb") as server:
        result = CliRunner().invoke(cli, ["--broker-url", server.url(0), "enqueue", str(refs)], catch_exceptions=False)
    assert result.exit_code == 1
    assert "out of memory" in result.stderr and "Traceback" not in result.output
    note_fault(
        "Redis at maxmemory when the producer runs",
        "enqueue stopped with one line naming maxmemory (exit 1); "
        "what it had written stays, and the same command resumes",
        n=20_000,
    )


def test_password_protected_redis_through_the_url(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    refs = shape_files(session_root, "rf", 3, seed=7)
    with LocalRedis(password="s3cret-pw") as server:
        env = own_redis_env(worker_env, server)
        with WorkerProcess(env, log=tmp_path / "w.log") as proc:
            proc.wait_ready()
            client = JobClient(settings_from(env))
            client.enqueue(refs, job_id="job-auth")
            assert client.wait("job-auth", timeout=120, on_tick=lambda _: None).ok == 3
            client.close()
        wrong = server.url(0).replace("s3cret-pw", "wrong")
        result = CliRunner().invoke(cli, ["--broker-url", wrong, "jobs"], catch_exceptions=False)
        assert result.exit_code == 1 and "Traceback" not in result.output


def test_rediss_without_certificate_settings_is_refused() -> None:
    with pytest.raises(ConfigError, match="rediss://"):
        Settings(broker_url="rediss://cache.example:6380/0")
    ok = Settings(broker_url="rediss://cache.example:6380/0", redis_ssl_cert_reqs="required")
    from runtime.celery_app import celery_config

    assert celery_config(ok)["broker_use_ssl"]["ssl_cert_reqs"] == 2  # ssl.CERT_REQUIRED


def test_broker_down_with_ledger_up_writes_no_half_job(images: Path, settings) -> None:
    """Broker and ledger on different servers, the broker down: the producer stops before writing anything."""
    result = CliRunner().invoke(
        cli,
        [
            "--broker-url",
            "redis://127.0.0.1:1/0",
            "--redis-url",
            settings.redis_url_str,
            "--key-prefix",
            settings.key_prefix,
            "enqueue",
            str(images),
            "--job-id",
            "job-half",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 1 and "cannot reach the broker" in result.stderr
    assert not redis.Redis.from_url(settings.redis_url_str).keys(f"{settings.key_prefix}:job:job-half*")
    note_fault(
        "broker unreachable when the producer runs",
        "one line naming the broker (exit 1); nothing written, no half-recorded job",
        n=len(list(images.glob("*.jpg"))),
        ok=0,
        lost=0,
    )


def test_workers_at_maxmemory_back_off_and_lose_nothing(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    """Redis reaches maxmemory (noeviction) mid-job. Ledger writes are refused whole: workers hold their chunks
    and retry in place, and no row goes in until memory is freed. kombu's own bookkeeping is refused too: a
    message it pops cannot be recorded as unacked (lost in the broker), and a refused ack makes Celery stop the
    worker ("Unrecoverable error"). With what an operator runs anyway (a restart policy, `wait --reconcile`)
    every item ends captioned, once."""
    refs = shape_files(session_root, "rf", 40, seed=7)
    with LocalRedis() as server:
        env = {**own_redis_env(worker_env, server), "CAPTIONER_WRITE_RETRY_S": "120"}
        admin = redis.Redis.from_url(server.url(0))
        client = JobClient(settings_from(env))
        workers = [WorkerProcess(env, log=tmp_path / "w0.log").start()]
        try:
            workers[0].wait_ready()
            client.enqueue(refs, job_id="job-maxmem", chunk_size=4)
            wait_for(lambda: client.status("job-maxmem").ok >= 4, 120, "the first captions")
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")  # full: every command that may grow memory is refused
            # Redis runs one command at a time: once CONFIG SET has answered, no ledger script can still be running,
            # and every one from now on is refused.
            at_limit = client.status("job-maxmem")
            before = snapshot(client, "job-maxmem")
            assert at_limit.pending > 0, "the limit must come down mid-job"

            def refused() -> int:  # ledger writes refused since the limit (none could be refused before it)
                return sum(w.log_path.read_text().count("ledger write failed (OutOfMemoryError") for w in workers)

            wait_for(lambda: refused() >= 2, 120, "ledger writes refused at maxmemory")
            assert client.status("job-maxmem").ok == at_limit.ok, "rows went in past maxmemory"
            admin.config_set("maxmemory", "0")  # memory freed
            resent: list[int] = []

            def restart_dead_worker(info) -> None:  # the restart policy (compose: restart: unless-stopped)
                if workers[-1].proc is not None and workers[-1].proc.poll() is not None:
                    workers.append(WorkerProcess(env, log=tmp_path / f"w{len(workers)}.log").start())

            info = client.wait(
                "job-maxmem", timeout=240, on_tick=restart_dead_worker, on_stall=reconciling(client, resent), stall_s=8
            )
            rows = list(client.results("job-maxmem"))
        finally:
            client.close()
            for w in workers:
                w.terminate()
    happened = (
        f"ledger writes refused whole ({refused()} refusals logged), then retried in place until memory was freed"
    )
    if len(workers) > 1:
        happened += f"; Celery stopped the worker on a refused ack ({len(workers) - 1} restart(s))"
    figures = tally(
        "Redis at maxmemory while workers write (noeviction), then freed",
        refs,
        rows,
        info,
        before=before,
        happened=happened,
        reconciled=sum(resent),
    )
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert (info.ok, info.error, info.state.value) == (40, 0, "done")
