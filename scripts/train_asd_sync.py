"""Fit the shipped ASD-sync model (models/asd_sync.py) on talking videos of one visible speaker each and
write it with its training record, including the leave-one-person-out figures measured on the same
videos before the final fit (per-window AUC of real against dubbed, and how often the track that speaks
a window's audio scores above another person's track for the same audio).

    .venv/bin/python scripts/train_asd_sync.py ../shared/data/corpus ../shared/data/real [--out models/assets/asd-sync-v2/asd_sync.safetensors]

Each video goes through ingest's own analysis (extractors.ingest.analyse: detection, tracking, Light-ASD
crops and windows of the default config); the Light-ASD visual embeddings of its runs and the speech
states of each run's audio (the packaged Whisper-base's encoder, models.av_sync.SpeechEncoder) are kept
where the video has exactly one face track and at least one talking clip (so the track is the one
speaking). Each video is one person (the shared corpus is 17 people, the real videos d12, d14 and s18
three more). The arrays of every run are held in memory (about 10 MB a minute of video). A new shipped
file needs its sha256 in models.asd_sync.SHIPPED_SHA256: load checks it."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extractors.config import IngestConfig  # noqa: E402
from extractors.ingest import analyse  # noqa: E402
from extractors.probe import sha256_file  # noqa: E402
from models import asd_sync  # noqa: E402
from models.av_sync import SpeechEncoder, resolve_encoder  # noqa: E402
from pipelines.ingest import asd_scorer  # noqa: E402


def embeddings(paths: list[Path], encoder: SpeechEncoder):
    """(person, visual embeddings, speech states) of every run of the single speaking track of each video."""
    cfg = dataclasses.replace(IngestConfig(), min_speaking_score=-1e9)
    scorer = asd_scorer(cfg.asd_weights, tuple(cfg.asd_durations_s), cfg.asd_threads)
    for p in paths:
        runs: list[tuple[np.ndarray, np.ndarray | None]] = []

        def record(faces, mfcc, audio):
            logits, ve, _ = scorer.embed(faces, mfcc)
            runs.append((ve, encoder.states(audio, len(ve), asd_sync.FPS)))
            return logits, None

        r = analyse(str(p), str(p), sha256_file(p), p.stat().st_size, cfg, asd=record)
        used = len(r["tracks"]) == 1 and bool(r["clips"])
        print(f"{p.name}: {len(r['tracks'])} track(s), {len(r['clips'])} clip(s), runs {[len(v) for v, _ in runs]}"
              f"{'' if used else ' (not used)'}", flush=True)
        if used:
            yield from ((p.stem, v, st) for v, st in runs if len(v) >= asd_sync.MIN_FRAMES and st is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="video files or folders of them")
    ap.add_argument("--out", default=str(asd_sync.SHIPPED))
    ap.add_argument("--encoder", default="packaged",
                    help='the speech encoder: a Whisper-base CTranslate2 folder, or "packaged" (the registry\'s)')
    args = ap.parse_args()
    paths = sorted(f for i in args.inputs for f in ([Path(i)] if Path(i).is_file() else Path(i).iterdir())
                   if f.suffix.lower() in IngestConfig().extensions)
    encoder = SpeechEncoder(resolve_encoder(args.encoder, "--encoder"))
    runs = list(embeddings(paths, encoder))
    if len({r[0] for r in runs}) < 3:
        raise SystemExit("need single-speaker talking videos of at least 3 people")
    info: dict = {"alpha": asd_sync.ALPHA, "people": sorted({r[0] for r in runs}), "runs": len(runs),
                  "frames": int(sum(len(r[1]) for r in runs))}
    for secs in (10, 5):
        e = asd_sync.leave_one_person_out(runs, window=secs * 25)
        info[f"lopo_{secs}s"] = {"auc_real_vs_dubbed": round(e["auc"], 4), "right_track": round(e["pairs"], 4),
                                 "pairs": e["n_pairs"], "real": len(e["real"]), "dubbed": len(e["dubbed"])}
        print(f"leave one person out, {secs} s windows: AUC real vs dubbed {e['auc']:.3f} ({len(e['real'])} real, "
              f"{len(e['dubbed'])} dubbed); the speaking track above another person's for the same audio in "
              f"{e['pairs']:.1%} of {e['n_pairs']} pairs", flush=True)
    w = asd_sync.fit(lambda: ((v, st) for _, v, st in runs))
    sha = asd_sync.save(args.out, w, info, encoder.sha256)
    print(f"{len(info['people'])} people, {info['runs']} runs, {info['frames']} frames at 25 fps -> {args.out} sha256 {sha}")


if __name__ == "__main__":
    main()
