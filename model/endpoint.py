"""Captions from an OpenAI-compatible server (vLLM, SGLang, TGI, ``transformers serve``, Ollama, LM Studio).

One ``POST {url}/chat/completions`` per image, the image inline as a JPEG data URL re-encoded from the pixels this
project decoded (``media.images.encode_upload``), a bounded number of requests in flight. The engine has the
in-process engine's interface (``prepare`` on decode threads, ``generate_detailed`` a list in and a checked list of
the same length out) plus ``submit``, which the worker's service uses instead of its micro-batcher: the server
batches requests itself, and a batch here would only wait for its slowest answer.

Failures are per image: a refusal for now (429, 5xx) or a dropped connection is retried here with a backoff, then
becomes a transient row (sent again later by the chunk protocol); a slow answer is a transient ``timeout`` row; any
other refusal or an answer that is not a chat completion is an ``endpoint_error`` row with the server's reason.
The API key travels only in the request's Authorization header.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx2

from common.errors import ConfigError, EndpointError, FetchError, FetchTimeout, InvalidInput, ItemError, ModelLoadError
from common.messages import GenParams
from media.images import TRANSIENT_STATUSES, FetchGuard, encode_upload

if TYPE_CHECKING:
    from PIL.Image import Image

    from common.settings import Settings

log = logging.getLogger(__name__)

#: What rows and metrics name this kind of engine (the in-process ones are named by their model family).
FAMILY = "endpoint"
#: Seconds to open a connection to the server, at most (a refused or unroutable server fails fast).
CONNECT_TIMEOUT_S = 10.0
#: First backoff of a quick retry, doubled each time; the server's Retry-After is honoured up to MAX_BACKOFF_S.
BACKOFF_S, MAX_BACKOFF_S = 0.5, 30.0
#: Seconds the start-up check (GET {url}/models) may take.
CHECK_TIMEOUT_S = 15.0
#: Characters of a server's error text kept in a row.
REASON_CHARS = 300


@dataclass(frozen=True)
class EndpointConfig:
    """Where the server is, what it serves, and how hard to lean on it (see the endpoint_* settings)."""

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never in a repr, a log line or an error
    concurrency: int = 8
    timeout_s: float = 120.0
    retries: int = 3
    prompt: str = "Describe this image in one sentence."
    image_bytes: int = 4 * 1024 * 1024
    image_side: int = 2048
    response_bytes: int = 1024 * 1024

    @classmethod
    def from_settings(cls, s: Settings) -> EndpointConfig:
        key = s.endpoint_api_key.get_secret_value() if s.endpoint_api_key else None
        return cls(
            url=base_url(s.endpoint_url),
            model=s.model,
            api_key=key or None,
            concurrency=s.endpoint_concurrency,
            timeout_s=s.endpoint_timeout_s,
            retries=s.endpoint_retries,
            prompt=s.endpoint_prompt,
            image_bytes=s.endpoint_image_bytes,
            image_side=s.endpoint_image_side,
            response_bytes=s.endpoint_response_bytes,
        )


def base_url(url: str) -> str:
    """The API base as given, checked: http(s), a host, no credentials, query or fragment; no trailing slash."""
    try:
        parsed = httpx2.URL(url.strip())
    except httpx2.InvalidURL as exc:
        raise ConfigError(f"CAPTIONER_ENDPOINT_URL {url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"CAPTIONER_ENDPOINT_URL must be an http(s) URL like http://127.0.0.1:8000/v1, not {url!r}")
    if parsed.userinfo or parsed.query or parsed.fragment:
        # Anything secret in the URL would reach logs and `captioner_info`: keys go in CAPTIONER_ENDPOINT_API_KEY.
        raise ConfigError(
            "CAPTIONER_ENDPOINT_URL must carry no credentials, query or fragment; put the key in "
            "CAPTIONER_ENDPOINT_API_KEY"
        )
    return str(parsed).rstrip("/")


class Generated(NamedTuple):
    """One answer, shaped like the in-process engine's: text, length as ``max_length`` counts it, ended on its own."""

    text: str
    tokens: int
    ended: bool


