"""Projected per-sample gradients: deterministic random sketches, per parameter matrix.

Every parameter matrix keeps its own slice of the feature vector (so per-matrix, per-component and
per-layer scores work as for exact gradients), and every random matrix is seeded from
sha256(f"{seed}:{name}"), never Python's salted hash(): partitions, processes and machines build
bit-identical sketches (generated on the CPU, whose generator does not depend on the device).

factorized (LoGra): a linear layer y = x W^T has the per-sample gradient grad W = G^T X (G = dL/dy,
T x d_out; X: T x d_in). With Gaussian sketches R_rows (d_out x k_rows) and R_cols (d_in x k_cols),
each scaled by 1/sqrt(k) so norms are preserved in expectation,
    R_rows^T grad W R_cols = (G R_rows)^T (X R_cols) = reshape((R_rows kron R_cols)^T vec(grad W)),
formed from two thin products inside forward/backward hooks; grad W is never materialised and the
backward skips every weight-gradient matmul (about a third of its FLOPs). G comes from the loss as
it is (a mean over the sample's trained tokens), so the features have the exact gradient's scale.
The other parameters:
  - the input embedding (E, V x d) gets sum_t onehot(id_t) g_t^T, i.e. R_rows[id_t]^T (g_t R_cols)
    projected, skipping the padding_idx token as nn.Embedding does (SmolLM2: padding_idx 2 is
    <|im_end|>, a real token). A tied lm_head is the same Parameter: both uses add into one slice,
    with the vocabulary as rows, exactly as the exact gradient sums them;
  - RMSNorm / LayerNorm weights (and biases, and Linear biases) are vectors: their per-sample
    gradient sum_t g_t * norm(x_t) is formed in the hook and kept exact when it has at most
    proj_dim entries, else JL-projected with a dense Gaussian sketch;
  - a side whose dimension is at most its sketch size is kept exact (identity), so small matrices
    are not blown up by a projection.
trak: the exact per-sample gradient (one backward per sample), then the traker package's projector
per parameter matrix (CudaProjector on CUDA when fast_jl is installed, else BasicProjector); matrices
with at most proj_dim entries are kept exact.
countsketch: the exact per-sample gradient, then per parameter matrix a CountSketch
(a sparse JL transform with one nonzero per column): every entry gets a random sign and is added into
bucket (flat index mod k_m), with k_m coprime to both sides of the matrix so that a heavy row or column
is spread over all buckets. It costs one multiply-add per gradient entry (about 3% of the backward on
a CPU) and, unlike the Kronecker sketch, its variance is that of an i.i.d. JL sketch of k_m dims:
Var <Sa, Sb> <= (|a|^2 |b|^2 + <a,b>^2) / k_m. --proj-dim is the total number of dims, shared out in
proportion to each matrix's share of the squared gradient norm, measured on the first
CALIBRATION_SAMPLES originals (mixed 9:1 with its share of entries, so no matrix gets none); a matrix
offered at least as many dims as it has entries is kept exact (RMSNorm weights usually are). The
allocation is written once (exclusive create) and reused by every later process and partition.
tensorsketch (the default): countsketch's dims, allocation and fidelity, without the exact gradient. Matrix
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

import hashlib
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradsim.core.finite import FiniteCheck
from gradsim.core.gradients import GradientComputer, ParamLayout, batch_loss, param_layout
from gradsim.data.encode import IGNORE_INDEX, Encoded
from gradsim.errors import GradsimError
from gradsim.io import json_sha256, load_or_create_json

SEED_RULE = "int.from_bytes(sha256(f'{seed}:{name}').digest()[:8], 'big') >> 1"


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name) that is the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1


def gaussian_sketch(rows: int, cols: int, seed: int, name: str) -> torch.Tensor:
    """(rows, cols) N(0, 1/cols) on the CPU: E ||v @ R||^2 = ||v||^2."""
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, name))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32) / math.sqrt(cols)


def split_dim(k: int) -> tuple[int, int]:
    """(k_rows, k_cols) with k_rows * k_cols = k, as square as k allows (4096 -> 64 x 64)."""
    k_cols = next(d for d in range(math.isqrt(k), k + 1) if k % d == 0 and d * d >= k)
    return k // k_cols, k_cols


def layout_from_sizes(names: list[str], shapes: list[tuple[int, ...]], sizes: list[int]) -> ParamLayout:
    return ParamLayout(list(names), list(shapes), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def pad_batch(encs: list[Encoded], device) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Right-padded ids, labels (-100 on padding) and an attention mask (None for a batch of one)."""
    t = max(e.num_tokens for e in encs)
    ids = torch.zeros(len(encs), t, dtype=torch.long)
    labels = torch.full((len(encs), t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(encs), t, dtype=torch.long)
    for b, e in enumerate(encs):
        ids[b, : e.num_tokens], labels[b, : e.num_tokens], mask[b, : e.num_tokens] = e.input_ids, e.labels, 1
    return ids.to(device), labels.to(device), (mask.to(device) if len(encs) > 1 else None)


class _Slot:
    """One parameter's slice of the feature vector and its sketches (None: that side kept exact).

    The hooks see a slot through project_rows (output gradients), project_cols (layer inputs),
    add_outer, add_embedding and add_vector; lo is set once slots are laid out."""

    lo = 0

    def __init__(self, name, shape, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]):
        self.name, self.shape = name, shape
        self.rows, self.cols = rows, cols
        if len(shape) == 2:
            self.size = (shape[0] if rows is None else rows.shape[1]) * (shape[1] if cols is None else cols.shape[1])
        else:
            self.size = shape[0] if cols is None else cols.shape[1]

    def add_outer(self, out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """out[:, slice] += vec(left^T right) per sample; left is (B, T, rows or k_rows), right (B, T, cols or
        k_cols)."""
        out[:, self.lo : self.lo + self.size] += torch.bmm(left.transpose(1, 2), right).flatten(1)

    def add_vector(self, out: torch.Tensor, v: torch.Tensor) -> None:
        out[:, self.lo : self.lo + self.size] += v if self.cols is None else v @ self.cols

    def project_rows(self, g: torch.Tensor) -> torch.Tensor:
        return _fp32_product(g, self.rows)

    def project_cols(self, x: torch.Tensor) -> torch.Tensor:
        return _fp32_product(x, self.cols)

    def add_embedding(
        self, out: torch.Tensor, tok: torch.Tensor, keep: torch.Tensor, g: torch.Tensor, num_embeddings: int
    ) -> None:
        """An embedding's sum_t onehot(id_t) g_t^T (tokens where keep is False left out)."""
        left = self.rows[tok] if self.rows is not None else F.one_hot(tok, num_embeddings).float()
        self.add_outer(out, left * keep.unsqueeze(-1), self.project_cols(g))


def ordered_sums(t: torch.Tensor) -> bool:
    """Whether sums into buckets take the sorted way (Buckets) for t's device: on CUDA."""
    return t.device.type == "cuda"


class Buckets:
    """Sums into ``size`` buckets along the last axis, entry i into bucket ``index[i]``, with the same bytes on
    every run. On the CPU a scatter-add (its kernel adds in order); on CUDA a scatter-add's atomic adds land in
    an order that varies between runs, and so does the rounding: there the entries are sorted by bucket once
    (the index is fixed) and each bucket is the difference of a float64 prefix sum at its two ends."""

    def __init__(self, index: torch.Tensor, size: int):
        self.index, self.size = index, size
        self._order: Optional[torch.Tensor] = None
        self._ends: Optional[torch.Tensor] = None

    def sum(self, a: torch.Tensor, ordered: Optional[bool] = None) -> torch.Tensor:
        """(..., n) -> (..., size) in a's dtype; ``ordered`` (default: on CUDA) takes the sorted way."""
        if not (ordered_sums(a) if ordered is None else ordered):
            return a.new_zeros(*a.shape[:-1], self.size).scatter_add_(-1, self.index.expand(a.shape), a)
        if self._order is None:
            self._order, self._ends = sorted_segments(self.index, self.size)
        return segment_sums(a, self._order, self._ends)


def sorted_segments(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, ends): the positions of a 1-D index sorted by bucket (stable), and where each bucket's run ends
    in that order (size + 1 entries, the first 0)."""
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=size)  # integer adds: exact in any order
    ends = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return order, ends


def segment_sums(a: torch.Tensor, order: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (..., len(ends) - 1): per bucket, the sum of a's entries at order[ends[b]:ends[b+1]]. A fixed
    order of float64 adds (a prefix sum): deterministic on every device, and within fp32 rounding of any other
    order (a prefix of n entries carries at most n * 2^-53 of their magnitude)."""
    prefix = torch.nn.functional.pad(a.index_select(-1, order).double().cumsum(-1), (1, 0))
    return (prefix[..., ends[1:]] - prefix[..., ends[:-1]]).to(a.dtype)


def bucket_sum(a: torch.Tensor, index: torch.Tensor, size: int, ordered: Optional[bool] = None) -> torch.Tensor:
    """(B, n) values into (B, size) buckets by a per-row index (B, n) of their own (Buckets, for one call)."""
    if not (ordered_sums(a) if ordered is None else ordered):
        return a.new_zeros(a.shape[0], size).scatter_add_(1, index, a)
    rows = torch.arange(a.shape[0], device=a.device).unsqueeze(1) * size
    flat = Buckets((index + rows).flatten(), a.shape[0] * size).sum(a.flatten(), ordered=True)
    return flat.view(a.shape[0], size)


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


def _fp32_product(a: torch.Tensor, sketch: Optional[torch.Tensor]) -> torch.Tensor:
    # Sketches stay fp32 under bf16 autocast: the projection is cheap and its rounding would add to bf16's.
    if sketch is None:
        return a.float()
    with torch.autocast(device_type=a.device.type, enabled=False):
        return a.float() @ sketch


def _tokens(a: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, N, d): every position between the batch and the last axis contributes to the
    weight gradient (Qwen3's and Gemma 3's q/k norms see (B, T, heads, head_dim), or (B, heads, T, head_dim))."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _trainable(model: nn.Module) -> tuple[list[str], list[tuple[int, ...]]]:
    full = param_layout(model)
    return full.names, full.shapes


def _is_rmsnorm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        isinstance(w, nn.Parameter)
        and w.dim() == 1
        and "rmsnorm" in type(m).__name__.lower()
        and (hasattr(m, "variance_epsilon") or hasattr(m, "eps"))
    )


