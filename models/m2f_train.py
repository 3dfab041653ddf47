"""The Media2Face training loop, pure torch (pipelines/train.py runs it on Ray Train).

DDP when torch.distributed is initialised (Ray Train sets it up), bf16 autocast on CUDA, gradient
clipping, EMA weights, checkpoints as safetensors (model, EMA, optimizer state, RNG states) plus
JSON, exact resume (same data order and random draws as an uninterrupted run), metrics to CSV and
TensorBoard, validation every N steps in GNPFA-decoded vertex space (LVE, FDD) next to a
mean-motion baseline.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .data import M2FDWindows
from .media2face import DiffusionLoss, M2FConfig, Media2Face, ddim_sample, training_loss


@dataclass
class TrainConfig:
    dataset: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    val_split: str = "val"  # falls back to the training clips when the dataset has no such split (said in the metrics)
    run_dir: str = "out/train"
    model: dict = field(default_factory=dict)  # M2FConfig overrides
    style_encoder: Optional[str] = None  # a CLIP checkpoint dir (transformers); None: no style input
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 100
    max_steps: int = 1000
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0
    loader_workers: int = 2
    log_every: int = 10
    val_every: int = 200
    val_steps: int = 20  # DDIM steps for validation samples
    val_max_windows: int = 16
    ckpt_every: int = 200
    device: str = "auto"
    bf16: bool = True
    compile: bool = False  # torch.compile the denoiser (GPU throughput)
    compile_mode: Optional[str] = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    # or inductor options instead of a mode (torch takes one or the other), e.g. {"max_autotune_gemm": true}
    # (Triton GEMM templates, which can take the following pointwise ops into their epilogues, benchmarked
    # against cuBLAS; on an H100 cuBLAS won every GEMM of the published model: bench/RESULTS.md)
    compile_options: Optional[dict] = None
    timing_warmup: int = 0  # throughput counters (samples/s, data wait) start after this many steps
    profile_steps: int = 0  # rank 0 profiles this many steps just before timing starts -> run_dir/profile.txt

    def __post_init__(self):
        if self.compile_mode and self.compile_options:
            raise ValueError("set compile_mode or compile_options, not both (torch.compile takes one of them)")

    def to_dict(self) -> dict:
        return asdict(self)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(cfg.device)


def motion_of(batch: dict, device=None) -> torch.Tensor:
    """x0 = [latents, pose]: each (pinned) array goes to the device first, then they are joined there
    (joining on the host would make a pageable tensor, whose copy blocks the host until the GPU drains)."""
    return torch.cat([batch["latents"].to(device, non_blocking=True), batch["pose"].to(device, non_blocking=True)],
                     -1).float()


# ------------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON, no pickle

def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        _, pid, name = k.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for k, v in meta["scalars"].items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_checkpoint(d: Path, model: torch.nn.Module, ema: torch.nn.Module, opt, sched, state: dict,
                          mcfg: M2FConfig, tcfg: TrainConfig, rng: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save

    from storage_schemas import atomic_write_bytes, write_json

    d.mkdir(parents=True, exist_ok=True)
    weights = save(dict(sorted((k, v.detach().cpu().contiguous()) for k, v in model.state_dict().items())))
    atomic_write_bytes(d / "model.safetensors", weights)
    atomic_write_bytes(d / "ema.safetensors", save(dict(sorted(
        (k, v.detach().cpu().contiguous()) for k, v in ema.state_dict().items()))))
    ot, ometa = _flat_optimizer(opt)
    atomic_write_bytes(d / "optimizer.safetensors", save({**ot, **{f"rng.{k}": v for k, v in rng.items()}}))
    sha = hashlib.sha256(weights).hexdigest()
    write_json(d / "state.json", {"format": "m2fd-media2face", "model": mcfg.to_dict(), "train": tcfg.to_dict(),
                                  "optimizer": ometa, "scheduler": sched.state_dict(), "sha256": sha, **state})
    return sha


def load_model(ckpt: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> tuple[Media2Face, dict]:
    """A trained Media2Face (EMA weights by default) and its state.json."""
    from safetensors.torch import load_file

    d = Path(ckpt)
    st = json.loads((d / "state.json").read_text())
    if st.get("format") != "m2fd-media2face":
        raise ValueError(f"{d} is not a Media2Face checkpoint (state.json format {st.get('format')!r})")
    m = Media2Face(M2FConfig.from_dict(st["model"]))
    m.load_state_dict(load_file(str(d / ("ema.safetensors" if ema else "model.safetensors"))))
    return m.to(device).eval(), st


def write_profile(prof, path: Path, device_type: str, steps: int) -> None:
    """The profiled steps' operators and kernels by self time on the device (CPU time on CPU)."""
    key = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90)
    from storage_schemas import atomic_write_bytes

    atomic_write_bytes(path, f"# {steps} training steps, sorted by {key}\n{table}\n".encode())


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    cks = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    cks = [c for c in cks if (c / "state.json").is_file()]  # state.json is written last: complete
    return cks[-1] if cks else None


