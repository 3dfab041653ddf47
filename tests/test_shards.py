"""Shards, index, subsets and the PyTorch loader on the real-video dataset."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors.shards import ShardError, decode_sample, iter_shard, json_bytes
from models.data import M2FDWindows
from storage_schemas import open_dataset

REPO = Path(__file__).resolve().parents[1]
M2FD = [sys.executable, "-m", "pipelines.cli"]


def test_shards_hold_every_kept_clip_with_all_fields(real_run):
    out, _ = real_run
    ds = open_dataset(out)
    ok = set(ds.query("select clip_id from clip_features where status='ok'").column(0).to_pylist())
    shards = ds.table("shards").to_pylist()
    assert sum(s["n_samples"] for s in shards) == len(ok)
    seen = set()
    import hashlib

    for s in shards:
        p = out / s["shard"]
        assert hashlib.sha256(p.read_bytes()).hexdigest() == s["sha256"] and p.stat().st_size == s["bytes"]
        for key, members in iter_shard(p):
            d = decode_sample(members)
            n = d["meta"]["n_frames"]
            assert d["latents"].shape == (n, 32) and d["pose"].shape == (n, 6) and d["audio_feat"].shape == (n, 80)
            assert np.isfinite(d["latents"]).all() and d["mask"].dtype == bool
            assert d["meta"]["split"] == s["split"] and set(d["labels"]) >= {"emotion", "intensity", "caption"}
            assert members["keyframe.jpg"][:2] == b"\xff\xd8" and members["audio.flac"][:4] == b"fLaC"
            seen.add(key)
    assert seen == ok
    # no speaker crosses splits
    sp = ds.query("select c.source_id, count(distinct s.split) k from samples s join clips c using (clip_id) "
                  "group by 1").to_pylist()
    assert all(r["k"] == 1 for r in sp)
    wids = json.loads((out / "shards" / "train.wids.json").read_text())
    assert wids["__kind__"] == "wids-shard-index-v1"
    assert sum(x["nsamples"] for x in wids["shardlist"]) == sum(s["n_samples"] for s in shards if s["split"] == "train")


def test_reshard_is_byte_identical_and_committed_shards_are_never_rewritten(real_run, tmp_path):
    from pipelines.executors import LocalExecutor
    from pipelines.shards import ShardCommitted, run_shards
    from extractors.config import ShardConfig

    src, _ = real_run
    d = tmp_path / "D"
    shutil.copytree(src, d)
    before = {p.name: p.read_bytes() for p in (d / "shards").glob("*.tar")}
    # a rerun with nothing new adds no version and leaves every byte alone
    r = run_shards(d, ShardConfig(), LocalExecutor())
    assert r["added_samples"] == 0 and r["version"] == 1
    assert {p.name: p.read_bytes() for p in (d / "shards").glob("*.tar")} == before
    assert not (src / "parts" / "shard").exists()  # the run's spooled samples are gone once shards are written
    # rebuilding from nothing gives the same bytes, whatever a killed run left in the spool
    shutil.rmtree(d / "shards")
    (d / "tables" / "shards.parquet").unlink()
    (d / "tables" / "samples.parquet").unlink()
    sid = open_dataset(d).table("sources").column("source_id")[0].as_py()
    (d / "parts" / "shard").mkdir(parents=True)
    (d / "parts" / "shard" / f"{sid}.tar").write_bytes(b"torn spool of a killed run")
    run_shards(d, ShardConfig(), LocalExecutor())
    assert {p.name: p.read_bytes() for p in (d / "shards").glob("*.tar")} == before
    assert not (d / "parts" / "shard").exists()
    # a change to committed data must not rewrite the shard
    from storage_schemas import table_path, write_table

    rows = open_dataset(d).table("label_rows").to_pylist()
    for r in rows:
        if r["field"] == "caption":
            r["value"] = json.dumps("A different caption.")
    write_table(table_path(d, "label_rows"), "label_rows", rows)
    with pytest.raises(ShardCommitted, match="committed shards are never"):
        run_shards(d, ShardConfig(), LocalExecutor())
    assert {p.name: p.read_bytes() for p in (d / "shards").glob("*.tar")} == before


def test_subset_and_loader_yield_exactly_the_selected_clips(real_run, tmp_path):
    out, _ = real_run
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(M2FD + ["subset", str(out), "--where", "l.emotion <> 'happy' and c.duration_s > 3",
                               "--out", str(tmp_path / "sub")], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    want = set(open_dataset(out).query("select clip_id from clips c join labels l using (clip_id) "
                                       "where l.emotion <> 'happy' and c.duration_s > 3").column(0).to_pylist())
    assert want  # the predicate selects something on the shared videos
    ds = M2FDWindows(subset=tmp_path / "sub" / "subset.json", window=90)
    got = [b["clip_id"] for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
    assert sorted(got) == sorted(want)
    for b in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0):
        assert b["latents"].shape[1:] == (90, 32) and b["audio_feat"].shape[1:] == (90, 80)



def test_loader_workers_split_at_whole_batches(real_run):
    """Each DataLoader worker batches its own stream: blocks cut at whole batches lose no full batch
    per epoch (cut anywhere, every worker's partial batch is dropped with drop_last)."""
    out, _ = real_run
    n = len(open_dataset(out).query("select clip_id from samples where split='train'"))
    assert n >= 3  # 3 workers: without the hint each has fewer clips than a batch
    seen = {}
    for hint in (None, 2):
        ds = M2FDWindows(out, split="train", window=60, batch_size=hint)
        seen[hint] = [c for b in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=3, drop_last=True)
                      for c in b["clip_id"]]
    assert len(seen[2]) == n // 2 * 2 and len(set(seen[2])) == len(seen[2])
    assert len(seen[None]) < len(seen[2])  # without the hint, workers' partial batches are dropped


