"""notebooks/analysis.ipynb executes headless on real run results and writes its figures; the
committed notebook carries no outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pytest

from gradsim.analysis import figures as analysis
from gradsim.analysis import reference
from gradsim.cli.analysis import analyze_main
from gradsim.config import BUNDLED_REFERENCE

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"


@pytest.fixture(scope="module")
def results(tiny, tmp_path_factory):
    """Both settings run end to end on the tiny model over the first 6 bundled originals, and a projected
    paraphrased run (its per-matrix fidelity is shown)."""
    from gradsim.analysis.selection import select_run
    from gradsim.config import Config
    from gradsim.study.run import run

    out = tmp_path_factory.mktemp("results")
    for setting in ("paraphrased", "model-generated"):
        run(Config(setting=setting, device="cpu", output_dir=str(out), sample_size=6), lm=tiny)
    projected = dict(use_random_projection=True, projection="countsketch", proj_dim=4000, baselines=False)
    run(Config(device="cpu", output_dir=str(out), sample_size=6, **projected), lm=tiny)
    for setting in ("paraphrased", "model-generated"):  # the greedy curves' input
        select_run(out / "gradient-similarity" / setting, max_size=4)
    return out


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code)


@pytest.mark.slow
def test_analysis_matches_the_run_summaries(results):
    runs = analysis.load_runs(results)
    assert list(runs)[:2] == ["paraphrased", "model-generated"]
    for r in runs.values():
        # The numbers recomputed from scores.npz are the ones main.py reported.
        assert analysis.summarize_ranks(r.scores()) == r.whole
        per_layer = analysis.group_metrics(r, analysis.layer_of)
        assert {str(k): v for k, v in per_layer.items()} == r.result["summary"]["per_layer"]
        layers, comps, grid = analysis.layer_component_grid(r)
        assert layers == [0, 1] and comps == ["q", "k", "v", "o", "gate", "up", "down", "norm"]
        assert np.isfinite(grid).all()
        true, others = analysis.true_vs_others(r)
        assert true.shape == (r.whole["n"],) and others.shape == (r.whole["n"] * (r.num_candidates - 1),)


@pytest.mark.slow
def test_notebook_runs_headless_and_saves_figures(results):
    # The CI entry point: gradsim analyze --execute notebooks/analysis.ipynb (a cell that
    # raises makes it fail).
    assert analyze_main(["--execute", str(NOTEBOOK), "--results-dir", str(results)]) == 0
    figures = results / "gradient-similarity"
    for name in (
        "settings_top1_mrr.png",
        "components_top1.png",
        "layers_top1.png",
        "similarity_true_vs_others.png",
        "baselines.png",
        "greedy_selection.png",
    ):
        assert (figures / name).stat().st_size > 1000, name
    for setting in ("paraphrased", "model-generated"):
        assert (figures / setting / f"heatmap_{setting}_top1.png").exists()
    # The bundled data's reference tables (no targets table or frontier was made here) in their own folder.
    for name in ("frontier.png", "targets_corpus.png", "targets_BM25.png"):
        assert not (figures / name).exists() and (figures / reference.REFERENCE_DIR / name).exists(), name
    nb = nbformat.read(figures / "analysis.executed.ipynb", as_version=4)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "3 runs under" in text and "model-generated" in text
    # The projected run's per-matrix scores are marked; the exact runs' carry no projection error.
    assert "paraphrased-countsketch4000: " in text and "matrices too noisy to rank" in text and "NOISY" in text
    assert "paraphrased: exact gradients: per-matrix scores carry no projection error" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 8
    # The committed notebook is untouched.
    test_committed_notebook_has_no_outputs()


def test_execute_without_results_is_a_one_line_error(tmp_path, capsys):
    assert analyze_main(["--execute", str(NOTEBOOK), "--results-dir", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_reference_tables_draw_into_their_own_folder_titled_with_their_source(tmp_path):
    """A user's results folder without a targets table or frontier gets the bundled data's reference
    figures only in reference-bundled-data/, titled with the source; its own tables' figures go beside it."""
    from gradsim.analysis import frontier_table

    figures = tmp_path / "gradient-similarity"
    figures.mkdir()
    table, source = reference.load_targets(tmp_path)
    assert source == BUNDLED_REFERENCE / "targets-bundled.json"
    out, note = reference.table_figures(figures, source, tmp_path)
    assert out == figures / reference.REFERENCE_DIR and "gradsim/bundled/reference/targets-bundled.json" in note
    assert reference.plot_targets(table, out, "BM25", note).parent == out
    front, source = reference.load_frontier(tmp_path)
    out, note = reference.table_figures(figures, source, tmp_path)
    frontier_table.plot(front, out / "frontier.png", note)
    assert "gradsim/bundled/reference/frontier.json" in note and (out / "frontier.png").is_file()
    assert not list(figures.glob("*.png"))  # nothing drawn from the reference tables among the user's figures
    own = tmp_path / "targets" / "targets.json"
    own.parent.mkdir()
    own.write_bytes((BUNDLED_REFERENCE / "targets-bundled.json").read_bytes())
    table, source = reference.load_targets(tmp_path)
    assert source == own and reference.table_figures(figures, source, tmp_path) == (figures, None)
