"""Score queries against candidate originals: per-matrix dot products, self-dots and cosines.

Everything a result reports is derived from three arrays, so a cosine over any subset of matrices
can be recomputed later without new gradients:
  dots   (Q, C, M)  query . candidate, per parameter matrix
  qself  (Q, M)     query . query, per matrix
  cself  (Q, C, M)  candidate . candidate, per matrix
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gradsim.core.metrics import RECALL_AT, component_of, group_indices, layer_of, summarize_ranks

if TYPE_CHECKING:  # scoring stored arrays (selection, analysis) needs numpy only
    import torch

    from gradsim.core.gradients import ParamLayout


def dense_dots(layout: ParamLayout, q: torch.Tensor, o: torch.Tensor) -> np.ndarray:
    """(b, n, M) per-matrix dots of every query row with every original row (blockwise matmuls)."""
    import torch

    out = np.empty((q.shape[0], o.shape[0], len(layout.names)), dtype=np.float64)
    for m, (_, lo, hi) in enumerate(layout.slices()):
        out[:, :, m] = torch.mm(q[:, lo:hi], o[:, lo:hi].T).double().cpu().numpy()
    return out


def cosine(dots: np.ndarray, qself: np.ndarray, cself: np.ndarray) -> np.ndarray:
    """Cosine from dots and self-dots (any matching shapes); 0/0 (a zero gradient) gives NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return dots / np.sqrt(qself * cself)


def whole_and_per_matrix(dots, qself, cself, computation_type: str):
    """Scores used for ranking: (Q, C) whole-model and (Q, C, M) per-matrix."""
    if computation_type == "dot-product":
        return dots.sum(-1), dots
    whole = cosine(dots.sum(-1), qself.sum(-1)[:, None], cself.sum(-1))
    return whole, cosine(dots, qself[:, None, :], cself)


def subset_scores(dots, qself, cself, idx, computation_type: str) -> np.ndarray:
    """(Q, C) scores over the concatenation of the matrices ``idx``: a cosine over any subset is exact."""
    d = dots[..., idx].sum(-1)
    if computation_type == "dot-product":
        return d
    return cosine(d, qself[:, None, idx].sum(-1), cself[..., idx].sum(-1))


def group_scores(names, dots, qself, cself, key, computation_type):
    """(group, (Q, C) scores) over groups of matrices sharing ``key(name)``, one group at a time
    (at full-corpus scale one (Q, C, M) temporary would not fit)."""
    for k, idx in group_indices(names, key).items():
        yield str(k), subset_scores(dots, qself, cself, idx, computation_type)


def summarize_scores(names, dots, qself, cself, computation_type: str) -> dict:
    """Retrieval metrics for the whole model, each matrix, each component type and each layer."""
    out = {"whole_model": summarize_ranks(subset_scores(dots, qself, cself, slice(None), computation_type))}
    for label, key in (("per_matrix", str), ("per_component", component_of), ("per_layer", layer_of)):
        out[label] = {k: summarize_ranks(s) for k, s in group_scores(names, dots, qself, cself, key, computation_type)}
    return out


def random_expectation(num_candidates: int) -> dict[str, float]:
    """The metrics of a ranking drawn uniformly at random, in expectation (no sampling noise)."""
    c = num_candidates
    out = {"n": None, "top1": 1.0 / c, "mrr": sum(1.0 / r for r in range(1, c + 1)) / c}
    for k in RECALL_AT:
        out[f"recall@{k}"] = min(k, c) / c
    return out


def summarize_arrays(names, arrays: dict, computation_type: str) -> dict:
    """Every summary a result reports, from the arrays of its scores.npz (so a merge of partitions
    recomputes them exactly): gradients, baselines (``baseline_<name>``: (Q, C) scores), and, when
    ``bm25_columns`` (Q, 1 + k) is present, the same for the BM25 protocol picked out of the corpus."""
    dots, qself, cself = arrays["dots"], arrays["qself"], arrays["cself"]
    baselines = {k[len("baseline_") :]: v for k, v in arrays.items() if k.startswith("baseline_")}

    def report(pick):
        base = {"random": random_expectation(pick(dots).shape[1])}
        base.update({k: summarize_ranks(pick(v)) for k, v in baselines.items()})
        return summarize_scores(names, pick(dots), qself, pick(cself), computation_type), base

    out = dict(zip(("summary", "baselines"), report(lambda a: a)))
    if "bm25_columns" in arrays:
        cols = arrays["bm25_columns"]
        pick = lambda a: np.take_along_axis(a, cols[..., None] if a.ndim == 3 else cols, axis=1)  # noqa: E731
        out["bm25_protocol"] = dict(zip(("summary", "baselines"), report(pick)))
    return out
