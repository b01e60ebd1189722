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

from gradsim.core.gradients import GradientComputer, ParamLayout
from gradsim.core.projection import (
    SKETCHES,
    FactorizedFeaturizer,
    TrakFeaturizer,
    allocation_from_shares,
    calibration_shares,
    trainable,
    weight_gradient,
)
from gradsim.data.encode import Encoded
from gradsim.errors import GradsimError

KINDS = ("tensorsketch", "countsketch", "factorized", "trak")
GRADIENT_KINDS = ("countsketch", "trak")  # from the exact gradient; the others are formed in the hooks


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
        grad = None  # the weight gradient, formed once for every size sketched directly from it
        for s, left, right in zip(self.slots, lefts, rights):
            if getattr(s, "direct", False):
                grad = weight_gradient(left, right) if grad is None else grad
                s.add_gradient(out, grad)
            else:
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
    """Projections' features at several sizes from one pass per sample (module docstring).

    ``parts``: featurizers built alone for each size (make_multi_size builds them), of one family: all
    formed in the hooks (factorized, tensorsketch), or all from one shared exact gradient (countsketch,
    trak). The features are the parts' features end to end; ``split(features)`` gives one array a part."""

    def __init__(self, parts: list):
        if not parts:
            raise GradsimError("a multi-size featurizer needs at least one size")
        self.parts = parts
        self.kinds = list(dict.fromkeys(p.kind for p in parts))
        self.kind = "+".join(self.kinds)
        self.dims = [int(p.layout.total) for p in parts]
        self.bases = [int(b) for b in np.concatenate([[0], np.cumsum(self.dims)[:-1]])]
        names = [f"{i}:{n}" for i, p in enumerate(parts) for n in p.layout.names]
        shapes = [s for p in parts for s in p.layout.shapes]
        sizes = [int(n) for p in parts for n in np.diff(p.layout.offsets)]
        self.layout = ParamLayout(names, shapes, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        self.spec = {"kind": f"{self.kind} (multi-size)", "parts": [p.spec for p in parts]}
        self.batch_size = parts[0].batch_size
        hooked = [isinstance(p, FactorizedFeaturizer) for p in parts]
        self.hooked = None
        if all(hooked):  # factorized, tensorsketch: every part's slots filled in one forward/backward
            self.hooked = _HookedSizes(parts, self.layout, self.bases)
        elif any(hooked) or len({id(p.computer) for p in parts}) != 1:
            raise GradsimError(
                f"{self.kind}: one pass serves hook-formed sketches (factorized, tensorsketch) or sketches of one "
                "shared exact gradient (countsketch, trak), not a mix"
            )
        else:
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
        """(n, sum of dims) -> one (n, dims) view per part, in the order of the parts."""
        return [feats[:, b : b + d] for b, d in zip(self.bases, self.dims)]


def make_multi_size(
    kind,
    model: nn.Module,
    device,
    sizes=None,
    dtype: str = "float32",
    seed: int = 42,
    batch_size: int = 1,
    calibration: Optional[list[Encoded]] = None,
    allocation: Optional[dict] = None,
    rule: str = "norm",
) -> MultiSizeFeaturizer:
    """The parts for ``sizes`` (each --proj-dim as that projection reads it: total dims for the sketches,
    dims per matrix for factorized and trak), and the featurizer that fills them in one pass. ``kind``
    is one projection (with ``sizes``) or {projection: sizes} for several of one family.

    The sketches' allocations share one calibration (the squared-norm shares are measured once, on
    ``calibration``, or taken from ``allocation``): each size's allocation is the one make_allocation
    gives for that size and allocation ``rule``."""
    wanted = {kind: sizes} if isinstance(kind, str) else dict(kind)
    parts, computer, shares = [], None, None
    names, shapes = trainable(model)
    for k, ks in wanted.items():
        if k not in KINDS:
            raise GradsimError(f"unknown projection {k!r}: choose from {', '.join(KINDS)}")
        ks = sorted(set(int(s) for s in ks or ()))
        if not ks or ks[0] < 1:
            raise GradsimError(f"{k}: projection sizes must be positive integers, got {ks}")
        if k in GRADIENT_KINDS and computer is None:
            computer = GradientComputer(model, device, dtype)  # one exact gradient for every size and kind
        if k in SKETCHES:
            cls = SKETCHES[k]
            if allocation is None and shares is None:  # one calibration for every size and sketch
                if not calibration:
                    raise GradsimError(f"the {k} projection needs calibration samples or an allocation")
                shares = calibration_shares(model, device, dtype, calibration)[1]
            extra = {"computer": computer} if k == "countsketch" else {}
            for size in ks:  # make_allocation's allocation for this size and rule, from the one calibration
                a = allocation_from_shares(
                    names,
                    shapes,
                    allocation["shares"] if allocation else shares,
                    size,
                    allocation["calibration_ids"] if allocation else [e.id for e in calibration],
                    cls.fit,
                    rule,
                )
                parts.append(cls(model, device, dtype, size, seed, batch_size, allocation=a, rule=rule, **extra))
        elif k == "trak":
            parts += [TrakFeaturizer(model, device, dtype, s, seed, batch_size, computer=computer) for s in ks]
        else:
            parts += [FactorizedFeaturizer(model, device, dtype, s, seed, batch_size) for s in ks]
    return MultiSizeFeaturizer(parts)
