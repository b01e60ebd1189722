"""Finite or loud (issue 26): a NaN or inf gradient never becomes a ranking."""

import copy

import numpy as np
import orjson
import pytest
import torch

from gradsim.cli import main
from gradsim.config import Config
from gradsim.core.model import LoadedModel
from gradsim.io import read_json


def nan_model(tiny) -> LoadedModel:
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    return LoadedModel(model, tiny.tokenizer, "tiny-nan", "test", tiny.device, tiny.chat_template_sha256, 256)


def run_main(monkeypatch, capsys, lm, out, *argv):
    import gradsim.study.run

    monkeypatch.setattr(gradsim.study.run, "load_model", lambda cfg, device: lm)
    monkeypatch.setattr(gradsim.study.run, "check_exact_fits", lambda cfg, device: None)
    code = main(["--output-dir", str(out), "--device", "cpu", "--sample-size", "2", "--top-k", "1", *argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    errors = [line for line in cap.err.splitlines() if line.startswith("error")]  # besides progress bars
    return code, "\n".join(errors), cap.out


@pytest.mark.parametrize("extra", [[], ["--use-random-projection", "--projection", "countsketch"]])
def test_a_nan_weight_stops_the_run_with_one_line_and_no_results(tiny, tmp_path, monkeypatch, capsys, extra):
    out = tmp_path / "out"
    code, err, stdout = run_main(monkeypatch, capsys, nan_model(tiny), out, "--no-baselines", *extra)
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    assert "not finite" in err and "lima_" in err and "model.layers.1.mlp.down_proj.weight" in err, err
    assert "--allow-nonfinite" in err and "top-1" not in stdout
    assert not list(out.rglob("results*.json")) and not list(out.rglob("scores*.npz"))


def test_allow_nonfinite_drops_and_counts_the_query(tiny, tmp_path, monkeypatch, capsys):
    """One query's gradient made NaN: it is dropped and counted, the others are ranked as before."""
    from gradsim.core.gradients import GradientComputer
    from gradsim.study.run import run

    ref = run(Config(device="cpu", sample_size=3, top_k=1, output_dir=str(tmp_path / "ref"), baselines=False), tiny)
    bad = ref["queries"][1]["id"]
    from gradsim.study.stream import ExactStream

    real, real_stream = GradientComputer.gradient, ExactStream._gradient
    role = []

    def poisoned(self, enc):
        g = real(self, enc)
        if enc.id == bad and role[-1] == "query":
            g[:10] = float("nan")
        return g

    def streamed(self, enc, r, *a, **k):
        role.append(r)
        return real_stream(self, enc, r, *a, **k)

    monkeypatch.setattr(GradientComputer, "gradient", poisoned)
    monkeypatch.setattr(ExactStream, "_gradient", streamed)
    out = tmp_path / "out"
    code, err, stdout = run_main(monkeypatch, capsys, tiny, out, "--no-baselines", "--sample-size", "3")
    assert code == 2 and "not finite" in err and bad in err
    assert not list(out.rglob("results.json"))
    code, err, stdout = run_main(
        monkeypatch, capsys, tiny, out, "--no-baselines", "--sample-size", "3", "--allow-nonfinite"
    )
    assert code == 0, err
    res = read_json(out / "gradient-similarity" / "paraphrased" / "results.json")
    assert res["nonfinite"]["queries_dropped"] == 1 and res["nonfinite"]["nonfinite_query_ids"] == [bad]
    assert [q["id"] for q in res["queries"]] == [q["id"] for q in ref["queries"] if q["id"] != bad]
    assert res["config"]["allow_nonfinite"] is True and "allow_nonfinite" not in ref["config"]
    assert [q["scores"] for q in res["queries"]] == [q["scores"] for q in ref["queries"] if q["id"] != bad]
    with np.load(out / "gradient-similarity" / "paraphrased" / "scores.npz") as z:
        assert z["query_index"].tolist() == [0, 2] and np.isfinite(z["dots"]).all()


def fake_run(run_dir, dots):
    run_dir.mkdir(parents=True)
    q, c, m = dots.shape
    result = {"parameter_names": [f"m{i}" for i in range(m)], "config": {"computation_type": "gradient-similarity"}}
    (run_dir / "results.json").write_bytes(orjson.dumps(result))
    np.savez(run_dir / "scores.npz", dots=dots, qself=np.ones((q, m)), cself=np.ones((q, c, m)))


def test_select_and_analyze_refuse_nonfinite_scores(tmp_path, capsys):
    from gradsim.analysis.figures import load_runs
    from gradsim.cli.analysis import select_main
    from gradsim.errors import GradsimError

    run_dir = tmp_path / "gradient-similarity" / "paraphrased"
    fake_run(run_dir, np.full((4, 3, 2), np.nan))
    assert select_main([str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "non-finite" in err and "scores.npz" in err, err
    assert not (run_dir / "selection.json").exists()
    with pytest.raises(GradsimError, match="non-finite"):
        load_runs(tmp_path)


def test_analyze_names_a_truncated_run_file(tmp_path):
    from gradsim.analysis.figures import load_runs
    from gradsim.errors import GradsimError

    run_dir = tmp_path / "gradient-similarity" / "paraphrased"
    fake_run(run_dir, np.zeros((4, 3, 2)))
    npz = run_dir / "scores.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(GradsimError, match="scores.npz is truncated or damaged.*rerun that run"):
        load_runs(tmp_path)
