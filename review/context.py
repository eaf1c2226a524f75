"""What every handler of the review page shares: settings, the job client and its ledger, thumbnails, templates,
and the request helpers (filters from a query string, JSON bodies, named errors as HTTP statuses)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.requests import Request
from starlette.templating import Jinja2Templates

from common.errors import (
    ITEM_ERROR_CODES,
    BrokerUnavailable,
    CaptionerError,
    ConfigError,
    InvalidReview,
    NotCaptioned,
    ReviewConflict,
    UnknownItem,
    UnknownJob,
)
from common.messages import QUALITY_FLAGS, ItemStatus
from common.settings import Settings
from ledger import Ledger
from producer.jobs import JobClient
from review.security import Access
from review.thumbs import Thumbnails
from review.views import Bulks, Views

HERE = Path(__file__).parent
#: Largest request body the page accepts (a correction is at most a few KB of JSON).
MAX_BODY_BYTES = 64 * 1024
PAGE_SIZES = (24, 48, 96, 200)


class BodyTooLarge(InvalidReview):
    """A request body over ``MAX_BODY_BYTES`` (413): refused by its Content-Length, or as soon as a streamed body
    passes the cap, never read whole."""


STATUS_OF_ERROR: dict[type[CaptionerError], int] = {
    BodyTooLarge: 413,
    UnknownJob: 404,
    UnknownItem: 404,
    NotCaptioned: 409,
    ReviewConflict: 409,
    InvalidReview: 422,
    ConfigError: 422,
    BrokerUnavailable: 503,
}


def status_of(exc: CaptionerError) -> int:
    """The HTTP status a named error becomes: 404 unknown, 409 nothing to review, 422 refused, 503 Redis down."""
    return next((code for cls, code in STATUS_OF_ERROR.items() if isinstance(exc, cls)), 400)


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    env.filters["q"] = lambda value: quote(str(value), safe="")
    env.filters["when"] = lambda ts: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts))) if ts else ""
    env.globals.update(ERROR_CODES=ITEM_ERROR_CODES, FLAGS=QUALITY_FLAGS, STATUSES=[s.value for s in ItemStatus])
    return Jinja2Templates(env=env)


@dataclass
class Review:
    """The page's state for one server process."""

    settings: Settings
    client: JobClient
    access: Access
    thumbs: Thumbnails
    templates: Jinja2Templates = field(default_factory=_templates)
    #: (when, snapshot) of the last workers and queues look-up, shared by every open page.
    workers_cache: tuple[float, dict[str, Any]] | None = None
    #: The one workers look-up in flight (every request meanwhile waits for it) and how many were taken.
    workers_lookup: asyncio.Future[dict[str, Any]] | None = None
    workers_taken: int = 0
    views: Views = field(default_factory=Views)
    bulks: Bulks = field(default_factory=Bulks)
    #: Evaluations started from the models page: version -> what became of the last one.
    evaluations: dict[str, str] = field(default_factory=dict)

    @property
    def ledger(self) -> Ledger:
        return self.client.ledger

    @property
    def reviewer(self) -> str:
        s = self.settings
        return s.review_reviewer or s.review_user or "local"

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any) -> Any:
        context.update(csrf=request.state.csrf, reviewer=self.reviewer)
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)


def review_of(request: Request) -> Review:
    ctx = request.app.state.review
    assert isinstance(ctx, Review)
    return ctx


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, refused (413) when too large, (422) when not JSON or not an object."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise BodyTooLarge(f"request body over {MAX_BODY_BYTES} bytes (Content-Length {declared[:20]})")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise InvalidReview("request body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidReview("request body must be a JSON object")
    return body


def page_link(path: str, params: dict[str, str], **changes: str | None) -> str:
    """``path`` with the query ``params`` updated by ``changes`` (None or "" removes a parameter)."""
    merged = {**params, **changes}
    query = urlencode({k: v for k, v in merged.items() if v})
    return f"{path}?{query}" if query else path
