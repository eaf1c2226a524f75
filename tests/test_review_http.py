"""The review page over real HTTP (Uvicorn on 127.0.0.1, real Redis): the bind rule, authentication, cross-site
protection, clear 4xx answers that change nothing, captions as text, and thumbnails only through item ids under the
workers' image policy."""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import redis
import uvicorn
from click.testing import CliRunner
from PIL import Image
from pydantic import SecretStr

from cli.main import cli
from common.errors import ConfigError
from common.messages import GenParams, ItemResult, ItemStatus, item_id
from common.settings import Settings
from ledger import Ledger, ledger_from_settings
from producer.local import free_port
from review.app import create_app
from review.security import check_bind
from review.thumbs import Thumbnails
from tests.conftest import BROKER_DB, LEDGER_DB, redis_url, settings_from
from tests.test_recovery import wait_for

JOB = "job-http"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
TOKEN = "a-long-enough-review-token"


def _settings(tmp_path: Path, **env: str) -> Settings:
    base = {
        "CAPTIONER_BROKER_URL": redis_url(BROKER_DB),
        "CAPTIONER_REDIS_URL": redis_url(LEDGER_DB),
        "CAPTIONER_KEY_PREFIX": "captioner-test",
        "CAPTIONER_ALLOWED_ROOTS": str(tmp_path / "root"),
        "CAPTIONER_REVIEW_EXPORT_DIR": str(tmp_path / "exports"),
    }
    return settings_from({**base, **env})


