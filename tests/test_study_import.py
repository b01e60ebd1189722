"""gradsim import-study: the study's published dot-product files as a gradsim run.

Fixtures are small files in the study's format that the tests write themselves (query ranges as parts,
the true original not always listed first, one candidate's self dot differing between ranges). With
GRADSIM_THESIS_DATA=DIR (DIR/<setting>/.../dot_products_part_*.json and DIR/<setting>/values.json) the
real files are imported too and must give the study's own table exactly.
"""

import os
from pathlib import Path

import numpy as np
import orjson
import pytest

from gradsim.cli.analysis import import_study_main as import_main

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
]
STUDY = Path("amd") / "AMD-OLMo-1B-SFT" / "sample_size" / "full"


def write_study(root: Path, n=12, c=4, parts=((0, 5), (5, 12)), seed=0, noise=1.5) -> Path:
    """A study folder: per-matrix gradient vectors of n originals and their variants, candidates of each
    query its own original and c - 1 others, true original listed first only for even queries."""
    rng = np.random.default_rng(seed)
    orig = rng.normal(size=(n, len(NAMES), 6))
    scale = np.array([1.0, 3.0, 0.5, 1.0, 2.0, 1.0])[:, None]
    var = orig + noise * rng.normal(size=orig.shape) * scale
    ids = [f"lima_{3 * i}" for i in range(n)]  # not 0..n-1: ids are read, not assumed
    folder = root / STUDY
    folder.mkdir(parents=True)
    for a, b in parts:
        dots, own, qs = {}, {}, {}
        for q in range(a, b):
            others = [int(j) for j in rng.choice([j for j in range(n) if j != q], c - 1, replace=False)]
            order = [q, *others] if q % 2 == 0 else [*others[:1], q, *others[1:]]
            dots[ids[q]] = {ids[j]: {m: float(var[q, k] @ orig[j, k]) for k, m in enumerate(NAMES)} for j in order}
            for j in order:
                jitter = 1 + 1e-7 * a  # a candidate's self dot differs slightly between ranges
                own[ids[j]] = {m: float(orig[j, k] @ orig[j, k]) * jitter for k, m in enumerate(NAMES)}
            qs[ids[q]] = {m: float(var[q, k] @ var[q, k]) for k, m in enumerate(NAMES)}
        for kind, obj in (("dot_products", dots), ("original_dot_products", own), ("paraphrased_dot_products", qs)):
            (folder / f"{kind}_part_{a}_{b}.json").write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2))
    return folder


def independent_top1(folder: Path) -> tuple[float, dict]:
    """The study's rule, written out: cosine = dot / sqrt(query self * candidate self) per matrix and for the
    whole gradient; correct when the candidate with the query's id scores highest."""
    whole, per, n = 0, dict.fromkeys(NAMES, 0), 0
    for f in sorted(folder.glob("dot_products_part_*.json")):
        dots = orjson.loads(f.read_bytes())
        own = orjson.loads(f.with_name("original_" + f.name).read_bytes())
        qs = orjson.loads(f.with_name("paraphrased_" + f.name).read_bytes())
        for q, cands in dots.items():
            n += 1
            for m in NAMES:
                s = {c: v[m] / np.sqrt(qs[q][m] * own[c][m]) for c, v in cands.items()}
                per[m] += max(s, key=s.get) == q
            s = {c: sum(v.values()) / np.sqrt(sum(qs[q].values()) * sum(own[c].values())) for c, v in cands.items()}
            whole += max(s, key=s.get) == q
    return whole / n, {m: v / n for m, v in per.items()}


