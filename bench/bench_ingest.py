"""Ingest benchmark on the shared real videos, measured side by side in one run.

Prints, per video and in total:
  * decode: the stage's decode path (decord, sequential, 1 thread, frames resampled to the 30 fps grid,
    skipped frames not colour-converted) in source frames/s, next to `ffmpeg -threads 1 -f null` on
    the same file (target: stage >= 0.8x ffmpeg, per core);
  * face detection: the stage's detector wrapper + tracker in frames/s, next to MediaPipe's
    FaceDetection.process alone on the same decoded frames;
  * the whole per-source analysis (probe, audio, VAD, decode, detection, clip cutting) in video-seconds/s.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from extractors.config import IngestConfig  # noqa: E402
from extractors.faces import FaceDetector, track  # noqa: E402
from extractors.ingest import analyse  # noqa: E402
from extractors.media import iter_frames, open_video, timeline  # noqa: E402
from extractors.probe import probe, sha256_file  # noqa: E402
from storage_schemas import FPS  # noqa: E402


def best_of(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def ffmpeg_null(path):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-i", path, "-map", "0:v:0", "-f", "null", "-"],
                   check=True)


def stage_decode(path, pr, cfg, stride):
    vr = open_video(path, pr.width, pr.height, cfg.analysis_max_side)
    tl = timeline(vr, pr.duration_s)
    frames = [f for _, f in iter_frames(vr, tl, np.arange(0, tl.n_out, stride))]
    return len(tl.starts), frames


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", default=str(REPO.parent / "shared" / "data" / "real"))
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    cfg = IngestConfig()
    stride = int(round(FPS / cfg.detect_fps))
    rows = []
    tot = {"src_frames": 0, "t_ff": 0.0, "t_dec": 0.0, "det_frames": 0, "t_det": 0.0, "t_mp": 0.0, "video_s": 0.0,
           "t_an": 0.0}
    from mediapipe.python.solutions import face_detection

    for path in sorted(Path(a.real).glob("*.mp4")):
        p = str(path)
        pr = probe(p, cfg.video_codecs)
        t_ff, _ = best_of(lambda: ffmpeg_null(p), a.repeat)
        t_dec, (n_src, frames) = best_of(lambda: stage_decode(p, pr, cfg, stride), a.repeat)
        det = FaceDetector(cfg.face_model, cfg.face_min_score)
        t_det, _ = best_of(lambda: track([det.detect(f) for f in frames], cfg.track_iou, 5), a.repeat)
        det.close()
        with face_detection.FaceDetection(model_selection=cfg.face_model,
                                          min_detection_confidence=cfg.face_min_score) as fd:
            t_mp, _ = best_of(lambda: [fd.process(f) for f in frames], a.repeat)
        sha, size = sha256_file(p), os.path.getsize(p)
        t_an, res = best_of(lambda: analyse(p, p, sha, size, cfg), 1)
        rows.append((path.name, f"{pr.width}x{pr.height}", n_src / t_ff, n_src / t_dec, (t_ff / t_dec),
                     len(frames) / t_det, len(frames) / t_mp, t_mp / t_det, pr.duration_s / t_an,
                     res["source"]["status"]))
        for k, v in (("src_frames", n_src), ("t_ff", t_ff), ("t_dec", t_dec), ("det_frames", len(frames)),
                     ("t_det", t_det), ("t_mp", t_mp), ("video_s", pr.duration_s), ("t_an", t_an)):
            tot[k] += v
    hdr = (f"{'video':12s} {'size':>9s} | {'ffmpeg fps':>10s} {'stage fps':>10s} {'ratio':>6s} | "
           f"{'det fps':>8s} {'mp fps':>8s} {'ratio':>6s} | {'analyse x rt':>12s} status")
    print("ingest benchmark (1 core each; decode = source frames/s; detection at "
          f"{cfg.detect_fps:g} fps on frames <= {cfg.analysis_max_side}px, model {cfg.face_model})")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r[0]:12s} {r[1]:>9s} | {r[2]:10.0f} {r[3]:10.0f} {r[4]:6.2f} | {r[5]:8.0f} {r[6]:8.0f} {r[7]:6.2f} | "
              f"{r[8]:12.1f} {r[9]}")
    print("-" * len(hdr))
    dec_ratio = tot["t_ff"] / tot["t_dec"]
    det_ratio = tot["t_mp"] / tot["t_det"]
    print(f"{'TOTAL':12s} {'':>9s} | {tot['src_frames'] / tot['t_ff']:10.0f} {tot['src_frames'] / tot['t_dec']:10.0f} "
          f"{dec_ratio:6.2f} | {tot['det_frames'] / tot['t_det']:8.0f} {tot['det_frames'] / tot['t_mp']:8.0f} "
          f"{det_ratio:6.2f} | {tot['video_s'] / tot['t_an']:12.1f}")
    print(f"decode: stage/ffmpeg = {dec_ratio:.2f}x (target >= 0.80) -> {'PASS' if dec_ratio >= 0.8 else 'MISS'}")
    print(f"detection: stage/MediaPipe alone = {det_ratio:.2f}x (target >= 0.90) -> {'PASS' if det_ratio >= 0.9 else 'MISS'}")


if __name__ == "__main__":
    main()
