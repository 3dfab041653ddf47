"""The AV-sync score (models/av_sync.py): the model's mechanics on signals whose relation is known, the
speech encoder on real audio, and the real run: every kept clip has a score, it is the one its own audio
and frames give, and the lineage names the weights and the encoder. How well it tells real from dubbed
footage is measured by bench/bench_asd.py (per-clip AUC over 20 people), not here."""
from __future__ import annotations

import numpy as np
import pytest

from models import av_sync as A
from storage_schemas.vocab import BLENDSHAPES

LATENT = 8  # the synthetic speech's true dimensions


def _clip(rng, n: int, mix: np.ndarray, w: np.ndarray, noise: float = 0.5):
    """A clip whose 28 mouth signals are a linear function of a few smooth speech factors (+-CONTEXT frames)
    plus noise; its 512-wide speech states mix those factors."""
    lat = np.cumsum(rng.normal(size=(n, LATENT)), 0) + 3 * rng.normal(size=(n, LATENT))
    lat = (lat - lat.mean(0)) / lat.std(0)
    states = (lat @ mix + 0.05 * rng.normal(size=(n, A.WIDTH))).astype(np.float32)
    y = A.context(lat.astype(np.float32), A.CONTEXT) @ w + noise * rng.normal(size=(n, w.shape[1]))
    bs = np.zeros((n, 52), np.float32)
    bs[:, [BLENDSHAPES.index(k) for k in A.MOUTH]] = y[:, :-1]
    return states, bs, y[:, -1].astype(np.float32)


def _relation(seed: int):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(LATENT, A.WIDTH))
    w = rng.normal(size=(LATENT * (2 * A.CONTEXT + 1), len(A.MOUTH) + 1)) * 0.3
    return rng, mix, w


def test_fit_recovers_a_known_relation_and_scores_sync_above_mismatch():
    rng, mix, w = _relation(0)
    clips = [_clip(rng, 300, mix, w) for _ in range(12)]
    weights = A.fit(lambda: iter(clips[:8]))
    assert weights.shape == (A.DIM, len(A.MOUTH) + 1) and weights.dtype == np.float32
    model = A.AVSync(weights)
    own = [model.score(*c) for c in clips[8:]]
    swapped = [model.score(clips[(i + 1) % 4 + 8][0], c[1], c[2]) for i, c in enumerate(clips[8:])]
    assert min(own) > 0.5 and max(swapped) < 0.25, (own, swapped)
    assert A.auc(own, swapped) == 1.0
    # an offset within +-MAX_LAG frames is found; two seconds is not in sync
    st, bs, mo = clips[9]
    assert model.score(np.roll(st, 2, 0), bs, mo) > 0.8 * own[1]
    assert model.score(np.roll(st, 60, 0), bs, mo) < 0.5 * own[1]


def test_untracked_frames_are_ignored_and_short_clips_have_no_score():
    rng, mix, w = _relation(1)
    model = A.AVSync(A.fit(lambda: (_clip(np.random.default_rng(i), 300, mix, w) for i in range(6))))
    st, bs, mo = _clip(rng, 200, mix, w)
    full = model.score(st, bs, mo)
    bs2, mo2 = bs.copy(), mo.copy()
    bs2[50:70], mo2[50:70] = np.nan, np.nan  # the face lost for 20 frames
    assert abs(model.score(st, bs2, mo2) - full) < 0.1
    assert model.score(st[:20], bs[:20], mo[:20]) is None  # under MIN_FRAMES usable frames
    assert model.score(st, np.full_like(bs, np.nan), mo) is None
    assert model.score(None, bs, mo) is None  # no speech states (audio under 40 ms)
    with pytest.raises(ValueError, match="without its speech encoder"):
        model.score_clip(np.zeros(16000, np.float32), bs, mo)


