"""Dagster definitions: the control plane of M2F-D. One asset per stage over a dataset directory,
executed on Ray through the `m2fd` resource (a local Ray started for the run, or RAY_ADDRESS),
with asset checks, an ingestion-batch partitioning, a landing-folder sensor and a nightly schedule.

`m2fd run` materializes `m2fd_job` in-process (pipelines.job.run_job); `m2fd ui` serves these
definitions (`dagster dev -m pipelines.dagster_defs`) over the same instance, so runs started from
the CLI show in the UI. In a deployment, M2FD_OUT names the dataset and M2FD_LANDING the folder
or fsspec prefix the sensor watches.

Partitioning: each ingestion batch (a set of inputs: the arguments of one `m2fd run`, or the new
files the sensor found) is a dynamic partition of `ingest_batch`, which records the batch's
manifest in the dataset. The downstream assets are the dataset as a whole: each materialization
brings it up to date with every batch so far, redoing only what is new (per-source part caches),
and `shards` adds the new clips as a new dataset version without touching committed shards.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import dagster as dg
from pydantic import PrivateAttr

from extractors.config import IngestConfig, RunConfig

from .stages import STAGES

BATCHES = dg.DynamicPartitionsDefinition(name="ingest_batch")
BATCH_DIR = "batches"


class RunWatch:
    """Who watches a run as it goes (the `watch` resource): the CLI's progress bars and log lines for a
    run it executes in-process; a deployed run has none (its log lines go to the Dagster run log)."""

    def __init__(self, progress: Callable[[str, int, int], None] | None = None, log: Callable[[str], None] | None = None):
        self.progress = progress or (lambda *a: None)
        self._log = log

    def log(self, context) -> Callable[[str], None]:
        return self._log or context.log.info


def dagster_home(out: str | os.PathLike) -> Path:
    """Where run history lives: $DAGSTER_HOME, else <dataset>/.dagster (what `m2fd ui` serves)."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path(out) / ".dagster")
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").is_file():
        # run telemetry off; runs started by the UI execute in-process, one at a time per dataset
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    return home


def batch_key(sources: list[str], prefix: str = "b") -> str:
    """A batch is named by what it was asked to ingest, so repeating a run names the same batch."""
    return f"{prefix}-" + hashlib.sha256(json.dumps(sorted(sources)).encode()).hexdigest()[:12]


def batch_sources(out: str | os.PathLike) -> list[str]:
    """Every input of every batch recorded in the dataset (the union the dataset is built from)."""
    srcs: set[str] = set()
    for p in sorted((Path(out) / BATCH_DIR).glob("*.json")):
        srcs.update(json.loads(p.read_text())["sources"])
    return sorted(srcs)


class M2FDResource(dg.ConfigurableResource):
    """The dataset being built and where stages execute (holds the dataset lock unless the caller does)."""

    out: str
    executor: str = "ray"
    num_cpus: Optional[int] = None
    config_yaml: Optional[str] = None  # a YAML file with ingest/extract/shard sections (as `m2fd run --config`)
    config_doc: str = ""  # the same sections as a JSON/YAML document (what `m2fd run` passes)
    take_lock: bool = True

    _ex: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default=None)
    _prefetch: Any = PrivateAttr(default=None)  # extraction tasks started during ingest (see TrackPrefetch)
    _cfg: Any = PrivateAttr(default=None)  # the RunConfig, once loaded

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        from .executors import make_executor
        from .lock import DatasetLock

        Path(self.out).mkdir(parents=True, exist_ok=True)
        if self.take_lock:
            from .lock import sweep_temp

            self._lock = DatasetLock(self.out).__enter__()
            sweep_temp(Path(self.out))
        self._ex = make_executor(self.executor, self.num_cpus)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._ex is not None:
            self._ex.close()
        if self._lock is not None:
            self._lock.__exit__(None, None, None)

    @property
    def ex(self):
        return self._ex

    def configs(self) -> RunConfig:
        """The run's one config (config_yaml, then config_doc over it), loaded on first use; crops are
        cut at the size of the GNPFA the dataset encodes with."""
        if self._cfg is None:
            import yaml

            from .gnpfa import crops_for_checkpoint

            docs = [yaml.safe_load(Path(self.config_yaml).read_text()) if self.config_yaml else None,
                    yaml.safe_load(self.config_doc) if self.config_doc else None]
            cfg = RunConfig.load(*docs)
            self._cfg = dataclasses.replace(cfg, extract=crops_for_checkpoint(cfg.extract, Path(self.out)))
        return self._cfg


