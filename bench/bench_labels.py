"""Labeling throughput next to the extraction stage's, on the same clips, one core each, one run.

Needs a dataset made by `m2fd run ../shared/data/real --out D`. Prints clips/s and frames/s per core
for extraction (Face Mesh, pose, audio features, transcription) and for the default labeler chain,
and each labeler's share of the labeling time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    import torch

    torch.set_num_threads(1)
    from extractors.config import ExtractConfig
    from extractors.extract import extract_source
    from extractors.labels import get_labeler
    from extractors.labels.context import DEFAULT_CHAIN, contexts_for_source
    from extractors.transcribe import make_transcriber
    from pipelines.frames import clip_frame_arrays
    from pipelines.stage_io import source_audio
    from storage_schemas import open_dataset
    from storage_schemas.arrays import read_array

    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=Path, default=REPO / "out" / "bench-real")
    a = ap.parse_args()
    ds = open_dataset(a.dataset)
    clips = ds.query("select c.* from clips c join clip_features f using (clip_id) where f.status='ok' "
                     "order by c.clip_id").to_pylist()
    srcs = {s["source_id"]: s for s in ds.table("sources").to_pylist()}
    by_src: dict[str, list[dict]] = {}
    for c in clips:
        by_src.setdefault(c["source_id"], []).append(c)
    n_frames = sum(c["n_frames"] for c in clips)
    cfg = ExtractConfig()
    tr = make_transcriber(cfg.whisper_checkpoint)
    t0 = time.perf_counter()
    for sid, cs in by_src.items():
        s = srcs[sid]
        extract_source(s["uri"], s["width"], s["height"], cs, cfg, transcriber=tr)
    t_ext = time.perf_counter() - t0
    transcripts = {r["clip_id"]: r for r in ds.table("transcripts").to_pylist()}
    labelers = [get_labeler(n) for n in DEFAULT_CHAIN]
    per = {n: 0.0 for n in DEFAULT_CHAIN}
    t0 = time.perf_counter()
    for sid, cs in by_src.items():
        ids = [c["clip_id"] for c in cs]
        crops = {c: read_array(a.dataset, "crops", c) for c in ids}
        ctxs = contexts_for_source(source_audio(a.dataset, srcs[sid]), cs, {c: clip_frame_arrays(ds, c) for c in ids}, crops, transcripts)
        for c in ctxs:
            c.labels = {}
        for lab in labelers:
            t1 = time.perf_counter()
            rows = lab.label_batch(ctxs)
            per[lab.name] += time.perf_counter() - t1
            for r in rows:
                next(c for c in ctxs if c.clip_id == r.clip_id).labels[r.field] = r.value
    t_lab = time.perf_counter() - t0
    print(f"{len(clips)} clips, {n_frames} frames (30 fps), 1 core each ({tr.engine} transcription)")
    print(f"  extraction: {len(clips) / t_ext:7.3f} clips/s {n_frames / t_ext:8.1f} frames/s  ({t_ext:.1f} s)")
    print(f"  labeling:   {len(clips) / t_lab:7.3f} clips/s {n_frames / t_lab:8.1f} frames/s  ({t_lab:.1f} s)"
          f"  = {t_ext / t_lab:.1f}x the extraction rate")
    print("  labeling time by labeler: " + ", ".join(f"{k} {v:.2f} s" for k, v in per.items()))


if __name__ == "__main__":
    main()
