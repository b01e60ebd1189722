"""Fan a run's queries out over one Slurm job array: planning and submission (compute.py).

``compute.py`` splits the queries into N contiguous ranges and submits one array: with submitit
(``map_array`` of a Checkpointable task) or with sbatch (a script rendered from the package's
``templates/job.sbatch.template``). Every task runs main.py's code path (``python -m gradsim run``) for its
range, so a task that is preempted or hits its time limit is requeued and resumes from the run's
progress log. Each submission leaves ``submission.json`` beside its logs; ``gradsim.cluster.status``
(status.py) reads those and asks squeue/sacct, ``gradsim.cluster.combine`` (combine.py) merges the finished
partitions.

Slurm resources come from flags and ``GRADSIM_SLURM_*`` variables (environment or .env), never
from this file: clusters differ in partitions, accounts, GPUs and containers.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import submitit

from gradsim.cluster.status import collect_status, format_status
from gradsim.config import PACKAGE_DIR, Config, redact
from gradsim.errors import GradsimError
from gradsim.io import atomic_write_json, read_json
from gradsim.layout import (
    partition_paths,
    sbatch_script_file,
    slurm_dir,
    submission_dir,
    submission_record,
    submitit_dir,
    task_log,
    task_log_dir,
)
from gradsim.layout import run_dir as run_dir_of
from gradsim.options import Parser, env_values, from_args, option
from gradsim.study.estimate import DEFAULT_GPU_MEMORY_GB, TIME_MARGIN, TIME_SLACK_MIN, Estimate

log = logging.getLogger("gradsim")

TEMPLATE = PACKAGE_DIR / "templates" / "job.sbatch.template"  # package data: works installed
# The task's command after the python: the study's code path through the installed package (no checkout's main.py).
TASK_MODULE = ("-m", "gradsim", "run")
BACKENDS = ("submitit", "sbatch")
DEFAULT_TIME = "01:00:00"  # --time where no estimate can be made (the model's config unreadable here)


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def split_ranges(start: int, end: int, n: int) -> list[tuple[int, int]]:
    """N contiguous ranges covering [start, end) whose sizes differ by at most one (fewer when
    there are fewer queries than N: an empty partition would only cost a job)."""
    if n < 1:
        raise GradsimError(f"--num-partitions must be at least 1, got {n}")
    n = min(n, end - start)
    base, extra = divmod(end - start, n)
    out, s = [], start
    for i in range(n):
        e = s + base + (1 if i < extra else 0)
        out.append((s, e))
        s = e
    return out


# --------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class PartitionTask(submitit.helpers.Checkpointable):
    """main.py's code path for one query range. On preemption or time limit submitit calls
    checkpoint(), which (inherited) requeues this same call; run() then resumes from its progress
    log, so the call itself needs no state."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)

    def __call__(self, start: int, end: int) -> dict:
        from gradsim.cli import config_from_args
        from gradsim.study.run import run

        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) + 1
        print(f"gradsim task [{start}, {end}) job {os.environ.get('SLURM_JOB_ID', '?')} attempt {attempt}", flush=True)
        cfg = config_from_args([*self.argv, "--partition-start", str(start), "--partition-end", str(end)])
        result = run(cfg)
        return {"partition": result["partition"], "summary": result.get("summary", {}).get("whole_model")}


# --------------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingRun:
    """One setting's run of a submission (two with --setting both): its folder and its number of queries."""

    setting: str
    run_dir: Path
    num_queries: int

    def clip(self, s: int, e: int) -> Optional[tuple[int, int]]:
        """The range [s, e) as this setting's tasks cover it: clipped to its queries (None: none of them)."""
        return (s, min(e, self.num_queries)) if s < self.num_queries else None


@dataclass
class Plan:
    backend: str
    cfg: Config
    argv: list[str]
    run_dir: Path  # the run's folder (of --setting both: where its name says both; each setting's in runs)
    sub_dir: Path
    num_queries: int
    ranges: list[tuple[int, int]]
    todo: list[tuple[int, int]]
    resources: Resources
    runs: list[SettingRun] = field(default_factory=list)
    estimates: list[Estimate] = field(default_factory=list)  # per task of todo
    throughput_source: str = ""
    timed: bool = False  # --time set from the estimate

    @property
    def job_name(self) -> str:
        return self.resources.job_name or f"gradsim-{self.run_dir.parent.name}-{self.run_dir.name}"


