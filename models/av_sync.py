"""Audio-visual synchronisation score of a clip: does the mouth move as *this* speech says it should?

A linear (ridge) model predicts the mouth's motion (the 27 jaw/mouth ARKit blendshapes and the mouth
opening, each smoothed over 5 frames and z-scored per clip) from what is being said around each 30 fps
frame: the hidden states of Whisper-base's encoder after block LAYER (512 values per 20 ms; phonetic, so a
voice's pitch and timbre weigh less than in a spectrum), computed on the clip's own 16 kHz audio (not
padded to Whisper's 30 s window), z-scored per clip, taken at the frame times, projected on the training
data's first PCA_DIMS principal directions, +-CONTEXT frames of context. A clip's score is the mean over
those 28 signals of the correlation between predicted and observed motion, at the best lag within +-3
frames (100 ms). Real talking footage scores well above zero; the same frames under another person's
speech (dubbing, a voice-over, the other face of a two-shot) score near zero. On the shared videos (every
real clip's face under every other person's speech, the two people left out of the fit), the per-clip AUC
of real against dubbed is 0.94, against 0.86 for the first version's input (the clip's log-mel); measured
by bench/bench_asd.py.

The projection and the ridge weights fold into one (512 (2 CONTEXT + 1), 28) matrix in a safetensors file
(no pickle); its metadata names the encoder's sha256, checked on load. A score is a pure function of the
clip's own audio and frames: no other clip and no batch changes it, and the encoder runs on one thread.
torch and numpy; no Ray, no Dagster.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from storage_schemas.vocab import BLENDSHAPES

from .ridge_sync import (auc, context, fit_projected, lagged_corr, load_weights, resolve_weights,  # noqa: F401 (auc)
                         save_weights, zscore)

MOUTH = tuple(n for n in BLENDSHAPES if n.startswith(("jaw", "mouth")))  # 27 names
ENCODER = "whisper-base"  # the packaged model whose encoder gives the speech states (models/packaged.py)
LAYER = 1  # the encoder block whose output is used (0-based; AUC block 0 0.899, 1 0.937, 2 0.939, 5 0.812: RESULTS)
WIDTH = 512  # Whisper-base's state width
STATES_HZ = 50  # encoder states per second (10 ms mel hop, stride-2 convolution)
WINDOW = 1500  # states per encoder pass (Whisper's 30 s): longer clips run in consecutive windows
PCA_DIMS = 32  # principal directions of the z-scored states kept (16-64 tried: 32 best)
CONTEXT = 4  # frames of speech either side of a frame
SMOOTH = 5  # frames of the moving average over the mouth signals
MAX_LAG = 3  # frames of audio-video offset searched either way
MIN_FRAMES = 30  # below this many usable frames a clip has no score
ALPHA = 1e3  # ridge penalty (leave two people out on the shared videos)
SHIPPED = Path(__file__).resolve().parent / "assets" / "av-sync-v2" / "av_sync.safetensors"
SHIPPED_SHA256 = "6c3552a64d9d57117bba0c56c810a40c5bbb5fe5dd941f0ec14c1eca56583dd6"  # scripts/train_av_sync.py
DIM = WIDTH * (2 * CONTEXT + 1)


class SpeechEncoder:
    """Whisper-base's encoder up to block LAYER (PyTorch, CPU, float32), weights read from the packaged
    CTranslate2 model folder (models/whisper_ct2.py). ``states(audio, n, fps)`` -> (n, 512) per video frame
    (models/asd_sync.py reads them at Light-ASD's 25 fps). The weights' sha256 is checked at once; the
    network is built at first use, so a process that only records lineage never holds it."""

    def __init__(self, model_dir: str | Path, threads: int = 1):
        from .packaged import verified_sha256

        d = Path(model_dir)
        d = d.parent if d.is_file() else d
        self.sha256 = verified_sha256(d / "model.bin")
        self.path, self.threads, self._encoder = d, int(threads), None

    @property
    def encoder(self):
        """The torch encoder, blocks 0..LAYER (built from model.bin on first use; one per process and
        folder, shared by AV-sync and ASD-sync where one worker runs both)."""
        if self._encoder is None:
            self._encoder = _encoder_blocks(str(self.path), self.sha256)
        return self._encoder

    def states(self, audio: np.ndarray, n: int, fps: float = 30.0) -> np.ndarray | None:
        """A clip's 16 kHz mono ``audio`` -> (n, 512) float32 encoder states at the ``n`` frame times
        ((k + 1/2) / ``fps`` s, linearly interpolated), or None where the audio is under 40 ms."""
        import torch
        from whisper.audio import log_mel_spectrogram

        a = np.asarray(audio, np.float32)
        if a.size < 640 or n <= 0:
            return None
        enc = self.encoder
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                mel = log_mel_spectrogram(torch.from_numpy(np.ascontiguousarray(a)))  # (80, T) at 100 Hz
                t_even = mel.shape[1] // 2 * 2  # the stride-2 convolution takes pairs of mel frames
                out = []
                for s in range(0, t_even, 2 * WINDOW):
                    m = mel[:, s: min(s + 2 * WINDOW, t_even)]
                    x = torch.nn.functional.gelu(enc.conv1(m[None]))
                    x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
                    x = x + enc.positional_embedding[: x.shape[1]]
                    for b in enc.blocks:
                        x = b(x)
                    out.append(x[0].numpy())
        finally:
            torch.set_num_threads(prev)
        h = np.concatenate(out).astype(np.float32)
        t = np.clip((np.arange(n) + 0.5) * STATES_HZ / fps, 0, len(h) - 1)
        lo = np.floor(t).astype(int)
        hi = np.minimum(lo + 1, len(h) - 1)
        f = (t - lo)[:, None].astype(np.float32)
        return h[lo] * (1 - f) + h[hi] * f


@functools.lru_cache(maxsize=2)
def _encoder_blocks(model_dir: str, sha256: str):
    """Whisper-base's encoder blocks 0..LAYER from a CTranslate2 folder (``sha256``, checked by the caller,
    keys the cache with the folder). Read-only at inference."""
    import torch

    from .whisper_ct2 import load_whisper_from_ct2

    enc = load_whisper_from_ct2(Path(model_dir)).encoder
    enc.blocks = torch.nn.ModuleList(list(enc.blocks)[: LAYER + 1])
    return enc.eval()


def speech_features(states: np.ndarray) -> np.ndarray:
    """(n, 512) encoder states -> (n, 512 (2 CONTEXT + 1)) model input (z-scored per clip, with context)."""
    return context(zscore(np.asarray(states, np.float32)), CONTEXT)


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
    weights: np.ndarray  # (DIM, len(MOUTH) + 1)
    sha256: str | None = None
    info: dict | None = None
    encoder: SpeechEncoder | None = field(default=None, compare=False, repr=False)

    def score(self, states: np.ndarray | None, blendshapes: np.ndarray, mouth_open: np.ndarray) -> float | None:
        """The clip's synchronisation score from its speech ``states`` (SpeechEncoder.states, one row per
        frame): mean correlation of predicted and observed mouth motion at the best lag within +-MAX_LAG
        frames (about -1..1), or None with fewer than MIN_FRAMES usable frames or no speech states."""
        y = mouth_signals(blendshapes, mouth_open)
        ok = np.isfinite(y).all(1)
        if states is None or ok.sum() < MIN_FRAMES or len(states) != len(y):
            return None
        pred = speech_features(states) @ self.weights
        best = lagged_corr(pred, y, np.ones(len(y), bool), ok, 0, len(y), MAX_LAG, MIN_FRAMES)
        return None if best is None else round(best, 6)

    def score_clip(self, audio: np.ndarray, blendshapes: np.ndarray, mouth_open: np.ndarray) -> float | None:
        """``score`` from the clip's 16 kHz mono audio (needs the model loaded with its encoder)."""
        if self.encoder is None:
            raise ValueError("this AV-sync model was loaded without its speech encoder (models.av_sync.load)")
        return self.score(self.encoder.states(audio, len(blendshapes)), blendshapes, mouth_open)