def _ddp_worker(rank, world, root, port, outdir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ds = M2FDWindows(root, split="train", window=60)
    res = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        dl = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, drop_last=True)
        res[epoch] = [b["clip_id"][0] for b in dl]
    # one loader whose workers persist across epochs (as the trainer uses it) follows set_epoch too
    dl = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, drop_last=True, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        res[f"persistent{epoch}"] = [b["clip_id"][0] for b in dl]
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def test_loader_under_two_process_ddp(real_run, tmp_path):
    import socket

    import torch.multiprocessing as mp

    out, _ = real_run
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(_ddp_worker, args=(2, str(out), port, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    n_train = len(open_dataset(out).query("select clip_id from samples where split='train'"))
    for e in ("0", "1"):
        assert len(r0[e]) == len(r1[e]) == n_train // 2  # same batch count on every rank
        assert not set(r0[e]) & set(r1[e])  # no clip twice per epoch
    assert r0["0"] + r1["0"] != r0["1"] + r1["1"] or n_train < 3  # reshuffled between epochs
    for r in (r0, r1):
        assert (r["persistent0"], r["persistent1"]) == (r["0"], r["1"])


def _rewrite(src: Path, dst: Path, edit):
    with tarfile.open(src) as t, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as o:
        for ti in t.getmembers():
            data = t.extractfile(ti).read()
            data = edit(ti.name, data)
            if data is None:
                continue
            ti.size = len(data)
            o.addfile(ti, io.BytesIO(data))


def test_malformed_shards_raise_clear_errors(real_run, tmp_path):
    out, _ = real_run
    shard = sorted((out / "shards").glob("*.tar"))[0]
    raw = shard.read_bytes()
    trunc = tmp_path / "trunc.tar"
    trunc.write_bytes(raw[: len(raw) // 2 + 100])
    with pytest.raises(ShardError, match=r"trunc\.tar.*(truncated|corrupt)"):
        list(iter_shard(trunc))
    missing = tmp_path / "missing.tar"
    _rewrite(shard, missing, lambda n, d: None if n.endswith(".latents.npy") else d)
    with pytest.raises(ShardError, match=r"missing\.tar: sample '.*': missing member\(s\) \['latents.npy'\]"):
        list(iter_shard(missing))

    def bump(name, data):
        if name.endswith(".meta.json"):
            m = json.loads(data)
            m["sample_version"] = "99"
            return json_bytes(m)
        return data

    wrong = tmp_path / "wrong.tar"
    _rewrite(shard, wrong, bump)
    with pytest.raises(ShardError, match=r"wrong\.tar: member .*\.meta\.json: sample version '99'"):
        list(iter_shard(wrong))


def test_wids_reads_the_shards(real_run):
    import wids

    out, _ = real_run
    w = wids.ShardListDataset(str(out / "shards" / "train.wids.json"))
    keys = set(open_dataset(out).query("select clip_id from samples where split='train'").column(0).to_pylist())
    assert len(w) == len(keys)
    got = set()
    for i in range(len(w)):
        s = w[i]
        got.add(s["__key__"])
        assert s[".latents.npy"].shape[1] == 32 and s[".meta.json"]["clip_id"] == s["__key__"]
    assert got == keys


def _chromium(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/setup.sh"
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", *args, url],
                          capture_output=True, text=True, timeout=120, check=True)


def test_card_and_report(real_run, tmp_path):
    import re

    out, _ = real_run
    card = json.loads((out / "dataset.json").read_text())
    assert card["stats"]["splits"] and sum(v["clips"] for v in card["stats"]["splits"].values()) == \
        card["counts"]["clips_extracted_ok"] < card["counts"]["clips"]  # s18's clip dropped by the sync gate
    assert card["stats"]["emotion"] and card["lineage"]["checkpoints"]["gnpfa"]["sha256"]
    md = (out / "README.md").read_text()
    assert "## Emotion" in md and "schema version" in md
    # a preview for one clip, then the report again: its card links the video
    from pipelines.preview import render_preview
    from pipelines.report import write_report

    ds = open_dataset(out)
    # every clip, the one the sync gate dropped (s18's, no labels) too
    clips = ds.query("select c.clip_id, coalesce(l.emotion, 'none') emotion from clips c left join labels l "
                     "using (clip_id) order by 1").to_pylist()
    first = clips[0]["clip_id"]
    render_preview(out, first, out / "previews" / f"{first}.mp4", 128)
    page = write_report(out)
    html = page.read_text()
    assert "http" not in html.split("<body>")[1]  # self-contained
    import xml.etree.ElementTree as ET

    plots = {ET.fromstring(m).get("aria-label"): ET.fromstring(m) for m in re.findall(r'<svg class="plot".*?</svg>', html)}
    assert len(plots) >= 8 and {"Emotions", "Head yaw", "Clip durations"} <= set(plots), sorted(plots)
    emotions = ds.query("select count(distinct emotion) from labels").column(0)[0].as_py()
    assert len(plots["Emotions"].findall("rect")) == emotions  # one bar per emotion
    n_bars = sum(1 for r in plots["Clip durations"].findall("rect"))
    assert 1 <= n_bars <= 20  # the durations' histogram: 20 bins, empty ones not drawn
    n_quarantine = ds.query("select count(*) from quarantine").column(0)[0].as_py()
    assert html.count("<tr><td>") == n_quarantine  # every quarantine row, with its message
    # cards render after the script runs: one per clip, each sharded one with its keyframe from the shard
    dom = _chromium(tmp_path, page.as_uri(), "--dump-dom").stdout
    cards = re.findall(r'<div class="card(?: dropped)?" data-[^>]*>', dom)
    assert len(cards) == len(clips) and sum('class="card dropped"' in c and 'data-reason="poor_sync"' in c
                                            for c in cards) == 1
    n_sharded = ds.query("select count(*) from samples").column(0)[0].as_py()
    assert dom.count('src="data:image/jpeg;base64,') == n_sharded == len(clips) - 1  # a keyframe from each shard
    assert f'href="previews/{first}.mp4"' in dom and re.search(r'id="shown">%d<' % len(clips), dom)
    # a filter (preset in the URL) hides the cards of other emotions
    emo = clips[-1]["emotion"]
    want = sum(c["emotion"] == emo for c in clips)
    dom_f = _chromium(tmp_path, page.as_uri() + f"#emotion={emo}", "--dump-dom").stdout
    hidden = [c for c in re.findall(r'<div class="card(?: dropped)?" data-[^>]*>', dom_f) if "display: none" in c]
    assert len(hidden) == len(clips) - want and re.search(r'id="shown">%d<' % want, dom_f)
    # and on screen: the cards' keyframes and the plots' bar colours
    shot = tmp_path / "report.png"
    _chromium(tmp_path, page.as_uri(), "--window-size=1280,5000", "--hide-scrollbars", f"--screenshot={shot}")
    import matplotlib.image as mpimg

    img = (mpimg.imread(shot)[:, :, :3] * 255).astype(int)

    def share(rgb):
        return float((np.abs(img - np.array(rgb)).sum(-1) < 30).mean())

    assert share((0xFA, 0xFA, 0xFA)) > 0.01  # card backgrounds
    # the plots' bars are on screen (at least a bar's worth of pixels of each colour): emotions (blue),
    # style tags (green), head pose (purple)
    px = img.shape[0] * img.shape[1]
    assert all(share(c) * px > 2000 for c in ((0x3B, 0x7D, 0xD8), (0x5A, 0xA5, 0x5A), (0x8A, 0x5A, 0xD8))), \
        [share(c) * px for c in ((0x3B, 0x7D, 0xD8), (0x5A, 0xA5, 0x5A), (0x8A, 0x5A, 0xD8))]


def test_ray_data_reader(real_run):
    import ray

    from pipelines.ray_data import read_m2fd

    out, _ = real_run
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        rows = read_m2fd(out, split="train").take_all()
    finally:
        ray.shutdown()
    want = open_dataset(out).query("select clip_id, n_frames from samples where split='train'").to_pylist()
    assert sorted(r["clip_id"] for r in rows) == sorted(w["clip_id"] for w in want)
    nf = {w["clip_id"]: w["n_frames"] for w in want}
    for r in rows:
        assert r["latents"].shape == (nf[r["clip_id"]], 32) and r["audio_feat"].shape == (nf[r["clip_id"]], 80)


def test_preview_renders_overlay_and_mesh_with_audio(real_run, tmp_path):
    out, _ = real_run
    c = open_dataset(out).query("select clip_id, n_frames from clips order by duration_s limit 1").to_pylist()[0]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    mp4 = tmp_path / "clip.mp4"
    r = subprocess.run(M2FD + ["preview", str(out), c["clip_id"], "--out", str(mp4), "--size", "256"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                            "stream=codec_type,width,height,nb_read_frames", "-of", "json", str(mp4)],
                           capture_output=True, text=True, check=True)
    st = {s["codec_type"]: s for s in json.loads(probe.stdout)["streams"]}
    assert set(st) == {"video", "audio"}
    assert int(st["video"]["nb_read_frames"]) == c["n_frames"]
    assert st["video"]["width"] > st["video"]["height"]  # frame and mesh side by side
    bad = subprocess.run(M2FD + ["preview", str(out), "nope", "--out", str(tmp_path / "x.mp4")],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 2 and "not in" in bad.stderr


def test_hugging_face_datasets_reads_the_shards(real_run, tmp_path):
    import datasets

    out, _ = real_run
    ds = datasets.load_dataset("webdataset", data_files={"train": str(out / "shards" / "train-*.tar")},
                               split="train", cache_dir=str(tmp_path / "hf"))
    ds = ds.cast_column("audio.flac", datasets.Audio(decode=False))
    want = {r["clip_id"]: r["n_frames"] for r in
            open_dataset(out).query("select clip_id, n_frames from samples where split='train'").to_pylist()}
    assert ds.num_rows == len(want)
    for x in ds:
        assert x["meta.json"]["clip_id"] == x["__key__"] and x["__key__"] in want
        assert np.asarray(x["latents.npy"]).shape == (want[x["__key__"]], 32)
        assert x["audio.flac"]["bytes"][:4] == b"fLaC"


def test_preview_frames_the_whole_mesh_steadily_on_real_clips(real_run):
    from extractors.render import mesh_view, project
    from pipelines.preview import clip_meshes

    out, _ = real_run
    ids = open_dataset(out).query("select clip_id from clip_features where status = 'ok' order by clip_id").column(0).to_pylist()
    assert ids
    size = 384
    for cid in ids:
        _, _, verts = clip_meshes(out, cid)
        ok = ~np.isnan(verts[:, 0, 0])
        view = mesh_view(verts)  # what the preview uses: one framing per clip
        for v in verts[ok]:
            p = project(v, size, view)
            assert p.min() >= 0 and p.max() < size, (cid, p.min(), p.max())
        # the chin (lowest vertex) and the lower lip sit inside the frame with a margin, not on its edge
        low = max(float(project(v, size, view)[:, 1].max()) for v in verts[ok])
        assert low <= size * 0.97
        # and the face fills the panel: the mesh spans most of it
        span = max(float(np.ptp(project(v, size, view)[:, 1])) for v in verts[ok])
        assert span > size * 0.6
