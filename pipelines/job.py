"""The M2F-D job as users run it: `m2fd run` materializes the Dagster job (pipelines.dagster_defs)
in-process on a persistent Dagster instance, so every run shows in `m2fd ui`. The dataset lock is
taken before the run starts; stages run on the executor held by the `m2fd` resource."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable

import dagster as dg

from extractors.config import ExtractConfig, IngestConfig, RunConfig, ShardConfig

from .dagster_defs import BATCHES, M2FDResource, RunWatch, batch_key, build_defs, dagster_home
from .ingest import IngestSummary
from .lock import DatasetLock, sweep_temp
from .stages import STAGE_NAMES, STAGES


class RunFailed(RuntimeError):
    pass


def _root_cause(err) -> str:
    """The innermost error of a Dagster step failure (Dagster wraps the asset's own exception)."""
    while getattr(err, "cause", None) is not None:
        err = err.cause
    return err.message.strip()


def run_job(sources: list[str], out: str | os.PathLike, icfg: IngestConfig | None = None,
            ecfg: ExtractConfig | None = None, executor: str = "ray", scfg: ShardConfig | None = None, num_cpus: int | None = None,
            stages: tuple[str, ...] = STAGE_NAMES, progress: Callable[[str, int, int], None] | None = None,
            log: Callable[[str], None] = print, cfg: RunConfig | None = None) -> dict:
    """Ingest ``sources`` as one batch and bring the dataset at ``out`` up to date, through Dagster.
    The config is ``cfg`` (one RunConfig), else built from the sections given (defaults for the rest).

    Returns {"run_id", "batch", "ingest": IngestSummary, "extract", "label", "shard", "checks", ...}
    (stage entries are the assets' materialization metadata)."""
    cfg = cfg or RunConfig(icfg or IngestConfig(), ecfg or ExtractConfig(), scfg or ShardConfig())
    cfg.ingest.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with DatasetLock(out):
        sweep_temp(out)
        instance = dg.DagsterInstance.from_config(str(dagster_home(out)))
        key = batch_key(list(sources))
        if not instance.has_dynamic_partition(BATCHES.name, key):
            instance.add_dynamic_partitions(BATCHES.name, [key])
        res = M2FDResource(out=str(out.resolve()), executor=executor, num_cpus=num_cpus,
                           config_doc=json.dumps(cfg.to_dict()), take_lock=False)
        job = build_defs(res, RunWatch(progress, log)).resolve_job_def("m2fd_job")
        by_name = {s.name: s for s in STAGES}
        selection = [dg.AssetKey(a) for st in stages for a in by_name[st].assets] + [dg.AssetKey("dataset_card")]
        run_id = str(uuid.uuid4())
        quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
        r = job.execute_in_process(
            run_config={"ops": {"ingest_batch": {"config": {"sources": list(sources)}}}, **quiet} if "ingest" in stages
            else quiet,
            instance=instance, partition_key=key, asset_selection=selection, run_id=run_id,
            tags={"m2fd/out": str(out.resolve()), "m2fd/stages": ",".join(stages)}, raise_on_error=False)
    if not r.success:
        errs = [f"{e.step_key}: {_root_cause(e.event_specific_data.error)}" for e in r.all_events
                if e.is_step_failure and e.event_specific_data is not None and e.event_specific_data.error]
        raise RunFailed(f"Dagster run {run_id} failed ({'; '.join(errs) or 'see the run log'}); "
                        f"`m2fd ui --out {out}` shows it")
    md = {m.asset_key.path[-1]: {k: v.value for k, v in m.materialization.metadata.items()}
          for m in r.get_asset_materialization_events()}
    result: dict = {"run_id": run_id, "batch": key, "assets": md,
                    "checks": {e.check_name: e.passed for e in r.get_asset_check_evaluations()}}
    for s in STAGES:
        if s.result_key in md and "skipped" not in md[s.result_key]:
            result[s.name] = md[s.result_key]
    if "ingest" in result:
        fields = IngestSummary.__dataclass_fields__
        result["ingest"] = IngestSummary(**{k: result["ingest"][k] for k in fields if k in result["ingest"]})
    return result
