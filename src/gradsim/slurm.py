"""Fan a run's queries out over one Slurm job array, watch it, and combine what finished.

``compute.py`` splits the queries into N contiguous ranges and submits one array: with submitit
(``map_array`` of a Checkpointable task) or with sbatch (a script rendered from
``slurm_scripts/batch_processing/job.sbatch.template``). Every task runs main.py's code path for its
range, so a task that is preempted or hits its time limit is requeued and resumes from the run's
progress log. Each submission leaves ``submission.json`` beside its logs; ``status`` reads those
and asks squeue/sacct, ``combine`` merges the finished partitions.

Slurm resources come from flags and ``GRADSIM_SLURM_*`` variables (environment or .env), never
from this file: clusters differ in partitions, accounts, GPUs and containers.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import submitit

from .config import COMPUTATION_TYPES, REPO_ROOT, Config, redact
from .errors import GradsimError
from .io import atomic_write_json, read_json, read_jsonl_tolerant

log = logging.getLogger("gradsim")

TEMPLATE = REPO_ROOT / "slurm_scripts" / "batch_processing" / "job.sbatch.template"
MAIN_PY = REPO_ROOT / "main.py"
BACKENDS = ("submitit", "sbatch")
# squeue/sacct states, as status reports them. A requeued task is PENDING again (or REQUEUED briefly).
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED",
                  "PREEMPTED"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


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


def _split_list(raw: Optional[str]) -> list[str]:
    return [x.strip() for x in (raw or "").split(";") if x.strip()]


def sbatch_option(raw: str) -> tuple[str, Any]:
    """'#SBATCH --constraint=a100', '--constraint=a100', '--exclusive' or 'constraint=a100' -> (key, value)."""
    s = raw.strip()
    s = s[len("#SBATCH"):].strip() if s.startswith("#SBATCH") else s
    s = s.lstrip("-")
    key, sep, value = s.partition("=")
    if not key or " " in key:
        raise GradsimError(f"extra sbatch option {raw!r} is not of the form --key=value or --flag")
    return key, (value if sep else True)


@dataclass
class Resources:
    """What a task asks Slurm for, and how it is started. None means: the cluster's default."""

    partition: Optional[str] = None
    time: str = "01:00:00"
    mem: Optional[str] = None
    cpus_per_task: Optional[int] = None
    gpus: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    sbatch_extra: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    container: Optional[str] = None
    python: str = sys.executable
    max_parallel: Optional[int] = None
    max_requeues: int = 5
    signal_delay_s: int = 120
    job_name: Optional[str] = None

    def sbatch_options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [("time", self.time)]
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


RESOURCE_ENV = {
    "partition": "PARTITION", "time": "TIME", "mem": "MEM", "cpus_per_task": "CPUS_PER_TASK", "gpus": "GPUS",
    "account": "ACCOUNT", "qos": "QOS", "sbatch_extra": "EXTRA", "setup": "SETUP", "container": "CONTAINER",
    "python": "PYTHON", "max_parallel": "MAX_PARALLEL", "max_requeues": "MAX_REQUEUES", "job_name": "JOB_NAME",
}


