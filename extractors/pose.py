"""Head pose by a rigid similarity fit of stable MediaPipe landmarks to a canonical face template,
and the pose-normalised expression geometry derived from it. Pure numpy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Landmarks that barely move with expression: forehead, nose bridge, eye corners, temples, cheekbones.
STABLE = np.array([10, 151, 9, 8, 67, 297, 109, 338, 54, 284, 168, 6, 197, 195, 5, 4, 33, 133, 362, 263,
                   127, 356, 234, 454, 143, 372, 116, 345, 70, 300, 63, 293])
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263
FOREHEAD, CHIN = 10, 152
# inner lips (upper 13, lower 14) and mouth corners (61, 291)
LIP_UPPER, LIP_LOWER, MOUTH_LEFT, MOUTH_RIGHT = 13, 14, 61, 291
N_LANDMARKS = 478

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "models" / "assets" / "face_template_v1.npy"


def to_metric(lm_norm: np.ndarray, width: int, height: int) -> np.ndarray:
    """MediaPipe's image-normalised (x, y, z) to pixel units (z shares x's scale)."""
    out = np.asarray(lm_norm, np.float64).copy()
    out[..., 0] *= width
    out[..., 1] *= height
    out[..., 2] *= width
    return out


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Umeyama: (s, R, t) minimising || s R src_i + t - dst_i ||^2 with R a proper rotation."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    r = u @ np.diag(sign) @ vt
    var = (a ** 2).sum() / len(src)
    s = float((d * sign).sum() / var)
    t = mu_d - s * r @ mu_s
    return s, r, t


def canonical_frame(mesh: np.ndarray) -> np.ndarray:
    """Express a mesh in its own canonical frame: origin at the stable-point centroid, x from the right
    to the left outer eye corner, y from forehead to chin (image convention, y down), unit
    inter-ocular distance."""
    x = mesh[LEFT_EYE_OUTER] - mesh[RIGHT_EYE_OUTER]
    iod = np.linalg.norm(x)
    x = x / iod
    y = mesh[CHIN] - mesh[FOREHEAD]
    y = y - x * (x @ y)
    y /= np.linalg.norm(y)
    z = np.cross(x, y)
    basis = np.stack([x, y, z])
    return (mesh - mesh[STABLE].mean(0)) @ basis.T / iod


def build_template(meshes: np.ndarray, iters: int = 5) -> np.ndarray:
    """Generalised Procrustes mean of (F, 478, 3) metric meshes, in canonical frame and IOD units."""
    ref = canonical_frame(meshes[0])
    for _ in range(iters):
        aligned = []
        for m in meshes:
            s, r, t = similarity_fit(m[STABLE], ref[STABLE])
            aligned.append((s * (r @ m.T)).T + t)
        ref = canonical_frame(np.median(np.stack(aligned), axis=0))
    return ref.astype(np.float32)


def load_template(path: str | Path = TEMPLATE_PATH) -> np.ndarray:
    t = np.load(path, allow_pickle=False)
    if t.shape != (N_LANDMARKS, 3):
        raise ValueError(f"{path}: template shape {t.shape}, expected ({N_LANDMARKS}, 3)")
    return t.astype(np.float64)


def head_pose(mesh: np.ndarray, template: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
    """Pose of a metric mesh: mesh ~ s R template + t. Returns (s, R, t, rms residual in IOD units)."""
    s, r, t = similarity_fit(template[STABLE], mesh[STABLE])
    pred = (s * (r @ template[STABLE].T)).T + t
    resid = float(np.sqrt(((pred - mesh[STABLE]) ** 2).sum(1).mean()) / s)
    return s, r, t, resid


def normalise(mesh: np.ndarray, s: float, r: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Undo the pose: back into the template frame (IOD units)."""
    return ((mesh - t) @ r) / s


def euler_deg(r: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from a rotation matrix (y-x-z convention, image axes)."""
    yaw = np.degrees(np.arcsin(-np.clip(r[2, 0], -1, 1)))
    pitch = np.degrees(np.arctan2(r[2, 1], r[2, 2]))
    roll = np.degrees(np.arctan2(r[1, 0], r[0, 0]))
    return float(yaw), float(pitch), float(roll)


def rotation_angle_deg(r1: np.ndarray, r2: np.ndarray) -> float:
    """Geodesic angle between two rotations."""
    c = (np.trace(r1.T @ r2) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(c, -1, 1))))


def neutral_shape(normalised: np.ndarray, mouth_open: np.ndarray | None = None) -> np.ndarray:
    """Robust neutral (identity) geometry of one speaker: the per-vertex median over the frames whose
    mouth opening is in the lowest third (closed-mouth frames), or over all frames."""
    x = normalised
    if mouth_open is not None and len(mouth_open) >= 6:
        x = x[mouth_open <= np.percentile(mouth_open, 33)]
    return np.median(x, axis=0)


def mouth_opening(normalised: np.ndarray) -> np.ndarray:
    """Inner-lip gap in IOD units, per frame."""
    return np.linalg.norm(normalised[:, LIP_UPPER] - normalised[:, LIP_LOWER], axis=-1)


def collect_meshes(path: str, step: int = 5, max_side: int = 1280) -> np.ndarray:
    """Metric Face Mesh landmarks of every ``step``-th 30 fps frame of a video (largest face)."""
    from .landmarks import MeshTracker
    from .media import iter_frames, open_video, timeline
    from .probe import probe

    pr = probe(path, ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"))
    vr = open_video(path, pr.width, pr.height, max_side)
    tl = timeline(vr, pr.duration_s)
    out = []
    with MeshTracker(max_faces=1) as mt:
        for _, frame in iter_frames(vr, tl, np.arange(0, tl.n_out, step)):
            lm = mt.process(frame, (0.0, 0.0, 1.0, 1.0))
            if lm is not None:
                out.append(to_metric(lm, frame.shape[1], frame.shape[0]))
    return np.stack(out) if out else np.zeros((0, N_LANDMARKS, 3))
