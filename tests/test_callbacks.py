"""Job completion for other services: a Celery task by name and a signed webhook, sent once per job end."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from producer.jobs import JobClient
from tests.conftest import WEBHOOK_SECRET
from tests.test_recovery import wait_for

pytestmark = pytest.mark.usefixtures("caption_worker")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hook_server():
    received: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


def documented_verifier():
    """``verify_signature`` as docs/integration.md gives it to receivers, run as written."""
    text = (ROOT / "docs" / "integration.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "def verify_signature" in b]
    namespace: dict[str, object] = {}
    exec(compile(block, "docs/integration.md", "exec"), namespace)
    return namespace["verify_signature"]


def test_finished_job_sends_its_summary_to_a_task_and_a_signed_webhook(
    client: JobClient, images: Path, hook_server, settings
) -> None:
    url, received = hook_server
    queue = f"svc-{uuid.uuid4().hex[:8]}"  # another service's queue: nothing consumes it in this test
    refs = [str(p) for p in sorted(images.glob("*.jpg"))]
    extra = {"on_done_task": "othersvc.job_finished", "on_done_queue": queue, "webhook": url}
    client.enqueue(refs, job_id="job-hooks", extra=extra, chunk_size=2)  # five chunks race to finish the job
    client.wait("job-hooks", timeout=60, on_tick=lambda _: None)
    wait_for(lambda: len(received) >= 1, 30, "the webhook")
    headers, body = received[0]
    summary = json.loads(body)
    assert (summary["id"], summary["ok"], summary["state"]) == ("job-hooks", 10, "done")
    # The documented recipe, by hand: "sha256=" + hex HMAC-SHA256 of "<timestamp>.<body>" under the secret.
    stamp = headers["X-Captioner-Timestamp"]
    mac = hmac.new(WEBHOOK_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers["X-Captioner-Signature"] == f"sha256={mac}"
    verify = documented_verifier()
    assert verify(WEBHOOK_SECRET, headers, body)
    assert not verify(WEBHOOK_SECRET, headers, body.replace(b'"ok":10', b'"ok":11'))  # a body changed on the way
    assert not verify("another-secret", headers, body)
    r = redis.Redis.from_url(settings.broker_url_str)
    wait_for(lambda: r.llen(queue) >= 1, 30, "the completion task message")
    message = json.loads(r.lpop(queue))
    assert message["headers"]["task"] == "othersvc.job_finished"
    _args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs["job"]["id"] == "job-hooks" and kwargs["job"]["ok"] == 10

    # A re-run finds it all captioned: the job ends once more, and that end is the barrier: every call of the
    # first end went out before it, so by the time the second webhook is in, a duplicate would be too.
    client.enqueue(refs, job_id="job-hooks", extra=extra)
    wait_for(lambda: len(received) >= 2 and r.llen(queue) >= 1, 30, "the second end's webhook and task")
    ends = [json.loads(b)["finished"] for _, b in received]
    assert len(received) == 2 and ends[0] != ends[1], f"{len(received)} webhook call(s) for 2 job ends: {ends}"
    assert r.llen(queue) == 1, "the completion task was sent more than once for one job end"


def test_webhook_to_a_private_address_is_refused_and_recorded(client: JobClient, images: Path) -> None:
    client.enqueue([str(next(images.glob("*.jpg")))], job_id="job-bad-hook", extra={"webhook": "http://10.0.0.1/x"})
    client.wait("job-bad-hook", timeout=60, on_tick=lambda _: None)
    wait_for(lambda: client.ledger.get_field("job-bad-hook", "webhook_error") is not None, 30, "the refusal")
    assert "10.0.0.1" in client.ledger.get_field("job-bad-hook", "webhook_error")
