"""Files of a run: the one atomic write every file goes through.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
>>> atomic_write(path, b"first"); atomic_write(path, b"second"); path.read_bytes()
b'second'
>>> sorted(p.name for p in path.parent.iterdir())   # no temporary file left behind
['a.txt']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ["atomic_write"]

PathLike = Union[str, os.PathLike]


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step: a reader sees the old file or the new one, never
    a part. The bytes go to a temporary file next to ``path`` (flushed to disk), which is then
    renamed over ``path``; an exception (Ctrl-C included) removes the temporary file."""
    path = Path(path)
    tmp = _temporary(path)
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
