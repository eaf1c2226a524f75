"""WebDataset tar shards: a sample per captioned image (image, caption, row), containers' members repacked."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import secrets
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from common.errors import ConfigError, ItemError
from common.messages import TAR_SUFFIXES, is_url
from common.uris import is_object_uri
from exports.captions import task_caption, task_members
from exports.place import check_target, fsync_path, is_regular, move_into_place
from exports.rows import (
    ExportSummary,
    Options,
    caption_skip,
    container_member,
    file_skip,
    kept,
)

log = logging.getLogger(__name__)

# WebDataset splits a member name at its first dot into key and extension, so keys carry no dots or slashes.
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")
SHARD_NAME = "shard-%06d.tar"


def export_webdataset(
    rows: Iterable[Mapping[str, Any]], out: Path | str | None, *, shard_size: int, overwrite: bool, opts: Options
) -> ExportSummary:
    """Tar shards of at most ``shard_size`` samples in the folder ``out`` or after the pattern ``out``, all renamed
    into place once every shard is complete; members of containers are packed after the other rows, each container
    read once (their rows wait on disk meanwhile)."""
    folder, name = _shard_pattern(out)
    # Checked before the first row is pulled, as for single files; later shards are checked before renaming.
    check_target(folder / (name % 0), overwrite=overwrite)
    shards = _ShardSet(folder, name, shard_size)
    count = 0

    def sample(row: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[tuple[str, bytes]] | tuple[str, str]] | str:
        got = _sample(row, opts)
        return got if isinstance(got, str) else (row, got)

    try:
        with tempfile.TemporaryDirectory(prefix="captioner-members-") as spill_dir:
            set_aside = MemberRows(Path(spill_dir))
            for row, members in kept(rows, opts.skipped, sample):
                if isinstance(members, tuple):  # a container member: packed when its container is read
                    set_aside.add(*members, row)
                else:
                    shards.add(str(row["id"]), members, mtime=float(row.get("finished_at") or 0))
                    count += 1
            for container, by_key in set_aside.by_container():
                count += _repack(container, by_key, shards, opts)
        written = shards.commit(overwrite=overwrite)
    finally:
        shards.discard()
    return ExportSummary(rows_written=count, files_written=written, path=folder)


def _repack(container: str, by_key: dict[str, Mapping[str, Any]], out: _ShardSet, opts: Options) -> int:
    """Read ``container`` (a tar shard, a Parquet or an Arrow file) once and add a sample for each of its members that
    has a row in ``by_key``."""
    assert opts.containers is not None
    count = 0
    try:
        for key, ext, data in opts.containers(container):
            row = by_key.pop(key, None)
            if row is None:
                continue  # not exported (not captioned, filtered out) or a key already packed
            if isinstance(data, ItemError):
                opts.skipped[file_skip(data)] += 1
                continue
            out.add(str(row["id"]), _members(row, ext, data, opts.task), mtime=float(row.get("finished_at") or 0))
            count += 1
    except ItemError as exc:  # the container could not be opened or fetched
        opts.skipped[file_skip(exc)] += len(by_key)
        by_key.clear()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # broke off (truncated since captioning)
        log.warning("export: %s could not be read to its end (%s: %s)", container, type(exc).__name__, exc)
        opts.skipped["unreadable"] += len(by_key)
        by_key.clear()
    if by_key:  # members no longer in the container
        opts.skipped["missing_image"] += len(by_key)
    return count


class MemberRows:
    """The rows of container members, grouped by container: held in memory up to ``limit`` rows, then appended to
    one JSON-lines file per container in ``folder``."""

    def __init__(self, folder: Path, limit: int = 20_000) -> None:
        self.folder, self.limit = folder, limit
        self.held: dict[str, list[str]] = {}
        self.files: dict[str, Path] = {}
        self.count = 0

    def add(self, container: str, key: str, row: Mapping[str, Any]) -> None:
        line = json.dumps({"key": key, "row": row}, ensure_ascii=False, separators=(",", ":"), default=str)
        self.held.setdefault(container, []).append(line)
        self.count += 1
        if self.count >= self.limit:
            self._spill()

    def by_container(self) -> Iterator[tuple[str, dict[str, Mapping[str, Any]]]]:
        """Each container with its rows by member key (the first row of a key kept), in the order they first came."""
        for container in [*self.files, *(c for c in self.held if c not in self.files)]:
            lines = self.held.pop(container, [])
            if container in self.files:
                lines = self.files[container].read_text(encoding="utf-8").splitlines() + lines
            by_key: dict[str, Mapping[str, Any]] = {}
            for line in lines:
                entry = json.loads(line)
                by_key.setdefault(entry["key"], entry["row"])
            yield container, by_key

    def _spill(self) -> None:
        for container, lines in self.held.items():
            path = self.files.setdefault(container, self.folder / f"{len(self.files)}.jsonl")
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
        self.held, self.count = {}, 0


def _shard_pattern(out: Path | str | None) -> tuple[Path, str]:
    """(folder, file name pattern with one integer field) from a folder or a pattern like ``dir/train-%05d.tar``."""
    if out is None or str(out) == "-":
        raise ConfigError("webdataset needs an output folder or shard pattern (e.g. shards/shard-%06d.tar), not stdout")
    path = Path(out)
    if "%" in path.name:
        try:
            first, second = path.name % 0, path.name % 1
        except (TypeError, ValueError):
            first = second = ""
        if first == second or "/" in first or os.sep in first:
            raise ConfigError(f"shard pattern {path.name!r} needs exactly one integer field, e.g. shard-%06d.tar")
        folder, name = path.parent, path.name
    elif path.suffix == ".tar" and not path.is_dir():
        raise ConfigError(f"{path}: give a folder, or a shard pattern with an integer field like shard-%06d.tar")
    elif path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; webdataset writes shards into a folder")
    else:
        folder, name = path, SHARD_NAME
    # The shard folder itself may be new; its parent must exist, as for every other output.
    if not (folder.is_dir() or folder.parent.is_dir()):
        raise ConfigError(f"output directory {folder.parent} does not exist")
    return folder, name


def _sample(row: Mapping[str, Any], opts: Options) -> list[tuple[str, bytes]] | tuple[str, str] | str:
    """The (extension, bytes) members of one sample; (container, member key) for a member of a tar shard, a
    Parquet or an Arrow file, repacked later; or the reason the row is skipped."""
    image = str(row.get("ref") or "")
    container = container_member(image)
    refetch = opts.remote is not None or container is not None
    reason = caption_skip(row, opts.exclude_flags, remote=refetch, members=True, task=opts.task)
    if reason is not None:
        return reason
    if not _SAFE_KEY.fullmatch(str(row.get("id") or "")):
        return "bad_key"
    if container is not None:
        # A member of a shard, a row group or a dataset: its bytes are in that container, which is read again (a
        # dataset, by name from a hub, is not).
        repacked = opts.containers is not None and container[0].lower().endswith((*TAR_SUFFIXES, ".parquet", ".arrow"))
        return container if repacked else "container_member"
    remote = is_url(image) or is_object_uri(image)
    ext = Path(image.split("?", 1)[0]).suffix.lower().lstrip(".") or "img"
    if ext in ("txt", "json") or not re.fullmatch(r"[a-z0-9]{1,8}", ext):
        return "name_clash" if ext in ("txt", "json") else "bad_key"
    try:
        # Read whole, now, by the workers' rules (images are capped in size): the path was checked when it was
        # captioned, and a link put there since must not carry another file into the shards. URLs and objects are
        # fetched again through the same image policy (allowed prefixes, the URL guard, the byte cap).
        if remote:
            assert opts.remote is not None
            data = opts.remote(image)
        elif opts.local is not None and opts.local.roots:
            data = opts.local.read(image)
        else:
            return "forbidden"  # a local file, and no allowed root to read it under
    except ItemError as exc:
        return file_skip(exc)
    except OSError:
        return "unreadable"
    return _members(row, ext, data, opts.task)


def _members(row: Mapping[str, Any], ext: str, data: bytes, task: str | None = None) -> list[tuple[str, bytes]]:
    """A sample's members: the image, its caption (``txt``), its row (``json``) and each task's caption
    (``<task>.txt``)."""
    row_json = json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str)
    text = task_caption(row, task) or ""
    return [(ext, data), ("txt", text.encode()), ("json", row_json.encode()), *task_members(row)]


class _ShardSet:
    """Tar shards written to temporary names, renamed into place together once every one is complete."""

    def __init__(self, folder: Path, name: str, shard_size: int) -> None:
        self.folder, self.name, self.shard_size = folder, name, shard_size
        self.temps: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def add(self, key: str, members: list[tuple[str, bytes]], *, mtime: float) -> None:
        if self._tar is None or self._in_shard >= self.shard_size:
            self._open_next()
        assert self._tar is not None
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1

    def commit(self, *, overwrite: bool) -> int:
        """Move every shard into place; with ``overwrite``, remove higher-numbered shards of an older export."""
        self._close()
        finals = [self.folder / (self.name % i) for i in range(len(self.temps))]
        for final in finals:
            check_target(final, overwrite=overwrite)
        placed: list[Path] = []
        try:
            for tmp, final in zip(self.temps, finals, strict=True):
                fsync_path(tmp)
                move_into_place(tmp, final, overwrite=overwrite)
                placed.append(final)
        except FileExistsError:
            for final in placed:
                final.unlink(missing_ok=True)
            raise ConfigError(f"shards appeared in {self.folder} while exporting; pass overwrite") from None
        if overwrite:
            stale = len(finals)
            while is_regular(old := self.folder / (self.name % stale)):
                old.unlink()
                stale += 1
        if (finals or overwrite) and self.folder.is_dir():
            fsync_path(self.folder)  # the renames themselves survive a power cut
        return len(finals)

    def discard(self) -> None:
        """Remove whatever temporary shards remain (all of them when the export failed)."""
        with contextlib.suppress(Exception):
            self._close()
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)

    def _open_next(self) -> None:
        self._close()
        self.folder.mkdir(exist_ok=True)
        final = self.folder / (self.name % len(self.temps))
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        self.temps.append(tmp)
        self._tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed in _close)
        self._in_shard = 0

    def _close(self) -> None:
        if self._tar is not None:
            tar, self._tar = self._tar, None
            tar.close()
