"""compute.py / status.py / combine.py against the real local Slurm cluster (slurm_scripts/cluster/start.sh).

A tiny Llama saved as a local directory keeps each array task to seconds of work; the bundled data
with --sample-size 6 gives 6 queries, 3 partitions of 2. Every combined run is compared with the
same study run unpartitioned, in this process, through main.py's code path. Without a running
cluster the module is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from conftest import require_live_slurm, wait_until

from gradsim.cluster.status import collect_status, format_status, queries_scored
from gradsim.io import read_json, read_jsonl_tolerant
from gradsim.layout import partition_paths

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "slurm_scripts" / "batch_processing"
# sitecustomize.py there installs the GRADSIM_TEST_SLOWDOWN pause in every Python process that has the
# folder on PYTHONPATH: the array tasks inherit it from the environment compute.py submits from.
HOOKS = Path(__file__).resolve().parent / "slurm_hooks"
# timeout > 10 min: submitit then treats USR2 as preemption, not as the time limit.
RESOURCES = ["--partition", "debug", "--mem", "1G", "--cpus-per-task", "1", "--time", "20"]
RANGES = [(0, 2), (2, 4), (4, 6)]


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    """Skip unless a Slurm controller answers; reach start.sh's cluster via its SLURM_CONF."""
    with pytest.MonkeyPatch.context() as mp:
        require_live_slurm(mp)
        # The code version in every result includes the git commit, and a commit landing in this
        # checkout between two partitions would (rightly) make combine refuse them. Hide git from
        # the tasks (they inherit this environment) so the version is the package's alone.
        mp.setenv("GIT_DIR", "/nonexistent/gradsim-tests-no-git")
        # One query per block (a budget of one tiny-model gradient, 6.4 MB), so that a task can be
        # caught between two queries. (The block layout does not change the numbers.)
        mp.setenv("GRADSIM_MEMORY_GB", "0.007")
        yield


@pytest.fixture(scope="module")
def study_args(tiny_model_dir) -> list[str]:
    return [
        "--setting",
        "paraphrased",
        "--computation-type",
        "gradient-similarity",
        "--model",
        str(tiny_model_dir),
        "--sample-size",
        "6",
        "--device",
        "cpu",
    ]


@pytest.fixture(scope="module")
def reference(study_args, tmp_path_factory) -> dict:
    """The same study, unpartitioned, in this process (main.py's code path)."""
    from gradsim.cli.common import config_from_args
    from gradsim.study.run import run

    return run(config_from_args([*study_args, "--output-dir", str(tmp_path_factory.mktemp("whole"))]))


