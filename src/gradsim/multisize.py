"""One backward, many sizes: a projection's features at several sizes from one forward/backward per sample.

A frontier over six sizes would otherwise cost six backward passes per sample. Here each size is the
featurizer that size would have alone (same seed, same allocation rule, same slots), and they share
the one pass:
  - countsketch and trak compute the exact per-sample gradient once (one GradientComputer, shared)
    and sketch or project it at every size (a CountSketch costs ~3% of a backward on a CPU);
  - factorized and tensorsketch form their sketches in the forward/backward hooks: every parameter's
    hook fills the slots of every size (the weight-gradient matmuls are skipped as for one size).
The features of all sizes are laid end to end in one vector (``layout``; ``split`` cuts it back), so
``features.featurize`` and the progress bars work on it unchanged. Each size's part equals the
featurizer computed alone (tests/test_multisize.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from .encode import Encoded
from .errors import GradsimError
from .gradients import GradientComputer, ParamLayout
from .projection import (
    SKETCHES,
    FactorizedFeaturizer,
    TrakFeaturizer,
    _trainable,
    allocate_dims,
    make_allocation,
)

KINDS = ("tensorsketch", "countsketch", "factorized", "trak")


class _MultiSlot:
    """One parameter's slots at every size: each hook call is applied to all of them (what project_*
    returns is a list, one entry a size, which the hooks hand back to add_outer unchanged)."""

    def __init__(self, slots: list):
        self.slots = slots

    def project_rows(self, g: torch.Tensor) -> list:
        return [s.project_rows(g) for s in self.slots]

    def project_cols(self, x: torch.Tensor) -> list:
        return [s.project_cols(x) for s in self.slots]

    def add_outer(self, out: torch.Tensor, lefts: list, rights: list) -> None:
        for s, left, right in zip(self.slots, lefts, rights):
            s.add_outer(out, left, right)

    def add_vector(self, out: torch.Tensor, v: torch.Tensor) -> None:
        for s in self.slots:
            s.add_vector(out, v)

    def add_embedding(self, out, tok, keep, g, num_embeddings: int) -> None:
        for s in self.slots:
            s.add_embedding(out, tok, keep, g, num_embeddings)


class _HookedSizes(FactorizedFeaturizer):
    """factorized / tensorsketch parts sharing one forward/backward (FactorizedFeaturizer's hooks and
    batching, with every parameter's slot a _MultiSlot). The parts' slots are moved to their place in
    the concatenated vector: use the parts through this object only."""

    def __init__(self, parts: list, layout: ParamLayout, bases: list[int]):
        first = parts[0]
        self.model, self.device, self.dtype, self.batch_size = first.model, first.device, first.dtype, first.batch_size
        self.params, self.modules, self.backward_passes = first.params, first.modules, 0
        self.layout = layout
        for part, base in zip(parts, bases):
            for slot in part.slots.values():
                slot.lo += base
        self.slot_of = {pid: _MultiSlot([p.slot_of[pid] for p in parts]) for pid in first.slot_of}


class MultiSizeFeaturizer:
    """A projection's features at several sizes from one pass per sample (module docstring).

    ``parts``: featurizers of one kind, built alone for each size (make_multi_size builds them). The
    features are the parts' features laid end to end; ``split(features)`` gives one array per size."""

    def __init__(self, parts: list):
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise GradsimError(f"a multi-size featurizer takes one projection, got {sorted(kinds)}")
        self.kind, self.parts = kinds.pop(), parts
        self.dims = [int(p.layout.total) for p in parts]
        self.bases = [int(b) for b in np.concatenate([[0], np.cumsum(self.dims)[:-1]])]
        names = [f"{i}:{n}" for i, p in enumerate(parts) for n in p.layout.names]
        shapes = [s for p in parts for s in p.layout.shapes]
        sizes = [int(n) for p in parts for n in np.diff(p.layout.offsets)]
        self.layout = ParamLayout(names, shapes, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        self.spec = {"kind": f"{self.kind} (multi-size)", "parts": [p.spec for p in parts]}
        self.batch_size = parts[0].batch_size
        self.hooked = None
        if isinstance(parts[0], FactorizedFeaturizer):  # factorized, tensorsketch
            self.hooked = _HookedSizes(parts, self.layout, self.bases)
        else:  # countsketch, trak: one gradient, sketched or projected at every size
            computers = {id(p.computer) for p in parts}
            if len(computers) != 1:
                raise GradsimError("the parts of a multi-size countsketch or trak must share one GradientComputer")
            self.computer = parts[0].computer

    @property
    def backward_passes(self) -> int:
        return self.hooked.backward_passes if self.hooked is not None else self.computer.backward_passes

    def features(self, enc: Encoded) -> torch.Tensor:
        return self.features_batch([enc])[0]

    def features_batch(self, encs: list[Encoded]) -> torch.Tensor:
        if self.hooked is not None:
            return self.hooked.features_batch(encs)
        out = torch.empty(len(encs), self.layout.total, dtype=torch.float32, device=self.parts[0].device)
        for i, enc in enumerate(encs):
            g = self.computer.gradient(enc)
            for part, base, d in zip(self.parts, self.bases, self.dims):
                if isinstance(part, TrakFeaturizer):
                    part.project(g[None], out[i : i + 1, base : base + d])
                else:
                    part.sketch(g, out[i, base : base + d])
        return out

    def split(self, feats):
        """(n, sum of dims) -> one (n, dims) view per size, in the order of the parts."""
        return [feats[:, b : b + d] for b, d in zip(self.bases, self.dims)]


def make_multi_size(
    kind: str,
    model: nn.Module,
    device,
    sizes: list[int],
    dtype: str = "float32",
    seed: int = 42,
    batch_size: int = 1,
    calibration: Optional[list[Encoded]] = None,
    allocation: Optional[dict] = None,
) -> MultiSizeFeaturizer:
    """The parts for ``sizes`` (each --proj-dim as that projection reads it: total dims for the sketches,
    dims per matrix for factorized and trak), and the featurizer that fills them in one pass.

    The sketches' allocations share one calibration (the squared-norm shares are measured once, on
    ``calibration``, or taken from ``allocation``): each size's allocation is the one make_allocation
    gives for that size."""
    if kind not in KINDS:
        raise GradsimError(f"unknown projection {kind!r}: choose from {', '.join(KINDS)}")
    sizes = sorted(set(int(s) for s in sizes))
    if not sizes or sizes[0] < 1:
        raise GradsimError(f"projection sizes must be positive integers, got {sizes}")
    if kind in SKETCHES:
        cls = SKETCHES[kind]
        base = allocation or make_allocation(model, device, dtype, sizes[0], calibration or [], cls.fit)
        shapes = _trainable(model)[1]
        allocations = [
            dict(base, total=k, dims=[int(d) for d in allocate_dims(np.array(base["shares"]), shapes, k, cls.fit)])
            for k in sizes
        ]
        computer = GradientComputer(model, device, dtype) if kind == "countsketch" else None
        extra = {"computer": computer} if computer is not None else {}
        parts = [cls(model, device, dtype, k, seed, batch_size, allocation=a, **extra) for k, a in zip(sizes, allocations)]
    elif kind == "trak":
        computer = GradientComputer(model, device, dtype)
        parts = [TrakFeaturizer(model, device, dtype, k, seed, batch_size, computer=computer) for k in sizes]
    else:
        parts = [FactorizedFeaturizer(model, device, dtype, k, seed, batch_size) for k in sizes]
    return MultiSizeFeaturizer(parts)
