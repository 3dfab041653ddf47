"""Wire the extraction stage: per-source Face Mesh/pose/audio/transcripts on Ray CPU workers (the
`tracks` parts), the GNPFA checkpoint (pipelines.gnpfa.choose_gnpfa: shipped, provided, or a bootstrap trained on
this dataset's meshes),
then per source again: GNPFA encoding, quality gates and the frames table (the `encode` parts), and
the clip_features/transcripts/quarantine tables from their rows.

Every per-source result is a part keyed by the source's bytes, its clips, the config and (for the
encode parts) the checkpoint's sha256: a new batch computes only its new sources, and the rows of
committed clips are reused byte for byte. A source whose task fails, or whose worker dies past
Ray's retries, becomes quarantine rows (its clips are dropped) and the run goes on; the next run
tries it again."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from extractors.config import ExtractConfig
from extractors.extract import extract_source, features_from_npz, features_to_npz
from extractors.ingest import quarantine_row
from extractors.pose import TEMPLATE_PATH
from extractors.records import (clip_features_row, clip_quality, dropped_features_row, frames_table, sample_tracked,
                               training_arrays)
from storage_schemas import SCHEMA_VERSION, RowBuffer, atomic_write_bytes, open_dataset, table_path, write_table
from storage_schemas.arrays import array_path, write_array
from storage_schemas.dataset import EXTRACT_LINEAGE
from storage_schemas.tables import TRANSCRIPTS

from .executors import TaskFailure, stage_task
from .faults import maybe_fail
from .gnpfa import NotEnoughFrames, gnpfa_device, obtain_gnpfa
from .stage_io import failure_rows, replace_quarantine, source_audio, source_path
from .stages import task_cpus, task_options

PARTS = Path("parts") / "extract"
ENCODE_PARTS = Path("parts") / "encode"


@dataclass(frozen=True)
class TrackWork:
    """One source's landmark/pose/audio/transcript task."""

    out: str
    source: dict
    clips: list
    cfg: dict
    npz: str  # the part it writes (its .json sibling, written last, marks it complete)

    @property
    def failed_marker(self) -> Path:
        return Path(self.npz).with_suffix(".failed.json")


def clip_models(cfg: ExtractConfig) -> dict[str, Path | None]:
    """Local files of the per-clip models a config names (None = off). Raises FileNotFoundError naming
    the config key when one is missing, ValueError when a packaged file's sha256 is wrong, RuntimeError when
    this OpenCV cannot run the face embedder."""
    from extractors.identity import check_opencv
    from extractors.transcribe import resolve_whisper
    from models.av_sync import resolve as av_sync_path
    from models.av_sync import resolve_encoder
    from models.packaged import resolve

    asr = resolve_whisper(cfg.whisper_checkpoint)
    if cfg.face_embedder:  # said before any task starts, not as a failure of every clip
        check_opencv()
    av = av_sync_path(cfg.av_sync_model)
    return {"asr": Path(asr[1]) if asr else None, "av_sync": av,
            "av_sync_encoder": resolve_encoder(cfg.av_sync_encoder) if av else None,
            "blendshapes": resolve(cfg.blendshape_model, "face-landmarker"),
            "face_embedder": resolve(cfg.face_embedder, "sface"),
            "voice_embedder": resolve(cfg.voice_embedder, "voice-encoder")}


def model_shas(cfg: ExtractConfig) -> dict[str, dict]:
    """{name: {path, sha256}} of the per-clip models (the tracks parts are keyed by them)."""
    from models.packaged import lineage

    return lineage(clip_models(cfg))


_MODELS: dict = {}  # a worker process's models (one per process: the landmarker, and the shared tracker)
_LOCK = threading.RLock()
_THREAD = threading.local()


