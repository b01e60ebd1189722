"""The study, one straight line: load -> encode -> per-sample gradients -> score -> store -> summarise.

A run covers the queries [start, end) of one setting, or of both settings at once (``--setting
both``: a paraphrased and a model-generated query of one id share their BM25 candidates, so each
candidate's gradient serves both). Exact gradients are never stored: a block of them is held in
memory and the others are streamed past it (stream.py, planned by schedule.py). Projected features
are small: originals are featurized once into a store shared by every partition and both settings.
Finished query blocks are logged to a progress file, so a killed or preempted run resumes where it
stopped and ends with the same bytes as an uninterrupted one.

This module is the flow, top to bottom: each setting's share (prepare), the model, one lock per range,
then score and write (score_parts). The stages are modules of their own: part.py (a setting's Part: its
config, provenance, model, data, files and progress log), exact.py and projected.py (the two ways to
score), baselines.py, and outputs.py (resume, assemble, write).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from contextlib import ExitStack
from typing import Callable, Optional

from gradsim import __version__, matrices
from gradsim.config import RUN_TIME_ENV, Config
from gradsim.core.model import LoadedModel, load_model, resolve_device
from gradsim.data.load import Dataset, partition_range
from gradsim.data.retrieval import candidate_lists
from gradsim.errors import GradsimError
from gradsim.io import ensure_writable_dir, read_json
from gradsim.layout import RunPaths, run_dir
from gradsim.study.baselines import baseline_scores, check_stores_writable
from gradsim.study.context import load_data, setting_configs
from gradsim.study.cost import closed
from gradsim.study.cost import total as total_cost
from gradsim.study.exact import end_attempt, score_exact, start_attempt
from gradsim.study.lock import exit_on_sigterm, locked
from gradsim.study.memory import check_exact_fits
from gradsim.study.outputs import assemble, finished_result, log_truncation, resume, write_outputs
from gradsim.study.part import (
    Part,
    Share,
    check_encodable,
    code_version,
    resolved_max_length,
    skip_overlong,
    store_manifest,
)
from gradsim.study.projected import score_projected

# The entry points, and the names callers imported from here before the stages became modules of their own
__all__ = [
    "Part",
    "assemble",
    "code_version",
    "resolved_max_length",
    "run",
    "run_parts",
    "setting_configs",
    "store_manifest",
    "write_outputs",
]

log = logging.getLogger("gradsim")


def check_budgets(cfg: Config) -> None:
    """The budgets' environment variables (GRADSIM_MEMORY_GB, GRADSIM_SCRATCH_GB, GRADSIM_HOST_MEMORY_GB; a
    number >= 0) checked where a flag does not override them, before the model loads or a finished run is
    found, so a typo never waits for the model and never passes unseen."""
    from gradsim.study.memory import budget_gb

    for name in RUN_TIME_ENV:
        budget_gb(cfg, name, None)


def prepare(cfg: Config, keep: Optional[Callable[[Config, Dataset], Dataset]] = None) -> list[Share]:
    """Each setting's share: its data (less what ``keep`` leaves out: skip_overlong), query range and files."""
    cfg.validate()
    check_budgets(cfg)
    shares = []
    for c in setting_configs(cfg):
        data = load_data(c)
        if keep is not None:
            data = keep(c, data)
        n = len(data.queries)
        if c.candidates == "bm25" and c.top_k > len(data.originals) - 1:
            # Fewer candidates than asked: chance is then 1/len(data.originals), not 1/(top_k + 1)
            # (results' baselines.random reports the real level).
            log.warning(
                "--top-k %d asks for more BM25 candidates than the %d other originals: each query gets %d "
                "candidates, so chance is 1/%d, not 1/%d",
                c.top_k,
                len(data.originals) - 1,
                len(data.originals),
                len(data.originals),
                c.top_k + 1,
            )
        if cfg.setting == "both":  # the range applies to each setting's own queries, clipped to its length
            s, e = cfg.partition_start or 0, min(n if cfg.partition_end is None else cfg.partition_end, n)
            if s >= e:
                log.info(
                    "%s: no queries in [%s, %s) (it has %d): skipped",
                    c.setting,
                    cfg.partition_start,
                    cfg.partition_end,
                    n,
                )
                continue
            c = dataclasses.replace(c, partition_start=s, partition_end=e)
        s, e = partition_range(n, c.partition_start, c.partition_end)
        shares.append(Share(c, data, s, e, RunPaths(run_dir(c), s, e, (s, e) != (0, n))))
    if not shares:
        raise GradsimError(
            f"partition [{cfg.partition_start}, {cfg.partition_end}) holds no query of either setting: "
            "lower --partition-start"
        )
    if len({s.data.original_sha256 for s in shares}) > 1:
        raise GradsimError("the two settings read different originals: give both the same --original-data")
    return shares


