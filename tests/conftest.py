import os
import sys
from pathlib import Path

import pytest

import pipelines  # noqa: F401 - sets MKL_CBWR (pipelines/__init__.py) before any test's first torch computation

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus"  # the 17 real talking videos of ../shared
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(REPO / "examples"))


def _real_dir() -> Path:
    env = os.environ.get("M2FD_REAL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    d = _real_dir()
    assert d.is_dir() and len(list(d.glob("*.mp4"))) == 5, f"shared real videos missing at {d}"
    return d


@pytest.fixture(scope="session")
def cases(tmp_path_factory, real_dir):
    from samples import make_cases

    return make_cases(tmp_path_factory.mktemp("cases"), real_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, as a long-lived cluster is for its users: run_job and
    run_training find Ray initialised and neither start nor stop it (each start and stop of a local
    Ray, and the workers' imports after it, cost seconds per run). Subprocess runs (`m2fd run`,
    `m2fd train`) still start and stop their own."""
    from pipelines.executors import RayExecutor
    from pipelines.train import LOCAL_TRAIN_ENV

    for k, v in LOCAL_TRAIN_ENV.items():  # what run_training sets for the local Ray it starts
        os.environ.setdefault(k, v)
    ex = RayExecutor(num_cpus=2)  # the local Ray run_job starts (worker environment included)
    yield ex._ray
    ex.close()


@pytest.fixture(scope="session")
def real_result(tmp_path_factory, real_dir, ray_cluster):
    """The whole job (the Dagster job, in-process) on the shared real videos, on a local Ray."""
    out = tmp_path_factory.mktemp("ds")
    from pipelines.job import run_job

    return out, run_job([str(real_dir)], out, executor="ray", num_cpus=2, log=lambda m: None)


@pytest.fixture(scope="session")
def real_run(real_result):
    out, res = real_result
    return out, res["ingest"]


def head_of(video: Path, seconds: float, dest_dir: Path) -> Path:
    """The first ``seconds`` of a video (stream copy), under the same file name in ``dest_dir``: a shorter
    input for tests whose point is not its length (fault injection and URIs match by file name)."""
    import subprocess

    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / video.name
    subprocess.run(["ffmpeg", "-v", "error", "-t", str(seconds), "-i", str(video), "-c", "copy", str(out)], check=True)
    return out


def dataset_bytes(out: Path) -> dict[str, bytes]:
    """Every file that makes the dataset (not run history, caches or locks), by relative path."""
    keep = ("tables", "shards", "batches", "lineage", "models", "arrays")
    files = [p for p in Path(out).rglob("*") if p.is_file() and p.relative_to(out).parts[0] in keep]
    files += [Path(out) / n for n in ("dataset.json", "README.md") if (Path(out) / n).is_file()]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(files)}




def build_tiny_clip(d: Path) -> Path:
    """A randomly initialised 2-layer CLIP (text + vision) saved like a real checkpoint, with a
    byte-level tokenizer vocabulary (no merges) and an image processor."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    d.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(bytes_to_unicode().values()))
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=24)
    CLIPModel(cfg).save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))
