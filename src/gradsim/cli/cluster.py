"""The cluster commands: gradsim submit (compute.py), gradsim status (status.py), gradsim combine (combine.py,
combine_all.sh). Their flags are read here, the study's flags passed through to the tasks among them; planning,
submitting, reading the queue and merging are gradsim.cluster's."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from gradsim.cli.common import build_parser as study_parser
from gradsim.cli.common import config_from_args, format_summary, reports_errors
from gradsim.cluster.resources import BACKENDS, DEFAULT_TIME, RESOURCES_TITLE, Resources
from gradsim.credentials import redact
from gradsim.errors import GradsimError
from gradsim.options import Parser, add_quiet_flag, env_values, from_args, option, parse_flags, positionals

if TYPE_CHECKING:
    from gradsim.cluster.slurm import Plan

# gradsim submit
# --------------------------------------------------------------------------------------------


@dataclass
class ComputeOptions:
    """compute.py's own options (gradsim submit); every other flag is main.py's, passed through to the tasks."""

    num_partitions: int = option("number of array tasks", default=10)
    backend: str = option(" or ".join(BACKENDS), default="submitit", env="GRADSIM_SLURM_BACKEND")
    dry_run: bool = option("print the exact script and command; submit nothing", default=False, const=True)
    status: bool = option("show the status of this run's partitions instead of submitting", default=False, const=True)


def compute_parser() -> Parser:
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


def absolute_paths(argv: list[str]) -> list[str]:
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


def plan_from_argv(argv_main: list[str], num_partitions: int, backend: str, resources: Resources) -> Plan:
    """The plan (slurm.plan) of the run main.py's flags ``argv_main`` describe: read here once, into the Config
    the tasks get typed (paths absolute; --device cuda where --gpus asks for GPUs)."""
    from gradsim.cluster.slurm import check_backend, gpu_device, plan

    check_backend(backend)
    argv_main = absolute_paths(argv_main)
    parsed = study_parser().parse_args(argv_main)  # a typo in a flag fails here, not in N jobs
    device = gpu_device(parsed.device, resources)
    if device is not None:
        argv_main = [*argv_main, "--device", device]
    return plan(config_from_args(argv_main), num_partitions, backend, resources, quiet=parsed.quiet)


def compute_main(argv: Optional[list[str]] = None) -> int:
    from gradsim.cluster.resources import resources_from, slurm_environ
    from gradsim.cluster.status import collect_status, format_status
    from gradsim.cluster.submit import submit
    from gradsim.layout import run_dir as run_dir_of
    from gradsim.layout import slurm_dir

    argv = sys.argv[1:] if argv is None else argv
    parser = compute_parser()
    args, main_argv = parser.parse_known_args(argv)
    if "-h" in main_argv or "--help" in main_argv:
        parser.print_help()
        return 0
    try:
        opts = from_args(ComputeOptions, args, fallback=env_values(ComputeOptions, slurm_environ()))
        if opts.status:
            cfg = config_from_args(strip_flags(absolute_paths(main_argv), ("--partition-start", "--partition-end")))
            jobs_dir = slurm_dir(Path(cfg.output_dir).resolve(), cfg.computation_type, run_dir_of(cfg).name)
            print(format_status(collect_status([jobs_dir])))
            return 0
        res = resources_from(args)
        p = plan_from_argv(main_argv, opts.num_partitions, opts.backend, res)
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
        print(f"--- every task runs this Config ({record['task_config']}; fields not at their default):")
        print(config_lines(p.task_cfg))
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


def config_lines(cfg) -> str:
    """The fields of a Config that differ from the defaults, one ``name = value`` a line."""

    from gradsim.config import Config

    default = Config(setting=cfg.setting).to_dict()
    return "\n".join(f"  {k} = {v}" for k, v in cfg.to_dict().items() if v != default.get(k) or k == "setting")


def print_estimate(p: Plan) -> None:
    """Each task's backward passes, tokens and time, the total, and where the throughput comes from."""
    from gradsim.study.estimate import TIME_MARGIN, TIME_SLACK_MIN, Estimate, format_duration

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


# gradsim task
# --------------------------------------------------------------------------------------------