def _clips_ok(out: str) -> int:
    from storage_schemas import open_dataset

    ds = open_dataset(out)
    if "clip_features" not in ds.tables:
        return 0
    return ds.query("select count(*) n from clip_features where status = 'ok'").to_pylist()[0]["n"]


def _n_clips(out: str) -> int:
    from storage_schemas import open_dataset

    ds = open_dataset(out)
    return ds.table("clips").num_rows if "clips" in ds.tables else 0


class IngestBatch(dg.Config):
    sources: list[str]  # files, folders, globs, fsspec URLs or manifests


@dg.asset(group_name="m2fd", partitions_def=BATCHES,
          description="One ingestion batch: the inputs it names, recorded as a manifest in the dataset.")
def ingest_batch(context: dg.AssetExecutionContext, config: IngestBatch, m2fd: M2FDResource) -> dg.MaterializeResult:
    from storage_schemas import write_json

    key = context.partition_key
    write_json(Path(m2fd.out) / BATCH_DIR / f"{key}.json", {"batch": key, "sources": sorted(config.sources)})
    return dg.MaterializeResult(metadata={"batch": key, "sources": dg.MetadataValue.json(sorted(config.sources))})


@dg.asset(group_name="m2fd", deps=[ingest_batch],
          description="Sources and talking clips of every batch: probe, dedupe by content, quarantine, cut clips.")
def clips(context: dg.AssetExecutionContext, m2fd: M2FDResource, watch: dg.ResourceParam[RunWatch]) -> dg.MaterializeResult:
    from .extract import TrackPrefetch
    from .ingest import run_ingest

    cfg = m2fd.configs()
    sel = context.run.asset_selection
    # stream into extraction when this run also materializes `tracks`
    if sel is None or dg.AssetKey("tracks") in sel:
        m2fd._prefetch = TrackPrefetch(m2fd.out, cfg.extract, m2fd.ex)
    s = run_ingest(batch_sources(m2fd.out), m2fd.out, cfg.ingest, ex=m2fd.ex, progress=watch.progress,
                   on_source=m2fd._prefetch)
    md = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("quarantine", "stage_seconds")}
    lines = "\n".join(f"| {r} | {n} |" for r, n in sorted(s.quarantine.items()))
    return dg.MaterializeResult(metadata={
        **md, "quarantine": dg.MetadataValue.json(s.quarantine),
        "quarantine_table": dg.MetadataValue.md("| reason | inputs |\n|---|---|\n" + lines if lines else "none"),
        "stage_cpu_s": dg.MetadataValue.json({k: round(v, 2) for k, v in s.stage_seconds.items()})})


@dg.asset(group_name="m2fd", deps=[clips],
          description="Per source: MediaPipe landmarks, head pose, audio features and transcripts (cached parts).")
def tracks(context: dg.AssetExecutionContext, m2fd: M2FDResource, watch: dg.ResourceParam[RunWatch]) -> dg.MaterializeResult:
    from .extract import run_tracks

    r = run_tracks(m2fd.out, m2fd.configs().extract, m2fd.ex, progress=watch.progress, prefetch=m2fd._prefetch)
    m2fd._prefetch = None
    m = r.pop("metrics")  # task seconds by step (``*_s``) and counts (clips transcribed)
    counts = {k: int(v) for k, v in m.items() if not k.endswith("_s")}
    return dg.MaterializeResult(metadata={**r, **counts, "cpu_s": dg.MetadataValue.json(
        {k: round(v, 2) for k, v in m.items() if k.endswith("_s")})})


@dg.asset(group_name="m2fd", deps=[tracks],
          description="The GNPFA checkpoint: the shipped one (default), a configured folder, the dataset's committed one, or a bootstrap trained on its meshes.")
