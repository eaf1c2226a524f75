"""Image loading against real files, real hostile bytes and a real local HTTP server (no mocks)."""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import ipaddress
import json
import os
import queue
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from PIL import Image, ImageOps

from common.errors import DecodeError, FetchError, FetchTimeout, Forbidden, InvalidInput, ItemError, TooLarge
from common.messages import Source
from common.settings import DECODE_OVERHEAD_BYTES, DEFAULT_FORMATS, Settings
from media.images import (
    FetchGuard,
    ImagePolicy,
    check_address,
    decode_cost,
    decode_image,
    fetch_url,
    load_image,
    read_path,
    read_source,
)

RED, GREEN, BLUE, WHITE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (128, 128, 128)
TOTAL_S = 1.0  # the fetch deadline of every HTTP test: small, so the file stays fast


def make_policy(root: Path | None = None, **changes: object) -> ImagePolicy:
    base = ImagePolicy(
        allowed_roots=(root,) if root else (),
        max_bytes=1 << 20,
        max_pixels=4_000_000,
        formats=DEFAULT_FORMATS,
        connect_timeout_s=0.5,
        total_timeout_s=TOTAL_S,
        max_redirects=3,
        allow_private=True,
    )
    return replace(base, **changes)


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


PNG = encode(Image.new("RGB", (8, 6), RED), "PNG")


def tiff_tiled(width: int, height: int, tile: tuple[int, int], fill: int | None = None) -> bytes:
    """A little-endian greyscale TIFF of width x height in deflated tiles of the given size.

    ``fill`` None: one tile whose data is 64 zero bytes. The tile's declared size is what libtiff allocates,
    whatever the image's size and however few bytes follow: ``tiff_tiled(16, 16, (40960, 40960))`` is under
    200 bytes and costs 1.6 GB to decode unguarded. With ``fill``, every tile is complete and holds that value.
    """
    count = 1 if fill is None else -(-width // tile[0]) * -(-height // tile[1])
    body = zlib.compress(b"\0" * 64) if fill is None else zlib.compress(bytes([fill]) * (tile[0] * tile[1]))
    arrays = 8 + count * len(body)  # the offsets and byte counts follow the tiles, then the IFD
    ifd_at = arrays + 8 * count
    # One tile: its offset and byte count stand in the IFD entries themselves; several: the entries point at arrays.
    offsets_at, lengths_at = (8, len(body)) if count == 1 else (arrays, arrays + 4 * count)
    tags = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 8),
        (262, 3, 1, 1),
        (277, 3, 1, 1),
        (284, 3, 1, 1),
        (322, 4, 1, tile[0]),
        (323, 4, 1, tile[1]),
        (324, 4, count, offsets_at),
        (325, 4, count, lengths_at),
    ]
    ifd = struct.pack("<H", len(tags))
    for tag, kind, n, value in tags:
        ifd += struct.pack("<HHI", tag, kind, n) + (
            struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        )
    offsets = struct.pack(f"<{count}I", *(8 + i * len(body) for i in range(count)))
    lengths = struct.pack(f"<{count}I", *([len(body)] * count))
    return b"II*\x00" + struct.pack("<I", ifd_at) + body * count + offsets + lengths + ifd + struct.pack("<I", 0)


_PEAK = """
import gc, json, sys
from PIL import Image
from media.images import ImagePolicy, decode_image

Image.init()  # every format plugin imported now, not counted in the decode

def high_water():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))

policy = ImagePolicy(**json.loads(sys.argv[2]))
data = open(sys.argv[1], "rb").read()
gc.collect()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # Linux: the high-water mark restarts from what is in use now (imports peaked above it)
before = high_water()
try:
    out = decode_image(data, policy)
    result = {"size": list(out.size), "mode": out.mode}
except Exception as exc:
    result = {"error": getattr(exc, "code", type(exc).__name__), "message": str(exc)}
result["peak"] = high_water() - before
print(json.dumps(result))
"""


