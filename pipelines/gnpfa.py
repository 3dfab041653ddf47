"""GNPFA wiring: which checkpoint a run encodes with (the shipped one by default, a provided folder, the
dataset's committed one, or a bootstrap trained and cached on this run's meshes) and the training data
of `m2fd gnpfa train-*`."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from extractors.config import ExtractConfig


def _gcfg(cfg: ExtractConfig):
    from models.gnpfa import GNPFAConfig

    return GNPFAConfig(z_dim=cfg.gnpfa_z_dim, hidden=cfg.gnpfa_hidden, crop_size=cfg.crop_size,
                       enc_width=cfg.gnpfa_enc_width)


SHIPPED, BOOTSTRAP = "shipped", "bootstrap"  # the two named values of gnpfa_checkpoint (else: a folder)


@dataclass(frozen=True)
class GNPFAChoice:
    """Which GNPFA a run encodes with. kind: 'provided' (a folder in the config), 'shipped' (the
    versioned one in models/assets, copied into the dataset), 'bootstrap' (trained on this run's
    meshes). ``path``: the folder, None for a bootstrap still to train. ``frozen``: the checkpoint the
    dataset's committed shards were built with, kept so that committed latents never change."""
    kind: str
    path: Path | None
    frozen: bool = False


def choose_gnpfa(cfg: ExtractConfig, out: Path | None = None) -> GNPFAChoice:
    """A folder in the config wins; then the dataset's committed GNPFA (``out``); then 'bootstrap' or,
    by default, the shipped one. A folder that is not a checkpoint, or a missing shipped one, is a
    clear error before any work starts."""
    value = cfg.gnpfa_checkpoint or SHIPPED
    if value not in (SHIPPED, BOOTSTRAP):
        d = Path(value)
        if not (d / "config.json").is_file():
            raise ValueError(f"gnpfa_checkpoint {value}: no config.json there (a GNPFA checkpoint folder holds "
                             f"model.safetensors + config.json, as `m2fd gnpfa train-image` writes it; or use "
                             f"'{SHIPPED}' or '{BOOTSTRAP}')")
        return GNPFAChoice("provided", d)
    frozen = _committed_checkpoint(out) if out is not None else None
    if frozen is not None:
        return frozen
    if value == BOOTSTRAP:
        return GNPFAChoice("bootstrap", None)
    from models.gnpfa import SHIPPED_DIR

    if not (SHIPPED_DIR / "config.json").is_file():
        raise ValueError(f"the shipped GNPFA {SHIPPED_DIR} is missing (scripts/build_gnpfa.sh builds it); "
                         f"or set gnpfa_checkpoint={BOOTSTRAP} or a checkpoint folder")
    return GNPFAChoice("shipped", SHIPPED_DIR)


def _committed_checkpoint(out: Path) -> GNPFAChoice | None:
    """The dataset's own copy of the bootstrap or shipped GNPFA its committed shards were built with."""
    from storage_schemas.dataset import extract_lineage, gnpfa_checkpoint_dir

    if not (out / "tables" / "samples.parquet").is_file():
        return None
    kind = (extract_lineage(out).get("gnpfa") or {}).get("kind")
    d = gnpfa_checkpoint_dir(out) if kind in (BOOTSTRAP, SHIPPED) else None
    return GNPFAChoice(kind, d, frozen=True) if d is not None and (d / "config.json").is_file() else None


def crops_for_checkpoint(cfg: ExtractConfig, out: Path | None = None) -> ExtractConfig:
    """Face crops are cut at the size the chosen checkpoint's image encoders take (its config.json
    says); a bootstrap still to train takes the configured crop_size."""
    import dataclasses

    from models.gnpfa import checkpoint_config

    d = choose_gnpfa(cfg, out).path
    if d is None:
        return cfg
    size = checkpoint_config(d)[0].crop_size
    return dataclasses.replace(cfg, crop_size=size) if size != cfg.crop_size else cfg


class NotEnoughFrames(RuntimeError):
    """Too few tracked frames to train a bootstrap GNPFA (and no checkpoint was provided)."""


def gnpfa_device(cfg: ExtractConfig, ex) -> str:
    """Where GNPFA encoding runs: 'cuda' where the config allows it and the executor can place a GPU
    task (a GPU in the Ray cluster, or in this process in-process), else 'cpu'."""
    if cfg.device == "cpu":
        return "cpu"
    has_gpu = ex.has_gpu()
    if cfg.device == "cuda" and not has_gpu:
        raise ValueError("device=cuda but no GPU is available (in the Ray cluster, or in this process)")
    return "cuda" if has_gpu else "cpu"


