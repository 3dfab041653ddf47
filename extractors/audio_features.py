"""Audio features aligned to the 30 fps frame grid: 80-bin log-mel (Whisper's definition) averaged
over each frame's 1/30 s window, plus the RMS level in dBFS per frame."""
from __future__ import annotations

import numpy as np

from storage_schemas import AUDIO_SAMPLE_RATE, FPS

N_MELS = 80
HOP = 160  # 10 ms at 16 kHz, Whisper's hop


def log_mel_30fps(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """(n_frames, 80) float32: Whisper's normalised log-mel, mean-pooled into 30 fps windows."""
    import torch
    from whisper.audio import log_mel_spectrogram

    need = int(np.ceil(n_frames / FPS * AUDIO_SAMPLE_RATE)) + HOP
    a = np.zeros(max(need, audio.size), np.float32)
    a[: audio.size] = audio
    mel = log_mel_spectrogram(torch.from_numpy(a), n_mels=N_MELS).numpy().T  # (T100, 80)
    edges = np.round(np.arange(n_frames + 1) * (AUDIO_SAMPLE_RATE / FPS / HOP)).astype(int)
    out = np.empty((n_frames, N_MELS), np.float32)
    for k in range(n_frames):
        a0, a1 = edges[k], max(edges[k + 1], edges[k] + 1)
        out[k] = mel[a0:min(a1, len(mel))].mean(0) if a0 < len(mel) else mel[-1]
    return out


def rms_db_30fps(audio: np.ndarray, n_frames: int) -> np.ndarray:
    spf = AUDIO_SAMPLE_RATE / FPS
    out = np.full(n_frames, -120.0, np.float32)
    for k in range(n_frames):
        seg = audio[int(round(k * spf)): int(round((k + 1) * spf))]
        if seg.size:
            out[k] = 20 * np.log10(np.sqrt(np.mean(seg.astype(np.float64) ** 2)) + 1e-6)
    return out
