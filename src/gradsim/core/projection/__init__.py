"""Projected per-sample gradients: deterministic random sketches, per parameter matrix.

Every parameter matrix keeps its own slice of the feature vector (so per-matrix, per-component and
per-layer scores work as for exact gradients), and every random matrix is seeded from
sha256(f"{seed}:{name}"), never Python's salted hash(): partitions, processes and machines build
bit-identical sketches (generated on the CPU, whose generator does not depend on the device).

One module per projection, each with its own account of the method:
  - tensorsketch (the default): countsketch's dims, formed in the hooks without the exact gradient;
  - countsketch: the exact per-sample gradient, each matrix CountSketched to its share of --proj-dim;
  - factorized (LoGra): a Kronecker sketch of each matrix, formed in the hooks;
  - trak: the exact per-sample gradient, each matrix projected by the traker package;
and what they share: common (seeds, the Gaussian sketch, layouts, padded batches, the trainable parameters),
buckets (deterministic sums into buckets on CUDA), allocation (the sketches' calibrated share of --proj-dim),
factory (the featurizer a config asks for) and fidelity (each matrix's predicted error).
"""

from gradsim.core.projection.allocation import (
    ALLOCATION_WEIGHTS,
    CALIBRATION_SAMPLES,
    FLOOR_FRACTION,
    SHARE_MIX,
    CalibratedSketch,
    allocate_dims,
    allocation_floor,
    allocation_from_shares,
    allocation_weights,
    calibration_shares,
    checked_allocation,
    fitted_dims,
    fitted_up,
    make_allocation,
    smooth_at_most,
)
from gradsim.core.projection.buckets import Buckets, bucket_sum, ordered_sums, segment_sums, sorted_segments
from gradsim.core.projection.common import (
    SEED_RULE,
    gaussian_sketch,
    layout_from_sizes,
    pad_batch,
    split_dim,
    stable_seed,
    trainable,
)
from gradsim.core.projection.countsketch import CountSketchFeaturizer
from gradsim.core.projection.factorized import FactorizedFeaturizer, Slot
from gradsim.core.projection.factory import SKETCHES, check_proj_dim, feature_dims, make_projected_featurizer
from gradsim.core.projection.fidelity import (
    KRONECKER_EXCESS,
    NOISY_P90,
    Z90,
    dims_for_noise,
    per_matrix_fidelity,
    predicted_cosine_sd,
)
from gradsim.core.projection.tensorsketch import (
    DIRECT_RATIO,
    TensorSketchFeaturizer,
    _TensorSketchSlot,
    weight_gradient,
)
from gradsim.core.projection.trak import (
    TRAK_BLOCK_BYTES,
    TrakFeaturizer,
    trak_block_size,
    trak_projector,
    uses_cuda_projector,
)

__all__ = [
    "ALLOCATION_WEIGHTS",
    "CALIBRATION_SAMPLES",
    "DIRECT_RATIO",
    "FLOOR_FRACTION",
    "KRONECKER_EXCESS",
    "NOISY_P90",
    "SEED_RULE",
    "SHARE_MIX",
    "SKETCHES",
    "TRAK_BLOCK_BYTES",
    "Z90",
    "Buckets",
    "CalibratedSketch",
    "CountSketchFeaturizer",
    "FactorizedFeaturizer",
    "Slot",
    "TensorSketchFeaturizer",
    "TrakFeaturizer",
    "_TensorSketchSlot",
    "allocate_dims",
    "allocation_floor",
    "allocation_from_shares",
    "allocation_weights",
    "bucket_sum",
    "calibration_shares",
    "check_proj_dim",
    "checked_allocation",
    "dims_for_noise",
    "feature_dims",
    "fitted_dims",
    "fitted_up",
    "gaussian_sketch",
    "layout_from_sizes",
    "make_allocation",
    "make_projected_featurizer",
    "ordered_sums",
    "pad_batch",
    "per_matrix_fidelity",
    "predicted_cosine_sd",
    "segment_sums",
    "smooth_at_most",
    "sorted_segments",
    "split_dim",
    "stable_seed",
    "trainable",
    "trak_block_size",
    "trak_projector",
    "uses_cuda_projector",
    "weight_gradient",
]
