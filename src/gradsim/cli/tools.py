"""The planning tools: gradsim memory (what a model needs) and gradsim doctor (what this node offers)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from gradsim.options import Parser, from_args, option, positionals

# gradsim memory
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryOptions:
    """The options of gradsim memory."""

    tokens: list[int] = positionals("sample lengths in tokens, one table each", default_factory=lambda: [512, 2048])


def memory_parser() -> Parser:
    return Parser.of(MemoryOptions, "gradsim memory", "GB the exact path needs on the device per model and dtype.")


def memory_main(argv: Optional[list[str]] = None) -> int:
    """Print the memory table for the given token counts (default 512 and 2048), then the study's time."""
    from gradsim.study.estimate import ASSUMED_GPU_FRACTION, CPU_SOURCE
    from gradsim.study.memory import (
        STUDY_MEAN_TOKENS,
        STUDY_PASSES_PER_QUERY,
        STUDY_QUERIES,
        memory_table,
        time_table,
    )

    for t in from_args(MemoryOptions, memory_parser().parse_args(argv)).tokens:
        print(f"\nExact path, GB on the device for samples of {t} tokens (one held gradient):\n")
        print(memory_table(t))
    print(
        f"\nTime of the full study ({STUDY_QUERIES} queries: 988 LIMA ids x 2 settings, 1-of-5, mean "
        f"{STUDY_MEAN_TOKENS} tokens, {STUDY_PASSES_PER_QUERY} backward passes per query, 6 P T FLOPs each):\n"
    )
    print(time_table())
    print(
        f"\nGPUs: {ASSUMED_GPU_FRACTION:.0%} of the card's dense peak, assumed (no GPU measurement yet); CPU: "
        f"{CPU_SOURCE}. For a run's own schedule, lengths and tasks: gradsim submit ... --dry-run"
    )
    return 0


# gradsim doctor
# --------------------------------------------------------------------------------------------


@dataclass
class DoctorOptions:
    """gradsim doctor's options."""

    device: str = option(
        "the device a run will ask for: cpu, cuda or cuda:N (exit 2 when it is missing)", default="cuda"
    )


def doctor_parser() -> Parser:
    from gradsim.core import doctor

    return Parser.of(DoctorOptions, "gradsim doctor", doctor.__doc__.splitlines()[0])


def doctor_main(argv: Optional[list[str]] = None) -> int:
    """Print what this node offers; exit 2 when the device asked for is not there."""
    from gradsim.core.doctor import cuda_missing, facts, format_facts

    args = from_args(DoctorOptions, doctor_parser().parse_args(argv))
    f = facts()
    print(format_facts(f))
    want = args.device
    if want.startswith("cuda"):
        index = int(want.split(":")[1]) if ":" in want else 0
        if not f["cuda_available"]:
            print(f"error: {cuda_missing(want)}", file=sys.stderr)
            return 2
        if index >= len(f["devices"]):
            print(f"error: device {want!r} does not exist ({len(f['devices'])} CUDA devices)", file=sys.stderr)
            return 2
    elif want != "cpu":
        print(f"error: unknown device {want!r}: use cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    print(f"ok: {want} is available")
    return 0
