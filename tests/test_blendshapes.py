"""extractors.blendshapes against MediaPipe's own FaceLandmarker (Tasks API), on real frames and the
real packaged model; plus how far blendshapes from Face Mesh landmarks are from Tasks' (printed)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from extractors.blendshapes import BLENDSHAPE_NAMES, BlendshapeModel
from models import packaged

N_FRAMES = 60


@pytest.fixture(scope="module")
def task_path():
    return packaged.path("face-landmarker")


@pytest.fixture(scope="module")
def frames(real_dir):
    import cv2

    (video,) = sorted(real_dir.glob("d12*.mp4"))
    cap = cv2.VideoCapture(str(video))
    out = []
    while len(out) < N_FRAMES:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    cap.release()
    assert len(out) == N_FRAMES
    return out


@pytest.fixture(scope="module")
def tasks_out(frames, task_path):
    """Tasks FaceLandmarker (IMAGE mode) on every frame: landmarks (n, 478, 3) and blendshapes (n, 52),
    NaN where no face; category names; ms per frame; facial transformation matrices (n, 4, 4)."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions
    from mediapipe.tasks.python.vision import FaceLandmarker, FaceLandmarkerOptions, RunningMode

    opts = FaceLandmarkerOptions(base_options=BaseOptions(model_asset_path=str(task_path)),
                                 running_mode=RunningMode.IMAGE, num_faces=1, output_face_blendshapes=True,
                                 output_facial_transformation_matrixes=True)
    n = len(frames)
    lms = np.full((n, 478, 3), np.nan, np.float32)
    bs = np.full((n, 52), np.nan, np.float32)
    mats = np.full((n, 4, 4), np.nan)
    names = None
    with FaceLandmarker.create_from_options(opts) as fl:
        fl.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=frames[0]))  # warm-up
        t0 = time.perf_counter()
        for i, rgb in enumerate(frames):
            r = fl.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb))
            if not r.face_landmarks:
                continue
            lms[i] = [(p.x, p.y, p.z) for p in r.face_landmarks[0]]
            cats = sorted(r.face_blendshapes[0], key=lambda c: c.index)
            bs[i] = [c.score for c in cats]
            mats[i] = np.asarray(r.facial_transformation_matrixes[0])
            names = names or tuple(c.category_name for c in cats)
        ms = (time.perf_counter() - t0) * 1e3 / n
    return lms, bs, names, ms, mats


@pytest.fixture(scope="module")
def model(task_path):
    return BlendshapeModel(task_path)


def test_matches_tasks_on_tasks_landmarks(frames, tasks_out, model):
    lms, bs, names, tasks_ms, _ = tasks_out
    h, w = frames[0].shape[:2]
    tracked = np.isfinite(lms).all(axis=(1, 2))
    assert tracked.sum() >= 0.9 * len(frames), f"Tasks found a face in only {tracked.sum()} frames"
    assert names == BLENDSHAPE_NAMES

    model(lms[:2], w, h)  # warm-up
    t0 = time.perf_counter()
    ours = model(lms, w, h)
    ms = (time.perf_counter() - t0) * 1e3 / len(frames)
    assert ours.shape == (len(frames), 52) and ours.dtype == np.float32
    assert np.isnan(ours[~tracked]).all() and np.isfinite(ours[tracked]).all()
    diff = np.abs(ours[tracked] - bs[tracked])
    print(f"\n[blendshapes] Tasks landmarks -> ours vs Tasks blendshapes on {tracked.sum()} frames: "
          f"max |diff| {diff.max():.3g}, mean {diff.mean():.3g}; ours {ms:.3f} ms/frame, "
          f"Tasks FaceLandmarker.detect {tasks_ms:.2f} ms/frame ({w}x{h})")
    assert diff.max() < 1e-3
    # deterministic: the same input gives the same bytes
    assert np.array_equal(model(lms, w, h), ours, equal_nan=True)


def test_untracked_rows_are_nan(frames, tasks_out, model):
    lms, _, _, _, _ = tasks_out
    h, w = frames[0].shape[:2]
    tracked = np.flatnonzero(np.isfinite(lms).all(axis=(1, 2)))[:4]
    x = lms[tracked].copy()
    ref = model(x, w, h)
    x[1] = np.nan  # untracked frame
    x[2, 468, 0] = np.nan  # one NaN among the 146 landmarks used
    x[3, 2, :] = np.nan  # landmark 2 is not among them and z is never used:
    x[3, :, 2] = np.nan  # the row is still scored
    out = model(x, w, h)
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()
    assert np.array_equal(out[[0, 3]], ref[[0, 3]])
    assert model(np.full((3, 478, 3), np.nan, np.float32), w, h).shape == (3, 52)
    assert model(np.zeros((0, 478, 3), np.float32), w, h).shape == (0, 52)
    with pytest.raises(ValueError):
        model(np.zeros((2, 468, 3), np.float32), w, h)


