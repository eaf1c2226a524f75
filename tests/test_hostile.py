"""Hostile input through a real worker: each bad item gets its named error, batch-mates are captioned,
and the worker keeps serving; and the hostile probe's classes end to end (memory bombs inside the caps, fetches
that outlive their deadline, job ids that reach other jobs' keys, text that a terminal would run).
(tests/test_images.py covers each case in depth, in-process.)"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import tracemalloc
import uuid
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest
from click.testing import CliRunner
from PIL import Image
from pydantic import ValidationError

from cli.main import cli
from common.errors import ConfigError, InvalidMessage
from common.messages import (
    TASK_CAPTION,
    TASK_CAPTION_CHUNK,
    TASK_CAPTION_MANY,
    ChunkMessage,
    GenParams,
    TrainRequest,
    check_job_id,
    parse_message,
)
from common.settings import Settings
from producer.jobs import JobClient
from producer.local import WorkerProcess
from runtime.celery_app import create_app
from tests.conftest import settings_from
from tests.test_images import LocalServer, make_policy, png_header_only, serve, tiff_tiled
from tests.test_recovery import wait_for
from worker.callbacks import ANSWER_CAP, post_webhook

pytestmark = pytest.mark.usefixtures("caption_worker")


@pytest.fixture
def hostile_files(session_root: Path, images: Path, tmp_path: Path) -> dict[str, str]:
    good = sorted(images.glob("*.jpg"))
    d = images
    (d / "zero.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(good[0].read_bytes()[:200])
    (d / "text.jpg").write_text("GIF89a? no, just text")
    (d / "bomb.png").write_bytes(png_header_only(60_000, 60_000))
    (d / "doc.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.new("I;16", (40, 30), 40000).save(d / "deep.png")
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(d / "hidden.png")
    os.mkfifo(d / "fifo.jpg")
    (d / "folder.jpg").mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(good[1].read_bytes())
    (d / "escape.jpg").symlink_to(outside)
    return {
        "good0": str(good[0]),
        "good1": str(good[1]),
        "zero": str(d / "zero.jpg"),
        "truncated": str(d / "truncated.jpg"),
        "text": str(d / "text.jpg"),
        "bomb": str(d / "bomb.png"),
        "eps": str(d / "doc.eps"),
        "cmyk": str(d / "cmyk.jpg"),
        "deep": str(d / "deep.png"),
        "hidden": str(d / "hidden.png"),
        "fifo": str(d / "fifo.jpg"),
        "folder": str(d / "folder.jpg"),
        "escape": str(d / "escape.jpg"),
        "dotdot": str(d / ".." / ".." / "etc" / "passwd"),
    }


@pytest.fixture
def hostile_server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/404":
                self.send_error(404)
            elif self.path == "/500":
                self.send_error(500)
            elif self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.end_headers()
            elif self.path == "/to-private":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
            elif self.path == "/gzip-bomb":
                body = zlib.compress(b"\0" * (64 * 1024 * 1024), 9)
                self.send_response(200)
                self.send_header("Content-Encoding", "deflate")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(400)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_one_batch_of_hostile_items_named_errors_and_batch_mates_captioned(
    settings, hostile_files: dict[str, str], hostile_server: str
) -> None:
    urls = {
        "u404": f"{hostile_server}/404",
        "u500": f"{hostile_server}/500",
        "uloop": f"{hostile_server}/loop",
        "uredirect_private": f"{hostile_server}/to-private",
        "ugzip": f"{hostile_server}/gzip-bomb",
        "umetadata": "http://169.254.169.254/latest/meta-data/",
        "uprivate": "http://10.0.0.1/x.jpg",
        "uhex": "http://0x7f000002/x.jpg",
        "uscheme": "file:///etc/passwd",
        "ucreds": "http://u:p@127.0.0.1/x.jpg",
    }
    named = {**hostile_files, **urls}
    sources = list(named.values())
    rows = create_app(settings).send_task(TASK_CAPTION_MANY, kwargs={"sources": sources}).get(timeout=120)
    got = {name: (r["status"], r.get("error_class")) for name, r in zip(named, rows, strict=True)}
    expected = {
        "good0": ("ok", None),
        "good1": ("ok", None),
        "cmyk": ("ok", None),
        "deep": ("ok", None),
        "hidden": ("ok", None),
        "zero": ("error", "decode_error"),
        "truncated": ("error", "decode_error"),
        "text": ("error", "decode_error"),
        "bomb": ("error", "too_large"),
        "eps": ("error", "decode_error"),
        "fifo": ("error", "forbidden"),
        "folder": ("error", "forbidden"),
        "escape": ("error", "forbidden"),
        "dotdot": ("error", "forbidden"),
        "u404": ("error", "fetch_error"),
        "u500": ("error", "fetch_error"),
        "uloop": ("error", "fetch_error"),
        "uredirect_private": ("error", "forbidden"),
        "ugzip": ("error", "too_large"),
        "umetadata": ("error", "forbidden"),
        "uprivate": ("error", "forbidden"),
        "uhex": ("error", "forbidden"),
        "uscheme": ("error", "forbidden"),
        "ucreds": ("error", "forbidden"),
    }
    assert got == expected
    # The worker is still serving after all of that.
    row = create_app(settings).send_task(TASK_CAPTION, args=[hostile_files["good0"]]).get(timeout=60)
    assert row["status"] == "ok"


def test_exif_orientation_is_honoured_through_the_worker(settings, images: Path) -> None:
    """A rotated photo with an EXIF orientation tag captions like the upright photo."""
    upright = Image.open(sorted(images.glob("*.jpg"))[2]).convert("RGB")
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
    (images / "rotated.jpg").write_bytes(buf.getvalue())
    upright.save(images / "upright.jpg", quality=95)
    app = create_app(settings)
    a = app.send_task(TASK_CAPTION, args=[str(images / "rotated.jpg")]).get(timeout=60)
    b = app.send_task(TASK_CAPTION, args=[str(images / "upright.jpg")]).get(timeout=60)
    assert a["status"] == b["status"] == "ok"
    assert a["caption"] == b["caption"]


# --- the hostile probe's classes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def web() -> Iterator[LocalServer]:
    """A real HTTP server on 127.0.0.1 with the slow routes of tests/test_images.py and an endless POST answer."""
    yield from serve(LocalServer())


@pytest.fixture
def slow(web: LocalServer) -> LocalServer:
    for events in (web.started, web.hangups):
        while not events.empty():
            events.get_nowait()
    return web


def _high_water(proc: WorkerProcess) -> int:
    """The worker process's peak resident memory so far (VmHWM, what ru_maxrss reports), in bytes."""
    assert proc.proc is not None
    with open(f"/proc/{proc.proc.pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def test_tile_bombs_in_one_list_call_leave_the_worker_small(
    settings: Settings, session_root: Path, images: Path, caption_worker: WorkerProcess
) -> None:
    """Eight 158-byte TIFFs, each declaring a 40960x40960 tile, took a worker to 8.9 GB in one list call."""
    folder = session_root / f"bombs-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    bombs = []
    for i in range(8):
        (folder / f"bomb{i}.tif").write_bytes(tiff_tiled(16, 16, (40960, 40960)))
        bombs.append(str(folder / f"bomb{i}.tif"))
    good = str(sorted(images.glob("*.jpg"))[0])
    before = _high_water(caption_worker)
    rows = create_app(settings).send_task(TASK_CAPTION_MANY, kwargs={"sources": [*bombs, good]}).get(timeout=120)
    assert [(r["status"], r.get("error_class")) for r in rows] == [("error", "too_large")] * 8 + [("ok", None)]
    assert "TIFF tile 40960x40960" in rows[0]["error"]
    assert _high_water(caption_worker) - before < 256 << 20  # unguarded: +1.6 GB per decode thread