def obtain_gnpfa(out: Path, cfg: ExtractConfig, data_id: str, training_frames: Callable[[], dict],
                 log: Callable[[str], None] = print) -> tuple[Path, str, dict]:
    """Return (checkpoint dir, weights sha256, lineage info) for choose_gnpfa's choice. The shipped
    GNPFA is checked against its sha256 and copied into the dataset (models/<name>-<sha>), so the dataset
    decodes its latents whatever code reads it later. A bootstrap is named by ``data_id`` (what identifies
    its training frames: the content-keyed extraction parts) and the GNPFA config; ``training_frames``
    is called, and the frames loaded, only when it has to be trained."""
    from models.gnpfa import load_checkpoint

    choice = choose_gnpfa(cfg, out)
    if choice.kind == "provided":
        _, _, enc, sha = load_checkpoint(choice.path)
        if enc is None:
            raise ValueError(f"GNPFA checkpoint {choice.path} has no image encoder")
        return choice.path, sha, {"kind": "provided", "path": str(choice.path)}
    if choice.frozen:
        meta = json.loads((choice.path / "config.json").read_text())
        log(f"GNPFA: reusing this dataset's {choice.kind} {choice.path.name} (frozen once shards were committed)")
        return choice.path, load_checkpoint(choice.path)[3], _info(out, choice.kind, choice.path, meta)
    if choice.kind == SHIPPED:
        return _shipped_copy(out)
    import torch

    from models.gnpfa import save_checkpoint, train_geometry, train_image

    h = hashlib.sha256(data_id.encode())
    h.update(repr(sorted((k, v) for k, v in cfg.to_dict().items() if k.startswith("gnpfa"))).encode())
    key = h.hexdigest()[:16]
    d = out / "models" / f"gnpfa-bootstrap-{key}"
    if (d / "config.json").is_file():
        return d, load_checkpoint(d)[3], {"kind": BOOTSTRAP, "path": str(d.relative_to(out))}
    train = training_frames()
    if len(train["offsets"]) < 16:
        raise NotEnoughFrames(f"only {len(train['offsets'])} tracked frames: too few to bootstrap GNPFA; "
                              f"use the shipped one (gnpfa_checkpoint={SHIPPED}) or a checkpoint folder")
    g = _gcfg(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.gnpfa_train_threads)  # fixed thread count: reproducible CPU reductions
    try:
        log(f"GNPFA bootstrap: training on {len(train['offsets'])} frames of this run (gnpfa_checkpoint={BOOTSTRAP})")
        vae = train_geometry(train["offsets"], train["neutrals"], g, steps=cfg.gnpfa_geometry_steps, log=log)
        enc = train_image(train["crops"], train["offsets"], train["neutrals"], train["rotations"], vae, g,
                          steps=cfg.gnpfa_image_steps, log=log)
    finally:
        torch.set_num_threads(threads)
    sha = save_checkpoint(d, g, vae, enc, meta={"kind": BOOTSTRAP, "trained_on_frames": len(train["offsets"]),
                                                "data_key": key, "geometry_steps": cfg.gnpfa_geometry_steps,
                                                "image_steps": cfg.gnpfa_image_steps})
    return d, sha, {"kind": BOOTSTRAP, "path": str(d.relative_to(out))}


def _info(out: Path, kind: str, d: Path, meta: dict) -> dict:
    info = {"kind": kind, "path": str(d.relative_to(out))}
    return {**info, "name": meta["name"]} if kind == SHIPPED else info