# ------------------------------------------------------------------------------------------------
# style embeddings and validation geometry

def style_table(tcfg: TrainConfig, root: Path, clip_ids: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """clip_id -> style embedding of its caption (empty when no style encoder is configured)."""
    if not tcfg.style_encoder:
        return {}, 0
    from storage_schemas import open_dataset

    from .style import StyleEncoder

    enc = StyleEncoder(tcfg.style_encoder)
    ds = open_dataset(root)
    caps = {r["clip_id"]: r["caption"] or "" for r in ds.query("select clip_id, caption from labels").to_pylist()}
    ids = sorted(set(clip_ids))
    emb = enc.embed_text([caps.get(c, "") for c in ids])
    return dict(zip(ids, emb)), enc.dim


class Geometry:
    """Decode GNPFA latents to vertices (dataset's checkpoint, per-clip neutral) for LVE / FDD."""

    def __init__(self, root: Path):
        from storage_schemas import open_dataset
        from storage_schemas.dataset import gnpfa_checkpoint_dir

        from .gnpfa import load_checkpoint

        _, self.vae, _, _ = load_checkpoint(gnpfa_checkpoint_dir(root, required=True))
        ds = open_dataset(root)
        self.neutral = {r["clip_id"]: np.asarray(r["neutral"], np.float32) for r in
                        ds.query("select clip_id, neutral from clip_features where neutral is not null").to_pylist()}

    @torch.no_grad()
    def vertices(self, z: torch.Tensor, clip_id: str) -> torch.Tensor:
        n = torch.from_numpy(self.neutral[clip_id]).reshape(1, -1).expand(len(z), -1)
        return self.vae.decode(z.float().cpu(), n).view(len(z), -1, 3)


def lve_fdd(pred_v: torch.Tensor, gt_v: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """LVE: per frame the max lip-vertex L2 error, averaged; FDD: upper-face vertices' temporal std of
    displacement magnitude, |std_gt - std_pred| averaged. In % of inter-ocular distance."""
    from storage_schemas.regions import LIPS, UPPER_FACE

    m = mask.bool().cpu()
    p, g = pred_v[m], gt_v[m]
    lve = (p[:, LIPS] - g[:, LIPS]).norm(dim=-1).max(-1).values.mean().item() * 100
    up_p = (p[:, UPPER_FACE] - p[:, UPPER_FACE].mean(0)).norm(dim=-1).std(0)
    up_g = (g[:, UPPER_FACE] - g[:, UPPER_FACE].mean(0)).norm(dim=-1).std(0)
    fdd = (up_g - up_p).abs().mean().item() * 100
    return lve, fdd


# ------------------------------------------------------------------------------------------------

def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    prog = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))


