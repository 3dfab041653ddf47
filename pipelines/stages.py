"""The M2F-D stages, declared once: what `m2fd run --stages` calls each, which Dagster assets
materialise it, what each of its per-item tasks asks of Ray, which tables and arrays (storage_schemas
names) it reads and writes, and how its result reads in one line. The CLI's stage list and summary,
the Dagster job's asset selection and the task resources are derived from STAGES (pipelines/ingest,
extract, labels and shards hold each stage's wiring; extractors/ and models/ its computation)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Resources:
    """What one task of a stage asks of the Ray scheduler. ``gpus`` is asked only where the cluster has
    a GPU and the config allows it (the task then runs its model there)."""

    cpus: float = 1
    gpus: float = 0
    memory_gb: float = 0  # 0: no memory request (the task is scheduled by CPUs alone)

    def ray_options(self, use_gpu: bool = False, gpus: float | None = None) -> dict:
        """Ray options; ``gpus`` overrides the declared share (a config's tasks per GPU)."""
        opts: dict = {"num_cpus": self.cpus}
        if use_gpu and self.gpus:
            opts["num_gpus"] = gpus or self.gpus
        if self.memory_gb:
            opts["memory"] = int(self.memory_gb * 2**30)
        return opts


@dataclass(frozen=True)
class Stage:
    name: str
    assets: tuple[str, ...]  # its Dagster assets, in materialisation order
    tasks: dict[str, Resources]  # its per-item task functions (as Ray names their workers: ray::<name>)
    reads: tuple[str, ...]  # storage_schemas tables (TABLES) and arrays (ARRAYS) it reads
    writes: tuple[str, ...]  # ... and writes (it replaces only its own quarantine rows)
    summary: Callable[[dict], str] = field(repr=False)  # one line of the run's result for this stage
    result_asset: str = ""  # the asset whose metadata is the stage's result (default: its last asset)

    @property
    def result_key(self) -> str:
        return self.result_asset or self.assets[-1]


def _ingest_line(s: dict) -> str:
    return (f"{s['n_inputs']} inputs, {s['n_sources']} sources, {s['n_clips']} clips ({s['clip_hours'] * 3600:.1f} s); "
            f"analysed {s['analysed']}, reused {s['reused']}")


def _extract_line(e: dict) -> str:
    g = e["gnpfa"]
    return (f"{e['frames']} frames, {e['clips_ok']} clips ok, {e['clips_dropped']} dropped; GNPFA "
            f"{g.get('name') or g['kind']} {g['sha256'][:12]}; transcripts by {', '.join(e['engines']) or '-'}")


def _label_line(lb: dict) -> str:
    return f"{lb['rows']} label rows for {lb['clips']} clips by {', '.join(lb['labelers'])}"


def _shard_line(sh: dict) -> str:
    return (f"version {sh['version']} added {sh['added_samples']} samples in {sh['added_shards']} shards; dataset "
            f"{sh['samples']} samples in {sh['shards']} shards ({sh['bytes'] / 1e6:.1f} MB), splits {sh['splits']}")


# memory: the largest Ray worker of the whole job peaks at about 1.7 GB (bench/RESULTS.md, bench_scale), in
# extraction (MediaPipe + Whisper + the embedders); the other tasks stay well under it
STAGES: tuple[Stage, ...] = (
    Stage("ingest", ("ingest_batch", "clips"),
          # analysis asks a GPU only for Light-ASD on CUDA (ingest.asd_device): a small model, so a 32nd of a GPU
          # (a CUDA context, ~0.5 GB) and the GPU never caps analysis below the node's cores
          {"_fetch_task": Resources(), "_analyse_task": Resources(gpus=1 / 32, memory_gb=1)},
          reads=(), writes=("sources", "clips", "face_tracks", "quarantine", "audio"),
          summary=_ingest_line, result_asset="clips"),
    Stage("extract", ("tracks", "gnpfa_checkpoint", "extraction"),
          # an encoding task is mostly CPU (reading the tracks part, quality, the frames table, writes): on an
          # H200 the networks take ~25 ms of a source's ~250 ms (bench/bench_encode.py), so 8 tasks share a GPU;
          # so do 8 extraction tasks: on an H100 the whole extraction ran 1,071 input frames/s with 4 processes
          # sharing the GPU and 1,375 with 8 (bench/bench_gpu_path.py, under 5.5 GB of GPU memory each);
          # extract.tasks_per_gpu sets another share for extraction (a node with more than 8 cores per GPU: with
          # CUDA MPS and the padded calls, 16 workers ran 4,475 input frames/s on an H100 and 8 ran 3,862; with
          # kept NVDEC decoders and tasks handed out as workers free up, 16 ran 5,953-7,317 in up to 77 GB)
          {"_extract_task": Resources(gpus=0.125, memory_gb=2), "_encode_task": Resources(gpus=0.125, memory_gb=1)},
          reads=("sources", "clips", "audio"),
          writes=("frames", "clip_features", "transcripts", "quarantine", "crops", "keyframes"),
          summary=_extract_line),
    Stage("label", ("labels",), {"_label_task": Resources(memory_gb=1)},
          reads=("sources", "clips", "clip_features", "frames", "transcripts", "crops", "audio", "label_rows"),
          writes=("label_rows", "quarantine"), summary=_label_line),
    Stage("shard", ("shards",), {"_sample_task": Resources(memory_gb=1)},
          reads=("sources", "clips", "clip_features", "frames", "transcripts", "label_rows", "keyframes", "audio",
                 "quarantine"),
          writes=("shards", "samples", "speakers", "quarantine"), summary=_shard_line),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
_BY_TASK = {t: r for s in STAGES for t, r in s.tasks.items()}


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGE_NAMES)}")


def task_cpus(fn: Callable) -> int:
    """The CPUs a stage's task function asks for: the most threads its compute may use (more oversubscribe
    the node's cores, since Ray packs tasks by the CPUs they ask)."""
    return max(1, int(_BY_TASK[fn.__name__].cpus))


def task_options(fn: Callable, use_gpu: bool = False, gpus: float | None = None) -> dict:
    """The Ray options of a stage's task function, as its stage declares them (``gpus``: another share)."""
    return _BY_TASK[fn.__name__].ray_options(use_gpu, gpus)