def _shipped_copy(out: Path) -> tuple[Path, str, dict]:
    """The shipped GNPFA, verified (weights sha256 = SHIPPED_SHA256 = its config.json's), as the dataset's
    own copy."""
    from models.gnpfa import SHIPPED_DIR, SHIPPED_NAME, SHIPPED_SHA256, checkpoint_config, load_checkpoint

    from storage_schemas import atomic_write_bytes

    sha = hashlib.sha256((SHIPPED_DIR / "model.safetensors").read_bytes()).hexdigest()
    meta = checkpoint_config(SHIPPED_DIR)[1]
    if sha != SHIPPED_SHA256 or meta.get("sha256") != sha:
        raise ValueError(f"the shipped GNPFA {SHIPPED_DIR} has weights sha256 {sha[:16]}, config.json says "
                         f"{str(meta.get('sha256'))[:16]}, the code expects {SHIPPED_SHA256[:16]}: the files were "
                         f"changed; restore them (git checkout {SHIPPED_DIR.relative_to(SHIPPED_DIR.parents[2])})")
    d = out / "models" / f"{SHIPPED_NAME}-{sha[:16]}"
    if not (d / "config.json").is_file() or load_checkpoint(d)[3] != sha:
        for f in ("model.safetensors", "config.json"):  # weights first: config.json marks a complete copy
            atomic_write_bytes(d / f, (SHIPPED_DIR / f).read_bytes())
    return d, sha, _info(out, SHIPPED, d, meta)


def dataset_training_arrays(ds_dir: Path, only_ok: bool = True, fraction: float = 1.0) -> dict:
    """GNPFA training arrays read from a dataset's tables (frames, clips, clip_features) and crops, clip
    by clip; ``fraction`` < 1 keeps a seeded per-clip sample of the tracked frames (sample_mask)."""
    from extractors.pose import normalise, to_metric
    from extractors.records import sample_mask
    from storage_schemas import open_dataset
    from storage_schemas.arrays import read_array

    ds = open_dataset(ds_dir)
    where = "where f.status = 'ok'" if only_ok else ""
    clips = ds.query(f"select c.clip_id, c.width, c.height, c.n_frames, f.neutral from clips c join clip_features f "
                     f"using (clip_id) {where} order by c.clip_id").to_pylist()
    off, neu, crops, rots = [], [], [], []
    for c in clips:
        if c["neutral"] is None:
            continue
        t = ds.query(f"select frame, landmarks, rotation, translation, scale from frames where clip_id = "
                     f"'{c['clip_id']}' and tracked order by frame")
        if fraction < 1.0:
            keep = sample_mask(c["clip_id"], c["n_frames"], fraction)[np.asarray(t.column("frame").to_numpy())]
            t = t.filter(keep)
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
        crops.append(read_array(ds_dir, "crops", c["clip_id"], n_frames=c["n_frames"])[frame])
        rots.append(r.astype(np.float32))
    if not off:
        raise ValueError(f"{ds_dir}: no tracked frames of usable clips to train on")
    return {"offsets": np.concatenate(off), "neutrals": np.concatenate(neu), "crops": np.concatenate(crops),
            "rotations": np.concatenate(rots)}


def training_data(datasets: list[Path], max_frames: int, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Training arrays of `m2fd gnpfa train-*` over extracted datasets (a seeded per-clip sample of at
    most about ``max_frames`` tracked frames in all, read clip by clip) and the recipe's inputs: each
    dataset's sources (file, sha256) and extraction config."""
    from pipelines.lineage import code_version
    from storage_schemas import open_dataset
    from storage_schemas.dataset import CARD

    inputs, total = [], 0
    for d in datasets:
        ds = open_dataset(d)
        total += ds.query("select count(*) n from frames f join clip_features c using (clip_id) "
                          "where f.tracked and c.status = 'ok'").to_pylist()[0]["n"]
        srcs = ds.query("select regexp_extract(uri, '[^/]+$') file, sha256 from sources order by sha256").to_pylist()
        card = Path(d) / CARD
        inputs.append({"dataset": Path(d).name, "sources": srcs,
                       "extract_config": (json.loads(card.read_text())["lineage"]["config"]["extract"]
                                          if card.is_file() else None)})
    frac = min(1.0, max_frames / max(1, total))
    if frac < 1.0:
        log(f"a seeded sample of {frac:.1%} of {total} tracked frames (max_frames={max_frames})")
    parts = [dataset_training_arrays(Path(d), fraction=frac) for d in datasets]
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    log(f"{len(data['offsets'])} training frames of {sum(len(i['sources']) for i in inputs)} sources")
    return data, {"inputs": inputs, "max_frames": max_frames, "code": code_version(), "data_sha256": arrays_sha256(data)}


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over named arrays (name, dtype, shape and bytes, in name order): which training data a
    checkpoint saw, so two trainings that disagree can be told apart by data or by arithmetic."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.data)
    return h.hexdigest()
