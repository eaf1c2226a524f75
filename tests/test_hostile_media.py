"""Containers and images that lie: tar headers claiming more than the shard holds, long-name headers that expand to
gigabytes, Parquet cells that decompress to hundreds of megabytes, progressive JPEGs with thousands of scans. Each
is built here, small, and read as a worker reads it (in process, and through the session's worker for the shards)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest
from PIL import Image

from common.errors import DecodeError
from common.messages import ContainerSpec
from common.settings import Settings
from media.containers import MAX_EXTRA_BYTES, MAX_TAR_HEADER_BYTES, UNREAD, clean_extra, read_members
from media.images import ImagePolicy, decode_image, default_guard


def _png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "PNG")
    return buf.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def lying_tar(claimed: int = 1 << 40) -> bytes:
    """One PNG member, then a header claiming ``claimed`` bytes that never follow (base-256 size, GNU format)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _member(tar, "a.png", _png())
        info = tarfile.TarInfo("b.txt")
        info.size = claimed
        tar.addfile(info)  # the header alone
    return buf.getvalue()


def long_name_tgz(claimed: int = 1 << 30) -> bytes:
    """A gzipped shard whose GNU long-name header claims ``claimed`` bytes of name, which gzip holds in ~1 MB."""
    header = tarfile.TarInfo("././@LongLink")
    header.type = tarfile.GNUTYPE_LONGNAME
    header.size = claimed
    raw = header.tobuf(format=tarfile.USTAR_FORMAT)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as gz:
        gz.write(raw)
        zeros = b"a" * (1 << 20)
        for _ in range(claimed >> 20):
            gz.write(zeros)
    return out.getvalue()


@pytest.fixture
def local(tmp_path: Path) -> tuple[Settings, ImagePolicy, Path]:
    settings = Settings(allowed_roots=[tmp_path], container_timeout_s=30)
    return settings, ImagePolicy.from_settings(settings), tmp_path


def _read(spec: ContainerSpec, settings: Settings, policy: ImagePolicy) -> list:
    return list(read_members(spec, policy, settings, default_guard()))


def test_a_tar_header_claiming_a_tebibyte_ends_at_the_bytes_the_shard_has(local) -> None:
    """A 2.5 KB shard whose second header claims 1 TiB kept a worker reading for 147 s."""
    settings, policy, root = local
    shard = root / "liar.tar"
    shard.write_bytes(lying_tar())
    assert shard.stat().st_size < 12 * 1024
    members = _read(ContainerSpec(kind="tar", ref=str(shard)), settings, policy)
    assert [m.key for m in members] == ["a", UNREAD]
    assert members[0].blob.data is not None
    error = members[1].blob.error
    assert isinstance(error, DecodeError) and "claims more" in str(error), error


def test_a_shard_read_past_the_container_deadline_stops_with_a_timeout(local) -> None:
    """A gzipped shard of 64 MiB of a skipped member (64 KB on disk) under a deadline it cannot meet: the read ends
    at the deadline, whatever the container lies on."""
    settings, policy, root = local
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _member(tar, "a.png", _png())
        _member(tar, "b.bin", b"\0" * (64 << 20))
        _member(tar, "c.png", _png())
    (root / "slow.tar.gz").write_bytes(buf.getvalue())
    quick = settings.model_copy(update={"container_timeout_s": 0.01})
    members = _read(ContainerSpec(kind="tar", ref=str(root / "slow.tar.gz")), quick, policy)
    assert members[-1].key == UNREAD and type(members[-1].blob.error).__name__ == "FetchTimeout", members
    assert "CAPTIONER_CONTAINER_TIMEOUT_S" in str(members[-1].blob.error)
    whole = _read(ContainerSpec(kind="tar", ref=str(root / "slow.tar.gz")), settings, policy)
    assert [m.key for m in whole] == ["a", "c"]  # the same shard inside its deadline reads whole