def add_resource_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Slurm resources (default: GRADSIM_SLURM_<NAME> from the environment or .env, "
                             "else the cluster's default)")
    g.add_argument("--partition", dest="slurm_partition", help="Slurm partition (GRADSIM_SLURM_PARTITION)")
    g.add_argument("--time", dest="slurm_time", help="time limit per task, e.g. 90 or 04:00:00 (GRADSIM_SLURM_TIME; default 01:00:00)")
    g.add_argument("--mem", dest="slurm_mem", help="memory per task, e.g. 32G (GRADSIM_SLURM_MEM)")
    g.add_argument("--cpus-per-task", dest="slurm_cpus_per_task", type=int, help="CPUs per task (GRADSIM_SLURM_CPUS_PER_TASK)")
    g.add_argument("--gpus", dest="slurm_gpus", help="GPUs per task as --gres=gpu:<this>, e.g. 1 or a100:1 (GRADSIM_SLURM_GPUS)")
    g.add_argument("--account", dest="slurm_account", help="account to charge (GRADSIM_SLURM_ACCOUNT)")
    g.add_argument("--qos", dest="slurm_qos", help="quality of service (GRADSIM_SLURM_QOS)")
    g.add_argument("--sbatch-extra", dest="slurm_sbatch_extra", action="append",
                   help="extra #SBATCH option, e.g. --constraint=a100; repeatable (GRADSIM_SLURM_EXTRA, ';'-separated)")
    g.add_argument("--setup", dest="slurm_setup", action="append",
                   help="shell line run before each task, e.g. 'module load cuda'; repeatable (GRADSIM_SLURM_SETUP, ';'-separated)")
    g.add_argument("--container", dest="slurm_container",
                   help="prefix of the task command, e.g. 'apptainer exec --nv img.sif' (GRADSIM_SLURM_CONTAINER)")
    g.add_argument("--python", dest="slurm_python", help="python on the compute nodes (GRADSIM_SLURM_PYTHON; default: this one)")
    g.add_argument("--max-parallel", dest="slurm_max_parallel", type=int,
                   help="at most this many tasks at once (array %%N; GRADSIM_SLURM_MAX_PARALLEL)")
    g.add_argument("--max-requeues", dest="slurm_max_requeues", type=int,
                   help="requeues after time limits before a task gives up (GRADSIM_SLURM_MAX_REQUEUES; default 5)")
    g.add_argument("--job-name", dest="slurm_job_name", help="Slurm job name (GRADSIM_SLURM_JOB_NAME; default gradsim-<run>)")


def resources_from(args: argparse.Namespace) -> Resources:
    """Flags over GRADSIM_SLURM_* (environment over .env) over the defaults of Resources."""
    from dotenv import dotenv_values

    dotenv = {k: v for k, v in dotenv_values(Path.cwd() / ".env").items() if v is not None}
    res = Resources()
    for name, env in RESOURCE_ENV.items():
        flag = getattr(args, f"slurm_{name}", None)
        raw = os.environ.get(f"GRADSIM_SLURM_{env}", dotenv.get(f"GRADSIM_SLURM_{env}", "")).strip()
        if name in ("sbatch_extra", "setup"):
            value = flag if flag else _split_list(raw)
        elif flag is not None:
            value = flag
        elif raw:
            value = raw
        else:
            continue
        if name in ("cpus_per_task", "max_parallel", "max_requeues"):
            try:
                value = int(value)
            except ValueError:
                raise GradsimError(f"GRADSIM_SLURM_{env}={raw!r} is not an integer") from None
            if value < (0 if name == "max_requeues" else 1):
                raise GradsimError(f"--{name.replace('_', '-')} must be positive, got {value}")
        setattr(res, name, value)
    time_minutes(res.time)  # refuse a malformed time before anything is submitted
    for x in res.sbatch_extra:
        sbatch_option(x)
    return res


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------

def _install_test_slowdown() -> None:
    """GRADSIM_TEST_SLOWDOWN=S sleeps S seconds before each query's gradient or features, so that the
    integration tests can preempt a task while it is mid-run; it also logs which queries were computed."""
    seconds = float(os.environ.get("GRADSIM_TEST_SLOWDOWN", "0") or 0)
    if seconds <= 0:
        return
    import gradsim.run as runmod
    from gradsim.stream import ExactStream

    real_featurize, real_gradient = runmod.featurize, ExactStream._gradient

    def slow(featurizer, encs, device, dtype, role, *args, **kwargs):
        if role == "query":
            time.sleep(seconds * len(encs))
        out = real_featurize(featurizer, encs, device, dtype, role, *args, **kwargs)
        if role == "query":
            log.info("test slowdown: featurized queries %s", " ".join(e.id for e in encs))
        return out

    def slow_gradient(self, enc, role, out, q=None):
        if role == "query":
            time.sleep(seconds)
        g = real_gradient(self, enc, role, out, q)
        if role == "query":
            log.info("test slowdown: featurized queries %s", enc.id)
        return g

    runmod.featurize = slow
    ExactStream._gradient = slow_gradient