def test_urls_that_defeat_per_read_timeouts_end_at_the_deadline_in_the_worker(
    settings: Settings, slow: LocalServer, images: Path
) -> None:
    """Header bytes one at a time, informational responses for ever, a body one byte at a time: each ends at
    the worker's deadline (3 s here) as a timeout row that is not retried, and the worker hangs up on it."""
    paths = ["/drip-headers", "/continue-forever", "/drip"]
    good = str(sorted(images.glob("*.jpg"))[0])
    sources = [*(slow.url(p) for p in paths), good]
    rows = create_app(settings).send_task(TASK_CAPTION_MANY, kwargs={"sources": sources}).get(timeout=120)
    got = [(r["status"], r.get("error_class"), r.get("transient")) for r in rows]
    assert got == [("error", "timeout", None)] * 3 + [("ok", None, None)]
    assert all("no complete answer within 3s" in r["error"] for r in rows[:3])
    assert sorted(slow.hangups.get(timeout=10) for _ in paths) == sorted(paths)


def test_a_stopping_worker_abandons_its_fetches_in_flight(
    worker_env: dict[str, str], settings: Settings, slow: LocalServer, tmp_path: Path
) -> None:
    """SIGTERM while every decode thread waits on a server that drips its headers: with a 600 s deadline the
    worker would wait 600 s; it abandons the fetches, sends their items again, and exits cleanly at once."""
    queue = f"captions-stop-{uuid.uuid4().hex[:8]}"
    env = {
        **worker_env,
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_INTERACTIVE_QUEUE": f"{queue}-now",
        "CAPTIONER_URL_TOTAL_TIMEOUT_S": "600",
        "CAPTIONER_DECODE_THREADS": "4",
    }
    own = settings_from(env)
    client = JobClient(own)
    worker = WorkerProcess(env, log=tmp_path / "stopping.log").start()
    try:
        worker.wait_ready()
        urls = [slow.url(f"/drip-headers?item={i}") for i in range(4)]
        client.enqueue(urls, job_id="job-stopping")
        started = sorted(slow.started.get(timeout=60) for _ in urls)  # all four decode threads are in a fetch
        signalled = time.monotonic()
        code = worker.terminate(timeout=120)
        took = time.monotonic() - signalled
    finally:
        worker.terminate()
    assert code == 0, worker.log_tail()
    assert sorted(slow.hangups.get(timeout=10) for _ in urls) == started
    info = client.status("job-stopping")
    assert (info.pending, info.error) == (4, 0)  # abandoned is transient: no row, the items go round again
    assert not client.stalled(info), "the abandoned items' message must be back with the broker"
    assert "abandoning URL fetches in flight" in worker.log_path.read_text()
    client.close()
    print(f"SIGTERM with 4 fetches in flight: exited in {took:.1f}s")


