"""Per-matrix fidelity: each matrix's predicted cosine error under its projection, and which are too noisy."""

from __future__ import annotations

import math

import numpy as np

from gradsim.core.projection.factory import SKETCHES

NOISY_P90 = 0.05  # a matrix's score is flagged noisy when its predicted 90th-percentile cosine error exceeds this
Z90 = 1.645  # two-sided 90% of a normal error: P(|e| <= 1.645 sd) = 0.9
# factorized's per-matrix cosine error over the i.i.d. bound 1/sqrt(k_rows k_cols): 3.3x measured on the embedded
# model at 64 x 64 (bench/bench_fidelity.py, docs/benchmarks.md). Its noisy flags use the bound times this.
KRONECKER_EXCESS = 3.3


def predicted_cosine_sd(k: int, exact: bool) -> float:
    """The sd of a matrix's cosine error when it is sketched to k dims: sqrt((1 + c^2) / k) for the dot of unit
    vectors with true cosine c under an i.i.d. JL sketch (CountSketch's Var <Sa, Sb> <= (|a|^2 |b|^2 + <a,b>^2)/k),
    and (1 - c^2) / sqrt(k) once the sketched norms divide it out (the cosine); both are 1 / sqrt(k) at c = 0,
    the cosine's largest, so that is what is stated. A matrix kept exact has no error."""
    return 0.0 if exact else 1.0 / math.sqrt(max(int(k), 1))


def dims_for_noise(threshold: float = NOISY_P90) -> int:
    """The fewest dims whose predicted p90 cosine error is at most ``threshold``."""
    return math.ceil((Z90 / threshold) ** 2)


def per_matrix_fidelity(featurizer) -> dict:
    """Each matrix's dims, whether it is kept exact, the predicted sd of its cosine error and whether its
    score is too noisy to rank (predicted p90 error over NOISY_P90), for a projected run's results.json."""
    names, sizes = featurizer.layout.names, np.diff(featurizer.layout.offsets)
    kind = featurizer.kind
    excess = 1.0
    if kind in SKETCHES or kind == "trak":
        exact = list(featurizer.exact) if kind in SKETCHES else [not p for p in featurizer.projected]
        bound = "estimate"
        model = (
            "i.i.d. JL-like sketch of k dims per matrix: sd 1/sqrt(k), the cosine's at c = 0 (smaller for |c| > 0); "
            + ("TensorSketch's variance is within a small constant of CountSketch's" if kind == "tensorsketch" else "")
        ).rstrip("; ")
        noisy_if = f"{Z90} x predicted sd > {NOISY_P90} (sketched to fewer than {dims_for_noise()} dims)"
    else:
        exact = [s.rows is None and s.cols is None for s in featurizer.slots.values()]
        bound = "lower bound"
        excess = KRONECKER_EXCESS
        model = (
            "sd 1/sqrt(k_rows k_cols) of an i.i.d. sketch of the same size: a lower bound, as the Kronecker sketch of "
            f"a near-low-rank per-sample gradient has a larger variance ({KRONECKER_EXCESS}x measured on the embedded "
            "model at 64 x 64, benchmarks.md)"
        )
        noisy_if = f"{Z90} x {KRONECKER_EXCESS} x predicted sd > {NOISY_P90} (the measured Kronecker excess)"
    sd = [predicted_cosine_sd(int(k), e) for k, e in zip(sizes, exact)]
    noisy = [Z90 * excess * s > NOISY_P90 for s in sd]
    out = {
        "error_model": model,
        "prediction": bound,
        "noisy_if": noisy_if,
        "matrices": {
            n: {"dims": int(k), "exact": bool(e), "predicted_sd": round(s, 6), "noisy": bool(z)}
            for n, k, e, s, z in zip(names, sizes, exact, sd, noisy)
        },
        "counts": {
            "matrices": len(names),
            "exact": int(sum(exact)),
            "sketched": len(names) - int(sum(exact)),
            "noisy": int(sum(noisy)),
        },
        "noisy": [n for n, z in zip(names, noisy) if z],
    }
    if kind in SKETCHES:
        out["allocation"] = featurizer.allocation.get("allocation", "norm")
    sketched_sd = sorted(s for s, e in zip(sd, exact) if not e)
    if sketched_sd:
        out["predicted_sd_sketched"] = {
            "median": round(float(np.median(sketched_sd)), 6),
            "p90": round(float(np.percentile(sketched_sd, 90)), 6),
            "worst": round(sketched_sd[-1], 6),
        }
    return out
