import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(REPO / "examples"))


def _real_dir() -> Path:
    env = os.environ.get("M2FD_REAL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "real"


# ---- `make test` runs two pytest-xdist processes (-n 2 --dist loadscope) ---------------------------
# Every test that reads the session's real dataset runs in one process (the dataset is built once,
# about 75 s); each other module's tests stay together (module fixtures are built once). The workers
# write each test's group to a file the controller's scheduler reads: pytest 9.2's structured node
# ids ignore xdist 3.8's own xdist_group suffix (pytest-dev/pytest-xdist#1386), so loadgroup does not group.
REAL_FIXTURES = {"real_result", "real_run"}


def pytest_configure(config):
    config.addinivalue_line("markers", "exclusive: asserts on its own wall time; under xdist nothing else runs meanwhile")
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller (or a plain run): workers inherit it
        import tempfile

        os.environ["M2FD_TEST_GROUPS"] = str(Path(tempfile.gettempdir()) / f"m2fd-test-groups-{os.getpid()}")


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        for ext in (".json", ".lock", ".turnstile"):
            Path(os.environ.get("M2FD_TEST_GROUPS", "") + ext).unlink(missing_ok=True)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import json

    groups = {i.nodeid: "real" if REAL_FIXTURES & set(i.fixturenames) else i.module.__name__ for i in items}
    dest = Path(os.environ["M2FD_TEST_GROUPS"] + ".json")
    tmp = dest.with_suffix(f".{os.environ['PYTEST_XDIST_WORKER']}.tmp")
    tmp.write_text(json.dumps(groups))
    os.replace(tmp, dest)  # both workers write the same map


def pytest_xdist_make_scheduler(config, log):
    import json

    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """Work units are the groups the workers wrote (each unit runs whole on one worker)."""

        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # read once the collections are in
                self.groups = json.loads(Path(os.environ["M2FD_TEST_GROUPS"] + ".json").read_text())
            return self.groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist, a test marked `exclusive` runs (setup included) while the other process runs
    nothing: every test holds a shared lock, an exclusive one the exclusive lock, and a turnstile
    keeps the other process from starting tests while an exclusive one waits."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import fcntl

    base = os.environ["M2FD_TEST_GROUPS"]
    with open(base + ".turnstile", "a") as turn, open(base + ".lock", "a") as lock:
        fcntl.flock(turn, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if item.get_closest_marker("exclusive") else fcntl.LOCK_SH)
        fcntl.flock(turn, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
    import ray

    from pipelines.executors import WORKER_ENV
    from pipelines.train import LOCAL_TRAIN_ENV

    for k, v in {**WORKER_ENV, **LOCAL_TRAIN_ENV}.items():  # what run_job and run_training set for the Ray they start
        os.environ.setdefault(k, v)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
             runtime_env={"env_vars": WORKER_ENV})
    yield ray
    ray.shutdown()


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