class RunClock:
    """Wall-time estimate of a training run from its own steps: seconds per training step measured
    after the first ``skip`` steps (start-up, first-step allocation and compilation excluded), plus
    the validation rounds still to come at the measured cost of the last one."""

    def __init__(self, start_step: int, max_steps: int, val_every: int, skip: int = 2):
        self.max_steps, self.val_every, self.skip = max_steps, val_every, skip
        self.t0 = time.perf_counter()
        self.first_step = start_step
        self.t_mark: float | None = None
        self.step_mark = start_step
        self.val_s = 0.0  # wall time spent validating since the mark
        self.last_val_s: float | None = None

    def step_done(self, step: int) -> None:
        if self.t_mark is None and step >= self.first_step + self.skip:
            self.t_mark, self.step_mark, self.val_s = time.perf_counter(), step, 0.0

    def validated(self, seconds: float) -> None:
        self.last_val_s = seconds
        if self.t_mark is not None:
            self.val_s += seconds

    def sec_per_step(self, step: int) -> float | None:
        if self.t_mark is None or step <= self.step_mark:
            return None
        return (time.perf_counter() - self.t_mark - self.val_s) / (step - self.step_mark)

    def eta_s(self, step: int) -> float | None:
        sps = self.sec_per_step(step)
        if sps is None:
            return None
        left = max(0, self.max_steps - step)
        vals = 0
        if self.val_every > 0:  # rounds at multiples of val_every, and one at max_steps
            vals = self.max_steps // self.val_every - step // self.val_every
            vals += self.max_steps % self.val_every != 0 and step < self.max_steps
        return left * sps + vals * (self.last_val_s or 0.0)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0


def _agree(flags: list[bool], dist: bool, dev: torch.device) -> list[bool]:
    """Per flag, whether any rank raised it (every rank calls this at the same steps)."""
    if not dist:
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags],
                     device=dev if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(x > 0) for x in t.tolist()]


