"""The study, one straight line: load -> encode -> per-sample gradients -> score -> store -> summarise.

A run covers the queries [start, end) of one setting, or of both settings at once (``--setting
both``: a paraphrased and a model-generated query of one id share their BM25 candidates, so each
candidate's gradient serves both). Exact gradients are never stored: a block of them is held in
memory and the others are streamed past it (stream.py, planned by schedule.py). Projected features
are small: originals are featurized once into a store shared by every partition and both settings.
Finished query blocks are logged to a progress file, so a killed or preempted run resumes where it
stopped and ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from gradsim import __version__, matrices
from gradsim.config import PACKAGE_DIR, SETTINGS, Config, Provenance, compat_differences
from gradsim.core.finite import ALLOW_HINT, FiniteCheck, NonFiniteError, dropped_record, finite_queries, likely_cause
from gradsim.core.metrics import true_rank
from gradsim.core.model import LoadedModel, load_model, resolve_device
from gradsim.core.score import cosine, dense_dots, subset_scores, summarize_arrays, whole_and_per_matrix
from gradsim.data.encode import Encoded, encode
from gradsim.data.load import Dataset, load_dataset, partition_range
from gradsim.data.retrieval import candidate_lists
from gradsim.errors import GradsimError
from gradsim.io import (
    append_jsonl,
    atomic_save_npz,
    atomic_write_json,
    atomic_write_jsonl,
    ensure_writable_dir,
    load_json,
    load_npz,
    read_json,
    read_jsonl_tolerant,
)
from gradsim.layout import RunPaths, allocation_file, feature_store_dir, run_dir
from gradsim.study.cost import RUNNING, Cost, closed, end_reason
from gradsim.study.cost import total as total_cost
from gradsim.study.features import FeatureStore, featurize, manifest_key, per_matrix_self_dots, progress_bar
from gradsim.study.lock import exit_on_sigterm, locked
from gradsim.study.memory import check_exact_fits, gradient_capacity

log = logging.getLogger("gradsim")


def code_version() -> str:
    """Package version plus git commit (with -dirty when the tree has changes) where gradsim runs from its own
    checkout; the package version alone where it is installed (git would describe whatever repository is above)."""
    root = PACKAGE_DIR.parents[1]
    if not ((root / ".git").exists() and (root / "pyproject.toml").exists()):
        return __version__
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{__version__}+{commit}{'-dirty' if dirty else ''}" if commit else __version__


def memory_budget_bytes(cfg: Config) -> int:
    """Memory for feature blocks of the projected path: --memory-gb / GRADSIM_MEMORY_GB, default 4 GB."""
    from gradsim.study.memory import GB, budget_gb

    return int(budget_gb(cfg.memory_gb, "GRADSIM_MEMORY_GB", 4.0) * GB)


@dataclass(frozen=True)
class Share:
    """One setting's share of a run, as planned before the model is loaded: its Config (setting_configs),
    data, query range and files."""

    cfg: Config
    data: Dataset
    start: int
    end: int
    paths: RunPaths


@dataclass
class Part:
    """One setting's share of a run once the model is loaded: the context every stage reads (what was
    asked, what the run found out, the model, the data, the query range and files; never reassigned)
    and the progress so far."""

    cfg: Config  # this setting's (setting_configs): what the user asked for
    prov: Provenance  # what the run found out (Part.of)
    lm: LoadedModel
    data: Dataset
    start: int
    end: int
    paths: RunPaths
    cut: dict[str, set[str]] = field(default_factory=dict)  # ids cut at the max length (check_encodable)
    cands: list[list[int]] = field(default_factory=list)  # per query of [start, end): indices into data.originals
    done: dict[int, dict] = field(default_factory=dict)
    # Per-sample metric rows (metrics.jsonl), in groups as logged: a block's query rows ("block:<file>"),
    # a feature shard's rows ("shard:<store>:<s>-<e>", the last attempt's), single rows ("row:<n>").
    groups: dict[str, list[dict]] = field(default_factory=dict)
    pending: list[dict] = field(default_factory=list)  # query rows of the block being computed
    finished: Optional[dict] = None
    featurizer_spec: Optional[dict] = None
    fidelity: Optional[dict] = None  # projected runs: projection.per_matrix_fidelity of the featurizer
    normalizer: Optional[dict] = None  # --normalize: what was applied (normalize.GradientNormalizer.to_dict)
    code_versions: set[str] = field(default_factory=set)  # of the code that made resumed progress
    finite: FiniteCheck = field(default_factory=FiniteCheck)  # --allow-nonfinite: stop at a NaN/inf, or count it
    # The exact path's spending in this attempt (number ``attempt``; shared by both settings' parts), and the
    # earlier attempts' as their records logged them (cost.py)
    cost: Optional[Cost] = None
    attempt: int = 1
    attempts: dict[int, dict] = field(default_factory=dict)

    @classmethod
    def of(cls, share: Share, lm: LoadedModel, version: str) -> Part:
        """The share with what the run found out: the model's commit and chat template, the code, the
        data's hashes and the max length in force."""
        prov = Provenance(
            model_revision=lm.revision,
            chat_template_sha256=lm.chat_template_sha256,
            code_version=version,
            original_data_sha256=share.data.original_sha256,
            variant_data_sha256=share.data.variant_sha256,
            max_length=resolved_max_length(share.cfg, lm),
        )
        part = cls(share.cfg, prov, lm, share.data, share.start, share.end, share.paths)
        part.finite = FiniteCheck(share.cfg.allow_nonfinite, lm.model, share.cfg.dtype)
        return part

    def compat(self) -> dict:
        """What must agree for results to mix (COMPAT_FIELDS), of this Config and what the run found out."""
        return self.cfg.compat(self.prov)

    def parameter_sizes(self) -> tuple[list[str], list[int]]:
        """The model's parameter matrices, in its order, and the entries of each (results' parameter_names
        and parameter_numel)."""
        from gradsim.core.gradients import param_layout

        layout = param_layout(self.lm.model)
        return layout.names, [int(n) for n in np.diff(layout.offsets)]

    def encode(self, sample, loss_on: Optional[str] = None) -> Encoded:
        """A sample as this run trains on it: its --turns, cut at the max length in force, the loss on
        ``loss_on`` (default: --loss-on)."""
        return encode(self.lm.tokenizer, sample, self.prov.max_length, loss_on or self.cfg.loss_on, self.cfg.turns)

    @property
    def todo(self) -> list[int]:
        return [qi for qi in range(self.start, self.end) if qi not in self.done]

    @property
    def metrics(self) -> list[dict]:
        return [row for rows in self.groups.values() for row in rows] + self.pending

    def record(self, queries: list[int], dots, qself, cself, metrics: list[dict] = ()) -> None:
        """Log a finished block of queries (one .npz beside the progress log) and keep it, with the metric
        rows of its queries (``metrics`` and those pending) in the same log line: a block and its rows
        are durable together, so a resumed run neither loses nor repeats a query's row."""
        name = f"block_{queries[0]:06d}_{len(queries):05d}.npz"
        atomic_save_npz(
            self.paths.blocks / name,
            dots=np.stack(dots),
            qself=np.stack(qself),
            cself=np.stack(cself),
            index=np.array(queries),
        )
        rec = {"kind": "block", "file": name, "metrics": [*self.pending, *metrics]}
        if self.cost is not None:  # what this attempt spent so far, durable with the block (cost.py)
            rec["attempt"] = self.cost.attempt(self.attempt, RUNNING)
        append_jsonl(self.paths.progress, rec)
        self.pending = []
        self.done.update(load_block(self.paths, rec))
        self.groups[f"block:{name}"] = rec["metrics"]

    def query_metric(self, row: dict) -> None:
        """A query's row, logged with its block (record)."""
        self.pending.append(row)

    def metric(self, row: dict) -> None:
        """A row logged now: an original's exact gradient (logged once per run: see score_exact)."""
        append_jsonl(self.paths.progress, {"kind": "metric", "metric": row})
        self.groups[f"row:{len(self.groups)}"] = [row]

    def shard_metrics(self, key: str, rows: list[dict]) -> None:
        """The rows of a feature shard, logged before the shard is written: a shard computed again after
        a kill replaces them (the last attempt's rows count), so none is lost or repeated."""
        append_jsonl(self.paths.progress, {"kind": "shard", "key": key, "metrics": rows})
        self.groups[f"shard:{key}"] = rows

    def add_metrics(self, rows: list[dict]) -> None:
        """Rows computed after the last block (baselines): not logged, as they are recomputed on resume."""
        self.groups[f"row:{len(self.groups)}"] = list(rows)


