"""Audio-visual synchronisation score of a clip: does the mouth move as *this* speech says it should?

A linear (ridge) model predicts the mouth's motion (the 27 jaw/mouth ARKit blendshapes and the mouth
opening, each smoothed over 5 frames and z-scored per clip) from the speech around each 30 fps frame (the
clip's Whisper log-mel, z-scored per clip, pooled to 20 bands, +-4 frames of context). A clip's score is
the mean over those 28 signals of the correlation between predicted and observed motion, at the best lag
within +-3 frames (100 ms). Real talking footage scores well above zero; the same frames under another
person's speech (dubbing, a voice-over, the other face of a two-shot) score near zero: on the shared
videos, leave-one-speaker-out, the per-clip AUC of real against dubbed is about 0.91 (bench/bench_asd.py
measures it), where Light-ASD's speaking score gives 0.62 and the mouth-opening/level proxy 0.75.

The model is one (180, 28) matrix in a safetensors file (no pickle). It is a pure function of the clip's
own arrays: no other clip and no batch changes a clip's score. Pure numpy; no Ray, no Dagster.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage_schemas.vocab import BLENDSHAPES

from .ridge_sync import auc, lagged_corr, load_weights, resolve_weights, save_weights, zscore  # noqa: F401 (auc: av_sync.auc)

MOUTH = tuple(n for n in BLENDSHAPES if n.startswith(("jaw", "mouth")))  # 27 names
BANDS = 20  # the 80 log-mel bins pooled 4 by 4
CONTEXT = 4  # frames of speech either side of a frame
SMOOTH = 5  # frames of the moving average over the mouth signals
MAX_LAG = 3  # frames of audio-video offset searched either way
MIN_FRAMES = 30  # below this many usable frames a clip has no score
ALPHA = 1e4  # ridge penalty (chosen leave-one-speaker-out on the shared videos, see the module docstring)
SHIPPED = Path(__file__).resolve().parent / "assets" / "av-sync-v1" / "av_sync.safetensors"
SHIPPED_SHA256 = "568a55c4ae749ae6f7c3bd3801d43b533b6d600504f9cd85bdc8b8d593597399"  # scripts/train_av_sync.py


def speech_features(audio_mel: np.ndarray) -> np.ndarray:
    """(n, 80) log-mel at 30 fps -> (n, BANDS * (2 CONTEXT + 1)) model input."""
    n = len(audio_mel)
    m = zscore(np.asarray(audio_mel, np.float32)).reshape(n, BANDS, -1).mean(-1)
    p = np.pad(m, ((CONTEXT, CONTEXT), (0, 0)), mode="edge")
    return np.concatenate([p[i: i + n] for i in range(2 * CONTEXT + 1)], 1)


def mouth_signals(blendshapes: np.ndarray, mouth_open: np.ndarray) -> np.ndarray:
    """(n, 52) blendshapes and (n,) mouth opening (NaN where untracked) -> (n, 28) smoothed z-scored
    signals; rows where the face was not tracked stay NaN."""
    idx = [BLENDSHAPES.index(k) for k in MOUTH]
    y = np.concatenate([np.asarray(blendshapes, np.float32)[:, idx], np.asarray(mouth_open, np.float32)[:, None]], 1)
    bad = ~np.isfinite(y).all(1)
    if bad.all():
        return np.full(y.shape, np.nan, np.float32)
    y = np.where(bad[:, None], np.nanmean(y[~bad], 0), y)  # filled only to smooth across short gaps
    k = np.ones(SMOOTH) / SMOOTH
    y = np.stack([np.convolve(np.pad(c, SMOOTH // 2, mode="edge"), k, "valid") for c in y.T], 1)
    y = zscore(y)
    y[bad] = np.nan
    return y


@dataclass(frozen=True)
class AVSync:
    weights: np.ndarray  # (BANDS * (2 CONTEXT + 1), len(MOUTH) + 1)
    sha256: str | None = None
    info: dict | None = None

    def score(self, audio_mel: np.ndarray, blendshapes: np.ndarray, mouth_open: np.ndarray) -> float | None:
        """The clip's synchronisation score (mean correlation of predicted and observed mouth motion at the
        best lag within +-MAX_LAG frames; about -1..1), or None with fewer than MIN_FRAMES usable frames."""
        y = mouth_signals(blendshapes, mouth_open)
        ok = np.isfinite(y).all(1)
        if ok.sum() < MIN_FRAMES or len(audio_mel) != len(y):
            return None
        pred = speech_features(audio_mel) @ self.weights
        best = lagged_corr(pred, y, np.ones(len(y), bool), ok, 0, len(y), MAX_LAG, MIN_FRAMES)
        return None if best is None else round(best, 6)


def fit(clips, alpha: float = ALPHA) -> np.ndarray:
    """Ridge weights from ``clips``: an iterable of (audio_mel, blendshapes, mouth_open) per clip (only the
    tracked frames are used). Accumulates X'X and X'Y clip by clip: memory does not grow with the data."""
    d, k = BANDS * (2 * CONTEXT + 1), len(MOUTH) + 1
    xtx, xty = np.zeros((d, d)), np.zeros((d, k))
    for mel, bs, mo in clips:
        x, y = speech_features(mel), mouth_signals(bs, mo)
        ok = np.isfinite(y).all(1)
        xtx += x[ok].T.astype(np.float64) @ x[ok]
        xty += x[ok].T.astype(np.float64) @ y[ok]
    return np.linalg.solve(xtx + alpha * np.eye(d), xty).astype(np.float32)


def save(path: str | Path, weights: np.ndarray, info: dict) -> str:
    """Write the weights (safetensors, the settings in its metadata) atomically; -> sha256."""
    return save_weights(path, weights, "m2fd.av_sync", {**_settings(), "info": info})


def load(path: str | Path) -> AVSync:
    """Load weights written by ``save``; raises when the file's settings are not this code's, or when the
    shipped file's sha256 is not the one it was released with."""
    w, sha, meta = load_weights(path, "m2fd.av_sync", _settings(), (BANDS * (2 * CONTEXT + 1), len(MOUTH) + 1),
                                SHIPPED, SHIPPED_SHA256, "AV-sync")
    return AVSync(w, sha, meta.get("info"))