class PartitionTask(submitit.helpers.Checkpointable):
    """main.py's code path for one query range. On preemption or time limit submitit calls
    checkpoint(), which (inherited) requeues this same call; run() then resumes from its progress
    log, so the call itself needs no state."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)

    def __call__(self, start: int, end: int) -> dict:
        from .cli import config_from_args
        from .run import run

        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) + 1
        print(f"gradsim task [{start}, {end}) job {os.environ.get('SLURM_JOB_ID', '?')} attempt {attempt}", flush=True)
        _install_test_slowdown()
        cfg = config_from_args([*self.argv, "--partition-start", str(start), "--partition-end", str(end)])
        result = run(cfg)
        return {"partition": result["partition"], "summary": result.get("summary", {}).get("whole_model")}


# --------------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------------

@dataclass
class Plan:
    backend: str
    cfg: Config
    argv: list[str]
    run_dir: Path
    sub_dir: Path
    num_queries: int
    ranges: list[tuple[int, int]]
    todo: list[tuple[int, int]]
    resources: Resources

    @property
    def job_name(self) -> str:
        return self.resources.job_name or f"gradsim-{self.run_dir.parent.name}-{self.run_dir.name}"


def _paths(run_dir: Path, s: int, e: int, num_queries: Optional[int]):
    from .layout import RunPaths

    # A single partition covering every query is an ordinary run: its files are not under partitions/.
    return RunPaths(Path(run_dir), s, e, partitioned=(s, e) != (0, num_queries))


def results_path(run_dir: Path, s: int, e: int, num_queries: Optional[int] = None) -> Path:
    return _paths(run_dir, s, e, num_queries).results


def progress_path(run_dir: Path, s: int, e: int, num_queries: Optional[int] = None) -> Path:
    return _paths(run_dir, s, e, num_queries).progress


# Fields a finished partition must share with a new submission for it to be skipped; the rest of
# the compat fields (revision, template, code version) are known only once a task loads the model,
# and combine checks them.
SUBMIT_COMPAT = ("setting", "computation_type", "candidates", "top_k", "model_name", "dtype", "seed",
                 "use_random_projection", "projection", "proj_dim", "sample_size")


def _absolute_paths(argv: list[str]) -> list[str]:
    """Tasks may start in another directory (sbatch --chdir, containers): pass paths absolute."""
    out, i = [], 0
    flags = ("--output-dir", "--original-data", "--variant-data", "--model")
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
    from .cli import build_parser, config_from_args
    from .data import load_dataset, partition_range
    from .layout import run_dir as run_dir_of, slurm_dir

    if backend not in BACKENDS:
        raise GradsimError(f"unknown --backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    argv_main = _absolute_paths(argv_main)
    parsed = build_parser().parse_args(argv_main)  # a typo in a flag fails here, not in N jobs
    cfg = config_from_args(argv_main)
    cfg.validate()
    if cfg.setting == "both":
        raise GradsimError("compute.py submits one setting per job array: run it once with --setting paraphrased "
                           "and once with --setting model-generated (or run --setting both on one node)")
    data = load_dataset(cfg.original_data, cfg.variant_data, cfg.sample_size)
    start, end = partition_range(len(data.queries), cfg.partition_start, cfg.partition_end)
    # The tasks get their own range; drop the user's overall range from what they are passed.
    passthrough = strip_flags(argv_main, ("--partition-start", "--partition-end"))
    if cfg.output_dir and parsed.output_dir is None:
        passthrough += ["--output-dir", str(Path(cfg.output_dir).resolve())]
    run_dir = run_dir_of(cfg).resolve()
    ranges = split_ranges(start, end, num_partitions)
    todo = []
    for s, e in ranges:
        done = results_path(run_dir, s, e, len(data.queries))
        if done.exists():
            old = read_json(done).get("compat", {})
            diff = [k for k in SUBMIT_COMPAT if old.get(k) != getattr(cfg, k)]
            if diff:
                raise GradsimError(f"{done} was made with other settings (differs in: {', '.join(diff)}): "
                                   "use another --output-dir or remove that run's partitions")
            continue
        todo.append((s, e))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    sub_dir = slurm_dir(Path(cfg.output_dir).resolve(), cfg.computation_type, run_dir.name) / f"{stamp}-{backend}"
    return Plan(backend, cfg, passthrough, run_dir, sub_dir, len(data.queries), ranges, todo, resources)


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
    command = f"{r.task_command()} {shlex.quote(str(MAIN_PY))} {' '.join(shlex.quote(a) for a in p.argv)}"
    values = {
        "job_name": p.job_name,
        "array": array,
        "log_dir": str(p.sub_dir / "logs"),
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
    ex = cls(folder=p.sub_dir / "submitit", max_num_timeout=r.max_requeues, python=r.task_command())
    params: dict[str, Any] = {"job_name": p.job_name, "time": time_minutes(r.time), "signal_delay_s": r.signal_delay_s}
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
    return _make_sbatch_string(command=ex._submitit_command_str, folder=ex.folder, map_count=len(p.todo),
                               **ex.parameters)


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
    }
    if not p.todo:
        return record
    if p.backend == "sbatch":
        script = sbatch_script(p)
        script_path = p.sub_dir / "job.sbatch"
        if dry_run:
            record["script"], record["command"] = script, f"sbatch --parsable {script_path}"
            return record
        (p.sub_dir / "logs").mkdir(parents=True, exist_ok=True)
        script_path.write_text(script)
        out = _slurm(["sbatch", "--parsable", str(script_path)])
        array_id = out.strip().split(";")[0]
        record["array_job_id"] = array_id
        record["tasks"] = [{"start": s, "end": e, "job_id": f"{array_id}_{i}",
                            "logs": [str(p.sub_dir / "logs" / f"{array_id}_{i}.log")]}
                           for i, (s, e) in enumerate(p.todo)]
    else:
        if dry_run:
            record["script"] = submitit_script(p)
            record["command"] = (f"submitit.SlurmExecutor(folder={str(p.sub_dir / 'submitit')!r}).map_array("
                                 f"gradsim.slurm.PartitionTask({p.argv!r}), starts={[s for s, _ in p.todo]}, "
                                 f"ends={[e for _, e in p.todo]})")
            return record
        ex = _submitit_executor(p)
        jobs = ex.map_array(PartitionTask(p.argv), [s for s, _ in p.todo], [e for _, e in p.todo])
        record["array_job_id"] = jobs[0].job_id.split("_")[0]
        record["tasks"] = [{"start": s, "end": e, "job_id": j.job_id,
                            "logs": [str(j.paths.stderr).replace("%t", "0"), str(j.paths.stdout).replace("%t", "0")]}
                           for (s, e), j in zip(p.todo, jobs)]
    atomic_write_json(p.sub_dir / "submission.json", record)
    return record


def _slurm(cmd: list[str], check: bool = True) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise GradsimError(f"{cmd[0]} is not on PATH: run this on a Slurm login node "
                           "(or start the local test cluster: bash slurm_scripts/cluster/start.sh)") from None
    except subprocess.TimeoutExpired:
        raise GradsimError(f"{cmd[0]} did not answer within 60 s: is the Slurm controller up? (scontrol ping)") from None
    if check and proc.returncode != 0:
        raise GradsimError(f"{' '.join(cmd[:2])} failed: {redact(proc.stderr.strip() or proc.stdout.strip())}")
    return proc.stdout


def build_compute_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compute.py",
        allow_abbrev=False,  # an abbreviation must not swallow one of main.py's flags
        description="Split a run's queries into N contiguous partitions and submit them as one Slurm job array. "
        "Every flag of main.py (--setting, --computation-type, --use-random-projection, --model, ...) is passed "
        "through to the tasks.",
        epilog="Then: status.py (or compute.py ... --status) to watch, combine.py / combine_all.sh to merge.",
    )
    p.add_argument("--num-partitions", type=int, default=10, help="number of array tasks (default 10)")
    p.add_argument("--backend", default=os.environ.get("GRADSIM_SLURM_BACKEND", "submitit"),
                   help=f"{' or '.join(BACKENDS)} (GRADSIM_SLURM_BACKEND; default submitit)")
    p.add_argument("--dry-run", action="store_true", help="print the exact script and command; submit nothing")
    p.add_argument("--status", action="store_true", help="show the status of this run's partitions instead of submitting")
    add_resource_flags(p)
    return p


def compute_main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_compute_parser()
    args, main_argv = parser.parse_known_args(argv)
    if "-h" in main_argv or "--help" in main_argv:
        parser.print_help()
        return 0
    try:
        if args.status:
            from .cli import config_from_args
            from .layout import run_dir as run_dir_of, slurm_dir

            cfg = config_from_args(strip_flags(_absolute_paths(main_argv), ("--partition-start", "--partition-end")))
            jobs_dir = slurm_dir(Path(cfg.output_dir).resolve(), cfg.computation_type, run_dir_of(cfg).name)
            print(format_status(collect_status([jobs_dir])))
            return 0
        res = resources_from(args)
        p = plan(main_argv, args.num_partitions, args.backend, res)
        record = submit(p, dry_run=args.dry_run)
    except GradsimError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code
    print_submission(p, record, args.dry_run)
    return 0


def print_submission(p: Plan, record: dict, dry_run: bool) -> None:
    done = [r for r in p.ranges if r not in p.todo]
    print(f"{p.cfg.setting} / {p.cfg.computation_type}: {p.num_queries} queries in {len(p.ranges)} partitions "
          f"({', '.join(f'[{s}, {e})' for s, e in p.ranges)})")
    if done:
        print(f"already finished, not submitted: {', '.join(f'[{s}, {e})' for s, e in done)}")
    if not p.todo:
        print(f"nothing to submit: every partition is finished. Combine with: "
              f"python slurm_scripts/batch_processing/combine.py {p.run_dir}")
        return
    if dry_run:
        print(f"\n--- dry run ({p.backend}): nothing was submitted. The script:\n")
        print(record["script"])
        print(f"--- and the command:\n{record['command']}")
        print(f"\nresults would go to {p.run_dir}/partitions/, logs to {p.sub_dir}/")
        return
    print(f"submitted job array {record['array_job_id']} ({p.backend}):")
    for t in record["tasks"]:
        print(f"  job {t['job_id']:<14} queries [{t['start']}, {t['end']})  log {t['logs'][0]}")
    print(f"results: {p.run_dir}/partitions/   logs and submission record: {p.sub_dir}/")
    print(f"status:  python slurm_scripts/batch_processing/status.py {p.sub_dir.parent}")
    if p.ranges != [(0, p.num_queries)]:
        print(f"combine: python slurm_scripts/batch_processing/combine.py {p.run_dir}")


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------

def _expand_job_id(raw: str) -> list[str]:
    """'12_[0-2,5]' (a pending array in squeue/sacct) -> ['12_0', '12_1', '12_2', '12_5']."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", raw)
    if not m:
        return [raw]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        a, _, b = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(a), int(b or a) + 1)]
    return out


