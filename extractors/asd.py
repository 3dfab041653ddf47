"""Face-track inputs of active-speaker detection (Light-ASD): grayscale 112 px crops at 25 fps around a
face box, as the original demo cuts them, and the track bookkeeping between the 30 fps analysis grid
and the model's 25 fps. Pure numpy."""
from __future__ import annotations

import numpy as np

from storage_schemas import AUDIO_SAMPLE_RATE

from .audio_features import mfcc_100hz

CROP = 112
PAD_VALUE = 110  # the original pads frames with this grey before cropping


def asd_crop(frame: np.ndarray, box: np.ndarray, size: int = CROP) -> np.ndarray:
    """(size, size) uint8 grey crop of an RGB frame around a face box (x0, y0, x1, y1 in pixels).

    The original crops a square of side 2.8 s (s = half the box's larger side) reaching from s above the
    box centre, resizes it to 224 px and keeps the central 112 px: a square of side 1.4 s centred 0.4 s
    below the box centre (mouth, nose and cheeks). Sampled bilinearly; outside the frame reads grey 110.

    The grey values of the pixels the taps reach are computed once, on that region of the frame (a view,
    no gather of the RGB frame): the same numbers, in the same order, as converting each tap's pixels."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    s = max(x1 - x0, y1 - y0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 0.4 * s
    side = 1.4 * s
    g = (np.arange(size) + 0.5) / size * side - side / 2 - 0.5
    xs, ys = cx + g, cy + g
    xi, yi = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    fx, fy = (xs - xi).astype(np.float32), (ys - yi).astype(np.float32)
    ry, rx = int(yi[0]), int(xi[0])  # the region's first row and column (the grid increases)
    grey = np.full((int(yi[-1]) - ry + 2, int(xi[-1]) - rx + 2), PAD_VALUE, np.float32)
    ya, yb, xa, xb = max(ry, 0), min(ry + grey.shape[0], h), max(rx, 0), min(rx + grey.shape[1], w)
    if ya < yb and xa < xb:
        px = frame[ya:yb, xa:xb].astype(np.float32)
        grey[ya - ry: yb - ry, xa - rx: xb - rx] = px[..., 0] * 0.299 + px[..., 1] * 0.587 + px[..., 2] * 0.114
    out = np.zeros((size, size), np.float32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            out += grey[(yi + dy - ry)[:, None], (xi + dx - rx)[None, :]] * (wy[:, None] * wx[None, :])
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def asd_grid(n_out: int, fps_in: int = 30, fps_asd: int = 25) -> np.ndarray:
    """Indices on the ``fps_in`` grid of the frames shown at each 1/``fps_asd`` s step."""
    n = int(np.floor((n_out - 1) * fps_asd / fps_in)) + 1 if n_out > 0 else 0
    return np.minimum(np.floor(np.arange(n) * fps_in / fps_asd + 1e-9).astype(np.int64), n_out - 1)


class TrackCrops:
    """Crops of every usable detection, collected while the frames stream by: for each 25 fps frame k,
    the detection sample that governs it (the latest one at or before it) and a crop per detection."""

    def __init__(self, n_out: int, stride: int, min_width_px: float, width_px: float):
        self.grid = asd_grid(n_out)
        self.stride, self.min_w, self.w_px = stride, min_width_px, width_px
        self.sample = np.minimum(self.grid // stride, max(0, (n_out - 1) // stride))
        self.crops: list[dict[int, np.ndarray]] = [{} for _ in range(len(self.grid))]
        self._want = {}
        for k, g in enumerate(self.grid.tolist()):
            self._want.setdefault(g, []).append(k)

    def needed(self) -> np.ndarray:
        return np.unique(self.grid)

    def add(self, out_idx: int, frame: np.ndarray, dets: np.ndarray) -> None:
        """``dets`` are the governing sample's detections (normalised boxes)."""
        ks = self._want.get(out_idx)
        if not ks:
            return
        h, w = frame.shape[:2]
        for j, d in enumerate(dets):
            if (d[2] - d[0]) * self.w_px < self.min_w:
                continue
            c = asd_crop(frame, d[:4] * np.array([w, h, w, h], np.float32))
            for k in ks:
                self.crops[k][j] = c