SUBMIT_COMPAT = (
    "setting",
    "computation_type",
    "candidates",
    "top_k",
    "model_name",
    "dtype",
    "seed",
    "use_random_projection",
    "projection",
    "proj_dim",
    "sample_size",
)


def _absolute_paths(argv: list[str]) -> list[str]:
    """Tasks may start in another directory (sbatch --chdir, containers): pass paths absolute."""
    out, i = [], 0
    flags = ("--output-dir", "--original-data", "--variant-data", "--model", "--ids-file")
    while i < len(argv):
        a = argv[i]
        key, eq, val = a.partition("=")
        if key in flags and eq:
            out.append(f"{key}={_abs_if_path(val)}")
        elif a in flags and i + 1 < len(argv):
            out += [a, _abs_if_path(argv[i + 1])]
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def _abs_if_path(v: str) -> str:
    p = Path(v).expanduser()
    # A hub id (org/name) is not a path unless such a directory exists here.
    return str(p.resolve()) if p.exists() or v.startswith((".", "/", "~")) else v


def plan(argv_main: list[str], num_partitions: int, backend: str, resources: Resources) -> Plan:
    from gradsim.cli import build_parser as study_parser
    from gradsim.cli import config_from_args
    from gradsim.data.load import load_dataset, partition_range
    from gradsim.study.run import setting_configs

    if backend not in BACKENDS:
        raise GradsimError(f"unknown --backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    argv_main = _absolute_paths(argv_main)
    parsed = study_parser().parse_args(argv_main)  # a typo in a flag fails here, not in N jobs
    argv_main = on_gpus(argv_main, parsed.device, resources)
    cfg = config_from_args(argv_main)
    cfg.validate()
    settings = [
        (c, load_dataset(c.original_data, c.variant_data, c.sample_size, c.turns, c.ids_file))
        for c in setting_configs(cfg)
    ]
    runs = [SettingRun(c.setting, run_dir_of(c).resolve(), len(d.queries)) for c, d in settings]
    num_queries = max(r.num_queries for r in runs)  # --setting both: each task clips the range to each setting
    start, end = partition_range(num_queries, cfg.partition_start, cfg.partition_end)
    # The tasks get their own range; drop the user's overall range from what they are passed.
    passthrough = strip_flags(argv_main, ("--partition-start", "--partition-end"))
    if cfg.output_dir and parsed.output_dir is None:
        passthrough += ["--output-dir", str(Path(cfg.output_dir).resolve())]
    ranges = split_ranges(start, end, num_partitions)
    todo = [
        (s, e)
        for s, e in ranges
        if not all(finished(cfg, r, r.clip(s, e), d) for r, (_, d) in zip(runs, settings) if r.clip(s, e))
    ]
    run_dir = run_dir_of(cfg).resolve()
    output_dir = Path(cfg.output_dir).resolve()
    sub_dir = submission_dir(output_dir, cfg.computation_type, run_dir.name, backend, datetime.now(timezone.utc))
    p = Plan(backend, cfg, passthrough, run_dir, sub_dir, num_queries, ranges, todo, resources, runs)
    size_task(p, settings)
    return p


def on_gpus(argv: list[str], device: Optional[str], resources: Resources) -> list[str]:
    """A task that asks Slurm for GPUs runs on CUDA (--device cuda), so that one which finds none stops at once
    instead of computing on the CPU within a memory request sized for the GPU."""
    if not resources.gpus:
        return argv
    if device is not None and not device.startswith("cuda"):
        raise GradsimError(
            f"--gpus {resources.gpus} asks Slurm for GPUs but --device {device} runs on the CPU: drop one of them"
        )
    if device is None:
        argv = [*argv, "--device", "cuda"]
    return argv


def finished(cfg: Config, run: SettingRun, rng: tuple[int, int], data) -> bool:
    """Whether a setting's range has its results already; made with other settings or data, it is refused."""
    done = partition_paths(run.run_dir, *rng, run.num_queries).results
    if not done.exists():
        return False
    old = read_json(done).get("compat", {})
    diff = [k for k in SUBMIT_COMPAT if k != "setting" and old.get(k) != getattr(cfg, k)]
    if old.get("setting") != run.setting:
        diff.insert(0, "setting")
    hashes = (("original_data_sha256", data.original_sha256), ("variant_data_sha256", data.variant_sha256))
    diff += [k for k, v in hashes if old.get(k) not in (None, v)]  # other rows (--ids-file) or files
    if diff:
        raise GradsimError(
            f"{done} was made with other settings (differs in: {', '.join(diff)}): "
            "use another --output-dir or remove that run's partitions"
        )
    return True


# Exact gradients a CPU task holds when --memory-gb is not given: on a shared node the free memory says
# nothing about the job's allocation, so the tasks get an explicit budget that the request covers.
TASK_HELD_GRADIENTS = 2


def size_task(p: Plan, settings) -> None:
    """Memory and time of each task, from the model's config (no weights loaded): on a GPU, refuse a run that
    cannot fit --gpu-memory-gb and ask for the host memory the task needs (memory.host_bytes); on the CPU, give
    the tasks a --memory-gb budget and ask for it; then estimate each task's passes, tokens and time, and ask
    for --time from it unless it was given."""
    from dataclasses import replace

    from gradsim.study.estimate import slurm_time, throughput
    from gradsim.study.memory import (
        DATA_GB,
        GB,
        RUNTIME_GB,
        budget_capacity,
        budget_gb,
        device_need_bytes,
        host_bytes,
        model_shape,
    )

    cfg, resources = p.cfg, p.resources
    shape = model_shape(cfg)
    if shape is None:
        return
    tokens = min(cfg.max_length or 2048, shape.context or 2048)
    w = 2 if cfg.dtype == "bfloat16-weights" else 4
    grad = shape.params * w
    on_gpu = str(cfg.device).startswith("cuda")
    budget = budget_gb(cfg.memory_gb, "GRADSIM_MEMORY_GB", None)
    if on_gpu:
        need = device_need_bytes(shape, tokens, cfg)
        have = resources.gpu_memory_gb * GB
        if need > have:
            raise GradsimError(
                f"{cfg.model_name} ({shape.params / 1e9:.2f}B parameters, {cfg.dtype}, {tokens} tokens) needs "
                f"{need / GB:.1f} GB on the GPU, more than --gpu-memory-gb {resources.gpu_memory_gb:g}: ask for a "
                "larger card (--gpus TYPE:1 and --gpu-memory-gb), --dtype bfloat16-weights or a shorter --max-length"
            )
        host_cache = budget_gb(cfg.host_memory_gb, "GRADSIM_HOST_MEMORY_GB", 0.0) or 0.0
        matrices = 9 * shape.layers + 3  # a decoder layer's 7 projections and 2 norms, embeddings, final norm
        results = 24 * p.num_queries * (cfg.top_k + 1) * matrices * len(p.runs)  # dots, cself, qself: float64
        host = host_bytes(shape, cfg.dtype, "cuda", host_cache, results)["total"]
        held = budget * GB if budget is not None else 0.9 * (have - shape.exact_bytes(tokens, cfg.dtype, 0)["total"])
    else:
        if budget is None and not cfg.use_random_projection:
            budget = TASK_HELD_GRADIENTS * grad / GB
            # rounded up, so that the budget holds what it was sized for
            p.argv = [*p.argv, "--memory-gb", f"{math.ceil(budget * 100) / 100:.2f}"]
        if cfg.use_random_projection:
            host = shape.params * w * 2 + shape.activation_bytes(tokens, cfg.dtype)
        else:
            host = shape.exact_bytes(tokens, cfg.dtype, held=0)["total"] + budget * GB
        host += int((RUNTIME_GB["cpu"] + DATA_GB) * GB)  # Python and torch, the tokenizer and the data
        held = (budget or 0) * GB
    need_gb = int(-(-host // GB))  # rounded up
    if resources.mem is None:
        log.info("asking Slurm for --mem %dG per task (the model's estimate; set --mem to change it)", need_gb)
        resources = replace(resources, mem=f"{need_gb}G")
    else:
        given = parse_mem_gb(resources.mem)
        if given is not None and given < need_gb:
            log.warning(
                "--mem %s is below the %d GB a task is estimated to need (gradsim memory): Slurm may kill it",
                resources.mem,
                need_gb,
            )
    tp = throughput(cfg.device, cfg.dtype, resources.gpus, resources.cpus_per_task)
    tflops = resources.tflops or tp.tflops
    p.throughput_source = f"{tflops:g} TFLOP/s per task, " + ("given (--tflops)" if resources.tflops else tp.source)
    capacity = None if cfg.use_random_projection else budget_capacity(held, grad)
    p.estimates = [task_estimate(cfg, settings, p.runs, rng, shape.params, capacity, tokens, tflops) for rng in p.todo]
    if resources.time is None and p.estimates:
        resources = replace(resources, time=slurm_time(max(e.seconds for e in p.estimates)))
        p.timed = True
    p.resources = resources


def task_estimate(cfg, settings, runs, rng, params: int, capacity, max_length: int, tflops: float) -> Estimate:
    from gradsim.study.estimate import estimate_shares

    shares = [(c, d, *r.clip(*rng)) for (c, d), r in zip(settings, runs) if r.clip(*rng)]
    est = estimate_shares(cfg, shares, params, capacity, max_length)
    est.label, est.tflops = f"[{rng[0]}, {rng[1]})", tflops
    return est


def parse_mem_gb(mem: str) -> Optional[float]:
    """Slurm's --mem value in GB (default unit MB), or None when it is not a plain size."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(mem), re.IGNORECASE)
    if not m:
        return None
    scale = {"K": 1 / 2**20, "M": 1 / 1024, "": 1 / 1024, "G": 1, "T": 1024}[m.group(2).upper()]
    return float(m.group(1)) * scale


def strip_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if a.partition("=")[0] in names and "=" in a:
            continue
        out.append(a)
    return out


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
    command = " ".join([r.task_command(), *TASK_MODULE, *(shlex.quote(a) for a in p.argv)])
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


def _submitit_executor(p: Plan, dry_run: bool = False) -> submitit.SlurmExecutor:
    r = p.resources
    # SlurmExecutor, not AutoExecutor: the python command (container prefix) is a constructor argument.
    cls = _OfflineSlurmExecutor if dry_run else submitit.SlurmExecutor
    ex = cls(folder=submitit_dir(p.sub_dir), max_num_timeout=r.max_requeues, python=r.task_command())
    params: dict[str, Any] = {
        "job_name": p.job_name,
        "time": time_minutes(r.time or DEFAULT_TIME),
        "signal_delay_s": r.signal_delay_s,
    }
    for key in ("partition", "mem", "account", "qos", "cpus_per_task"):
        if getattr(r, key):
            params[key] = getattr(r, key)
    if r.gpus:
        params["gres"] = f"gpu:{r.gpus}"
    if r.setup:
        params["setup"] = list(r.setup)
    if r.max_parallel:
        params["array_parallelism"] = r.max_parallel
    extra = dict(sbatch_option(x) for x in r.sbatch_extra)
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


def submit(p: Plan, dry_run: bool = False) -> dict:
    """Submit the plan's pending ranges as one array; returns the submission record."""
    record = {
        "backend": p.backend,
        "run_dir": str(p.run_dir),
        "sub_dir": str(p.sub_dir),
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cwd": str(Path.cwd()),
        "argv": p.argv,
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
                f"gradsim.cluster.slurm.PartitionTask({p.argv!r}), starts={[s for s, _ in p.todo]}, "
                f"ends={[e for _, e in p.todo]})"
            )
            return record
        ex = _submitit_executor(p)
        jobs = ex.map_array(PartitionTask(p.argv), [s for s, _ in p.todo], [e for _, e in p.todo])
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


@dataclass
class ComputeOptions:
    """compute.py's own options (gradsim submit); every other flag is main.py's, passed through to the tasks."""

    num_partitions: int = option("number of array tasks", default=10)
    backend: str = option(" or ".join(BACKENDS), default="submitit", env="GRADSIM_SLURM_BACKEND")
    dry_run: bool = option("print the exact script and command; submit nothing", default=False, const=True)
    status: bool = option("show the status of this run's partitions instead of submitting", default=False, const=True)


def build_parser() -> Parser:
    p = Parser(
        prog="compute.py",
        allow_abbrev=False,  # an abbreviation must not swallow one of main.py's flags
        description="Split a run's queries into N contiguous partitions and submit them as one Slurm job array. "
        "Every flag of main.py (--setting, --computation-type, --use-random-projection, --model, ...) is passed "
        "through to the tasks.",
        epilog="Then: status.py (or compute.py ... --status) to watch, combine.py / combine_all.sh to merge.",
    )
    p.add_options(ComputeOptions)
    p.add_options(Resources, title=RESOURCES_TITLE)
    return p


def compute_main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, main_argv = parser.parse_known_args(argv)
    if "-h" in main_argv or "--help" in main_argv:
        parser.print_help()
        return 0
    try:
        opts = from_args(ComputeOptions, args, fallback=env_values(ComputeOptions, slurm_environ()))
        if opts.status:
            from gradsim.cli import config_from_args

            cfg = config_from_args(strip_flags(_absolute_paths(main_argv), ("--partition-start", "--partition-end")))
            jobs_dir = slurm_dir(Path(cfg.output_dir).resolve(), cfg.computation_type, run_dir_of(cfg).name)
            print(format_status(collect_status([jobs_dir])))
            return 0
        res = resources_from(args)
        p = plan(main_argv, opts.num_partitions, opts.backend, res)
        record = submit(p, dry_run=opts.dry_run)
    except GradsimError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code
    print_submission(p, record, opts.dry_run)
    return 0


def print_submission(p: Plan, record: dict, dry_run: bool) -> None:
    done = [r for r in p.ranges if r not in p.todo]
    print(
        f"{p.cfg.setting} / {p.cfg.computation_type}: {p.num_queries} queries"
        + (f" per setting ({', '.join(f'{r.setting} {r.num_queries}' for r in p.runs)})" if len(p.runs) > 1 else "")
        + f" in {len(p.ranges)} partitions ({', '.join(f'[{s}, {e})' for s, e in p.ranges)})"
    )
    if done:
        print(f"already finished, not submitted: {', '.join(f'[{s}, {e})' for s, e in done)}")
    if not p.todo:
        print(
            "nothing to submit: every partition is finished. Combine with: "
            + "; ".join(f"gradsim combine {r.run_dir}" for r in p.runs)
        )
        return
    print_estimate(p)
    if dry_run:
        print(f"\n--- dry run ({p.backend}): nothing was submitted. The script:\n")
        print(record["script"])
        print(f"--- and the command:\n{record['command']}")
        print(f"\nresults would go to {', '.join(f'{r.run_dir}/partitions/' for r in p.runs)}, logs to {p.sub_dir}/")
        return
    print(f"submitted job array {record['array_job_id']} ({p.backend}):")
    for t in record["tasks"]:
        print(f"  job {t['job_id']:<14} queries [{t['start']}, {t['end']})  log {t['logs'][0]}")
    results = ", ".join(f"{r.run_dir}/partitions/" for r in p.runs)
    print(f"results: {results}   logs and submission record: {p.sub_dir}/")
    print(f"status:  gradsim status {p.sub_dir.parent}")
    if p.ranges != [(0, p.num_queries)]:
        print("combine: " + "; ".join(f"gradsim combine {r.run_dir}" for r in p.runs))


def print_estimate(p: Plan) -> None:
    """Each task's backward passes, tokens and time, the total, and where the throughput comes from."""
    from gradsim.study.estimate import format_duration

    if not p.estimates:
        print("estimate: none (the model's config cannot be read here); --time defaults to " + DEFAULT_TIME)
        return
    device = "cuda" if str(p.cfg.device).startswith("cuda") else "cpu"
    print(f"\nestimate ({device}, {p.cfg.dtype}; {p.throughput_source}):")
    for note in p.estimates[0].notes:
        print(f"  note: {note}")
    for e in p.estimates:
        print(
            f"  task {e.label:<16} {e.queries:>5} queries  {e.passes:>6} backward passes  {e.tokens:>9,} tokens  "
            f"~{format_duration(e.seconds)}"
        )
    total = Estimate("total", params=p.estimates[0].params, tflops=p.estimates[0].tflops)
    for e in p.estimates:
        total.add(e)
    total.startup_s = sum(e.startup_s for e in p.estimates)
    print(
        f"  total {len(p.estimates)} tasks: {total.queries} queries, {total.passes} backward passes, "
        f"{total.tokens:,} tokens, {total.flops / 1e15:.2f} PFLOP, ~{format_duration(total.seconds)} of task time"
    )
    print(
        f"  --time {p.resources.time} per task"
        + (f" (the longest task's estimate x {TIME_MARGIN:g} + {TIME_SLACK_MIN} min)" if p.timed else " (given)")
    )
