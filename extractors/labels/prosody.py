"""Speech labels: transcript sentiment (VADER) and prosody from the waveform: speaking rate
(syllable nuclei per second of speech, and words/s from word timestamps), pitch level and range
(YIN F0), energy and its variation."""
from __future__ import annotations

import numpy as np

from storage_schemas import AUDIO_SAMPLE_RATE

from ..vad import detect_speech
from .base import ClipContext, LabelRow, Labeler, register

SR = AUDIO_SAMPLE_RATE


def _frames(x: np.ndarray, win: int, hop: int) -> np.ndarray:
    if x.size < win:
        return np.zeros((0, win), np.float32)
    n = 1 + (x.size - win) // hop
    return np.lib.stride_tricks.sliding_window_view(x, win)[::hop][:n]


def yin_f0(audio: np.ndarray, fmin: float = 60.0, fmax: float = 400.0, hop_s: float = 0.01,
           threshold: float = 0.15, min_db: float = -45.0) -> np.ndarray:
    """F0 (Hz) per 10 ms hop by YIN (cumulative mean normalised difference); NaN where unvoiced."""
    win = int(SR / fmin) * 2
    hop = int(SR * hop_s)
    fr = _frames(audio.astype(np.float32), win, hop)
    if len(fr) == 0:
        return np.zeros(0)
    fr = fr - fr.mean(1, keepdims=True)
    w = win // 2
    tmax = int(SR / fmin)
    tmin = int(SR / fmax)
    # difference function via FFT autocorrelation
    spec = np.fft.rfft(fr, 2 * win, axis=1)
    acf = np.fft.irfft(spec * np.conj(spec), axis=1)[:, : tmax + 1]
    energy = np.cumsum(fr ** 2, axis=1)
    e0 = energy[:, w - 1:w]
    shifted = np.stack([energy[:, t + w - 1] - (energy[:, t - 1] if t > 0 else 0) for t in range(tmax + 1)], 1)
    d = e0 + shifted - 2 * acf
    d[:, 0] = 0
    cmnd = d[:, 1:] * np.arange(1, tmax + 1) / np.maximum(np.cumsum(d[:, 1:], axis=1), 1e-12)
    cmnd = np.concatenate([np.ones((len(fr), 1)), cmnd], 1)
    f0 = np.full(len(fr), np.nan)
    level = 10 * np.log10((fr ** 2).mean(1) + 1e-12)
    for i in range(len(fr)):
        if level[i] < min_db:
            continue
        c = cmnd[i, tmin:tmax]
        below = np.flatnonzero(c < threshold)
        if len(below) == 0:
            continue
        t = below[0]
        while t + 1 < len(c) and c[t + 1] < c[t]:
            t += 1
        tau = t + tmin
        # parabolic interpolation
        if 1 <= tau < tmax:
            a, b, cc = cmnd[i, tau - 1], cmnd[i, tau], cmnd[i, tau + 1]
            den = a - 2 * b + cc
            tau = tau + 0.5 * (a - cc) / den if abs(den) > 1e-12 else tau
        f0[i] = SR / tau
    return f0


