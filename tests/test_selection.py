"""Greedy selection on synthetic per-matrix scores where the informative matrices are known."""

import numpy as np
import pytest

from gradsim.analysis.selection import greedy_select, split_queries
from gradsim.core.metrics import mean_margin, summarize_ranks
from gradsim.core.score import subset_scores


def synthetic(q=40, c=6, m=5, seed=0):
    """Matrices 1 and 3 carry the signal (the true candidate, column 0, is aligned); the rest are noise."""
    rng = np.random.default_rng(seed)
    qv = rng.normal(size=(q, m, 8))
    cv = rng.normal(size=(q, c, m, 8))
    for k in (1, 3):
        cv[:, 0, k] = qv[:, k] + 2.0 * rng.normal(size=(q, 8))
    cv[:, :, (0, 2, 4)] *= 5.0  # loud noise matrices drown the signal in the full gradient
    dots = np.einsum("qmd,qcmd->qcm", qv, cv)
    return dots, (qv**2).sum(-1), (cv**2).sum(-1)


def test_greedy_finds_the_informative_matrices_and_reports_held_out():
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(5)]
    dots, qself, cself = synthetic()
    choose, report = split_queries(dots.shape[0], seed=1)
    assert len(set(choose) | set(report)) == dots.shape[0] and not set(choose) & set(report)
    out = greedy_select(names, dots, qself, cself, "gradient-similarity", choose, report)
    assert set(out["chosen"][:2]) == {names[1], names[3]}
    assert out["held_out"]["n"] == len(report)
    assert out["held_out"]["mrr"] > out["full_gradient_held_out"]["mrr"]
    # The recorded held-out metric is the cosine over the chosen subset, recomputed independently.
    idx = [names.index(n) for n in out["chosen"]]
    s = subset_scores(dots[report], qself[report], cself[report], idx, "gradient-similarity")
    assert out["held_out"]["top1"] == float((s.argmax(1) == 0).mean())


def test_ties_go_to_the_smaller_matrix():
    """Matrices 1 and 3 carry the same signal (copies): with sizes, greedy adds the smaller one first."""
    dots, qself, cself = synthetic()
    dots[..., 3], qself[..., 3], cself[..., 3] = dots[..., 1], qself[..., 1], cself[..., 1]
    names = [f"m{i}" for i in range(5)]
    choose, report = split_queries(dots.shape[0], seed=1)
    first = greedy_select(names, dots, qself, cself, "gradient-similarity", choose, report, 1)
    assert first["chosen"] == ["m1"]  # without sizes: the first in order
    sizes = np.array([10, 500, 10, 20, 10])
    small = greedy_select(names, dots, qself, cself, "gradient-similarity", choose, report, 1, sizes)
    assert small["chosen"] == ["m3"]


def saturated(q=40, c=6, dim=64, seed=0):
    """Matrices 1 and 2 each rank every true original first; matrix 1 separates it by far more (its
    original is a near copy of the query, matrix 2's a noisy one). Matrix 0 is noise."""
    rng = np.random.default_rng(seed)
    qv = rng.normal(size=(q, 3, dim))
    cv = rng.normal(size=(q, c, 3, dim))
    cv[:, 0, 1] = qv[:, 1] + 0.2 * rng.normal(size=(q, dim))
    cv[:, 0, 2] = qv[:, 2] + 1.0 * rng.normal(size=(q, dim))
    return np.einsum("qmd,qcmd->qcm", qv, cv), (qv**2).sum(-1), (cv**2).sum(-1)


def test_ties_at_saturation_go_to_the_larger_margin_before_the_smaller_matrix():
    """Once several matrices alone rank every original first (MRR 1.000 on the choosing half), greedy adds
    the one that separates the original most (mean margin over the best distractor), even if larger."""
    dots, qself, cself = saturated()
    names = ["m0", "m1", "m2"]
    choose, report = split_queries(dots.shape[0], seed=0)
    own = [subset_scores(dots[choose], qself[choose], cself[choose], [m], "gradient-similarity") for m in range(3)]
    assert summarize_ranks(own[1])["mrr"] == summarize_ranks(own[2])["mrr"] == 1.0  # the tie this is about
    assert mean_margin(own[1]) > mean_margin(own[2]) + 0.1
    sizes = np.array([10, 1000, 10])
    out = greedy_select(names, dots, qself, cself, "gradient-similarity", choose, report, 1, sizes)
    assert out["chosen"] == ["m1"]
    # the margin it breaks ties by, recomputed by hand: true original's cosine minus the best distractor's
    s = own[1]
    assert mean_margin(s) == pytest.approx(np.mean([row[0] - row[1:].max() for row in s]))


def test_dot_product_margins_are_scale_free():
    """Under dot products a louder matrix has larger raw margins by its norm alone: matrix 2 scaled 10x
    (dots 100x) would win on raw margin; the tie-break compares margins in units of each query's score
    spread, so the better-separating matrix 1 is still added."""
    dots, qself, cself = saturated()
    dots[..., 2] *= 100.0
    choose, report = split_queries(dots.shape[0], seed=0)
    own = [dots[choose][..., m] for m in range(3)]
    assert summarize_ranks(own[1])["mrr"] == summarize_ranks(own[2])["mrr"] == 1.0
    assert mean_margin(own[2]) > mean_margin(own[1])  # raw: the loud one
    assert mean_margin(own[1], scale_free=True) > mean_margin(own[2], scale_free=True)
    assert mean_margin(own[2], scale_free=True) == pytest.approx(mean_margin(own[2] / 100.0, scale_free=True))
    s = own[1]
    assert mean_margin(s, scale_free=True) == pytest.approx(np.mean([(r[0] - r[1:].max()) / r.std() for r in s]))
    out = greedy_select(["m0", "m1", "m2"], dots, qself, cself, "dot-product", choose, report, 1)
    assert out["chosen"] == ["m1"]
