"""Writing files safely, for every caller (run folders, reports, data caches).

Atomic writes: every write goes to a temporary file in the same folder, is flushed and fsynced,
then renamed over the target, and the folder is fsynced, so a crash leaves either the old file or
the new one, never half of one. Temporary files get the permissions a plain `open()` gives
(0o666 & ~umask), not mkstemp's private 0o600, so a shared run folder or data cache stays
readable by colleagues. A failed write (full disk, read-only folder) raises a `WriteError` that
names the file and says the previous version is intact, and leaves no temporary file; what to
run next is the caller's to add (`WriteError.advise`).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import UserError

_PROC_STATUS = "/proc/self/status"  # Linux >= 4.7 reports the umask here, readable without races


def current_umask() -> int:
    """The process umask, read afresh on every call (another thread or library may change it).

    Linux reports it in /proc/self/status, which changes nothing. Elsewhere the only way is
    `os.umask(0)` followed by a restore; a file that another thread creates in between those two
    calls gets wider permissions than it should, so the window is kept to two system calls.
    """
    try:
        with open(_PROC_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_file_beside(path: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new temporary file in `path`'s folder (open descriptor, path), with the mode `open()`
    would give it. The caller writes it and renames it over `path`, or removes it."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        mode = 0o666 & ~current_umask()
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        else:  # pragma: no cover - Windows before Python 3.13
            os.chmod(name, mode)
    except BaseException:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
        raise
    return fd, Path(name)


# Atomic writes ---------------------------------------------------------------------------------
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class WriteError(UserError):
    """A file could not be written. The message names the file, the reason, what is still safe
    on disk and how to make room; the caller adds what to run next (`advise`)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def of(cls, path: Path, err: OSError, intact: str) -> WriteError:
        """The error of a failed write of `path`: `intact` says what is still safe on disk."""
        reason = err.strerror or str(err)
        if err.errno in _NO_SPACE:
            fix = f"free space on the disk of {path.parent}"
        elif err.errno in _NOT_WRITABLE:
            fix = f"make {path.parent} writable"
        else:
            fix = "fix that"
        return cls(f"could not write {path} ({reason}); {intact}; {fix}", path)

    def advise(self, advice: str) -> WriteError:
        """The same error, its message followed by `advice` (what to run next)."""
        return WriteError(f"{self}, then {advice}", self.path)


def write_temp(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Create a temporary file beside `path`, fill it with `write`, fsync it, return its path.

    The file gets mode 0o666 & ~umask, as `open()` would give it (mkstemp makes it 0o600). On any
    error the temporary file is removed before the error propagates.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path`; remove `tmp` if that fails."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable (best effort: not every OS or filesystem can)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Fill `path` through `write` via a fsynced temporary file, an atomic rename and a fsync of
    the folder. Raises the `OSError` itself, for callers with their own message."""
    path = Path(path)
    replace(write_temp(path, write), path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a fsynced temporary file and an atomic rename.

    Raises `WriteError` (naming the path and the reason) when the write or the rename fails, e.g.
    on a full disk; the previous version of the file, if any, is then untouched.
    """
    path = Path(path)
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as err:
        raise WriteError.of(
            path, err, "the previous version of that file, if any, is intact"
        ) from err


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
