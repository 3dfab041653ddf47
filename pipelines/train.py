"""Wire Media2Face training onto Ray Train (TorchTrainer: DDP over N workers, gloo on CPU, NCCL on
GPU) and generation. The loop itself is models.m2f_train.train (pure torch)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from models.m2f_train import TrainConfig


def _worker(config: dict) -> None:
    import ray.train
    import torch

    from models.m2f_train import train

    tcfg = TrainConfig(**config["train"])
    if torch.cuda.is_available() and tcfg.device in ("auto", "cuda"):
        import ray.train.torch

        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
        tcfg.device = str(dev)
    else:
        tcfg.device = "cpu"
        torch.set_num_threads(max(1, int(config.get("threads", 1))))
    train(tcfg, report=lambda m: ray.train.report({k: v for k, v in m.items() if isinstance(v, (int, float, str))}),
          stop_after=config.get("stop_after"))


def last_metrics(run_dir: Path) -> dict:
    """The last row of the run's metrics.csv (rank 0 writes it), numbers parsed."""
    import csv

    p = Path(run_dir) / "metrics.csv"
    if not p.is_file():
        return {}
    rows = list(csv.DictReader(open(p)))
    out: dict = {}
    for k, v in (rows[-1] if rows else {}).items():
        if v in ("", None):
            continue
        try:
            out[k] = int(v) if k in ("step", "epoch", "val_windows") else float(v)
        except ValueError:
            out[k] = v
    return out


def run_training(tcfg: TrainConfig, workers: int = 1, gpus_per_worker: float = 0, cpus_per_worker: int = 1,
                 stop_after: Optional[int] = None) -> dict:
    """Launch the training on Ray Train (local Ray started here unless RAY_ADDRESS names a cluster).
    Resumes from the run directory's latest checkpoint. Returns the last reported metrics."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = False
    if not ray.is_initialized():
        addr = os.environ.get("RAY_ADDRESS")
        if addr:
            ray.init(address=addr, log_to_driver=False, logging_level="warning")
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, workers * cpus_per_worker), include_dashboard=False,
                     log_to_driver=False, logging_level="warning")
        started = True
    try:
        run_dir = Path(tcfg.run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        tcfg.run_dir = str(run_dir)
        for k in ("dataset", "subset", "style_encoder"):
            v = getattr(tcfg, k)
            if v:
                setattr(tcfg, k, str(Path(v).resolve()))
        res = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"train": tcfg.to_dict(), "threads": cpus_per_worker, "stop_after": stop_after},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=res),
            run_config=RunConfig(name=f"m2f-{run_dir.name}", storage_path=str(run_dir / "ray")),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        return last_metrics(run_dir)
    finally:
        if started:
            ray.shutdown()
