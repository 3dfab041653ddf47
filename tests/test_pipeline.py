"""End to end through the Ray runner and the m2fd CLI, on the shared real videos."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.job import run_job
from pipelines.lock import DatasetLock, DatasetLocked
from storage_schemas import open_dataset

REPO = Path(__file__).resolve().parents[1]
M2FD = [sys.executable, "-m", "pipelines.cli"]


def test_real_videos_yield_clips_and_explained_quarantine(real_run, real_dir):
    out, s = real_run
    ds = open_dataset(out)
    assert s.n_inputs == 5 and s.n_sources == 5
    per_src = {Path(r["uri"]).name: r for r in ds.table("sources").to_pylist()}
    clips = ds.table("clips").to_pylist()
    by_name = {}
    for c in clips:
        by_name.setdefault(Path(c["uri"]).name, []).append(c)
    # the videos whose audio carries speech give clips
    for name in ("d12.mp4", "d14.mp4", "s18.mp4"):
        assert by_name.get(name), f"{name} gave no clip"
        assert per_src[name]["status"] == "ok" and per_src[name]["n_clips"] == len(by_name[name])
    # the 720p video: the speaker is kept for most of the video
    s18 = sum(c["duration_s"] for c in by_name["s18.mp4"])
    assert s18 >= 0.8 * per_src["s18.mp4"]["duration_s"]
    assert per_src["s18.mp4"]["width"] == 1280
    q = {Path(r["uri"]).name: r["reason"] for r in ds.table("quarantine").to_pylist()}
    # s18's clip is cut, then dropped by the default sync gate (its mouth leads its sound by ~0.25 s)
    assert q == {"yongen.mp4": "no_audio_stream", "d3.mp4": "silent", "s18.mp4": "poor_sync"}
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"]["clips"] == len(clips)
    assert card["lineage"]["config_digest"] and card["lineage"]["code"]["package"]


def _table_bytes(out):
    files = sorted((out / "tables").rglob("*.parquet")) + sorted((out / "shards").glob("*"))
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_rerun_reuses_parts_and_is_byte_identical(real_run, real_dir, tmp_path):
    out, _ = real_run
    before = _table_bytes(out)
    # 10 single-file tables (face_tracks, speakers included) + 3 frames parts (one per source with clips) + shards, wids indexes
    assert len([k for k in before if k.startswith("tables/")]) == 10 + 3
    assert any(k.endswith(".tar") for k in before)
    s = run_job([str(real_dir)], out, executor="local", log=lambda m: None)["ingest"]
    assert s.reused == 5 and s.analysed == 0
    assert _table_bytes(out) == before
    # a torn part file is recomputed, not trusted, and the result is the same
    part = sorted((out / "parts" / "ingest").glob("*.json"))[0]
    part.write_text("{ torn")
    s = run_job([str(real_dir)], out, executor="local", stages=("ingest",), log=lambda m: None)["ingest"]
    assert s.analysed == 1
    assert {k: v for k, v in _table_bytes(out).items() if "frames" not in k and "samples" not in k} == \
        {k: v for k, v in before.items() if "frames" not in k and "samples" not in k}


def test_a_stage_task_hands_the_memory_it_freed_back_to_the_os():
    """Ray workers live across tasks: memory a task freed below a block that outlives it stays resident
    under glibc until the heap is trimmed, which stage_task does when the task ends."""
    from pipelines.executors import _malloc_trim, stage_task

    if _malloc_trim() is None:
        pytest.skip("not glibc")

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def work(n: int) -> bytearray:
        blocks = [bytearray(64 * 1024) for _ in range(n)]  # 64 KB each: from the heap, not mapped alone
        return blocks[-1]  # the last block outlives the task, so the heap's top cannot shrink on its own

    left = {}
    for name, fn in (("stage_task", stage_task(work)), ("plain", work)):  # the plain run refaults what was trimmed
        before = rss_mb()
        kept = fn(3200)  # 200 MB touched, then freed but the last block
        left[name] = rss_mb() - before
        del kept
    assert left["plain"] > 100 and left["stage_task"] < 30, left


def test_second_writer_gets_a_clear_lock_error(tmp_path, real_dir):
    with DatasetLock(tmp_path):
        with pytest.raises(DatasetLocked, match="being written by another run"):
            run_job([str(real_dir / "d12.mp4")], tmp_path, executor="local")


def test_cli_run_mixed_folder_manifest_and_query(tmp_path, cases, real_dir):
    src = tmp_path / "landing"
    src.mkdir()
    for k in ("talk", "odd_name", "duplicate", "empty", "random", "two_faces", "no_audio"):
        shutil.copy(cases[k], src / cases[k].name)
    manifest = tmp_path / "more.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": p}) for p in [str(real_dir / "d12.mp4"), "missing.mp4"]))
    out = tmp_path / "D"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # two_faces is d14 and d3 side by side under a TTS voice-over: with ASD-sync (the default) d14's motion
    # follows that speech well enough (sync 0.39 against 0.11) to be taken as the speaker, a known limit
    # (bench/RESULTS.md); this run checks the path where no face can be told apart, so ASD-sync is off
    r = subprocess.run(M2FD + ["run", str(src), str(manifest), "--out", str(out), "--num-cpus", "2",
                               "--stages", "ingest", "--set", 'ingest.asd_sync_model=""'],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done:" in r.stderr and "ingest:" in r.stderr
    q = subprocess.run(M2FD + ["query", str(out), "select reason, count(*) as n from quarantine group by 1 order by 1",
                               "--format", "json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert q.returncode == 0, q.stderr
    got = {row["reason"]: row["n"] for row in json.loads(q.stdout)}
    assert got == {"duplicate": 1, "empty_file": 1, "multiple_faces": 1, "no_audio_stream": 1, "not_a_file": 1,
                   "unreadable": 1}
    c = subprocess.run(M2FD + ["query", str(out), "select count(distinct source_id) as n from clips", "-f", "csv"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert c.stdout.split() == ['"n"', "3"]  # talk, the odd-named file and d12
    bad = subprocess.run(M2FD + ["query", str(out), "select * from nosuch"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "nosuch" in bad.stderr


def test_cli_help_on_every_command():
    for cmd in ([], ["run"], ["query"], ["config"]):
        r = subprocess.run(M2FD + cmd + ["--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0 and "Usage" in r.stdout


def test_config_overrides_are_checked(tmp_path):
    r = subprocess.run(M2FD + ["config", "--set", "min_clip_s=3", "--set", "extract.crop_size=96"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "min_clip_s: 3.0" in r.stdout and "crop_size: 96" in r.stdout
    r = subprocess.run(M2FD + ["config", "--set", "no_such_key=1"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "unknown ingest config keys" in r.stderr