def test_an_endless_webhook_answer_is_read_to_a_small_cap(slow: LocalServer) -> None:
    tracemalloc.start()
    try:
        status = post_webhook(slow.url("/hook"), {"id": "job-x"}, secret="s", policy=make_policy(total_timeout_s=60))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 200 and json.loads(slow.posted[-1]) == {"id": "job-x"}
    assert slow.hangups.get(timeout=10) == "/hook"  # it hung up instead of reading for ever
    assert peak < ANSWER_CAP * 8


def test_a_worker_posting_to_an_endless_receiver_hangs_up_and_keeps_serving(
    client: JobClient, settings: Settings, slow: LocalServer, images: Path
) -> None:
    refs = [str(p) for p in sorted(images.glob("*.jpg"))[:2]]
    client.enqueue(refs, job_id="job-endless-hook", extra={"webhook": slow.url("/endless-hook")})
    assert slow.hangups.get(timeout=120) == "/endless-hook"  # unguarded, it reads (and grows) for ever
    assert json.loads(slow.posted[-1])["id"] == "job-endless-hook"
    row = create_app(settings).send_task(TASK_CAPTION, args=[refs[0]]).get(timeout=60)
    assert row["status"] == "ok"
    print(f"endless webhook answer: the receiver had sent {slow.sent['/endless-hook']} bytes when the worker hung up")


BAD_JOB_IDS = ["victim:res", "victim:src", "../../tmp/x", "a/b", ".hidden", "a..b", "x" * 129, "tab\there", "é", ""]


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
def test_job_ids_outside_the_alphabet_are_refused_by_producer_and_worker_alike(job_id: str) -> None:
    with pytest.raises(ValueError, match="not valid"):
        check_job_id(job_id)
    with pytest.raises(InvalidMessage, match="job_id"):
        parse_message(ChunkMessage, {"job_id": job_id, "items": ["/a.jpg"]})
    with pytest.raises(ValidationError, match="not valid"):
        TrainRequest(job_id=job_id, dataset="/data")
    check_job_id("job-" + "a" * 124)  # the longest id, and the derived ids' shape


