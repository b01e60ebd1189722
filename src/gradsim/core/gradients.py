"""Exact per-sample loss gradients, written straight into one reusable flat fp32 buffer.

Each parameter's ``.grad`` is a view into the buffer, so a backward pass fills it without a copy and
the buffer is reused across samples (fresh 0.5 GB allocations are slow on small VMs). Tied
parameters (SmolLM2's lm_head = embed_tokens) are one Parameter and so one slice: the gradient is
the sum of both uses, as the model is trained.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gradsim.data.encode import IGNORE_INDEX, Encoded


@dataclass(frozen=True)
class ParamLayout:
    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: np.ndarray  # (M+1,) int64, slice m is offsets[m]:offsets[m+1]

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def slices(self):
        for m, name in enumerate(self.names):
            yield name, int(self.offsets[m]), int(self.offsets[m + 1])


def param_layout(model: torch.nn.Module) -> ParamLayout:
    names, shapes, sizes = [], [], []
    for name, p in model.named_parameters():  # named_parameters() yields a tied Parameter once
        if p.requires_grad:
            names.append(name)
            shapes.append(tuple(p.shape))
            sizes.append(p.numel())
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return ParamLayout(names, shapes, offsets)


@contextmanager
def autocast_context(device: torch.device, dtype: str):
    """The precision of a forward/backward: bf16 autocast for ``bfloat16``; TF32 matmuls for ``tf32`` (CUDA);
    fp32 otherwise. On CUDA, attention runs the math kernel: the fused kernels' backward adds with atomics,
    so two runs of the same sample would differ in their last bits (on the CPU every kernel is ordered)."""
    with ExitStack() as stack:
        if dtype == "bfloat16":
            stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(tf32_matmuls(dtype == "tf32"))
        yield


@contextmanager
def tf32_matmuls(enabled: bool):
    """CUDA fp32 matmuls and convolutions in TF32 (10-bit mantissa, fp32 accumulation) or in full fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def batch_loss(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask, device: torch.device, dtype: str = "float32"
) -> torch.Tensor:
    """Sum over the batch of each sample's mean cross-entropy over its trained (response) tokens.

    Logits are formed only at positions that predict a trained token in some sample of the batch
    (logits_to_keep): a prompt position's logits get no gradient, and skipping them skips their share
    of the vocabulary projection forward and backward (~18% of it on LIMA). Each sample's gradient is
    exactly its own: right padding never reaches a real token through causal attention."""
    trained = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
    keep = trained.any(0).nonzero()[:, 0]
    with autocast_context(device, dtype):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
    tok = F.cross_entropy(
        logits.float().flatten(0, 1), labels[:, keep + 1].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(ids.shape[0], -1)
    return (tok.sum(1) / trained.sum(1)).sum()


def sample_loss(model: torch.nn.Module, enc: Encoded, device: torch.device, dtype: str = "float32") -> torch.Tensor:
    """Mean cross-entropy over the trained (response) tokens of one sample."""
    return batch_loss(model, enc.input_ids.to(device)[None], enc.labels.to(device)[None], None, device, dtype)


class GradientComputer:
    """Computes one sample's full loss gradient into a flat buffer (exact, batch of one)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: str = "float32"):
        self.model, self.device, self.dtype = model, device, dtype
        self.layout = param_layout(model)
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        # .grad must have its parameter's dtype: fp32, or bf16 for --dtype bfloat16-weights (callers then
        # take dot products in fp32).
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            from gradsim.errors import GradsimError

            raise GradsimError(
                f"the model's parameters mix dtypes {sorted(map(str, dtypes))}, which one flat "
                "gradient buffer cannot hold: load it with --dtype float32 or bfloat16-weights"
            )
        self.buffer = torch.zeros(self.layout.total, dtype=dtypes.pop(), device=device)
        self.views = [
            self.buffer[lo:hi].view(shape) for (_, lo, hi), shape in zip(self.layout.slices(), self.layout.shapes)
        ]
        self.backward_passes = 0
        self.transform = None  # applied in place after each backward (a normalize.GradientNormalizer)

    def gradient(self, enc: Encoded) -> torch.Tensor:
        """The sample's gradient as a flat (P,) fp32 tensor. It is the reused buffer: copy it to keep it."""
        self.buffer.zero_()
        for p, view in zip(self.params, self.views):  # (again: another computer on this model may have taken them)
            p.grad = view
        loss = sample_loss(self.model, enc, self.device, self.dtype)
        loss.backward()
        self.backward_passes += 1
        # A parameter whose .grad was replaced (some optimizers/hooks do that) would break the views.
        for p, (_, lo, _hi) in zip(self.params, self.layout.slices()):
            assert p.grad.data_ptr() == self.buffer[lo:].data_ptr(), "parameter .grad detached from the buffer"
        if self.transform is not None:
            self.transform(self.buffer)
        return self.buffer

    def release(self) -> None:
        """Detach every parameter's .grad from the buffer and drop it (a later featurizer needs none)."""
        for p in self.params:
            p.grad = None
        self.views, self.buffer = [], None
