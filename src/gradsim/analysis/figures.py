"""Tables and figures from finished runs, for notebooks/analysis.ipynb (kept here so it is tested).

A run directory is ``<output_dir>/<computation-type>/<run name>/`` holding ``results.json`` (summaries,
parameter names, per-query ranks) and ``scores.npz`` (``dots`` (Q, C, M), ``qself`` (Q, M),
``cself`` (Q, C, M); candidate 0 of each query is its true original). Layer x component numbers are
recomputed from the arrays, so they hold for any model whose matrices follow the usual naming.
Sections whose inputs a run lacks (baselines in results.json, a greedy matrix selection in
selection*.json from ``gradsim select``) are skipped, not failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from gradsim.core.finite import check_arrays
from gradsim.core.metrics import component_of, component_order, group_indices, layer_of, summarize_ranks
from gradsim.core.score import random_expectation, subset_scores
from gradsim.errors import GradsimError
from gradsim.io import load_json, load_npz, read_json
from gradsim.layout import RunPaths, selection_file

SETTING_ORDER = ("paraphrased", "model-generated")
METRICS = ("top1", "mrr")
LABELS = {"top1": "top-1", "mrr": "MRR"}


@dataclass
class Run:
    name: str  # the run directory's name: the setting, plus -all / -<projection><dim> suffixes
    path: Path
    result: dict
    arrays: dict

    @property
    def setting(self) -> str:
        return self.result.get("config", {}).get("setting", self.name)

    @property
    def names(self) -> list[str]:
        return self.result["parameter_names"]

    @property
    def whole(self) -> dict:
        return self.result["summary"]["whole_model"]

    @property
    def num_candidates(self) -> int:
        return int(self.arrays["dots"].shape[1])

    def scores(self, idx=slice(None)) -> np.ndarray:
        """(Q, C) cosine (or dot product, for dot-product runs) over the matrices ``idx``."""
        a, computation_type = self.arrays, self.result.get("config", {}).get("computation_type")
        return subset_scores(a["dots"], a["qself"], a["cself"], idx, computation_type)


def load_runs(results_dir, computation_type: str = "gradient-similarity") -> dict[str, Run]:
    """Every finished run under ``results_dir`` (an --output-dir such as data/, or one
    <computation-type> folder), paraphrased and model-generated first."""
    root = Path(results_dir)
    base = root / computation_type if (root / computation_type).is_dir() else root
    runs = {}
    for res in sorted(base.glob("*/results.json")):
        npz = RunPaths.sibling(res, "scores")
        if not npz.exists():
            continue
        fix = f"rerun that run, or move {res.parent.name}/ out of {base}"
        arrays = load_npz(npz, fix)
        check_arrays(arrays, npz)
        runs[res.parent.name] = Run(res.parent.name, res.parent, load_json(res, fix), arrays)
    if not runs:
        raise GradsimError(
            f"no finished runs (results.json + scores.npz) under {base}: run main.py first, or set "
            "GRADSIM_RESULTS_DIR to the --output-dir of your runs"
        )
    order = {s: i for i, s in enumerate(SETTING_ORDER)}
    return dict(sorted(runs.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def summary_table(runs: dict[str, Run]) -> list[dict]:
    rows = []
    for name, r in runs.items():
        w = r.whole
        rows.append(
            {
                "run": name,
                "n": w["n"],
                "candidates": r.num_candidates,
                "chance top-1": 1 / r.num_candidates,
                "top-1": w["top1"],
                "MRR": w["mrr"],
                "recall@5": w.get("recall@5"),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table (no pandas needed)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    width = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols), "  ".join("-" * width[c] for c in cols)]
    lines += ["  ".join(cell(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def group_metrics(run: Run, key) -> dict[str, dict]:
    """Metrics of the concatenated gradient of each group of matrices (``key(name)`` -> group or None)."""
    return {k: summarize_ranks(run.scores(idx)) for k, idx in group_indices(run.names, key).items()}


def layer_component_grid(run: Run, metric: str = "top1") -> tuple[list[int], list[str], np.ndarray]:
    """(layers, components, grid[layer, component]) of ``metric`` for each layer's matrices of one type."""
    cells = group_metrics(run, lambda n: (layer_of(n), component_of(n)) if layer_of(n) is not None else None)
    layers = sorted({k[0] for k in cells})
    comps = sorted({k[1] for k in cells}, key=component_order)
    grid = np.full((len(layers), len(comps)), np.nan)
    for (layer, comp), m in cells.items():
        grid[layers.index(layer), comps.index(comp)] = m[metric]
    return layers, comps, grid


