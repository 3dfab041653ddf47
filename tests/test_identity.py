"""Identity embeddings and speaker assignment (extractors/identity.py).

Real data: SFace on Face Mesh landmarks of frames from two time ranges of each person's video, and
the re-implemented Resemblyzer encoder on the two halves of each person's audio, for six people
(four from shared/data/corpus, two from shared/data/real; none appears in both). The voice encoder
and mel filterbank are also checked against reference numbers produced by resemblyzer 0.1.4 itself
(with librosa 0.10.2 and the same pretrained.pt), and against librosa directly where it is importable.
"""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from extractors import identity as I
from extractors.identity import (FaceEmbedder, SpeakerRule, VoiceEmbedder, assign_speakers, face_row,
                                 speaker_id_for)
from extractors.landmarks import landmarks_to_array
from extractors.media import decode_audio
from models import packaged

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# (directory, stem): six different people with speech and a face Face Mesh finds in a whole frame
PEOPLE = [("corpus", "dfrf_cnn2"), ("corpus", "edtalk_pose_source2"), ("corpus", "mimictalk_german"),
          ("corpus", "sadtalker_wda_katiehill"), ("real", "d14"), ("real", "s18")]
RANGE_A, RANGE_B = (0.10, 0.25), (0.65, 0.85)  # fractions of the duration: two separate time ranges


def _probe(path: Path) -> tuple[int, int, float]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream=width,height:format=duration", "-of", "json", str(path)],
                         capture_output=True, check=True).stdout
    j = json.loads(out)
    return int(j["streams"][0]["width"]), int(j["streams"][0]["height"]), float(j["format"]["duration"])


def _frame(path: Path, t: float, w: int, h: int, max_side: int = 1280) -> np.ndarray:
    s = min(1.0, max_side / max(w, h))
    W, H = max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-ss", f"{t:.3f}", "-i", str(path), "-frames:v", "1",
                          "-vf", f"scale={W}:{H}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(H, W, 3).copy()


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def face_embedder():
    return FaceEmbedder(packaged.path("sface"))


@pytest.fixture(scope="module")
def voice_embedder():
    return VoiceEmbedder(packaged.path("voice-encoder"))


@pytest.fixture(scope="module")
def people(face_embedder, voice_embedder):
    """{stem: {"frames": [(rgb, landmarks)], "face": [embs of range A, embs of range B],
    "voice": (half 1, half 2)}}."""
    from mediapipe.python.solutions import face_mesh

    out = {}
    with face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True) as fm:
        for d, stem in PEOPLE:
            p = DATA / d / f"{stem}.mp4"
            assert p.is_file(), f"missing shared video {p}"
            w, h, dur = _probe(p)
            frames, ranges = [], []
            for rng in (RANGE_A, RANGE_B):
                embs = []
                for frac in rng:
                    rgb = _frame(p, frac * dur, w, h)
                    res = fm.process(rgb)
                    assert res.multi_face_landmarks, f"Face Mesh finds no face in {stem} at {frac * dur:.1f} s"
                    lm = landmarks_to_array(res.multi_face_landmarks[0])
                    frames.append((rgb, lm))
                    embs.append(face_embedder.embed(rgb, lm))
                ranges.append(embs)
            audio = decode_audio(str(p))
            half = audio.size // 2
            out[stem] = {"frames": frames, "face": ranges,
                         "voice": (voice_embedder.embed(audio[:half]), voice_embedder.embed(audio[half:]))}
    return out


# ---------------------------------------------------------------------------------------------- face

def test_face_row_layout():
    lm = np.zeros((478, 3), np.float32)
    lm[:, 0], lm[:, 1] = 0.4, 0.5
    lm[0, :2], lm[1, :2] = (0.2, 0.1), (0.45, 0.55)  # extent corner and nose tip
    lm[2, :2] = (0.8, 0.9)
    lm[468, :2], lm[473, :2] = (0.3, 0.4), (0.6, 0.41)
    lm[61, :2], lm[291, :2] = (0.35, 0.7), (0.55, 0.71)
    row = face_row(lm, 200, 100)
    assert row.dtype == np.float32 and row.shape == (15,)
    np.testing.assert_allclose(row, [40, 10, 120, 80, 60, 40, 120, 41, 90, 55, 70, 70, 110, 71, 1], rtol=1e-6)
    with pytest.raises(ValueError):
        face_row(lm[:468], 200, 100)


