"""Deterministic sums into buckets: a scatter-add on the CPU, a fixed-order sorted sum on CUDA (whose atomic
adds land in an order, and so round, differently on every run)."""

from __future__ import annotations

from typing import Optional

import torch


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
