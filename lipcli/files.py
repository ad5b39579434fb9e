"""Writing files that are never half-written, strict JSON, and one-line error messages: shared by every writer."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line user errors."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def finite(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None, so it encodes as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def strict_json(value: Any) -> str:
    return json.dumps(finite(value), allow_nan=False)


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: Path, what: str) -> None:
    """Fail early, before any long job, when ``path`` is a directory or its folder cannot be written."""
    if path.is_dir():
        raise UserError(f"{what} {path}: is a directory; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # atomic_write creates the missing folders below the nearest existing one
    if not folder.is_dir():
        raise UserError(f"{what} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot write in {folder} (permission denied)")


def _cannot_write(path: Path, exc: OSError) -> UserError:
    # A full disk, a read-only folder or a directory in the way: the user's to fix, so one line, not a traceback.
    return UserError(f"cannot write {path}: {exc.strerror or one_line(exc)}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temp file in the same directory, then rename over ``path`` (atomic on POSIX).

    An OSError (permission, full disk, a directory at ``path``) becomes a UserError and leaves ``path`` as it was.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(delete=False, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp") as f:
            tmp = Path(f.name)
    except OSError as exc:
        raise _cannot_write(path, exc) from exc
    try:
        write(tmp)
        # NamedTemporaryFile creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from exc
        raise
    return path
