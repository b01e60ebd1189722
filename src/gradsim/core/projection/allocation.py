"""How countsketch and tensorsketch share --proj-dim among the matrices: calibration (each matrix's share of
the squared gradient norm on the first CALIBRATION_SAMPLES originals), the allocation rules (--allocation),
sizes fitted to each sketch, and CalibratedSketch, the featurizers' common base."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from torch import nn

from gradsim.core.finite import FiniteCheck
from gradsim.core.gradients import GradientComputer
from gradsim.core.projection.common import SEED_RULE, trainable
from gradsim.data.encode import Encoded
from gradsim.errors import GradsimError
from gradsim.io import json_sha256

CALIBRATION_SAMPLES = 8
SHARE_MIX = 0.9  # allocation weight: 0.9 x squared-norm share + 0.1 x share of entries


def smooth_at_most(k: int) -> int:
    """The largest 2^a 3^b 5^c <= k (an FFT size pocketfft is fast on; a prime size is ~6x slower)."""
    best, p2 = 1, 1
    while p2 <= k:
        p3 = p2
        while p3 <= k:
            p5 = p3
            while p5 <= k:
                best, p5 = max(best, p5), p5 * 5
            p3 *= 3
        p2 *= 2
    return best


# How --proj-dim is shared among the matrices (--allocation; config.ALLOCATIONS). Each rule gives every
# matrix a weight, dims go in proportion to it, water-filled (a matrix offered at least its number of entries
# is kept exact and the rest is shared again); norm-floor also gives every sketched matrix at least
# FLOOR_FRACTION x total / number of matrices (or all its entries, when fewer).
ALLOCATION_WEIGHTS = {
    "norm": f"{SHARE_MIX} x squared-norm share + {1 - SHARE_MIX:.1f} x share of entries",
    "norm-floor": f"{SHARE_MIX} x squared-norm share + {1 - SHARE_MIX:.1f} x share of entries",
    "sqrt": "square root of the number of entries",
    "uniform": "equal",
}
FLOOR_FRACTION = 0.5


def allocation_floor(rule: str, total: int, num_matrices: int) -> int:
    """The fewest dims a sketched matrix gets under ``rule`` before fitting (0: no floor)."""
    return int(FLOOR_FRACTION * total / max(num_matrices, 1)) if rule == "norm-floor" else 0


def allocation_weights(rule: str, shares: np.ndarray, numel: np.ndarray) -> np.ndarray:
    if rule in ("norm", "norm-floor"):
        shares = np.asarray(shares, dtype=np.float64)
        return SHARE_MIX * shares / max(shares.sum(), 1e-300) + (1 - SHARE_MIX) * numel / numel.sum()
    if rule == "sqrt":
        return np.sqrt(numel)
    if rule == "uniform":
        return np.ones_like(numel)
    raise GradsimError(f"unknown --allocation {rule!r}: choose one of {', '.join(ALLOCATION_WEIGHTS)}")


def allocate_dims(
    shares: np.ndarray, shapes: list[tuple[int, ...]], total: int, fit: str = "coprime", rule: str = "norm"
) -> np.ndarray:
    """Dims per matrix for a sketch of `total` dims, in proportion to the weights of ``rule`` (norm: `shares`
    mixed with the matrices' shares of entries), water-filled: a matrix offered at least its number of entries
    is kept exact and the rest is shared again. Under norm-floor a matrix offered less than the floor (fitted
    up, at most its entries) is pinned there and the rest is shared again. Sketched sizes are then lowered to
    fit the sketch: coprime to the matrix's sides (countsketch's mod-k buckets) or 2-3-5-smooth (tensorsketch's
    FFTs); a pinned floor is already such a size, so a fitted size never falls below it."""
    numel = np.array([math.prod(s) for s in shapes], dtype=np.float64)
    w = allocation_weights(rule, shares, numel)
    floor_at = allocation_floor(rule, total, len(shapes))
    floor = np.array([min(int(n), fitted_up(floor_at, s, fit)) if floor_at else 0 for n, s in zip(numel, shapes)])
    k = np.zeros(len(shapes), dtype=np.int64)
    active = np.ones(len(shapes), dtype=bool)
    budget = float(total)
    while active.any():
        offer = np.maximum(1.0, np.floor(budget * w / w[active].sum()))
        full = active & (offer >= numel)
        if full.any():
            k[full] = numel[full].astype(np.int64)
            budget -= numel[full].sum()
            active &= ~full
            continue
        low = active & (offer < floor)
        if not low.any():
            k[active] = offer[active].astype(np.int64)
            break
        k[low] = floor[low]
        budget -= floor[low].sum()
        active &= ~low
    if budget < 0:
        raise GradsimError(f"--proj-dim {total} is too small for --allocation {rule}'s floor of {floor_at} dims")
    for m, shape in enumerate(shapes):
        if k[m] < numel[m]:
            k[m] = fitted_dims(int(k[m]), shape, fit)
    return k


def fitted_up(k: int, shape: tuple[int, ...], fit: str) -> int:
    """The smallest size >= k a sketch of this matrix can use (see fitted_dims)."""
    while fitted_dims(k, shape, fit) != k:
        k += 1
    return k


def fitted_dims(k: int, shape: tuple[int, ...], fit: str) -> int:
    """The largest size <= k a sketch of this matrix can use: coprime to its sides (countsketch's mod-k
    buckets) or 2-3-5-smooth (tensorsketch's FFTs)."""
    if fit == "fft":
        return smooth_at_most(k)
    while k > 1 and any(math.gcd(k, d) != 1 for d in shape):
        k -= 1
    return k


def calibration_shares(model: nn.Module, device, dtype: str, encs: list[Encoded]) -> tuple[list[str], np.ndarray]:
    """Each matrix's mean share of the squared per-sample gradient norm over encs (exact gradients).

    The parameters' .grad are released afterwards: they are views into the computer's full-size buffer,
    which would otherwise stay allocated for the rest of the run (tensorsketch never needs it)."""
    gc = GradientComputer(model, device, dtype)
    shares = np.zeros(len(gc.layout.names))
    try:
        for enc in encs:
            g = gc.gradient(enc)
            sq = np.array([float(g[lo:hi].double().pow(2).sum()) for _, lo, hi in gc.layout.slices()])
            FiniteCheck(model=model, dtype=dtype).selfdots(gc.layout.names, sq, enc.id, "calibration original")
            shares += sq / max(sq.sum(), 1e-300)
    finally:
        gc.release()
    return gc.layout.names, shares / max(len(encs), 1)


def make_allocation(
    model: nn.Module,
    device,
    dtype: str,
    total: int,
    calibration: list[Encoded],
    fit: str = "coprime",
    rule: str = "norm",
) -> dict:
    if not calibration:
        raise GradsimError("the sketch projections need calibration samples (the first originals): none given")
    names, shares = calibration_shares(model, device, dtype, calibration)
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad]
    return allocation_from_shares(names, shapes, shares, total, [e.id for e in calibration], fit, rule)


