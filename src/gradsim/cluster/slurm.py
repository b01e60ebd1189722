"""Fan a run's queries out over one Slurm job array: the plan (gradsim submit, compute.py).

``gradsim submit`` splits the queries into N contiguous ranges and submits one array (submit.py): with
submitit (``map_array`` of PartitionTask, a Checkpointable task) or with sbatch (a script rendered from the
package's ``templates/job.sbatch.template``). Every task runs main.py's code path (``python -m gradsim run``)
for its range, so a task that is preempted or hits its time limit is requeued and resumes from the run's
progress log. Each submission leaves ``submission.json`` beside its logs; ``gradsim.cluster.status``
(status.py) reads those and asks squeue/sacct, ``gradsim.cluster.combine`` (combine.py) merges the finished
partitions. The study's flags are read once, by the command layer (gradsim.cli), which hands the plan a
Config; the tasks get that Config typed, never as flags: submitit pickles it into each PartitionTask, the sbatch
script starts ``python -m gradsim task <submission>/task_config.json`` (the Config and the data hashes it was
planned on, written atomically at submit), and a task whose data files changed since refuses to run.

Slurm resources come from flags and ``GRADSIM_SLURM_*`` variables (environment or .env), never
from this file (resources.py): clusters differ in partitions, accounts, GPUs and containers.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import submitit

from gradsim.cluster.resources import BACKENDS, Resources, parse_mem_gb
from gradsim.config import Config
from gradsim.errors import GradsimError
from gradsim.io import read_json
from gradsim.layout import partition_paths, submission_dir
from gradsim.layout import run_dir as run_dir_of
from gradsim.study.estimate import Estimate

log = logging.getLogger("gradsim")


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
# The task
# --------------------------------------------------------------------------------------------


TASK_CONFIG_FORMAT = "gradsim-task-config/1"


def data_hashes(data: dict) -> dict:
    """Per setting (``data``: setting -> Dataset), the hashes of the data a submission was planned on."""
    return {
        s: {"original_data_sha256": d.original_sha256, "variant_data_sha256": d.variant_sha256} for s, d in data.items()
    }


def task_config_record(cfg: Config, hashes: dict) -> dict:
    """What every task of a submission runs: the study's Config less its range (each task's comes from the array)
    and the hashes of the data it was planned on (data_hashes)."""
    from gradsim import __version__

    return {"format": TASK_CONFIG_FORMAT, "gradsim_version": __version__, "config": cfg.to_dict(), "data": hashes}


def read_task_config(path: Path) -> tuple[Config, dict]:
    """(Config, data hashes per setting) of a submission's task_config.json; a missing or damaged file is a
    one-line error."""
    from gradsim.io import load_json

    if not Path(path).is_file():
        raise GradsimError(f"task config {path} does not exist: give the task_config.json of a submission's folder")
    record = load_json(Path(path), "submit the run again (gradsim submit writes it)")
    if record.get("format") != TASK_CONFIG_FORMAT:
        raise GradsimError(f"{path} is not a gradsim task config ({TASK_CONFIG_FORMAT}): submit the run again")
    return Config.from_dict(record["config"]).validate(), record.get("data", {})


def run_task(cfg: Config, start: int, end: int, data: Optional[dict] = None) -> dict:
    """One task: the run ``cfg`` over the queries [start, end), after checking that its data files still hold what
    the submission was planned on (``data``: hashes per setting, as task_config_record wrote them)."""
    from dataclasses import replace

    from gradsim.study.context import check_unchanged, load_data, setting_configs
    from gradsim.study.run import run

    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) + 1
    print(f"gradsim task [{start}, {end}) job {os.environ.get('SLURM_JOB_ID', '?')} attempt {attempt}", flush=True)
    for c in setting_configs(cfg):
        if data and c.setting in data:
            record = dict(data[c.setting], original_data=c.original_data, variant_data=c.variant_data)
            check_unchanged(load_data(c), record, f"this submission's {c.setting} run")
    return run(replace(cfg, partition_start=start, partition_end=end))


class PartitionTask(submitit.helpers.Checkpointable):
    """One query range of the run ``cfg`` (the submission's Config, pickled typed; no flags are read on the node).
    On preemption or time limit submitit calls checkpoint(), which (inherited) requeues this same call; run()
    then resumes from its progress log, so the call itself needs no state."""

    def __init__(self, cfg: Config, data: Optional[dict] = None, quiet: bool = False) -> None:
        self.cfg, self.data, self.quiet = cfg, data, quiet

    def __call__(self, start: int, end: int) -> dict:
        logging.basicConfig(level=logging.WARNING if self.quiet else logging.INFO, format="%(message)s")
        result = run_task(self.cfg, start, end, self.data)
        results = list(result["settings"].values()) if "settings" in result else [result]
        return {"partition": results[0]["partition"], "summary": results[0].get("summary", {}).get("whole_model")}


# --------------------------------------------------------------------------------------------
# Planning
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
    cfg: Config  # the study as asked (its overall range included)
    task_cfg: Config  # what every task runs, less its range: output folder absolute, --memory-gb sized (size_task)
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
    data: dict = field(default_factory=dict)  # per setting: the hashes of the data it was planned on
    quiet: bool = False  # tasks log warnings only (-q)

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


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise GradsimError(f"unknown --backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def plan(cfg: Config, num_partitions: int, backend: str, resources: Resources, quiet: bool = False) -> Plan:
    """The array for the run ``cfg`` (the command layer's reading of the study's flags, paths absolute, --device cuda
    where --gpus asks for GPUs): its ranges, those not finished yet, each task's size and the Config every task runs."""
    from dataclasses import replace

    from gradsim.data.load import partition_range
    from gradsim.study.context import load_data, setting_configs

    check_backend(backend)
    cfg.validate()
    settings = [(c, load_data(c)) for c in setting_configs(cfg)]
    if cfg.skip_overlong:  # the tasks' query indices count the rows left after it: plan over the same rows
        from gradsim.study.part import skip_overlong

        view = tokenizer_view(cfg)
        settings = [(c, skip_overlong(c, d, view)) for c, d in settings]
    runs = [SettingRun(c.setting, run_dir_of(c).resolve(), len(d.queries)) for c, d in settings]
    num_queries = max(r.num_queries for r in runs)  # --setting both: each task clips the range to each setting
    start, end = partition_range(num_queries, cfg.partition_start, cfg.partition_end)
    output_dir = Path(cfg.output_dir).resolve()
    # The tasks get their own range, and the output folder absolute (they may start in another directory).
    task_cfg = replace(cfg, partition_start=None, partition_end=None, output_dir=str(output_dir))
    ranges = split_ranges(start, end, num_partitions)
    todo = [
        (s, e)
        for s, e in ranges
        if not all(finished(cfg, r, r.clip(s, e), d) for r, (_, d) in zip(runs, settings) if r.clip(s, e))
    ]
    run_dir = run_dir_of(cfg).resolve()
    sub_dir = submission_dir(output_dir, cfg.computation_type, run_dir.name, backend, datetime.now(timezone.utc))
    data = {c.setting: d for c, d in settings}
    p = Plan(backend, cfg, task_cfg, run_dir, sub_dir, num_queries, ranges, todo, resources, runs, quiet=quiet)
    size_task(p, settings)
    p.data = data_hashes(data)
    return p


def tokenizer_view(cfg: Config):
    """What --skip-overlong reads of a loaded model (its tokenizer with the run's chat template, its context
    length), without the weights: the model's config and tokenizer files."""
    from types import SimpleNamespace

    from gradsim.core.model import load_tokenizer
    from gradsim.study.memory import model_shape

    tokenizer = load_tokenizer(cfg)
    shape = model_shape(cfg)
    context = (shape.context if shape is not None else 0) or tokenizer.model_max_length
    return SimpleNamespace(tokenizer=tokenizer, context_length=int(context))


def gpu_device(device: Optional[str], resources: Resources) -> Optional[str]:
    """The --device of a task that asks Slurm for GPUs: CUDA, so that one which finds none stops at once instead
    of computing on the CPU within a memory request sized for the GPU (None: --device as given)."""
    if not resources.gpus:
        return None
    if device is not None and not device.startswith("cuda"):
        raise GradsimError(
            f"--gpus {resources.gpus} asks Slurm for GPUs but --device {device} runs on the CPU: drop one of them"
        )
    return None if device is not None else "cuda"


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
    budget = budget_gb(cfg, "memory_gb", None)
    if on_gpu:
        need = device_need_bytes(shape, tokens, cfg)
        have = resources.gpu_memory_gb * GB
        if need > have:
            raise GradsimError(
                f"{cfg.model_name} ({shape.params / 1e9:.2f}B parameters, {cfg.dtype}, {tokens} tokens) needs "
                f"{need / GB:.1f} GB on the GPU, more than --gpu-memory-gb {resources.gpu_memory_gb:g}: ask for a "
                "larger card (--gpus TYPE:1 and --gpu-memory-gb), --dtype bfloat16-weights or a shorter --max-length"
            )
        host_cache = budget_gb(cfg, "host_memory_gb", 0.0) or 0.0
        matrices = 9 * shape.layers + 3  # a decoder layer's 7 projections and 2 norms, embeddings, final norm
        results = 24 * p.num_queries * (cfg.top_k + 1) * matrices * len(p.runs)  # dots, cself, qself: float64
        host = host_bytes(shape, cfg.dtype, "cuda", host_cache, results)["total"]
        held = budget * GB if budget is not None else 0.9 * (have - shape.exact_bytes(tokens, cfg.dtype, 0)["total"])
    else:
        if budget is None and not cfg.use_random_projection:
            budget = TASK_HELD_GRADIENTS * grad / GB
            # rounded up, so that the budget holds what it was sized for
            p.task_cfg = replace(p.task_cfg, memory_gb=math.ceil(budget * 100) / 100)
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
