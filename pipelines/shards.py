"""Wire the shard stage: per-source Ray tasks build sample bytes; the driver packs them into
deterministic, byte-bounded WebDataset shards, then writes the index tables, wids indexes and the
dataset card."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from extractors.config import ShardConfig
from extractors.shards import build_sample, keyframe_crop, pack, split_of, write_shard
from storage_schemas import SCHEMA_VERSION, open_dataset, table_path, write_json, write_table

from .frames import clip_frame_arrays

SHARD_DIR = "shards"


class ShardCommitted(RuntimeError):
    pass


def _sample_task(args: tuple) -> list[tuple[str, dict]]:
    ds_dir, source, clips, splits, labels, cfg_d = args
    import decord

    from extractors.media import decode_audio
    from extractors.transcribe import clip_audio

    cfg = ShardConfig(**cfg_d)
    ds = open_dataset(ds_dir)
    audio = decode_audio(source["uri"])
    tr = {r["clip_id"]: {k: r[k] for k in ("engine", "language", "text", "words")}
          for r in ds.table("transcripts").to_pylist()} if "transcripts" in ds.tables else {}
    vr = decord.VideoReader(source["uri"], ctx=decord.cpu(0), num_threads=1)
    ts = np.asarray(vr.get_frame_timestamp(np.arange(len(vr))))[:, 0]
    out = []
    for c in clips:
        mid_t = (c["start_s"] + c["end_s"]) / 2
        idx = int(np.clip(np.searchsorted(ts - ts[0], mid_t, side="right") - 1, 0, len(vr) - 1))
        key = keyframe_crop(vr[idx].asnumpy(), c["face_box"], cfg.keyframe_size)
        m = build_sample(c, source, clip_frame_arrays(ds, c["clip_id"], cfg.include_landmarks),
                         clip_audio(audio, c["start_s"], c["end_s"]), key, labels.get(c["clip_id"], {}),
                         tr.get(c["clip_id"]), splits[c["clip_id"]], SCHEMA_VERSION, cfg.include_landmarks)
        out.append((c["clip_id"], m))
    return out


def current_labels(ds) -> dict[str, dict]:
    if "label_rows" not in ds.tables:
        return {}
    rows = ds.query("select * from label_rows qualify row_number() over (partition by clip_id, field "
                    "order by run desc, labeler) = 1 order by clip_id, field").to_pylist()
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r["clip_id"], {})[r["field"]] = {
            "value": json.loads(r["value"]), "labeler": r["labeler"], "labeler_version": r["labeler_version"],
            "confidence": r["confidence"]}
    return out


def run_shards(out: str | os.PathLike, cfg: ShardConfig, ex, progress: Callable[[str, int, int], None] | None = None) -> dict:
    out = Path(out)
    tick = progress or (lambda *a: None)
    ds = open_dataset(out)
    clips = ds.query("select c.* from clips c join clip_features f using (clip_id) where f.status = 'ok' "
                     "order by c.clip_id").to_pylist()
    sources = {s["source_id"]: s for s in ds.table("sources").to_pylist()}
    splits = {c["clip_id"]: split_of(c["source_id"], (cfg.train_fraction, cfg.val_fraction)) for c in clips}
    labels = current_labels(ds)
    by_src: dict[str, list[dict]] = {}
    for c in clips:
        by_src.setdefault(c["source_id"], []).append(c)
    work = [(str(out), sources[sid], cs, splits, {c["clip_id"]: labels.get(c["clip_id"], {}) for c in cs},
             cfg.to_dict()) for sid, cs in sorted(by_src.items())]
    samples: dict[str, dict] = {}
    tick("shard", 0, len(work))
    for i, (_, res) in enumerate(ex.map_unordered(_sample_task, work)):
        samples.update(dict(res))
        tick("shard", i + 1, len(work))
    shard_rows, sample_rows = [], []
    committed = {r["shard"]: r for r in ds.table("shards").to_pylist()} if "shards" in ds.tables else {}
    for split in ("train", "val", "test"):
        keys = sorted(k for k in samples if splits[k] == split)
        sizes = [sum(len(v) for v in samples[k].values()) for k in keys]
        for si, group in enumerate(pack(sizes, cfg.max_shard_bytes)):
            rel = f"{SHARD_DIR}/{split}-{si:06d}.tar"
            path = out / rel
            members = [(keys[g], samples[keys[g]]) for g in group]
            if path.exists() and rel in committed:
                # committed shards are never rewritten: write aside and compare
                sha, nbytes = write_shard(path.with_suffix(".check"), members)
                os.unlink(path.with_suffix(".check"))
                if sha != committed[rel]["sha256"]:
                    raise ShardCommitted(f"shard {rel} is committed with sha256 {committed[rel]['sha256'][:12]} and "
                                         f"would change ({sha[:12]}); write changed data under a new dataset version")
            else:
                sha, nbytes = write_shard(path, members)
            shard_rows.append({"shard": rel, "split": split, "sha256": sha, "n_samples": len(group), "bytes": nbytes})
            for j, g in enumerate(group):
                sample_rows.append({"clip_id": keys[g], "split": split, "shard": rel, "index_in_shard": j,
                                    "n_frames": int(next(c["n_frames"] for c in clips if c["clip_id"] == keys[g])),
                                    "bytes": sizes[g]})
    write_table(table_path(out, "shards"), "shards", shard_rows)
    write_table(table_path(out, "samples"), "samples", sample_rows)
    for split in ("train", "val", "test"):
        write_json(out / SHARD_DIR / f"{split}.wids.json", {
            "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"M2F-D {split}",
            "shardlist": [{"url": Path(r["shard"]).name, "nsamples": r["n_samples"]}
                          for r in shard_rows if r["split"] == split]})
    return {"shards": len(shard_rows), "samples": len(sample_rows),
            "bytes": int(sum(r["bytes"] for r in shard_rows)),
            "splits": {s: sum(1 for r in sample_rows if r["split"] == s) for s in ("train", "val", "test")}}