def test_mesh_points_are_on_the_sides_sface_expects(people, face_embedder):
    """YuNet's (and SFace's template's) "right eye" is the image-left eye: the mesh's 468 / 61 are."""
    for stem, p in people.items():
        for rgb, lm in p["frames"]:
            row = face_row(lm, rgb.shape[1], rgb.shape[0])
            assert row[4] < row[6] and row[10] < row[12], stem  # eyes, mouth corners: image-left first
            assert row[5] < row[9] < row[11] and row[7] < row[9] < row[13], stem  # eyes above nose above mouth
            x, y, w, h = row[:4]
            pts = row[4:14].reshape(5, 2)
            assert (pts >= [x, y]).all() and (pts <= [x + w, y + h]).all()
    rgb, lm = people[PEOPLE[0][1]]["frames"][0]
    crop = face_embedder.align(rgb, lm)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8


def test_face_embedding_is_unit_and_deterministic(people, face_embedder):
    import cv2

    rgb, lm = people[PEOPLE[1][1]]["frames"][1]
    before = cv2.getNumThreads()
    e1 = face_embedder.embed(rgb, lm)
    e2 = face_embedder.embed(rgb.copy(), lm.copy())
    assert cv2.getNumThreads() == before  # embed's single-thread setting is restored
    assert e1.shape == (128,) and e1.dtype == np.float32
    assert abs(float(np.linalg.norm(e1)) - 1.0) < 1e-5
    assert np.array_equal(e1, e2)
    with pytest.raises(ValueError):
        face_embedder.embed(rgb.astype(np.float32), lm)


def test_face_same_person_across_time_vs_different_people(people):
    names = list(people)
    clip = {n: [_unit(np.mean(r, axis=0)) for r in people[n]["face"]] for n in names}  # per-range centroid
    same = {n: float(clip[n][0] @ clip[n][1]) for n in names}
    frame_min = {n: min(float(a @ b) for a in people[n]["face"][0] for b in people[n]["face"][1]) for n in names}
    diff = {(a, b): max(float(x @ y) for x in clip[a] for y in clip[b])
            for i, a in enumerate(names) for b in names[i + 1:]}
    for n in names:
        print(f"face {n}: range A vs B {same[n]:.3f} (frames min {frame_min[n]:.3f})")
    worst = max(diff, key=diff.get)
    print(f"face same-person min {min(same.values()):.3f} (frames {min(frame_min.values()):.3f}); "
          f"different-people max {diff[worst]:.3f} {worst}")
    assert min(same.values()) > 0.6
    assert min(frame_min.values()) > 0.6
    assert max(diff.values()) < 0.6


# --------------------------------------------------------------------------------------------- voice

def test_mel_filterbank_matches_librosa_slaney():
    fb = I.mel_filterbank()
    assert fb.shape == (40, 201) and fb.dtype == np.float32
    # reference: librosa 0.10.2 librosa.filters.mel(sr=16000, n_fft=400, n_mels=40)
    assert fb.argmax(1).tolist() == [2, 4, 6, 7, 9, 11, 13, 15, 17, 18, 20, 22, 24, 26, 28, 30, 32, 35, 38, 41, 44,
                                     47, 51, 55, 59, 64, 69, 75, 80, 87, 94, 101, 109, 118, 127, 137, 148, 159, 172, 185]
    np.testing.assert_allclose(fb.max(1)[::8], [0.012404521, 0.010291138, 0.00855277, 0.005024369, 0.003020088],
                               rtol=1e-6)
    np.testing.assert_allclose(fb.sum(1)[::8], [0.02480904, 0.02480904, 0.024183972, 0.024789423, 0.025049035],
                               rtol=1e-6)
    try:
        import librosa
    except ImportError:
        return
    np.testing.assert_allclose(fb, librosa.filters.mel(sr=16000, n_fft=400, n_mels=40), rtol=0, atol=1e-8)