def test_the_producer_refuses_an_id_the_worker_would_refuse_before_writing(
    client: JobClient, settings: Settings, images: Path
) -> None:
    image = str(sorted(images.glob("*.jpg"))[0])
    env = _cli_env(settings)
    for bad in ("x" * 200, "other-job:res"):
        result = CliRunner().invoke(cli, ["enqueue", image, "--job-id", bad], env=env)
        assert result.exit_code == 2 and "job id" in result.output and "Traceback" not in result.output
        with pytest.raises(ConfigError, match="not valid"):
            client.enqueue([image], job_id=bad)
    assert client.jobs() == []  # nothing was written for any of them


def test_a_chunk_naming_another_jobs_keys_is_refused_and_that_job_stays_whole(
    client: JobClient, settings: Settings, images: Path, caption_worker: WorkerProcess, tmp_path: Path
) -> None:
    """A service's chunk for "victim:res" wrote into the victim's results; its export and failures then crashed."""
    from exports import export_rows

    refs = [str(p) for p in sorted(images.glob("*.jpg"))[:2]]
    client.enqueue(refs, job_id="victim")
    client.wait("victim", timeout=120, on_tick=lambda _: None)
    before = sorted(json.dumps(r, sort_keys=True) for r in client.results("victim"))
    app = create_app(settings)
    for bad in ("victim:res", "victim:src", "victim:att"):
        sent = app.send_task(
            TASK_CAPTION_CHUNK, kwargs={"job_id": bad, "items": [refs[0]]}, queue=settings.caption_queue
        )
        wait_for(
            lambda sent=sent: f"[{sent.id}] raised unexpected: InvalidMessage" in caption_worker.log_tail(400),
            60,
            f"the worker to refuse the chunk of {bad!r}",
        )
    assert sorted(json.dumps(r, sort_keys=True) for r in client.results("victim")) == before
    assert client.failures("victim") == {} and client.status("victim").ok == 2
    assert export_rows(client.results("victim"), "jsonl", tmp_path / "victim.jsonl").rows_written == 2