def fit(clips: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]], alpha: float = ALPHA) -> np.ndarray:
    """Folded weights (DIM, 28) from ``clips()``, a function giving an iterable of (states, blendshapes,
    mouth_open) per clip (only the tracked frames are used), read twice (ridge_sync.fit_projected: the
    principal directions of the z-scored states, then the ridge fit on their projections)."""
    return fit_projected(lambda: ((st, mouth_signals(bs, mo)) for st, bs, mo in clips()), WIDTH, PCA_DIMS, CONTEXT,
                         alpha)


def save(path: str | Path, weights: np.ndarray, info: dict, encoder_sha256: str) -> str:
    """Write the weights (safetensors, the settings and the encoder's sha256 in its metadata) atomically;
    -> sha256."""
    return save_weights(path, weights, "m2fd.av_sync", {**_settings(), "encoder_sha256": encoder_sha256, "info": info})


def load(path: str | Path, encoder_dir: str | Path | None = None) -> AVSync:
    """Load weights written by ``save`` (with ``encoder_dir``, the Whisper-base CTranslate2 folder, also the
    speech encoder, whose model.bin must have the sha256 the weights were fitted with); raises when the
    file's settings are not this code's, or when the shipped file's sha256 is not the one it was released
    with."""
    w, sha, meta = load_weights(path, "m2fd.av_sync", _settings(), (DIM, len(MOUTH) + 1), SHIPPED, SHIPPED_SHA256,
                                "AV-sync")
    return AVSync(w, sha, meta.get("info"), fitted_encoder(encoder_dir, meta, path, "extract.av_sync_encoder"))