def test_face_mesh_landmarks_agreement(frames, tasks_out, model):
    """Measured, not asserted tightly: Face Mesh (tracking, refined) landmarks through the blendshape
    model vs Tasks' blendshapes on the same frames."""
    from mediapipe.python.solutions import face_mesh

    _, bs, _, tasks_ms, _ = tasks_out
    h, w = frames[0].shape[:2]
    n = len(frames)
    lms = np.full((n, 478, 3), np.nan, np.float32)
    with face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True) as fm:
        t0 = time.perf_counter()
        for i, rgb in enumerate(frames):
            r = fm.process(rgb)
            if r.multi_face_landmarks:
                lms[i] = [(p.x, p.y, p.z) for p in r.multi_face_landmarks[0].landmark]
        fm_ms = (time.perf_counter() - t0) * 1e3 / n
    t0 = time.perf_counter()
    ours = model(lms, w, h)
    ms = (time.perf_counter() - t0) * 1e3 / n

    both = np.isfinite(ours).all(1) & np.isfinite(bs).all(1)
    assert both.sum() >= 0.9 * n, f"Face Mesh and Tasks both tracked only {both.sum()} frames"
    d = np.abs(ours[both] - bs[both])
    per = d.mean(0)
    worst = np.argsort(per)[::-1][:6]
    print(f"\n[blendshapes] Face Mesh landmarks -> ours vs Tasks blendshapes on {both.sum()} frames: "
          f"mean |diff| {d.mean():.4f}, p95 {np.percentile(d, 95):.4f}, max {d.max():.3f}; "
          f"worst (mean |diff|, max): "
          + ", ".join(f"{BLENDSHAPE_NAMES[k]} {per[k]:.3f}/{d[:, k].max():.2f}" for k in worst)
          + f"\n[blendshapes] ms/frame: BlendshapeModel {ms:.3f}, FaceMesh.process {fm_ms:.2f}, "
          f"Tasks FaceLandmarker.detect {tasks_ms:.2f}")
    corr = np.array([np.corrcoef(ours[both, k], bs[both, k])[0, 1] for k in (9, 10, 25)])
    print("[blendshapes] corr Face Mesh vs Tasks: eyeBlinkLeft %.3f eyeBlinkRight %.3f jawOpen %.3f" % tuple(corr))
    assert d.mean() < 0.06  # measured 0.038 (mediapipe 0.10.21, d12 frames 0-59)


def test_transformation_matrix_matches_tasks_on_tasks_landmarks(frames, tasks_out, task_path):
    """extractors.face_geometry on the Tasks landmarker's own landmarks gives the Tasks API's facial
    transformation matrix (its geometry pipeline, with the .task's canonical model and weights)."""
    from extractors.face_geometry import FaceGeometry

    lms, _, _, _, mats = tasks_out
    h, w = frames[0].shape[:2]
    tracked = np.isfinite(lms).all(axis=(1, 2))
    geo = FaceGeometry(task_path)
    t0 = time.perf_counter()
    ours = geo(lms, w, h)
    ms = (time.perf_counter() - t0) * 1e3 / len(frames)
    assert ours.shape == (len(frames), 4, 4) and ours.dtype == np.float32
    assert np.isnan(ours[~tracked]).all() and np.isfinite(ours[tracked]).all()
    d_rot = np.abs(ours[tracked, :3, :3] - mats[tracked, :3, :3]).max()
    d_tr = np.abs(ours[tracked, :3, 3] - mats[tracked, :3, 3]).max()
    print(f"\n[face geometry] ours vs Tasks on {tracked.sum()} frames: rotation x scale max |diff| {d_rot:.2g}, "
          f"translation {d_tr:.2g} cm (of {np.abs(mats[tracked, :3, 3]).max():.1f}); {ms:.3f} ms/frame")
    assert d_rot < 1e-4 and d_tr < 1e-3
    # batched or alone, the same matrix; a NaN landmark makes only its own frame untracked
    i = int(np.flatnonzero(tracked)[0])
    assert np.array_equal(geo(lms[i:i + 1], w, h)[0], ours[i])
    x = lms[tracked][:3].copy()
    x[1, 5] = np.nan
    out = geo(x, w, h)
    assert np.isnan(out[1]).all() and np.array_equal(out[[0, 2]], ours[tracked][[0, 2]])
    with pytest.raises(ValueError, match="478"):
        geo(lms[:, :100], w, h)