def _synthetic_voice() -> np.ndarray:
    rs = np.random.RandomState(0)
    t = np.arange(40000) / 16000.0
    return (0.3 * np.sin(2 * np.pi * (150 + 200 * t) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.02 * rs.randn(t.size)).astype(np.float32)


def test_voice_encoder_matches_resemblyzer(voice_embedder):
    """Reference numbers from resemblyzer 0.1.4 (librosa 0.10.2): ``wav_to_mel_spectrogram(w)`` and
    ``VoiceEncoder().embed_utterance(normalize_volume(w, -30, increase_only=True))`` on 2.5 s of
    synthetic audio."""
    w = _synthetic_voice()
    mel = I.mel_spectrogram(w)
    assert mel.shape == (251, 40)
    np.testing.assert_allclose(float(mel.sum()), 5269.83251953125, rtol=1e-5)
    np.testing.assert_allclose([mel[5, 3], mel[100, 20], mel.max()],
                               [0.035675298422575, 0.00041223218431696296, 32.4965705871582], rtol=1e-4)
    np.testing.assert_allclose(float((mel @ np.random.RandomState(2).randn(40)).sum()), -1319.8467121884182,
                               rtol=1e-5)
    e = voice_embedder.embed(w)
    assert e.shape == (256,) and e.dtype == np.float32 and (e >= 0).all()
    assert abs(float(np.linalg.norm(e)) - 1.0) < 1e-5
    np.testing.assert_allclose(e[:12], [0.0, 0.0, 0.019302, 0.0, 0.017627, 0.014417, 0.0, 0.00492, 0.040729,
                                        0.048702, 0.043546, 0.066837], atol=2e-6)
    np.testing.assert_allclose(float(e.sum()), 11.198076248168945, rtol=1e-5)
    np.testing.assert_allclose(float(e @ np.random.RandomState(1).randn(256)), 1.2560752444621135, atol=1e-5)
    assert np.argsort(e)[::-1][:5].tolist() == [78, 149, 131, 159, 56]


def test_voice_partials_and_edge_cases(voice_embedder):
    # compute_partial_slices: 1.6 s windows every 77 frames; short audio still gives one partial
    wavs, mels = I.partial_slices(40000)  # 2.5 s: the third window would cover 60% < 75%, dropped
    assert [(s.start, s.stop) for s in mels] == [(0, 160), (77, 237)]
    assert all(w.start == m.start * 160 and w.stop == m.stop * 160 for w, m in zip(wavs, mels))
    assert len(I.partial_slices(3000)[1]) == 1
    w = _synthetic_voice()
    e = voice_embedder.embed(w)
    voice_embedder.embed(w[:8000])
    assert np.array_equal(e, voice_embedder.embed(w)), "an embedding must not depend on earlier calls"
    short = voice_embedder.embed(w[:4000])  # < 1.6 s: one zero-padded partial
    assert short.shape == (256,) and np.isfinite(short).all()
    # normalize_volume only raises quiet audio to -30 dBFS: the level of a quiet signal does not matter
    np.testing.assert_allclose(voice_embedder.embed(w * 0.01), voice_embedder.embed(w * 0.001), atol=1e-5)
    with pytest.raises(ValueError):
        voice_embedder.embed(np.zeros(0, np.float32))


def test_voice_same_person_halves_vs_different_people(people):
    names = list(people)
    same = {n: float(people[n]["voice"][0] @ people[n]["voice"][1]) for n in names}
    other = {n: [float(people[n]["voice"][i] @ people[m]["voice"][j]) for m in names if m != n
                 for i in (0, 1) for j in (0, 1)] for n in names}
    for n in names:
        print(f"voice {n}: halves {same[n]:.3f}, vs others mean {np.mean(other[n]):.3f} max {max(other[n]):.3f}")
    all_other = [x for v in other.values() for x in v]
    print(f"voice same-person mean {np.mean(list(same.values())):.3f} min {min(same.values()):.3f}; "
          f"different-people mean {np.mean(all_other):.3f} max {max(all_other):.3f}")
    for n in names:
        assert same[n] > np.mean(other[n]) + 0.1, n
    assert np.mean(list(same.values())) > np.mean(all_other) + 0.2


# ------------------------------------------------------------------------------------------ speakers

def _rand_unit(rs, d=128):
    return _unit(rs.randn(d))


def _near(rs, v, noise=0.15):
    return _unit(v + noise * rs.randn(v.size) / np.sqrt(v.size))  # cosine to v about 1 / sqrt(1 + noise^2)


def test_speaker_id_for():
    import hashlib

    assert speaker_id_for("c1") == "spk-" + hashlib.sha256(b"c1").hexdigest()[:12]
    assert len(speaker_id_for("x")) == 16


def test_assign_join_new_and_voice_fallback():
    rs = np.random.RandomState(0)
    alice_f, bob_f, carol_f = (_rand_unit(rs) for _ in range(3))
    alice_v, bob_v, carol_v = (_rand_unit(rs, 256) for _ in range(3))
    committed = [
        {"clip_id": "a1", "speaker_id": "spk-alice", "face": _near(rs, alice_f), "voice": _near(rs, alice_v, 0.05)},
        {"clip_id": "a2", "speaker_id": "spk-alice", "face": _near(rs, alice_f), "voice": None},
        {"clip_id": "b1", "speaker_id": "spk-bob", "face": None, "voice": _near(rs, bob_v, 0.05)},
    ]
    snapshot = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in c.items()} for c in committed]
    new = [
        {"clip_id": "n1", "face": _near(rs, alice_f), "voice": None},  # joins alice by face
        {"clip_id": "n2", "face": None, "voice": _near(rs, bob_v, 0.05)},  # joins bob by voice
        {"clip_id": "n3", "face": _near(rs, carol_f), "voice": _near(rs, carol_v)},  # new speaker
        {"clip_id": "n4", "face": _near(rs, carol_f), "voice": None},  # joins the speaker n3 founded
        {"clip_id": "n5", "face": _near(rs, bob_f), "voice": _near(rs, bob_v, 0.05)},  # face decides: new
        {"clip_id": "n6", "face": None, "voice": None},  # nothing: new
        {"clip_id": "n7", "face": None, "voice": _rand_unit(rs, 256)},  # unknown voice: new
    ]
    rows = assign_speakers(committed, new, SpeakerRule())
    by = {r["clip_id"]: r for r in rows}
    assert [r["clip_id"] for r in rows] == ["n1", "n2", "n3", "n4", "n5", "n6", "n7"]
    assert set(rows[0]) == {"clip_id", "speaker_id", "face_sim", "voice_sim", "method"}
    assert (by["n1"]["speaker_id"], by["n1"]["method"]) == ("spk-alice", "face") and by["n1"]["face_sim"] >= 0.6
    assert (by["n2"]["speaker_id"], by["n2"]["method"]) == ("spk-bob", "voice") and by["n2"]["voice_sim"] >= 0.85
    assert by["n2"]["face_sim"] is None
    assert (by["n3"]["speaker_id"], by["n3"]["method"]) == (speaker_id_for("n3"), "new")
    assert by["n3"]["face_sim"] < 0.6
    assert (by["n4"]["speaker_id"], by["n4"]["method"]) == (speaker_id_for("n3"), "face")
    assert (by["n5"]["speaker_id"], by["n5"]["method"]) == (speaker_id_for("n5"), "new")
    assert by["n5"]["voice_sim"] >= 0.85  # bob's voice, but a face that matches nobody founds a speaker
    assert by["n6"] == {"clip_id": "n6", "speaker_id": speaker_id_for("n6"), "face_sim": None, "voice_sim": None,
                        "method": "new"}
    assert by["n7"]["method"] == "new"
    # committed rows are untouched
    for c, s in zip(committed, snapshot):
        assert c.keys() == s.keys()
        for k in c:
            assert (np.array_equal(c[k], s[k]) if isinstance(c[k], np.ndarray) else c[k] == s[k])
    # a stricter rule sends n1 to a new speaker
    strict = {r["clip_id"]: r for r in assign_speakers(committed, new, SpeakerRule(face_threshold=0.999))}
    assert strict["n1"]["speaker_id"] == speaker_id_for("n1")


