"""The exact path: per-sample gradients, a block of them held in memory and the others streamed past it
(stream.py, planned by schedule.py); never stored. Each attempt's spending is logged (cost.py)."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from gradsim.data.encode import Encoded
from gradsim.io import append_jsonl, atomic_save_npz
from gradsim.study.cost import RUNNING, Cost, end_reason
from gradsim.study.features import manifest_key, progress_bar
from gradsim.study.memory import gradient_capacity
from gradsim.study.part import Part, encode_all, normalizer_manifest

log = logging.getLogger("gradsim")


def start_attempt(parts: list[Part]) -> None:
    """This attempt's Cost, shared by the parts and logged at once in each progress log, so that even an
    attempt killed before its first block is listed."""
    cost = Cost(shared_by=[p.cfg.setting for p in parts])
    n = 1 + max((k for p in parts for k in p.attempts), default=0)
    for p in parts:
        p.cost, p.attempt = cost, n
        append_jsonl(p.paths.progress, {"kind": "attempt", "attempt": cost.attempt(n, RUNNING)})


def end_attempt(parts: list[Part], exc: BaseException) -> None:
    """Log how this attempt ended (SIGTERM, interrupted, error) and what it spent, where a progress log is left."""
    for p in parts:
        if p.cost is not None and p.paths.progress.exists():
            record = p.cost.attempt(p.attempt, end_reason(exc))
            try:
                append_jsonl(p.paths.progress, {"kind": "attempt", "attempt": record})
            except OSError:  # e.g. the disk that just filled up: the block records still count
                pass


def score_exact(parts: list[Part]) -> None:
    from gradsim.core.gradients import GradientComputer
    from gradsim.study.schedule import fewest_held, make_plan
    from gradsim.study.stream import ExactStream

    first = parts[0]
    cfg, lm, originals = first.cfg, first.lm, first.data.originals
    # Every setting's unfinished queries, in one schedule: (part, query index) per position.
    owners = [(p, qi) for p in parts for qi in p.todo]
    cands = [p.cands[qi - p.start] for p, qi in owners]
    if not owners:
        return
    queries = encode_all(first, [p.data.queries[qi] for p, qi in owners], "queries")
    needed = sorted({j for c in cands for j in c})
    encs = dict(zip(needed, encode_all(first, [originals[j] for j in needed], "originals")))

    computer = GradientComputer(lm.model, lm.device, cfg.dtype)
    normalizer = attach_normalizer(first, computer)  # before the budget: it holds a mean
    for p in parts:
        p.normalizer = normalizer
    grad_bytes = computer.layout.total * computer.buffer.element_size()
    from gradsim.study.memory import shape_of_config

    longest = max(e.num_tokens for e in [*queries, *encs.values()])
    capacity = gradient_capacity(cfg, grad_bytes, lm.device, longest, shape_of_config(lm.model.config))
    groups = [c[0] for c in cands]  # c[0]: the query's own original
    capacity = fewest_held(cands, groups, capacity)  # no more gradients than save passes
    plan = make_plan(cands, groups, capacity)
    cost = first.cost
    cache = make_cache(first, grad_bytes, cost)
    log.info(
        "exact: %d queries, %d originals, %s of %d gradients (%.2f GB each): %d blocks, %.2f passes per query "
        "without keeping originals%s",
        len(owners),
        len(needed),
        plan.mode,
        capacity,
        grad_bytes / 2**30,
        len(plan.blocks),
        plan.passes_per_query(),
        f"; keeping originals in {cache.kind} up to {cache.budget / 2**30:.1f} GB" if cache else "",
    )
    # An original's row is logged the first time its gradient is computed in this run, or in an earlier
    # attempt that was resumed (its row is in the progress log), as in an uninterrupted run.
    first_seen = {r["id"] for r in first.metrics if r.get("role") == "original"}

    def on_gradient(enc: Encoded, role: str, seconds: float, q: Optional[int]) -> None:
        from gradsim.study.features import sample_metric

        if role == "query":
            owners[q][0].query_metric(sample_metric(enc, seconds, lm.device, cfg.dtype, "query"))
        elif enc.id not in first_seen:
            first_seen.add(enc.id)
            first.metric(sample_metric(enc, seconds, lm.device, cfg.dtype, "original"))

    def on_done(finished) -> None:
        for p in parts:
            mine = [(owners[q][1], d, qs, cs) for q, d, qs, cs in finished if owners[q][0] is p]
            if mine:
                p.record(*map(list, zip(*mine)))

    bar = progress_bar(total=len(owners) + plan.original_passes, desc="exact gradients", unit="pass")
    ExactStream(computer, cost, cache, bar, on_gradient, first.finite).run(plan, queries, cands, encs, on_done)
    bar.close()
    computer.release()


def attach_normalizer(p: Part, computer) -> Optional[dict]:
    """--normalize: estimate its state from every original (or load it, when another partition or
    setting of this study already did) and apply it to each gradient the computer makes from now on."""
    from gradsim.core.normalize import GradientNormalizer
    from gradsim.layout import normalizer_file

    cfg, lm = p.cfg, p.lm
    if cfg.normalize == "none":
        return None
    norm = GradientNormalizer(cfg.normalize, computer.layout, cfg.damping)
    path = normalizer_file(cfg.output_dir, manifest_key(normalizer_manifest(p.compat())))
    loaded = path.is_file()
    if loaded:
        with np.load(path) as z:
            norm.load(z, lm.device)
        log.info("--normalize %s: state from %s", cfg.normalize, path)
    else:
        bar = progress_bar(p.data.originals, desc=f"estimating --normalize {cfg.normalize}", unit="original")
        grads = ((s.id, computer.gradient(p.encode(s))) for s in bar)
        finite = (g for i, g in grads if p.finite.rows(computer.layout, g[None], [i], "original", "gradient"))
        norm.estimate(finite, lm.device)  # with --allow-nonfinite a non-finite gradient is left out
        atomic_save_npz(path, **norm.state())
    computer.transform = norm
    return {**norm.to_dict(), "estimation_backward_passes": 0 if loaded else norm.count}


def make_cache(p: Part, grad_bytes: int, cost):
    """Where originals may be kept between blocks, within its budget: host RAM beside a GPU, else scratch disk."""
    from gradsim.study.memory import budget_gb
    from gradsim.study.stream import OriginalCache

    cfg, device = p.cfg, p.lm.device
    host = budget_gb(cfg, "host_memory_gb", 0.0) if device.type == "cuda" else 0.0
    if host * 2**30 >= grad_bytes:
        return OriginalCache("host", int(host * 2**30), grad_bytes, None, cost)
    scratch = budget_gb(cfg, "scratch_gb", 0.0)
    if scratch * 2**30 >= grad_bytes:
        return OriginalCache("disk", int(scratch * 2**30), grad_bytes, p.paths.scratch, cost)
    return None
