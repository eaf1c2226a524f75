"""Captioned-image datasets as plain lists: imagefolder directories, JSONL/CSV manifests, hub datasets (optional).

Every loader yields ``Example(image, captions)``: ``image`` is an absolute local path or an http(s) URL, and
rows naming the same image are merged, so one image with five captions is one example (splits never put the
same image on both sides).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError, SourceError

log = logging.getLogger(__name__)

#: Metadata file names an imagefolder may hold, in the order they are looked for (as 🤗 datasets does).
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
MANIFEST_SUFFIXES = (".jsonl", ".csv")
#: Column names tried, in order, when the caller names none.
IMAGE_COLUMNS = ("file_name", "image", "image_path", "path", "filepath", "url", "image_url")
TEXT_COLUMNS = ("text", "caption", "captions", "sentences", "texts")
_URL = re.compile(r"^https?://", re.IGNORECASE)
#: The file ``Dataset.save_to_disk`` writes beside its arrow files: a folder with it is a saved dataset.
SAVED_DATASET = "dataset_info.json"
#: Image files a kohya folder may hold beside their same-stem ``.txt`` captions.
KOHYA_IMAGES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Example:
    """One image and every caption given for it."""

    image: str
    captions: list[str] = field(default_factory=list)


# --- loading ---------------------------------------------------------------------------------------


def load_examples(
    spec: str, *, column: str | None = None, text_column: str | None = None, download: bool = False
) -> list[Example]:
    """Examples from an imagefolder directory (metadata file) or a kohya folder (``x.png`` + ``x.txt``), a
    ``.jsonl``/``.csv`` manifest, and through 🤗 ``datasets`` a ``.parquet`` file, a ``save_to_disk`` folder or a
    hub id (streamed unless ``download``).

    ``column`` names the image column (default: the first of ``IMAGE_COLUMNS`` present), ``text_column`` the
    caption column (default: the first of ``TEXT_COLUMNS``); a caption cell may hold a list of captions.
    """
    path = Path(spec).expanduser()
    if path.is_dir() and (path / SAVED_DATASET).is_file():
        return _load_with_datasets(str(path), column, text_column, lambda ds: ds.load_from_disk(str(path)))
    if path.is_dir():
        return _load_imagefolder(Path(os.path.abspath(path)), column, text_column)
    if path.is_file() and path.suffix.lower() == ".parquet":
        resolved = str(Path(os.path.abspath(path)))
        return _load_with_datasets(
            resolved,
            column,
            text_column,
            lambda ds: ds.load_dataset("parquet", data_files=resolved, split="train", streaming=True),
        )
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise SourceError(f"{spec}: a manifest must be .jsonl, .csv or .parquet (image + caption per row)")
        resolved = Path(os.path.abspath(path))
        rows = _read_table(resolved)
        return _to_examples(rows, resolved.parent, column, text_column, where=str(resolved), contain=False)
    if _looks_like_path(spec):
        raise SourceError(f"{spec}: no such file or directory (give an imagefolder dir, a manifest, or a hub id)")
    return _load_with_datasets(spec, column, text_column, lambda ds: _hub_split(ds, spec, download))


def check_columns(spec: str, *, column: str | None = None, text_column: str | None = None) -> None:
    """Name a missing image or text column now (the producer, before anything is queued); local data only: a hub
    dataset's columns are checked by the training worker that reads it."""
    path = Path(spec).expanduser()
    if not path.exists():
        return
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        rows = _read_table(path)
        names = list(rows[0]) if rows else []
    elif (path.is_dir() and (path / SAVED_DATASET).is_file()) or path.suffix.lower() == ".parquet":
        names = _dataset_columns(path)
        if names is None:
            return
    elif path.is_dir():
        metas = [m for name in METADATA_NAMES for m in sorted(path.rglob(name))]
        if not metas:
            if column or text_column:
                raise ConfigError(
                    f"{spec} is a folder of images with .txt captions (kohya); it has no columns to "
                    "name with --column / --text-column"
                )
            return
        rows = _read_table(metas[0])
        names = list(rows[0]) if rows else []
    else:
        return
    if names:
        _pick(names, column, IMAGE_COLUMNS, "image", spec)
        _pick(names, text_column, TEXT_COLUMNS, "text", spec)


def _dataset_columns(path: Path) -> list[str] | None:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    try:
        info = json.loads((path / SAVED_DATASET).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return list((info.get("features") or {}).keys()) or None


def _looks_like_path(spec: str) -> bool:
    # "org/name" or "name" may be a hub id; anything more path-like that does not exist is a typo.
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or "\\" in spec
        or spec.lower().endswith((*MANIFEST_SUFFIXES, ".parquet", ".json"))
    )


