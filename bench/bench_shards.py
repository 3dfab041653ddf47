"""Shard benchmark, side by side in one run:
  * loader samples/s (models.data.M2FDWindows: parse + window) next to a raw sequential read of the
    same tars (tarfile, bytes only)  -- target >= 0.9x
  * shard writing MB/s (extractors.shards.write_shard: validate + deterministic tar + fsync + rename)
    next to a plain file copy of the same bytes
  * DuckDB query latency on a synthetic index of 1,000,000 clips for a typical researcher filter
    -- target < 1 s
Samples are the real ones of a dataset made by `m2fd run`, repeated under new keys to a useful size.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    from extractors.shards import iter_shard, json_bytes, pack, write_shard
    from models.data import M2FDWindows
    from storage_schemas import open_dataset

    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=Path, default=REPO / "out" / "bench-real")
    ap.add_argument("--copies", type=int, default=100)
    ap.add_argument("--rows", type=int, default=1_000_000)
    a = ap.parse_args()
    ds = open_dataset(a.dataset)
    base = []
    for s in ds.table("shards").to_pylist():
        base += list(iter_shard(a.dataset / s["shard"]))
    tmp = Path(tempfile.mkdtemp(prefix="m2fd-bench-"))
    try:
        samples = []
        for c in range(a.copies):
            for key, m in base:
                k = f"{key}-r{c:04d}"
                meta = json.loads(m["meta.json"])
                meta["clip_id"] = k
                samples.append((k, {**m, "meta.json": json_bytes(meta)}))
        sizes = [sum(len(v) for v in m.values()) for _, m in samples]
        groups = pack(sizes, 32 * 1024 * 1024)
        t0 = time.perf_counter()
        entries, total = [], 0
        for si, g in enumerate(groups):
            rel = f"shards/train-{si:06d}.tar"
            _, nb = write_shard(tmp / rel, [samples[i] for i in g])
            total += nb
            entries += [{"clip_id": samples[i][0], "shard": rel, "index_in_shard": j,
                         "n_frames": json.loads(samples[i][1]["meta.json"])["n_frames"], "split": "train"}
                        for j, i in enumerate(g)]
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        for si in range(len(groups)):
            shutil.copyfile(tmp / f"shards/train-{si:06d}.tar", tmp / f"copy-{si}.tar")
            with open(tmp / f"copy-{si}.tar", "rb") as f:
                os.fsync(f.fileno())
        t_copy = time.perf_counter() - t0
        man = tmp / "subset.json"
        man.write_text(json.dumps({"dataset": str(tmp), "samples": entries}))
        # raw sequential read of the same tars (bytes only), then the loader; best of 3 each
        def raw():  # the standard library's sequential tar read: every member's bytes, nothing decoded
            n = 0
            for si in range(len(groups)):
                with tarfile.open(tmp / f"shards/train-{si:06d}.tar") as t:
                    for ti in t:
                        t.extractfile(ti).read()
                        n += ti.name.endswith(".meta.json")
            return n

        def raw_walk():  # the loader's own tar walk, every member's bytes, nothing decoded
            n = 0
            for si in range(len(groups)):
                for _, m in iter_shard(tmp / f"shards/train-{si:06d}.tar"):
                    n += 1
            return n

        def loader():
            return sum(1 for _ in M2FDWindows(subset=man, window=200, shuffle=False))

        t_raw = min(_timed(raw) for _ in range(3))
        t_walk = min(_timed(raw_walk) for _ in range(3))
        t_load = min(_timed(loader) for _ in range(3))
        n = len(samples)
        print(f"{n} samples in {len(groups)} shards, {total / 1e6:.0f} MB (real samples x {a.copies})")
        print(f"loader: {n / t_load:9.0f} samples/s | raw sequential tar read (tarfile): {n / t_raw:9.0f} samples/s | "
              f"ratio {t_raw / t_load:.2f} (target >= 0.90) -> {'PASS' if t_raw / t_load >= 0.9 else 'MISS'}")
        print(f"        (raw read with the loader's own mmap tar walk, all members, no decoding: {n / t_walk:9.0f} "
              f"samples/s; loader/that = {t_walk / t_load:.2f})")
        # epoch boundary: wait for the first batch of epochs 1..3, a fresh loader per epoch (workers
        # started each time) next to one loader whose workers persist (what the trainer does)
        import torch

        def first_batch_waits(persistent: bool) -> list[float]:
            wds = M2FDWindows(subset=man, window=200, shuffle=True)
            mk = lambda: torch.utils.data.DataLoader(wds, batch_size=32, num_workers=2, drop_last=True,  # noqa: E731
                                                     persistent_workers=persistent)
            dl, waits = mk(), []
            for epoch in range(4):
                wds.set_epoch(epoch)
                if not persistent:
                    dl = mk()
                t = time.perf_counter()
                it = iter(dl)
                next(it)
                waits.append(time.perf_counter() - t)
                for _ in it:
                    pass
            return waits[1:]

        w_fresh, w_keep = first_batch_waits(False), first_batch_waits(True)
        print(f"epoch start (first batch of epochs 1-3, 2 workers): fresh loader per epoch "
              f"{np.median(w_fresh) * 1000:.0f} ms | persistent workers {np.median(w_keep) * 1000:.0f} ms")
        print(f"shard writing: {total / 1e6 / t_write:7.0f} MB/s | plain copy of the same bytes: "
              f"{total / 1e6 / t_copy:7.0f} MB/s | ratio {t_copy / t_write:.2f}")
        # DuckDB on a synthetic 1M-clip index
        import duckdb
        import pyarrow as pa
        import pyarrow.parquet as pq

        rng = np.random.default_rng(0)
        m = a.rows
        emo = np.array(["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"])
        t = pa.table({"clip_id": pa.array([f"{i:016x}-000000" for i in range(m)]),
                      "duration_s": rng.uniform(2, 20, m), "emotion": emo[rng.integers(0, 7, m)],
                      "intensity": np.array(["low", "medium", "high"])[rng.integers(0, 3, m)],
                      "yaw_mean": rng.normal(0, 15, m), "pitch_mean": rng.normal(0, 10, m),
                      "split": np.array(["train", "val", "test"])[rng.integers(0, 3, m)],
                      "shard": pa.array([f"shards/train-{i // 1000:06d}.tar" for i in range(m)])})
        pq.write_table(t, tmp / "index.parquet", compression="zstd")
        con = duckdb.connect()
        con.execute(f"create view clips as select * from read_parquet('{tmp / 'index.parquet'}')")
        sql = ("select clip_id, shard from clips where emotion = 'happy' and duration_s > 3 "
               "and abs(yaw_mean) < 10 and abs(pitch_mean) < 10")
        con.sql(sql).fetchall()  # warm the file cache
        lat = []
        for _ in range(5):
            t0 = time.perf_counter()
            res = con.sql(sql).fetchall()
            lat.append(time.perf_counter() - t0)
        print(f"DuckDB on {m:,} clips: 'happy, > 3 s, frontal' -> {len(res):,} rows in {np.median(lat) * 1000:.0f} ms "
              f"(median of 5; target < 1000 ms) -> {'PASS' if np.median(lat) < 1 else 'MISS'}")
    finally:
        shutil.rmtree(tmp)


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
