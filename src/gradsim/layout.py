"""Where things live on disk: the one owner of every file and folder name a run writes.

<output-dir>/<computation-type>/<run name>/            one run (one setting): layout.run_name
    results.json scores.npz metrics.jsonl config.json  a finished, unpartitioned run (or merged partitions)
    partitions/results_SSSSS-EEEEE.json ...            the same files of one query range
    progress[_SSSSS-EEEEE].jsonl + _blocks/            resume log of an unfinished run and its block files
    progress[_SSSSS-EEEEE].lock                        held while a process runs that range (lock.py)
    .scratch/                                          kept exact gradients (deleted when the run ends)
    selection[_bm25].json                              greedy matrix selection
<output-dir>/features/<key>/originals|representations  projected / representation feature stores (shared)
<output-dir>/features/<projection>-allocations/<key>.json
<output-dir>/features/normalizers/<key>.npz            --normalize state estimated from the originals
<output-dir>/slurm/<computation-type>/<run name>/<stamp>-<backend>/   a submission: submission_dir
    submission.json [<setting>/submission.json]        its record (one per setting with --setting both)
    task_config.json                                   the typed Config every task runs (gradsim task reads it)
    job.sbatch  logs/<array job>_<task>.log            sbatch's script and task logs (the template's %A_%a.log)
    submitit/                                          submitit's folder (its own scripts and logs)
<output-dir>/targets/targets.json                      the loss target x normalizer table (gradsim targets)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional


def run_name(cfg) -> str:
    """The run folder's name of one setting of ``cfg`` (a Config): the setting, then a tag for each method
    option away from its default, in the order the tags were added (so runs made before an option existed
    keep their folders). The inputs (model, data, dtype, size, seed) and top_k and damping name no folder: a
    run that differs from a finished one there is refused by its compat check (study/outputs.py)."""
    name = cfg.setting
    if cfg.candidates == "all":
        name += "-all"
    if cfg.use_random_projection:
        name += f"-{cfg.projection}{cfg.proj_dim}"
    if cfg.allocation != "norm":
        name += f"-alloc-{cfg.allocation}"
    if cfg.loss_on != "response":
        name += f"-loss-{cfg.loss_on}"
    if cfg.turns != "first":
        name += f"-turns-{cfg.turns}"
    if cfg.normalize != "none":
        name += f"-norm-{cfg.normalize}"
    if cfg.matrices is not None:
        from gradsim.matrices import spec_tag

        name += f"-matrices-{spec_tag(cfg.matrices)}"
    return name


def run_dir(cfg) -> Path:
    """The run folder of one setting of ``cfg`` (a Config)."""
    return Path(cfg.output_dir) / cfg.computation_type / run_name(cfg)


def default_output_dir() -> Path:
    """--output-dir when not given: data/ in the current directory (the checkout's data/ when run from its root)."""
    return Path.cwd() / "data"


def features_root(output_dir) -> Path:
    return Path(output_dir) / "features"


def feature_store_dir(output_dir, key: str, what: str) -> Path:
    """A shared feature store: ``what`` is ``originals`` (projected gradients) or ``representations``."""
    return features_root(output_dir) / key / what


def allocation_file(output_dir, projection: str, key: str) -> Path:
    return features_root(output_dir) / f"{projection}-allocations" / f"{key}.json"


def normalizer_file(output_dir, key: str) -> Path:
    """A normalizer's state estimated from the originals (shared by partitions and settings)."""
    return features_root(output_dir) / "normalizers" / f"{key}.npz"


def targets_file(output_dir) -> Path:
    return Path(output_dir) / "targets" / "targets.json"


def frontier_files(output_dir) -> tuple[Path, Path]:
    """The frontier's table (JSON) and figure (PNG), under ``output_dir`` (default: beside the runs)."""
    root = Path(output_dir)
    return root / "frontier.json", root / "frontier.png"


def slurm_dir(output_dir, computation_type: str, name: str) -> Path:
    return Path(output_dir) / "slurm" / computation_type / name


SUBMISSION = "submission.json"  # the record of a submission (gradsim submit), read by gradsim status


def submission_dir(output_dir, computation_type: str, name: str, backend: str, when: datetime) -> Path:
    """The folder of one submission of a run: its record, script and logs, named by its UTC time and backend."""
    return slurm_dir(output_dir, computation_type, name) / f"{when.strftime('%Y%m%d-%H%M%S-%f')}-{backend}"


def submission_record(sub_dir, setting: Optional[str] = None) -> Path:
    """A submission's record; with --setting both, one per setting in <submission>/<setting>/."""
    return Path(sub_dir) / setting / SUBMISSION if setting else Path(sub_dir) / SUBMISSION


def task_config_file(sub_dir) -> Path:
    """The typed Config every task of a submission runs (slurm.task_config_record)."""
    return Path(sub_dir) / "task_config.json"


def sbatch_script_file(sub_dir) -> Path:
    return Path(sub_dir) / "job.sbatch"


def task_log_dir(sub_dir) -> Path:
    """The sbatch tasks' logs: <array job>_<task>.log (task_log), which the template writes as %A_%a.log."""
    return Path(sub_dir) / "logs"


def task_log(sub_dir, array_job_id: str, task: int) -> Path:
    return task_log_dir(sub_dir) / f"{array_job_id}_{task}.log"


def submitit_dir(sub_dir) -> Path:
    return Path(sub_dir) / "submitit"


def selection_file(run_dir_: Path, protocol: str = "") -> Path:
    return Path(run_dir_) / (f"selection_{protocol}.json" if protocol else "selection.json")


PART_RESULTS = re.compile(r"results_(\d+)-(\d+)\.json$")  # what RunPaths names a partition's results


def part_range(results_file) -> Optional[tuple[int, int]]:
    """(start, end) of a partition's results file (results_SSSSS-EEEEE.json, RunPaths.results); None otherwise."""
    m = PART_RESULTS.search(Path(results_file).name)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class RunPaths:
    """The files of one query range [start, end) of a run; an unpartitioned run has no range in its names."""

    run_dir: Path
    start: int
    end: int
    partitioned: bool

    @property
    def stem(self) -> str:
        return f"{self.start:05d}-{self.end:05d}"

    @property
    def part_dir(self) -> Path:
        return self.run_dir / "partitions"

    def _file(self, kind: str, ext: str) -> Path:
        if self.partitioned:
            return self.part_dir / f"{kind}_{self.stem}{ext}"
        return self.run_dir / f"{kind}{ext}"

    # The files of this range, each named <kind>[_SSSSS-EEEEE].<ext>
    results = property(lambda self: self._file("results", ".json"))
    scores = property(lambda self: self._file("scores", ".npz"))
    metrics = property(lambda self: self._file("metrics", ".jsonl"))
    config = property(lambda self: self._file("config", ".json"))
    progress = property(lambda self: self._file("progress", ".jsonl"))

    @property
    def lock(self) -> Path:
        """Held by the one process running this range (its progress, blocks and scratch are its alone)."""
        return self.progress.with_suffix(".lock")

    @property
    def blocks(self) -> Path:
        return self.progress.with_name(self.progress.stem + "_blocks")

    @property
    def scratch(self) -> Path:
        return self.run_dir / ".scratch" / self.stem

    @staticmethod
    def sibling(results_file: Path, kind: str) -> Path:
        """The ``kind`` file (scores, metrics, config) beside a results file, partitioned or not."""
        ext = {"scores": ".npz", "metrics": ".jsonl", "config": ".json", "results": ".json"}[kind]
        name = Path(results_file).name
        return Path(results_file).with_name(kind + name[len("results") : -len(".json")] + ext)


def partition_paths(run_dir: Path, s: int, e: int, num_queries: Optional[int] = None) -> RunPaths:
    """The files of the query range [s, e) of a run. A single partition covering every query is an
    ordinary run: its files are not under partitions/."""
    return RunPaths(Path(run_dir), s, e, partitioned=(s, e) != (0, num_queries))


def whole_run(run_dir: Path, num_queries: int = 0) -> RunPaths:
    """The files of a whole run: what an unpartitioned run writes, and what combine merges partitions into."""
    return RunPaths(Path(run_dir), 0, num_queries, partitioned=False)


def find_partitions(run_dir: Path) -> list[tuple[int, int, Path]]:
    """(start, end, results file) of each finished partition of a run, in query order."""
    parts = []
    for p in sorted(whole_run(run_dir).part_dir.glob("results_*.json")):
        rng = part_range(p)
        if rng:
            parts.append((*rng, p))
    return sorted(parts)
