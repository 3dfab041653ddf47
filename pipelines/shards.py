"""Wire the shard stage: per-source Ray tasks build sample bytes; the driver packs them into
deterministic, byte-bounded WebDataset shards, then writes the index tables and wids indexes.

Shards are append-only: each run that has new clips adds them as a new dataset version
(`shards/<split>-v<version>-<n>.tar`); committed shards are never rewritten."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from extractors.config import ShardConfig
from extractors.shards import build_sample, iter_shard, pack, split_of, write_shard
from storage_schemas import SCHEMA_VERSION, open_dataset, table_path, write_json, write_table
from storage_schemas.arrays import array_path, read_array
from storage_schemas.tables import CLIP_COLUMNS

from .executors import TaskFailure, stage_task
from .faults import maybe_fail
from .frames import clip_frame_arrays
from .stage_io import clip_rows, failure_rows, replace_quarantine, source_audio
from .stages import task_options

SHARD_DIR = "shards"


class ShardCommitted(RuntimeError):
    pass


SPOOL = Path("parts") / "shard"  # one source's samples of this run, until they are packed into shards


@dataclass(frozen=True)
class SampleWork:
    """One source's new clips to build samples of (with only those clips' split, speaker and labels)."""

    out: str
    source: dict
    clips: list
    splits: dict  # clip_id -> split
    speakers: dict  # clip_id -> speaker_id
    labels: dict  # clip_id -> {field: label}
    cfg: dict

    @property
    def spool(self) -> Path:
        return Path(self.out) / SPOOL / f"{self.source['source_id']}.tar"


@stage_task
def _sample_task(w: SampleWork) -> dict[str, int]:
    """Build the source's samples and spool them to parts/shard/<source>.tar (validated, in clip order);
    return each sample's size in bytes: the driver packs shards from sizes and reads the bytes back
    a source at a time, so it never holds the samples of the whole run."""
    import cv2

    from extractors.transcribe import clip_audio

    cfg = ShardConfig(**w.cfg)
    maybe_fail("shard", w.source["uri"])
    ds = open_dataset(w.out)
    audio = source_audio(w.out, w.source)  # kept by ingest: not decoded again
    tr = {r["clip_id"]: {k: r[k] for k in ("engine", "language", "text", "words")}
          for r in clip_rows(ds, "transcripts", [c["clip_id"] for c in w.clips])}
    out = []
    for c in w.clips:
        # the middle frame's face crop from the extraction pass (the video is not decoded again here)
        try:
            key = read_array(w.out, "keyframes", c["clip_id"])
        except FileNotFoundError:
            raise FileNotFoundError(f"clip {c['clip_id']} has no keyframe at {array_path(w.out, 'keyframes', c['clip_id'])} "
                                    "(extracted by older code): run the extract stage again") from None
        if key.shape[0] != cfg.keyframe_size:
            key = cv2.resize(key, (cfg.keyframe_size, cfg.keyframe_size), interpolation=cv2.INTER_AREA)
        m = build_sample(c, w.source, clip_frame_arrays(ds, c["clip_id"], cfg.include_landmarks),
                         clip_audio(audio, c["start_s"], c["end_s"]), key, w.labels.get(c["clip_id"], {}),
                         tr.get(c["clip_id"]), w.splits[c["clip_id"]], SCHEMA_VERSION, cfg.include_landmarks,
                         speaker_id=w.speakers[c["clip_id"]])
        out.append((c["clip_id"], m))
    write_shard(w.spool, out)
    return {k: sum(len(v) for v in m.values()) for k, m in out}


class _Spools:
    """Reads spooled samples back in key order, holding one source's samples at a time."""

    def __init__(self, where: dict[str, Path]):
        self.where, self.path, self.samples = where, None, {}

    def __getitem__(self, key: str) -> dict[str, bytes]:
        if self.where[key] != self.path:
            self.path, self.samples = self.where[key], dict(iter_shard(self.where[key]))
        return self.samples[key]


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


