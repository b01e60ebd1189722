"""Exact per-matrix scores without a gradient store: hold a block, stream the rest past it.

Follows a ``schedule.Plan``. Every dot is taken on the device, one (query, original) pair and one
parameter matrix at a time (``torch.dot`` of the two slices), so a pair's numbers do not depend on
which block it was computed in: partitions, both-settings runs and resumed runs give the same bytes
as one uninterrupted run. Nothing copies a full gradient to the host, except into the optional cache
of kept originals (host RAM beside a GPU, or scratch disk), used only where the run's own
measurements say reading one back is cheaper than recomputing it, and never past its budget.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from gradsim.core.finite import FiniteCheck
from gradsim.core.gradients import GradientComputer, ParamLayout
from gradsim.data.encode import Encoded
from gradsim.study.cost import Cost
from gradsim.study.schedule import Plan, later_uses

log = logging.getLogger("gradsim")


def matrix_dots(layout: ParamLayout, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(M,) float64 dot of two flat gradients restricted to each parameter matrix, taken in fp32 (bf16
    gradients are widened one matrix at a time)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        dots = [torch.dot(a[lo:hi], b[lo:hi]) for _, lo, hi in layout.slices()]
    else:
        dots = [torch.dot(a[lo:hi].float(), b[lo:hi].float()) for _, lo, hi in layout.slices()]
    return torch.stack(dots).double().cpu().numpy()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor's memory as uint8 (numpy has no bfloat16: bf16 gradients go to scratch as bytes)."""
    return t.view(torch.uint8)


def remove_stale_scratch(directory: Path) -> int:
    """Remove a scratch folder left by a dead run of this query range (its kept gradients and any *.tmp a kill
    left mid-write); called by the next run once it holds the range's lock. The number of files removed."""
    files = [f for f in directory.iterdir() if f.is_file()] if directory.is_dir() else []
    for f in files:
        f.unlink(missing_ok=True)
    for d in (directory, directory.parent):  # this range's folder, then .scratch when no other range uses it
        try:
            d.rmdir()
        except OSError:
            break
    return len(files)


