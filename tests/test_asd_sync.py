"""ASD-sync (models/asd_sync.py): which of several talking faces says what is heard. The windowed score's
mechanics on signals whose relation is known, the shipped weights, and ingest choosing, between two real
people who both talk, the one whose speech is on the track. How often it chooses right over 20 people is
measured by bench/bench_asd.py and scripts/train_asd_sync.py (leave one person out), not here."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from extractors.config import IngestConfig
from models import asd_sync as S
from samples import _ff  # examples/samples.py: the ffmpeg call every test fixture uses

ENC = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "20", "-pix_fmt", "yuv420p", "-c:a", "aac"]


def _pair(rng, n: int, w: np.ndarray, noise: float = 0.7):
    """Audio embeddings and visual embeddings that are a linear function of them plus noise."""
    ae = np.cumsum(rng.normal(size=(n, S.EMB)), 0).astype(np.float32) * 0.2 + rng.normal(size=(n, S.EMB))
    ve = S.audio_features(ae) @ w + noise * rng.normal(size=(n, S.EMB))
    return ve.astype(np.float32), ae.astype(np.float32)


def test_fit_recovers_the_relation_and_the_window_score_finds_the_speaker():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(S.EMB * (2 * S.CONTEXT + 1), S.EMB)) * 0.05
    runs = [_pair(rng, 250, w) for _ in range(10)]
    model = S.AsdSync(S.fit(runs[:6]))
    own = [S.run_sync(*model.signals(v, a)) for v, a in runs[6:]]
    other = [S.run_sync(*model.signals(v, runs[6 + (i + 1) % 4][1])) for i, (v, _) in enumerate(runs[6:])]
    assert min(own) > 0.3 and max(abs(x) for x in other) < 0.1, (own, other)
    # an offset within +-MAX_LAG frames is found; a second is not in sync
    v, a = runs[7]
    p, o = model.signals(v, a)
    assert S.run_sync(p, np.roll(o, S.MAX_LAG, 0)) > 0.8 * own[1]
    assert S.run_sync(p, np.roll(o, 25, 0)) < 0.3 * own[1]
    # windows: a window's value depends on its own frames only; NaN rows are left out; too few frames -> NaN
    c = np.array([60, 125, 190])
    base = S.window_sync(p, o, c, 40)
    o2 = o.copy()
    o2[20:35] = rng.normal(size=(15, S.EMB))  # inside the window around 60 (20..100), outside 125 (85..165)
    assert S.window_sync(p, o2, c, 40)[1] == base[1] and S.window_sync(p, o2, c, 40)[0] != base[0]
    o3 = o.copy()
    o3[100:110] = np.nan
    assert np.isfinite(S.window_sync(p, o3, c, 40)).all()
    assert np.isnan(S.window_sync(p, o, np.array([125]), S.MIN_FRAMES // 2 - 1))[0]


def test_weights_save_deterministically_and_the_shipped_file_is_checked(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(S.EMB * (2 * S.CONTEXT + 1), S.EMB)) * 0.05
    runs = [_pair(rng, 100, w) for _ in range(3)]
    a = S.save(tmp_path / "a.safetensors", S.fit(runs), {"n": 3})
    b = S.save(tmp_path / "b.safetensors", S.fit(runs), {"n": 3})
    assert a == b and S.load(tmp_path / "a.safetensors").info == {"n": 3}
    shipped = S.load(S.resolve("shipped"))
    assert shipped.sha256 == S.SHIPPED_SHA256 and shipped.info["lopo_10s"]["right_track"] > 0.5
    assert S.resolve("") is None
    with pytest.raises(FileNotFoundError):
        S.resolve(str(tmp_path / "missing.safetensors"))


@pytest.fixture(scope="module")
def two_talking(tmp_path_factory, real_dir):
    """d12 (left) and d14 (right) side by side, both talking, with d12's speech only."""
    d = tmp_path_factory.mktemp("asd_sync")
    out = d / "two_talking.mp4"
    _ff("-i", str(real_dir / "d12.mp4"), "-i", str(real_dir / "d14.mp4"), "-t", "6.5", "-filter_complex",
        "[0:v]scale=-2:360,setsar=1,fps=30[l];[1:v]scale=-2:360,setsar=1,fps=30[r];[l][r]hstack=inputs=2[v]",
        "-map", "[v]", "-map", "0:a", *ENC, "-shortest", str(out))
    return out


