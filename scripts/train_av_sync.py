"""Fit the shipped AV-sync model (models/av_sync.py) on the ok clips of one or more M2F-D datasets and
write it with its training record: which clips, how many frames, and the leave-one-source-out AUC of
real against dubbed measured on the same data before the final fit.

    .venv/bin/python scripts/train_av_sync.py DATASET [DATASET ...] [--out models/assets/av-sync-v2/av_sync.safetensors]

The shipped one: `m2fd run ../shared/data/corpus ../shared/data/real --out <ds>`, then this on <ds>
(a new shipped file needs its sha256 in models.av_sync.SHIPPED_SHA256: load checks it). The speech states
come from each clip's audio, decoded from its source (clips.uri) one source at a time, through the packaged
Whisper-base encoder (--encoder: another CTranslate2 folder). The leave-one-source-out figure scores clips
against each other, so every clip's states stay in memory (2 KB a frame: 20 MB for the shipped model's
10,252 frames)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import av_sync  # noqa: E402
from pipelines.frames import clip_frame_arrays  # noqa: E402
from storage_schemas import open_dataset  # noqa: E402


def dataset_clips(root: str, encoder: av_sync.SpeechEncoder):
    """(source_id, clip_id, speech states, blendshapes, mouth_open) of every ok clip, one source's audio
    decoded at a time."""
    from extractors.media import decode_audio
    from extractors.transcribe import clip_audio

    ds = open_dataset(root)
    rows = ds.query("select c.source_id, c.clip_id, c.uri, c.start_s, c.end_s from clip_features f join clips c "
                    "using (clip_id) where f.status = 'ok' order by c.source_id, c.clip_id").to_pylist()
    audio, uri = None, None
    for r in rows:
        if r["uri"] != uri:
            audio, uri = decode_audio(r["uri"]), r["uri"]
        a = clip_frame_arrays(ds, r["clip_id"])
        st = encoder.states(clip_audio(audio, r["start_s"], r["end_s"]), len(a["blendshapes"]))
        if st is not None:
            yield r["source_id"], r["clip_id"], st, a["blendshapes"], a["mouth_open"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--out", default=str(av_sync.SHIPPED))
    ap.add_argument("--alpha", type=float, default=av_sync.ALPHA)
    ap.add_argument("--encoder", default=None, help="Whisper-base CTranslate2 folder (default: the packaged one)")
    args = ap.parse_args()
    from models.packaged import path as packaged_path

    encoder = av_sync.SpeechEncoder(args.encoder or packaged_path(av_sync.ENCODER).parent)
    clips = [c for root in args.datasets for c in dataset_clips(root, encoder)]
    if not clips:
        raise SystemExit("no ok clips with frames in " + ", ".join(args.datasets))
    real, dub = av_sync.leave_one_source_out([(s, st, b, o) for s, _, st, b, o in clips], args.alpha)
    a = av_sync.auc(real, dub)
    w = av_sync.fit(lambda: ((st, b, o) for _, _, st, b, o in clips), args.alpha)
    info = {"alpha": args.alpha, "clips": len(clips), "sources": len({c[0] for c in clips}),
            "frames": int(sum(len(c[3]) for c in clips)), "clip_ids": sorted(c[1] for c in clips),
            "loso_auc_real_vs_dubbed": round(a, 4), "loso_real": len(real), "loso_dubbed": len(dub)}
    sha = av_sync.save(args.out, w, info, encoder.sha256)
    print(f"{len(clips)} clips of {info['sources']} sources, {info['frames']} frames; leave-one-source-out AUC "
          f"real vs dubbed {a:.3f} ({len(real)} real, {len(dub)} dubbed; real median {np.median(real):.3f}, "
          f"dubbed median {np.median(dub):.3f}) -> {args.out} sha256 {sha}")


if __name__ == "__main__":
    main()
