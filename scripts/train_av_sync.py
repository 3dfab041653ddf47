"""Fit the shipped AV-sync model (models/av_sync.py) on the ok clips of one or more M2F-D datasets and
write it with its training record: which clips, how many frames, and the leave-one-source-out AUC of
real against dubbed measured on the same data before the final fit.

    .venv/bin/python scripts/train_av_sync.py DATASET [DATASET ...] [--out models/assets/av-sync-v1/av_sync.safetensors]

The shipped one: `m2fd run ../shared/data/corpus ../shared/data/real --out <ds>`, then this on <ds>
(a new shipped file needs its sha256 in models.av_sync.SHIPPED_SHA256: load checks it).
Reads one clip's frames at a time (memory does not grow with the dataset)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import av_sync  # noqa: E402
from pipelines.frames import clip_frame_arrays  # noqa: E402
from storage_schemas import open_dataset  # noqa: E402


def dataset_clips(root: str):
    """(source_id, clip_id, audio_mel, blendshapes, mouth_open) of every ok clip, one clip at a time."""
    ds = open_dataset(root)
    for r in ds.query("select source_id, clip_id from clip_features where status = 'ok' "
                      "order by source_id, clip_id").to_pylist():
        a = clip_frame_arrays(ds, r["clip_id"])
        yield r["source_id"], r["clip_id"], a["audio_mel"], a["blendshapes"], a["mouth_open"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--out", default=str(av_sync.SHIPPED))
    ap.add_argument("--alpha", type=float, default=av_sync.ALPHA)
    args = ap.parse_args()
    clips = [c for root in args.datasets for c in dataset_clips(root)]
    if not clips:
        raise SystemExit("no ok clips with frames in " + ", ".join(args.datasets))
    real, dub = av_sync.leave_one_source_out([(s, m, b, o) for s, _, m, b, o in clips], args.alpha)
    a = av_sync.auc(real, dub)
    w = av_sync.fit(((m, b, o) for _, _, m, b, o in clips), args.alpha)
    info = {"alpha": args.alpha, "clips": len(clips), "sources": len({c[0] for c in clips}),
            "frames": int(sum(len(c[2]) for c in clips)), "clip_ids": sorted(c[1] for c in clips),
            "loso_auc_real_vs_dubbed": round(a, 4), "loso_real": len(real), "loso_dubbed": len(dub)}
    sha = av_sync.save(args.out, w, info)
    print(f"{len(clips)} clips of {info['sources']} sources, {info['frames']} frames; leave-one-source-out AUC "
          f"real vs dubbed {a:.3f} ({len(real)} real, {len(dub)} dubbed; real median {np.median(real):.3f}, "
          f"dubbed median {np.median(dub):.3f}) -> {args.out} sha256 {sha}")


if __name__ == "__main__":
    main()