def setting_configs(cfg: Config) -> list[Config]:
    """One Config per setting: ``both`` gives the two that separate runs would have."""
    if cfg.setting != "both":
        return [cfg]
    data = {"paraphrased": cfg.paraphrased_data, "model-generated": cfg.model_generated_data}
    return [
        dataclasses.replace(cfg, setting=s, variant_data=data[s], paraphrased_data=None, model_generated_data=None)
        for s in SETTINGS
    ]


def check_budgets(cfg: Config) -> None:
    """The budgets' environment variables (GRADSIM_MEMORY_GB, GRADSIM_SCRATCH_GB, GRADSIM_HOST_MEMORY_GB; a
    number >= 0) checked where a flag does not override them, before the model loads or a finished run is
    found, so a typo never waits for the model and never passes unseen."""
    from gradsim.study.memory import budget_gb

    for value, env in (
        (cfg.memory_gb, "GRADSIM_MEMORY_GB"),
        (cfg.scratch_gb, "GRADSIM_SCRATCH_GB"),
        (cfg.host_memory_gb, "GRADSIM_HOST_MEMORY_GB"),
    ):
        budget_gb(value, env, None)


def prepare(cfg: Config, keep: Optional[Callable[[Config, Dataset], Dataset]] = None) -> list[Share]:
    """Each setting's share: its data (less what ``keep`` leaves out: skip_overlong), query range and files."""
    cfg.validate()
    check_budgets(cfg)
    shares = []
    for c in setting_configs(cfg):
        data = load_dataset(c.original_data, c.variant_data, c.sample_size, c.turns, c.ids_file)
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


