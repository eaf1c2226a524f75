"""Hostile-input figures for docs/faults.md: what each attack of the probe costs against the guards, measured here.

    python -m bench.hostile                      # measure everything and print the section
    python -m bench.hostile --write docs/faults.md   # ... and replace the section in the file
    python -m bench.hostile decode               # one group: decode, budget, fetch, stop, webhook, b64, refusals

Memory is the resident high-water mark (VmHWM, what ru_maxrss reports) of a child process, restarted just before
the decode (Linux's clear_refs): Pillow's pixel buffers are not Python allocations, so tracemalloc cannot see them.
Python-side figures (webhook answers, base64) are tracemalloc peaks. Times are wall clock on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- hostile-input: begin -->", "<!-- hostile-input: end -->"
SIDE = 8000  # 64 megapixels: the default CAPTIONER_MAX_IMAGE_PIXELS
MiB = 1 << 20


# --- decode memory ------------------------------------------------------------------------------


def _tiff_tile_bomb() -> bytes:
    """A 16x16 greyscale TIFF whose one deflated tile is declared 40960x40960 (158 bytes)."""
    body = zlib.compress(b"\0" * 64)
    tags = [
        (256, 4, 16),
        (257, 4, 16),
        (258, 3, 8),
        (259, 3, 8),
        (262, 3, 1),
        (277, 3, 1),
        (284, 3, 1),
        (322, 4, 40960),
        (323, 4, 40960),
        (324, 4, 8),
        (325, 4, len(body)),
    ]
    body += b"\0" * (len(body) % 2)
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        ifd += struct.pack("<HHI", tag, kind, 1) + (
            struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        )
    return b"II*\x00" + struct.pack("<I", 8 + len(body)) + body + ifd + struct.pack("<I", 0)


def _image(case: str) -> bytes:
    from PIL import Image

    def enc(im: Image.Image, fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    side = SIDE
    makers: dict[str, Callable[[], bytes]] = {
        "tile bomb TIFF (16x16, one 40960x40960 tile)": _tiff_tile_bomb,
        "RGBA PNG": lambda: enc(Image.new("RGBA", (side, side), (10, 200, 30, 128)), "PNG"),
        "16-bit PNG": lambda: enc(Image.new("I;16", (side, side), 40000), "PNG"),
        "float TIFF": lambda: enc(Image.new("F", (side, side), 0.5), "TIFF", compression="tiff_deflate"),
        "palette GIF with transparency": lambda: enc(Image.new("P", (side, side), 0), "GIF", transparency=0),
        "CMYK JPEG": lambda: enc(Image.new("CMYK", (side, side), (0, 255, 255, 0)), "JPEG"),
        "RGB JPEG": lambda: enc(Image.new("RGB", (side, side), (200, 30, 30)), "JPEG"),
        "progressive 4:4:4 JPEG": lambda: enc(
            Image.new("RGB", (side, side), (200, 30, 30)), "JPEG", progressive=True, subsampling=0
        ),
        # The largest WebP the budget allows: it decodes through two canvases and a copy of the frame.
        "RGBA WebP (32 MP)": lambda: enc(Image.new("RGBA", (5656, 5656), (10, 200, 30, 128)), "WEBP"),
        "RGBA WebP (64 MP)": lambda: enc(Image.new("RGBA", (side, side), (10, 200, 30, 128)), "WEBP"),
    }
    return makers[case]()


def _naive_rgb(im: Any) -> Any:
    """The conversion before the budget: whole-image steps (composite, scale), every intermediate a full copy."""
    from PIL import Image

    if im.mode in ("I", "F", "I;16", "I;16B", "I;16L", "I;16N"):
        lo, hi = (0.0, 65535.0) if im.mode.startswith("I;16") else (float(v) for v in im.getextrema())
        im = im.convert("I") if im.mode.startswith("I;16") else im
        if im.mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        im = im.convert("F").point(lambda v: v * scale - lo * scale).convert("L")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _high_water() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def _child_peak(case: str, how: str) -> None:
    """In a child process: decode one case and print its outcome and the rise of the RSS high-water mark."""
    from PIL import Image

    from common.settings import Settings
    from media.images import ImagePolicy, decode_image

    Image.init()
    data = _image(case)
    policy = ImagePolicy.from_settings(Settings(max_image_bytes=256 * MiB))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the high-water mark restarts from what is in use now
    before = _high_water()
    started = time.perf_counter()
    try:
        if how == "pillow":  # what the decoder alone allocates, no guard in front of it
            im = Image.open(io.BytesIO(data))
            im.load()
        elif how == "naive":
            im = Image.open(io.BytesIO(data))
            im.load()
            im = _naive_rgb(im)
        else:
            im = decode_image(data, policy)
        outcome = f"{im.mode} {im.size[0]}x{im.size[1]}"
    except Exception as exc:
        outcome = f"{getattr(exc, 'code', type(exc).__name__)}: {str(exc)[:80]}"
    print(json.dumps({"peak": _high_water() - before, "s": time.perf_counter() - started, "outcome": outcome}))


def _peak(case: str, how: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.hostile", "_peak", case, how], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


#: The PostgreSQL the ledger figures use (the tests' default; CAPTIONER_TEST_POSTGRES names another).
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def measure_decode() -> list[dict[str, str]]:
    from common.settings import Settings

    rows = []
    bomb = "tile bomb TIFF (16x16, one 40960x40960 tile)"
    raw, guarded = _peak(bomb, "pillow"), _peak(bomb, "guarded")
    rows.append(
        {
            "attack": f"a {len(_tiff_tile_bomb())}-byte TIFF declaring a 16x16 image with one 40960x40960 tile",
            "guard": "tile geometry checked from the header: a tile may hold no more pixels than its image (or 1 MP)",
            "figure": f"refused as too_large, peak +{guarded['peak'] / MiB:.0f} MiB (Pillow and libtiff alone: "
            f"+{raw['peak'] / MiB:.0f} MiB)",
            "command": "python -m bench.hostile decode",
        }
    )
    budget = Settings().decode_budget_bytes
    for case in (
        "RGBA PNG",
        "16-bit PNG",
        "float TIFF",
        "palette GIF with transparency",
        "CMYK JPEG",
        "RGB JPEG",
        "progressive 4:4:4 JPEG",
        "RGBA WebP (32 MP)",
        "RGBA WebP (64 MP)",
    ):
        naive, ours = _peak(case, "naive"), _peak(case, "guarded")
        if ours["outcome"].startswith("RGB "):
            figure = (
                f"peak +{ours['peak'] / MiB:.0f} MiB in {ours['s']:.1f}s (converted by whole-image steps, "
                f"as before: +{naive['peak'] / MiB:.0f} MiB)"
            )
        else:
            peaks = ours["peak"] / MiB, naive["peak"] / MiB
            figure = "refused as too_large, peak +{:.0f} MiB (decoded: +{:.0f} MiB)".format(*peaks)
        if "WebP" in case or "progressive" in case:
            guard = "a decoder needing more than 8 bytes per pixel gets fewer pixels"
        elif case in ("CMYK JPEG", "RGB JPEG"):
            guard = "one plain conversion, the source dropped as soon as its copy exists"
        else:
            guard = "the conversion's steps run band by band into one RGB image"
        rows.append(
            {
                "attack": case + ("" if "MP)" in case else f", {SIDE}x{SIDE} (64 MP, inside the pixel cap)"),
                "guard": f"{guard}; budget {budget / MiB:.0f} MiB per decode",
                "figure": figure,
                "command": "python -m bench.hostile decode",
            }
        )
    return rows


def measure_budget() -> list[dict[str, str]]:
    from common.memory import machine_memory_bytes
    from common.settings import Settings

    s = Settings()
    have = machine_memory_bytes()
    return [
        {
            "attack": f"every decode thread ({s.decode_threads}) decoding the largest image allowed at once",
            "guard": "decode budget per image x CAPTIONER_DECODE_THREADS, checked by `captioner doctor` against the "
            "machine's memory (workers report theirs)",
            "figure": f"{s.decode_budget_bytes / MiB:.0f} MiB per decode, {s.image_memory_bytes / 2**30:.1f} GiB for "
            f"{s.decode_threads} threads" + (f" ({have / 2**30:.1f} GiB here)" if have else ""),
            "command": "python -m bench.hostile budget",
        }
    ]


# --- fetches ----------------------------------------------------------------------------------


class _Slow(BaseHTTPRequestHandler):
    """Servers that never trip a per-read timeout, and a webhook receiver whose answer never ends."""

    protocol_version = "HTTP/1.1"
    server: _SlowServer

    def do_GET(self) -> None:
        self.server.started.append(self.path)
        kind = self.path.strip("/").split("?")[0]
        head, more = {
            "drip-headers": (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"x"),
            "continue-forever": (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),
            "drip-body": (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x"),
        }[kind]
        self._drip(head, more, 0.05)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._drip(b"HTTP/1.1 200 OK\r\n\r\n", b"\0" * 65536, 0)

    def _drip(self, head: bytes, more: bytes, every: float) -> None:
        sent = 0
        try:
            self.wfile.write(head)
            while not self.server.stop.wait(every):
                self.wfile.write(more)
                self.wfile.flush()
                sent += len(more)
        except OSError:
            self.server.hangups.append((self.path, sent, time.monotonic()))
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


class _SlowServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Slow)
        self.stop = threading.Event()
        self.started: list[str] = []
        self.hangups: list[tuple[str, int, float]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@contextlib.contextmanager
def _slow_server() -> Iterator[_SlowServer]:
    srv = _SlowServer()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()


def _policy(total_s: float) -> Any:
    from common.settings import Settings
    from media.images import ImagePolicy

    return ImagePolicy.from_settings(Settings(url_total_timeout_s=total_s, allow_private_urls=True))


def measure_fetch(total_s: float = 5.0) -> list[dict[str, str]]:
    from common.errors import ItemError
    from media.images import fetch_url

    rows = []
    with _slow_server() as srv:
        for path, what in (
            ("/drip-headers", "sends its response headers one byte every 50 ms"),
            ("/continue-forever", "sends `100 Continue` every 50 ms, never a response"),
            ("/drip-body", "sends its body one byte every 50 ms"),
        ):
            started = time.monotonic()
            try:
                fetch_url(srv.url(path), _policy(total_s))
                outcome = "fetched (no guard?)"
            except ItemError as exc:
                outcome = f"{exc.code}, transient={exc.transient}"
            took = time.monotonic() - started
            rows.append(
                {
                    "attack": f"an image URL whose server {what}",
                    "guard": "one deadline over the whole exchange: a guard thread shuts the socket down at it",
                    "figure": f"ended after {took:.2f}s against a {total_s:g} s deadline ({outcome}); per-read "
                    "timeouts alone never end it",
                    "command": "python -m bench.hostile fetch",
                }
            )
    return rows


def measure_stop() -> list[dict[str, str]]:
    """A worker on its own redis-server and tiny model: SIGTERM when idle, and with every decode thread in a fetch."""
    from common.settings import Settings
    from producer.jobs import JobClient
    from producer.local import LocalRedis, WorkerProcess
    from training.tiny import build_tiny_git

    work = Path(tempfile.mkdtemp(prefix="captioner-hostile-"))
    model = build_tiny_git(work / "tiny-git", seed=0)
    with LocalRedis() as server, _slow_server() as srv:
        env = {
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
            "CAPTIONER_MODEL": str(model),
            "CAPTIONER_DTYPE": "float32",
            "CAPTIONER_URL_TOTAL_TIMEOUT_S": "600",
            "CAPTIONER_URL_ALLOWED_NETWORKS": "127.0.0.1/32",
            "CAPTIONER_DECODE_THREADS": "4",
            "CAPTIONER_METRICS_PORT": "0",
            "CAPTIONER_TORCH_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        idle = _terminate_after(WorkerProcess(env, log=work / "idle.log"), lambda: None)
        client = JobClient(
            Settings(**{k.removeprefix("CAPTIONER_").lower(): v for k, v in env.items() if k.startswith("CAPTIONER_")})
        )

        def four_fetches() -> None:
            client.enqueue([srv.url(f"/drip-headers?item={i}") for i in range(4)], job_id=f"job-{uuid.uuid4().hex[:6]}")
            while len(srv.started) < 4:
                time.sleep(0.05)

        busy = _terminate_after(WorkerProcess(env, log=work / "busy.log"), four_fetches)
        client.close()
    return [
        {
            "attack": "SIGTERM while all 4 decode threads wait on servers dripping their headers (deadline 600 s)",
            "guard": "a stopping worker abandons fetches in flight (transient rows: the items go back to the queue)",
            "figure": f"exited 0 in {busy:.1f}s after SIGTERM (an idle worker: {idle:.1f}s); the fetches alone would "
            "have held it 600 s",
            "command": "python -m bench.hostile stop",
        }
    ]


def _terminate_after(worker: Any, before: Callable[[], None]) -> float:
    worker.start()
    try:
        worker.wait_ready()
        before()
        started = time.monotonic()
        os.killpg(worker.proc.pid, signal.SIGTERM)
        code = worker.proc.wait(900)
        took = time.monotonic() - started
    finally:
        worker.terminate()
    if code != 0:
        raise SystemExit(f"worker exited {code}; log: {worker.log_path}")
    return took


def measure_webhook() -> list[dict[str, str]]:
    from worker.callbacks import ANSWER_CAP, post_webhook

    with _slow_server() as srv:
        post_webhook(srv.url("/warm-up"), {}, secret="s", policy=_policy(20))  # imports and TLS set-up, not counted
        tracemalloc.start()
        try:
            status = post_webhook(srv.url("/hook"), {"id": "job-x"}, secret="s", policy=_policy(20))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        while len(srv.hangups) < 2:
            time.sleep(0.01)
        sent = next(n for path, n, _ in srv.hangups if path == "/hook")
    return [
        {
            "attack": "a webhook receiver answering 200 with an endless body",
            "guard": f"at most {ANSWER_CAP // 1024} KiB of the answer read, then the connection closed",
            "figure": f"status {status}; Python peak {peak / 1024:.0f} KiB; the receiver had pushed {sent / MiB:.1f} MiB "
            "(socket buffers) when it was hung up on",
            "command": "python -m bench.hostile webhook",
        }
    ]


def measure_b64() -> list[dict[str, str]]:
    from common.errors import TooLarge
    from common.messages import Source
    from common.settings import Settings

    cap = Settings().max_image_bytes
    src = Source(b64="A" * (4 * cap))  # 4 times over the cap: 128 MiB of text
    tracemalloc.start()
    try:
        with contextlib.suppress(TooLarge):
            src.decode_b64(cap)
        _ = src.ref
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return [
        {
            "attack": f"a base64 input of {4 * cap / MiB:.0f} MiB of text (4 times the {cap / MiB:.0f} MiB cap)",
            "guard": "refused by its length before any decoding; its item id hashed in 64 KiB slices",
            "figure": f"Python peak {peak / 1024:.0f} KiB while refusing it (a decode first would allocate "
            f"{3 * cap / MiB:.0f} MiB)",
            "command": "python -m bench.hostile b64",
        }
    ]


# --- refusals ---------------------------------------------------------------------------------

HOSTILE_JOB_IDS = [
    "victim:res",
    "victim:src",
    "victim:att",
    "../../tmp/x",
    "a/b",
    ".hidden",
    "a..b",
    "x" * 129,
    "x" * 200,
    "tab\there",
    "\x1b[31m",
    "é",
    "",
]


def measure_refusals() -> list[dict[str, str]]:
    """Outcomes, counted on real files and messages in this process (the tests run them through workers)."""
    from common.errors import InvalidMessage, SourceError
    from common.messages import ChunkMessage, check_job_id, parse_message
    from exports import export_rows, read_rows
    from media.paths import LocalFiles

    refused = 0
    for job_id in HOSTILE_JOB_IDS:
        try:
            check_job_id(job_id)
        except ValueError:
            try:
                parse_message(ChunkMessage, {"job_id": job_id, "items": ["/a.jpg"]})
            except InvalidMessage:
                refused += 1
    rows = [
        {
            "attack": "job ids naming another job's keys (`victim:res`), paths (`../x`, `a/b`), 200 characters, "
            "control characters",
            "guard": "one alphabet and length (A-Za-z0-9._-, 128, no `..`) checked by producer and worker alike",
            "figure": f"{refused} of {len(HOSTILE_JOB_IDS)} refused by both checks; through a worker, the victim job's "
            "rows stay as they were",
            "command": "python -m bench.hostile refusals; pytest tests/test_hostile.py -k 'job_id or jobs_keys'",
        }
    ]

    with tempfile.TemporaryDirectory() as tmp:
        root, outside = Path(tmp) / "root", Path(tmp) / "outside"
        (root / "photos").mkdir(parents=True)
        outside.mkdir()
        n = 100
        results = []
        for i in range(n):
            (root / "photos" / f"p{i}.jpg").write_bytes(b"image")
            (outside / f"p{i}.jpg").write_bytes(b"secret outside the roots")
            results.append(
                {
                    "id": f"{i:016x}",
                    "ref": str(root / "photos" / f"p{i}.jpg"),
                    "status": "ok",
                    "caption": f"caption {i}",
                }
            )
        (root / "photos").rename(root / "photos-then")
        (root / "photos").symlink_to(outside)
        local = LocalFiles.under([root], 1 << 20)
        side = export_rows(results, "sidecar", None, local=local)
        written_outside = len(list(outside.glob("*.txt")))
        shards = export_rows(results, "webdataset", Path(tmp) / "shards", local=local)
        packed = sum(p.stat().st_size for p in (Path(tmp) / "shards").glob("*.tar"))
    rows.append(
        {
            "attack": f"{n} captioned images whose folder became a symlink leading out of the allowed roots",
            "guard": "every file an export writes or reads checked when it is touched, by the workers' rules",
            "figure": f"sidecars written outside: {written_outside} of {n} ({side.skipped_by_reason}); WebDataset "
            f"samples packed: {shards.rows_written} ({packed} bytes of shards)",
            "command": "python -m bench.hostile refusals",
        }
    )

    formulas = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "x.csv"
        items = [
            {"id": str(i), "ref": f, "status": "ok", "caption": f, "params": {"prompt": f}}
            for i, f in enumerate(formulas)
        ]
        export_rows(items, "csv", out)
        import csv

        with open(out, encoding="utf-8", newline="") as fh:
            cells = [cell for record in list(csv.reader(fh))[1:] for cell in record]
        live = sum(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells)
        back = [r["caption"] for r in read_rows(out, "csv")]
    rows.append(
        {
            "attack": "captions, prompts and references starting with `=`, `+`, `-`, `@`, tab or CR, exported as CSV",
            "guard": "a leading `'` on such cells (OWASP's advice); read_rows takes it off again",
            "figure": f"cells a spreadsheet would run: {live} of {len(formulas) * 3}; read back equal: "
            f"{back == formulas}",
            "command": "python -m bench.hostile refusals",
        }
    )

    from producer.sources import expand

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "l.txt").write_bytes(b"\xef\xbb\xbfa.jpg\nb.jpg\n")
        first = next(expand(str(Path(tmp) / "l.txt")))
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"url": [1, 2]}), Path(tmp) / "l.parquet")
        try:
            list(expand(str(Path(tmp) / "l.parquet")))
            parquet = "read"
        except SourceError as exc:
            parquet = f"one line: {str(exc).split(': ', 1)[1]}"
    rows.append(
        {
            "attack": "a list file starting with a UTF-8 byte-order mark; a Parquet column of integers",
            "guard": "lists read as utf-8-sig; a column that is not text is a named error",
            "figure": f"first reference {Path(first).name!r}; Parquet: {parquet}",
            "command": "python -m bench.hostile refusals",
        }
    )
    return rows


def measure_ledger(n: int = 2000) -> list[dict[str, str]]:
    """Rows holding NUL (a Parquet text column, a shard's .txt member, a list line) written to each ledger backend
    and read back; PostgreSQL's text and jsonb refuse NUL, so its ledger stores such text escaped."""
    import redis

    from common.messages import GenParams, ItemResult, ItemStatus, item_id
    from ledger import Ledger, RedisLedger
    from ledger.postgres import PostgresLedger
    from producer.local import LocalRedis

    refs = [f"/data/set/{i:05d}\x00.jpg" if i % 2 else f"/data/set/{i:05d}.jpg" for i in range(n)]
    rows = [
        ItemResult(
            id=item_id(r),
            ref=r,
            status=ItemStatus.OK,
            caption=f"caption\x00{i}",
            model_version="v",
            extra={"txt": f"alt\x00text {i}"},
        )
        for i, r in enumerate(refs)
    ]
    plain = [
        r.model_copy(
            update={
                "ref": r.ref.replace("\x00", ""),
                "caption": r.caption.replace("\x00", " "),
                "extra": {"txt": r.extra["txt"].replace("\x00", " ")},
            }
        )
        for r in rows
    ]
    plain = [r.model_copy(update={"id": item_id(r.ref)}) for r in plain]
    figures: dict[str, str] = {}
    with LocalRedis() as server:
        prefix = f"hostile_{uuid.uuid4().hex[:6]}"
        backends: dict[str, Ledger] = {
            "Redis": RedisLedger(redis.Redis.from_url(server.url(0)), prefix),
            "PostgreSQL": PostgresLedger(os.environ.get("CAPTIONER_TEST_POSTGRES", PG_URL), prefix),
        }
        for name, led in backends.items():
            try:
                took = {}
                for job, batch in (("plain", plain), ("nul", rows)):
                    led.open_job(job, job, GenParams())
                    led.add_items(job, [(r.id, r.ref) for r in batch])
                    started = time.perf_counter()
                    for k in range(0, n, 64):
                        led.record(job, batch[k : k + 64])
                    took[job] = (time.perf_counter() - started) * 1000 / n
                back = {r["id"]: r for r in led.iter_results("nul")}
                equal = sum(
                    1
                    for r in rows
                    if (back[r.id]["ref"], back[r.id]["caption"], back[r.id]["extra"]) == (r.ref, r.caption, r.extra)
                )
                figures[name] = (
                    f"{name} {equal} of {n} read back equal, {took['nul']:.2f} ms per row written "
                    f"({took['plain']:.2f} without NUL)"
                )
            finally:
                if isinstance(led, PostgresLedger):
                    led._run(f"DROP SCHEMA IF EXISTS {led.schema} CASCADE")
                led.close()
    return [
        {
            "attack": "NUL in a Parquet text column, a shard's `.txt` member or a list line (PostgreSQL ledger: "
            "`\\u0000 cannot be converted to text`, the container open after 4 attempts, the job never done)",
            "guard": "the PostgreSQL ledger stores text it cannot hold escaped, marked per row (rows stored before read "
            "as they were); a list line with a NUL is a named invalid_input row",
            "figure": f"{n} rows (every caption and extra, half the references holding NUL): "
            + "; ".join(figures.values()),
            "command": "python -m bench.hostile ledger; pytest tests/test_postgres_ledger.py -k nul",
        }
    ]


def tested_rows() -> list[dict[str, str]]:
    """Classes whose figure is what a test through a real worker asserts (it fails when the figure is not so)."""
    return [
        {
            "attack": "`max_length` 1, or a prompt as long as `max_length`",
            "guard": "refused at the edge (CLI exit 2, InvalidMessage); a prompt whose tokens fill it gets "
            "invalid_input rows from the worker",
            "figure": "0 items reach the model; each was an engine_error before",
            "command": "pytest tests/test_hostile.py -k 'no_room or many_tokens'",
        },
        {
            "attack": "a `caption_many` call of 257 images (past the visibility timeout, it is captioned twice)",
            "guard": "CAPTIONER_MAX_LIST_ITEMS (256) per call; doctor compares each worker's speed",
            "figure": "refused whole with InvalidMessage naming the bound; 3 images still captioned",
            "command": "pytest tests/test_hostile.py -k list_call",
        },
        {
            "attack": "job names with terminal escape sequences, bidi overrides and rich markup",
            "guard": "`captioner jobs`, `status` and `failures` print control characters as escapes",
            "figure": "0 raw control characters in the output",
            "command": "pytest tests/test_hostile.py -k control_characters",
        },
    ]


# --- output -----------------------------------------------------------------------------------

GROUPS: dict[str, Callable[[], list[dict[str, str]]]] = {
    "decode": measure_decode,
    "budget": measure_budget,
    "fetch": measure_fetch,
    "stop": measure_stop,
    "webhook": measure_webhook,
    "b64": measure_b64,
    "refusals": measure_refusals,
    "ledger": measure_ledger,
}


def render(rows: list[dict[str, str]]) -> str:
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    lines = [
        BEGIN,
        "## Hostile input: what each attack costs against its guard",
        "",
        "Each row is one attack a hostile probe made (tests/test_hostile.py and tests/test_images.py run each one",
        "against real parts: crafted files, HTTP servers on 127.0.0.1, real workers) with the figure measured by",
        "the command beside it. Memory: the rise of a child process's resident high-water mark (VmHWM) over one",
        "decode; Python-side figures: tracemalloc peaks. `python -m bench.hostile --write docs/faults.md` measures",
        "every row again (a few minutes: it decodes 64-megapixel images and starts two workers).",
        "",
        "| attack | guard | figure | measured by |",
        "| --- | --- | --- | --- |",
        *(f"| {r['attack']} | {r['guard']} | {r['figure']} | `{r['command']}` |" for r in rows),
        "",
        f"Measured {stamp} on a {os.cpu_count()}-core CPU machine (`python -m bench.hostile`).",
        END,
    ]
    return "\n".join(lines) + "\n"


def write(path: Path, section: str) -> None:
    """Replace the section between its markers in ``path`` (or append it)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_peak"]:
        _child_peak(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"groups to measure: {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--write", type=Path, help="replace the hostile-input section of this file (docs/faults.md)")
    args = parser.parse_args(argv)
    if unknown := [g for g in args.groups if g not in GROUPS]:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    rows = [row for name in (args.groups or GROUPS) for row in GROUPS[name]()] + tested_rows()
    section = render(rows)
    print(section)
    if args.write:
        write(args.write, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