def test_assign_is_order_independent_and_centroids_follow_sorted_order():
    rs = np.random.RandomState(1)
    faces = [_rand_unit(rs) for _ in range(4)]
    committed = [{"clip_id": f"c{i}", "speaker_id": f"s{i % 2}", "face": _near(rs, faces[i % 2]), "voice": None}
                 for i in range(4)]
    new = [{"clip_id": f"n{i:02d}", "face": _near(rs, faces[i % 4], 0.3), "voice": None} for i in range(12)]
    ref = assign_speakers(committed, new)
    for seed in range(5):
        p = np.random.RandomState(seed)
        got = assign_speakers([committed[i] for i in p.permutation(4)], [new[i] for i in p.permutation(12)])
        assert got == ref
    sp = {r["clip_id"]: r["speaker_id"] for r in ref}
    assert all(sp[f"n{i:02d}"] == f"s{i % 2}" for i in (0, 1, 4, 5, 8, 9))
    assert sp["n02"] == speaker_id_for("n02") and sp["n03"] == speaker_id_for("n03")  # founded in sorted order
    assert all(sp[f"n{i:02d}"] == sp[f"n{i % 4:02d}"] for i in range(4, 12))
    # a clip between two speakers goes to the nearer centroid
    mid = _unit(0.45 * faces[0] + 0.55 * faces[1])
    r = assign_speakers(committed, [{"clip_id": "m", "face": mid, "voice": None}], SpeakerRule(face_threshold=0.3))
    assert r[0]["speaker_id"] == "s1"


