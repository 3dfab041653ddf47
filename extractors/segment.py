"""Cut talking clips from per-frame face and speech masks on the 30 fps grid."""
from __future__ import annotations

import math

import numpy as np

from .vad import close_gaps, runs


def split_span(start: int, end: int, max_len: int) -> list[tuple[int, int]]:
    """Split [start, end) into the fewest equal pieces no longer than ``max_len``."""
    n = max(1, math.ceil((end - start) / max_len))
    edges = [start + round(i * (end - start) / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:])]


def talking_spans(face_ok: np.ndarray, speech: np.ndarray, fps: int, min_s: float, max_s: float,
                  max_pause_s: float, max_face_gap_s: float, min_speech_ratio: float) -> tuple[list[tuple[int, int]], dict]:
    """Spans where the single speaker face is visible and speech is going on.

    Speech pauses shorter than ``max_pause_s`` and face dropouts shorter than ``max_face_gap_s`` stay
    inside a span; spans longer than ``max_s`` are split evenly; pieces shorter than ``min_s`` or with
    less than ``min_speech_ratio`` speech are dropped. Returns the spans and counts for diagnostics.
    """
    talking = close_gaps(speech, int(round(max_pause_s * fps)))
    face = close_gaps(face_ok, int(round(max_face_gap_s * fps)))
    both = talking & face
    min_len, max_len = int(math.ceil(min_s * fps)), int(math.floor(max_s * fps))
    out, n_short, n_low_speech = [], 0, 0
    for s, e in runs(both):
        for a, b in split_span(s, e, max_len):
            if b - a < min_len:
                n_short += 1
                continue
            if speech[a:b].mean() < min_speech_ratio:
                n_low_speech += 1
                continue
            out.append((a, b))
    return out, {"candidate_frames": int(both.sum()), "too_short": n_short, "low_speech": n_low_speech}