def fidelity(run: Run) -> Optional[dict]:
    """The run's per_matrix_fidelity (projected runs; None for exact gradients, whose scores have no error)."""
    return run.result.get("per_matrix_fidelity")


def noisy_matrices(run: Run) -> list[str]:
    """Matrices whose projected per-matrix score is too noisy to rank (predicted p90 cosine error > 0.05)."""
    return list((fidelity(run) or {}).get("noisy", []))


def per_matrix_rows(run: Run, metric: str = "top1") -> list[dict]:
    """One row per matrix, best first: its metric, and for a projected run its dims, predicted cosine-error sd
    and whether it is too noisy to rank (noisy rows are kept, marked, not hidden)."""
    per, fid = run.result["summary"]["per_matrix"], (fidelity(run) or {}).get("matrices", {})
    rows = []
    for name in run.names:
        row = {"matrix": name, LABELS[metric]: per[name][metric]}
        if fid:
            f = fid[name]
            row.update(dims=f["dims"], exact=f["exact"], sd=f["predicted_sd"], noisy="NOISY" if f["noisy"] else "")
        rows.append(row)
    return sorted(rows, key=lambda r: -r[LABELS[metric]])


def group_predicted_sd(run: Run, key) -> dict:
    """For each group of matrices (``key(name)`` -> group or None), the predicted sd of its cosine's error from
    projection: sqrt(sum_m |a_m|^2 |b_m|^2 sd_m^2) / (|a| |b|) over the group's matrices (sd_m the matrix's
    predicted sd at cosine 0, matrices sketched independently), from the stored self-dots, median over the
    run's (query, candidate) pairs. Empty for an exact run."""
    fid = fidelity(run)
    if fid is None:
        return {}
    sd2 = np.array([fid["matrices"][n]["predicted_sd"] ** 2 for n in run.names])
    q, c = run.arrays["qself"][:, None, :], run.arrays["cself"]  # (Q, 1, M), (Q, C, M)
    out = {}
    for g, idx in group_indices(run.names, key).items():
        num = (q[..., idx] * c[..., idx] * sd2[idx]).sum(-1)
        den = q[..., idx].sum(-1) * c[..., idx].sum(-1)
        out[g] = float(np.median(np.sqrt(num / np.maximum(den, 1e-300))))
    return out


def fidelity_note(run: Run) -> str:
    """One line on how far the run's per-matrix scores can be trusted."""
    fid = fidelity(run)
    if fid is None:
        return f"{run.name}: exact gradients: per-matrix scores carry no projection error"
    c, sd = fid["counts"], fid.get("predicted_sd_sketched")
    spread = (
        f"; sketched matrices' predicted cosine-error sd median {sd['median']:.3f}, worst {sd['worst']:.3f}"
        if sd
        else ""
    )
    return (
        f"{run.name}: {c['noisy']} of {c['matrices']} matrices too noisy to rank ({fid['noisy_if']}); "
        f"{c['exact']} kept exact{spread}"
        + (f" ({fid['prediction']})" if fid.get("prediction") == "lower bound" else "")
        + (f"; allocation {fid['allocation']}" if "allocation" in fid else "")
    )


