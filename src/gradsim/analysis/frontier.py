"""Select or project? Retrieval quality against storage per sample, the paper's own question.

From one exact run per setting (``--candidates all`` gives both protocols: the full corpus and BM25's
1-of-(top_k + 1); a ``bm25`` run gives the second), the frontier tabulates and plots top-1 and MRR
against the floats (and bytes, fp32) stored per sample for:
  - selection: greedy forward selection chosen on one half of the queries and reported on the other,
    over ``--splits`` random splits (mean and the 2.5-97.5 percentile interval over splits), and the
    best-k matrices by their own score on the choosing half, reported on the other;
  - projection: each method at each size, from ONE forward/backward per sample for all its sizes
    (multisize.py), plus, for the sketches, the sizes the greedy subsets have;
  - select-then-project: each split's greedy subset, scored on its projected slices (what storing
    only those matrices' sketches gives), on the held-out half;
  - reference lines: the full gradient, BM25, representation similarity, random.
Selection needs no new gradients (a cosine over any subset of matrices is exact from the run's
per-matrix dots and self-dots); projection featurizes the runs' originals and queries once per method
family (factorized and tensorsketch share the hooks' pass, countsketch and trak the exact gradient).
The table and the figure are drawn by frontier_table.py.

    gradsim frontier data/gradient-similarity/paraphrased-all data/gradient-similarity/model-generated-all
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from gradsim.analysis.selection import greedy_select, split_queries, subset_key
from gradsim.config import Config
from gradsim.core.metrics import summarize_ranks
from gradsim.core.score import random_expectation, subset_scores
from gradsim.errors import GradsimError
from gradsim.io import read_json
from gradsim.layout import whole_run

DEFAULT_SIZES = (2**10, 2**12, 2**14, 2**16, 2**18, 2**20)
HOOKED = ("tensorsketch", "factorized")  # formed in the forward/backward hooks: one pass for both
GRADIENT = ("countsketch", "trak")  # from the exact gradient: one backward for both
BEST_K = (1, 2, 4, 8, 16, 32)
# Fields two runs of one frontier must share: the model, the originals and how samples become gradients.
SHARED = (
    "model_name",
    "revision",
    "original_data_sha256",
    "sample_size",
    "max_length",
    "loss_on",
    "turns",
    "dtype",
    "seed",
    "computation_type",
)


@dataclass
class ExactRun:
    path: Path
    result: dict
    names: list[str]
    numel: np.ndarray  # entries per matrix
    arrays: dict  # scores.npz
    setting: str
    computation_type: str

    def protocols(self) -> dict:
        """name -> column picker, for each protocol the run's scores hold."""
        cfg = self.result["config"]
        out = {}
        if cfg["candidates"] == "all":
            out["corpus"] = lambda a: a
            cols = self.arrays["bm25_columns"]
            out[f"1-of-{cols.shape[1]}"] = lambda a: np.take_along_axis(a, cols[..., None] if a.ndim == 3 else cols, 1)
        else:
            out[f"1-of-{self.arrays['dots'].shape[1]}"] = lambda a: a
        return out


def load_exact_run(path: Path) -> ExactRun:
    path = Path(path)
    files = whole_run(path)
    if not files.results.exists() or not files.scores.exists():
        raise GradsimError(
            f"{path} holds no finished run (results.json and scores.npz): run main.py, or merge its partitions "
            "with combine_all.sh, first"
        )
    result = read_json(files.results)
    kind = result.get("featurizer", {}).get("kind", "exact")
    if kind != "exact":
        raise GradsimError(
            f"{path} is a {kind} run: the frontier selects matrices from exact per-matrix scores and projects "
            "itself; give it exact runs (main.py without --use-random-projection)"
        )
    if result["config"].get("normalize", "none") != "none":
        raise GradsimError(
            f"{path} is normalized (--normalize {result['config']['normalize']}): the frontier's projections are of "
            "raw gradients; give runs without --normalize"
        )
    if result["config"].get("matrices"):
        raise GradsimError(f"{path} scored only --matrices {result['config']['matrices']}: give a full-model run")
    with np.load(files.scores) as z:
        arrays = {k: z[k] for k in z.files}
    names = result["parameter_names"]
    if len(result.get("parameter_numel", ())) != len(names):
        raise GradsimError(f"{path} was written before results recorded each matrix's size: run it again")
    numel = np.array(result["parameter_numel"], dtype=np.int64)
    return ExactRun(
        path, result, names, numel, arrays, result["config"]["setting"], result["config"]["computation_type"]
    )


