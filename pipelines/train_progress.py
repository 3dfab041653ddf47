"""What a person watching a training run sees: a progress line fed by the run's reported steps
(step/max_steps, loss, samples/s, data wait, ETA), validation rounds as lines of their own, and the
whole run's estimate once the first steps are timed. Shared by `m2fd train` and the Dagster asset."""
from __future__ import annotations

from typing import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def describe(rec: dict) -> str:
    """One status line of a reported step."""
    parts = [f"step {rec['step']}/{rec.get('max_steps', '?')}", f"loss {rec.get('loss', float('nan')):.4f}"]
    if "samples_per_s" in rec:
        parts.append(f"{rec['samples_per_s']:.1f} samples/s")
    if "data_wait_frac" in rec:
        parts.append(f"data wait {rec['data_wait_frac']:.0%}")
    parts.append(f"ETA {fmt_s(rec['eta_s'])}" if rec.get("eta_s") is not None else "ETA measuring")
    return ", ".join(parts)


def validation_line(rec: dict) -> str | None:
    if not rec.get("validation") or "val_lve" not in rec:
        return None
    return (f"validation at step {rec['step']} ({rec.get('val_on', '')}): LVE {rec['val_lve']:.3f} "
            f"(mean-motion baseline {rec.get('baseline_lve', float('nan')):.3f}), FDD {rec.get('val_fdd', float('nan')):.4f} "
            f"(baseline {rec.get('baseline_fdd', float('nan')):.4f}) % IOD")


def estimate_line(rec: dict, on_cpu: bool) -> str | None:
    if rec.get("eta_s") is None:
        return None
    total = rec.get("elapsed_s", 0.0) + rec["eta_s"]
    msg = (f"estimate: {fmt_s(total)} for the whole run on this hardware ({rec.get('sec_per_step', 0):.2f} s/step, "
           f"{fmt_s(rec['eta_s'])} to go)")
    if on_cpu and total > 1800:
        msg += ("; that is long for a CPU: --set model.width=128 --set model.layers=2 --set batch_size=2 shrink it, "
                "--gpus-per-worker 1 moves it to a GPU")
    return msg


class TrainProgress:
    """A rich progress bar over a training run; ``update`` takes each reported step."""

    def __init__(self, console, max_steps: int, on_cpu: bool, log: Callable[[str], None] | None = None):
        self.console, self.max_steps, self.on_cpu = console, max_steps, on_cpu
        self.prog = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                             TimeElapsedColumn(), console=console, transient=False)
        self.task = None
        self.estimated = False

    def __enter__(self):
        self.prog.__enter__()
        self.task = self.prog.add_task("starting (Ray Train workers, data loaders)", total=self.max_steps)
        return self

    def __exit__(self, *exc):
        self.prog.__exit__(*exc)

    def update(self, rec: dict) -> None:
        self.prog.update(self.task, completed=rec["step"], total=rec.get("max_steps", self.max_steps),
                         description=describe(rec))
        line = validation_line(rec)
        if line:
            self.prog.console.print(f"[cyan]{line}[/cyan]")
        if not self.estimated:
            est = estimate_line(rec, self.on_cpu)
            if est:
                self.estimated = True
                self.prog.console.print(f"[dim]{est}[/dim]")
