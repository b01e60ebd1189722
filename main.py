"""Compute per-sample gradient similarities between originals and their variants (see README)."""

import sys

from gradsim.cli import main

if __name__ == "__main__":
    sys.exit(main())
