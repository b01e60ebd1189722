"""Build the paraphrased and model-generated variant datasets (see docs/paraphrase-and-analysis.md)."""

import sys

from gradsim.cli.variants import paraphrase_main as main

if __name__ == "__main__":
    sys.exit(main())