def check_runs(runs: list[ExactRun]) -> None:
    """Refuse runs that do not belong in one frontier: another model or data, or one setting twice."""
    first = runs[0].result
    for r in runs[1:]:
        for key in SHARED:
            a, b = first["config"].get(key), r.result["config"].get(key)
            if a != b:
                raise GradsimError(
                    f"{r.path} differs from {runs[0].path} in {key} ({b!r} vs {a!r}): a frontier compares runs of "
                    "one model on one set of originals"
                )
        a, b = first["model"].get("revision"), r.result["model"].get("revision")
        if a != b:
            raise GradsimError(f"{r.path} used model revision {b}, {runs[0].path} {a}: give runs of one model")
    settings = [r.setting for r in runs]
    if len(set(settings)) != len(settings):
        raise GradsimError(f"two runs of one setting ({', '.join(settings)}): give one exact run per setting")


def interval(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "ci": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))], "n": len(v)}


def point(floats, top1, mrr, **extra) -> dict:
    """One point of a curve: storage per sample (floats, fp32 bytes) and quality (mean and interval)."""
    f = interval(floats)
    return {"floats": f["mean"], "bytes": 4 * f["mean"], "top1": interval(top1), "mrr": interval(mrr), **extra}


def best_k_order(dots, qself, cself, ctype: str, numel) -> list[int]:
    """The matrices by their own score on these queries, best first, ranked as greedy_select ranks its
    first step (a stable sort: full ties stay in parameter order); best-k takes the first k."""
    own = [subset_key(subset_scores(dots, qself, cself, [m], ctype), ctype, numel[m])[0] for m in range(len(numel))]
    return sorted(range(len(numel)), key=lambda m: own[m], reverse=True)


def selection_curves(run: ExactRun, pick, splits: int, max_size: int, best_k=BEST_K) -> dict:
    """Greedy (per step and final) and best-k, chosen on one half and reported on the other, per split."""
    dots, qself, cself = pick(run.arrays["dots"]), run.arrays["qself"], pick(run.arrays["cself"])
    ctype, names, numel = run.computation_type, run.names, run.numel
    steps: dict[int, list] = {}
    final, full, best, chosen = [], [], {k: [] for k in best_k if k <= len(names)}, []
    for seed in range(splits):
        choose, report = split_queries(dots.shape[0], seed)
        g = greedy_select(names, dots, qself, cself, ctype, choose, report, max_size, numel)
        idx = [names.index(n) for n in g["chosen"]]
        chosen.append(idx)
        for k, step in enumerate(g["path"], 1):
            steps.setdefault(k, []).append((numel[idx[:k]].sum(), step["held_out"]["top1"], step["held_out"]["mrr"]))
        held = g["held_out"] or g["full_gradient_held_out"]
        final.append((numel[idx].sum() if idx else numel.sum(), held["top1"], held["mrr"]))
        f = g["full_gradient_held_out"]
        full.append((numel.sum(), f["top1"], f["mrr"]))
        order = best_k_order(dots[choose], qself[choose], cself[choose], ctype, numel)
        for k in best:
            r = summarize_ranks(subset_scores(dots[report], qself[report], cself[report], order[:k], ctype))
            best[k].append((numel[order[:k]].sum(), r["top1"], r["mrr"]))

    def pts(rows, **extra):
        return point(*zip(*rows), **extra)

    return {
        "greedy": [pts(steps[k], matrices=k) for k in sorted(steps)],
        "greedy_final": pts(final, matrices=float(np.mean([len(c) for c in chosen]))),
        "best_k": [pts(best[k], matrices=k) for k in sorted(best)],
        "full_gradient_held_out": pts(full),
        "chosen": [[names[m] for m in c] for c in chosen],
        "_chosen_idx": chosen,
    }


def references(run: ExactRun, pick) -> dict:
    dots, qself, cself = pick(run.arrays["dots"]), run.arrays["qself"], pick(run.arrays["cself"])
    out = {"full gradient": dict(summarize_ranks(subset_scores(dots, qself, cself, slice(None), run.computation_type)))}
    out["full gradient"]["floats"] = int(run.numel.sum())
    for k, v in run.arrays.items():
        if k.startswith("baseline_"):
            out[k[len("baseline_") :]] = summarize_ranks(pick(v))
    out["random"] = random_expectation(dots.shape[1])
    return out


# Projection: every method at every size, one pass per family
# --------------------------------------------------------------------------------------------


def per_matrix_arrays(feats_q: np.ndarray, feats_o: np.ndarray, layout) -> tuple:
    """(Q, N, M) per-matrix dots, (Q, M) and (N, M) self-dots of projected features: whole-model and
    subset scores follow exactly, as for an exact run's scores.npz."""
    import torch

    from gradsim.core.score import dense_dots
    from gradsim.study.features import per_matrix_self_dots

    q, o = torch.from_numpy(np.ascontiguousarray(feats_q)), torch.from_numpy(np.ascontiguousarray(feats_o))
    return dense_dots(layout, q, o), per_matrix_self_dots(layout, q), per_matrix_self_dots(layout, o)


