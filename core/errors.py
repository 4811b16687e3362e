"""The errors that name a bad input or a failed write, and the small readers that raise them, shared by every package
(the lowest layer: no imports of ours). ``train.py`` prints them as one ``error:`` line instead of a traceback."""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from pathlib import Path


class DataError(ValueError):
    """A problem with the input data; the message names the file, row or option."""


class StorageError(OSError):
    """A file could not be written or read back (a full disk, a damaged file); the message names it."""


def read_json(path: Path, what: str, remedy: str):
    """The JSON in ``path``, or a DataError naming the file, saying it is damaged (``what``) and what to do."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: {what} is damaged or incomplete ({err}); {remedy}") from None


def why_write_failed(err: OSError, path: Path) -> str:
    """What an OSError from writing ``path`` means, in words: the system's reason when it gives one (a full disk only
    when it says so: ENOSPC, or EDQUOT for a quota). numpy's short-write error has no errno and says only "N requested
    and M written": then a (nearly) full filesystem is named from its free space."""
    if err.errno == errno.ENOSPC:
        return "No space left on device"
    if err.errno is not None:  # the free space of /proc or a read-only mount is 0 too: never a reason by itself
        return str(err.strerror or err)
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return str(err)
    if free < 1 << 20:
        return f"No space left on device ({free // 1024} KiB free; {err})"
    return str(err)


def unwritable(folder: str | Path) -> str | None:
    """Why files cannot be written in ``folder`` (created when missing), or None when they can. Tried for real,
    with a temporary file: permission bits say nothing to root, and a read-only mount only shows on writing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    a_file = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    if a_file is not None:
        return f"{a_file} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".embedlab-write-check-"):
            pass
    except OSError as err:
        return why_write_failed(err, folder / "x")
    return None
