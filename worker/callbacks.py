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
from worker.images import ImagePolicy, make_client, parse_url, resolve_checked


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def post_webhook(url: str, summary: dict[str, Any], *, secret: str | None, policy: ImagePolicy) -> int:
    """POST the summary to the checked address of ``url`` (no redirects followed); returns the status."""
    target = parse_url(url)
    deadline = time.monotonic() + policy.total_timeout_s
    ip = resolve_checked(target, policy, deadline)
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
    extensions = {"sni_hostname": target.raw_host.decode("ascii")} if target.scheme == "https" else {}
    timeout = httpx2.Timeout(policy.total_timeout_s, connect=policy.connect_timeout_s)
    with make_client() as client:
        try:
            resp = client.post(
                target.copy_with(host=str(ip)), content=body, headers=headers, timeout=timeout, extensions=extensions
            )
        except httpx2.HTTPError as exc:
            raise FetchError(f"webhook {target.host}: {exc}", transient=True) from None
    if resp.status_code >= 300:
        raise FetchError(f"webhook {target.host} answered {resp.status_code}", transient=resp.status_code >= 500)
    return resp.status_code
