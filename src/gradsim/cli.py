"""Command-line entry point of main.py: parse flags over .env defaults, run, print the summary."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .config import CANDIDATE_MODES, COMPUTATION_TYPES, DTYPES, PROJECTIONS, SETTINGS, Config, env_defaults, redact
from .errors import GradsimError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Per-sample gradient similarity between LIMA originals and their variants. "
        "Flags override .env (MT_MODEL_NAME, MT_DEVICE, MT_DTYPE, MT_SAMPLE_SIZE, USE_GPU).",
    )
    p.add_argument("--setting", default="paraphrased", help=f"one of {', '.join(SETTINGS)}")
    p.add_argument("--computation-type", default="gradient-similarity", help=f"one of {', '.join(COMPUTATION_TYPES)}")
    p.add_argument("--candidates", default="bm25",
                   help=f"{' or '.join(CANDIDATE_MODES)}: own original + BM25 top-k others (the study's protocol), or every original")
    p.add_argument("--top-k", type=int, default=4, help="BM25 candidates besides the true original (default 4: chance 1/5)")
    p.add_argument("--use-random-projection", action="store_true", help="project gradients (see --projection, --proj-dim)")
    p.add_argument("--projection", default="tensorsketch", help=f"one of {', '.join(PROJECTIONS)} (default tensorsketch)")
    p.add_argument("--proj-dim", type=int, help="projected dimensions: in all for tensorsketch and countsketch (default "
                   "65536), per parameter matrix for factorized and trak (default 4096)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--partition-start", type=int, help="first query index of this partition")
    p.add_argument("--partition-end", type=int, help="query index one past the end of this partition")
    p.add_argument("--original-data", help="original samples: JSONL path or hub id (default: bundled sample)")
    p.add_argument("--variant-data", help="variants (queries): JSONL path or hub id (default: bundled file of --setting)")
    p.add_argument("--model", dest="model_name", help="HF model id or local directory (default: MT_MODEL_NAME or embedded)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: MT_DEVICE, else CUDA when available and USE_GPU=1)")
    p.add_argument("--dtype", help=f"{' or '.join(DTYPES)} compute dtype (default: MT_DTYPE or float32)")
    p.add_argument("--sample-size", type=int, help="use only the first N originals (default: MT_SAMPLE_SIZE or all)")
    p.add_argument("--max-length", type=int, help="truncate longer samples (flagged in the output); default: model context")
    p.add_argument("--batch-size", type=int, default=1, help="samples per forward/backward where the method batches")
    p.add_argument("--no-baselines", dest="baselines", action="store_const", const=False,
                   help="skip the BM25 and representation-similarity baselines")
    p.add_argument("--output-dir", help="where results go (default: data/)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    return p


def config_from_args(argv: Optional[list[str]] = None) -> Config:
    args = vars(build_parser().parse_args(argv))
    quiet = args.pop("quiet")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    values = env_defaults()
    values.update({k: v for k, v in args.items() if v is not None})
    return Config(**values)


def format_summary(result: dict) -> str:
    s = result["summary"]["whole_model"]
    cfg = result["config"]
    best = max(result["summary"]["per_matrix"].items(), key=lambda kv: (kv[1]["top1"], kv[1]["mrr"]))
    return (
        f"{cfg['setting']} / {cfg['computation_type']} ({cfg['candidates']}, n={s['n']}): "
        f"top-1 {s['top1']:.3f}  MRR {s['mrr']:.3f}  recall@5 {s['recall@5']:.3f}  "
        f"| best matrix {best[0]} top-1 {best[1]['top1']:.3f}"
    )


def main(argv: Optional[list[str]] = None) -> int:
    from .run import run

    try:
        cfg = config_from_args(argv)
        result = run(cfg)
    except GradsimError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    print(format_summary(result))
    return 0
