"""The command layer: the ``gradsim`` command (``gradsim COMMAND ...``, ``python -m gradsim``) and main.py's run.

The only layer that parses argv, prints results and turns errors into exit codes (tests/test_layers.py): one
module per command or group (run, variants, cluster, analysis, tools) over what they share (common). Each
command's module is imported when the command runs, so that ``gradsim --help`` stays quick.
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Optional

from gradsim.cli.common import build_parser, config_from_args, format_cost, format_summary, reports_errors
from gradsim.cli.run import main
from gradsim.options import Parser

__all__ = [
    "COMMANDS",
    "build_parser",
    "config_from_args",
    "format_cost",
    "format_summary",
    "gradsim_main",
    "main",
    "reports_errors",
]

Main = Callable[[Optional[list[str]]], int]


class Command(NamedTuple):
    """A verb of the ``gradsim`` command: ``load`` imports its module and gives its main(argv) and the parser
    behind its --help; ``help`` is its line in ``gradsim --help``."""

    load: Callable[[], tuple[Main, Callable[[], Parser]]]
    help: str


def _run():
    return main, build_parser


def _paraphrase():
    from gradsim.cli.variants import build_parser, paraphrase_main

    return paraphrase_main, build_parser


def _submit():
    from gradsim.cli.cluster import compute_main, compute_parser

    return compute_main, compute_parser


def _task():
    from gradsim.cli.cluster import task_main, task_parser

    return task_main, task_parser


def _status():
    from gradsim.cli.cluster import status_main, status_parser

    return status_main, status_parser


def _combine():
    from gradsim.cli.cluster import combine_main, combine_parser

    return combine_main, combine_parser


def _select():
    from gradsim.cli.analysis import select_main, select_parser

    return select_main, select_parser


def _frontier():
    from gradsim.cli.analysis import frontier_main, frontier_parser

    return frontier_main, frontier_parser


def _analyze():
    from gradsim.cli.analysis import analyze_main, analyze_parser

    return analyze_main, analyze_parser


def _memory():
    from gradsim.cli.tools import memory_main, memory_parser

    return memory_main, memory_parser


def _doctor():
    from gradsim.cli.tools import doctor_main, doctor_parser

    return doctor_main, doctor_parser


def _targets():
    from gradsim.cli.analysis import targets_main, targets_parser

    return targets_main, targets_parser


def _compare():
    from gradsim.cli.analysis import compare_main, compare_parser

    return compare_main, compare_parser


def _import_study():
    from gradsim.cli.analysis import import_study_main, import_study_parser

    return import_study_main, import_study_parser


# The `gradsim` command: one front door, a verb per thing researchers do; each verb keeps its own flags.
COMMANDS = {
    "run": Command(_run, "the study: gradients of originals and variants, scores, metrics (main.py)"),
    "paraphrase": Command(_paraphrase, "build the paraphrased / model-generated variants (paraphrase.py)"),
    "submit": Command(_submit, "split a run into partitions on Slurm (compute.py)"),
    "task": Command(_task, "one Slurm task of a submission: its typed task_config.json over one query range"),
    "status": Command(_status, "done / running / pending / failed partitions (status.py)"),
    "combine": Command(_combine, "merge finished partitions (combine_all.sh)"),
    "select": Command(_select, "greedy selection of parameter matrices on held-out queries"),
    "frontier": Command(_frontier, "select or project? quality against storage per sample, as table and figure"),
    "analyze": Command(_analyze, "figures and tables; runs the notebook headless"),
    "memory": Command(_memory, "memory and time the exact path needs per model size and dtype"),
    "doctor": Command(_doctor, "torch, CUDA build, driver and devices of this node; exit 2 if one is missing"),
    "targets": Command(_targets, "loss target x normalizer table beside the baselines (issue 10)"),
    "compare": Command(_compare, "two runs on the same queries: paired differences, rank agreement"),
    "import-study": Command(
        _import_study, "the original study's published dot products as a gradsim run (both views, checked)"
    ),
}


def gradsim_main(argv: Optional[list[str]] = None) -> int:
    """The ``gradsim`` command. Output cut short by its reader (``gradsim --help | head -3``) ends it quietly:
    no BrokenPipeError traceback, exit 1 (what Python's documentation advises for SIGPIPE)."""
    import os

    try:
        try:
            return _dispatch(argv)
        finally:
            sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below (argparse's exit too)
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that this raises nothing either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _dispatch(argv: Optional[list[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print(
            "usage: gradsim COMMAND [options]   (gradsim COMMAND --help for its options)\n\ncommands:\n"
            + "\n".join(lines)
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    from gradsim.options import invoked_as

    main, _ = COMMANDS[argv[0]].load()
    sys.argv = [f"gradsim {argv[0]}", *argv[1:]]
    with invoked_as(sys.argv[0]):  # every usage line names `gradsim COMMAND`, not compute.py or python -m ...
        return main(argv[1:])
