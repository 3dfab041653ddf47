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


def mfcc_100hz(audio: np.ndarray, sr: int = AUDIO_SAMPLE_RATE, numcep: int = 13, nfilt: int = 26, nfft: int = 512,
               winlen: float = 0.025, winstep: float = 0.01, preemph: float = 0.97, ceplifter: int = 22) -> np.ndarray:
    """(T, 13) MFCCs at 100 Hz, the definition Light-ASD was trained on (python_speech_features.mfcc's
    defaults: rectangular 25 ms frames every 10 ms, zero-padded at the end, pre-emphasis 0.97, 26 mel
    filters, orthonormal DCT-II, lifter 22, c0 replaced by the log frame energy), on audio scaled to
    the int16 range as the original read it from wav files."""
    x = np.asarray(audio, np.float64) * 32768.0
    if x.size == 0:
        return np.zeros((0, numcep), np.float32)
    x = np.append(x[0], x[1:] - preemph * x[:-1])
    flen, fstep = int(round(winlen * sr)), int(round(winstep * sr))
    n = 1 if x.size <= flen else 1 + int(np.ceil((x.size - flen) / fstep))
    x = np.concatenate([x, np.zeros((n - 1) * fstep + flen - x.size)])
    idx = np.arange(flen)[None, :] + fstep * np.arange(n)[:, None]
    pspec = np.abs(np.fft.rfft(x[idx], nfft)) ** 2 / nfft
    energy = pspec.sum(1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    feat = pspec @ _mel_filters(nfilt, nfft, sr).T
    feat = np.log(np.where(feat == 0, np.finfo(float).eps, feat))
    k = np.arange(nfilt)
    dct = np.cos(np.pi * np.arange(numcep)[:, None] * (2 * k[None, :] + 1) / (2 * nfilt))
    dct *= np.sqrt(2.0 / nfilt)
    dct[0] /= np.sqrt(2.0)
    cep = feat @ dct.T
    cep *= 1 + (ceplifter / 2.0) * np.sin(np.pi * np.arange(numcep) / ceplifter)
    cep[:, 0] = np.log(energy)
    return cep.astype(np.float32)


def _mel_filters(nfilt: int, nfft: int, sr: int) -> np.ndarray:
    mel = np.linspace(0, 2595 * np.log10(1 + (sr / 2) / 700.0), nfilt + 2)
    b = np.floor((nfft + 1) * (700 * (10 ** (mel / 2595.0) - 1)) / sr)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        for i in range(int(b[j]), int(b[j + 1])):
            fb[j, i] = (i - b[j]) / (b[j + 1] - b[j])
        for i in range(int(b[j + 1]), int(b[j + 2])):
            fb[j, i] = (b[j + 2] - i) / (b[j + 2] - b[j + 1])
    return fb
