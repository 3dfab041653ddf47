"""MediaPipe Face Mesh (478 refined landmarks) on every 30 fps frame of a clip, locked to the speaker."""
from __future__ import annotations

import numpy as np


_TAGS = np.array([0x0A, 0x0F, 0x0D, 0x15, 0x1D], np.uint8)


def landmarks_to_array(landmark_list) -> np.ndarray:
    """NormalizedLandmarkList -> (N, 3) float32.

    Fast path: the serialised message is N records of 17 bytes (field tag, length 15, then x, y, z as
    fixed32 floats with their tags) whenever visibility/presence are unset, as Face Mesh emits them;
    read it with one frombuffer. Anything else takes the per-attribute path."""
    raw = landmark_list.SerializeToString()
    n = len(landmark_list.landmark)
    if len(raw) == 17 * n:
        rec = np.frombuffer(raw, np.uint8).reshape(n, 17)
        if (rec[:, [0, 1, 2, 7, 12]] == _TAGS).all():
            return np.ascontiguousarray(rec[:, [3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16]]).view("<f4").reshape(n, 3).copy()
    return np.array([(p.x, p.y, p.z) for p in landmark_list.landmark], dtype=np.float32)


class MeshTracker:
    """Face Mesh in tracking mode. ``process`` returns (478, 3) image-normalised landmarks of the face
    nearest to ``expect_box`` ([x0, y0, x1, y1] normalised), or None when no face is tracked there.
    One instance per clip (tracking state carries across frames); not thread-safe."""

    def __init__(self, max_faces: int = 2, min_detection: float = 0.5, min_tracking: float = 0.5):
        from mediapipe.python.solutions import face_mesh

        self._fm = face_mesh.FaceMesh(static_image_mode=False, max_num_faces=max_faces, refine_landmarks=True,
                                      min_detection_confidence=min_detection, min_tracking_confidence=min_tracking)

    def process(self, rgb: np.ndarray, expect_box) -> np.ndarray | None:
        res = self._fm.process(rgb)
        faces = res.multi_face_landmarks or []
        if not faces:
            return None
        cx, cy = (expect_box[0] + expect_box[2]) / 2, (expect_box[1] + expect_box[3]) / 2
        best, best_d = None, np.inf
        for f in faces:
            lm = f.landmark
            # cheap choice first: the face outline's extremes (forehead 10, chin 152, cheeks 234/454)
            xs = (lm[234].x, lm[454].x)
            ys = (lm[10].y, lm[152].y)
            x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            inside = x0 - 0.1 <= cx <= x1 + 0.1 and y0 - 0.1 <= cy <= y1 + 0.1
            d = np.hypot((x0 + x1) / 2 - cx, (y0 + y1) / 2 - cy)
            if inside and d < best_d:
                best, best_d = f, d
        if best is None:
            return None
        return landmarks_to_array(best)

    def close(self) -> None:
        self._fm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
