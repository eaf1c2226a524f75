"""Exports: round trips with awkward captions, streaming without materialising rows, atomic files, sidecars,
and the dataset formats (imagefolder metadata.jsonl, WebDataset shards, kohya JSON)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import ConfigError
from common.messages import GenParams, ItemResult, ItemStatus
from exports import FLAT_COLUMNS, FORMATS, export_rows, flatten_row, read_rows, split_flags
from media.paths import LocalFiles

FILE_FORMATS = ("jsonl", "csv", "parquet")
AWKWARD = [
    'a dog, a cat, and "a mouse"',
    "two lines\nof caption",
    "windows\r\nline end",
    "café — 日本語のキャプション 🐈",
    "  leading and trailing spaces  ",
    "tab\tseparated, 'single' quotes; semicolons",
    '"',
    "=1+2 looks like a formula",
]


def _ok(i: int, caption: str, *, ref: str | None = None, prompt: str | None = None) -> dict[str, Any]:
    return ItemResult(
        id=f"{i:016x}",
        ref=ref or f"/data/images/img_{i:05d}.jpg",
        status=ItemStatus.OK,
        caption=caption,
        model_version="git-base@abc123",
        params=GenParams(max_length=40, num_beams=3, prompt=prompt),
        attempts=1 + i % 3,
        timings={"load": 1.25, "infer": 10.5},
        finished_at=1_700_000_000.123456 + i,
    ).model_dump(mode="json")


def _error(i: int, error_class: str, message: str, *, ref: str | None = None) -> dict[str, Any]:
    return ItemResult(
        id=f"{i:016x}",
        ref=ref or f"/data/images/broken_{i}.jpg",
        status=ItemStatus.ERROR,
        error_class=error_class,
        error=message,
        attempts=3,
        finished_at=1_700_000_500.5,
    ).model_dump(mode="json")


def awkward_rows() -> list[dict[str, Any]]:
    rows = [_ok(i, caption, prompt="a photo of" if i % 2 else None) for i, caption in enumerate(AWKWARD)]
    rows[0]["flags"] = ["truncated", "repetition"]  # quality flags (model.flags), an optional field
    rows[1]["flags"] = []
    rows[2]["flags"] = ["empty"]
    rows.append(_error(100, "decode_error", 'cannot identify image file, "broken.jpg"\nsecond line'))
    rows.append(_error(101, "fetch_error", "HTTP 404", ref='https://example.com/a,b.jpg?x=1&y="2"'))
    rows.append(_error(102, "too_large", "inline image is over 33554432 bytes", ref="b64:" + "ab" * 20))
    return rows


def _generated_rows(n: int, *, fail_at: int | None = None) -> Iterator[dict[str, Any]]:
    """Rows made on demand, so a test can tell whether the exporter holds them all."""
    for i in range(n):
        if fail_at is not None and i == fail_at:
            raise RuntimeError("source failed midway")
        yield {
            "id": f"{i:016x}",
            "ref": f"/data/archive/shard_{i // 1000:04d}/image_{i:08d}.jpg",
            "status": "ok",
            "caption": f"a photograph number {i} of a red circle, on a white background",
            "error_class": None,
            "error": None,
            "model_version": "git-base@abc123",
            "params": {"max_length": 50, "num_beams": 1, "prompt": None},
            "attempts": 1,
            "timings": {"load": 1.5, "infer": 12.25},
            "finished_at": 1_700_000_000.0 + i,
        }


# --- round trips ------------------------------------------------------------------------------


def test_formats_are_the_contract() -> None:
    assert FORMATS == ("jsonl", "csv", "parquet", "sidecar", "metadata", "webdataset", "kohya")


def test_jsonl_round_trips_full_rows(tmp_path: Path) -> None:
    rows = awkward_rows()
    out = tmp_path / "results.jsonl"
    summary = export_rows(iter(rows), "jsonl", out)
    assert (summary.rows_written, summary.files_written, summary.skipped, summary.path) == (len(rows), 1, 0, out)
    assert list(read_rows(out, "jsonl")) == rows
    text = out.read_text(encoding="utf-8")
    assert text.count("\n") == len(rows)  # embedded newlines are escaped, one row per line
    assert "日本語" in text and "\\u" not in text  # ensure_ascii off: unicode stays readable
    assert ", " not in text.splitlines()[-1].split('"error"')[0]  # compact separators


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_flat_formats_round_trip(tmp_path: Path, fmt: str) -> None:
    rows = awkward_rows()
    out = tmp_path / f"results.{fmt}"
    summary = export_rows(rows, fmt, out, batch_rows=3)  # several batches, the last one partial
    assert summary.rows_written == len(rows)
    back = list(read_rows(out, fmt))
    assert back == [flatten_row(r) for r in rows]
    assert back[0]["caption"] == AWKWARD[0] and back[1]["caption"] == "two lines\nof caption"
    assert back[2]["caption"] == "windows\r\nline end"
    error_row = back[len(AWKWARD)]
    assert error_row["caption"] is None and error_row["status"] == "error"
    assert error_row["max_length"] is None  # error rows carry no params
    assert isinstance(back[0]["max_length"], int) and isinstance(back[0]["finished_at"], float)
    assert back[1]["prompt"] == "a photo of" and back[0]["prompt"] is None
    assert [r["flags"] for r in back[:4]] == ["truncated,repetition", None, "empty", None]  # [] and absent: null
    assert [split_flags(r["flags"]) for r in back[:3]] == [["truncated", "repetition"], [], ["empty"]]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_files_without_flags_column_still_read(tmp_path: Path, fmt: str) -> None:
    rows = awkward_rows()
    old = [{k: v for k, v in flatten_row(r).items() if k != "flags"} for r in rows]
    out = tmp_path / f"old.{fmt}"
    if fmt == "csv":
        with open(out, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(old[0]))
            writer.writeheader()
            writer.writerows(old)
    else:
        pq.write_table(pa.Table.from_pylist(old), out)
    back = list(read_rows(out, fmt))
    assert all(r["flags"] is None for r in back)
    assert [{k: v for k, v in r.items() if k != "flags"} for r in back] == old


def test_csv_is_plain_csv_with_flat_header(tmp_path: Path) -> None:
    out = tmp_path / "results.csv"
    export_rows(awkward_rows(), "csv", out)
    with open(out, encoding="utf-8", newline="") as fh:
        records = list(csv.reader(fh))
    assert tuple(records[0]) == FLAT_COLUMNS
    assert len(records) == 1 + len(awkward_rows())
    assert all(len(r) == len(FLAT_COLUMNS) for r in records)
    assert records[1][FLAT_COLUMNS.index("caption")] == 'a dog, a cat, and "a mouse"'


def test_parquet_has_explicit_nullable_schema(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    export_rows(awkward_rows(), "parquet", out)
    schema = pq.read_schema(out)
    assert schema.names == list(FLAT_COLUMNS)
    assert schema.field("max_length").type == pa.int32()
    assert schema.field("attempts").type == pa.int32()
    assert schema.field("finished_at").type == pa.float64()
    assert schema.field("caption").type == pa.string()
    assert schema.field("flags").type == pa.string()
    assert all(f.nullable for f in schema)


def test_empty_parquet_keeps_schema(tmp_path: Path) -> None:
    out = tmp_path / "empty.parquet"
    assert export_rows(iter(()), "parquet", out).rows_written == 0
    assert pq.read_schema(out).names == list(FLAT_COLUMNS)
    assert list(read_rows(out, "parquet")) == []


def test_item_result_models_are_accepted(tmp_path: Path) -> None:
    model = ItemResult(id="x", ref="/a.jpg", status=ItemStatus.OK, caption="c", params=GenParams())
    out = tmp_path / "m.jsonl"
    export_rows([model], "jsonl", out)
    assert list(read_rows(out, "jsonl")) == [model.model_dump(mode="json")]


# --- stdout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("out", [None, "-", Path("-")])
def test_jsonl_to_stdout(capsys: pytest.CaptureFixture[str], out: Any) -> None:
    rows = awkward_rows()
    summary = export_rows(rows, "jsonl", out)
    assert (summary.rows_written, summary.files_written, summary.path) == (len(rows), 0, None)
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_csv_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    export_rows(awkward_rows(), "csv", "-")
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out, newline="")))
    # The formula-like caption is written as text (see the next test); the rest exactly as they are.
    assert [r["caption"] for r in records[: len(AWKWARD)]] == [*AWKWARD[:-1], "'" + AWKWARD[-1]]


FORMULAS = ['=HYPERLINK("http://evil.example","open me")', "+1+1", "-2+3", "@SUM(A1:A9)", "\t=1+1", "\r=1+1"]
# Text that is no formula, and quotes before a formula, which must come back as they were.
NOT_FORMULAS = ["a = b", "'plain quote", "''", "1-2", "'=already quoted", "''+double"]


def test_csv_cells_starting_like_a_formula_are_text_to_a_spreadsheet(tmp_path: Path) -> None:
    """Captions, prompts, references and error messages are untrusted text: a cell a spreadsheet would run as a
    formula gets a leading ' (OWASP's advice for CSV injection), and read_rows takes exactly that ' off again."""
    texts = FORMULAS + NOT_FORMULAS
    rows = [_ok(i, text, prompt=text, ref=text) for i, text in enumerate(texts)]
    rows += [_error(100 + i, "decode_error", text, ref=f"/e{i}") for i, text in enumerate(FORMULAS)]
    out = tmp_path / "untrusted.csv"
    export_rows(rows, "csv", out)
    with open(out, encoding="utf-8", newline="") as fh:
        records = list(csv.DictReader(fh))
    cells = [(r["caption"], r["prompt"], r["ref"]) for r in records[: len(texts)]]
    assert cells[: len(FORMULAS)] == [("'" + t,) * 3 for t in FORMULAS]
    quoted = ["a = b", "'plain quote", "''", "1-2", "''=already quoted", "'''+double"]
    assert cells[len(FORMULAS) :] == [(t,) * 3 for t in quoted]
    assert [r["error"] for r in records[len(texts) :]] == ["'" + t for t in FORMULAS]
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for r in records for cell in r.values())
    assert list(read_rows(out, "csv")) == [flatten_row(r) for r in rows]


