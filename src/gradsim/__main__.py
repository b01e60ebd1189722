"""``python -m gradsim COMMAND ...``: the ``gradsim`` command (how Slurm tasks start, with no checkout needed)."""

import sys

from gradsim.cli import gradsim_main

if __name__ == "__main__":
    sys.exit(gradsim_main())
