"""Job completion for other services: a Celery task by name and a signed webhook, sent once per job end."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from producer.jobs import JobClient
from tests.conftest import WEBHOOK_SECRET
from tests.test_recovery import wait_for
from worker.callbacks import sign

pytestmark = pytest.mark.usefixtures("caption_worker")


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


def test_finished_job_sends_its_summary_to_a_task_and_a_signed_webhook(
    client: JobClient, images: Path, hook_server, settings
) -> None:
    url, received = hook_server
    queue = f"svc-{uuid.uuid4().hex[:8]}"  # another service's queue: nothing consumes it in this test
    refs = [str(p) for p in sorted(images.glob("*.jpg"))]
    extra = {"on_done_task": "othersvc.job_finished", "on_done_queue": queue, "webhook": url}
    client.enqueue(refs, job_id="job-hooks", extra=extra)
    client.wait("job-hooks", timeout=60, on_tick=lambda _: None)
    wait_for(lambda: len(received) >= 1, 30, "the webhook")
    headers, body = received[0]
    summary = json.loads(body)
    assert (summary["id"], summary["ok"], summary["state"]) == ("job-hooks", 10, "done")
    assert headers["X-Captioner-Signature"] == sign(WEBHOOK_SECRET, headers["X-Captioner-Timestamp"], body)
    r = redis.Redis.from_url(settings.broker_url_str)
    wait_for(lambda: r.llen(queue) == 1, 30, "the completion task message")
    message = json.loads(r.lpop(queue))
    assert message["headers"]["task"] == "othersvc.job_finished"
    _args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs["job"]["id"] == "job-hooks" and kwargs["job"]["ok"] == 10
    client.enqueue(refs, job_id="job-hooks", extra=extra)  # a re-run finds it all captioned: one more end
    wait_for(lambda: len(received) == 2, 30, "the second webhook")


def test_webhook_to_a_private_address_is_refused_and_recorded(client: JobClient, images: Path) -> None:
    client.enqueue([str(next(images.glob("*.jpg")))], job_id="job-bad-hook", extra={"webhook": "http://10.0.0.1/x"})
    client.wait("job-bad-hook", timeout=60, on_tick=lambda _: None)
    wait_for(lambda: client.ledger.get_field("job-bad-hook", "webhook_error") is not None, 30, "the refusal")
    assert "10.0.0.1" in client.ledger.get_field("job-bad-hook", "webhook_error")
