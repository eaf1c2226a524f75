"""Captions through an OpenAI-compatible server: a real one (`transformers serve` with a tiny random LLaVA built
offline) and one that misbehaves (503, 429, slow, malformed JSON, a huge body, a refusal), each answer becoming a
caption, a retry or a named row; the API key only ever in the request."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from common.errors import ConfigError, ItemError, TooLarge
from common.messages import GenParams, ItemStatus, Source
from common.settings import Settings
from media.images import encode_upload
from model.endpoint import EndpointConfig, EndpointEngine
from producer.jobs import JobClient, workers_info
from producer.local import ServeProcess, WorkerProcess, free_port
from tests.conftest import BROKER_DB, LEDGER_DB, MAX_LENGTH, redis_url, settings_from

DEFAULT_PROMPT = Settings.model_fields["endpoint_prompt"].default
FAKE_MODEL = "fake-vlm"


# --- a server that misbehaves on request -----------------------------------------------------------------


class FakeServer(ThreadingHTTPServer):
    """An OpenAI-compatible server whose answer is chosen by the prompt: ``ok``, ``503-once`` (per image), ``429``,
    ``refuse``, ``malformed``, ``huge``, ``slow`` (holds the request until the client hangs up), ``hold`` (holds
    requests until ``hold_for`` are in flight together, or half a second). It records every request's Authorization
    header."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.lock = threading.Condition()
        self.auth: list[str | None] = []
        self.hits: dict[str, int] = {}  # chat requests per prompt
        self.seen: set[str] = set()  # images answered 503 once already
        self.inflight = self.max_inflight = 0
        self.hold_for = 2
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.auth.clear()
            self.hits.clear()
            self.seen.clear()
            self.inflight = self.max_inflight = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeServer

    def log_message(self, *args: object) -> None:
        pass

    def answer(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.auth.append(self.headers.get("Authorization"))
        if self.path == "/v1/models":
            self.answer(200, json.dumps({"object": "list", "data": [{"id": FAKE_MODEL, "object": "model"}]}).encode())
        else:
            self.answer(404, b'{"detail": "Not Found"}')

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        image, prompt = (part for part in request["messages"][0]["content"])
        mode, url = prompt["text"], image["image_url"]["url"]
        server = self.server
        with server.lock:
            server.auth.append(self.headers.get("Authorization"))
            server.hits[mode] = server.hits.get(mode, 0) + 1
            first = url not in server.seen
            server.seen.add(url)
        if mode == "503-once" and first:
            return self.answer(503, b'{"error": {"message": "loading, try again"}}', {"Retry-After": "0"})
        if mode == "429":
            return self.answer(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "0"})
        if mode == "refuse":
            return self.answer(400, b'{"error": {"message": "this model takes no images that small"}}')
        if mode == "malformed":
            return self.answer(200, b'{"choices": [{"message": ')
        if mode == "huge":  # no Content-Length: the body runs until the connection closes, past the reader's cap
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.write(b'{"choices": [{"message": {"content": "' + b"a" * (2 << 20) + b'"}}]}')
            return None
        if mode == "slow":
            self.connection.settimeout(30)
            with contextlib.suppress(OSError):
                while self.connection.recv(1024):  # until the client hangs up
                    pass
            self.close_connection = True
            return None
        if mode == "hold":
            with server.lock:
                server.inflight += 1
                server.max_inflight = max(server.max_inflight, server.inflight)
                server.lock.notify_all()
                # Held until more requests than the bound are in flight together (never, when the bound holds) or
                # half a second passed: time enough for every image decoded meanwhile to arrive if unbounded.
                server.lock.wait_for(lambda: server.inflight >= server.hold_for, timeout=0.5)
                server.inflight -= 1
        caption = f"a picture {hashlib.sha1(url.encode()).hexdigest()[:6]}"
        message = {"role": "assistant", "content": caption}
        body = {
            "object": "chat.completion",
            "model": FAKE_MODEL,
            "usage": {"completion_tokens": 3},
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
        }
        return self.answer(200, json.dumps(body).encode())


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.tiny_vlm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="module")
def served(llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`transformers serve` on a free loopback port with the tiny LLaVA preloaded."""
    with ServeProcess(llava, log=tmp_path_factory.mktemp("logs") / "serve.log") as server:
        yield server


def endpoint_env(worker_env: dict[str, str], url: str, model: str, **extra: str) -> dict[str, str]:
    """A worker environment on a queue of its own (the session's GIT worker never takes these messages)."""
    queue = f"captions-endpoint-{uuid.uuid4().hex[:8]}"
    return {
        **worker_env,
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_INTERACTIVE_QUEUE": f"{queue}-now",
        "CAPTIONER_ENDPOINT_URL": url,
        "CAPTIONER_MODEL": model,
        **extra,
    }


def run_job(client: JobClient, refs: list[str], job_id: str, **params: object) -> list[dict]:
    client.enqueue(refs, job_id=job_id, params=GenParams(max_length=MAX_LENGTH, **params))  # type: ignore[arg-type]
    info = client.wait(job_id, timeout=120, on_tick=lambda _: None)
    assert info.pending == 0
    return list(client.results(job_id))


def sent_image(path: Path) -> Image.Image:
    """The pixels the worker sends for a file: decoded by our rules, re-encoded as the upload JPEG."""
    from media.images import decode_image

    s = Settings()
    im = decode_image(path.read_bytes(), _policy())
    return Image.open(io.BytesIO(encode_upload(im, max_bytes=s.endpoint_image_bytes, max_side=s.endpoint_image_side)))


def _policy():  # type: ignore[no-untyped-def]
    from media.images import ImagePolicy

    return ImagePolicy.from_settings(Settings())


# --- a real server ----------------------------------------------------------------------------------------


def test_worker_captions_a_folder_through_transformers_serve(
    worker_env: dict[str, str], served: ServeProcess, llava: Path, images: Path, tmp_path: Path
) -> None:
    """`captioner worker --endpoint URL --model NAME` against a real OpenAI-compatible server: every image gets the
    caption transformers' greedy generate gives the same pixels and prompt, and the rows say what made it."""
    from training.tiny_vlm import chat_generate

    env = endpoint_env(worker_env, "", "")
    del env["CAPTIONER_ENDPOINT_URL"], env["CAPTIONER_MODEL"]  # given on the command line instead
    settings = settings_from(env)
    redis.Redis.from_url(settings.redis_url_str).flushdb()
    worker = WorkerProcess(
        env, log=tmp_path / "worker.log", extra_args=["--endpoint", served.url, "--model", served.model]
    ).start()
    client = JobClient(settings)
    try:
        worker.wait_ready()
        paths = sorted(images.glob("*.jpg"))
        rows = run_job(client, [str(p) for p in paths], "job-endpoint-real")
    finally:
        client.close()
        worker.terminate()
    assert [r["status"] for r in rows] == ["ok"] * len(paths), rows
    expected = chat_generate(llava, [sent_image(p) for p in paths], DEFAULT_PROMPT, MAX_LENGTH)
    assert {r["ref"]: r["caption"] for r in rows} == dict(zip(map(str, paths), expected, strict=True))
    assert len(set(expected)) > 1  # the captions depend on the image: the server saw each one
    row = rows[0]
    assert row["model_version"] == f"endpoint:{served.model}"
    assert row["params"] == {"max_length": MAX_LENGTH, "num_beams": 1, "prompt": DEFAULT_PROMPT}
    assert f"endpoint {served.url} serves {served.model}" in worker.log_path.read_text()


# --- a server that misbehaves, in process ---------------------------------------------------------------


def engine_for(fake: FakeServer, **cfg: object) -> EndpointEngine:
    return EndpointEngine.load(EndpointConfig(url=fake.url, model=FAKE_MODEL, **cfg))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "code", "transient", "hits"),
    [
        ("503-once", None, None, 2),  # retried at once, then captioned
        ("429", "endpoint_error", True, 3),  # still refused after the retries: sent again later
        ("refuse", "endpoint_error", False, 1),  # the server's reason in the row, never retried
        ("malformed", "endpoint_error", False, 1),
        ("huge", "endpoint_error", False, 1),
        ("slow", "timeout", True, 1),  # the deadline ends it; sent again later, not retried in place
    ],
)
def test_each_misbehaviour_is_a_retry_or_a_named_error(
    fake: FakeServer, mode: str, code: str | None, transient: bool | None, hits: int
) -> None:
    fake.reset()
    engine = engine_for(fake, retries=2, timeout_s=1.0)
    url = engine.prepare([Image.new("RGB", (48, 40), (10, 200, 30))])[0]
    try:
        gen = engine.request(url, GenParams(max_length=MAX_LENGTH, prompt=mode))
    except ItemError as exc:
        assert (exc.code, exc.transient) == (code, transient), exc
        if mode == "refuse":
            assert "HTTP 400" in str(exc) and "no images that small" in str(exc)
    else:
        assert code is None and gen.text.startswith("a picture") and gen.ended
    finally:
        engine.close()
    assert fake.hits[mode] == hits


