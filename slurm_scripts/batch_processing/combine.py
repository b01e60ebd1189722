#!/usr/bin/env python
"""Merge finished partitions into one result per run and print its summary metrics.

    python slurm_scripts/batch_processing/combine.py [RUN_DIR ...] [--output-dir data]

Without RUN_DIR it merges every run with partitions under the output dir. It refuses, saying why,
when partitions are missing, overlap or were made with different configurations.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from gradsim.cli.cluster import combine_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(combine_main())
