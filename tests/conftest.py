"""Shared fixtures: the machine's real Redis (own DB numbers, flushed per test), a tiny GIT built offline,
a real caption worker process, and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from common.settings import Settings
from ledger import JobInfo, Ledger, RedisLedger
from producer.jobs import JobClient
from producer.local import WorkerProcess

# The machine's Redis; CAPTIONER_TEST_REDIS=host:port points the suite at another server (a second checkout
# testing at the same time can run its own redis-server instead of sharing DB numbers).
REDIS_HOST = os.environ.get("CAPTIONER_TEST_REDIS", "127.0.0.1:6379")
# Three DB numbers of the machine's Redis, from CAPTIONER_TEST_DB_BASE (default 13: DBs 13-15), so two
# checkouts can run their suites at once on one Redis without flushing each other's data.
# Under pytest-xdist each test process takes the three DBs below the previous one's (gw0: 13-15, gw1: 10-12).
_PROCESS = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
DB_BASE = int(os.environ.get("CAPTIONER_TEST_DB_BASE", "13")) - 3 * _PROCESS
RECOVERY_DB = DB_BASE  # broker of the recovery tests, whose short visibility timeout must touch no other queue
BROKER_DB = DB_BASE + 1  # Celery's queues for the session worker
LEDGER_DB = DB_BASE + 2  # job ledger, flushed before every test
WEBHOOK_SECRET = "test-webhook-secret"
MAX_LENGTH = 12  # short captions keep the suite fast; the engine tests cover the default of 50
#: The machine's PostgreSQL, for the ledger's second backend (each test uses a schema of its own).
PG_URL = os.environ.get("CAPTIONER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def redis_url(db: int) -> str:
    return f"redis://{REDIS_HOST}/{db}"


@pytest.fixture(scope="session")
def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Everything workers may read lives under here (their CAPTIONER_ALLOWED_ROOTS)."""
    return tmp_path_factory.mktemp("root").resolve()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.tiny import build_tiny_git

    return build_tiny_git(tmp_path_factory.mktemp("models") / "tiny-git", seed=0)


@pytest.fixture(scope="session")
def worker_env(tiny_model: Path, session_root: Path) -> dict[str, str]:
    """Environment of the session's caption worker; tests that start their own workers extend it."""
    queue = f"captions-test-{uuid.uuid4().hex[:8]}"
    return {
        "CAPTIONER_BROKER_URL": redis_url(BROKER_DB),
        "CAPTIONER_RESULT_BACKEND": redis_url(BROKER_DB),
        "CAPTIONER_REDIS_URL": redis_url(LEDGER_DB),
        "CAPTIONER_KEY_PREFIX": "captioner-test",
        # A queue per test session: a stray worker from another run can never take our messages.
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_INTERACTIVE_QUEUE": f"{queue}-now",
        "CAPTIONER_TRAINING_QUEUE": f"training-test-{uuid.uuid4().hex[:8]}",
        "CAPTIONER_MODEL": str(tiny_model),
        "CAPTIONER_DTYPE": "float32",
        "CAPTIONER_ALLOWED_ROOTS": str(session_root),
        "CAPTIONER_MAX_LENGTH": str(MAX_LENGTH),
        "CAPTIONER_MAX_BATCH_SIZE": "16",
        "CAPTIONER_MAX_WAIT_MS": "50",
        "CAPTIONER_URL_ALLOWED_NETWORKS": "127.0.0.1/32",
        "CAPTIONER_URL_TOTAL_TIMEOUT_S": "3",
        "CAPTIONER_TORCH_THREADS": "1",  # the test process and other workers share the two cores
        "CAPTIONER_METRICS_PORT": "0",
        "CAPTIONER_WEBHOOK_SECRET": WEBHOOK_SECRET,  # tests that read metrics pick a free port
        "HF_HUB_OFFLINE": "1",
    }


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings a process with ``env`` would read (pydantic-settings reads os.environ)."""
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def settings(worker_env: dict[str, str]) -> Iterator[Settings]:
    s = settings_from(worker_env)
    redis.Redis.from_url(s.redis_url_str).flushdb()
    yield s


@pytest.fixture(scope="session")
def caption_worker(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One real worker process for the session (model loaded once); tests that kill workers start their own."""
    r = redis.Redis.from_url(redis_url(BROKER_DB))
    r.flushdb()
    log = tmp_path_factory.mktemp("logs") / "caption-worker.log"
    proc = WorkerProcess(worker_env, log=log).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(params=["redis", "postgresql"])
