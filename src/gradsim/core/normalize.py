"""Normalizers that remove what every sample's gradient shares, before gradients are compared.

- ``center``: subtract the corpus mean gradient (the mean over the originals). It is linear, so on
  sketched features it is exact to subtract the mean of the originals' sketches.
- ``unit``: scale each parameter matrix's slice to unit norm before the matrices are concatenated, so
  every matrix weighs the same in the whole-model cosine (which is then the mean of per-matrix cosines).
- ``adafactor``: divide each entry by the square root of a diagonal second moment estimated from the
  originals' gradients, row/column factored as in Adafactor (Shazeer & Stern, 2018) so that it costs
  O(rows + cols) per matrix: with R_i and C_j the mean over originals of the row and column sums of
  the squared gradient of an r x c matrix, and S = sum_i R_i, the estimate is V_ij = R_i C_j / S and
  the scale D_ij = sqrt(S) / sqrt((R_i + lam mean(R)) (C_j + lam mean(C))), with damping lam. A vector
  (a norm's weight, a bias) keeps its full second moment v: D = 1 / sqrt(v + lam mean(v)). TrackStar and
  Bergson take this from the optimizer's state; SFT checkpoints rarely ship it, so it is estimated.

Composed in that order where several are asked for: ``adafactor`` scales the gradient, ``center``
subtracts the originals' mean of what is then there, ``unit`` normalizes each matrix last.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gradsim.config import NORMALIZERS, Config
from gradsim.errors import GradsimError

DEFAULT_DAMPING = Config.damping  # --damping: one default, Config's


def parse_normalizer(name: str) -> tuple[str, ...]:
    if name not in NORMALIZERS:
        raise GradsimError(f"unknown normalizer {name!r}: choose from {', '.join(NORMALIZERS)}")
    return () if name == "none" else tuple(name.split("+"))


class FactoredSecondMoment:
    """Row and column sums of squared gradients per matrix (full squares for vectors), over samples."""

    def __init__(self, layout, damping: float = DEFAULT_DAMPING):
        self.layout, self.damping, self.count = layout, damping, 0
        self.sums = [
            (torch.zeros(shape[0], dtype=torch.float64), torch.zeros(math.prod(shape[1:]), dtype=torch.float64))
            if len(shape) >= 2
            else (torch.zeros(math.prod(shape), dtype=torch.float64), None)
            for shape in layout.shapes
        ]
        self.scales: list | None = None

    def add(self, g: torch.Tensor) -> None:
        """Accumulate one sample's flat gradient."""
        for (_, lo, hi), shape, (rows, cols) in zip(self.layout.slices(), self.layout.shapes, self.sums):
            sq = g[lo:hi].float().square()
            if cols is None:
                rows += sq.double().cpu()
            else:
                sq = sq.view(shape[0], -1)
                rows += sq.sum(1).double().cpu()
                cols += sq.sum(0).double().cpu()
        self.count += 1
        self.scales = None

    def finish(self, device) -> None:
        """The per-matrix scales (row and column factors) from what was accumulated."""
        if self.count < 2:
            raise GradsimError(
                f"the adafactor normalizer is estimated from the originals' gradients: {self.count} is too few, "
                "give at least 2 originals"
            )
        lam = self.damping
        self.scales = []
        for rows, cols in self.sums:
            r = rows / self.count
            if cols is None:
                self.scales.append(((r + lam * r.mean()).rsqrt().float().to(device), None))
                continue
            c = cols / self.count
            total = r.sum()
            a = (r + lam * r.mean()).rsqrt() * total.sqrt()
            b = (c + lam * c.mean()).rsqrt()
            self.scales.append((a.float().to(device), b.float().to(device)))

    def apply_(self, g: torch.Tensor) -> torch.Tensor:
        """Scale the flat gradient g in place by D (module docstring)."""
        if self.scales is None:
            raise RuntimeError("FactoredSecondMoment.finish() must run before apply_()")
        for (_, lo, hi), shape, (a, b) in zip(self.layout.slices(), self.layout.shapes, self.scales):
            if b is None:
                g[lo:hi].mul_(a)
            else:
                view = g[lo:hi].view(shape[0], -1)
                view.mul_(a[:, None]).mul_(b[None, :])
        return g

    def to_dict(self) -> dict:
        return {"count": self.count, "damping": self.damping, "rule": "Adafactor row/column factored (normalize.py)"}


