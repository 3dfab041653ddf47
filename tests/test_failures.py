"""The failures a new user hits, on real footage: one bad source, clip or labeler never fails a run;
writers refuse bad rows and a dropped clip's nulls read back; small faces are meshed or rejected at
ingest; URL and in-memory inputs are fetched once and read from their local copy by every stage;
a clip's rows do not depend on which other clips share its run."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import head_of

from extractors.config import ExtractConfig, IngestConfig
from pipelines.job import run_job
from storage_schemas import SchemaError, open_dataset, read_table, table_path, write_table

FAST_BOOTSTRAP = {"gnpfa_checkpoint": "bootstrap", "gnpfa_geometry_steps": 120, "gnpfa_image_steps": 40}


def _features_row(**kw) -> dict:
    row = dict(clip_id="c0", source_id="s", status="ok", drop_reason=None, n_frames=3, tracked_ratio=1.0,
               landmark_conf=1.0, jitter=None, lip_sync=None, speaking_score=None, av_sync=None, asd_sync=None,
               sync_score=None, recon_err=None, image_pose_err_deg=None,
               image_latent_rel_err=None, neutral=[0.0] * 1434, gnpfa_checkpoint="x", transcript_engine=None,
               face_embedding=None, voice_embedding=None)
    return {**row, **kw}


def test_a_dropped_clips_nulls_read_back_and_bad_rows_are_refused_before_the_file_is_replaced(tmp_path):
    p = tmp_path / "clip_features.parquet"
    rows = [_features_row(clip_id="a"), _features_row(clip_id="b", status="dropped", neutral=None),
            _features_row(clip_id="c")]
    write_table(p, "clip_features", rows)
    back = read_table(p, "clip_features")  # a null fixed-size list followed by valid rows (apache/arrow#35692)
    assert back.schema.field("neutral").type == pa.list_(pa.float32(), 1434)
    assert back.column("neutral").null_count == 1 and back.column("neutral")[2].as_py() == [0.0] * 1434
    before = p.read_bytes()
    for bad, msg in [(dict(neutral=[]), r"row 1 \(clip_id d\) field 'neutral': expected exactly 1434 values, got 0"),
                     (dict(status=None), r"row 1 \(clip_id d\) field 'status': null in a non-nullable"),
                     (dict(n_frames=2.5), r"field 'n_frames': float 2.5 in an integer field")]:
        with pytest.raises(SchemaError, match=msg):
            write_table(p, "clip_features", [rows[0], _features_row(clip_id="d", **bad)])
        assert p.read_bytes() == before  # nothing on disk was replaced
    with pytest.raises(SchemaError, match=r"table 'transcripts' row 0 \(clip_id a\) field 'words': item 0: missing struct fields"):
        write_table(tmp_path / "t.parquet", "transcripts", [
            {"clip_id": "a", "engine": "e", "language": None, "text": "", "words": [{"word": "x", "start_s": 0.0}],
             "model_sha256": None, "rejected_s": None}])


def _small_face_video(real_dir: Path, out: Path) -> Path:
    """s18's first 5 s (1280x720, face ~260 px) scaled to 0.3 and padded back to 1280x720: a face of ~80 px."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-t", "5", "-i", str(real_dir / "s18.mp4"), "-vf",
                    "scale=384:216,pad=1280:720:448:252", "-c:v", "libx264", "-preset", "veryfast", "-c:a", "copy",
                    str(out)], check=True)
    return out


@pytest.mark.slow
def test_small_faces_are_meshed_where_ingest_cuts_a_clip(real_dir, tmp_path):
    """Ingest and extraction agree: every clip ingest cuts has the speaker meshed in >= 90% of its frames
    (the mesh runs on an upscaled window around the speaker box), or ingest rejects the video."""
    from extractors.extract import extract_source
    from extractors.ingest import analyse
    from extractors.probe import sha256_file

    corpus = real_dir.parent / "corpus"
    # the first 5 s of each (of 9-10 s) are enough
    videos = [_small_face_video(real_dir, tmp_path / "s18_small.mp4"),
              *(head_of(corpus / f"{n}.mp4", 5, tmp_path / "src") for n in ("latentsync_demo1", "smirk_skarsgard"))]
    icfg, ecfg = IngestConfig(), ExtractConfig(whisper_checkpoint=None)
    seen = {}
    for v in videos:
        res = analyse(str(v), str(v), sha256_file(v), v.stat().st_size, icfg)
        if not res["clips"]:
            assert [q["reason"] for q in res["quarantine"]] == ["face_too_small"], (v.name, res["quarantine"])
            continue
        feats = extract_source(str(v), res["source"]["width"], res["source"]["height"], res["clips"], ecfg)
        for c, f in zip(sorted(res["clips"], key=lambda c: c["start_frame"]), feats):
            seen[(v.name, c["clip_id"])] = (round(c["face_size_px"]), float(f.tracked.mean()))
            assert f.tracked.mean() >= ecfg.min_tracked_ratio, (v.name, c["face_size_px"], f.tracked.mean())
    small = [px for (name, _), (px, _) in seen.items() if name == "s18_small.mp4"]
    assert small and max(small) < 100, seen  # the ~80 px face was cut into clips and meshed
    assert any(name == "latentsync_demo1.mp4" for name, _ in seen), seen  # the full-body portrait too


