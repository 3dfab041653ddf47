"""Resume and incremental runs: kill -9 mid-run then rerun gives the uninterrupted dataset byte for
byte; a Ray worker killed mid-stage is retried; two writers at once get a clear lock error. (A new
batch adding a dataset version is tested with failing sources in test_failures.)"""
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from conftest import dataset_bytes

from pipelines.job import run_job
from pipelines.procs import descendants, kill_tree
from storage_schemas import open_dataset

REPO = Path(__file__).resolve().parents[1]
M2FD = [str(REPO / ".venv" / "bin" / "m2fd")] if (REPO / ".venv" / "bin" / "m2fd").exists() else ["m2fd"]


def _ray_procs(title: bytes) -> list[int]:
    """This test process's Ray workers running ``title`` (another test process may run its own Ray)."""
    pids = []
    for pid in sorted(descendants(os.getpid())):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                pids.append(pid)
        except OSError:
            pass
    return pids


def test_kill_9_mid_run_then_rerun_is_byte_identical_with_a_worker_killed_too(real_result, real_dir, tmp_path):
    """Phase 1: the whole run (driver, Ray, workers) is killed with SIGKILL mid-extraction. Phase 2: the
    rerun redoes only the unfinished sources, and one of its Ray extraction workers is killed with
    SIGKILL mid-task (Ray retries it). The dataset ends byte-identical to the uninterrupted run."""
    ref, _ = real_result
    out = tmp_path / "D"
    p = subprocess.Popen(M2FD + ["run", str(real_dir), "--out", str(out), "--num-cpus", "2"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    # kill the whole run once the first source's extraction part is done
    while not list((out / "parts" / "extract").glob("*.json")):
        assert p.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.2)
    kill_tree(p)  # SIGKILL to the run and every process it started (Ray included)
    assert not (out / "tables" / "samples.parquet").exists()  # it really was mid-run
    done_before = len(list((out / "parts" / "extract").glob("*.json")))
    assert done_before < 3
    # ingest streams into extraction, so some sources may still have been mid-ingest when it was killed
    ingested_before = len(list((out / "parts" / "ingest").glob("*.json")))

    killed: list[int] = []
    stop = threading.Event()

    def chaos():
        while not stop.is_set() and not killed:
            pids = _ray_procs(b"ray::_extract_task")
            if pids:
                time.sleep(1.0)  # let it get going
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.1)

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    try:
        res = run_job([str(real_dir)], out, executor="ray", num_cpus=2, log=lambda m: None)
    finally:
        stop.set()
        t.join()
    assert killed, "no extraction worker was seen to kill"
    i = res["ingest"]
    assert (i.reused, i.analysed) == (ingested_before, 5 - ingested_before)  # only unfinished ingest redone
    tr = res["assets"]["tracks"]
    assert (tr["reused"], tr["computed"]) == (done_before, 3 - done_before)  # only the unfinished sources
    assert all(res["checks"].values())
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
