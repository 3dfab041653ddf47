from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class ClipContext:
    """Everything a labeler may read about one clip (arrays on the 30 fps grid)."""

    clip_id: str
    duration_s: float
    crops: np.ndarray  # (n, S, S, 3) uint8, zeros where untracked
    tracked: np.ndarray  # (n,) bool
    yaw: np.ndarray  # (n,) degrees, NaN where untracked
    pitch: np.ndarray
    roll: np.ndarray
    mouth_open: np.ndarray  # (n,) IOD units, NaN where untracked
    gnpfa_z: np.ndarray  # (n, z) NaN where untracked
    audio: np.ndarray  # 16 kHz mono waveform of the clip
    transcript: dict | None  # {"engine", "language", "text", "words"}
    labels: dict[str, Any] = field(default_factory=dict)  # values of labelers that ran before (by field)


@dataclass
class LabelRow:
    clip_id: str
    labeler: str
    labeler_version: str
    field: str
    value: Any  # stored as JSON text
    confidence: float | None

    def record(self) -> dict:
        return {"clip_id": self.clip_id, "labeler": self.labeler, "labeler_version": self.labeler_version,
                "field": self.field, "value": json.dumps(self.value, sort_keys=True),
                "confidence": None if self.confidence is None else float(self.confidence)}


class Labeler:
    name: str = ""
    version: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def label(self, ctx: ClipContext) -> list[LabelRow]:
        raise NotImplementedError

    def label_batch(self, ctxs: list[ClipContext]) -> list[LabelRow]:
        out = []
        for c in ctxs:
            out += self.label(c)
        return out

    def row(self, ctx: ClipContext, field_: str, value: Any, confidence: float | None) -> LabelRow:
        assert field_ in self.outputs, f"{self.name} does not declare output {field_!r}"
        return LabelRow(ctx.clip_id, self.name, self.version, field_, value, confidence)


REGISTRY: dict[str, Callable[..., Labeler]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def get_labeler(name: str, **kw) -> Labeler:
    from . import caption, emotion, prosody, style  # noqa: F401  (registration)

    if name not in REGISTRY:
        raise KeyError(f"unknown labeler {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name](**kw)
