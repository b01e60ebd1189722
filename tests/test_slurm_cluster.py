"""Smoke tests for the local single-node Slurm cluster (slurm_scripts/cluster/start.sh).

They check what gradsim relies on: job arrays run side by side, sacct reports final states,
and submitit can submit, collect results and resume a Checkpointable job after preemption.
Without a running cluster the whole module is skipped, so the default test run still passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import cloudpickle
import pytest
import submitit
from conftest import require_live_slurm, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# The jobs run in a fresh interpreter where this test module is not importable (tests/ is not a
# package), so submitit's cloudpickle must carry the functions and classes below by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    """Skip the module unless a Slurm controller answers; reach start.sh's cluster via env.sh's SLURM_CONF."""
    with pytest.MonkeyPatch.context() as mp:
        require_live_slurm(mp)
        yield


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


def sbatch(*args: str) -> str:
    """Submit and return the job id (--parsable prints 'id' or 'id;cluster')."""
    return run("sbatch", "--parsable", *args).strip().split(";")[0]


def sacct_rows(job_id: str) -> dict[str, dict[str, str]]:
    """Allocation rows (one per job or array task) keyed by JobID; State without 'by <uid>'."""
    fields = ["JobID", "State", "ExitCode", "Start", "End"]
    out = run("sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(fields))
    rows = {}
    for line in out.splitlines():
        row = dict(zip(fields, line.split("|")))
        row["State"] = row["State"].split()[0]
        rows[row["JobID"]] = row
    return rows


def wait_finished(job_id: str, n_rows: int = 1, timeout_s: float = 60) -> dict[str, dict[str, str]]:
    """Wait until sacct lists n_rows allocations for job_id, all in a final state."""

    def probe():
        rows = sacct_rows(job_id)
        done = len(rows) == n_rows and all(r["State"] in TERMINAL_STATES for r in rows.values())
        return rows if done else None

    return wait_until(probe, timeout_s, lambda: f"job {job_id} to finish in sacct (now: {sacct_rows(job_id)})")


def test_sbatch_array_tasks_run_concurrently_and_complete(tmp_path: Path):
    job_id = sbatch(
        "--array=0-2",
        "--cpus-per-task=1",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/%A_%a.out",
        "--wrap",
        "sleep 2; echo $SLURM_ARRAY_TASK_ID > task_$SLURM_ARRAY_TASK_ID.txt",
    )
    rows = wait_finished(job_id, n_rows=3)

    assert sorted(rows) == [f"{job_id}_{i}" for i in range(3)]
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows
    for i in range(3):
        assert (tmp_path / f"task_{i}.txt").read_text().strip() == str(i)
    # The node advertises more CPUs than the machine has so that test tasks overlap in time.
    starts = [datetime.fromisoformat(r["Start"]) for r in rows.values()]
    ends = [datetime.fromisoformat(r["End"]) for r in rows.values()]
    assert max(starts) < min(ends), f"array tasks ran one after another: {rows}"


def test_sacct_reports_completed_failed_and_cancelled(tmp_path: Path):
    common = [f"--chdir={tmp_path}", f"--output={tmp_path}/%j.out"]
    sleeper = sbatch(*common, "--wrap", "sleep 300")
    ok = sbatch(*common, "--wrap", "true")
    failed = sbatch(*common, "--wrap", "exit 3")
    # Cancel it while it runs, the case where submitit must rely on sacct to see the end. Ask the
    # controller (squeue): sacct can show a started job as PENDING for several seconds.
    wait_until(lambda: run("squeue", "-h", "-j", sleeper, "-o", "%T").strip() == "RUNNING", 30, "sleeper to run")
    run("scancel", sleeper)

    assert wait_finished(ok)[ok]["State"] == "COMPLETED"
    failed_row = wait_finished(failed)[failed]
    assert (failed_row["State"], failed_row["ExitCode"]) == ("FAILED", "3:0")
    assert wait_finished(sleeper)[sleeper]["State"] == "CANCELLED"


def make_executor(folder: Path, **kwargs) -> submitit.AutoExecutor:
    # A fresh folder per test: job ids restart at 1 after a purge and a reused folder would hand
    # back a stale <id>_result.pkl.
    executor = submitit.AutoExecutor(folder=folder, **kwargs)
    assert executor.cluster == "slurm"
    # No gpus: the node has no GRES. timeout_min > 10 so that USR2 means preemption, not timeout.
    executor.update_parameters(timeout_min=20, slurm_partition="debug", mem_gb=1, cpus_per_task=1)
    return executor


def wait_job(job: submitit.Job, timeout_s: float) -> None:
    # job.result() blocks without a bound; job.state is cached, done(force_check=True) asks sacct.
    wait_until(lambda: job.done(force_check=True), timeout_s, f"submitit job {job.job_id}")


def power(base: int, exponent: int) -> tuple[int, str]:
    return base**exponent, os.environ["SLURM_JOB_ID"]


def test_submitit_job_returns_result(tmp_path: Path):
    job = make_executor(tmp_path / "submitit").submit(power, 2, 10)
    wait_job(job, timeout_s=60)
    assert job.result() == (1024, job.job_id)
    # submitit saw the result file; accounting catches up about a second later.
    assert wait_finished(job.job_id)[job.job_id]["State"] == "COMPLETED"


class SlowCounter(submitit.helpers.Checkpointable):
    """Counts to n_steps, one step per 0.5 s; notes the count each run starts from.

    Checkpointable.checkpoint pickles this object with its count when submitit gets USR2,
    so a requeued run continues where the preempted one stopped.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, workdir: str, n_steps: int) -> int:
        work = Path(workdir)
        with open(work / "starts.txt", "a") as f:
            f.write(f"{self.count}\n")
        while self.count < n_steps:
            time.sleep(0.5)
            self.count += 1
            (work / "progress.txt").write_text(str(self.count))
        return self.count


def test_submitit_checkpointable_resumes_after_preemption(tmp_path: Path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    executor = make_executor(tmp_path / "submitit", slurm_max_num_timeout=3)
    job = executor.submit(SlowCounter(), str(workdir), 8)

    progress = workdir / "progress.txt"
    wait_until(lambda: progress.exists() and int(progress.read_text() or 0) >= 3, 60, "the counter to reach 3")
    # What a preemption sends (job._interrupt() does the same after a SIGTERM, which submitit ignores).
    run("scancel", "--signal=USR2", job.job_id)
    wait_job(job, timeout_s=60)

    assert job.result() == 8
    starts = [int(s) for s in (workdir / "starts.txt").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 3, f"did not resume from the checkpoint: {starts}"