def gnpfa_checkpoint(context: dg.AssetExecutionContext, m2fd: M2FDResource, watch: dg.ResourceParam[RunWatch]) -> dg.MaterializeResult:
    from .extract import run_gnpfa

    if not _n_clips(m2fd.out):
        return dg.MaterializeResult(metadata={"skipped": "no clips"})
    g = run_gnpfa(m2fd.out, m2fd.configs().extract, log=watch.log(context))
    return dg.MaterializeResult(metadata={k: v for k, v in g.items()})


@dg.asset(group_name="m2fd", deps=[gnpfa_checkpoint],
          description="Frames at 30 fps (landmarks, pose, GNPFA latents, quality), clip features, transcripts.")
def extraction(context: dg.AssetExecutionContext, m2fd: M2FDResource, watch: dg.ResourceParam[RunWatch]) -> dg.MaterializeResult:
    from .extract import run_extract

    if not _n_clips(m2fd.out):
        return dg.MaterializeResult(metadata={"skipped": "no clips"})
    e = run_extract(m2fd.out, m2fd.configs().extract, m2fd.ex, progress=watch.progress, log=watch.log(context))
    return dg.MaterializeResult(metadata={
        "frames": e["frames"], "clips_ok": e["clips_ok"], "clips_dropped": e["clips_dropped"],
        "gnpfa": dg.MetadataValue.json(e["gnpfa"]), "engines": dg.MetadataValue.json(e["engines"]),
        "landmarkers": dg.MetadataValue.json(e["landmarkers"])})


@dg.asset(group_name="m2fd", deps=[extraction], description="Emotion, prosody, sentiment, style, caption.")
def labels(context: dg.AssetExecutionContext, m2fd: M2FDResource, watch: dg.ResourceParam[RunWatch]) -> dg.MaterializeResult:
    from .labels import run_labels

    if not _clips_ok(m2fd.out):
        return dg.MaterializeResult(metadata={"skipped": "no usable clips"})
    r = run_labels(m2fd.out, m2fd.ex, progress=watch.progress)
    return dg.MaterializeResult(metadata={"rows": r["rows"], "clips": r["clips"],
                                          "labelers": dg.MetadataValue.json(r["labelers"])})


@dg.asset(group_name="m2fd", deps=[labels],
          description="Deterministic WebDataset shards; new clips are added as a new dataset version.")
def shards(context: dg.AssetExecutionContext, m2fd: M2FDResource, watch: dg.ResourceParam[RunWatch]) -> dg.MaterializeResult:
    from .shards import run_shards

    if not _clips_ok(m2fd.out):
        return dg.MaterializeResult(metadata={"skipped": "no usable clips"})
    r = run_shards(m2fd.out, m2fd.configs().shard, m2fd.ex, progress=watch.progress)
    return dg.MaterializeResult(metadata={**{k: v for k, v in r.items() if k != "splits"},
                                          "splits": dg.MetadataValue.json(r["splits"])})


@dg.asset(group_name="m2fd", deps=[clips, extraction, labels, shards], description="Dataset card (counts, lineage, versions) and HTML report.")
def dataset_card(context: dg.AssetExecutionContext, m2fd: M2FDResource) -> dg.MaterializeResult:
    from .report import finish_dataset, write_report

    card = finish_dataset(Path(m2fd.out), m2fd.configs())
    md: dict[str, Any] = {"counts": dg.MetadataValue.json(card["counts"]),
                          "versions": dg.MetadataValue.json(card.get("versions", []))}
    if (Path(m2fd.out) / "tables" / "samples.parquet").is_file():
        md["report"] = dg.MetadataValue.path(str(write_report(Path(m2fd.out))))
    hist = card.get("stats", {}).get("clip_duration_hist")
    if hist:
        md["clip_durations"] = dg.MetadataValue.md("| seconds | clips |\n|---|---|\n" + "\n".join(
            f"| {b} | {'#' * n} {n} |" for b, n in hist.items()))
    return dg.MaterializeResult(metadata=md)


@dg.asset_check(asset=dataset_card, description="Every table reads back against storage_schemas and its schema version.")
def tables_valid(m2fd: M2FDResource) -> dg.AssetCheckResult:
    from storage_schemas import open_dataset

    try:
        ds = open_dataset(m2fd.out)
        rows = {name: sum(b.num_rows for b in ds.batches(name)) for name in ds.tables}  # a batch at a time
    except Exception as e:
        return dg.AssetCheckResult(passed=False, metadata={"error": f"{type(e).__name__}: {e}"})
    return dg.AssetCheckResult(passed=True, metadata={"rows": dg.MetadataValue.json(rows)})


