"""Which face is saying *this* speech: a synchronisation score of a face track, from Light-ASD's visual
embedding and what is said, for ingest to choose the speaker among several comparable faces and to score
each clip's face (clips.asd_sync, a part of extraction's sync score).

Light-ASD (models/light_asd.py) turns a track's grey face crops into a 128-d visual embedding per 25 fps
frame and the MFCC into an audio embedding, then fuses them. Its fused speaking logit says whether a face
talks, not whether it says what is heard: two talking faces side by side, one of them dubbed by the
other's speech, both score as speaking. This model asks the second question. A ridge regression predicts
the visual embedding (z-scored per track run) from what is being said around each frame: the hidden states
of Whisper-base's encoder after block 1 (models/av_sync.SpeechEncoder on the run's own 16 kHz audio, read
at 25 fps), z-scored per run, projected on the training data's first PCA_DIMS principal directions,
+-CONTEXT frames; the projection and the ridge weights fold into one (512 (2 CONTEXT + 1), 128) matrix. A
track's sync over a window is the mean over the 128 dimensions of the correlation of predicted and
observed embeddings, at the best lag within +-MAX_LAG frames.

The first version predicted the visual embedding from Light-ASD's own audio embedding (an MFCC encoder
trained to tell speech from silence, so any voice's loudness follows a talking mouth): on bench_asd's
pairs of people, leave the two out, it told a face under its own speech from the same face under another
person's with an AUC of 0.91 against 0.95 for the speech states, and chose the face that speaks a given
speech 92% of the time against 95% (bench/RESULTS.md). It reuses the crops' embeddings Light-ASD computes
anyway; the encoder's two blocks cost about 0.4 ms CPU per frame (one thread). Where no face says what is
heard (a voice-over), it can still rank one face well above another: it chooses, it does not verify. The
weights are one float32 matrix in a safetensors file (no pickle; the encoder's sha256 in its metadata,
checked on load). numpy, and torch for the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .av_sync import LAYER, WIDTH, SpeechEncoder, fitted_encoder
from .ridge_sync import auc, context, fit_projected, lagged_corr, load_weights, resolve_weights, save_weights, zscore

EMB = 128  # Light-ASD's visual embedding width
ENCODER = "whisper-base"  # the speech states' encoder (models/av_sync.SpeechEncoder, its block LAYER)
PCA_DIMS = 32  # principal directions of the z-scored speech states kept
CONTEXT = 3  # 25 fps frames of speech states either side of a frame
ALPHA = 1e3  # ridge penalty
DIM = WIDTH * (2 * CONTEXT + 1)
FPS = 25  # Light-ASD's frame rate
MAX_LAG = 2  # frames (80 ms) of audio-video offset searched either way
MIN_FRAMES = 25  # a window with fewer frames of the track has no score
KEY = "m2fd.asd_sync"
SHIPPED = Path(__file__).resolve().parent / "assets" / "asd-sync-v2" / "asd_sync.safetensors"
SHIPPED_SHA256 = "ba7f1c5afe866c48eee19f0ef1c7b51184ac699585101364a348f01c3c27ce4d"  # scripts/train_asd_sync.py


def speech_features(states: np.ndarray) -> np.ndarray:
    """(T, 512) speech states of one run -> (T, DIM) model input."""
    return context(zscore(np.asarray(states, np.float32)), CONTEXT)


@dataclass(frozen=True)
class AsdSync:
    weights: np.ndarray  # (DIM, EMB)
    sha256: str | None = None
    info: dict | None = None
    encoder: SpeechEncoder | None = field(default=None, compare=False, repr=False)

    def speech_states(self, audio: np.ndarray | None, n: int) -> np.ndarray | None:
        """A run's 16 kHz mono ``audio`` (from its first frame's time) -> its (n, 512) speech states at
        25 fps; None where there is no audio or it is under 40 ms."""
        if audio is None:
            return None
        if self.encoder is None:
            raise ValueError("this ASD-sync model was loaded without its speech encoder (models.asd_sync.load)")
        return self.encoder.states(audio, n, FPS)

    def signals(self, ve: np.ndarray, states: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One contiguous run's visual embeddings (T, 128) and speech states (T, 512) -> (predicted,
        observed) visual embeddings, each z-scored over the run (float32, (T, 128)); the predicted rows
        are NaN (no score) where the run has no speech states."""
        obs = zscore(np.asarray(ve, np.float32))
        if states is None or len(states) != len(obs):
            return np.full(obs.shape, np.nan, np.float32), obs
        return zscore(speech_features(states) @ self.weights), obs


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
    """Folded weights (DIM, 128) from ``runs()``, a function giving an iterable of (visual embeddings
    (T, 128), speech states (T, 512)) of contiguous runs of tracks that speak what is heard, read twice
    (ridge_sync.fit_projected)."""
    return fit_projected(lambda: ((st, zscore(np.asarray(ve, np.float32))) for ve, st in runs()), WIDTH, PCA_DIMS,
                         CONTEXT, alpha)