def script(name: str, *args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = ["bash", str(SCRIPTS / name)] if name.endswith(".sh") else [sys.executable, str(SCRIPTS / name)]
    proc = subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    if ok:
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def submit(study_args, out: Path, backend: str, *extra, partitions: int = 3, env: dict | None = None):
    """compute.py: the study into ``out`` as ``partitions`` array tasks on ``backend``, with the test's resources."""
    flags = ("--output-dir", out, "--num-partitions", partitions, "--backend", backend)
    return script("compute.py", *study_args, *flags, *RESOURCES, *extra, env=env)


def slowed(seconds: int) -> dict:
    """The environment of tasks that pause before each query (tests/slurm_hooks/sitecustomize.py), so that a task can
    be caught between its queries; the pause also logs which queries each attempt computed."""
    pythonpath = os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")]))
    return {"GRADSIM_TEST_SLOWDOWN": str(seconds), "PYTHONPATH": pythonpath}


def submitted_jobs(stdout: str) -> dict[tuple[int, int], str]:
    return {(int(s), int(e)): j for j, s, e in re.findall(r"job (\d+(?:_\d+)?)\s+queries \[(\d+), (\d+)\)", stdout)}


def run_status(out: Path) -> dict[tuple[int, int], dict]:
    (run,) = collect_status([out / "slurm"])
    return {(r["start"], r["end"]): r for r in run["partitions"]}


def wait_statuses(out: Path, want: dict[tuple[int, int], str], timeout_s: float = 400) -> dict:
    def probe():
        rows = run_status(out)
        if any(r["status"] == "failed" for k, r in rows.items() if want.get(k) != "failed"):
            pytest.fail(f"a partition failed:\n{format_status(collect_status([out / 'slurm']))}")
        return rows if all(rows[k]["status"] == v for k, v in want.items()) else None

    return wait_until(probe, timeout_s, lambda: f"{want}; now:\n{format_status(collect_status([out / 'slurm']))}")


def digests(run_dir: Path) -> dict[str, str]:
    return {
        n: hashlib.sha256((run_dir / n).read_bytes()).hexdigest()
        for n in ("results.json", "scores.npz", "metrics.jsonl", "config.json")
    }


def assert_same_study(run_dir: Path, reference: dict) -> None:
    merged = read_json(run_dir / "results.json")
    assert merged["partition"]["merged_from"] == [list(r) for r in RANGES]
    assert merged["queries"] == reference["queries"]
    assert merged["summary"] == reference["summary"]


def test_submitit_preemption_resumes_and_a_cancelled_partition_is_named(study_args, reference, tmp_path):
    out = tmp_path / "out"
    run_dir = out / "gradient-similarity" / "paraphrased"
    proc = submit(study_args, out, "submitit", env=slowed(10))  # a task can be caught between its queries
    jobs = submitted_jobs(proc.stdout)
    assert sorted(jobs) == RANGES, proc.stdout
    assert str(run_dir / "partitions") in proc.stdout

    # Cancel [4, 6) as soon as it runs (submitit passes over SIGTERM, so a task cancelled within Slurm's
    # kill wait of its end would still finish: cancel it early), then preempt [2, 4) once it has scored a query.
    wait_until(lambda: run_status(out)[(4, 6)]["status"] == "running", 400, "[4, 6) to show as running")
    subprocess.run(["scancel", jobs[(4, 6)]], check=True)
    wait_until(lambda: queries_scored(run_dir, 2, 4) >= 1, 400, "partition [2, 4) to score a query")
    finished_before = queries_scored(run_dir, 2, 4)
    subprocess.run(["scancel", "--signal=USR2", jobs[(2, 4)]], check=True)

    rows = wait_statuses(out, {(0, 2): "done", (2, 4): "done", (4, 6): "failed"})
    assert rows[(4, 6)]["slurm_state"] == "CANCELLED"
    status = script("status.py", out / "slurm").stdout
    assert re.search(r"\[4, 6\)\s+failed\s+job \S+\s+CANCELLED", status), status
    assert "last lines of" in status and "| " in status, status  # the log tail

    # The preempted task was requeued and continued from its progress log.
    logs = sorted((out / "slurm").rglob(f"{jobs[(2, 4)]}_0_log.*"))
    text = "\n".join(p.read_text() for p in logs)
    assert "attempt 1" in text and "attempt 2" in text, text
    m = re.search(r"resuming: (\d+) of 2 queries already scored", text)
    assert m and int(m.group(1)) >= finished_before >= 1, text
    computed = re.findall(r"test slowdown: featurized queries (\S+)", text)
    assert sorted(computed) == sorted(set(computed)) and len(computed) == 2, computed  # none computed twice

    # Combine refuses, naming the range nobody finished.
    proc = script("combine.py", run_dir, ok=False)
    assert proc.returncode == 2
    assert "[4, 6)" in proc.stderr and "NOT combined" in proc.stderr, proc.stderr

    # The same command again submits only the unfinished partition, which resumes too.
    proc = submit(study_args, out, "submitit")
    assert "already finished, not submitted: [0, 2), [2, 4)" in proc.stdout, proc.stdout
    assert sorted(submitted_jobs(proc.stdout)) == [(4, 6)]
    wait_statuses(out, {r: "done" for r in RANGES})

    proc = script("combine.py", run_dir)
    assert "merged 3 partitions" in proc.stdout and "top-1" in proc.stdout and "total" in proc.stdout
    assert_same_study(run_dir, reference)
    metrics = read_jsonl_tolerant(run_dir / "metrics.jsonl")
    query_ids = [r["id"] for r in metrics if r["role"] == "query"]
    assert sorted(query_ids) == sorted(q["id"] for q in reference["queries"])  # each query's row once

    before = digests(run_dir)
    proc = script("combine_all.sh", "--output-dir", out)
    assert "already up to date" in proc.stdout
    assert digests(run_dir) == before


def test_sbatch_array_pending_then_done_combines_to_the_unpartitioned_run(study_args, reference, tmp_path):
    out = tmp_path / "out"
    run_dir = out / "gradient-similarity" / "paraphrased"
    # Held at submission, so that status can be seen to report pending tasks.
    proc = submit(study_args, out, "sbatch", "--sbatch-extra=--hold")
    jobs = submitted_jobs(proc.stdout)
    assert sorted(jobs) == RANGES, proc.stdout
    (rendered,) = (out / "slurm").rglob("job.sbatch")
    assert "#SBATCH --array=0-2" in rendered.read_text() and "#SBATCH --hold" in rendered.read_text()

    wait_statuses(out, {r: "pending" for r in RANGES}, timeout_s=60)
    assert "3 pending" in script("compute.py", *study_args, "--output-dir", out, "--status").stdout
    array_id = next(iter(jobs.values())).split("_")[0]
    subprocess.run(["scontrol", "release", array_id], check=True)
    wait_statuses(out, {r: "done" for r in RANGES})

    proc = script("combine_all.sh", "--output-dir", out)
    assert "merged 3 partitions" in proc.stdout and "top-1" in proc.stdout
    assert_same_study(run_dir, reference)
    before = digests(run_dir)
    script("combine_all.sh", "--output-dir", out)
    assert digests(run_dir) == before


def scored_ids(run_dir: Path, s: int, e: int, reference: dict) -> set[str]:
    """The ids of the queries of [s, e) whose block is in the range's progress log (finished, durable)."""
    import numpy as np

    paths = partition_paths(run_dir, s, e)
    ids = {q["index"]: q["id"] for q in reference["queries"]}
    out = set()
    for r in read_jsonl_tolerant(paths.progress):
        if r.get("kind") == "block":
            with np.load(paths.blocks / r["file"]) as z:
                out.update(ids[int(qi)] for qi in z["index"])
    return out


def sbatch_task_survives(study_args, reference, tmp_path, preempt: Callable[[str], None]) -> str:
    """Submit the study as an sbatch array (each query slowed down), ``preempt`` task [2, 4) once it has
    finished a query, then check that it came back, resumed without computing a finished query again,
    and that the partitions combine to the unpartitioned run. Returns that task's log up to its attempt 2."""
    out = tmp_path / "out"
    run_dir = out / "gradient-similarity" / "paraphrased"
    jobs = submitted_jobs(submit(study_args, out, "sbatch", env=slowed(8)).stdout)
    assert sorted(jobs) == RANGES
    victim = jobs[(2, 4)]
    wait_until(lambda: scored_ids(run_dir, 2, 4, reference), 400, "partition [2, 4) to score a query")
    # Finished (its block logged) before the signal; one more may finish before it lands.
    finished = scored_ids(run_dir, 2, 4, reference)
    preempt(victim)

    wait_statuses(out, {r: "done" for r in RANGES})
    (log_path,) = (out / "slurm").rglob(f"{victim}.log")
    text = log_path.read_text()
    # The first attempt's lines are still there (--open-mode=append), followed by the second's.
    first, sep, second = text.partition(f"job {victim} attempt 2")
    assert f"job {victim} attempt 1" in first and sep, text
    assert "attempt 3" not in second, text
    m = re.search(r"resuming: (\d+) of 2 queries already scored", second)
    assert m and int(m.group(1)) >= len(finished) >= 1, text
    again = re.findall(r"test slowdown: featurized queries (\S+)", second)
    assert not set(again) & finished, f"finished before the signal, computed again: {set(again) & finished}\n{text}"
    assert len(again) == len(set(again)) == 2 - int(m.group(1)), text  # only what the first attempt left
    # Either way the task ended on SIGTERM, through Python's exit path (its lock released), not by SIGKILL.
    assert "SIGTERM: stopping" in first, text
    assert "taking over the lock" not in second, text

    proc = script("combine.py", run_dir)
    assert "merged 3 partitions" in proc.stdout
    assert_same_study(run_dir, reference)  # none lost
    metrics = read_jsonl_tolerant(run_dir / "metrics.jsonl")
    query_ids = [r["id"] for r in metrics if r["role"] == "query"]
    assert sorted(query_ids) == sorted(q["id"] for q in reference["queries"])  # each query's row once
    return first


def test_sbatch_task_requeued_by_sigterm_resumes(study_args, reference, tmp_path):
    """`scontrol requeue` ends a running task the way a preemption with PreemptMode=REQUEUE does. The
    SIGTERM that preemption sends when GraceTime starts goes to srun steps only (job_signal without
    KILL_FULL_JOB, like a plain `scancel --signal=TERM`, which reaches neither the batch shell nor its
    children here), and these tasks have none. When GraceTime is over, slurmd gets REQUEST_KILL_PREEMPTED,
    which it handles by notifying srun steps and then through the same terminate path as the
    REQUEST_TERMINATE_JOB of `scontrol requeue`: SIGCONT and SIGTERM to every process of the job, the batch
    shell and Python alike, then SIGKILL after KillWait; slurmctld requeues the job either way. So this
    sends the task exactly the signals a preempted one gets, without a preemptor job, which would also
    preempt whatever else runs on the shared test cluster."""

    def requeue(job: str) -> None:
        subprocess.run(["scontrol", "requeue", job], check=True)

    first = sbatch_task_survives(study_args, reference, tmp_path, requeue)
    assert "gradsim: USR2" not in first, first


def test_sbatch_task_requeues_itself_on_usr2(study_args, reference, tmp_path):
    """USR2 is what `#SBATCH --signal=B:USR2@<delay>` sends the batch shell before the time limit: its
    trap requeues the task (`scontrol requeue`, which then ends it as above)."""

    def usr2(job: str) -> None:
        subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True)

    first = sbatch_task_survives(study_args, reference, tmp_path, usr2)
    assert "gradsim: USR2 (time limit or preemption): requeueing" in first, first


