"""The frontier's table and figure (frontier.json as text and frontier.png), from the result frontier.frontier makes."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional

from gradsim.errors import GradsimError
from gradsim.io import atomic_writer


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
    """The frontier's figure; ``note`` (reference.table_figures: a reference table's source) as its title."""
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
