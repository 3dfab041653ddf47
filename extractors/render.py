"""Drawing helpers for previews: landmark overlays and an orthographic wireframe of a mesh. Pure."""
from __future__ import annotations

import numpy as np


def mesh_edges() -> np.ndarray:
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    return np.array(sorted(FACEMESH_TESSELATION), dtype=np.int32)


def draw_landmarks(frame: np.ndarray, lm_norm: np.ndarray | None, color=(0, 255, 0)) -> np.ndarray:
    import cv2

    img = np.ascontiguousarray(frame.copy())
    if lm_norm is None or np.isnan(lm_norm).any():
        cv2.putText(img, "not tracked", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 60, 60), 2)
        return img
    h, w = img.shape[:2]
    for x, y in np.round(lm_norm[:, :2] * [w, h]).astype(int):
        cv2.circle(img, (int(x), int(y)), 1, color, -1, lineType=cv2.LINE_AA)
    return img


def mesh_view(verts: np.ndarray, margin: float = 0.08) -> tuple[float, float, float]:
    """A framing (centre x, centre y, half side) that holds every finite vertex of ``verts`` (one mesh
    (478, 3) or a clip's (n, 478, 3)) with ``margin`` of the side to spare: computed once per clip, the
    camera stays still while the face moves inside it."""
    v = np.asarray(verts, np.float64).reshape(-1, 3)
    v = v[np.isfinite(v).all(1)]
    if not len(v):
        return 0.0, 0.0, 1.1
    lo, hi = v[:, :2].min(0), v[:, :2].max(0)
    half = float((hi - lo).max()) / 2 * (1 + 2 * margin)
    return float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2), max(half, 1e-6)


def project(verts: np.ndarray, size: int, view: tuple[float, float, float]) -> np.ndarray:
    """Orthographic pixel coordinates (n, 2) of template-frame vertices (y down) in a ``size`` px square."""
    cx, cy, half = view
    return (verts[:, :2] - [cx, cy]) / (2 * half) * size + size / 2


def draw_mesh(verts: np.ndarray, size: int, edges: np.ndarray, view: tuple[float, float, float] | None = None) -> np.ndarray:
    """Wireframe of template-frame vertices (IOD units, y down), orthographic, ``size`` px square, framed
    by ``view`` (default: this mesh's own ``mesh_view``; pass the clip's for a steady camera)."""
    import cv2

    img = np.full((size, size, 3), 24, np.uint8)
    if np.isnan(verts).any():
        return img
    p = np.round(project(verts, size, view or mesh_view(verts))).astype(np.int32)
    for a, b in edges:
        cv2.line(img, tuple(int(v) for v in p[a]), tuple(int(v) for v in p[b]), (200, 200, 200), 1, cv2.LINE_AA)
    return img
