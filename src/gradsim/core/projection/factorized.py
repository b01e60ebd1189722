"""factorized (LoGra): projected per-sample gradients from forward/backward hooks.

A linear layer y = x W^T has the per-sample gradient grad W = G^T X (G = dL/dy, T x d_out; X: T x d_in).
With Gaussian sketches R_rows (d_out x k_rows) and R_cols (d_in x k_cols), each scaled by 1/sqrt(k) so norms
are preserved in expectation,
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
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gradsim.core.gradients import batch_loss
from gradsim.core.projection.common import (
    SEED_RULE,
    gaussian_sketch,
    layout_from_sizes,
    pad_batch,
    split_dim,
    trainable,
)
from gradsim.data.encode import Encoded
from gradsim.errors import GradsimError


class Slot:
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
        for name, shape in zip(*trainable(model)):
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
            slots.append(Slot(name, shape, rows, cols))
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
