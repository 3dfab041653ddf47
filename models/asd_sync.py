"""Which face is saying *this* speech: a synchronisation score of a face track, from Light-ASD's own
embeddings, for ingest to choose the speaker among several comparable faces.

Light-ASD (models/light_asd.py) turns a track's grey face crops into a 128-d visual embedding per 25 fps
frame and the MFCC into a 128-d audio embedding per frame, then fuses them. Its fused speaking logit
says whether a face talks, not whether it says what is heard: two talking faces side by side, one of them
dubbed by the other's speech, both score as speaking. This model asks the second question. A ridge
regression predicts the visual embedding (z-scored per track run) from the audio embeddings of +-CONTEXT
frames (z-scored per run); a track's sync over a window is the mean over the 128 dimensions of the
correlation of predicted and observed embeddings, at the best lag within +-MAX_LAG frames.

It reuses what Light-ASD computes anyway (no second pass over the crops): the cost is one (896 x 128)
product per frame and the windowed correlations. Measured with scripts/train_asd_sync.py, leave one
person out on the shared videos (17 people): for the same 10 s of speech, the track that speaks it scores
above another talking face's track in 91% of pairs (89% for 5 s windows). Where no face says what is heard
(a voice-over), it can still rank one face well above another: it chooses, it does not verify. The weights are one float32 matrix in a safetensors file (no pickle). Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ridge_sync import auc, lagged_corr, load_weights, resolve_weights, save_weights, zscore

EMB = 128  # Light-ASD's embedding width (audio and visual)
CONTEXT = 3  # 25 fps frames of audio embedding either side of a frame
MAX_LAG = 2  # frames (80 ms) of audio-video offset searched either way
MIN_FRAMES = 25  # a window with fewer frames of the track has no score
ALPHA = 300.0  # ridge penalty (leave-one-person-out on the shared videos: 1e2..1e3 within 0.01 of each other)
KEY = "m2fd.asd_sync"
SHIPPED = Path(__file__).resolve().parent / "assets" / "asd-sync-v1" / "asd_sync.safetensors"
SHIPPED_SHA256 = "9de0946025ec6e9e04d052cb206cf0b1bd5caa43f7f659f24f768b866373a471"  # scripts/train_asd_sync.py


def audio_features(ae: np.ndarray) -> np.ndarray:
    """(T, 128) audio embeddings of one contiguous run -> (T, 128 (2 CONTEXT + 1)) model input."""
    n = len(ae)
    a = zscore(np.asarray(ae, np.float32))
    p = np.pad(a, ((CONTEXT, CONTEXT), (0, 0)), mode="edge")
    return np.concatenate([p[i: i + n] for i in range(2 * CONTEXT + 1)], 1)


@dataclass(frozen=True)
class AsdSync:
    weights: np.ndarray  # (EMB (2 CONTEXT + 1), EMB)
    sha256: str | None = None
    info: dict | None = None

    def signals(self, ve: np.ndarray, ae: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One contiguous run's visual and audio embeddings (T, 128) each -> (predicted, observed) visual
        embeddings, each z-scored over the run (float32, (T, 128))."""
        return zscore(audio_features(ae) @ self.weights), zscore(np.asarray(ve, np.float32))


def window_sync(pred: np.ndarray, obs: np.ndarray, centres: np.ndarray, half: int) -> np.ndarray:
    """Sync of one track at each of ``centres`` (frame indices): the mean correlation of ``pred`` and
    ``obs`` (T, 128; NaN rows where the track has no embedding) over the frames within +-``half`` of the
    centre, at the best lag within +-MAX_LAG; NaN with fewer than MIN_FRAMES frames there. A window's
    value depends on that window's frames only."""
    ok = np.isfinite(pred).all(1) & np.isfinite(obs).all(1)
    out = np.full(len(centres), np.nan, np.float32)
    for i, c in enumerate(np.asarray(centres, np.int64)):
        v = lagged_corr(pred, obs, ok, ok, max(0, int(c) - half), min(len(pred), int(c) + half + 1), MAX_LAG,
                        MIN_FRAMES)
        if v is not None:
            out[i] = v
    return out


