"""Object storage through fsspec against a real S3 server (moto's, on 127.0.0.1): allowed prefixes, capped reads,
named errors without secrets, streamed listings at enqueue, exports uploaded whole."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from common.errors import ConfigError, FetchError, Forbidden, InvalidInput, TooLarge
from common.messages import GenParams, ItemResult, ItemStatus, Source, item_id
from common.settings import Settings
from exports import FORMATS, export_to_store, read_rows
from media.objects import ObjectStore
from tests.conftest import S3Server


def test_object_uris_are_checked_before_any_request() -> None:
    store = ObjectStore(("s3://photos/2024/",), ("s3", "gs"), 1024)
    assert Source.parse("s3://photos/2024/a.jpg").kind == "uri"
    assert Source.parse("https://example.org/a.jpg").kind == "url"
    cases = [
        ("s3://photos/2023/a.jpg", Forbidden, "outside the allowed prefixes"),
        ("s3://photos/2024x/a.jpg", Forbidden, "outside the allowed prefixes"),  # a prefix is a folder, not a stem
        ("s3://other/2024/a.jpg", Forbidden, "outside the allowed prefixes"),
        ("gs://photos/2024/a.jpg", Forbidden, "outside the allowed prefixes"),
        ("s3://photos/2024/../2023/a.jpg", InvalidInput, r"'\.' or '\.\.' segments"),
        ("s3://key:secret@photos/2024/a.jpg", InvalidInput, "not a bucket name"),
        ("simplecache::s3://photos/2024/a.jpg", InvalidInput, "not an object URI"),
        ("s3://photos/2024/a.jpg::x", InvalidInput, "chained"),
        ("file:///etc/passwd", Forbidden, "never read as an object"),
        ("ftp://photos/2024/a.jpg", Forbidden, "not an enabled object store"),
    ]
    for uri, error, message in cases:
        with pytest.raises(error, match=message):
            store.place(uri)
    with pytest.raises(Forbidden, match="object storage is off"):
        ObjectStore((), ("s3",), 1024).place("s3://photos/2024/a.jpg")
    # Prefixes are normalised once; credentials never belong in a setting.
    s = Settings(allowed_roots="/tmp,s3://photos/2024,gs://b")
    assert s.allowed_prefixes == ("s3://photos/2024/", "gs://b/") and [str(r) for r in s.allowed_roots] == ["/tmp"]
    with pytest.raises(ConfigError, match="not a bucket name"):
        Settings(allowed_roots="s3://AKIA:secret@photos/")
    with pytest.raises(ConfigError, match="cannot enable file"):
        Settings(object_store_protocols="s3,file")


def test_reads_are_capped_and_failures_are_named(s3: S3Server, bucket: str) -> None:
    fs = s3.fs()
    fs.pipe(f"{bucket}/in/small.jpg", b"x" * 100)
    fs.pipe(f"{bucket}/in/big.jpg", b"x" * 2000)
    fs.pipe(f"{bucket}/out/a.jpg", b"x")
    store = ObjectStore((f"s3://{bucket}/in",), ("s3",), 1024)
    assert store.read(f"s3://{bucket}/in/small.jpg") == b"x" * 100
    with pytest.raises(TooLarge, match="2000 bytes, over the limit of 1024"):
        store.read(f"s3://{bucket}/in/big.jpg")
    with pytest.raises(FetchError, match="no such object"):
        store.read(f"s3://{bucket}/in/missing.jpg")
    with pytest.raises(Forbidden):
        store.read(f"s3://{bucket}/out/a.jpg")  # it exists: the prefix, not the store, says no


def test_refused_credentials_are_a_fetch_error_that_holds_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    from media import objects
    from media.images import ImagePolicy, read_source
    from worker.service import error_row

    server = S3Server(refuse_all=True)  # every key is unknown to it
    try:
        secret = "Zr8pQ2vXw9Lm4Nc7Tb1Yk6Hd3Fs0Ja5Ge8Ru2Wq9"
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.setattr(objects, "_FILESYSTEMS", {})
        s3fs.S3FileSystem.clear_instance_cache()
        policy = ImagePolicy.from_settings(Settings(allowed_roots="s3://private/"))
        with pytest.raises(FetchError, match="the store refused access") as info:
            read_source(Source.parse("s3://private/cat.jpg"), policy)
        row = error_row({"id": "x", "ref": "s3://private/cat.jpg"}, info.value)
        assert row.error_class == "fetch_error" and row.transient is None
        assert secret not in (row.error or "") and "AKIAIOSFODNN7EXAMPLE" not in (row.error or "")
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_store_message_that_spells_out_credentials_reaches_no_row() -> None:
    """What botocore and signed URLs put in their messages (an access key id, a secret, a presigned query) is
    masked before the message becomes a row's error."""
    from media.objects import _error

    secret = "Zr8pQ2vXw9Lm4Nc7Tb1Yk6Hd3Fs0Ja5Ge8Ru2Wq9"
    message = (
        "An error occurred (SignatureDoesNotMatch) when calling the GetObject operation: The request signature we "
        f"calculated does not match. AWSAccessKeyId: AKIAIOSFODNN7EXAMPLE, secret {secret}, url "
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20261203&X-Amz-Signature=0f9a8b7c6d"
        "&X-Amz-Security-Token=FwoGZXIvYXdzEJr"
    )
    text = str(_error("s3://private/cat.jpg", PermissionError(message)))
    assert "SignatureDoesNotMatch" in text and "the store refused access" in text
    for leaked in (secret, "AKIAIOSFODNN7EXAMPLE", "0f9a8b7c6d", "FwoGZXIvYXdzEJr"):
        assert leaked not in text, leaked