def decode_peak(data: bytes, tmp_path: Path, **changes: object) -> dict:
    """decode_image in a fresh process: its outcome and how far it raised the process's RSS high-water mark
    (VmHWM, what ru_maxrss reports, restarted just before the decode).

    A process of its own, because Pillow's pixel buffers are not Python allocations (tracemalloc does not see
    them) and freed memory from earlier work would hide a peak.
    """
    policy = make_policy(**changes)
    fields = {
        "allowed_roots": [],
        "max_bytes": policy.max_bytes,
        "max_pixels": policy.max_pixels,
        "formats": list(policy.formats),
        "connect_timeout_s": 1,
        "total_timeout_s": 1,
        "max_redirects": 0,
        "allow_private": True,
    }
    path = tmp_path / f"decode-{len(data)}-{zlib.crc32(data)}.bin"
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path), json.dumps(fields)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- a real HTTP server ------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.server.seen.append({"path": url.path, **{k.lower(): v for k, v in self.headers.items()}})
        route = getattr(self, "route_" + url.path.strip("/").replace("-", "_").replace(".", "_"), None)
        if route is None:
            return self.reply(404, b"not found")
        route(parse_qs(url.query))

    def reply(self, code: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(code)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def route_img_png(self, q: dict) -> None:
        self.reply(200, PNG, Content_Type="image/png")

    def route_status(self, q: dict) -> None:
        self.reply(int(q["code"][0]), b"status body")

    def route_redirect(self, q: dict) -> None:
        self.reply(302, Location=q.get("to", ["/img.png"])[0])

    def route_loop(self, q: dict) -> None:
        self.reply(302, Location="/loop")

    def do_POST(self) -> None:
        """A webhook receiver whose answer never ends (a status line, then zeros for ever)."""
        self.server.posted.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self.drip(b"HTTP/1.1 200 OK\r\n\r\n", b"\0" * 65536, every=0)

    def drip(self, head: bytes, more: bytes, *, every: float = 0.05) -> None:
        """Send ``head``, then ``more`` again and again: no single read ever times out. Until the client hangs up."""
        self.server.started.put(self.path)
        sent = 0
        try:
            self.wfile.write(head)
            while not self.server.stop.wait(every):
                self.wfile.write(more)
                self.wfile.flush()
                sent += len(more)
        except OSError:  # the client hung up: what the tests wait for
            self.server.sent[self.path] = sent
            self.server.hangups.put(self.path)
        self.close_connection = True

    def wait_for_hangup(self) -> None:
        self.server.started.put(self.path)
        self.connection.settimeout(30)
        with contextlib.suppress(OSError):
            while self.connection.recv(1024):
                pass
            self.server.hangups.put(self.path)  # the client shut the connection down
        self.close_connection = True

    def route_drip(self, q: dict) -> None:
        self.drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x")

    def route_drip_headers(self, q: dict) -> None:
        self.drip(b"HTTP/1.1 200 OK\r\nX-Slow: ", b"x")  # the header line never ends

    def route_continue_forever(self, q: dict) -> None:
        self.drip(b"", b"HTTP/1.1 100 Continue\r\n\r\n")  # informational responses, never the response

    def route_hang(self, q: dict) -> None:
        self.wait_for_hangup()

    def route_hang_body(self, q: dict) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        self.wfile.flush()
        self.wait_for_hangup()

    def route_declared_huge(self, q: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        self.wfile.flush()
        self.server.stop.wait(10)

    def route_endless(self, q: dict) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        block = b"\0" * 65536
        while not self.server.stop.is_set():
            self.wfile.write(block)

    def route_gzip_bomb(self, q: dict) -> None:
        self.reply(200, self.server.bomb, Content_Encoding="gzip", Content_Type="image/png")

    def route_gzip_garbage(self, q: dict) -> None:
        self.reply(200, b"this was never gzip", Content_Encoding="gzip")

    def route_brotli(self, q: dict) -> None:
        self.reply(200, b"\x0b\x02\x80", Content_Encoding="br")

    def route_gzip_png(self, q: dict) -> None:
        self.reply(200, gzip.compress(PNG), Content_Encoding="gzip", Content_Type="image/png")

    def handle(self) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up on purpose
            super().handle()

    def log_message(self, format: str, *args: object) -> None:
        pass


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.scheme = "https" if tls else "http"
        if tls:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.seen: list[dict[str, str]] = []
        self.stop = threading.Event()
        #: Paths of slow routes, as each one starts, and as its client hangs up.
        self.started: queue.Queue[str] = queue.Queue()
        self.hangups: queue.Queue[str] = queue.Queue()
        self.sent: dict[str, int] = {}  # bytes a dripping route had sent when its client hung up
        self.posted: list[bytes] = []
        # 64 MiB of zeros, gzipped to ~64 KiB: far past every cap used here.
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        zeros = b"\0" * (1 << 20)
        self.bomb = b"".join(packer.compress(zeros) for _ in range(64)) + packer.flush()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def serve(srv: LocalServer) -> Iterator[LocalServer]:
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def live() -> Iterator[LocalServer]:
    yield from serve(LocalServer())


@pytest.fixture
def server(live: LocalServer) -> LocalServer:
    live.seen.clear()
    for events in (live.started, live.hangups):
        while not events.empty():
            events.get_nowait()
    return live


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list]:
    """Record every outgoing connect(); refuse (AssertionError) any not to an allowed host. Default: none."""
    attempts: list = []
    allowed: set[str] = set()
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        attempts.append(address)
        host = address[0] if isinstance(address, tuple) else address
        if host not in allowed:
            raise AssertionError(f"a connection to {address} was attempted")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded)

    def allow(*hosts: str) -> list:
        allowed.update(hosts)
        return attempts

    return allow


