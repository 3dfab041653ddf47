"""The m2fd command line."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="M2F-D factory: raw talking videos -> labeled co-speech 3D facial-animation dataset.")
console = Console(stderr=True)


def _load_config(config: Optional[Path], overrides: List[str]):
    """The run's RunConfig: the embedded defaults, a YAML file with `ingest:`, `extract:` and `shard:`
    sections, and --set KEY=VALUE (KEY may be prefixed `ingest.` / `extract.` / `shard.`)."""
    import yaml

    from extractors.config import RunConfig

    try:
        return RunConfig.load(yaml.safe_load(config.read_text()) if config else None, overrides=overrides)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


@app.command()
def run(
    src: List[str] = typer.Argument(..., help="Video files, folders, globs, fsspec URLs or manifests (.csv/.parquet/.jsonl)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset directory to create or update."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (keys of `m2fd config`)."),
    set_: List[str] = typer.Option([], "--set", help="Override one config key, e.g. --set min_clip_s=3."),
    executor: str = typer.Option("ray", help="'ray' (local Ray, or the cluster in RAY_ADDRESS) or 'local' (in-process)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for the local Ray (default: all)."),
    stages: str = typer.Option("ingest,extract,label,shard", help="Comma-separated stages to run, in order."),
):
    """Run the M2F-D job on SRC and write the dataset to --out."""
    from pipelines.job import RunFailed, run_job
    from pipelines.lock import DatasetLocked
    from pipelines.stages import STAGE_NAMES, STAGES

    cfg = _load_config(config, set_)
    wanted = tuple(x.strip() for x in stages.split(",") if x.strip())
    if not set(wanted) <= set(STAGE_NAMES):
        raise typer.BadParameter(f"--stages must be among {STAGE_NAMES}")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as prog:
        tasks: dict[str, int] = {}

        def tick(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done, total=total)

        try:
            res = run_job(src, out, cfg=cfg, executor=executor, num_cpus=num_cpus, stages=wanted, progress=tick,
                          log=lambda m: prog.console.print(f"[dim]{m}[/dim]"))
        except DatasetLocked as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(3)
        except RunFailed as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(1)
    for st in STAGES:  # one line per stage that ran, in stage order
        if st.name in res:
            r = res[st.name]
            console.print(f"[green]{st.name}[/green]: {st.summary(r if isinstance(r, dict) else vars(r))}")
    card = json.loads((out / "dataset.json").read_text())
    failed = card["counts"]["quarantine"].get("processing_error", 0) + card["counts"]["quarantine"].get("source_changed", 0)
    if failed:
        from storage_schemas import open_dataset

        rows = open_dataset(out).query("select stage, message from quarantine where reason in ('processing_error', "
                                       "'source_changed') order by uri, stage, clip_id limit 5").to_pylist()
        console.print(f"[yellow]failed[/yellow]: {failed} item(s) failed and were quarantined (the rest of the run "
                      f"completed; a rerun tries them again):")
        for r in rows:
            console.print(f"  [yellow]{r['stage']}[/yellow] {r['message'][:200]}")
    checks = ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in sorted(res["checks"].items()))
    console.print(f"[green]checks[/green]: {checks or '-'}")
    console.print(f"[green]done[/green]: quarantine {card['counts']['quarantine']} -> {out} "
                  f"(Dagster run {res['run_id']}, batch {res['batch']}; `m2fd ui --out {out}` shows it)")
    if not all(res["checks"].values()):
        raise typer.Exit(4)


@app.command()
def ui(
    out: Path = typer.Option(..., "--out", "-o", help="Dataset directory whose runs to show (its Dagster instance)."),
    port: int = typer.Option(3000, help="Port of the Dagster web UI."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    landing: Optional[str] = typer.Option(None, help="Folder or fsspec prefix for the landing sensor (M2FD_LANDING)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config used by runs launched from the UI."),
):
    """Start the Dagster UI (dagster dev) over the dataset's run history and these definitions."""
    import os
    import signal

    from pipelines.dagster_defs import dagster_home

    env = {**os.environ, "DAGSTER_HOME": str(dagster_home(out).resolve()), "M2FD_OUT": str(out.resolve())}
    if landing:
        env["M2FD_LANDING"] = landing
    if config:
        env["M2FD_CONFIG"] = str(config.resolve())
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    exe = Path(sys.executable).with_name("dagster")
    # dagster dev started from a script inherits ignored signals: restore the defaults so that
    # SIGINT/SIGTERM stop it (and the webserver and daemon it runs)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    console.print(f"Dagster UI for {out} on http://{host}:{port} (DAGSTER_HOME={env['DAGSTER_HOME']})")
    os.execve(str(exe), [str(exe), "dev", "-m", "pipelines.dagster_defs", "-h", host, "-p", str(port)], env)