def train(tcfg: TrainConfig, report: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          report_every_s: float = 0.0) -> dict:
    """Train (or resume from the run's latest checkpoint) until max_steps. ``report`` gets the metrics
    of every logged step (Ray Train's report in pipelines), with ``eta_s`` (this run's remaining wall
    time, once measured), ``elapsed_s`` and ``validation`` (1 on a validation round). ``should_stop``
    is asked at every logged step (the same steps on every rank; any rank's yes stops all): the run
    then writes a checkpoint and returns, to be resumed from it."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    world = torch.distributed.get_world_size() if dist else 1
    dev = _device(tcfg)
    run_dir = Path(tcfg.run_dir)
    train_ds = M2FDWindows(tcfg.dataset, tcfg.split, tcfg.subset, window=M2FConfig(**tcfg.model).window,
                           seed=tcfg.seed, rank=rank, world_size=world, batch_size=tcfg.batch_size)
    root = train_ds.root
    if len(train_ds) == 0:
        raise ValueError(f"no training clips for rank {rank} of {world} in {root} (split {tcfg.split!r})")
    if len(train_ds) < tcfg.batch_size:  # one window per clip per epoch: not one full batch (drop_last)
        raise ValueError(f"{len(train_ds)} training window(s) per epoch on each of {world} rank(s) in {root} "
                         f"(one per clip of split {tcfg.split!r}), fewer than batch_size={tcfg.batch_size}: no epoch "
                         f"would yield a batch; use --set batch_size={len(train_ds)} (or fewer workers, or more clips)")
    styles, style_dim = style_table(tcfg, root, [e["clip_id"] for e in train_ds.entries])
    mcfg = M2FConfig(**{**tcfg.model, "style_dim": style_dim})
    torch.manual_seed(tcfg.seed)
    model = Media2Face(mcfg).to(dev)
    ema = Media2Face(mcfg).to(dev)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.99),
                            fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, tcfg))
    gen = torch.Generator(device=dev).manual_seed(tcfg.seed * 1000 + rank)  # diffusion draws, on the device
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "motion_sum": [0.0] * mcfg.motion_dim, "motion_n": 0,
             "best_val_lve": None}
    ck = latest_checkpoint(run_dir)
    rng_restore = None
    if ck is not None:  # exact resume
        from safetensors.torch import load_file

        st = json.loads((ck / "state.json").read_text())
        model.load_state_dict(load_file(str(ck / "model.safetensors"), device=str(dev)))
        ema.load_state_dict(load_file(str(ck / "ema.safetensors"), device=str(dev)))
        flat = load_file(str(ck / "optimizer.safetensors"))
        opt.load_state_dict(_unflat_optimizer({k: v for k, v in flat.items() if k.startswith("state.")}, st["optimizer"]))
        sched.load_state_dict(st["scheduler"])
        rng_restore = {k: flat[f"rng.{k}{rank}"] if f"rng.{k}{rank}" in flat else flat[f"rng.{k}0"]
                       for k in ("gen", "torch", "cuda") if f"rng.{k}0" in flat}
        state = {k: st.get(k, state[k]) for k in state}
    # the whole loss (noising, denoiser, loss terms) is one module: DDP wraps it, torch.compile fuses it
    step_loss = DiffusionLoss(model)
    net = torch.nn.parallel.DistributedDataParallel(step_loss, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if dist and world > 1 else step_loss  # one process: no gradient all-reduce to pay for
    if tcfg.compile:
        net = torch.compile(net, mode=tcfg.compile_mode, options=tcfg.compile_options)
    val_ds = None
    tb = None
    csv_path = run_dir / "metrics.csv"
    if rank == 0 and tcfg.val_every > 0:
        try:
            val_ds = M2FDWindows(tcfg.dataset, tcfg.val_split, None, window=mcfg.window, shuffle=False, rank=0,
                                 world_size=1) if tcfg.subset is None else None
        except Exception:
            val_ds = None
        if val_ds is None or not val_ds.entries:
            val_ds = M2FDWindows(root if tcfg.subset is None else None, tcfg.split, tcfg.subset, window=mcfg.window,
                                 shuffle=False, rank=0, world_size=1)
            val_on = f"{tcfg.split} (no {tcfg.val_split} split)"
        else:
            val_on = tcfg.val_split
        geometry = Geometry(root)
    if rank == 0:
        (run_dir / "tb").mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard not installed: metrics.csv only
            tb = None
    autocast = dev.type == "cuda" and tcfg.bf16
    msum = torch.tensor(state["motion_sum"], dtype=torch.float64, device=dev)
    mcount = torch.tensor(float(state["motion_n"]), dtype=torch.float64, device=dev)

    def sync_state() -> None:  # the running mean motion (mean-motion baseline) into the saved state
        state["motion_sum"] = msum.cpu().tolist()
        state["motion_n"] = int(mcount.item())

    # throughput: wall time between synchronised log points; data wait = time blocked on the loader
    # (the GPU runs asynchronously, so a loader that keeps ahead costs nothing)
    t_data = 0.0
    t_start = time.perf_counter()
    samples = 0
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    history: list[dict] = []
    done = False
    prof = None
    if rng_restore is not None:  # last, after everything that draws random numbers while setting up
        _restore_rng(gen, rng_restore)
    # one loader for the whole run: its workers persist across epochs (no start-up stall per epoch)
    # and follow the dataset's shared epoch; the data order depends on (seed, epoch) only
    loader = torch.utils.data.DataLoader(train_ds, batch_size=tcfg.batch_size, num_workers=tcfg.loader_workers,
                                         pin_memory=dev.type == "cuda", drop_last=True,
                                         persistent_workers=tcfg.loader_workers > 0,
                                         # its own generator: iterating a loader must not draw from the
                                         # global RNG (dropout), or a resumed run would diverge
                                         generator=torch.Generator().manual_seed(tcfg.seed * 7919))
    clock = RunClock(state["step"], tcfg.max_steps, tcfg.val_every)
    stopped = False
    last_report = -float("inf")
    while not done:
        train_ds.set_epoch(state["epoch"])
        it = iter(loader)
        for _ in range(state["batch_in_epoch"]):  # resume mid-epoch: same batches as an uninterrupted run
            next(it)
        batches_this_epoch = state["batch_in_epoch"]
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                if batches_this_epoch == 0:
                    raise RuntimeError(f"epoch {state['epoch']} yielded no full batch of {tcfg.batch_size} on rank "
                                       f"{rank} (loader workers each keep whole batches): lower batch_size or "
                                       f"loader_workers") from None
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                break
            batches_this_epoch += 1
            t1 = time.perf_counter()
            if rank == 0 and tcfg.profile_steps and state["step"] == tcfg.timing_warmup - tcfg.profile_steps:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else []))
                prof.start()
            x0 = motion_of(batch, dev)
            audio = batch["audio_feat"].to(dev, non_blocking=True).float()
            mask = batch["mask"].to(dev, non_blocking=True)
            style = torch.from_numpy(np.stack([styles[c] for c in batch["clip_id"]])).to(dev) if styles else None
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                L = training_loss(model, x0, audio, style, mask, gen, forward=net)
            opt.zero_grad(set_to_none=True)
            L["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1 - tcfg.ema)
                m = mask.float()[..., None]
                msum += (x0.float() * m).sum((0, 1))  # on the device: no host sync per step
                mcount += m.sum()
            t_data += t1 - t0
            samples += x0.shape[0] * world
            state["step"] += 1
            if prof is not None and state["step"] == tcfg.timing_warmup:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                prof.stop()
                write_profile(prof, run_dir / "profile.txt", dev.type, tcfg.profile_steps)
                prof = None
            if state["step"] == tcfg.timing_warmup:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t_data, samples, t_start = 0.0, 0, time.perf_counter()
            state["batch_in_epoch"] += 1
            step = state["step"]
            clock.step_done(step)
            rec = None
            is_val = tcfg.val_every > 0 and (step % tcfg.val_every == 0 or step == tcfg.max_steps)
            if step % tcfg.log_every == 0 or step == 1 or is_val:  # the same steps on every rank
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t_start
                rec = {"step": step, "epoch": state["epoch"], **{k: float(v.detach()) for k, v in L.items()},
                       "grad_norm": float(gnorm), "lr": sched.get_last_lr()[0],
                       "data_wait_frac": t_data / max(1e-9, wall), "samples_per_s": samples / max(1e-9, wall)}
            if rec is not None:
                eta = clock.eta_s(step)
                rec.update({"elapsed_s": clock.elapsed_s(), "validation": int(is_val), "max_steps": tcfg.max_steps,
                            **({"eta_s": eta, "sec_per_step": clock.sec_per_step(step)} if eta is not None else {})})
            if rank == 0 and is_val:
                sync_state()
                tv = time.perf_counter()
                rec = {**rec, **validate(ema, val_ds, geometry, styles, state, tcfg, dev), "val_on": val_on}
                clock.validated(time.perf_counter() - tv)
                if math.isfinite(rec["val_lve"]) and (state["best_val_lve"] is None or rec["val_lve"] < state["best_val_lve"]):  # the EMA model with the lowest validation LVE
                    state["best_val_lve"] = rec["val_lve"]
                    save_train_checkpoint(run_dir / "best", model, ema, opt, sched, {**state, "best_step": step},
                                          mcfg, tcfg, {f"{k}0": v for k, v in _rng_states(gen).items()})
            if rec is None and should_stop is not None and dev.type == "cpu":
                # CPU steps are slow (seconds for the published size): ask every step, not every log step
                stopped = _agree([should_stop()], dist, dev)[0]
            if rec is not None:
                history.append(rec)
                if rank == 0:
                    _log(rec, tb, csv_path)
                now = time.perf_counter()
                last = step >= tcfg.max_steps
                due, stop_now = _agree([is_val or last or now - last_report >= report_every_s,
                                        should_stop is not None and should_stop()], dist, dev)
                stopped = stop_now
                if report is not None and (due or stopped):
                    report(rec)
                    last_report = now
            if step % tcfg.ckpt_every == 0 or step == tcfg.max_steps or stopped:
                sync_state()
                _checkpoint(run_dir, step, model, ema, opt, sched, state, mcfg, tcfg, gen, rank, world, dist)
            if step >= tcfg.max_steps or stopped:
                done = True
                break
    if tb is not None:
        tb.close()
    return {"step": state["step"], "history": history, "run_dir": str(run_dir), "stopped": stopped}


def _rng_states(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """This process's random streams: the diffusion draws, the CPU default RNG and, on CUDA, the
    device's default RNG (dropout, also inside compiled kernels)."""
    out = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
    if gen.device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(gen.device)
    return out


