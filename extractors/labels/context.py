"""Build ClipContexts from a dataset's tables and arrays, and run a labeler chain over them."""
from __future__ import annotations

import json

import numpy as np

from ..transcribe import clip_audio
from .base import ClipContext, Labeler, LabelRow

DEFAULT_CHAIN = ("fer-emotion", "prosody", "vader-sentiment", "style-rules", "caption-composer")


def contexts_for_source(audio: np.ndarray, clips: list[dict], frames: dict[str, dict],
                        crops: dict[str, np.ndarray], transcripts: dict[str, dict]) -> list[ClipContext]:
    """``audio``: the source's 16 kHz mono audio; ``frames[clip_id]`` holds arrays
    tracked/yaw/pitch/roll/mouth_open/gnpfa_z (NaN where untracked)."""
    out = []
    for c in clips:
        f = frames[c["clip_id"]]
        out.append(ClipContext(clip_id=c["clip_id"], duration_s=c["duration_s"], crops=crops[c["clip_id"]],
                               tracked=f["tracked"], yaw=f["yaw"], pitch=f["pitch"], roll=f["roll"],
                               mouth_open=f["mouth_open"], gnpfa_z=f["gnpfa_z"],
                               audio=clip_audio(audio, c["start_s"], c["end_s"]),
                               transcript=transcripts.get(c["clip_id"])))
    return out


def run_chain(ctxs: list[ClipContext], labelers: list[Labeler], prior: dict[str, dict] | None = None,
              failures: list[tuple[str, str, str]] | None = None) -> list[LabelRow]:
    """Run labelers in order; each sees the values of those before it (and ``prior`` values by clip).

    With ``failures`` given, a labeler that raises is run again clip by clip, and each clip it still
    fails on is recorded there as (clip_id, labeler, error) while every other clip and labeler goes
    on; without it, the error propagates."""
    for c in ctxs:
        c.labels = dict((prior or {}).get(c.clip_id, {}))
    rows: list[LabelRow] = []
    for lab in labelers:
        try:
            new = lab.label_batch(ctxs)
        except Exception as e:  # noqa: BLE001 - isolate the clip it fails on
            if failures is None:
                raise
            new = []
            for c in ctxs:
                try:
                    new += lab.label_batch([c])
                except Exception as e1:  # noqa: BLE001
                    failures.append((c.clip_id, lab.name, f"{type(e1).__name__}: {str(e1)[:300] or e!r}"))
        by_clip: dict[str, dict] = {}
        for r in new:
            by_clip.setdefault(r.clip_id, {})[r.field] = r.value
        for c in ctxs:
            c.labels.update(by_clip.get(c.clip_id, {}))
        rows += new
    return rows


def decode_value(v: str):
    return json.loads(v)
