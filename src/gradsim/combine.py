"""Merge partition results into one result per run, refusing anything that would not equal an
unpartitioned run: missing or overlapping query ranges, or partitions made with different configs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import GradsimError
from .io import atomic_save_npz, atomic_write_json, atomic_write_jsonl, read_json, read_jsonl_tolerant
from .score import summarize_arrays

_PART = re.compile(r"results_(\d+)-(\d+)\.json$")


def find_partitions(run_dir: Path) -> list[tuple[int, int, Path]]:
    parts = []
    for p in sorted((Path(run_dir) / "partitions").glob("results_*.json")):
        m = _PART.search(p.name)
        if m:
            parts.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(parts)


def missing_ranges(covered: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    gaps, pos = [], 0
    for s, e in sorted(covered):
        if s > pos:
            gaps.append((pos, s))
        pos = max(pos, e)
    if pos < total:
        gaps.append((pos, total))
    return gaps


def merge_partitions(run_dir: Path, expected_partitions: list[tuple[int, int]] | None = None) -> dict:
    """Write run_dir/results.json (+ scores.npz, metrics.jsonl) from run_dir/partitions/."""
    run_dir = Path(run_dir)
    parts = find_partitions(run_dir)
    if not parts:
        raise GradsimError(f"no partition results under {run_dir / 'partitions'}: run the partitions first")
    results = [read_json(p) for _, _, p in parts]
    first = results[0]
    for (s, e, p), r in zip(parts, results):
        if r["compat"] != first["compat"]:
            diff = sorted(k for k in first["compat"] if r["compat"].get(k) != first["compat"][k])
            raise GradsimError(
                f"{p.name} was made with a different configuration than {parts[0][2].name} "
                f"(differs in: {', '.join(diff)}): rerun it with the same settings or remove it"
            )
    total = first["partition"]["num_queries"]
    ranges = [(s, e) for s, e, _ in parts]
    for (s1, e1), (s2, e2) in zip(ranges, ranges[1:]):
        if s2 < e1:
            raise GradsimError(f"partitions [{s1}, {e1}) and [{s2}, {e2}) overlap: remove one of them")
    gaps = missing_ranges(ranges, total)
    if gaps:
        listed = ", ".join(f"[{s}, {e})" for s, e in gaps)
        raise GradsimError(f"queries {listed} of {total} have no finished partition: rerun those partitions, then combine")

    arrays = [np.load(p.with_name(p.name.replace("results", "scores").replace(".json", ".npz"))) for _, _, p in parts]
    scores = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0].files if k != "query_index"}
    metrics = [row for _, _, p in parts
               for row in read_jsonl_tolerant(p.with_name(p.name.replace("results", "metrics").replace(".json", ".jsonl")))]

    merged = dict(first)
    merged["config"] = dict(first["config"], partition_start=None, partition_end=None)
    merged["partition"] = {"start": 0, "end": total, "num_queries": total, "merged_from": [[s, e] for s, e in ranges]}
    merged["queries"] = [q for r in results for q in r["queries"]]
    merged.update(summarize_arrays(first["parameter_names"], scores, first["config"]["computation_type"]))
    atomic_save_npz(run_dir / "scores.npz", **scores, query_index=np.arange(total))
    atomic_write_jsonl(run_dir / "metrics.jsonl", metrics)
    atomic_write_json(run_dir / "config.json", {"config": merged["config"], "compat": merged["compat"]})
    atomic_write_json(run_dir / "results.json", merged)
    return merged


if __name__ == "__main__":  # python -m gradsim.combine [RUN_DIR ...] [--output-dir DIR]: see slurm.combine_main
    import sys

    from .slurm import combine_main

    sys.exit(combine_main())
