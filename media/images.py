"""Path, URL or inline bytes -> validated RGB image: byte and pixel limits, allowed roots, SSRF guard."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx2
from PIL import ExifTags, Image

from common.errors import DecodeError, FetchError, FetchTimeout, Forbidden, InvalidInput, ItemError, TooLarge
from common.messages import Source
from common.settings import DECODE_BYTES_PER_PIXEL, Settings
from media.objects import ObjectStore
from media.paths import LocalFiles

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# What may stand in a URL host besides an IPv6 literal; anything else ("%31", spaces) never reaches DNS.
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")
_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Modes whose "transparency" info Pillow turns into an alpha channel on convert("RGBA").
_KEYED_MODES = frozenset({"1", "L", "P", "RGB"})
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
# TIFF tags that size libtiff's decode buffer. libtiff allocates a whole tile whatever the image's declared size,
# so a 16x16 image may carry a 40960x40960 tile (a 158-byte file, +1.6 GB in one decode).
_TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 322, 323
#: Most pixels a TIFF tile may hold beyond its image's own: room for an honest encoder's 256x256 or 1024x1024
#: tiles on a small image, nothing like a tile bomb's.
TIFF_TILE_FLOOR = 1 << 20


@dataclass(frozen=True)
class ImagePolicy:
    """Everything image loading may do: where it may read, how much, how long, which formats."""

    allowed_roots: tuple[Path, ...]
    max_bytes: int
    max_pixels: int
    formats: tuple[str, ...]
    connect_timeout_s: float
    total_timeout_s: float
    max_redirects: int
    allow_private: bool
    #: Private addresses URLs may still reach (an internal image server); everything else private is refused.
    allowed_networks: tuple[IPNetwork, ...] = field(default=())
    #: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose both sides stay at least this many
    #: pixels (0: full size). Much cheaper for large photos; the pixels differ slightly from a full decode.
    draft_edge: int = 0
    #: Objects in stores (s3://, gs://) that may be read: allowed prefixes and protocols (None: none).
    objects: ObjectStore | None = None

    def __post_init__(self) -> None:
        # Normalise once so every check compares like with like (real paths, upper-case format ids, networks).
        object.__setattr__(self, "allowed_roots", tuple(Path(r).resolve() for r in self.allowed_roots))
        object.__setattr__(self, "formats", tuple(f.upper() for f in self.formats))
        object.__setattr__(self, "allowed_networks", tuple(ipaddress.ip_network(n) for n in self.allowed_networks))
        if isinstance(self.objects, dict):  # from JSON (a training child's policy)
            object.__setattr__(self, "objects", ObjectStore(**self.objects))

    @classmethod
    def from_settings(cls, s: Settings) -> ImagePolicy:
        return cls(
            allowed_roots=tuple(s.allowed_roots),
            max_bytes=s.max_image_bytes,
            max_pixels=s.max_image_pixels,
            formats=tuple(s.allowed_formats),
            connect_timeout_s=s.url_connect_timeout_s,
            total_timeout_s=s.url_total_timeout_s,
            max_redirects=s.url_max_redirects,
            allow_private=s.allow_private_urls,
            allowed_networks=tuple(s.url_allowed_networks),
            objects=ObjectStore.from_settings(s),
        )


# --- entry points ---------------------------------------------------------------------------------


def load_image(
    src: Source, policy: ImagePolicy, *, client: httpx2.Client | None = None, guard: FetchGuard | None = None
) -> Image.Image:
    """The source's image as a fully loaded RGB image, or an ItemError saying why not."""
    return decode_image(read_source(src, policy, client=client, guard=guard), policy)


def read_source(
    src: Source, policy: ImagePolicy, *, client: httpx2.Client | None = None, guard: FetchGuard | None = None
) -> bytes:
    """The encoded bytes of a source, within the policy's limits. ``guard`` ends URL fetches (see FetchGuard)."""
    if src.kind == "path":
        return read_path(src.path or "", policy)
    if src.kind == "url":
        return fetch_url(src.url or "", policy, client=client, guard=guard)
    if src.kind == "uri":
        return read_object(src.uri or "", policy)
    return src.decode_b64(policy.max_bytes)