# --- local paths -------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "ok.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    return tmp_path / "imgs"


def test_path_inside_root_is_read(root: Path) -> None:
    assert read_path(str(root / "ok.png"), make_policy(root)) == PNG
    # ".." that stays inside the root is fine; the real path decides.
    assert read_path(f"{root}/../imgs/ok.png", make_policy(root)) == PNG


def test_load_image_from_path(root: Path) -> None:
    im = load_image(Source(path=str(root / "ok.png")), make_policy(root))
    assert (im.mode, im.size, im.getpixel((0, 0))) == ("RGB", (8, 6), RED)


def test_empty_allowed_roots_tells_the_operator(root: Path) -> None:
    with pytest.raises(Forbidden, match="CAPTIONER_ALLOWED_ROOTS"):
        read_path(str(root / "ok.png"), make_policy(None))


def test_dotdot_escape_is_forbidden(root: Path) -> None:
    with pytest.raises(Forbidden, match="outside the allowed roots"):
        read_path(f"{root}/../secret.png", make_policy(root))


def test_symlink_leaving_root_is_forbidden(root: Path) -> None:
    (root / "link.png").symlink_to(root.parent / "secret.png")
    (root / "zero.png").symlink_to("/dev/zero")
    for name in ("link.png", "zero.png"):
        with pytest.raises(Forbidden):
            read_path(str(root / name), make_policy(root))


def test_symlink_within_root_is_followed(root: Path) -> None:
    (root / "alias.png").symlink_to(root / "ok.png")
    assert read_path(str(root / "alias.png"), make_policy(root)) == PNG


@pytest.mark.timeout(5)
def test_fifo_is_refused_unopened(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    os.mkfifo(root / "pipe.png")
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **kw: opened.append(str(path)) or real_open(path, *a, **kw))
    with pytest.raises(Forbidden, match="not a regular file"):
        read_path(str(root / "pipe.png"), make_policy(root))
    assert opened == []


def test_directory_is_refused(root: Path) -> None:
    (root / "dir.png").mkdir()
    with pytest.raises(Forbidden, match="directory"):
        read_path(str(root / "dir.png"), make_policy(root))


def test_missing_file_is_a_fetch_error(root: Path) -> None:
    with pytest.raises(FetchError, match="no such file") as err:
        read_path(str(root / "nope.png"), make_policy(root))
    assert not err.value.transient


def test_file_over_max_bytes(root: Path) -> None:
    (root / "big.png").write_bytes(b"\0" * 5000)
    with pytest.raises(TooLarge, match="5000 bytes"):
        read_path(str(root / "big.png"), make_policy(root, max_bytes=4999))
    assert len(read_path(str(root / "big.png"), make_policy(root, max_bytes=5000))) == 5000


def test_nul_in_path_is_invalid(root: Path) -> None:
    with pytest.raises(InvalidInput):
        read_path(str(root / "ok.png") + "\0.png", make_policy(root))


# --- inline bytes ------------------------------------------------------------------------------------


def test_b64_sources(root: Path) -> None:
    policy = make_policy(root)
    assert read_source(Source(b64=base64.b64encode(PNG).decode()), policy) == PNG
    with pytest.raises(InvalidInput):
        read_source(Source(b64="not base64!"), policy)
    with pytest.raises(TooLarge):
        read_source(Source(b64=base64.b64encode(b"\0" * 2048).decode()), replace(policy, max_bytes=1024))


