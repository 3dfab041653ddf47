"""Active-speaker detection (Light-ASD) in ingest: the released weights, the MFCC it was trained on,
the speaking score of real talking faces vs faces that do not speak, and the speaker among two faces."""
import os
from pathlib import Path

import numpy as np
import pytest

from extractors.audio_features import mfcc_100hz
from extractors.config import IngestConfig
from extractors.ingest import analyse
from extractors.media import decode_audio
from extractors.probe import sha256_file
from models import light_asd
from pipelines.ingest import config_scorer
from samples import _ff  # examples/samples.py: the ffmpeg call every test fixture uses
from storage_schemas import open_dataset

CFG = IngestConfig()
ENC = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "20", "-pix_fmt", "yuv420p", "-c:a", "aac"]


def _analyse(p: Path, cfg: IngestConfig = CFG) -> dict:
    asd = config_scorer(cfg)
    return analyse(str(p), str(p), sha256_file(p), p.stat().st_size, cfg, asd=asd.track if asd else None)


def test_released_weights_load_strictly_and_are_checked(tmp_path):
    path = light_asd.resolve(CFG.asd_weights)
    model, sha = light_asd.load(path)
    assert sha == light_asd.WEIGHTS[path.name]
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    bad = tmp_path / path.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        light_asd.load(bad)
    with pytest.raises(FileNotFoundError, match="asd_weights"):
        light_asd.load(tmp_path / "missing.model")


def test_mfcc_is_the_definition_light_asd_was_trained_on(real_dir):
    psf = pytest.importorskip("python_speech_features")
    a = decode_audio(str(real_dir / "d12.mp4"))[:48000]
    ref = psf.mfcc(a * 32768.0, 16000, numcep=13, winlen=0.025, winstep=0.010)
    got = mfcc_100hz(a)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_the_2d_and_folded_visual_paths_equal_the_released_3d_network():
    import torch

    model, _ = light_asd.load(light_asd.resolve(CFG.asd_weights))
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 1, 12, 112, 112)).astype(np.float32) / 255)
    with torch.no_grad():
        e = model.model.visualEncoder
        a, b, c = e(x), e.forward_2d(x), e.forward_folded(x, model._folded)
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(b, c, atol=1e-4)
    # the whole network: the folded path (what load() gives) against the unfolded one, on real-sized input
    faces = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (1, 50, 112, 112), dtype=np.uint8))
    mfcc = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 200, 13)).astype(np.float32))
    with torch.no_grad():
        folded = model(faces, mfcc)
        model._folded = None
        plain = model(faces, mfcc)
    assert torch.allclose(folded, plain, atol=1e-4)


@pytest.fixture(scope="module")
def made(tmp_path_factory, real_dir):
    d = tmp_path_factory.mktemp("asd")
    talk = d / "talk.mp4"
    _ff("-i", str(real_dir / "d12.mp4"), "-vf", "scale=320:320,fps=30", *ENC, str(talk))
    # the same person's first frame held over the same speech: a face that does not speak
    still = d / "still.mp4"
    _ff("-i", str(talk), "-filter_complex", "[0:v]trim=end_frame=1,loop=loop=-1:size=1,setpts=N/30/TB[v]",
        "-map", "[v]", "-map", "0:a", *ENC, "-shortest", str(still))
    # two people side by side, of the same size: the talking one (right) and another person held still
    other = d / "other_still.mp4"
    _ff("-i", str(real_dir / "d14.mp4"), "-t", "8", "-filter_complex",
        "[0:v]scale=320:320,trim=end_frame=1,loop=loop=-1:size=1,setpts=N/30/TB[v]", "-map", "[v]", "-an",
        "-t", "8", *ENC[:-2], str(other))
    comp = d / "two_people.mp4"
    _ff("-i", str(other), "-i", str(talk), "-filter_complex", "[0:v][1:v]hstack=inputs=2[v]", "-map", "[v]",
        "-map", "1:a", *ENC, "-shortest", str(comp))
    return {"talk": talk, "still": still, "two_people": comp}


