"""The review page over real HTTP (Uvicorn on 127.0.0.1, real Redis): the bind rule, authentication, cross-site
protection, clear 4xx answers that change nothing, captions as text, and thumbnails only through item ids under the
workers' image policy."""

from __future__ import annotations

import io
import re
import threading
import time
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
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the review server did not start"
            time.sleep(0.02)
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
        assert post(f"/items/{ids['plain']}/correction", content=b"x" * 70_000).status_code == 422
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
    wer = re.search(r'aria-label="wer over evaluations">\s*<polyline points="([^"]+)"', text).group(1)
    heights = [float(point.split(",")[1]) for point in wer.split()]
    assert len(heights) == 3 and heights[0] < heights[1] < heights[2]  # 0.9, 0.5, 0.25: falling WER, lower is lower


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
