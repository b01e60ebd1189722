"""The frontier: held-out selection with intervals on known per-matrix scores, projection points against a
single-size featurizer run alone, reference lines against the runs' own summaries, and bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from test_selection import synthetic

from gradsim.analysis.frontier import ExactRun, frontier, selection_curves
from gradsim.analysis.frontier_table import format_table, plot
from gradsim.analysis.selection import greedy_select, split_queries
from gradsim.cli.analysis import frontier_main as main
from gradsim.config import Config
from gradsim.core.metrics import summarize_ranks, true_rank
from gradsim.core.projection import CALIBRATION_SAMPLES, CountSketchFeaturizer, make_allocation
from gradsim.core.score import subset_scores
from gradsim.data.encode import encode
from gradsim.data.load import load_dataset
from gradsim.data.retrieval import candidate_lists
from gradsim.study.run import run


def synthetic_run(q=40):
    dots, qself, cself = synthetic(q=q)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(dots.shape[-1])]
    result = {"config": {"candidates": "bm25"}}
    arrays = {"dots": dots, "qself": qself, "cself": cself}
    numel = np.array([100, 200, 300, 400, 500])
    return ExactRun(None, result, names, numel, arrays, "paraphrased", "gradient-similarity")


def test_selection_is_chosen_on_one_half_and_reported_on_the_other_with_intervals():
    r = synthetic_run()
    out = selection_curves(r, lambda a: a, splits=6, max_size=3, best_k=(1, 2))
    dots, qself, cself = r.arrays["dots"], r.arrays["qself"], r.arrays["cself"]
    top1, floats = [], []
    for seed, chosen in enumerate(out["chosen"]):
        choose, report = split_queries(dots.shape[0], seed)
        # the subset is what greedy selection picks on the choosing half alone ...
        alone = greedy_select(
            r.names,
            dots[choose],
            qself[choose],
            cself[choose],
            r.computation_type,
            np.arange(len(choose)),
            np.arange(len(choose)),
            3,
        )
        assert chosen == alone["chosen"]
        # ... and its score is measured on the other half, recomputed here from the subset's cosine
        idx = [r.names.index(n) for n in chosen]
        s = subset_scores(dots[report], qself[report], cself[report], idx, r.computation_type)
        top1.append(float((true_rank(s) == 1).mean()))
        floats.append(r.numel[idx].sum())
    final = out["greedy_final"]
    assert final["top1"]["mean"] == pytest.approx(np.mean(top1))
    assert final["top1"]["ci"] == pytest.approx([np.percentile(top1, 2.5), np.percentile(top1, 97.5)])
    assert final["floats"] == pytest.approx(np.mean(floats)) and final["bytes"] == pytest.approx(4 * np.mean(floats))
    assert final["top1"]["n"] == 6
    # the informative matrices (1 and 3) are found, and beat the full gradient held out
    assert all(set(c[:2]) == {r.names[1], r.names[3]} for c in out["chosen"])
    assert final["mrr"]["mean"] > out["full_gradient_held_out"]["mrr"]["mean"]
    best1 = out["best_k"][0]
    assert best1["matrices"] == 1 and best1["floats"] in (200.0, 400.0, 300.0)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    cfg = Config(device="cpu", sample_size=10, output_dir=str(out), top_k=3, candidates="all", setting="both")
    run(cfg, lm=tiny)
    return [out / "gradient-similarity" / f"{s}-all" for s in ("paraphrased", "model-generated")]


@pytest.mark.slow
def test_frontier_points_equal_independent_computations(tiny, runs, tmp_path):
    result = frontier(runs, ["countsketch", "tensorsketch"], [512, 2048], splits=3, max_size=3, lm=tiny)
    para = result["settings"]["paraphrased"]
    assert set(para) == {"corpus", "1-of-4"}
    stored = json.loads((runs[0] / "results.json").read_text())
    # reference lines are the run's own summaries (corpus, and the BM25 protocol picked out of it)
    assert para["corpus"]["references"]["full gradient"]["top1"] == stored["summary"]["whole_model"]["top1"]
    assert para["1-of-4"]["references"]["full gradient"]["mrr"] == pytest.approx(
        stored["bm25_protocol"]["summary"]["whole_model"]["mrr"]
    )
    assert para["corpus"]["references"]["bm25"]["top1"] == stored["baselines"]["bm25"]["top1"]

    # the countsketch point at 2048 dims: one featurizer of that size alone, on the same data and calibration
    c = stored["config"]
    data = load_dataset(c["original_data"], c["variant_data"], c["sample_size"])
    enc_o = [encode(tiny.tokenizer, s, c["max_length"] or 256, c["loss_on"]) for s in data.originals]
    enc_q = [encode(tiny.tokenizer, s, c["max_length"] or 256, c["loss_on"]) for s in data.queries]
    alloc = make_allocation(tiny.model, tiny.device, "float32", 2048, enc_o[:CALIBRATION_SAMPLES])
    f = CountSketchFeaturizer(tiny.model, tiny.device, "float32", 2048, c["seed"], allocation=alloc)
    fo = torch.stack([f.features(e) for e in enc_o]).double()
    fq = torch.stack([f.features(e) for e in enc_q]).double()
    cos = (torch.nn.functional.normalize(fq, dim=1) @ torch.nn.functional.normalize(fo, dim=1).T).numpy()
    for proto, mode in (("corpus", "all"), ("1-of-4", "bm25")):
        cands = candidate_lists(data, mode, 3)
        want = summarize_ranks(np.array([cos[i, cl] for i, cl in enumerate(cands)]))
        got = next(p for p in para[proto]["projection"]["countsketch"] if p["proj_dim"] == 2048)
        assert got["top1"] == pytest.approx(want["top1"]) and got["mrr"] == pytest.approx(want["mrr"], abs=1e-6)
        assert got["floats"] == f.layout.total
    # select-then-project stores only the chosen matrices' slices: fewer floats than the whole sketch
    stp = para["corpus"]["select_then_project"]["countsketch"]
    assert all(p["floats"] < 2048 for p in stp)
    # the table and the figure are written
    assert "greedy" in format_table(result)
    plot(result, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_one_line_error_and_nothing_written(runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    res = json.loads((other / "results.json").read_text())
    res["config"]["original_data_sha256"] = "0" * 64
    (other / "results.json").write_text(json.dumps(res))
    out = tmp_path / "fr"
    assert main([str(runs[0]), str(other), "--projections", "none", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "original_data_sha256" in err and "\n" not in err
    assert not out.exists()

    res["config"]["original_data_sha256"] = json.loads((runs[1] / "results.json").read_text())["config"][
        "original_data_sha256"
    ]
    res["featurizer"] = {"kind": "tensorsketch"}
    (other / "results.json").write_text(json.dumps(res))
    assert main([str(runs[0]), str(other), "--projections", "none", "--output-dir", str(out)]) == 2
    assert "tensorsketch run" in capsys.readouterr().err and not out.exists()

    assert main([str(runs[0]), str(runs[0]), "--projections", "none", "--output-dir", str(out)]) == 2
    assert "one setting" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing"), "--projections", "none", "--output-dir", str(out)]) == 2
    assert "no finished run" in capsys.readouterr().err
    assert main([str(runs[0]), "--projections", "gaussian", "--output-dir", str(out)]) == 2
    assert not out.exists()


def test_selection_only_frontier_from_the_command(runs, tmp_path, capsys):
    out = tmp_path / "fr"
    assert (
        main([*map(str, runs), "--projections", "none", "--splits", "2", "--max-size", "2", "--output-dir", str(out)])
        == 0
    )
    table = json.loads((out / "frontier.json").read_text())
    assert set(table["settings"]) == {"paraphrased", "model-generated"}
    assert (out / "frontier.png").exists() and "full gradient" in capsys.readouterr().out


def test_best_k_ranks_saturated_matrices_by_margin_as_greedy_does():
    from test_selection import saturated

    dots, qself, cself = saturated()
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
    r = ExactRun(
        None,
        {"config": {}},
        names,
        np.array([10, 1000, 10]),
        {"dots": dots, "qself": qself, "cself": cself},
        "paraphrased",
        "gradient-similarity",
    )
    out = selection_curves(r, lambda a: a, splits=3, max_size=1, best_k=(1, 2))
    assert [p["floats"] for p in out["best_k"]] == [1000.0, 1010.0]  # m1 (larger margin), then m2 over noise
    assert all(c == [names[1]] for c in out["chosen"])
