"""Deterministic WebDataset tar writing and reading, validated against storage_schemas.samples."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from storage_schemas.samples import MEMBERS, REQUIRED, SAMPLE_VERSION


class ShardError(ValueError):
    """A shard or one of its members is malformed; the message names both."""


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def json_bytes(d) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=float).encode()


def validate_sample(key: str, members: dict[str, bytes], where: str = "") -> None:
    missing = [m for m in REQUIRED if m not in members]
    if missing:
        raise ShardError(f"{where}sample {key!r}: missing member(s) {missing}")
    unknown = [m for m in members if m not in MEMBERS]
    if unknown:
        raise ShardError(f"{where}sample {key!r}: unknown member(s) {unknown}")
    if f'"sample_version":"{SAMPLE_VERSION}"'.encode() in members["meta.json"]:
        return  # fast path: written by json_bytes, version matches
    meta = json.loads(members["meta.json"])
    if str(meta.get("sample_version")) != SAMPLE_VERSION:
        raise ShardError(f"{where}member {key}.meta.json: sample version {meta.get('sample_version')!r}, "
                         f"this reader understands {SAMPLE_VERSION!r}")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[str, int]:
    """Write samples (key, {suffix: bytes}) in the given order, members sorted by suffix, with fixed
    metadata, so equal input gives byte-identical tars. Atomic (temp + rename). Returns (sha256, bytes).
    ``samples`` may be a generator: a sample is not needed once it is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as raw:
            out = _Hashing(raw)  # the digest is taken as the bytes go out: the shard is never read back whole
            with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members in samples:
                    validate_sample(key, members, f"{path.name}: ")
                    for suffix in sorted(members):
                        data = members[suffix]
                        tar.addfile(_tarinfo(f"{key}.{suffix}", len(data)), io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out.sha.hexdigest(), out.n


class _Hashing:
    """A write-only file that hashes and counts what passes through it to ``raw``."""

    def __init__(self, raw):
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.raw.write(b)

    def tell(self) -> int:
        return self.n


def _ustar_members(path: str | os.PathLike):
    """Fast sequential walk of a plain USTAR tar (what write_shard produces): yields (name, data
    offset, size) from an mmap. Returns None if the archive uses anything else (pax, GNU long names,
    links), so the caller falls back to tarfile. Raises ShardError on truncation or bad checksums."""
    import mmap

    name = str(path)
    size = os.path.getsize(path)
    if size == 0:
        raise ShardError(f"{name}: empty file, not a tar")
    f = open(path, "rb")
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out = []
    off = 0
    while True:
        if off + 512 > size:
            raise ShardError(f"{name}: truncated or corrupt tar at member {out[-1][0] if out else '(header)'} "
                             f"(archive ends inside a header)")
        hdr = mm[off:off + 512]
        if hdr == b"\0" * 512:
            break
        chk = int(hdr[148:156].strip(b"\0 ") or b"0", 8)
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ShardError(f"{name}: truncated or corrupt tar at offset {off} (bad header checksum)")
        if hdr[156:157] not in (b"0", b"\0") or hdr[257:262] != b"ustar":
            mm.close()
            f.close()
            return None
        prefix = hdr[345:500].rstrip(b"\0")
        nm = hdr[0:100].rstrip(b"\0")
        nm = (prefix + b"/" + nm if prefix else nm).decode()
        sz = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
        if off + 512 + sz > size:
            raise ShardError(f"{name}: member {nm} is truncated ({size - off - 512} of {sz} bytes)")
        out.append((nm, off + 512, sz))
        off += 512 + (sz + 511) // 512 * 512
    return mm, f, out


def iter_shard(path: str | os.PathLike, only: tuple[str, ...] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {suffix: bytes}) per sample, validating each; errors name the shard and member.

    With ``only``, members with other suffixes are checked for presence but not read (their bytes
    are b"" in the result)."""
    if only is not None:
        only = tuple(only) + ("meta.json",)
    name = str(path)
    if not os.path.isfile(path):
        raise ShardError(f"{name}: shard file not found")
    fast = _ustar_members(path)
    if fast is not None:
        mm, fh, members = fast
        try:
            cur_key, cur = None, {}
            for nm, doff, sz in members:
                key, _, suffix = nm.partition(".")
                if key != cur_key:
                    if cur_key is not None:
                        validate_sample(cur_key, cur, f"{name}: ")
                        yield cur_key, cur
                    cur_key, cur = key, {}
                cur[suffix] = b"" if (only is not None and suffix not in only) else mm[doff:doff + sz]
            if cur_key is not None:
                validate_sample(cur_key, cur, f"{name}: ")
                yield cur_key, cur
        finally:
            mm.close()
            fh.close()
        return
    cur_key, cur = None, {}
    member = "(header)"
    size = os.path.getsize(path)
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    ti = tar.next()
                except tarfile.ReadError as e:
                    raise ShardError(f"{name}: truncated or corrupt after member "
                                     f"{(cur_key or '?')} ({e})") from e
                if ti is None:
                    break
                if not ti.isfile():
                    continue
                member = ti.name
                key, _, suffix = ti.name.partition(".")
                if key != cur_key:
                    if cur_key is not None:
                        validate_sample(cur_key, cur, f"{name}: ")
                        yield cur_key, cur
                    cur_key, cur = key, {}
                if only is not None and suffix not in only:
                    if ti.offset_data + ti.size > size:
                        raise ShardError(f"{name}: member {ti.name} is truncated")
                    cur[suffix] = b""  # present, not read
                    continue
                f = tar.extractfile(ti)
                data = f.read() if f else b""
                if len(data) != ti.size:
                    raise ShardError(f"{name}: member {ti.name} is truncated ({len(data)} of {ti.size} bytes)")
                cur[suffix] = data
    except tarfile.ReadError as e:
        raise ShardError(f"{name}: truncated or corrupt tar at member {member} ({e})") from e
    except (OSError, EOFError) as e:
        raise ShardError(f"{name}: truncated or unreadable at member {member} ({e})") from e
    if cur_key is not None:
        validate_sample(cur_key, cur, f"{name}: ")
        yield cur_key, cur


def decode_sample(members: dict[str, bytes]) -> dict:
    out = {}
    for suffix, data in members.items():
        kind = MEMBERS[suffix][0]
        if kind == "npy":
            out[suffix.rsplit(".", 1)[0]] = np.load(io.BytesIO(data), allow_pickle=False)
        elif kind == "json":
            out[suffix.rsplit(".", 1)[0]] = json.loads(data)
        else:
            out[suffix] = data
    return out


def split_of(source_id: str, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """train/val/test by a hash of the speaker's source, so no speaker crosses splits."""
    u = int(hashlib.sha256(source_id.encode()).hexdigest()[:12], 16) / float(16 ** 12)
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def fill_untracked(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Linear interpolation over untracked frames (edges hold the nearest tracked value)."""
    x = np.array(x, np.float32, copy=True)
    if mask.all() or not mask.any():
        return np.nan_to_num(x)
    idx = np.arange(len(x))
    flat = x.reshape(len(x), -1)
    for j in range(flat.shape[1]):
        flat[~mask, j] = np.interp(idx[~mask], idx[mask], flat[mask, j])
    return flat.reshape(x.shape)


def flac_bytes(audio: np.ndarray, sr: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1, 1), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    import cv2

    ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return enc.tobytes()


def build_sample(clip: dict, source: dict, frames: dict, audio: np.ndarray, keyframe: np.ndarray, labels: dict,
                 transcript: dict | None, split: str, schema_version: str, include_landmarks: bool = False,
                 speaker_id: str | None = None) -> dict[str, bytes]:
    """Member bytes of one clip's sample. ``frames`` holds per-frame arrays of the frames table."""
    from storage_schemas import AUDIO_SAMPLE_RATE

    mask = frames["tracked"]
    w, h = float(source["width"]), float(source["height"])
    pose = np.stack([np.radians(frames["yaw"]), np.radians(frames["pitch"]), np.radians(frames["roll"]),
                     frames["tx"] / w, frames["ty"] / h, np.log(np.maximum(frames["scale"], 1e-6))], 1)
    meta = {k: clip[k] for k in ("clip_id", "source_id", "start_s", "end_s", "start_frame", "n_frames", "duration_s",
                                 "fps", "width", "height", "face_box")}
    meta.update({"split": split, "speaker_id": speaker_id, "schema_version": schema_version, "sample_version": SAMPLE_VERSION,
                 "source_sha256": source["sha256"], "tracked_ratio": float(mask.mean())})
    m = {
        "meta.json": json_bytes(meta),
        "latents.npy": npy_bytes(fill_untracked(frames["gnpfa_z"], mask)),
        "pose.npy": npy_bytes(fill_untracked(pose, mask)),
        "mask.npy": npy_bytes(mask.astype(bool)),
        "audio.flac": flac_bytes(audio, AUDIO_SAMPLE_RATE),
        "audio_feat.npy": npy_bytes(frames["audio_mel"].astype(np.float32)),
        "blendshapes.npy": npy_bytes(fill_untracked(frames["blendshapes"], mask)),
        "labels.json": json_bytes(labels),
        "keyframe.jpg": jpeg_bytes(keyframe),
    }
    if transcript is not None:
        m["transcript.json"] = json_bytes(transcript)
    if include_landmarks:
        m["landmarks.npy"] = npy_bytes(fill_untracked(frames["landmarks"], mask).astype(np.float16))
    return m


def keyframe_crop(frame: np.ndarray, box, size: int = 224, expand: float = 1.6) -> np.ndarray:
    import cv2

    hh, ww = frame.shape[:2]
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2 * ww, (y0 + y1) / 2 * hh
    side = max((x1 - x0) * ww, (y1 - y0) * hh) * expand
    a = int(round(cx - side / 2)), int(round(cy - side / 2))
    b = a[0] + int(round(side)), a[1] + int(round(side))
    pad = max(0, -a[0], -a[1], b[0] - ww, b[1] - hh)
    if pad:
        frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        a, b = (a[0] + pad, a[1] + pad), (b[0] + pad, b[1] + pad)
    return cv2.resize(frame[a[1]:b[1], a[0]:b[0]], (size, size), interpolation=cv2.INTER_AREA)


def pack(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of sample indices whose byte sizes sum to at most max_bytes (a sample larger
    than the bound gets a shard of its own)."""
    groups, cur, tot = [], [], 0
    for i, s in enumerate(sizes):
        if cur and tot + s > max_bytes:
            groups.append(cur)
            cur, tot = [], 0
        cur.append(i)
        tot += s + 1024  # tar headers and padding
    if cur:
        groups.append(cur)
    return groups