def read_object(uri: str, policy: ImagePolicy) -> bytes:
    """Bytes of an object under an allowed prefix (the rules of media.objects), within the byte cap."""
    if policy.objects is None:
        raise Forbidden(f"{uri}: object storage is off (put s3://bucket/prefix in CAPTIONER_ALLOWED_ROOTS)")
    return policy.objects.read(uri, policy.max_bytes)


# --- local paths ------------------------------------------------------------------------------------


def read_path(path: str, policy: ImagePolicy) -> bytes:
    """Bytes of a regular file whose real path lies under an allowed root (the rules of media.paths)."""
    return LocalFiles(policy.allowed_roots, policy.max_bytes).read(path)


# --- URLs -------------------------------------------------------------------------------------------


def make_client() -> httpx2.Client:
    """An HTTP client safe to share between fetches and threads (it saves building a TLS context per fetch).

    No environment proxies and no .netrc credentials sent to arbitrary hosts (trust_env off), and no cookies
    carried from one fetch to the next.
    """
    return httpx2.Client(
        trust_env=False,
        follow_redirects=False,
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        headers={"User-Agent": "captioner/0.1"},
    )


def fetch_url(
    url: str, policy: ImagePolicy, *, client: httpx2.Client | None = None, guard: FetchGuard | None = None
) -> bytes:
    """Body of an http(s) URL: every hop's address checked before connecting, a byte cap, and one deadline over
    the whole exchange (resolving, connecting, every hop's headers and the body), enforced by ``guard`` (the
    process's default one when None).

    A shared ``client`` should come from make_client(); without one a fresh client is used for this fetch.
    """
    deadline = time.monotonic() + policy.total_timeout_s
    with (guard or default_guard()).watch(deadline, policy.total_timeout_s) as watch:
        if client is None:
            with make_client() as own:
                return _fetch(url, policy, own, watch)
        return _fetch(url, policy, client, watch)


def _fetch(url: str, policy: ImagePolicy, client: httpx2.Client, watch: Watch) -> bytes:
    target, came_from = parse_url(url), ""
    for _ in range(policy.max_redirects + 1):
        try:
            ip = resolve_checked(target, policy, watch.deadline, watch)
        except Forbidden as exc:
            raise Forbidden(f"redirect from {came_from} refused: {exc}" if came_from else str(exc)) from None
        host = target.raw_host.decode("ascii")
        with http_errors(host, watch), _get(client, target, ip, policy, watch) as resp:
            location = _redirect_target(resp, host)
            if location is None:
                return _read_body(resp, policy, watch, host)
        target, came_from = _follow(target, location, host), host
    raise FetchError(f"too many redirects (more than {policy.max_redirects})")


def _follow(target: httpx2.URL, location: str, host: str) -> httpx2.URL:
    """The next hop of a redirect, held to the same rules as the first URL."""
    try:
        return parse_url(str(target.join(location)))
    except (InvalidInput, httpx2.InvalidURL) as exc:
        raise FetchError(f"bad redirect from {host}: {exc}") from None
    except Forbidden as exc:
        raise Forbidden(f"redirect from {host} refused: {exc}") from None


def parse_url(url: str) -> httpx2.URL:
    """An http(s) URL without credentials and with a plausible host, or InvalidInput/Forbidden."""
    try:
        target = httpx2.URL(url)
    except httpx2.InvalidURL as exc:
        raise InvalidInput(f"invalid URL: {exc}") from None
    if target.scheme not in ("http", "https"):
        raise Forbidden(f"only http and https URLs are fetched, not {target.scheme or 'relative'!r}")
    if target.userinfo:
        raise Forbidden("URLs with credentials (user:password@) are refused")
    host = target.raw_host.decode("ascii")
    if not host or (":" not in host and not _HOSTNAME.fullmatch(host)):
        raise InvalidInput(f"URL host {target.host!r} is not a valid host name")
    return target


