"""Speaking-style tags from prosody and head/face motion, with documented thresholds."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from storage_schemas import FPS

from .base import ClipContext, LabelRow, Labeler, register


@dataclass(frozen=True)
class StyleThresholds:
    fast_sps: float = 5.5  # syllables per second of speech above which speech is "fast"
    slow_sps: float = 3.5  # ... below which it is "slow"
    loud_db: float = -18.0  # mean speech level (dBFS) above which the voice is "loud"
    soft_db: float = -32.0  # ... below which it is "soft"
    animated_deg_s: float = 25.0  # mean head angular speed (deg/s) above which the head is "animated"
    still_deg_s: float = 8.0  # ... below which it is "still"
    expressive_mouth: float = 0.035  # std of the inner-lip gap (IOD) above which the face is "expressive"
    neutral_mouth: float = 0.015  # ... below which it is "neutral face"
    varied_pitch_st: float = 8.0  # pitch range (semitones, p10-p90) above which intonation is "varied"
    flat_pitch_st: float = 3.0  # ... below which it is "monotone"


def head_speed_deg_s(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> float:
    ang = np.stack([yaw, pitch, roll], 1)
    d = np.diff(ang, axis=0)
    d = d[~np.isnan(d).any(1)]
    if len(d) == 0:
        return float("nan")
    # smooth out landmark jitter: speed over 5-frame steps
    k = 5
    if len(ang) > k:
        dk = ang[k:] - ang[:-k]
        dk = dk[~np.isnan(dk).any(1)]
        if len(dk):
            return float(np.linalg.norm(dk, axis=1).mean() * FPS / k)
    return float(np.linalg.norm(d, axis=1).mean() * FPS)


@register
class StyleTags(Labeler):
    name = "style-rules"
    version = "1"
    inputs = ("prosody", "yaw", "pitch", "roll", "mouth_open")
    outputs = ("style_tags", "head_speed_deg_s", "mouth_var")

    def __init__(self, thresholds: StyleThresholds | None = None):
        self.t = thresholds or StyleThresholds()
        self.version = "1:" + ",".join(f"{k}={v}" for k, v in asdict(self.t).items())

    def label(self, ctx: ClipContext) -> list[LabelRow]:
        t, lab, tags = self.t, ctx.labels, []
        rate = lab.get("speaking_rate_sps")
        if rate is not None:
            tags.append("fast speech" if rate > t.fast_sps else "slow speech" if rate < t.slow_sps else "moderate pace")
        e = lab.get("energy_db")
        if e is not None:
            tags.append("loud voice" if e > t.loud_db else "soft voice" if e < t.soft_db else "normal volume")
        pr = lab.get("pitch_range_st")
        if pr is not None:
            tags.append("varied intonation" if pr > t.varied_pitch_st else "monotone" if pr < t.flat_pitch_st
                        else "even intonation")
        hs = head_speed_deg_s(ctx.yaw, ctx.pitch, ctx.roll)
        if np.isfinite(hs):
            tags.append("animated head" if hs > t.animated_deg_s else "still head" if hs < t.still_deg_s
                        else "moderate head motion")
        mo = ctx.mouth_open[~np.isnan(ctx.mouth_open)]
        mv = float(mo.std()) if len(mo) > 2 else float("nan")
        if np.isfinite(mv):
            tags.append("expressive face" if mv > t.expressive_mouth else "neutral face" if mv < t.neutral_mouth
                        else "moderately expressive face")
        conf = float(ctx.tracked.mean()) if len(ctx.tracked) else None
        rows = [self.row(ctx, "style_tags", tags, conf)]
        if np.isfinite(hs):
            rows.append(self.row(ctx, "head_speed_deg_s", round(hs, 3), conf))
        if np.isfinite(mv):
            rows.append(self.row(ctx, "mouth_var", round(mv, 5), conf))
        return rows