class OriginalCache:
    """Originals' exact gradients kept between blocks: host RAM (beside a GPU) or files on scratch disk.

    Keeping one pays when (uses left) x (recompute time) > write time + (uses left) x (read time),
    from times measured in this run: backward seconds per token, and the cache's own bytes/s."""

    def __init__(self, kind: str, budget_bytes: int, grad_bytes: int, directory: Optional[Path], cost: Cost):
        self.kind, self.budget, self.grad_bytes, self.dir, self.cost = kind, budget_bytes, grad_bytes, directory, cost
        self.entries: dict[int, object] = {}
        self.write_bps: Optional[float] = None
        self.read_bps: Optional[float] = None
        if kind == "disk":
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def room(self) -> int:
        return (self.budget - len(self.entries) * self.grad_bytes) // self.grad_bytes

    def worth_keeping(self, uses_left: int, recompute_seconds: Optional[float]) -> bool:
        if uses_left < 1 or self.room < 1:
            return False
        if recompute_seconds is None or self.write_bps is None or self.read_bps is None:
            return True  # measure once: the first kept gradient tells what keeping costs
        io = self.grad_bytes / self.write_bps + uses_left * self.grad_bytes / self.read_bps
        return uses_left * recompute_seconds > io

    def put(self, j: int, g: torch.Tensor) -> None:
        t0 = time.perf_counter()
        if self.kind == "host":
            kept = torch.empty(g.shape, dtype=g.dtype, pin_memory=torch.cuda.is_available())
            kept.copy_(g)
            self.entries[j] = kept
            self.cost.host_bytes_kept += self.grad_bytes
        else:
            path = self.dir / f"original_{j:07d}.bin"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(memoryview(as_bytes(g.detach().cpu()).numpy()))
            os.replace(tmp, path)
            self.entries[j] = path
            self.cost.scratch_bytes_written += self.grad_bytes
        self.write_bps = self.grad_bytes / max(time.perf_counter() - t0, 1e-6)

    def get(self, j: int, out: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        entry = self.entries[j]
        if self.kind == "host":
            out.copy_(entry, non_blocking=False)
        else:
            host = out if out.device.type == "cpu" else torch.empty(out.shape, dtype=out.dtype)
            with open(entry, "rb") as f:
                f.readinto(memoryview(as_bytes(host).numpy()))
            if host is not out:
                out.copy_(host)
            self.cost.scratch_bytes_read += self.grad_bytes
        self.read_bps = self.grad_bytes / max(time.perf_counter() - t0, 1e-6)
        self.cost.originals_reused += 1
        return out

    def drop(self, j: int) -> None:
        entry = self.entries.pop(j, None)
        if isinstance(entry, Path):
            entry.unlink(missing_ok=True)

    def close(self) -> None:
        for j in list(self.entries):
            self.drop(j)
        if self.kind == "disk":
            remove_stale_scratch(self.dir)


# A query's finished scores: position, (C, M) dots, (M,) self-dots, (C, M) candidates' self-dots.
Done = tuple[int, np.ndarray, np.ndarray, np.ndarray]


class ExactStream:
    """Runs a Plan: per-matrix dots and self-dots of each query with each of its candidates."""

    def __init__(
        self,
        computer: GradientComputer,
        cost: Optional[Cost] = None,
        cache: Optional[OriginalCache] = None,
        progress=None,
        on_gradient: Optional[Callable[[Encoded, str, float, Optional[int]], None]] = None,
        finite: Optional[FiniteCheck] = None,
    ):
        self.computer, self.cache, self.progress, self.on_gradient = computer, cache, progress, on_gradient
        self.finite = finite if finite is not None else FiniteCheck(model=computer.model, dtype=computer.dtype)
        self.layout = computer.layout
        self.cost = cost if cost is not None else Cost()
        self._tokens = 0
        self._seconds = 0.0

    def _gradient(
        self, enc: Encoded, role: str, out: Optional[torch.Tensor], q: Optional[int] = None
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The sample's gradient (in the parameters' dtype) and its (M,) per-matrix self-dots, checked finite
        (FiniteCheck) before anything uses it: copied into ``out`` (a held slot), or the computer's own buffer
        when ``out`` is None (a streamed gradient, used before the next is computed)."""
        t0 = time.perf_counter()
        g = self.computer.gradient(enc)
        if out is not None:
            out.copy_(g)
            g = out
        if g.device.type == "cuda":
            torch.cuda.synchronize(g.device)
        seconds = time.perf_counter() - t0
        self._seconds += seconds
        self._tokens += enc.num_tokens
        self.cost.tokens += enc.num_tokens
        if role == "query":
            self.cost.query_passes += 1
        else:
            self.cost.original_passes += 1
        if self.progress is not None:
            self.progress.update(1)
        selfdots = matrix_dots(self.layout, g, g)
        self.finite.selfdots(self.layout.names, selfdots, enc.id, role)
        if self.on_gradient is not None:
            self.on_gradient(enc, role, seconds, q)
        return g, selfdots

    def _work(self, like: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_work_buf", None) is None:
            self._work_buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return self._work_buf

    @property
    def seconds_per_token(self) -> Optional[float]:
        return self._seconds / self._tokens if self._tokens else None

    def run(
        self,
        plan: Plan,
        queries: list[Encoded],
        cands: list[list[int]],
        originals: dict[int, Encoded],
        on_done: Callable[[list[Done]], None],
    ) -> Cost:
        t_start, base = time.perf_counter(), self.cost.seconds
        dev = self.computer.device
        p = self.layout.total
        self.cost.held_gradients, self.cost.mode = plan.capacity, plan.mode

        def done(finished: list[Done]) -> None:  # the seconds so far go into the block's progress record
            self.cost.seconds = base + (time.perf_counter() - t_start)
            on_done(finished)

        if plan.mode == "hold-originals":
            self._hold_originals(queries, cands, originals, done, dev, p)
        else:
            self._hold_queries(plan, queries, cands, originals, done, dev, p)
        self.cost.seconds = base + (time.perf_counter() - t_start)
        self.cost.backward_seconds_per_token = self.seconds_per_token
        if self.cache is not None:
            self.cache.close()
        return self.cost

    def _hold_originals(self, queries, cands, originals, on_done, dev, p) -> None:
        needed = sorted({j for c in cands for j in c})
        held = torch.empty(len(needed), p, dtype=self.computer.buffer.dtype, device=dev)
        row = {j: r for r, j in enumerate(needed)}
        oself = {}
        for j in needed:
            oself[j] = self._gradient(originals[j], "original", held[row[j]])[1]
        for q, enc in enumerate(queries):
            g, qself = self._gradient(enc, "query", None, q)
            dots = np.stack([matrix_dots(self.layout, g, held[row[j]]) for j in cands[q]])
            on_done([(q, dots, qself, np.stack([oself[j] for j in cands[q]]))])

    def _hold_queries(self, plan, queries, cands, originals, on_done, dev, p) -> None:
        block_buf = torch.empty(max(len(b) for b in plan.blocks), p, dtype=self.computer.buffer.dtype, device=dev)
        uses = later_uses(plan.blocks, cands)
        for b, block in enumerate(plan.blocks):
            qself = {}
            for slot, q in enumerate(block):
                qself[q] = self._gradient(queries[q], "query", block_buf[slot], q)[1]
            need: dict[int, list[tuple[int, int]]] = {}
            for slot, q in enumerate(block):
                for col, j in enumerate(cands[q]):
                    need.setdefault(j, []).append((slot, col))
            dots = {q: np.empty((len(cands[q]), len(self.layout.names))) for q in block}
            cself = {q: np.empty_like(dots[q]) for q in block}
            for j in sorted(need):
                left = [u for u in uses[j] if u > b]
                if self.cache is not None and j in self.cache.entries:
                    g = self.cache.get(j, self._work(block_buf[0]))
                    s = matrix_dots(self.layout, g, g)
                    if self.progress is not None:
                        self.progress.update(1)
                else:
                    g, s = self._gradient(originals[j], "original", None)
                    per_token = self.seconds_per_token
                    recompute = per_token * originals[j].num_tokens if per_token else None
                    if self.cache is not None and self.cache.worth_keeping(len(left), recompute):
                        self.cache.put(j, g)
                for slot, col in need[j]:
                    q = block[slot]
                    dots[q][col] = matrix_dots(self.layout, block_buf[slot], g)
                    cself[q][col] = s
                if self.cache is not None and not left:
                    self.cache.drop(j)
            on_done([(q, dots[q], qself[q], cself[q]) for q in block])
