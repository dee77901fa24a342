"""Atomic file writes: what a user produced is never left half-written by a crash.

Every writer goes to a temporary file in the destination folder and then ``os.replace``-s it, which is
atomic on POSIX and Windows when source and destination share a filesystem.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path``. Returns ``path``.

    The file gets the mode a plain ``open(path, "w")`` would give it (the user's umask), not the
    ``0600`` of a temporary file. An ``OSError`` (full disk, read-only folder) is raised again with its
    ``errno`` (so as ``PermissionError`` etc.), naming ``path`` itself rather than the temporary file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, new_file_mode())
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | os.PathLike, payload: Any) -> Path:
    """``torch.save(payload)`` to ``path`` through :func:`atomic_write`, flushed to disk before the rename."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, write)