def _models_of(cfg: ExtractConfig) -> dict:
    """Where a task keeps its per-clip models: the process's (one task at a time), or with
    sources_per_worker > 1 the thread's own: the embedders and transcribers are not safe to call from two
    threads at once (Whisper's decoding hooks its model), so each thread of a threaded worker has its own."""
    if cfg.sources_per_worker <= 1:
        return _MODELS
    if not hasattr(_THREAD, "models"):
        _THREAD.models = {}
    return _THREAD.models


def _loaded_models(cfg: ExtractConfig) -> dict:
    """The per-clip models of a config, loaded once per worker process (per thread: see _models_of)."""
    key = (cfg.blendshape_model, cfg.face_embedder, cfg.voice_embedder, cfg.av_sync_model, cfg.av_sync_encoder)
    cache = _models_of(cfg)
    if key not in cache:
        from extractors.blendshapes import BlendshapeModel
        from extractors.face_geometry import FaceGeometry
        from extractors.identity import FaceEmbedder, VoiceEmbedder
        from models.av_sync import load as load_av_sync

        p = clip_models(cfg)
        cache[key] = {"blendshaper": BlendshapeModel(p["blendshapes"]) if p["blendshapes"] else None,
                      "face_geometry": FaceGeometry(p["blendshapes"]) if p["blendshapes"] else None,
                      "face_embedder": FaceEmbedder(p["face_embedder"]) if p["face_embedder"] else None,
                      "voice_embedder": VoiceEmbedder(p["voice_embedder"]) if p["voice_embedder"] else None,
                      "av_sync": load_av_sync(p["av_sync"], p["av_sync_encoder"]) if p["av_sync"] else None}
    return cache[key]


def _landmarker(cfg: ExtractConfig) -> tuple[str, object | None]:
    """(engine name, TorchFaceMesh or None for MediaPipe's own graph) for this worker: config.landmarker
    resolved against the GPU the task was given (one instance per worker process; with sources_per_worker > 1
    a SharedTracker around it, which the worker's threads share)."""
    with _LOCK:  # the threads of a threaded worker make one
        return _make_landmarker(cfg)


def _make_landmarker(cfg: ExtractConfig) -> tuple[str, object | None]:
    import torch

    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.landmarker == "mediapipe" or (cfg.landmarker == "auto" and not cuda):
        import mediapipe

        return f"mediapipe-{mediapipe.__version__}", None
    from extractors.mesh_torch import TorchFaceMesh

    dev = "cuda" if cuda else "cpu"
    fused = cuda and cfg.mesh_fused_warp
    pad = cfg.mesh_pad_for(cuda)
    key = ("mesh", dev, cfg.mesh_passes, cfg.mesh_chain, cfg.mesh_warmup, fused, pad)
    if key not in _MODELS:
        _MODELS[key] = TorchFaceMesh(dev, torch.float16 if cuda else None, cfg.mesh_passes, chain=cfg.mesh_chain,
                                     warmup=cfg.mesh_warmup, fused_warp=fused, pad_to=pad)
    tracking = f"chain{cfg.mesh_chain}w{cfg.mesh_warmup}" if cfg.mesh_chain else f"{cfg.mesh_passes}pass"
    engine = f"torch-{dev}-{tracking}" + ("-fusedwarp" if fused else "") + (f"-pad{pad}" if pad else "")
    if cfg.sources_per_worker <= 1:
        return engine, _MODELS[key]
    from extractors.mesh_torch import SharedTracker

    if ("shared",) + key not in _MODELS:
        _MODELS[("shared",) + key] = SharedTracker(_MODELS[key], pad_to=pad)
    return engine, _MODELS[("shared",) + key]


NVDEC_CODECS = ("h264", "hevc", "av1", "vp9")  # what current NVIDIA decoders take (others: the CPU decoder)


