"""What the commands share: the study's flags (main.py's parser, also passed through by gradsim submit), the
one-line summaries they print, and how a command's errors become one line and an exit code."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from gradsim.config import ENV_OPTIONS, SKETCHED, Config, add_options, env_defaults
from gradsim.credentials import redact
from gradsim.errors import GradsimError
from gradsim.options import Parser, add_quiet_flag, from_args, option, parse_flags
from gradsim.roles import PROJECTION

log = logging.getLogger("gradsim")


@dataclass(frozen=True)
class ProjectionNames:
    """--proj-dim has one meaning, the total number of projected dims (tensorsketch, countsketch); the
    per-matrix size of factorized and trak has its own name. Both land in Config.proj_dim, whose meaning
    the projection states (results' projection spec)."""

    dims_per_matrix: Optional[int] = option(
        "dims per parameter matrix for --projection factorized or trak (default 4096); the sketches take "
        "their total with --proj-dim",
        default=None,
        group=PROJECTION,
    )


def build_parser() -> Parser:
    p = Parser(
        prog="main.py",
        description="Per-sample gradient similarity between LIMA originals and their variants. "
        f"Flags override .env ({', '.join(o.env for o in ENV_OPTIONS)}).",
    )
    add_options(p)  # every flag from config.OPTIONS: types and defaults from Config
    p.add_options(ProjectionNames)
    add_quiet_flag(p)
    return p


def config_from_args(argv: Optional[list[str]] = None) -> Config:
    args = parse_flags(build_parser(), argv)
    per_matrix = args.pop("dims_per_matrix", None)
    cfg = from_args(Config, args, fallback=env_defaults())
    return projection_size(cfg, args.get("proj_dim"), per_matrix)


def projection_size(cfg: Config, proj_dim: Optional[int], per_matrix: Optional[int]) -> Config:
    """cfg with --dims-per-matrix as its proj_dim: refused with a sketch or beside --proj-dim; --proj-dim given
    for factorized or trak (read as dims per matrix, as before) is warned about."""
    per_matrix_kind = cfg.projection not in SKETCHED
    if per_matrix is not None:
        if not per_matrix_kind:
            raise GradsimError(
                f"--dims-per-matrix is for --projection factorized or trak; {cfg.projection} shares a total "
                "among the matrices: give --proj-dim instead"
            )
        if proj_dim is not None and proj_dim != per_matrix:
            raise GradsimError(
                f"--proj-dim {proj_dim} and --dims-per-matrix {per_matrix} both set the size of --projection "
                f"{cfg.projection}: give --dims-per-matrix only"
            )
        return dataclasses.replace(cfg, proj_dim=per_matrix)
    if proj_dim is not None and per_matrix_kind and cfg.use_random_projection:
        log.warning(
            "--proj-dim %d with --projection %s is read as %d dims per parameter matrix (--proj-dim is the "
            "total for the sketches): --dims-per-matrix %d says so",
            proj_dim,
            cfg.projection,
            proj_dim,
            proj_dim,
        )
    return cfg


def format_summary(result: dict) -> str:
    """A run's one summary line: whole-model metrics, top-1 and MRR with bootstrap intervals over its queries
    (metrics.BOOTSTRAP_NOTE), chance, the best matrix."""
    from gradsim.core.metrics import BOOTSTRAP_NOTE, format_interval, rank_intervals

    s = result["summary"]["whole_model"]
    ranks = [q["rank"] for q in result.get("queries", ())]
    ci = rank_intervals(ranks) if ranks else None
    top1 = f"top-1 {s['top1']:.3f}" + (f" {format_interval(ci['top1'])}" if ci else "")
    mrr = f"MRR {s['mrr']:.3f}" + (f" {format_interval(ci['mrr'])}" if ci else "")
    cfg = result["config"]
    best = max(result["summary"]["per_matrix"].items(), key=lambda kv: (kv[1]["top1"], kv[1]["mrr"]))
    chance = (result.get("baselines") or {}).get("random", {}).get("top1")
    noisy = set((result.get("per_matrix_fidelity") or {}).get("noisy", []))
    return (
        f"{cfg['setting']} / {cfg['computation_type']}"
        + (f" / loss on {cfg['loss_on']}" if cfg.get("loss_on", "response") != "response" else "")
        + (" / all turns" if cfg.get("turns", "first") != "first" else "")
        + (f" / {cfg['normalize']}" if cfg.get("normalize", "none") != "none" else "")
        + f" ({cfg['candidates']}, n={s['n']}): "
        f"{top1}  {mrr}  recall@5 {s['recall@5']:.3f}"
        + (f"  (chance top-1 {chance:.3f})" if chance is not None else "")
        + f"  | best matrix {best[0]} top-1 {best[1]['top1']:.3f}"
        + (" (noisy: its projection's predicted p90 cosine error > 0.05)" if best[0] in noisy else "")
        + (f"  [intervals: {BOOTSTRAP_NOTE}]" if ci else "")
    )


def format_cost(cost: dict) -> str:
    """The exact path's spending: backward passes per query (the original study: 1 + 5 candidates = 6)."""
    shared = " + ".join(cost.get("shared_by") or [])
    return (
        f"cost ({shared}): {cost['passes_per_query']:.2f} backward passes per query "
        f"({cost['backward_passes']['query']} queries + {cost['backward_passes']['original']} originals, "
        f"{cost.get('originals_reused', 0)} originals kept and reused; {cost['mode']}, "
        f"{cost['held_gradients']} gradients held), scratch written {cost['scratch_bytes_written'] / 2**30:.2f} GB, "
        f"read {cost['scratch_bytes_read'] / 2**30:.2f} GB, {cost['seconds']:.0f} s"
    )


def reports_errors(main: Callable[[Optional[list[str]]], int]) -> Callable[[Optional[list[str]]], int]:
    """A command's main(argv): bad input (a GradsimError) ends it with a one-line ``error: ...`` and the
    error's exit code, Ctrl-C with a hint to rerun (a rerun resumes) and 130."""

    @functools.wraps(main)
    def guarded(argv: Optional[list[str]] = None) -> int:
        try:
            return main(argv)
        except GradsimError as e:
            print(f"error: {redact(str(e))}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to resume", file=sys.stderr)
            return 130

    return guarded
