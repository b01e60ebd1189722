"""tensorsketch (the default): countsketch's dims, allocation and fidelity, without the exact gradient. Matrix
entry (i, j) goes, with sign s_r(i) s_c(j), into bucket (h_r(i) + h_c(j)) mod k_m (hashes and signs
uniform from the seed). That sketch is linear, and of one token's outer product g_t x_t^T it is the
circular convolution of the CountSketches CS_r(g_t) and CS_c(x_t) (Pham & Pagh's TensorSketch), so
    sketch(grad W) = irfft( sum_t rfft(CS_r(g_t)) * rfft(CS_c(x_t)) )
is formed in the hooks from the layer's input and output gradient in O(T (d_in + d_out + k log k)),
and the backward skips every weight-gradient matmul as factorized does. Its inner products are unbiased
with a variance within a small constant of CountSketch's (measured on LIMA gradients: whole-model cosine
error 0.0027 against countsketch's 0.0025 at 65,536 dims), far below the Kronecker sketch's. The tied
embedding's two uses, norm weights (CountSketched or exact) and padding_idx follow the factorized rules;
sketch sizes are rounded down to 2-3-5-smooth numbers, which the FFT is fast on. The FFT's cost grows with
k_m and the direct way's (form the weight gradient, add each entry into its bucket) with the matrix's
entries, so a matrix whose k_m exceeds 1/DIRECT_RATIO of its entries is sketched directly: the same sketch
(same hashes and signs, equal up to float rounding), chosen from the matrix's shape and k_m alone, so a
matrix is sketched the same way in every run (measured in bench/bench_tensorsketch.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from gradsim.core.projection.allocation import CalibratedSketch
from gradsim.core.projection.buckets import Buckets, bucket_sum, ordered_sums
from gradsim.core.projection.common import stable_seed, trainable
from gradsim.core.projection.factorized import FactorizedFeaturizer, Slot
from gradsim.errors import GradsimError


def _count_sketch(a: torch.Tensor, h2: Buckets, k: int) -> torch.Tensor:
    """(..., d) -> (..., k) fp32: entry i of the last axis added into bucket h2[i] mod k, negated where
    h2[i] >= k (the sign folded into the index: two half-sketches subtracted, no multiply per entry)."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        both = h2.sum(a.float())
        return both[..., :k] - both[..., k:]


def _signed_hash(n: int, k: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor, Buckets]:
    """(bucket in [0, k), sign +-1 fp32, the 2k Buckets of bucket + k where the sign is -1) for n entries;
    bucket and sign drawn in that order from gen."""
    h = torch.randint(0, k, (n,), generator=gen)
    s = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    return h.to(device), s.to(device), Buckets((h + k * (s < 0)).to(device), 2 * k)


# A matrix is TensorSketched directly (weight gradient, then each entry into its bucket) when its k exceeds
# 1/DIRECT_RATIO of its entries: measured on one core of the 2-core EPYC VM at 300 tokens, the FFT way costs
# 0.3-0.9 ms up to k = 1,024, 5-9 ms at 4,096 and 40-53 ms at 16,384 (192-1,536 x 576 matrices), the direct
# way 1.0, 3.0 and 12 ms for 110k, 331k and 885k entries whatever k is.
DIRECT_RATIO = 128


def weight_gradient(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) fp32 sum over tokens of left_t^T right_t: a linear layer's per-sample weight gradient."""
    with torch.autocast(device_type=left.device.type, enabled=False):
        return torch.bmm(left.float().transpose(1, 2), right.float())