def test_b64_far_over_its_cap_is_refused_by_length_before_anything_is_decoded() -> None:
    cap = 1 << 20
    policy = make_policy(max_bytes=cap)
    # Not even base64: decoding first would make this an invalid_input, and cost a copy of 8 MiB.
    huge = Source(b64="!" * (8 * cap))
    tracemalloc.start()
    try:
        assert huge.ref.startswith("b64:")  # the item id hashes it in slices
        with pytest.raises(TooLarge, match="base64 characters"):
            read_source(huge, policy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < cap // 4
    longest = base64.b64encode(b"\0" * (cap - 1)).decode()  # padding included, it still fits the cap
    assert len(read_source(Source(b64=longest), policy)) == cap - 1
    with pytest.raises(TooLarge):
        read_source(Source(b64=longest + "AAAA"), policy)


# --- decoding: modes ----------------------------------------------------------------------------------


def decoded(im: Image.Image, fmt: str, **params: object) -> Image.Image:
    out = decode_image(encode(im, fmt, **params), make_policy())
    assert out.mode == "RGB" and out.size == im.size
    return out


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("1", "PNG"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGB", "JPEG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("PA", "TIFF"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("I", "TIFF"),
        ("I;16", "PNG"),
        ("I;16B", "TIFF"),
        ("F", "TIFF"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("P", "GIF"),
    ],
)
def test_every_mode_becomes_rgb(mode: str, fmt: str) -> None:
    decoded(Image.new(mode, (5, 4)), fmt)


def test_cmyk_colours_survive() -> None:
    out = decoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF")
    assert out.getpixel((0, 0)) == RED


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_16_bit_is_scaled_not_clipped(mode: str, fmt: str) -> None:
    im = Image.new(mode, (4, 2), 1000)
    im.putpixel((0, 0), 65535)
    im.putpixel((1, 0), 32896)
    out = decoded(im, fmt)
    # Clipping would turn 1000 into 255; scaled it is 1000/65535 of white.
    assert out.getpixel((3, 1))[0] in (3, 4)
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0))[0] in (127, 128)


def test_32_bit_beyond_16_bit_range_is_stretched() -> None:
    im = Image.new("I", (2, 1), 0)
    im.putpixel((1, 0), 1_000_000)
    out = decoded(im, "TIFF")
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == WHITE


def test_float_is_scaled() -> None:
    unit = Image.new("F", (2, 1), 0.5)
    assert decoded(unit, "TIFF").getpixel((0, 0))[0] in (127, 128)
    wide = Image.new("F", (2, 1), -10.0)
    wide.putpixel((1, 0), 1000.0)
    out = decoded(wide, "TIFF")
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == WHITE


def test_hidden_colour_under_alpha_never_shows() -> None:
    im = Image.new("RGBA", (3, 1), (255, 0, 0, 0))  # red, fully transparent
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 0, 128))
    out = decoded(im, "PNG")
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == RED
    assert 120 <= out.getpixel((2, 0))[0] <= 135  # half-transparent black over white is grey

    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    out = decoded(la, "PNG")
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == (0, 0, 0)


def test_palette_transparency_composited_on_white() -> None:
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red (transparent), 1 blue
    pal.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF"):
        out = decoded(pal, fmt, transparency=0)
        assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == BLUE
    pa = Image.new("PA", (1, 1), (0, 0))
    pa.putpalette([255, 0, 0])
    assert decoded(pa, "TIFF").getpixel((0, 0)) == WHITE


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95), make_policy())
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
    assert out.size == ImageOps.exif_transpose(Image.open(io.BytesIO(encode(im, "JPEG", exif=exif.tobytes())))).size


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert decode_image(data, make_policy()).getpixel((3, 3)) == RED


def test_multipage_tiff_first_page() -> None:
    pages = [Image.new("RGB", (4, 4), GREEN), Image.new("RGB", (9, 9), BLUE)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_image(data, make_policy())
    assert (out.size, out.getpixel((0, 0))) == ((4, 4), GREEN)


# --- decoding: hostile bytes ----------------------------------------------------------------------------


def test_zero_byte_file(root: Path) -> None:
    (root / "empty.png").write_bytes(b"")
    with pytest.raises(DecodeError, match="empty"):
        load_image(Source(path=str(root / "empty.png")), make_policy(root))


def test_truncated_jpeg() -> None:
    noisy = Image.effect_noise((64, 64), 64).convert("RGB")
    data = encode(noisy, "JPEG")
    with pytest.raises(DecodeError, match=r"truncated|corrupt"):
        decode_image(data[: len(data) // 2], make_policy())


def test_text_named_jpg(root: Path) -> None:
    (root / "notes.jpg").write_text("these are not the pixels you are looking for\n")
    with pytest.raises(DecodeError, match="not an image"):
        load_image(Source(path=str(root / "notes.jpg")), make_policy(root))


def test_eps_is_never_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # Pillow would take it (and start Ghostscript on load)
    with pytest.raises(DecodeError, match="allowed format"):
        decode_image(eps, make_policy())


def test_format_outside_allow_list() -> None:
    with pytest.raises(DecodeError, match=r"allowed format \(JPEG\)"):
        decode_image(PNG, make_policy(formats=("jpeg",)))


def test_pixel_limit_checked_from_header() -> None:
    with pytest.raises(TooLarge, match="100x100"):
        decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), make_policy(max_pixels=9999))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [10_000, 20_000, 100_000])  # warn band of Pillow, above its error, absurd
