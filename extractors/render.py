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


def draw_mesh(verts: np.ndarray, size: int, edges: np.ndarray, extent: float = 2.2) -> np.ndarray:
    """Wireframe of template-frame vertices (IOD units, y down), orthographic, ``size`` px square."""
    import cv2

    img = np.full((size, size, 3), 24, np.uint8)
    if np.isnan(verts).any():
        return img
    p = (verts[:, :2] / extent + 0.5) * size
    p = np.round(p).astype(np.int32)
    for a, b in edges:
        cv2.line(img, tuple(int(v) for v in p[a]), tuple(int(v) for v in p[b]), (200, 200, 200), 1, cv2.LINE_AA)
    return img
