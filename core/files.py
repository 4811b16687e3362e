"""Files: the one atomic writer (temporary file, fsync, rename), umask-respecting modes, paths as shown."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from core.errors import StorageError, why_write_failed


def write_atomic(path: Path, data: str | bytes | memoryview | Callable[[BinaryIO], None], what: str = "") -> None:
    """Write ``data`` (text, bytes, or a function writing to the open binary file) to ``path`` through a temporary
    file of this process (``.<name>.<host>-<pid>.tmp``), fsync and a rename: readers (another run, or this one after
    a crash or a full disk) see the old content or the new one, never a part. A failure removes the temporary and
    raises :class:`StorageError` naming the file (``what`` says what it is, e.g. "checkpoint ")."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w" if isinstance(data, str) else "wb", **({"encoding": "utf-8"} if isinstance(data, str)
                                                                   else {})) as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # NotADirectoryError when the folder is a file
            tmp.unlink(missing_ok=True)
        raise StorageError(f"could not write {what}{path}: {why_write_failed(err, path)}") from None


def readable_as_umask(path: Path) -> None:
    """Give ``path``, and everything under it when it is a folder, the mode a new file or folder gets from the umask
    (0644 / 0755 under umask 022): safetensors' ``save_file`` creates its file 0600 whatever the umask, so another
    account on a shared cluster could not read the weights beside files it can read. Call it after writing and
    before the atomic rename, so that no reader ever sees the file with the other mode."""
    mask = current_umask()
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def current_umask() -> int:
    """The process's umask, read from Linux's /proc without changing it (setting it to read it, the portable way,
    would give a file another thread creates meanwhile the wrong mode); elsewhere read by setting it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shown(path: str | Path) -> str:
    """``path`` as the user would type it: relative to the working directory when it lies below it."""
    path = Path(path)
    return str(path.relative_to(Path.cwd()) if path.is_absolute() and path.is_relative_to(Path.cwd()) else path)