class EndpointEngine:
    """Captions through a chat-completions server. ``prepare`` runs on decode threads; requests on its own threads."""

    family = FAMILY
    #: What runs where: the rows' model version is ``endpoint:<model name>``; device is the API base.
    dtype = "remote"
    profile = None  # no speed pieces: what runs is the server's business (rows carry no profile)

    def __init__(self, cfg: EndpointConfig, *, served: list[str] | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self.version = f"{FAMILY}:{cfg.model}"
        self.device = cfg.url
        #: The prompt sent when a job gives none; the worker's service records it in the rows.
        self.default_prompt = cfg.prompt
        #: Model names the server listed at start-up.
        self.served = served or []
        self._url = f"{cfg.url}/chat/completions"
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            # One connection per request: the guard below can then end any request at its deadline,
            # wherever it blocks (a pooled connection's socket is not known to it).
            "Connection": "close",
        }
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._client = httpx2.Client(trust_env=False, follow_redirects=False, headers={"User-Agent": "captioner/0.1"})
        self._guard = FetchGuard()
        self._pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="endpoint")
        # Images encoded and waiting for a request slot, at most one more round of them: bounds the memory of data
        # URLs (decode threads wait here instead of encoding the whole chunk ahead of the server).
        self._room = threading.BoundedSemaphore(2 * cfg.concurrency)
        self._stopped = threading.Event()

    # --- loading and the start-up check ---------------------------------------------------------------
    @classmethod
    def load(cls, cfg: EndpointConfig) -> EndpointEngine:
        """Check the server answers and serves ``cfg.model`` (GET {url}/models), so a misconfigured worker says so
        at start-up instead of failing every item."""
        if cfg.model.startswith("@"):
            raise ConfigError(
                f"an endpoint serves its own models: CAPTIONER_MODEL must be the name the server knows, "
                f"not the model store's {cfg.model!r}"
            )
        served = list_models(cfg)
        if cfg.model not in served:
            listed = ", ".join(repr(m) for m in served[:10]) or "none"
            raise ModelLoadError(
                f"the endpoint {cfg.url} does not serve model {cfg.model!r}; it serves: {listed} "
                "(give one of them with --model / CAPTIONER_MODEL)"
            )
        log.info("endpoint %s serves %s; %d request(s) in flight at most", cfg.url, cfg.model, cfg.concurrency)
        return cls(cfg, served=served)

    def close(self) -> None:
        self._stopped.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # --- the engine interface ----------------------------------------------------------------------------
    def prepare(self, images: list[Image]) -> list[str]:
        """Data URLs of decoded images (JPEG within the byte and side caps); thread-safe, for decode threads."""
        cfg = self.cfg
        return [
            "data:image/jpeg;base64,"
            + base64.b64encode(encode_upload(im, max_bytes=cfg.image_bytes, max_side=cfg.image_side)).decode("ascii")
            for im in images
        ]

    def stack(self, prepared: list[list[str]]) -> list[str]:
        return [url for urls in prepared for url in urls]

    def refuses(self, params: GenParams) -> ItemError | None:
        """Parameters no request can honour (every item would fail alike): one row each instead, saying why."""
        if params.num_beams != 1:
            return InvalidInput(
                f"num_beams {params.num_beams}: beam search is not part of the chat completions API; "
                "use num_beams 1 with an endpoint"
            )
        if not params.prompt:
            return InvalidInput(
                f"max_length {params.max_length} leaves no room after the endpoint's prompt "
                f"({self.default_prompt!r}): raise max_length or give a shorter --prompt"
            )
        return None

    def submit(self, prepared: list[str], params: GenParams) -> Future[Generated]:
        """One image's answer, later; waits while the engine already holds two rounds of images."""
        if len(prepared) != 1:
            raise ValueError(f"submit takes one prepared image, got {len(prepared)}")
        self._room.acquire()
        try:
            future = self._pool.submit(self.request, prepared[0], params)
        except BaseException:
            self._room.release()
            raise
        future.add_done_callback(lambda _: self._room.release())
        return future

    def generate_detailed(self, prepared: list[str], params: GenParams) -> list[Generated]:
        """One answer per image, same order and length; the first image that failed raises its error."""
        futures = [self._pool.submit(self.request, url, params) for url in prepared]
        out = [f.result() for f in futures]
        if len(out) != len(prepared):
            raise EndpointError(f"{len(out)} answers for {len(prepared)} images; results not aligned")
        return out

    def generate(self, prepared: list[str], params: GenParams) -> list[str]:
        return [g.text for g in self.generate_detailed(prepared, params)]

    def caption(self, images: list[Image], params: GenParams) -> list[str]:
        """Captions for ``images``, same length and order."""
        return self.generate(self.prepare(images), params)

    # --- one request -------------------------------------------------------------------------------------
    def request(self, data_url: str, params: GenParams) -> Generated:
        """One image's caption, retrying what the server refuses for now; an ``ItemError`` when there is none."""
        body = json.dumps(self.body(data_url, params), separators=(",", ":")).encode()
        for attempt in range(self.cfg.retries + 1):
            try:
                return self._post(body, params)
            except _Again as again:
                if attempt == self.cfg.retries or self._stopped.is_set():
                    raise again.error from None
                wait = min(
                    again.retry_after if again.retry_after is not None else BACKOFF_S * 2**attempt, MAX_BACKOFF_S
                )
                log.info("endpoint: %s; retrying in %.1fs (%d of %d)", again.error, wait, attempt + 1, self.cfg.retries)
                if self._stopped.wait(wait):
                    raise again.error from None
        raise AssertionError("unreachable")

    def body(self, data_url: str, params: GenParams) -> dict[str, Any]:
        """The chat-completions request for one image: greedy unless the job's parameters say otherwise."""
        content = [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": params.prompt or self.default_prompt},
        ]
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": params.max_length,
            "temperature": 0,
            "stream": False,
        }
        for name in ("temperature", "top_p", "seed"):  # sampling parameters, where a job's GenParams carries them
            value = getattr(params, name, None)
            if value is not None:
                body[name] = value
        return body

    def _post(self, body: bytes, params: GenParams) -> Generated:
        host = self.cfg.url
        deadline = time.monotonic() + self.cfg.timeout_s
        with self._guard.watch(deadline, self.cfg.timeout_s) as watch, _http_errors(host, watch):
            timeout = httpx2.Timeout(self.cfg.timeout_s + 1, connect=min(CONNECT_TIMEOUT_S, self.cfg.timeout_s))
            with self._client.stream(
                "POST",
                self._url,
                content=body,
                headers=self._headers,
                timeout=timeout,
                extensions={"trace": watch.trace},
            ) as resp:
                raw = _read_capped(resp, self.cfg.response_bytes, watch, host)
        if resp.status_code != 200:
            reason = f"HTTP {resp.status_code} from {host}/chat/completions: {_reason(raw)}"
            if resp.status_code in TRANSIENT_STATUSES:
                raise _Again(EndpointError(reason, transient=True), _retry_after(resp))
            raise EndpointError(reason)
        return parse_answer(raw, params.max_length)