def run(cfg: Config, lm: Optional[LoadedModel] = None) -> dict:
    """Run the study; the result as stored (results.json). With ``--setting both``: {"settings": {setting: result}}."""
    results = run_parts(cfg, lm)
    return results[0] if cfg.setting != "both" else {"settings": {r["config"]["setting"]: r for r in results}}


def run_parts(cfg: Config, lm: Optional[LoadedModel] = None) -> list[dict]:
    device = lm.device if lm is not None else resolve_device(cfg)  # a missing GPU first: nothing else is read
    shares = prepare(cfg)
    for s in shares:
        ensure_writable_dir(s.paths.part_dir if s.paths.partitioned else s.paths.run_dir)
    for s in shares:
        log.info(
            "gradsim %s: model=%s device=%s dtype=%s %s queries=[%d, %d) of %d",
            __version__,
            cfg.model_name,
            device,
            cfg.dtype,
            s.cfg.setting,
            s.start,
            s.end,
            len(s.data.queries),
        )
    if lm is None:
        if not cfg.use_random_projection:
            check_exact_fits(cfg, device)  # from the model's config alone, before its weights are loaded
        lm = load_model(cfg, device)
    if cfg.skip_overlong:  # the rows to leave out are known once the tokenizer is
        shares = prepare(cfg, lambda c, data: skip_overlong(c, data, lm))
    version = code_version()
    parts = [Part.of(s, lm, version) for s in shares]
    check_encodable(parts)  # bad input (a prompt longer than --max-length) before anything is written
    with ExitStack() as held:
        held.enter_context(exit_on_sigterm())
        for p in parts:  # one process per query range: its progress log, blocks and scratch are its own
            held.enter_context(
                locked(p.paths.lock, f"{p.cfg.setting} queries [{p.start}, {p.end}) of {p.paths.run_dir}")
            )
        try:
            return run_locked(parts)
        except OSError as e:
            raise write_error(e) from None


def write_error(e: OSError) -> Exception:
    """A failed write (a full disk, a file too large, a quota, a read-only file system) as a one-line error
    naming the file; other OS errors as they are."""
    import errno

    if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return e
    where = f" {e.filename}" if e.filename else ""
    return GradsimError(
        f"cannot write{where} ({e.strerror or e}): free some space or make it writable (or pass another "
        "--output-dir), then rerun the same command: it resumes from the blocks already finished"
    )


def run_locked(parts: list[Part]) -> list[dict]:
    from gradsim.study.stream import remove_stale_scratch

    for p in parts:
        if removed := remove_stale_scratch(p.paths.scratch):  # we hold the range's lock: its scratch is no one's
            log.warning("removed %d scratch files left by a run of this range that died: %s", removed, p.paths.scratch)
        p.finished = finished_result(p)
    todo = [p for p in parts if p.finished is None]
    if todo:
        with matrices.only(todo[0].lm.model, selected_matrices(todo[0])):
            try:
                score_parts(todo)
            except BaseException as e:
                end_attempt(todo, e)
                raise
    return [p.finished for p in parts]


def selected_matrices(p: Part) -> Optional[list[str]]:
    """--matrices resolved against the model's trainable parameters (None: all of them)."""
    if p.cfg.matrices is None:
        return None
    from gradsim.core.gradients import param_layout

    chosen = matrices.resolve(p.cfg.matrices, param_layout(p.lm.model).names, p.lm.model_id)
    log.info("--matrices: %d of the model's parameter matrices", len(chosen))
    return chosen


def score_parts(todo: list[Part]) -> None:
    """Score the unfinished parts (with --matrices, only those matrices), then write their results."""
    cfg = todo[0].cfg
    if cfg.use_random_projection:
        from gradsim.core.projection import check_proj_dim

        check_proj_dim(cfg, todo[0].lm.model)
    for p in todo:
        p.cands = candidate_lists(p.data, p.cfg.candidates, p.cfg.top_k, turns=p.cfg.turns)[p.start : p.end]
        check_stores_writable(p)
    for p in todo:
        resume(p)
    if cfg.use_random_projection:
        score_projected(todo)
        cost = None
    else:
        start_attempt(todo)
        score_exact(todo)
        first = todo[0]
        cost = total_cost(first.cost, first.attempt, closed(first.attempts), sum(p.end - p.start for p in todo))
    for p in todo:
        baselines = baseline_scores(p) if p.cfg.baselines else {}
        result = assemble(p, baselines, cost)
        write_outputs(p, result)
        p.paths.progress.unlink(missing_ok=True)
        shutil.rmtree(p.paths.blocks, ignore_errors=True)
        p.finished = read_json(p.paths.results)  # the result as stored
        log_truncation(p.finished)
