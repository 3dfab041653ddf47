"""Resume and failures of a cluster: a two-node Ray cluster loses its worker node mid-extraction (Ray
retries the lost tasks) and then the run's driver (kill -9); the rerun gives the uninterrupted dataset
byte for byte; two writers at once get a clear lock error. (A new batch adding a dataset version is
tested with failing sources in test_failures.)"""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import dataset_bytes

from pipelines.procs import cmdline, descendants, kill_tree, wait_gone
from storage_schemas import open_dataset

REPO = Path(__file__).resolve().parents[1]
M2FD = [str(REPO / ".venv" / "bin" / "m2fd")] if (REPO / ".venv" / "bin" / "m2fd").exists() else ["m2fd"]


def _node_procs(temp_dir: Path) -> set[int]:
    """Every live process of the Ray node started with ``--temp-dir temp_dir``: its GCS (head), raylet,
    agents and log monitor (their command lines name the node's session directory) and the raylet's
    workers (its children)."""
    key = str(temp_dir).encode()
    roots = {int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and key in cmdline(int(d.name))}
    roots.discard(os.getpid())
    return set().union(*(descendants(pid) for pid in roots)) if roots else set()


def _kill_node(temp_dir: Path) -> None:
    """SIGKILL a whole node (as a machine lost), then wait until its processes are gone or zombies."""
    procs = _node_procs(temp_dir)
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_gone(procs, 30, "the killed node's processes")


def _tasks_on(temp_dir: Path, title: bytes) -> list[int]:
    """The node's Ray workers running ``title`` now (Ray names a worker's process after its task)."""
    return sorted(pid for pid in _node_procs(temp_dir) if cmdline(pid).startswith(title))


@pytest.mark.slow
def test_a_cluster_run_loses_a_node_and_its_driver_and_the_rerun_is_byte_identical(real_result, real_dir, tmp_path):
    """`m2fd run` through RAY_ADDRESS on a two-node Ray cluster on this machine (a head and a worker node,
    `ray start` each, with their own temp dirs and one CPU each). Phase 1: the worker node (raylet, agents,
    workers) is SIGKILLed while it runs an extraction task, and the run goes on on the head (Ray retries
    the lost tasks) until its driver is SIGKILLed too, mid-extraction. Phase 2: a new worker node joins,
    the same command reruns, redoes only the unfinished sources, and the dataset is byte-identical to the
    uninterrupted 5-video run's (another cluster, another executor layout)."""
    ref, _ = real_result
    out = tmp_path / "D"
    root = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths live under a node's temp dir
    head, node = root / "h", root / "w"
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ray_bin = str(Path(sys.executable).parent / "ray")
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    # every node and driver of a cluster shares its auth mode and token (a node with another mode cannot
    # join: `ray start --head` turns token mode on by itself where ~/.ray/auth_token exists, a worker does not)
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}

    def start_node(temp_dir: Path, *args: str) -> None:
        r = subprocess.run([ray_bin, "start", *args, "--temp-dir", str(temp_dir), *common], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    def extract_parts(stage: str = "extract") -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (out / "parts" / stage).glob("*.json")}

    try:
        start_node(head, "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard",
                   "false")
        start_node(node, "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1")
        cmd = M2FD + ["run", str(real_dir), "--out", str(out)]
        log = tmp_path / "run-1.log"
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                             start_new_session=True)
        deadline = time.time() + 300
        while not _tasks_on(node, b"ray::_extract_task"):
            assert p.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)  # let it get going
        _kill_node(node)
        at_node_kill = extract_parts()
        # the run goes on without the node: an extraction finishes after it was lost; then the driver is killed
        # (where the node had the last extraction, the driver is killed at once: the retry is unfinished)
        while len(at_node_kill) < 2 and len(extract_parts()) <= len(at_node_kill):
            assert p.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        kill_tree(p)  # SIGKILL (the driver started no Ray process: the cluster stays up)
        while _tasks_on(head, b"ray::_"):  # the dead driver's tasks are stopped by the cluster
            assert time.time() < deadline
            time.sleep(0.1)
        assert not (out / "tables" / "samples.parquet").exists()  # it really was mid-run
        done_before, ingested_before = extract_parts(), extract_parts("ingest")
        assert 1 <= len(done_before) < 3

        start_node(node, "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1")  # a replacement node
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]  # 0: every asset check passed (a failed one exits 4)
    finally:
        for d in (node, head):
            _kill_node(d)
        shutil.rmtree(root, ignore_errors=True)
    after = extract_parts()
    assert len(after) == 3 and {k: after[k] for k in done_before} == done_before  # only the unfinished sources
    ingested = extract_parts("ingest")
    assert len(ingested) == 5 and {k: ingested[k] for k in ingested_before} == ingested_before
    assert dataset_bytes(out) == dataset_bytes(ref)
    assert not list(out.rglob(".*.tmp"))


def test_two_runs_at_once_one_gets_a_lock_error(real_dir, tmp_path):
    """A second writer of a dataset that a run holds gets a clear error (exit 3) and changes nothing; the
    first run, held still (SIGSTOP) while the second tries, finishes a whole, valid dataset."""
    out = tmp_path / "D"
    args = M2FD + ["run", str(real_dir / "d12.mp4"), "--out", str(out), "--stages", "ingest", "--executor", "local"]
    a = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / ".m2fd.lock").exists() or not (out / ".m2fd.lock").read_text():
        assert a.poll() is None, a.communicate()[1][-2000:]
        time.sleep(0.05)
    a.send_signal(signal.SIGSTOP)  # it holds the lock for as long as the second run needs (no race with its end)
    try:
        b = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        a.send_signal(signal.SIGCONT)
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err[-2000:]
    assert b.returncode == 3 and "being written by another run" in b.stderr, b.stderr[-2000:]
    ds = open_dataset(out)  # the first run's dataset is whole and valid
    assert ds.table("sources").num_rows == 1 and ds.table("clips").num_rows > 0