def _settings() -> dict:
    return {"emb": EMB, "encoder": ENCODER, "layer": LAYER, "pca_dims": PCA_DIMS, "context": CONTEXT, "fps": FPS,
            "max_lag": MAX_LAG}


def save(path: str | Path, weights: np.ndarray, info: dict, encoder_sha256: str) -> str:
    """Write the weights (safetensors, the settings and the encoder's sha256 in its metadata) atomically;
    -> sha256."""
    return save_weights(path, weights, KEY, {**_settings(), "encoder_sha256": encoder_sha256, "info": info})


def load(path: str | Path, encoder_dir: str | Path | None = None) -> AsdSync:
    """Load ``save``'s file (the shipped one's sha256 checked); raises on other settings. With
    ``encoder_dir`` (the Whisper-base CTranslate2 folder), also the speech encoder, whose model.bin must have
    the sha256 the weights were fitted with."""
    w, sha, meta = load_weights(path, KEY, _settings(), (DIM, EMB), SHIPPED, SHIPPED_SHA256, "ASD-sync")
    return AsdSync(w, sha, meta.get("info"), fitted_encoder(encoder_dir, meta, path, "ingest.asd_sync_encoder"))


def resolve(value: str | None) -> Path | None:
    """Config value -> weights file: "shipped" = models/assets/asd-sync-v2; "" or None = off; else a path."""
    return resolve_weights(value, SHIPPED, "ingest.asd_sync_model")


def leave_one_person_out(runs: list[tuple[str, np.ndarray, np.ndarray]], window: int = 250, others: int = 4,
                         alpha: float = ALPHA) -> dict:
    """Honest figures on runs of several people: ``runs`` holds (person, visual embeddings, speech states).
    For each person, a model fitted on the others scores that person's runs in windows of ``window`` frames:
    with their own speech (real), the speech of ``others`` other people (dubbed), and, for the same speech,
    the person's own track against another person's track (the choice among two faces). -> {"auc",
    "pairs", "real", "dubbed"}."""
    people = sorted({r[0] for r in runs})
    real: list[float] = []
    dubbed: list[float] = []
    right: list[bool] = []
    for who in people:
        model = AsdSync(fit(lambda: ((v, st) for p, v, st in runs if p != who), alpha))
        rest = sorted((r for r in runs if r[0] != who), key=lambda r: -len(r[1]))  # the longest runs first
        rest = [r for r in rest if len(r[1]) >= window] or rest[:others]
        pick = rest[:: max(1, len(rest) // others)][:others]
        for _, ve, st in (r for r in runs if r[0] == who):
            for s in range(0, max(1, len(ve) - window + 1), window):
                v, a = ve[s: s + window], st[s: s + window]
                real.append(_whole(model, v, a))
                for _, ove, ost in pick:
                    m = min(len(v), len(ove))
                    dubbed.append(_whole(model, v[:m], ost[:m]))
                    right.append(_whole(model, v[:m], a[:m]) > _whole(model, ove[:m], a[:m]))
    return {"auc": auc(real, dubbed), "pairs": float(np.mean(right)) if right else float("nan"),
            "real": real, "dubbed": dubbed, "n_pairs": len(right)}


def _whole(model: AsdSync, ve: np.ndarray, states: np.ndarray) -> float:
    return run_sync(*model.signals(ve, states))


def run_sync(pred: np.ndarray, obs: np.ndarray) -> float:
    """window_sync over all of a run's frames (NaN below MIN_FRAMES)."""
    return float(window_sync(pred, obs, np.array([len(pred) // 2]), len(pred))[0])
