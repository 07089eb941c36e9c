"""trlib's one atomic file write (results, checkpoints, dataset caches)."""

import os
from pathlib import Path
from typing import Union

__all__ = ["atomic_write", "temporary_path"]

PathLike = Union[str, os.PathLike]


def temporary_path(path: Path) -> Path:
    """Where :func:`atomic_write` stages ``path``: ``.<name>.<pid>.tmp`` next to it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step: a reader sees the old file or the new one, never
    a part. The bytes go to a temporary file next to ``path`` (flushed to disk), which is then
    renamed over ``path``; an exception (Ctrl-C included) removes the temporary file.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> atomic_write(path, b"first"); atomic_write(path, b"second"); path.read_bytes()
    b'second'
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
