"""The paper's question, held out, on the paper's own numbers (issue 24).

    uv run gradsim import-study <study>/paraphrased/... --setting paraphrased --output-dir IMPORTS
    uv run gradsim import-study <study>/model-generated/... --setting model-generated --output-dir IMPORTS
    uv run python bench/study_heldout.py IMPORTS [--splits 20] [--max-size 16] [--out docs/study_import]

For each setting's imported cosine run (AMD-OLMo-1B-SFT, 988 queries, 1 of 5 candidates):
  - greedy selection and best-k matrices, chosen on a random half of the queries and scored on the other
    half, over --splits splits (mean and 2.5-97.5 percentile interval over splits; frontier.selection_curves),
    with the in-sample figure beside it (chosen and scored on all 988 queries, as the paper chose);
  - top-1 and MRR of component types, attention vs MLP and each layer (their matrices' gradients concatenated),
    with bootstrap intervals over queries (metrics.rank_intervals).
Bytes per sample: the floats a selection stores per sample, at fp32. Writes <out>/heldout.json and
<out>/heldout.png and prints the markdown tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gradsim.analysis.frontier import best_k_order, load_exact_run, selection_curves
from gradsim.analysis.selection import greedy_select
from gradsim.core.metrics import component_of, layer_of, rank_intervals, summarize, summarize_ranks, true_rank
from gradsim.core.score import subset_scores
from gradsim.io import atomic_write_json

SETTINGS = ("paraphrased", "model-generated")
ATTENTION, MLP = ("q", "k", "v", "o"), ("gate", "up", "down")


def in_sample(run, max_size: int, best_k) -> dict:
    """Greedy and best-k chosen and scored on every query: the paper's in-sample choice."""
    a, ctype, names, numel = run.arrays, run.computation_type, run.names, run.numel
    everyone = np.arange(a["dots"].shape[0])
    g = greedy_select(names, a["dots"], a["qself"], a["cself"], ctype, everyone, everyone, max_size, numel)
    order = best_k_order(a["dots"], a["qself"], a["cself"], ctype, numel)
    best = {}
    for k in best_k:
        r = summarize_ranks(subset_scores(a["dots"], a["qself"], a["cself"], order[:k], ctype))
        best[k] = {"top1": r["top1"], "mrr": r["mrr"], "floats": int(numel[order[:k]].sum()), "first": names[order[0]]}
    idx = [names.index(n) for n in g["chosen"]]
    return {
        "greedy": {**g["held_out"], "matrices": len(idx), "floats": int(numel[idx].sum()), "chosen": g["chosen"]},
        "best_k": best,
    }


def paired_gain(run, splits: int, max_size: int) -> dict:
    """Greedy minus the full gradient on the same held-out half, per split: does selection beat the full
    gradient out of sample (the paper's headline, which it measured in sample)?"""
    from gradsim.analysis.frontier import interval
    from gradsim.analysis.selection import split_queries

    a, n = run.arrays, run.arrays["dots"].shape[0]
    gain = {"top1": [], "mrr": []}
    for seed in range(splits):
        choose, report = split_queries(n, seed)
        g = greedy_select(
            run.names, a["dots"], a["qself"], a["cself"], run.computation_type, choose, report, max_size, run.numel
        )
        held, full = g["held_out"] or g["full_gradient_held_out"], g["full_gradient_held_out"]
        for m in gain:
            gain[m].append(held[m] - full[m])
    return {m: {**interval(v), "splits_better": int(np.sum(np.array(v) > 0))} for m, v in gain.items()}


def groups(run) -> dict:
    """Component types, attention vs MLP, each layer: top-1 and MRR of the group's concatenated gradient."""
    keys = {
        "component": component_of,
        "block": lambda n: "attention" if component_of(n) in ATTENTION else "MLP" if component_of(n) in MLP else None,
        "layer": layer_of,
    }
    a, out = run.arrays, {}
    for label, key in keys.items():
        rows = {}
        for m, name in enumerate(run.names):
            k = key(name)
            if k is not None:
                rows.setdefault(k, []).append(m)
        out[label] = {}
        for k, idx in rows.items():
            ranks = true_rank(subset_scores(a["dots"], a["qself"], a["cself"], idx, run.computation_type))
            s = summarize(ranks)
            out[label][str(k)] = {
                "top1": s["top1"],
                "mrr": s["mrr"],
                "ci": rank_intervals(ranks),
                "matrices": len(idx),
                "floats": int(run.numel[idx].sum()),
            }
    return out


def ci(p) -> str:
    return f"{p['mean']:.4f} [{p['ci'][0]:.4f}, {p['ci'][1]:.4f}]"


def mb(floats) -> str:
    return f"{4 * floats / 2**20:,.1f} MiB" if floats >= 2**20 else f"{4 * floats / 2**10:,.0f} KiB"