def resolved_max_length(cfg: Config, lm: LoadedModel) -> int:
    """--max-length as it applies: at most the model's context (the whole context when not given)."""
    return min(cfg.max_length or lm.context_length, lm.context_length)


def skip_overlong(cfg: Config, data: Dataset, lm: LoadedModel) -> Dataset:
    """--skip-overlong: the data less the rows with no trained token within the max length (for the run's
    loss target, and the response where the baselines read it): such an original with its variants, such a
    variant alone; the ids left out (every variant left out under "queries") in Dataset.skipped (results.json ->
    skipped_overlong)."""
    from gradsim.data.encode import OverlongError

    max_length = resolved_max_length(cfg, lm)
    targets = {cfg.loss_on, "response"} if cfg.baselines else {cfg.loss_on}

    def overlong(sample) -> bool:
        try:
            for loss_on in sorted(targets):
                encode(lm.tokenizer, sample, max_length, loss_on, cfg.turns)
        except OverlongError:
            return True
        return False

    originals = {s.id for s in data.originals if overlong(s)}
    queries = [q.id for q in data.queries if q.id not in originals and overlong(q)]
    if originals or queries:
        log.warning(
            "--skip-overlong: %d originals (with their variants) and %d variants leave no trained token within "
            "%d tokens: left out (ids in results.json -> skipped_overlong)",
            len(originals),
            len(queries),
            max_length,
        )
    left = set(queries) | originals
    return dataclasses.replace(
        data,
        originals=[s for s in data.originals if s.id not in originals],
        queries=[q for q in data.queries if q.id not in left],
        skipped={"originals": sorted(originals), "queries": [q.id for q in data.queries if q.id in left]},
    )


def check_encodable(parts: list[Part]) -> None:
    """Encode every sample a run may encode (all originals: shards, calibration and --normalize read
    them; the queries of each range), for the run's loss target and for the baselines' (the response),
    so that a sample that cannot be encoded ends the run before it writes anything (no progress log, no
    empty folder) and its error is not printed on a progress bar's line.
    The samples cut at --max-length for the run's target are kept on each part (Part.cut) for results.json."""
    first, cfg = parts[0], parts[0].cfg

    def cut(samples, loss_on: str) -> set[str]:
        return {s.id for s in samples if first.encode(s, loss_on).truncated}

    originals = cut(first.data.originals, cfg.loss_on)
    for p in parts:
        p.cut = {"originals": originals, "queries": cut(p.data.queries[p.start : p.end], cfg.loss_on)}
    if cfg.baselines and cfg.loss_on != "response":
        cut([*first.data.originals, *(q for p in parts for q in p.data.queries[p.start : p.end])], "response")


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


def finished_result(p: Part) -> Optional[dict]:
    if not p.paths.results.exists():
        return None
    fix = f"delete it and the other files of this range ({p.paths.results.name}, {p.paths.scores.name}) and rerun"
    done = load_json(p.paths.results, fix)
    load_npz(p.paths.scores, fix, read=False)  # a finished range's scores must open (select, combine read them)
    diff = compat_differences(done.get("compat"), p.compat())
    if not diff:
        log.info("already finished: %s", p.paths.results)
        return done
    raise GradsimError(
        f"{p.paths.results} exists from a different configuration ({diff}; stored vs this run): "
        "use another --output-dir or remove it"
    )


def resume(p: Part) -> None:
    """Keep finished queries and sample metrics from an earlier attempt of this same partition."""
    p.paths.results.parent.mkdir(parents=True, exist_ok=True)
    progress = read_jsonl_tolerant(p.paths.progress)
    diff = compat_differences(progress[0].get("compat"), p.compat()) if progress else ""
    if diff:
        log.warning(
            "progress file %s is from another configuration (%s; stored vs this run): starting this partition afresh",
            p.paths.progress,
            diff,
        )
        progress = []
    version = p.prov.code_version
    if not progress:
        p.paths.progress.unlink(missing_ok=True)
        shutil.rmtree(p.paths.blocks, ignore_errors=True)
        append_jsonl(p.paths.progress, {"kind": "header", "compat": p.compat(), "code_version": version})
    else:
        # A kill mid-append (SIGKILL after Slurm's KillWait, a node crash) can leave a torn last line. The
        # reader stops there, so a line appended after it would be invisible to the next resume: the block
        # it logs would be computed again. Rewrite the log without it, so appends start on a line boundary.
        atomic_write_jsonl(p.paths.progress, progress)
        if progress[0].get("code_version", version) != version:
            log.info("resuming progress made by code %s (now %s)", progress[0]["code_version"], version)
            p.code_versions.add(progress[0]["code_version"])
    for r in progress:
        if "attempt" in r:  # an attempt's record: logged when it began, with each block, and when it ended
            p.attempts[r["attempt"]["attempt"]] = r["attempt"]
        if r.get("kind") == "block":
            p.done.update(load_block(p.paths, r))
            p.groups[f"block:{r['file']}"] = r.get("metrics", [])
        elif r.get("kind") == "shard":
            p.groups[f"shard:{r['key']}"] = r["metrics"]
        elif r.get("kind") == "metric":
            p.groups[f"row:{len(p.groups)}"] = [r["metric"]]
    if p.done:
        log.info("resuming: %d of %d queries already scored (%s)", len(p.done), p.end - p.start, p.cfg.setting)


