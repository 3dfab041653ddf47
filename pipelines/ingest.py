"""Wire the ingest stage: discover -> fetch+hash -> dedupe -> analyse (parallel) -> tables.

Per-source results are cached as JSON parts keyed by content hash and config digest, so a rerun
after a crash redoes only unfinished sources, and the final tables are a deterministic function of
the inputs and config.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from extractors.config import IngestConfig
from extractors.discover import InputRef, discover
from extractors.errors import Reject
from extractors.ingest import analyse, failed_analysis, quarantine_row, source_id_of
from extractors.probe import fetch
from models import asd_sync
from storage_schemas import RowBuffer, atomic_write_bytes, table_path, write_table

from .executors import LocalExecutor, TaskFailure, stage_task
from .faults import maybe_fail
from .stage_io import CACHE, keep_audio, replace_quarantine
from .stages import task_options

# fsspec filesystems whose files exist only inside the process that made them: fetched in the driver
PROCESS_LOCAL_PROTOCOLS = ("memory://",)

PARTS = Path("parts") / "ingest"


@dataclass
class IngestSummary:
    n_inputs: int = 0
    n_sources: int = 0
    n_clips: int = 0
    clip_hours: float = 0.0
    quarantine: dict[str, int] = field(default_factory=dict)
    reused: int = 0
    analysed: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed over sources analysed in this run


@dataclass(frozen=True)
class FetchWork:
    """One input to read (a URL is copied into ``cache`` under its sha256) and hash."""

    uri: str
    cache: str


@dataclass(frozen=True)
class AnalyseWork:
    """One unique source to probe, segment into talking clips and score (ingest's per-source task)."""

    out: str
    source: dict  # {"uri", "path", "sha256", "size"} as fetched
    cfg: dict  # IngestConfig.to_dict()
    part: str  # parts/ingest/<sha256>-<config digest>.json, written last
    detector: str = "mediapipe"  # the face detector's engine (detector_engine)


@stage_task
def _fetch_task(w: FetchWork) -> dict:
    uri, cache = w.uri, w.cache
    try:
        path, sha, size = fetch(uri, cache)
        return {"uri": uri, "path": path, "sha256": sha, "size": size}
    except Reject as r:
        return {"uri": uri, "reject": quarantine_row(uri, None, r.reason, r.message, r.detail, stage="discover")}


@functools.lru_cache(maxsize=2)
def asd_scorer(weights: str, durations_s: tuple[int, ...], threads: int, device: str = "cpu", sync: str = "",
               encoder: str = "packaged"):
    """The active-speaker model of a config with its sync model (``sync``: ingest.asd_sync_model, ``encoder``:
    ingest.asd_sync_encoder), loaded once per process (sha256-checked); ``device`` "auto" is CUDA where this
    process sees a GPU."""
    import torch

    from models.av_sync import resolve_encoder
    from models.light_asd import Scorer, resolve

    dev = "cuda" if device == "cuda" or device == "auto" and torch.cuda.is_available() else "cpu"
    sp = asd_sync.resolve(sync)
    model = asd_sync.load(sp, resolve_encoder(encoder, "ingest.asd_sync_encoder")) if sp else None
    return Scorer(resolve(weights), durations_s, threads, dev, model)


def config_scorer(cfg: IngestConfig, device: str = "cpu"):
    """asd_scorer of ``cfg`` (None when Light-ASD is off)."""
    if not cfg.asd_weights:
        return None
    return asd_scorer(cfg.asd_weights, tuple(cfg.asd_durations_s), cfg.asd_threads, device, cfg.asd_sync_model,
                      cfg.asd_sync_encoder)


def analysis_gpu(cfg: IngestConfig, ex) -> bool:
    """Whether analysis tasks ask a share of a GPU (Light-ASD or the torch face detector on CUDA, where the
    cluster has one)."""
    light_asd_on_cuda = bool(cfg.asd_weights) and cfg.asd_device != "cpu"
    return (light_asd_on_cuda or cfg.detector != "mediapipe") and ex.has_gpu()


def detector_engine(cfg: IngestConfig, ex) -> str:
    """The face detector the analysis tasks run: "mediapipe", "torch-cuda" or "torch-cpu" (ingest.detector;
    "auto" is torch on CUDA where the cluster has a GPU, else MediaPipe)."""
    if cfg.detector == "mediapipe" or (cfg.detector == "auto" and not ex.has_gpu()):
        return "mediapipe"
    return "torch-cuda" if ex.has_gpu() else "torch-cpu"


@functools.lru_cache(maxsize=2)
def _torch_detector(device: str, min_score: float):
    """One torch face detector per worker process and device (the densified weights load once)."""
    from extractors.mesh_torch import TorchFaceDetector

    return TorchFaceDetector(device, min_score)


def face_detector(engine: str, cfg: IngestConfig):
    """The detector an analysis task runs (None: MediaPipe's graph, made and closed by the analysis)."""
    if engine == "mediapipe":
        return None
    import torch

    if engine == "torch-cuda" and not torch.cuda.is_available():
        raise RuntimeError("ingest.detector: this analysis task was given no CUDA device")
    return _torch_detector("cuda" if engine == "torch-cuda" else "cpu", cfg.face_min_score)


# what an ingest part holds, in its name: parts of another format are analysed again (2: clips.asd_sync)
PART_FORMAT = 2


def asd_lineage(cfg: IngestConfig) -> dict | None:
    """{"name", "path", "sha256"} of the configured Light-ASD weights (None when off); raises with the
    path when the file is missing or is not the released one."""
    s = config_scorer(cfg)
    if s is None:
        return None
    sync = {"sync": {"name": "asd-sync", "path": str(asd_sync.resolve(cfg.asd_sync_model)),
                     "sha256": s.sync.sha256,
                     **({"encoder": {"path": str(s.sync.encoder.path / "model.bin"), "sha256": s.sync.encoder.sha256}}
                        if s.sync.encoder is not None else {})}} if s.sync is not None else {}
    return {"name": "light-asd", "path": s.path, "sha256": s.sha256,
            **({"device": cfg.asd_device} if cfg.asd_device != "cpu" else {}), **sync}


def detector_lineage(cfg: IngestConfig) -> dict:
    """The face detector of a config: the full-range model file both engines run, and ingest.detector
    (the engine that ran is in the ingest parts' names)."""
    from extractors.mesh_torch import mediapipe_model
    from models.packaged import verified_sha256

    rel = "face_detection/face_detection_full_range_sparse.tflite" if cfg.face_model == 1 else \
        "face_detection/face_detection_short_range.tflite"
    p = mediapipe_model(rel)
    return {"detector": cfg.detector, "path": str(p), "sha256": verified_sha256(p)}


def vad_lineage(cfg: IngestConfig) -> dict:
    """The voice detector of a config: {"name": "gmm"} or {"name": "silero", "path", "sha256"} (raises,
    naming the config key, when the configured model is missing)."""
    if cfg.vad != "silero":
        return {"name": "gmm"}
    from models.packaged import resolve, verified_sha256

    p = resolve(cfg.vad_model, "silero-vad")
    return {"name": "silero", "path": str(p), "sha256": verified_sha256(p)}


@stage_task
def _analyse_task(w: AnalyseWork) -> dict:
    item, part = w.source, w.part
    maybe_fail("ingest", item["uri"])
    cfg = IngestConfig.from_dict(w.cfg)
    asd = config_scorer(cfg, cfg.asd_device)
    kept: list = []
    result = analyse(item["path"], item["uri"], item["sha256"], item["size"], cfg,
                     detector=face_detector(w.detector, cfg), asd=asd.track if asd is not None else None,
                     audio_sink=kept.append)
    if kept and result["clips"]:  # later stages read it from parts/audio/ instead of decoding it again
        keep_audio(w.out, item["sha256"], kept[0])
    atomic_write_bytes(part, json.dumps(result, sort_keys=True).encode())
    return result


def _analysis_failed(item: dict, failure: TaskFailure) -> dict:
    """A source whose analysis task raised or whose worker died: quarantined for this run (no part is
    written, so the next run tries it again)."""
    return failed_analysis(item["uri"], item["sha256"], item["size"], "processing_error",
                           f"ingest stage, analyse: {failure.error}", failure.detail())


def run_ingest(sources: list[str], out: str | os.PathLike, cfg: IngestConfig | None = None, ex=None,
               progress: Callable[[str, int, int], None] | None = None,
               on_source: Callable[[dict], None] | None = None) -> IngestSummary:
    """Ingest stage. The caller holds the dataset lock and owns the executor (see pipelines.job).
    ``on_source`` sees each source's analysis (source row, clips) as soon as it exists, so the next
    stage can start on it while other sources are still being analysed."""
    cfg = cfg or IngestConfig()
    cfg.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tick = progress or (lambda stage, done, total: None)
    refs = discover(sources, cfg.extensions)
    summary = IngestSummary(n_inputs=len(refs))
    quarantine = [quarantine_row(r.uri, None, r.problem, r.message or r.problem, stage="discover")
                  for r in refs if r.problem]
    good: list[InputRef] = [r for r in refs if not r.problem]
    fetched = []
    items = [FetchWork(r.uri, str(out / CACHE)) for r in good]
    local = [it for it in items if it.uri.startswith(PROCESS_LOCAL_PROTOCOLS)]
    remote = [it for it in items if not it.uri.startswith(PROCESS_LOCAL_PROTOCOLS)]
    fetches = list(LocalExecutor().map_unordered(_fetch_task, local)) if local else []
    for i, (item, res) in enumerate(fetches + list(ex.map_unordered(_fetch_task, remote, **task_options(_fetch_task)))):
        tick("hash", i + 1, len(good))
        if isinstance(res, TaskFailure):
            res = {"reject": quarantine_row(item.uri, None, "fetch_error", f"cannot read {item.uri}: {res.error}",
                                            res.detail(), stage="discover")}
        if "reject" in res:
            quarantine.append(res["reject"])
        else:
            fetched.append(res)
    # dedupe by content: the lexicographically first URI of each hash is kept
    fetched.sort(key=lambda f: f["uri"])
    unique: dict[str, dict] = {}
    for f in fetched:
        if f["sha256"] in unique:
            keep = unique[f["sha256"]]["uri"]
            quarantine.append(quarantine_row(f["uri"], source_id_of(f["sha256"]), "duplicate",
                                             f"same bytes (sha256 {f['sha256'][:16]}) as {keep}", {"kept": keep}))
        else:
            unique[f["sha256"]] = f
    asd = asd_lineage(cfg)  # fails the run at once, naming the file, when the configured model is missing
    vad = vad_lineage(cfg)
    digest = (f"{cfg.digest()}-p{PART_FORMAT}" + (f"-{asd['sha256'][:8]}" if asd else "")
              + (f"-{asd['sync']['sha256'][:8]}" if asd and "sync" in asd else "")
              + (f"-{vad['sha256'][:8]}" if "sha256" in vad else ""))
    engine = detector_engine(cfg, ex)
    digest += f"-{engine}" if engine != "mediapipe" else ""
    # each source's rows are kept as validated Arrow as it comes (its face tracks carry per-frame scores)
    tables = {name: RowBuffer(name) for name in ("sources", "clips", "face_tracks")}
    clip_s = 0.0

    def take(res: dict) -> None:
        nonlocal clip_s
        if on_source is not None:
            on_source(res)
        tables["sources"].add([res["source"]])
        tables["clips"].add(res["clips"])
        tables["face_tracks"].add(res.get("tracks", []))
        quarantine.extend(res["quarantine"])
        clip_s += sum(c["duration_s"] for c in res["clips"])

    todo, n_done = [], 0
    for f in unique.values():
        part = out / PARTS / f"{f['sha256'][:32]}-{digest}.json"
        cached = _load_part(part, f["uri"])
        if cached is not None:
            take(cached)
            n_done += 1
        else:
            todo.append(AnalyseWork(str(out), f, cfg.to_dict(), str(part), engine))
    summary.reused = n_done
    tick("analyse", n_done, len(unique))
    for item, res in ex.map_unordered(_analyse_task, todo, **task_options(_analyse_task, use_gpu=analysis_gpu(cfg, ex))):
        if isinstance(res, TaskFailure):
            res = _analysis_failed(item.source, res)
        take(res)
        n_done += 1
        for k, v in res.get("metrics", {}).items():
            summary.stage_seconds[k] = summary.stage_seconds.get(k, 0) + v
        tick("analyse", n_done, len(unique))
    summary.analysed = len(todo)
    write_table(table_path(out, "sources"), "sources", tables["sources"].table(["source_id"]))
    write_table(table_path(out, "clips"), "clips", tables["clips"].table(["clip_id"]))
    write_table(table_path(out, "face_tracks"), "face_tracks", tables["face_tracks"].table(["source_id", "track_id"]))
    # later stages' rows stay until those stages run again
    replace_quarantine(out, ("discover", "ingest"), quarantine)
    summary.n_sources = len(tables["sources"])
    summary.n_clips = len(tables["clips"])
    summary.clip_hours = round(clip_s / 3600, 6)
    for q in quarantine:
        summary.quarantine[q["reason"]] = summary.quarantine.get(q["reason"], 0) + 1
    return summary


def _load_part(part: Path, uri: str) -> dict | None:
    """A cached per-source result, re-labelled with the URI it is found under now."""
    if not part.is_file():
        return None
    try:
        res = json.loads(part.read_text())
    except (OSError, ValueError):
        return None  # a torn or foreign file is recomputed, never trusted
    res["source"]["uri"] = uri
    for c in res["clips"]:
        c["uri"] = uri
    for q in res["quarantine"]:
        q["uri"] = uri
    return res