@dataclass
class TaskOptions:
    """The options of gradsim task: what a Slurm task of gradsim submit (--backend sbatch) starts."""

    task_config: list[str] = positionals("the submission's task_config.json (gradsim submit writes it)", "")
    partition_start: int = option("first query index of this task", default=0)
    partition_end: Optional[int] = option("query index one past this task's last", default=None)


def task_parser() -> Parser:
    p = Parser.of(
        TaskOptions,
        "gradsim task",
        "One task of a Slurm submission: the run whose typed Config the submission's task_config.json holds, over "
        "the queries [--partition-start, --partition-end); refused if the data files changed since the submission.",
    )
    add_quiet_flag(p)
    return p


@reports_errors
def task_main(argv: Optional[list[str]] = None) -> int:
    from gradsim.cluster.slurm import read_task_config, run_task

    opts = from_args(TaskOptions, parse_flags(task_parser(), argv))  # -q sets the log level
    if len(opts.task_config) != 1:
        raise GradsimError("give one task_config.json (the one in the submission's folder that gradsim submit wrote)")
    cfg, data = read_task_config(Path(opts.task_config[0]))
    result = run_task(cfg, opts.partition_start, opts.partition_end, data)
    for r in list(result["settings"].values()) if "settings" in result else [result]:
        print(format_summary(r))
    return 0


# gradsim status
# --------------------------------------------------------------------------------------------


@dataclass
class StatusOptions:
    """The options of status.py (gradsim status)."""

    paths: list[str] = positionals(
        "a submission folder, a run's jobs folder (<output-dir>/slurm/<type>/<run>) or an output dir", "data/"
    )
    output_dir: Optional[str] = option(
        "look at every submission under <output-dir>/slurm", default=None, default_help="data/"
    )
    lines: int = option("log lines to show for a failed partition", default=15)


def status_parser() -> Parser:
    from gradsim.cluster import status

    return Parser.of(StatusOptions, "status.py", status.__doc__.split("\n\n")[0])


def status_main(argv: Optional[list[str]] = None) -> int:
    from gradsim.cluster.status import collect_status, format_status
    from gradsim.layout import default_output_dir

    opts = from_args(StatusOptions, status_parser().parse_args(argv))
    paths = [Path(x) for x in opts.paths] or [Path(opts.output_dir or default_output_dir()) / "slurm"]
    print(format_status(collect_status(paths, opts.lines)))
    return 0


# gradsim combine
# --------------------------------------------------------------------------------------------


@dataclass
class CombineOptions:
    """The options of combine.py (gradsim combine, combine_all.sh)."""

    run_dirs: list[str] = positionals(
        "run directories (<output-dir>/<computation-type>/<run>)", "every run with partitions under --output-dir"
    )
    output_dir: Optional[str] = option("where to look for runs", default=None, default_help="data/")


def combine_parser() -> Parser:
    return Parser.of(
        CombineOptions,
        "combine.py",
        "Merge the finished partitions of one run, or of "
        "every run under an output dir, into results.json/scores.npz/metrics.jsonl; refuse "
        "with the reason when partitions are missing, overlap or differ in configuration.",
    )


def combine_main(argv: Optional[list[str]] = None) -> int:
    from gradsim.cluster.combine import combine_run, find_run_dirs, format_times, partition_times
    from gradsim.layout import default_output_dir

    opts = from_args(CombineOptions, combine_parser().parse_args(argv))
    run_dirs = [Path(d) for d in opts.run_dirs] or find_run_dirs(Path(opts.output_dir or default_output_dir()))
    if not run_dirs:
        print(f"no runs with partitions under {opts.output_dir or default_output_dir()}", file=sys.stderr)
        return 1
    failed = 0
    for d in run_dirs:
        try:
            result, merged = combine_run(d)
        except GradsimError as e:
            print(f"{d}: NOT combined: {redact(str(e))}", file=sys.stderr)
            failed += 1
            continue
        what = (
            f"merged {len(result['partition'].get('merged_from', []))} partitions" if merged else "already up to date"
        )
        print(f"{d}: {what}")
        print(f"  {format_summary(result)}")
        print(format_times(partition_times(d)))
    return 2 if failed else 0
