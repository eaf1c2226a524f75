"""Putting a finished export where it goes: a local file renamed into place whole, or objects uploaded all or none.

An output path is only ever a regular file or nothing: a symlink, a device, a FIFO or a socket standing there is
refused, never replaced nor written through (docs/exports.md says why).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from common.errors import ConfigError
from media.objects import ObjectStore


def check_target(final: Path, *, overwrite: bool) -> None:
    """Refuse ``final`` unless it is absent, or a regular file and ``overwrite`` is on; the error says what it is."""
    try:
        mode = os.lstat(final).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise ConfigError(
            f"{final} is a symbolic link, which an export never replaces nor writes through; give the path of a "
            "regular file (or '-' for stdout)"
        )
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{final} is a directory; give a file path")
    if not stat.S_ISREG(mode):
        raise ConfigError(
            f"{final} is not a regular file (a device, a pipe or a socket); an export writes a whole file and renames "
            "it into place: give the path of a regular file (or '-' for stdout)"
        )
    if not overwrite:
        raise ConfigError(f"{final} already exists; pass overwrite (--overwrite) to replace it")


def is_regular(path: Path) -> bool:
    """Whether ``path`` itself (not what a link leads to) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def atomic_target(final: Path, *, overwrite: bool, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (same directory: the rename never crosses filesystems); on success
    fsync it and move it into place, else remove it."""
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
    try:
        # os.open with 0o666 (not mkstemp's 0o600) so the export gets the usual umask-based permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileNotFoundError:
        raise ConfigError(f"output directory {final.parent} does not exist") from None
    os.close(fd)
    try:
        yield tmp
        fsync_path(tmp)
        move_into_place(tmp, final, overwrite=overwrite)
        if sync_dir:
            fsync_path(final.parent)  # makes the rename itself survive a power cut, not only the file's bytes
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(tmp: Path, final: Path, *, overwrite: bool) -> None:
    """Rename ``tmp`` to ``final``. Without ``overwrite`` a hard link, which fails (FileExistsError) rather than
    replace whatever appeared there meanwhile; with it, only a regular file is replaced (checked again now)."""
    if overwrite:
        check_target(final, overwrite=True)
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # atomic create-if-absent; raises FileExistsError instead of clobbering
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links (some network and FUSE mounts): check, then rename.
        if os.path.lexists(final):
            raise FileExistsError(final) from None
        os.replace(tmp, final)


def upload_all(store: ObjectStore, pairs: list[tuple[Path, str]], overwrite: bool) -> None:
    """Upload every file or none: on a failure, the objects already uploaded are removed again."""
    if not overwrite and (clash := next((t for _, t in pairs if store.exists(t, checked=False)), None)):
        raise ConfigError(f"{clash} already exists; pass overwrite (--overwrite) to replace it")
    done: list[str] = []
    try:
        for local, target in pairs:
            store.upload(str(local), target, overwrite=True, checked=False)
            done.append(target)
    except BaseException:
        for target in done:
            with contextlib.suppress(Exception):
                store.remove(target, checked=False)
        raise