def _clip_ids(out: Path, needle: str) -> list[str]:
    return [r["clip_id"] for r in open_dataset(out).query(
        f"select clip_id from clips where uri like '%{needle}' order by clip_id").to_pylist()]


@pytest.mark.slow
def test_one_failing_source_and_labeler_leave_the_rest_whole_and_the_next_batch_adds_a_version(
        real_dir, ray_cluster, tmp_path, monkeypatch):
    """A multi-source run on the Ray executor (bootstrapping its GNPFA) with d14's extraction and s18's
    labelling failing: the run succeeds, d12 is sharded, the failures are quarantine rows naming stage and
    error. The next batch (no faults, one new video, the default config) analyses only the new video, keeps
    the dataset's bootstrap, and adds d14 and s18 as version 2 without touching the committed shard; the
    same batch again adds nothing."""
    out = tmp_path / "D"
    # the failures and versioning are under test here, not the GNPFA fit (a small bootstrap, on a bounded sample)
    # nor the sync gate (the default drops s18's clip, whose labeller fails here: bench/RESULTS.md)
    ecfg = ExtractConfig(**FAST_BOOTSTRAP, gnpfa_bootstrap_max_frames=100, min_sync_score=-2)
    # d14 is 17.9 s: its first 7 s (one talking clip) are enough to fail and then be added
    d14 = head_of(real_dir / "d14.mp4", 7, tmp_path / "src")
    inputs = [str(real_dir / "d12.mp4"), str(d14), str(real_dir / "s18.mp4")]
    monkeypatch.setenv("M2FD_INJECT_FAULT", "extract:d14.mp4,label:s18.mp4")  # the executor passes it to its tasks
    monkeypatch.setenv("M2FD_DECODE_LOG", str(tmp_path / "decodes-1.log"))  # so it does this (every decode, every worker)
    first = run_job(inputs, out, ecfg=ecfg, executor="ray", num_cpus=2, log=lambda m: None)
    ds = open_dataset(out)
    q = ds.query("select uri, stage, reason, message, clip_id from quarantine where reason = 'processing_error' "
                 "order by clip_id").to_pylist()
    d14, s18, d12 = _clip_ids(out, "d14.mp4"), _clip_ids(out, "s18.mp4"), _clip_ids(out, "d12.mp4")
    assert d14 and s18 and d12
    assert {(r["clip_id"], r["stage"]) for r in q} == {(c, "extract") for c in d14} | {(c, "label") for c in s18}
    assert all("InjectedFault" in r["message"] for r in q)
    feats = {r["clip_id"]: r for r in ds.table("clip_features").to_pylist()}
    assert all(feats[c]["status"] == "dropped" and feats[c]["drop_reason"] == "processing_error" for c in d14)
    assert all(feats[c]["status"] == "ok" for c in d12 + s18)
    sharded = {r["clip_id"] for r in ds.table("samples").to_pylist()}
    assert sharded == set(d12)  # s18 waits for its labels; d14 for its extraction
    assert first["shard"]["version"] == 1 and first["extract"]["gnpfa"]["kind"] == "bootstrap"
    meta = json.loads((out / first["extract"]["gnpfa"]["path"] / "config.json").read_text())
    n = meta["meta"]["trained_on_frames"] if "meta" in meta else meta["trained_on_frames"]
    assert 50 <= n <= 150 < first["extract"]["frames"], (n, first["extract"]["frames"])  # about max_frames
    v1 = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "shards").glob("*.tar")}

    # decode once: each source's audio is decoded by ingest only (kept in parts/audio/ for extraction,
    # labels and shards) and its video opened by ingest and extraction only (the keyframes come from there)
    assert _decodes(tmp_path / "decodes-1.log") == {(n, k): 1 for n in ("d12.mp4", "d14.mp4", "s18.mp4")
                                                    for k in ("audio", "video")} | {("d12.mp4", "video"): 2,
                                                                                    ("s18.mp4", "video"): 2}
    assert sorted(p.name for p in (out / "parts" / "audio").iterdir()) == sorted(
        f"{r['sha256']}.npy" for r in ds.table("sources").to_pylist())

    # the next batch: the same videos and d3 (silent: no clips), no faults, the default config (the shipped
    # GNPFA) but for the sync gate
    monkeypatch.delenv("M2FD_INJECT_FAULT")
    monkeypatch.setenv("M2FD_DECODE_LOG", str(tmp_path / "decodes-2.log"))
    second = run_job(inputs + [str(real_dir / "d3.mp4")], out, ecfg=ExtractConfig(min_sync_score=-2), executor="ray",
                     num_cpus=2, log=lambda m: None)
    s = second["ingest"]
    assert (s.analysed, s.reused, s.n_sources) == (1, 3, 4)  # only the new video is analysed
    ds = open_dataset(out)
    assert ds.query("select count(*) n from quarantine where reason = 'processing_error'").to_pylist()[0]["n"] == 0
    assert second["assets"]["tracks"]["computed"] == 1  # only d14 is extracted again (d3 has no clips)
    # the bootstrap is frozen once shards are committed, and the dataset says it is a bootstrap
    assert second["extract"]["gnpfa"] == first["extract"]["gnpfa"]
    sh = second["shard"]
    assert sh["version"] == 2 and sh["added_samples"] == len(d14 + s18) and sh["added_shards"] >= 1
    assert {r["clip_id"] for r in ds.table("samples").to_pylist()} == set(d12 + d14 + s18)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in v1} == v1  # committed shards untouched
    rows = ds.query("select version, count(*) n from shards group by 1 order by 1").to_pylist()
    assert [r["version"] for r in rows] == [1, 2]
    assert ds.query("select count(*) n from samples s join shards h using (shard) where h.version = 2").to_pylist()[
        0]["n"] == sh["added_samples"]
    assert [v["version"] for v in json.loads((out / "dataset.json").read_text())["versions"]] == [1, 2]
    assert all(second["checks"].values())
    # the rerun reads the kept audio; only d14 (extracted now) opens its video; the new d3's audio is decoded
    # once, and its video never (ingest finds it silent first)
    assert _decodes(tmp_path / "decodes-2.log") == {("d14.mp4", "video"): 1, ("d3.mp4", "audio"): 1}

    # the same batch again: nothing new, no new version
    again = run_job(inputs + [str(real_dir / "d3.mp4")], out, ecfg=ecfg, executor="ray", num_cpus=2,
                    log=lambda m: None)
    assert again["shard"]["version"] == 2 and again["shard"]["added_samples"] == 0


