"""The committed reference tables of the bundled data (package data: bundled/reference/), which the analysis
falls back on where the runs made no loss-target table or frontier of their own, and the figures drawn from a
table: a reference table's go to their own folder, titled with their source, never among the runs' figures."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from gradsim.analysis.figures import pyplot, save_figure


def load_targets(results_dir) -> tuple[Optional[dict], Optional[Path]]:
    """The loss target x normalizer table (``gradsim targets``): the run's own if it made one, else the
    committed table of the bundled data (package data: bundled/reference/targets-bundled.json)."""
    from gradsim.config import BUNDLED_REFERENCE
    from gradsim.io import read_json
    from gradsim.layout import targets_file

    for path in (targets_file(results_dir), BUNDLED_REFERENCE / "targets-bundled.json"):
        if path.is_file():
            return read_json(path), path
    return None, None


def load_frontier(results_dir, computation_type: str = "gradient-similarity") -> tuple[Optional[dict], Optional[Path]]:
    """The frontier (``gradsim frontier``): beside the runs (its default place, or ``<results dir>/frontier``)
    if one was made, else the committed frontier of the bundled data (package data: bundled/reference/frontier.json)."""
    from gradsim.config import BUNDLED_REFERENCE
    from gradsim.io import read_json
    from gradsim.layout import frontier_files

    for root in (
        Path(results_dir) / computation_type / "frontier",
        Path(results_dir) / "frontier",
        BUNDLED_REFERENCE,
    ):
        path = frontier_files(root)[0]
        if path.is_file():
            return read_json(path), path
    return None, None


# Figures drawn from the committed reference tables of the bundled data (docs/), never from a user's runs,
# go to this subfolder of the figures' folder, with their source in the title (table_figures).
REFERENCE_DIR = "reference-bundled-data"


def table_figures(figures, source, results_dir) -> tuple[Path, Optional[str]]:
    """Where the figures of a table read from ``source`` (load_targets, load_frontier) go, and the note their
    title carries: a table made from the runs under ``results_dir`` goes beside them, untitled; the committed
    reference table of the bundled data goes to ``<figures>/reference-bundled-data/`` (created), titled with
    its source, so it is never taken for a figure of these runs."""
    source, root = Path(source).resolve(), Path(results_dir).resolve()
    if source.is_relative_to(root):
        return Path(figures), None
    out = Path(figures) / REFERENCE_DIR
    out.mkdir(parents=True, exist_ok=True)
    from gradsim.config import PACKAGE_DIR

    shown = f"gradsim/{source.relative_to(PACKAGE_DIR)}" if source.is_relative_to(PACKAGE_DIR.resolve()) else source
    return out, f"reference: {shown} (the bundled sample's committed table, not the runs under {root.name}/)"


def plot_targets(table: dict, out_dir, protocol: str = "corpus", note: Optional[str] = None) -> Path:
    """Top-1 with its 95% interval per loss target x normalizer and per baseline, one panel per setting
    (``protocol``: the prefix of the protocol shown, ``corpus`` or ``BM25``); ``note`` (table_figures) as
    the figure's title."""
    plt = pyplot()
    settings = list(dict.fromkeys(r["setting"] for r in table["rows"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 6), sharey=True, squeeze=False)
    if note:
        fig.suptitle(note, fontsize=9, color="firebrick")
    for ax, setting in zip(axes[0], settings):
        rows = [r for r in table["rows"] if r["setting"] == setting and r["protocol"].startswith(protocol)]
        labels = [
            f"{r['method']} {r['target']}" + ("" if r["normalizer"] == "-" else f" {r['normalizer']}") for r in rows
        ]
        y = np.arange(len(rows))[::-1]
        top1 = np.array([r["top1"] for r in rows])
        ci = np.array([r["top1_ci"] or [r["top1"], r["top1"]] for r in rows])
        colors = [{"gradient": "C0", "bm25": "C1", "representation": "C2"}.get(r["method"], "k") for r in rows]
        ax.barh(y, top1, xerr=[top1 - ci[:, 0], ci[:, 1] - top1], color=colors, capsize=2)
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlim(0, 1.05)
        ax.set_title(f"{setting}: top-1, {rows[0]['protocol']} (n={rows[0]['n']})")
    return save_figure(fig, out_dir, f"targets_{protocol}.png")
