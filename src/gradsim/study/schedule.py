"""Which exact gradients to hold, in what order: fewest backward passes within a memory budget.

Exact per-sample gradients are too large to store for every original (4.7 GB each at 1.2B
parameters), so the exact path holds a *block* of gradients in memory and streams the others past
it, taking per-matrix dots as each streamed gradient is computed:

- hold queries: a block of queries is held; each original that some query of the block needs is
  computed once for the block (or read back from a cache of kept originals) and dotted with them.
  Queries of one id in both settings share their BM25 candidates, so they go in the same block, and
  blocks are grown greedily by candidate overlap, so that an original serves as many queries as it can.
- hold originals: when every needed original fits the budget (and that is cheaper), they are
  computed once and held, and each query is computed once and dotted with its candidates.

Backward passes per query: 1 + (originals computed) / (queries). The original study's protocol
recomputed all 5 candidates for every query: 6.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    mode: str  # "hold-queries" or "hold-originals"
    blocks: list[list[int]]  # query positions per block (hold-originals: one block of every query)
    capacity: int  # gradients the budget holds
    original_passes: int  # originals computed if nothing is kept between blocks

    @property
    def num_queries(self) -> int:
        return sum(len(b) for b in self.blocks)

    def passes_per_query(self) -> float:
        return (self.num_queries + self.original_passes) / max(1, self.num_queries)


def plan_blocks(cands: list[list[int]], groups: list[int], capacity: int) -> list[list[int]]:
    """Blocks of at most ``capacity`` query positions. Queries sharing a group (an id, in both
    settings) stay together where the capacity allows; each block is then grown with the group whose
    candidates overlap its union most (ties: fewer new originals, then input order)."""
    units: dict[int, list[int]] = {}
    for q, g in enumerate(groups):
        units.setdefault(g, []).append(q)
    pending = [u[i : i + capacity] for u in units.values() for i in range(0, len(u), capacity)]
    cand_sets = [set(c) for c in cands]
    same = all(s == cand_sets[0] for s in cand_sets)  # every original for every query: order does not matter
    unit_sets = [set().union(*(cand_sets[q] for q in u)) for u in pending]
    order = list(range(len(pending)))
    blocks: list[list[int]] = []
    while order:
        first = order.pop(0)
        block, union = list(pending[first]), set(unit_sets[first])
        while order and len(block) < capacity:
            fits = [u for u in order if len(block) + len(pending[u]) <= capacity]
            if not fits:
                break
            if same:
                best = fits[0]
            else:
                best = max(fits, key=lambda u: (len(union & unit_sets[u]), -len(unit_sets[u] - union), -u))
            order.remove(best)
            block += pending[best]
            union |= unit_sets[best]
        blocks.append(sorted(block))
    return blocks


def make_plan(cands: list[list[int]], groups: list[int], capacity: int) -> Plan:
    """The cheaper of holding query blocks and holding every needed original (when they fit)."""
    if capacity < 1:
        raise ValueError("capacity must hold at least one gradient")
    needed = {j for c in cands for j in c}
    blocks = plan_blocks(cands, groups, capacity)
    streamed = sum(len({j for q in b for j in cands[q]}) for b in blocks)
    if len(needed) <= capacity and len(needed) < streamed:
        return Plan("hold-originals", [list(range(len(cands)))], capacity, len(needed))
    return Plan("hold-queries", blocks, capacity, streamed)


def later_uses(blocks: list[list[int]], cands: list[list[int]]) -> dict[int, list[int]]:
    """For each original, the indices of the blocks that need it, in order."""
    uses: dict[int, list[int]] = {}
    for b, block in enumerate(blocks):
        for j in sorted({j for q in block for j in cands[q]}):
            uses.setdefault(j, []).append(b)
    return uses


def fewest_held(cands: list[list[int]], groups: list[int], capacity: int) -> int:
    """A smaller capacity whose plan makes no more backward passes than ``capacity``'s, by bisection (passes
    fall as the capacity grows, about monotonically; whatever is returned never costs a pass): holding more
    gradients than that only costs memory."""

    def passes(k: int) -> int:
        plan = make_plan(cands, groups, k)
        return plan.num_queries + plan.original_passes

    target, lo, hi = passes(capacity), 1, capacity
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return hi
