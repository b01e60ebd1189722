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

    gradsim frontier data/gradient-similarity/paraphrased-all data/gradient-similarity/model-generated-all
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from gradsim.analysis.selection import greedy_select, split_queries, subset_key
from gradsim.config import ALLOCATIONS, Config
from gradsim.core.metrics import summarize_ranks
from gradsim.core.score import random_expectation, subset_scores
from gradsim.errors import GradsimError
from gradsim.io import atomic_write_json, atomic_writer, read_json
from gradsim.layout import frontier_files, whole_run
from gradsim.options import Parser, from_args, option

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
    from gradsim.data.encode import encode
    from gradsim.study.features import featurize, progress_bar
    from gradsim.study.run import resolved_max_length

    raw = dict(runs[0].result["config"], **({"device": device} if device else {}))
    cfg = Config.from_dict(raw)
    lm = lm or load_model(cfg, resolve_device(cfg))
    max_length = resolved_max_length(cfg, lm)
    originals = data[runs[0].setting].originals
    enc_o = [encode(lm.tokenizer, s, max_length, cfg.loss_on, cfg.turns) for s in originals]
    enc_q = {
        s: [encode(lm.tokenizer, q, max_length, cfg.loss_on, cfg.turns) for q in d.queries] for s, d in data.items()
    }
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
    """Each run's dataset by setting, refused if its files changed since the run."""
    from gradsim.data.load import load_dataset

    out = {}
    for run in runs:
        c = run.result["config"]
        data = load_dataset(c["original_data"], c["variant_data"], c.get("sample_size"), ids_file=c.get("ids_file"))
        if data.original_sha256 != c.get("original_data_sha256") or data.variant_sha256 != c.get("variant_data_sha256"):
            raise GradsimError(
                f"the data files of {run.path} changed since it ran ({c['original_data']}, {c['variant_data']}): "
                "run it again"
            )
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


def format_table(result: dict) -> str:
    lines = []
    for setting, per in result["settings"].items():
        for proto, e in per.items():
            lines.append(f"{setting} / {proto} ({e['references']['full gradient']['n']} queries)")
            lines.append(f"  {'method':<34} {'floats':>12} {'top-1':>7} {'MRR':>7}")

            def row(label, floats, top1, mrr, ci=None):
                f = f"{floats:>12,.0f}" if floats is not None else f"{'-':>12}"
                c = f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
                lines.append(f"  {label:<34} {f} {top1:>7.3f} {mrr:>7.3f}{c}")

            for name, ref in e["references"].items():
                row(name, ref.get("floats"), ref["top1"], ref["mrr"])

            def held(label, p):  # a point over splits: its mean and interval
                row(label, p["floats"], p["top1"]["mean"], p["mrr"]["mean"], p["top1"]["ci"])

            held(f"greedy ({e['greedy_final']['matrices']:.1f} matrices, held-out)", e["greedy_final"])
            held("full gradient (held-out halves)", e["full_gradient_held_out"])
            for p in e["best_k"]:
                held(f"best-{p['matrices']} matrices (held-out)", p)
            for kind, pts in e.get("projection", {}).items():
                for p in pts:
                    row(f"{kind} {p['proj_dim']}", p["floats"], p["top1"], p["mrr"])
            for kind, pts in e.get("select_then_project", {}).items():
                for p in pts:
                    held(f"greedy -> {kind} {p['proj_dim']}", p)
    return "\n".join(lines)


def plot(result: dict, path: Path, note: Optional[str] = None) -> None:
    """The frontier's figure; ``note`` (analysis.table_figures: a reference table's source) as its title."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise GradsimError(
            f"the frontier's figure needs matplotlib ({e}): uv sync (dev group) or pip install matplotlib"
        ) from None
    settings = list(result["settings"])
    protos = list(dict.fromkeys(p for per in result["settings"].values() for p in per))
    fig, axes = plt.subplots(
        len(settings), len(protos), figsize=(5.6 * len(protos), 4.0 * len(settings)), squeeze=False
    )
    colors = {"tensorsketch": "C0", "countsketch": "C1", "factorized": "C2", "trak": "C4"}
    for (i, setting), (j, proto) in itertools.product(enumerate(settings), enumerate(protos)):
        ax = axes[i][j]
        if proto not in result["settings"][setting]:
            ax.set_visible(False)
            continue
        e = result["settings"][setting][proto]
        g = e["greedy"]
        if g:
            x = [p["floats"] for p in g]
            ax.plot(x, [p["top1"]["mean"] for p in g], "k-o", ms=3, label="greedy selection (held-out)")
            ax.fill_between(x, [p["top1"]["ci"][0] for p in g], [p["top1"]["ci"][1] for p in g], color="k", alpha=0.12)
        b = e["best_k"]
        ax.plot(
            [p["floats"] for p in b],
            [p["top1"]["mean"] for p in b],
            "s--",
            color="C3",
            ms=4,
            label="best-k matrices (held-out)",
        )
        for kind, pts in e.get("projection", {}).items():
            ax.plot(
                [p["floats"] for p in pts], [p["top1"] for p in pts], "-^", color=colors.get(kind), ms=4, label=kind
            )
        for kind, pts in e.get("select_then_project", {}).items():
            ax.plot(
                [p["floats"] for p in pts],
                [p["top1"]["mean"] for p in pts],
                ":x",
                color=colors.get(kind),
                ms=4,
                label=f"greedy -> {kind}",
            )
        refs = e["references"]
        ax.axhline(refs["full gradient"]["top1"], color="k", lw=1, ls="--", label="full gradient")
        for name, style in (("bm25", ("C5", ":")), ("random", ("grey", ":"))):
            if name in refs:
                ax.axhline(refs[name]["top1"], color=style[0], ls=style[1], lw=1, label=name)
        reps = {k: v for k, v in refs.items() if k.startswith("representation")}
        if reps:
            best = max(reps, key=lambda k: reps[k]["top1"])
            ax.axhline(reps[best]["top1"], color="C6", ls="-.", lw=1, label=best.replace("_", " "))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("floats stored per sample")
        ax.set_ylabel("top-1")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{setting}, {proto}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if note:
        fig.suptitle(note, fontsize=9, color="firebrick")
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


@dataclass
class FrontierOptions:
    """The options of gradsim frontier (python -m gradsim.analysis.frontier)."""

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


def build_parser() -> Parser:
    return Parser.of(FrontierOptions, "gradsim frontier", __doc__.split("\n\n")[0])


def main(argv: Optional[list[str]] = None) -> int:
    from gradsim.cli import reports_errors

    return reports_errors(_main)(argv)


def _main(argv: Optional[list[str]]) -> int:
    a = from_args(FrontierOptions, build_parser().parse_args(argv))
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
    from gradsim.cli import format_summary

    for run in result["runs"]:  # each run's own summary, with bootstrap intervals over its queries
        print(f"{run}: {format_summary(read_json(whole_run(Path(run)).results))}")
    print(f"wrote {table} and {figure} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