def ledger(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    """An empty ledger under a prefix of its own, on each backend in turn: the machine's Redis and PostgreSQL."""
    prefix = f"ledger_test_{uuid.uuid4().hex[:8]}"
    if request.param == "redis":
        client = redis.Redis.from_url(redis_url(LEDGER_DB))
        led: Ledger = RedisLedger(client, prefix)
        yield led
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()
    else:
        from ledger.postgres import PostgresLedger

        pg = PostgresLedger(PG_URL, prefix)
        yield pg
        pg._run(f"DROP SCHEMA IF EXISTS {pg.schema} CASCADE")
        pg.close()


@pytest.fixture
def client(settings: Settings) -> Iterator[JobClient]:
    c = JobClient(settings)
    yield c
    c.close()


@pytest.fixture
def images(session_root: Path) -> Iterator[Path]:
    """A fresh folder of 10 sample images under the allowed root."""
    from training.synthetic import make_shapes

    folder = session_root / f"imgs-{uuid.uuid4().hex[:8]}"
    make_shapes(folder, 10, seed=3, fmt="jpeg")
    (folder / "metadata.jsonl").unlink()
    yield folder


def shape_files(root: Path, name: str, n: int, *, seed: int) -> list[str]:
    """Paths of ``n`` synthetic 32-pixel shape images in a fresh folder ``<name>-<random>`` under ``root``."""
    from training.synthetic import make_shapes

    return [str(p) for p, _ in make_shapes(root / f"{name}-{uuid.uuid4().hex[:6]}", n, seed=seed, size=32)]


def direct_captions(
    model_dir: Path, paths: list[Path] | list[str], max_length: int = MAX_LENGTH, num_beams: int = 1
) -> dict[str, str]:
    """Captions from transformers' own GitForCausalLM.generate, one image at a time, float32, in this process: what
    a worker serving the same model must answer."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, GitForCausalLM

    model = GitForCausalLM.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    out = {}
    with torch.inference_mode():
        for p in paths:
            pixels = processor(images=Image.open(p).convert("RGB"), return_tensors="pt").pixel_values
            ids = model.generate(pixel_values=pixels, max_length=max_length, num_beams=num_beams)
            assert ids.shape[1] <= max_length, "generate went past max_length"
            out[str(p)] = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    return out


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_root(session_root: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a folder: (base URL, folder)."""
    folder = session_root / f"www-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _QuietHandler(*a, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def image_server(body: bytes, answer: Callable[[str], bool]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that answers every GET with ``body`` once ``answer(path)`` returns True (the
    test's hold on each request), and with a 503 when it returns False. Yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not answer(self.path):
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def reconciling(client: JobClient, resent: list[int]):
    """An ``on_stall`` for ``JobClient.wait`` in fault tests: a kill -9 can land between BRPOP and kombu's
    unacked write (celery #7950), losing that message in the broker. When a job stalls with nothing queued or in
    flight, send its pending items again, as an operator would with `captioner reconcile`; the count goes into
    the fault table's 'reconciled' column."""

    def on_stall(info) -> None:
        resent.append(client.reconcile(info.id))

    return on_stall


def snapshot(client: JobClient, job_id: str) -> dict[str, dict]:
    """A job's captioned rows now, by item id: taken when a fault strikes, compared by ``tally`` once the job is over
    (the ledger keeps an item's first caption, whatever is redelivered or captioned twice afterwards)."""
    return {r["id"]: r for r in client.results(job_id) if r["status"] == "ok"}


#: What must not change in a captioned row after the fault (a second caption, another model's, a later time).
_KEPT = ("caption", "model_version", "finished_at")


def tally(
    fault: str,
    refs: list[str],
    rows: list[dict],
    info: JobInfo,
    *,
    before: dict[str, dict] | None = None,
    reconciled: int = 0,
    happened: str = "",
    **extra: object,
) -> dict[str, int | None]:
    """The figures of one fault, each of which a bug could move; appended to $FAULT_REPORT (JSON lines) when set,
    which `make fault-report` turns into the table in docs/faults.md.

    ``rows`` are the job's exported rows, ``info`` its ledger counters (``JobClient.status``), ``before`` a
    ``snapshot`` taken at the fault. lost: references without a row; counters_off: how far the job's counters are
    from its rows (ok, error and cancelled each against the rows of that status, total against the references);
    replaced: captions of ``before`` that changed since; reconciled: items ``captioner reconcile`` had to send
    again (said in ``happened`` too, so a fault that needed it never passes silently).
    """
    import json
    from collections import Counter

    status = Counter(r["status"] for r in rows)
    after = {r["id"]: r for r in rows}
    n = len(set(refs))
    figures: dict[str, int | None] = {
        "n": n,
        "ok": status["ok"],
        "lost": len(set(refs) - {r["ref"] for r in rows}),
        "counters_off": abs(info.ok - status["ok"])
        + abs(info.error - status["error"])
        + abs(info.cancelled - status["cancelled"])
        + abs(info.total - n),
        "replaced": None
        if before is None
        else sum(
            1 for i, row in before.items() if [after.get(i, {}).get(k) for k in _KEPT] != [row.get(k) for k in _KEPT]
        ),
        "attempted_twice": sum(1 for r in rows if r.get("attempts", 1) > 1),
        "reconciled": reconciled,
    }
    if reconciled:
        happened += f"; reconcile re-sent {reconciled} item(s) whose message the broker lost"
    if report := os.environ.get("FAULT_REPORT"):
        with open(report, "a") as fh:
            fh.write(json.dumps({"fault": fault, "happened": happened, **figures, **extra}) + "\n")
    return figures


def note_fault(fault: str, happened: str, **figures: object) -> None:
    """A fault with no job to count (the producer refused to start one): its row in docs/faults.md."""
    import json

    if report := os.environ.get("FAULT_REPORT"):
        with open(report, "a") as fh:
            fh.write(json.dumps({"fault": fault, "happened": happened, **figures}) + "\n")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    """moto's standalone S3 server on 127.0.0.1 (what s3fs's own tests use): a real S3 HTTP API."""

    def __init__(self, *, refuse_all: bool = False) -> None:
        import subprocess
        import sys
        import time

        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"} if refuse_all else dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket_to(self.port):
                break
            if self.proc.poll() is not None:
                raise RuntimeError("moto's S3 server exited at start")
            time.sleep(0.1)
        #: What a process needs to reach it: botocore reads every one of these from its environment.
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def fs(self):
        """An s3fs filesystem for setting data up (tests only give it the endpoint by hand)."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint,
            key=self.env["AWS_ACCESS_KEY_ID"],
            secret=self.env["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def socket_to(port: int):
    import socket

    return socket.create_connection(("127.0.0.1", port), timeout=1)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A real S3 server for the session; this process reaches it through the standard AWS_* variables."""
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def bucket(s3: S3Server) -> str:
    """A fresh, empty bucket."""
    name = f"b-{uuid.uuid4().hex[:10]}"
    s3.fs().mkdir(name)
    return name