def normalized_features(feats: np.ndarray, mean: np.ndarray | None, slices, unit: bool) -> np.ndarray:
    """(n, D) fp32 features centred by ``mean`` (the originals' mean; None: not centred) and, with unit,
    each matrix's slice scaled to unit norm (a zero slice stays zero)."""
    out = feats - mean if mean is not None else feats.copy()
    if unit:
        for lo, hi in slices:
            norm = np.linalg.norm(out[:, lo:hi], axis=1, keepdims=True)
            out[:, lo:hi] /= np.where(norm > 0, norm, 1.0)
    return out


def cosine_matrix(q: np.ndarray, o: np.ndarray) -> np.ndarray:
    """(nq, no) cosine of every query row with every original row, in float64."""
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
    on = o / np.maximum(np.linalg.norm(o, axis=1, keepdims=True), 1e-300)
    return qn.astype(np.float64) @ on.astype(np.float64).T


class GradientNormalizer:
    """A normalizer applied in place to each flat gradient right after its backward pass (so the exact
    path, countsketch and trak, which all form the flat gradient, compare normalized gradients).

    Estimated from the originals in one pass: the mean gradient and the factored second moment. The mean
    of the scaled gradients is D * mean (D is a fixed elementwise scale), so one pass serves both."""

    def __init__(self, normalizer: str, layout, damping: float = DEFAULT_DAMPING):
        self.name, self.steps, self.layout, self.damping = normalizer, parse_normalizer(normalizer), layout, damping
        self.mean: torch.Tensor | None = None
        self.moment = FactoredSecondMoment(layout, damping) if "adafactor" in self.steps else None
        self.count = 0

    def estimate(self, gradients, device) -> None:
        """One pass over the originals' flat gradients (an iterable of reused buffers)."""
        total = None
        for g in gradients:
            if "center" in self.steps:
                total = g.float().clone() if total is None else total.add_(g)
            if self.moment is not None:
                self.moment.add(g)
            self.count += 1
        if self.count < 2:
            raise GradsimError(
                f"--normalize {self.name} is estimated from the originals' gradients: {self.count} is too few, "
                "give at least 2 originals"
            )
        if self.moment is not None:
            self.moment.finish(device)
        if total is not None:
            self.mean = total.div_(self.count)
            if self.moment is not None:
                self.moment.apply_(self.mean)

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        if self.moment is not None:
            self.moment.apply_(g)
        if self.mean is not None:
            g.sub_(self.mean.to(g.dtype))
        if "unit" in self.steps:
            for _, lo, hi in self.layout.slices():
                norm = g[lo:hi].float().norm()
                if norm > 0:
                    g[lo:hi].div_(norm)
        return g

    def state(self) -> dict[str, np.ndarray]:
        """What a later process needs to apply it (saved beside the feature stores)."""
        out = {"count": np.array(self.count)}
        if self.mean is not None:
            out["mean"] = self.mean.cpu().numpy()
        if self.moment is not None:
            for m, (a, b) in enumerate(self.moment.scales):
                out[f"a{m}"] = a.cpu().numpy()
                if b is not None:
                    out[f"b{m}"] = b.cpu().numpy()
        return out

    def load(self, state, device) -> None:
        self.count = int(state["count"])
        if "center" in self.steps:
            self.mean = torch.from_numpy(np.array(state["mean"])).to(device)
        if self.moment is not None:
            self.moment.count = self.count
            self.moment.scales = [
                (
                    torch.from_numpy(np.array(state[f"a{m}"])).to(device),
                    torch.from_numpy(np.array(state[f"b{m}"])).to(device) if f"b{m}" in state else None,
                )
                for m in range(len(self.layout.names))
            ]

    def to_dict(self) -> dict:
        return {
            "normalizer": self.name,
            "order": "adafactor, then center, then unit",
            "damping": self.damping if self.moment is not None else None,
            "estimated_from": f"{self.count} originals",
        }