def project_runs(
    runs: list[ExactRun], data: dict, sizes: dict, device: Optional[str], batch_size: int, lm=None, rule: str = "norm"
) -> dict:
    """{kind: [{"proj_dim", "dims", "spec", "arrays": {setting: (dots (Q, N, M), qself, oself)}}]}: the
    runs' queries and their originals featurized once per family (multisize.py), every size of every
    kind of the family in that one pass. Rows and columns are in the data's order (query i, original j);
    ``data``: each setting's dataset (load_datasets)."""
    from gradsim.core.model import load_model, resolve_device
    from gradsim.core.multisize import GRADIENT_KINDS, make_multi_size
    from gradsim.core.projection import CALIBRATION_SAMPLES
    from gradsim.study.context import Study, provenance
    from gradsim.study.features import featurize, progress_bar

    on = {"device": device} if device else {}
    cfgs = {run.setting: Config.from_dict(dict(run.result["config"], **on)) for run in runs}
    cfg = cfgs[runs[0].setting]
    lm = lm or load_model(cfg, resolve_device(cfg))
    studies = {s: Study(cfgs[s], d, lm, provenance(cfgs[s], d, lm, None)) for s, d in data.items()}
    originals = data[runs[0].setting].originals
    enc_o = [studies[runs[0].setting].encode(s) for s in originals]
    enc_q = {s: [st.encode(q) for q in st.data.queries] for s, st in studies.items()}
    out = {}
    for family in ([k for k in sizes if k not in GRADIENT_KINDS], [k for k in sizes if k in GRADIENT_KINDS]):
        if not family:
            continue
        multi = make_multi_size(
            {k: sizes[k] for k in family},
            lm.model,
            lm.device,
            dtype=cfg.dtype,
            seed=cfg.seed,
            batch_size=batch_size,
            calibration=enc_o[:CALIBRATION_SAMPLES],
            rule=rule,
        )
        n = len(enc_o) + sum(len(v) for v in enc_q.values())
        bar = progress_bar(total=n, desc=f"features ({multi.kind}: {len(multi.parts)} sizes, one pass)", unit="sample")
        fo = multi.split(featurize(multi, enc_o, lm.device, cfg.dtype, "original", bar)[0])
        fq = {s: multi.split(featurize(multi, e, lm.device, cfg.dtype, "query", bar)[0]) for s, e in enc_q.items()}
        bar.close()
        for i, part in enumerate(multi.parts):
            arrays = {s: per_matrix_arrays(fq[s][i], fo[i], part.layout) for s in fq}
            row = {
                "proj_dim": part.spec["proj_dim"],
                "dims": multi.dims[i],
                "sizes": np.diff(part.layout.offsets),  # dims per matrix
                "spec": part.spec,
                "arrays": arrays,
            }
            out.setdefault(part.kind, []).append(row)
        del multi, fo, fq
    return out


def load_datasets(runs: list[ExactRun]) -> dict:
    """Each run's dataset by setting, read as the run read it (study.context.load_data: its --turns and --ids-file
    included), refused if its files changed since the run."""
    from gradsim.study.context import check_unchanged, load_data

    out = {}
    for run in runs:
        c = run.result["config"]
        data = load_data(Config.from_dict(c))
        check_unchanged(data, c, str(run.path))
        out[run.setting] = data
    return out


def candidate_protocols(run: ExactRun, data) -> dict:
    """protocol -> each query's candidate list (indices into the originals, the true one first), as the run
    ranked them (its --candidates all gives the corpus and BM25's picks)."""
    from gradsim.data.retrieval import candidate_lists

    c = run.result["config"]
    bm25 = candidate_lists(data, "bm25", c["top_k"], turns=c.get("turns", "first"))
    out = {f"1-of-{len(bm25[0])}": bm25}
    if c["candidates"] == "all":
        out = {"corpus": candidate_lists(data, "all", c["top_k"]), **out}
    return out


def gather(arrays: tuple, cands: list[list[int]]) -> tuple:
    """A query's candidates' per-matrix dots and self-dots, from the (Q, N, M) / (N, M) arrays."""
    dots, qself, oself = arrays
    idx = np.asarray(cands)
    return np.take_along_axis(dots, idx[..., None], 1), qself, oself[idx]