def _decodes(log: Path) -> dict[tuple[str, str], int]:
    """(file name, "audio" | "video") -> how many times it was decoded (M2FD_DECODE_LOG lines)."""
    from collections import Counter

    lines = log.read_text().splitlines() if log.is_file() else []
    return dict(Counter((Path(ln.split("\t", 1)[1]).name, ln.split("\t", 1)[0]) for ln in lines))


@pytest.mark.slow
def test_url_and_memory_inputs_are_fetched_once_and_reach_shards_on_ray(real_dir, ray_cluster, tmp_path):
    import fsspec

    log = tmp_path / "http.log"
    src_dir = tmp_path / "src"  # the first 5 s of each (one talking clip each): the fetching is under test here
    for name in ("d12.mp4", "s18.mp4"):
        head_of(real_dir / name, 5, src_dir)
    srv = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                            str(src_dir)], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    try:
        line = srv.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N ..."
        port = int(line.split(" port ")[1].split()[0])
        fs = fsspec.filesystem("memory")
        fs.pipe("/m2fd-test/s18.mp4", (src_dir / "s18.mp4").read_bytes())
        url, mem = f"http://127.0.0.1:{port}/d12.mp4", "memory://m2fd-test/s18.mp4"
        out = tmp_path / "D"
        # the sync gate off: s18 (its mouth leads its sound by ~0.25 s) falls under the default
        # (bench/RESULTS.md); what is under test is that both sources reach the shards
        res = run_job([url, mem], out, ecfg=ExtractConfig(min_sync_score=-2), executor="ray", num_cpus=2,
                      log=lambda m: None)
        time.sleep(0.2)
        gets = [ln for ln in log.read_text().splitlines() if '"GET /d12.mp4' in ln]
    finally:
        # SIGKILL: in the full suite the server once outlived SIGTERM by 10 s (a signal disposition it
        # inherited from the test process); the log was read above
        srv.kill()
        srv.wait(10)
    assert len(gets) == 1, gets  # fetched exactly once; every later stage read DATASET/cache/<sha256>.mp4
    ds = open_dataset(out)
    src = {r["uri"]: r for r in ds.table("sources").to_pylist()}
    assert url in src and len(src) == 2 and all(r["status"] == "ok" for r in src.values())
    assert [u for u in src if u != url][0].replace("memory:///", "memory://") == mem  # fsspec's spelling
    for u, r in src.items():
        assert (out / "cache" / f"{r['sha256']}.mp4").read_bytes() == (src_dir / Path(u).name).read_bytes()
    per_source = ds.query("select c.uri, count(*) n from samples s join clips c using (clip_id) group by 1").to_pylist()
    assert {r["uri"] for r in per_source} == set(src)
    assert res["shard"]["added_samples"] == sum(r["n"] for r in per_source) >= 2
    q = ds.table("quarantine").to_pylist()
    assert not [r for r in q if r["reason"] in ("processing_error", "fetch_error", "truncated")], q