def slurm_states(array_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason/exit code). sacct for history, then squeue (live, newer) over it."""
    states: dict[str, tuple[str, str]] = {}
    if not array_ids:
        return states
    ids = ",".join(sorted(set(array_ids)))
    for cmd, fmt in ((["sacct", "-X", "-n", "-P", "-j", ids, "-o", "JobID,State,ExitCode"], "sacct"),
                     (["squeue", "-h", "-r", "-t", "all", "-j", ids, "-o", "%i|%T|%r"], "squeue")):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 3:
                continue
            state = parts[1].split()[0] if parts[1].strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
            for jid in _expand_job_id(parts[0]):
                states[jid] = (state, parts[2])
    return states


def tail(path: Path, n: int = 15) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def queries_scored(run_dir: Path, s: int, e: int, num_queries: Optional[int] = None) -> int:
    progress = progress_path(run_dir, s, e, num_queries)
    rows = read_jsonl_tolerant(progress)
    n = sum(1 for r in rows if r.get("kind") == "query")
    blocks = progress.with_name(progress.stem + "_blocks")
    for r in rows:
        if r.get("kind") == "block":
            try:
                import numpy as np

                with np.load(blocks / r["file"]) as z:
                    n += len(z["index"])
            except (OSError, KeyError, ValueError):
                pass
    return n


def find_submissions(paths: list[Path]) -> list[Path]:
    """submission.json files under the given folders (a submission, a run's jobs folder, or an output dir)."""
    found: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == "submission.json":
            found.add(p.resolve())
        elif p.is_dir():
            found.update(x.resolve() for x in p.rglob("submission.json"))
    return sorted(found, key=lambda x: (x.parent.parent, x.parent.name))


def collect_status(paths: list[Path], tail_lines: int = 15) -> list[dict]:
    """One entry per run: the latest task of each range and what it is doing."""
    runs: dict[str, dict] = {}
    for sub in find_submissions(paths):
        rec = read_json(sub)
        run = runs.setdefault(rec["run_dir"], {"run_dir": rec["run_dir"], "ranges": {}, "submissions": []})
        run["submissions"].append(str(sub.parent))
        run["num_queries"] = rec["num_queries"]
        # The newest submission's split is the run's; an older task still counts for a range it shares.
        run["ranges"] = {(s, e): run["ranges"].get((s, e)) for s, e in rec["ranges"]}
        for t in rec["tasks"]:
            run["ranges"][(t["start"], t["end"])] = dict(t, backend=rec["backend"], sub_dir=rec["sub_dir"])
    all_ids = [t["job_id"].split("_")[0] for r in runs.values() for t in r["ranges"].values() if t]
    states = slurm_states(all_ids)
    out = []
    for run in runs.values():
        run_dir = Path(run["run_dir"])
        rows = []
        for (s, e), t in sorted(run["ranges"].items()):
            row: dict[str, Any] = {"start": s, "end": e, "job_id": t["job_id"] if t else None}
            slurm_state, why = states.get(t["job_id"], ("", "")) if t else ("", "")
            row["slurm_state"] = slurm_state
            if results_path(run_dir, s, e, run.get("num_queries")).exists():
                row["status"] = "done"
            elif t is None:
                row["status"] = "not submitted"
            elif slurm_state in RUNNING_STATES:
                row["status"] = "running"
            elif slurm_state in PENDING_STATES:
                row["status"] = "pending"
                row["reason"] = why
            elif slurm_state:
                row["status"] = "failed"
                row["reason"] = f"{slurm_state} (exit {why})" if slurm_state != "COMPLETED" else \
                    "COMPLETED without a results file"
            else:
                row["status"] = "unknown"
                row["reason"] = "not in squeue or sacct (accounting off, or purged)"
            if row["status"] != "done":
                row["scored"] = queries_scored(run_dir, s, e, run.get("num_queries"))
            if row["status"] in ("failed", "unknown") and t:
                row["log_tail"] = {lp: tail(Path(lp), tail_lines) for lp in t["logs"]}
            rows.append(row)
        counts = {k: sum(r["status"] == k for r in rows) for k in ("done", "running", "pending", "failed")}
        out.append({"run_dir": str(run_dir), "num_queries": run.get("num_queries"), "partitions": rows,
                    "counts": counts, "submissions": run["submissions"]})
    return out


def format_status(runs: list[dict]) -> str:
    if not runs:
        return "no submissions found (compute.py writes submission.json under <output-dir>/slurm/)"
    lines = []
    for run in runs:
        c = run["counts"]
        lines.append(f"{run['run_dir']}: {len(run['partitions'])} partitions of {run['num_queries']} queries: "
                     f"{c['done']} done, {c['running']} running, {c['pending']} pending, {c['failed']} failed")
        for r in run["partitions"]:
            job = f"job {r['job_id']}" if r["job_id"] else ""
            extra = ""
            if "scored" in r:
                extra = f"{r['scored']}/{r['end'] - r['start']} queries scored"
            if r.get("reason"):
                extra = f"{r['reason']}; {extra}" if extra else r["reason"]
            lines.append(f"  [{r['start']}, {r['end']})  {r['status']:<13} {job:<16} {extra}".rstrip())
            for path, t in r.get("log_tail", {}).items():
                lines.append(f"      --- last lines of {path}:" if t else f"      --- {path}: no log (never started?)")
                lines += [f"      | {x}" for x in t]
        whole = [(r["start"], r["end"]) for r in run["partitions"]] == [(0, run["num_queries"])]
        if whole and c["done"]:
            lines.append(f"  done (one partition, nothing to combine): {run['run_dir']}/results.json")
        elif c["done"] == len(run["partitions"]):
            lines.append(f"  all done: python slurm_scripts/batch_processing/combine.py {run['run_dir']}")
        elif c["failed"]:
            lines.append("  rerun the same compute.py command to resubmit the unfinished partitions")
    return "\n".join(lines)


def status_main(argv: Optional[list[str]] = None) -> int:
    from .config import REPO_ROOT as root

    p = argparse.ArgumentParser(prog="status.py", description="Which partitions of submitted runs are done, "
                                "running, pending or failed (with the tail of their log).")
    p.add_argument("paths", nargs="*", help="a submission folder, a run's jobs folder (<output-dir>/slurm/<type>/<run>) "
                   "or an output dir (default: data/)")
    p.add_argument("--output-dir", help="look at every submission under <output-dir>/slurm (default: data/)")
    p.add_argument("--lines", type=int, default=15, help="log lines to show for a failed partition")
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.paths] or [Path(args.output_dir or root / "data") / "slurm"]
    print(format_status(collect_status(paths, args.lines)))
    return 0