def test_an_unreachable_server_is_a_transient_row_after_quick_retries(fake: FakeServer) -> None:
    engine = engine_for(fake, retries=1)
    engine._url = f"http://127.0.0.1:{free_port()}/v1/chat/completions"  # the server went away after start-up
    url = engine.prepare([Image.new("RGB", (8, 8))])[0]
    with pytest.raises(ItemError) as caught:
        engine.request(url, GenParams(max_length=MAX_LENGTH, prompt="ok"))
    engine.close()
    assert (caught.value.code, caught.value.transient) == ("fetch_error", True)


def test_requests_in_flight_are_bounded_per_worker(fake: FakeServer, worker_env: dict[str, str], images: Path) -> None:
    """The worker's service sends images straight to the engine, CAPTIONER_ENDPOINT_CONCURRENCY at a time."""
    from worker.service import CaptionService

    fake.reset()
    fake.hold_for = 3  # one past the bound
    env = endpoint_env(worker_env, fake.url, FAKE_MODEL, CAPTIONER_ENDPOINT_CONCURRENCY="2")
    service = CaptionService(settings_from(env))
    try:
        sources = [Source(path=str(p)) for p in sorted(images.glob("*.jpg"))]
        rows = service.caption_sources(sources, GenParams(max_length=MAX_LENGTH, prompt="hold"))
    finally:
        service.close()
    assert [r.status for r in rows] == [ItemStatus.OK] * len(sources)
    assert fake.max_inflight == 2  # reached, never passed


