"""Finite or loud: a NaN or inf gradient, feature or score never becomes a ranking.

Every exact gradient is checked where it is made through its per-matrix self-dots (computed anyway, so
the check costs nothing: a matrix's self-dot is finite only when all its entries are and their squares do
not overflow); every projected feature block with one fused ``torch.isfinite(x).all()``; and the scores
a result is assembled from. A non-finite value stops the run (exit 2) naming the sample, the matrix and
the likely cause, before any result is written. With ``--allow-nonfinite`` the run goes on: the queries
whose own gradient or a candidate's is non-finite are dropped from the result and counted
(results.json -> ``nonfinite``). Commands that read finished runs (select, analyze, combine) refuse
arrays holding non-finite scores (``check_arrays``), which runs made before this check could hold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from gradsim.errors import GradsimError

log = logging.getLogger("gradsim")

ALLOW_HINT = "--allow-nonfinite drops such samples and counts them instead"


class NonFiniteError(GradsimError):
    """A gradient, feature or score that is NaN or inf: the run stops before writing any result."""


def likely_cause(model, dtype: str) -> str:
    """Why a value is likely non-finite: NaN/inf weights (named), bf16 overflow, or else an overflow or a
    tokenizer that does not fit the model."""
    if model is not None:
        import torch

        for name, p in model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                return f"the model's weights hold NaN or inf (parameter {name}): check or re-download the checkpoint"
    if dtype.startswith("bfloat16"):
        return f"likely an overflow in bfloat16 (--dtype {dtype}): rerun with --dtype float32"
    return (
        "likely an overflow (weights trained in fp16/bf16 with huge activations) or a tokenizer that does not "
        "fit the model (token ids beyond its embeddings): check the model and its tokenizer"
    )


def listed(names: Sequence[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more matrices" if len(names) > 1 else "")


class FiniteCheck:
    """A run's policy for non-finite values (``allow``: --allow-nonfinite) and what it met."""

    def __init__(self, allow: bool = False, model=None, dtype: str = "float32"):
        self.allow, self.model, self.dtype = allow, model, dtype
        self.seen: list[dict] = []  # with allow: each non-finite sample met in this process

    def bad(self, sample_id: str, role: str, what: str, matrices: Sequence[str]) -> None:
        """Report a non-finite ``what`` (gradient, features) of a sample: raise, or (allow) warn and count."""
        if not self.allow:
            raise NonFiniteError(
                f"the {what} of {role} {sample_id} {'are' if what.endswith('s') else 'is'} not finite (NaN or inf) "
                f"in {listed(matrices)}: "
                f"{likely_cause(self.model, self.dtype)}; no results were written ({ALLOW_HINT})"
            )
        log.warning(
            "--allow-nonfinite: the %s of %s %s is not finite in %s: the queries it takes part in are dropped",
            what,
            role,
            sample_id,
            listed(matrices),
        )
        self.seen.append({"id": sample_id, "role": role, "matrices": list(matrices)})

    def selfdots(self, names: Sequence[str], selfdots: np.ndarray, sample_id: str, role: str) -> bool:
        """Check an exact gradient by its (M,) per-matrix self-dots; whether it is finite."""
        ok = np.isfinite(selfdots)
        if ok.all():
            return True
        self.bad(sample_id, role, "gradient", [names[m] for m in np.flatnonzero(~ok)])
        return False

    def rows(self, layout, feats, ids: Sequence[str], role: str, what: str = "features") -> bool:
        """Check (n, D) features or gradients (a torch tensor) of the samples ``ids`` with one fused
        reduction; whether all are finite (the offending rows and matrices are looked for only when not)."""
        import torch

        if bool(torch.isfinite(feats).all()):
            return True
        for i, sample_id in enumerate(ids):
            bad = [n for n, lo, hi in layout.slices() if not bool(torch.isfinite(feats[i, lo:hi]).all())]
            if bad:
                self.bad(sample_id, role, what, bad)
        return False


def finite_queries(arrays: dict) -> np.ndarray:
    """(Q,) True where a query's dots and self-dots (its own and its candidates') are all finite."""

    def rows(a: np.ndarray) -> np.ndarray:
        return np.isfinite(a).reshape(a.shape[0], -1).all(1)

    return rows(arrays["dots"]) & rows(arrays["qself"]) & rows(arrays["cself"])


def dropped_record(arrays: dict, keep: np.ndarray, query_ids: list[str], cand_ids: list[list[str]]) -> dict:
    """What --allow-nonfinite dropped, from the arrays alone (so a resumed run counts what earlier attempts
    met): the queries, and which of them or of their candidate originals were not finite."""
    drop = np.flatnonzero(~keep)
    qbad = ~np.isfinite(arrays["qself"]).all(-1)
    cbad = ~np.isfinite(arrays["cself"]).all(-1)  # (Q, C)
    originals = sorted({cand_ids[k][c] for k in drop for c in np.flatnonzero(cbad[k])})
    return {
        "queries_dropped": int(len(drop)),
        "query_ids": [query_ids[k] for k in drop],
        "nonfinite_query_ids": [query_ids[k] for k in drop if qbad[k]],
        "nonfinite_original_ids": originals,
    }


def check_arrays(arrays, where: Path | str, what: str = "run") -> None:
    """Refuse stored scores (a scores.npz's dots, qself, cself) holding NaN or inf."""
    for k in ("dots", "qself", "cself"):
        a = np.asarray(arrays[k])
        if a.size and not np.isfinite(a).all():
            n = int(a.size - np.isfinite(a).sum())
            raise GradsimError(
                f"{where} holds {n} non-finite {k} (NaN or inf): this {what} ranked nothing real; rerun it with "
                "the current gradsim, which stops at the first non-finite gradient and names its cause"
            )
