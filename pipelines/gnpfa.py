"""GNPFA wiring: use a provided checkpoint or train (and cache) a bootstrap on this run's meshes;
encode on a Ray GPU worker when the cluster has one, else locally."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

from extractors.config import ExtractConfig


def _gcfg(cfg: ExtractConfig):
    from models.gnpfa import GNPFAConfig

    return GNPFAConfig(z_dim=cfg.gnpfa_z_dim, hidden=cfg.gnpfa_hidden, crop_size=cfg.crop_size,
                       enc_width=cfg.gnpfa_enc_width)


def crops_for_checkpoint(cfg: ExtractConfig) -> ExtractConfig:
    """With a provided GNPFA checkpoint, face crops are cut at the size its image encoders take (its
    config.json says; a folder without one is a clear error before any work starts)."""
    if not cfg.gnpfa_checkpoint:
        return cfg
    import dataclasses

    from models.gnpfa import checkpoint_config

    if not (Path(cfg.gnpfa_checkpoint) / "config.json").is_file():
        raise ValueError(f"gnpfa_checkpoint {cfg.gnpfa_checkpoint}: no config.json there (a GNPFA checkpoint folder "
                         f"holds model.safetensors + config.json, as `m2fd gnpfa train-image` writes it)")
    size = checkpoint_config(cfg.gnpfa_checkpoint)[0].crop_size
    return dataclasses.replace(cfg, crop_size=size) if size != cfg.crop_size else cfg


class NotEnoughFrames(RuntimeError):
    """Too few tracked frames to train a bootstrap GNPFA (and no checkpoint was provided)."""


def gnpfa_device(cfg: ExtractConfig, ex=None) -> str:
    """Where GNPFA encoding runs: 'cuda' where the config allows it and a GPU is there (in the Ray
    cluster for a Ray executor, in this process otherwise), else 'cpu'."""
    if cfg.device == "cpu":
        return "cpu"
    if ex is not None and ex.name == "ray":
        import ray

        has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    else:
        import torch

        has_gpu = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_gpu:
        raise ValueError("device=cuda but no GPU is available (in the Ray cluster, or in this process)")
    return "cuda" if has_gpu else "cpu"


def obtain_gnpfa(out: Path, cfg: ExtractConfig, data_id: str, training_frames: Callable[[], dict],
                 log: Callable[[str], None] = print) -> tuple[Path, str, dict]:
    """Return (checkpoint dir, weights sha256, lineage info). A bootstrap is named by ``data_id``
    (what identifies its training frames: the content-keyed extraction parts) and the GNPFA config;
    ``training_frames`` is called, and the frames loaded, only when it has to be trained."""
    if cfg.gnpfa_checkpoint:
        from models.gnpfa import load_checkpoint

        d = Path(cfg.gnpfa_checkpoint)
        _, _, enc, sha = load_checkpoint(d)
        if enc is None:
            raise ValueError(f"GNPFA checkpoint {d} has no image encoder")
        return d, sha, {"kind": "provided", "path": str(d)}
    frozen = _committed_bootstrap(out)
    if frozen is not None:
        from models.gnpfa import load_checkpoint

        log(f"GNPFA: reusing this dataset's bootstrap {frozen.name} (frozen once shards were committed)")
        return frozen, load_checkpoint(frozen)[3], {"kind": "bootstrap", "path": str(frozen.relative_to(out))}
    import torch

    from models.gnpfa import save_checkpoint, train_geometry, train_image

    h = hashlib.sha256(data_id.encode())
    h.update(repr(sorted((k, v) for k, v in cfg.to_dict().items() if k.startswith("gnpfa"))).encode())
    key = h.hexdigest()[:16]
    d = out / "models" / f"gnpfa-bootstrap-{key}"
    if (d / "config.json").is_file():
        from models.gnpfa import load_checkpoint

        sha = load_checkpoint(d)[3]
        return d, sha, {"kind": "bootstrap", "path": str(d.relative_to(out))}
    train = training_frames()
    if len(train["offsets"]) < 16:
        raise NotEnoughFrames(f"only {len(train['offsets'])} tracked frames: too few to bootstrap GNPFA; "
                           f"provide --set gnpfa_checkpoint=DIR")
    g = _gcfg(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.gnpfa_train_threads)  # fixed thread count: reproducible CPU reductions
    try:
        log(f"GNPFA bootstrap: training on {len(train['offsets'])} frames of this run (no checkpoint configured)")
        vae = train_geometry(train["offsets"], train["neutrals"], g, steps=cfg.gnpfa_geometry_steps, log=log)
        enc = train_image(train["crops"], train["offsets"], train["neutrals"], train["rotations"], vae, g,
                          steps=cfg.gnpfa_image_steps, log=log)
    finally:
        torch.set_num_threads(threads)
    sha = save_checkpoint(d, g, vae, enc, meta={"kind": "bootstrap", "trained_on_frames": len(train["offsets"]),
                                                "data_key": key, "geometry_steps": cfg.gnpfa_geometry_steps,
                                                "image_steps": cfg.gnpfa_image_steps})
    return d, sha, {"kind": "bootstrap", "path": str(d.relative_to(out))}


def _committed_bootstrap(out: Path) -> Path | None:
    """The bootstrap checkpoint the dataset's committed shards were built with, if any: later
    increments encode with it, so latents of committed clips never change."""
    from storage_schemas.dataset import extract_lineage, gnpfa_checkpoint_dir

    if not (out / "tables" / "samples.parquet").is_file():
        return None
    d = gnpfa_checkpoint_dir(out) if (extract_lineage(out).get("gnpfa") or {}).get("kind") == "bootstrap" else None
    return d if d is not None and (d / "config.json").is_file() else None


def dataset_training_arrays(ds_dir: Path, only_ok: bool = True) -> dict:
    """GNPFA training arrays read from a dataset's tables (frames, clips, clip_features) and crops."""
    from extractors.pose import normalise, to_metric
    from storage_schemas import open_dataset

    ds = open_dataset(ds_dir)
    where = "where f.status = 'ok'" if only_ok else ""
    clips = ds.query(f"select c.clip_id, c.width, c.height, f.neutral from clips c join clip_features f "
                     f"using (clip_id) {where} order by c.clip_id").to_pylist()
    off, neu, crops, rots = [], [], [], []
    for c in clips:
        if c["neutral"] is None:
            continue
        t = ds.query(f"select frame, landmarks, rotation, translation, scale from frames where clip_id = "
                     f"'{c['clip_id']}' and tracked order by frame")
        if t.num_rows == 0:
            continue
        frame = np.asarray(t.column("frame").to_numpy())
        lm = np.asarray(t.column("landmarks").combine_chunks().flatten().to_numpy()).reshape(-1, 478, 3)
        r = np.asarray(t.column("rotation").combine_chunks().flatten().to_numpy()).reshape(-1, 3, 3).astype(np.float64)
        tr = np.asarray(t.column("translation").combine_chunks().flatten().to_numpy()).reshape(-1, 3).astype(np.float64)
        sc = np.asarray(t.column("scale").to_numpy()).astype(np.float64)
        neutral = np.asarray(c["neutral"], np.float32).reshape(478, 3)
        g = np.stack([normalise(to_metric(lm[i], c["width"], c["height"]), sc[i], r[i], tr[i]) for i in range(len(lm))])
        off.append((g - neutral).astype(np.float32))
        neu.append(np.repeat(neutral[None], len(g), 0))
        crops.append(np.load(ds_dir / "arrays" / "crops" / f"{c['clip_id']}.npy", allow_pickle=False)[frame])
        rots.append(r.astype(np.float32))
    if not off:
        raise ValueError(f"{ds_dir}: no tracked frames of usable clips to train on")
    return {"offsets": np.concatenate(off), "neutrals": np.concatenate(neu), "crops": np.concatenate(crops),
            "rotations": np.concatenate(rots)}
