"""The whole pipeline: partitions merged equal an unpartitioned run; scores match direct autograd."""

import numpy as np
import pytest
import torch

from gradsim.combine import merge_partitions
from gradsim.config import BUNDLED_DATA, Config
from gradsim.errors import GradsimError
from gradsim.io import read_json
from gradsim.run import run

from test_gradients import reference_gradients


def cfg_for(tmp_path, **kw):
    base = dict(device="cpu", sample_size=8, output_dir=str(tmp_path), top_k=3)
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("computation_type", ["gradient-similarity", "dot-product"])
def test_partitions_merge_to_the_whole_run(tiny, tmp_path, computation_type):
    whole = run(cfg_for(tmp_path / "whole", computation_type=computation_type), lm=tiny)
    for s, e in [(0, 3), (3, 5), (5, 8)]:
        run(cfg_for(tmp_path / "parts", computation_type=computation_type, partition_start=s, partition_end=e), lm=tiny)
    run_dir = tmp_path / "parts" / computation_type / "paraphrased"
    merged = merge_partitions(run_dir)
    assert merged["queries"] == whole["queries"]
    assert merged["summary"] == whole["summary"]
    a = np.load(run_dir / "scores.npz")
    b = np.load(tmp_path / "whole" / computation_type / "paraphrased" / "scores.npz")
    for k in ("dots", "qself", "cself"):
        assert np.array_equal(a[k], b[k])
    merged_again = merge_partitions(run_dir)  # idempotent
    assert read_json(run_dir / "results.json") == merged_again


def test_scores_equal_direct_autograd_cosines(tiny, tmp_path, samples):
    from gradsim.data import load_samples
    from gradsim.encode import encode

    res = run(cfg_for(tmp_path, sample_size=4), lm=tiny)
    variants = {s.id: s for s in load_samples(str(BUNDLED_DATA / "paraphrased.jsonl"))}
    originals = {s.id: s for s in samples}

    def flat(sample):
        g = reference_gradients(tiny.model, encode(tiny.tokenizer, sample, 256))
        return torch.cat([v.reshape(-1) for v in g.values()]).double()

    q = res["queries"][1]
    gq = flat(variants[q["id"]])
    for cid, score in zip(q["candidates"], q["scores"]):
        expected = torch.nn.functional.cosine_similarity(gq, flat(originals[cid]), dim=0).item()
        assert score == pytest.approx(expected, abs=1e-4)  # fp32 dots vs a float64 reference
    assert q["rank"] == 1 + sum(s >= q["scores"][0] for s in q["scores"][1:])


def test_each_original_featurized_once(tiny, tmp_path, monkeypatch):
    from gradsim.io import read_jsonl_tolerant

    monkeypatch.setenv("HF_TOKEN", "hf_NEVERWRITTEN987654")
    run(cfg_for(tmp_path), lm=tiny)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"hf_NEVERWRITTEN987654" not in f.read_bytes(), f
    rows = read_jsonl_tolerant(tmp_path / "gradient-similarity" / "paraphrased" / "metrics.jsonl")
    orig = [r["id"] for r in rows if r["role"] == "original"]
    assert len(orig) == len(set(orig)) <= 8
    assert sum(r["role"] == "query" for r in rows) == 8
    assert {"tokens", "truncated", "seconds", "device", "dtype", "vram_alloc_mb", "vram_reserved_mb", "peak_rss_mb"} <= set(rows[0])


def test_resume_skips_finished_queries(tiny, tmp_path, monkeypatch):
    import gradsim.run as runmod

    whole = run(cfg_for(tmp_path / "ref"), lm=tiny)
    calls = {"n": 0}
    real = runmod.dense_dots

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a kill in the middle of the partition
        return real(*a, **k)

    monkeypatch.setattr(runmod, "dense_dots", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "cut"), lm=tiny)
    monkeypatch.setattr(runmod, "dense_dots", real)
    out = tmp_path / "cut" / "gradient-similarity" / "paraphrased"
    assert not (out / "results.json").exists() and (out / "progress.jsonl").exists()
    resumed = run(cfg_for(tmp_path / "cut"), lm=tiny)
    assert resumed["queries"] == whole["queries"]
    assert not (out / "progress.jsonl").exists()


def test_merge_refuses_gaps_overlaps_and_mixed_configs(tiny, tmp_path):
    for s, e in [(0, 3), (5, 8)]:
        run(cfg_for(tmp_path, partition_start=s, partition_end=e), lm=tiny)
    run_dir = tmp_path / "gradient-similarity" / "paraphrased"
    with pytest.raises(GradsimError, match=r"queries \[3, 5\) of 8"):
        merge_partitions(run_dir)
    run(cfg_for(tmp_path, partition_start=2, partition_end=5), lm=tiny)
    with pytest.raises(GradsimError, match="overlap"):
        merge_partitions(run_dir)
    (run_dir / "partitions" / "results_00002-00005.json").unlink()
    run(cfg_for(tmp_path, partition_start=3, partition_end=5, max_length=200), lm=tiny)
    with pytest.raises(GradsimError, match="max_length"):
        merge_partitions(run_dir)
    assert not (run_dir / "results.json").exists()


def test_resume_with_another_memory_budget_rebuilds_the_scratch_store(tiny, tmp_path, monkeypatch):
    import gradsim.run as runmod

    whole = run(cfg_for(tmp_path / "ref"), lm=tiny)
    real = runmod.dense_dots
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runmod, "dense_dots", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "cut"), lm=tiny)
    monkeypatch.setattr(runmod, "dense_dots", real)
    monkeypatch.setenv("GRADSIM_MEMORY_GB", "0.01")  # another shard size for the exact scratch store
    resumed = run(cfg_for(tmp_path / "cut"), lm=tiny)
    assert [q["rank"] for q in resumed["queries"]] == [q["rank"] for q in whole["queries"]]
    for a, b in zip(resumed["queries"], whole["queries"]):
        assert a["candidates"] == b["candidates"]
        assert np.allclose(a["scores"], b["scores"], rtol=0, atol=1e-6)