def resolve_checked(target: httpx2.URL, policy: ImagePolicy, deadline: float, watch: Watch | None = None) -> IPAddress:
    """The address to connect to, after checking every address the host resolves to."""
    host = target.raw_host.decode("ascii")
    addresses = _resolve(host, target.port or (443 if target.scheme == "https" else 80), deadline, watch)
    for ip in addresses:
        check_address(ip, policy, host=host)
    return addresses[0]


def check_address(ip: str | IPAddress, policy: ImagePolicy, *, host: str = "") -> None:
    """Forbidden unless ip is a public address, private ones being allowed by the policy."""
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if policy.allow_private:
        return
    # An IPv4 address embedded in an IPv6 one (::ffff:127.0.0.1, 6to4) is judged as itself as well.
    candidates = [ip, *_embedded_v4(ip)]
    for candidate in candidates:
        kind = _non_public_kind(candidate)
        if kind and not any(candidate in net for net in policy.allowed_networks):
            where = f"{host} resolves to {ip}" if host and host != str(ip) else str(ip)
            raise Forbidden(f"{where}, which is not public ({kind}); URLs may only reach public addresses")


def _embedded_v4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
    return [v4 for v4 in found if v4 is not None]


def _non_public_kind(ip: IPAddress) -> str | None:
    """Why an address is not public, or None. is_global alone misses multicast (224.0.0.0/4 counts as global)."""
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    return None if ip.is_global else "non-global"


@cache
def _dns_pool() -> ThreadPoolExecutor:
    # getaddrinfo has no timeout of its own; a thread lets the fetch deadline bound a hung resolver.
    return ThreadPoolExecutor(max_workers=8, thread_name_prefix="captioner-dns")


def _resolve(host: str, port: int, deadline: float, watch: Watch | None = None) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]  # a literal needs no resolver
    except ValueError:
        pass
    future = _dns_pool().submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    woken = threading.Event()  # by the answer, or by the watch ending (deadline, a worker stopping)
    future.add_done_callback(lambda _: woken.set())
    if watch is not None:
        watch.on_end(woken.set)
    woken.wait(max(0.0, deadline - time.monotonic()))
    if not future.done():
        if watch is not None and watch.ended == "stopping":
            raise watch.error(host)
        raise FetchTimeout(f"resolving {host} timed out")  # transient: resolvers recover
    try:
        infos = future.result()
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve {host}: {exc.strerror}", transient=exc.errno == socket.EAI_AGAIN) from None
    except UnicodeError:
        raise InvalidInput(f"URL host {host!r} is not a valid host name (empty or over-long label)") from None
    except OSError as exc:
        raise FetchError(f"cannot resolve {host}: {exc}") from None
    # The scope (%eth0) is dropped: only the address matters to the check, and link-local is refused anyway.
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise FetchError(f"{host} has no addresses")
    return addresses


@contextmanager
def _get(
    client: httpx2.Client, target: httpx2.URL, ip: IPAddress, policy: ImagePolicy, watch: Watch
) -> Iterator[httpx2.Response]:
    """GET target from the already checked ip; the hostname travels only in Host and TLS SNI."""
    remaining = watch.deadline - time.monotonic()
    if remaining <= 0:  # spent on earlier hops
        raise watch.error(target.host, watch.ended or "deadline")
    # Per-read timeouts a little past the deadline: the guard ends the exchange at the deadline itself, so
    # every way of running out of time (hanging, dripping, informational responses) ends the same way.
    timeout = httpx2.Timeout(remaining + 1, connect=min(policy.connect_timeout_s, remaining))
    # Connection: close, whoever built the client: pools key connections by IP, and a TLS connection checked
    # for one host name must never carry a request for another name on the same IP.
    headers = {
        "Host": target.netloc.decode("ascii"),
        "Accept-Encoding": "identity",
        "Accept": "image/*,*/*;q=0.5",
        "Connection": "close",
    }
    extensions: dict[str, Any] = {"trace": watch.trace}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.raw_host.decode("ascii")
    with client.stream(
        "GET", target.copy_with(host=str(ip)), headers=headers, timeout=timeout, extensions=extensions
    ) as resp:
        yield resp