def test_parquet_refuses_stdout() -> None:
    with pytest.raises(ConfigError, match="stdout"):
        export_rows(awkward_rows(), "parquet", None)


def test_unknown_format_and_bad_batch_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="jsonl, csv, parquet, sidecar"):
        export_rows([], "xlsx", tmp_path / "x.xlsx")
    with pytest.raises(ConfigError, match="batch_rows"):
        export_rows([], "parquet", tmp_path / "x.parquet", batch_rows=0)
    with pytest.raises(ConfigError, match="sidecar"):
        list(read_rows(tmp_path / "x", "sidecar"))


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_streams_50k_rows_without_holding_them(tmp_path: Path, fmt: str) -> None:
    n = 50_000
    out = tmp_path / f"big.{fmt}"
    one_row = len(json.dumps(next(_generated_rows(1))))
    data_bytes = n * one_row  # ~16 MB as JSON; several times more as Python dicts
    seen_on_disk: list[int] = []

    def rows() -> Iterator[dict[str, Any]]:
        for i, row in enumerate(_generated_rows(n)):
            if i == 40_000:
                # Bytes must already be on disk (in the temp file) while rows are still coming.
                seen_on_disk.extend(p.stat().st_size for p in tmp_path.glob(f".{out.name}.*.tmp"))
            yield row

    tracemalloc.start()
    try:
        summary = export_rows(rows(), fmt, out, batch_rows=1_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.rows_written == n
    assert seen_on_disk and seen_on_disk[0] > 0, "nothing written before the input ended"
    assert peak < data_bytes / 10, f"peak {peak:,} B for {data_bytes:,} B of rows: rows were held in memory"
    assert sum(1 for _ in read_rows(out, fmt)) == n
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# --- atomicity --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_failure_midway_leaves_nothing(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"partial.{fmt}"
    with pytest.raises(RuntimeError, match="midway"):
        export_rows(_generated_rows(50_000, fail_at=25_000), fmt, out, batch_rows=1_000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_failed_overwrite_keeps_the_old_file(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"results.{fmt}"
    export_rows(awkward_rows(), fmt, out)
    before = out.read_bytes()
    with pytest.raises(RuntimeError):
        export_rows(_generated_rows(5_000, fail_at=4_000), fmt, out, overwrite=True, batch_rows=1_000)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_existing_file_is_refused_before_reading_rows(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text("keep me\n")
    pulled: list[int] = []

    def rows() -> Iterator[dict[str, Any]]:
        pulled.append(1)
        yield from awkward_rows()

    with pytest.raises(ConfigError, match="overwrite"):
        export_rows(rows(), "jsonl", out)
    assert pulled == [] and out.read_text() == "keep me\n"
    export_rows(rows(), "jsonl", out, overwrite=True)
    assert len(list(read_rows(out, "jsonl"))) == len(awkward_rows())


def test_missing_output_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        export_rows(awkward_rows(), "csv", tmp_path / "nope" / "out.csv")
    with pytest.raises(ConfigError, match="directory"):
        export_rows(awkward_rows(), "csv", tmp_path)


# --- sidecars ---------------------------------------------------------------------------------


def _local(root: Path) -> LocalFiles:
    """The workers' rules for files under ``root`` (what `captioner export` builds from CAPTIONER_ALLOWED_ROOTS)."""
    return LocalFiles.under([root], 1 << 20)


def _image(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(b"not really an image; sidecars never open it")
    return path


def test_sidecars_skip_existing_then_overwrite(tmp_path: Path) -> None:
    a, b, c = _image(tmp_path, "a.jpg"), _image(tmp_path, "b.photo.png"), _image(tmp_path, "c.jpg")
    broken = _image(tmp_path, "d.jpg")
    (tmp_path / "c.txt").write_text("hand-written caption\n")
    rows = [
        _ok(1, 'a cat, "quoted"\nand unicode ✓', ref=str(a)),
        _ok(2, "second", ref=str(b)),
        _ok(3, "machine caption", ref=str(c)),
        _error(4, "decode_error", "corrupt", ref=str(broken)),
        _ok(5, "remote", ref="https://example.com/e.jpg"),
        _ok(6, "inline", ref="b64:" + "0" * 40),
        _ok(7, "gone", ref=str(tmp_path / "missing.jpg")),
    ]

    summary = export_rows(rows, "sidecar", None, local=_local(tmp_path))
    assert (summary.rows_written, summary.files_written, summary.skipped, summary.path) == (2, 2, 5, None)
    assert summary.skipped_by_reason == {"exists": 1, "not_ok": 1, "not_local": 2, "missing_image": 1}
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == 'a cat, "quoted"\nand unicode ✓\n'
    assert (tmp_path / "b.photo.txt").read_text() == "second\n"
    assert (tmp_path / "c.txt").read_text() == "hand-written caption\n"
    assert not (tmp_path / "d.txt").exists()

    again = export_rows(rows, "sidecar", tmp_path / "ignored.jsonl", overwrite=True, local=_local(tmp_path))
    assert (again.files_written, again.skipped_by_reason.get("exists", 0)) == (3, 0)
    assert (tmp_path / "c.txt").read_text() == "machine caption\n"
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "ignored.jsonl").exists()


def test_sidecar_extension_and_self_clash(tmp_path: Path) -> None:
    img = _image(tmp_path, "scan.jpg")
    notes = _image(tmp_path, "notes.txt")
    summary = export_rows(
        [_ok(1, "x", ref=str(img)), _ok(2, "y", ref=str(notes))],
        "sidecar",
        None,
        sidecar_ext=".txt",
        local=_local(tmp_path),
    )
    assert summary.skipped_by_reason == {"name_clash": 1}
    assert notes.read_bytes().startswith(b"not really")  # the input was not replaced by its own caption
    export_rows([_ok(1, "x", ref=str(img))], "sidecar", None, sidecar_ext=".caption", local=_local(tmp_path))
    assert (tmp_path / "scan.caption").read_text() == "x\n"
    for bad in ("txt", ".", "../x", "./a/b"):
        with pytest.raises(ConfigError, match="sidecar extension"):
            export_rows([], "sidecar", None, sidecar_ext=bad, local=_local(tmp_path))


# --- dataset formats: imagefolder metadata.jsonl, WebDataset shards, kohya JSON ---------------------------


def _dataset(tmp_path: Path) -> tuple[Path, list[dict[str, Any]], dict[str, Path]]:
    """A dataset folder with images (one in a subfolder), one image outside it, and rows of every kind."""
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    images = {
        "a": root / "a.jpg",
        "b": root / "sub" / "b photo.PNG",
        "c": root / "c.jpeg",
        "out": tmp_path / "elsewhere" / "d.jpg",
    }
    for name, path in images.items():
        path.write_bytes(f"image bytes of {name}".encode() * 10)
    rows = [
        _ok(1, 'a cat, "quoted"\nand unicode ✓', ref=str(images["a"])),
        _ok(2, "a dog in a subfolder", ref=str(images["b"])),
        _ok(3, "a red red red circle", ref=str(images["c"])),
        _ok(4, "an image outside the folder", ref=str(images["out"])),
        _error(5, "decode_error", "corrupt", ref=str(root / "broken.jpg")),
        _ok(6, "remote", ref="https://example.com/e.jpg"),
        _ok(7, "inline", ref="b64:" + "0" * 40),
    ]
    rows[2]["flags"] = ["repetition"]
    return root, rows, images


def test_metadata_jsonl_names_resolve_to_the_images(tmp_path: Path) -> None:
    root, rows, images = _dataset(tmp_path)
    out = root / "metadata.jsonl"
    summary = export_rows(iter(rows), "metadata", out)
    assert (summary.rows_written, summary.files_written, summary.path) == (4, 1, out)
    assert summary.skipped_by_reason == {"not_ok": 1, "not_local": 2}
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["file_name"] for r in records] == ["a.jpg", "sub/b photo.PNG", "c.jpeg", str(images["out"])]
    assert [r["text"] for r in records] == [r["caption"] for r in rows[:4]]
    assert all(set(r) == {"file_name", "text"} for r in records)
    for record, name in zip(records, ["a", "b", "c", "out"], strict=True):
        resolved = out.parent / record["file_name"]  # relative to the metadata file's folder, or absolute
        assert resolved.is_file() and resolved.samefile(images[name])


def test_metadata_into_a_folder_skips_flagged_and_refuses_overwrite(tmp_path: Path) -> None:
    root, rows, _ = _dataset(tmp_path)
    summary = export_rows(rows, "metadata", root, exclude_flags=["repetition", "truncated"])
    assert summary.path == root / "metadata.jsonl"
    assert summary.rows_written == 3 and summary.skipped_by_reason["flagged"] == 1
    names = [r["file_name"] for r in read_rows(root / "metadata.jsonl", "jsonl")]
    assert names == ["a.jpg", "sub/b photo.PNG", str(tmp_path / "elsewhere" / "d.jpg")]
    with pytest.raises(ConfigError, match="overwrite"):
        export_rows(rows, "metadata", root)


def test_metadata_to_stdout_uses_absolute_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, rows, images = _dataset(tmp_path)
    export_rows(rows, "metadata", "-")
    names = [json.loads(line)["file_name"] for line in capsys.readouterr().out.splitlines()]
    assert names == [str(images[k]) for k in ("a", "b", "c", "out")]


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_webdataset_shards_hold_image_caption_and_row(tmp_path: Path) -> None:
    root, rows, images = _dataset(tmp_path)
    (root / "missing.jpg").touch()
    rows.append(_ok(8, "gone", ref=str(root / "gone.jpg")))
    out = tmp_path / "shards"
    summary = export_rows(iter(rows), "webdataset", out, shard_size=3, local=_local(tmp_path))
    assert (summary.rows_written, summary.files_written, summary.path) == (4, 2, out)
    assert summary.skipped_by_reason == {"not_ok": 1, "not_local": 2, "missing_image": 1}
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    first, second = _members(out / "shard-000000.tar"), _members(out / "shard-000001.tar")
    keys = [r["id"] for r in rows[:4]]
    exts = ["jpg", "png", "jpeg", "jpg"]
    assert sorted(first) == sorted(f"{k}.{e}" for k, e in zip(keys[:3], exts, strict=False) for e in (e, "txt", "json"))
    assert sorted(second) == sorted(f"{keys[3]}.{e}" for e in ("jpg", "txt", "json"))
    for row, ext, name in zip(rows[:4], exts, ["a", "b", "c", "out"], strict=True):
        members = first if f"{row['id']}.txt" in first else second
        assert members[f"{row['id']}.{ext}"] == images[name].read_bytes()
        assert members[f"{row['id']}.txt"].decode() == row["caption"]
        assert json.loads(members[f"{row['id']}.json"]) == row
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    # A sample's members sit next to each other, as WebDataset's grouping by key needs.
    assert [n.split(".")[0] for n in names] == [k for k in keys[:3] for _ in range(3)]


def test_webdataset_pattern_overwrite_and_stale_shards(tmp_path: Path) -> None:
    _, rows, _ = _dataset(tmp_path)
    pattern = tmp_path / "train-%03d.tar"
    assert export_rows(rows, "webdataset", pattern, shard_size=1, local=_local(tmp_path)).files_written == 4
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == [f"train-{i:03d}.tar" for i in range(4)]
    with pytest.raises(ConfigError, match="overwrite"):
        export_rows(rows, "webdataset", pattern, shard_size=1, local=_local(tmp_path))
    # Overwriting with fewer shards removes the higher-numbered ones the first export left.
    summary = export_rows(
        rows, "webdataset", pattern, shard_size=3, overwrite=True, exclude_flags=["repetition"], local=_local(tmp_path)
    )
    assert (summary.rows_written, summary.files_written) == (3, 1)
    assert [p.name for p in tmp_path.glob("train-*.tar")] == ["train-000.tar"]
    assert len(_members(tmp_path / "train-000.tar")) == 9
    assert not list(tmp_path.glob(".*.tmp"))


def test_webdataset_failure_midway_leaves_no_shards(tmp_path: Path) -> None:
    image = _image(tmp_path, "x.jpg")

    def rows() -> Iterator[dict[str, Any]]:
        for i in range(50):
            if i == 30:
                raise RuntimeError("source failed midway")
            yield _ok(i, f"caption {i}", ref=str(image))

    out = tmp_path / "shards"
    with pytest.raises(RuntimeError, match="midway"):
        export_rows(rows(), "webdataset", out, shard_size=10, local=_local(tmp_path))
    assert list(out.iterdir()) == []  # three complete shards were written, none moved into place


def test_webdataset_refuses_bad_targets(tmp_path: Path) -> None:
    for bad in (None, "-", tmp_path / "one.tar", tmp_path / "no-field%.tar", tmp_path / "x%s%s.tar"):
        with pytest.raises(ConfigError):
            export_rows([], "webdataset", bad, local=_local(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export_rows([], "webdataset", tmp_path / "file", local=_local(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        export_rows([], "webdataset", tmp_path / "nope" / "deeper", local=_local(tmp_path))
    with pytest.raises(ConfigError, match="shard_size"):
        export_rows([], "webdataset", tmp_path / "shards", shard_size=0, local=_local(tmp_path))


def test_kohya_json_maps_paths_to_captions(tmp_path: Path) -> None:
    _, rows, images = _dataset(tmp_path)
    out = tmp_path / "meta_cap.json"
    summary = export_rows(iter(rows), "kohya", out)
    assert (summary.rows_written, summary.skipped) == (4, 3)
    with open(out, encoding="utf-8") as fh:
        loaded = json.load(fh)
    paths = [str(images[k]) for k in ("a", "b", "c", "out")]
    assert loaded == {path: {"caption": row["caption"]} for path, row in zip(paths, rows, strict=False)}
    assert list(loaded) == paths

    empty = tmp_path / "empty.json"
    export_rows(iter(()), "kohya", empty)
    assert json.loads(empty.read_text()) == {}


@pytest.mark.parametrize("fmt", ["metadata", "kohya", "webdataset"])
def test_dataset_formats_stream(tmp_path: Path, fmt: str) -> None:
    image = _image(tmp_path, "x.jpg")
    out = tmp_path / ("shards" if fmt == "webdataset" else f"out.{fmt}")
    seen_on_disk: list[int] = []

    def rows() -> Iterator[dict[str, Any]]:
        for i in range(3_000):
            if i == 2_500:
                temps = (out if fmt == "webdataset" else tmp_path).glob(".*.tmp")
                seen_on_disk.extend(p.stat().st_size for p in temps)
            yield _ok(i, f"caption number {i}", ref=str(image))

    summary = export_rows(rows(), fmt, out, shard_size=1_000, local=_local(tmp_path))
    assert summary.rows_written == 3_000
    assert seen_on_disk and max(seen_on_disk) > 0, "nothing written before the input ended"
    assert not [p for p in tmp_path.rglob(".*.tmp")]
    if fmt == "webdataset":
        assert summary.files_written == 3 and sum(len(_members(p)) for p in out.iterdir()) == 9_000


def test_exclude_flags_applies_to_sidecars(tmp_path: Path) -> None:
    a, b = _image(tmp_path, "a.jpg"), _image(tmp_path, "b.jpg")
    rows = [_ok(1, "fine", ref=str(a)), {**_ok(2, "cut off at the", ref=str(b)), "flags": "truncated"}]
    summary = export_rows(rows, "sidecar", None, exclude_flags={"truncated"}, local=_local(tmp_path))
    assert (summary.files_written, summary.skipped_by_reason) == (1, {"flagged": 1})
    assert (tmp_path / "a.txt").exists() and not (tmp_path / "b.txt").exists()


# --- files are checked when they are used, by the workers' rules --------------------------------


def _swapped(tmp_path: Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Images captioned under the root, whose folder has since become a symlink to a folder outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "photos").mkdir(parents=True)
    outside.mkdir()
    rows = [_ok(i, f"caption {i}", ref=str(_image(root / "photos", f"p{i}.jpg"))) for i in range(2)]
    (root / "photos").rename(root / "photos-then")
    (outside / "p0.jpg").write_bytes(b"a file outside the allowed roots")
    (outside / "p1.jpg").write_bytes(b"another")
    (root / "photos").symlink_to(outside)
    return root, outside, rows


def test_sidecars_are_not_written_through_a_folder_swapped_for_a_symlink(tmp_path: Path) -> None:
    root, outside, rows = _swapped(tmp_path)
    summary = export_rows(rows, "sidecar", None, local=_local(root))
    assert (summary.files_written, summary.skipped_by_reason) == (0, {"forbidden": 2})
    assert sorted(p.name for p in outside.iterdir()) == ["p0.jpg", "p1.jpg"]  # nothing written outside


def test_webdataset_does_not_pack_what_a_swapped_link_points_at(tmp_path: Path) -> None:
    root, outside, rows = _swapped(tmp_path)
    (root / "secret-link.jpg").symlink_to(outside / "p0.jpg")  # a file link leading out, inside the root
    rows.append(_ok(9, "a link", ref=str(root / "secret-link.jpg")))
    inside = _image(root, "fine.jpg")
    rows.append(_ok(10, "a real image", ref=str(inside)))
    summary = export_rows(rows, "webdataset", tmp_path / "shards", local=_local(root))
    assert (summary.rows_written, summary.skipped_by_reason) == (1, {"forbidden": 3})
    (shard,) = (tmp_path / "shards").iterdir()
    packed = _members(shard)
    assert packed[f"{rows[-1]['id']}.jpg"] == inside.read_bytes()
    assert not any(b"outside the allowed roots" in data for data in packed.values())


def test_a_symlink_where_the_sidecar_goes_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "root").mkdir()
    image = _image(tmp_path / "root", "a.jpg")
    (tmp_path / "root" / "a.txt").symlink_to(victim)
    rows = [_ok(1, "the caption", ref=str(image))]
    assert export_rows(rows, "sidecar", None, local=_local(tmp_path / "root")).skipped_by_reason == {"exists": 1}
    summary = export_rows(rows, "sidecar", None, overwrite=True, local=_local(tmp_path / "root"))
    assert summary.files_written == 1 and victim.read_text() == "precious\n"
    sidecar = tmp_path / "root" / "a.txt"
    assert not sidecar.is_symlink() and sidecar.read_text() == "the caption\n"


def test_files_outside_the_roots_and_special_files_are_forbidden(tmp_path: Path) -> None:
    import os

    (tmp_path / "root").mkdir()
    os.mkfifo(tmp_path / "root" / "pipe.jpg")
    elsewhere = _image(tmp_path, "elsewhere.jpg")
    rows = [_ok(1, "a fifo", ref=str(tmp_path / "root" / "pipe.jpg")), _ok(2, "outside", ref=str(elsewhere))]
    for fmt, out in (("sidecar", None), ("webdataset", tmp_path / "shards")):
        summary = export_rows(rows, fmt, out, local=_local(tmp_path / "root"))
        assert summary.skipped_by_reason == {"forbidden": 2}, fmt
    assert not (tmp_path / "elsewhere.txt").exists()


def test_file_formats_need_the_allowed_roots(tmp_path: Path) -> None:
    image = _image(tmp_path, "a.jpg")
    for fmt, out in (("sidecar", None), ("webdataset", tmp_path / "shards")):
        for local in (None, LocalFiles.under([], 1 << 20)):
            with pytest.raises(ConfigError, match="CAPTIONER_ALLOWED_ROOTS"):
                export_rows([_ok(1, "x", ref=str(image))], fmt, out, local=local)
    assert not (tmp_path / "a.txt").exists()


def test_members_set_aside_on_disk_come_back_grouped_by_container(tmp_path: Path) -> None:
    from exports.webdataset import MemberRows

    held = MemberRows(tmp_path, limit=3)
    for i in range(10):
        held.add(f"s{i % 3}.tar", f"k{i}", {"id": str(i)})
    held.add("s0.tar", "k0", {"id": "again"})  # a key twice: its first row is the one packed
    assert len(held.files) == 3  # spilled to disk past the limit
    got = {container: {key: row["id"] for key, row in rows.items()} for container, rows in held.by_container()}
    assert got == {
        "s0.tar": {"k0": "0", "k3": "3", "k6": "6", "k9": "9"},
        "s1.tar": {"k1": "1", "k4": "4", "k7": "7"},
        "s2.tar": {"k2": "2", "k5": "5", "k8": "8"},
    }


@pytest.mark.parametrize(
    ("ref", "member"),
    [
        ("/data/a.tar#k1", ("/data/a.tar", "k1")),
        ("s3://b/x/shard.tar.gz#dir/k", ("s3://b/x/shard.tar.gz", "dir/k")),
        ("https://h/p.parquet#12", ("https://h/p.parquet", "12")),
        ("hf:user/set/train#7", ("hf:user/set/train", "7")),
        ("/data/photo#1.jpg", None),
        ("/data/a.tar", None),
    ],
)
def test_container_member_refs_are_told_from_files(ref: str, member: tuple[str, str] | None) -> None:
    from exports import container_member

    assert container_member(ref) == member


# --- outputs that are not regular files, names that are not paths -----------------------------


def _not_regular_outputs(tmp_path: Path) -> dict[str, Path]:
    """A symlink to a file, a dangling symlink, a FIFO, and (where this process may make one) a character device."""
    import os
    import stat

    (tmp_path / "target.jsonl").write_text("kept\n")
    found = {"symlink": tmp_path / "link.jsonl", "dangling": tmp_path / "dangling.jsonl", "fifo": tmp_path / "fifo"}
    found["symlink"].symlink_to(tmp_path / "target.jsonl")
    found["dangling"].symlink_to(tmp_path / "nowhere.jsonl")
    os.mkfifo(found["fifo"])
    try:
        os.mknod(tmp_path / "full", stat.S_IFCHR | 0o666, os.makedev(1, 7))  # what /dev/full is
        found["device"] = tmp_path / "full"
    except PermissionError:
        pass  # not root: the symlinks and the FIFO stand for the class
    return found


def _kind(path: Path) -> tuple[int, str | None]:
    import os
    import stat

    mode = os.lstat(path).st_mode
    return stat.S_IFMT(mode), os.readlink(path) if stat.S_ISLNK(mode) else None


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "kohya"])
def test_an_output_that_is_not_a_regular_file_is_refused_never_replaced(tmp_path: Path, fmt: str) -> None:
    outputs = _not_regular_outputs(tmp_path)
    for what, out in outputs.items():
        before = _kind(out)
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=r"symbolic link|not a regular file") as err:
                export_rows(awkward_rows(), fmt, out, overwrite=overwrite)
            assert "overwrite" not in str(err.value), (what, overwrite)  # --overwrite would not help
            assert _kind(out) == before, (what, overwrite)
    assert (tmp_path / "target.jsonl").read_text() == "kept\n"
    assert not (tmp_path / "nowhere.jsonl").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_dev_stdout_is_not_an_output_file_and_overwrite_is_not_suggested(tmp_path: Path) -> None:
    # Only ever without overwrite here: a wrong implementation must not get the chance to replace it.
    with pytest.raises(ConfigError, match="'-' for stdout") as err:
        export_rows(awkward_rows(), "jsonl", Path("/dev/stdout"))
    assert "overwrite" not in str(err.value)


def test_a_shard_that_is_not_a_regular_file_is_refused_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    rows = [_ok(1, "one", ref=str(_image(tmp_path / "root", "a.jpg")))]
    shards = tmp_path / "shards"
    shards.mkdir()
    (tmp_path / "elsewhere.tar").write_bytes(b"kept")
    (shards / "shard-000000.tar").symlink_to(tmp_path / "elsewhere.tar")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="symbolic link"):
            export_rows(rows, "webdataset", shards, overwrite=overwrite, local=_local(tmp_path / "root"))
    assert (shards / "shard-000000.tar").is_symlink() and (tmp_path / "elsewhere.tar").read_bytes() == b"kept"
    # A stale higher-numbered shard that is a link is left alone when an overwrite clears older shards.
    (shards / "shard-000000.tar").unlink()
    (shards / "shard-000001.tar").symlink_to(tmp_path / "elsewhere.tar")
    export_rows(rows, "webdataset", shards, overwrite=True, local=_local(tmp_path / "root"))
    assert (shards / "shard-000001.tar").is_symlink() and (tmp_path / "elsewhere.tar").read_bytes() == b"kept"


def test_container_members_are_not_file_names_in_formats_that_name_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "deep" / "shards").mkdir(parents=True)
    escape = f"{root}/deep/shards/s.tar#a/../../b"  # as a path: <root>/deep/b, a file the shard never held
    refs = [escape, f"{root}/t.parquet#12", f"{root}/a.arrow#3", "hf:user/set/train#7"]
    rows = [_ok(i, f"member {i}", ref=ref) for i, ref in enumerate(refs)]
    rows.append(_ok(9, "a file", ref=str(_image(root, "real.jpg"))))
    metadata = export_rows(rows, "metadata", root / "metadata.jsonl")
    kohya = export_rows(rows, "kohya", tmp_path / "k.json")
    sidecar = export_rows(rows, "sidecar", None, local=_local(root))
    for summary in (metadata, kohya, sidecar):
        assert (summary.rows_written, summary.skipped_by_reason) == (1, {"container_member": 4})
    names = [json.loads(line)["file_name"] for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert names == ["real.jpg"]
    assert list(json.loads((tmp_path / "k.json").read_text())) == [str(root / "real.jpg")]