@app.command()
def train(
    dataset: Optional[Path] = typer.Argument(None, help="Dataset directory (its train split), or use --subset."),
    subset: Optional[Path] = typer.Option(None, help="A subset manifest from `m2fd subset` (names its dataset)."),
    out: Path = typer.Option(Path("out/train"), "--out", "-o", help="Run directory: checkpoints, metrics.csv, tb/."),
    workers: int = typer.Option(1, help="Ray Train workers (DDP ranks)."),
    gpus_per_worker: float = typer.Option(0, help="GPUs per worker (0: CPU, gloo)."),
    cpus_per_worker: int = typer.Option(1, help="CPUs per worker."),
    style_encoder: Optional[Path] = typer.Option(None, help="CLIP checkpoint dir for the style embedding."),
    set_: List[str] = typer.Option([], "--set", help="Training/model key, e.g. --set max_steps=2000 --set model.layers=4."),
):
    """Train (or resume) Media2Face on Ray Train over the dataset's shards."""
    import dataclasses

    import yaml

    from models.m2f_train import TrainConfig
    from pipelines.train import run_training

    if dataset is None and subset is None:
        raise typer.BadParameter("give DATASET or --subset")
    kw: dict = {"dataset": str(dataset) if dataset else None, "subset": str(subset) if subset else None,
                "run_dir": str(out), "style_encoder": str(style_encoder) if style_encoder else None}
    from models.media2face import M2FConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    defaults = {**{f"model.{k}": v for k, v in M2FConfig().to_dict().items()}, **TrainConfig().to_dict()}

    def value(k: str, v: str):
        x = yaml.safe_load(v)
        if isinstance(defaults.get(k), float) and isinstance(x, (int, str)):
            x = float(x)  # YAML reads 3e-4 as a string
        return x

    model: dict = {}
    for ov in set_:
        k, _, v = ov.partition("=")
        if k.startswith("model."):
            model[k[6:]] = value(k, v)
        elif k in known:
            kw[k] = value(k, v)
        else:
            raise typer.BadParameter(f"unknown training key {k!r} (known: {sorted(known)}, or model.<key>)")

    try:
        M2FConfig.from_dict(model)
        tcfg = TrainConfig(**kw, model=model)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    from pipelines.train import cpu_warning
    from pipelines.train_progress import TrainProgress

    warn = cpu_warning(tcfg, gpus_per_worker)
    if warn:
        console.print(f"[yellow]note[/yellow]: {warn}")
    from pipelines.train import check_windows

    try:
        check_windows(tcfg, workers)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    with TrainProgress(console, tcfg.max_steps, on_cpu=gpus_per_worker == 0) as bar:
        m = run_training(tcfg, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                         on_progress=bar.update, handle_signals=True)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
             if k in ("step", "loss", "val_lve", "baseline_lve", "val_fdd", "baseline_fdd", "samples_per_s")}
    if m.get("stopped"):
        console.print(f"[yellow]stopped[/yellow] at step {m.get('stopped_at_step')} (checkpoint kept): the same command with "
                      f"--out {out} resumes from it")
        raise typer.Exit(130)
    console.print(f"[green]trained[/green]: {shown} -> {out}")


@app.command()
def generate(
    ckpt: Path = typer.Argument(..., help="A Media2Face checkpoint directory (out/train/checkpoints/step-N)."),
    audio: Path = typer.Option(..., "--audio", help="Speech audio (any format ffmpeg reads)."),
    out: Path = typer.Option(..., "--out", "-o", help="Animation .npz (latents, pose at 30 fps)."),
    prompt: Optional[str] = typer.Option(None, help="Style text prompt."),
    image: Optional[Path] = typer.Option(None, help="Style face image."),
    video: Optional[Path] = typer.Option(None, help="Also render the decoded mesh with the audio to this .mp4."),
    steps: int = typer.Option(50, help="DDIM steps."),
    seed: int = typer.Option(0),
    s_audio: float = typer.Option(2.5, help="Guidance weight sA."),
    s_style: float = typer.Option(1.5, help="Guidance weight sP."),
):
    """Generate facial motion for speech audio with a trained Media2Face."""
    from pipelines.generate import run_generate

    if prompt is not None and image is not None:
        raise typer.BadParameter("give --prompt or --image, not both")
    try:
        r = run_generate(ckpt, audio, out, prompt, image, video, steps, seed, s_audio, s_style)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    console.print(f"[green]generated[/green]: {r['frames']} frames -> {r['out']}" + (f", {r['video']}" if r["video"] else ""))


