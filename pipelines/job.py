"""The M2F-D job as users run it: `m2fd run` materializes the Dagster job (pipelines.dagster_defs)
in-process on a persistent Dagster instance, so every run shows in `m2fd ui`. The dataset lock is
taken before the run starts; stages run on the executor held by the `m2fd` resource."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable

from extractors.config import ExtractConfig, IngestConfig, ShardConfig
from extractors.pose import TEMPLATE_PATH
from storage_schemas import SCHEMA_VERSION, write_json
from storage_schemas.dataset import CARD, extract_lineage

from .ingest import IngestSummary
from .lineage import code_version
from .lock import DatasetLock

STAGES = ("ingest", "extract", "label", "shard")


class RunFailed(RuntimeError):
    pass


def dagster_home(out: str | os.PathLike) -> Path:
    """Where run history lives: $DAGSTER_HOME, else <dataset>/.dagster (what `m2fd ui` serves)."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path(out) / ".dagster")
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").is_file():
        # run telemetry off; runs started by the UI execute in-process, one at a time per dataset
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    return home


def sweep_temp(out: Path) -> int:
    """Remove temp files a killed writer left behind (atomic writes go through `.<name>.*.tmp`).
    Call only while holding the dataset lock."""
    n = 0
    for p in out.rglob(".*.tmp"):
        if ".dagster" not in p.parts and p.is_file():
            p.unlink()
            n += 1
    return n


def run_job(sources: list[str], out: str | os.PathLike, icfg: IngestConfig | None = None,
            ecfg: ExtractConfig | None = None, executor: str = "ray", scfg: ShardConfig | None = None, num_cpus: int | None = None,
            stages: tuple[str, ...] = STAGES, progress: Callable[[str, int, int], None] | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Ingest ``sources`` as one batch and bring the dataset at ``out`` up to date, through Dagster.

    Returns {"run_id", "batch", "ingest": IngestSummary, "extract", "label", "shard", "checks", ...}
    (stage entries are the assets' materialization metadata)."""
    icfg, ecfg, scfg = icfg or IngestConfig(), ecfg or ExtractConfig(), scfg or ShardConfig()
    icfg.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = json.dumps({"ingest": icfg.to_dict(), "extract": ecfg.to_dict(), "shard": scfg.to_dict()})
    with DatasetLock(out):
        import dagster as dg

        from .dagster_defs import BATCHES, PROGRESS, STAGE_ASSETS, M2FDResource, batch_key, build_defs

        sweep_temp(out)
        instance = dg.DagsterInstance.from_config(str(dagster_home(out)))
        key = batch_key(list(sources))
        if not instance.has_dynamic_partition(BATCHES.name, key):
            instance.add_dynamic_partitions(BATCHES.name, [key])
        res = M2FDResource(out=str(out.resolve()), executor=executor, num_cpus=num_cpus, config_doc=doc, take_lock=False)
        job = build_defs(res).resolve_job_def("m2fd_job")
        selection = [dg.AssetKey(a) for st in stages for a in STAGE_ASSETS[st]] + [dg.AssetKey("dataset_card")]
        run_id = str(uuid.uuid4())
        PROGRESS[run_id] = progress or (lambda *a: None)
        PROGRESS[run_id + ":log"] = log
        try:
            r = job.execute_in_process(
                run_config={"ops": {"ingest_batch": {"config": {"sources": list(sources)}}},
                            "loggers": {"console": {"config": {"log_level": "WARNING"}}}} if "ingest" in stages else
                {"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                instance=instance, partition_key=key, asset_selection=selection, run_id=run_id,
                tags={"m2fd/out": str(out.resolve()), "m2fd/stages": ",".join(stages)}, raise_on_error=False)
        finally:
            PROGRESS.pop(run_id, None)
            PROGRESS.pop(run_id + ":log", None)
    if not r.success:
        errs = [f"{e.step_key}: {e.event_specific_data.error.message.strip()}" for e in r.all_events
                if e.is_step_failure and e.event_specific_data is not None and e.event_specific_data.error]
        raise RunFailed(f"Dagster run {run_id} failed ({'; '.join(errs) or 'see the run log'}); "
                        f"`m2fd ui --out {out}` shows it")
    md = {m.asset_key.path[-1]: {k: v.value for k, v in m.materialization.metadata.items()}
          for m in r.get_asset_materialization_events()}
    result: dict = {"run_id": run_id, "batch": key, "assets": md,
                    "checks": {e.check_name: e.passed for e in r.get_asset_check_evaluations()}}
    if "clips" in md:
        fields = IngestSummary.__dataclass_fields__
        result["ingest"] = IngestSummary(**{k: md["clips"][k] for k in fields if k in md["clips"]})
    for stage, asset in (("extract", "extraction"), ("label", "labels"), ("shard", "shards")):
        if asset in md and "skipped" not in md[asset]:
            result[stage] = md[asset]
    return result


def finish_dataset(out: Path, icfg: IngestConfig, ecfg: ExtractConfig, scfg: ShardConfig) -> dict:
    """Write the dataset card (dataset.json + README.md): counts from the tables, lineage (code,
    config, checkpoints of the last extraction), dataset versions, stats."""
    import hashlib

    from storage_schemas import open_dataset

    from .ingest import asd_lineage, vad_lineage
    from .report import card_stats, write_card_md

    ext = extract_lineage(out)
    ds = open_dataset(out)
    one = lambda sql: ds.query(sql).to_pylist()[0]  # noqa: E731
    c = one("select (select count(*) from sources) sources, (select count(*) from clips) clips, "
            "(select coalesce(sum(duration_s), 0) from clips) secs, (select count(*) from quarantine where "
            "stage = 'discover' or reason = 'duplicate') extra")
    reasons = {r["reason"]: r["n"] for r in ds.query("select reason, count(*) n from quarantine group by 1 order by 1").to_pylist()}
    card = {
        "name": "M2F-D", "schema_version": SCHEMA_VERSION,
        "lineage": {
            "code": code_version(),
            "config": {"ingest": icfg.to_dict(), "extract": ecfg.to_dict(), "shard": scfg.to_dict()},
            "config_digest": {"ingest": icfg.digest(), "extract": ecfg.digest()},
            "checkpoints": {
                "mediapipe": "face_detection full-range + face_mesh refined (mediapipe 0.10.21 wheel)",
                "face_template": hashlib.sha256(TEMPLATE_PATH.read_bytes()).hexdigest(),
                "gnpfa": ext.get("gnpfa"),
                "active_speaker": asd_lineage(icfg),
                "vad": vad_lineage(icfg),
                "transcription": ext.get("engines"),
                "extraction_models": ext.get("models"),  # {name: {path, sha256}} of the per-clip models
            },
        },
        "counts": {"inputs": c["sources"] + c["extra"], "sources": c["sources"], "clips": c["clips"],
                   "clip_hours": round(c["secs"] / 3600, 6), "clips_extracted_ok": ext.get("clips_ok"),
                   "frames": ext.get("frames"), "quarantine": reasons},
    }
    if "shards" in ds.tables:
        card["versions"] = ds.query("select version, count(*) shards, sum(n_samples)::bigint samples, "
                                    "sum(bytes)::bigint bytes from shards group by 1 order by 1").to_pylist()
    card["stats"] = card_stats(out)
    write_json(out / CARD, card)
    write_card_md(out, card)
    return card