def true_vs_others(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Whole-model similarity of each query to its true original, and to every other candidate."""
    s = run.scores()
    return s[:, 0], s[:, 1:].ravel()


# --- figures ------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: the notebook also runs in CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / name
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_settings(runs: dict[str, Run], out_dir) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(runs), 3.6))
    names = list(runs)
    for ax, metric in zip(axes, METRICS):
        vals = [runs[n].whole[metric] for n in names]
        bars = ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.2f")
        chance = [random_expectation(runs[n].num_candidates)[metric] for n in names]
        ax.hlines(
            chance,
            np.arange(len(names)) - 0.4,
            np.arange(len(names)) + 0.4,
            colors="k",
            linestyles="--",
            label="random ranking",
        )
        ax.set_ylim(0, 1.12)  # room for the bar labels
        ax.set_title(f"whole-model {LABELS[metric]}")
        ax.tick_params(axis="x", rotation=20)
    axes[0].legend(loc="lower left", fontsize=8)
    return save_figure(fig, out_dir, "settings_top1_mrr.png")


def plot_components(runs: dict[str, Run], out_dir, metric: str = "top1") -> Path:
    plt = pyplot()
    per = {n: group_metrics(r, component_of) for n, r in runs.items()}
    comps = sorted({c for v in per.values() for c in v}, key=component_order)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.5 * len(comps) * (len(runs) + 1)), 3.6))
    width = 0.8 / len(runs)
    for i, (n, v) in enumerate(per.items()):
        ax.bar(
            np.arange(len(comps)) + (i - (len(runs) - 1) / 2) * width,
            [v.get(c, {}).get(metric, np.nan) for c in comps],
            width,
            label=n,
        )
    ax.set_xticks(np.arange(len(comps)), comps)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(LABELS[metric])
    ax.set_title(f"{LABELS[metric]} per component type (its matrices in all layers together)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, out_dir, f"components_{metric}.png")


def plot_layers(runs: dict[str, Run], out_dir, metric: str = "top1") -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for n, r in runs.items():
        per = group_metrics(r, layer_of)
        layers = sorted(per)
        ax.plot(layers, [per[layer][metric] for layer in layers], marker="o", ms=3, label=n)
    ax.set_xlabel("layer")
    ax.set_ylabel(LABELS[metric])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{LABELS[metric]} per layer (all matrices of a layer together)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, out_dir, f"layers_{metric}.png")


def noisy_cells(run: Run, layers: list[int], comps: list[str]) -> np.ndarray:
    """(layers, components) True where any matrix of the cell is too noisy to rank (noisy_matrices)."""
    cells = np.zeros((len(layers), len(comps)), dtype=bool)
    for name in noisy_matrices(run):
        layer, comp = layer_of(name), component_of(name)
        if layer in layers and comp in comps:
            cells[layers.index(layer), comps.index(comp)] = True
    return cells


def plot_heatmap(run: Run, out_dir, metric: str = "top1") -> Path:
    """One cell per layer x component; a projected run's cells holding a matrix too noisy to rank are crossed."""
    plt = pyplot()
    layers, comps, grid = layer_component_grid(run, metric)
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(comps), 1.2 + 0.22 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ys, xs = np.nonzero(noisy_cells(run, layers, comps))
    if len(xs):
        ax.scatter(xs, ys, marker="x", s=12, c="red", linewidths=0.8, label="too noisy to rank")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.25, 1.0))
    ax.set_xticks(np.arange(len(comps)), comps)
    ax.set_yticks(np.arange(len(layers)), layers, fontsize=7)
    ax.set_xlabel("component")
    ax.set_ylabel("layer")
    ax.set_title(f"{run.name}: {LABELS[metric]} per matrix", fontsize=10)
    fig.colorbar(im, ax=ax, label=LABELS[metric])
    return save_figure(fig, out_dir, f"heatmap_{run.name}_{metric}.png")


def plot_similarity(runs: dict[str, Run], out_dir) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (n, r) in zip(axes[0], runs.items()):
        true, others = true_vs_others(r)
        true, others = true[np.isfinite(true)], others[np.isfinite(others)]
        bins = np.linspace(
            min(true.min(initial=0), others.min(initial=0)), max(true.max(initial=1), others.max(initial=1)), 30
        )
        ax.hist(others, bins=bins, alpha=0.6, density=True, label=f"other candidates ({others.size})")
        ax.hist(true, bins=bins, alpha=0.6, density=True, label=f"true original ({true.size})")
        ax.set_title(n)
        ax.set_xlabel("whole-model gradient similarity")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("density")
    return save_figure(fig, out_dir, "similarity_true_vs_others.png")


