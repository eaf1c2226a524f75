"""`captioner review`: checks the bind address against the authentication, then serves the page with Uvicorn."""

from __future__ import annotations

from collections.abc import Callable

from common.settings import Settings
from review.security import check_bind


def serve(settings: Settings, *, say: Callable[[str], None] = print) -> None:
    """Serve until interrupted; refuses (ConfigError) to listen beyond loopback without authentication."""
    check_bind(settings)
    import uvicorn

    from review.app import create_app

    app = create_app(settings)
    host = settings.review_host
    shown = f"[{host}]" if ":" in host else host
    login = " (sign in at /login?token=<CAPTIONER_REVIEW_TOKEN>)" if settings.review_token else ""
    say(f"review page on http://{shown}:{settings.review_port}/{login}")
    # One process: CSRF sessions are signed with a key made at start, and thumbnails are cached in memory.
    uvicorn.run(
        app,
        host=host,
        port=settings.review_port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=2,
        server_header=False,
    )
