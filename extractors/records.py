"""Turn extracted arrays into storage_schemas tables and quality decisions. Pure."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from storage_schemas import FPS, TABLES

from .config import ExtractConfig
from .pose import euler_deg, mouth_opening, rotation_angle_deg


def _fixed(arr: np.ndarray, width: int, valid: np.ndarray) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width, mask=pa.array(~valid))


def _var(arr: np.ndarray, valid: np.ndarray) -> pa.Array:
    n, d = arr.shape
    flat = pa.array(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat, mask=pa.array(~valid))


def _nullable(x: np.ndarray, valid: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(x, np.float32), mask=~valid)


def frames_table(clip: dict, f, z: np.ndarray, recon_err: np.ndarray, image_z: np.ndarray,
                 image_rot: np.ndarray) -> pa.Table:
    """Rows of the frames table for one clip; z/recon/image arrays are per tracked frame."""
    n, t = f.n_frames, f.tracked
    full = lambda a, shape: _scatter(a, t, shape)  # noqa: E731
    eul = np.full((n, 3), np.nan, np.float32)
    for i in np.flatnonzero(t):
        eul[i] = euler_deg(f.rotation[i])
    zf, izf = full(z, (n, z.shape[1])), full(image_z, (n, image_z.shape[1]))
    cols = {
        "clip_id": pa.array([clip["clip_id"]] * n),
        "frame": pa.array(np.arange(n, dtype=np.int32)),
        "t_s": pa.array(clip["start_s"] + np.arange(n) / FPS),
        "tracked": pa.array(t),
        "landmarks": _fixed(np.nan_to_num(f.landmarks).reshape(n, -1), 478 * 3, t),
        "landmark_conf": pa.array(f.conf.astype(np.float32)),
        "rotation": _fixed(np.nan_to_num(f.rotation).reshape(n, 9), 9, t),
        "translation": _fixed(np.nan_to_num(f.translation), 3, t),
        "scale": _nullable(np.nan_to_num(f.scale), t),
        "yaw": _nullable(np.nan_to_num(eul[:, 0]), t),
        "pitch": _nullable(np.nan_to_num(eul[:, 1]), t),
        "roll": _nullable(np.nan_to_num(eul[:, 2]), t),
        "mouth_open": _nullable(np.nan_to_num(mouth_opening(f.geometry)), t),
        "gnpfa_z": _var(np.nan_to_num(zf), t),
        "gnpfa_recon_err": _nullable(np.nan_to_num(full(recon_err, (n,))), t),
        "image_z": _var(np.nan_to_num(izf), t),
        "image_rotation": _fixed(np.nan_to_num(full(image_rot.reshape(-1, 9), (n, 9))), 9, t),
        "audio_mel": _fixed(f.audio_feat, 80, np.ones(n, bool)),
        "audio_db": pa.array(f.audio_db.astype(np.float32)),
        "blendshapes": _fixed(np.nan_to_num(f.blendshapes), 52, t & ~np.isnan(f.blendshapes).any(axis=1)),
        "face_transform": _fixed(np.nan_to_num(f.face_transform).reshape(n, 16), 16,
                                 t & ~np.isnan(f.face_transform).any(axis=(1, 2))),
    }
    return pa.table(cols, schema=TABLES["frames"])


def _scatter(a: np.ndarray, mask: np.ndarray, shape) -> np.ndarray:
    out = np.full(shape, np.nan, np.float32)
    out[mask] = a
    return out


def sync_score(av_sync: float | None, asd_sync: float | None) -> float | None:
    """clip_features.sync_score: AV-sync + the clip's ASD-sync; None where either is."""
    return None if av_sync is None or asd_sync is None else float(av_sync) + float(asd_sync)


def clip_quality(f, z: np.ndarray, recon_err: np.ndarray, image_z: np.ndarray, image_rot: np.ndarray,
                 cfg: ExtractConfig) -> tuple[dict, str | None, str | None]:
    """Per-clip quality figures, and (reason, message) when the clip fails a threshold."""
    q = dict(f.quality)
    q["sync_score"] = sync_score(q.get("av_sync"), q.get("asd_sync"))
    t = f.tracked
    q["recon_err"] = float(recon_err.mean()) if len(recon_err) else None
    if t.any():
        q["image_pose_err_deg"] = float(np.mean([rotation_angle_deg(a, b) for a, b in zip(image_rot, f.rotation[t])]))
        q["image_latent_rel_err"] = float(np.linalg.norm(image_z - z, axis=1).mean() /
                                          max(np.linalg.norm(z, axis=1).mean(), 1e-9))
    else:
        q["image_pose_err_deg"] = q["image_latent_rel_err"] = None
    return (q, *failed_check(q, cfg))


