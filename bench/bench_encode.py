"""Where a GNPFA encoding task's time goes, and what a resident-model GPU actor pool would save (#13).

An encoding task (pipelines.extract._encode_task, one per source) loads the checkpoint, reads the
source's tracks part, runs the GNPFA networks (encode_frames) and builds and writes the frames table,
crops and keyframes. On a GPU cluster the task holds a whole GPU (num_gpus=1) for all of it. Printed,
side by side in one process:

  --dataset D   per source of an extracted dataset (a scratch copy; its encode parts removed so every
                task recomputes): the whole task, the checkpoint load, the networks alone, and the
                share of the task that is the networks (what needs the device) and the load (what an
                actor keeping the model resident would save).
  --synthetic   the checkpoint load (cold: first in the process, CUDA initialised there; warm) and the
                networks alone on random inputs of the given frame counts, on --device (for a GPU
                machine without a dataset).

    .venv/bin/python bench/bench_encode.py --dataset out/demo [--device cpu]
    python bench/bench_encode.py --synthetic 300,1000,5000 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(fn, device: str, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def synthetic(sizes: list[int], device: str, ckpt: Path) -> None:
    import torch

    from models.gnpfa import checkpoint_config, encode_frames, load_checkpoint

    torch.set_num_threads(1) if device == "cpu" else None
    s = checkpoint_config(ckpt)[0].crop_size
    cold, _ = _timed(lambda: load_checkpoint(ckpt, device=device), device)
    warm, (_, vae, enc, _) = _timed(lambda: load_checkpoint(ckpt, device=device), device, repeat=5)
    rng = np.random.default_rng(0)
    print(f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu, 1 thread'}), "
          f"checkpoint {ckpt.name}: load cold {cold * 1e3:.1f} ms (first in the process), warm {warm * 1e3:.1f} ms")
    print("| frames | networks ms | frames/s | warm load / networks |")
    print("|---|---|---|---|")
    for n in sizes:
        off = rng.normal(0, 0.002, (n, 478, 3)).astype(np.float32)
        neu = rng.normal(0, 0.05, (n, 478, 3)).astype(np.float32)
        crops = rng.integers(0, 255, (n, s, s, 3), dtype=np.uint8)
        encode_frames(vae, enc, off, neu, crops, device=device)  # warm-up (kernels, allocator)
        t, _ = _timed(lambda: encode_frames(vae, enc, off, neu, crops, device=device), device, repeat=3)
        print(f"| {n} | {t * 1e3:.1f} | {n / t:,.0f} | {warm / t:.2f} |")


def dataset(ds: Path, device: str) -> None:
    import torch

    from extractors.config import ExtractConfig
    from extractors.extract import features_from_npz
    from extractors.records import training_arrays
    from models.gnpfa import encode_frames, load_checkpoint
    from pipelines.extract import ENCODE_PARTS, EncodeWork, _encode_task, _plan
    from storage_schemas.dataset import extract_lineage

    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        d = work / "ds"
        shutil.copytree(ds, d, ignore=shutil.ignore_patterns(".dagster", "cache"))
        shutil.rmtree(d / ENCODE_PARTS, ignore_errors=True)
        lin = extract_lineage(d)["gnpfa"]
        ckpt = d / lin["path"]
        card = json.loads((d / "dataset.json").read_text())
        cfg = ExtractConfig.from_dict(card["lineage"]["config"]["extract"])
        all_work, _ = _plan(d, cfg)
        torch.set_num_threads(cfg.gnpfa_train_threads)
        print(f"dataset {ds} ({len(all_work)} sources), checkpoint {ckpt.name}, device {device}")
        print("| source | tracked frames | task ms | load ms | networks ms | networks / task | load / task | "
              "networks as before ms (256-row batches, batch norms unfolded) | before / now |")
        print("|---|---|---|---|---|---|---|---|---|")
        tot = np.zeros(5)
        for w in all_work:
            ew = EncodeWork(w, str(ckpt), lin["sha256"], device)
            task, _ = _timed(lambda: _encode_task(ew), device)
            load, (_, vae, enc, _) = _timed(lambda: load_checkpoint(ckpt, device=device), device)
            meta = json.loads(Path(w.npz).with_suffix(".json").read_text())
            arrays = [training_arrays([f]) for f in features_from_npz(w.npz, meta["clips"])]
            net = sum(_timed(lambda a=a: encode_frames(vae, enc, a["offsets"], a["neutrals"], a["crops"], device=device),
                             device)[0] for a in arrays)
            old = sum(_timed(lambda a=a: encode_frames(vae, enc, a["offsets"], a["neutrals"], a["crops"], device=device,
                                                       batch=256, fold=False), device)[0] for a in arrays)
            n = sum(len(a["offsets"]) for a in arrays)
            tot += (n, task, load, net, old)
            print(f"| {w.source['source_id'][:12]} | {n} | {task * 1e3:.0f} | {load * 1e3:.0f} | {net * 1e3:.0f} | "
                  f"{net / task:.2f} | {load / task:.2f} | {old * 1e3:.0f} | {old / net:.2f} |")
        n, task, load, net, old = tot
        print(f"| all | {n:.0f} | {task * 1e3:.0f} | {load * 1e3:.0f} | {net * 1e3:.0f} | {net / task:.2f} | "
              f"{load / task:.2f} | {old * 1e3:.0f} | {old / net:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    from models.gnpfa import SHIPPED_DIR

    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=Path)
    ap.add_argument("--synthetic", default=None, help="comma-separated frame counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ckpt", type=Path, default=SHIPPED_DIR)
    a = ap.parse_args()
    if a.synthetic:
        synthetic([int(x) for x in a.synthetic.split(",")], a.device, a.ckpt)
    if a.dataset:
        dataset(a.dataset, a.device)
    if not (a.synthetic or a.dataset):
        ap.error("give --dataset and/or --synthetic")


if __name__ == "__main__":
    main()