@dg.asset_check(asset=clips, description="Share of inputs quarantined at ingest stays under 90%.")
def quarantine_ratio(m2fd: M2FDResource) -> dg.AssetCheckResult:
    from storage_schemas import open_dataset

    ds = open_dataset(m2fd.out)
    q = ds.query("select (select count(*) from quarantine where stage in ('discover', 'ingest')) q, "
                 "(select count(*) from sources where status <> 'quarantined') s").to_pylist()[0]
    ratio = q["q"] / max(1, q["q"] + q["s"])
    return dg.AssetCheckResult(passed=ratio < 0.9, metadata={"ratio": round(ratio, 4), "quarantined": q["q"]})


@dg.asset_check(asset=extraction, description="Quality gates: at most half the clips dropped at extraction, "
                                              "every kept clip has GNPFA latents and a transcript engine.")
def quality_thresholds(m2fd: M2FDResource) -> dg.AssetCheckResult:
    from storage_schemas import open_dataset

    ds = open_dataset(m2fd.out)
    if "clip_features" not in ds.tables:
        return dg.AssetCheckResult(passed=True, metadata={"clips": 0})
    r = ds.query("select count(*) n, count(*) filter (where status = 'ok') ok, "
                 "count(*) filter (where status = 'ok' and (gnpfa_checkpoint is null or transcript_engine is null)) "
                 "incomplete from clip_features").to_pylist()[0]
    reasons = {x["reason"]: x["n"] for x in ds.query(
        "select reason, count(*) n from quarantine where stage = 'extract' group by 1 order by 1").to_pylist()}
    dropped = (r["n"] - r["ok"]) / max(1, r["n"])
    return dg.AssetCheckResult(passed=dropped <= 0.5 and r["incomplete"] == 0, metadata={
        "clips": r["n"], "ok": r["ok"], "dropped_ratio": round(dropped, 4), "incomplete": r["incomplete"],
        "reasons": dg.MetadataValue.json(reasons)})


@dg.asset_check(asset=shards, description="Every shard's bytes match the sha256 and size in the index.")
def shard_integrity(m2fd: M2FDResource) -> dg.AssetCheckResult:
    from extractors.probe import sha256_file
    from storage_schemas import open_dataset

    root = Path(m2fd.out)
    ds = open_dataset(root)
    if "shards" not in ds.tables:
        return dg.AssetCheckResult(passed=True, metadata={"shards": 0})
    bad = []
    rows = ds.table("shards").to_pylist()
    for r in rows:  # hashed a chunk at a time: a shard is up to max_shard_bytes
        p = root / r["shard"]
        if not p.is_file() or p.stat().st_size != r["bytes"] or sha256_file(p) != r["sha256"]:
            bad.append(r["shard"])
    return dg.AssetCheckResult(passed=not bad, metadata={"shards": len(rows), "bad": dg.MetadataValue.json(bad)})


class TrainRun(dg.Config):
    """What `m2fd train` takes: workers, resources, steps, model keys (models.media2face.M2FConfig)."""

    run_dir: str = "train/media2face"  # relative to the dataset directory unless absolute
    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: int = 1
    max_steps: int = 1000
    batch_size: int = 8
    style_encoder: Optional[str] = None
    subset: Optional[str] = None
    settings: dict[str, Any] = {}  # other models.m2f_train.TrainConfig keys
    model: dict[str, Any] = {}


@dg.asset(group_name="training", deps=[shards],
          description="Media2Face trained on the dataset's shards with Ray Train (resumes from the run dir).")