def _input_digest(clip: dict, feature: dict, labels: dict, transcript: dict | None, cfg: ShardConfig) -> str:
    import hashlib

    doc = {"clip": clip, "features": feature, "labels": labels, "transcript": transcript, "shard": cfg.to_dict(),
           "schema": SCHEMA_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _digests_and_embeddings(ds, clips: list[dict], labels: dict, cfg: ShardConfig,
                             batch_rows: int = 512) -> tuple[dict[str, dict], dict[str, str]]:
    """({clip_id: {"face_embedding", "voice_embedding"} as float32 arrays or None} for every clip with
    features, {clip_id: input digest} for ``clips``), reading clip_features a batch of rows at a time."""
    kept = {c["clip_id"]: c for c in clips}
    tr = ds.table("transcripts") if "transcripts" in ds.tables else None
    tr_row = {cid: i for i, cid in enumerate(tr.column("clip_id").to_pylist())} if tr is not None else {}
    embeddings: dict[str, dict] = {}
    digests: dict[str, str] = {}
    for batch in ds.batches("clip_features", batch_rows):
        for r in batch.to_pylist():
            cid = r["clip_id"]
            embeddings[cid] = {k: None if r[k] is None else np.asarray(r[k], np.float32)
                               for k in ("face_embedding", "voice_embedding")}
            if cid in kept:
                t = tr.slice(tr_row[cid], 1).to_pylist()[0] if cid in tr_row else None
                digests[cid] = _input_digest(kept[cid], r, labels.get(cid, {}), t, cfg)
    return embeddings, digests


def assign_dataset_speakers(ds, clips: list[dict], features: dict[str, dict], cfg: ShardConfig,
                            version: int) -> list[dict]:
    """Rows of the speakers table: the committed ones unchanged, plus one per clip that has none yet (it
    joins the speaker whose face centroid it matches, else founds a new one, whose split is that of its
    founding clip's source by hash). Clips are taken in clip_id order."""
    from extractors.identity import SpeakerRule, assign_speakers

    old = ds.table("speakers").to_pylist() if "speakers" in ds.tables else []
    have = {r["clip_id"] for r in old}
    vec = lambda cid, k: (np.asarray(features[cid][k], np.float32)  # noqa: E731
                          if cid in features and features[cid].get(k) is not None else None)
    committed = [{"clip_id": r["clip_id"], "speaker_id": r["speaker_id"], "face": vec(r["clip_id"], "face_embedding"),
                  "voice": vec(r["clip_id"], "voice_embedding")} for r in old]
    new = [{"clip_id": c["clip_id"], "face": vec(c["clip_id"], "face_embedding"),
            "voice": vec(c["clip_id"], "voice_embedding")} for c in clips if c["clip_id"] not in have]
    if not new:
        return old
    rule = SpeakerRule(cfg.speaker_face_threshold, cfg.speaker_voice_threshold)
    split = {r["speaker_id"]: r["split"] for r in old}
    source = {c["clip_id"]: c["source_id"] for c in clips}
    rows = list(old)
    for r in sorted(assign_speakers(committed, new, rule), key=lambda r: r["clip_id"]):
        if r["speaker_id"] not in split:  # founded here: the split of its first clip's source
            split[r["speaker_id"]] = split_of(source[r["clip_id"]], (cfg.train_fraction, cfg.val_fraction))
        rows.append({"clip_id": r["clip_id"], "speaker_id": r["speaker_id"], "split": split[r["speaker_id"]],
                     "method": r["method"], "face_sim": r["face_sim"], "voice_sim": r["voice_sim"],
                     "version": version, "rule": f"face>={rule.face_threshold}, else voice>={rule.voice_threshold}"})
    return sorted(rows, key=lambda r: r["clip_id"])


def run_shards(out: str | os.PathLike, cfg: ShardConfig, ex, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Shard every kept clip that no committed shard holds yet, as a new dataset version.

    Committed shards are never rewritten: a clip already in a shard whose inputs changed (relabel,
    other checkpoint) stops the stage with ShardCommitted. A rerun with nothing new adds nothing."""
    out = Path(out)
    tick = progress or (lambda *a: None)
    ds = open_dataset(out)
    clips = ds.query(f"select {CLIP_COLUMNS} from clips c join clip_features f using (clip_id) where f.status = 'ok' "
                     "order by c.clip_id").to_pylist()
    labels = current_labels(ds)
    # clip_features and transcripts are read a batch of rows at a time: each kept clip's input digest is
    # taken there, and only the identity embeddings (for speaker assignment) are kept
    embeddings, digests = _digests_and_embeddings(ds, clips, labels, cfg)
    sources = {s["source_id"]: s for s in ds.table("sources").to_pylist()}
    old_shards = ds.table("shards").to_pylist() if "shards" in ds.tables else []
    next_version = max((r["version"] for r in old_shards), default=0) + 1
    speaker_rows = assign_dataset_speakers(ds, clips, embeddings, cfg, next_version)
    speaker = {r["clip_id"]: r for r in speaker_rows}
    splits = {c["clip_id"]: speaker[c["clip_id"]]["split"] for c in clips}
    speakers = {c["clip_id"]: speaker[c["clip_id"]]["speaker_id"] for c in clips}
    old_samples = ds.table("samples").to_pylist() if "samples" in ds.tables else []
    committed = {r["clip_id"]: r for r in old_samples}
    changed = sorted(k for k, r in committed.items() if k in digests and r["input_digest"] != digests[k])
    if changed:
        raise ShardCommitted(f"{len(changed)} clip(s) already in committed shards have changed inputs (e.g. "
                             f"{changed[0]} in {committed[changed[0]]['shard']}); committed shards are never "
                             f"rewritten: build the changed data into a new dataset (--out)")
    # clips a labeler failed on wait for a run that labels them (a shard is never rewritten)
    held = {q["clip_id"] for q in ds.table("quarantine").to_pylist() if q["stage"] == "label"}
    new = [c for c in clips if c["clip_id"] not in committed and c["clip_id"] not in held]
    by_src: dict[str, list[dict]] = {}
    for c in new:
        by_src.setdefault(c["source_id"], []).append(c)
    work = [SampleWork(str(out), sources[sid], cs, {c["clip_id"]: splits[c["clip_id"]] for c in cs},
                       {c["clip_id"]: speakers[c["clip_id"]] for c in cs},
                       {c["clip_id"]: labels.get(c["clip_id"], {}) for c in cs}, cfg.to_dict())
            for sid, cs in sorted(by_src.items())]
    shutil.rmtree(out / SPOOL, ignore_errors=True)  # a killed run's spools: rebuilt, never trusted
    sizes: dict[str, int] = {}
    where: dict[str, Path] = {}
    failed: list[dict] = []
    tick("shard", 0, len(work))
    for i, (w, res) in enumerate(ex.map_unordered(_sample_task, work, **task_options(_sample_task))):
        if isinstance(res, TaskFailure):  # this source's clips go into a later version
            failed += failure_rows(res, "shard", "sample building", w.source["uri"], w.source["source_id"],
                                   [c["clip_id"] for c in w.clips])
            continue
        sizes.update(res)
        where.update({k: w.spool for k in res})
        tick("shard", i + 1, len(work))
    new = [c for c in new if c["clip_id"] in sizes]
    version = max((r["version"] for r in old_shards), default=0) + (1 if new else 0)
    shard_rows, sample_rows = list(old_shards), list(old_samples)
    n_frames = {c["clip_id"]: int(c["n_frames"]) for c in clips}
    spools = _Spools(where)  # keys are clip ids (<source>-<n>): in key order, a source's samples are together
    for split in ("train", "val", "test"):
        keys = sorted(k for k in sizes if splits[k] == split)
        for si, group in enumerate(pack([sizes[k] for k in keys], cfg.max_shard_bytes)):
            rel = f"{SHARD_DIR}/{split}-v{version:03d}-{si:06d}.tar"
            sha, nbytes = write_shard(out / rel, ((keys[g], spools[keys[g]]) for g in group))
            shard_rows.append({"shard": rel, "split": split, "version": version, "sha256": sha,
                               "n_samples": len(group), "bytes": nbytes})
            for j, g in enumerate(group):
                sample_rows.append({"clip_id": keys[g], "split": split, "shard": rel, "index_in_shard": j,
                                    "n_frames": n_frames[keys[g]], "bytes": sizes[keys[g]], "input_digest": digests[keys[g]],
                                    "speaker_id": speakers[keys[g]]})
    shard_rows.sort(key=lambda r: (r["version"], r["split"], r["shard"]))
    sample_rows.sort(key=lambda r: (r["shard"], r["index_in_shard"]))
    write_table(table_path(out, "shards"), "shards", shard_rows)
    write_table(table_path(out, "samples"), "samples", sample_rows)
    write_table(table_path(out, "speakers"), "speakers", speaker_rows)
    replace_quarantine(out, ("shard",), failed)
    shutil.rmtree(out / SPOOL, ignore_errors=True)  # every spooled sample is in a committed shard now
    for split in ("train", "val", "test"):
        write_json(out / SHARD_DIR / f"{split}.wids.json", {
            "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"M2F-D {split}",
            "shardlist": [{"url": Path(r["shard"]).name, "nsamples": r["n_samples"]}
                          for r in shard_rows if r["split"] == split]})
    added = [r for r in shard_rows if r["version"] == version and new]
    return {"version": version, "shards": len(shard_rows), "samples": len(sample_rows),
            "added_shards": len(added), "added_samples": len(sizes), "failed_clips": len(failed),
            "bytes": int(sum(r["bytes"] for r in shard_rows)),
            "splits": {s: sum(1 for r in sample_rows if r["split"] == s) for s in ("train", "val", "test")},
            "speakers": len({r["speaker_id"] for r in speaker_rows})}
