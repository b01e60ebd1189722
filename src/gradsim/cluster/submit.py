"""Submitting a planned array (slurm.Plan): with submitit (``map_array`` of slurm.PartitionTask) or with sbatch
(a script rendered from the package's ``templates/job.sbatch.template``), and the ``submission.json`` record
status.py reads."""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import submitit

from gradsim.cluster.resources import time_minutes
from gradsim.cluster.slurm import PartitionTask, Plan, task_config_record
from gradsim.config import PACKAGE_DIR
from gradsim.credentials import redact
from gradsim.errors import GradsimError
from gradsim.io import atomic_write_json
from gradsim.layout import (
    sbatch_script_file,
    submission_record,
    submitit_dir,
    task_config_file,
    task_log,
    task_log_dir,
)

TEMPLATE = PACKAGE_DIR / "templates" / "job.sbatch.template"  # package data: works installed
# The task's command after the python: one task of the submission through the installed package (no checkout's
# main.py), reading the typed Config of task_config.json.
TASK_MODULE = ("-m", "gradsim", "task")


def render_template(template: str, values: dict[str, str]) -> str:
    """Fill {{name}} placeholders; an unknown or missing one is an error, not a silently broken script."""
    missing = sorted(set(re.findall(r"{{(\w+)}}", template)) - set(values))
    if missing:
        raise GradsimError(f"the sbatch template uses unknown placeholders: {', '.join(missing)}")
    return re.sub(r"{{(\w+)}}", lambda m: values[m.group(1)], template)


