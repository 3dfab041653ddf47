"""Every quarantine reason, and the hard-but-good inputs, on real footage made in the test."""
import os
import subprocess

import numpy as np
import pytest

from extractors.config import IngestConfig
from extractors.ingest import analyse
from extractors.media import open_video, iter_frames, timeline
from extractors.probe import probe, sha256_file
from storage_schemas import FPS

CFG = IngestConfig()


def run_one(path):
    path = str(path)
    return analyse(path, path, sha256_file(path), os.path.getsize(path), CFG)


@pytest.mark.parametrize("case,reason", [
    ("empty", "empty_file"),
    ("random", "unreadable"),
    ("truncated_moov", "truncated"),
    ("truncated_data", "truncated"),
    ("audio_only", "no_video_stream"),
    ("no_audio", "no_audio_stream"),
    ("silent", "silent"),
    ("no_speech", "no_speech"),
    ("no_face", "no_face"),
    ("two_faces", "multiple_faces"),
    ("tiny", "face_too_small"),
    ("small_face", "face_too_small"),
    ("short", "too_short"),
    ("unsupported_codec", "unsupported_codec"),
])
def test_bad_input_is_quarantined_with_its_reason(cases, case, reason):
    r = run_one(cases[case])
    assert r["clips"] == []
    assert [q["reason"] for q in r["quarantine"]] == [reason], r["quarantine"]
    q = r["quarantine"][0]
    assert q["message"] and q["stage"] == "ingest" and q["source_id"] == r["source"]["source_id"]
    assert r["source"]["status"] == "quarantined"


@pytest.mark.parametrize("case", ["talk", "talk_b", "odd_name", "rotated", "vfr", "background_face"])
def test_good_input_yields_clips_on_the_30fps_grid(cases, case):
    r = run_one(cases[case])
    assert r["quarantine"] == [] and r["source"]["status"] == "ok"
    assert len(r["clips"]) >= 1
    for c in r["clips"]:
        assert c["fps"] == FPS
        assert c["n_frames"] == round(c["duration_s"] * FPS)
        assert CFG.min_clip_s <= c["duration_s"] <= CFG.max_clip_s
        assert c["clip_id"] == f"{r['source']['source_id']}-{c['start_frame']:06d}"
        assert c["speech_ratio"] >= CFG.min_speech_ratio
        assert c["face_size_px"] >= CFG.min_face_px


def test_background_face_is_tracked_and_ignored(cases):
    r = run_one(cases["background_face"])
    (c,) = r["clips"]
    assert c["n_other_faces"] >= 1  # the corner face was seen and tracked as a separate person
    x0, y0, x1, y1 = c["face_box"]
    assert x0 < 0.5 < x1  # the clip follows the large centre speaker, not the corner face
    assert c["duration_s"] >= 4.0


def test_rotation_matches_ffmpeg_display(cases):
    path = str(cases["rotated"])
    pr = probe(path, CFG.video_codecs)
    assert pr.rotation in (90, 270) and (pr.width, pr.height) == (256, 192)
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-"], capture_output=True, check=True).stdout
    ref = np.frombuffer(raw, np.uint8).reshape(pr.height, pr.width, 3)
    vr = open_video(path, pr.width, pr.height, 4096)
    _, frame = next(iter_frames(vr, timeline(vr, pr.duration_s), np.array([0])))
    assert frame.shape == ref.shape
    assert np.abs(frame.astype(int) - ref).mean() < 2.0
    assert run_one(cases["rotated"])["source"]["rotation"] == pr.rotation


def test_vfr_is_resampled_by_timestamp(cases):
    path = str(cases["vfr"])
    pr = probe(path, CFG.video_codecs)
    vr = open_video(path, pr.width, pr.height, 256)
    tl = timeline(vr, pr.duration_s)
    assert tl.vfr
    assert len(tl.starts) < tl.n_out  # fewer source frames than 30 fps slots: frames repeat by time
    k = np.arange(tl.n_out)
    src = tl.source_index(k)
    assert np.all(np.diff(src) >= 0) and src[-1] >= len(tl.starts) - 3
    # each slot shows the latest frame that started at or before its time
    assert np.all(tl.starts[src] <= k / FPS + 1e-6)
    nxt = np.minimum(src + 1, len(tl.starts) - 1)
    assert np.all((tl.starts[nxt] > k / FPS) | (nxt == src))
    assert run_one(cases["vfr"])["source"]["vfr"] is True


def test_a_bad_file_does_not_raise_even_when_the_path_vanishes(tmp_path):
    p = tmp_path / "x.mp4"
    p.write_bytes(b"\x00" * 100)
    r = analyse(str(p), str(p), "0" * 64, 100, CFG)
    assert r["quarantine"][0]["reason"] == "unreadable"