#: HTTP statuses a later try may pass: a timeout on the server's side, too early, too many requests, and
#: the server or a gateway failing or overloaded. Every other error status stays what it is.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@contextmanager
def http_errors(host: str, watch: Watch) -> Iterator[None]:
    """httpx's exceptions as our named ones; transient only where a later try may work.

    Connecting (refused, reset, timed out) and a connection dropped mid-way may work later. A server that has
    not answered completely by the deadline (hanging, dripping headers or body, informational responses
    forever) is not retried: it would hold a decode thread for another whole deadline. Nor is a malformed
    answer or a certificate that does not match.
    """
    try:
        yield
    except (httpx2.HTTPError, httpx2.StreamError) as exc:
        raise _fetch_error(host, watch, exc) from None


def _fetch_error(host: str, watch: Watch, exc: Exception) -> ItemError:
    if watch.ended:
        return watch.error(host)  # the guard ended it: the deadline, or the worker stopping
    if isinstance(exc, httpx2.ConnectTimeout):
        return FetchTimeout(f"{host}: connecting timed out", transient=True)
    if isinstance(exc, httpx2.TimeoutException):
        return watch.error(host, "deadline")
    if isinstance(exc, httpx2.ConnectError):
        # A bad certificate will not fix itself; a refused or reset connection may.
        return FetchError(f"cannot connect to {host}: {exc}", transient=not _cert_error(exc))
    if isinstance(exc, httpx2.InvalidURL):
        return InvalidInput(f"invalid URL: {exc}")
    if isinstance(exc, httpx2.ReadError | httpx2.WriteError):
        return FetchError(f"{host}: connection lost ({type(exc).__name__}: {exc})", transient=True)
    return FetchError(f"{host}: {type(exc).__name__}: {exc}")  # a malformed answer is the same next time


def _cert_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "SSLCertVerificationError":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _redirect_target(resp: httpx2.Response, host: str) -> str | None:
    """The Location of a redirect, None for a success; HTTP errors raise."""
    code = resp.status_code
    if code in _REDIRECTS and resp.headers.get("location"):
        return resp.headers["location"]
    if 200 <= code < 300:
        return None
    raise FetchError(f"HTTP {code} {resp.reason_phrase} from {host}".rstrip(), transient=code in TRANSIENT_STATUSES)


def _read_body(resp: httpx2.Response, policy: ImagePolicy, watch: Watch, host: str) -> bytes:
    """The decoded body, stopped at max_bytes (after decoding) and at the fetch deadline."""
    decoder = _body_decoder(resp.headers.get("content-encoding", ""))
    declared = resp.headers.get("content-length", "")
    if decoder is None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise TooLarge(f"Content-Length {declared} is over the limit of {policy.max_bytes} bytes")
    body = bytearray()
    for raw in resp.iter_raw():
        body += _inflate(decoder, raw, policy.max_bytes + 1 - len(body)) if decoder else raw
        if len(body) > policy.max_bytes:
            raise TooLarge(f"body is over the limit of {policy.max_bytes} bytes")
        if watch.ended:
            break
    if watch.ended:
        # The guard shut the connection: what arrived is a truncated body, whatever the stream made of it.
        raise watch.error(host)
    if decoder is not None:
        body += _inflate(decoder, b"", 0)
        if len(body) > policy.max_bytes:
            raise TooLarge(f"body is over the limit of {policy.max_bytes} bytes")
    return bytes(body)


def _inflate(decoder: zlib._Decompress, raw: bytes, room: int) -> bytes:
    """At most room bytes from one compressed chunk (room 0: the decoder's final flush)."""
    try:
        # max_length bounds what one chunk may inflate to: a gzip bomb stops at the cap, not in memory.
        return decoder.decompress(raw, room) if room else decoder.flush()
    except zlib.error as exc:
        raise FetchError(f"corrupt compressed body: {exc}") from None


