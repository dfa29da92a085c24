"""An exclusive lock on a run or cache folder, so two processes never train into one folder.

``FOLDER/.lock`` is locked with ``flock`` (the kernel drops the lock when its holder dies, so a
crashed run never leaves a stale lock behind) and records the holder's pid, host and start time,
which the refusal names. ``flock`` does not lock across machines on every network file system:
give concurrent jobs on different hosts different run names.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from alignkit.core.errors import RunDirError

LOCK_FILE = ".lock"


class FolderLock:
    def __init__(self, folder: Path, what: str = "run folder") -> None:
        self.folder, self.what, self._fd = Path(folder), what, -1

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        path = self.folder / LOCK_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(f"cannot use {self.what} {self.folder}: {err.strerror} (choose a writable output_dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"{self.what} {self.folder} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"(since {holder.get('since', '?')}); wait for it to finish or choose another run_name"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


def _read_holder(fd: int) -> dict[str, object]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
