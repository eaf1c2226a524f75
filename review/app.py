"""The review web application: Starlette routes, our own static files, errors as clear 4xx answers."""

from __future__ import annotations

from typing import Any

import redis
from kombu.exceptions import OperationalError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from common.errors import BrokerUnavailable, CaptionerError, ReviewConflict
from common.settings import Settings
from producer.jobs import JobClient
from review import api, live, models, pages
from review.context import HERE, Review, status_of
from review.security import Access, Guard, allowed_hosts
from review.thumbs import Thumbnails


def create_app(settings: Settings, *, client: JobClient | None = None) -> Starlette:
    """The page for ``settings`` (bind, authentication, export folder, thumbnail cache, image policy)."""
    access = Access.from_settings(settings)
    review = Review(
        settings=settings,
        client=client or JobClient(settings),
        access=access,
        thumbs=Thumbnails(settings, settings.review_thumb_cache_bytes),
    )
    job, item = "/jobs/{job_id:str}", "/jobs/{job_id:str}/items/{item_id:str}"
    routes = [
        Route("/", pages.jobs_page),
        Route("/models", pages.models_page),
        Route(job, pages.job_page),
        Route(item, pages.item_page),
        Route(item + "/thumb", pages.thumbnail),
        Route("/events/jobs", live.job_events),
        Route("/api/workers", live.workers),
        Route("/api/jobs", api.jobs),
        Route("/api" + job + "/items", api.items),
        Route("/api" + item + "/correction", api.set_correction, methods=["POST"]),
        Route("/api" + item + "/correction", api.clear_correction, methods=["DELETE"]),
        Route("/api" + item + "/undo", api.undo, methods=["POST"]),
        Route("/api" + item + "/history", api.history),
        Route("/api" + job + "/marks", api.set_marks, methods=["POST"]),
        Route("/api" + job + "/bulk", api.bulk, methods=["POST"]),
        Route("/api" + job + "/assign", api.assign, methods=["POST"]),
        Route("/api/bulk/{bulk_id:str}", api.bulk_progress),
        Route("/api" + job + "/download", api.download),
        Route("/api" + job + "/retry", api.caption_again, methods=["POST"]),
        Route("/api" + job + "/export", api.export_reviewed, methods=["POST"]),
        Route("/api" + job + "/train", api.train, methods=["POST"]),
        Route("/api/models/{version:str}/promote", models.promote, methods=["POST"]),
        Route("/api/models/{version:str}/rollback", models.rollback, methods=["POST"]),
        Route("/api/models/{version:str}/evaluate", models.evaluate, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings)),
        Middleware(Guard, access=access),
    ]
    handlers = {CaptionerError: _error, redis.RedisError: _unreachable, OperationalError: _unreachable}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    app.state.review = review
    return app


async def _unreachable(request: Request, exc: Exception) -> Response:
    """Redis (ledger or broker) down: a 503 that says so, not a stack trace."""
    return await _error(request, BrokerUnavailable(f"cannot reach Redis: {exc} (check CAPTIONER_REDIS_URL)"))


async def _error(request: Request, exc: Exception) -> Response:
    """A named error as its 4xx (5xx when Redis is down): JSON for the API, a short page for a browser. A refused
    edit (409, someone changed the item meanwhile) carries the newer row as ``current``."""
    assert isinstance(exc, CaptionerError)
    status = status_of(exc)
    if request.url.path.startswith(("/api/", "/events/")) or request.url.path.endswith("/thumb"):
        body: dict[str, Any] = {"error": str(exc)}
        if isinstance(exc, ReviewConflict):
            body["current"] = exc.current
        return JSONResponse(body, status_code=status)
    review = request.app.state.review
    assert isinstance(review, Review)
    return review.render(request, "error.html", status_code=status, message=str(exc), status=status)