def _use_nvdec(cfg: ExtractConfig, source: dict, landmarker) -> bool:
    """Whether this source is decoded by NVDEC (config.decoder resolved for this worker and source)."""
    from extractors.media import nvdec_available

    on_cuda = landmarker is not None and landmarker.device.type == "cuda"
    if cfg.decoder == "cpu" or not on_cuda and cfg.decoder == "auto":
        return False
    why = ("the torch landmarker does not run on CUDA here" if not on_cuda else
           "PyNvVideoCodec, a CUDA device or the driver's NVDEC library (libnvcuvid) is missing" if not nvdec_available() else
           "the source has a variable frame rate or a rotation matrix" if source.get("vfr") or source.get("rotation") else
           f"NVDEC does not decode {source.get('video_codec')}" if source.get("video_codec") not in NVDEC_CODECS else
           "the frame has an odd side (its chroma rows are not half its rows)"
           if int(source.get("width", 0)) % 2 or int(source.get("height", 0)) % 2 else "")
    if why and cfg.decoder == "nvdec":
        raise ValueError(f"decoder=nvdec but {why}")
    return not why


def landmarker_gpu(cfg: ExtractConfig, ex) -> bool:
    """Whether extraction tasks ask for a share of a GPU (the torch landmarker, where the cluster has one)."""
    return cfg.landmarker in ("auto", "torch") and cfg.device != "cpu" and ex.has_gpu()


_INSIDE = {"tasks": 0, "saved": None}  # extraction tasks running in this process, the thread counts before them