def sbatch_script(p: Plan, template_path: Path = TEMPLATE) -> str:
    r = p.resources
    n = len(p.todo)
    array = f"0-{n - 1}" + (f"%{r.max_parallel}" if r.max_parallel else "")
    lines = [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={v}" for k, v in r.sbatch_options()]
    quiet = ["-q"] if p.quiet else []
    command = " ".join([r.task_command(), *TASK_MODULE, shlex.quote(str(task_config_file(p.sub_dir))), *quiet])
    values = {
        "job_name": p.job_name,
        "array": array,
        "log_dir": str(task_log_dir(p.sub_dir)),
        "sbatch_options": "\n".join(lines),
        "signal_delay_s": str(r.signal_delay_s),
        "workdir": shlex.quote(str(Path.cwd())),
        "setup": "\n".join(r.setup),
        "starts": " ".join(str(s) for s, _ in p.todo),
        "ends": " ".join(str(e) for _, e in p.todo),
        "max_requeues": str(r.max_requeues),
        "command": command,
    }
    return render_template(template_path.read_text(), values)


class _OfflineSlurmExecutor(submitit.SlurmExecutor):
    """For --dry-run only: renders submitit's script on a machine without Slurm (the real executor
    refuses to be built where there is no srun)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


# Slurm options submitit's executor takes by name; any other goes to its additional_parameters.
SUBMITIT_NATIVE = ("partition", "mem", "account", "qos", "cpus_per_task", "gres")


def _submitit_executor(p: Plan, dry_run: bool = False) -> submitit.SlurmExecutor:
    r = p.resources
    # SlurmExecutor, not AutoExecutor: the python command (container prefix) is a constructor argument.
    cls = _OfflineSlurmExecutor if dry_run else submitit.SlurmExecutor
    ex = cls(folder=submitit_dir(p.sub_dir), max_num_timeout=r.max_requeues, python=r.task_command())
    params: dict[str, Any] = {"job_name": p.job_name, "signal_delay_s": r.signal_delay_s}
    extra: dict[str, Any] = {}
    for key, value in r.sbatch_options():  # the one mapping of resources to Slurm's options, as sbatch's script
        name = key.replace("-", "_")
        if key == "time":
            params["time"] = time_minutes(value)  # submitit wants minutes
        elif name in SUBMITIT_NATIVE:
            params[name] = value
        else:
            extra[key] = value
    if r.setup:
        params["setup"] = list(r.setup)
    if r.max_parallel:
        params["array_parallelism"] = r.max_parallel
    if extra:
        params["additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


def submitit_script(p: Plan) -> str:
    """The sbatch script submitit will write for this array (its own renderer, so it is exact)."""
    from submitit.slurm.slurm import _make_sbatch_string

    ex = _submitit_executor(p, dry_run=True)
    return _make_sbatch_string(
        command=ex._submitit_command_str, folder=ex.folder, map_count=len(p.todo), **ex.parameters
    )


def write_task_config(p: Plan) -> Path:
    """What every task runs, typed (the Config and the data hashes it was planned on): read back by `gradsim task`
    (sbatch); submitit pickles the same Config into its tasks."""
    path = task_config_file(p.sub_dir)
    atomic_write_json(path, task_config_record(p.task_cfg, p.data))
    return path


def submit(p: Plan, dry_run: bool = False) -> dict:
    """Submit the plan's pending ranges as one array; returns the submission record."""
    record = {
        "backend": p.backend,
        "run_dir": str(p.run_dir),
        "sub_dir": str(p.sub_dir),
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cwd": str(Path.cwd()),
        "task_config": str(task_config_file(p.sub_dir)),
        "config": p.task_cfg.to_dict(),
        "num_queries": p.num_queries,
        "ranges": [list(r) for r in p.ranges],
        "resources": asdict(p.resources),
        "array_job_id": None,
        "tasks": [],
        "estimate": {
            "throughput": p.throughput_source,
            "tasks": [e.to_dict() for e in p.estimates],
        },
    }
    if not p.todo:
        return record
    if not dry_run:
        write_task_config(p)
    if p.backend == "sbatch":
        script = sbatch_script(p)
        script_path = sbatch_script_file(p.sub_dir)
        if dry_run:
            record["script"], record["command"] = script, f"sbatch --parsable {script_path}"
            return record
        task_log_dir(p.sub_dir).mkdir(parents=True, exist_ok=True)
        script_path.write_text(script)
        out = _slurm(["sbatch", "--parsable", str(script_path)])
        array_id = out.strip().split(";")[0]
        record["array_job_id"] = array_id
        record["tasks"] = [
            {
                "start": s,
                "end": e,
                "job_id": f"{array_id}_{i}",
                "logs": [str(task_log(p.sub_dir, array_id, i))],
            }
            for i, (s, e) in enumerate(p.todo)
        ]
    else:
        if dry_run:
            record["script"] = submitit_script(p)
            record["command"] = (
                f"submitit.SlurmExecutor(folder={str(submitit_dir(p.sub_dir))!r}).map_array("
                f"gradsim.cluster.slurm.PartitionTask(<the Config of {task_config_file(p.sub_dir).name}>), "
                f"starts={[s for s, _ in p.todo]}, "
                f"ends={[e for _, e in p.todo]})"
            )
            return record
        ex = _submitit_executor(p)
        jobs = ex.map_array(PartitionTask(p.task_cfg, p.data, p.quiet), [s for s, _ in p.todo], [e for _, e in p.todo])
        record["array_job_id"] = jobs[0].job_id.split("_")[0]
        record["tasks"] = [
            {
                "start": s,
                "end": e,
                "job_id": j.job_id,
                "logs": [str(j.paths.stderr).replace("%t", "0"), str(j.paths.stdout).replace("%t", "0")],
            }
            for (s, e), j in zip(p.todo, jobs)
        ]
    write_records(p, record)
    return record


def write_records(p: Plan, record: dict) -> None:
    """The submission record status.py reads: in the submission folder, or with --setting both one per setting
    (<submission>/<setting>/), each with that setting's run, query count and its tasks' ranges clipped to it."""
    if len(p.runs) == 1:
        atomic_write_json(submission_record(p.sub_dir), record)
        return
    for run in p.runs:
        tasks = [dict(t, start=c[0], end=c[1]) for t in record["tasks"] if (c := run.clip(t["start"], t["end"]))]
        ranges = [list(c) for s, e in p.ranges if (c := run.clip(s, e))]
        mine = dict(record, run_dir=str(run.run_dir), num_queries=run.num_queries, ranges=ranges, tasks=tasks)
        atomic_write_json(submission_record(p.sub_dir, run.setting), mine)


def _slurm(cmd: list[str], check: bool = True) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise GradsimError(
            f"{cmd[0]} is not on PATH: run this on a Slurm login node "
            "(or start the local test cluster: bash slurm_scripts/cluster/start.sh)"
        ) from None
    except subprocess.TimeoutExpired:
        raise GradsimError(
            f"{cmd[0]} did not answer within 60 s: is the Slurm controller up? (scontrol ping)"
        ) from None
    if check and proc.returncode != 0:
        raise GradsimError(f"{' '.join(cmd[:2])} failed: {redact(proc.stderr.strip() or proc.stdout.strip())}")
    return proc.stdout