# --------------------------------------------------------------------------------------------
# Combine
# --------------------------------------------------------------------------------------------

def find_run_dirs(root: Path) -> list[Path]:
    """Run directories with partitions under an output dir: <root>/<computation-type>/<run>/partitions."""
    return sorted(d.parent for ct in COMPUTATION_TYPES for d in (Path(root) / ct).glob("*/partitions") if d.is_dir())


def up_to_date(run_dir: Path) -> bool:
    """results.json was merged from exactly the partitions there now, after the last of them was written."""
    from .combine import find_partitions

    merged = run_dir / "results.json"
    parts = find_partitions(run_dir)
    if not merged.exists() or not parts:
        return False
    try:
        got = read_json(merged).get("partition", {}).get("merged_from")
    except (OSError, ValueError):
        return False
    if got != [[s, e] for s, e, _ in parts]:
        return False
    newest = max(f.stat().st_mtime for f in (run_dir / "partitions").iterdir()
                 if f.name.startswith(("results_", "scores_", "metrics_")))
    return all((run_dir / n).exists() and (run_dir / n).stat().st_mtime >= newest
               for n in ("results.json", "scores.npz", "metrics.jsonl", "config.json"))


def partition_times(run_dir: Path) -> list[dict]:
    """Where the cluster time went: per partition, the per-sample metrics summed by role."""
    from .combine import find_partitions

    out = []
    for s, e, p in find_partitions(run_dir):
        rows = read_jsonl_tolerant(p.with_name(p.name.replace("results", "metrics").replace(".json", ".jsonl")))
        by_role: dict[str, int] = {}
        for r in rows:
            by_role[r.get("role", "?")] = by_role.get(r.get("role", "?"), 0) + 1
        rss = [r["peak_rss_mb"] for r in rows if r.get("peak_rss_mb") is not None]
        vram = [r["vram_reserved_mb"] for r in rows if r.get("vram_reserved_mb") is not None]
        out.append({"start": s, "end": e, "samples": by_role, "tokens": sum(r.get("tokens", 0) for r in rows),
                    "seconds": round(sum(r.get("seconds", 0.0) for r in rows), 2),
                    "devices": sorted({str(r.get("device")) for r in rows}),
                    "peak_rss_mb": max(rss) if rss else None, "peak_vram_mb": max(vram) if vram else None})
    return out


