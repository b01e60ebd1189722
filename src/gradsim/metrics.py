"""Retrieval metrics: the rank of the true original among a query's candidates, top-1, Recall@k, MRR."""

from __future__ import annotations

import re
from collections import defaultdict

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


_LAYER = re.compile(r"\.layers\.(\d+)\.")
_COMPONENTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def component_of(name: str) -> str:
    for c in _COMPONENTS:
        if f".{c}." in name or name.endswith(c + ".weight"):
            return c.replace("_proj", "")
    if "embed" in name or "wte" in name or "lm_head" in name:
        return "embedding"
    if "norm" in name or "ln" in name:
        return "norm"
    return "other"


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def group_sums(names: list[str], per_matrix: np.ndarray, key) -> dict[str, np.ndarray]:
    """Sum per-matrix quantities (last axis) over the matrices that share ``key(name)``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for m, n in enumerate(names):
        k = key(n)
        if k is not None:
            groups[str(k)].append(m)
    return {k: per_matrix[..., idx].sum(axis=-1) for k, idx in groups.items()}
