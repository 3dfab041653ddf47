"""Process trees on Linux, from /proc (no psutil): what a launcher needs to stop a whole run whose
children sit in sessions of their own (torchrun's workers, Ray's GCS and raylet)."""
from __future__ import annotations

from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


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
