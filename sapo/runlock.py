"""One run per output_dir: an exclusive lock held for the run's lifetime.

`output_dir/sapo.lock` is locked with `flock` (the kernel drops the lock when its process dies, so
a SIGKILLed run never blocks the next one) and holds the holder's PID, host, start time and
command. A second run into the same folder fails at once naming the holder. A lock file left by a
process that no longer runs is taken over, with a message saying whose it was.

Where flock is not supported (some network file systems) the file itself is the lock (created
exclusively), and a holder PID that no longer runs on this host is taken over.
Only rank 0 of a torchrun job locks: the other ranks belong to the same run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = "sapo.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLockedError(RuntimeError):
    """Another live run holds output_dir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, int | float) else "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}, "
            f"command: {holder.get('command', '?')}")


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """`with RunLock(output_dir):` or acquire() / release(). The folder must exist."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None
        self.taken_over: dict | None = None  # the dead holder's record, when its stale lock was taken over

    def _me(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(["sapo", *sys.argv[1:]])[:300]}

    def _refuse(self, holder: dict) -> RunLockedError:
        return RunLockedError(
            f"output_dir={self.output_dir} is in use by another sapo run ({_describe(holder)}); wait for it to "
            f"finish or stop it, or choose another output_dir (if that process is gone, delete {self.path})")

    def acquire(self) -> RunLock:
        for _ in range(5):  # retried only when the file was replaced between open and lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(_read_holder(self.path)) from None
            except OSError as err:
                os.close(fd)
                if err.errno in _NO_FLOCK:
                    return self._acquire_by_file()
                raise
            try:  # the previous holder may have unlinked the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            self._record(fd)
            return self
        raise RunLockedError(f"could not lock {self.path}: it keeps being replaced by another process")

    def _record(self, fd: int) -> None:
        """Write our record, noting a previous holder whose process ended without releasing."""
        previous = _read_holder(self.path)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.taken_over = previous
            print(f"[sapo] taking over {self.path} from a run that no longer holds it ({_describe(previous)})",
                  file=sys.stderr, flush=True)
        data = json.dumps(self._me()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _acquire_by_file(self) -> RunLock:
        """No flock: the lock is the file's existence; a holder PID not running here is stale."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                pid = holder.get("pid")
                alive = holder.get("host") != socket.gethostname() or (isinstance(pid, int) and _pid_alive(pid))
                if alive or not holder:
                    raise self._refuse(holder) from None
                self.taken_over = holder
                print(f"[sapo] taking over {self.path} from a run that is no longer running ({_describe(holder)})",
                      file=sys.stderr, flush=True)
                self.path.unlink(missing_ok=True)
                continue
            self._fd = fd
            data = json.dumps(self._me()).encode()
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            return self
        raise self._refuse(_read_holder(self.path))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then sees the inode change
        except OSError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def is_rank_zero() -> bool:
    """Rank 0 of a torchrun job, or a plain process (RANK unset)."""
    return os.environ.get("RANK", "0") in ("", "0")
