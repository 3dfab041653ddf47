"""GNPFA / extraction benchmark, side by side in one run.

  --section mesh      the mesh path (Face Mesh + pose fit + normalisation, our wrapper) next to
                      MediaPipe Face Mesh alone on the same decoded frames (target >= 0.9x)
  --section fidelity  held-out fidelity of the default (pipeline) GNPFA config trained on the shared
                      real videos: geometry reconstruction error as % of inter-ocular distance (target
                      < 1%) next to the mean-face baseline; image path against mesh path (pose error in
                      degrees, target < 2; latent relative error, target < 5%); lip-sync proxy per clip.
                      Saves the trained checkpoint to --ckpt for the gpu section.
  --section gpu       image-encoder frames/s of that checkpoint: CUDA bf16 (target >= 50,000/s per H100)
                      next to this machine's CPU, plus GPU-vs-CPU agreement.

The mesh and fidelity sections need a dataset made by `m2fd run ../shared/data/real --out D`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def section_mesh(ds_dir: Path, max_frames: int):
    from mediapipe.python.solutions import face_mesh

    from extractors.landmarks import MeshTracker
    from extractors.media import iter_frames, open_video, timeline
    from extractors.pose import head_pose, load_template, normalise, to_metric
    from storage_schemas import open_dataset

    ds = open_dataset(ds_dir)
    srcs = {s["source_id"]: s for s in ds.table("sources").to_pylist()}
    tpl = load_template()
    t_mp = t_ours = 0.0
    n = 0
    for c in ds.table("clips").to_pylist():
        s = srcs[c["source_id"]]
        vr = open_video(s["uri"], s["width"], s["height"], 1280)
        tl = timeline(vr, 1e9)
        frames = [f for _, f in iter_frames(vr, tl, np.arange(c["start_frame"], c["start_frame"] + min(c["n_frames"], max_frames)))]
        with face_mesh.FaceMesh(static_image_mode=False, max_num_faces=2, refine_landmarks=True) as fm:
            t0 = time.perf_counter()
            for f in frames:
                fm.process(f)
            t_mp += time.perf_counter() - t0
        with MeshTracker() as mt:
            t0 = time.perf_counter()
            for f in frames:
                lm = mt.process(f, c["face_box"])
                if lm is not None:
                    m = to_metric(lm, s["width"], s["height"])
                    sc, r, t, _ = head_pose(m, tpl)
                    normalise(m, sc, r, t)
            t_ours += time.perf_counter() - t0
        n += len(frames)
    print(f"mesh path: {n / t_ours:8.1f} frames/s | MediaPipe Face Mesh alone: {n / t_mp:8.1f} frames/s | "
          f"ratio {t_mp / t_ours:.2f} (target >= 0.90) -> {'PASS' if t_mp / t_ours >= 0.9 else 'MISS'}  [{n} frames, 1 core]")


def _resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
    """(N, S, S, 3) uint8 crops to (N, size, size, 3), area-averaged (downsampling only)."""
    if crops.shape[1] == size:
        return crops
    if size > crops.shape[1]:
        raise SystemExit(f"--crop-size {size} is larger than the dataset's crops ({crops.shape[1]} px)")
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def section_fidelity(ds_dir: Path, ckpt: Path, geometry_steps: int | None = None, image_steps: int | None = None,
                     crop_sizes: list[int] | None = None, enc_width: int | None = None, device: str = "cpu"):
    from extractors.config import ExtractConfig
    from extractors.extract import features_from_npz
    from extractors.pose import rotation_angle_deg
    from extractors.records import split_tail, training_arrays
    from models.gnpfa import (GNPFAConfig, encode_images, reconstruct, save_checkpoint, train_geometry,
                              train_image)
    from storage_schemas import open_dataset

    feats = []
    for js in sorted((ds_dir / "parts" / "extract").glob("*.json")):
        feats += features_from_npz(str(js.with_suffix(".npz")), json.loads(js.read_text())["clips"])
    tr, te = split_tail(feats)
    tr, te = training_arrays(tr), training_arrays(te)
    e = ExtractConfig()
    torch.set_num_threads(e.gnpfa_train_threads)
    geometry_steps = geometry_steps or e.gnpfa_geometry_steps
    image_steps = image_steps or e.gnpfa_image_steps
    stored = tr["crops"].shape[1]  # the dataset's crop size (extraction's crop_size)
    base_cfg = GNPFAConfig(z_dim=e.gnpfa_z_dim, hidden=e.gnpfa_hidden, crop_size=stored,
                           enc_width=enc_width or e.gnpfa_enc_width)
    t0 = time.perf_counter()
    vae = train_geometry(tr["offsets"], tr["neutrals"], base_cfg, steps=geometry_steps, device=device).cpu()
    t_geo = time.perf_counter() - t0
    print(f"default GNPFA config {base_cfg.to_dict()}; trained on {len(tr['offsets'])} frames, held out "
          f"{len(te['offsets'])} frames (last 25% of every clip); geometry {geometry_steps} steps {t_geo:.0f} s "
          f"on {device}; stored crops {stored} px")
    mesh_z = {}  # the mesh path's latents per set: the image path's targets
    for name, d in (("train", tr), ("held-out", te)):
        mesh_z[name], dec = reconstruct(vae, d["offsets"], d["neutrals"])
        err = np.linalg.norm(dec - d["offsets"], axis=-1).mean() * 100
        base = np.linalg.norm(tr["offsets"].mean(0) - d["offsets"], axis=-1).mean() * 100
        print(f"  {name:9s} geometry recon {err:5.2f}% IOD (mean-face baseline {base:5.2f}%, target < 1%)")
    z_mean = mesh_z["train"].mean(0)  # a constant prediction, for scale: the training frames' mean latent
    sizes = crop_sizes or [stored]
    for size in sizes:
        cfg = GNPFAConfig(**{**base_cfg.to_dict(), "crop_size": size})
        t0 = time.perf_counter()
        enc = train_image(_resize_crops(tr["crops"], size), tr["offsets"], tr["neutrals"], tr["rotations"], vae, cfg,
                          steps=image_steps, device=device).cpu()
        t_img = time.perf_counter() - t0
        if size == sizes[0]:
            sha = save_checkpoint(ckpt, cfg, vae, enc, meta={"kind": "bench-default", "trained_on_frames": len(tr["offsets"])})
            print(f"  checkpoint {sha[:12]} -> {ckpt}")
        print(f"  image encoders: {size} px crops, width {cfg.enc_width}, {image_steps} steps {t_img:.0f} s on {device}")
        for name, d in (("train", tr), ("held-out", te)):
            z = mesh_z[name]
            zi, ri = encode_images(enc, _resize_crops(d["crops"], size))
            pose = np.mean([rotation_angle_deg(a, b) for a, b in zip(ri, d["rotations"])])
            rel = np.linalg.norm(zi - z, axis=1).mean() / np.linalg.norm(z, axis=1).mean() * 100
            rel0 = np.linalg.norm(z_mean - z, axis=1).mean() / np.linalg.norm(z, axis=1).mean() * 100
            print(f"    {name:9s} image vs mesh: pose {pose:5.2f} deg (target < 2) latent rel err {rel:6.1f}% "
                  f"(target < 5%; mean-latent baseline {rel0:.1f}%)")
    if not (ds_dir / "tables").is_dir():
        return  # extraction parts only (e.g. carried to a GPU machine): no clip tables for the lip-sync proxy
    rows = open_dataset(ds_dir).query("select c.clip_id, regexp_extract(c.uri, '[^/]+$') v, f.lip_sync from clips c "
                                      "join clip_features f using (clip_id) order by 1").to_pylist()
    print("  lip-sync proxy (corr. of mouth opening with the speech-band envelope, best lag +-6 frames): " +
          ", ".join(f"{r['v']}:{r['lip_sync']:.2f}" for r in rows))


def section_gpu(ckpt: Path, n: int):
    from models.gnpfa import encode_images, load_checkpoint

    cfg, _, enc_cpu, sha = load_checkpoint(ckpt, device="cpu")
    crops = np.random.default_rng(0).integers(0, 255, (n, cfg.crop_size, cfg.crop_size, 3), dtype=np.uint8)
    m = min(n, 4096)
    t0 = time.perf_counter()
    z_cpu, r_cpu = encode_images(enc_cpu, crops[:m], device="cpu", amp=False, batch=1024)
    cpu_fps = m / (time.perf_counter() - t0)
    line = f"image encoder {sha[:12]} ({cfg.crop_size} px, width {cfg.enc_width}): CPU fp32 {cpu_fps:9.0f} frames/s ({torch.get_num_threads()} threads)"
    if not torch.cuda.is_available():
        print(line + " | CUDA: not available on this machine")
        return
    _, _, enc, _ = load_checkpoint(ckpt, device="cuda")
    name = torch.cuda.get_device_name()
    encode_images(enc, crops[:8192], device="cuda", batch=8192)  # warm-up
    res = {}
    for b in (4096, 16384, 65536):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        encode_images(enc, crops, device="cuda", batch=b)
        torch.cuda.synchronize()
        res[b] = n / (time.perf_counter() - t0)
    # compute only (data already on the GPU) to separate transfer from model cost
    x = torch.from_numpy(crops[:65536]).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        enc(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            enc(x)
        torch.cuda.synchronize()
    comp = 5 * len(x) / (time.perf_counter() - t0)
    z_gpu, r_gpu = encode_images(enc, crops[:m], device="cuda", batch=4096)
    zerr = np.abs(z_gpu - z_cpu).max() / np.abs(z_cpu).max()
    from extractors.pose import rotation_angle_deg

    rerr = np.mean([rotation_angle_deg(a, b) for a, b in zip(r_gpu, r_cpu)])
    best = max(res.values())
    print(line + f" | {name} bf16 end-to-end (pinned H2D overlapped): " +
          ", ".join(f"batch {b}: {v:,.0f}/s" for b, v in res.items()) +
          f" | compute only: {comp:,.0f}/s | GPU/CPU = {best / cpu_fps:.0f}x | best {best:,.0f}/s vs target 50,000 -> "
          f"{'PASS' if best >= 50000 else 'MISS'} | GPU vs CPU: max latent diff {zerr:.3%} of range, rotation {rerr:.3f} deg")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=REPO / "out" / "bench-real")
    ap.add_argument("--ckpt", type=Path, default=REPO / "bench" / "results" / "gnpfa_default")
    ap.add_argument("--section", action="append", choices=["mesh", "fidelity", "gpu"])
    ap.add_argument("--frames", type=int, default=200_000, help="crops for the gpu section")
    ap.add_argument("--max-frames-per-clip", type=int, default=150)
    ap.add_argument("--geometry-steps", type=int, default=None, help="default: the run's bootstrap budget")
    ap.add_argument("--image-steps", type=int, default=None, help="default: the run's bootstrap budget")
    ap.add_argument("--crop-size", type=int, action="append", help="image-encoder crop size(s), side by side "
                    "(downsampled from the dataset's crops; default: as stored)")
    ap.add_argument("--enc-width", type=int, default=None, help="image-encoder width (default: the run's)")
    ap.add_argument("--device", default="cpu", help="where the fidelity section trains (cpu, cuda)")
    a = ap.parse_args()
    for s in a.section or ["mesh", "fidelity", "gpu"]:
        if s == "mesh":
            section_mesh(a.dataset, a.max_frames_per_clip)
        elif s == "fidelity":
            section_fidelity(a.dataset, a.ckpt, a.geometry_steps, a.image_steps, a.crop_size, a.enc_width, a.device)
        else:
            section_gpu(a.ckpt, a.frames)


if __name__ == "__main__":
    main()
