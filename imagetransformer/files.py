"""Files the way a plain `open()` makes them: temporary files for atomic writes that get the
permissions the umask allows (0o666 & ~umask), not mkstemp's private 0o600, so a shared run
folder or data cache stays readable by colleagues."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
