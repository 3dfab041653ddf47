"""Dagster is the control plane: `m2fd run` is a Dagster run (checks included), the UI shows it,
the landing sensor turns new videos into a batch partition and a run request."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import dagster as dg

from pipelines.dagster_defs import ASSETS, BATCHES, defs, landing_sensor
from storage_schemas import open_dataset

REPO = Path(__file__).resolve().parents[1]
M2FD = [str(REPO / ".venv" / "bin" / "m2fd")] if (REPO / ".venv" / "bin" / "m2fd").exists() else ["m2fd"]


def test_definitions_load():
    job = defs.resolve_job_def("m2fd_job")
    assert {n.name for n in job.nodes} >= {a.key.path[-1] for a in ASSETS}
    assert defs.resolve_sensor_def("landing_sensor") and defs.resolve_schedule_def("nightly_verify")
    assert job.partitions_def == BATCHES


def test_the_stage_list_is_what_the_job_cli_and_scheduler_use():
    """Every stage's assets are the Dagster job's (in dependency order), its tables and arrays are
    storage_schemas names, and its task functions exist in its wiring module and ask Ray for what the
    stage declares."""
    import importlib
    import inspect

    from pipelines.dagster_defs import STAGE_ASSETS
    from pipelines.stages import STAGES, task_options
    from storage_schemas import TABLES
    from storage_schemas.arrays import ARRAYS

    job = defs.resolve_job_def("m2fd_job")
    names = [a.key.path[-1] for a in ASSETS]
    assert [a for s in STAGES for a in s.assets] + ["dataset_card"] == names  # ASSETS lists them in stage order
    assert {n.name for n in job.nodes} >= set(names) and STAGE_ASSETS == {s.name: s.assets for s in STAGES}
    by_key = {a.key.path[-1]: a for a in ASSETS}
    for s in STAGES:
        assert set(s.reads) | set(s.writes) <= set(TABLES) | set(ARRAYS), s.name
        assert s.result_key in s.assets
        for earlier, later in zip(s.assets, s.assets[1:]):
            assert dg.AssetKey(earlier) in by_key[later].dependency_keys, (earlier, later)
        mod = importlib.import_module(f"pipelines.{dict(ingest='ingest', extract='extract', label='labels', shard='shards')[s.name]}")
        for task, res in s.tasks.items():
            fn = getattr(mod, task)
            assert f"task_options({task}" in inspect.getsource(mod), f"{task} is run without its stage's resources"
            # a stage_task (its worker trims the heap after it) under its own name, found at its module and name
            # (what Ray's cloudpickle needs to ship it by reference)
            home = getattr(importlib.import_module(fn.__module__), fn.__qualname__)
            assert fn.__wrapped__.__name__ == task and home is fn
            opts = task_options(fn)
            assert opts["num_cpus"] == res.cpus and opts.get("memory", 0) == int(res.memory_gb * 2**30)
            assert "num_gpus" not in opts and task_options(fn, use_gpu=True).get("num_gpus", 0) == res.gpus


def test_one_run_config_layers_file_then_document_then_overrides_key_by_key(tmp_path):
    import pytest

    from extractors.config import RunConfig
    from pipelines.dagster_defs import M2FDResource

    f = tmp_path / "c.yaml"
    f.write_text("ingest: {min_clip_s: 3}\nextract: {asr_threads: 2, min_tracked_ratio: 0.8}\n")
    res = M2FDResource(out=str(tmp_path / "ds"), config_yaml=str(f), config_doc='{"extract": {"asr_threads": 4}}')
    cfg = res.configs()
    # the document overrides one key of the file's extract section; the file's other keys stay
    assert (cfg.ingest.min_clip_s, cfg.extract.asr_threads, cfg.extract.min_tracked_ratio) == (3, 4, 0.8)
    assert res.configs() is cfg  # loaded once per resource (per run)
    c = RunConfig.load({"shard": {"max_shard_bytes": 1000}}, overrides=["min_clip_s=2.5", "extract.asr_threads=3"])
    assert (c.shard.max_shard_bytes, c.ingest.min_clip_s, c.extract.asr_threads) == (1000, 2.5, 3)
    assert RunConfig.load(c.to_dict()) == c
    for docs, ov, msg in (([{"extrct": {}}], [], "sections must be among"), ([None], ["asr_threads"], "KEY=VALUE"),
                          ([None], ["label.x=1"], "unknown config section"),
                          ([{"extract": {"no_such": 1}}], [], "unknown extract config keys")):
        with pytest.raises(ValueError, match=msg):
            RunConfig.load(*docs, overrides=ov)


def test_run_is_a_dagster_run_with_every_stage_and_check(real_result):
    out, res = real_result
    assert set(res["assets"]) == {a.key.path[-1] for a in ASSETS}
    assert res["checks"] == {"tables_valid": True, "quarantine_ratio": True, "quality_thresholds": True,
                             "shard_integrity": True}
    inst = dg.DagsterInstance.from_config(str(out / ".dagster"))
    run = inst.get_run_by_id(res["run_id"])
    assert run.status == dg.DagsterRunStatus.SUCCESS and run.tags["dagster/partition"] == res["batch"]
    ds = open_dataset(out)
    assert res["assets"]["clips"]["n_clips"] == ds.table("clips").num_rows
    assert res["assets"]["shards"]["version"] == 1
    tracks = res["assets"]["tracks"]  # task seconds by step, and the count of transcribed clips beside them
    assert tracks["cpu_s"] and all(k.endswith("_s") for k in tracks["cpu_s"])
    assert tracks["transcribed_clips"] == ds.table("transcripts").num_rows
    assert json.loads((out / "batches" / f"{res['batch']}.json").read_text())["sources"]


def test_landing_sensor_makes_a_batch_of_new_videos(tmp_path, monkeypatch, real_dir):
    land = tmp_path / "landing"
    land.mkdir()
    shutil.copy(real_dir / "d12.mp4", land / "a.mp4")
    (land / "notes.txt").write_text("not a video")
    monkeypatch.setenv("M2FD_LANDING", str(land))
    r = landing_sensor(dg.build_sensor_context())
    assert len(r.run_requests) == 1
    rr = r.run_requests[0]
    srcs = rr.run_config["ops"]["ingest_batch"]["config"]["sources"]
    assert [Path(s).name for s in srcs] == ["a.mp4"]
    assert rr.partition_key.startswith("landing-") and r.dynamic_partitions_requests[0].partition_keys == [rr.partition_key]
    # nothing new: skip; one more file: a batch of just that file
    again = landing_sensor(dg.build_sensor_context(cursor=r.cursor))
    assert not again.run_requests and "no new videos" in str(again.skip_reason)
    shutil.copy(real_dir / "d14.mp4", land / "b.mp4")
    third = landing_sensor(dg.build_sensor_context(cursor=r.cursor))
    assert [Path(s).name for s in third.run_requests[0].run_config["ops"]["ingest_batch"]["config"]["sources"]] == ["b.mp4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())["data"]


def test_ui_shows_the_run_its_checks_and_the_asset_graph(real_result, tmp_path):
    out, res = real_result
    port = _free_port()
    log = open(tmp_path / "ui.log", "wb")
    p = subprocess.Popen(M2FD + ["ui", "--out", str(out), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                         cwd=REPO, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                break
            except OSError:
                assert p.poll() is None and time.time() < deadline, (tmp_path / "ui.log").read_text()[-3000:]
                time.sleep(1)
        runs = _gql(port, "{ runsOrError { ... on Runs { results { runId status jobName } } } }")
        assert {"runId": res["run_id"], "status": "SUCCESS", "jobName": "m2fd_job"} in runs["runsOrError"]["results"]
        ev = _gql(port, '{ logsForRun(runId: "%s") { ... on EventConnection { events { __typename '
                        '... on AssetCheckEvaluationEvent { evaluation { checkName success } } } } } }' % res["run_id"])
        checks = {e["evaluation"]["checkName"]: e["evaluation"]["success"]
                  for e in ev["logsForRun"]["events"] if e["__typename"] == "AssetCheckEvaluationEvent"}
        assert checks == res["checks"] and all(checks.values())
        url = f"http://127.0.0.1:{port}/locations/pipelines.dagster_defs/asset-groups/m2fd"
        chrome = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                  f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1000", "--virtual-time-budget=20000"]
        shot = tmp_path / "graph.png"
        subprocess.run(chrome + [f"--screenshot={shot}", url], capture_output=True, timeout=180)
        dom = subprocess.run(chrome + ["--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        for a in ASSETS:  # every asset is a node of the rendered graph
            assert f">{a.key.path[-1]}<" in dom, a.key.path[-1]
        import numpy as np
        from PIL import Image

        img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
        assert img.shape == (1000, 1600) and img.std() > 10  # a rendered page, not a blank one
        os.makedirs(REPO / "out", exist_ok=True)
        shutil.copy(shot, REPO / "out" / "dagster_asset_graph.png")
    finally:
        # `m2fd ui` restores default signal handling before exec: SIGTERM stops dagster dev
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError("dagster dev ignored SIGTERM")
        log.close()