def fitted_encoder(encoder_dir: str | Path | None, meta: dict, path: str | Path, key: str) -> SpeechEncoder | None:
    """The speech encoder in ``encoder_dir`` (None: none), checked against the sha256 a weights file's
    metadata says it was fitted with (raises naming the file and the config ``key``)."""
    if encoder_dir is None:
        return None
    enc = SpeechEncoder(encoder_dir)
    if meta.get("encoder_sha256") != enc.sha256:
        raise ValueError(f"{path}: fitted on the speech encoder {str(meta.get('encoder_sha256'))[:16]}..., but "
                         f"{enc.path} has {enc.sha256[:16]}... ({key})")
    return enc


def _settings() -> dict:
    return {"encoder": ENCODER, "layer": LAYER, "pca_dims": PCA_DIMS, "context": CONTEXT, "smooth": SMOOTH,
            "max_lag": MAX_LAG, "mouth": list(MOUTH)}


def resolve(value: str | None) -> Path | None:
    """Config value -> weights file: "shipped" = models/assets/av-sync-v2; "" or None = off; else a path."""
    return resolve_weights(value, SHIPPED, "extract.av_sync_model")


def resolve_encoder(value: str | None, key: str = "extract.av_sync_encoder") -> Path:
    """Config value (``key``: extract.av_sync_encoder, ingest.asd_sync_encoder) -> the speech encoder's
    model.bin: "packaged" = the registry's Whisper-base (sha256 verified), else a CTranslate2 folder or its
    model.bin."""
    if value == "packaged":
        from .packaged import path

        return path(ENCODER)
    p = Path(value or "").expanduser()
    p = p / "model.bin" if p.is_dir() else p
    if not value or not p.is_file():
        raise FileNotFoundError(f"{key} = {value!r}: no CTranslate2 model.bin there (the sync model needs its "
                                "Whisper-base encoder)")
    return p


def leave_one_source_out(clips: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], alpha: float = ALPHA,
                         max_frames: int = 300, dubs_per_clip: int = 3) -> tuple[list[float], list[float]]:
    """Honest scores for clips of several sources (people): ``clips`` holds (source, states, blendshapes,
    mouth_open). For each source, a model fitted on the *other* sources scores that source's clips (their
    first ``max_frames`` frames) with their own speech (real) and with the speech of ``dubs_per_clip``
    clips of other sources (dubbed: the frames under another person's voice). -> (real, dubbed) scores."""
    real: list[float] = []
    dubbed: list[float] = []
    for s in sorted({c[0] for c in clips}):
        model = AVSync(fit(lambda: ((st, bs, mo) for src, st, bs, mo in clips if src != s), alpha))
        others = [c for c in clips if c[0] != s]
        step = max(1, len(others) // dubs_per_clip)
        for _, st, bs, mo in (c for c in clips if c[0] == s):
            n = min(max_frames, len(st))
            r = model.score(st[:n], bs[:n], mo[:n])
            if r is not None:
                real.append(r)
            for _, ost, _, _ in others[::step][:dubs_per_clip]:
                m = min(n, len(ost))
                d = model.score(ost[:m], bs[:m], mo[:m])
                if d is not None:
                    dubbed.append(d)
    return real, dubbed