def baseline_rows(runs: dict[str, Run]) -> list[dict]:
    """Gradients against the baselines each run recorded (``result["baselines"]``), if any."""
    rows = []
    for n, r in runs.items():
        base = r.result.get("baselines")
        if not base:
            continue
        rows.append({"run": n, "method": "gradient", "top-1": r.whole["top1"], "MRR": r.whole["mrr"]})
        for method, m in base.items():
            m = m.get("whole_model", m) if isinstance(m, dict) else {}
            if "top1" in m:
                rows.append({"run": n, "method": method, "top-1": m["top1"], "MRR": m.get("mrr")})
    return rows


def plot_baselines(runs: dict[str, Run], out_dir) -> Optional[Path]:
    rows = baseline_rows(runs)
    if not rows:
        return None
    plt = pyplot()
    names = list(dict.fromkeys(r["run"] for r in rows))
    # "random" is an expectation, not a method: drawn as a level, not a bar.
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "random"]
    fig, axes = plt.subplots(1, 2, figsize=(6 + 1.2 * len(names), 3.6))
    width = 0.8 / len(methods)
    x = np.arange(len(names))
    for ax, metric in zip(axes, ("top-1", "MRR")):
        for i, method in enumerate(methods):
            vals = [next((r[metric] for r in rows if r["run"] == n and r["method"] == method), np.nan) for n in names]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=method)
        rnd = [next((r[metric] for r in rows if r["run"] == n and r["method"] == "random"), np.nan) for n in names]
        ax.hlines(rnd, x - 0.45, x + 0.45, colors="k", linestyles="--", label="random ranking")
        ax.set_xticks(x, names, rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{metric}: gradients vs baselines")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save_figure(fig, out_dir, "baselines.png")


def greedy_selections(run: Run) -> dict[str, dict]:
    """The greedy matrix selections made on a run (``gradsim select``): selection.json and
    selection_bm25.json beside its results, by protocol."""
    out = {}
    for f in (selection_file(run.path), selection_file(run.path, "bm25")):
        if not f.exists():
            continue
        sel = read_json(f)
        if isinstance(sel, dict) and sel.get("path"):
            out[sel.get("protocol", f.stem)] = sel
    return out


def greedy_rows(runs: dict[str, Run]) -> list[dict]:
    rows = []
    for n, r in runs.items():
        for protocol, sel in greedy_selections(r).items():
            held, full = sel["held_out"], sel["full_gradient_held_out"]
            rows.append(
                {
                    "run": n,
                    "protocol": protocol,
                    "matrices": len(sel["chosen"]),
                    "selected top-1": held["top1"],
                    "full top-1": full["top1"],
                    "selected MRR": held["mrr"],
                    "full MRR": full["mrr"],
                    "held-out n": held["n"],
                }
            )
    return rows


def plot_greedy(runs: dict[str, Run], out_dir) -> Optional[Path]:
    """Held-out top-1 and MRR as matrices are added greedily (chosen on the other half of the queries),
    against the full gradient on the same held-out queries."""
    curves = [(n, p, sel) for n, r in runs.items() for p, sel in greedy_selections(r).items()]
    if not curves:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, METRICS):
        for i, (n, protocol, sel) in enumerate(curves):
            label = n if protocol == "as-run" else f"{n} ({protocol})"
            steps = np.arange(1, len(sel["path"]) + 1)
            ax.plot(steps, [s["held_out"][metric] for s in sel["path"]], "-o", ms=3, color=f"C{i}", label=label)
            ax.plot(steps, [s["choose"][metric] for s in sel["path"]], ":", color=f"C{i}", alpha=0.6)
            ax.axhline(sel["full_gradient_held_out"][metric], color=f"C{i}", ls="--", lw=0.8)
        ax.set_xlabel("matrices selected (greedy)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, max(len(sel["path"]) for *_, sel in curves) + 0.5)
        ax.set_ylabel(LABELS[metric])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"held-out {LABELS[metric]} (dotted: selection half; dashed: full gradient)", fontsize=9)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save_figure(fig, out_dir, "greedy_selection.png")
