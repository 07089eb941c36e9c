"""Files of a run, written so that nothing is lost and nothing damaged is trusted.

* :func:`atomic_write` (trlib's one atomic write; :mod:`trlib.data` uses it too): every file
  is replaced in one step (a temporary file, flushed, then renamed), so a reader sees the old
  file or the new one, never a part of one. A kill -9 can leave the temporary file behind:
  :func:`remove_temporaries` clears it.
* :class:`RunLock`: one writer per run. A second process on the same run stops at once with
  :class:`RunLockedError`, naming the process that holds the run (the operating system drops
  the lock when that process ends, however it ends).
* :func:`save_checkpoint` / :func:`load_checkpoint`: a checkpoint is ``torch.save``'s bytes
  behind a header with their length and SHA-256. A file that is cut, flipped, emptied,
  random or from another program is refused with :class:`CheckpointError`, never unpickled.

>>> import tempfile, pathlib, torch
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> save_checkpoint(folder / "run.pt", {"w": torch.ones(2)})
>>> load_checkpoint(folder / "run.pt")
{'w': tensor([1., 1.])}
>>> data = bytearray((folder / "run.pt").read_bytes()); data[-5] ^= 1
>>> _ = (folder / "run.pt").write_bytes(bytes(data))
>>> load_checkpoint(folder / "run.pt")   # doctest: +ELLIPSIS
Traceback (most recent call last):
...
trlib.experiments.storage.CheckpointError: .../run.pt: damaged: its contents do not match their SHA-256 checksum
>>> sorted(p.name for p in folder.iterdir())   # no temporary file left behind
['run.pt']
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import socket
from pathlib import Path
from typing import Any, Union

from .._atomic import atomic_write, temporary_path

__all__ = ["atomic_write", "temporary_path", "remove_temporaries", "RunLock", "RunLockedError", "CheckpointError",
           "save_checkpoint", "load_checkpoint"]

PathLike = Union[str, os.PathLike]
_MAGIC = b"TRLIB-CHECKPOINT\n"


class RunLockedError(ValueError):
    """Another process is writing the same run."""


class CheckpointError(ValueError):
    """A checkpoint cannot be trusted (the message names the file and what is wrong)."""


def remove_temporaries(path: PathLike) -> None:
    """Remove what killed writers of ``path`` left behind (``.<name>.<pid>.tmp``). Call it only
    while holding the run's lock: then no living writer owns such a file."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass


class RunLock:
    """An exclusive, non-blocking lock on one run, held in ``path`` (a small file that says who
    holds it). ``with RunLock(path): ...``; :class:`RunLockedError` if another process holds it.
    The operating system releases it when the holder exits, even after kill -9."""

    def __init__(self, path: PathLike, what: str):
        self.path, self.what, self._file = Path(path), what, None

    def __enter__(self) -> "RunLock":
        try:
            f = open(self.path, "a+")
        except OSError as err:
            raise ValueError(f"cannot create the lock file {self.path}: {err.strerror or err}") from None
        try:
            _lock(f)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(f"{self.what} is being written by {holder} (lock {self.path}); wait for it to "
                                 "finish, or write to another --out") from None
        f.seek(0)
        f.truncate()
        when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        f.write(f"process {os.getpid()} on {socket.gethostname()} since {when}")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            _unlock(self._file)
            self._file.close()
            self._file = None


try:  # POSIX
    import fcntl

    def _lock(f):
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(f):
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
except ImportError:  # Windows: a lock on the file's first byte
    import msvcrt

    def _lock(f):
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock(f):
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


def save_checkpoint(path: PathLike, obj: Any) -> None:
    """``torch.save(obj)`` behind a header with the payload's length and SHA-256, written atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    header = json.dumps({"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
    atomic_write(path, _MAGIC + header.encode("ascii") + b"\n" + payload)


def load_checkpoint(path: PathLike) -> Any:
    """What :func:`save_checkpoint` saved, after checking its length and checksum (tensors on
    the CPU). :class:`CheckpointError` naming the file and the problem otherwise."""
    import torch

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read: {err.strerror or err}") from None
    if not data:
        raise CheckpointError(f"{path}: empty")
    if not data.startswith(_MAGIC):
        raise CheckpointError(f"{path}: not a trlib checkpoint (written by another program or an older trlib)")
    head, sep, payload = data[len(_MAGIC):].partition(b"\n")
    try:
        header = json.loads(head.decode("ascii"))
        size, digest = int(header["bytes"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: damaged: its header is unreadable") from None
    if not sep or len(payload) != size:
        raise CheckpointError(f"{path}: damaged: {len(payload)} bytes of data where its header says {size} "
                              "(the file was cut short or extended)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: damaged: its contents do not match their SHA-256 checksum")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a checksummed file that torch cannot read: say so, in one line
        raise CheckpointError(f"{path}: unreadable by this torch ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
