"""One process per query range of a run; feature stores shared safely by concurrent partitions."""

import logging
import os
import socket
import subprocess
import sys

import numpy as np
import orjson
import pytest
from test_pipeline import cfg_for, interrupt_after

from gradsim.errors import GradsimError
from gradsim.layout import RunPaths
from gradsim.study.features import FeatureStore
from gradsim.study.lock import acquire, locked, release
from gradsim.study.run import run

HOLD = """
import sys, time
from gradsim.study.lock import acquire
acquire(sys.argv[1], "test")
print("held", flush=True)
time.sleep(600)
"""


def lock_of(tmp_path, start=None, end=None):
    d = tmp_path / "gradient-similarity" / "paraphrased"
    return RunPaths(d, start or 0, end or 8, start is not None).lock


def test_a_second_run_of_the_same_range_is_refused_and_a_dead_holders_lock_taken_over(tiny, tmp_path, caplog):
    lock = lock_of(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GradsimError) as e:
            run(cfg_for(tmp_path), lm=tiny)
        msg = str(e.value)
        assert "\n" not in msg and f"process {holder.pid} on {socket.gethostname()} since " in msg, msg
        assert "wait for that run to finish, or remove the lock file if that process is dead" in msg
        assert str(lock) in msg
        assert not (lock.parent / "progress.jsonl").exists()  # the holder's files were not touched
        # Another range of the same run is not held up.
        run(cfg_for(tmp_path, partition_start=0, partition_end=2, baselines=False), lm=tiny)
    finally:
        holder.kill()  # as a kill -9 would: the lock file stays, naming a dead process
        holder.wait()
    assert orjson.loads(lock.read_bytes())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="gradsim"):
        res = run(cfg_for(tmp_path, baselines=False), lm=tiny)
    assert any(f"taking over the lock {lock} of process {holder.pid}" in r.getMessage() for r in caplog.records)
    assert res["partition"] == {"start": 0, "end": 8, "num_queries": 8}
    assert not lock.exists()  # released at the end


def test_the_lock_is_released_when_the_run_fails(tiny, tmp_path, monkeypatch):
    lock = lock_of(tmp_path)
    restore = interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path, memory_gb=0.013, baselines=False), lm=tiny)
    restore()
    assert not lock.exists() and (lock.parent / "progress.jsonl").exists()
    fd = acquire(lock, "test")  # held in this very process, through another descriptor: still refused
    try:
        with pytest.raises(GradsimError, match=f"in use by process {os.getpid()} "):
            run(cfg_for(tmp_path, memory_gb=0.013, baselines=False), lm=tiny)
    finally:
        release(lock, fd)
    assert (lock.parent / "progress.jsonl").exists()  # the refused run did not start this range afresh


HOLD_UNTIL_TERM = """
import sys, time
from gradsim.study.lock import exit_on_sigterm, locked
with exit_on_sigterm(), locked(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_sigterm_releases_the_lock(tmp_path):
    """scancel sends SIGTERM: the run stops through its exit path, so a resubmitted task (maybe on
    another node) is not refused."""
    import signal

    lock = tmp_path / "progress.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_TERM, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held" and lock.exists()
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        holder.kill()
    assert not lock.exists()


def write_holder(path, **holder):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(holder))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def fake_squeue(tmp_path, monkeypatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\n" + script)
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_stale_locks_taken_over_live_or_foreign_ones_refused(tmp_path, monkeypatch, caplog):
    fake_squeue(tmp_path, monkeypatch, "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
    lock = tmp_path / "progress.lock"
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    write_holder(lock, pid=dead_pid(), host=socket.gethostname(), started="2026-01-01T00:00:00+00:00")
    with caplog.at_level(logging.WARNING, logger="gradsim"), locked(lock, "this range"):
        assert orjson.loads(lock.read_bytes())["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text and not lock.exists()
    # Another host's process cannot be checked from here: refused, unless it is this same Slurm job
    # (a requeued task; Slurm runs one attempt at a time).
    write_holder(lock, pid=1, host="node-elsewhere", started="2026-01-01T00:00:00+00:00", slurm_job="77_3")
    with pytest.raises(GradsimError, match="this range is in use by process 1 on node-elsewhere since 2026-01-01"):
        acquire(lock, "this range")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with locked(lock, "this range"):
        assert orjson.loads(lock.read_bytes())["slurm_job"] == "77_3"
    assert not lock.exists()


@pytest.mark.parametrize("state, taken", [("RUNNING", False), ("PENDING", True), ("", True)])
def test_another_nodes_lock_is_taken_over_when_squeue_says_its_job_ended(tmp_path, monkeypatch, state, taken):
    """A cancelled task resubmitted to another node: its old lock names a job that no longer runs."""
    fake_squeue(tmp_path, monkeypatch, f"[ \"$3\" = 12_0 ] && echo '{state}'\nexit 0\n")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "13")
    lock = tmp_path / "progress.lock"
    write_holder(lock, pid=1, host="node-elsewhere", started="2026-01-01T00:00:00+00:00", slurm_job="12_0")
    if taken:
        with locked(lock, "this range"):
            assert orjson.loads(lock.read_bytes())["slurm_job"] == "13"
    else:
        with pytest.raises(GradsimError, match="in use by process 1 on node-elsewhere"):
            acquire(lock, "this range")


def test_concurrent_writers_of_one_shard_leave_agreeing_files(tmp_path):
    """Partitions share a feature store without a lock: the first features published win, and the
    self-dots always come from the features that are there."""
    store = FeatureStore.open(tmp_path / "store", {"k": 1}, ["a", "b"], 3, 2)
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    store.write_shard(0, 2, first, lambda f: (f.astype(np.float64) ** 2).sum(1, keepdims=True))
    # A slower writer of the same shard, whose features differ in rounding: its own are dropped.
    store.write_shard(0, 2, first + 1e-3, lambda f: (f.astype(np.float64) ** 2).sum(1, keepdims=True))
    assert np.array_equal(store.read_features(0, 2), first)
    assert np.array_equal(store.read_selfdots(0, 2)[:, 0], (first.astype(np.float64) ** 2).sum(1))
    # Killed between the two files: the next writer completes the shard from the features there.
    store._path(0, 2, "selfdots").unlink()
    assert not store.has_shard(0, 2)
    store.write_shard(0, 2, first + 1e-3, lambda f: (f.astype(np.float64) ** 2).sum(1, keepdims=True))
    assert store.has_shard(0, 2)
    assert np.array_equal(store.read_selfdots(0, 2)[:, 0], (first.astype(np.float64) ** 2).sum(1))
