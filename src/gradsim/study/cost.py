"""What the exact path spent, over every attempt of a run and every partition of a campaign.

A run that is killed, preempted (SIGTERM), time-limited or fails is resumed by the next attempt, which
computes only what is left. Each attempt's spending is logged in the range's progress log as it goes
(with every finished block, so even SIGKILL loses at most the block it was in), and once more with its
end reason when it ends in an orderly way; results.json's ``cost`` sums them all (passes, tokens,
seconds, bytes) and lists the attempts. combine sums the partitions' costs the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

# The fields that add up across attempts and partitions.
ADDITIVE = (
    "query_passes",
    "original_passes",
    "tokens",
    "seconds",
    "originals_reused",
    "scratch_bytes_written",
    "scratch_bytes_read",
    "host_bytes_kept",
)
# How an attempt ended: a record logged while it ran and never closed is read back as "killed".
RUNNING, FINISHED, KILLED = "running", "finished", "killed"


@dataclass
class Cost:
    """What the exact path spent: reported in results.json (``cost``) and printed at the end."""

    # backward passes, their tokens (forward + backward, every pass) and time
    query_passes: int = 0
    original_passes: int = 0
    tokens: int = 0
    seconds: float = 0.0
    backward_seconds_per_token: Optional[float] = None
    # the schedule: "hold-queries" or "hold-originals", and how many gradients the budget held
    mode: str = ""
    held_gradients: int = 0
    shared_by: list[str] = field(default_factory=list)  # the settings whose queries shared this schedule
    # originals kept between blocks and read back instead of recomputed
    originals_reused: int = 0
    scratch_bytes_written: int = 0
    scratch_bytes_read: int = 0
    host_bytes_kept: int = 0

    def to_dict(self, num_queries: int) -> dict:
        d = dict(self.__dict__)
        d["backward_passes"] = {"query": self.query_passes, "original": self.original_passes}
        d["passes_per_query"] = round((self.query_passes + self.original_passes) / max(1, num_queries), 4)
        d["num_queries"] = num_queries
        return d

    def attempt(self, n: int, end: str) -> dict:
        """This attempt's record: its number, how it ended, what it spent and its schedule."""
        return {"attempt": n, "end": end, **{k: getattr(self, k) for k in ADDITIVE}, "mode": self.mode}


def end_reason(exc: BaseException) -> str:
    """How an attempt that raised ``exc`` ended: SIGTERM (lock.exit_on_sigterm's SystemExit), interrupted
    (Ctrl-C), or error."""
    if isinstance(exc, SystemExit) and exc.code == 128 + 15:
        return "SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "error"


def closed(attempts: dict[int, dict]) -> list[dict]:
    """Logged attempt records (the last per attempt), in order; one still "running" was killed."""
    return [dict(a, end=KILLED) if a["end"] == RUNNING else a for _, a in sorted(attempts.items())]


def total(cost: Cost, n: int, earlier: list[dict], num_queries: int) -> dict:
    """The cost record of a run whose last attempt (number ``n``) spent ``cost``, after the ``earlier``
    attempts: additive fields summed, the schedule of the last attempt that computed anything, every
    attempt listed. A clean single-attempt run's fields are its own."""
    out = dataclasses.replace(cost, shared_by=list(cost.shared_by))
    for a in earlier:
        for k in ADDITIVE:
            setattr(out, k, getattr(out, k) + a.get(k, 0))
    if not out.mode:  # this attempt had nothing left to compute
        out.mode = next((a["mode"] for a in reversed(earlier) if a.get("mode")), "")
    d = out.to_dict(num_queries)
    d["attempts"] = [*earlier, cost.attempt(n, FINISHED)]
    return d


def summed(costs: list[dict]) -> dict:
    """The cost records of a campaign's partitions (``total``'s) as one: additive fields and queries summed,
    passes per query over all of them, the schedule of the first, each partition's attempts listed (with
    its ``partition`` [start, end) where the record names one)."""
    out = dict(costs[0])
    for k in ADDITIVE:
        out[k] = sum(c.get(k, 0) for c in costs)
    out["num_queries"] = sum(c.get("num_queries", 0) for c in costs)
    out["held_gradients"] = max(c.get("held_gradients", 0) for c in costs)
    out["backward_passes"] = {"query": out["query_passes"], "original": out["original_passes"]}
    out["passes_per_query"] = round((out["query_passes"] + out["original_passes"]) / max(1, out["num_queries"]), 4)
    out.pop("partition", None)
    out["partitions"] = len(costs)
    out["attempts"] = [
        dict(a, partition=c["partition"]) if "partition" in c else a for c in costs for a in c.get("attempts", [])
    ]
    return out
