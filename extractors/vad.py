"""Voice-activity detection on 16 kHz mono audio: the packaged GMM detector with level, flatness and
modulation gates (``detect_speech``, ingest's default), or Silero VAD (``detect_speech_silero``,
``ingest.vad = silero``). bench/bench_models.py measures both."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage_schemas import AUDIO_SAMPLE_RATE


@dataclass
class VadResult:
    speech: np.ndarray  # bool per hop
    hop_s: float
    level_db: np.ndarray  # frame level, dBFS
    noise_floor_db: float
    threshold_db: float
    p95_db: float

    def on_grid(self, n: int, fps: float) -> np.ndarray:
        """Speech mask resampled to n frames at ``fps`` (nearest hop)."""
        if len(self.speech) == 0:
            return np.zeros(n, bool)
        idx = np.clip(np.round((np.arange(n) / fps) / self.hop_s).astype(int), 0, len(self.speech) - 1)
        return self.speech[idx]


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of True."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    d = np.flatnonzero(np.diff(m.astype(np.int8)))
    return list(zip(d[::2].tolist(), d[1::2].tolist()))


def close_gaps(mask: np.ndarray, max_gap: int) -> np.ndarray:
    """Fill runs of False shorter than ``max_gap`` that lie between two runs of True."""
    out = np.asarray(mask, bool).copy()
    r = runs(out)
    for (_, e0), (s1, _) in zip(r, r[1:]):
        if s1 - e0 < max_gap:
            out[e0:s1] = True
    return out


def drop_short(mask: np.ndarray, min_len: int) -> np.ndarray:
    out = np.asarray(mask, bool).copy()
    for s, e in runs(out):
        if e - s < min_len:
            out[s:e] = False
    return out


def frame_levels_db(frames: np.ndarray) -> np.ndarray:
    """RMS level (dBFS) of each row of ``frames``."""
    return 20 * np.log10(np.sqrt((frames ** 2).mean(axis=1) + 1e-12) + 1e-9)


def detect_speech(audio: np.ndarray, mode: int = 2, min_dbfs: float = -45.0, max_flatness: float = 0.3,
                  min_modulation_db: float = 1.5, min_speech_s: float = 0.15,
                  sr: int = AUDIO_SAMPLE_RATE) -> VadResult:
    """Speech frames (30 ms) pass four tests: the WebRTC-derived GMM voice detector packaged with
    pocketsphinx (aggressiveness ``mode``), a level above ``min_dbfs``, a spectral flatness below
    ``max_flatness`` (rejects broadband noise, which the GMM accepts) and a level modulation over the
    surrounding 0.5 s above ``min_modulation_db`` (rejects steady tones, hum and stationary noise)."""
    from pocketsphinx import Vad

    vad = Vad(mode=mode, sample_rate=sr)
    flen = vad.frame_bytes // 2
    hop_s = flen / sr
    n = audio.size // flen
    if n == 0:
        return VadResult(np.zeros(0, bool), hop_s, np.zeros(0), -120.0, min_dbfs, -120.0)
    frames = audio[: n * flen].reshape(n, flen).astype(np.float32)
    pcm = (np.clip(frames, -1.0, 1.0) * 32767).astype("<i2")
    gmm = np.fromiter((vad.is_speech(p.tobytes()) for p in pcm), dtype=bool, count=n)
    level = frame_levels_db(frames)
    spec = np.abs(np.fft.rfft(frames * np.hanning(flen)[None, :], axis=1)) ** 2 + 1e-12
    flatness = np.exp(np.log(spec).mean(axis=1)) / spec.mean(axis=1)
    k = max(3, int(round(0.5 / hop_s)) | 1)
    padded = np.pad(level, k // 2, mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(padded, k)
    modulation = win.std(axis=1)
    speech = gmm & (level > min_dbfs) & (flatness < max_flatness) & (modulation > min_modulation_db)
    speech = drop_short(speech, max(1, int(round(min_speech_s / hop_s))))
    return VadResult(speech, hop_s, level, float(np.percentile(level, 10)), min_dbfs, float(np.percentile(level, 95)))


class SileroVad:
    """Silero VAD v6 (ONNX) on 16 kHz audio: a speech probability per 32 ms window (512 samples with the
    previous 64 as context, the recurrent state carried), as silero-vad's own OnnxWrapper feeds it.
    One onnxruntime thread: the same probabilities on every machine and thread count."""

    WINDOW = 512
    CONTEXT = 64

    def __init__(self, model_path: str):
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"],
                                                    sess_options=opts)
        self.hop_s = self.WINDOW / AUDIO_SAMPLE_RATE

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        n = audio.size // self.WINDOW
        x = np.concatenate([np.zeros(self.CONTEXT, np.float32), audio[: n * self.WINDOW].astype(np.float32)])
        state = np.zeros((2, 1, 128), np.float32)
        sr = np.array(AUDIO_SAMPLE_RATE, dtype=np.int64)
        out = np.zeros(n, np.float32)
        for i in range(n):
            chunk = x[i * self.WINDOW: (i + 1) * self.WINDOW + self.CONTEXT][None]
            p, state = self.session.run(None, {"input": chunk, "state": state, "sr": sr})
            out[i] = float(p.reshape(-1)[0])
        return out


_SILERO: dict[str, SileroVad] = {}


def silero_for(model_path: str) -> SileroVad:
    """One Silero session per model file and process."""
    if str(model_path) not in _SILERO:
        _SILERO[str(model_path)] = SileroVad(model_path)
    return _SILERO[str(model_path)]


def detect_speech_silero(audio: np.ndarray, model_path: str, threshold: float = 0.5, min_dbfs: float = -45.0,
                         min_speech_s: float = 0.15) -> VadResult:
    """Speech windows: Silero's probability >= ``threshold`` and a level above ``min_dbfs`` (the level
    gate only keeps near-silent windows out); runs shorter than ``min_speech_s`` are dropped. The result
    has the same form as detect_speech's (levels per window, so the silence check is unchanged)."""
    vad = silero_for(model_path)
    hop = vad.WINDOW
    n = audio.size // hop
    if n == 0:
        return VadResult(np.zeros(0, bool), vad.hop_s, np.zeros(0), -120.0, min_dbfs, -120.0)
    level = frame_levels_db(audio[: n * hop].reshape(n, hop).astype(np.float32))
    speech = (vad.probabilities(audio) >= threshold) & (level > min_dbfs)
    speech = drop_short(speech, max(1, int(round(min_speech_s / vad.hop_s))))
    return VadResult(speech, vad.hop_s, level, float(np.percentile(level, 10)), min_dbfs, float(np.percentile(level, 95)))