class FactorizedFeaturizer:
    """LoGra-style projected per-sample gradients from forward/backward hooks (see the module docstring)."""

    kind = "factorized"

    def __init__(self, model: nn.Module, device, dtype="float32", proj_dim=4096, seed=42, batch_size=1):
        k_rows, k_cols = split_dim(proj_dim)
        slots = []
        for name, shape in zip(*_trainable(model)):
            if len(shape) == 2:
                rows = gaussian_sketch(shape[0], k_rows, seed, f"{name}:rows").to(device) if shape[0] > k_rows else None
                cols = gaussian_sketch(shape[1], k_cols, seed, f"{name}:cols").to(device) if shape[1] > k_cols else None
            elif len(shape) == 1:
                rows = None
                cols = gaussian_sketch(shape[0], proj_dim, seed, name).to(device) if shape[0] > proj_dim else None
            else:
                raise GradsimError(
                    f"parameter {name} has shape {shape}: the factorized projection handles matrices "
                    "and vectors only; use --projection trak"
                )
            slots.append(_Slot(name, shape, rows, cols))
        self._attach(model, device, dtype, batch_size, slots)
        self.spec = {
            "kind": self.kind,
            "proj_dim": proj_dim,
            "k_rows": k_rows,
            "k_cols": k_cols,
            "seed": seed,
            "seed_rule": SEED_RULE,
            "sketch": "gaussian N(0, 1/k), rows and cols sketched separately",
            "dims": int(self.layout.total),
        }

    def _attach(self, model: nn.Module, device, dtype: str, batch_size: int, slots: list) -> None:
        """Lay the slots out in parameter order and find the modules whose hooks fill them."""
        self.model, self.device, self.dtype, self.batch_size = model, device, dtype, batch_size
        self.backward_passes = 0
        by_id = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        self.slots = {s.name: s for s in slots}
        self.layout = layout_from_sizes([s.name for s in slots], [s.shape for s in slots], [s.size for s in slots])
        for s, (_, lo, _hi) in zip(slots, self.layout.slices()):
            s.lo = lo
        self.modules = []
        covered = set()
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)) or _is_rmsnorm(m):
                own = [
                    id(p)
                    for p in (getattr(m, "weight", None), getattr(m, "bias", None))
                    if isinstance(p, nn.Parameter) and id(p) in by_id
                ]
                if not own:  # nothing to train (OLMo's LayerNorm has no parameters, or a frozen layer): no hook
                    continue
                if (
                    isinstance(m, nn.Embedding)
                    and type(m).forward is not nn.Embedding.forward
                    and not hasattr(m, "embed_scale")
                ):
                    # The hook takes the module's output to be the looked-up rows (times Gemma's embed_scale).
                    raise GradsimError(
                        f"the {self.kind} projection has no rule for the embedding "
                        f"{type(m).__name__}: use --projection trak"
                    )
                covered.update(own)
                self.modules.append(m)
        missing = [n for i, n in by_id.items() if i not in covered]
        if missing:
            raise GradsimError(
                f"the {self.kind} projection has no rule for {', '.join(missing[:5])}: use --projection trak"
            )
        self.slot_of = {id(p): self.slots[n] for n, p in model.named_parameters() if id(p) in by_id}

    def features(self, enc: Encoded) -> torch.Tensor:
        return self.features_batch([enc])[0]

    def features_batch(self, encs: list[Encoded]) -> torch.Tensor:
        """(B, D) fp32 features of a batch: one forward and one backward for the whole batch."""
        out = torch.zeros(len(encs), self.layout.total, dtype=torch.float32, device=self.device)
        ids, labels, mask = pad_batch(encs, self.device)
        with self._hooks(out, ids), torch.enable_grad():
            batch_loss(self.model, ids, labels, mask, self.device, self.dtype).backward()
        self.backward_passes += 1
        return out

    @contextmanager
    def _hooks(self, out: torch.Tensor, ids: torch.Tensor):
        handles, flags = [], [p.requires_grad for p in self.params]
        for p in self.params:  # no weight gradients: the hooks form their projections instead
            p.requires_grad_(False)
        try:
            for m in self.modules:
                handles.append(m.register_forward_hook(self._forward_hook(out, ids)))
            yield
        finally:
            for h in handles:
                h.remove()
            for p, f in zip(self.params, flags):
                p.requires_grad_(f)

    def _forward_hook(self, out: torch.Tensor, ids: torch.Tensor):
        def weight(m):
            p = getattr(m, "weight", None)
            return self.slot_of.get(id(p)) if p is not None else None

        def bias(m):
            p = getattr(m, "bias", None)
            return self.slot_of.get(id(p)) if p is not None else None

        def hook(m, inputs, y):
            w, b = weight(m), bias(m)
            if isinstance(m, nn.Embedding):
                # The embedding output is where gradients start: make it a leaf that asks for one.
                y = y.detach().requires_grad_(True)
                if w is not None:
                    tok = inputs[0]
                    keep = (
                        (tok != m.padding_idx) if m.padding_idx is not None else torch.ones_like(tok, dtype=torch.bool)
                    )
                    # Gemma scales the looked-up rows: d y / d E[tok] = embed_scale.
                    scale = getattr(m, "embed_scale", None)
                    y.register_hook(
                        lambda g: w.add_embedding(out, tok, keep, g if scale is None else g * scale, m.num_embeddings)
                    )
                return y
            if not y.requires_grad:
                return None
            if isinstance(m, nn.Linear):
                xs = w.project_cols(_tokens(inputs[0])) if w is not None else None

                def backward(g):
                    g = _tokens(g)
                    if w is not None:
                        w.add_outer(out, w.project_rows(g), xs)
                    if b is not None:
                        b.add_vector(out, g.float().sum(1))
            else:  # RMSNorm / LayerNorm: d y / d weight = the normalised input (also for Gemma's x_hat (1 + w))
                x = inputs[0].float()
                if isinstance(m, nn.LayerNorm):
                    normed = F.layer_norm(x, m.normalized_shape, eps=m.eps)
                else:
                    eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
                    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                normed = normed.to(inputs[0].dtype).float()

                def backward(g):
                    if w is not None:
                        w.add_vector(out, _tokens(g.float() * normed).sum(1))
                    if b is not None:
                        b.add_vector(out, _tokens(g.float()).sum(1))

            y.register_hook(backward)
            return None

        return hook