class Server:
    """The review app served by Uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "the review server to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def job(tmp_path: Path) -> Iterator[tuple[Settings, dict[str, str]]]:
    """A job of five items: ok (a hostile caption), ok, error, pending, and an ok image outside the allowed root."""
    settings = _settings(tmp_path)
    redis.Redis.from_url(settings.redis_url_str).flushdb()
    ledger = ledger_from_settings(settings)
    root = tmp_path / "root"
    root.mkdir()
    refs = {
        "hostile": root / "a.png",
        "plain": root / "b.png",
        "failed": root / "c.png",
        "pending": root / "d.png",
        "outside": tmp_path / "outside.png",
    }
    for path in refs.values():
        Image.new("RGB", (640, 480), (10, 120, 200)).save(path)
    ids = {k: item_id(str(p)) for k, p in refs.items()}
    ledger.open_job(JOB, "http job", GenParams())
    ledger.add_items(JOB, [(ids[k], str(p)) for k, p in refs.items()])
    rows = [
        ItemResult(id=ids["hostile"], ref=str(refs["hostile"]), status=ItemStatus.OK, caption=HOSTILE),
        ItemResult(id=ids["plain"], ref=str(refs["plain"]), status=ItemStatus.OK, caption="a plain caption"),
        ItemResult(
            id=ids["failed"],
            ref=str(refs["failed"]),
            status=ItemStatus.ERROR,
            error_class="decode_error",
            error="<b>corrupt</b>",
        ),
        ItemResult(id=ids["outside"], ref=str(refs["outside"]), status=ItemStatus.OK, caption="outside"),
    ]
    ledger.record(JOB, rows)
    ledger.r.close()
    yield settings, ids


def _csrf(client: httpx2.Client, path: str = f"/jobs/{JOB}") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    return re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page.text).group(1)


def _ledger(settings: Settings) -> Ledger:
    return ledger_from_settings(settings)


def test_it_refuses_to_listen_beyond_loopback_without_authentication(tmp_path: Path) -> None:
    env = {"CAPTIONER_BROKER_URL": redis_url(BROKER_DB), "CAPTIONER_REVIEW_TOKEN": ""}
    result = CliRunner().invoke(cli, ["review", "--host", "0.0.0.0"], env=env)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: refusing to serve the review page on 0.0.0.0 without authentication: set CAPTIONER_REVIEW_TOKEN or "
        "CAPTIONER_REVIEW_USER/CAPTIONER_REVIEW_PASSWORD (or bind 127.0.0.1)"
    ]
    check_bind(_settings(tmp_path, CAPTIONER_REVIEW_HOST="0.0.0.0", CAPTIONER_REVIEW_TOKEN=TOKEN))
    check_bind(
        _settings(
            tmp_path, CAPTIONER_REVIEW_HOST="10.1.2.3", CAPTIONER_REVIEW_USER="ana", CAPTIONER_REVIEW_PASSWORD="pw"
        )
    )
    check_bind(_settings(tmp_path))  # loopback by default
    with pytest.raises(ConfigError, match="both CAPTIONER_REVIEW_USER and CAPTIONER_REVIEW_PASSWORD"):
        _settings(tmp_path, CAPTIONER_REVIEW_USER="ana")


def test_token_and_basic_authentication(job, tmp_path: Path) -> None:
    settings, _ = job
    tokened = settings.model_copy(update={"review_token": SecretStr(TOKEN)})
    with Server(tokened) as srv, httpx2.Client(base_url=srv.url) as c:
        assert c.get("/").status_code == 401
        assert c.get(f"/jobs/{JOB}").status_code == 401
        assert c.get("/login", params={"token": "wrong-" + TOKEN}).status_code == 401
        assert c.get("/", headers={"authorization": f"Bearer not-{TOKEN}"}).status_code == 401
        assert c.get("/", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/login", params={"token": TOKEN}).status_code == 303  # sets the auth cookie
        assert c.get(f"/jobs/{JOB}").status_code == 200
    basic = settings_from({**_env(settings), "CAPTIONER_REVIEW_USER": "ana", "CAPTIONER_REVIEW_PASSWORD": "s3cret"})
    with Server(basic) as srv, httpx2.Client(base_url=srv.url) as c:
        refused = c.get("/")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert c.get("/", auth=("ana", "wrong")).status_code == 401
        page = c.get("/", auth=("ana", "s3cret"))
        assert page.status_code == 200 and "reviewer: ana" in page.text


def _env(settings: Settings) -> dict[str, str]:
    return {
        "CAPTIONER_BROKER_URL": settings.broker_url_str,
        "CAPTIONER_REDIS_URL": settings.redis_url_str,
        "CAPTIONER_KEY_PREFIX": settings.key_prefix,
    }


def test_edits_need_the_session_csrf_token_and_our_origin(job) -> None:
    settings, ids = job
    url = f"/api/jobs/{JOB}/items/{ids['plain']}/correction"
    with Server(settings) as srv, httpx2.Client(base_url=srv.url) as c:
        token = _csrf(c)
        assert c.post(url, json={"text": "no token"}).status_code == 403
        assert c.post(url, json={"text": "x"}, headers={"x-csrf-token": "0" * 64}).status_code == 403
        evil = c.post(url, json={"text": "x"}, headers={"x-csrf-token": token, "origin": "http://evil.example"})
        assert evil.status_code == 403 and "evil.example" in evil.json()["error"]
        site = c.post(url, json={"text": "x"}, headers={"x-csrf-token": token, "sec-fetch-site": "cross-site"})
        assert site.status_code == 403
        with httpx2.Client(base_url=srv.url) as other:  # another browser: its own session, the token is not its
            other.get("/")
            assert other.post(url, json={"text": "x"}, headers={"x-csrf-token": token}).status_code == 403
        assert "corrected" not in _ledger(settings).item(JOB, ids["plain"])
        ok = c.post(url, json={"text": "fixed"}, headers={"x-csrf-token": token, "origin": srv.url})
        assert ok.status_code == 200 and ok.json()["corrected"] == "fixed" and ok.json()["reviewer"] == "local"
        assert _ledger(settings).item(JOB, ids["plain"])["corrected"] == "fixed"
        assert c.get("/", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding gets nothing
        cookie = c.get("/").headers.get("set-cookie", "")
        assert cookie == ""  # the session cookie was set once
        first = httpx2.get(srv.url + "/").headers["set-cookie"]
        assert "HttpOnly" in first and "SameSite=strict" in first.replace("Strict", "strict")


def test_bad_requests_get_a_clear_4xx_and_change_nothing(job) -> None:
    settings, ids = job
    with Server(settings) as srv, httpx2.Client(base_url=srv.url) as c:
        h = {"x-csrf-token": _csrf(c)}

        def post(path: str, **kw):
            return c.post(f"/api/jobs/{JOB}" + path, headers=h, **kw)

        page = c.get("/jobs/job-nope")
        assert page.status_code == 404 and "no job &#39;job-nope&#39;" in page.text
        assert c.post("/api/jobs/job-nope/marks", headers=h, json={"ids": [], "mark": None}).status_code == 404
        assert post("/items/nope/correction", json={"text": "x"}).json() == {"error": "job job-http has no item 'nope'"}
        for kind in ("pending", "failed"):
            answer = post(f"/items/{ids[kind]}/correction", json={"text": "x"})
            assert answer.status_code == 409 and "no caption yet" in answer.json()["error"]
        long = post(f"/items/{ids['plain']}/correction", json={"text": "y" * 2001})
        assert long.status_code == 422 and "at most 2000 characters" in long.json()["error"]
        assert post(f"/items/{ids['plain']}/correction", content=b"{not json").status_code == 422
        assert post(f"/items/{ids['plain']}/correction", json={"text": 5}).status_code == 422
        assert post(f"/items/{ids['plain']}/correction", content=b"x" * 70_000).status_code == 413
        assert post("/marks", json={"ids": [ids["plain"], "nope"], "mark": "accepted"}).status_code == 404
        assert post("/marks", json={"ids": [ids["plain"]], "mark": "maybe"}).status_code == 422
        assert post("/retry", json={"ids": [ids["plain"]], "max_length": 9999}).status_code == 422
        assert c.get(f"/jobs/{JOB}", params={"status": "bogus"}).status_code == 422
        assert c.get(f"/jobs/{JOB}", params={"cursor": "1;2"}).status_code == 422
        assert c.get(f"/api/jobs/{JOB}/items", params={"limit": "100000"}).status_code == 422
        assert c.get(f"/jobs/{JOB}/items/{ids['plain']}/thumb", params={"size": "huge"}).status_code == 422
        assert c.get(f"/jobs/{JOB}/items/nope").status_code == 404
        ledger = _ledger(settings)
        assert list(ledger.reviewed(JOB)) == []
        assert ledger.item(JOB, ids["plain"])["caption"] == "a plain caption"


def test_captions_and_messages_render_as_text_everywhere(job) -> None:
    settings, ids = job
    with Server(settings) as srv, httpx2.Client(base_url=srv.url) as c:
        h = {"x-csrf-token": _csrf(c)}
        c.post(f"/api/jobs/{JOB}/items/{ids['plain']}/correction", headers=h, json={"text": HOSTILE})
        for path in (
            f"/jobs/{JOB}",
            f"/jobs/{JOB}/items/{ids['hostile']}",
            f"/jobs/{JOB}/items/{ids['plain']}",
            f"/jobs/{JOB}?q=script",
        ):
            page = c.get(path)
            assert page.status_code == 200
            assert "<script>alert" not in page.text and "<img src=x" not in page.text and "<b>corrupt" not in page.text
            assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]
        grid = c.get(f"/jobs/{JOB}", params={"status": "error"}).text
        assert "&lt;b&gt;corrupt&lt;/b&gt;" in grid


def test_thumbnails_come_from_item_ids_under_the_workers_image_policy(job, tmp_path: Path) -> None:
    settings, ids = job
    with Server(settings) as srv, httpx2.Client(base_url=srv.url) as c:
        thumb = c.get(f"/jobs/{JOB}/items/{ids['plain']}/thumb")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) == 256
        big = c.get(f"/jobs/{JOB}/items/{ids['plain']}/thumb", params={"size": "l"})
        assert Image.open(io.BytesIO(big.content)).size == (640, 480)  # never enlarged
        outside = c.get(f"/jobs/{JOB}/items/{ids['outside']}/thumb")
        assert outside.status_code == 404
        assert "forbidden" in outside.text and "outside the allowed roots" in outside.text
        for sneaky in ("...", "etc%00passwd", "http:127.0.0.1", str(tmp_path / "root" / "b.png").replace("/", "")):
            answer = c.get(f"/jobs/{JOB}/items/{sneaky}/thumb")
            assert answer.status_code == 404 and "has no item" in answer.text, sneaky
        for sneaky in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "http%3A%2F%2F127.0.0.1%2F"):
            answer = c.get(f"/jobs/{JOB}/items/{sneaky}/thumb")  # a slash never reaches the thumbnail route
            assert (answer.status_code, answer.text) == (404, "Not Found"), sneaky
        assert c.get(f"/jobs/{JOB}/thumb", params={"path": "/etc/passwd"}).status_code == 404


def test_the_thumbnail_cache_stays_within_its_byte_bound(job, tmp_path: Path) -> None:
    settings, ids = job
    refs = {k: str(tmp_path / "root" / n) for k, n in (("hostile", "a.png"), ("plain", "b.png"), ("failed", "c.png"))}
    one = len(Thumbnails(settings, 10**6).get(JOB, ids["plain"], refs["plain"], "s").data)
    thumbs = Thumbnails(settings, int(one * 2.5))
    for kind in ("hostile", "plain", "failed"):
        assert thumbs.get(JOB, ids[kind], refs[kind], "s").error is None
    assert thumbs.cached_bytes <= int(one * 2.5)
    for path in refs.values():
        Path(path).unlink()
    # The two most recent are still served from memory; the oldest was dropped and must be read again (and fails).
    assert thumbs.get(JOB, ids["failed"], refs["failed"], "s").error is None
    assert thumbs.get(JOB, ids["plain"], refs["plain"], "s").error is None
    assert thumbs.get(JOB, ids["hostile"], refs["hostile"], "s").error.startswith("fetch_error")


def test_models_page_shows_versions_evaluations_over_time_and_their_samples(job, tmp_path: Path) -> None:
    from common.store import ModelStore

    settings, _ = job
    store = ModelStore(tmp_path / "store")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    old = store.add(weights, {"base_model": "tiny", "metrics": {"wer": 0.9}}, "v-old").version
    new = store.add(weights, {"base_model": "tiny"}, "v-new").version
    store.record_evaluation(
        new,
        "fp",
        {"wer": 0.5, "bleu4": 0.2},
        samples=[{"image": "/d/1.png", "prediction": HOSTILE, "references": ["a red circle"]}],
    )
    store.record_evaluation(new, "fp", {"wer": 0.25, "bleu4": 0.4})
    store.promote(new)
    with Server(settings.model_copy(update={"model_store": store.root})) as srv:
        page = httpx2.get(srv.url + "/models")
    assert page.status_code == 200
    text = page.text
    assert text.index(f'data-version="{new}"') < text.index(f'data-version="{old}"')  # newest first
    assert f'{new} <span class="current">current</span>' in text
    assert "&lt;script&gt;alert(&#34;x&#34;)" in text and "<script>alert" not in text  # samples are text too
    assert "a red circle" in text and "No sample captions were kept" in text  # the second evaluation kept none
    wers = re.findall(r'aria-label="wer over evaluations">\s*<polyline points="([^"]+)"', text)
    heights = [[float(point.split(",")[1]) for point in line.split()] for line in wers]
    # One chart per dataset: the two evaluations on "fp" (0.5, 0.25: falling WER, lower is lower), and apart from
    # them, labelled, the old version's training-time score; never one line across different data.
    assert len(heights) == 2 and len(heights[0]) == 2 and heights[0][0] < heights[0][1] and len(heights[1]) == 1
    assert "fingerprint fp)" in text and "training-time: ? example(s) held out of" in text


def test_progress_rate_and_eta_come_from_successive_samples(job) -> None:
    from review.live import RateTracker, job_summary

    settings, _ = job
    ledger = _ledger(settings)
    info = ledger.job(JOB)  # 5 items: 3 ok, 1 error, 1 pending
    ledger.r.close()
    rates = RateTracker()
    info.ok -= 2  # the job as it was 4 seconds earlier, two rows fewer
    first = job_summary(info, rates, now=100.0)
    assert (first["done"], first["rate"], first["eta_s"]) == (2, None, None)  # one sample: no rate yet
    info.ok += 2
    later = job_summary(info, rates, now=104.0)
    assert later["done"] == 4 and later["pending"] == 1
    assert later["rate"] == pytest.approx(0.5) and later["eta_s"] == pytest.approx(2.0)


def test_a_redis_that_went_away_is_a_503_that_says_so(tmp_path: Path) -> None:
    from producer.local import LocalRedis

    with LocalRedis() as server:
        settings = _settings(tmp_path, CAPTIONER_BROKER_URL=server.url(0), CAPTIONER_REDIS_URL=server.url(1))
        with Server(settings) as srv, httpx2.Client(base_url=srv.url) as c:
            assert c.get("/").status_code == 200
            server.kill()
            page, api = c.get(f"/jobs/{JOB}"), c.get("/api/jobs")
    assert page.status_code == 503 and "cannot reach Redis" in page.text
    assert api.status_code == 503 and api.json()["error"].startswith("cannot reach Redis")


def test_concurrent_workers_lookups_take_one_snapshot_and_every_route_still_answers(job) -> None:
    """Fifty open tabs polling /api/workers at once: one look-up goes to the broker, the others share it, and the
    rest of the page keeps answering meanwhile (it used to hang every route until restart)."""
    from concurrent.futures import ThreadPoolExecutor

    settings, _ = job
    with Server(settings) as srv, ThreadPoolExecutor(52) as pool:
        review = srv.app.state.review

        def get(path: str) -> int:
            with httpx2.Client(base_url=srv.url, timeout=30) as c:
                return c.get(path).status_code

        polls = [pool.submit(get, "/api/workers") for _ in range(50)]
        pages = [pool.submit(get, "/"), pool.submit(get, f"/jobs/{JOB}")]
        assert [p.result() for p in pages] == [200, 200]
        assert [p.result() for p in polls] == [200] * 50
        assert review.workers_taken == 1


def _raw_post(srv: Server, csrf: str, cookie: str, headers: str, body: bytes) -> bytes:
    """A POST written by hand on a socket, its body left unfinished: the answer must come without the rest."""
    import socket

    path = f"/api/jobs/{JOB}/marks"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-CSRF-Token: {csrf}\r\nCookie: {cookie}\r\n{headers}\r\n"
        )
        sock.sendall(head.encode() + body)
        answer = b""  # a read times out (the test fails) when the server waits for the whole body
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        length = int(re.search(rb"content-length: (\d+)", answer, re.I).group(1))
        while len(answer.partition(b"\r\n\r\n")[2]) < length:
            answer += sock.recv(4096)
        return answer


def test_an_oversized_body_is_refused_before_it_is_read_whole(job) -> None:
    from review.context import MAX_BODY_BYTES
    from review.security import SESSION_COOKIE

    settings, _ = job
    with Server(settings) as srv, httpx2.Client(base_url=srv.url) as c:
        csrf = _csrf(c)
        cookie = f"{SESSION_COOKIE}={c.cookies[SESSION_COOKIE]}"
        # Declared 1 GiB, 10 bytes sent: refused by its Content-Length at once.
        answer = _raw_post(srv, csrf, cookie, f"Content-Length: {2**30}\r\n", b'{"ids": [')
        assert answer.startswith(b"HTTP/1.1 413 ") and b"Content-Length 1073741824" in answer
        # Streamed (chunked, no length): refused as soon as it passes the cap, the stream still open.
        chunk = b"x" * 8192
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY_BYTES // len(chunk) + 2))
        answer = _raw_post(srv, csrf, cookie, "Transfer-Encoding: chunked\r\n", chunks)
        assert answer.startswith(b"HTTP/1.1 413 ") and f"over {MAX_BODY_BYTES} bytes".encode() in answer
        assert c.get("/").status_code == 200


def test_sign_in_links_from_other_sites_bearer_writes_and_a_restart_mid_edit(job) -> None:
    settings, ids = job
    tokened = settings.model_copy(update={"review_token": SecretStr(TOKEN)})
    url = f"/api/jobs/{JOB}/items/{ids['plain']}/correction"
    c = httpx2.Client()
    with Server(tokened) as srv:
        c.base_url = httpx2.URL(srv.url)
        login = c.get("/login", params={"token": TOKEN})
        # Lax: a /login link opened from another site keeps its cookie on the redirect that follows it.
        assert "samesite=lax" in login.headers["set-cookie"].lower()
        csrf = _csrf(c)
        # API clients with the token as Bearer write without a page's CSRF token; a wrong Bearer gets nothing.
        bearer = httpx2.post(srv.url + url, json={"text": "by the api"}, headers={"authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200 and bearer.json()["corrected"] == "by the api"
        wrong = httpx2.post(srv.url + url, json={"text": "x"}, headers={"authorization": f"Bearer x{TOKEN}"})
        assert wrong.status_code == 401
    # The server restarts while the page is open: the sign-in cookie and the page's CSRF token still hold.
    with Server(tokened) as again:
        c.base_url = httpx2.URL(again.url)
        saved = c.post(url, json={"text": "after a restart"}, headers={"x-csrf-token": csrf})
        assert saved.status_code == 200, saved.text
        assert saved.json()["corrected"] == "after a restart"
    c.close()


def test_the_sign_in_token_never_reaches_the_access_log(job, tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    settings, _ = job
    port = free_port()
    log = tmp_path / "review.log"
    env = {**os.environ, **_env(settings), "CAPTIONER_REVIEW_TOKEN": TOKEN, "CAPTIONER_LOG_LEVEL": "INFO"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "review", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def listening() -> bool:
            assert proc.poll() is None, log.read_text()  # a server that exited will never answer
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_for(listening, 60, "the review page to listen")
        assert httpx2.get(f"http://127.0.0.1:{port}/login", params={"token": TOKEN}).status_code == 303
        assert httpx2.get(f"http://127.0.0.1:{port}/login", params={"token": "wrong-" + TOKEN}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(20)
    text = log.read_text()
    assert 'GET /login?token=*** HTTP/1.1" 303' in text and "401" in text, text
    assert TOKEN not in text


def test_demo_prefix_unset_roots_and_a_fine_tune_page_say_where_things_are(job, tmp_path: Path) -> None:
    from common.messages import TrainRequest
    from training.jobs import open_train_job

    settings, ids = job
    demo = settings.model_copy(update={"key_prefix": settings.key_prefix + "-demo"})
    ledger = _ledger(demo)
    ledger.open_job("demo-x", "demo", GenParams())
    ledger.r.close()
    empty = settings.model_copy(update={"key_prefix": settings.key_prefix + "-nothing", "allowed_roots": []})
    with Server(empty) as srv:  # no job here and none under this prefix's demo prefix: no hint
        page = httpx2.get(srv.url + "/").text
    assert "No jobs yet under the key prefix" in page and 'id="other-prefix"' not in page
    with Server(settings.model_copy(update={"allowed_roots": []})) as srv:
        ledger = _ledger(settings)
        # The demo's jobs are under <prefix>-demo: the empty jobs list says how to see them.
        bare = settings.model_copy(update={"key_prefix": settings.key_prefix + "-x"})
        _ledger(settings.model_copy(update={"key_prefix": bare.key_prefix + "-demo"})).open_job("d", "d", GenParams())
        grid = httpx2.get(f"{srv.url}/jobs/{JOB}").text
        item = httpx2.get(f"{srv.url}/jobs/{JOB}/items/{ids['plain']}").text
        req = TrainRequest(job_id="train-x", dataset=str(tmp_path / "reviewed-set"), config={}, promote=False)
        open_train_job(ledger, req)
        train = httpx2.get(f"{srv.url}/jobs/train-x").text
    assert 'id="roots-warning"' in grid and "CAPTIONER_ALLOWED_ROOTS" in grid and 'id="roots-warning"' in item
    assert f'<dd class="dataset">{tmp_path / "reviewed-set"}</dd>' in train
    with Server(bare) as srv:
        page = httpx2.get(srv.url + "/").text
    assert f"CAPTIONER_KEY_PREFIX={bare.key_prefix}-demo captioner review" in page
    with Server(settings) as srv:  # roots set: no warning
        assert 'id="roots-warning"' not in httpx2.get(f"{srv.url}/jobs/{JOB}").text


def test_stale_edits_are_refused_with_the_newer_text_and_undo_over_http(job) -> None:
    settings, ids = job
    url = f"/api/jobs/{JOB}/items/{ids['plain']}"
    with Server(settings) as srv, httpx2.Client(base_url=srv.url) as c:
        h = {"x-csrf-token": _csrf(c)}
        # Saving the model's own caption is no correction.
        same = c.post(url + "/correction", headers=h, json={"text": "a plain caption", "base_version": 0})
        assert same.status_code == 200 and "corrected" not in same.json()
        first = c.post(url + "/correction", headers=h, json={"text": "a blue box", "base_version": 0}).json()
        assert first["review_version"] == 1
        stale = c.post(url + "/correction", headers=h, json={"text": "a red box", "base_version": 0})
        assert stale.status_code == 409 and stale.json()["current"]["corrected"] == "a blue box"
        page = c.get(f"/jobs/{JOB}/items/{ids['plain']}").text
        assert '<span class="diff-del">plain caption</span>' in page
        assert '<span class="diff-ins">blue box</span>' in page
        assert c.post(
            f"/api/jobs/{JOB}/marks",
            headers=h,
            json={"ids": [ids["plain"]], "mark": "rejected", "reason": "wrong colour"},
        ).json() == {"changed": 1}
        history = c.get(url + "/history").json()
        assert [(e["version"], e["mark"], e["reason"]) for e in history] == [
            (1, None, None),
            (2, "rejected", "wrong colour"),
        ]
        undone = c.post(url + "/undo", headers=h, json={"base_version": 2}).json()
        assert undone["corrected"] == "a blue box" and "mark" not in undone and undone["review_version"] == 3
        assert c.post(url + "/undo", headers=h, json={"base_version": 2}).status_code == 409


def test_bulk_actions_cover_the_whole_filter_and_downloads_carry_reasons(job) -> None:
    import csv

    settings, ids = job
    ledger = _ledger(settings)
    more = [(f"extra{i:03d}", f"/elsewhere/x{i:03d}.png") for i in range(130)]
    ledger.add_items(JOB, more)
    ledger.record(
        JOB, [ItemResult(id=i, ref=r, status=ItemStatus.OK, caption=f"a shape {n}") for n, (i, r) in enumerate(more)]
    )
    with Server(settings) as srv, httpx2.Client(base_url=srv.url) as c:
        h = {"x-csrf-token": _csrf(c)}
        grid = c.get(f"/jobs/{JOB}", params={"q": "shape", "limit": "24", "sort": "name"}).text
        assert "1-24 of 130" in grid  # the filtered view's total, not only this page's
        names = re.findall(r'alt="/elsewhere/(x\d+)\.png"', grid)
        assert names == sorted(names) and names[0] == "x000"
        started = c.post(
            f"/api/jobs/{JOB}/bulk", headers=h, json={"action": "reject", "filter": {"q": "shape"}, "reason": "blurry"}
        )
        assert started.status_code == 202 and started.json()["total"] == 130
        bulk_id = started.json()["id"]
        wait_for(lambda: c.get(f"/api/bulk/{bulk_id}").json()["state"] != "running", 60, "the bulk action to end")
        state = c.get(f"/api/bulk/{bulk_id}").json()
        assert (state["state"], state["done"], state["changed"]) == ("done", 130, 130)
        rejected = [r for r in ledger.reviewed(JOB)]
        assert len(rejected) == 130 and {r["reason"] for r in rejected} == {"blurry"}
        assert ledger.item(JOB, ids["plain"]).get("mark") is None  # outside the filter: untouched
        got = c.get(f"/api/jobs/{JOB}/download", params={"format": "csv", "reviewed": "1"})
        assert got.status_code == 200 and 'filename="job-http-reviewed.csv"' in got.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(got.text)))
        assert len(rows) == 130 and {r["reason"] for r in rows} == {"blurry"}
        assert c.get(f"/api/jobs/{JOB}/download", params={"format": "sidecar"}).status_code == 422
    ledger.r.close()


def test_the_demo_says_how_to_review_its_captions(tmp_path: Path) -> None:
    from cli.demo import review_hint

    settings = _settings(tmp_path, CAPTIONER_KEY_PREFIX="captioner-demo", CAPTIONER_MODEL_STORE=str(tmp_path / "m"))
    hint = review_hint(settings, tmp_path, "demo-1", kept=True, local_redis=False)
    assert hint == (
        f"Review these captions in the browser: CAPTIONER_KEY_PREFIX=captioner-demo "
        f"CAPTIONER_ALLOWED_ROOTS={tmp_path} CAPTIONER_MODEL_STORE={tmp_path / 'm'} captioner review, "
        "then open http://127.0.0.1:8765/jobs/demo-1"
    )
    gone = review_hint(settings, tmp_path, "demo-1", kept=False, local_redis=True)
    assert "--workdir DIR" in gone and "a running Redis" in gone


def test_promote_from_the_models_page_is_gated_on_one_dataset_and_rollback_is_a_button(job, tmp_path: Path) -> None:
    from common.store import ModelStore

    settings, _ = job
    store = ModelStore(tmp_path / "store")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    old = store.add(weights, {"base_model": "tiny"}, "v-old").version
    new = store.add(
        weights,
        {
            "base_model": "tiny",
            "metrics": {"wer": 0.12},
            "eval_fingerprint": "tiny5",
            "eval_examples": 5,
            "dataset": "/x/reviewed",
        },
        "v-new",
    ).version
    store.record_evaluation(old, "held100", {"wer": 0.232}, dataset="/data/held-out", n=100)
    store.promote(old)
    with Server(settings.model_copy(update={"model_store": store.root})) as srv, httpx2.Client(base_url=srv.url) as c:
        page = c.get("/models").text
        assert "/data/held-out, 100 image(s) (fingerprint held100)" in page
        assert "training-time: 5 example(s) held out of /x/reviewed (fingerprint tiny5)" in page
        h = {"x-csrf-token": _csrf(c, "/models")}
        gate = {"require_no_worse": "wer", "fingerprint": "held100"}
        # The new version's 0.12 was measured on 5 training images: no score on the current one's data, no promotion.
        refused = c.post(f"/api/models/{new}/promote", headers=h, json=gate)
        assert refused.status_code == 422
        assert "v-new has no evaluation on the dataset held100" in refused.json()["error"]
        store.record_evaluation(new, "held100", {"wer": 0.246}, dataset="/data/held-out", n=100)
        worse = c.post(f"/api/models/{new}/promote", headers=h, json=gate)
        assert worse.status_code == 422
        assert worse.json()["error"].startswith(
            "not promoted: v-new wer 0.2460 vs current v-old 0.2320 on /data/held-out, 100 image(s)"
        )
        assert store.current().version == old
        store.record_evaluation(new, "held100", {"wer": 0.2}, dataset="/data/held-out", n=100)
        better = c.post(f"/api/models/{new}/promote", headers=h, json=gate).json()
        assert better["promoted"] == new and better["comparison"]["new"] == 0.2 and store.current().version == new
        back = c.post(f"/api/models/{old}/rollback", headers=h, json={}).json()
        assert back == {"promoted": old, "previous": new} and store.current().version == old
        assert c.post("/api/models/v-nope/rollback", headers=h, json={}).status_code == 422


def test_assigning_a_filter_to_a_reviewer_links_them_to_it_and_marks_the_items_theirs(job) -> None:
    settings, ids = job
    with Server(settings) as srv, httpx2.Client(base_url=srv.url) as c:
        h = {"x-csrf-token": _csrf(c)}
        given = c.post(f"/api/jobs/{JOB}/assign", headers=h, json={"reviewer": "bea", "filter": {"status": "error"}})
        assert given.json() == {"bea": {"status": "error"}}
        bad = c.post(f"/api/jobs/{JOB}/assign", headers=h, json={"reviewer": "bea", "filter": {"status": "maybe"}})
        assert bad.status_code == 422
        grid = c.get(f"/jobs/{JOB}").text
        assert f'href="/jobs/{JOB}?status=error">bea: status=error</a>' in grid
        theirs = c.get(f"/jobs/{JOB}/items/{ids['failed']}").text
        assert "This item is assigned to bea." in theirs
        assert 'id="assigned-to"' not in c.get(f"/jobs/{JOB}/items/{ids['plain']}").text
        assert c.post(f"/api/jobs/{JOB}/assign", headers=h, json={"reviewer": "bea", "filter": {}}).json() == {}
        assert "This item is assigned" not in c.get(f"/jobs/{JOB}/items/{ids['failed']}").text


def test_a_fine_tune_promoted_from_the_page_is_gated_by_default(job, tiny_model: Path) -> None:
    settings, ids = job
    with Server(settings) as srv, httpx2.Client(base_url=srv.url) as c:
        h = {"x-csrf-token": _csrf(c)}
        c.post(f"/api/jobs/{JOB}/marks", headers=h, json={"ids": [ids["plain"]], "mark": "accepted"})
        form = {
            "base_model": str(tiny_model),
            "max_steps": "2",
            "promote": True,
            "require_no_worse": "wer",
            "gate_dataset": "/data/held-out",
        }
        queued = c.post(f"/api/jobs/{JOB}/train", headers=h, json=form)
        assert queued.status_code == 200, queued.text
        request = _ledger(settings).get_field(queued.json()["train_job"], "request")
        assert request["promote"] is True and request["require_no_worse"] == "wer"
        assert request["gate_dataset"] == "/data/held-out"
        page = c.get(f"/jobs/{queued.json()['train_job']}").text
        assert "when done, if no worse on wer than the current version on /data/held-out" in page
    # No training worker here: the message is taken back, so no later test's worker trains on it.
    redis.Redis.from_url(settings.broker_url_str).delete(settings.training_queue)
