"""What every projection shares: seeds from names, the Gaussian sketch, a layout from slice sizes, padded
batches and the trainable parameters' names and shapes.

Every random matrix is seeded from sha256(f"{seed}:{name}"), never Python's salted hash(): partitions,
processes and machines build bit-identical sketches (generated on the CPU, whose generator does not depend
on the device).
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from gradsim.core.gradients import ParamLayout, param_layout
from gradsim.data.encode import IGNORE_INDEX, Encoded

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


def trainable(model: nn.Module) -> tuple[list[str], list[tuple[int, ...]]]:
    """The names and shapes of the model's trainable parameters, in parameter order."""
    full = param_layout(model)
    return full.names, full.shapes