def _restore_rng(gen: torch.Generator, saved: dict[str, torch.Tensor]) -> None:
    try:
        gen.set_state(saved["gen"])
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's random state does not fit this run's {gen.device.type} generator: it "
                         f"was written on another device type, or on a GPU before the diffusion draws moved to "
                         f"the device; resume where it was trained ({e})") from None
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and gen.device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda"], gen.device)


def _checkpoint(run_dir, step, model, ema, opt, sched, state, mcfg, tcfg, gen, rank, world, dist):
    # every rank's RNG states go into the one checkpoint so each resumes its own streams
    mine = _rng_states(gen)
    rng = {}
    for name, x in mine.items():
        if dist:
            xs = [torch.empty_like(x) for _ in range(world)]
            _gather(xs, x)
        else:
            xs = [x]
        rng.update({f"{name}{i}": v for i, v in enumerate(xs)})
    if rank == 0:
        save_train_checkpoint(run_dir / "checkpoints" / f"step-{step:08d}", model, ema, opt, sched, state, mcfg, tcfg, rng)
    if dist:
        torch.distributed.barrier()


def _gather(out: list[torch.Tensor], x: torch.Tensor) -> None:
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
        outs = [o.to(dev) for o in out]
        torch.distributed.all_gather(outs, x.to(dev))
        for o, r in zip(out, outs):
            o.copy_(r.cpu())
    else:
        torch.distributed.all_gather(out, x)


