"""--candidates all with projected features: partitions, the BM25 protocol from the same features, baselines."""

import numpy as np
import pytest
from conftest import cpu_config

from gradsim.cluster.combine import merge_partitions
from gradsim.errors import GradsimError
from gradsim.io import read_jsonl_tolerant
from gradsim.study.run import run


def cfg_for(tmp_path, **kw):
    base = dict(top_k=3, use_random_projection=True, projection="factorized", proj_dim=64, candidates="all")
    return cpu_config(tmp_path, 8, **{**base, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("projection,dim", [("factorized", 64), ("countsketch", 20000), ("tensorsketch", 20000)])
def test_corpus_partitions_merge_and_bm25_protocol_reuses_features(tiny, tmp_path, monkeypatch, projection, dim):
    whole = run(cfg_for(tmp_path / "whole", batch_size=3, projection=projection, proj_dim=dim), lm=tiny)
    assert whole["summary"]["whole_model"]["n"] == 8
    reps = {f"representation_{p}" for p in ("response", "prompt", "all", "last")}
    assert set(whole["baselines"]) == {"random", "bm25", *reps}
    assert whole["baselines"]["random"]["top1"] == pytest.approx(1 / 8)
    assert whole["bm25_protocol"]["baselines"]["random"]["top1"] == pytest.approx(1 / 4)
    scores = np.load(tmp_path / "whole" / "gradient-similarity" / f"paraphrased-all-{projection}{dim}" / "scores.npz")
    assert scores["dots"].shape == (8, 8, len(whole["parameter_names"]))

    for s, e in [(0, 3), (3, 8)]:
        run(
            cfg_for(tmp_path / "parts", partition_start=s, partition_end=e, projection=projection, proj_dim=dim),
            lm=tiny,
        )
    merged = merge_partitions(tmp_path / "parts" / "gradient-similarity" / f"paraphrased-all-{projection}{dim}")
    for key in ("summary", "baselines", "bm25_protocol"):
        assert merged[key] == whole[key], key

    # The BM25 protocol as its own run, in the same output dir: the originals' features are reused.
    bm25 = run(cfg_for(tmp_path / "whole", candidates="bm25", projection=projection, proj_dim=dim), lm=tiny)
    rows = read_jsonl_tolerant(
        tmp_path / "whole" / "gradient-similarity" / f"paraphrased-{projection}{dim}" / "metrics.jsonl"
    )
    assert not [r for r in rows if r["role"] == "original"]
    cols = scores["bm25_columns"]
    for k, q in enumerate(bm25["queries"]):
        d = scores["dots"][k][cols[k]].sum(-1)
        cos = d / np.sqrt(scores["qself"][k].sum() * scores["cself"][k][cols[k]].sum(-1))
        assert np.allclose(q["scores"], cos, rtol=1e-4, atol=1e-5)  # batch of 3 vs one at a time
    assert bm25["summary"] == whole["bm25_protocol"]["summary"]
    assert bm25["baselines"] == whole["bm25_protocol"]["baselines"]

    from gradsim.analysis.selection import select_run

    run_dir = tmp_path / "whole" / "gradient-similarity" / f"paraphrased-all-{projection}{dim}"
    sel = select_run(run_dir, protocol="bm25")
    assert sel["full_gradient_held_out"]["n"] == 4 and sel["num_candidates"] == 4
    assert (run_dir / "selection_bm25.json").exists()


@pytest.mark.slow
def test_main_cli_corpus_with_projection_on_the_embedded_model(embedded, tmp_path, monkeypatch):
    """main.py's path (flags -> run) with the real model: factorized features, the whole corpus, batched."""
    import gradsim.study.run as runmod
    from gradsim.cli import main

    monkeypatch.setattr(runmod, "load_model", lambda cfg, device=None: embedded)
    rc = main(
        [
            "--use-random-projection",
            "--projection",
            "factorized",
            "--proj-dim",
            "256",
            "--candidates",
            "all",
            "--sample-size",
            "4",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--output-dir",
            str(tmp_path),
            "-q",
        ]
    )
    assert rc == 0
    res = tmp_path / "gradient-similarity" / "paraphrased-all-factorized256" / "results.json"
    from gradsim.io import read_json

    out = read_json(res)
    assert (
        out["featurizer"]["kind"] == "factorized" and out["featurizer"]["k_rows"] * out["featurizer"]["k_cols"] == 256
    )
    assert out["summary"]["whole_model"]["n"] == 4
    assert len(out["queries"][0]["top10"]) == 4


@pytest.mark.slow
def test_main_cli_default_projection_is_tensorsketch_on_the_embedded_model(embedded, tmp_path, monkeypatch):
    """--use-random-projection alone: tensorsketch, 65,536 dims shared by norm, calibrated once and reused."""
    import gradsim.study.run as runmod
    from gradsim.cli import main
    from gradsim.io import read_json

    monkeypatch.setattr(runmod, "load_model", lambda cfg, device=None: embedded)
    argv = ["--use-random-projection", "--sample-size", "4", "--device", "cpu", "--output-dir", str(tmp_path), "-q"]
    assert main(argv) == 0
    out = read_json(tmp_path / "gradient-similarity" / "paraphrased-tensorsketch65536" / "results.json")
    spec = out["featurizer"]
    assert spec["kind"] == "tensorsketch" and spec["proj_dim"] == 65536 and spec["dims"] <= 65536
    assert spec["calibration_ids"] == ["lima_0", "lima_1", "lima_2", "lima_3"]
    allocs = list((tmp_path / "features" / "tensorsketch-allocations").glob("*.json"))
    assert len(allocs) == 1
    assert out["summary"]["whole_model"]["n"] == 4
    # The model-generated setting shares the originals' features and the allocation.
    assert main(argv + ["--setting", "model-generated"]) == 0
    other = read_json(tmp_path / "gradient-similarity" / "model-generated-tensorsketch65536" / "results.json")
    assert other["featurizer"] == spec
    # allocations, the originals' gradient features, the representation baseline's features
    assert len(list((tmp_path / "features").iterdir())) == 3
    rows = read_jsonl_tolerant(tmp_path / "gradient-similarity" / "model-generated-tensorsketch65536" / "metrics.jsonl")
    assert rows and not [r for r in rows if r["role"] == "original"]


def test_representation_baseline_is_the_mean_final_hidden_state(tiny, samples):
    import torch

    from gradsim.core.baselines import RepresentationFeaturizer
    from gradsim.data.encode import IGNORE_INDEX, encode

    enc = encode(tiny.tokenizer, samples[0], 256)
    f = RepresentationFeaturizer(tiny.model, tiny.device)
    v = f.features(enc)
    with torch.no_grad():
        h = tiny.model.model(input_ids=enc.input_ids[None]).last_hidden_state[0]  # after the final norm
    d = h.shape[1]
    response = enc.labels != IGNORE_INDEX
    assert 0 < int(response.sum()) < enc.num_tokens
    assert torch.allclose(v[:d], h[response].mean(0), atol=1e-5)
    assert torch.allclose(v[d:], h.mean(0), atol=1e-5)


@pytest.mark.slow
def test_exact_corpus_run_streams_and_its_bm25_columns_equal_the_bm25_run(tiny, tmp_path):
    """Exact --candidates all holds a block of queries and streams every original past it (no store);
    the BM25 protocol picked out of it equals the BM25 run itself."""
    corpus = run(cfg_for(tmp_path, use_random_projection=False, memory_gb=0.02, baselines=False), lm=tiny)
    assert corpus["cost"]["scratch_bytes_written"] == 0 and corpus["cost"]["held_gradients"] == 3
    bm25 = run(cfg_for(tmp_path, use_random_projection=False, candidates="bm25", baselines=False), lm=tiny)
    assert corpus["bm25_protocol"]["summary"] == bm25["summary"]
    z = np.load(tmp_path / "gradient-similarity" / "paraphrased-all" / "scores.npz")
    b = np.load(tmp_path / "gradient-similarity" / "paraphrased" / "scores.npz")
    picked = np.take_along_axis(z["dots"], z["bm25_columns"][..., None], axis=1)
    assert np.array_equal(picked, b["dots"].astype(np.float32))  # the same pairs, the same fp32 dots


@pytest.mark.parametrize("projection", ["countsketch", "tensorsketch", "factorized", "trak"])
def test_a_proj_dim_that_projects_nothing_is_refused(tiny, tmp_path, projection):
    """Features as big as the gradient would be stored in the shared feature store: refused."""
    from gradsim.core.gradients import param_layout
    from gradsim.errors import GradsimError

    layout = param_layout(tiny.model)
    total = int(layout.total)
    # trak and factorized: per matrix, so the largest matrix's size already keeps everything exact
    dim = total if projection in ("countsketch", "tensorsketch") else max(hi - lo for _, lo, hi in layout.slices())
    if projection == "factorized":
        dim = 2**42  # split_dim: 2^21 x 2^21, above both sides of every matrix
    with pytest.raises(GradsimError) as e:
        run(cfg_for(tmp_path, projection=projection, proj_dim=dim, candidates="bm25"), lm=tiny)
    msg = str(e.value)
    assert f"--proj-dim {dim} " in msg and f"{total:,} trainable parameters" in msg and "\n" not in msg
    assert "drop --use-random-projection for the exact path, or give a smaller --proj-dim" in msg
    assert not (tmp_path / "features").exists()


def test_feature_dims_match_the_featurizers(tiny):
    from gradsim.core.gradients import param_layout
    from gradsim.core.projection import FactorizedFeaturizer, TrakFeaturizer, feature_dims

    shapes = param_layout(tiny.model).shapes
    for k in (16, 64, 2048, 5000):
        assert (
            feature_dims("factorized", k, shapes)
            == FactorizedFeaturizer(tiny.model, tiny.device, proj_dim=k).layout.total
        )
        assert feature_dims("trak", k, shapes) == TrakFeaturizer(tiny.model, tiny.device, proj_dim=k).layout.total


def test_a_feature_store_the_disk_cannot_hold_is_refused(tiny, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from gradsim.errors import GradsimError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))  # 1 kB free
    with pytest.raises(
        GradsimError, match=r"the feature store .* needs 0\.\d+ GB more \(8 samples x \d+ dims x 4 bytes\)"
    ):
        run(cfg_for(tmp_path, proj_dim=64), lm=tiny)


@pytest.mark.slow
def test_combine_refuses_partitions_projected_differently(tiny, tmp_path):
    """Two partitions whose trak features came from different projectors (e.g. a CUDA node with fast_jl
    and a CPU node) are not merged: the refusal names the featurizer field."""
    import json

    for s, e in [(0, 4), (4, 8)]:
        run(cfg_for(tmp_path, projection="trak", proj_dim=32, partition_start=s, partition_end=e), lm=tiny)
    run_dir = tmp_path / "gradient-similarity" / "paraphrased-all-trak32"
    second = sorted((run_dir / "partitions").glob("results_*.json"))[1]
    r = json.loads(second.read_text())
    r["featurizer"] = {**r["featurizer"], "projector": "CudaProjector (fast_jl)", "device_type": "cuda"}
    second.write_text(json.dumps(r))
    with pytest.raises(GradsimError, match="projected differently .*featurizer device_type: cpu vs cuda"):
        merge_partitions(run_dir)