def test_decompression_bomb_is_too_large(side: int) -> None:
    bomb = png_header_only(side, side)
    with pytest.raises(TooLarge):
        decode_image(bomb, make_policy())
    # Our limit lifted: Pillow's own DecompressionBombError must still come out as TooLarge, not escape.
    with pytest.raises((TooLarge, DecodeError)) as err:
        decode_image(bomb, make_policy(max_pixels=10**12))
    if side * side > 2 * Image.MAX_IMAGE_PIXELS:
        assert isinstance(err.value, TooLarge)
    # Where Pillow only warns, a process that turns warnings into errors still gets TooLarge.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TooLarge):
            decode_image(bomb, make_policy(max_pixels=10**12) if side == 10_000 else make_policy())


# --- decoding: memory that the pixel cap does not bound -------------------------------------------------


def test_tiff_tile_bomb_is_refused_before_the_decoder_allocates(tmp_path: Path) -> None:
    bomb = tiff_tiled(16, 16, (40960, 40960))
    assert len(bomb) < 200 and Image.open(io.BytesIO(bomb)).size == (16, 16)  # passes every size cap
    got = decode_peak(bomb, tmp_path)
    assert got["error"] == "too_large" and "40960x40960" in got["message"]
    assert got["peak"] < 64 << 20  # unguarded, libtiff allocates the 1.6 GB tile


@pytest.mark.parametrize(
    ("size", "tile"), [((16, 16), (2048, 2048)), ((16, 16), (1 << 20, 16)), ((3000, 20), (4096, 4096))]
)
def test_tiff_tiles_larger_than_their_image_are_too_large(size: tuple[int, int], tile: tuple[int, int]) -> None:
    with pytest.raises(TooLarge, match="TIFF tile"):
        decode_image(tiff_tiled(*size, tile), make_policy())


@pytest.mark.parametrize(("size", "tile"), [((16, 16), (256, 256)), ((600, 400), (1024, 1024)), ((48, 40), (16, 16))])
def test_honest_tiled_tiffs_decode(size: tuple[int, int], tile: tuple[int, int]) -> None:
    """Tiles larger than a small image are normal (an encoder's default 256x256 tile): up to a megapixel passes."""
    out = decode_image(tiff_tiled(*size, tile, fill=128), make_policy())
    assert (out.size, out.getpixel((0, 0)), out.getpixel((size[0] - 1, size[1] - 1))) == (size, GREY, GREY)


def _webp_rgba(side: int) -> bytes:
    return encode(Image.new("RGBA", (side, side), (10, 200, 30, 128)), "WEBP")


#: Images of every kind that needs more than one plain convert, or a decoder with buffers of its own.
MEMORY_CASES = {
    "rgba_png": lambda side: encode(Image.new("RGBA", (side, side), (10, 200, 30, 128)), "PNG"),
    "la_png": lambda side: encode(Image.new("LA", (side, side), (10, 128)), "PNG"),
    "i16_png": lambda side: encode(Image.new("I;16", (side, side), 40000), "PNG"),
    "float_tiff": lambda side: encode(Image.new("F", (side, side), 0.5), "TIFF", compression="tiff_deflate"),
    "palette_gif": lambda side: encode(Image.new("P", (side, side), 0), "GIF", transparency=0),
    "cmyk_jpeg": lambda side: encode(Image.new("CMYK", (side, side), (0, 255, 255, 0)), "JPEG"),
    "progressive_jpeg": lambda side: encode(
        Image.new("RGB", (side, side), RED), "JPEG", progressive=True, subsampling=0
    ),
    "rgba_webp": _webp_rgba,
}


@pytest.mark.parametrize("case", sorted(MEMORY_CASES))
def test_decode_peak_stays_within_the_budget_its_header_promises(case: str, tmp_path: Path) -> None:
    """The decode's real peak (RSS high-water mark, own process) is within pixels x decode_cost: the figure the
    per-decode budget rests on. Converting by whole-image steps (composite, scale) would double it."""
    side = 3000
    data = MEMORY_CASES[case](side)
    cost = decode_cost(Image.open(io.BytesIO(data)))
    got = decode_peak(data, tmp_path, max_bytes=len(data), max_pixels=side * side * 2)
    assert got.get("size") == [side, side], got
    assert got["peak"] <= side * side * cost + DECODE_OVERHEAD_BYTES, (got["peak"] / side / side, cost)


def test_decoders_that_need_more_memory_get_fewer_pixels() -> None:
    """WebP costs 16 bytes per pixel, a progressive CMYK JPEG 12: over budget/cost pixels they are too large."""
    policy = make_policy(max_pixels=100 * 100)  # a budget of 80,000 bytes
    assert decode_image(_webp_rgba(70), policy).size == (70, 70)  # 4,900 pixels x 16
    with pytest.raises(TooLarge, match=r"WEBP needs 16 bytes per pixel"):
        decode_image(_webp_rgba(80), policy)  # 6,400 pixels x 16
    cmyk = Image.new("CMYK", (90, 90), (0, 255, 255, 0))
    assert decode_image(encode(cmyk, "JPEG"), policy).size == (90, 90)  # baseline: 8 bytes per pixel
    with pytest.raises(TooLarge, match=r"JPEG needs 12 bytes per pixel"):
        decode_image(encode(cmyk, "JPEG", progressive=True, subsampling=0), policy)