def test_a_talking_face_is_kept_and_a_still_face_over_speech_is_not_speaking(made):
    r = _analyse(made["talk"])
    assert r["source"]["status"] == "ok" and r["clips"]
    assert all(c["speaking_score"] >= CFG.min_speaking_score for c in r["clips"])
    assert r["tracks"] and r["tracks"][0]["asd_fps"] == 25 and r["tracks"][0]["speaker"]
    s = _analyse(made["still"])
    assert s["source"]["status"] == "quarantined"
    assert s["quarantine"][0]["reason"] == "not_speaking", s["quarantine"]
    # the same scores, nothing dropped, when the gate is opened: the still face scores below the talking one
    keep = IngestConfig(min_speaking_score=-1e9)
    low = _analyse(made["still"], keep)["clips"]
    assert low and max(c["speaking_score"] for c in low) < min(c["speaking_score"] for c in r["clips"])


def test_of_two_faces_of_the_same_size_the_speaking_one_is_chosen(made):
    r = _analyse(made["two_people"])
    assert r["source"]["status"] == "ok", r["quarantine"]
    for c in r["clips"]:
        assert (c["face_box"][0] + c["face_box"][2]) / 2 > 0.5  # the talking person is on the right
        assert c["n_other_faces"] >= 1
    # the torch port of the face detector (ingest.detector=torch) finds both faces alike and the same speaker;
    # its boxes differ from MediaPipe's in the third decimal, which moves the first second's speaker decision
    # (ASD-sync at its margin there): the clip spans overlap by more than 80% (measured: 0-219 vs 30-219)
    from pipelines.ingest import face_detector

    p = made["two_people"]
    asd = config_scorer(CFG)
    port = analyse(str(p), str(p), sha256_file(p), p.stat().st_size, CFG, asd=asd.track,
                   detector=face_detector("torch-cpu", CFG))["clips"]
    assert len(port) == len(r["clips"])
    for a, b in zip(port, r["clips"]):
        assert (a["face_box"][0] + a["face_box"][2]) / 2 > 0.5 and a["n_other_faces"] >= 1
        lo, hi = max(a["start_frame"], b["start_frame"]), min(a["start_frame"] + a["n_frames"], b["start_frame"] + b["n_frames"])
        assert hi - lo > 0.8 * max(a["n_frames"], b["n_frames"]), (a["start_frame"], a["n_frames"], b["start_frame"], b["n_frames"])
    # without active-speaker detection the same video cannot be used
    off = _analyse(made["two_people"], IngestConfig(asd_weights=""))
    assert off["source"]["status"] == "quarantined" and off["quarantine"][0]["reason"] == "multiple_faces"


def test_scores_reach_the_tables_and_the_lineage(real_run):
    import json

    out, _ = real_run
    ds = open_dataset(out)
    rows = ds.query("select c.clip_id, c.speaking_score s, f.speaking_score fs from clips c "
                    "join clip_features f using (clip_id)").to_pylist()
    assert rows and all(r["s"] is not None and r["s"] == pytest.approx(r["fs"]) for r in rows)
    tr = ds.query("select source_id, track_id, speaker, len(speaking_score) n from face_tracks").to_pylist()
    assert tr and all(t["n"] > 0 for t in tr)
    speakers = {(t["source_id"], t["track_id"]) for t in tr if t["speaker"]}
    clips = ds.query("select source_id, face_track_id from clips").to_pylist()
    assert {(c["source_id"], c["face_track_id"]) for c in clips} == speakers
    card = json.loads((out / "dataset.json").read_text())
    asd = card["lineage"]["checkpoints"]["active_speaker"]
    assert asd["sha256"] == light_asd.WEIGHTS[os.path.basename(asd["path"])]
    from models import asd_sync, packaged

    assert asd["sync"]["sha256"] == asd_sync.SHIPPED_SHA256
    assert asd["sync"]["encoder"]["sha256"] == packaged.PACKAGED["whisper-base"].sha256
    fd = card["lineage"]["checkpoints"]["face_detection"]  # the full-range model file both detectors run
    assert fd["detector"] == "mediapipe" and fd["path"].endswith("face_detection_full_range_sparse.tflite")
    assert fd["sha256"] == packaged.sha256_of(fd["path"])


class _Cluster:
    """An executor stand-in that reports a GPU in the cluster (what RayExecutor.has_gpu answers)."""

    def has_gpu(self) -> bool:
        return True


