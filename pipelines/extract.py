"""Wire the extraction stage: per-source Face Mesh/pose/audio/transcripts on Ray CPU workers, then
GNPFA (provided checkpoint, or a bootstrap trained on this run's meshes), batch encoding on a GPU
worker when the cluster has one, quality gates, and the frames/clip_features/transcripts tables."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from extractors.config import ExtractConfig
from extractors.extract import extract_source, features_from_npz, features_to_npz
from extractors.ingest import quarantine_row
from extractors.pose import TEMPLATE_PATH
from extractors.records import clip_features_row, clip_quality, frames_table, training_arrays
from storage_schemas import atomic_write_bytes, open_dataset, table_path, write_table
from storage_schemas.dataset import EXTRACT_LINEAGE

from .gnpfa import encode_all, obtain_gnpfa

PARTS = Path("parts") / "extract"


def _extract_task(args: tuple) -> dict:
    uri, width, height, clips, cfg_dict, npz_path = args
    from extractors.transcribe import make_transcriber

    cfg = ExtractConfig(**cfg_dict)
    tm: dict = {}
    feats = extract_source(uri, width, height, clips, cfg, transcriber=make_transcriber(cfg.whisper_checkpoint),
                           timings=tm)
    blob, meta = features_to_npz(feats)
    # the JSON is written last: its presence marks the part as complete
    atomic_write_bytes(npz_path, blob)
    atomic_write_bytes(npz_path[:-4] + ".json", json.dumps({"clips": meta, "metrics": tm}, sort_keys=True).encode())
    return {"metrics": tm}


def _part_key(source: dict, clips: list[dict], cfg: ExtractConfig) -> str:
    h = hashlib.sha256()
    h.update(source["sha256"].encode())
    h.update(json.dumps([(c["clip_id"], c["n_frames"]) for c in clips]).encode())
    h.update(json.dumps({k: v for k, v in cfg.to_dict().items() if not k.startswith("gnpfa") and k != "device"},
                        sort_keys=True).encode())
    h.update(TEMPLATE_PATH.read_bytes())
    return h.hexdigest()[:24]


def _plan(out: Path, cfg: ExtractConfig) -> tuple[list[dict], dict[str, Path], list[tuple]]:
    ds = open_dataset(out)
    sources = {s["source_id"]: s for s in ds.table("sources").to_pylist()}
    clips = ds.table("clips").to_pylist()
    by_src: dict[str, list[dict]] = {}
    for c in clips:
        by_src.setdefault(c["source_id"], []).append(c)
    work, parts = [], {}
    for sid in sorted(by_src):
        s, cs = sources[sid], sorted(by_src[sid], key=lambda c: c["start_frame"])
        npz = out / PARTS / f"{sid}-{_part_key(s, cs, cfg)}.npz"
        parts[sid] = npz
        if not npz.with_suffix(".json").is_file():
            work.append((s["uri"], s["width"], s["height"], cs, cfg.to_dict(), str(npz)))
    return clips, parts, work


class TrackPrefetch:
    """Streams ingest into extraction: starts a source's extraction task the moment ingest has cut
    its clips (Ray executors only), so decoding/tracking of early sources overlaps the analysis of
    later ones. run_tracks collects these tasks instead of starting them again."""

    def __init__(self, out: str | os.PathLike, cfg: ExtractConfig, ex):
        self.out, self.cfg, self.ex = Path(out), cfg, ex
        self.pending: dict[str, tuple] = {}  # part path -> (task ref, work item)

    def __call__(self, result: dict) -> None:
        if not result["clips"] or not hasattr(self.ex, "submit"):
            return
        import pyarrow as pa

        from storage_schemas.tables import CLIPS, SOURCES

        # the rows exactly as the clips/sources tables will read back (same types and rounding)
        clips = sorted(pa.Table.from_pylist(result["clips"], schema=CLIPS).to_pylist(), key=lambda c: c["start_frame"])
        s = pa.Table.from_pylist([result["source"]], schema=SOURCES).to_pylist()[0]
        npz = self.out / PARTS / f"{s['source_id']}-{_part_key(s, clips, self.cfg)}.npz"
        if npz.with_suffix(".json").is_file() or str(npz) in self.pending:
            return
        item = (s["uri"], s["width"], s["height"], clips, self.cfg.to_dict(), str(npz))
        self.pending[str(npz)] = (self.ex.submit(_extract_task, item), item)


def run_tracks(out: str | os.PathLike, cfg: ExtractConfig, ex, progress: Callable[[str, int, int], None] | None = None,
               prefetch: TrackPrefetch | None = None) -> dict:
    """Per-source landmarks, pose, audio features and transcripts as cached parts (one Ray task per
    source with clips). Sources whose part is complete are not redone; tasks a TrackPrefetch already
    started are collected, not restarted."""
    out = Path(out)
    tick = progress or (lambda *a: None)
    import time

    t0 = time.perf_counter()
    _, parts, work = _plan(out, cfg)
    metrics: dict[str, float] = {}
    started = dict(prefetch.pending) if prefetch is not None else {}
    # a prefetched task may have written its part before this plan was made: this run computed it
    planned = {w[5] for w in work}
    work = work + [item for key, (_, item) in started.items() if key not in planned]
    done = len(parts) - len(work)
    tick("extract", done, len(parts))
    if started and hasattr(ex, "as_completed"):
        refs = [started[w[5]][0] if w[5] in started else ex.submit(_extract_task, w) for w in work]
        results = (r for _, r in ex.as_completed(refs))
    else:
        results = (r for _, r in ex.map_unordered(_extract_task, work))
    for res in results:
        done += 1
        tick("extract", done, len(parts))
        for k, v in res["metrics"].items():
            metrics[k] = metrics.get(k, 0) + v
    frames = sum(int(c["n_frames"]) for w in work for c in w[3])
    wall = time.perf_counter() - t0
    return {"sources": len(parts), "computed": len(work), "reused": len(parts) - len(work), "frames_computed": frames,
            "wall_s": round(wall, 2), "frames_per_s": round(frames / wall, 1) if frames else 0.0, "metrics": metrics}


def _load_parts(out: Path, cfg: ExtractConfig) -> tuple[list[dict], dict[str, list]]:
    clips, parts, work = _plan(out, cfg)
    if work:
        raise RuntimeError(f"{len(work)} source(s) have no extraction part yet; run the tracks step first")
    feats_by_src = {}
    for sid, npz in parts.items():
        meta = json.loads(npz.with_suffix(".json").read_text())
        feats_by_src[sid] = features_from_npz(str(npz), meta["clips"])
    return clips, feats_by_src


def run_gnpfa(out: str | os.PathLike, cfg: ExtractConfig, log: Callable[[str], None] = print) -> dict:
    """The GNPFA checkpoint the dataset is encoded with (provided, or a bootstrap trained on its meshes)."""
    out = Path(out)
    _, feats_by_src = _load_parts(out, cfg)
    train = training_arrays([f for sid in sorted(feats_by_src) for f in feats_by_src[sid]])
    d, sha, info = obtain_gnpfa(out, cfg, train, log=log)
    return {"sha256": sha, **info, "frames": int(len(train["offsets"]))}


def run_extract(out: str | os.PathLike, cfg: ExtractConfig, ex, progress: Callable[[str, int, int], None] | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Extraction stage (tracks, GNPFA, encoding, quality, tables). The caller holds the dataset lock
    and owns the executor (see pipelines.job)."""
    out = Path(out)
    tick = progress or (lambda *a: None)
    metrics = run_tracks(out, cfg, ex, progress)["metrics"]
    clips, feats_by_src = _load_parts(out, cfg)
    ds = open_dataset(out)
    all_feats = [f for sid in sorted(feats_by_src) for f in feats_by_src[sid]]

    # --- GNPFA: checkpoint (provided or bootstrap), then mesh-path and image-path encoding ---
    train = training_arrays(all_feats)
    ckpt_dir, ckpt_sha, ckpt_info = obtain_gnpfa(out, cfg, train, log=log)
    tick("gnpfa", 1, 1)
    enc = encode_all(ckpt_dir, train, cfg, on_ray=ex.name == "ray")
    # split the concatenated results back per clip (training_arrays order = tracked frames in clip order)
    clip_by_id = {c["clip_id"]: c for c in clips}
    quarantine = [q for q in ds.table("quarantine").to_pylist() if q["stage"] != "extract"]
    feature_rows, transcript_rows, n_ok = [], [], 0
    offset = 0
    for sid in sorted(feats_by_src):
        tables = []
        for f in feats_by_src[sid]:
            c = clip_by_id[f.clip_id]
            k = int(f.tracked.sum()) if not np.isnan(f.neutral).any() else 0
            sl = slice(offset, offset + k)
            offset += k
            z, rec, iz, ir = enc["z"][sl], enc["recon_err"][sl], enc["image_z"][sl], enc["image_rot"][sl]
            if k == 0:  # nothing tracked: empty latent arrays of the right width
                f.tracked = np.zeros_like(f.tracked)
            tables.append(frames_table(c, f, z, rec, iz, ir))
            q, reason, msg = clip_quality(f, z, rec, iz, ir, cfg)
            status = "dropped" if reason else "ok"
            n_ok += status == "ok"
            if reason:
                quarantine.append(quarantine_row(c["uri"], sid, reason, f"clip {c['clip_id']}: {msg}",
                                                 {k2: v for k2, v in q.items() if v is not None}, stage="extract",
                                                 clip_id=c["clip_id"]))
            engine = f.transcript["engine"] if f.transcript else None
            feature_rows.append(clip_features_row(c, f, q, status, reason, ckpt_sha, engine))
            if f.transcript:
                transcript_rows.append({"clip_id": f.clip_id, **{k2: f.transcript[k2] for k2 in
                                                                  ("engine", "language", "text", "words")}})
            crops_path = out / "arrays" / "crops" / f"{f.clip_id}.npy"
            _write_npy(crops_path, f.crops)
        import pyarrow as pa

        write_table(table_path(out, "frames", sid), "frames", pa.concat_tables(tables))
    # frames parts of sources that no longer have clips are stale: remove them
    fdir = table_path(out, "frames")
    if fdir.is_dir():
        for p in fdir.glob("*.parquet"):
            if p.stem not in feats_by_src:
                p.unlink()
    write_table(table_path(out, "clip_features"), "clip_features", sorted(feature_rows, key=lambda r: r["clip_id"]))
    write_table(table_path(out, "transcripts"), "transcripts", sorted(transcript_rows, key=lambda r: r["clip_id"]))
    quarantine.sort(key=lambda q: (q["uri"], q["stage"], q["reason"], q["clip_id"] or ""))
    write_table(table_path(out, "quarantine"), "quarantine", quarantine)
    res = {"clips_ok": n_ok, "clips_dropped": len(feature_rows) - n_ok, "frames": int(sum(f.n_frames for f in all_feats)),
           "gnpfa": {"sha256": ckpt_sha, **ckpt_info}, "engines": sorted({r["engine"] for r in transcript_rows})}
    # what the dataset card records of this stage (read by finish_dataset)
    atomic_write_bytes(out / EXTRACT_LINEAGE, json.dumps(res, sort_keys=True).encode())
    return {**res, "metrics": metrics}


def _write_npy(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
