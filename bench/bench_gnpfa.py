"""GNPFA / extraction benchmark, side by side in one run.

  --section mesh      the mesh path (Face Mesh + pose fit + normalisation, our wrapper) next to
                      MediaPipe Face Mesh alone on the same decoded frames (target >= 0.9x)
  --section fidelity  held-out fidelity of the default (pipeline) GNPFA config trained on the shared
                      real videos: geometry reconstruction error as % of inter-ocular distance (target
                      < 1%) next to the mean-face baseline; image path against mesh path (pose error in
                      degrees, target < 2; latent relative error, target < 5%); lip-sync proxy per clip.
                      Saves the trained checkpoint to --ckpt for the gpu section.
  --section heldout   the shipped GNPFA on held-out people (scripts/build_gnpfa.sh's datasets) side by
                      side with today's per-run bootstrap (in-sample on those people, and trained on the
                      training people): geometry % IOD, image-path pose and latent error with baselines.
  --section cost      a default demo run with the shipped GNPFA next to the per-run bootstrap (wall s).
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


def _fidelity(name: str, vae, enc, data: dict, train_offsets: np.ndarray, mean_z: np.ndarray, crop: int) -> dict:
    """One GNPFA on one set of frames: geometry round trip (% IOD) next to the mean-face baseline; the
    image path against the mesh path (pose in degrees; latent relative error next to the mean-latent
    baseline)."""
    from extractors.pose import rotation_angle_deg
    from models.gnpfa import encode_images, reconstruct

    z, dec = reconstruct(vae, data["offsets"], data["neutrals"])
    geo = np.linalg.norm(dec - data["offsets"], axis=-1).mean() * 100
    geo0 = np.linalg.norm(train_offsets.mean(0) - data["offsets"], axis=-1).mean() * 100
    zi, ri = encode_images(enc, _resize_crops(data["crops"], crop))
    pose = float(np.mean([rotation_angle_deg(a, b) for a, b in zip(ri, data["rotations"])]))
    norm = np.linalg.norm(z, axis=1).mean()
    rel = np.linalg.norm(zi - z, axis=1).mean() / norm * 100
    rel0 = np.linalg.norm(mean_z - z, axis=1).mean() / norm * 100
    print(f"  {name:58s} geometry {geo:5.2f}% IOD (mean face {geo0:5.2f}%) | pose {pose:5.2f} deg | "
          f"latent rel err {rel:5.1f}% (mean latent {rel0:5.1f}%)")
    return {"geometry": geo, "pose": pose, "latent": rel}


def _bootstrap(data: dict, log_name: str):
    """Today's per-run bootstrap: the pipeline's bootstrap config and budget (64 px crops), as a run
    trains it on its own frames."""
    from extractors.config import ExtractConfig
    from models.gnpfa import train_geometry, train_image
    from pipelines.gnpfa import _gcfg

    e = ExtractConfig(gnpfa_checkpoint="bootstrap")
    g = _gcfg(e)
    torch.set_num_threads(e.gnpfa_train_threads)
    t0 = time.perf_counter()
    vae = train_geometry(data["offsets"], data["neutrals"], g, steps=e.gnpfa_geometry_steps)
    enc = train_image(_resize_crops(data["crops"], g.crop_size), data["offsets"], data["neutrals"], data["rotations"],
                      vae, g, steps=e.gnpfa_image_steps)
    print(f"  (bootstrap trained on {len(data['offsets'])} frames of {log_name}: {time.perf_counter() - t0:.0f} s)")
    return vae, enc, g.crop_size


def section_heldout(train_ds: Path, heldout_ds: Path, ckpt: Path, max_frames: int):
    """The shipped GNPFA on people it never saw, side by side with today's per-run bootstrap (trained
    on the same held-out people's own frames, in-sample, as a run over their videos trains it; and
    trained on the training people, then applied to the held-out ones)."""
    from models.gnpfa import load_checkpoint, reconstruct
    from pipelines.gnpfa import training_data

    cfg, vae, enc, sha = load_checkpoint(ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    tr, _ = training_data([train_ds], max_frames)
    ho, rec = training_data([heldout_ds], max_frames)
    people = [s["file"] for d in rec["inputs"] for s in d["sources"]]
    print(f"GNPFA {meta.get('name') or ckpt.name} {sha[:12]} ({cfg.crop_size} px, head pool {cfg.head_pool}, "
          f"{(ckpt / 'model.safetensors').stat().st_size / 2**20:.2f} MiB), trained on {meta.get('trained_on_frames')} "
          f"frames; held-out people ({len(ho['offsets'])} frames): {', '.join(people)}")
    out = {}
    mz = reconstruct(vae, tr["offsets"], tr["neutrals"])[0].mean(0)
    out["shipped"] = _fidelity("shipped, held-out people", vae, enc, ho, tr["offsets"], mz, cfg.crop_size)
    bvae, benc, bcrop = _bootstrap(ho, "the held-out people")
    bz = reconstruct(bvae, ho["offsets"], ho["neutrals"])[0].mean(0)
    out["bootstrap_in"] = _fidelity("per-run bootstrap on its own run (held-out people, in-sample)", bvae, benc, ho,
                                    ho["offsets"], bz, bcrop)
    bvae, benc, bcrop = _bootstrap(tr, "the training people")
    bz = reconstruct(bvae, tr["offsets"], tr["neutrals"])[0].mean(0)
    out["bootstrap_out"] = _fidelity("per-run bootstrap of the training people, held-out people", bvae, benc, ho,
                                     tr["offsets"], bz, bcrop)
    s = out["shipped"]
    print(f"  targets on held-out people (shipped): geometry < 1% -> {'PASS' if s['geometry'] < 1 else 'MISS'}; "
          f"pose < 2 deg -> {'PASS' if s['pose'] < 2 else 'MISS'}; latent < 5% -> {'PASS' if s['latent'] < 5 else 'MISS'}")


def section_cost(real: Path, samples: Path):
    """A default `make demo` run (the bundled videos) with the shipped GNPFA, next to the same run with
    today's per-run bootstrap (`--set gnpfa_checkpoint=bootstrap`), wall seconds side by side."""
    import subprocess
    import tempfile

    from storage_schemas.dataset import CARD

    srcs = [str(real)] + ([str(samples)] if samples.is_dir() and any(samples.iterdir()) else [])
    res = {}
    for name, extra in (("bootstrap", ["--set", "gnpfa_checkpoint=bootstrap"]), ("shipped", [])):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", *srcs, "--out", f"{tmp}/D", *extra],
                               cwd=REPO, capture_output=True, text=True)
            res[name] = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(f"{name} run failed: {r.stderr[-2000:]}")
            card = json.loads((Path(tmp) / "D" / CARD).read_text())
            g = card["lineage"]["checkpoints"]["gnpfa"]
            print(f"  demo run, GNPFA {name:9s}: {res[name]:6.1f} s wall (GNPFA {g['kind']} {g['sha256'][:12]}, "
                  f"{card['counts']['clips_extracted_ok']} clips)")
    print(f"  default demo cost: shipped / bootstrap = {res['shipped'] / res['bootstrap']:.2f}")


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
    ap.add_argument("--section", action="append", choices=["mesh", "fidelity", "gpu", "heldout", "cost"])
    ap.add_argument("--train-dataset", type=Path, default=REPO / "out" / "gnpfa-build" / "train",
                    help="heldout: the shipped GNPFA's training dataset (scripts/build_gnpfa.sh)")
    ap.add_argument("--heldout-dataset", type=Path, default=REPO / "out" / "gnpfa-build" / "heldout",
                    help="heldout: the held-out people's dataset (scripts/build_gnpfa.sh)")
    ap.add_argument("--shipped", type=Path, default=None, help="heldout: checkpoint (default: the shipped one)")
    ap.add_argument("--max-train-frames", type=int, default=20_000)
    ap.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "real")
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
        elif s == "heldout":
            from models.gnpfa import SHIPPED_DIR

            section_heldout(a.train_dataset, a.heldout_dataset, a.shipped or SHIPPED_DIR, a.max_train_frames)
        elif s == "cost":
            section_cost(a.real, REPO / "examples" / "samples")
        elif s == "fidelity":
            section_fidelity(a.dataset, a.ckpt, a.geometry_steps, a.image_steps, a.crop_size, a.enc_width, a.device)
        else:
            section_gpu(a.ckpt, a.frames)


if __name__ == "__main__":
    main()