def failed_check(q: dict, cfg: ExtractConfig) -> tuple[str | None, str | None]:
    """(reason, message) of the first threshold a clip's quality figures fail, else (None, None). Every
    figure it reads is known when extraction has tracked the clip (extract_source asks it which clips to
    transcribe), the sync score too: computed here from the AV-sync and ASD-sync figures."""
    sync = sync_score(q.get("av_sync"), q.get("asd_sync"))
    checks = [
        ("low_tracking", q["tracked_ratio"] < cfg.min_tracked_ratio,
         f"speaker tracked in {q['tracked_ratio']:.0%} of frames (< {cfg.min_tracked_ratio:.0%})"),
        ("low_landmark_conf", q["landmark_conf"] < cfg.min_landmark_conf,
         f"mean landmark confidence {q['landmark_conf']:.2f} (< {cfg.min_landmark_conf})"),
        ("jittery", np.isfinite(q["jitter"]) and q["jitter"] > cfg.max_jitter,
         f"mesh jitter {q['jitter']:.4f} IOD/frame^2 (> {cfg.max_jitter})"),
        ("poor_lip_sync", np.isfinite(q["lip_sync"]) and q["lip_sync"] < cfg.min_lip_sync,
         f"lip-sync proxy {q['lip_sync']:.2f} (< {cfg.min_lip_sync})"),
        ("poor_av_sync", q.get("av_sync") is not None and q["av_sync"] < cfg.min_av_sync,
         f"AV-sync score {q.get('av_sync') or 0:.2f} (< {cfg.min_av_sync})"),
        ("poor_sync", sync is not None and sync < cfg.min_sync_score,
         f"sync score {sync or 0:.2f} (AV-sync + ASD-sync; < {cfg.min_sync_score})"),
    ]
    for reason, failed, msg in checks:
        if failed:
            return reason, msg
    return None, None


def _f(x):
    return None if x is None or not np.isfinite(x) else float(x)


def clip_features_row(clip: dict, f, q: dict, status: str, reason: str | None, ckpt: str, engine: str | None) -> dict:
    return {
        "clip_id": clip["clip_id"], "source_id": clip["source_id"], "status": status, "drop_reason": reason,
        "n_frames": int(f.n_frames), "tracked_ratio": float(q["tracked_ratio"]), "landmark_conf": float(q["landmark_conf"]),
        "jitter": _f(q.get("jitter")), "lip_sync": _f(q.get("lip_sync")),
        "speaking_score": _f(clip.get("speaking_score")), "av_sync": _f(q.get("av_sync")),
        "asd_sync": _f(clip.get("asd_sync")), "sync_score": _f(q.get("sync_score")), "recon_err": _f(q.get("recon_err")),
        "image_pose_err_deg": _f(q.get("image_pose_err_deg")), "image_latent_rel_err": _f(q.get("image_latent_rel_err")),
        "neutral": None if np.isnan(f.neutral).any() else f.neutral.reshape(-1).astype(float).tolist(),
        "gnpfa_checkpoint": ckpt, "transcript_engine": engine,
        "face_embedding": _vec(f.face_embedding), "voice_embedding": _vec(f.voice_embedding),
    }


def dropped_features_row(clip: dict, reason: str, ckpt: str) -> dict:
    """The clip_features row of a clip that could not be extracted: its ingest scores, nothing measured."""
    row = dict.fromkeys(TABLES["clip_features"].names)
    row.update({"clip_id": clip["clip_id"], "source_id": clip["source_id"], "status": "dropped", "drop_reason": reason,
                "n_frames": int(clip["n_frames"]), "tracked_ratio": 0.0, "landmark_conf": 0.0,
                "speaking_score": clip.get("speaking_score"), "asd_sync": clip.get("asd_sync"),
                "gnpfa_checkpoint": ckpt})
    return row


def _vec(v) -> list[float] | None:
    return None if v is None or np.isnan(v).any() else np.asarray(v, np.float32).astype(float).tolist()


def training_arrays(feats) -> dict[str, np.ndarray]:
    """Tracked frames of all clips, concatenated: expression offsets, per-frame neutral, crops, rotations."""
    off, neu, crops, rots = [], [], [], []
    for f in feats:
        t = f.tracked
        if not t.any() or np.isnan(f.neutral).any():
            continue
        off.append(f.geometry[t] - f.neutral)
        neu.append(np.repeat(f.neutral[None], int(t.sum()), 0))
        crops.append(f.crops[t])
        rots.append(f.rotation[t])
    if not off:
        return {"offsets": np.zeros((0, 478, 3), np.float32), "neutrals": np.zeros((0, 478, 3), np.float32),
                "crops": np.zeros((0, 64, 64, 3), np.uint8), "rotations": np.zeros((0, 3, 3), np.float32)}
    return {"offsets": np.concatenate(off).astype(np.float32), "neutrals": np.concatenate(neu).astype(np.float32),
            "crops": np.concatenate(crops), "rotations": np.concatenate(rots).astype(np.float32)}


def sample_tracked(feats, fraction: float, seed: int = 0) -> list:
    """Copies of ``feats`` whose ``tracked`` masks keep each tracked frame with probability ``fraction``,
    drawn from a generator seeded by (seed, clip_id): the same frames whatever else is in the dataset
    and in whatever order the clips come."""
    if fraction >= 1.0:
        return list(feats)
    out = []
    for f in feats:
        g = f.__class__(**f.__dict__)
        g.tracked = f.tracked & sample_mask(f.clip_id, f.n_frames, fraction, seed)
        out.append(g)
    return out


def sample_mask(clip_id: str, n_frames: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Which of a clip's frames a seeded sample keeps (each with probability ``fraction``), from a
    generator seeded by (seed, clip_id) alone."""
    import hashlib

    s = int.from_bytes(hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()[:8], "little")
    return np.random.default_rng(s).random(n_frames) < fraction


def split_tail(feats, frac: float = 0.75) -> tuple[list, list]:
    """Per clip, frames before ``frac`` of its length stay in the first list and the rest go to the
    second (as copies whose ``tracked`` masks select those frames): a held-out split in time."""
    first, rest = [], []
    for f in feats:
        idx = np.arange(f.n_frames)
        a, b = f.__class__(**f.__dict__), f.__class__(**f.__dict__)
        a.tracked = f.tracked & (idx < int(frac * f.n_frames))
        b.tracked = f.tracked & (idx >= int(frac * f.n_frames))
        first.append(a)
        rest.append(b)
    return first, rest
