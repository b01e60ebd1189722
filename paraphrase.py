"""Build the paraphrased and model-generated variant datasets (see docs/paraphrase-and-analysis.md)."""

import sys

from gradsim.variants.paraphrase import main

if __name__ == "__main__":
    sys.exit(main())