def tables(result: dict) -> str:
    lines = []
    for setting, e in result["settings"].items():
        n = e["queries"]
        lines += [
            f"**{setting}** ({n} queries, 1 of 5 candidates; held out: {result['splits']} random half/half splits, "
            "mean [2.5-97.5 percentile over splits]; in sample: chosen and scored on all queries)",
            "",
            "| selection | matrices | bytes per sample (fp32) | held-out top-1 | held-out MRR | in-sample top-1 |",
            "|---|---|---|---|---|---|",
        ]
        full, ins = e["full_gradient_held_out"], e["in_sample"]
        lines.append(
            f"| full gradient | {e['matrices']} | {mb(full['floats'])} | {ci(full['top1'])} | {ci(full['mrr'])} | "
            f"{e['full_in_sample']['top1']:.4f} |"
        )
        g = e["greedy_final"]
        lines.append(
            f"| greedy (stops when the choosing half stops improving) | {g['matrices']:.1f} | {mb(g['floats'])} | "
            f"{ci(g['top1'])} | {ci(g['mrr'])} | {ins['greedy']['top1']:.4f} ({ins['greedy']['matrices']} matrices) |"
        )
        for p in e["best_k"]:
            k = p["matrices"]
            lines.append(
                f"| best-{k} | {k} | {mb(p['floats'])} | {ci(p['top1'])} | {ci(p['mrr'])} | "
                f"{ins['best_k'][str(k)]['top1']:.4f} |"
            )
        d = e["greedy_minus_full"]
        lines += [
            "",
            f"Greedy minus full gradient on the same held-out half (paired per split): top-1 {ci(d['top1'])}, better "
            f"in {d['top1']['splits_better']} of {result['splits']} splits; MRR {ci(d['mrr'])}. In sample, greedy "
            f"chose: {', '.join(ins['greedy']['chosen'])}.",
            "",
        ]
    lines += [
        "Components, attention vs MLP, and layers (each group's matrices concatenated, all queries; "
        "95% bootstrap over queries, 1000 resamples, seed 0):",
        "",
        "| group | matrices | bytes per sample | "
        + " | ".join(f"{s} top-1 | {s} MRR" for s in result["settings"])
        + " |",  # noqa: E501
        "|---|---|---|" + "---|---|" * len(result["settings"]),
    ]
    first = next(iter(result["settings"].values()))["groups"]
    for label in ("block", "component", "layer"):
        for k, row in first[label].items():
            cells = []
            for e in result["settings"].values():
                r = e["groups"][label][k]
                cells.append(f"{r['top1']:.3f} [{r['ci']['top1'][0]:.3f}, {r['ci']['top1'][1]:.3f}]")
                cells.append(f"{r['mrr']:.3f} [{r['ci']['mrr'][0]:.3f}, {r['ci']['mrr'][1]:.3f}]")
            name = f"layer {k}" if label == "layer" else k
            lines.append(f"| {name} | {row['matrices']} | {mb(row['floats'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["settings"]), figsize=(5.2 * len(result["settings"]), 3.4), squeeze=False)
    for ax, (setting, e) in zip(axes[0], result["settings"].items()):
        g, b = e["greedy"], e["best_k"]
        x = [4 * p["floats"] for p in g]
        ax.plot(x, [p["top1"]["mean"] for p in g], "k-o", ms=3, label="greedy, held out")
        ax.fill_between(x, [p["top1"]["ci"][0] for p in g], [p["top1"]["ci"][1] for p in g], color="k", alpha=0.12)
        xb = [4 * p["floats"] for p in b]
        err = np.array([[p["top1"]["mean"] - p["top1"]["ci"][0], p["top1"]["ci"][1] - p["top1"]["mean"]] for p in b])
        mean = [p["top1"]["mean"] for p in b]
        ax.errorbar(xb, mean, yerr=err.T, fmt="s--", color="C3", ms=4, label="best-k, held out")
        ins = e["in_sample"]["best_k"]
        ax.plot([4 * ins[str(p["matrices"])]["floats"] for p in b], [ins[str(p["matrices"])]["top1"] for p in b], "^:",
                color="C0", ms=4, label="best-k, in sample")  # fmt: skip
        ax.axhline(e["full_in_sample"]["top1"], color="grey", ls="--", lw=1, label="full gradient")
        gi = e["in_sample"]["greedy"]
        ax.plot([4 * gi["floats"]], [gi["top1"]], "*", color="C0", ms=9, label="greedy, in sample")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per sample (fp32)")
        ax.set_ylabel("top-1")
        ax.set_title(f"AMD-OLMo-1B-SFT, {setting} (chance 0.2)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("imports", type=Path, help="the --output-dir of gradsim import-study (both settings)")
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--max-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("docs/study_import"))
    a = ap.parse_args()
    started = time.time()
    result = {"splits": a.splits, "max_size": a.max_size, "settings": {}}
    for setting in SETTINGS:
        run = load_exact_run(a.imports / "gradient-similarity" / setting)
        sel = selection_curves(run, lambda x: x, a.splits, a.max_size)
        entry = {k: v for k, v in sel.items() if not k.startswith("_")}
        entry["queries"] = int(run.arrays["dots"].shape[0])
        entry["matrices"] = len(run.names)
        entry["in_sample"] = in_sample(run, a.max_size, [p["matrices"] for p in sel["best_k"]])
        entry["in_sample"]["best_k"] = {str(k): v for k, v in entry["in_sample"]["best_k"].items()}
        entry["full_in_sample"] = run.result["summary"]["whole_model"]
        entry["greedy_minus_full"] = paired_gain(run, a.splits, a.max_size)
        entry["groups"] = groups(run)
        result["settings"][setting] = entry
    result["seconds"] = round(time.time() - started, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / "heldout.json", result)
    plot(result, a.out / "heldout.png")
    print(tables(result))
    print(f"\n({result['seconds']:.0f} s; wrote {a.out / 'heldout.json'} and {a.out / 'heldout.png'})")


if __name__ == "__main__":
    main()