def load_block(paths: RunPaths, rec: dict) -> dict[int, dict]:
    with np.load(paths.blocks / rec["file"]) as z:
        return {
            int(qi): {"dots": z["dots"][i], "qself": z["qself"][i], "cself": z["cself"][i]}
            for i, qi in enumerate(z["index"])
        }


def encode_all(p: Part, samples, what: str) -> list[Encoded]:
    bar = progress_bar(samples, desc=f"encoding {what}", unit="sample")
    return [p.encode(s) for s in bar]


# Exact gradients: hold a block, stream the rest (no store)
# --------------------------------------------------------------------------------------------


def start_attempt(parts: list[Part]) -> None:
    """This attempt's Cost, shared by the parts and logged at once in each progress log, so that even an
    attempt killed before its first block is listed."""
    cost = Cost(shared_by=[p.cfg.setting for p in parts])
    n = 1 + max((k for p in parts for k in p.attempts), default=0)
    for p in parts:
        p.cost, p.attempt = cost, n
        append_jsonl(p.paths.progress, {"kind": "attempt", "attempt": cost.attempt(n, RUNNING)})


def end_attempt(parts: list[Part], exc: BaseException) -> None:
    """Log how this attempt ended (SIGTERM, interrupted, error) and what it spent, where a progress log is left."""
    for p in parts:
        if p.cost is not None and p.paths.progress.exists():
            record = p.cost.attempt(p.attempt, end_reason(exc))
            try:
                append_jsonl(p.paths.progress, {"kind": "attempt", "attempt": record})
            except OSError:  # e.g. the disk that just filled up: the block records still count
                pass


def score_exact(parts: list[Part]) -> None:
    from gradsim.core.gradients import GradientComputer
    from gradsim.study.schedule import fewest_held, make_plan
    from gradsim.study.stream import ExactStream

    first = parts[0]
    cfg, lm, originals = first.cfg, first.lm, first.data.originals
    # Every setting's unfinished queries, in one schedule: (part, query index) per position.
    owners = [(p, qi) for p in parts for qi in p.todo]
    cands = [p.cands[qi - p.start] for p, qi in owners]
    if not owners:
        return
    queries = encode_all(first, [p.data.queries[qi] for p, qi in owners], "queries")
    needed = sorted({j for c in cands for j in c})
    encs = dict(zip(needed, encode_all(first, [originals[j] for j in needed], "originals")))

    computer = GradientComputer(lm.model, lm.device, cfg.dtype)
    normalizer = attach_normalizer(first, computer)  # before the budget: it holds a mean
    for p in parts:
        p.normalizer = normalizer
    grad_bytes = computer.layout.total * computer.buffer.element_size()
    from gradsim.study.memory import shape_of_config

    longest = max(e.num_tokens for e in [*queries, *encs.values()])
    capacity = gradient_capacity(cfg, grad_bytes, lm.device, longest, shape_of_config(lm.model.config))
    groups = [c[0] for c in cands]  # c[0]: the query's own original
    capacity = fewest_held(cands, groups, capacity)  # no more gradients than save passes
    plan = make_plan(cands, groups, capacity)
    cost = first.cost
    cache = make_cache(first, grad_bytes, cost)
    log.info(
        "exact: %d queries, %d originals, %s of %d gradients (%.2f GB each): %d blocks, %.2f passes per query "
        "without keeping originals%s",
        len(owners),
        len(needed),
        plan.mode,
        capacity,
        grad_bytes / 2**30,
        len(plan.blocks),
        plan.passes_per_query(),
        f"; keeping originals in {cache.kind} up to {cache.budget / 2**30:.1f} GB" if cache else "",
    )
    # An original's row is logged the first time its gradient is computed in this run, or in an earlier
    # attempt that was resumed (its row is in the progress log), as in an uninterrupted run.
    first_seen = {r["id"] for r in first.metrics if r.get("role") == "original"}

    def on_gradient(enc: Encoded, role: str, seconds: float, q: Optional[int]) -> None:
        from gradsim.study.features import sample_metric

        if role == "query":
            owners[q][0].query_metric(sample_metric(enc, seconds, lm.device, cfg.dtype, "query"))
        elif enc.id not in first_seen:
            first_seen.add(enc.id)
            first.metric(sample_metric(enc, seconds, lm.device, cfg.dtype, "original"))

    def on_done(finished) -> None:
        for p in parts:
            mine = [(owners[q][1], d, qs, cs) for q, d, qs, cs in finished if owners[q][0] is p]
            if mine:
                p.record(*map(list, zip(*mine)))

    bar = progress_bar(total=len(owners) + plan.original_passes, desc="exact gradients", unit="pass")
    ExactStream(computer, cost, cache, bar, on_gradient, first.finite).run(plan, queries, cands, encs, on_done)
    bar.close()
    computer.release()