# --- URLs: HTTP behaviour (loopback allowed) --------------------------------------------------------


def test_url_image(server: LocalServer) -> None:
    im = load_image(Source(url=server.url("/img.png")), make_policy())
    assert (im.size, im.getpixel((0, 0))) == ((8, 6), RED)
    (req,) = server.seen
    assert req["host"] == f"127.0.0.1:{server.port}" and req["accept-encoding"] == "identity"


@pytest.mark.parametrize(("code", "transient"), [(404, False), (403, False), (410, False), (429, True), (500, True)])
def test_http_errors(server: LocalServer, code: int, transient: bool) -> None:
    with pytest.raises(FetchError, match=f"HTTP {code}") as err:
        fetch_url(server.url(f"/status?code={code}"), make_policy())
    assert err.value.transient is transient


def test_redirect_followed(server: LocalServer) -> None:
    assert fetch_url(server.url("/redirect"), make_policy()) == PNG
    assert [r["path"] for r in server.seen] == ["/redirect", "/img.png"]


def test_redirect_limits(server: LocalServer) -> None:
    with pytest.raises(FetchError, match="too many redirects"):
        fetch_url(server.url("/loop"), make_policy())
    assert len(server.seen) == 4  # the first request and max_redirects=3 hops, then it stops
    with pytest.raises(FetchError, match="too many redirects"):
        fetch_url(server.url("/redirect"), make_policy(max_redirects=0))


def test_redirect_to_other_scheme_forbidden(server: LocalServer) -> None:
    with pytest.raises(Forbidden, match="redirect"):
        fetch_url(server.url("/redirect?to=file:///etc/passwd"), make_policy())


@pytest.mark.timeout(30)  # unguarded, the header drip and the informational responses never end
@pytest.mark.parametrize("path", ["/drip", "/drip-headers", "/continue-forever", "/hang", "/hang-body"])
def test_one_deadline_over_the_whole_exchange(server: LocalServer, path: str) -> None:
    """Each of these servers defeats per-read timeouts in its own way; the fetch still ends at its deadline, hangs
    up on the server, and is not retried (a retry would hold a decode thread for another whole deadline)."""
    start = time.monotonic()
    with pytest.raises(FetchTimeout, match=f"no complete answer within {TOTAL_S:g}s") as err:
        fetch_url(server.url(path), make_policy())
    assert time.monotonic() - start >= TOTAL_S
    assert not err.value.transient
    assert server.hangups.get(timeout=10) == path  # the server saw the connection end while it was still at it


def test_connect_timeout_is_transient() -> None:
    """Unreachable now may be reachable later: a connect timeout is worth another try, unlike a slow answer."""
    with socket.socket() as listener, contextlib.ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once its backlog is full, a new connection's SYN goes unanswered
        port = listener.getsockname()[1]
        for _ in range(8):
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        with pytest.raises(FetchTimeout, match="connecting timed out") as err:
            fetch_url(f"http://127.0.0.1:{port}/img.png", make_policy(connect_timeout_s=0.3))
    assert err.value.transient


def test_a_stopped_guard_abandons_fetches_in_flight_and_refuses_new_ones(server: LocalServer) -> None:
    guard = FetchGuard()
    failures: list[ItemError] = []

    def fetch() -> None:
        try:
            fetch_url(server.url("/drip-headers"), make_policy(total_timeout_s=600), guard=guard)
        except ItemError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert [server.started.get(timeout=10) for _ in threads] == ["/drip-headers"] * 3  # all three connected
    guard.stop()
    for thread in threads:
        thread.join(timeout=30)  # unguarded: a 600 s deadline
    assert [type(f) for f in failures] == [FetchError] * 3
    assert all(f.transient and "the worker is stopping" in str(f) for f in failures)  # another worker may fetch it
    assert sorted(server.hangups.get(timeout=10) for _ in threads) == ["/drip-headers"] * 3
    with pytest.raises(FetchError, match="stopping") as err:
        fetch_url(server.url("/img.png"), make_policy(), guard=guard)
    assert err.value.transient and [r["path"] for r in server.seen] == ["/drip-headers"] * 3  # never connected


def test_endless_body_is_capped(server: LocalServer) -> None:
    with pytest.raises(TooLarge):  # not FetchTimeout: the cap ends it, long before the deadline
        fetch_url(server.url("/endless"), make_policy())