def test_ray_workers_run_with_the_worker_environment(ray_cluster):
    """Every Ray worker of a run has WORKER_ENV: MKL's reproducible mode, two malloc arenas, and PyTorch's
    expandable CUDA segments (16 extraction workers sharing an 80 GB GPU ran out of memory without them)."""
    from pipelines.executors import WORKER_ENV

    @ray_cluster.remote(num_cpus=1)
    def env() -> dict:
        return {k: os.environ.get(k) for k in WORKER_ENV}

    assert {"MKL_CBWR", "MALLOC_ARENA_MAX", "PYTORCH_CUDA_ALLOC_CONF"} <= WORKER_ENV.keys()
    assert ray_cluster.get(env.remote()) == WORKER_ENV


@pytest.mark.slow
def test_a_clips_rows_do_not_depend_on_the_other_clips_of_its_run(real_result, real_dir, tmp_path):
    """d12 alone, in-process, with the checkpoint the 5-video Ray run trained: d12's frames table and
    clip_features row are byte for byte those of the 5-video run (other clips, other batches, other
    executor)."""
    ref, res = real_result
    ckpt = ref / res["extract"]["gnpfa"]["path"]
    out = tmp_path / "D"
    run_job([str(real_dir / "d12.mp4")], out, ecfg=ExtractConfig(gnpfa_checkpoint=str(ckpt)), executor="local",
            stages=("ingest", "extract"), log=lambda m: None)
    sid = open_dataset(out).table("sources").to_pylist()[0]["source_id"]
    assert table_path(out, "frames", sid).read_bytes() == table_path(ref, "frames", sid).read_bytes()

    def row(d):
        rows = [r for r in open_dataset(d).table("clip_features").to_pylist() if r["source_id"] == sid]
        return json.dumps(rows, sort_keys=True)

    assert row(out) == row(ref)
    crops = sorted((out / "arrays" / "crops").glob("*.npy"))
    assert crops and all(np.array_equal(np.load(p), np.load(ref / "arrays" / "crops" / p.name)) for p in crops)


def test_the_bootstrap_sample_is_per_clip():
    """The bootstrap GNPFA trains on a seeded sample of tracked frames drawn per clip (a clip's frames are
    the same whatever else the dataset holds). That a real run's sample is at most about
    gnpfa_bootstrap_max_frames is checked in the one-failing-source test, which bootstraps."""
    from extractors.extract import ClipFeatures
    from extractors.records import sample_tracked

    def clip(cid, n):
        z = np.zeros((n, 478, 3), np.float32)
        return ClipFeatures(cid, n, np.ones(n, bool), z, np.ones(n, np.float32), np.zeros((n, 3, 3)), np.zeros((n, 3)),
                            np.ones(n), z, z[0], np.zeros((n, 8, 8, 3), np.uint8), np.zeros((n, 80)), np.zeros(n),
                            blendshapes=np.zeros((n, 52), np.float32), face_transform=np.zeros((n, 4, 4), np.float32),
                            face_embedding=np.zeros(128, np.float32), voice_embedding=np.zeros(256, np.float32))

    a, b = clip("a", 1000), clip("b", 500)
    alone, both = sample_tracked([a], 0.3), sample_tracked([b, a], 0.3)
    assert np.array_equal(alone[0].tracked, both[1].tracked) and 230 < alone[0].tracked.sum() < 370
    assert a.tracked.all()  # the input is left as it was


def test_before_a_shard_stage_the_clips_view_has_no_speaker(real_dir, tmp_path):
    """Before a shard stage there are no speakers: the clips view's speaker_id is null, the table's own
    columns intact."""
    from storage_schemas.tables import CLIPS

    out = tmp_path / "D"
    run_job([str(real_dir / "d12.mp4")], out, executor="local", stages=("ingest",), log=lambda m: None)
    ds = open_dataset(out)
    got = ds.query("select count(*) n, count(speaker_id) s from clips").to_pylist()[0]
    assert got["n"] == ds.table("clips").num_rows > 0 and got["s"] == 0
    assert ds.query("select * from clips").column_names == CLIPS.names + ["speaker_id"]
    assert ds.table("clips").column_names == CLIPS.names
