"""One run per output_dir: an advisory lock the run's main process holds from setup to the end.

The lock is ``fcntl.flock`` on ``<output_dir>/.kdtune.lock`` (the file records the holder's
host, pid and start time). The kernel drops it when the holder's descriptor closes, so a run
killed in any way (``kill -9`` included) leaves a file that is no obstacle: the next run takes
the lock and rewrites it. In a multi-process run rank 0 takes it before anything is loaded and
the outcome is broadcast, so no rank of a second run loads weights (:func:`hold_output_dir`).

Within one process the lock is re-entrant per folder: a later run in the same process (tests,
notebooks) takes over a lock an earlier, unfinished one left open.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from kdtune.training import process_group
from kdtune.training.config.errors import ConfigError

LOCK_FILENAME = ".kdtune.lock"


class OutputDirLockedError(ConfigError):
    """Another run holds ``output_dir``; the message names it (host, pid, start time)."""


class RunLock:
    """The held lock of one output folder; :meth:`release` (or process exit) frees it."""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        if self._descriptor is None:
            return
        _held.pop(str(self.path), None)
        os.close(self._descriptor)  # closing the descriptor releases the flock
        self._descriptor = None


_held: dict[str, RunLock] = {}
"""This process's held locks by lock-file path (the re-entry above)."""


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that has not yet written its name"


def acquire(output_dir: str | Path) -> RunLock:
    """Take ``output_dir``'s lock (creating the folder), recording this process in the file.

    Raises:
        OutputDirLockedError: another process holds it.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_FILENAME).resolve()
    earlier = _held.pop(str(path), None)
    if earlier is not None:
        earlier.release()
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise OutputDirLockedError(
            f"output_dir {str(output_dir)!r} is in use by another run ({_holder_text(path)}; "
            f"lock {path}): wait for it to end, or choose another output_dir"
        ) from None
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
    lock = RunLock(path, descriptor)
    _held[str(path)] = lock
    return lock


def hold_output_dir(output_dir: str | Path, *, is_main: bool) -> RunLock | None:
    """Rank 0 takes the lock (:func:`acquire`) and tells every rank; a collective.

    Returns:
        The lock on rank 0, None on the others.

    Raises:
        OutputDirLockedError: on every rank, when another run holds ``output_dir``.
    """
    lock = message = None
    if is_main:
        try:
            lock = acquire(output_dir)
        except OutputDirLockedError as error:
            message = str(error)
    message = process_group.broadcast_object(message)
    if message is not None:
        raise OutputDirLockedError(message)
    return lock