def _body_decoder(encoding: str) -> zlib._Decompress | None:
    """A bounded decoder for a Content-Encoding we asked not to get but may be sent anyway."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # 32+: accepts both gzip and zlib headers
    raise FetchError(f"unsupported Content-Encoding {encoding!r}")


# --- one deadline over the whole exchange ------------------------------------------------------------


class Watch:
    """One fetch under a FetchGuard: its deadline, its connection's socket, and why it was ended (if it was)."""

    def __init__(self, deadline: float, total_s: float) -> None:
        self.deadline, self.total_s = deadline, total_s
        #: "deadline" or "stopping" once the guard has ended the fetch.
        self.ended: str | None = None
        self._sock: socket.socket | None = None
        self._wakers: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: learns each connection's socket the moment it is connected (or wrapped in TLS)."""
        if not event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._sock = sock
            ended = self.ended
        if ended:  # connected after the end: hang up at once
            _shut(sock)

    def on_end(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when the fetch is ended (a wait that is not on a socket, such as the resolver)."""
        with self._lock:
            if self.ended is None:
                self._wakers.append(wake)
                return
        wake()

    def end(self, why: str) -> None:
        with self._lock:
            if self.ended is not None:
                return
            self.ended, sock, wakers = why, self._sock, self._wakers
        _shut(sock)
        for wake in wakers:
            wake()

    def error(self, host: str, why: str | None = None) -> ItemError:
        """The row's error for a fetch that ran out of time or was abandoned."""
        if (why or self.ended) == "stopping":
            return FetchError(f"{host}: abandoned, the worker is stopping", transient=True)
        return FetchTimeout(f"{host}: no complete answer within {self.total_s:g}s", transient=False)


def _shut(sock: socket.socket | None) -> None:
    """End every read and write on the socket, in whatever thread they block. socket.socket's own shutdown, also
    under TLS: SSLSocket.shutdown would drop its TLS state under a reader still using it."""
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class FetchGuard:
    """Ends fetches at their deadline wherever they block, and every one at once when stopped.

    httpx applies its timeouts per read: a server that drips header bytes, or sends ``100 Continue`` forever,
    never trips them. One thread here shuts down the socket of a fetch when its deadline passes, which ends a
    blocked read at once whatever the protocol state; ``stop`` does the same to every fetch in flight (a worker
    shutting down) and refuses new ones.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[Watch] = set()
        self._stopped = False
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, deadline: float, total_s: float) -> Iterator[Watch]:
        watch = Watch(deadline, total_s)
        with self._cond:
            if self._stopped:
                raise watch.error("fetch", "stopping")
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield watch
        finally:
            with self._cond:
                self._watches.discard(watch)

    def stop(self) -> None:
        """Abandon every fetch in flight (their rows say so, transient) and refuse new ones."""
        with self._cond:
            self._stopped = True
            watches = list(self._watches)
        for watch in watches:
            watch.end("stopping")

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                live = [w for w in self._watches if w.ended is None]
                due = [w for w in live if w.deadline <= now]
                if not due:
                    self._cond.wait(min((w.deadline for w in live), default=now + 3600) - now)
                    continue
            for watch in due:
                watch.end("deadline")


@cache
def default_guard() -> FetchGuard:
    """The guard of fetches that name none (tools, training); a worker's service has its own to stop."""
    return FetchGuard()


# --- decoding ---------------------------------------------------------------------------------------


def decode_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """A fully loaded RGB image from encoded bytes: allowed formats only, first frame, EXIF orientation.

    Memory: the decoded image, its RGB copy and one band of working memory at most (see ``_to_rgb``); what the
    header promises is checked first (pixels, TIFF tiles), so no decoder allocates more than the policy allows.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=policy.formats)
        _check_pixels(im, policy)  # from the header, before any pixel is decoded (and before draft shrinks it)
        _check_containers(im)
        _check_memory(im, policy)
        if policy.draft_edge and im.format == "JPEG":
            im.draft("RGB", (policy.draft_edge, policy.draft_edge))
        im.load()
        turn = _orientation(im)
        # Rebinding drops the decoded source as soon as its RGB copy exists (one image less at the peak).
        im = _detached(_to_rgb(im), im)
        return im.transpose(turn) if turn is not None else im
    except ItemError:
        raise
    except Image.UnidentifiedImageError:
        raise DecodeError(f"not an image in an allowed format ({', '.join(policy.formats)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(f"decompression bomb refused: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:
        # Pillow parsing hostile bytes can raise almost anything (OSError, SyntaxError, struct.error, ...).
        raise DecodeError(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from None


def _detached(out: Image.Image, source: Image.Image) -> Image.Image:
    """``out`` free of the decoder behind ``source``: a multi-frame file keeps its decoder open to seek, and a
    WebP its canvases; when ``out`` is the source itself, the first frame is copied alone."""
    if out is source and (getattr(source, "n_frames", 1) > 1 or source.format == "WEBP"):
        out = source.copy()
        source.close()  # the decoder's buffers go now, not whenever the source is collected
    return out


def _check_pixels(im: Image.Image, policy: ImagePolicy) -> None:
    """Size from the header, before any pixel is decoded; Pillow's own bomb check is only a warning below 2x."""
    width, height = im.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    if width * height > policy.max_pixels:
        raise TooLarge(f"image is {width}x{height} = {width * height} pixels, over the limit of {policy.max_pixels}")


def _check_memory(im: Image.Image, policy: ImagePolicy) -> None:
    """Refuse an image whose decoder would hold more than the budget of the largest ordinary image."""
    width, height = im.size
    cost = decode_cost(im)
    budget = policy.max_pixels * DECODE_BYTES_PER_PIXEL
    if width * height * cost > budget:
        allowed = int(budget // cost)
        raise TooLarge(
            f"a {width}x{height} {im.format} needs {cost:g} bytes per pixel to decode; over {allowed} pixels it "
            f"would pass the budget of one decode ({budget >> 20} MiB, CAPTIONER_MAX_IMAGE_PIXELS x "
            f"{DECODE_BYTES_PER_PIXEL} bytes)"
        )


def decode_cost(im: Image.Image) -> float:
    """Bytes per pixel a decode of ``im`` holds at its peak, from its header (measured: bench/hostile.py).

    The decoded image and its RGB copy take 4 bytes per pixel each. WebP decodes through libwebp's two canvases
    and a copy of the frame first; a progressive JPEG keeps every DCT coefficient (2 bytes per sample) until its
    last scan.
    """
    if im.format == "WEBP":
        return 16.0
    layers = getattr(im, "layer", None)
    if im.format == "JPEG" and im.info.get("progressive") and layers:
        h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
        coefficients = sum(2.0 * h * v / (h_max * v_max) for _, h, v, *_ in layers)
        # The coefficients go before a CMYK image is converted to RGB, so the peak is the larger of the two.
        return 4.0 + max(coefficients, 4.0 if im.mode == "CMYK" else 0.0)
    return float(DECODE_BYTES_PER_PIXEL)


def _check_containers(im: Image.Image) -> None:
    """Geometry inside the file that sizes the decoder's buffers, checked before any pixel is decoded."""
    if im.format != "TIFF":
        return  # the other allowed formats decode into buffers the size of the image (or a row of it)
    tags = getattr(im, "tag_v2", {})
    width, length = tags.get(_TIFF_TILE_WIDTH), tags.get(_TIFF_TILE_LENGTH)
    if width is None and length is None:
        return  # strips: libtiff clamps a strip's rows to the image's height
    if not isinstance(width, int) or not isinstance(length, int) or width <= 0 or length <= 0:
        raise DecodeError(f"TIFF tile size {width}x{length} is not a size")
    limit = max(im.size[0] * im.size[1], TIFF_TILE_FLOOR)
    if width * length > limit:
        raise TooLarge(
            f"TIFF tile {width}x{length} = {width * length} pixels for a {im.size[0]}x{im.size[1]} image; the "
            f"decoder would allocate the whole tile (at most {limit} pixels are accepted)"
        )


#: EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose does it).
_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: Pixels converted at a time: a conversion's working memory is one band of this size, not whole-image copies.
BAND_PIXELS = 1 << 18


def _orientation(im: Image.Image) -> Image.Transpose | None:
    """The transpose EXIF asks for; applied after the RGB conversion, so it copies the RGB image only."""
    try:
        return _TURNS.get(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:
        return None  # a corrupt EXIF block should not cost the caption; orientation is cosmetic


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB that shows what a viewer shows: transparency on white, wide samples scaled, not clipped.

    Conversions that take several steps (compositing, scaling) run band by band into one RGB image, so they
    cost the source, the result and one band: never the several whole-image copies the steps would make.
    """
    if im.mode == "RGB":
        return im
    step = _band_step(im)
    if step is None:
        return im.convert("RGB")  # one step: the result is the only copy
    out = Image.new("RGB", im.size)
    width, height = im.size
    rows = max(1, BAND_PIXELS // width)
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        out.paste(step(im.crop(box)), box[:2])
    return out


def _band_step(im: Image.Image) -> Callable[[Image.Image], Image.Image] | None:
    """How one band of ``im`` becomes RGB when a plain convert would be wrong; None when it would be right."""
    if im.mode in _WIDE_MODES:
        to_l = _scaler(im)
        return lambda band: to_l(band).convert("RGB")
    if im.mode in _ALPHA_MODES or (im.mode in _KEYED_MODES and "transparency" in im.info):
        return _on_white
    return None


def _on_white(band: Image.Image) -> Image.Image:
    # Composite instead of dropping alpha: colour hidden under alpha=0 must not show.
    return Image.alpha_composite(Image.new("RGBA", band.size, _WHITE), band.convert("RGBA")).convert("RGB")


def _scaler(im: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """8-bit grey from 16-bit, 32-bit or float samples, scaled to the whole image's range instead of clipped."""
    if im.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        lo, hi = (float(v) for v in im.getextrema())
        if im.mode == "I" and lo >= 0 and hi <= 65535:
            lo, hi = 0.0, 65535.0  # 16-bit data in a 32-bit container (16-bit PNG, TIFF)
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0  # normalised float data
    scale = 255.0 / (hi - lo) if hi > lo else 0.0

    def to_l(band: Image.Image) -> Image.Image:
        wide = band.convert("I") if band.mode.startswith("I;16") else band
        return wide.convert("F").point(lambda v: v * scale - lo * scale).convert("L")

    return to_l


# --- re-encoding for an upload (images sent to a captioning server) -----------------------------------

#: JPEG quality of images sent to a server: visually lossless for captioning, a fraction of PNG's bytes.
UPLOAD_JPEG_QUALITY = 90
#: Smallest longest side an upload is shrunk to before it is refused as too large.
UPLOAD_MIN_SIDE = 64


def encode_upload(im: Image.Image, *, max_bytes: int, max_side: int) -> bytes:
    """A decoded RGB image (``decode_image``) as a JPEG of at most ``max_side`` pixels on its longest side and at
    most ``max_bytes`` bytes: shrunk until it fits, or ``TooLarge`` when even ``UPLOAD_MIN_SIDE`` pixels do not.

    Only pixels this project decoded travel on (never the item's own bytes): no metadata, no second format to parse.
    """
    side = max(im.size)
    if max_side and side > max_side:
        im = _shrunk(im, max_side / side)
    while True:
        out = io.BytesIO()
        im.save(out, "JPEG", quality=UPLOAD_JPEG_QUALITY)
        if out.tell() <= max_bytes:
            return out.getvalue()
        side = max(im.size)
        if side <= UPLOAD_MIN_SIDE:
            raise TooLarge(f"the image does not fit {max_bytes} bytes as a JPEG even at {side} pixels")
        # Bytes scale with the area: shrink by the square root of the excess, and a little more, so it converges.
        scale = max((max_bytes / out.tell()) ** 0.5 * 0.9, UPLOAD_MIN_SIDE / side)
        im = _shrunk(im, min(scale, 0.9))


def _shrunk(im: Image.Image, scale: float) -> Image.Image:
    size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