def fit(runs, alpha: float = ALPHA) -> np.ndarray:
    """Ridge weights from ``runs``: an iterable of (visual, audio) embeddings (T, 128) of contiguous runs
    of tracks that speak what is heard. Accumulates X'X and X'Y run by run."""
    d = EMB * (2 * CONTEXT + 1)
    xtx, xty = np.zeros((d, d)), np.zeros((d, EMB))
    for ve, ae in runs:
        x, y = audio_features(ae).astype(np.float64), zscore(np.asarray(ve, np.float32)).astype(np.float64)
        xtx += x.T @ x
        xty += x.T @ y
    return np.linalg.solve(xtx + alpha * np.eye(d), xty).astype(np.float32)


def _settings() -> dict:
    return {"emb": EMB, "context": CONTEXT, "max_lag": MAX_LAG}


def save(path: str | Path, weights: np.ndarray, info: dict) -> str:
    return save_weights(path, weights, KEY, {**_settings(), "info": info})


def load(path: str | Path) -> AsdSync:
    """Load ``save``'s file (the shipped one's sha256 checked); raises on other settings."""
    w, sha, meta = load_weights(path, KEY, _settings(), (EMB * (2 * CONTEXT + 1), EMB), SHIPPED, SHIPPED_SHA256,
                                "ASD-sync")
    return AsdSync(w, sha, meta.get("info"))


def resolve(value: str | None) -> Path | None:
    """Config value -> weights file: "shipped" = models/assets/asd-sync-v1; "" or None = off; else a path."""
    return resolve_weights(value, SHIPPED, "ingest.asd_sync_model")


def leave_one_person_out(runs: list[tuple[str, np.ndarray, np.ndarray]], window: int = 250, others: int = 4,
                         alpha: float = ALPHA) -> dict:
    """Honest figures on runs of several people: ``runs`` holds (person, visual, audio) embeddings. For each
    person, a model fitted on the others scores that person's runs in windows of ``window`` frames: with
    their own audio (real), the audio of ``others`` other people (dubbed), and, for the same audio, the
    person's own track against another person's track (the choice among two faces). -> {"auc", "pairs",
    "real", "dubbed"}."""
    people = sorted({r[0] for r in runs})
    real: list[float] = []
    dubbed: list[float] = []
    right: list[bool] = []
    for who in people:
        model = AsdSync(fit(((v, a) for p, v, a in runs if p != who), alpha))
        rest = sorted((r for r in runs if r[0] != who), key=lambda r: -len(r[1]))  # the longest runs first
        rest = [r for r in rest if len(r[1]) >= window] or rest[:others]
        pick = rest[:: max(1, len(rest) // others)][:others]
        for _, ve, ae in (r for r in runs if r[0] == who):
            for s in range(0, max(1, len(ve) - window + 1), window):
                v, a = ve[s: s + window], ae[s: s + window]
                own = _whole(model, v, a)
                real.append(own)
                for _, ove, oae in pick:
                    m = min(len(v), len(ove))
                    dubbed.append(_whole(model, v[:m], oae[:m]))
                    right.append(_whole(model, v[:m], a[:m]) > _whole(model, ove[:m], a[:m]))
    return {"auc": auc(real, dubbed), "pairs": float(np.mean(right)) if right else float("nan"),
            "real": real, "dubbed": dubbed, "n_pairs": len(right)}


def _whole(model: AsdSync, ve: np.ndarray, ae: np.ndarray) -> float:
    return run_sync(*model.signals(ve, ae))


def run_sync(pred: np.ndarray, obs: np.ndarray) -> float:
    """window_sync over all of a run's frames (NaN below MIN_FRAMES)."""
    return float(window_sync(pred, obs, np.array([len(pred) // 2]), len(pred))[0])
