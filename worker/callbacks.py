"""Job completion for other services: a signed HTTP webhook, held to the same URL rules as image fetching.

The body is the job summary as JSON. ``X-Captioner-Signature: sha256=<hex>`` is the HMAC-SHA256 of
``<X-Captioner-Timestamp>.<body>`` under ``CAPTIONER_WEBHOOK_SECRET``; receivers recompute it and reject
stale timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx2

from common.errors import FetchError
from media.images import (
    TRANSIENT_STATUSES,
    FetchGuard,
    ImagePolicy,
    default_guard,
    http_errors,
    make_client,
    parse_url,
    resolve_checked,
)

#: Most bytes of a receiver's answer that are read: only its status is used, and an endless body must not grow
#: the worker (nor keep the connection open).
ANSWER_CAP = 64 * 1024


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def post_webhook(
    url: str, summary: dict[str, Any], *, secret: str | None, policy: ImagePolicy, guard: FetchGuard | None = None
) -> int:
    """POST the summary to the checked address of ``url`` (no redirects followed); returns the status.

    The same rules as image URLs: the address checked before connecting, one deadline over the whole exchange
    (``guard``; a stopping worker abandons it), and at most ``ANSWER_CAP`` bytes of the answer read.
    """
    target = parse_url(url)
    deadline = time.monotonic() + policy.total_timeout_s
    body = json.dumps(summary, separators=(",", ":"), default=str).encode()
    stamp = str(int(time.time()))
    headers = {
        "Host": target.netloc.decode("ascii"),
        "Content-Type": "application/json",
        "X-Captioner-Timestamp": stamp,
        "Connection": "close",
    }
    if secret:
        headers["X-Captioner-Signature"] = sign(secret, stamp, body)
    host = f"webhook {target.host}"
    with (guard or default_guard()).watch(deadline, policy.total_timeout_s) as watch:
        ip = resolve_checked(target, policy, deadline, watch)
        extensions: dict[str, Any] = {"trace": watch.trace}
        if target.scheme == "https":
            extensions["sni_hostname"] = target.raw_host.decode("ascii")
        remaining = max(0.0, deadline - time.monotonic())
        # Per-read timeouts past the deadline: the guard ends the exchange at the deadline itself.
        timeout = httpx2.Timeout(remaining + 1, connect=min(policy.connect_timeout_s, remaining))
        request = {"content": body, "headers": headers, "timeout": timeout, "extensions": extensions}
        with (
            make_client() as client,
            http_errors(host, watch),
            client.stream("POST", target.copy_with(host=str(ip)), **request) as resp,
        ):
            _read_some(resp, ANSWER_CAP)
            status = resp.status_code
        if watch.ended:
            raise watch.error(host)
    if status >= 300:
        raise FetchError(f"{host} answered {status}", transient=status in TRANSIENT_STATUSES)
    return status


def _read_some(resp: httpx2.Response, cap: int) -> None:
    """Read at most ``cap`` bytes of the answer, then stop (closing the stream hangs up on the rest)."""
    read = 0
    for chunk in resp.iter_raw():
        read += len(chunk)
        if read >= cap:
            return