def attach_normalizer(p: Part, computer) -> Optional[dict]:
    """--normalize: estimate its state from every original (or load it, when another partition or
    setting of this study already did) and apply it to each gradient the computer makes from now on."""
    from gradsim.core.normalize import GradientNormalizer
    from gradsim.layout import normalizer_file

    cfg, lm = p.cfg, p.lm
    if cfg.normalize == "none":
        return None
    norm = GradientNormalizer(cfg.normalize, computer.layout, cfg.damping)
    drop = ("use_random_projection", "projection", "proj_dim", "seed")
    path = normalizer_file(
        cfg.output_dir, manifest_key({k: v for k, v in store_manifest(p.compat()).items() if k not in drop})
    )
    loaded = path.is_file()
    if loaded:
        with np.load(path) as z:
            norm.load(z, lm.device)
        log.info("--normalize %s: state from %s", cfg.normalize, path)
    else:
        bar = progress_bar(p.data.originals, desc=f"estimating --normalize {cfg.normalize}", unit="original")
        grads = ((s.id, computer.gradient(p.encode(s))) for s in bar)
        finite = (g for i, g in grads if p.finite.rows(computer.layout, g[None], [i], "original", "gradient"))
        norm.estimate(finite, lm.device)  # with --allow-nonfinite a non-finite gradient is left out
        atomic_save_npz(path, **norm.state())
    computer.transform = norm
    return {**norm.to_dict(), "estimation_backward_passes": 0 if loaded else norm.count}


def make_cache(p: Part, grad_bytes: int, cost):
    """Where originals may be kept between blocks, within its budget: host RAM beside a GPU, else scratch disk."""
    from gradsim.study.memory import budget_gb
    from gradsim.study.stream import OriginalCache

    cfg, device = p.cfg, p.lm.device
    host = budget_gb(cfg.host_memory_gb, "GRADSIM_HOST_MEMORY_GB", 0.0) if device.type == "cuda" else 0.0
    if host * 2**30 >= grad_bytes:
        return OriginalCache("host", int(host * 2**30), grad_bytes, None, cost)
    scratch = budget_gb(cfg.scratch_gb, "GRADSIM_SCRATCH_GB", 0.0)
    if scratch * 2**30 >= grad_bytes:
        return OriginalCache("disk", int(scratch * 2**30), grad_bytes, p.paths.scratch, cost)
    return None


# Projected features: originals once into a shared store, queries in blocks
# --------------------------------------------------------------------------------------------


def store_manifest(compat: dict) -> dict:
    """What determines the originals' features besides the featurizer, of a run's compat (Part.compat):
    the query side is excluded. The defaults of options added later (--turns first, --allocation norm)
    are left out, so that stores and allocation files made before those options existed keep their keys."""
    drop = {"setting", "computation_type", "candidates", "top_k", "variant_data", "variant_data_sha256"}
    if compat["turns"] == "first":
        drop.add("turns")
    if compat["allocation"] == "norm":
        drop.add("allocation")
    return {k: v for k, v in compat.items() if k not in drop}


