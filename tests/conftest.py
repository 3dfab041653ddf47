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
def real_run(tmp_path_factory, real_dir):
    """The whole job (ingest + extract) on the shared real videos, on a local Ray."""
    out = tmp_path_factory.mktemp("ds")
    from pipelines.job import run_job

    res = run_job([str(real_dir)], out, executor="ray", num_cpus=2, log=lambda m: None)
    return out, res["ingest"]