@pytest.mark.parametrize("backend", ["submitit", "sbatch"])
def test_dry_run_prints_the_script_and_submits_nothing(study_args, tmp_path, backend):
    out = tmp_path / "out"
    name = f"gradsim-dry-{backend}-{os.getpid()}"
    before = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout.split()
    proc = submit(study_args, out, backend, "--job-name", name, "--dry-run")
    assert "nothing was submitted" in proc.stdout
    assert "#!/bin/bash" in proc.stdout and "--array=0-2" in proc.stdout and f"--job-name={name}" in proc.stdout
    assert "--partition=debug" in proc.stdout and "--mem=1G" in proc.stdout
    after = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)  # finished jobs may age out; none may appear
    assert subprocess.run(["squeue", "-h", "-t", "all", "-n", name], capture_output=True, text=True).stdout == ""
    assert not out.exists()


def test_gpu_task_without_a_device_stops_at_once_and_status_names_why(study_args, tmp_path):
    """--gpus 1 on the local cluster (a GPU gres with no device behind it): the array is accepted and scheduled,
    its task runs `python -m gradsim task` of a Config with device cuda, finds no CUDA and exits 2 at once with
    one line naming what it saw; gradsim status reports the partition failed with that exit code and that line."""
    out = tmp_path / "out"
    args = [a for a in study_args if a not in ("--device", "cpu")]
    proc = submit(args, out, "sbatch", "--gpus", "1", partitions=1)
    (job,) = submitted_jobs(proc.stdout).values()
    (rendered,) = (out / "slurm").rglob("job.sbatch")
    assert "#SBATCH --gres=gpu:1" in rendered.read_text() and "-m gradsim task" in rendered.read_text()
    (task_config,) = (out / "slurm").rglob("task_config.json")
    assert json.loads(task_config.read_text())["config"]["device"] == "cuda"
    wait_statuses(out, {(0, 6): "failed"}, timeout_s=120)
    # squeue sees the end first (reason NonZeroExitCode); sacct, which lags slurmdbd by about a second, has the code
    row = wait_until(
        lambda: (r := run_status(out)[(0, 6)])["reason"].startswith("FAILED (exit 2") and r,
        30,
        lambda: f"sacct's exit code; now: {run_status(out)[(0, 6)]['reason']}",
    )
    assert row["job_id"] == job
    (log,) = row["log_tail"].values()
    (message,) = [x for x in log if x.startswith("error:")]
    assert "device 'cuda' asked for, but CUDA is not available here" in message and "CUDA_VISIBLE_DEVICES" in message
    assert "Traceback" not in "\n".join(log)
    shown = script("status.py", out / "slurm").stdout
    assert "failed" in shown and "FAILED (exit 2" in shown and "CUDA is not available" in shown
    assert not (out / "gradient-similarity").exists()  # nothing written


