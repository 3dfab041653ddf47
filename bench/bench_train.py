"""Media2Face training benchmark: the trainer's own loop (models.m2f_train.train) on M2F-D shards,
on 1 GPU and on 2 GPUs (DDP over NCCL, launched with torchrun), side by side in one run.

Prints training samples/s, model FLOPs utilisation in bf16 (FLOPs of one training step counted by
torch's FlopCounterMode, over the GPU's dense bf16 peak), the fraction of step time spent waiting for
data, and 2-GPU scaling.

The shards: real samples of a dataset built by `m2fd run` (exported once with --export, a small
.npz), replicated under distinct keys into lean shards (the four arrays the loader reads) large enough
that the timed steps stay within one epoch.

    python bench/bench_train.py --export out/bench-real            # here: write bench/results/train_src.npz
    python bench/bench_train.py --src bench/results/train_src.npz   # on the GPU machine: prep + 1 and 2 GPUs
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pipelines.procs import kill_tree  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM)


def export(dataset: Path, out: Path) -> None:
    from extractors.shards import iter_shard
    from storage_schemas import open_dataset

    ds = open_dataset(dataset)
    arrays: dict[str, np.ndarray] = {}
    for r in ds.table("shards").to_pylist():
        for key, m in iter_shard(dataset / r["shard"], only=("latents.npy", "pose.npy", "audio_feat.npy", "mask.npy")):
            for k in ("latents", "pose", "audio_feat", "mask"):
                arrays[f"{key}/{k}"] = np.load(io.BytesIO(m[f"{k}.npy"]), allow_pickle=False)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    print(f"exported {len(arrays) // 4} samples to {out} ({out.stat().st_size / 1e6:.1f} MB)")


def prep(src: Path, root: Path, n: int, window: int) -> Path:
    """Shards of ``n`` windows cut from the real samples (distinct keys; the trainer's four arrays with
    minimal other members), and a subset manifest."""
    from extractors.shards import json_bytes, write_shard
    from storage_schemas.samples import SAMPLE_VERSION

    man = root / "subset.json"
    if man.is_file() and len(json.loads(man.read_text())["samples"]) == n:
        return man  # already prepared (same size)
    a = np.load(src, allow_pickle=False)
    keys = sorted({k.split("/")[0] for k in a.files})
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    samples, per = [], 1000
    for si in range(0, n, per):
        members = []
        for j in range(si, min(n, si + per)):
            k = keys[j % len(keys)]
            L = len(a[f"{k}/latents"])
            s0 = int(rng.integers(0, max(1, L - window + 1)))
            # the layout's required members, minimal; the loader reads only the four arrays
            m = {"meta.json": json_bytes({"sample_version": SAMPLE_VERSION, "clip_id": f"w{j:07d}", "bench_copy_of": k}),
                 "audio.flac": b"", "labels.json": b"{}", "keyframe.jpg": b""}
            for f in ("latents", "pose", "audio_feat", "mask"):
                x = a[f"{k}/{f}"][s0:s0 + window]
                b = io.BytesIO()
                np.save(b, np.ascontiguousarray(x), allow_pickle=False)
                m[f"{f}.npy"] = b.getvalue()
            members.append((f"w{j:07d}", m))
        rel = f"shards/train-{si // per:06d}.tar"
        write_shard(root / rel, members)
        samples += [{"clip_id": key, "shard": rel, "index_in_shard": i, "n_frames": window, "split": "train"}
                    for i, (key, _) in enumerate(members)]
    man.write_text(json.dumps({"dataset": str(root), "samples": samples}))
    return man


def worker(args) -> None:
    import torch

    from models.m2f_train import TrainConfig, train
    from models.media2face import M2FConfig, Media2Face, training_loss

    if "RANK" in os.environ and torch.cuda.is_available():
        torch.distributed.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    overrides = json.loads(args.model or "{}")
    compile_mode = overrides.pop("compile_mode", args.compile_mode)  # a variant may set its own
    compile_options = overrides.pop("compile_options", None)  # inductor options instead of a mode
    if compile_options:
        compile_mode = None
    tcfg = TrainConfig(subset=args.manifest, run_dir=args.run_dir, batch_size=args.batch,
                       max_steps=args.warmup + args.steps, log_every=args.warmup + args.steps, val_every=0,
                       ckpt_every=10**9, loader_workers=args.loader_workers, device="auto", bf16=True,
                       compile=args.compile, compile_mode=compile_mode, compile_options=compile_options, timing_warmup=args.warmup,
                       profile_steps=args.profile, model={"window": args.window, **overrides})
    res = train(tcfg)
    last = res["history"][-1]
    if rank == 0:
        # FLOPs of one training step per GPU (forward + backward), counted by torch
        from torch.utils.flop_counter import FlopCounterMode

        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        # the model's FLOPs, the same for variants that differ only in kernels: dense attention through SDPA
        mcfg = M2FConfig(**{"window": args.window, **overrides, "style_dim": 0, "attn_kernel": "sdpa",
                            "attn_dropout": 0.0})
        m = Media2Face(mcfg).to(dev)
        x0 = torch.randn(args.batch, args.window, mcfg.motion_dim, device=dev)
        au = torch.randn(args.batch, args.window, mcfg.audio_dim, device=dev)
        mask = torch.ones(args.batch, args.window, dtype=torch.bool, device=dev)
        with FlopCounterMode(display=False) as fc:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                L = training_loss(m, x0, au, None, mask, torch.Generator().manual_seed(0))
            L["loss"].backward()
        name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
        peak = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
        sps = last["samples_per_s"]
        flops_per_sample = fc.get_total_flops() / args.batch
        out = {"gpus": world, "device": name, "batch_per_gpu": args.batch, "samples_per_s": sps,
               "data_wait_frac": last["data_wait_frac"], "flops_per_sample": flops_per_sample,
               "mfu": sps * flops_per_sample / (peak * world), "loss": last["loss"], "compile": args.compile,
               "compile_mode": compile_mode, "compile_options": compile_options, "model": overrides}
        Path(args.result).write_text(json.dumps(out))
    if world > 1:
        torch.distributed.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", default=None, help="dataset dir: write --src from its shards, then exit")
    ap.add_argument("--src", default=str(REPO / "bench" / "results" / "train_src.npz"))
    ap.add_argument("--work", default="/tmp/m2f-bench")
    ap.add_argument("--samples", type=int, default=40000)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--loader-workers", type=int, default=8)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--variants", default="published:{}",
                    help="';'-separated LABEL:JSON model-config overrides, each benchmarked side by side, e.g. "
                         "(a variant may also set \"compile_mode\", \"compile_options\" and \"batch\") "
                         "'sdpa:{};flex:{\"attn_kernel\":\"flex\",\"attn_dropout\":0}'")
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps (1 GPU runs) and print the top kernels")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per training launch")
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--manifest")
    ap.add_argument("--run-dir")
    ap.add_argument("--result")
    a = ap.parse_args()
    if a.export:
        export(Path(a.export), Path(a.src))
        return
    if a.worker:
        worker(a)
        return
    work = Path(a.work)
    t = time.perf_counter()
    man = prep(Path(a.src), work / "data", a.samples, a.window)
    print(f"prepared {a.samples} windows in {time.perf_counter() - t:.1f} s")
    rows = []
    variants = [(v.split(":", 1)[0], v.split(":", 1)[1] or "{}") for v in a.variants.split(";") if v.strip()]
    for label, model in variants:
        ov = json.loads(model)
        batch = int(ov.pop("batch", a.batch))  # a variant may set its own batch per GPU
        model = json.dumps(ov)
        if batch * (a.warmup + a.steps) > a.samples:
            print(f"!! {label}: batch {batch} x {a.warmup + a.steps} steps > --samples {a.samples} (the timed "
                  f"steps would cross an epoch): skipped", flush=True)
            continue
        for g in [int(x) for x in a.gpus.split(",")]:
            tag = f"{label}-b{batch}{'-compile' if a.compile else ''}{'-' + a.compile_mode if a.compile_mode else ''}-{g}gpu"
            res = work / f"result-{tag}.json"
            res.unlink(missing_ok=True)
            shutil.rmtree(work / f"run-{tag}", ignore_errors=True)  # a fresh run (no resume from an earlier one)
            profile = a.profile if g == 1 else 0
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={g}", "--standalone", __file__,
                   "--worker", "--manifest", str(man), "--run-dir", str(work / f"run-{tag}"), "--result", str(res),
                   "--batch", str(batch), "--steps", str(a.steps), "--warmup", str(a.warmup), "--window",
                   str(a.window), "--loader-workers", str(a.loader_workers), "--model", model,
                   "--profile", str(profile)] + (["--compile"] if a.compile else ["--no-compile"]) + (
                       ["--compile-mode", a.compile_mode] if a.compile_mode else [])
            env = {**os.environ, "PYTHONPATH": str(REPO), "NCCL_NVLS_ENABLE": "0",
                   "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1", "OMP_NUM_THREADS": "2"}
            t = time.perf_counter()
            p = subprocess.Popen(cmd, env=env, start_new_session=True)
            try:
                rc = p.wait(timeout=a.timeout)
            except subprocess.TimeoutExpired:
                # torchrun starts each worker in a session of its own: its process group alone would
                # orphan them (holding the GPU); SIGTERM first, torchrun forwards it to its workers
                kill_tree(p, grace_s=15)
                rc = "timeout"
            if rc != 0:  # report, go on with the rest
                print(f"!! {tag}: {'timed out' if rc == 'timeout' else f'exit {rc}'} after "
                      f"{time.perf_counter() - t:.0f} s", flush=True)
                continue
            rows.append({"variant": label, **json.loads(res.read_text())})
            print(f"{tag}: {rows[-1]['samples_per_s']:.0f} samples/s, MFU {rows[-1]['mfu'] * 100:.1f}% "
                  f"({time.perf_counter() - t:.0f} s incl. compile)", flush=True)
            prof = work / f"run-{tag}" / "profile.txt"
            if prof.is_file():
                print(prof.read_text(), flush=True)
    if not rows:
        raise SystemExit("no variant ran")
    print(f"# Media2Face training (8 layers, 4 heads, width 512, window {a.window}; bf16 autocast; "
          f"{'torch.compile ' + (a.compile_mode or '') if a.compile else 'eager'}; {a.steps} timed steps after {a.warmup})")
    print(f"device: {rows[0]['device']}; batch {a.batch} windows per GPU unless the variant sets one; "
          f"{rows[0]['flops_per_sample'] / 1e9:.1f} GFLOP per training sample (FlopCounterMode)")
    print()
    print("| variant | GPUs | batch/GPU | samples/s | MFU (bf16 dense peak) | data wait (share of step time) | final loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['gpus']} | {r['batch_per_gpu']} | {r['samples_per_s']:.0f} | {r['mfu'] * 100:.1f}% | "
              f"{r['data_wait_frac'] * 100:.2f}% | {r['loss']:.4f} |")
    for label, _ in variants:
        by_g = {r["gpus"]: r for r in rows if r["variant"] == label}
        if len(by_g) >= 2:
            g1, g2 = sorted(by_g)[:2]
            print(f"{label}: scaling {g2} GPUs vs {g1}: "
                  f"{by_g[g2]['samples_per_s'] / by_g[g1]['samples_per_s']:.2f}x (target >= 1.85)")
    base = rows[0]
    for r in rows[1:]:
        if r["gpus"] == base["gpus"] and r["variant"] != base["variant"]:
            print(f"{r['variant']} vs {base['variant']} ({r['gpus']} GPU): "
                  f"{r['samples_per_s'] / base['samples_per_s']:.2f}x samples/s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