def test_assign_rejects_duplicates():
    f = _unit(np.ones(128))
    committed = [{"clip_id": "a", "speaker_id": "s", "face": f, "voice": None}]
    with pytest.raises(ValueError):
        assign_speakers(committed, [{"clip_id": "a", "face": f, "voice": None}])
    with pytest.raises(ValueError):
        assign_speakers([], [{"clip_id": "b", "face": f, "voice": None}, {"clip_id": "b", "face": f, "voice": None}])


def test_assign_on_real_embeddings(people):
    """First time range of three people committed; the second ranges of all six, plus a voice-only clip
    of a committed person, arrive: the three rejoin their speakers, the other three found new ones."""
    names = list(people)
    committed = [{"clip_id": f"{n}/a", "speaker_id": f"spk-{n}", "face": _unit(np.mean(people[n]["face"][0], 0)),
                  "voice": people[n]["voice"][0]} for n in names[:3]]
    new = [{"clip_id": f"{n}/b", "face": _unit(np.mean(people[n]["face"][1], 0)), "voice": people[n]["voice"][1]}
           for n in names]
    new.append({"clip_id": f"{names[0]}/voice-only", "face": None, "voice": people[names[0]]["voice"][1]})
    rows = {r["clip_id"]: r for r in assign_speakers(committed, new)}
    for r in rows.values():
        print(f"assign {r['clip_id']}: {r['speaker_id']} {r['method']} face {r['face_sim']} voice {r['voice_sim']}")
    for n in names[:3]:
        assert rows[f"{n}/b"]["speaker_id"] == f"spk-{n}" and rows[f"{n}/b"]["method"] == "face"
    for n in names[3:]:
        assert rows[f"{n}/b"]["speaker_id"] == speaker_id_for(f"{n}/b")
    assert rows[f"{names[0]}/voice-only"]["speaker_id"] == f"spk-{names[0]}"
    assert rows[f"{names[0]}/voice-only"]["method"] == "voice"


def test_opencv_5_is_refused_with_the_reason_before_any_clip():
    from extractors.config import ExtractConfig
    from extractors.identity import check_opencv
    from pipelines.extract import clip_models

    check_opencv("4.11.0")  # what the project pins
    with pytest.raises(RuntimeError, match="OpenCV 5.0.0.*face_embedder=''"):
        check_opencv("5.0.0")  # the lent GPU machine's: its dnn engine rejects SFace on every clip
    assert clip_models(ExtractConfig())["face_embedder"] is not None  # this environment passes the check
