"""One setting's share of a run: its config, what the run found out (provenance), the model, the data,
the query range and files (Part), and the samples as the run encodes them."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from gradsim import __version__
from gradsim.config import DEFAULTS, PACKAGE_DIR, Config, Provenance, role_of
from gradsim.core.finite import FiniteCheck
from gradsim.core.model import LoadedModel
from gradsim.data.encode import Encoded, encode
from gradsim.data.load import Dataset
from gradsim.io import append_jsonl, atomic_save_npz
from gradsim.layout import RunPaths
from gradsim.study.context import encode_sample, provenance, resolved_max_length
from gradsim.study.cost import RUNNING, Cost
from gradsim.study.features import progress_bar

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
        prov = provenance(share.cfg, share.data, lm, version)
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
        return encode_sample(self.cfg, self.prov, self.lm, sample, loss_on)

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


def load_block(paths: RunPaths, rec: dict) -> dict[int, dict]:
    with np.load(paths.blocks / rec["file"]) as z:
        return {
            int(qi): {"dots": z["dots"][i], "qself": z["qself"][i], "cself": z["cself"][i]}
            for i, qi in enumerate(z["index"])
        }


def encode_all(p: Part, samples, what: str) -> list[Encoded]:
    bar = progress_bar(samples, desc=f"encoding {what}", unit="sample")
    return [p.encode(s) for s in bar]


def store_manifest(compat: dict) -> dict:
    """What determines the originals' features besides the featurizer, of a run's compat (Part.compat): the
    query side (Role.query_side) is excluded, and so are the defaults of options added after stores were first
    keyed (Role.unkeyed_default: --turns first, --allocation norm), so that stores and allocation files made
    before those options existed keep their keys."""
    return {k: v for k, v in compat.items() if not keyless(k, v)}


def keyless(name: str, value) -> bool:
    role = role_of(name)
    return role.query_side or (role.unkeyed_default and value == DEFAULTS.get(name))


def normalizer_manifest(compat: dict) -> dict:
    """What determines the --normalize state (estimated from the exact gradients of the originals): the
    store's manifest less what changes only the projection (Role.projection_only)."""
    return {k: v for k, v in store_manifest(compat).items() if not role_of(k).projection_only}