@app.command()
def query(
    dataset: Path = typer.Argument(..., help="Dataset directory."),
    sql: str = typer.Argument(..., help="DuckDB SQL over the tables (sources, clips, quarantine, ...)."),
    format: str = typer.Option("table", "--format", "-f", help="table | json | csv"),
):
    """Run SQL over the dataset's Parquet tables."""
    import duckdb

    from storage_schemas import open_dataset

    try:
        ds = open_dataset(dataset)
        result = ds.query(sql)
    except (FileNotFoundError, duckdb.Error) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    if format == "json":
        sys.stdout.write(json.dumps(result.to_pylist(), default=str, indent=1) + "\n")
    elif format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(result, sys.stdout.buffer)
    elif format == "table":
        t = Table(show_lines=False)
        for name in result.column_names:
            t.add_column(name, overflow="fold")
        for row in result.to_pylist():
            t.add_row(*["" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row.values()])
        Console().print(t)
        console.print(f"{result.num_rows} rows")
    else:
        raise typer.BadParameter("--format must be table, json or csv")


@app.command("config")
def show_config(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config to merge over the defaults."),
    set_: List[str] = typer.Option([], "--set", help="Override one key, e.g. --set detect_fps=15."),
):
    """Print the effective config (embedded defaults plus overrides) as YAML."""
    import yaml

    sys.stdout.write(yaml.safe_dump(_load_config(config, set_).to_dict(), sort_keys=True))


@app.command()
def relabel(
    dataset: Path = typer.Argument(..., help="Dataset directory (after m2fd run)."),
    labeler: List[str] = typer.Option(..., "--labeler", "-l", help="Labeler(s) to run, in order (see --list)."),
    option: List[str] = typer.Option([], "--option", help="LABELER.KEY=VALUE, e.g. caption-lm.checkpoint=/models/cap"),
    executor: str = typer.Option("ray", help="'ray' or 'local'."),
    num_cpus: Optional[int] = typer.Option(None),
):
    """Add a labeler's output to an extracted dataset without re-running extraction. Earlier
    labelers' rows stay; the `labels` view shows the most recent run of each field."""
    import yaml

    from extractors.labels import REGISTRY
    from pipelines.executors import make_executor
    from pipelines.labels import run_labels
    from pipelines.lock import DatasetLock, DatasetLocked

    from extractors.labels import caption, emotion, prosody, style  # noqa: F401  (fills REGISTRY)

    unknown = [n for n in labeler if n not in REGISTRY]
    if unknown:
        raise typer.BadParameter(f"unknown labeler(s) {unknown}; known: {sorted(REGISTRY)}")
    opts: dict = {}
    for o in option:
        k, _, v = o.partition("=")
        name, _, key = k.partition(".")
        if not key or not v:
            raise typer.BadParameter(f"--option expects LABELER.KEY=VALUE, got {o!r}")
        opts.setdefault(name, {})[key] = yaml.safe_load(v)
    try:
        with DatasetLock(dataset):
            ex = make_executor(executor, num_cpus)
            try:
                res = run_labels(dataset, ex, tuple(labeler), opts, relabel=True)
            finally:
                ex.close()
    except DatasetLocked as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(3)
    except FileNotFoundError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    console.print(f"[green]relabel[/green]: {res['rows']} rows by {', '.join(res['labelers'])} as run {res['run']} "
                  f"for {res['clips']} clips -> {dataset}")