def syllable_rate(audio: np.ndarray, prominence_db: float = 4.0, min_gap_s: float = 0.08) -> tuple[float, float]:
    """(syllable nuclei per second of speech, seconds of speech).

    Nuclei are peaks of the 50 ms-smoothed 300-2500 Hz envelope inside VAD speech, at least
    ``min_gap_s`` apart, merged while the dip between two neighbours is shallower than
    ``prominence_db``. On espeak-ng speech at 100-260 words/min this is within 10% of the true
    syllable rate (tests/test_labels.py)."""
    vad = detect_speech(audio)
    speech_s = float(vad.speech.sum() * vad.hop_s)
    if speech_s < 0.5:
        return 0.0, speech_s
    fr = _frames(audio.astype(np.float32), 400, 160)
    spec = np.abs(np.fft.rfft(fr * np.hanning(400), axis=1)) ** 2
    freqs = np.fft.rfftfreq(400, 1 / SR)
    env = 10 * np.log10(spec[:, (freqs >= 300) & (freqs <= 2500)].sum(1) + 1e-10)
    env = np.convolve(env, np.ones(5) / 5, "same")
    sp = vad.on_grid(len(env), 100.0)
    gap = int(round(min_gap_s * 100))
    peaks: list[int] = []
    for i in range(1, len(env) - 1):
        if not (sp[i] and env[i] >= env[i - 1] and env[i] >= env[i + 1]):
            continue
        if peaks and i - peaks[-1] < gap:
            if env[i] > env[peaks[-1]]:
                peaks[-1] = i
            continue
        peaks.append(i)
    merged = True
    while merged and len(peaks) > 1:
        merged = False
        for k in range(len(peaks) - 1):
            a, b = peaks[k], peaks[k + 1]
            if min(env[a], env[b]) - env[a:b + 1].min() < prominence_db:
                peaks.pop(k if env[a] < env[b] else k + 1)
                merged = True
                break
    return len(peaks) / speech_s, speech_s


@register
class Prosody(Labeler):
    name = "prosody"
    version = "1"
    inputs = ("audio", "transcript")
    outputs = ("speaking_rate_sps", "words_per_s", "pitch_hz", "pitch_range_st", "energy_db", "energy_var_db")

    def label(self, ctx: ClipContext) -> list[LabelRow]:
        a = ctx.audio
        rate, speech_s = syllable_rate(a)
        f0 = yin_f0(a)
        voiced = f0[~np.isnan(f0)]
        rows = [self.row(ctx, "speaking_rate_sps", round(rate, 3), min(1.0, speech_s / max(ctx.duration_s, 1e-6)))]
        words = (ctx.transcript or {}).get("words") or []
        if words and speech_s > 0:
            rows.append(self.row(ctx, "words_per_s", round(len(words) / speech_s, 3), None))
        if len(voiced) >= 10:
            med = float(np.median(voiced))
            rng = float(12 * np.log2(np.percentile(voiced, 90) / np.percentile(voiced, 10)))
            conf = len(voiced) / max(1, len(f0))
            rows += [self.row(ctx, "pitch_hz", round(med, 2), conf), self.row(ctx, "pitch_range_st", round(rng, 2), conf)]
        frames = _frames(a.astype(np.float32), 480, 160)
        if len(frames):
            db = 10 * np.log10((frames ** 2).mean(1) + 1e-12)
            vad = detect_speech(a)
            m = vad.on_grid(len(db), 100.0)
            if m.any():
                rows += [self.row(ctx, "energy_db", round(float(db[m].mean()), 2), None),
                         self.row(ctx, "energy_var_db", round(float(db[m].std()), 2), None)]
        return rows


@register
class VaderSentiment(Labeler):
    name = "vader-sentiment"
    version = "vaderSentiment-3.3.2/2"  # 2: non-English transcripts get no sentiment, with the reason
    inputs = ("transcript",)
    outputs = ("sentiment", "sentiment_compound", "sentiment_unavailable")

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._an = SentimentIntensityAnalyzer()

    def label(self, ctx: ClipContext) -> list[LabelRow]:
        t = (ctx.transcript or {}).get("text") or ""
        if not t.strip():
            return []
        lang = (ctx.transcript or {}).get("language")
        if lang and lang != "en":  # VADER's lexicon is English: scoring other languages is noise
            return [self.row(ctx, "sentiment", None, None), self.row(ctx, "sentiment_compound", None, None),
                    self.row(ctx, "sentiment_unavailable", f"language {lang}: VADER is English-only", None)]
        s = self._an.polarity_scores(t)
        c = s["compound"]
        cat = "positive" if c >= 0.05 else "negative" if c <= -0.05 else "neutral"
        # confidence: how much of the text VADER found opinionated, scaled by the ASR engine's reliability
        return [self.row(ctx, "sentiment", cat, 1.0 - s["neu"]), self.row(ctx, "sentiment_compound", c, None)]
