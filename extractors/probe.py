"""Content hashing, fetching remote inputs, and ffprobe-based probing with specific failure reasons."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import Reject

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def cache_name(uri: str, sha256: str) -> str:
    """File name of a remote input's local copy: its sha256 plus the URL path's extension (decoders
    and ffmpeg use it as a container hint); query strings and odd characters never reach the name."""
    from urllib.parse import urlsplit

    ext = Path(urlsplit(uri).path).suffix.lower()
    return sha256 + (ext if ext[1:].isalnum() and len(ext) <= 8 else "")


def local_copy(uri: str, sha256: str, size: int | None, cache_dir: str | os.PathLike) -> str:
    """The local file every stage after ingest reads for a source: the file itself for local
    inputs, else the copy fetched into ``cache_dir`` under its sha256. A local file whose size no
    longer matches what was ingested, or a missing copy, is Reject('source_changed'): its clips
    would not be the bytes the dataset describes."""
    path = _local_path(uri) if is_local(uri) else str(Path(cache_dir) / cache_name(uri, sha256))
    if not os.path.isfile(path):
        what = "the input file" if is_local(uri) else f"its local copy {path}"
        raise Reject("source_changed", f"{what} is gone since ingest (sha256 {sha256[:16]})", path=path)
    if size is not None and os.path.getsize(path) != size:
        raise Reject("source_changed", f"{path} is {os.path.getsize(path)} bytes, not the {size} bytes ingested "
                     f"(sha256 {sha256[:16]}): the file changed after ingest", path=path,
                     size_now=os.path.getsize(path), size_ingested=size)
    return path


def fetch(uri: str, cache_dir: str | os.PathLike) -> tuple[str, str, int]:
    """Return (local_path, sha256, size) for ``uri``; remote URLs are copied into ``cache_dir``.

    Remote bytes are hashed while they stream and stored under their hash, written atomically.
    """
    if is_local(uri):
        path = _local_path(uri)
        if not os.path.isfile(path):
            raise Reject("not_a_file", f"{uri} is not a regular file")
        return path, sha256_file(path), os.path.getsize(path)
    import fsspec

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".fetch.", suffix=Path(uri).suffix)
    try:
        with os.fdopen(fd, "wb") as out, fsspec.open(uri, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except Reject:
        raise
    except Exception as e:  # noqa: BLE001 - any backend failure is a fetch_error row
        os.unlink(tmp)
        raise Reject("fetch_error", f"cannot read {uri}: {e}") from e
    digest = h.hexdigest()
    final = cache / cache_name(uri, digest)
    os.replace(tmp, final)
    return str(final), digest, size


@dataclass(frozen=True)
class Probe:
    container: str
    duration_s: float
    video_codec: str
    coded_width: int
    coded_height: int
    rotation: int  # clockwise degrees the display matrix turns coded frames by (ffprobe reports counter-clockwise)
    fps_declared: float
    n_frames_declared: int | None
    audio_codec: str | None
    audio_sample_rate: int | None
    audio_channels: int | None
    audio_duration_s: float | None

    @property
    def width(self) -> int:
        return self.coded_height if self.rotation in (90, 270) else self.coded_width

    @property
    def height(self) -> int:
        return self.coded_width if self.rotation in (90, 270) else self.coded_height

    def to_dict(self) -> dict:
        return asdict(self)


def _rate(s: str | None) -> float:
    if not s or s in ("0/0", "N/A"):
        return 0.0
    num, _, den = s.partition("/")
    return float(num) / float(den or 1) if float(den or 1) else 0.0


def _rotation(stream: dict) -> int:
    rot = None
    for sd in stream.get("side_data_list", []) or []:
        if "rotation" in sd:
            rot = float(sd["rotation"])
    if rot is None and "rotate" in (stream.get("tags") or {}):
        rot = float(stream["tags"]["rotate"])  # legacy tag, same sense as the display matrix here
    if rot is None:
        return 0
    return int(round(-rot / 90.0)) * 90 % 360


def _looks_like_container(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(64)
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide") or head[:4] in (b"\x1aE\xdf\xa3", b"RIFF")


def probe(path: str, video_codecs: tuple[str, ...]) -> Probe:
    """Probe ``path`` with ffprobe; raise ``Reject`` with a specific reason when it cannot be used."""
    if os.path.getsize(path) == 0:
        raise Reject("empty_file", f"{path} has zero bytes")
    if shutil.which("ffprobe") is None:
        raise RuntimeError("ffprobe not found on PATH; run scripts/setup.sh (installs ffmpeg)")
    cmd = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", path]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    err = p.stderr.strip()
    info = json.loads(p.stdout or "{}") if p.stdout.strip() else {}
    if p.returncode != 0 or "format" not in info:
        low = err.lower()
        if ("moov atom not found" in low or "invalid data" in low) and _looks_like_container(path):
            raise Reject("truncated", f"container index is missing, the file ends early ({err.splitlines()[-1] if err else ''})",
                         ffprobe=err[-500:])
        raise Reject("unreadable", f"ffprobe cannot parse the file: {err.splitlines()[-1] if err else 'no output'}",
                     ffprobe=err[-500:])
    if "partial file" in err.lower():
        raise Reject("truncated", f"the stream data ends before the container says it does ({err.splitlines()[-1]})",
                     ffprobe=err[-500:])
    streams = info.get("streams", [])
    fmt = info["format"]
    video = [s for s in streams if s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic")]
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not video:
        kinds = sorted({s.get("codec_type", "?") for s in streams}) or ["none"]
        raise Reject("no_video_stream", f"no video stream (streams: {', '.join(kinds)})", streams=kinds)
    v = video[0]
    codec = v.get("codec_name") or "unknown"
    if codec not in video_codecs:
        raise Reject("unsupported_codec", f"video codec {codec!r} is not in the allow-list {list(video_codecs)}",
                     codec=codec)
    duration = float(fmt.get("duration") or v.get("duration") or 0.0)
    if duration <= 0:
        raise Reject("unreadable", "the container declares no duration", ffprobe=err[-500:])
    a = audio[0] if audio else None
    nb = v.get("nb_frames")
    return Probe(
        container=fmt.get("format_name", ""),
        duration_s=duration,
        video_codec=codec,
        coded_width=int(v.get("width") or 0),
        coded_height=int(v.get("height") or 0),
        rotation=_rotation(v),
        fps_declared=_rate(v.get("avg_frame_rate")) or _rate(v.get("r_frame_rate")),
        n_frames_declared=int(nb) if nb and str(nb).isdigit() else None,
        audio_codec=a.get("codec_name") if a else None,
        audio_sample_rate=int(a["sample_rate"]) if a and a.get("sample_rate") else None,
        audio_channels=int(a["channels"]) if a and a.get("channels") else None,
        audio_duration_s=float(a["duration"]) if a and a.get("duration") else None,
    )
