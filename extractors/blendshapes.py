"""52 ARKit blendshapes from 478 face landmarks, with MediaPipe FaceLandmarker's own blendshape model.

MediaPipe's FaceLandmarker (tasks/cc/vision/face_landmarker/face_blendshapes_graph.cc) takes the 146
landmarks of ``LANDMARK_SUBSET`` (kLandmarksSubsetIdxs) out of the 478, converts their x, y to image
pixels (x * width, y * height; z is not used; LandmarksToTensorCalculator with attributes X, Y), feeds
the [1, 146, 2] float32 tensor to ``face_blendshapes.tflite`` (inside the ``.task`` zip) and reads 52
scores in ``BLENDSHAPE_NAMES`` order (kBlendshapeNames). This module does the same on LiteRT, so
blendshapes can be computed for landmarks that come from elsewhere (Face Mesh) without running the
FaceLandmarker graph.

Pure module: numpy + ai_edge_litert only.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from storage_schemas.vocab import BLENDSHAPES

# face_blendshapes_graph.cc :: kLandmarksSubsetIdxs
LANDMARK_SUBSET = np.array([
    0, 1, 4, 5, 6, 7, 8, 10, 13, 14, 17, 21, 33, 37, 39,
    40, 46, 52, 53, 54, 55, 58, 61, 63, 65, 66, 67, 70, 78, 80,
    81, 82, 84, 87, 88, 91, 93, 95, 103, 105, 107, 109, 127, 132, 133,
    136, 144, 145, 146, 148, 149, 150, 152, 153, 154, 155, 157, 158, 159, 160,
    161, 162, 163, 168, 172, 173, 176, 178, 181, 185, 191, 195, 197, 234, 246,
    249, 251, 263, 267, 269, 270, 276, 282, 283, 284, 285, 288, 291, 293, 295,
    296, 297, 300, 308, 310, 311, 312, 314, 317, 318, 321, 323, 324, 332, 334,
    336, 338, 356, 361, 362, 365, 373, 374, 375, 377, 378, 379, 380, 381, 382,
    384, 385, 386, 387, 388, 389, 390, 397, 398, 400, 402, 405, 409, 415, 454,
    466, 468, 469, 470, 471, 472, 473, 474, 475, 476, 477,
], dtype=np.intp)
assert LANDMARK_SUBSET.shape == (146,)

# face_blendshapes_graph.cc :: kBlendshapeNames, in model output order (index 0 "_neutral" is a baseline):
# storage_schemas.vocab.BLENDSHAPES, the names of frames.blendshapes and blendshapes.npy
BLENDSHAPE_NAMES = BLENDSHAPES
assert len(BLENDSHAPE_NAMES) == 52

MODEL_MEMBER = "face_blendshapes.tflite"
N_LANDMARKS = 478


def read_model_bytes(task_path: str | os.PathLike) -> bytes:
    """``face_blendshapes.tflite`` out of a FaceLandmarker ``.task`` (a zip), in memory."""
    with zipfile.ZipFile(task_path) as z:
        try:
            return z.read(MODEL_MEMBER)
        except KeyError:
            raise ValueError(f"{task_path}: no {MODEL_MEMBER} inside (not a FaceLandmarker .task?)") from None


class BlendshapeModel:
    """MediaPipe's blendshape model on LiteRT (one CPU thread, so results are deterministic).

    ``model(landmarks, width, height)``: ``landmarks`` (n, 478, 3) (or (n, 478, 2)) in image-normalised
    coordinates (x by ``width``, y by ``height`` of the image they were found in); a frame with any NaN
    among the 146 landmarks used is untracked. Returns (n, 52) float32 in ``BLENDSHAPE_NAMES`` order,
    NaN rows where untracked. The model's input is fixed at one face ([1, 146, 2]; resizing the batch
    fails in the XNNPACK delegate), so frames run one by one. One instance per thread (not thread-safe).
    """

    def __init__(self, task_path: str | os.PathLike):
        from ai_edge_litert.interpreter import Interpreter

        self.task_path = str(task_path)
        self._it = Interpreter(model_content=read_model_bytes(task_path), num_threads=1)
        self._it.allocate_tensors()
        (inp,) = self._it.get_input_details()
        outs = self._it.get_output_details()
        if tuple(inp["shape"]) != (1, 146, 2) or inp["dtype"] != np.float32:
            raise ValueError(f"{task_path}: unexpected blendshape input {inp['shape']} {inp['dtype']}")
        if len(outs) != 1 or int(np.prod(outs[0]["shape"])) != 52:
            raise ValueError(f"{task_path}: unexpected blendshape outputs {[o['shape'] for o in outs]}")
        self._in, self._out = inp["index"], outs[0]["index"]
        self.names = BLENDSHAPE_NAMES

    def __call__(self, landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
        lm = np.asarray(landmarks)
        if lm.ndim != 3 or lm.shape[1] != N_LANDMARKS or lm.shape[2] < 2:
            raise ValueError(f"landmarks must be (n, {N_LANDMARKS}, 3), got {lm.shape}")
        if not (int(width) > 0 and int(height) > 0):
            raise ValueError(f"image size must be positive, got {width}x{height}")
        # LandmarksToTensorCalculator: float x * width, y * height (float32 arithmetic, as in C++).
        pts = lm[:, LANDMARK_SUBSET, :2].astype(np.float32, copy=True)
        pts *= np.array([width, height], np.float32)
        ok = np.isfinite(pts).all(axis=(1, 2))
        out = np.full((lm.shape[0], 52), np.nan, np.float32)
        it, i_in, i_out = self._it, self._in, self._out
        for i in np.flatnonzero(ok):
            it.set_tensor(i_in, pts[i][None])
            it.invoke()
            out[i] = it.get_tensor(i_out).reshape(52)
        return out
