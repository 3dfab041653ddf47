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
    """Face Mesh in tracking mode on a window around the speaker. ``process`` returns (478, 3)
    landmarks in full-frame normalised coordinates (x by width, y by height, z in x's scale) of the
    face nearest to ``expect_box`` ([x0, y0, x1, y1] normalised), or None when no face is tracked there.

    Face Mesh's own detector (short range) only finds faces that fill a good part of its 128 px input,
    so a full frame with a small speaker (a full-body portrait, a wide shot) never locks on. With
    ``window_scale`` set, the mesh runs on a square window of that many times the speaker box,
    resampled to between ``min_px`` and ``max_px`` pixels (upscaled for small faces). The window stays
    put while the face stays well inside it (tracking state carries over between frames) and is
    re-centred when the face drifts or changes size. Without it the whole frame is meshed (measured:
    less jitter for large faces, since the window's re-centring perturbs tracking). One instance per
    clip; not thread-safe."""

    def __init__(self, max_faces: int = 2, min_detection: float = 0.5, min_tracking: float = 0.5,
                 window_scale: float | None = None, min_px: int = 256, max_px: int = 512):
        from mediapipe.python.solutions import face_mesh

        self._fm = face_mesh.FaceMesh(static_image_mode=False, max_num_faces=max_faces, refine_landmarks=True,
                                      min_detection_confidence=min_detection, min_tracking_confidence=min_tracking)
        self.window_scale, self.min_px, self.max_px = window_scale, min_px, max_px
        self._win: tuple[float, float, float, int] | None = None  # x0, y0, side (frame px), output px

    def _window(self, box, w: int, h: int) -> tuple[float, float, float, int]:
        if self.window_scale is None:
            return 0.0, 0.0, float(max(w, h)), 0
        bx0, by0, bx1, by1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
        cx, cy, size = (bx0 + bx1) / 2, (by0 + by1) / 2, max(bx1 - bx0, by1 - by0, 8.0)
        if self._win is not None:
            x0, y0, side, _ = self._win
            off = max(abs(cx - (x0 + side / 2)), abs(cy - (y0 + side / 2))) / side
            if off < 0.12 and 0.75 < size * self.window_scale / side < 1.33:
                return self._win
        side = size * self.window_scale
        px = int(min(self.max_px, max(self.min_px, round(side))))
        self._win = (cx - side / 2, cy - side / 2, side, px)
        return self._win

    def process(self, rgb: np.ndarray, expect_box) -> np.ndarray | None:
        import cv2

        h, w = rgb.shape[:2]
        x0, y0, side, px = self._window(expect_box, w, h)
        if px:
            s = px / side
            m = np.array([[s, 0.0, -x0 * s], [0.0, s, -y0 * s]])
            crop = cv2.warpAffine(rgb, m, (px, px), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            sx = sy = side  # window -> frame pixels
        else:
            crop, sx, sy = rgb, float(w), float(h)
        res = self._fm.process(crop)
        faces = res.multi_face_landmarks or []
        if not faces:
            return None
        # the expected box in the meshed image's normalised coordinates
        cx = ((expect_box[0] + expect_box[2]) / 2 * w - x0) / sx
        cy = ((expect_box[1] + expect_box[3]) / 2 * h - y0) / sy
        best, best_d = None, np.inf
        for f in faces:
            lm = f.landmark
            # cheap choice first: the face outline's extremes (forehead 10, chin 152, cheeks 234/454)
            xs = (lm[234].x, lm[454].x)
            ys = (lm[10].y, lm[152].y)
            fx0, fx1, fy0, fy1 = min(xs), max(xs), min(ys), max(ys)
            inside = fx0 - 0.1 <= cx <= fx1 + 0.1 and fy0 - 0.1 <= cy <= fy1 + 0.1
            d = np.hypot((fx0 + fx1) / 2 - cx, (fy0 + fy1) / 2 - cy)
            if inside and d < best_d:
                best, best_d = f, d
        if best is None:
            return None
        a = landmarks_to_array(best)
        if px:
            a[:, 0] = (x0 + a[:, 0] * side) / w
            a[:, 1] = (y0 + a[:, 1] * side) / h
            a[:, 2] = a[:, 2] * side / w
        return a

    def close(self) -> None:
        self._fm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
