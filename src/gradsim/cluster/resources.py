"""What a Slurm task asks for (Resources: partition, time, memory, GPUs, container ...) and how that is read:
flags over ``GRADSIM_SLURM_*`` variables (environment or .env), never this file, since clusters differ in
partitions, accounts, GPUs and containers. Also the backends that submit and start the tasks, and Slurm's own
formats: --time and --mem values, #SBATCH options."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gradsim.errors import GradsimError
from gradsim.options import env_values, from_args, option
from gradsim.study.estimate import DEFAULT_GPU_MEMORY_GB, TIME_MARGIN, TIME_SLACK_MIN

BACKENDS = ("submitit", "sbatch")  # how the tasks are submitted and started (submit.py)
DEFAULT_TIME = "01:00:00"  # --time where no estimate can be made (the model's config unreadable here)


def time_minutes(spec: str) -> int:
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes (submitit wants minutes)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", spec.strip())
    if not m:
        raise GradsimError(f"--time {spec!r} is not a Slurm time: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:
        h, mi, s = a, b or 0, c or 0
    elif c is not None:
        h, mi, s = a, b, c
    elif b is not None:
        h, mi, s = 0, a, b
    else:
        h, mi, s = 0, a, 0
    total = (days or 0) * 1440 + h * 60 + mi + (1 if s else 0)
    if total < 1:
        raise GradsimError(f"--time {spec!r} is zero: give the task at least a minute")
    return total


def sbatch_option(raw: str) -> tuple[str, Any]:
    """'#SBATCH --constraint=a100', '--constraint=a100', '--exclusive' or 'constraint=a100' -> (key, value)."""
    s = raw.strip()
    s = s[len("#SBATCH") :].strip() if s.startswith("#SBATCH") else s
    s = s.lstrip("-")
    key, sep, value = s.partition("=")
    if not key or " " in key:
        raise GradsimError(f"extra sbatch option {raw!r} is not of the form --key=value or --flag")
    return key, (value if sep else True)


@dataclass
class Resources:
    """What a task asks Slurm for, and how it is started. None means: the cluster's default. Each option's
    default: its GRADSIM_SLURM_<NAME> (environment, then .env), else the value here."""

    partition: Optional[str] = option("Slurm partition", default=None, env="GRADSIM_SLURM_PARTITION")
    time: Optional[str] = option(
        "time limit per task, e.g. 90 or 04:00:00",
        default=None,
        env="GRADSIM_SLURM_TIME",
        default_help=f"the task's estimate x {TIME_MARGIN:g} + {TIME_SLACK_MIN} min",
    )
    mem: Optional[str] = option("memory per task, e.g. 32G", default=None, env="GRADSIM_SLURM_MEM")
    cpus_per_task: Optional[int] = option("CPUs per task", default=None, env="GRADSIM_SLURM_CPUS_PER_TASK")
    gpus: Optional[str] = option(
        "GPUs per task as --gres=gpu:<this>, e.g. 1 or a100:1", default=None, env="GRADSIM_SLURM_GPUS"
    )
    gpu_memory_gb: float = option(
        "memory of one GPU in GB: a model whose run cannot fit is refused at submit",
        default=DEFAULT_GPU_MEMORY_GB,
        env="GRADSIM_SLURM_GPU_MEMORY_GB",
        default_help=f"{DEFAULT_GPU_MEMORY_GB:g}, an A100 40 GB, the smallest common data-centre training card",
    )
    tflops: Optional[float] = option(
        "achieved TFLOP/s of one task, for the time estimate",
        default=None,
        env="GRADSIM_SLURM_TFLOPS",
        default_help="measured for CPUs; for GPUs 40%% of the card's dense peak, assumed",
    )
    account: Optional[str] = option("account to charge", default=None, env="GRADSIM_SLURM_ACCOUNT")
    qos: Optional[str] = option("quality of service", default=None, env="GRADSIM_SLURM_QOS")
    sbatch_extra: list[str] = option(
        "extra #SBATCH option, e.g. --constraint=a100; repeatable", default_factory=list, env="GRADSIM_SLURM_EXTRA"
    )
    setup: list[str] = option(
        "shell line run before each task, e.g. 'module load cuda'; repeatable",
        default_factory=list,
        env="GRADSIM_SLURM_SETUP",
    )
    container: Optional[str] = option(
        "prefix of the task command, e.g. 'apptainer exec --nv img.sif'", default=None, env="GRADSIM_SLURM_CONTAINER"
    )
    python: str = option(
        "python on the compute nodes", default=sys.executable, env="GRADSIM_SLURM_PYTHON", default_help="this one"
    )
    max_parallel: Optional[int] = option(
        "at most this many tasks at once, as array %%N", default=None, env="GRADSIM_SLURM_MAX_PARALLEL"
    )
    max_requeues: int = option(
        "requeues after time limits before a task gives up", default=5, env="GRADSIM_SLURM_MAX_REQUEUES"
    )
    signal_delay_s: int = 120
    job_name: Optional[str] = option(
        "Slurm job name", default=None, env="GRADSIM_SLURM_JOB_NAME", default_help="gradsim-<run>"
    )

    def sbatch_options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [("time", self.time or DEFAULT_TIME)]
        for key in ("partition", "mem", "account", "qos"):
            if getattr(self, key):
                opts.append((key, getattr(self, key)))
        if self.cpus_per_task:
            opts.append(("cpus-per-task", self.cpus_per_task))
        if self.gpus:
            # --gres is understood by every Slurm version; "a100:2" picks a type.
            opts.append(("gres", f"gpu:{self.gpus}"))
        opts.extend(sbatch_option(x) for x in self.sbatch_extra)
        return opts

    def task_command(self) -> str:
        python = shlex.quote(self.python)
        return f"{self.container} {python}" if self.container else python


RESOURCES_TITLE = (
    "Slurm resources (default: GRADSIM_SLURM_<NAME> from the environment or .env, else the cluster's default)"
)


def slurm_environ() -> dict[str, str]:
    """The environment over .env (read, not loaded): where GRADSIM_SLURM_* settings come from."""
    from dotenv import dotenv_values

    dotenv = {k: v for k, v in dotenv_values(Path.cwd() / ".env").items() if v is not None}
    return {**dotenv, **os.environ}


def resources_from(args: argparse.Namespace | dict) -> Resources:
    """Flags over GRADSIM_SLURM_* (environment over .env) over the defaults of Resources."""
    res = from_args(Resources, args, fallback=env_values(Resources, slurm_environ()))
    for name in ("cpus_per_task", "max_parallel", "max_requeues"):
        value = getattr(res, name)
        if value is not None and value < (0 if name == "max_requeues" else 1):
            raise GradsimError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if res.time is not None:
        time_minutes(res.time)  # refuse a malformed time before anything is submitted
    for name in ("gpu_memory_gb", "tflops"):
        if getattr(res, name) is not None and getattr(res, name) <= 0:
            raise GradsimError(f"--{name.replace('_', '-')} must be positive, got {getattr(res, name)}")
    for x in res.sbatch_extra:
        sbatch_option(x)
    return res


def parse_mem_gb(mem: str) -> Optional[float]:
    """Slurm's --mem value in GB (default unit MB), or None when it is not a plain size."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(mem), re.IGNORECASE)
    if not m:
        return None
    scale = {"K": 1 / 2**20, "M": 1 / 1024, "": 1 / 1024, "G": 1, "T": 1024}[m.group(2).upper()]
    return float(m.group(1)) * scale
