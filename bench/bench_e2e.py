"""End-to-end ingest benchmark on the shared real videos, measured side by side in one run.

Prints:
  * the pipeline (`m2fd run`: the Dagster job on a local Ray with N CPUs, ingest -> tracks ->
    GNPFA encoding with a provided checkpoint -> labels -> shards -> card) in input frames/s
    (frames of the input videos on the 30 fps grid per wall second, process start to exit), next to
    the input frames/s of its slowest stage run alone on the same N CPUs (target >= 0.85x);
  * per-stage wall and CPU seconds inside the pipeline run (CPU from the stage's own task timers);
  * peak memory (driver + Ray processes, summed RSS sampled every 0.1 s) at 1x and 4x the input
    (4x = four byte-distinct remuxes of every video, so nothing is deduplicated; target: within 10%).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GLOG_minloglevel", "2")
# `python -m` from REPO (run_cli's cwd): this checkout's code, also where .venv is another checkout's (its
# console script would import whatever that venv's editable install points at, while Ray's workers run this one)
M2FD = [str(REPO / ".venv" / "bin" / "python"), "-m", "pipelines.cli"]


def _tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _rss(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_cli(args: list[str], env: dict | None = None, on_sample=None) -> tuple[float, int]:
    """(wall seconds, peak summed RSS of the process tree) of one `m2fd` command; ``on_sample(root_pid)``
    is called at every 0.1 s sample as well (bench_scale records each process's own peak there)."""
    t = time.perf_counter()
    p = subprocess.Popen(M2FD + args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss(_tree(p.pid)))
            if on_sample is not None:
                on_sample(p.pid)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = p.communicate()
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    if p.returncode != 0:
        raise RuntimeError(f"m2fd {' '.join(args)} failed:\n{err[-3000:]}")
    return wall, peak


def input_frames(files: list[Path]) -> int:
    from extractors.config import IngestConfig
    from extractors.probe import probe

    n = 0
    for f in files:
        n += int(round(probe(str(f), IngestConfig().video_codecs).duration_s * 30))
    return n


def replicate(real: Path, dst: Path, k: int) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(real.glob("*.mp4")):
        for i in range(k):
            g = dst / f"{f.stem}-c{i}.mp4"
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(f), "-map", "0", "-c", "copy",
                            "-metadata", f"comment=copy {i}", str(g)], check=True)
            out.append(g)
    return out


def stage_times(out: Path) -> dict[str, float]:
    """Wall seconds of every step of the dataset's last Dagster run."""
    import dagster as dg

    inst = dg.DagsterInstance.from_config(str(out / ".dagster"))
    run = inst.get_runs(limit=1)[0]
    start: dict[str, float] = {}
    wall: dict[str, float] = {}
    for e in inst.all_logs(run.run_id):
        if e.dagster_event is None or e.step_key is None:
            continue
        if e.dagster_event.event_type_value == "STEP_START":
            start[e.step_key] = e.timestamp
        elif e.dagster_event.event_type_value == "STEP_SUCCESS":
            wall[e.step_key] = e.timestamp - start[e.step_key]
    return wall


def cpu_seconds(out: Path) -> dict[str, float]:
    import dagster as dg

    inst = dg.DagsterInstance.from_config(str(out / ".dagster"))
    run = inst.get_runs(limit=1)[0]
    cpu: dict[str, float] = {}
    for e in inst.all_logs(run.run_id):
        ev = e.dagster_event
        if ev is None or ev.event_type_value != "ASSET_MATERIALIZATION":
            continue
        m = ev.event_specific_data.materialization
        for key in ("stage_cpu_s", "cpu_s"):
            if key in m.metadata:
                for k, v in m.metadata[key].value.items():
                    cpu[f"{m.asset_key.path[-1]}.{k}"] = v
    return cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", default=str(REPO.parent / "shared" / "data" / "real"))
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="m2fd-e2e-"))
    real = Path(a.real)
    cpus = ["--num-cpus", str(a.cpus)]

    # a provided GNPFA checkpoint (the production path): the bootstrap of a warm-up run on 1x
    warm = work / "warm"
    run_cli(["run", str(real), "--out", str(warm)] + cpus)
    ckpt = next((warm / "models").glob("gnpfa-bootstrap-*"))
    ck = ["--set", f"extract.gnpfa_checkpoint={ckpt}"]

    rows = {}
    for k in (1, a.scale):
        files = replicate(real, work / f"in{k}", k)
        frames = input_frames(files)
        out = work / f"pipe{k}"
        wall, peak = run_cli(["run", str(work / f"in{k}"), "--out", str(out)] + cpus + ck)
        rows[k] = {"frames": frames, "wall": wall, "peak": peak, "steps": stage_times(out), "cpu": cpu_seconds(out)}

    # each stage alone on the same CPUs, on the scale-x input: ingest from nothing; tracks with the
    # ingest done; GNPFA encoding + tables, labels and shards with everything upstream done
    k = a.scale
    frames = rows[k]["frames"]
    alone = {}
    d = work / "alone-ingest"
    alone["ingest"] = run_cli(["run", str(work / f"in{k}"), "--out", str(d), "--stages", "ingest"] + cpus + ck)[0]
    shutil.rmtree(d / "parts" / "extract", ignore_errors=True)
    alone["extract"] = run_cli(["run", str(work / f"in{k}"), "--out", str(d), "--stages", "extract"] + cpus + ck)[0]
    alone["label"] = run_cli(["run", str(work / f"in{k}"), "--out", str(d), "--stages", "label"] + cpus + ck)[0]
    alone["shard"] = run_cli(["run", str(work / f"in{k}"), "--out", str(d), "--stages", "shard"] + cpus + ck)[0]
    slow = max(alone, key=alone.get)

    print(f"# End-to-end ingest benchmark ({a.cpus} CPUs, local Ray, Dagster in-process, provided GNPFA checkpoint)")
    print(f"input: {len(list(real.glob('*.mp4')))} shared real videos; {a.scale}x = {a.scale} byte-distinct remuxes of each")
    print()
    print("| run | input frames | wall s | pipeline frames/s | peak memory MB |")
    print("|---|---|---|---|---|")
    for kk, r in rows.items():
        print(f"| {kk}x | {r['frames']} | {r['wall']:.1f} | {r['frames'] / r['wall']:.1f} | {r['peak'] / 1e6:.0f} |")
    print()
    print(f"| stage alone ({k}x, each a fresh `m2fd run --stages S` process) | wall s | input frames/s |")
    print("|---|---|---|")
    for s, w in alone.items():
        print(f"| {s} | {w:.1f} | {frames / w:.1f} |")
    ratio = (frames / rows[k]["wall"]) / (frames / alone[slow])
    print()
    print(f"pipeline {frames / rows[k]['wall']:.1f} frames/s vs slowest stage alone ({slow}) {frames / alone[slow]:.1f} "
          f"frames/s -> {ratio:.2f}x (target >= 0.85)")
    mem = rows[k]["peak"] / rows[1]["peak"]
    print(f"peak memory {a.scale}x / 1x = {mem:.3f} (target within 10%: {'met' if abs(mem - 1) <= 0.10 else 'NOT met'})")
    print()
    print(f"steps inside the {k}x pipeline run (wall s): " + json.dumps({s: round(v, 1) for s, v in rows[k]['steps'].items()}))
    print(f"stage CPU seconds inside the {k}x run (task timers): " + json.dumps({s: round(v, 1) for s, v in rows[k]['cpu'].items()}))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