def format_times(times: list[dict]) -> str:
    lines = ["  time by partition (sum of per-sample seconds; every row is in metrics.jsonl):"]
    for t in times:
        samples = " ".join(f"{k} {v}" for k, v in sorted(t["samples"].items()))
        mem = f"peak RSS {t['peak_rss_mb']:.0f} MB" if t["peak_rss_mb"] is not None else ""
        if t["peak_vram_mb"] is not None:
            mem += f", VRAM {t['peak_vram_mb']:.0f} MB"
        lines.append(f"    [{t['start']}, {t['end']})  {t['seconds']:>9.2f} s  {t['tokens']:>8} tokens  "
                     f"{','.join(t['devices'])}  {samples}  {mem}".rstrip())
    lines.append(f"    total {sum(t['seconds'] for t in times):.2f} s")
    return "\n".join(lines)


def combine_run(run_dir: Path) -> tuple[dict, bool]:
    """Merge one run (unless its merged result is already current); returns (result, merged_now)."""
    from .combine import merge_partitions

    if up_to_date(run_dir):
        return read_json(run_dir / "results.json"), False
    return merge_partitions(run_dir), True


def combine_main(argv: Optional[list[str]] = None) -> int:
    from .cli import format_summary

    p = argparse.ArgumentParser(prog="combine.py", description="Merge the finished partitions of one run, or of "
                                "every run under an output dir, into results.json/scores.npz/metrics.jsonl; refuse "
                                "with the reason when partitions are missing, overlap or differ in configuration.")
    p.add_argument("run_dirs", nargs="*", help="run directories (<output-dir>/<computation-type>/<run>); "
                   "default: every run with partitions under --output-dir")
    p.add_argument("--output-dir", help="where to look for runs (default: data/)")
    args = p.parse_args(argv)
    run_dirs = [Path(d) for d in args.run_dirs] or find_run_dirs(Path(args.output_dir or REPO_ROOT / "data"))
    if not run_dirs:
        print(f"no runs with partitions under {args.output_dir or REPO_ROOT / 'data'}", file=sys.stderr)
        return 1
    failed = 0
    for d in run_dirs:
        try:
            result, merged = combine_run(d)
        except GradsimError as e:
            print(f"{d}: NOT combined: {redact(str(e))}", file=sys.stderr)
            failed += 1
            continue
        what = f"merged {len(result['partition'].get('merged_from', []))} partitions" if merged else "already up to date"
        print(f"{d}: {what}")
        print(f"  {format_summary(result)}")
        print(format_times(partition_times(d)))
    return 2 if failed else 0