def _log(rec: dict, tb, csv_path: Path) -> None:
    if tb is not None:
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                tb.add_scalar(k, v, rec["step"])
        tb.flush()
    fields = ["step", "epoch", "loss", "simple", "velocity", "smooth", "grad_norm", "lr", "data_wait_frac",
              "samples_per_s", "val_lve", "val_fdd", "baseline_lve", "baseline_fdd", "val_windows", "val_on"]
    new = not csv_path.is_file()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(rec)


@torch.no_grad()
def validate(ema: Media2Face, val_ds: M2FDWindows, geometry: Geometry, styles: dict, state: dict, tcfg: TrainConfig,
             dev: torch.device) -> dict:
    """LVE / FDD of EMA samples (DDIM, fixed seed) on validation windows vs the mean-motion baseline."""
    ema.eval()
    z_dim = ema.cfg.z_dim
    mean = torch.tensor(state["motion_sum"]) / max(1, state["motion_n"])
    g = torch.Generator(device="cpu").manual_seed(1234)
    out = {"val_lve": [], "val_fdd": [], "baseline_lve": [], "baseline_fdd": []}
    for i, s in enumerate(val_ds):
        if i >= tcfg.val_max_windows:
            break
        if s["clip_id"] not in geometry.neutral:
            continue
        audio = s["audio_feat"][None].float().to(dev)
        style = torch.from_numpy(styles[s["clip_id"]])[None].to(dev) if styles else None
        noise = torch.randn((1, ema.cfg.window, ema.cfg.motion_dim), generator=g).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" and tcfg.bf16):
            x = ddim_sample(ema, audio, style, tcfg.val_steps, noise=noise)[0].float().cpu()
        gt = torch.cat([s["latents"], s["pose"]], -1).float()
        gv = geometry.vertices(gt[:, :z_dim], s["clip_id"])
        pv = geometry.vertices(x[:, :z_dim], s["clip_id"])
        bv = geometry.vertices(mean[:z_dim].expand(len(gt), -1), s["clip_id"])
        lve, fdd = lve_fdd(pv, gv, s["mask"])
        blve, bfdd = lve_fdd(bv, gv, s["mask"])
        out["val_lve"].append(lve)
        out["val_fdd"].append(fdd)
        out["baseline_lve"].append(blve)
        out["baseline_fdd"].append(bfdd)
    ema.train()
    res = {k: float(np.mean(v)) if v else float("nan") for k, v in out.items()}
    res["val_windows"] = len(out["val_lve"])
    return res
