"""Ray Data reader over M2F-D shards (for Ray Train and batch inference on a cluster)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _decode(row: dict) -> dict:
    from models.data import _npy

    out = {"clip_id": row["__key__"]}
    for k in ("latents", "pose", "audio_feat", "mask"):
        out[k] = np.array(_npy(row[f"{k}.npy"]))
    return out


def read_m2fd(root: str | Path, split: str | None = "train", subset: str | Path | None = None):
    """A ray.data.Dataset with one row per clip: clip_id, latents, pose, audio_feat, mask."""
    import ray

    from models.data import load_entries

    root, entries = load_entries(root, split, subset)
    shards = sorted({e["shard"] for e in entries})
    keep = {e["clip_id"] for e in entries}
    ds = ray.data.read_webdataset([str(Path(root) / s) for s in shards], decoder=None,
                                  suffixes=["latents.npy", "pose.npy", "audio_feat.npy", "mask.npy"])
    return ds.filter(lambda r: r["__key__"] in keep).map(_decode)
