"""Merge partition results into one result per run, refusing anything that would not equal an
unpartitioned run: missing or overlapping query ranges, or partitions made with different configs.

    gradsim combine [RUN_DIR ...] [--output-dir DIR]    (also combine.py, combine_all.sh)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradsim.config import COMPAT_FIELDS, COMPUTATION_TYPES, RECORDED_WHEN_SET, compat_differences
from gradsim.core.finite import check_arrays
from gradsim.core.score import summarize_arrays
from gradsim.errors import GradsimError
from gradsim.io import (
    atomic_save_npz,
    atomic_write_json,
    atomic_write_jsonl,
    load_json,
    load_npz,
    read_json,
    read_jsonl_tolerant,
)
from gradsim.layout import RunPaths, find_partitions, whole_run
from gradsim.study.cost import summed as summed_cost


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
        raise GradsimError(f"no partition results under {whole_run(run_dir).part_dir}: run the partitions first")
    redo = "delete it and the other files of that partition under {}, rerun the partition, then combine"
    results = [load_json(p, redo.format(p.parent)) for _, _, p in parts]
    first = results[0]
    for (_, _, p), r in zip(parts, results):
        diff = compat_differences(first["compat"], r["compat"])
        if diff:
            raise GradsimError(
                f"{p.name} was made with a different configuration than {parts[0][2].name} "
                f"({diff}): rerun it with the same settings or remove it"
            )
        if r.get("featurizer") != first.get("featurizer"):
            a, b = first.get("featurizer") or {}, r.get("featurizer") or {}
            fields = [k for k in sorted({*a, *b}) if a.get(k) != b.get(k)][:3]
            listed = ", ".join(f"featurizer {k}: {a.get(k)} vs {b.get(k)}" for k in fields)
            raise GradsimError(
                f"{p.name} was projected differently than {parts[0][2].name} ({listed}): rerun it where the "
                "others ran (same device type and projector) or remove it"
            )
    total = first["partition"]["num_queries"]
    ranges = [(s, e) for s, e, _ in parts]
    for (s1, e1), (s2, e2) in zip(ranges, ranges[1:]):
        if s2 < e1:
            raise GradsimError(f"partitions [{s1}, {e1}) and [{s2}, {e2}) overlap: remove one of them")
    gaps = missing_ranges(ranges, total)
    if gaps:
        listed = ", ".join(f"[{s}, {e})" for s, e in gaps)
        raise GradsimError(
            f"queries {listed} of {total} have no finished partition: rerun those partitions, then combine"
        )

    arrays = [load_npz(RunPaths.sibling(p, "scores"), redo.format(p.parent)) for _, _, p in parts]
    for (_, _, p), a in zip(parts, arrays):
        check_arrays(a, RunPaths.sibling(p, "scores"), "partition")
    scores = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0] if k != "query_index"}
    # --allow-nonfinite drops queries: the index of those kept (all of them, otherwise)
    index = np.concatenate(
        [a["query_index"] if "query_index" in a else np.arange(s, e) for (s, e, _), a in zip(parts, arrays)]
    )
    metrics = [row for _, _, p in parts for row in read_jsonl_tolerant(RunPaths.sibling(p, "metrics"))]

    # The code may have changed during a campaign (not a compat field): every version is recorded.
    versions = sorted({v for r in results for v in r.get("code_versions", [r["config"].get("code_version")]) if v})
    merged = dict(first)
    merged["compat"] = {
        k: first["compat"].get(k) for k in COMPAT_FIELDS if k in first["compat"] or k not in RECORDED_WHEN_SET
    }
    merged["code_versions"] = versions
    merged["config"] = dict(
        first["config"], partition_start=None, partition_end=None, code_version=" + ".join(versions) or None
    )
    merged["gradsim_version"] = merged["config"]["code_version"]
    merged["partition"] = {"start": 0, "end": total, "num_queries": total, "merged_from": [[s, e] for s, e in ranges]}
    merged["queries"] = [q for r in results for q in r["queries"]]
    if all("truncated" in r for r in results):
        # An original may be a candidate in several partitions: counted once.
        originals = sorted({i for r in results for i in r["truncated"]["original_ids"]})
        query_ids = [i for r in results for i in r["truncated"]["query_ids"]]
        merged["truncated"] = {
            **first["truncated"],
            "queries": len(query_ids),
            "originals": len(originals),
            "query_ids": query_ids,
            "original_ids": originals,
        }
    if all("cost" in r for r in results):  # what every partition spent, over all its attempts
        merged["cost"] = summed_cost([dict(r["cost"], partition=[s, e]) for (s, e, _), r in zip(parts, results)])
    if any("nonfinite" in r for r in results):
        merged["nonfinite"] = merged_nonfinite([r.get("nonfinite") or {} for r in results])
    merged.update(summarize_arrays(first["parameter_names"], scores, first["config"]["computation_type"]))
    out = whole_run(run_dir, total)
    atomic_save_npz(out.scores, **scores, query_index=index)
    atomic_write_jsonl(out.metrics, metrics)
    atomic_write_json(out.config, {"config": merged["config"], "compat": merged["compat"]})
    atomic_write_json(out.results, merged)
    return merged


def merged_nonfinite(records: list[dict]) -> dict:
    """The partitions' --allow-nonfinite records (finite.dropped_record) as one."""
    out: dict = {"queries_dropped": sum(r.get("queries_dropped", 0) for r in records)}
    for k in ("query_ids", "nonfinite_query_ids"):
        out[k] = [i for r in records for i in r.get(k, [])]
    out["nonfinite_original_ids"] = sorted({i for r in records for i in r.get("nonfinite_original_ids", [])})
    return out


