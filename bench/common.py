"""What the bench scripts share: the checkout's paths, the bundled sample, log lines, the machine description,
the parser built from a script's docstring and the markdown tables they print.

A bench script is run as ``python bench/NAME.py`` (bench/ is then on sys.path) and imports this as ``common``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "gradsim" / "bundled" / "lima_sample"  # the bundled sample (package data)
LIMA = ROOT.parent / "shared" / "data" / "lima" / "train.jsonl"  # the full LIMA corpus, where a machine has it


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def machine_info() -> dict:
    """The machine a result was measured on: CPU, cores, torch threads, memory, versions, when."""
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "utc": utc(),
    }


def doc_parser(doc: str, epilog_from: int = 1) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as the description, the paragraphs from
    ``epilog_from`` on as the epilog (as written)."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", epilog_from)[epilog_from],
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table: the header, its rule, one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(str(c) for c in line) + " |" for line in (header, *rows)]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])
