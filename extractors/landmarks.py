"""MediaPipe Face Mesh (478 refined landmarks) on every 30 fps frame of a clip, locked to the speaker."""
from __future__ import annotations

import numpy as np


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
            pts = np.array([(p.x, p.y, p.z) for p in f.landmark], dtype=np.float32)
            x0, y0 = pts[:, 0].min(), pts[:, 1].min()
            x1, y1 = pts[:, 0].max(), pts[:, 1].max()
            inside = x0 - 0.1 <= cx <= x1 + 0.1 and y0 - 0.1 <= cy <= y1 + 0.1
            d = np.hypot((x0 + x1) / 2 - cx, (y0 + y1) / 2 - cy)
            if inside and d < best_d:
                best, best_d = pts, d
        return best

    def close(self) -> None:
        self._fm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