# --------------------------------------------------------------------------------------------
# The command (combine.py, combine_all.sh, gradsim combine)
# --------------------------------------------------------------------------------------------


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories with partitions under an output dir: <root>/<computation-type>/<run>/partitions."""
    return sorted(d.parent for ct in COMPUTATION_TYPES for d in (Path(root) / ct).glob("*/partitions") if d.is_dir())


def up_to_date(run_dir: Path) -> bool:
    """results.json was merged from exactly the partitions there now, after the last of them was written."""
    merged = whole_run(run_dir)
    parts = find_partitions(run_dir)
    if not merged.results.exists() or not parts:
        return False
    try:
        got = read_json(merged.results).get("partition", {}).get("merged_from")
    except (OSError, ValueError):
        return False
    if got != [[s, e] for s, e, _ in parts]:
        return False
    inputs = [RunPaths.sibling(p, kind) for _, _, p in parts for kind in ("results", "scores", "metrics")]
    newest = max(f.stat().st_mtime for f in inputs if f.exists())
    outputs = (merged.results, merged.scores, merged.metrics, merged.config)
    return all(f.exists() and f.stat().st_mtime >= newest for f in outputs)


def partition_times(run_dir: Path) -> list[dict]:
    """Where the cluster time went: per partition, the per-sample metrics summed by role."""
    out = []
    for s, e, p in find_partitions(run_dir):
        rows = read_jsonl_tolerant(RunPaths.sibling(p, "metrics"))
        by_role: dict[str, int] = {}
        for r in rows:
            by_role[r.get("role", "?")] = by_role.get(r.get("role", "?"), 0) + 1
        rss = [r["peak_rss_mb"] for r in rows if r.get("peak_rss_mb") is not None]
        vram = [r["vram_reserved_mb"] for r in rows if r.get("vram_reserved_mb") is not None]
        out.append(
            {
                "start": s,
                "end": e,
                "samples": by_role,
                "tokens": sum(r.get("tokens", 0) for r in rows),
                "seconds": round(sum(r.get("seconds", 0.0) for r in rows), 2),
                "devices": sorted({str(r.get("device")) for r in rows}),
                "peak_rss_mb": max(rss) if rss else None,
                "peak_vram_mb": max(vram) if vram else None,
            }
        )
    return out


def format_times(times: list[dict]) -> str:
    lines = ["  time by partition (sum of per-sample seconds; every row is in metrics.jsonl):"]
    for t in times:
        samples = " ".join(f"{k} {v}" for k, v in sorted(t["samples"].items()))
        mem = f"peak RSS {t['peak_rss_mb']:.0f} MB" if t["peak_rss_mb"] is not None else ""
        if t["peak_vram_mb"] is not None:
            mem += f", VRAM {t['peak_vram_mb']:.0f} MB"
        lines.append(
            f"    [{t['start']}, {t['end']})  {t['seconds']:>9.2f} s  {t['tokens']:>8} tokens  "
            f"{','.join(t['devices'])}  {samples}  {mem}".rstrip()
        )
    lines.append(f"    total {sum(t['seconds'] for t in times):.2f} s")
    return "\n".join(lines)


def combine_run(run_dir: Path) -> tuple[dict, bool]:
    """Merge one run (unless its merged result is already current); returns (result, merged_now)."""
    if up_to_date(run_dir):
        return read_json(whole_run(run_dir).results), False
    return merge_partitions(run_dir), True
