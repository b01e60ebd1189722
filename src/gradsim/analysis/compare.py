"""Two finished runs on the same queries, side by side: ``gradsim compare A B``.

Paired by query id (the runs' orders may differ; different id sets are refused): the difference A - B of
top-1 and MRR with a paired bootstrap interval over the queries (the same resamples for both runs), the
rank agreement of the runs' per-matrix top-1 (Spearman over the matrices both score), and the queries
where one run ranks the true original first and the other does not. Works between any two run folders:
an imported study (gradsim import-study) against gradsim's own run of the same ids is how gradsim is
checked against the published study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from gradsim.core.metrics import BOOTSTRAP_NOTE, BOOTSTRAP_SEED, bootstrap_interval, format_interval, rank_intervals
from gradsim.errors import GradsimError
from gradsim.io import read_json
from gradsim.layout import whole_run


def load_ranks(run_dir: Path) -> tuple[dict, dict[str, int]]:
    """A finished run's results and each query's rank of its true original, by query id."""
    files = whole_run(Path(run_dir))
    if not files.results.exists():
        raise GradsimError(f"{run_dir} holds no finished run (results.json): run it, or combine its partitions")
    result = read_json(files.results)
    ranks: dict[str, int] = {}
    for q in result.get("queries", ()):
        if q["id"] in ranks:
            raise GradsimError(f"{files.results}: query id {q['id']} appears twice")
        ranks[q["id"]] = int(q["rank"])
    return result, ranks


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` (1 = smallest), ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a, b) -> Optional[float]:
    """Spearman's rank correlation (Pearson over average ranks); None when either side is constant or short."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(a_dir: Path, b_dir: Path, seed: int = BOOTSTRAP_SEED) -> dict:
    """The comparison of two runs (module docstring), refused unless they hold the same query ids."""
    a, ranks_a = load_ranks(a_dir)
    b, ranks_b = load_ranks(b_dir)
    only_a, only_b = sorted(ranks_a.keys() - ranks_b.keys()), sorted(ranks_b.keys() - ranks_a.keys())
    if only_a or only_b:
        eg = (only_a or only_b)[0]
        raise GradsimError(
            f"{a_dir} and {b_dir} hold different queries: {len(only_a)} ids only in the first, {len(only_b)} only "
            f"in the second (e.g. {eg}): compare runs of the same ids"
        )
    ids = list(ranks_a)
    ra = np.array([ranks_a[i] for i in ids], dtype=np.float64)
    rb = np.array([ranks_b[i] for i in ids], dtype=np.float64)
    diff = {
        "top1": {"value": float((ra == 1).mean() - (rb == 1).mean())},
        "mrr": {"value": float((1 / ra).mean() - (1 / rb).mean())},
    }
    diff["top1"]["ci"] = bootstrap_interval((ra == 1).astype(float) - (rb == 1), seed)
    diff["mrr"]["ci"] = bootstrap_interval(1 / ra - 1 / rb, seed)
    per_a, per_b = a["summary"]["per_matrix"], b["summary"]["per_matrix"]
    shared = [m for m in per_a if m in per_b]
    rho = spearman([per_a[m]["top1"] for m in shared], [per_b[m]["top1"] for m in shared])
    disagree = [{"id": i, "rank_a": int(x), "rank_b": int(y)} for i, x, y in zip(ids, ra, rb) if (x == 1) != (y == 1)]

    def side(path, result, r):
        c = result["config"]
        return {
            "run": str(path),
            "setting": c.get("setting"),
            "computation_type": c.get("computation_type"),
            "imported": bool(result.get("study_import")),
            "candidates": c.get("candidates"),  # bm25 (1 + top_k) or all (the corpus)
            "top1": float((r == 1).mean()),
            "mrr": float((1 / r).mean()),
            "ci": rank_intervals(r, seed),
        }

    return {
        "a": side(a_dir, a, ra),
        "b": side(b_dir, b, rb),
        "queries": len(ids),
        "difference_a_minus_b": diff,
        "interval": BOOTSTRAP_NOTE.replace(f"seed {BOOTSTRAP_SEED}", f"seed {seed}") + " (paired: the same resamples)",
        "per_matrix_spearman": {"rho": rho, "matrices": len(shared)},
        "disagreeing_queries": {
            "count": len(disagree),
            "a_right": sum(d["rank_a"] == 1 for d in disagree),
            "b_right": sum(d["rank_b"] == 1 for d in disagree),
            "queries": disagree,
        },
    }


def format_comparison(out: dict, show: int = 10) -> str:
    lines = []
    for k in ("a", "b"):
        s = out[k]
        lines.append(
            f"{k.upper()}: {s['run']} ({s['setting']} / {s['computation_type']}"
            + (", imported study" if s["imported"] else "")
            + f"): top-1 {s['top1']:.4f} {format_interval(s['ci']['top1'])}  MRR {s['mrr']:.4f} "
            f"{format_interval(s['ci']['mrr'])}"
        )
    d = out["difference_a_minus_b"]
    lines.append(
        f"A - B over {out['queries']} queries: top-1 {d['top1']['value']:+.4f} {format_interval(d['top1']['ci'])}  "
        f"MRR {d['mrr']['value']:+.4f} {format_interval(d['mrr']['ci'])}  [{out['interval']}]"
    )
    sp = out["per_matrix_spearman"]
    rho = "undefined (a constant side)" if sp["rho"] is None else f"{sp['rho']:.3f}"
    lines.append(f"per-matrix top-1 rank agreement: Spearman {rho} over {sp['matrices']} shared matrices")
    q = out["disagreeing_queries"]
    listed = ", ".join(f"{x['id']} ({x['rank_a']} vs {x['rank_b']})" for x in q["queries"][:show])
    lines.append(
        f"queries where one ranks the true original first and the other not: {q['count']} (A right {q['a_right']}, "
        f"B right {q['b_right']})" + (f": {listed}" + (" ..." if q["count"] > show else "") if q["count"] else "")
    )
    return "\n".join(lines)
