"""Writing run files, and saying clearly why a write failed.

Every file of a checkpoint goes through `write_file`, which hashes what it writes (the checkpoint
manifest needs sizes and SHA-256 without reading the files back) and keeps the `OSError` the disk
raised: torch's zip writer turns a short write into `RuntimeError: unexpected pos ...`, which never
says "no space left on device". `StorageError` is the one-line error the CLI prints (exit 2).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# errno -> what to tell the user; these are the storage problems a user can fix
CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a file with that name exists where a directory is needed",
    errno.EISDIR: "it is a directory where a file is needed",
    errno.EIO: "input/output error (a failing disk or a lost network mount)",
    errno.ENAMETOOLONG: "the path is too long",
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class StorageError(RuntimeError):
    """Writing a run's files failed for a reason outside sapo (full disk, read-only, not a folder).

    One line: the path, the cause, and what was kept. `errno` is the OS error number."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """'PATH: cause' for an OSError, in words (the errno name when it is not a known one)."""
    where = path if path is not None else (err.filename or "?")
    cause = CAUSES.get(err.errno or -1) or err.strerror or str(err)
    return f"{where}: {cause}"


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # safetensors (Rust) reports "... (os error 28)"


def storage_cause(err: BaseException) -> OSError | None:
    """The storage OSError behind err (itself, or the one a library folded into its message), or None."""
    if isinstance(err, OSError):
        return err if err.errno in CAUSES else None
    match = _RUST_OS_ERROR.search(str(err))
    if match and int(match.group(1)) in CAUSES:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


def is_storage_error(err: BaseException) -> bool:
    return storage_cause(err) is not None


def free_bytes(path: str | Path) -> int | None:
    """Free space of the file system holding path (its nearest existing parent), or None."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _open_for_write(path: Path):
    """The real file behind write_file; tests replace it to simulate a full or read-only disk."""
    return open(path, "wb")


class _HashingWriter(io.RawIOBase):
    """What torch.save writes into: counts and hashes the bytes, keeps the first OSError."""

    def __init__(self, handle):
        self.handle, self.sha256, self.size, self.error = handle, hashlib.sha256(), 0, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            n = self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.sha256.update(memoryview(data)[:n])
        self.size += n
        return n


@dataclass(frozen=True)
class Written:
    size: int
    sha256: str


def write_file(path: str | Path, content: bytes | str | Callable[[Any], None]) -> Written:
    """Write bytes, text, or whatever `content(file)` writes (e.g. `lambda f: torch.save(obj, f)`),
    flushed and fsynced; returns its size and SHA-256. Raises the OSError the disk raised (ENOSPC,
    EROFS, ...), also where torch would only report `unexpected pos`."""
    path = Path(path)
    try:
        with _open_for_write(path) as handle:
            writer = _HashingWriter(handle)
            try:
                if callable(content):
                    content(writer)
                else:
                    writer.write(content.encode() if isinstance(content, str) else content)
                handle.flush()
                os.fsync(handle.fileno())
            except RuntimeError as err:
                if writer.error is not None:  # torch's "unexpected pos": the real cause is the OSError
                    raise writer.error from err
                raise
    except OSError as err:
        if err.filename is None:  # a failed write() names no file: say which one
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    return Written(writer.size, writer.sha256.hexdigest())


def save_tensors(obj: Any, path: str | Path) -> Written:
    """torch.save through write_file (loadable with torch.load(weights_only=True))."""
    return write_file(path, lambda f: torch.save(obj, f))


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