def test_of_two_talking_people_the_one_whose_speech_is_heard_is_chosen(two_talking):
    from test_asd import _analyse

    cfg = IngestConfig()
    r = _analyse(two_talking, cfg)
    assert r["source"]["status"] == "ok", r["quarantine"]
    w = r["source"]["width"]
    assert r["clips"] and all((c["face_box"][0] + c["face_box"][2]) / 2 < 0.5 for c in r["clips"]), r["clips"]
    assert all(c["n_other_faces"] >= 1 for c in r["clips"]) and w > 0
    # the speaking logit alone cannot tell the two apart as well: it keeps fewer frames of the speaker
    off = _analyse(two_talking, dataclasses.replace(cfg, asd_sync_model=""))
    n_off = sum(c["n_frames"] for c in off["clips"] if (c["face_box"][0] + c["face_box"][2]) / 2 < 0.5)
    assert sum(c["n_frames"] for c in r["clips"]) > n_off


def test_each_clip_carries_its_faces_sync_and_dubbed_speech_scores_lower(two_talking, tmp_path, real_dir):
    """clips.asd_sync is the chosen face's sync over the clip: the speaker of two_talking has one, and the
    same d12 footage with another person's speech laid over it (dubbed) scores well below the original."""
    from test_asd import _analyse

    cfg = dataclasses.replace(IngestConfig(), min_speaking_score=-1e9)  # keep every clip: compare the scores
    r = _analyse(two_talking, cfg)
    assert r["clips"] and all(c["asd_sync"] is not None and -1 <= c["asd_sync"] <= 1 for c in r["clips"])
    real = tmp_path / "d12.mp4"
    _ff("-i", str(real_dir / "d12.mp4"), "-t", "6.5", "-r", "30", *ENC, str(real))
    dub = tmp_path / "d12_dubbed.mp4"
    _ff("-i", str(real), "-i", str(real_dir / "s18.mp4"), "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac",
        "-shortest", str(dub))
    own, other = (_analyse(p, cfg)["clips"] for p in (real, dub))
    assert own and other
    mean = [np.average([c["asd_sync"] for c in cs], weights=[c["n_frames"] for c in cs]) for cs in (own, other)]
    print("ASD-sync own vs dubbed", mean)
    assert mean[0] > mean[1] + 0.1, mean
    # ASD-sync off: no score
    assert all(c["asd_sync"] is None for c in _analyse(real, dataclasses.replace(cfg, asd_sync_model=""))["clips"])


def test_the_sync_gate_drops_a_dubbed_clip_and_keeps_the_original(tmp_path, real_dir, ray_cluster):
    """The whole job on d12 and on the same footage under s18's speech: the original's clip is ok with a sync
    score >= extract.min_sync_score, the dubbed one is dropped as poor_sync with its scores in the quarantine."""
    import json

    from extractors.config import ExtractConfig
    from pipelines.job import run_job
    from storage_schemas import open_dataset

    src = tmp_path / "in"
    src.mkdir()
    _ff("-i", str(real_dir / "d12.mp4"), "-t", "6.5", "-r", "30", *ENC, str(src / "d12.mp4"))
    _ff("-i", str(src / "d12.mp4"), "-i", str(real_dir / "s18.mp4"), "-map", "0:v", "-map", "1:a", "-c:v", "copy",
        "-c:a", "aac", "-shortest", str(src / "d12_dubbed.mp4"))
    out = tmp_path / "ds"
    run_job([str(src)], out, executor="ray", num_cpus=2, log=lambda m: None)
    rows = open_dataset(out).query(
        "select regexp_extract(c.uri, '[^/]+$') video, f.status, f.drop_reason, f.sync_score, f.av_sync, f.asd_sync "
        "from clip_features f join clips c using (clip_id) order by video").to_pylist()
    thr = ExtractConfig().min_sync_score
    real = [r for r in rows if r["video"] == "d12.mp4"]
    dub = [r for r in rows if r["video"] == "d12_dubbed.mp4"]
    assert real and all(r["status"] == "ok" and r["sync_score"] >= thr for r in real), rows
    assert dub and all(r["status"] == "dropped" and r["drop_reason"] == "poor_sync" and r["sync_score"] < thr
                       for r in dub), rows
    q = open_dataset(out).query("select reason, detail from quarantine where reason = 'poor_sync'").to_pylist()
    assert len(q) == len(dub) and all({"av_sync", "asd_sync", "sync_score"} <= set(json.loads(r["detail"])) for r in q)