def test_a_long_name_header_that_decompresses_to_a_gibibyte_is_refused_unread(local) -> None:
    """A 1 MB .tar.gz whose GNU long-name header claims 1 GiB: tarfile read it whole (peak +2.1 GB)."""
    settings, policy, root = local
    shard = root / "longname.tar.gz"
    shard.write_bytes(long_name_tgz(64 << 20))  # 64 MiB keeps the test fast; the header is refused by its size
    tracemalloc.start()
    try:
        members = _read(ContainerSpec(kind="tar", ref=str(shard)), settings, policy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [m.key for m in members] == [UNREAD]
    assert f"over the limit of {MAX_TAR_HEADER_BYTES}" in str(members[0].blob.error)
    assert peak < 4 << 20, peak  # read whole: +64 MiB


def test_a_shard_decompressing_past_the_container_cap_is_refused(local) -> None:
    settings, policy, root = local
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _member(tar, "a.png", _png())
        _member(tar, "b.bin", b"\0" * (8 << 20))
    (root / "bomb.tar.gz").write_bytes(buf.getvalue())
    small = settings.model_copy(update={"max_container_bytes": 1 << 20})
    assert (root / "bomb.tar.gz").stat().st_size < small.max_container_bytes
    members = _read(ContainerSpec(kind="tar", ref=str(root / "bomb.tar.gz")), small, policy)
    assert [m.key for m in members] == ["a", UNREAD]
    assert "over the container limit" in str(members[1].blob.error) and "decompressed" in str(members[1].blob.error)


def many_scans_jpeg(size: int, repeats: int) -> bytes:
    """A progressive grey JPEG with its last scan repeated ``repeats`` times (a few dozen bytes each)."""
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    scan = data[last:-2]  # the last scan, up to EOI
    return data[:-2] + scan * repeats + b"\xff\xd9"


def test_a_progressive_jpeg_with_thousands_of_scans_is_refused_before_decoding() -> None:
    """A 4000x4000 grey JPEG with its last scan repeated 8,000 times (342 KB) decoded for 43.5 s; review thumbnails
    use the same decoder."""
    from media.images import MAX_JPEG_SCANS, jpeg_scans

    policy = ImagePolicy.from_settings(Settings())
    hostile = many_scans_jpeg(1000, 3000)
    assert jpeg_scans(hostile, 10**6) > 3000
    with pytest.raises(DecodeError, match=f"more than {MAX_JPEG_SCANS} scans"):
        decode_image(hostile, policy)
    # What encoders write passes: baseline, progressive, progressive with an EXIF thumbnail of its own.
    ordinary = many_scans_jpeg(64, 0)
    assert 1 < jpeg_scans(ordinary, 10**6) <= 12
    assert decode_image(ordinary, policy).size == (64, 64)
    thumb = io.BytesIO()
    Image.new("RGB", (8, 8)).save(thumb, "JPEG")
    buf = io.BytesIO()
    exif = Image.Exif()
    Image.new("RGB", (64, 48), (9, 99, 199)).save(buf, "JPEG", exif=exif.tobytes() + thumb.getvalue())
    assert decode_image(buf.getvalue(), policy).size == (64, 48)


def _parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, compression="zstd", row_group_size=row_group_size)
    return path


def test_a_parquet_cell_over_the_image_cap_is_refused_from_the_footer(local) -> None:
    """16 KB of zstd held a 500 MB cell: decoded whole before the cap refused it (worker RSS +1.6 GB, kept)."""
    import pyarrow as pa

    settings, policy, root = local
    small = settings.model_copy(update={"max_image_bytes": 1 << 20})
    path = _parquet(root / "cell.parquet", {"image": [b"\0" * (64 << 20)]})
    assert path.stat().st_size < 64 * 1024
    before = pa.total_allocated_bytes()
    pool_peak = pa.default_memory_pool().max_memory()
    members = _read(ContainerSpec(kind="parquet", ref=str(path), column="image", part=0), small, policy)
    assert [m.key for m in members] == [UNREAD]
    error = members[0].blob.error
    assert type(error).__name__ == "TooLarge" and "uncompressed for 1 row(s)" in str(error), error
    assert pa.total_allocated_bytes() - before < 1 << 20
    assert pa.default_memory_pool().max_memory() - pool_peak < 8 << 20  # decoded: +64 MiB


def test_a_parquet_text_column_too_wide_for_the_extras_is_not_read(local) -> None:
    """A 400 MB text column beside a valid image: peak +2.5 GB. The column is left out, named, and never read from the
    file (counted: the bytes read stay far below its size); the image is read."""
    import os

    from media.containers import Bounded, _parquet_members

    settings, policy, root = local
    png = _png()
    essay = os.urandom(4 << 20).hex()  # 8 MiB of text, about 4 MiB on disk
    columns = {"image": [png, png], "caption": ["a red square", "b"], "essay": [essay, "y"]}
    path = _parquet(root / "wide.parquet", columns)
    assert path.stat().st_size > 3 << 20
    spec = ContainerSpec(kind="parquet", ref=str(path), column="image", part=0)
    assert [m.key for m in _read(spec, settings, policy)] == ["0", "1"]
    with open(path, "rb") as raw:
        counted = Bounded(raw, str(path), 1 << 30, time.monotonic() + 60)
        members = list(_parquet_members(spec, counted, settings.max_image_bytes, settings.chunk_size))
    assert [m.key for m in members] == ["0", "1"] and all(m.blob.data == png for m in members)
    assert members[0].blob.extra == {"caption": "a red square", "_omitted": ["essay"]}
    assert counted.count < 1 << 20, counted.count  # the footer, the image and caption columns


def test_parquet_row_groups_read_in_order_with_their_row_numbers_and_one_footer_parse(local) -> None:
    """Many row groups: each message re-parsed the footer and summed earlier groups (quadratic in the groups)."""
    from media import containers

    settings, policy, root = local
    png = _png()
    path = _parquet(root / "groups.parquet", {"image": [png] * 300, "n": list(range(300))}, row_group_size=1)
    keys = []
    for group in (0, 150, 299):
        spec = ContainerSpec(kind="parquet", ref=str(path), column="image", part=group)
        keys += [(m.key, m.blob.extra) for m in _read(spec, settings, policy)]
    with open(path, "rb") as a, open(path, "rb") as b:  # two messages of one file: one parse, kept
        first, second = containers._footer(str(path), a), containers._footer(str(path), b)
    assert first[0] is second[0] and first[1][150] == 150
    assert keys == [("0", {"n": 0}), ("150", {"n": 150}), ("299", {"n": 299})]