def projection_curves(run: ExactRun, projected: dict, cands: list[list[int]], chosen: list[list[int]], splits: int):
    """Per kind and size: whole-model quality on all queries, and select-then-project (each split's greedy
    subset, its projected slices only) on that split's held-out half."""
    ctype, curves, stp = run.computation_type, {}, {}
    for kind, rows in projected.items():
        for row in rows:
            dots, qself, cself = gather(row["arrays"][run.setting], cands)
            whole = summarize_ranks(subset_scores(dots, qself, cself, slice(None), ctype))
            curves.setdefault(kind, []).append(
                {"proj_dim": row["proj_dim"], "floats": row["dims"], "bytes": 4 * row["dims"], **whole}
            )
            sub = []
            for seed, idx in zip(range(splits), chosen):
                if not idx:
                    continue
                _, report = split_queries(dots.shape[0], seed)
                r = summarize_ranks(subset_scores(dots[report], qself[report], cself[report], idx, ctype))
                sub.append((row["sizes"][idx].sum(), r["top1"], r["mrr"]))
            if sub:
                stp.setdefault(kind, []).append(point(*zip(*sub), proj_dim=row["proj_dim"]))
    return curves, stp


# The frontier: selection, projection, select-then-project and references, per setting and protocol
# --------------------------------------------------------------------------------------------


def default_sizes(kinds: list[str], numel: np.ndarray, sizes: list[int]) -> dict:
    """Each kind's --proj-dim values for total sizes ``sizes``: the sketches take the total; factorized and
    trak take dims per matrix, the power of two nearest total / matrices (their totals are reported as
    measured). Sizes that would keep every parameter exact are dropped."""
    total, m = int(numel.sum()), len(numel)
    out = {}
    for k in kinds:
        if k in ("tensorsketch", "countsketch"):
            ks = [s for s in sizes if s < total]
        else:
            ks = sorted({max(1, 2 ** round(math.log2(max(s / m, 1)))) for s in sizes})
            ks = [s for s in ks if s < numel.max()]
        if ks:
            out[k] = ks
    return out


def frontier(
    run_dirs: list[Path],
    kinds: list[str],
    sizes: list[int],
    splits: int = 10,
    max_size: int = 16,
    device: Optional[str] = None,
    batch_size: int = 1,
    lm=None,
    allocation: str = "norm",
) -> dict:
    """The frontier of exact runs (one per setting): the table frontier.json holds (module docstring).
    ``lm``: the runs' model, already loaded (default: loaded from the runs' config)."""
    started = time.time()
    from gradsim import __version__

    runs = [load_exact_run(Path(d)) for d in run_dirs]
    check_runs(runs)
    imported = [str(r.path) for r in runs if r.result.get("study_import")]
    notes = []
    if imported and kinds:  # numbers without gradients: selection only
        notes.append(f"projection points skipped: {', '.join(imported)}: imported study numbers, no gradients")
        kinds = []
    out = {
        "gradsim_version": __version__,
        "runs": [str(r.path) for r in runs],
        "model": runs[0].result["model"],
        "config": {
            "splits": splits,
            "max_size": max_size,
            "kinds": kinds,
            "sizes": sizes,
            "batch_size": batch_size,
            "allocation": allocation,
        },
        "interval": "2.5-97.5 percentiles over the random choose/report splits (selection, select-then-project)",
        "storage": "floats per sample; bytes at fp32 (how features are stored)",
        "settings": {},
    }
    selections = {}
    for r in runs:
        for proto, pick in r.protocols().items():
            selections[r.setting, proto] = selection_curves(r, pick, splits, max_size)
    proj_sizes = default_sizes(kinds, runs[0].numel, sizes)
    for k in ("tensorsketch", "countsketch"):
        if k in proj_sizes:  # also at the sizes the greedy subsets have
            extra = {int(round(s["greedy_final"]["floats"])) for s in selections.values()}
            # (within the sizes asked for: a subset of millions of floats is not a size worth a sketch)
            proj_sizes[k] = sorted(set(proj_sizes[k]) | {e for e in extra if 0 < e <= max(sizes)})
    data = load_datasets(runs) if proj_sizes else {}
    projected = project_runs(runs, data, proj_sizes, device, batch_size, lm, allocation) if proj_sizes else {}
    for r in runs:
        per = {}
        for proto, pick in r.protocols().items():
            sel = selections[r.setting, proto]
            entry = {k: v for k, v in sel.items() if not k.startswith("_")}
            entry["references"] = references(r, pick)
            if projected:
                cands = candidate_protocols(r, data[r.setting])[proto]
                entry["projection"], entry["select_then_project"] = projection_curves(
                    r, projected, cands, sel["_chosen_idx"], splits
                )
            per[proto] = entry
        out["settings"][r.setting] = per
    out["projection_specs"] = {k: [row["spec"] for row in rows] for k, rows in projected.items()}
    if notes:
        out["notes"] = notes
    out["seconds"] = round(time.time() - started, 1)
    return out