def test_sbatch_both_settings_in_one_array_combine_to_the_unpartitioned_runs(study_args, tmp_path):
    """--setting both: one array whose tasks run both settings of their range; one submission record per setting,
    so status sees two runs, and each setting's partitions combine to that setting of an unpartitioned run."""
    from gradsim.cli.common import config_from_args
    from gradsim.study.run import run

    args = ["both" if a == "paraphrased" else a for a in study_args]
    whole = run(config_from_args([*args, "--output-dir", str(tmp_path / "whole")]))["settings"]
    out = tmp_path / "out"
    proc = script("compute.py", *args, "--output-dir", out, "--num-partitions", "2", "--backend", "sbatch", *RESOURCES)
    assert sorted(submitted_jobs(proc.stdout)) == [(0, 3), (3, 6)], proc.stdout
    assert len(list((out / "slurm").rglob("job.sbatch"))) == 1  # one array
    records = sorted((out / "slurm").rglob("submission.json"))
    assert [r.parent.name for r in records] == ["model-generated", "paraphrased"]

    def all_done():
        runs = collect_status([out / "slurm"])
        if any(r["status"] == "failed" for run_ in runs for r in run_["partitions"]):
            pytest.fail(format_status(runs))
        return len(runs) == 2 and all(run_["counts"]["done"] == len(run_["partitions"]) for run_ in runs)

    wait_until(all_done, 400, lambda: format_status(collect_status([out / "slurm"])))
    for setting, ref in whole.items():
        run_dir = out / "gradient-similarity" / setting
        script("combine.py", run_dir)
        merged = read_json(run_dir / "results.json")
        assert merged["queries"] == ref["queries"] and merged["summary"] == ref["summary"], setting
