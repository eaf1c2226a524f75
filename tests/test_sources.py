"""Source expansion: directories, globs and list files become image references, lazily and in a stable order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import SourceError
from producer.sources import expand


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.JPG", "a/2.png", "a/b/3.webp", "a/notes.txt", "a/b/data.bin", "a/4.tiff"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_directory_is_walked_recursively_sorted_and_filtered_by_image_type(tree: Path) -> None:
    got = list(expand(str(tree / "a")))
    assert got == [str(tree / "a" / n) for n in ("1.JPG", "2.png", "4.tiff", "b/3.webp")]


def test_glob_and_single_file(tree: Path) -> None:
    assert list(expand(str(tree / "a" / "*.png"))) == [str(tree / "a" / "2.png")]
    assert list(expand(str(tree / "a" / "**" / "*.webp"))) == [str(tree / "a" / "b" / "3.webp")]
    assert list(expand(str(tree / "a" / "b" / "3.webp"))) == [str(tree / "a" / "b" / "3.webp")]


def test_url_lists_in_every_format_resolve_relative_paths(tmp_path: Path) -> None:
    refs = ["https://example.org/x.jpg", "rel/y.png"]
    expected = ["https://example.org/x.jpg", str(tmp_path / "rel" / "y.png")]
    (tmp_path / "l.txt").write_text("# a comment\n" + "\n".join(refs) + "\n\n")
    (tmp_path / "l.csv").write_text("id,url\n1,https://example.org/x.jpg\n2,rel/y.png\n")
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps({"image": r, "n": 1}) for r in refs))
    pq.write_table(pa.table({"url": refs, "n": [1, 2]}), tmp_path / "l.parquet")
    for name in ("l.txt", "l.csv", "l.jsonl", "l.parquet"):
        assert list(expand(str(tmp_path / name))) == expected, name


def test_column_option_and_its_errors(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("a,b\nx.jpg,y.jpg\n")
    assert list(expand(str(tmp_path / "l.csv"), column="b")) == [str(tmp_path / "y.jpg")]
    with pytest.raises(SourceError, match="--column"):
        list(expand(str(tmp_path / "l.csv")))
    with pytest.raises(SourceError, match="no column 'c'"):
        list(expand(str(tmp_path / "l.csv"), column="c"))


def test_bad_sources_are_named_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "bad.parquet").write_text("nope")
    for arg, message in [
        (str(tmp_path / "missing"), "no such file"),
        (str(tmp_path / "*.nothing"), "matches no file"),
        (str(tmp_path / "bad.jsonl"), "not JSON"),
        (str(tmp_path / "bad.parquet"), "not a readable Parquet"),
    ]:
        with pytest.raises(SourceError, match=message):
            list(expand(arg))


def test_expansion_is_lazy(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("".join(f"https://example.org/{i}.jpg\n" for i in range(100_000)))
    it = expand(str(big))
    assert next(it) == "https://example.org/0.jpg"  # the first reference comes before the file is read through


def test_sniff_takes_images_without_an_image_extension(tmp_path: Path) -> None:
    import io

    from PIL import Image

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, fmt)
        return buf.getvalue()

    (tmp_path / "IMG_0001").write_bytes(encoded("JPEG"))
    (tmp_path / "photo.jpg_large").write_bytes(encoded("PNG"))
    (tmp_path / "anim").write_bytes(encoded("WEBP"))
    (tmp_path / "notes").write_text("not an image")
    (tmp_path / "a.png").write_bytes(b"named like one: taken either way, and fails later as decode_error")
    assert list(expand(str(tmp_path))) == [str(tmp_path / "a.png")]
    assert list(expand(str(tmp_path), sniff=True)) == [
        str(tmp_path / n) for n in ("IMG_0001", "a.png", "anim", "photo.jpg_large")
    ]


@pytest.mark.parametrize("name", ["l.txt", "l.csv", "l.jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_reference(tmp_path: Path, name: str) -> None:
    """Editors on Windows start UTF-8 files with a byte-order mark; it must not turn the first path into another."""
    body = {
        "l.txt": "a.jpg\nb.jpg\n",
        "l.csv": "path,n\na.jpg,1\nb.jpg,2\n",  # the mark would otherwise stick to the header: no column 'path'
        "l.jsonl": '{"path": "a.jpg"}\n{"path": "b.jpg"}\n',
    }[name]
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert list(expand(str(tmp_path / name))) == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


@pytest.mark.parametrize(
    ("column", "kind"),
    [
        (pa.array([1, 2]), "int64"),
        (pa.array([{"p": "a.jpg"}, {"p": "b.jpg"}]), "struct"),
        (pa.array([1.5, 2.5]), "double"),
        (pa.array([["a.jpg"], ["b.jpg"]]), "list"),
    ],
)
def test_a_parquet_column_that_is_not_text_is_one_line(tmp_path: Path, column: pa.Array, kind: str) -> None:
    pq.write_table(pa.table({"url": column}), tmp_path / "l.parquet")
    with pytest.raises(SourceError, match=rf"column 'url' holds {kind}.*, not text"):
        list(expand(str(tmp_path / "l.parquet")))


def test_parquet_text_columns_of_every_arrow_kind_are_read(tmp_path: Path) -> None:
    for kind, column in [
        ("large", pa.array(["a.jpg"], pa.large_string())),
        ("dictionary", pa.array(["a.jpg"]).dictionary_encode()),
    ]:
        pq.write_table(pa.table({"url": column}), tmp_path / f"{kind}.parquet")
        assert list(expand(str(tmp_path / f"{kind}.parquet"))) == [str(tmp_path / "a.jpg")], kind


def test_jsonl_values_that_are_not_text_are_named(tmp_path: Path) -> None:
    (tmp_path / "l.jsonl").write_text('{"path": "a.jpg"}\n{"path": null}\n{"path": 7}\n')
    refs = expand(str(tmp_path / "l.jsonl"))
    assert next(refs) == str(tmp_path / "a.jpg")  # a null is skipped like an empty line, never the path "None"
    with pytest.raises(SourceError, match=r"l.jsonl:3: 'path' is int, not text"):
        next(refs)


def test_a_list_line_holding_a_nul_is_kept_for_the_worker_to_name(tmp_path: Path) -> None:
    """No file can have a NUL in its path: the line stays a reference (the worker's row says invalid_input) and the
    lines around it are read, where resolving it used to raise ValueError out of the producer."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "l.txt").write_bytes(b"a.jpg\nsub/../bad\x00name.jpg\nb.jpg\n")
    assert list(expand(str(tmp_path / "l.txt"))) == [
        str(tmp_path / "a.jpg"),
        f"{tmp_path}/bad\x00name.jpg",
        str(tmp_path / "b.jpg"),
    ]
