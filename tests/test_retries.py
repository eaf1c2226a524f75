"""Retries and poison with a real worker: transient failures retried with backoff up to the attempt limit,
permanent ones not, and items that keep killing their worker recorded as poison."""

from __future__ import annotations

import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from producer.jobs import JobClient
from producer.local import LocalRedis, WorkerProcess
from tests.conftest import reconciling, settings_from, shape_files, snapshot, tally
from tests.test_recovery import wait_for


@pytest.fixture
def own_redis_env(worker_env: dict[str, str]):
    with LocalRedis() as server:
        yield {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
        }


@pytest.fixture
def flaky_server(images: Path):
    """/flaky-N answers 503 twice, then the image; /down always 503; /gone 404; /stall never answers (until the
    test ends). Counts requests per path."""
    body = sorted(images.glob("*.jpg"))[0].read_bytes()
    hits: dict[str, int] = {}
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/stall":
                done.wait()  # a server that accepts and then says nothing: only the worker's deadline ends it
            elif self.path.startswith("/flaky") and hits[self.path] > 2:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404 if self.path == "/gone" else 503)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    done.set()
    server.shutdown()
    server.server_close()


def test_transient_failures_are_retried_with_backoff_and_permanent_ones_are_not(
    own_redis_env: dict[str, str], flaky_server, tmp_path: Path
) -> None:
    base, hits = flaky_server
    refs = [f"{base}/flaky-1", f"{base}/flaky-2", f"{base}/down", f"{base}/gone", f"{base}/stall"]
    with WorkerProcess(own_redis_env, log=tmp_path / "w.log") as proc:
        proc.wait_ready()
        client = JobClient(settings_from(own_redis_env))
        client.enqueue(refs, job_id="job-flaky")
        info = client.wait("job-flaky", timeout=120, on_tick=lambda _: None)
        rows = {r["ref"].rsplit("/", 1)[1]: r for r in client.results("job-flaky")}
        client.close()
    assert (rows["flaky-1"]["status"], rows["flaky-1"]["attempts"]) == ("ok", 3)
    assert (rows["flaky-2"]["status"], rows["flaky-2"]["attempts"]) == ("ok", 3)
    down = rows["down"]
    assert (down["error_class"], down["attempts"], down["transient"]) == ("fetch_error", 3, True)
    assert (rows["gone"]["error_class"], rows["gone"]["attempts"]) == ("fetch_error", 1)
    # A server that never answers: the worker's total deadline (CAPTIONER_URL_TOTAL_TIMEOUT_S) ends the attempt, and
    # it is not tried again (a server that held one deadline would hold the next; `captioner retry` can).
    stall = rows["stall"]
    assert (stall["status"], stall["error_class"], stall["attempts"], stall.get("transient")) == (
        "error",
        "timeout",
        1,
        None,
    )
    assert (info.ok, info.error, info.state.value) == (2, 3, "done")
    assert hits["/gone"] == 1 and hits["/down"] == 3 and hits["/stall"] == 1  # refused connections: 3 tries
    log = proc.log_path.read_text()
    # flaky-1, flaky-2 and down (refused connections); a deadline that ran out is not tried again.
    assert "retrying 3 transient item(s) in 2s" in log and "retrying 3 transient item(s) in 4s" in log


