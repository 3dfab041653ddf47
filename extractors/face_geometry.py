"""MediaPipe's facial transformation matrix from 478 face landmarks, as the FaceLandmarker computes it.

The FaceLandmarker's geometry pipeline (mediapipe/modules/face_geometry/libs/geometry_pipeline.cc and
procrustes_solver.cc) turns a frame's image-normalised landmarks into metric 3D space through a
perspective camera (vertical field of view 63 deg, near plane 1, origin at the image's top-left corner),
estimating the face's scale in two passes, and solves a weighted orthogonal Procrustes problem from the
canonical face model to them: the 4x4 matrix (rotation times scale, translation in centimetres of the
canonical model) that Tasks returns as ``facial_transformation_matrixes``. The canonical model and the
Procrustes weights (33 landmarks) are ``geometry_pipeline_metadata_landmarks.binarypb`` inside the same
``face_landmarker.task`` whose blendshape model extractors.blendshapes runs. This module does the same in
numpy, batched over frames, so the matrix comes from the landmark pass that produced the landmarks (no
second landmark model).

Pure module: numpy + the metadata's protobuf class (shipped inside the mediapipe wheel).
"""
from __future__ import annotations

import math
import os
import zipfile

import numpy as np

METADATA_MEMBER = "geometry_pipeline_metadata_landmarks.binarypb"
N_MESH = 468  # the canonical model's vertices: the 478 landmarks less the 10 iris points

# FaceGeometryEnvGeneratorCalculator's environment in the FaceLandmarker graph
VERTICAL_FOV_DEG = 63.0
NEAR = 1.0


def read_metadata(task_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(canonical metric landmarks (3, 468) float64, Procrustes weights (468,) float64) out of a
    FaceLandmarker ``.task``."""
    from mediapipe.modules.face_geometry.protos import geometry_pipeline_metadata_pb2 as gpm

    with zipfile.ZipFile(task_path) as z:
        try:
            blob = z.read(METADATA_MEMBER)
        except KeyError:
            raise ValueError(f"{task_path}: no {METADATA_MEMBER} inside (not a FaceLandmarker .task?)") from None
    m = gpm.GeometryPipelineMetadata()
    m.ParseFromString(blob)
    vb = np.asarray(m.canonical_mesh.vertex_buffer, np.float64)
    if vb.size != N_MESH * 5:  # VERTEX_PT: x, y, z, u, v
        raise ValueError(f"{task_path}: canonical mesh of {vb.size} floats, expected {N_MESH} x 5")
    canonical = vb.reshape(N_MESH, 5)[:, :3].T.copy()
    weights = np.zeros(N_MESH)
    for b in m.procrustes_landmark_basis:
        weights[b.landmark_id] = b.weight
    if not (weights > 0).sum() >= 3:
        raise ValueError(f"{task_path}: fewer than 3 Procrustes landmarks")
    return canonical, weights


def weighted_procrustes(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """procrustes_solver.cc's SolveWeightedOrthogonalProblem, batched: src (3, N), dst (n, 3, N), w (N,)
    -> (n, 4, 4) similarity transforms taking src to each dst (no reflections)."""
    sw = np.sqrt(w)
    total = float(w.sum())
    ws = src * sw  # (3, N)
    wt = dst * sw  # (n, 3, N)
    center = (ws * sw).sum(-1) / total  # (3,)
    cws = ws - center[:, None] * sw  # (3, N)
    design = wt @ cws.T  # (n, 3, 3)
    u, _, vt = np.linalg.svd(design)
    flip = np.linalg.det(u) * np.linalg.det(vt) < 0
    u[flip, :, 2] *= -1
    rot = u @ vt
    scale = ((rot @ cws) * wt).sum((-1, -2)) / (cws * ws).sum()
    diff = (wt - scale[:, None, None] * (rot @ ws)) * sw
    trans = diff.sum(-1) / total
    out = np.zeros((len(dst), 4, 4))
    out[:, :3, :3] = scale[:, None, None] * rot
    out[:, :3, 3] = trans
    out[:, 3, 3] = 1
    return out


class FaceGeometry:
    """``geometry(landmarks, width, height)``: landmarks (n, 478, 3) or (n, 468, 3), image-normalised (x by
    ``width``, y by ``height``, z in x's scale, as Face Mesh and the FaceLandmarker give them) -> (n, 4, 4)
    float32 facial transformation matrices, NaN for frames with a NaN among the mesh points."""

    def __init__(self, task_path: str | os.PathLike):
        self.task_path = str(task_path)
        self.canonical, self.weights = read_metadata(task_path)

    def __call__(self, landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
        lm = np.asarray(landmarks, np.float64)
        if lm.ndim != 3 or lm.shape[1] < N_MESH or lm.shape[2] != 3:
            raise ValueError(f"landmarks must be (n, 478, 3), got {lm.shape}")
        if not (int(width) > 0 and int(height) > 0):
            raise ValueError(f"image size must be positive, got {width}x{height}")
        out = np.full((lm.shape[0], 4, 4), np.nan, np.float32)
        ok = np.isfinite(lm[:, :N_MESH]).all(axis=(1, 2))
        if ok.any():
            out[ok] = self._solve(lm[ok, :N_MESH].transpose(0, 2, 1), int(width), int(height))
        return out

    def _solve(self, s: np.ndarray, width: int, height: int) -> np.ndarray:
        """geometry_pipeline.cc's Convert on (n, 3, 468) screen landmarks."""
        h_near = 2 * NEAR * math.tan(0.5 * math.radians(VERTICAL_FOV_DEG))
        w_near = width * h_near / height
        left, bottom = -0.5 * w_near, -0.5 * h_near
        s = s.copy()
        s[:, 1] = 1 - s[:, 1]  # origin at the top-left corner
        s *= np.array([w_near, h_near, w_near])[:, None]  # ProjectXY
        s[:, 0] += left
        s[:, 1] += bottom
        depth = s[:, 2].mean(-1, keepdims=True)

        def scale_of(pts):
            return np.linalg.norm(weighted_procrustes(self.canonical, pts, self.weights)[:, :3, 0], axis=-1)

        def unproject(pts, scale):  # MoveAndRescaleZ, UnprojectXY, ChangeHandedness
            p = pts.copy()
            p[:, 2] = (p[:, 2] - depth + NEAR) / scale[:, None]
            p[:, :2] *= p[:, 2:3] / NEAR
            p[:, 2] *= -1
            return p

        first = s.copy()
        first[:, 2] *= -1
        s1 = scale_of(first)
        s2 = scale_of(unproject(s, s1))
        return weighted_procrustes(self.canonical, unproject(s, s1 * s2), self.weights)