def test_the_default_export_name_never_comes_from_an_id_that_leaves_the_folder(
    client: JobClient, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    # The ledger refuses such an id at every key it would name, so no job can hold one.
    with pytest.raises(InvalidMessage, match="is not valid"):
        client.ledger.open_job("../escaped", "a job named to climb out", GenParams())
    for args in (["export", "../escaped"], ["export", "../escaped", "-o", "old.jsonl"]):
        result = CliRunner().invoke(cli, args, env=_cli_env(settings))
        assert result.exit_code == 1 and "is not valid" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == [tmp_path / "here"] and list((tmp_path / "here").iterdir()) == []


def _cli_env(settings: Settings) -> dict[str, str]:
    return {
        "CAPTIONER_BROKER_URL": settings.broker_url_str,
        "CAPTIONER_REDIS_URL": settings.redis_url_str,
        "CAPTIONER_KEY_PREFIX": settings.key_prefix,
        "CAPTIONER_CAPTION_QUEUE": settings.caption_queue,
        "CAPTIONER_INTERACTIVE_QUEUE": settings.interactive_queue_name,
        "CAPTIONER_ALLOWED_ROOTS": ",".join(map(str, settings.allowed_roots)),
    }


def test_jobs_status_and_failures_show_control_characters_as_escapes(
    client: JobClient, settings: Settings, images: Path
) -> None:
    name = "\x1b[2J\x1b]0;owned\x07 [bold]name[/bold] \u202eevil"
    client.ledger.open_job("job-escapes", name, GenParams())
    client.ledger.seal("job-escapes")
    env = _cli_env(settings)
    for args in (["jobs"], ["status", "job-escapes"]):
        shown = CliRunner().invoke(cli, args, env=env, catch_exceptions=False).output
        assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown, args
        assert "\\x1b[2J" in shown and "\\u202e" in shown and "[bold]name[/bold]" in shown, (args, shown)


def test_json_output_escapes_what_a_terminal_would_act_on_and_keeps_the_text(
    client: JobClient, settings: Settings
) -> None:
    """--json prints non-ASCII text as it is (a caption in Japanese stays readable), but C1 controls (U+009B opens an
    escape sequence on 8-bit terminals), bidi overrides and separators as escapes: a reader gets the same text."""
    name = "\x1b[2J \x9b31m \u202eevil \u2028 \U000e0041 写真"
    client.ledger.open_job("job-json-escapes", name, GenParams())
    client.ledger.seal("job-json-escapes")
    for args in (["jobs", "--json"], ["status", "job-json-escapes", "--json"]):
        out = CliRunner().invoke(cli, args, env=_cli_env(settings), catch_exceptions=False).output
        assert not any(ch in out for ch in "\x1b\x9b\u202e\u2028\U000e0041"), (args, out)
        assert "写真" in out, out
        data = json.loads(out)
        info = next(j for j in data if j["id"] == "job-json-escapes") if isinstance(data, list) else data
        assert info["name"] == name


@pytest.mark.parametrize(
    ("args", "hint"),
    [(["--max-length", "1"], "--max-length"), (["--prompt", "a photo of", "--max-length", "4"], "no room")],
)
def test_parameters_that_leave_no_room_for_a_caption_are_refused_at_the_edge(
    settings: Settings, images: Path, args: list[str], hint: str
) -> None:
    """max_length 1, or a prompt as long as max_length, was an engine_error on every item."""
    result = CliRunner().invoke(cli, ["enqueue", str(images), *args], env=_cli_env(settings))
    assert result.exit_code == 2 and hint in result.output, result.output
    for params in ({"max_length": 1}, {"max_length": 4, "prompt": "a photo of"}):
        with pytest.raises(InvalidMessage, match="max_length"):
            parse_message(ChunkMessage, {"job_id": "job-p", "items": ["/a.jpg"], "params": params})
    GenParams(max_length=5, prompt="a photo of")  # the start token, three words, room for one more


def test_a_prompt_of_few_words_and_many_tokens_is_an_invalid_input_row(settings: Settings, images: Path) -> None:
    """Past the edge's word count, the worker counts tokens: no room is a named row, not an engine_error."""
    image = str(sorted(images.glob("*.jpg"))[0])
    params = {"max_length": 3, "prompt": "antidisestablishmentarianism"}  # one word, several word pieces
    row = create_app(settings).send_task(TASK_CAPTION, kwargs={"source": image, "params": params}).get(timeout=60)
    assert (row["status"], row["error_class"]) == ("error", "invalid_input"), row
    assert "leaves no room for a caption" in row["error"]


def test_a_list_call_over_the_workers_bound_is_refused_whole(settings: Settings, images: Path) -> None:
    """A list call running past the visibility timeout is delivered again and captioned twice: over
    CAPTIONER_MAX_LIST_ITEMS (256) the worker refuses it and says to send a job."""
    image = str(sorted(images.glob("*.jpg"))[0])
    result = create_app(settings).send_task(TASK_CAPTION_MANY, kwargs={"sources": [image] * 257})
    with pytest.raises(Exception, match=r"257 images, over this worker's 256 per call") as err:
        result.get(timeout=60)
    assert type(err.value).__name__ == "InvalidMessage"
    rows = create_app(settings).send_task(TASK_CAPTION_MANY, kwargs={"sources": [image] * 3}).get(timeout=60)
    assert [r["status"] for r in rows] == ["ok"] * 3


def test_doctor_holds_decode_threads_times_the_largest_image_to_the_machines_memory(
    worker_env: dict[str, str], settings: Settings, caption_worker: WorkerProcess, images: Path
) -> None:
    image = str(sorted(images.glob("*.jpg"))[0])
    assert create_app(settings).send_task(TASK_CAPTION, args=[image]).get(timeout=60)["status"] == "ok"
    env = {**worker_env, "CAPTIONER_DECODE_THREADS": "256", "CAPTIONER_MAX_IMAGE_PIXELS": str(10**10)}
    checks = {c["name"]: c for c in json.loads(CliRunner().invoke(cli, ["doctor", "--json"], env=env).stdout)}
    local = checks["image memory"]
    assert local["level"] == "fail" and local["detail"].startswith("256 decode thread(s)")
    assert "more than the machine has" in local["detail"] and "CAPTIONER_DECODE_THREADS" in local["detail"]
    # Each worker reports its own: 4 threads and the default caps, against its own machine's memory.
    own = Settings(decode_threads=4)
    (worker,) = [c for name, c in checks.items() if name == f"image memory {caption_worker.name}"]
    assert worker["detail"].startswith(
        f"4 decode thread(s) x the largest image allowed = {own.image_memory_bytes / 2**30:.1f} GiB"
    )
    # ... and its largest list call at its own speed against its visibility timeout (the tiny model is fast).
    calls = checks[f"list calls {caption_worker.name}"]
    assert calls["level"] == "ok" and calls["detail"].startswith("256 images per caption_many call at"), calls


def test_doctor_warns_when_a_list_call_would_outlast_half_the_visibility_timeout() -> None:
    from cli.doctor import list_calls

    assert list_calls("w", 256, 2.0, 300).level == "ok"  # 128 s of 300
    slow = list_calls("w", 256, 1.0, 300)  # 256 s: past half, a second delivery is near
    assert slow.level == "warn" and "CAPTIONER_MAX_LIST_ITEMS" in slow.detail


@pytest.mark.parametrize("queue_of", ["interactive_queue_name", "caption_queue"])
def test_a_broker_message_that_does_not_decode_is_dropped_and_the_worker_keeps_serving(
    settings: Settings, images: Path, caption_worker: WorkerProcess, queue_of: str
) -> None:
    """`LPUSH captions-now '{not json'` ended the worker ("Unrecoverable error: JSONDecodeError")."""
    import redis

    broker = redis.Redis.from_url(settings.broker_url_str)
    queue = getattr(settings, queue_of)
    bad = [b"{not json", b"[1, 2]", b"{}", b'"text"', b"\xff\xfe\x00", b'{"body": 1, "properties": []}']
    seen = caption_worker.log_tail(4000).count("dropped a broker message")
    for payload in bad:
        broker.lpush(queue, payload)
    wait_for(lambda: broker.llen(queue) == 0, 60, "the worker to take the malformed messages")
    wait_for(
        lambda: caption_worker.log_tail(4000).count("dropped a broker message") >= seen + len(bad),
        60,
        "one log line per dropped message",
    )
    assert caption_worker.proc is not None and caption_worker.proc.poll() is None, caption_worker.log_tail()
    image = str(sorted(images.glob("*.jpg"))[0])
    row = create_app(settings).send_task(TASK_CAPTION, args=[image], queue=queue).get(timeout=60)
    assert row["status"] == "ok"
    broker.close()


def test_a_chunk_with_an_over_long_reference_records_it_and_captions_the_rest(
    client: JobClient, settings: Settings, images: Path, caption_worker: WorkerProcess
) -> None:
    """A list with a valid path and a 1 MB URL: the worker refused the whole chunk (`items.1.src` over 4,096
    characters) and both items stayed pending for ever. Here the job holds both, as an older producer left it."""
    from common.messages import item_id

    good, other = (str(p) for p in sorted(images.glob("*.jpg"))[:2])
    long_url = "http://127.0.0.1/" + "a" * (1 << 20)
    client.ledger.open_job("job-long-ref", "long", GenParams(max_length=12))
    client.ledger.add_items("job-long-ref", [(item_id(r), r) for r in (good, long_url, other)])
    client.ledger.seal("job-long-ref")
    app = create_app(settings)
    # A message may not give an item another image: `other`'s id with `good`'s path is refused, not captioned.
    app.send_task(
        TASK_CAPTION_CHUNK,
        kwargs={"job_id": "job-long-ref", "items": [{"id": item_id(other), "src": good}]},
        queue=settings.caption_queue,
        ignore_result=True,
    )
    wait_for(
        lambda: "pairs 1 id(s) with a reference that is not theirs" in caption_worker.log_tail(400),
        60,
        "the worker to refuse the item paired with another image",
    )
    assert client.status("job-long-ref").pending == 3
    app.send_task(
        TASK_CAPTION_CHUNK,
        kwargs={"job_id": "job-long-ref", "items": [good, long_url, other]},
        queue=settings.caption_queue,
        ignore_result=True,
    )
    info = client.wait("job-long-ref", timeout=120, on_tick=lambda _: None)
    assert (info.ok, info.error, info.pending) == (2, 1, 0)
    (bad,) = [r for r in client.results("job-long-ref") if r["status"] == "error"]
    assert bad["id"] == item_id(long_url) and bad["error_class"] == "invalid_input"
    assert len(bad["ref"]) < 400 and f"({len(long_url)} characters)" in bad["ref"]


def test_the_producer_applies_the_workers_bounds_on_references(ledger, settings: Settings, images: Path) -> None:
    """Both ledgers: an over-long or empty reference is an invalid_input row at enqueue; the rest is sent."""
    import base64

    import redis

    from common.messages import item_id

    good = str(sorted(images.glob("*.jpg"))[0])
    long_url = "http://127.0.0.1/" + "b" * 5000
    quiet = settings.model_copy(update={"caption_queue": f"unconsumed-{uuid.uuid4().hex[:8]}"})
    client = JobClient(quiet)
    own, client.ledger = client.ledger, ledger  # the fixture's ledger, on each backend (it closes it itself)
    try:
        report = client.enqueue([good, long_url, ""], job_id="job-bounds")
        assert (report.invalid, report.sent, report.messages) == (2, 1, 1)
        failures = client.failures("job-bounds")
        assert sorted(r["id"] for r in failures["invalid_input"]) == sorted([item_id(long_url), item_id("")])
        broker = redis.Redis.from_url(settings.broker_url_str)
        (raw,) = broker.lrange(quiet.caption_queue, 0, -1)
        broker.delete(quiet.caption_queue)
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        assert body[1]["items"] == [good]
    finally:
        client.ledger = own
        client.close()


def test_a_million_item_chunk_is_refused_before_its_items_are_parsed() -> None:
    """A 1,000,000-item chunk was refused only after building a million sources (+610 MB)."""
    from worker.chunks import parse_chunk

    payload = {"job_id": "job-huge", "items": ["/a.jpg"] * 1_000_000}
    tracemalloc.start()
    try:
        with pytest.raises(InvalidMessage, match="1000000 items, over 10000"):
            parse_chunk(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_a_message_larger_than_any_sender_makes_is_dropped_before_it_is_decoded(
    worker_env: dict[str, str], images: Path, tmp_path: Path
) -> None:
    """A 1,000,000-item chunk was refused only after kombu and pydantic had decoded it (+610 MB). A message over
    CAPTIONER_MAX_MESSAGE_BYTES is dropped on the bytes Redis answered: the worker's peak memory stays near the
    message's own size, and the worker keeps serving."""
    import redis

    from producer.local import LocalRedis

    with LocalRedis() as server:
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
            "CAPTIONER_MAX_MESSAGE_BYTES": str(8 << 20),
        }
        worker = WorkerProcess(env, log=tmp_path / "w.log").start()
        try:
            worker.wait_ready()
            peak_before = _peak_rss(worker)
            settings = settings_from(env)
            items = [{"id": f"{i:016x}", "src": {"path": f"/x/{i}.jpg"}} for i in range(1_000_000)]
            body = json.dumps([[], {"job_id": "huge", "items": items, "params": {}}, {}]).encode()
            envelope = {
                "body": base64.b64encode(body).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"task": TASK_CAPTION_CHUNK, "id": "huge-1"},
                "properties": {
                    "body_encoding": "base64",
                    "delivery_tag": "huge-1",
                    "delivery_info": {"exchange": "", "routing_key": settings.caption_queue},
                },
            }
            raw = json.dumps(envelope).encode()
            assert len(raw) > 8 << 20
            broker = redis.Redis.from_url(server.url(0))
            broker.lpush(settings.caption_queue, raw)
            del raw, body, envelope, items
            wait_for(lambda: "over CAPTIONER_MAX_MESSAGE_BYTES" in worker.log_tail(200), 60, "the oversized drop")
            grown = _peak_rss(worker) - peak_before
            # Measured: +238 MiB for this 78 MiB message (redis-py's read buffers), +1,286 MiB when kombu and pydantic
            # decoded it before the item count refused it.
            assert grown < 600 << 20, f"worker peak grew {grown >> 20} MiB"
            image = str(sorted(images.glob("*.jpg"))[0])
            row = create_app(settings).send_task(TASK_CAPTION, args=[image], queue=settings.caption_queue).get(60)
            assert row["status"] == "ok"
            broker.close()
        finally:
            worker.terminate()


def _peak_rss(worker: WorkerProcess) -> int:
    assert worker.proc is not None
    for line in Path(f"/proc/{worker.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