def track_scores(score, tr, tc: TrackCrops, audio: np.ndarray, min_run: int = 5):
    """Speaking logits of every track that has crops, and its sync signals where the scorer has a sync
    model: -> (scores, syncs), scores {track_id: (first 25 fps frame, logits)}, syncs {track_id: (first
    frame, predicted (n, 128), observed (n, 128))}; each runs from that frame to the track's last, NaN
    where the track was not detected. Each contiguous run of frames is scored on its own by
    ``score(faces, mfcc, audio) -> (logits, sync)`` (the run's MFCC at 100 Hz and 16 kHz ``audio`` from
    its first frame, both from the source's ``audio``), sync None or (predicted, observed)
    (models.light_asd.Scorer.track); runs shorter than ``min_run`` frames (0.2 s) stay NaN."""
    from models.light_asd import AUDIO_PER_VIDEO, VIDEO_FPS

    mfcc = mfcc_100hz(audio)
    per_frame = AUDIO_SAMPLE_RATE // VIDEO_FPS  # audio samples per 25 fps frame

    out, syncs = {}, {}
    for t in tr.tracks:
        det_of = dict(zip(t.samples, t.dets))
        ks = [k for k in range(len(tc.grid)) if det_of.get(int(tc.sample[k])) in tc.crops[k]]
        if not ks:
            continue
        k0, k1 = ks[0], ks[-1] + 1
        sc = np.full(k1 - k0, np.nan, np.float32)
        pred = obs = None
        ks_a = np.asarray(ks)
        breaks = np.flatnonzero(np.diff(ks_a) > 1)
        for run in np.split(ks_a, breaks + 1):
            a, b = int(run[0]), int(run[-1]) + 1
            if b - a < min_run or a * AUDIO_PER_VIDEO >= len(mfcc):
                continue
            faces = np.stack([tc.crops[k][det_of[int(tc.sample[k])]] for k in range(a, b)])
            s, sy = score(faces, mfcc[a * AUDIO_PER_VIDEO: b * AUDIO_PER_VIDEO],
                          audio[a * per_frame: b * per_frame])
            sc[a - k0: a - k0 + len(s)] = s
            if sy is not None:
                if pred is None:
                    pred, obs = (np.full((k1 - k0, sy[0].shape[1]), np.nan, np.float32) for _ in range(2))
                pred[a - k0: a - k0 + len(sy[0])], obs[a - k0: a - k0 + len(sy[1])] = sy
        out[t.track_id] = (k0, sc)
        if pred is not None:
            syncs[t.track_id] = (k0, pred, obs)
    return out, syncs


def per_sample_sync(syncs: dict, tc: TrackCrops, n_samples: int, half: int, step: int = 25) -> dict[int, np.ndarray]:
    """Each track's sync (models.asd_sync.window_sync over +-``half`` 25 fps frames) per detection sample,
    NaN where it has too few frames: computed every ``step`` frames along the track (``step`` 25 = each
    second) and held to the samples nearest each such centre."""
    from models.asd_sync import window_sync

    out = {}
    for tid, (k0, pred, obs) in syncs.items():
        centres = np.arange(0, len(pred), step) + min(step // 2, len(pred) - 1)
        val = window_sync(pred, obs, centres, half)
        s = tc.sample[k0: k0 + len(pred)]  # the sample governing each of the track's frames
        col = np.full(n_samples, np.nan, np.float32)
        col[s] = val[np.minimum(np.arange(len(pred)) // step, len(val) - 1)]
        out[tid] = col
    return out


def per_sample(scores: dict[int, tuple[int, np.ndarray]], tc: TrackCrops, n_samples: int,
               half_window: int = 0) -> dict[int, np.ndarray]:
    """Each track's mean logit per detection sample over the samples within +-``half_window`` of it
    (NaN where it has none): who speaks is decided over about a second, not frame by frame."""
    out = {}
    for tid, (k0, sc) in scores.items():
        s = tc.sample[k0: k0 + len(sc)]
        tot = np.zeros(n_samples)
        cnt = np.zeros(n_samples)
        ok = ~np.isnan(sc)
        np.add.at(tot, s[ok], sc[ok])
        np.add.at(cnt, s[ok], 1)
        here = cnt > 0
        if half_window > 0:
            k = np.ones(2 * half_window + 1)
            tot, cnt = np.convolve(tot, k, "same"), np.convolve(cnt, k, "same")
        out[tid] = np.where(here & (cnt > 0), tot / np.maximum(cnt, 1), np.nan)
    return out


def _span(k0: int, a: int, b: int, fps_in: int, fps_asd: int) -> slice:
    """The 30 fps frames [a, b) as a slice of a track's 25 fps arrays that start at frame ``k0``."""
    ka, kb = int(np.ceil(a * fps_asd / fps_in - 1e-9)), int(np.ceil(b * fps_asd / fps_in - 1e-9))
    return slice(max(0, ka - k0), max(0, kb - k0))


def span_score(scores: dict[int, tuple[int, np.ndarray]], tid: int, a: int, b: int, fps_in: int = 30,
               fps_asd: int = 25) -> float | None:
    """Mean logit of track ``tid`` over the 30 fps frames [a, b); None where it has no score there."""
    if tid not in scores:
        return None
    k0, sc = scores[tid]
    seg = sc[_span(k0, a, b, fps_in, fps_asd)]
    seg = seg[~np.isnan(seg)]
    return float(seg.mean()) if seg.size else None


def span_sync(syncs: dict, tid: int, a: int, b: int, fps_in: int = 30, fps_asd: int = 25) -> float | None:
    """Track ``tid``'s ASD-sync over the 30 fps frames [a, b) (models.asd_sync.run_sync on its frames
    there, its undetected frames left out); None where it has no sync signals or too few frames."""
    from models.asd_sync import run_sync

    if tid not in syncs:
        return None
    k0, pred, obs = syncs[tid]
    sl = _span(k0, a, b, fps_in, fps_asd)
    v = run_sync(pred[sl], obs[sl]) if len(pred[sl]) else float("nan")
    return float(v) if np.isfinite(v) else None