def allocation_from_shares(
    names: list[str],
    shapes: list[tuple[int, ...]],
    shares,
    total: int,
    calibration_ids: list[str],
    fit: str = "coprime",
    rule: str = "norm",
) -> dict:
    """The allocation of make_allocation from the calibration's norm shares (one calibration serves every
    rule and size)."""
    shares = [float(f"{x:.6g}") for x in shares]  # what is stored is what every process uses
    dims = allocate_dims(np.array(shares), shapes, total, fit, rule)
    lowered = "to coprime with the matrix's sides" if fit == "coprime" else "to 2-3-5-smooth sizes"
    floor = allocation_floor(rule, total, len(shapes))
    floored = (
        f", every matrix at least {floor} dims ({FLOOR_FRACTION} x total / {len(shapes)} matrices, fitted up; "
        "all its entries when fewer)"
        if floor
        else ""
    )
    return {
        "total": total,
        "calibration_ids": list(calibration_ids),
        "names": list(names),
        "fit": fit,
        "allocation": rule,
        "floor": floor,
        "shares": shares,
        "dims": [int(d) for d in dims],
        "rule": f"{ALLOCATION_WEIGHTS[rule]}, water-filled{floored}, lowered {lowered}",
    }


def checked_allocation(
    kind: str,
    model: nn.Module,
    device,
    dtype: str,
    proj_dim: int,
    fit: str,
    allocation: Optional[dict],
    calibration: Optional[list[Encoded]],
    rule: str = "norm",
) -> dict:
    """The given allocation, or a new one from calibration; refused if made for another model, size or rule."""
    if allocation is None:
        if not calibration:
            raise GradsimError(f"the {kind} projection needs calibration samples or an allocation")
        allocation = make_allocation(model, device, dtype, proj_dim, calibration, fit, rule)
    if (
        allocation["names"] != trainable(model)[0]
        or allocation["total"] != proj_dim
        or allocation.get("fit", "coprime") != fit
        or allocation.get("allocation", "norm") != rule
    ):
        raise GradsimError(
            f"the {kind} allocation was made for another model, --proj-dim, projection or --allocation: delete "
            f"features/{kind}-allocations/ under the output dir to recalibrate"
        )
    return allocation


class CalibratedSketch:
    """What countsketch and tensorsketch share: each matrix's dims from a calibrated allocation of
    --proj-dim (given, or made from the calibration samples), and a spec naming all that decides the numbers.
    A subclass builds itself in _build() and sets ``layout`` and ``exact`` (the matrices kept unsketched)."""

    kind: str
    fit: str  # how the allocation's sizes are fitted (make_allocation)
    sketch_rule: str  # how a matrix is sketched, for the spec

    def __init__(
        self,
        model: nn.Module,
        device,
        dtype: str = "float32",
        proj_dim: int = 65536,
        seed: int = 42,
        batch_size: int = 1,
        allocation: Optional[dict] = None,
        calibration: Optional[list[Encoded]] = None,
        rule: str = "norm",
        **options,
    ):
        allocation = self.allocation = checked_allocation(
            self.kind, model, device, dtype, proj_dim, self.fit, allocation, calibration, rule
        )
        self._build(model, device, dtype, seed, batch_size, allocation, **options)
        self.spec = {
            "kind": self.kind,
            "proj_dim": proj_dim,
            "seed": seed,
            "seed_rule": SEED_RULE,
            "sketch": self.sketch_rule,
            "dims": int(self.layout.total),
            "exact_matrices": int(sum(self.exact)),
            "allocation_sha256": json_sha256(allocation),
            "calibration_ids": allocation["calibration_ids"],
        }

    def _build(self, model: nn.Module, device, dtype: str, seed: int, batch_size: int, allocation: dict) -> None:
        raise NotImplementedError