class _Again(Exception):
    """A failure a quick retry may fix: the row's error if retries run out, and the server's Retry-After."""

    def __init__(self, error: ItemError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error, self.retry_after = error, retry_after


@contextmanager
def _http_errors(host: str, watch: Any) -> Iterator[None]:
    """httpx's exceptions as named errors: connection failures are quick retries, a deadline a transient timeout."""
    try:
        yield
    except (httpx2.HTTPError, httpx2.StreamError) as exc:
        if watch.ended == "stopping":
            raise FetchError(f"{host}: abandoned, the worker is stopping", transient=True) from None
        if watch.ended or isinstance(exc, httpx2.ReadTimeout | httpx2.WriteTimeout | httpx2.PoolTimeout):
            # Not retried here: it already took the whole deadline. The row goes back to the queue for later.
            raise FetchTimeout(f"{host}: no complete answer within {watch.total_s:g}s", transient=True) from None
        if isinstance(
            exc,
            httpx2.ConnectTimeout
            | httpx2.ConnectError
            | httpx2.ReadError
            | httpx2.WriteError
            | httpx2.RemoteProtocolError,
        ):
            raise _Again(FetchError(f"{host}: {type(exc).__name__}: {exc}", transient=True)) from None
        raise EndpointError(f"{host}: {type(exc).__name__}: {exc}") from None


def _read_capped(resp: httpx2.Response, cap: int, watch: Any, host: str) -> bytes:
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise EndpointError(f"{host} answered {declared} bytes, over CAPTIONER_ENDPOINT_RESPONSE_BYTES ({cap})")
    body = bytearray()
    for chunk in resp.iter_bytes():
        body += chunk
        if len(body) > cap:
            raise EndpointError(f"{host} answered more than CAPTIONER_ENDPOINT_RESPONSE_BYTES ({cap} bytes)")
    if watch.ended:  # the guard shut the connection: what arrived is cut short
        raise httpx2.ReadTimeout("deadline")
    return bytes(body)


def _retry_after(resp: httpx2.Response) -> float | None:
    value = resp.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: our own backoff instead


def _reason(raw: bytes) -> str:
    """The server's error message (OpenAI's {"error": {"message"}}, FastAPI's {"detail"}), else the text, short."""
    text = raw.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error", doc.get("detail", doc.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            text = err if isinstance(err, str) else json.dumps(err)
    text = " ".join(text.split())
    return (text[:REASON_CHARS] + "...") if len(text) > REASON_CHARS else text or "(no body)"


def parse_answer(raw: bytes, max_length: int) -> Generated:
    """The caption of a chat completion: its first choice's text, whether it stopped on its own or at max_tokens."""
    try:
        doc = json.loads(raw)
        choice = doc["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        what = f"{type(exc).__name__}: {_reason(raw)[:120]}"
        raise EndpointError(f"the answer is not a chat completion ({what})") from None
    if isinstance(content, list):  # some servers answer in parts: [{"type": "text", "text": ...}]
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise EndpointError(f"the answer's content is a {type(content).__name__}, not text")
    cut = choice.get("finish_reason") == "length"
    usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
    used = usage.get("completion_tokens")
    tokens = max_length if cut else min(used, max_length) if isinstance(used, int) and used > 0 else 1
    return Generated(content.strip(), tokens, not cut)


def list_models(cfg: EndpointConfig) -> list[str]:
    """The model names the server lists (GET {url}/models); a ConfigError that says what to fix when it cannot."""
    headers = {"Accept": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    where = f"{cfg.url}/models"
    try:
        with httpx2.Client(trust_env=False, follow_redirects=False) as client:
            resp = client.get(where, headers=headers, timeout=httpx2.Timeout(CHECK_TIMEOUT_S))
    except httpx2.HTTPError as exc:
        raise ConfigError(
            f"the endpoint {cfg.url} is unreachable ({type(exc).__name__}: {exc}); start the server "
            "or fix CAPTIONER_ENDPOINT_URL"
        ) from None
    if resp.status_code in (401, 403):
        raise ConfigError(
            f"the endpoint {cfg.url} refused the API key (HTTP {resp.status_code}): set "
            "CAPTIONER_ENDPOINT_API_KEY (or OPENAI_API_KEY)"
        )
    if resp.status_code == 404:
        raise ConfigError(
            f"the endpoint has no {where} (HTTP 404): CAPTIONER_ENDPOINT_URL is the OpenAI API base, "
            "the part before /chat/completions, usually ending in /v1"
        )
    if resp.status_code != 200:
        raise ConfigError(f"GET {where}: HTTP {resp.status_code}: {_reason(resp.content)}")
    try:
        return [str(m["id"]) for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"GET {where} is not an OpenAI model list ({type(exc).__name__}: {exc})") from None
