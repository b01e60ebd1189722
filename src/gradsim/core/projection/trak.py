"""trak: the exact per-sample gradient (one backward per sample), then the traker package's projector
per parameter matrix (CudaProjector on CUDA when fast_jl is installed, else BasicProjector); matrices
with at most proj_dim entries are kept exact.
"""

from __future__ import annotations

import math

import torch

from gradsim.core.gradients import GradientComputer
from gradsim.core.projection.common import SEED_RULE, layout_from_sizes, stable_seed
from gradsim.data.encode import Encoded


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
