"""Wire Media2Face training onto Ray Train (TorchTrainer: DDP over N workers, gloo on CPU, NCCL on
GPU) and generation. The loop itself is models.m2f_train.train (pure torch)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from models.m2f_train import TrainConfig


class _Relay:
    """A Ray actor between the driver and the training run: the controller's callback puts each
    reported step here (Ray Train's own reporting: every rank reports, rank 0's metrics are kept) and
    the driver drains it; the driver asks for a stop here and the workers read it at logged steps."""

    def __init__(self):
        self.records: list[dict] = []
        self.stop = False

    def put(self, rec: dict) -> None:
        self.records.append(rec)

    def drain(self) -> list[dict]:
        out, self.records = self.records, []
        return out

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop


def _callback(relay):
    """A Ray Train callback (it runs in the train controller) forwarding rank 0's reported metrics."""
    import ray.train

    class Forward(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                relay.put.remote(dict(metrics[0]))

    return Forward()


# Ray Train (v2) keeps one pending report per worker and the controller collects it every 2 s
# (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): reporting every logged step blocked training up to 2 s per
# report (measured: a small CPU model went from 0.05 to 0.4 s/step). Steps are reported at most this often.
REPORT_EVERY_S = 2.5

# ...and the start of a run, each report and the end of a run wait for the controller's next poll:
# on a local Ray (one machine, a few workers) it polls every 0.25 s. Measured on 2 cores, an empty
# 2-worker fit: 21.4 s at Ray's default 2 s, 16.5 s at 0.2 s. A cluster keeps its own setting.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def _worker(config: dict) -> None:
    import ray
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
    relay = config.get("relay")
    train(tcfg, report=lambda m: ray.train.report({k: v for k, v in m.items() if isinstance(v, (int, float, str))}),
          should_stop=(lambda: ray.get(relay.stop_requested.remote())) if relay is not None else None,
          report_every_s=REPORT_EVERY_S)


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


PUBLISHED = {"width": 512, "layers": 8}


def check_windows(tcfg: TrainConfig, workers: int) -> None:
    """Before any worker starts: each rank needs at least one full batch per epoch (one window per
    clip per epoch, drop_last), or the loop would wait forever for a batch."""
    from models.data import M2FDWindows
    from models.media2face import M2FConfig

    ds = M2FDWindows(tcfg.dataset, tcfg.split, tcfg.subset, window=M2FConfig(**tcfg.model).window, rank=0,
                     world_size=workers, batch_size=tcfg.batch_size)
    if len(ds) < tcfg.batch_size:
        raise ValueError(f"{len(ds)} training window(s) per epoch for each of {workers} worker(s) ({len(ds.entries)} "
                         f"clips in split {tcfg.split!r}, one window each), fewer than batch_size={tcfg.batch_size}: "
                         f"no epoch would yield a batch; use --set batch_size={max(1, len(ds))}, fewer workers, or more clips")


def cpu_warning(tcfg: TrainConfig, gpus_per_worker: float) -> str | None:
    """A plain word before a CPU run of a model the size of the published one (hours, not minutes)."""
    from models.media2face import M2FConfig

    m = M2FConfig(**tcfg.model)
    if gpus_per_worker > 0 or m.width * m.layers < PUBLISHED["width"] * PUBLISHED["layers"] / 2:
        return None
    return (f"training a model of the published size (width {m.width}, {m.layers} layers) on CPU: a second or more "
            f"per step on a few cores, so {tcfg.max_steps} steps take a while; the measured estimate "
            f"follows the first steps. For a CPU run try --set model.width=128 --set model.layers=2 "
            f"--set batch_size=2; for the published model, --gpus-per-worker 1 on a GPU machine")


def run_training(tcfg: TrainConfig, workers: int = 1, gpus_per_worker: float = 0, cpus_per_worker: int = 1,
                 on_progress: Optional[Callable[[dict], None]] = None,
                 handle_signals: bool = True) -> dict:
    """Launch the training on Ray Train (local Ray started here unless RAY_ADDRESS names a cluster).
    Resumes from the run directory's latest checkpoint. Returns the last reported metrics, with
    ``stopped`` True when a stop was asked for.

    ``on_progress`` gets rank 0's metrics of every logged step (step, max_steps, loss, samples_per_s,
    data_wait_frac, eta_s, validation, ...) as Ray Train reports them, within a second. With
    ``handle_signals`` (main thread only), SIGINT or SIGTERM asks the run to stop: the workers write a
    checkpoint at the next logged step and exit, Ray is shut down, and a later call with the same
    run directory resumes from it; a second signal stops at once (the last periodic checkpoint stays)."""
    import signal
    import threading

    import ray

    check_windows(tcfg, workers)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = False
    if not ray.is_initialized():
        addr = os.environ.get("RAY_ADDRESS")
        if addr:
            ray.init(address=addr, log_to_driver=False, logging_level="warning")
        else:
            for k, v in LOCAL_TRAIN_ENV.items():  # the raylet, and so the train controller, inherit it
                os.environ.setdefault(k, v)
            ray.init(num_cpus=max(os.cpu_count() or 1, workers * cpus_per_worker), include_dashboard=False,
                     log_to_driver=False, logging_level="warning")
        started = True
    old_handlers: dict = {}
    try:
        run_dir = Path(tcfg.run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        tcfg.run_dir = str(run_dir)
        for k in ("dataset", "subset", "style_encoder"):
            v = getattr(tcfg, k)
            if v:
                setattr(tcfg, k, str(Path(v).resolve()))
        relay = ray.remote(num_cpus=0)(_Relay).remote()
        res = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"train": tcfg.to_dict(), "threads": cpus_per_worker, "relay": relay},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=res),
            run_config=RunConfig(name=f"m2f-{run_dir.name}", storage_path=str(run_dir / "ray"),
                                 callbacks=[_callback(relay)]),
        )
        stop = {"asked": 0}

        def on_signal(signum, frame):
            stop["asked"] += 1
            if stop["asked"] == 1:
                relay.request_stop.remote()
            else:
                raise KeyboardInterrupt

        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, on_signal)
        out: dict = {}
        th = threading.Thread(target=lambda: out.update(result=_fit(trainer)), daemon=True)
        th.start()
        while th.is_alive():
            th.join(0.5)
            for rec in ray.get(relay.drain.remote()):
                if on_progress is not None:
                    on_progress(rec)
        for rec in ray.get(relay.drain.remote()):
            if on_progress is not None:
                on_progress(rec)
        result = out["result"]
        if isinstance(result, BaseException):
            raise result
        if result.error:
            raise result.error
        m = {**last_metrics(run_dir), "stopped": bool(stop["asked"])}
        if stop["asked"]:
            from models.m2f_train import latest_checkpoint

            ck = latest_checkpoint(run_dir)
            m["stopped_at_step"] = json.loads((ck / "state.json").read_text())["step"] if ck else 0
        return m
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        if started:
            ray.shutdown()


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as e:  # noqa: BLE001 - handed to the driver's thread
        return e
