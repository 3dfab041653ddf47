"""The AV-sync score (models/av_sync.py): the model's mechanics on signals whose relation is known, and on
the real run: every kept clip has a score, it is the one its own frames give, and the lineage names the
weights. How well it tells real from dubbed footage is measured by bench/bench_asd.py (per-clip AUC over
20 people), not here."""
from __future__ import annotations

import numpy as np
import pytest

from models import av_sync as A
from storage_schemas.vocab import BLENDSHAPES


def _clip(rng, n: int, w: np.ndarray, noise: float = 0.5):
    """A clip whose 28 mouth signals are a linear function of its speech features plus noise."""
    mel = np.cumsum(rng.normal(size=(n, 80)), 0).astype(np.float32)  # smooth, speech-like drifts
    mel += rng.normal(size=(n, 80)).astype(np.float32) * 3
    y = A.speech_features(mel) @ w + noise * rng.normal(size=(n, w.shape[1]))
    bs = np.zeros((n, 52), np.float32)
    bs[:, [BLENDSHAPES.index(k) for k in A.MOUTH]] = y[:, :-1]
    return mel, bs, y[:, -1].astype(np.float32)


def test_fit_recovers_a_known_relation_and_scores_sync_above_mismatch():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(A.BANDS * (2 * A.CONTEXT + 1), len(A.MOUTH) + 1)) * 0.1
    clips = [_clip(rng, 300, w) for _ in range(12)]
    model = A.AVSync(A.fit(clips[:8]))
    own = [model.score(*c) for c in clips[8:]]
    swapped = [model.score(clips[(i + 1) % 4 + 8][0], c[1], c[2]) for i, c in enumerate(clips[8:])]
    assert min(own) > 0.5 and max(swapped) < 0.25, (own, swapped)
    assert A.auc(own, swapped) == 1.0
    # an offset within +-MAX_LAG frames is found; two seconds is not in sync
    mel, bs, mo = clips[9]
    assert model.score(np.roll(mel, 2, 0), bs, mo) > 0.8 * own[1]
    assert model.score(np.roll(mel, 60, 0), bs, mo) < 0.5 * own[1]


def test_untracked_frames_are_ignored_and_short_clips_have_no_score():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(A.BANDS * (2 * A.CONTEXT + 1), len(A.MOUTH) + 1)) * 0.1
    model = A.AVSync(A.fit([_clip(rng, 300, w) for _ in range(6)]))
    mel, bs, mo = _clip(rng, 200, w)
    full = model.score(mel, bs, mo)
    bs2, mo2 = bs.copy(), mo.copy()
    bs2[50:70], mo2[50:70] = np.nan, np.nan  # the face lost for 20 frames
    assert abs(model.score(mel, bs2, mo2) - full) < 0.1
    assert model.score(mel[:20], bs[:20], mo[:20]) is None  # under MIN_FRAMES usable frames
    assert model.score(mel, np.full_like(bs, np.nan), mo) is None


def test_weights_are_deterministic_bytes_and_checked_on_load(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(A.BANDS * (2 * A.CONTEXT + 1), len(A.MOUTH) + 1)) * 0.1
    clips = [_clip(rng, 200, w) for _ in range(4)]
    shas = [A.save(tmp_path / f"w{i}.safetensors", A.fit(clips), {"clips": 4}) for i in range(2)]
    assert shas[0] == shas[1]
    m = A.load(tmp_path / "w0.safetensors")
    assert m.sha256 == shas[0] and m.info == {"clips": 4}
    from safetensors.numpy import save_file

    save_file({"weights": np.zeros((10, 3), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not AV-sync weights"):
        A.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="av_sync_model"):
        A.resolve(str(tmp_path / "missing.safetensors"))
    shipped = A.load(A.SHIPPED)  # the shipped weights load and say what they were fitted on
    assert shipped.info["clips"] >= 30 and shipped.info["sources"] >= 15


def test_real_run_scores_every_clip_from_its_own_frames(real_run):
    from pipelines.frames import clip_frame_arrays
    from storage_schemas import open_dataset

    out, _ = real_run
    ds = open_dataset(out)
    rows = ds.query("select clip_id, status, av_sync, f.asd_sync, sync_score, c.asd_sync c_asd from clip_features f "
                    "join clips c using (clip_id) order by clip_id").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["av_sync"] is not None and -1 <= r["av_sync"] <= 1 for r in ok)
    # the sync score: AV-sync (extraction) + the clip's ASD-sync (ingest, clips.asd_sync)
    assert all(r["asd_sync"] is not None and r["asd_sync"] == r["c_asd"] for r in ok)
    assert all(r["sync_score"] == pytest.approx(r["av_sync"] + r["asd_sync"], abs=1e-5) for r in ok)
    model = A.load(A.SHIPPED)
    for r in ok:
        a = clip_frame_arrays(ds, r["clip_id"])
        assert model.score(a["audio_mel"], a["blendshapes"], a["mouth_open"]) == pytest.approx(r["av_sync"], abs=1e-5)
    from storage_schemas.dataset import extract_lineage

    assert extract_lineage(out)["models"]["av_sync"]["sha256"] == model.sha256
