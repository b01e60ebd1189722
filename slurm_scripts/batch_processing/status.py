#!/usr/bin/env python
"""Which partitions of the submitted runs are done, running, pending or failed (with log tails).

python slurm_scripts/batch_processing/status.py [SUBMISSION_OR_RUN_JOBS_DIR ...] [--output-dir data]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from gradsim.cli.cluster import status_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(status_main())