def _settings() -> dict:
    return {"bands": BANDS, "context": CONTEXT, "smooth": SMOOTH, "max_lag": MAX_LAG, "mouth": list(MOUTH)}


def resolve(value: str | None) -> Path | None:
    """Config value -> weights file: "shipped" = models/assets/av-sync-v1; "" or None = off; else a path."""
    return resolve_weights(value, SHIPPED, "extract.av_sync_model")


def leave_one_source_out(clips: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], alpha: float = ALPHA,
                         max_frames: int = 300, dubs_per_clip: int = 3) -> tuple[list[float], list[float]]:
    """Honest scores for clips of several sources (people): ``clips`` holds (source, audio_mel, blendshapes,
    mouth_open). For each source, a model fitted on the *other* sources scores that source's clips (their
    first ``max_frames`` frames) with their own speech (real) and with the speech of ``dubs_per_clip``
    clips of other sources (dubbed: the frames under another person's voice). -> (real, dubbed) scores."""
    real: list[float] = []
    dubbed: list[float] = []
    sources = sorted({c[0] for c in clips})
    for s in sources:
        model = AVSync(fit((mel, bs, mo) for src, mel, bs, mo in clips if src != s))
        others = [c for c in clips if c[0] != s]
        step = max(1, len(others) // dubs_per_clip)
        for _, mel, bs, mo in (c for c in clips if c[0] == s):
            n = min(max_frames, len(mel))
            r = model.score(mel[:n], bs[:n], mo[:n])
            if r is not None:
                real.append(r)
            for _, omel, _, _ in others[::step][:dubs_per_clip]:
                m = min(n, len(omel))
                d = model.score(omel[:m], bs[:m], mo[:m])
                if d is not None:
                    dubbed.append(d)
    return real, dubbed
