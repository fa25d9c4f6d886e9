"""One run per output folder. A run holds an exclusive `flock` on `.lock-rank<R>` in its output
folder for its whole life; the kernel releases it on any exit, kill -9 included, so a lock file
left by a dead process is stale and simply taken over. A second run on the same folder stops with
one sentence naming the run that holds it. A forked child (a data-loader worker) closes its copy of
the lock at once: otherwise workers orphaned by a kill -9 of their run would hold the folder for the
seconds they take to notice, and an immediate --auto_resume would be refused."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from common.errors import UserError

_HELD: set[int] = set()  # lock descriptors this process holds


def _close_inherited_locks() -> None:
    for fd in list(_HELD):  # closing a copy keeps the parent's lock (flock ends with the last copy or LOCK_UN)
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLock:
    def __init__(self, folder: str | Path, rank: int = 0) -> None:
        self.path = Path(folder) / f".lock-rank{rank}"
        self.fd: int | None = None
        self.stale: str | None = None  # what a dead run left behind, when the lock was taken over

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"--output_dir {self.path.parent} cannot be written ({err.strerror}); choose another "
                            f"--output_dir or fix its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"--output_dir {self.path.parent} is in use by another run ({holder}); wait for it to "
                            f"finish or choose another --output_dir") from None
        self.stale = os.read(fd, 200).decode(errors="replace").strip() or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD.discard(self.fd)
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
