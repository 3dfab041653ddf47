"""Face detection (MediaPipe) and a greedy IoU tracker that picks the speaker track."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class FaceDetector:
    """MediaPipe BlazeFace detector. ``detect`` returns an (N, 5) array [x0, y0, x1, y1, score],
    coordinates normalised to the frame. Keep one instance per worker; it is not thread-safe."""

    def __init__(self, model: int = 1, min_score: float = 0.5):
        from mediapipe.python.solutions import face_detection

        self.model, self.min_score = model, min_score
        self._fd = face_detection.FaceDetection(model_selection=model, min_detection_confidence=min_score)

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        res = self._fd.process(rgb)
        out = []
        for d in res.detections or []:
            b = d.location_data.relative_bounding_box
            x0, y0 = max(0.0, b.xmin), max(0.0, b.ymin)
            x1, y1 = min(1.0, b.xmin + b.width), min(1.0, b.ymin + b.height)
            if x1 > x0 and y1 > y0:
                out.append((x0, y0, x1, y1, float(d.score[0])))
        return np.asarray(out, dtype=np.float32).reshape(-1, 5)

    def close(self) -> None:
        self._fd.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between boxes a (N,4) and b (M,4) -> (N, M)."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


@dataclass
class Track:
    track_id: int
    samples: list[int] = field(default_factory=list)  # indices into the detection sample list
    boxes: list[np.ndarray] = field(default_factory=list)  # [x0,y0,x1,y1,score]
    dets: list[int] = field(default_factory=list)  # index of the detection within its sample

    @property
    def last_box(self) -> np.ndarray:
        return self.boxes[-1][:4]


@dataclass
class TrackResult:
    tracks: list[Track]
    n_samples: int

    def presence(self, track_id: int) -> np.ndarray:
        m = np.zeros(self.n_samples, bool)
        for t in self.tracks:
            if t.track_id == track_id:
                m[t.samples] = True
        return m

    def box_at(self, track_id: int) -> np.ndarray:
        """(n_samples, 5) boxes of one track, NaN where absent."""
        out = np.full((self.n_samples, 5), np.nan, np.float32)
        for t in self.tracks:
            if t.track_id == track_id:
                out[t.samples] = np.stack(t.boxes)
        return out


def track(detections: list[np.ndarray], iou_thr: float, max_gap: int) -> TrackResult:
    """Greedy frame-to-frame IoU association. A track survives ``max_gap`` samples without a match."""
    tracks: list[Track] = []
    active: list[Track] = []
    for s, dets in enumerate(detections):
        alive = [t for t in active if s - t.samples[-1] <= max_gap + 1]
        unmatched = list(range(len(dets)))
        if alive and len(dets):
            m = iou(np.stack([t.last_box for t in alive]), dets[:, :4])
            pairs = sorted(((m[i, j], i, j) for i in range(m.shape[0]) for j in range(m.shape[1])), reverse=True)
            used_t, used_d = set(), set()
            for v, i, j in pairs:
                if v < iou_thr:
                    break
                if i in used_t or j in used_d:
                    continue
                used_t.add(i)
                used_d.add(j)
                alive[i].samples.append(s)
                alive[i].boxes.append(dets[j])
                alive[i].dets.append(j)
            unmatched = [j for j in range(len(dets)) if j not in used_d]
        for j in unmatched:
            t = Track(track_id=len(tracks), samples=[s], boxes=[dets[j]], dets=[j])
            tracks.append(t)
            alive.append(t)
        active = alive
    return TrackResult(tracks=tracks, n_samples=len(detections))