def test_declared_length_refused_up_front(server: LocalServer) -> None:
    # The server never sends the body: only the header can end it before the deadline (FetchTimeout).
    with pytest.raises(TooLarge, match="Content-Length"):
        fetch_url(server.url("/declared-huge"), make_policy())


def test_gzip_bomb_is_capped_on_decoded_bytes(server: LocalServer) -> None:
    assert len(server.bomb) < (1 << 20)  # it would pass a cap applied to the wire bytes
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge):
            fetch_url(server.url("/gzip-bomb"), make_policy())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # one 64 KiB chunk of this bomb inflates to 64 MiB if decoded without a bound


def test_gzip_sent_anyway_is_decoded(server: LocalServer) -> None:
    assert fetch_url(server.url("/gzip-png"), make_policy()) == PNG


@pytest.mark.parametrize(("path", "match"), [("/gzip-garbage", "corrupt compressed"), ("/brotli", "Content-Encoding")])
def test_bad_encodings_are_fetch_errors(server: LocalServer, path: str, match: str) -> None:
    with pytest.raises(FetchError, match=match):
        fetch_url(server.url(path), make_policy())


def test_connection_refused_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match="cannot connect") as err:
        fetch_url(f"http://127.0.0.1:{port}/img.png", make_policy())
    assert err.value.transient


# --- URLs: the SSRF guard (private addresses refused, checked before connecting) ------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "2130706433",
        "0x7f000001",
        "127.1",
        "0177.1",
        "0x7f.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "0.0.0.0",
        "[::]",
    ],
)
def test_loopback_in_any_spelling_refused_unconnected(server: LocalServer, connections: Callable, host: str) -> None:
    attempts = connections()
    with pytest.raises(Forbidden, match="not public"):
        fetch_url(server.url("/img.png", host=host), make_policy(allow_private=False))
    assert attempts == [] and server.seen == []


def test_octal_dotted_quad_is_not_fetched(server: LocalServer, connections: Callable) -> None:
    # httpx refuses leading-zero octets outright, so this never reaches the resolver or a socket.
    attempts = connections()
    with pytest.raises(InvalidInput):
        fetch_url(server.url("/img.png", host="0177.0.0.1"), make_policy(allow_private=False))
    assert attempts == [] and server.seen == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/a.png",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://[fe80::1]/",
        "http://[fd00::1]/",
        "https://[::ffff:169.254.169.254]/",
        "http://[2002:a00:1::]/",
    ],
)
def test_private_ranges_refused_unconnected(connections: Callable, url: str) -> None:
    attempts = connections()
    with pytest.raises(Forbidden):
        fetch_url(url, make_policy(allow_private=False))
    assert attempts == []


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("ftp://example.com/a.png", Forbidden),
        ("file:///etc/passwd", Forbidden),
        ("gopher://example.com/", Forbidden),
        ("/relative.png", Forbidden),
        ("http://user:pw@example.com/a.png", Forbidden),
        ("http://%31%32%37.0.0.1/", InvalidInput),
        ("http:///a.png", InvalidInput),
        ("http://a..b/", InvalidInput),
        ("http://" + "x" * 70 + ".example/", InvalidInput),
    ],
)
def test_bad_urls_refused_unconnected(connections: Callable, url: str, error: type[ItemError]) -> None:
    attempts = connections()
    with pytest.raises(error):
        fetch_url(url, make_policy(allow_private=False))
    assert attempts == []


def test_allowed_network_reaches_listed_address_only(server: LocalServer, connections: Callable) -> None:
    attempts = connections("127.0.0.1")
    policy = make_policy(allow_private=False, allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),))
    assert fetch_url(server.url("/img.png"), policy) == PNG
    for host in ("127.0.0.2", "[::1]"):
        with pytest.raises(Forbidden):
            fetch_url(server.url("/img.png", host=host), policy)
    assert {a[0] for a in attempts} == {"127.0.0.1"} and len(server.seen) == 1


@pytest.mark.parametrize(
    "target", ["http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/x.png", "http://127.0.0.2:{port}/img.png"]
)
def test_redirect_hop_to_private_address_refused(server: LocalServer, connections: Callable, target: str) -> None:
    attempts = connections("127.0.0.1")
    policy = make_policy(allow_private=False, allowed_networks=("127.0.0.1",))
    with pytest.raises(Forbidden, match="redirect"):
        fetch_url(server.url("/redirect?to=" + target.format(port=server.port)), policy)
    assert [r["path"] for r in server.seen] == ["/redirect"]
    assert {a[0] for a in attempts} == {"127.0.0.1"}


