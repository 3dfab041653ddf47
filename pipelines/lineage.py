"""Code version and run lineage recorded with every output."""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_version() -> dict:
    try:
        version = metadata.version("m2fd")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    out = {"package": version, "git_commit": None, "git_dirty": None}
    try:
        out["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10, check=True).stdout.strip()
        st = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=10, check=True).stdout
        out["git_dirty"] = bool(st.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out