def make_featurizer(p: Part):
    from gradsim.core.projection import CALIBRATION_SAMPLES, SKETCHES, make_projected_featurizer

    cfg = p.cfg
    calibration, allocation_path = None, None
    if cfg.projection in SKETCHES:
        # The first originals of the whole dataset: the same for every partition and both settings.
        calibration = [p.encode(s) for s in p.data.originals[:CALIBRATION_SAMPLES]]
        allocation_path = allocation_file(cfg.output_dir, cfg.projection, manifest_key(store_manifest(p.compat())))
    return make_projected_featurizer(cfg, p.lm, memory_budget_bytes(cfg) // 4, calibration, allocation_path)


def score_projected(parts: list[Part]) -> None:
    from gradsim.core.projection import per_matrix_fidelity

    first = parts[0]
    cfg, lm, data = first.cfg, first.lm, first.data
    featurizer = make_featurizer(first)
    layout = featurizer.layout
    normalizer = attach_normalizer(first, featurizer.computer) if cfg.normalize != "none" else None
    fidelity = per_matrix_fidelity(featurizer)
    for p in parts:
        p.featurizer_spec, p.normalizer, p.fidelity = featurizer.spec, normalizer, fidelity
    manifest = dict(store_manifest(first.compat()), featurizer=featurizer.spec)
    store = FeatureStore.open(
        feature_store_dir(cfg.output_dir, manifest_key(manifest), "originals"),
        manifest,
        [s.id for s in data.originals],
        layout.total,
        max(1, min(256, memory_budget_bytes(cfg) // (layout.total * 4))),
    )
    row_of = {j: j for j in range(len(data.originals))}
    need = sorted({j for p in parts for qi in p.todo for j in p.cands[qi - p.start]})
    featurize_into_store(first, store, featurizer, need)
    block = max(1, min(256 if cfg.candidates == "all" else 64, memory_budget_bytes(cfg) // (layout.total * 4)))
    for p in parts:
        todo = p.todo
        enc = dict(zip(todo, encode_all(p, [p.data.queries[qi] for qi in todo], "queries")))
        bar = progress_bar(total=len(todo), desc=f"features ({p.cfg.setting} queries)", unit="sample")
        for b0 in range(0, len(todo), block):
            block_q = todo[b0 : b0 + block]
            feats, m = featurize(featurizer, [enc[qi] for qi in block_q], lm.device, cfg.dtype, "query", bar, p.finite)
            q = torch.from_numpy(feats)
            qself = per_matrix_self_dots(layout, q)
            dots, cself = [], []
            if cfg.candidates == "all":
                all_dots, selfd = corpus_dots(store, layout, q)
                for i, qi in enumerate(block_q):
                    rows = [row_of[j] for j in p.cands[qi - p.start]]
                    dots.append(all_dots[i, rows])
                    cself.append(selfd[rows].astype(np.float32))
            else:
                for i, qi in enumerate(block_q):
                    ofeats, oself = gather_rows(store, [row_of[j] for j in p.cands[qi - p.start]])
                    dots.append(dense_dots(layout, q[i : i + 1], ofeats)[0])
                    cself.append(oself)
            p.record(block_q, dots, list(qself), cself, m)
        bar.close()


def featurize_into_store(
    p: Part, store, featurizer, rows: list[int], role: str = "original", loss_on: Optional[str] = None
) -> None:
    """Featurize the originals ``rows`` not yet in the store; encoded for ``loss_on`` (default: the run's)."""
    todo = store.missing(rows)
    store.check_writable(todo)
    store.check_room(sum(e - s for s, e in todo), store.dim * 4 + len(featurizer.layout.names) * 8)
    bar = progress_bar(total=sum(e - s for s, e in todo), desc=f"features ({role}s)", unit="sample")
    index = p.data.original_index()
    for s, e in todo:
        encs = [p.encode(p.data.originals[index[store.ids[r]]], loss_on) for r in range(s, e)]
        feats, m = featurize(featurizer, encs, p.lm.device, p.cfg.dtype, role, bar, p.finite)
        p.shard_metrics(f"{store.root.name}:{s}-{e}", m)
        store.write_shard(s, e, feats, lambda f: per_matrix_self_dots(featurizer.layout, torch.from_numpy(f)))
    bar.close()


def gather_rows(store: FeatureStore, rows: list[int]) -> tuple[torch.Tensor, np.ndarray]:
    feats = np.empty((len(rows), store.dim), dtype=np.float32)
    selfd = np.empty((len(rows), len(store.read_selfdots(*store.shard_of(rows[0]))[0])), dtype=np.float64)
    for k, r in enumerate(rows):
        s, e = store.shard_of(r)
        feats[k] = store.read_features(s, e)[r - s]
        selfd[k] = store.read_selfdots(s, e)[r - s]
    return torch.from_numpy(feats), selfd


def corpus_dots(store: FeatureStore, layout, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(b, N, M) fp32 per-matrix dots of a query block with every stored original, and the originals'
    (N, M) self-dots, one shard at a time: memory is the block plus one shard, whatever N."""
    dots = np.empty((q.shape[0], len(store.ids), len(layout.names)), dtype=np.float32)
    selfd = np.empty((len(store.ids), len(layout.names)), dtype=np.float64)
    for s, e in store.shard_ranges():
        dots[:, s:e] = dense_dots(layout, q, torch.from_numpy(np.array(store.read_features(s, e))))
        selfd[s:e] = store.read_selfdots(s, e)
    return dots, selfd


# Baselines, results
# --------------------------------------------------------------------------------------------


def baseline_scores(p: Part) -> dict[str, np.ndarray]:
    """(Q, C) scores of the baselines for this partition's queries and candidates."""
    from gradsim.core.baselines import candidate_scores
    from gradsim.data.retrieval import bm25_scores

    cfg, lm, data, cands = p.cfg, p.lm, p.data, p.cands
    out = {"baseline_bm25": candidate_scores(bm25_scores(data, cfg.turns), list(range(p.start, p.end)), cands)}
    rep, store = representation_store(p)
    needed = sorted({j for c in cands for j in c})
    # Representations read the whole conversation whatever the loss target.
    featurize_into_store(p, store, rep, needed, "representation", "response")
    encs = [p.encode(data.queries[qi], "response") for qi in range(p.start, p.end)]
    qrep, m = featurize(rep, encs, lm.device, cfg.dtype, "representation", finite=p.finite)
    p.add_metrics(m)
    orep, oself = gather_rows(store, needed)
    qself = per_matrix_self_dots(rep.layout, torch.from_numpy(qrep))
    dots = dense_dots(rep.layout, torch.from_numpy(qrep), orep)  # (Q, len(needed), 2)
    for m_, name in enumerate(rep.layout.names):
        full = np.full((p.end - p.start, len(data.originals)), np.nan)
        full[:, needed] = cosine(dots[:, :, m_], qself[:, m_ : m_ + 1], oself[None, :, m_])
        out[f"baseline_{name}"] = np.stack([full[k, c] for k, c in enumerate(cands)]).astype(np.float32)
    return out


def representation_store(p: Part):
    """The baselines' representation featurizer and the store of the originals' representations."""
    from gradsim.core.baselines import POOLINGS, RepresentationFeaturizer

    cfg, prov, lm = p.cfg, p.prov, p.lm
    rep = RepresentationFeaturizer(lm.model, lm.device, cfg.dtype, POOLINGS)  # every pooling: one forward
    manifest = dict(
        model=cfg.model_name,
        revision=prov.model_revision,
        template=prov.chat_template_sha256,
        max_length=prov.max_length,
        dtype=cfg.dtype,
        original_data_sha256=prov.original_data_sha256,
        sample_size=cfg.sample_size,
        featurizer=rep.spec,
    )
    store = FeatureStore.open(
        feature_store_dir(cfg.output_dir, manifest_key(manifest), "representations"),
        manifest,
        [s.id for s in p.data.originals],
        rep.layout.total,
        256,
    )
    return rep, store


def check_stores_writable(p: Part) -> None:
    """Before any work: the baselines' representation store must be able to take the shards this range needs."""
    if p.cfg.baselines:
        store = representation_store(p)[1]
        store.check_writable(store.missing(sorted({j for c in p.cands for j in c})))


def bm25_columns(p: Part) -> np.ndarray:
    """(Q, 1 + top_k) positions, within each query's full-corpus candidate list, of its BM25 candidates."""
    bm25 = candidate_lists(p.data, "bm25", p.cfg.top_k, turns=p.cfg.turns)[p.start : p.end]
    return np.array([[c.index(j) for j in b] for c, b in zip(p.cands, bm25)], dtype=np.int64)


def assemble(p: Part, baselines: dict, cost: Optional[dict]) -> dict:
    cfg, prov, lm, data, start, end = p.cfg, p.prov, p.lm, p.data, p.start, p.end
    order = list(range(start, end))
    corpus = cfg.candidates == "all"
    dtype = np.float32 if corpus else np.float64  # fp32 dots lose nothing: the matmuls are fp32
    arrays = {
        "dots": np.stack([np.asarray(p.done[qi]["dots"], dtype=dtype) for qi in order]),
        "qself": np.stack([np.asarray(p.done[qi]["qself"], dtype=np.float64) for qi in order]),
        "cself": np.stack([np.asarray(p.done[qi]["cself"], dtype=dtype) for qi in order]),
    }
    arrays.update(baselines)
    if corpus:
        arrays["bm25_columns"] = bm25_columns(p)
    whole = subset_scores(arrays["dots"], arrays["qself"], arrays["cself"], slice(None), cfg.computation_type)
    keep = finite_queries(arrays) & np.isfinite(whole).all(-1)
    nonfinite = None
    if cfg.allow_nonfinite or not keep.all():
        nonfinite = dropped_nonfinite(p, arrays, order, keep)
        arrays = {k: v[keep] for k, v in arrays.items()}
        whole, order = whole[keep], [qi for qi, k in zip(order, keep) if k]
    dots, qself, cself = arrays["dots"], arrays["qself"], arrays["cself"]
    ranks = true_rank(whole)
    queries = []
    for k, qi in enumerate(order):
        cand_ids = [data.originals[j].id for j in p.cands[qi - start]]
        rec = {"index": qi, "id": data.queries[qi].id, "rank": int(ranks[k])}
        if corpus:  # the full (Q, N) scores are in scores.npz
            top = np.argsort(-np.nan_to_num(whole[k], nan=-np.inf), kind="stable")[:10]
            rec["top10"] = [cand_ids[t] for t in top]
            rec["top10_scores"] = whole[k][top]
        else:
            rec["candidates"], rec["scores"] = cand_ids, whole[k]
            per_matrix = whole_and_per_matrix(
                dots[k : k + 1], qself[k : k + 1], cself[k : k + 1], cfg.computation_type
            )[1]
            rec["per_matrix"] = per_matrix[0]
            if cfg.computation_type == "dot-product":
                rec["query_self"], rec["candidate_self"] = qself[k], cself[k]
        queries.append(rec)
    names, numel = p.parameter_sizes()
    result = {
        "gradsim_version": prov.code_version,
        "config": cfg.to_record(prov),
        "compat": p.compat(),
        "model": {"id": lm.model_id, "revision": lm.revision, "chat_template_sha256": lm.chat_template_sha256},
        "partition": {"start": start, "end": end, "num_queries": len(data.queries)},
        "score": "whole-model dot product" if cfg.computation_type == "dot-product" else "cosine similarity",
        "featurizer": p.featurizer_spec or {"kind": "exact"},
        "normalizer": p.normalizer or {"normalizer": "none"},
        "parameter_names": names,
        "parameter_numel": numel,  # storage per matrix (frontier.py)
        "queries": queries,
        "code_versions": sorted(p.code_versions | {prov.code_version}),  # all that computed these numbers
        "truncated": truncation(p),
        "data_dropped": data.dropped,  # turns (with --turns first) and system messages of the rows left unused
    }
    if cost is not None:
        result["cost"] = cost
    if nonfinite is not None:
        result["nonfinite"] = nonfinite
    if cfg.skip_overlong:
        result["skipped_overlong"] = data.skipped
    if p.fidelity is not None:  # the per-matrix scores' predicted error (exact runs have none)
        result["per_matrix_fidelity"] = p.fidelity
    result.update(summarize_arrays(names, arrays, cfg.computation_type))
    result["_arrays"], result["_query_index"] = arrays, np.array(order, dtype=np.int64)
    return result


def dropped_nonfinite(p: Part, arrays: dict, order: list[int], keep: np.ndarray) -> dict:
    """The queries whose scores are not finite (their gradient, a candidate's, or a 0/0 cosine): refused,
    naming the first, unless --allow-nonfinite, which drops them; what was dropped (finite.dropped_record)."""
    data = p.data
    query_ids = [data.queries[qi].id for qi in order]
    cand_ids = [[data.originals[j].id for j in p.cands[qi - p.start]] for qi in order]
    record = dropped_record(arrays, keep, query_ids, cand_ids)
    if not p.cfg.allow_nonfinite:
        k = int(np.flatnonzero(~keep)[0])
        raise NonFiniteError(
            f"the scores of query {query_ids[k]} (against {', '.join(cand_ids[k])}) are not finite (NaN or inf, "
            f"e.g. a zero gradient's cosine): {likely_cause(p.lm.model, p.cfg.dtype)}; no results were written "
            f"({ALLOW_HINT})"
        )
    if keep.sum() == 0:
        raise NonFiniteError(
            f"every query of {p.cfg.setting} [{p.start}, {p.end}) has a non-finite gradient or score: "
            f"{likely_cause(p.lm.model, p.cfg.dtype)}; no results were written"
        )
    if record["queries_dropped"]:
        log.warning(
            "--allow-nonfinite: %d of %d queries dropped (non-finite: %d queries, %d candidate originals; ids in "
            "results.json -> nonfinite)",
            record["queries_dropped"],
            len(order),
            len(record["nonfinite_query_ids"]),
            len(record["nonfinite_original_ids"]),
        )
    return record


def truncation(p: Part) -> dict:
    """The samples of this range cut at --max-length (their gradients see only the first max_length
    tokens): its queries, and the originals among their candidates."""
    data = p.data
    queries = [data.queries[qi].id for qi in range(p.start, p.end) if data.queries[qi].id in p.cut["queries"]]
    needed = sorted({j for c in p.cands for j in c})
    originals = [data.originals[j].id for j in needed if data.originals[j].id in p.cut["originals"]]
    return {
        "max_length": p.prov.max_length,
        "queries": len(queries),
        "originals": len(originals),
        "query_ids": queries,
        "original_ids": originals,
    }


def log_truncation(result: dict) -> None:
    t, setting = result["truncated"], result["config"]["setting"]
    n = result["partition"]["end"] - result["partition"]["start"]
    level = logging.WARNING if t["queries"] or t["originals"] else logging.INFO
    log.log(
        level,
        "%s: %d of %d queries and %d originals (candidates) truncated at --max-length %d (ids in results.json)",
        setting,
        t["queries"],
        n,
        t["originals"],
        t["max_length"],
    )


def write_outputs(p: Part, result: dict) -> None:
    """Write a range's files, results.json last (its existence marks the range finished). A write that fails
    (a full disk) removes what this call wrote, so no scores file is left without its results, and leaves the
    progress log and blocks: rerunning the same command resumes and only writes again."""
    paths = p.paths
    try:
        atomic_save_npz(paths.scores, **result.pop("_arrays"), query_index=result.pop("_query_index"))
        atomic_write_jsonl(paths.metrics, p.metrics)
        atomic_write_json(paths.config, {"config": p.cfg.to_record(p.prov), "compat": p.compat(), "argv": sys.argv})
        atomic_write_json(paths.results, result)
    except OSError:
        if not paths.results.exists():
            for f in (paths.scores, paths.metrics, paths.config):
                f.unlink(missing_ok=True)
        raise