class _TensorSketchSlot:
    """A (rows x cols) matrix TensorSketched to k dims (module docstring). Either in the Fourier domain:
    rows and cols sides are rfft'd CountSketches and add_outer sums their products; or, where k is large
    for the matrix (``direct``), from the weight gradient: add_outer forms it and add_gradient adds each
    entry into its bucket. Both give the same sketch."""

    def __init__(self, name, shape, k: int, seed: int, device):
        self.name, self.shape, self.size = name, shape, k
        gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, f"{name}:tensorsketch"))
        self.h_rows, self.s_rows, self.h2_rows = _signed_hash(shape[0], k, gen, device)
        self.h_cols, self.s_cols, self.h2_cols = _signed_hash(shape[1], k, gen, device)
        self.direct = k * DIRECT_RATIO > shape[0] * shape[1]
        self.buckets: Optional[Buckets] = None  # add_gradient's on CUDA, made on first use

    def project_rows(self, g: torch.Tensor) -> torch.Tensor:
        if self.direct:
            return g
        return torch.fft.rfft(_count_sketch(g, self.h2_rows, self.size), dim=-1)

    def project_cols(self, x: torch.Tensor) -> torch.Tensor:
        if self.direct:
            return x
        return torch.fft.rfft(_count_sketch(x, self.h2_cols, self.size), dim=-1)

    def add_gradient(self, out: torch.Tensor, grad: torch.Tensor) -> None:
        """out[:, slice] += the sketch of each sample's weight gradient grad (B, rows, cols) fp32."""
        signed = grad * (self.s_rows[:, None] * self.s_cols[None, :])
        if ordered_sums(grad):  # in a fixed order (Buckets), built once per matrix
            if self.buckets is None:
                self.buckets = Buckets(self.bucket_index(), self.size)
            out[:, self.lo : self.lo + self.size] += self.buckets.sum(signed.flatten(1))
            return
        out[:, self.lo : self.lo + self.size].index_add_(1, self.bucket_index(), signed.flatten(1))

    def bucket_index(self) -> torch.Tensor:
        """Each weight entry's bucket, (h_rows[i] + h_cols[j]) mod k, row-major."""
        bucket = self.h_rows[:, None] + self.h_cols[None, :]
        return torch.where(bucket >= self.size, bucket - self.size, bucket).flatten()

    def add_embedding(
        self, out: torch.Tensor, tok: torch.Tensor, keep: torch.Tensor, g: torch.Tensor, num_embeddings: int
    ) -> None:
        """One row per token: scattered straight into the buckets, no FFT (B x T x d adds)."""
        with torch.autocast(device_type=g.device.type, enabled=False):
            bucket = (self.h_rows[tok].unsqueeze(-1) + self.h_cols) % self.size  # (B, T, d)
            vals = g.float() * (self.s_rows[tok] * keep).unsqueeze(-1) * self.s_cols
            if ordered_sums(g):
                out[:, self.lo : self.lo + self.size] += bucket_sum(vals.flatten(1), bucket.flatten(1), self.size)
            else:
                out[:, self.lo : self.lo + self.size].scatter_add_(1, bucket.flatten(1), vals.flatten(1))

    def add_outer(self, out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        if self.direct:
            self.add_gradient(out, weight_gradient(left, right))
        else:
            out[:, self.lo : self.lo + self.size] += torch.fft.irfft((left * right).sum(1), n=self.size, dim=-1)


class _VectorSketchSlot:
    """A vector parameter (a norm weight) CountSketched to k dims."""

    def __init__(self, name, shape, k: int, seed: int, device):
        self.name, self.shape, self.size = name, shape, k
        gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, f"{name}:tensorsketch"))
        self.h, self.s, self.h2 = _signed_hash(shape[0], k, gen, device)

    def add_vector(self, out: torch.Tensor, v: torch.Tensor) -> None:
        out[:, self.lo : self.lo + self.size] += _count_sketch(v, self.h2, self.size)


class TensorSketchFeaturizer(CalibratedSketch, FactorizedFeaturizer):
    """countsketch's dims and allocation, formed in the hooks without the exact gradient (module docstring).
    The hooks and batching are FactorizedFeaturizer's; its constructor is not used."""

    kind = "tensorsketch"
    fit = "fft"
    sketch_rule = (
        "TensorSketch per matrix: (i, j) -> bucket (h_r(i) + h_c(j)) mod k_m, sign "
        "s_r(i) s_c(j); h_r, s_r, h_c, s_c drawn in that order from seed(name + ':tensorsketch')"
    )

    def _build(self, model, device, dtype, seed, batch_size, allocation) -> None:
        slots = []
        for (name, shape), k in zip(zip(*trainable(model)), allocation["dims"]):
            if k >= math.prod(shape):
                slots.append(Slot(name, shape, None, None))
            elif len(shape) == 2:
                slots.append(_TensorSketchSlot(name, shape, int(k), seed, device))
            elif len(shape) == 1:
                slots.append(_VectorSketchSlot(name, shape, int(k), seed, device))
            else:
                raise GradsimError(
                    f"parameter {name} has shape {shape}: the tensorsketch projection handles matrices "
                    "and vectors only; use --projection countsketch"
                )
        self._attach(model, device, dtype, batch_size, slots)
        self.exact = [isinstance(s, Slot) for s in slots]
