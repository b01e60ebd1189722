"""Greedy selection of parameter matrices, the original study's headline (a greedily chosen subset
beats the full gradient), done honestly: the subset is chosen on one half of the queries and
reported on the other half.

Selection needs no new gradients: the cosine (or dot) over any subset of matrices is exact from the
per-matrix dots and self-dots a run stores in scores.npz.

    gradsim select data/gradient-similarity/paraphrased-all-factorized4096 [--protocol bm25]
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gradsim.core.finite import check_arrays
from gradsim.core.metrics import (
    mean_margin,
    rank_intervals,
    summarize_ranks,
    true_rank,
)
from gradsim.core.score import cosine, subset_scores
from gradsim.errors import GradsimError
from gradsim.io import atomic_write_json, load_json, load_npz
from gradsim.layout import selection_file, whole_run

log = logging.getLogger("gradsim")


def split_queries(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random half of the queries to choose on, the other half to report on."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def subset_key(scores: np.ndarray, computation_type: str, size: int = 0) -> tuple[tuple, dict]:
    """How selection ranks a subset by its (Q, C) scores on the choosing queries (greedy's steps, best-k's
    order): MRR, then top-1, then the mean margin (metrics.mean_margin; for dot products in units of each
    query's score spread, so a louder matrix does not win by its norm), then the smaller ``size``. Returns
    (key, higher is better; the summary of the ranks)."""
    r = summarize_ranks(scores)
    return (r["mrr"], r["top1"], mean_margin(scores, computation_type == "dot-product"), -size), r


def greedy_select(
    names,
    dots,
    qself,
    cself,
    computation_type: str,
    choose: np.ndarray,
    report: np.ndarray,
    max_size: int | None = None,
    sizes=None,
    exclude=(),
) -> dict:
    """Add, one at a time, the matrix that most raises MRR (then top-1) on the ``choose`` queries;
    stop when nothing raises them. Each step's metrics on the held-out ``report`` queries are recorded.
    Among matrices that raise them equally (common once retrieval saturates: on real LIMA 109 of 272
    matrices alone rank every original first), the one with the larger mean margin on the ``choose``
    queries is added, then the smaller by ``sizes`` (entries per matrix), then the first in parameter
    order (subset_key).
    ``exclude``: names never added (the full gradient still counts them)."""

    def held_out(idx) -> dict:
        return summarize_ranks(subset_scores(dots[report], qself[report], cself[report], idx, computation_type))

    d, q, c = dots[choose], qself[choose], cself[choose]
    run_d = np.zeros(d.shape[:2], dtype=np.float64)
    run_q = np.zeros(q.shape[0], dtype=np.float64)
    run_c = np.zeros(c.shape[:2], dtype=np.float64)
    chosen: list[int] = []
    path = []
    best = (-np.inf, -np.inf)
    limit = max_size or len(names)
    while len(chosen) < limit:
        step = None
        for m in range(len(names)):
            if m in chosen or names[m] in exclude:
                continue
            s = run_d + d[..., m]
            if computation_type != "dot-product":
                s = cosine(s, (run_q + q[:, m])[:, None], run_c + c[..., m])
            key, r = subset_key(s, computation_type, sizes[m] if sizes is not None else 0)
            if step is None or key > step[0]:
                step = (key, m, r)
        if step is None or step[0][:2] <= best:
            break
        key, m, r = step
        best = key[:2]
        chosen.append(m)
        run_d += d[..., m]
        run_q += q[:, m]
        run_c += c[..., m]
        path.append({"added": names[m], "choose": r, "held_out": held_out(chosen)})
    return {
        "chosen": [names[m] for m in chosen],
        "path": path,
        "held_out": path[-1]["held_out"] if path else None,
        "full_gradient_held_out": held_out(slice(None)),
        "split": {"choose": choose.tolist(), "report": report.tolist()},
    }


def load_scores(run_dir: Path, protocol: str = "as-run") -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """A finished run's results and its (dots, qself, cself), of the BM25 columns with ``protocol`` bm25; a missing,
    damaged or non-finite run is a one-line error naming it."""
    run_dir = Path(run_dir)
    files = whole_run(run_dir)
    check_is_run(run_dir)
    fix = "rerun that run (or gradsim combine its partitions again)"
    result = load_json(files.results, fix)
    z = load_npz(files.scores, fix)
    check_arrays(z, files.scores)
    dots, qself, cself = z["dots"], z["qself"], z["cself"]
    if protocol == "bm25":
        if "bm25_columns" not in z:
            raise GradsimError(
                f"--protocol bm25 picks the BM25 candidates out of a --candidates all run, which {run_dir} is not: "
                "drop --protocol bm25"
            )
        cols = z["bm25_columns"]
        dots = np.take_along_axis(dots, cols[..., None], axis=1)
        cself = np.take_along_axis(cself, cols[..., None], axis=1)
    return result, dots, qself, cself


def held_out_intervals(run_dir: Path, out: dict) -> dict:
    """Bootstrap intervals (metrics.rank_intervals) over the held-out queries of a selection's chosen
    matrices ("selected") and of the full gradient ("full")."""
    result, dots, qself, cself = load_scores(run_dir, out["protocol"])
    report, ct = np.array(out["split"]["report"], dtype=np.int64), result["config"]["computation_type"]
    idx = [result["parameter_names"].index(n) for n in out["chosen"]]
    d, q, c = dots[report], qself[report], cself[report]
    ci = {"full": rank_intervals(true_rank(subset_scores(d, q, c, slice(None), ct)))}
    if idx:
        ci["selected"] = rank_intervals(true_rank(subset_scores(d, q, c, idx, ct)))
    return ci


def select_run(
    run_dir: Path, seed: int = 0, protocol: str = "as-run", max_size: int | None = None, include_noisy: bool = False
) -> dict:
    """Greedy selection on a finished run (results.json + scores.npz), written to selection[_bm25].json.
    On a projected run the matrices its per_matrix_fidelity flags as too noisy to rank are left out of the
    choice (their scores are mostly projection noise) unless ``include_noisy``; the output lists them."""
    run_dir = Path(run_dir)
    result, dots, qself, cself = load_scores(run_dir, protocol)
    choose, report = split_queries(dots.shape[0], seed)
    sizes = result.get("parameter_numel")  # ties in MRR, top-1 and margin go to the smaller matrix
    noisy = [] if include_noisy else (result.get("per_matrix_fidelity") or {}).get("noisy", [])
    if noisy and len(noisy) == len(result["parameter_names"]):
        raise GradsimError(
            f"every matrix of {run_dir} is too noisy to rank under its projection (per_matrix_fidelity): rerun "
            "with a larger --proj-dim or --allocation norm-floor, or pass --include-noisy"
        )
    if noisy:
        log.warning(
            "%d of %d matrices are too noisy to rank under this run's projection and are left out of the choice "
            "(--include-noisy keeps them)",
            len(noisy),
            len(result["parameter_names"]),
        )
    out = greedy_select(
        result["parameter_names"],
        dots,
        qself,
        cself,
        result["config"]["computation_type"],
        choose,
        report,
        max_size,
        np.array(sizes) if sizes else None,
        set(noisy),
    )
    out.update(seed=seed, protocol=protocol, run=str(run_dir), num_candidates=int(dots.shape[1]), excluded_noisy=noisy)
    out["model"] = result.get("model", {}).get("id")  # --matrices refuses a selection of another model
    atomic_write_json(selection_file(run_dir, "bm25" if protocol == "bm25" else ""), out)
    return out


def check_is_run(run_dir: Path) -> None:
    """Refuse a folder without a finished run's results.json and scores.npz, naming what is there instead."""
    files = whole_run(run_dir)
    if files.results.is_file() and files.scores.is_file():
        return
    if not run_dir.is_dir():
        raise GradsimError(f"{run_dir} does not exist: give the folder of a finished run")
    if files.part_dir.is_dir():
        raise GradsimError(f"{run_dir} holds partitions, not a merged run: gradsim combine {run_dir} first")
    below = sorted({str(r.parent) for pattern in ("*/results.json", "*/*/results.json") for r in run_dir.glob(pattern)})
    listed = f"; the finished runs below it: {', '.join(below[:4])}{' ...' if len(below) > 4 else ''}" if below else ""
    raise GradsimError(
        f"{run_dir} holds no finished run (results.json and scores.npz): give a run folder such as "
        f"<output-dir>/gradient-similarity/paraphrased{listed}"
    )
