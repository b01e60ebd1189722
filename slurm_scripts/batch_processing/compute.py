#!/usr/bin/env python
"""Submit a run's query partitions as one Slurm job array (see docs/cluster.md).

    python slurm_scripts/batch_processing/compute.py --setting paraphrased \
        --computation-type gradient-similarity --num-partitions 10 [--backend submitit|sbatch] [--dry-run]

Every other main.py flag is passed through to the tasks; --status shows how the run is doing.
"""

import sys
from pathlib import Path

# Works from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from gradsim.cli.cluster import compute_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(compute_main())
