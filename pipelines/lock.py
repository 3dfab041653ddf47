"""One writer per dataset directory: an exclusive advisory lock with a clear error."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


class DatasetLocked(RuntimeError):
    pass


class DatasetLock:
    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / ".m2fd.lock"
        self._fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DatasetLocked(f"dataset {self.path.parent} is being written by another run ({holder or 'unknown'}); "
                                f"wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def sweep_temp(out: Path) -> int:
    """Remove temp files a killed writer left behind (atomic writes go through `.<name>.*.tmp`).
    Call only while holding the dataset lock."""
    n = 0
    for p in out.rglob(".*.tmp"):
        if ".dagster" not in p.parts and p.is_file():
            p.unlink()
            n += 1
    return n
