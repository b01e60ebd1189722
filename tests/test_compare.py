"""gradsim compare and the shared bootstrap intervals (metrics.bootstrap_interval)."""

import numpy as np
import orjson
from test_study_import import write_study

from gradsim.analysis.compare import compare, spearman
from gradsim.cli.analysis import compare_main
from gradsim.cli.analysis import import_study_main as import_main
from gradsim.cli.common import format_summary
from gradsim.core.metrics import BOOTSTRAP_NOTE, bootstrap_interval, rank_intervals


def imported(tmp_path, name, **kw):
    folder = write_study(tmp_path / f"study-{name}", **kw)
    out = tmp_path / name
    assert import_main([str(folder), "--setting", "paraphrased", "--output-dir", str(out)]) == 0
    return out / "gradient-similarity" / "paraphrased", out / "dot-product" / "paraphrased"


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(3)
    v = (rng.random(400) < 0.7).astype(float)
    ci = bootstrap_interval(v)
    assert ci == bootstrap_interval(v) and ci != bootstrap_interval(v, seed=1)
    assert ci[0] < v.mean() < ci[1] and 0.03 < ci[1] - ci[0] < 0.12  # about 4 standard errors wide
    assert bootstrap_interval(np.ones(50)) == [1.0, 1.0] and bootstrap_interval(np.zeros(7) - np.zeros(7)) == [0, 0]
    r = rank_intervals([1, 2, 1, 1, 3, 1])
    assert r["top1"][0] <= 4 / 6 <= r["top1"][1] and r["mrr"][1] <= 1.0
    assert "seed 0" in BOOTSTRAP_NOTE


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert abs(spearman([1, 2, 2, 3], [1, 3, 2, 4]) - 0.9486832980505138) < 1e-12


def test_compare_two_runs_of_the_same_queries(tmp_path, capsys):
    cos, dot = imported(tmp_path, "a", noise=2.0)
    out = compare(cos, dot)
    a = orjson.loads((cos / "results.json").read_bytes())
    b = orjson.loads((dot / "results.json").read_bytes())
    d = out["difference_a_minus_b"]
    assert d["top1"]["value"] == a["summary"]["whole_model"]["top1"] - b["summary"]["whole_model"]["top1"]
    assert d["top1"]["ci"][0] <= d["top1"]["value"] <= d["top1"]["ci"][1]
    ra = {q["id"]: q["rank"] for q in a["queries"]}
    rb = {q["id"]: q["rank"] for q in b["queries"]}
    assert out["disagreeing_queries"]["count"] == sum((ra[i] == 1) != (rb[i] == 1) for i in ra)
    assert out["per_matrix_spearman"]["matrices"] == 6
    same = compare(cos, cos)
    assert same["difference_a_minus_b"]["mrr"] == {"value": 0.0, "ci": [0.0, 0.0]}
    assert same["disagreeing_queries"]["count"] == 0
    assert compare_main([str(cos), str(dot), "--output", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "A - B over 12 queries: top-1" in printed and "Spearman" in printed
    assert orjson.loads((tmp_path / "c.json").read_bytes())["queries"] == 12


def test_compare_refuses_runs_of_different_queries(tmp_path, capsys):
    cos, _ = imported(tmp_path, "a")
    other, _ = imported(tmp_path, "b", n=10, parts=((0, 10),))
    assert compare_main([str(cos), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "2 ids only in the first, 0 only in the second" in err


def test_summary_line_carries_bootstrap_intervals(tmp_path):
    cos, _ = imported(tmp_path, "a")
    r = orjson.loads((cos / "results.json").read_bytes())
    ci = rank_intervals([q["rank"] for q in r["queries"]])
    line = format_summary(r)
    assert f"top-1 {r['summary']['whole_model']['top1']:.3f} [{ci['top1'][0]:.3f}, {ci['top1'][1]:.3f}]" in line
    assert BOOTSTRAP_NOTE in line


def test_targets_intervals_come_from_the_shared_helper_with_the_numbers_they_had():
    """targets.bootstrap now calls metrics.rank_intervals; its numbers (targets.json) are those of the
    one-draw formula it used before, at sizes below and above the helper's chunking."""
    from gradsim.analysis.targets import bootstrap

    for n, resamples in ((48, 1000), (5000, 1000)):
        r = np.random.default_rng(n).integers(1, 6, size=n).astype(float)
        idx = np.random.default_rng(42).integers(0, n, size=(resamples, n))
        old = {}
        for name, v in (("top1", (r == 1).astype(float)), ("mrr", 1 / r)):
            boot = v[idx].mean(1)
            old[f"{name}_ci"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
        new = bootstrap(r, resamples, 42)
        assert (new["top1_ci"], new["mrr_ci"]) == (old["top1_ci"], old["mrr_ci"])