def test_prefix_listing_is_paged_recursive_sorted_and_filtered(
    s3: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from media import objects
    from producer.sources import Containers, expand

    fs = s3.fs()
    names = [f"in/{d}/{i:02d}.{ext}" for d in ("a", "b") for i, ext in enumerate(("jpg", "PNG", "txt", "webp"))]
    for name in names:
        fs.pipe(f"{bucket}/{name}", b"x")
    fs.pipe(f"{bucket}/inside/other.jpg", b"x")  # shares the stem "in", not the folder
    pages: list[int] = []
    real = objects._s3_pages

    def counted(fs_, uri, page_size=1000):  # type: ignore[no-untyped-def]
        for page in real(fs_, uri, page_size=3):  # three keys a page: the listing takes several requests
            pages.append(len(page))
            yield page

    monkeypatch.setattr(objects, "_s3_pages", counted)
    store = ObjectStore((), ("s3",), 1024)
    got = list(expand(f"s3://{bucket}/in", containers=Containers(store=store)))
    want = [f"s3://{bucket}/{n}" for n in names if not n.endswith(".txt")]
    assert got == sorted(want)
    assert len(pages) == 3 and max(pages) <= 3


def test_enqueue_of_a_missing_bucket_or_prefix_is_one_line(s3: S3Server, bucket: str, settings: Settings) -> None:
    runner = CliRunner()
    env = {"CAPTIONER_REDIS_URL": settings.redis_url_str, "CAPTIONER_BROKER_URL": settings.broker_url_str}
    for uri, message in [
        (f"s3://no-such-{bucket}/x/", "bucket does not exist"),
        (f"s3://{bucket}/nothing/", "nothing"),
    ]:
        result = runner.invoke(cli, ["enqueue", uri], env=env)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def _rows(n: int, prefix: str) -> list[ItemResult]:
    params = GenParams(max_length=12)
    rows = []
    for i in range(n):
        ref = f"{prefix}{i:02d}.jpg"
        status = ItemStatus.OK if i % 3 else ItemStatus.ERROR
        ok = status is ItemStatus.OK
        rows.append(
            ItemResult(
                id=item_id(ref),
                ref=ref,
                status=status,
                params=params,
                model_version="v1",
                caption=f"caption {i}" if ok else None,
                error_class=None if ok else "decode_error",
                error=None if ok else "bad",
                extra={"n": i, "s": {"k": [i]}},
            )
        )
    return rows


def test_exports_to_s3_in_every_format_appear_whole_or_not_at_all(s3: S3Server, bucket: str, tmp_path) -> None:
    fs = s3.fs()
    for i in range(6):  # the images a webdataset export repacks from the store
        fs.pipe(f"{bucket}/img/{i:02d}.jpg", f"jpeg {i}".encode())
    rows = [r.model_dump(mode="json", exclude_none=True) for r in _rows(6, f"s3://{bucket}/img/")]
    store = ObjectStore((f"s3://{bucket}/img/",), ("s3",), 1 << 20)

    def remote(ref: str) -> bytes:
        return store.read(ref)

    for fmt in FORMATS:
        if fmt == "sidecar":
            with pytest.raises(ConfigError, match="beside local images"):
                export_to_store(rows, fmt, f"s3://{bucket}/out/x", store)
            continue
        target = f"s3://{bucket}/out/{fmt}/" if fmt == "webdataset" else f"s3://{bucket}/out/job.{fmt}"
        summary = export_to_store(rows, fmt, target, store, remote=remote, shard_size=2)
        assert summary.location == target
        if fmt in ("jsonl", "csv", "parquet"):
            local = tmp_path / f"back.{fmt}"
            fs.get(target.removeprefix("s3://"), str(local))
            back = list(read_rows(local, fmt))
            assert len(back) == 6 and sorted(r["id"] for r in back) == sorted(r["id"] for r in rows)
            extras = {r["id"]: r.get("extra") for r in back}
            want = {r["id"]: r["extra"] for r in rows}
            assert {k: json.loads(v) if isinstance(v, str) else v for k, v in extras.items()} == want
        if fmt == "webdataset":
            shards = sorted(fs.ls(target.removeprefix("s3://")))
            assert len(shards) == 2  # 4 captions, 2 a shard (the error rows are not samples)
            import io
            import tarfile

            members = {}
            for shard in shards:
                with tarfile.open(fileobj=io.BytesIO(fs.cat(shard))) as tar:
                    members.update({m.name: tar.extractfile(m).read() for m in tar})
            for r in (r for r in rows if r["status"] == "ok"):
                assert members[f"{r['id']}.jpg"] == f"jpeg {int(r['ref'][-6:-4])}".encode()
                assert members[f"{r['id']}.txt"] == r["caption"].encode()
    # An existing object is refused before any row is read; a failing export leaves nothing under its name.
    with pytest.raises(ConfigError, match="already exists"):
        export_to_store(rows, "jsonl", f"s3://{bucket}/out/job.jsonl", store)

    def failing():  # type: ignore[no-untyped-def]
        yield from rows[:3]
        raise RuntimeError("ledger went away mid-export")

    for fmt, target in [("jsonl", f"s3://{bucket}/fail/job.jsonl"), ("webdataset", f"s3://{bucket}/fail/shards/")]:
        with pytest.raises(RuntimeError, match="mid-export"):
            export_to_store(failing(), fmt, target, store, remote=remote, shard_size=1)
    assert not fs.exists(f"{bucket}/fail")