def test_items_that_keep_killing_their_worker_become_poison(
    own_redis_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    env = {
        **own_redis_env,
        "CAPTIONER_MAX_ATTEMPTS": "1",
        "CAPTIONER_VISIBILITY_TIMEOUT_S": "5",
        "CAPTIONER_UNACKED_RESTORE_INTERVAL_S": "1",
        "CAPTIONER_MAX_LENGTH": "40",
        "CAPTIONER_MAX_BATCH_SIZE": "4",
        "CAPTIONER_CONCURRENCY": "2",
    }
    refs = shape_files(session_root, "poison", 60, seed=12)
    client = JobClient(settings_from(env))
    first = WorkerProcess(env, log=tmp_path / "w1.log").start()
    first.wait_ready()
    client.enqueue(refs, job_id="job-poison", chunk_size=4)
    led = client.ledger

    def in_hand() -> int:  # items whose attempt has started and that have no row yet
        return led.attempts_open("job-poison")

    # Killed between two chunks, a worker would hold nothing: wait until it holds some.
    wait_for(lambda: client.status("job-poison").ok >= 8 and in_hand() > 0, 120, "the first captions")
    first.kill()  # the items in its hands were attempted once: with a limit of 1, they are now poison
    assert 0 < client.status("job-poison").ok < len(refs), "the kill must land mid-job"
    before = snapshot(client, "job-poison")
    resent: list[int] = []
    with WorkerProcess(env, log=tmp_path / "w2.log") as second:
        second.wait_ready()
        info = client.wait(
            "job-poison", timeout=180, on_tick=lambda _: None, on_stall=reconciling(client, resent), stall_s=8
        )
    rows = list(client.results("job-poison"))
    client.close()
    figures = tally(
        "items whose worker died with them, attempt limit 1 (poison)",
        refs,
        rows,
        info,
        before=before,
        reconciled=sum(resent),
        happened="with one attempt allowed, the items in the dead worker's hands "
        "became poison rows, the rest were captioned",
    )
    poison = [r for r in rows if r.get("error_class") == "poison"]
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert poison and all(r["attempts"] == 2 for r in poison)
    assert (info.ok, info.error, info.state.value) == (len(refs) - len(poison), len(poison), "done")


def test_an_item_that_kills_its_worker_is_isolated_and_only_it_becomes_poison(
    own_redis_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    """A real killer among 24 items: the worker dies (os._exit) whenever it reaches it. Its batch-mates are
    innocent and must be captioned; the killer alone is charged, and stopped after max_attempts deaths."""
    from training.synthetic import make_shapes

    env = {
        **own_redis_env,
        "CAPTIONER_MAX_ATTEMPTS": "3",
        "CAPTIONER_VISIBILITY_TIMEOUT_S": "5",
        "CAPTIONER_UNACKED_RESTORE_INTERVAL_S": "1",
        "CAPTIONER_MAX_BATCH_SIZE": "4",
        "CAPTIONER_CONCURRENCY": "2",
        "CAPTIONER_FAULT_KILL_REF": "poison-pill",
    }
    folder = session_root / f"kills-{uuid.uuid4().hex[:6]}"
    refs = [str(p) for p, _ in make_shapes(folder, 24, seed=13, size=32)]
    killer = folder / "poison-pill.png"
    Path(refs[5]).rename(killer)
    refs[5] = str(killer)
    client = JobClient(settings_from(env))
    client.enqueue(refs, job_id="job-killer", chunk_size=4)
    deaths, resent, before = 0, [], {}
    for turn in range(6):  # an operator's restart policy: a dead worker is replaced
        with WorkerProcess(env, log=tmp_path / f"w{turn}.log") as proc:
            wait_for(lambda: b" ready." in proc.log_path.read_bytes(), 120, "the worker to start")
            _until_death_or_done(proc, client, "job-killer", resent)
            if proc.proc.poll() is None:
                break
            deaths += 1
            before |= snapshot(client, "job-killer")  # captions its death must not disturb
    rows = {r["ref"]: r for r in client.results("job-killer")}
    info = client.status("job-killer")
    client.close()
    figures = tally(
        "an item that kills its worker, attempt limit 3 (poison, batch-mates captioned)",
        refs,
        list(rows.values()),
        info,
        before=before,
        reconciled=sum(resent),
        happened=f"the worker died {deaths} times; after the first, suspects ran alone: the killer became "
        "poison, its 23 batch-mates were captioned",
    )
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert deaths == 3, f"the killer should have had 3 attempts, the worker died {deaths} time(s)"
    assert (rows[str(killer)]["error_class"], rows[str(killer)]["attempts"]) == ("poison", 4)
    assert "died 3 time(s)" in rows[str(killer)]["error"]
    innocent = [r for ref, r in rows.items() if ref != str(killer)]
    assert len(innocent) == 23 and all(r["status"] == "ok" for r in innocent)
    assert (info.state.value, info.ok, info.error) == ("done", 23, 1)


def _until_death_or_done(proc: WorkerProcess, client: JobClient, job_id: str, resent: list[int]) -> None:
    """Wait for the worker to die or the job to end; reconcile a stall (a message lost at a kill, celery #7950)."""
    deadline, last, since = time.monotonic() + 120, -1, time.monotonic()
    while time.monotonic() < deadline:
        if proc.proc is not None and proc.proc.poll() is not None:
            return
        info = client.status(job_id)
        if info.pending == 0:
            return
        if (settled := info.ok + info.error) != last:
            last, since = settled, time.monotonic()
        elif time.monotonic() - since > 8 and client.stalled(info):
            resent.append(client.reconcile(job_id))
            since = time.monotonic()
        time.sleep(0.1)
    raise AssertionError("the worker neither died nor finished the job")
