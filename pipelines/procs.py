"""Process trees on Linux, from /proc (no psutil): what a launcher needs to stop a whole run whose
children sit in sessions of their own (torchrun's workers, Ray's GCS and raylet)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cmdline(pid: int) -> bytes:
    """/proc/PID/cmdline (arguments NUL-separated); b"" once it is gone (or for a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_gone(pids: set[int], wait_s: float = 60.0, what: str = "processes") -> None:
    """Wait until every pid is gone or a zombie (nothing of it runs or writes any more)."""
    deadline = time.time() + wait_s
    while any((proc_stat(pid) or ["Z"])[0] != "Z" for pid in pids):
        if time.time() > deadline:
            raise TimeoutError(f"{what} are still alive")
        time.sleep(0.1)


def descendants(pid: int) -> set[int]:
    """pid and every live process below it, by parent links (a process already reparented to init
    after its parent died is no longer found: collect the tree before killing anything)."""
    stats = {int(d.name): proc_stat(int(d.name)) for d in Path("/proc").iterdir() if d.name.isdigit()}
    parent = {p: int(st[1]) for p, st in stats.items() if st}
    tree, grew = {pid}, True
    while grew:
        new = {c for c, pp in parent.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def kill_tree(p: subprocess.Popen, grace_s: float = 0.0, wait_s: float = 60.0) -> None:
    """Stop a launched run and every process it started, whatever their process group or session
    (torchrun's workers, Ray's GCS, raylet and workers), then wait until all are gone or zombies, so
    nothing runs or writes afterwards. grace_s > 0: SIGTERM first and give the run that long to stop
    its children itself; 0: SIGKILL straight away (a crash, as kill -9). The tree is collected first:
    children of a dead parent are reparented and no longer found from it."""
    tree = descendants(p.pid)
    if grace_s > 0:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    tree |= descendants(p.pid)
    try:
        os.killpg(p.pid, signal.SIGKILL)  # its own group, when it was started with start_new_session
    except (ProcessLookupError, PermissionError):
        pass
    for pid in tree - {p.pid}:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    p.kill()
    p.wait()
    wait_gone(tree - {p.pid}, wait_s, f"processes of the killed run {p.pid}")