def test_gpu_shares_follow_the_config():
    import dataclasses

    from extractors.config import ExtractConfig
    from pipelines.extract import track_resources
    from pipelines.ingest import _analyse_task, analysis_gpu
    from pipelines.stages import task_options

    assert not analysis_gpu(CFG, _Cluster())  # cpu by default: the same scores on every machine
    auto = dataclasses.replace(CFG, asd_device="auto")
    assert analysis_gpu(auto, _Cluster()) and not analysis_gpu(dataclasses.replace(auto, asd_weights=""), _Cluster())
    assert task_options(_analyse_task, use_gpu=True)["num_gpus"] == 1 / 32
    with pytest.raises(ValueError, match="asd_device"):
        dataclasses.replace(CFG, asd_device="gpu").check()
    assert track_resources(ExtractConfig(landmarker="torch"), _Cluster())["num_gpus"] == 1 / 8
    assert track_resources(ExtractConfig(landmarker="torch", tasks_per_gpu=16), _Cluster())["num_gpus"] == 1 / 16
    assert "num_gpus" not in track_resources(ExtractConfig(landmarker="mediapipe"), _Cluster())
    # transcription on CUDA needs the task to see a GPU, whichever landmarker runs; so does the torch detector
    assert track_resources(ExtractConfig(landmarker="mediapipe", asr_device="cuda"), _Cluster())["num_gpus"] == 1 / 8
    assert analysis_gpu(dataclasses.replace(CFG, detector="torch"), _Cluster())


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_light_asd_on_cuda_gives_the_cpu_scores(real_dir):
    rng = np.random.default_rng(0)
    audio = decode_audio(str(real_dir / "d12.mp4"))
    mfcc = mfcc_100hz(audio)[:400]
    faces = rng.integers(0, 255, (100, 112, 112), dtype=np.uint8)
    path = light_asd.resolve(CFG.asd_weights)
    cpu = light_asd.Scorer(path, (4,), 1, "cpu")(faces, mfcc)
    cuda = light_asd.Scorer(path, (4,), 1, "cuda")(faces, mfcc)
    assert np.abs(cpu - cuda).max() < 1e-2 * max(1.0, float(np.abs(cpu).max()))


def _crop_per_tap(frame, box, size=112):
    """asd_crop as first written: each bilinear tap gathers its RGB pixels and converts them to grey."""
    from extractors.asd import PAD_VALUE

    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    s = max(x1 - x0, y1 - y0) / 2
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2 + 0.4 * s, 1.4 * s
    g = (np.arange(size) + 0.5) / size * side - side / 2 - 0.5
    xs, ys = cx + g, cy + g
    xi, yi = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    fx, fy = (xs - xi).astype(np.float32), (ys - yi).astype(np.float32)
    out = np.zeros((size, size), np.float32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = yi + dy, xi + dx
            px = frame[np.clip(yy, 0, h - 1)[:, None], np.clip(xx, 0, w - 1)[None, :]].astype(np.float32)
            grey = px[..., 0] * 0.299 + px[..., 1] * 0.587 + px[..., 2] * 0.114
            valid = ((yy >= 0) & (yy < h))[:, None] & ((xx >= 0) & (xx < w))[None, :]
            out += np.where(valid, grey, PAD_VALUE) * (wy[:, None] * wx[None, :])
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def test_asd_crop_equals_the_per_tap_crop_inside_and_across_the_border(real_dir):
    from extractors.asd import asd_crop
    from extractors.media import open_video

    rng = np.random.default_rng(3)
    vr = open_video(str(real_dir / "d12.mp4"), 512, 512, 512)
    frames = [vr[i].asnumpy() for i in (0, 60, 120)]
    for k in range(120):
        fr = frames[k % 3] if k % 2 else rng.integers(0, 256, tuple(rng.integers(60, 700, 2)) + (3,), dtype=np.uint8)
        h, w = fr.shape[:2]
        cx, cy, s = rng.uniform(-60, w + 60), rng.uniform(-60, h + 60), rng.uniform(5, 400)
        box = np.array([cx - s, cy - s * rng.uniform(0.8, 1.2), cx + s, cy + s], np.float32)
        assert np.array_equal(asd_crop(fr, box), _crop_per_tap(fr, box)), (k, box)
