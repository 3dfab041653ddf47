"""Find input videos: local paths, globs, fsspec URLs and manifest files (CSV/Parquet/JSONL/TXT)."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

MANIFEST_SUFFIXES = (".csv", ".parquet", ".jsonl", ".txt")
MANIFEST_COLUMNS = ("uri", "path", "url", "video")


@dataclass(frozen=True)
class InputRef:
    uri: str  # local absolute path, or a URL with a scheme
    problem: str | None = None  # set when discovery already knows the input is bad (e.g. not_a_file)
    message: str | None = None

    @property
    def is_remote(self) -> bool:
        return "://" in self.uri and not self.uri.startswith("file://")

    @property
    def local_path(self) -> str:
        return self.uri[len("file://"):] if self.uri.startswith("file://") else self.uri


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _read_manifest(path: Path) -> list[str]:
    suf = path.suffix.lower()
    if suf == ".txt":
        entries = [ln.strip() for ln in path.read_text().splitlines()]
        return [e for e in entries if e and not e.startswith("#")]
    if suf == ".jsonl":
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    elif suf == ".csv":
        import csv

        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(row)
            continue
        col = next((c for c in MANIFEST_COLUMNS if c in row and row[c]), None)
        if col is None:
            raise ValueError(f"manifest {path} row {i}: needs one of the columns {MANIFEST_COLUMNS}")
        out.append(str(row[col]))
    return out


def _is_manifest(p: Path) -> bool:
    return p.is_file() and (p.suffix.lower() in (".csv", ".parquet", ".jsonl") or p.name.endswith(".manifest.txt")
                            or p.name == "manifest.txt")


def _expand_local(p: Path, extensions: tuple[str, ...]) -> list[InputRef]:
    if p.is_dir() and not p.is_symlink():
        found = []
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for fn in sorted(files):
                if not fn.startswith(".") and Path(fn).suffix.lower() in extensions:
                    found += _expand_local(Path(root) / fn, extensions)
        return found
    if p.is_file():
        return [InputRef(str(p.absolute()))]
    if p.is_symlink():
        return [InputRef(str(p.absolute()), "not_a_file", f"{p} is a broken symbolic link")]
    if p.exists():
        return [InputRef(str(p.absolute()), "not_a_file", f"{p} is not a regular file")]
    return [InputRef(str(p.absolute()), "not_a_file", f"{p} does not exist")]


def _expand_url(url: str, extensions: tuple[str, ...]) -> list[InputRef]:
    import fsspec

    try:
        fs, _, paths = fsspec.get_fs_token_paths(url)
    except ImportError as e:  # e.g. s3:// without s3fs
        return [InputRef(url, "fetch_error", f"no filesystem for {url.split('://')[0]}:// ({e})")]
    except Exception as e:  # noqa: BLE001 - any backend error becomes a quarantine row
        return [InputRef(url, "fetch_error", f"cannot open {url}: {e}")]
    proto = url.split("://", 1)[0]
    out = []
    for p in sorted(paths):
        try:
            # one metadata call (a HEAD over HTTP: isdir/exists there GET the whole body); a listing
            # is tried only where the path does not name a video file
            try:
                info = fs.info(p)
            except FileNotFoundError:
                info = None
            if info is None and not fs.isdir(p):
                out.append(InputRef(url, "not_a_file", f"{url} does not exist"))
            elif (info or {}).get("type") == "directory" or info is None or (
                    Path(p).suffix.lower() not in extensions and fs.isdir(p)):
                for q in sorted(fs.find(p)):
                    if Path(q).suffix.lower() in extensions and not Path(q).name.startswith("."):
                        out.append(InputRef(fs.unstrip_protocol(q) if proto != "file" else q))
            else:
                out.append(InputRef(fs.unstrip_protocol(p) if proto != "file" else p))
        except Exception as e:  # noqa: BLE001
            out.append(InputRef(url, "fetch_error", f"cannot list {url}: {e}"))
    return out or [InputRef(url, "not_a_file", f"{url} matched nothing")]


def discover(sources: Iterable[str], extensions: tuple[str, ...]) -> list[InputRef]:
    """Expand user-given sources into input references, sorted and without repeated URIs.

    Directories are walked for files with ``extensions``; an explicitly named file is always taken.
    Manifests (.csv/.parquet/.jsonl, or *.manifest.txt) list paths or URLs, relative to the manifest.
    """
    refs: list[InputRef] = []
    for src in sources:
        src = str(src)
        if "://" in src and not src.startswith("file://"):
            refs += _expand_url(src, extensions)
            continue
        local = src[len("file://"):] if src.startswith("file://") else src
        if _has_glob(local):
            matches = sorted(glob.glob(local, recursive=True))
            if not matches:
                refs.append(InputRef(os.path.abspath(local), "not_a_file", f"glob {src!r} matched nothing"))
            for m in matches:
                refs += _expand_local(Path(m), extensions)
            continue
        p = Path(local)
        if _is_manifest(p):
            for entry in _read_manifest(p):
                if "://" in entry and not entry.startswith("file://"):
                    refs += _expand_url(entry, extensions)
                else:
                    e = entry[len("file://"):] if entry.startswith("file://") else entry
                    q = Path(e) if os.path.isabs(e) else p.parent / e
                    refs += _expand_local(q, extensions)
            continue
        refs += _expand_local(p, extensions)
    seen: dict[str, InputRef] = {}
    for r in refs:
        seen.setdefault(r.uri, r)
    return sorted(seen.values(), key=lambda r: r.uri)
