"""Local files under allowed roots, checked at the moment they are used: real path under a root, a regular file,
no link leading out, a byte cap. Workers read images by these rules; exports read and write beside images by
them too (a folder checked hours ago may have become a symlink since)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from common.errors import FetchError, Forbidden, InvalidInput, TooLarge

# O_NOFOLLOW: a symlink swapped in after realpath() is refused; O_NONBLOCK: a FIFO swapped in cannot block.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class LocalFiles:
    """Which local files may be read or written: those whose real path lies under one of ``roots``."""

    roots: tuple[Path, ...]
    max_bytes: int

    @classmethod
    def under(cls, roots: Sequence[Path | str], max_bytes: int) -> LocalFiles:
        # Real paths once, so every check compares like with like.
        return cls(tuple(Path(r).resolve() for r in roots), max_bytes)

    def read(self, path: str) -> bytes:
        """Bytes of a regular file whose real path lies under a root, at most ``max_bytes``."""
        with self._opened(path) as fd:
            return _read_capped(fd, path, self.max_bytes)

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[IO[bytes]]:
        """A sequential reader of a regular file under a root (a shard, a Parquet file), checked like ``read``."""
        with self._opened(path) as fd, os.fdopen(os.dup(fd), "rb") as fh:
            yield fh

    def check(self, path: str) -> None:
        """Forbidden, FetchError or TooLarge unless ``read(path)`` would be allowed (without reading it)."""
        with self._opened(path):
            pass

    @contextlib.contextmanager
    def _opened(self, path: str) -> Iterator[int]:
        root, real = self._place(path)
        # stat before open: a FIFO or device is refused without ever being opened.
        _check_regular(_stat(real, path), path, self.max_bytes)
        fd = _open(real, path, _READ_FLAGS)
        try:
            _check_regular(os.fstat(fd), path, self.max_bytes)
            if not _fd_under(fd, root):
                raise Forbidden(f"{path} moved outside the allowed roots while being opened")
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def folder(self, path: str) -> Iterator[int]:
        """A descriptor of the folder ``path`` names, once checked to lie under a root.

        Files made through it (``write_beside``) land in that very folder: a folder swapped for a symlink after
        the check cannot redirect them, because nothing is looked up by path again.
        """
        root, real = self._place(path)
        try:
            fd = os.open(real, _DIR_FLAGS)
        except FileNotFoundError:
            raise FetchError(f"no such folder: {path}") from None
        except OSError as exc:
            raise Forbidden(f"cannot open the folder {path}: {exc.strerror}") from None
        try:
            if not _fd_under(fd, root):
                raise Forbidden(f"{path} moved outside the allowed roots while being opened")
            yield fd
        finally:
            os.close(fd)

    def _place(self, path: str) -> tuple[Path, str]:
        """(root, real path) of a path under a root, else Forbidden (InvalidInput for a NUL)."""
        if not self.roots:
            raise Forbidden("local paths are disabled: set CAPTIONER_ALLOWED_ROOTS to the directories workers may read")
        if "\0" in path:
            raise InvalidInput("path contains a NUL byte")
        real = os.path.realpath(path)
        root = next((r for r in self.roots if Path(real).is_relative_to(r)), None)
        if root is None:
            raise Forbidden(f"{path} is outside the allowed roots")
        return root, real


def write_beside(folder: int, name: str, data: bytes, *, overwrite: bool) -> bool:
    """Write ``name`` in the open ``folder`` atomically (a temporary file, then a rename); False when it exists
    and ``overwrite`` is off. A symlink standing at ``name`` is replaced, never written through."""
    if "/" in name or name in ("", ".", ".."):
        raise InvalidInput(f"{name!r} is not a file name")
    if not overwrite and _exists(folder, name):
        return False
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, _NEW_FLAGS, 0o666, dir_fd=folder)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            return True
        try:
            os.link(tmp, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)


def _exists(folder: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _stat(real: str, path: str) -> os.stat_result:
    try:
        return os.stat(real)
    except FileNotFoundError:
        raise FetchError(f"no such file: {path}") from None
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror}") from None


def _check_regular(st: os.stat_result, path: str, max_bytes: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise Forbidden(f"{path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise Forbidden(f"{path} is not a regular file (FIFO, socket or device)")
    if st.st_size > max_bytes:
        raise TooLarge(f"{path} is {st.st_size} bytes, over the limit of {max_bytes}")


def _open(real: str, path: str, flags: int) -> int:
    try:
        return os.open(real, flags)
    except FileNotFoundError:
        raise FetchError(f"no such file: {path}") from None
    except OSError as exc:
        raise Forbidden(f"cannot open {path}: {exc.strerror}") from None


def _fd_under(fd: int, root: Path) -> bool:
    """Whether the file actually opened lies under root (catches a directory swapped for a symlink mid-way)."""
    try:
        actual = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True  # no /proc (not Linux): the realpath check is the guard there
    return Path(actual).is_relative_to(root)


def _read_capped(fd: int, path: str, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    # Read one byte past the cap so a file that grew after stat() is still caught.
    while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(f"{path} is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