@contextmanager
def _one_thread():
    """torch and OpenCV on one thread while any extraction task of this process runs (the embeddings and
    transcripts are then the same on every machine). torch's count is the calling thread's own (OpenMP), so
    every task sets it; OpenCV's is the process's. The counts saved by the first task come back when the
    last one leaves, so the threads of a threaded worker do not undo it for one another."""
    import cv2
    import torch

    with _LOCK:
        if _INSIDE["tasks"] == 0:
            _INSIDE["saved"] = (torch.get_num_threads(), cv2.getNumThreads())
            cv2.setNumThreads(1)
        torch.set_num_threads(1)
        _INSIDE["tasks"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _INSIDE["tasks"] -= 1
            if _INSIDE["tasks"] == 0:
                torch.set_num_threads(_INSIDE["saved"][0])
                cv2.setNumThreads(_INSIDE["saved"][1])


@stage_task
def _extract_task(w: TrackWork) -> dict:
    from extractors.mesh_torch import SharedTracker
    from extractors.transcribe import make_transcriber

    cfg = ExtractConfig(**w.cfg)
    s = w.source
    maybe_fail("extract", s["uri"])
    tm: dict = {}
    with _one_thread():
        engine, landmarker = _landmarker(cfg)
        nvdec = _use_nvdec(cfg, s, landmarker)
        engine += "+nvdec" if nvdec else ""
        transcriber = make_transcriber(cfg.whisper_checkpoint, cfg.asr_threads, cfg.asr_max_tokens_per_s,
                                       cfg.asr_max_compression_ratio, cfg.asr_device, cfg.asr_engine,
                                       cache=_models_of(cfg))
        models = _loaded_models(cfg)
        # the other threads' batches wait for this source's while it is a member (SharedTracker)
        with landmarker.member() if isinstance(landmarker, SharedTracker) else nullcontext():
            feats = extract_source(source_path(w.out, s), s["width"], s["height"], w.clips, cfg,
                                   audio=source_audio(w.out, s),  # kept by ingest: not decoded again
                                   transcriber=transcriber, timings=tm, landmarker=landmarker, nvdec=nvdec,
                                   **models)
    blob, meta = features_to_npz(feats)
    # the JSON is written last: its presence marks the part as complete
    atomic_write_bytes(w.npz, blob)
    atomic_write_bytes(w.npz[:-4] + ".json", json.dumps({"clips": meta, "metrics": tm, "landmarker": engine},
                                                           sort_keys=True).encode())
    return {"metrics": tm}


# the arrays a tracks part holds (extractors.extract._ARRAYS): a part written by code with other arrays
# has another key, so it is recomputed rather than misread. 2: face_transform; 3: keyframe; 4: the clips
# the checks keep are transcribed together, the others not at all (so each clip's ASD-sync is in the key).
TRACKS_FORMAT = 4


def _part_key(source: dict, clips: list[dict], cfg: ExtractConfig, models: dict) -> str:
    h = hashlib.sha256()
    h.update(f"tracks-{TRACKS_FORMAT}:".encode())
    h.update(source["sha256"].encode())
    h.update(json.dumps({k: v["sha256"] for k, v in models.items()}, sort_keys=True).encode())
    h.update(json.dumps([(c["clip_id"], c["n_frames"], c.get("asd_sync")) for c in clips]).encode())
    # scheduling only (how many sources a worker runs, how many tasks share a GPU) is hashed at its default, so
    # changing it does not redo a dataset's extraction (parts made before keep their keys)
    sched = dataclasses.replace(cfg, sources_per_worker=1, tasks_per_gpu=0)
    h.update(json.dumps({k: v for k, v in sched.keyed().items() if not k.startswith("gnpfa") and k != "device"},
                        sort_keys=True).encode())
    h.update(TEMPLATE_PATH.read_bytes())
    return h.hexdigest()[:24]


def _work(out: Path, source: dict, clips: list[dict], cfg: ExtractConfig, models: dict) -> TrackWork:
    clips = sorted(clips, key=lambda c: c["start_frame"])
    npz = out / PARTS / f"{source['source_id']}-{_part_key(source, clips, cfg, models)}.npz"
    return TrackWork(str(out), source, clips, cfg.to_dict(), str(npz))


def _plan(out: Path, cfg: ExtractConfig) -> tuple[list[TrackWork], list[TrackWork]]:
    """(every source with clips, those whose part is not complete yet), by source id."""
    ds = open_dataset(out)
    sources = {s["source_id"]: s for s in ds.table("sources").to_pylist()}
    by_src: dict[str, list[dict]] = {}
    for c in ds.table("clips").to_pylist():
        by_src.setdefault(c["source_id"], []).append(c)
    models = model_shas(cfg)
    all_work = [_work(out, sources[sid], by_src[sid], cfg, models) for sid in sorted(by_src)]
    return all_work, [w for w in all_work if not Path(w.npz).with_suffix(".json").is_file()]


def _complete(w: TrackWork) -> bool:
    return Path(w.npz).with_suffix(".json").is_file()


class TrackPrefetch:
    """Streams ingest into extraction: starts a source's extraction task the moment ingest has cut
    its clips (on Ray it starts at once; in-process it runs when collected), so decoding/tracking of early sources overlaps the analysis of
    later ones. run_tracks collects these tasks instead of starting them again."""

    def __init__(self, out: str | os.PathLike, cfg: ExtractConfig, ex):
        self.out, self.cfg, self.ex = Path(out), cfg, ex
        self.models = model_shas(cfg)
        # plain tasks, whatever sources_per_worker says: threaded actors would hold their CPUs and GPU shares
        # while ingest still needs them (run_tracks starts the pool for the sources not started here)
        self.resources = track_resources(cfg, ex)
        self.pending: dict[str, tuple] = {}  # part path -> (task ref, work item)

    def __call__(self, result: dict) -> None:
        if not result["clips"]:
            return
        import pyarrow as pa

        from storage_schemas.tables import CLIPS, SOURCES

        # the rows exactly as the clips/sources tables will read back (same types and rounding)
        clips = pa.Table.from_pylist(result["clips"], schema=CLIPS).to_pylist()
        s = pa.Table.from_pylist([result["source"]], schema=SOURCES).to_pylist()[0]
        w = _work(self.out, s, clips, self.cfg, self.models)
        if _complete(w) or w.npz in self.pending:
            return
        self.pending[w.npz] = (self.ex.submit(_extract_task, w, **self.resources), w)


def run_tracks(out: str | os.PathLike, cfg: ExtractConfig, ex, progress: Callable[[str, int, int], None] | None = None,
               prefetch: TrackPrefetch | None = None) -> dict:
    """Per-source landmarks, pose, audio features and transcripts as cached parts (one Ray task per
    source with clips, or sources_per_worker of them at once in each threaded worker: tracks_pool). Sources whose part is complete are not redone; tasks a TrackPrefetch already
    started are collected, not restarted. A failed source leaves a `.failed.json` marker with its
    quarantine rows (the extraction step drops its clips) and is tried again by the next run."""
    out = Path(out)
    tick = progress or (lambda *a: None)
    t0 = time.perf_counter()
    all_work, work = _plan(out, cfg)
    started = dict(prefetch.pending) if prefetch is not None else {}
    # a prefetched task may have written its part before this plan was made: this run computed it
    planned = {w.npz for w in work}
    work = work + [w for key, (_, w) in started.items() if key not in planned]
    done = len(all_work) - len(work)
    tick("extract", done, len(all_work))
    pool = tracks_pool(cfg, ex)
    try:
        if started:  # collect what was started, start the rest at once
            refs = {started[w.npz][0] if w.npz in started else pool.submit(w): w for w in work}
            results = ((refs[ref], r) for ref, r in ex.as_completed(list(refs)))
        else:
            results = pool.map_unordered(work)
        failed, metrics = _collect(results, len(all_work), done, tick)
    finally:
        pool.close()  # threaded actors give their GPU shares back before encoding asks for them
    frames = sum(int(c["n_frames"]) for w in work for c in w.clips)
    wall = time.perf_counter() - t0
    return {"sources": len(all_work), "computed": len(work), "reused": len(all_work) - len(work), "failed": failed,
            "frames_computed": frames, "wall_s": round(wall, 2), "frames_per_s": round(frames / wall, 1) if frames else 0.0,
            "metrics": metrics}


def _collect(results, total: int, done: int, tick) -> tuple[int, dict]:
    """Each finished source: its failure marker written (or removed), its task timings summed."""
    failed, metrics = 0, {}
    for w, res in results:
        done += 1
        tick("extract", done, total)
        if isinstance(res, TaskFailure):
            failed += 1
            rows = failure_rows(res, "extract", "landmarks/pose/audio", w.source["uri"], w.source["source_id"],
                                [c["clip_id"] for c in w.clips])
            atomic_write_bytes(w.failed_marker, json.dumps(rows, sort_keys=True).encode())
            continue
        w.failed_marker.unlink(missing_ok=True)
        for k, v in res["metrics"].items():
            metrics[k] = metrics.get(k, 0) + v
    return failed, metrics


def _obtain_gnpfa(out: Path, cfg: ExtractConfig, all_work: list[TrackWork], log: Callable[[str], None]):
    """The checkpoint (obtain_gnpfa); a bootstrap trains on the complete parts, loaded only then."""
    done = [w for w in all_work if _complete(w)]

    def load() -> dict:
        """A bounded, seeded sample of the tracked frames (gnpfa_bootstrap_max_frames), read source by
        source: memory does not grow with the dataset."""
        metas = [json.loads(Path(w.npz).with_suffix(".json").read_text())["clips"] for w in done]
        total = sum(round(m["quality"]["tracked_ratio"] * m["n_frames"]) for ms in metas for m in ms.values())
        frac = min(1.0, cfg.gnpfa_bootstrap_max_frames / max(1, total))
        if frac < 1.0:
            log(f"GNPFA bootstrap: a seeded sample of {frac:.1%} of {total} tracked frames "
                f"(gnpfa_bootstrap_max_frames={cfg.gnpfa_bootstrap_max_frames})")
        parts = [training_arrays(sample_tracked(features_from_npz(w.npz, ms), frac)) for w, ms in zip(done, metas)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else training_arrays([])

    return obtain_gnpfa(out, cfg, ",".join(Path(w.npz).stem for w in done), load, log=log)


def run_gnpfa(out: str | os.PathLike, cfg: ExtractConfig, log: Callable[[str], None] = print) -> dict:
    """The GNPFA checkpoint the dataset is encoded with (pipelines.gnpfa.choose_gnpfa)."""
    out = Path(out)
    all_work, _ = _plan(out, cfg)
    try:
        _, sha, info = _obtain_gnpfa(out, cfg, all_work, log)
    except NotEnoughFrames as e:
        return {"skipped": str(e)}
    return {"sha256": sha, **info}


@dataclass(frozen=True)
class EncodeWork:
    """One source's GNPFA encoding, quality gates and frames table."""

    track: TrackWork
    ckpt_dir: str
    ckpt_sha: str
    device: str

    @property
    def part(self) -> Path:
        """parts/encode/<tracks part>-<checkpoint sha>.{npz,json}: latents, then the table rows."""
        return Path(self.track.out) / ENCODE_PARTS / f"{Path(self.track.npz).stem}-{self.ckpt_sha[:16]}.json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@stage_task
def _encode_task(w: EncodeWork) -> dict:
    """Rows of clip_features / transcripts / quarantine for one source, its frames table and crops.

    Latents are cached per source under the checkpoint's sha256 and the rows with the sha256 of
    every file written: a later run reuses them as they are (it never re-encodes a committed clip),
    and rebuilds only what is missing or was changed on disk."""
    out = Path(w.track.out)
    sid = w.track.source["source_id"]
    files = {"frames": table_path(out, "frames", sid)}
    files.update({c["clip_id"]: array_path(out, "crops", c["clip_id"]) for c in w.track.clips})
    files.update({f"{c['clip_id']}/keyframe": array_path(out, "keyframes", c["clip_id"]) for c in w.track.clips})
    if w.part.is_file():
        doc = json.loads(w.part.read_text())
        # rows of another schema version (new columns) are rebuilt; the cached latents stay
        if doc.get("schema") == SCHEMA_VERSION and all(p.is_file() and _sha(p) == doc["outputs"].get(k)
                                                       for k, p in files.items()):
            return doc["rows"]
    maybe_fail("encode", w.track.source["uri"])
    cfg = ExtractConfig(**w.track.cfg)
    meta = json.loads(Path(w.track.npz).with_suffix(".json").read_text())
    feats = features_from_npz(w.track.npz, meta["clips"])
    enc = _encodings(w, feats)
    clip_by_id = {c["clip_id"]: c for c in w.track.clips}
    rows: dict = {"features": [], "transcripts": [], "quarantine": [], "frames": 0}
    tables = []
    for f in feats:
        c = clip_by_id[f.clip_id]
        z, rec, iz, ir = (enc[f"{f.clip_id}/{k}"] for k in ("z", "recon_err", "image_z", "image_rot"))
        if np.isnan(f.neutral).any():  # nothing tracked: no latents, every frame untracked
            f.tracked = np.zeros_like(f.tracked)
        tables.append(frames_table(c, f, z, rec, iz, ir))
        q, reason, msg = clip_quality(f, z, rec, iz, ir, cfg)
        if reason:
            rows["quarantine"].append(quarantine_row(c["uri"], sid, reason, f"clip {c['clip_id']}: {msg}",
                                                     {k: v for k, v in q.items() if v is not None}, stage="extract",
                                                     clip_id=c["clip_id"]))
        rows["features"].append(clip_features_row(c, f, q, "dropped" if reason else "ok", reason, w.ckpt_sha,
                                                  f.transcript["engine"] if f.transcript else None))
        if f.transcript:
            rows["transcripts"].append({"clip_id": f.clip_id, **{k: f.transcript.get(k) for k in TRANSCRIPTS.names
                                                                if k != "clip_id"}})
        rows["frames"] += int(f.n_frames)
        write_array(out, "crops", f.clip_id, f.crops, n_frames=int(c["n_frames"]), crop_size=cfg.crop_size)
        write_array(out, "keyframes", f.clip_id, f.keyframe, keyframe_px=cfg.keyframe_px)
    import pyarrow as pa

    write_table(files["frames"], "frames", pa.concat_tables(tables))
    doc = {"rows": rows, "outputs": {k: _sha(p) for k, p in files.items()}, "schema": SCHEMA_VERSION}
    atomic_write_bytes(w.part, json.dumps(doc, sort_keys=True).encode())
    return rows


def _encodings(w: EncodeWork, feats: list) -> dict[str, np.ndarray]:
    """Per clip: z, recon_err, image_z, image_rot of its tracked frames (cached in the part's .npz)."""
    npz = w.part.with_suffix(".npz")
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    import torch

    from models.gnpfa import encode_frames, load_checkpoint

    threads = torch.get_num_threads()
    if w.device == "cpu":
        # the CPUs the task asks for, fixed wherever it runs: with gnpfa_train_threads (2) in 1-CPU tasks two
        # workers ran 4 threads on 2 cores and the encode stage took 1.5x as long (bench/RESULTS.md); the
        # latents are bit-identical at 1 and 2 threads (tests/test_extract.py)
        torch.set_num_threads(task_cpus(_encode_task))
    try:
        _, vae, enc, _ = load_checkpoint(w.ckpt_dir, device=w.device)
        out: dict[str, np.ndarray] = {}
        for f, arrays in zip(feats, (training_arrays([f]) for f in feats)):
            r = encode_frames(vae, enc, arrays["offsets"], arrays["neutrals"], arrays["crops"], device=w.device)
            out.update({f"{f.clip_id}/{k}": v for k, v in r.items()})
    finally:
        torch.set_num_threads(threads)
    import io

    buf = io.BytesIO()
    np.savez(buf, **out)
    atomic_write_bytes(npz, buf.getvalue())
    return out


def _dropped(w: TrackWork, qrows: list[dict], ckpt_sha: str) -> dict:
    """Rows for a source none of whose clips could be extracted: each clip dropped with the reason."""
    by_clip = {q["clip_id"]: q for q in qrows}
    feats = [dropped_features_row(c, by_clip[c["clip_id"]]["reason"], ckpt_sha) for c in w.clips]
    return {"features": feats, "transcripts": [], "quarantine": qrows, "frames": 0}


def run_extract(out: str | os.PathLike, cfg: ExtractConfig, ex, progress: Callable[[str, int, int], None] | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Extraction stage (tracks, GNPFA, encoding, quality, tables). The caller holds the dataset lock
    and owns the executor (see pipelines.job)."""
    out = Path(out)
    tick = progress or (lambda *a: None)
    metrics = run_tracks(out, cfg, ex, progress)["metrics"]
    all_work, _ = _plan(out, cfg)
    try:
        ckpt_dir, ckpt_sha, ckpt_info = _obtain_gnpfa(out, cfg, all_work, log)
    except NotEnoughFrames as e:
        ckpt_dir, ckpt_sha, ckpt_info, no_ckpt = None, "none", {"kind": "none", "why": str(e)}, str(e)
    else:
        no_ckpt = None
    tick("gnpfa", 1, 1)
    # per source as it comes: its rows as validated Arrow (clip_features carry neutrals and embeddings)
    features, transcripts = RowBuffer("clip_features"), RowBuffer("transcripts")
    quarantine: list[dict] = []
    frames_of: dict[str, int] = {}

    def take(sid: str, res: dict) -> None:
        features.add(res["features"])
        transcripts.add(res["transcripts"])
        quarantine.extend(res["quarantine"])
        frames_of[sid] = int(res["frames"])

    todo = []
    for w in all_work:
        sid = w.source["source_id"]
        if no_ckpt is not None or not _complete(w):
            if w.failed_marker.is_file() and not _complete(w):
                qrows = json.loads(w.failed_marker.read_text())
            else:
                step, why = ("GNPFA", no_ckpt) if _complete(w) else ("landmarks/pose/audio", "no extraction part was written")
                qrows = failure_rows(TaskFailure(why, ""), "extract", step, w.source["uri"], sid,
                                     [c["clip_id"] for c in w.clips])
            take(sid, _dropped(w, qrows, ckpt_sha))
        else:
            todo.append(EncodeWork(w, str(ckpt_dir), ckpt_sha, gnpfa_device(cfg, ex)))
    done = len(frames_of)
    tick("encode", done, len(all_work))
    for w, res in ex.map_unordered(_encode_task, todo, **encode_resources(cfg, ex)):
        if isinstance(res, TaskFailure):
            res = _dropped(w.track, failure_rows(res, "extract", "GNPFA encoding/frames table", w.track.source["uri"],
                                                 w.track.source["source_id"], [c["clip_id"] for c in w.track.clips]),
                           ckpt_sha)
        take(w.track.source["source_id"], res)
        done += 1
        tick("encode", done, len(all_work))
    # frames parts of sources that no longer have clips, or whose extraction failed, are stale
    fdir = table_path(out, "frames")
    if fdir.is_dir():
        for p in fdir.glob("*.parquet"):
            if not frames_of.get(p.stem):
                p.unlink()
    feature_t = write_table(table_path(out, "clip_features"), "clip_features", features.table(["clip_id"]))
    transcript_t = write_table(table_path(out, "transcripts"), "transcripts", transcripts.table(["clip_id"]))
    replace_quarantine(out, ("extract",), quarantine)
    n_ok = feature_t.column("status").to_pylist().count("ok")
    res = {"clips_ok": n_ok, "clips_dropped": feature_t.num_rows - n_ok, "frames": sum(frames_of.values()),
           "gnpfa": {"sha256": ckpt_sha, **ckpt_info}, "engines": sorted(set(transcript_t.column("engine").to_pylist())),
           "models": model_shas(cfg),
           "landmarkers": sorted({json.loads(Path(w.npz).with_suffix(".json").read_text()).get("landmarker", "mediapipe")
                                  for w in all_work if _complete(w)})}
    # what the dataset card records of this stage (read by finish_dataset)
    atomic_write_bytes(out / EXTRACT_LINEAGE, json.dumps(res, sort_keys=True).encode())
    return {**res, "metrics": metrics}


def track_resources(cfg: ExtractConfig, ex) -> dict:
    """Ray resources of an extraction task: a share of a GPU for the torch landmarker or transcription on
    CUDA (asr_device) where there is one. Asking for NVDEC where the run has no GPU is a configuration
    error, said before any task starts."""
    gpu = landmarker_gpu(cfg, ex)
    if cfg.decoder == "nvdec" and not gpu:
        raise ValueError("decoder=nvdec needs the torch landmarker (landmarker=torch or auto, device not cpu) "
                         "on a GPU, and this run has none (in the Ray cluster, or in this process)")
    gpu = gpu or (cfg.asr_device != "cpu" and ex.has_gpu())
    return task_options(_extract_task, use_gpu=gpu, gpus=1 / cfg.tasks_per_gpu if cfg.tasks_per_gpu else None)


def tracks_pool(cfg: ExtractConfig, ex):
    """Where extraction tasks run: one source per task, or with the torch landmarker and sources_per_worker
    > 1 that many sources at once in each worker's threads, sharing its tracker (executors' pool)."""
    torch_engine = cfg.landmarker == "torch" or (cfg.landmarker == "auto" and landmarker_gpu(cfg, ex))
    return ex.pool(_extract_task, cfg.sources_per_worker if torch_engine else 1, **track_resources(cfg, ex))


def encode_resources(cfg: ExtractConfig, ex) -> dict:
    """Ray resources of an encoding task: a GPU where the cluster has one (and the config allows it)."""
    return task_options(_encode_task, use_gpu=gnpfa_device(cfg, ex) == "cuda")