def test_the_omitted_column_list_is_capped_like_the_extras() -> None:
    """20,000 byte columns: a row's `_omitted` named every one (131 KB of Redis for one row, against a 4 KiB cap)."""
    row = {f"embedding_{i:05d}": b"\0" for i in range(20_000)}
    extra = clean_extra({"caption": "ok", **row})
    assert extra is not None and extra["caption"] == "ok"
    assert len(json.dumps(extra)) <= MAX_EXTRA_BYTES
    assert extra["_omitted"][-1].endswith("more") and extra["_omitted"][0] == "embedding_00000"


# --- through the session's worker -------------------------------------------------------------------


def test_lying_shards_and_parquet_cells_through_a_worker_end_named_and_leave_it_small(
    client, settings: Settings, session_root: Path, caption_worker
) -> None:
    """The shard whose header claims 1 TiB, the .tar.gz whose long-name header expands to 256 MiB and the Parquet
    file with a 64 MiB cell, in one job: each ends with a named row at once, the worker's peak memory stays put,
    the job finishes (it stayed `running` while a second worker took the shard again), and the worker keeps serving."""
    from tests.test_hostile import _high_water

    folder = session_root / f"liars-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "liar.tar").write_bytes(lying_tar())
    (folder / "longname.tar.gz").write_bytes(long_name_tgz(256 << 20))
    _parquet(folder / "cell.parquet", {"image": [b"\0" * (64 << 20)]})
    specs = [
        ContainerSpec(kind="tar", ref=str(folder / "liar.tar")),
        ContainerSpec(kind="tar", ref=str(folder / "longname.tar.gz")),
        ContainerSpec(kind="parquet", ref=str(folder / "cell.parquet"), column="image", part=0),
    ]
    # A good shard and Parquet file first: the worker's first container loads pyarrow and runs a batch.
    _parquet(folder / "good.parquet", {"image": [_png()]})
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w:gz") as tar:
        _member(tar, "g.png", _png())
    (folder / "good.tar.gz").write_bytes(good.getvalue())
    client.enqueue(
        [
            ContainerSpec(kind="tar", ref=str(folder / "good.tar.gz")),
            ContainerSpec(kind="parquet", ref=str(folder / "good.parquet"), column="image", part=0),
        ],
        job_id="job-good-containers",
    )
    assert client.wait("job-good-containers", timeout=120, on_tick=lambda _: None).ok == 2
    before = _high_water(caption_worker)
    client.enqueue(specs, job_id="job-liars")
    info = client.wait("job-liars", timeout=120, on_tick=lambda _: None)
    rows = {r["ref"].rsplit("/", 1)[-1]: (r["status"], r.get("error_class")) for r in client.results("job-liars")}
    assert rows == {
        "liar.tar#a": ("ok", None),
        "liar.tar#*": ("error", "decode_error"),
        "longname.tar.gz#*": ("error", "decode_error"),
        "cell.parquet#*": ("error", "too_large"),
    }, rows
    assert info.pending == 0
    assert _high_water(caption_worker) - before < 48 << 20  # unguarded: +512 MiB (long name), +128 MiB (cell)


def test_an_object_endpoint_that_lies_in_head_is_read_to_the_cap_on_the_wire(monkeypatch) -> None:
    """HEAD says 1,000 bytes; the GET streams 64 MiB, range or not. s3fs read the whole body (a 300 MB stream: 636 MB
    held for a 1,000-byte read)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from common.errors import TooLarge
    from media.objects import ObjectStore

    sent: list[int] = []

    class Liar(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _head(self, length: int) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.send_header("ETag", '"abc"')
            self.send_header("Last-Modified", "Mon, 07 Dec 2026 10:00:00 GMT")
            self.send_header("Content-Type", "image/png")
            self.end_headers()

        def do_HEAD(self) -> None:
            self._head(1000)

        def do_GET(self) -> None:
            self._head(64 << 20)
            block, n = b"\0" * (1 << 20), 0
            try:
                for _ in range(64):
                    self.wfile.write(block)
                    n += len(block)
            except OSError:
                pass
            sent.append(n)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "x" * 40),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    # Timeouts of their own: a filesystem of its own (they are kept per protocol and timeouts).
    store = ObjectStore(prefixes=("s3://liar/",), protocols=("s3",), max_bytes=1 << 20, connect_timeout_s=4.25)
    assert store.size("s3://liar/a.png") == 1000  # botocore's models loaded before the count starts
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match="over the limit of 1048576"):
            store.read("s3://liar/a.png")
        peak = tracemalloc.get_traced_memory()[1]
        with store.open("s3://liar/a.png") as fh:  # a container streamed from the store: each block read to its length
            assert len(fh.read()) == 1000
        peak = max(peak, tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
        server.shutdown()
        server.server_close()
    assert peak < 8 << 20, peak  # the whole body: +64 MiB
