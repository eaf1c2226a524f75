"""Hostile input through a real worker: each bad item gets its named error, batch-mates are captioned,
and the worker keeps serving. (tests/test_images.py covers each case in depth, in-process.)"""

from __future__ import annotations

import io
import os
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest
from PIL import Image

from common.messages import TASK_CAPTION, TASK_CAPTION_MANY
from tests.test_images import png_header_only
from worker.celery_app import create_app

pytestmark = pytest.mark.usefixtures("caption_worker")


@pytest.fixture
def hostile_files(session_root: Path, images: Path, tmp_path: Path) -> dict[str, str]:
    good = sorted(images.glob("*.jpg"))
    d = images
    (d / "zero.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(good[0].read_bytes()[:200])
    (d / "text.jpg").write_text("GIF89a? no, just text")
    (d / "bomb.png").write_bytes(png_header_only(60_000, 60_000))
    (d / "doc.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.new("I;16", (40, 30), 40000).save(d / "deep.png")
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(d / "hidden.png")
    os.mkfifo(d / "fifo.jpg")
    (d / "folder.jpg").mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(good[1].read_bytes())
    (d / "escape.jpg").symlink_to(outside)
    return {
        "good0": str(good[0]), "good1": str(good[1]), "zero": str(d / "zero.jpg"),
        "truncated": str(d / "truncated.jpg"), "text": str(d / "text.jpg"), "bomb": str(d / "bomb.png"),
        "eps": str(d / "doc.eps"), "cmyk": str(d / "cmyk.jpg"), "deep": str(d / "deep.png"),
        "hidden": str(d / "hidden.png"), "fifo": str(d / "fifo.jpg"), "folder": str(d / "folder.jpg"),
        "escape": str(d / "escape.jpg"), "dotdot": str(d / ".." / ".." / "etc" / "passwd"),
    }  # fmt: skip


@pytest.fixture
def hostile_server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/404":
                self.send_error(404)
            elif self.path == "/500":
                self.send_error(500)
            elif self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.end_headers()
            elif self.path == "/to-private":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
            elif self.path == "/gzip-bomb":
                body = zlib.compress(b"\0" * (64 * 1024 * 1024), 9)
                self.send_response(200)
                self.send_header("Content-Encoding", "deflate")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(400)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_one_batch_of_hostile_items_named_errors_and_batch_mates_captioned(
    settings, hostile_files: dict[str, str], hostile_server: str
) -> None:
    urls = {
        "u404": f"{hostile_server}/404", "u500": f"{hostile_server}/500", "uloop": f"{hostile_server}/loop",
        "uredirect_private": f"{hostile_server}/to-private", "ugzip": f"{hostile_server}/gzip-bomb",
        "umetadata": "http://169.254.169.254/latest/meta-data/", "uprivate": "http://10.0.0.1/x.jpg",
        "uhex": "http://0x7f000002/x.jpg", "uscheme": "file:///etc/passwd", "ucreds": "http://u:p@127.0.0.1/x.jpg",
    }  # fmt: skip
    named = {**hostile_files, **urls}
    sources = list(named.values())
    rows = create_app(settings).send_task(TASK_CAPTION_MANY, kwargs={"sources": sources}).get(timeout=120)
    got = {name: (r["status"], r.get("error_class")) for name, r in zip(named, rows, strict=True)}
    expected = {
        "good0": ("ok", None), "good1": ("ok", None), "cmyk": ("ok", None), "deep": ("ok", None),
        "hidden": ("ok", None), "zero": ("error", "decode_error"), "truncated": ("error", "decode_error"),
        "text": ("error", "decode_error"), "bomb": ("error", "too_large"), "eps": ("error", "decode_error"),
        "fifo": ("error", "forbidden"), "folder": ("error", "forbidden"), "escape": ("error", "forbidden"),
        "dotdot": ("error", "forbidden"), "u404": ("error", "fetch_error"), "u500": ("error", "fetch_error"),
        "uloop": ("error", "fetch_error"), "uredirect_private": ("error", "forbidden"),
        "ugzip": ("error", "too_large"), "umetadata": ("error", "forbidden"), "uprivate": ("error", "forbidden"),
        "uhex": ("error", "forbidden"), "uscheme": ("error", "forbidden"), "ucreds": ("error", "forbidden"),
    }  # fmt: skip
    assert got == expected
    # The worker is still serving after all of that.
    row = create_app(settings).send_task(TASK_CAPTION, args=[hostile_files["good0"]]).get(timeout=60)
    assert row["status"] == "ok"


def test_exif_orientation_is_honoured_through_the_worker(settings, images: Path) -> None:
    """A rotated photo with an EXIF orientation tag captions like the upright photo."""
    upright = Image.open(sorted(images.glob("*.jpg"))[2]).convert("RGB")
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
    (images / "rotated.jpg").write_bytes(buf.getvalue())
    upright.save(images / "upright.jpg", quality=95)
    app = create_app(settings)
    a = app.send_task(TASK_CAPTION, args=[str(images / "rotated.jpg")]).get(timeout=60)
    b = app.send_task(TASK_CAPTION, args=[str(images / "upright.jpg")]).get(timeout=60)
    assert a["status"] == b["status"] == "ok"
    assert a["caption"] == b["caption"]
