"""The Dagster definitions materialize the stages in-process with their asset checks."""
import shutil

import dagster as dg

from pipelines.dagster_defs import ASSETS, CHECKS, M2FDResource, defs
from storage_schemas import open_dataset


def test_definitions_load():
    job = defs.resolve_job_def("m2fd_job")
    assert {n.name for n in job.nodes} >= {"clips", "extraction", "labels", "shards"}


def test_materialize_all_assets_with_checks(real_run, real_dir, tmp_path):
    src, _ = real_run
    out = tmp_path / "D"
    shutil.copytree(src, out)  # its part caches make the rerun quick; results must match
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    res = dg.materialize(ASSETS + CHECKS, resources={"m2fd": M2FDResource(out=str(out), executor="local")},
                         run_config={"ops": {"clips": {"config": {"sources": [str(real_dir)]}}}})
    assert res.success
    checks = {e.check_name: e.passed for e in res.get_asset_check_evaluations()}
    assert checks == {"tables_valid": True, "quarantine_ratio": True, "shard_integrity": True}
    mats = {m.asset_key.path[-1]: m.materialization.metadata for m in res.get_asset_materialization_events()}
    assert set(mats) == {"clips", "extraction", "labels", "shards"}
    assert mats["clips"]["clips"].value == open_dataset(out).table("clips").num_rows
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == before