def test_weights_are_deterministic_bytes_and_checked_on_load(tmp_path):
    rng, mix, w = _relation(2)
    clips = [_clip(rng, 200, mix, w) for _ in range(4)]
    shas = [A.save(tmp_path / f"w{i}.safetensors", A.fit(lambda: iter(clips)), {"clips": 4}, "e" * 64)
            for i in range(2)]
    assert shas[0] == shas[1]
    m = A.load(tmp_path / "w0.safetensors")
    assert m.sha256 == shas[0] and m.info == {"clips": 4} and m.encoder is None
    from safetensors.numpy import save_file

    save_file({"weights": np.zeros((10, 3), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not AV-sync weights"):
        A.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="av_sync_model"):
        A.resolve(str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="av_sync_encoder"):
        A.resolve_encoder(str(tmp_path))
    # weights fitted on another encoder do not load with the packaged one
    with pytest.raises(ValueError, match="fitted on the speech encoder eeee"):
        A.load(tmp_path / "w0.safetensors", A.resolve_encoder("packaged"))
    shipped = A.load(A.SHIPPED)  # the shipped weights load and say what they were fitted on
    assert shipped.info["clips"] >= 30 and shipped.info["sources"] >= 15


@pytest.fixture(scope="module")
def encoder():
    return A.SpeechEncoder(A.resolve_encoder("packaged"))


def test_speech_states_follow_the_audio_and_not_the_threads(encoder, real_dir):
    import torch

    from extractors.media import decode_audio

    audio = decode_audio(str(real_dir / "d14.mp4"))
    n = int(len(audio) / 16000 * 30)
    st = encoder.states(audio, n)
    assert st.shape == (n, A.WIDTH) and st.dtype == np.float32 and np.isfinite(st).all()
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert encoder.states(audio, n).tobytes() == st.tobytes()  # the encoder runs on its own one thread
    finally:
        torch.set_num_threads(prev)
    assert torch.get_num_threads() == prev
    # speech and silence give different states; a clip over 30 s runs in consecutive 30 s windows, the first
    # of them as that 30 s alone
    quiet = encoder.states(np.zeros_like(audio), n)
    assert np.abs(quiet - st).mean() > 0.1 * np.abs(st).mean()
    long = np.concatenate([audio, audio, audio])[: 16000 * 40]
    both = encoder.states(long, 1200)
    first = encoder.states(long[: 16000 * 30], 900)
    np.testing.assert_allclose(both[:895], first[:895], atol=2e-3)  # the mel's STFT frames at the 30 s edge
    assert encoder.states(audio[:300], 5) is None


def test_real_run_scores_every_clip_from_its_own_audio_and_frames(real_run):
    from extractors.media import decode_audio
    from extractors.transcribe import clip_audio
    from pipelines.frames import clip_frame_arrays
    from storage_schemas import open_dataset

    out, _ = real_run
    ds = open_dataset(out)
    rows = ds.query("select clip_id, c.uri, c.start_s, c.end_s, status, av_sync, f.asd_sync, sync_score, "
                    "c.asd_sync c_asd from clip_features f join clips c using (clip_id) order by clip_id").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["av_sync"] is not None and -1 <= r["av_sync"] <= 1 for r in ok)
    # the sync score: AV-sync (extraction) + the clip's ASD-sync (ingest, clips.asd_sync)
    assert all(r["asd_sync"] is not None and r["asd_sync"] == r["c_asd"] for r in ok)
    assert all(r["sync_score"] == pytest.approx(r["av_sync"] + r["asd_sync"], abs=1e-5) for r in ok)
    model = A.load(A.SHIPPED, A.resolve_encoder("packaged"))
    for r in ok:
        a = clip_frame_arrays(ds, r["clip_id"])
        audio = clip_audio(decode_audio(r["uri"]), r["start_s"], r["end_s"])
        assert model.score_clip(audio, a["blendshapes"], a["mouth_open"]) == pytest.approx(r["av_sync"], abs=1e-5)
    from storage_schemas.dataset import extract_lineage

    used = extract_lineage(out)["models"]
    assert used["av_sync"]["sha256"] == model.sha256 and used["av_sync_encoder"]["sha256"] == model.encoder.sha256