def test_connects_to_the_checked_address_not_a_second_lookup(
    server: LocalServer, connections: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name resolves once, to an allowed address; a second lookup would get a private one."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: str, port: object, *args: object, **kwargs: object) -> list:
        if host == "images.example":
            lookups.append(host)
            return real("127.0.0.1" if len(lookups) == 1 else "10.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    attempts = connections("127.0.0.1")
    policy = make_policy(allow_private=False, allowed_networks=("127.0.0.1",))
    assert fetch_url(server.url("/img.png", host="images.example"), policy) == PNG
    assert lookups == ["images.example"]
    assert server.seen[0]["host"] == f"images.example:{server.port}"
    assert {a[0] for a in attempts} == {"127.0.0.1"}


def test_hung_resolver_is_bounded_by_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def slow(host: str, *args: object, **kwargs: object) -> list:
        if host == "slow.example":
            time.sleep(TOTAL_S + 0.5)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    with pytest.raises(FetchTimeout, match="resolving"):  # the answer would come only after the deadline
        fetch_url("http://slow.example/a.png", make_policy())


def test_check_address_directly() -> None:
    strict = make_policy(allow_private=False)
    check_address("93.184.215.14", strict)
    check_address("2606:4700:4700::1111", strict)
    for ip in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "::ffff:10.0.0.1", "ff02::1", "192.0.2.1"):
        with pytest.raises(Forbidden):
            check_address(ip, strict)
    check_address("10.0.0.1", make_policy(allow_private=True))
    check_address("10.0.0.1", replace(strict, allowed_networks=("10.0.0.0/8",)))


def test_policy_from_settings(tmp_path: Path) -> None:
    s = Settings(allowed_roots=str(tmp_path), url_allowed_networks="127.0.0.1, fd00::/8", allowed_formats="png,jpeg")
    p = ImagePolicy.from_settings(s)
    assert p.allowed_roots == (tmp_path.resolve(),)
    assert p.formats == ("PNG", "JPEG")
    assert p.allowed_networks == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("fd00::/8"))
    assert (p.max_bytes, p.max_redirects, p.allow_private) == (s.max_image_bytes, s.url_max_redirects, False)


# --- HTTPS: connected by IP, yet SNI and certificate checks use the host name ---------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Path, list[str]]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            d / "key.pem",
            "-out",
            d / "cert.pem",
            "-subj",
            "/CN=images.example",
            "-addext",
            "subjectAltName=DNS:images.example",
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    names: list[str] = []
    ctx.sni_callback = lambda sock, name, context: names.append(name)  # type: ignore[assignment, misc]
    yield from ((srv, d / "cert.pem", names) for srv in serve(LocalServer(tls=ctx)))


def test_https_by_checked_ip_with_hostname_sni(
    tls_server: tuple[LocalServer, Path, list[str]], connections: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, cert, names = tls_server
    srv.seen.clear()
    real = socket.getaddrinfo
    fake_dns = {"images.example": "127.0.0.1", "other.example": "127.0.0.1"}
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **kw: real(fake_dns.get(host, host), *a, **kw))
    attempts = connections("127.0.0.1")
    policy = make_policy(allow_private=False, allowed_networks=("127.0.0.1",))
    # A plain pooled client on purpose: fetch_url must not let a kept-alive connection skip the second check.
    trusting = httpx2.Client(verify=ssl.create_default_context(cafile=cert), trust_env=False)
    with trusting:
        assert fetch_url(srv.url("/img.png", host="images.example"), policy, client=trusting) == PNG
        assert names[-1] == "images.example" and srv.seen[-1]["host"] == f"images.example:{srv.port}"
        # Same IP, other name: the certificate is checked against the name, so this must fail, not pass.
        with pytest.raises(FetchError, match="cannot connect") as err:
            fetch_url(srv.url("/img.png", host="other.example"), policy, client=trusting)
        assert not err.value.transient
    assert {a[0] for a in attempts} == {"127.0.0.1"}


def test_jpeg_draft_decodes_at_the_smallest_scale_that_still_covers_the_model_input() -> None:
    photo = Image.radial_gradient("L").resize((2000, 1500)).convert("RGB")
    data = encode(photo, "JPEG", quality=90)
    policy = make_policy(max_bytes=8 << 20, draft_edge=224)
    drafted = decode_image(data, policy)
    assert drafted.size == (500, 375)  # 1/4 scale: 1/8 would give 250x188, under 224 on the short side
    assert decode_image(data, make_policy(max_bytes=8 << 20)).size == (2000, 1500)  # off by default
    assert decode_image(encode(photo, "PNG"), policy).size == (2000, 1500)  # only JPEGs have DCT scales
    small = encode(photo.resize((300, 200)), "JPEG")
    assert decode_image(small, policy).size == (300, 200)  # nothing to spare: full size
