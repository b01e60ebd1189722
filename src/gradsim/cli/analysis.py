"""The analysis commands: gradsim select, frontier, analyze, targets, compare and import-study.

Each takes its flags here and calls gradsim.analysis, which computes and writes; what a command prints is here too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gradsim.analysis.frontier import DEFAULT_SIZES
from gradsim.cli.common import format_summary, reports_errors
from gradsim.config import ALLOCATIONS
from gradsim.core.metrics import BOOTSTRAP_SEED
from gradsim.errors import GradsimError
from gradsim.options import Parser, from_args, option


def _first_paragraph(module) -> str:
    """A command's description: the first paragraph of its domain module's docstring."""
    return module.__doc__.split("\n\n")[0]


# gradsim select
# --------------------------------------------------------------------------------------------


@dataclass
class SelectOptions:
    """The options of gradsim select."""

    run_dir: str = option("a finished run (or merged partitions): holds results.json and scores.npz", positional=True)
    seed: int = option("seed of the half/half query split", default=0)
    protocol: str = option(
        "bm25: the BM25 top-k protocol picked out of a --candidates all run",
        default="as-run",
        choices=("as-run", "bm25"),
    )
    max_size: int | None = option("stop after this many matrices", default=None)
    include_noisy: bool = option(
        "on a projected run, also choose among the matrices its per_matrix_fidelity flags as too noisy to rank",
        default=False,
        const=True,
    )


def select_parser() -> Parser:
    from gradsim.analysis import selection

    return Parser.of(SelectOptions, "gradsim select", _first_paragraph(selection))


@reports_errors
def select_main(argv: list[str] | None = None) -> int:
    from gradsim.analysis.selection import held_out_intervals, select_run
    from gradsim.core.metrics import BOOTSTRAP_NOTE, format_interval

    a = from_args(SelectOptions, select_parser().parse_args(argv))
    out = select_run(Path(a.run_dir), a.seed, a.protocol, a.max_size, a.include_noisy)
    full, held = out["full_gradient_held_out"], out["held_out"] or {}
    if out["excluded_noisy"]:
        print(f"left out {len(out['excluded_noisy'])} matrices too noisy to rank under the run's projection")
    print(
        f"chose {len(out['chosen'])} matrices: {', '.join(out['chosen'][:8])}{' ...' if len(out['chosen']) > 8 else ''}"
    )
    ci = held_out_intervals(Path(a.run_dir), out)
    sel = ci.get("selected", {"top1": [float("nan")] * 2, "mrr": [float("nan")] * 2})
    print(
        f"held-out ({full['n']} queries): selected top-1 {held.get('top1', float('nan')):.3f} "
        f"{format_interval(sel['top1'])} MRR {held.get('mrr', float('nan')):.3f} {format_interval(sel['mrr'])} | "
        f"full gradient top-1 {full['top1']:.3f} {format_interval(ci['full']['top1'])} MRR {full['mrr']:.3f} "
        f"{format_interval(ci['full']['mrr'])}  [intervals: {BOOTSTRAP_NOTE}]"
    )
    return 0


# gradsim frontier
# --------------------------------------------------------------------------------------------


@dataclass
class FrontierOptions:
    """The options of gradsim frontier."""

    run_dirs: list[Path] = option("exact runs (one per setting) of one model and data", positional=True, nargs="+")
    output_dir: Optional[Path] = option(
        "where frontier.json and frontier.png go", default=None, default_help="beside the runs"
    )
    projections: str = option(
        "comma list of tensorsketch, countsketch, factorized, trak, or none (trak regenerates its Gaussian "
        "matrices on every call: slow on a CPU, fast with fast_jl on CUDA)",
        default="tensorsketch,countsketch,factorized",
    )
    sizes: str = option(
        "total dims per sample to project to (comma list); factorized and trak: the nearest power of two per matrix",
        default=",".join(str(s) for s in DEFAULT_SIZES),
    )
    splits: int = option("random choose/report splits of the queries", default=10)
    max_size: int = option("largest greedy subset (matrices)", default=16)
    device: Optional[str] = option("device for the projection pass", default=None, default_help="the runs' own")
    allocation: str = option(
        "how the sketches share their dims among the matrices (as main.py's --allocation)",
        default="norm",
        choices=ALLOCATIONS,
    )
    batch_size: int = option("samples per forward/backward (hook-formed sketches)", default=1)


def frontier_parser() -> Parser:
    from gradsim.analysis import frontier

    return Parser.of(FrontierOptions, "gradsim frontier", _first_paragraph(frontier))


@reports_errors
def frontier_main(argv: Optional[list[str]] = None) -> int:
    from gradsim.analysis.frontier import frontier
    from gradsim.analysis.frontier_table import format_table, plot
    from gradsim.io import atomic_write_json, read_json
    from gradsim.layout import frontier_files, whole_run

    a = from_args(FrontierOptions, frontier_parser().parse_args(argv))
    kinds = [] if a.projections.strip() == "none" else [k.strip() for k in a.projections.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("tensorsketch", "countsketch", "factorized", "trak")]
    if bad:
        raise GradsimError(
            f"--projections {','.join(bad)}: choose from tensorsketch, countsketch, factorized, trak or none"
        )
    try:
        sizes = sorted({int(s) for s in a.sizes.split(",") if s.strip()})
    except ValueError:
        raise GradsimError(f"--sizes {a.sizes!r}: give a comma list of positive integers") from None
    if not sizes or sizes[0] < 1 or a.splits < 1 or a.max_size < 1:
        raise GradsimError("--sizes, --splits and --max-size must be positive")
    out_dir = a.output_dir or Path(a.run_dirs[0]).resolve().parent / "frontier"
    result = frontier(a.run_dirs, kinds, sizes, a.splits, a.max_size, a.device, a.batch_size, allocation=a.allocation)
    table, figure = frontier_files(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(result, figure)
    atomic_write_json(table, result)
    print(format_table(result))
    for note in result.get("notes", []):
        print(note)
    for run in result["runs"]:  # each run's own summary, with bootstrap intervals over its queries
        print(f"{run}: {format_summary(read_json(whole_run(Path(run)).results))}")
    print(f"wrote {table} and {figure} ({result['seconds']:.0f} s)")
    return 0


# gradsim analyze
# --------------------------------------------------------------------------------------------


@dataclass
class AnalyzeOptions:
    """The options of gradsim analyze."""

    execute: str = option("the notebook to run, e.g. notebooks/analysis.ipynb", metavar="NOTEBOOK")
    results_dir: Optional[str] = option(
        "an --output-dir of main.py", default=None, default_help="GRADSIM_RESULTS_DIR or data/"
    )
    computation_type: str = option("the runs' --computation-type", default="gradient-similarity")


def analyze_parser() -> Parser:
    return Parser.of(AnalyzeOptions, "gradsim analyze", "Execute the analysis notebook headless on finished runs.")


def analyze_main(argv: Optional[list[str]] = None) -> int:
    from gradsim.analysis.figures import load_runs
    from gradsim.analysis.notebook import execute_notebook

    args = from_args(AnalyzeOptions, analyze_parser().parse_args(argv))
    try:
        out = execute_notebook(args.execute, args.results_dir, args.computation_type)
    except GradsimError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"executed {args.execute}: {out} (figures beside it)")
    for run in load_runs(out.parent).values():  # the runs it analysed (the executed copy is beside them)
        print(f"{run.name}: {format_summary(run.result)}")
    return 0


# gradsim targets
# --------------------------------------------------------------------------------------------


def targets_parser() -> Parser:
    from gradsim.analysis.targets import TargetOptions
    from gradsim.config import add_options
    from gradsim.options import add_quiet_flag

    p = Parser(
        prog="gradsim targets",
        description="Loss target (response, prompt, all) x normalizer, beside BM25, representation similarity and "
        "random, for both settings: 1-of-(k+1) BM25 candidates and the whole corpus.",
    )
    shared = ("model_name", "original_data", "paraphrased_data", "model_generated_data", "sample_size")
    add_options(p, (*shared, "max_length", "top_k", "device", "dtype", "seed", "damping", "output_dir"))
    p.add_options(TargetOptions)
    add_quiet_flag(p)
    return p


@reports_errors
def targets_main(argv: Optional[list[str]] = None) -> int:
    from gradsim.analysis.targets import TargetOptions, format_table, run_targets
    from gradsim.config import Config, env_defaults
    from gradsim.io import atomic_write_json
    from gradsim.layout import targets_file
    from gradsim.options import parse_flags

    args = parse_flags(targets_parser(), argv)
    opts = from_args(TargetOptions, args)
    if opts.dims_per_matrix < 1 or opts.bootstrap < 1:
        raise GradsimError("--dims-per-matrix and --bootstrap must be positive integers")
    cfg = from_args(Config, args, fallback={**env_defaults(), "setting": "both"})
    out = targets_file(cfg.output_dir)
    result = run_targets(cfg, opts)
    result.pop("_scores")
    atomic_write_json(out, result)
    print(format_table(result))
    print(f"\nwritten: {out} ({result['seconds']:.0f} s)")
    return 0


# gradsim compare
# --------------------------------------------------------------------------------------------


@dataclass
class CompareOptions:
    """The options of gradsim compare."""

    a: str = option("a finished run folder (results.json), e.g. an imported study", positional=True)
    b: str = option("another finished run folder on the same query ids", positional=True)
    seed: int = option("seed of the paired bootstrap", default=BOOTSTRAP_SEED)
    output: Optional[str] = option("also write the comparison (every disagreeing query) to this JSON", default=None)


def compare_parser() -> Parser:
    from gradsim.analysis import compare

    return Parser.of(CompareOptions, "gradsim compare", _first_paragraph(compare))


@reports_errors
def compare_main(argv: Optional[list[str]] = None) -> int:
    from gradsim.analysis.compare import compare, format_comparison
    from gradsim.io import atomic_write_json

    opts = from_args(CompareOptions, compare_parser().parse_args(argv))
    out = compare(Path(opts.a), Path(opts.b), opts.seed)
    print(format_comparison(out))
    if opts.output:
        atomic_write_json(Path(opts.output), out)
        print(f"wrote {opts.output}")
    return 0


# gradsim import-study
# --------------------------------------------------------------------------------------------


def import_study_parser() -> Parser:
    from gradsim.analysis import study_import

    return Parser.of(study_import.ImportOptions, "gradsim import-study", _first_paragraph(study_import))


@reports_errors
def import_study_main(argv: Optional[list[str]] = None) -> int:
    from gradsim.analysis.study_import import ImportOptions, import_study
    from gradsim.config import Config
    from gradsim.layout import run_dir

    opts = from_args(ImportOptions, import_study_parser().parse_args(argv))
    results = import_study(Path(opts.path), opts.setting, opts)
    for r in results:
        if r["partition"]["end"] - r["partition"]["start"] == r["partition"]["num_queries"]:
            print(format_summary(r))
    dirs = sorted({str(Path(run_dir(Config.from_dict(r["config"])))) for r in results})
    print(f"imported {results[0]['study_import']['queries']} queries into {', '.join(dirs)}")
    return 0
