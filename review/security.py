"""Who may use the review page and how: the bind-address rule, token or basic authentication, cross-site request
protection (a CSRF token tied to a SameSite=Strict session cookie, plus an Origin check) and security headers."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

from common.errors import ConfigError
from common.settings import Settings

SESSION_COOKIE = "captioner_review_session"
AUTH_COOKIE = "captioner_review_auth"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Every asset is ours: no CDN, no inline script or style, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def is_loopback(host: str) -> bool:
    """Whether an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """The page's authentication as configured; ``secret`` signs sessions and auth cookies for this process."""

    token: str | None
    user: str | None
    password: str | None
    secret: bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        token = settings.review_token.get_secret_value() if settings.review_token else None
        password = settings.review_password.get_secret_value() if settings.review_password else None
        if token is not None and len(token) < 16:
            raise ConfigError("CAPTIONER_REVIEW_TOKEN must be at least 16 characters (e.g. openssl rand -hex 16)")
        return cls(token or None, settings.review_user, password, secrets.token_bytes(32))

    @property
    def required(self) -> bool:
        return self.token is not None or self.user is not None

    def sign(self, value: str) -> str:
        return hmac.new(self.secret, value.encode(), hashlib.sha256).hexdigest()

    def csrf(self, session: str) -> str:
        """The CSRF token of a session: only pages served to that session's browser carry it."""
        return self.sign("csrf:" + session)

    def auth_cookie(self) -> str:
        assert self.token is not None
        return self.sign("auth:" + self.token)

    def allows(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if self.token is not None:
            if scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), self.token):
                return True
            cookie = request.cookies.get(AUTH_COOKIE, "")
            if cookie and hmac.compare_digest(cookie, self.auth_cookie()):
                return True
        if self.user is not None and self.password is not None and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            same_user = hmac.compare_digest(user.encode(), self.user.encode())
            return same_user & hmac.compare_digest(password.encode(), self.password.encode())
        return False


def check_bind(settings: Settings) -> None:
    """Refuse to serve beyond this machine without authentication: one line, before anything starts."""
    if not is_loopback(settings.review_host) and not (settings.review_token or settings.review_user):
        raise ConfigError(
            f"refusing to serve the review page on {settings.review_host} without authentication: set "
            "CAPTIONER_REVIEW_TOKEN or CAPTIONER_REVIEW_USER/CAPTIONER_REVIEW_PASSWORD (or bind 127.0.0.1)"
        )


def allowed_hosts(settings: Settings) -> list[str]:
    """Host headers the page answers: on loopback only loopback names (a DNS-rebinding page gets nothing)."""
    if is_loopback(settings.review_host):
        return sorted({"127.0.0.1", "localhost", "::1", settings.review_host.strip("[]")})
    return ["*"]


class Guard(BaseHTTPMiddleware):
    """Authentication, the session cookie, CSRF and Origin checks on every state-changing request, and headers."""

    def __init__(self, app: ASGIApp, access: Access, *, secure_cookies: bool = False) -> None:
        super().__init__(app)
        self.access = access
        self.secure = secure_cookies

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await self._checked(request, call_next)
        response.headers["content-security-policy"] = CSP
        response.headers["x-content-type-options"] = "nosniff"
        response.headers["referrer-policy"] = "same-origin"
        response.headers["x-frame-options"] = "DENY"
        response.headers.setdefault("cache-control", "no-store")
        return response

    async def _checked(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path == "/login":
            return self._login(request)
        if self.access.required and not self.access.allows(request):
            return self._unauthorized(request)
        session = request.cookies.get(SESSION_COOKIE)
        if request.method not in SAFE_METHODS:
            refusal = self._cross_site(request, session)
            if refusal:
                return JSONResponse({"error": refusal}, status_code=403)
        new_session = None
        if not session:
            session = new_session = secrets.token_hex(16)
        request.state.session = session
        request.state.csrf = self.access.csrf(session)
        response = await call_next(request)
        if new_session:
            response.set_cookie(SESSION_COOKIE, new_session, httponly=True, samesite="strict", secure=self.secure)
        return response

    def _cross_site(self, request: Request, session: str | None) -> str | None:
        """Why a state-changing request is refused, or None when it came from one of our own pages."""
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            return f"cross-site request from {origin} refused"
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "cross-site request refused"
        token = request.headers.get(CSRF_HEADER, "")
        if not session or not token or not hmac.compare_digest(token, self.access.csrf(session)):
            return "missing or stale CSRF token: reload the page"
        return None

    def _login(self, request: Request) -> Response:
        given = request.query_params.get("token", "")
        if self.access.token is None or not hmac.compare_digest(given, self.access.token):
            return PlainTextResponse("wrong or missing token", status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            AUTH_COOKIE, self.access.auth_cookie(), httponly=True, samesite="strict", secure=self.secure
        )
        return response

    def _unauthorized(self, request: Request) -> Response:
        if self.access.user is not None:
            return PlainTextResponse(
                "authentication required",
                status_code=401,
                headers={"www-authenticate": 'Basic realm="captioner review"'},
            )
        return PlainTextResponse("authentication required: open /login?token=<CAPTIONER_REVIEW_TOKEN>", status_code=401)
