"""The projected featurizer a config asks for, its feature dims, and the --proj-dim check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from torch import nn

from gradsim.core.projection.allocation import make_allocation
from gradsim.core.projection.common import split_dim, trainable
from gradsim.core.projection.countsketch import CountSketchFeaturizer
from gradsim.core.projection.factorized import FactorizedFeaturizer
from gradsim.core.projection.tensorsketch import TensorSketchFeaturizer
from gradsim.core.projection.trak import TrakFeaturizer
from gradsim.data.encode import Encoded
from gradsim.errors import GradsimError
from gradsim.io import load_or_create_json


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

    shapes = trainable(model)[1]
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
