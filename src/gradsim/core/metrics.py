"""Retrieval metrics (the rank of the true original among a query's candidates, top-1, Recall@k, MRR) and
the groups of parameter matrices they are reported for (component type, layer)."""

from __future__ import annotations

import re
import warnings

import numpy as np

RECALL_AT = (1, 5, 10)


def true_rank(scores: np.ndarray, true_pos: int = 0) -> np.ndarray:
    """1-based rank of the candidate at ``true_pos`` along the last axis; ties count against it."""
    scores = np.asarray(scores, dtype=np.float64)
    true = np.take(scores, [true_pos], axis=-1)
    others = np.delete(scores, true_pos, axis=-1)
    # NaN (a zero gradient) never wins: rank it last.
    beaten = (others >= true) | np.isnan(true)
    return 1 + beaten.sum(axis=-1)


def summarize(ranks) -> dict[str, float]:
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        return {"n": 0}
    out = {"n": int(r.shape[0]), "top1": float((r == 1).mean()), "mrr": float((1.0 / r).mean())}
    for k in RECALL_AT:
        out[f"recall@{k}"] = float((r <= k).mean())
    return out


# Intervals printed beside top-1 and MRR (run, combine, select, analyze, frontier, targets, compare).
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_NOTE = (
    f"{BOOTSTRAP_LEVEL:.0%} percentile bootstrap over queries, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}"
)


def bootstrap_interval(
    values, seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES, level: float = BOOTSTRAP_LEVEL
) -> list[float]:
    """[low, high] percentile interval of the mean of per-query ``values`` (1.0 where top-1, 1/rank for MRR,
    or a paired difference of two runs' values) over ``resamples`` resamples of the queries with replacement,
    drawn from ``seed``: the same seed and query count give the same resamples, so top-1 and MRR (or two
    runs) are resampled together. Drawn in chunks (bounded memory) that continue one stream: the same
    resamples as one (resamples, Q) draw."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2**22 // v.size)  # bounded memory whatever the query count
    for s in range(0, resamples, chunk):
        idx = rng.integers(0, v.size, size=(min(chunk, resamples - s), v.size))
        means[s : s + len(idx)] = v[idx].mean(axis=1)
    tail = round(50 * (1 - level), 10)  # 2.5 exactly at 95%, not 2.5000000000000022
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def rank_intervals(ranks, seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, list[float]]:
    """Bootstrap intervals (bootstrap_interval) of top-1 and MRR from each query's rank of its true original
    (both from the same resamples)."""
    r = np.asarray(ranks, dtype=np.float64)
    return {
        "top1": bootstrap_interval(r == 1, seed, resamples),
        "mrr": bootstrap_interval(1.0 / r, seed, resamples),
    }


def format_interval(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def summarize_ranks(scores: np.ndarray) -> dict[str, float]:
    """top-1, MRR and recall@k of (Q, C) scores whose column 0 is the true original."""
    return summarize(true_rank(scores))


def mean_margin(scores: np.ndarray, scale_free: bool = False) -> float:
    """Mean over queries of the true original's score (column 0) minus the best distractor's: how far a
    method separates the original, where top-1 and MRR have saturated. Queries with a NaN score are left out.
    ``scale_free``: each query's margin in units of the spread (std) of its candidates' scores, for scores
    with a scale (dot products: a louder matrix would otherwise win by its norm); cosines need not be."""
    s = np.asarray(scores, dtype=np.float64)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row (a zero gradient) is expected
        m = s[:, 0] - np.nanmax(s[:, 1:], axis=1)
        if scale_free:
            m = m / np.nanstd(s, axis=1)
    m = m[np.isfinite(m)]
    return float(m.mean()) if m.size else float("-inf")


# --- parameter matrices by component type and layer (results, figures and tables all group by these) ---

_LAYER = re.compile(r"\.layers\.(\d+)\.")
# The projection matrices of a transformer layer, by their usual names (<c>_proj), in a layer's order.
LINEAR_COMPONENTS = ("q", "k", "v", "o", "gate", "up", "down")
# Every component type component_of() names, in the order tables and figures show them.
COMPONENTS = (*LINEAR_COMPONENTS, "norm", "embedding", "other")


def component_of(name: str) -> str:
    for c in LINEAR_COMPONENTS:
        if f".{c}_proj." in name or name.endswith(f"{c}_proj.weight"):
            return c
    if "embed" in name or "wte" in name or "lm_head" in name:
        return "embedding"
    if "norm" in name or "ln" in name:
        return "norm"
    return "other"


def component_order(component: str) -> int:
    """Sort key of a component type: COMPONENTS' order, anything else last."""
    return COMPONENTS.index(component) if component in COMPONENTS else len(COMPONENTS)


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def group_indices(names: list[str], key) -> dict:
    """The indices of the matrices that share ``key(name)``, by key, in first-seen order; a matrix whose
    key is None belongs to no group."""
    groups: dict = {}
    for m, n in enumerate(names):
        k = key(n)
        if k is not None:
            groups.setdefault(k, []).append(m)
    return groups