def _load_imagefolder(root: Path, column: str | None, text_column: str | None) -> list[Example]:
    """Every metadata file under ``root``; its ``file_name`` entries are relative to the metadata file's folder
    (or absolute)."""
    found: dict[Path, Path] = {}
    for name in METADATA_NAMES:
        for meta in sorted(root.rglob(name)):
            if meta.parent in found:
                raise SourceError(
                    f"{meta.parent} has both {found[meta.parent].name} and {meta.name}; keep one metadata file"
                )
            found[meta.parent] = meta
    if not found:
        kohya = _load_kohya(root)
        if kohya:
            return kohya
        raise SourceError(
            f"{root} has no {' / '.join(METADATA_NAMES)} (file_name + text columns) and no images "
            "with same-stem .txt captions (kohya) to read captions from"
        )
    examples: list[Example] = []
    for folder in sorted(found):
        rows = _read_table(found[folder])
        examples.extend(_to_examples(rows, folder, column, text_column, where=str(found[folder]), contain=True))
    return _merge(examples)


def _load_kohya(root: Path) -> list[Example]:
    """Images with a same-stem ``.txt`` beside them (the kohya layout); a caption file may hold several lines,
    one caption each. Images without a caption file are left out."""
    examples = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in KOHYA_IMAGES and p.is_file()):
        text = image.with_suffix(".txt")
        if text.is_file():
            captions = [line.strip() for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
            if captions:
                examples.append(Example(image=str(image), captions=captions))
    return examples


def _read_table(file: Path) -> list[dict[str, Any]]:
    suffix = file.suffix.lower()
    try:
        if suffix == ".jsonl":
            return list(_read_jsonl(file))
        if suffix == ".csv":
            with open(file, newline="", encoding="utf-8-sig") as fh:
                return list(csv.DictReader(fh))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(file).to_pylist()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{file}: cannot be read ({exc})") from None
    except Exception as exc:  # pyarrow raises its own ArrowInvalid family for corrupt files
        raise SourceError(f"{file}: not a readable {suffix[1:]} file ({type(exc).__name__}: {exc})") from None
    raise SourceError(f"{file}: unsupported table format {suffix!r}")


def _read_jsonl(file: Path) -> Iterator[dict[str, Any]]:
    with open(file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise SourceError(f"{file}:{number}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{file}:{number}: each line must be a JSON object")
            yield row


def _pick(columns: Iterable[str], wanted: str | None, choices: tuple[str, ...], what: str, where: str) -> str:
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise ConfigError(f"{where}: no {what} column {wanted!r}; columns are {', '.join(columns)}")
        return wanted
    for name in choices:
        if name in columns:
            return name
    raise ConfigError(
        f"{where}: no {what} column among {', '.join(columns)}; name it with "
        f"{'column' if what == 'image' else 'text_column'}= (tried {', '.join(choices)})"
    )


def _captions(value: Any, where: str) -> list[str]:
    """A caption cell as a list: a string, a list of strings, or (CSV) a JSON list written as text."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
                return [v.strip() for v in parsed if v.strip()]
        return [text] if text else []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    raise SourceError(f"{where}: a caption must be text or a list of texts, got {type(value).__name__}")


def _to_examples(
    rows: list[dict[str, Any]], base: Path, column: str | None, text_column: str | None, *, where: str, contain: bool
) -> list[Example]:
    """Rows -> examples with absolute image references; ``contain`` keeps paths inside ``base`` (imagefolder)."""
    if not rows:
        return []
    image_col = _pick(rows[0].keys(), column, IMAGE_COLUMNS, "image", where)
    text_col = _pick(rows[0].keys(), text_column, TEXT_COLUMNS, "text", where)
    examples: list[Example] = []
    missing: list[str] = []
    for number, row in enumerate(rows, 1):
        ref = row.get(image_col)
        if not isinstance(ref, str) or not ref.strip():
            raise SourceError(f"{where}: row {number} has no image in column {image_col!r}")
        image = _resolve(ref.strip(), base, contain=contain, where=f"{where}: row {number}")
        if not _URL.match(image) and not Path(image).is_file():
            missing.append(ref)
            continue
        captions = _captions(row.get(text_col), f"{where}: row {number}")
        if captions:
            examples.append(Example(image=image, captions=captions))
    if missing:
        raise SourceError(f"{where}: {len(missing)} image file(s) not found, e.g. {', '.join(missing[:3])}")
    return _merge(examples)


def _resolve(ref: str, base: Path, *, contain: bool, where: str) -> str:
    if _URL.match(ref):
        if contain:
            raise SourceError(f"{where}: an imagefolder's file_name must be a file in the folder, not a URL")
        return ref
    if "://" in ref:
        raise SourceError(f"{where}: {ref!r}: only local paths and http(s) URLs are supported")
    path = Path(ref).expanduser()
    # abspath, not resolve(): ".." is normalised away but symlinks stay (the HF cache links files into blobs/).
    resolved = Path(os.path.abspath(path if path.is_absolute() else base / path))
    # An absolute file_name is taken as written (`captioner export --format metadata` writes them for images
    # outside the export's folder); a relative one that climbs out of the folder is a mistake.
    if contain and not path.is_absolute() and not resolved.is_relative_to(base):
        raise SourceError(f"{where}: {ref!r} points outside {base}")
    return str(resolved)


def _merge(examples: list[Example]) -> list[Example]:
    """One example per image, captions in order of appearance, duplicates dropped."""
    merged: dict[str, Example] = {}
    for ex in examples:
        into = merged.setdefault(ex.image, Example(image=ex.image, captions=[]))
        into.captions.extend(c for c in ex.captions if c not in into.captions)
    return list(merged.values())


def _hub_split(datasets: Any, spec: str, download: bool) -> Any:
    """The hub dataset's train split (or its first): streamed row by row, or downloaded whole when asked."""
    if download:
        loaded = datasets.load_dataset(spec)
        return loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
    splits = datasets.get_dataset_split_names(spec)
    return datasets.load_dataset(spec, split="train" if "train" in splits else splits[0], streaming=True)


def _load_with_datasets(spec: str, column: str | None, text_column: str | None, open_split: Any) -> list[Example]:
    """Rows of a 🤗 ``datasets`` split as examples; image bytes are written once under the HF cache, named by
    their content (a re-run reuses them, a changed dataset never reuses a stale one), never decoded here."""
    try:
        import datasets
    except ImportError:
        raise SourceError(
            f"{spec!r} needs the 'datasets' package on the training worker (pip install 'captioner[datasets]'), "
            "or give an imagefolder directory with metadata.jsonl/csv/parquet or a .jsonl/.csv manifest"
        ) from None
    try:
        split = open_split(datasets)
    except Exception as exc:
        raise SourceError(
            f"dataset {spec!r} could not be opened ({type(exc).__name__}: {' '.join(str(exc).split())}); a hub "
            "dataset needs network access and an existing id, or give a local imagefolder directory or manifest"
        ) from None
    names = list(split.column_names or [])
    image_col = _pick(names, column, IMAGE_COLUMNS, "image", spec)
    text_col = _pick(names, text_column, TEXT_COLUMNS, "text", spec)
    if isinstance((split.features or {}).get(image_col), datasets.Image):
        split = split.cast_column(image_col, datasets.Image(decode=False))  # the stored bytes, as they are
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "captioner-images" / re.sub(r"[^\w.-]+", "--", spec)
    cache.mkdir(parents=True, exist_ok=True)
    examples = []
    for row in split:
        image = _cell_image(row[image_col], cache)
        if image is not None:
            examples.append(Example(image=image, captions=_captions(row[text_col], spec)))
    return _merge([ex for ex in examples if ex.captions])


def _cell_image(cell: Any, cache: Path) -> str | None:
    """An image cell as a local path or URL: a path/URL string, or stored bytes written to the cache."""
    if isinstance(cell, str):
        return cell if _URL.match(cell) else os.path.abspath(cell)
    cell = cell or {}
    data, name = cell.get("bytes"), cell.get("path") or ""
    if data is None:
        return os.path.abspath(name) if name else None
    target = cache / f"{hashlib.sha256(data).hexdigest()[:24]}{Path(name).suffix or '.img'}"
    if not target.is_file():
        target.write_bytes(data)
    return str(target)


# --- splitting and identity ----------------------------------------------------------------------------


def split_examples(
    examples: list[Example], test_fraction: float = 0.1, seed: int = 42
) -> tuple[list[Example], list[Example]]:
    """(train, test), deterministic in the seed and each image reference, independent of input order.

    At least one example goes to each side when there are two or more and ``test_fraction`` > 0.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = len(examples)
    n_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    # Rank by a seeded hash of the image: the same image lands on the same side however the list is ordered.
    ranked = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}\0{examples[i].image}".encode()).digest())
    test_ids = set(ranked[:n_test])
    train = [ex for i, ex in enumerate(examples) if i not in test_ids]
    test = [ex for i, ex in enumerate(examples) if i in test_ids]
    return train, test


def dataset_fingerprint(examples: list[Example]) -> str:
    """16 hex of sha256 over the sorted (image, captions) pairs: the same data in any order, the same id."""
    digest = hashlib.sha256()
    for image, captions in sorted((ex.image, tuple(ex.captions)) for ex in examples):
        digest.update(json.dumps([image, list(captions)], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:16]