def test_a_job_without_room_for_the_default_prompt_or_with_beams_gets_invalid_input_rows(
    fake: FakeServer, worker_env: dict[str, str], images: Path
) -> None:
    from worker.service import CaptionService

    fake.reset()
    service = CaptionService(settings_from(endpoint_env(worker_env, fake.url, FAKE_MODEL)))
    try:
        src = [Source(path=str(next(images.glob("*.jpg"))))]
        short = service.caption_sources(src, GenParams(max_length=4))  # the default prompt has 6 words
        beams = service.caption_sources(src, GenParams(max_length=MAX_LENGTH, num_beams=2, prompt="ok"))
    finally:
        service.close()
    assert (short[0].error_class, beams[0].error_class) == ("invalid_input", "invalid_input")
    assert "beam search" in (beams[0].error or "")
    assert fake.hits == {}  # refused before any request


# --- the worker against the misbehaving server: retries, named rows, and the key -------------------------


def _redis_text(url: str) -> bytes:
    """Every key and value of a Redis DB, as bytes to search."""
    r = redis.Redis.from_url(url)
    out = bytearray()
    for key in r.scan_iter(count=1000):
        out += key
        kind = r.type(key)
        if kind == b"string":
            out += r.get(key) or b""
        elif kind == b"hash":
            for k, v in r.hgetall(key).items():
                out += k + v
        elif kind == b"list":
            out += b"".join(r.lrange(key, 0, -1))
        elif kind == b"set":
            out += b"".join(r.smembers(key))
        elif kind == b"zset":
            out += b"".join(r.zrange(key, 0, -1))
        elif kind == b"stream":
            out += json.dumps(r.xrange(key), default=repr).encode()
    return bytes(out)


def test_the_key_travels_only_in_the_request_and_a_503_once_is_retried(
    fake: FakeServer, worker_env: dict[str, str], images: Path, tmp_path: Path
) -> None:
    key = f"sk-test-{uuid.uuid4().hex}"
    fake.reset()
    env = endpoint_env(
        worker_env,
        fake.url,
        FAKE_MODEL,
        CAPTIONER_ENDPOINT_API_KEY=key,
        CAPTIONER_LOG_LEVEL="DEBUG",
        CAPTIONER_MAX_ATTEMPTS="1",
    )
    settings = settings_from(env)
    redis.Redis.from_url(settings.redis_url_str).flushdb()
    worker = WorkerProcess(env, log=tmp_path / "worker.log").start()
    client = JobClient(settings)
    paths = [str(p) for p in sorted(images.glob("*.jpg"))]
    try:
        worker.wait_ready()
        rows = run_job(client, paths, "job-endpoint-503", prompt="503-once")
        refused = run_job(client, paths[:2], "job-endpoint-refused", prompt="refuse")
        exports = []
        for fmt in ("jsonl", "csv", "parquet"):
            out = tmp_path / f"rows.{fmt}"
            result = CliRunner().invoke(
                cli,
                [
                    "--broker-url",
                    settings.broker_url_str,
                    "--redis-url",
                    settings.redis_url_str,
                    "--key-prefix",
                    settings.key_prefix,
                    "export",
                    "job-endpoint-503",
                    "--format",
                    fmt,
                    "-o",
                    str(out),
                ],
            )
            assert result.exit_code == 0, result.output
            exports.append(out.read_bytes())
        config = CliRunner().invoke(cli, ["config"], env=env).output
        info = workers_info(client.app, timeout=5.0).get(worker.name, {})  # `celery inspect captioner_info`
        dumps = _redis_text(redis_url(BROKER_DB)) + _redis_text(redis_url(LEDGER_DB))
    finally:
        client.close()
        worker.terminate()
    # Each image was refused once (503) and captioned on the quick retry: one attempt, no transient row.
    assert [(r["status"], r["attempts"]) for r in rows] == [("ok", 1)] * len(paths), rows
    assert fake.hits["503-once"] == 2 * len(paths)
    assert [(r["error_class"], r.get("transient")) for r in refused] == [("endpoint_error", None)] * 2
    assert "no images that small" in refused[0]["error"]
    # The key went to the server with every request, start-up check included ...
    assert fake.auth and set(fake.auth) == {f"Bearer {key}"}
    # ... and nowhere else: not the ledger or the broker, the rows, the worker's DEBUG log, the exports, the config.
    assert (info.get("model_version"), info.get("device")) == (f"endpoint:{FAKE_MODEL}", fake.url), info
    haystacks = {
        "redis": dumps,
        "rows": json.dumps(rows + refused).encode(),
        "log": worker.log_path.read_bytes(),
        "config": config.encode(),
        "captioner_info": json.dumps(info).encode(),
        **{f"export {i}": e for i, e in enumerate(exports)},
    }
    assert len(dumps) > 1000 and b"job-endpoint-503" in dumps  # the scan saw the job's keys
    leaked = [where for where, text in haystacks.items() if key.encode() in text or key[8:].encode() in text]
    assert not leaked, f"the API key is in: {leaked}"
    assert "CAPTIONER_ENDPOINT_API_KEY=****" in config