@app.command()
def subset(
    dataset: Path = typer.Argument(..., help="Dataset directory with shards (after m2fd run)."),
    where: str = typer.Option(..., "--where", help="SQL predicate over clips c, labels l, clip_features f, samples s."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for subset.json (shard list + clip ids)."),
):
    """Write a subset manifest (no data copied) that every loader accepts."""
    import duckdb

    from storage_schemas import open_dataset, write_json

    ds = open_dataset(dataset)
    sql = ("select s.clip_id, s.shard, s.index_in_shard, s.n_frames, s.split from samples s join clips c using "
           "(clip_id) join clip_features f using (clip_id) left join labels l using (clip_id) "
           f"where {where} order by s.shard, s.index_in_shard")
    try:
        rows = ds.query(sql).to_pylist()
    except duckdb.Error as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    write_json(out / "subset.json", {"dataset": str(dataset.resolve()), "where": where, "n_samples": len(rows),
                                     "shards": sorted({r["shard"] for r in rows}),
                                     "clip_ids": [r["clip_id"] for r in rows], "samples": rows})
    console.print(f"subset: {len(rows)} clips in {len({r['shard'] for r in rows})} shards -> {out / 'subset.json'}")


@app.command()
def report(
    dataset: Path = typer.Argument(..., help="Dataset directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default DATASET/report.html)."),
):
    """Write a self-contained HTML report with plots of the dataset."""
    from pipelines.report import write_report

    console.print(f"report -> {write_report(dataset, out)}")


@app.command()
def preview(
    dataset: Path = typer.Argument(..., help="Dataset directory."),
    clip_id: str = typer.Argument(..., help="Clip to render."),
    out: Path = typer.Option(..., "--out", "-o", help="MP4 to write."),
    size: int = typer.Option(384, help="Panel height in pixels."),
):
    """Render a clip: source frames with the landmark overlay beside the GNPFA-decoded mesh, with audio."""
    from pipelines.preview import render_preview

    try:
        console.print(f"preview -> {render_preview(dataset, clip_id, out, size)}")
    except (KeyError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)


@app.command()
def previews(
    dataset: Path = typer.Argument(..., help="Dataset directory."),
    limit: int = typer.Option(3, help="How many clips (the first extracted clips by id)."),
    size: int = typer.Option(256, help="Panel height in pixels."),
):
    """Render previews of the first clips into DATASET/previews/<clip_id>.mp4 and rewrite report.html,
    whose cards link them."""
    from pipelines.preview import render_preview
    from pipelines.report import write_report
    from storage_schemas import open_dataset

    ids = open_dataset(dataset).query(f"select clip_id from clip_features where status = 'ok' order by clip_id "
                                      f"limit {int(limit)}").column(0).to_pylist()
    for cid in ids:
        console.print(f"preview -> {render_preview(dataset, cid, dataset / 'previews' / f'{cid}.mp4', size)}")
    console.print(f"report -> {write_report(dataset)}")


template_app = typer.Typer(help="The canonical face template used for head pose.", no_args_is_help=True)
app.add_typer(template_app, name="template")


@template_app.command("build")
def template_build(
    videos: List[Path] = typer.Argument(..., help="Face videos to derive the template from."),
    out: Path = typer.Option(Path("models/assets/face_template_v1.npy"), help="Where to write the .npy."),
    step: int = typer.Option(5, help="Use every STEP-th frame on the 30 fps grid."),
):
    """Derive the canonical template: generalised Procrustes mean of Face Mesh landmarks, in
    inter-ocular-distance units, written as a plain .npy (no pickle) with a JSON sidecar."""
    import numpy as np

    from extractors.pose import build_template, collect_meshes
    from extractors.probe import sha256_file
    from storage_schemas import atomic_write_bytes, write_json
    import io

    meshes, used = [], {}
    for v in sorted(videos):
        m = collect_meshes(str(v), step)
        console.print(f"{v.name}: {len(m)} meshes")
        if len(m):
            meshes.append(m)
            used[v.name] = sha256_file(v)
    tpl = build_template(np.concatenate(meshes))
    buf = io.BytesIO()
    np.save(buf, tpl, allow_pickle=False)
    atomic_write_bytes(out, buf.getvalue())
    write_json(out.with_suffix(".json"), {"shape": list(tpl.shape), "units": "inter-ocular distance",
                                          "frames": int(sum(len(m) for m in meshes)), "step": step, "sources": used})
    console.print(f"wrote {out} ({tpl.shape})")


gnpfa_app = typer.Typer(help="Train and inspect GNPFA checkpoints.", no_args_is_help=True)
app.add_typer(gnpfa_app, name="gnpfa")


def _train_threads(threads: int, device: str) -> str:
    """Fixed torch threads (CPU reductions then give the same weights on every run) and the device."""
    import torch

    torch.set_num_threads(threads)
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


@gnpfa_app.command("train-geometry")
def gnpfa_train_geometry(
    datasets: List[Path] = typer.Argument(..., help="Extracted datasets (m2fd run) to train on."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write (model.safetensors + config.json)."),
    z_dim: int = typer.Option(32), hidden: int = typer.Option(256), steps: int = typer.Option(3000),
    beta: float = typer.Option(1e-3), seed: int = typer.Option(0), device: str = typer.Option("auto"),
    max_frames: int = typer.Option(60_000, help="Train on a seeded per-clip sample of at most about this many tracked frames."),
    threads: int = typer.Option(2, help="torch threads (fixed: the same weights on every CPU run)."),
):
    """Train the geometry VAE (expression offsets -> z -> offsets, decoder conditioned on the neutral)."""
    from models.gnpfa import GNPFAConfig, save_checkpoint, train_geometry
    from pipelines.gnpfa import training_data

    dev = _train_threads(threads, device)
    data, recipe = training_data(datasets, max_frames, log=console.print)
    cfg = GNPFAConfig(z_dim=z_dim, hidden=hidden, beta=beta, seed=seed)
    vae = train_geometry(data["offsets"], data["neutrals"], cfg, steps=steps, device=dev, log=console.print)
    recipe["geometry"] = {"steps": steps, "threads": threads, "device": dev, "argv": sys.argv[1:]}
    sha = save_checkpoint(out, cfg, vae, None, meta={"kind": "geometry", "trained_on_frames": int(len(data["offsets"])),
                                                     "recipe": recipe})
    console.print(f"wrote {out} (sha256 {sha[:16]})")


@gnpfa_app.command("train-image")
def gnpfa_train_image(
    datasets: List[Path] = typer.Argument(..., help="Extracted datasets (m2fd run) to train on."),
    geometry: Path = typer.Option(..., help="Checkpoint from train-geometry (its VAE is frozen)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write (VAE + image encoders)."),
    enc_width: int = typer.Option(16), head_pool: int = typer.Option(2, help="Average the feature map to N x N "
                                                                         "before the head (0: flatten it whole)."),
    steps: int = typer.Option(3000), batch: int = typer.Option(128), device: str = typer.Option("auto"),
    max_frames: int = typer.Option(60_000, help="Train on a seeded per-clip sample of at most about this many tracked frames."),
    threads: int = typer.Option(2, help="torch threads (fixed: the same weights on every CPU run)."),
    half: bool = typer.Option(False, help="Store the weights as float16 (half the size; loaded as float32)."),
    name: Optional[str] = typer.Option(None, help="A name for the checkpoint (e.g. gnpfa-v1), kept in its config.json."),
):
    """Train the image encoders (crop -> z, crop -> rotation) with the VAE frozen; mesh path as teacher.
    The recipe (the datasets' inputs and their sha256, both configs, code version, argv) goes into
    config.json."""
    import dataclasses

    from models.gnpfa import checkpoint_config, load_checkpoint, save_checkpoint, train_image
    from pipelines.gnpfa import training_data

    dev = _train_threads(threads, device)
    gcfg, vae, _, gsha = load_checkpoint(geometry, device=dev)
    data, recipe = training_data(datasets, max_frames, log=console.print)
    cfg = dataclasses.replace(gcfg, enc_width=enc_width, head_pool=head_pool, crop_size=int(data["crops"].shape[1]))
    enc = train_image(data["crops"], data["offsets"], data["neutrals"], data["rotations"], vae, cfg, steps=steps,
                      batch=batch, device=dev, log=console.print)
    geo_recipe = checkpoint_config(geometry)[1].get("recipe") or {}
    recipe = {**recipe, "geometry": {**geo_recipe, "sha256": gsha},
              "image": {"steps": steps, "batch": batch, "threads": threads, "device": dev, "argv": sys.argv[1:]}}
    sha = save_checkpoint(out, cfg, vae, enc, half=half,
                          meta={"kind": "gnpfa", "name": name, "geometry_sha256": gsha, "steps": steps,
                                "trained_on_frames": int(len(data["crops"])), "weights_dtype": "float16" if half else "float32",
                                "recipe": recipe})
    console.print(f"wrote {out} (sha256 {sha[:16]}); use it with --set gnpfa_checkpoint={out}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