def uses_cuda_projector(device, proj_dim: int) -> bool:
    """Whether trak_projector gives traker's CudaProjector: on CUDA, with fast_jl, proj_dim a multiple of 512."""
    if device.type != "cuda" or proj_dim % 512:
        return False
    try:
        import fast_jl  # noqa: F401  (optional extra on GPU clusters)
    except ImportError:
        return False
    return True


# BasicProjector seeds each block of columns separately, so its block size changes the projection: it is a
# function of the matrix's size alone (at most TRAK_BLOCK_BYTES of Gaussian entries per block), never of the
# memory budget or the machine, so every process projects a matrix the same way on a given device type.
TRAK_BLOCK_BYTES = 2**30


def trak_block_size(grad_dim: int, proj_dim: int) -> int:
    return int(max(1, min(proj_dim, TRAK_BLOCK_BYTES // (4 * grad_dim))))


def trak_projector(grad_dim: int, proj_dim: int, seed: int, device, memory_bytes: int = 0):
    """The traker projector for one matrix: CudaProjector with fast_jl on CUDA, else BasicProjector with
    the block size of trak_block_size (``memory_bytes`` is ignored: the projection must not depend on it).

    BasicProjector regenerates its Gaussian matrix block by block on every call unless one block
    holds it all (matrices of up to 2^30 / (4 proj_dim) entries).
    """
    from trak.projectors import BasicProjector, CudaProjector, ProjectionType

    trak_seed = seed % 2**31  # fast_jl takes a C int; BasicProjector adds block offsets to it
    if uses_cuda_projector(device, proj_dim):
        return CudaProjector(grad_dim, proj_dim, trak_seed, ProjectionType.rademacher, device, max_batch_size=8)
    block = trak_block_size(grad_dim, proj_dim)
    return BasicProjector(
        grad_dim, proj_dim, trak_seed, ProjectionType.normal, device, block_size=block, dtype=torch.float32
    )


class TrakFeaturizer:
    """Exact per-sample gradients, each matrix projected by the traker package's projector."""

    kind = "trak"

    def __init__(
        self, model, device, dtype="float32", proj_dim=4096, seed=42, batch_size=1, memory_bytes=2**30, computer=None
    ):
        self.computer = computer or GradientComputer(model, device, dtype)
        self.device, self.batch_size, self.proj_dim = torch.device(device), batch_size, proj_dim
        self.cuda_projector = uses_cuda_projector(self.device, proj_dim)
        full = self.computer.layout
        self.full, self.seed, self.memory_bytes = full, seed, memory_bytes
        self.projected = [hi - lo > proj_dim for _, lo, hi in full.slices()]
        sizes = [proj_dim if p else hi - lo for p, (_, lo, hi) in zip(self.projected, full.slices())]
        self.layout = layout_from_sizes(full.names, full.shapes, sizes)
        self.spec = {
            "kind": self.kind,
            "proj_dim": proj_dim,
            "seed": seed,
            "seed_rule": SEED_RULE + " % 2**31",
            # What the numbers depend on besides the seed: a store or a merge never mixes features of two of these.
            "projector": "CudaProjector (fast_jl)" if self.cuda_projector else "BasicProjector",
            "device_type": self.device.type,
            "block_rule": "" if self.cuda_projector else f"min(proj_dim, {TRAK_BLOCK_BYTES} // (4 x matrix entries))",
            "dims": int(self.layout.total),
            "scale": "1/sqrt(proj_dim) (traker's projectors are unscaled)",
        }

    def projector(self, m: int):
        """Matrix m's projector, built when needed: BasicProjector holds (grad_dim x block) floats, and
        holding one per matrix at once would need sum(grad_dim) x block (17 GB at block 32 for 135M)."""
        name, lo, hi = self.full.names[m], int(self.full.offsets[m]), int(self.full.offsets[m + 1])
        return trak_projector(hi - lo, self.proj_dim, stable_seed(self.seed, name), self.device, self.memory_bytes)

    @property
    def backward_passes(self) -> int:
        return self.computer.backward_passes

    def features(self, enc: Encoded) -> torch.Tensor:
        return self.features_batch([enc])[0]

    def features_batch(self, encs: list[Encoded]) -> torch.Tensor:
        out = torch.empty(len(encs), self.layout.total, dtype=torch.float32, device=self.device)
        if len(encs) == 1 or self.cuda_projector:
            # CudaProjector draws its matrix inside the kernel, so batching gains little: each gradient is
            # projected straight from the computer's buffer.
            for i, e in enumerate(encs):
                self.project(self.computer.gradient(e)[None], out[i : i + 1])
            return out
        # BasicProjector draws its matrix anew on every call, so the batch is projected at once to share that;
        # its gradients wait in host memory (on a CPU device, the only copy) and go to the device a matrix at a time.
        grads = torch.empty(len(encs), self.full.total, dtype=torch.float32)
        for i, e in enumerate(encs):
            grads[i] = self.computer.gradient(e)
        return self.project(grads, out)

    def project(self, grads: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (B, D) = the features of the flat gradients grads (B, P), which may be on the host: at most
        one matrix's (B x entries) is copied to the device at a time."""
        for m, ((_, lo, hi), (_, olo, ohi)) in enumerate(zip(self.full.slices(), self.layout.slices())):
            if not self.projected[m]:
                out[:, olo:ohi] = grads[:, lo:hi]
            else:
                pr = self.projector(m)
                block = grads[:, lo:hi].to(self.device).contiguous()
                out[:, olo:ohi] = pr.project(block, model_id=0).float() / math.sqrt(self.proj_dim)
                del pr, block  # before the next matrix's are made
        return out


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
        allocation["names"] != _trainable(model)[0]
        or allocation["total"] != proj_dim
        or allocation.get("fit", "coprime") != fit
        or allocation.get("allocation", "norm") != rule
    ):
        raise GradsimError(
            f"the {kind} allocation was made for another model, --proj-dim, projection or --allocation: delete "
            f"features/{kind}-allocations/ under the output dir to recalibrate"
        )
    return allocation


class _CalibratedSketch:
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


class CountSketchFeaturizer(_CalibratedSketch):
    """Exact per-sample gradients, each matrix CountSketched to its share of --proj-dim (module docstring).
    Keyword ``sign_cache_bytes`` (default 1 GiB) bounds the signs kept on the device."""

    kind = "countsketch"
    fit = "coprime"
    sketch_rule = "CountSketch per matrix: sign from the seed, bucket = flat index mod k_m"

    def _build(
        self, model, device, dtype, seed, batch_size, allocation, sign_cache_bytes: int = 2**30, computer=None
    ) -> None:
        self.computer = computer or GradientComputer(model, device, dtype)
        self.device, self.batch_size, self.seed = device, batch_size, seed
        full = self.full = self.computer.layout
        self.dims = [int(d) for d in allocation["dims"]]
        numel = np.diff(full.offsets)
        self.exact = [d >= n for d, n in zip(self.dims, numel)]
        sizes = [int(n) if e else d for d, n, e in zip(self.dims, numel, self.exact)]
        self.layout = layout_from_sizes(full.names, full.shapes, sizes)
        # A dense fp32 sign vector would double the gradient's memory. A sketched matrix's signs are kept on the
        # device as bits instead (packed little-endian, 1 for +1: 1/32 of its gradient) while they fit in
        # sign_cache_bytes (the default holds 8.6B entries), and the rest are drawn again from the seed on every
        # call (~4 ns per entry on a CPU core): beyond that bounded cache the memory is O(largest matrix).
        packed, self.packed_at, used = [], [], 0
        for (name, lo, hi), e in zip(full.slices(), self.exact):
            nbytes = (hi - lo + 7) // 8
            if e or used + nbytes > sign_cache_bytes:
                self.packed_at.append(None)
                continue
            bits = self.draw_sign_bits(name, hi - lo).numpy().astype(bool)
            packed.append(torch.from_numpy(np.packbits(bits, bitorder="little")))
            self.packed_at.append(used)
            used += nbytes
        self.signs = (torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8)).to(device)
        self.shifts = torch.arange(8, dtype=torch.uint8, device=device)
        largest = max([hi - lo for (_, lo, hi), e in zip(full.slices(), self.exact) if not e], default=0)
        self.tmp = torch.empty(largest, dtype=torch.float32, device=device)

    @property
    def backward_passes(self) -> int:
        return self.computer.backward_passes

    def draw_sign_bits(self, name: str, n: int) -> torch.Tensor:
        """The matrix's n signs as 0/1 (1: +1) int8 on the CPU, drawn from seed(name + ':signs')."""
        gen = torch.Generator(device="cpu").manual_seed(stable_seed(self.seed, f"{name}:signs"))
        return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8)

    def sign_bits(self, m: int) -> torch.Tensor:
        """Matrix m's signs as 0/1 (1: +1) on the device: unpacked from the cache, or drawn again."""
        name, n, at = self.full.names[m], math.prod(self.full.shapes[m]), self.packed_at[m]
        if at is None:
            return self.draw_sign_bits(name, n).to(self.device)
        packed = self.signs[at : at + (n + 7) // 8]
        return ((packed.unsqueeze(1) >> self.shifts) & 1).view(-1)[:n]

    def sketch(self, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (D,) = the sketch of the flat gradient g (P,)."""
        slices = zip(self.full.slices(), self.layout.slices(), self.exact)
        for m, ((_, lo, hi), (_, olo, ohi), exact) in enumerate(slices):
            if exact:
                out[olo:ohi] = g[lo:hi]
                continue
            n, k = hi - lo, ohi - olo
            tmp = self.tmp[:n]
            tmp.copy_(self.sign_bits(m))
            tmp.mul_(2).sub_(1).mul_(g[lo:hi])
            whole = n // k * k
            torch.sum(tmp[:whole].view(-1, k), dim=0, out=out[olo:ohi])
            out[olo : olo + n - whole] += tmp[whole:]
        return out

    def features(self, enc: Encoded) -> torch.Tensor:
        out = torch.empty(self.layout.total, dtype=torch.float32, device=self.device)
        return self.sketch(self.computer.gradient(enc), out)


class TensorSketchFeaturizer(_CalibratedSketch, FactorizedFeaturizer):
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
        for (name, shape), k in zip(zip(*_trainable(model)), allocation["dims"]):
            if k >= math.prod(shape):
                slots.append(_Slot(name, shape, None, None))
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
        self.exact = [isinstance(s, _Slot) for s in slots]


def feature_dims(projection: str, proj_dim: int, shapes: list[tuple[int, ...]]) -> int:
    """How many dims a projection's features have, from the parameters' shapes alone (for the sketches:
    at most --proj-dim, or every entry when that covers them all)."""
    if projection in SKETCHES:
        return min(proj_dim, sum(math.prod(s) for s in shapes))
    if projection == "trak":  # a matrix with at most proj_dim entries is kept exact
        return sum(min(math.prod(s), proj_dim) for s in shapes)
    k_rows, k_cols = split_dim(proj_dim)  # factorized: each side at most its sketch size is kept exact
    return sum(min(s[0], k_rows) * min(s[1], k_cols) if len(s) == 2 else min(math.prod(s), proj_dim) for s in shapes)


def check_proj_dim(cfg, model: nn.Module) -> None:
    """Refuse a --proj-dim that projects nothing: the features would be the full gradients, written to
    the shared feature store (slower and far bigger than the exact path, which stores none)."""
    from gradsim.config import DEFAULT_PROJ_DIM

    shapes = _trainable(model)[1]
    total = sum(math.prod(s) for s in shapes)
    if cfg.proj_dim >= total or feature_dims(cfg.projection, cfg.proj_dim, shapes) >= total:
        per = "in all" if cfg.projection in SKETCHES else "per parameter matrix"
        raise GradsimError(
            f"--proj-dim {cfg.proj_dim} ({per}) keeps every one of the model's {total:,} trainable parameters "
            f"exact under --projection {cfg.projection}, so full gradients would be stored: drop "
            f"--use-random-projection for the exact path, or give a smaller --proj-dim "
            f"(default {DEFAULT_PROJ_DIM[cfg.projection]})"
        )


def make_projected_featurizer(
    cfg,
    lm,
    memory_bytes: int = 2**30,
    calibration: Optional[list[Encoded]] = None,
    allocation_path: Optional[Path] = None,
):
    if cfg.projection == "trak":
        return TrakFeaturizer(lm.model, lm.device, cfg.dtype, cfg.proj_dim, cfg.seed, cfg.batch_size, memory_bytes)
    if cfg.projection in SKETCHES:
        cls = SKETCHES[cfg.projection]

        rule = getattr(cfg, "allocation", "norm")

        def create():
            return make_allocation(lm.model, lm.device, cfg.dtype, cfg.proj_dim, calibration or [], cls.fit, rule)

        allocation = load_or_create_json(allocation_path, create) if allocation_path else create()
        return cls(
            lm.model, lm.device, cfg.dtype, cfg.proj_dim, cfg.seed, cfg.batch_size, allocation=allocation, rule=rule
        )
    return FactorizedFeaturizer(lm.model, lm.device, cfg.dtype, cfg.proj_dim, cfg.seed, cfg.batch_size)


# Projections whose dims are shared by a calibrated allocation, by name.
SKETCHES = {cls.kind: cls for cls in (CountSketchFeaturizer, TensorSketchFeaturizer)}


# ---- per-matrix fidelity -------------------------------------------------------------------------------------

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
