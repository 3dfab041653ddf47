"""Dagster definitions: one asset per stage over a dataset directory, executed on Ray through the
M2FD resource (a local Ray started for the run, or RAY_ADDRESS), with asset checks.

Materialize in-process (what tests do) or load in a Dagster deployment:
    dagster dev -m pipelines.dagster_defs
"""

import hashlib
from pathlib import Path
from typing import Any, Optional

import dagster as dg
from pydantic import PrivateAttr

from extractors.config import ExtractConfig, IngestConfig, ShardConfig


class M2FDResource(dg.ConfigurableResource):
    """The dataset being built and where stages execute. Holds the dataset lock for the whole run."""

    out: str
    executor: str = "ray"
    num_cpus: Optional[int] = None
    config_yaml: Optional[str] = None  # a YAML with ingest/extract/shard sections (as for `m2fd run --config`)

    _ex: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        from .executors import make_executor
        from .lock import DatasetLock

        Path(self.out).mkdir(parents=True, exist_ok=True)
        self._lock = DatasetLock(self.out).__enter__()
        self._ex = make_executor(self.executor, self.num_cpus)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._ex is not None:
            self._ex.close()
        if self._lock is not None:
            self._lock.__exit__(None, None, None)

    @property
    def ex(self):
        return self._ex

    def configs(self) -> tuple[IngestConfig, ExtractConfig, ShardConfig]:
        import yaml

        doc = yaml.safe_load(Path(self.config_yaml).read_text()) if self.config_yaml else {}
        doc = doc or {}
        return (IngestConfig.from_dict(doc.get("ingest") or {}), ExtractConfig.from_dict(doc.get("extract") or {}),
                ShardConfig.from_dict(doc.get("shard") or {}))


class IngestRun(dg.Config):
    sources: list[str]


@dg.asset(group_name="m2fd", description="Discover, probe, dedupe and quarantine inputs; cut talking clips.")
def clips(context: dg.AssetExecutionContext, config: IngestRun, m2fd: M2FDResource) -> dg.MaterializeResult:
    from .ingest import run_ingest

    icfg, _, _ = m2fd.configs()
    s = run_ingest(config.sources, m2fd.out, icfg, ex=m2fd.ex)
    return dg.MaterializeResult(metadata={
        "inputs": s.n_inputs, "sources": s.n_sources, "clips": s.n_clips, "clip_hours": s.clip_hours,
        "analysed": s.analysed, "reused": s.reused, "quarantine": dg.MetadataValue.json(s.quarantine),
        "stage_cpu_s": dg.MetadataValue.json({k: round(v, 2) for k, v in s.stage_seconds.items()})})


@dg.asset(group_name="m2fd", deps=[clips], description="Landmarks, pose, GNPFA latents, transcripts, audio features.")
def extraction(context: dg.AssetExecutionContext, m2fd: M2FDResource) -> dg.MaterializeResult:
    from .extract import run_extract

    _, ecfg, _ = m2fd.configs()
    e = run_extract(m2fd.out, ecfg, m2fd.ex, log=context.log.info)
    return dg.MaterializeResult(metadata={
        "frames": e["frames"], "clips_ok": e["clips_ok"], "clips_dropped": e["clips_dropped"],
        "gnpfa": dg.MetadataValue.json(e["gnpfa"]), "transcription": dg.MetadataValue.json(e["engines"])})


@dg.asset(group_name="m2fd", deps=[extraction], description="Emotion, prosody, sentiment, style, caption.")
def labels(context: dg.AssetExecutionContext, m2fd: M2FDResource) -> dg.MaterializeResult:
    from .labels import run_labels

    r = run_labels(m2fd.out, m2fd.ex)
    return dg.MaterializeResult(metadata={"label_rows": r["rows"], "clips": r["clips"],
                                          "labelers": dg.MetadataValue.json(r["labelers"])})


@dg.asset(group_name="m2fd", deps=[labels], description="Deterministic WebDataset shards, index, card, report.")
def shards(context: dg.AssetExecutionContext, m2fd: M2FDResource) -> dg.MaterializeResult:
    from .job import finish_dataset
    from .report import write_report
    from .shards import run_shards

    icfg, ecfg, scfg = m2fd.configs()
    r = run_shards(m2fd.out, scfg, m2fd.ex)
    finish_dataset(Path(m2fd.out), icfg, ecfg, scfg, None)
    write_report(Path(m2fd.out))
    return dg.MaterializeResult(metadata={"shards": r["shards"], "samples": r["samples"], "bytes": r["bytes"],
                                          "splits": dg.MetadataValue.json(r["splits"])})


@dg.asset_check(asset=clips, description="Every table matches storage_schemas and its schema version.")
def tables_valid(m2fd: M2FDResource) -> dg.AssetCheckResult:
    from storage_schemas import open_dataset

    ds = open_dataset(m2fd.out)
    rows = {name: ds.table(name).num_rows for name in ds.tables}
    return dg.AssetCheckResult(passed=True, metadata={"rows": dg.MetadataValue.json(rows)})


@dg.asset_check(asset=clips, description="Share of inputs quarantined stays under 90%.")
def quarantine_ratio(m2fd: M2FDResource) -> dg.AssetCheckResult:
    from storage_schemas import open_dataset

    ds = open_dataset(m2fd.out)
    q = ds.query("select (select count(*) from quarantine where stage <> 'extract') q, "
                 "(select count(*) from sources) s").to_pylist()[0]
    ratio = q["q"] / max(1, q["q"] + q["s"] - ds.query("select count(*) n from sources where status = "
                                                       "'quarantined'").to_pylist()[0]["n"])
    return dg.AssetCheckResult(passed=ratio < 0.9, metadata={"ratio": round(ratio, 4)})


@dg.asset_check(asset=shards, description="Every shard's bytes match the sha256 and size in the index.")
def shard_integrity(m2fd: M2FDResource) -> dg.AssetCheckResult:
    from storage_schemas import open_dataset

    root = Path(m2fd.out)
    bad = []
    rows = open_dataset(root).table("shards").to_pylist()
    for r in rows:
        data = (root / r["shard"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != r["sha256"] or len(data) != r["bytes"]:
            bad.append(r["shard"])
    return dg.AssetCheckResult(passed=not bad, metadata={"shards": len(rows), "bad": dg.MetadataValue.json(bad)})


ASSETS = [clips, extraction, labels, shards]
CHECKS = [tables_valid, quarantine_ratio, shard_integrity]
m2fd_job = dg.define_asset_job("m2fd_job", selection=dg.AssetSelection.assets(*ASSETS))

defs = dg.Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=[m2fd_job],
                      resources={"m2fd": M2FDResource(out=dg.EnvVar("M2FD_OUT").get_value("out/dagster") or
                                                      "out/dagster")})
