"""Score queries against candidate originals: per-matrix dot products, self-dots and cosines.

Everything a result reports is derived from three arrays, so a cosine over any subset of matrices
can be recomputed later without new gradients:
  dots   (Q, C, M)  query . candidate, per parameter matrix
  qself  (Q, M)     query . query, per matrix
  cself  (Q, C, M)  candidate . candidate, per matrix
"""

from __future__ import annotations

import numpy as np
import torch

from .gradients import ParamLayout
from .metrics import component_of, layer_of, summarize, true_rank


def dense_dots(layout: ParamLayout, q: torch.Tensor, o: torch.Tensor) -> np.ndarray:
    """(b, n, M) per-matrix dots of every query row with every original row (blockwise matmuls)."""
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


def group_scores(names, dots, qself, cself, key, computation_type):
    """Scores over groups of matrices (a component type or a layer): cosine/dot of the concatenation."""
    groups: dict[str, list[int]] = {}
    for m, n in enumerate(names):
        k = key(n)
        if k is not None:
            groups.setdefault(str(k), []).append(m)
    out = {}
    for k, idx in groups.items():
        d = dots[..., idx].sum(-1)
        out[k] = d if computation_type == "dot-product" else cosine(d, qself[:, None, idx].sum(-1), cself[..., idx].sum(-1))
    return out


def summarize_scores(names, dots, qself, cself, computation_type: str) -> dict:
    """Retrieval metrics for the whole model, each matrix, each component type and each layer."""
    whole, per_matrix = whole_and_per_matrix(dots, qself, cself, computation_type)
    out = {"whole_model": summarize(true_rank(whole))}
    pm_ranks = true_rank(np.moveaxis(per_matrix, 2, 1))  # (Q, M)
    out["per_matrix"] = {n: summarize(pm_ranks[:, m]) for m, n in enumerate(names)}
    for label, key in (("per_component", component_of), ("per_layer", layer_of)):
        out[label] = {k: summarize(true_rank(s)) for k, s in group_scores(names, dots, qself, cself, key, computation_type).items()}
    return out