def test_import_gives_the_rule_numbers_and_a_standard_run(tmp_path, capsys):
    folder = write_study(tmp_path / "study")
    out = tmp_path / "out"
    assert import_main([str(folder), "--setting", "paraphrased", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "paraphrased / gradient-similarity (bm25, n=12): top-1" in printed
    run = out / "gradient-similarity" / "paraphrased"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl", "results.json", "scores.npz"]
    r = orjson.loads((run / "results.json").read_bytes())
    top1, per = independent_top1(folder)
    assert r["summary"]["whole_model"]["top1"] == top1
    assert {m: r["summary"]["per_matrix"][m]["top1"] for m in NAMES} == per
    assert r["parameter_names"] == NAMES
    assert r["parameter_numel"] == [50304 * 2048, 2048 * 2048, 2048 * 2048, 2048 * 8192, 2048 * 2048, 2048 * 8192]
    assert r["model"]["id"] == "amd/AMD-OLMo-1B-SFT" and r["featurizer"] == {"kind": "exact"}
    prov = r["study_import"]
    assert prov["queries"] == 12 and prov["candidates_per_query"] == 4 and prov["true_original_listed_first"] == 6
    assert [f["file"] for f in prov["files"]][:3] == [
        "dot_products_part_0_5.json",
        "original_dot_products_part_0_5.json",
        "paraphrased_dot_products_part_0_5.json",
    ]
    # column 0 is the true original, whatever the files' order
    assert all(q["candidates"][0] == q["id"] for q in r["queries"])
    with np.load(run / "scores.npz") as z:
        assert z["dots"].shape == (12, 4, 6) and z["dots"].dtype == np.float64
    dot = orjson.loads((out / "dot-product" / "paraphrased" / "results.json").read_bytes())
    assert dot["config"]["computation_type"] == "dot-product" and "query_self" in dot["queries"][0]
    # a rerun on the same files is a no-op, not an error
    assert import_main([str(folder), "--setting", "paraphrased", "--output-dir", str(out)]) == 0


def test_partitions_combine_into_the_whole_import(tmp_path):
    from gradsim.cli.cluster import combine_main

    folder = write_study(tmp_path / "study")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert import_main([str(folder), "--setting", "model-generated", "--output-dir", str(whole)]) == 0
    assert import_main([str(folder), "--setting", "model-generated", "--output-dir", str(parts), "--partitions"]) == 0
    run = parts / "gradient-similarity" / "model-generated"
    assert sorted(p.name for p in (run / "partitions").glob("results_*")) == [
        "results_00000-00005.json",
        "results_00005-00012.json",
    ]
    assert combine_main([str(run)]) == 0
    a = orjson.loads((whole / "gradient-similarity" / "model-generated" / "results.json").read_bytes())
    b = orjson.loads((run / "results.json").read_bytes())
    assert a["summary"] == b["summary"] and a["queries"] == b["queries"]


def test_combined_files_import_like_their_parts(tmp_path):
    parts = write_study(tmp_path / "parts", parts=((0, 12),))
    combined = write_study(tmp_path / "combined", parts=((0, 12),))
    for f in combined.glob("*_part_0_12.json"):
        f.rename(f.with_name(f.name.replace("_part_0_12", "")))
    for folder, out in ((parts, "a"), (combined, "b")):
        assert import_main([str(folder), "--setting", "paraphrased", "--output-dir", str(tmp_path / out)]) == 0
    a, b = (orjson.loads((tmp_path / o / "gradient-similarity/paraphrased/results.json").read_bytes()) for o in "ab")
    assert a["summary"] == b["summary"] and a["queries"] == b["queries"]
    assert [f["file"] for f in b["study_import"]["files"]][0] == "dot_products.json"


def test_downstream_commands_run_on_an_import(tmp_path, capsys):
    from gradsim.analysis.figures import load_runs, summary_table
    from gradsim.analysis.frontier import frontier
    from gradsim.cli.analysis import select_main

    for setting, seed in (("paraphrased", 0), ("model-generated", 1)):
        folder = write_study(tmp_path / setting, n=20, parts=((0, 20),), seed=seed, noise=2.5 if seed else 0.5)
        assert import_main([str(folder), "--setting", setting, "--output-dir", str(tmp_path / "out")]) == 0
    runs = tmp_path / "out" / "gradient-similarity"
    assert select_main([str(runs / "paraphrased")]) == 0
    printed = capsys.readouterr().out
    assert "held-out (10 queries): selected top-1" in printed and "[intervals: 95% percentile bootstrap" in printed
    assert [row["run"] for row in summary_table(load_runs(tmp_path / "out"))] == ["paraphrased", "model-generated"]
    out = frontier([runs / "paraphrased", runs / "model-generated"], ["countsketch"], [64], splits=3, max_size=2)
    assert "projection points skipped" in out["notes"][0] and "projection" not in out["settings"]["paraphrased"]
    assert out["settings"]["model-generated"]["1-of-4"]["greedy_final"]["top1"]["n"] == 3


def corrupt(folder: Path, problem: str) -> str:
    """Break one file of a fixture study; the file name the error must name."""
    name = {
        "truncated": "dot_products_part_5_12.json",
        "no true original": "dot_products_part_0_5.json",
        "zero self dot": "original_dot_products_part_5_12.json",
        "mismatched matrices": "paraphrased_dot_products_part_0_5.json",
        "duplicate query": "dot_products_part_5_12.json",
    }[problem]
    path = folder / name
    if problem == "truncated":
        path.write_bytes(path.read_bytes()[:-200])
        return name
    obj = orjson.loads(path.read_bytes())
    first = next(iter(obj))
    if problem == "no true original":
        del obj[first][first]
    elif problem == "zero self dot":
        obj[first][NAMES[2]] = 0.0
    elif problem == "mismatched matrices":
        del obj[first][NAMES[-1]]
    elif problem == "duplicate query":
        (folder / "dot_products_part_0_5.json").write_bytes(
            orjson.dumps({**orjson.loads((folder / "dot_products_part_0_5.json").read_bytes()), first: obj[first]})
        )
        return "dot_products_part_0_5.json"
    path.write_bytes(orjson.dumps(obj))
    return name


@pytest.mark.parametrize(
    "problem", ["truncated", "no true original", "zero self dot", "mismatched matrices", "duplicate query"]
)
def test_malformed_study_files_one_line_error_nothing_written(tmp_path, capsys, problem):
    folder = write_study(tmp_path / "study")
    name = corrupt(folder, problem)
    out = tmp_path / "out"
    assert import_main([str(folder), "--setting", "paraphrased", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and name in err, err
    assert not out.exists()


def test_refuses_a_folder_without_study_files_and_an_unknown_model(tmp_path, capsys):
    assert import_main([str(tmp_path), "--setting", "paraphrased", "--output-dir", str(tmp_path / "o")]) == 2
    assert "no dot_products" in capsys.readouterr().err
    folder = write_study(tmp_path / "s")
    args = [str(folder), "--setting", "paraphrased", "--output-dir", str(tmp_path / "o"), "--model", "x/unknown"]
    assert import_main(args) == 2
    assert "--model-config" in capsys.readouterr().err and not (tmp_path / "o").exists()
    config = tmp_path / "config.json"  # a Hugging Face config: grouped-query attention, untied sizes
    config.write_text('{"hidden_size": 8, "intermediate_size": 32, "vocab_size": 100, "num_attention_heads": 4, '
                      '"num_key_value_heads": 2}')  # fmt: skip
    assert import_main([*args, "--model-config", str(config)]) == 0
    r = orjson.loads((tmp_path / "o" / "gradient-similarity" / "paraphrased" / "results.json").read_bytes())
    assert r["model"]["id"] == "x/unknown" and r["parameter_numel"] == [800, 64, 32, 256, 64, 256]
    assert import_main([*args, "--model-config", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.startswith("error: --model-config")


THESIS = os.environ.get("GRADSIM_THESIS_DATA")


@pytest.mark.skipif(not THESIS, reason="GRADSIM_THESIS_DATA (the study's published files) not set")
@pytest.mark.parametrize("setting, top1", [("paraphrased", 0.9929), ("model-generated", 0.2176)])
def test_real_study_files_reproduce_its_table_exactly(tmp_path, setting, top1):
    root = Path(THESIS) / setting
    folder = next(root.rglob("dot_products_part_0_*.json")).parent
    assert import_main([str(folder), "--setting", setting, "--output-dir", str(tmp_path)]) == 0
    r = orjson.loads((tmp_path / "gradient-similarity" / setting / "results.json").read_bytes())
    values = orjson.loads((root / "values.json").read_bytes())
    assert round(r["summary"]["whole_model"]["top1"], 4) == top1 and r["summary"]["whole_model"]["n"] == 988
    assert len(values) == 113 and {m: r["summary"]["per_matrix"][m]["top1"] for m in values} == values
    assert r["study_import"]["true_original_listed_first"] == 826


def test_ids_file_keeps_exactly_those_rows(tmp_path, capsys):
    from gradsim.cli.common import config_from_args
    from gradsim.config import BUNDLED_DATA, Config
    from gradsim.data.load import STUDY_IDS, load_dataset, read_ids

    study = read_ids("study")
    assert len(study) == len(set(study)) == 988 and STUDY_IDS.read_text().count("\n") == 988
    assert "lima_141" not in study and "lima_1000" not in study and study[:2] == ["lima_0", "lima_1"]
    ids = tmp_path / "ids.txt"
    ids.write_text("# a subset\nlima_7\nlima_2\n\nlima_30\n")
    orig, para = str(BUNDLED_DATA / "original.jsonl"), str(BUNDLED_DATA / "paraphrased.jsonl")
    full, sub = load_dataset(orig, para), load_dataset(orig, para, ids_file=str(ids))
    assert [s.id for s in sub.originals] == [s.id for s in sub.queries] == ["lima_2", "lima_7", "lima_30"]
    assert sub.original_sha256 != full.original_sha256  # the subset is in the run's compat through its hashes
    with pytest.raises(Exception, match=r"1 of its 2 ids \(e.g. [^)]*\) are not among the originals"):
        ids.write_text("lima_2\nlima_9999\n")
        load_dataset(orig, para, ids_file=str(ids))
    # recorded only when given: records of runs without it keep their bytes
    assert "ids_file" not in Config().to_record() and "ids_file" not in Config().compat()
    assert config_from_args(["--ids-file", "study"]).to_record()["ids_file"] == "study"