def media2face_model(context: dg.AssetExecutionContext, config: TrainRun, m2fd: M2FDResource) -> dg.MaterializeResult:
    from models.m2f_train import TrainConfig, latest_checkpoint

    from .train import run_training

    run_dir = Path(config.run_dir) if Path(config.run_dir).is_absolute() else Path(m2fd.out) / config.run_dir
    tcfg = TrainConfig(dataset=None if config.subset else m2fd.out, subset=config.subset, run_dir=str(run_dir),
                       max_steps=config.max_steps, batch_size=config.batch_size, style_encoder=config.style_encoder,
                       model=dict(config.model), **dict(config.settings))
    from .train import cpu_warning
    from .train_progress import describe, estimate_line, validation_line

    warn = cpu_warning(tcfg, config.gpus_per_worker)
    if warn:
        context.log.warning(warn)
    shown = {"estimate": False}

    def on_progress(rec: dict) -> None:  # the run's reported steps, in the run's log as they come
        context.log.info(describe(rec))
        for line in (validation_line(rec), None if shown["estimate"] else estimate_line(rec, config.gpus_per_worker == 0)):
            if line:
                context.log.info(line)
        shown["estimate"] = shown["estimate"] or rec.get("eta_s") is not None

    m = run_training(tcfg, workers=config.workers, gpus_per_worker=config.gpus_per_worker,
                     cpus_per_worker=config.cpus_per_worker, on_progress=on_progress, handle_signals=False)
    ck = latest_checkpoint(run_dir)
    md = {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
    return dg.MaterializeResult(metadata={**md, "checkpoint": dg.MetadataValue.path(str(ck)) if ck else "none",
                                          "metrics_csv": dg.MetadataValue.path(str(run_dir / "metrics.csv"))})


ASSETS = [ingest_batch, clips, tracks, gnpfa_checkpoint, extraction, labels, shards, dataset_card]
CHECKS = [tables_valid, quarantine_ratio, quality_thresholds, shard_integrity]
STAGE_ASSETS = {s.name: s.assets for s in STAGES}

# in-process executor: one Ray (and one dataset lock) per run, shared by every step
m2fd_job = dg.define_asset_job("m2fd_job", selection=dg.AssetSelection.assets(*ASSETS),
                               executor_def=dg.in_process_executor,
                               description="Ingest one batch and bring the dataset up to date (new version if new clips).")
# training is launched on its own (from the UI or `m2fd train`), never as part of an ingestion run
train_job = dg.define_asset_job("m2fd_train", selection=dg.AssetSelection.assets(media2face_model),
                                executor_def=dg.in_process_executor,
                                description="Train Media2Face on the dataset with Ray Train (DDP).")
# nightly: re-verify what is on disk (tables against their schemas, shard bytes against the index)
verify_job = dg.define_asset_job("m2fd_verify", selection=dg.AssetSelection.checks(tables_valid, shard_integrity))
nightly_verify = dg.ScheduleDefinition(name="nightly_verify", job=verify_job, cron_schedule="0 3 * * *",
                                       default_status=dg.DefaultScheduleStatus.RUNNING)


def new_landing_files(landing: str, seen: set[str], extensions: tuple[str, ...]) -> list[str]:
    """Video files under the landing folder / URL prefix that the sensor has not launched yet."""
    from extractors.discover import discover

    return sorted(r.uri for r in discover([landing], extensions) if not r.problem and r.uri not in seen)


@dg.sensor(job=m2fd_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Watches M2FD_LANDING (a folder or fsspec prefix); new videos become a batch and a run.")
def landing_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    landing = os.environ.get("M2FD_LANDING")
    if not landing:
        return dg.SensorResult(skip_reason="M2FD_LANDING is not set")
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    new = new_landing_files(landing, seen, IngestConfig().extensions)
    if not new:
        return dg.SensorResult(skip_reason=f"no new videos under {landing}")
    key = batch_key(new, prefix="landing")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=key, partition_key=key,
                                    run_config={"ops": {"ingest_batch": {"config": {"sources": new}}}})],
        dynamic_partitions_requests=[BATCHES.build_add_request([key])],
        cursor=json.dumps(sorted(seen | set(new))))


def build_defs(resource: M2FDResource, watch: RunWatch | None = None) -> dg.Definitions:
    return dg.Definitions(assets=ASSETS + [media2face_model], asset_checks=CHECKS, jobs=[m2fd_job, verify_job, train_job],
                          schedules=[nightly_verify], sensors=[landing_sensor],
                          resources={"m2fd": resource, "watch": watch or RunWatch()})


defs = build_defs(M2FDResource(out=os.environ.get("M2FD_OUT", "out/dagster"),
                               executor=os.environ.get("M2FD_EXECUTOR", "ray"),
                               config_yaml=os.environ.get("M2FD_CONFIG") or None))