def test_startup_check_says_when_the_endpoint_is_unreachable_or_the_model_unknown(
    fake: FakeServer, worker_env: dict[str, str], tmp_path: Path
) -> None:
    down = f"http://127.0.0.1:{free_port()}/v1"
    for url, model, said in [
        (down, FAKE_MODEL, "is unreachable"),
        (fake.url, "no-such-model", f"does not serve model 'no-such-model'; it serves: '{FAKE_MODEL}'"),
    ]:
        worker = WorkerProcess(endpoint_env(worker_env, url, model), log=tmp_path / f"{model}.log").start()
        assert worker.proc is not None
        code = worker.proc.wait(120)
        worker.terminate()
        output = worker.log_path.read_text()
        lines = [line for line in output.splitlines() if "cannot start a caption worker" in line]
        assert code == 1 and len(lines) == 1 and said in lines[0], output[-3000:]
        assert "Traceback" not in output and " ready." not in output, output[-3000:]


def test_a_url_with_credentials_is_refused_in_one_line(worker_env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["worker", "--endpoint", "http://user:pw@127.0.0.1:9/v1", "--model", "m"])
    assert result.exit_code != 0
    assert "no credentials" in result.output and "Traceback" not in result.output


# --- settings and the upload encoding -------------------------------------------------------------------


def test_the_key_falls_back_to_openai_api_key_and_ours_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPTIONER_ENDPOINT_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert Settings().endpoint_api_key.get_secret_value() == "sk-openai"  # type: ignore[union-attr]
    monkeypatch.setenv("CAPTIONER_ENDPOINT_API_KEY", "sk-ours")
    assert Settings().endpoint_api_key.get_secret_value() == "sk-ours"  # type: ignore[union-attr]
    assert "sk-ours" not in repr(EndpointConfig.from_settings(Settings(endpoint_url="http://h/v1")))


def test_uploads_are_jpegs_within_the_byte_and_side_caps() -> None:
    noise = Image.frombytes("RGB", (1200, 900), hashlib.shake_256(b"x").digest(1200 * 900 * 3))
    data = encode_upload(noise, max_bytes=60_000, max_side=1000)
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and len(data) <= 60_000 and max(im.size) <= 1000
    assert im.size[0] / im.size[1] == pytest.approx(4 / 3, rel=0.02)
    with pytest.raises(TooLarge):
        encode_upload(noise, max_bytes=500, max_side=0)
    with pytest.raises(ConfigError):
        EndpointConfig.from_settings(Settings(endpoint_url="ftp://h/v1"))
    assert base64.b64decode(EndpointEngine.prepare(_stub(), [noise])[0].split(",", 1)[1])[:2] == b"\xff\xd8"


def _stub() -> EndpointEngine:
    """An engine that was never connected (prepare needs only its config)."""
    return EndpointEngine(EndpointConfig(url="http://127.0.0.1:9/v1", model="m"))


def test_the_request_is_one_image_then_the_prompt_greedy_with_max_length_as_max_tokens() -> None:
    engine = _stub()
    body = engine.body("data:image/jpeg;base64,AAAA", GenParams(max_length=33, prompt="List the objects."))
    engine.close()
    content = body["messages"][0]["content"]
    assert [c["type"] for c in content] == ["image_url", "text"] and content[1]["text"] == "List the objects."
    assert (body["model"], body["max_tokens"], body["temperature"], body["stream"]) == ("m", 33, 0, False)
