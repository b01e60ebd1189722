"""The whole pipeline: partitions merged equal an unpartitioned run; scores match direct autograd."""

import numpy as np
import pytest
import torch
from test_gradients import reference_gradients

from gradsim.cluster.combine import merge_partitions
from gradsim.config import BUNDLED_DATA, Config
from gradsim.errors import GradsimError
from gradsim.io import read_json
from gradsim.study.run import run

# Every test here runs the study end to end (tiny model): `-m 'not slow'` leaves them to the full suite.
pytestmark = pytest.mark.slow


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
    assert sorted(a.files) == sorted(b.files)
    for k in b.files:  # the gradients' dots and the baselines' scores (issue 26: those were one rounding off)
        assert np.array_equal(a[k], b[k], equal_nan=True), k
    merged_again = merge_partitions(run_dir)  # idempotent
    assert read_json(run_dir / "results.json") == merged_again


def test_scores_equal_direct_autograd_cosines(tiny, tmp_path, samples):
    from gradsim.data.encode import encode
    from gradsim.data.load import load_samples

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
    assert {
        "tokens",
        "truncated",
        "seconds",
        "device",
        "dtype",
        "vram_alloc_mb",
        "vram_reserved_mb",
        "peak_rss_mb",
    } <= set(rows[0])


def interrupt_after(monkeypatch, blocks: int):
    """Make the run die (as a kill would) once ``blocks`` query blocks have been logged."""
    import gradsim.study.run as runmod

    real, calls = runmod.Part.record, {"n": 0}

    def dying(self, *a, **k):
        if calls["n"] == blocks:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(runmod.Part, "record", dying)
    return lambda: monkeypatch.setattr(runmod.Part, "record", real)


def test_resume_skips_finished_queries(tiny, tmp_path, monkeypatch):
    whole = run(cfg_for(tmp_path / "ref"), lm=tiny)
    restore = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "cut", memory_gb=0.013), lm=tiny)  # 2 queries per block
    restore()
    out = tmp_path / "cut" / "gradient-similarity" / "paraphrased"
    assert not (out / "results.json").exists() and (out / "progress.jsonl").exists()
    resumed = run(cfg_for(tmp_path / "cut", memory_gb=0.013), lm=tiny)
    assert resumed["queries"] == whole["queries"]
    # the 4 queries of the 2 logged blocks were not redone; the cost sums both attempts (the first also computed
    # the block it was interrupted in)
    assert resumed["cost"]["attempts"][-1]["query_passes"] == 4
    assert resumed["cost"]["backward_passes"]["query"] == sum(a["query_passes"] for a in resumed["cost"]["attempts"])
    assert not (out / "progress.jsonl").exists()


def test_resume_after_a_torn_progress_line_keeps_the_blocks_logged_after_it(tiny, tmp_path, monkeypatch):
    """A kill mid-append (Slurm's SIGKILL after KillWait) leaves a torn last line in the progress log; what
    the next attempt logs after it must still count when a third attempt resumes."""
    from gradsim.io import read_jsonl_tolerant

    whole = run(cfg_for(tmp_path / "ref"), lm=tiny)
    out = tmp_path / "cut" / "gradient-similarity" / "paraphrased"
    for _ in range(2):  # two attempts, each killed after logging one block of 2 queries
        restore = interrupt_after(monkeypatch, 1)
        with pytest.raises(KeyboardInterrupt):
            run(cfg_for(tmp_path / "cut", memory_gb=0.013), lm=tiny)
        restore()
        with open(out / "progress.jsonl", "ab") as f:
            f.write(b'{"kind": "block", "file": "blo')  # the line the kill tore
    resumed = run(cfg_for(tmp_path / "cut", memory_gb=0.013), lm=tiny)
    assert resumed["queries"] == whole["queries"]
    assert resumed["cost"]["attempts"][-1]["query_passes"] == 4  # the 2 logged blocks (4 queries) were not redone
    rows = read_jsonl_tolerant(out / "metrics.jsonl")
    assert sorted(r["id"] for r in rows if r["role"] == "query") == sorted(q["id"] for q in whole["queries"])


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
    with pytest.raises(GradsimError, match=r"\(field max_length: 256 vs 200\): rerun it"):
        merge_partitions(run_dir)
    assert not (run_dir / "results.json").exists()


def pin_code_version(monkeypatch, version: str) -> None:
    import gradsim.study.run as runmod

    monkeypatch.setattr(runmod, "code_version", lambda: version)


def test_a_commit_mid_campaign_keeps_progress_results_and_partitions(tiny, tmp_path, monkeypatch, caplog):
    """code_version is provenance, not configuration: resuming, finishing and combining work across
    commits, and every version that computed the numbers is recorded."""
    import logging

    whole = run(cfg_for(tmp_path / "ref", baselines=False), lm=tiny)
    pin_code_version(monkeypatch, "0.1+aaaa")
    restore = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "cut", memory_gb=0.013, baselines=False), lm=tiny)  # 2 queries per block
    restore()
    pin_code_version(monkeypatch, "0.1+bbbb-dirty")
    resumed = run(cfg_for(tmp_path / "cut", memory_gb=0.013, baselines=False), lm=tiny)
    assert resumed["cost"]["attempts"][-1]["query_passes"] == 4  # the 4 queries logged by the first commit kept
    assert resumed["queries"] == whole["queries"]
    assert resumed["code_versions"] == ["0.1+aaaa", "0.1+bbbb-dirty"]
    pin_code_version(monkeypatch, "0.1+cccc")
    with caplog.at_level(logging.INFO, logger="gradsim"):
        again = run(cfg_for(tmp_path / "cut", memory_gb=0.013, baselines=False), lm=tiny)
    assert "already finished" in caplog.text and again == resumed
    # Partitions made by different commits combine, and the merged result names both.
    for (s, e), version in zip([(0, 3), (3, 8)], ["0.1+aaaa", "0.1+bbbb"]):
        pin_code_version(monkeypatch, version)
        run(cfg_for(tmp_path / "parts", partition_start=s, partition_end=e, baselines=False), lm=tiny)
    merged = merge_partitions(tmp_path / "parts" / "gradient-similarity" / "paraphrased")
    assert merged["queries"] == whole["queries"]
    assert merged["code_versions"] == ["0.1+aaaa", "0.1+bbbb"]
    assert merged["config"]["code_version"] == "0.1+aaaa + 0.1+bbbb"


def test_a_real_configuration_change_is_named_field_by_field(tiny, tmp_path, monkeypatch, caplog):
    import logging

    run(cfg_for(tmp_path, sample_size=4, baselines=False), lm=tiny)
    with pytest.raises(GradsimError) as e:
        run(cfg_for(tmp_path, sample_size=4, baselines=False, dtype="bfloat16"), lm=tiny)
    assert "exists from a different configuration (field dtype: float32 vs bfloat16; stored vs this run)" in str(
        e.value
    )
    restore = interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "cut", sample_size=4, memory_gb=0.013, baselines=False), lm=tiny)
    restore()
    with caplog.at_level(logging.WARNING, logger="gradsim"):
        run(cfg_for(tmp_path / "cut", sample_size=4, memory_gb=0.013, baselines=False, seed=7), lm=tiny)
    assert "another configuration (field seed: 42 vs 7; stored vs this run): starting this partition afresh" in (
        caplog.text
    )


def test_resume_with_another_memory_budget_gives_the_same_bytes(tiny, tmp_path, monkeypatch):
    """The budget decides the schedule (which queries share a block), never the numbers: every dot is
    taken per (query, original) pair and matrix, whatever else is held."""
    run(cfg_for(tmp_path / "ref"), lm=tiny)
    restore = interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "cut", memory_gb=0.02), lm=tiny)
    restore()
    run(cfg_for(tmp_path / "cut", memory_gb=0.007), lm=tiny)  # one gradient held at a time
    a = np.load(tmp_path / "ref" / "gradient-similarity" / "paraphrased" / "scores.npz")
    b = np.load(tmp_path / "cut" / "gradient-similarity" / "paraphrased" / "scores.npz")
    for k in ("dots", "qself", "cself"):
        assert np.array_equal(a[k], b[k]), k


def all_gradients(lm, samples):
    from gradsim.core.gradients import GradientComputer
    from gradsim.data.encode import encode

    gc = GradientComputer(lm.model, lm.device)
    out = torch.stack([gc.gradient(encode(lm.tokenizer, s, 256)).clone() for s in samples])
    gc.release()
    return out, gc.layout


def float64_dots(layout, a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-matrix dots of two gradients in float64, and the fp32 rounding allowance of each: 2 sqrt(n) u
    sum|a_i b_i| (the usual probabilistic bound of an n-term fp32 sum, u = 2^-24)."""
    a, b = a.double(), b.double()
    dots = np.array([torch.dot(a[lo:hi], b[lo:hi]).item() for _, lo, hi in layout.slices()])
    mags = np.array([torch.dot(a[lo:hi].abs(), b[lo:hi].abs()).item() for _, lo, hi in layout.slices()])
    n = np.array([hi - lo for _, lo, hi in layout.slices()])
    return dots, 2 * np.sqrt(n) * 2.0**-24 * mags + 1e-12


@pytest.mark.parametrize("memory_gb", [0.007, 0.02, 1.0])  # 1, 3 and every gradient held
def test_streamed_dots_equal_stored_gradients(tiny, tmp_path, memory_gb):
    """Streamed per-matrix dots and self-dots equal the dots of stored full gradients (computed apart,
    all kept in memory: the old design) to fp32 rounding, whatever the schedule; both are checked
    against float64 (the streamed ones within the fp32 allowance)."""
    from gradsim.core.score import dense_dots
    from gradsim.data.load import load_dataset
    from gradsim.data.retrieval import candidate_lists

    res = run(cfg_for(tmp_path, memory_gb=memory_gb, baselines=False), lm=tiny)
    z = np.load(tmp_path / "gradient-similarity" / "paraphrased" / "scores.npz")
    data = load_dataset(str(BUNDLED_DATA / "original.jsonl"), str(BUNDLED_DATA / "paraphrased.jsonl"), 8)
    cands = candidate_lists(data, "bm25", 3)
    orig, layout = all_gradients(tiny, data.originals)
    qs, _ = all_gradients(tiny, data.queries)
    for k in range(len(data.queries)):
        stored = dense_dots(layout, qs[k : k + 1], orig[cands[k]])[0]
        for c, j in enumerate(cands[k]):
            want, tol = float64_dots(layout, qs[k], orig[j])
            assert np.all(np.abs(z["dots"][k, c] - want) <= tol), (k, j)
            # The stored path's blocked fp32 matmul rounds a little worse than the streamed fp32 dots.
            assert np.all(np.abs(z["dots"][k, c] - stored[c]) <= 3 * tol), (k, j)
            want, tol = float64_dots(layout, orig[j], orig[j])
            assert np.all(np.abs(z["cself"][k, c] - want) <= tol), (k, j)
        want, tol = float64_dots(layout, qs[k], qs[k])
        assert np.all(np.abs(z["qself"][k] - want) <= tol), k
    assert res["cost"]["scratch_bytes_written"] == 0


def test_both_settings_in_one_run_write_what_two_runs_would(tiny, tmp_path, monkeypatch):
    import gradsim.study.run as runmod

    monkeypatch.setattr(runmod, "code_version", lambda: "pinned-for-this-test")
    both = run(cfg_for(tmp_path / "both", setting="both", memory_gb=1.0), lm=tiny)
    assert set(both["settings"]) == {"paraphrased", "model-generated"}
    for setting in ("paraphrased", "model-generated"):
        alone = run(cfg_for(tmp_path / "alone", setting=setting), lm=tiny)
        joint = both["settings"][setting]
        for key in ("queries", "summary", "baselines", "compat", "parameter_names"):
            assert joint[key] == alone[key], (setting, key)
        a = np.load(tmp_path / "both" / "gradient-similarity" / setting / "scores.npz")
        b = np.load(tmp_path / "alone" / "gradient-similarity" / setting / "scores.npz")
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    cost = both["settings"]["paraphrased"]["cost"]
    n = cost["num_queries"]  # 8 paraphrased + the model-generated rows among the first 8 originals
    # Every original once, each query once: (n + 8) / n passes; the original study would take 6.
    assert cost["backward_passes"] == {"query": n, "original": 8}
    assert cost["passes_per_query"] == pytest.approx((n + 8) / n) and cost["passes_per_query"] <= 1.5


def test_both_settings_without_keeping_stay_under_3_5_passes_per_query(tiny, tmp_path):
    res = run(cfg_for(tmp_path, setting="both", memory_gb=0.013, baselines=False), lm=tiny)  # 2 gradients held
    cost = res["settings"]["paraphrased"]["cost"]
    assert cost["held_gradients"] == 2 and cost["scratch_bytes_written"] == 0
    assert cost["passes_per_query"] <= 3.5  # each id's two queries + its <= 4 candidates (top_k 3), once


def test_kept_originals_on_scratch_disk_give_the_same_bytes(tiny, tmp_path):
    ref = run(cfg_for(tmp_path / "ref", memory_gb=0.007), lm=tiny)
    kept = run(cfg_for(tmp_path / "kept", memory_gb=0.007, scratch_gb=0.1), lm=tiny)
    assert kept["cost"]["originals_reused"] > 0 and kept["cost"]["scratch_bytes_written"] > 0
    assert kept["cost"]["backward_passes"]["original"] < ref["cost"]["backward_passes"]["original"]
    assert kept["queries"] == ref["queries"]
    assert not list((tmp_path / "kept").rglob(".scratch"))  # scratch removed at the end


def test_bf16_weights_stream_bf16_gradients_with_fp32_dots(tiny, tmp_path):
    """--dtype bfloat16-weights: gradients held and streamed in bf16 (half the memory), dots in fp32;
    the scores stay close to fp32's."""
    import copy

    from gradsim.core.model import LoadedModel

    model = copy.deepcopy(tiny.model)
    for p in model.parameters():  # parameters only, as load_model does (RoPE's inv_freq stays fp32)
        p.data = p.data.to(torch.bfloat16)
    lm = LoadedModel(model, tiny.tokenizer, "tiny-llama-bf16", "test", tiny.device, tiny.chat_template_sha256, 256)
    half = run(cfg_for(tmp_path / "bf16", dtype="bfloat16-weights", memory_gb=0.007, baselines=False), lm=lm)
    full = run(cfg_for(tmp_path / "fp32", memory_gb=0.007, baselines=False), lm=tiny)
    assert half["cost"]["held_gradients"] == 2  # a bf16 gradient is half the size: 2 fit where 1 fp32 did
    for a, b in zip(half["queries"], full["queries"]):
        assert a["candidates"] == b["candidates"]
        assert np.allclose(a["scores"], b["scores"], atol=0.02)


TIMING = ("seconds", "vram_alloc_mb", "vram_reserved_mb", "peak_rss_mb")


def metric_rows(run_dir) -> list[tuple]:
    """metrics.jsonl without its timing fields, as a sorted multiset."""
    from gradsim.io import read_jsonl_tolerant

    rows = read_jsonl_tolerant(run_dir / "metrics.jsonl")
    return sorted(tuple(sorted((k, v) for k, v in r.items() if k not in TIMING)) for r in rows)


def die_after(monkeypatch, owner, name: str, calls: int):
    """Make the run die (as a kill would) right after the ``calls``-th call of owner.name has returned."""
    real, n = getattr(owner, name), {"n": 0}

    def dying(*a, **k):
        out = real(*a, **k)
        n["n"] += 1
        if n["n"] == calls:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(owner, name, dying)
    return lambda: monkeypatch.setattr(owner, name, real)


def test_a_resumed_exact_run_keeps_every_metric_row_once(tiny, tmp_path, monkeypatch):
    """Killed before a block is logged, or right after: the resumed run's metrics.jsonl has the rows of
    an uninterrupted one (each query once, each original once), truncation included."""
    import gradsim.study.run as runmod
    from gradsim.data.encode import encode
    from gradsim.data.load import load_dataset
    from gradsim.data.retrieval import candidate_lists

    whole = run(cfg_for(tmp_path / "ref", memory_gb=0.013, baselines=False), lm=tiny)
    ref = metric_rows(tmp_path / "ref" / "gradient-similarity" / "paraphrased")
    assert sum(dict(r)["role"] == "query" for r in ref) == 8
    restore = interrupt_after(monkeypatch, 1)  # dies with block 2's gradients computed, before it is logged
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "cut", memory_gb=0.013, baselines=False), lm=tiny)
    restore()
    restore = die_after(monkeypatch, runmod.Part, "record", 1)  # dies right after block 2 is logged
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "cut", memory_gb=0.013, baselines=False), lm=tiny)
    restore()
    resumed = run(cfg_for(tmp_path / "cut", memory_gb=0.013, baselines=False), lm=tiny)
    assert resumed["cost"]["attempts"][-1]["query_passes"] == 4
    assert metric_rows(tmp_path / "cut" / "gradient-similarity" / "paraphrased") == ref

    # The truncated samples (the tiny model's context is 256 tokens) are counted in results.json.
    data = load_dataset(str(BUNDLED_DATA / "original.jsonl"), str(BUNDLED_DATA / "paraphrased.jsonl"), 8)
    needed = sorted({j for c in candidate_lists(data, "bm25", 3) for j in c})
    cut = [s.id for s in data.queries if encode(tiny.tokenizer, s, 256).truncated]
    cut_o = [data.originals[j].id for j in needed if encode(tiny.tokenizer, data.originals[j], 256).truncated]
    assert 0 < len(cut_o) < len(needed)
    want = {"max_length": 256, "queries": len(cut), "originals": len(cut_o), "query_ids": cut, "original_ids": cut_o}
    assert whole["truncated"] == resumed["truncated"] == want
    assert {dict(r)["id"] for r in ref if dict(r)["role"] == "query" and dict(r)["truncated"]} == set(cut)


def test_a_resumed_projected_run_keeps_every_metric_row_once(tiny, tmp_path, monkeypatch, caplog):
    """The report: killed after a query block was logged, its queries' rows were lost (they were
    logged after it); likewise an original shard's rows. Both are now logged with (or before) what
    they describe."""
    import logging

    import gradsim.study.run as runmod
    from gradsim.study.features import FeatureStore

    kw = dict(use_random_projection=True, projection="factorized", proj_dim=64, memory_gb=1e-5, baselines=False)
    run(cfg_for(tmp_path / "ref", **kw), lm=tiny)
    d = "paraphrased-factorized64"
    ref = metric_rows(tmp_path / "ref" / "gradient-similarity" / d)
    assert sum(dict(r)["role"] == "query" for r in ref) == 8 and sum(dict(r)["role"] == "original" for r in ref) > 2
    restore = die_after(monkeypatch, FeatureStore, "write_shard", 2)  # after the 2nd shard of originals
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "cut", **kw), lm=tiny)
    restore()
    restore = die_after(monkeypatch, runmod.Part, "record", 1)  # after the first block of queries
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "cut", **kw), lm=tiny)
    restore()
    with caplog.at_level(logging.INFO, logger="gradsim"):
        resumed = run(cfg_for(tmp_path / "cut", **kw), lm=tiny)
    assert "resuming: 2 of 8 queries already scored" in caplog.text
    assert metric_rows(tmp_path / "cut" / "gradient-similarity" / d) == ref
    assert f"8 of 8 queries and {resumed['truncated']['originals']} originals (candidates) truncated" in caplog.text


def test_representation_scores_do_not_depend_on_the_partition():
    """A query's representation-similarity cosines are the same computed among every query and original (a whole
    run) or among a partition's few (issue 26: float32 matmuls rounded them by the block's shape, so partitioned
    baselines came out one float32 step from the whole run's). The embedded model's hidden size, two poolings."""
    from gradsim.core.projection import layout_from_sizes
    from gradsim.study.baselines import representation_cosines
    from gradsim.study.features import per_matrix_self_dots

    torch.manual_seed(0)
    layout = layout_from_sizes(["response", "last"], [(576,), (576,)], [576, 576])
    q, o = torch.randn(48, 1152), torch.randn(48, 1152)
    oself = per_matrix_self_dots(layout, o)
    whole = representation_cosines(layout, q, o, oself).astype(np.float32)
    rows, cols = slice(10, 13), [1, 5, 7, 20]
    part = representation_cosines(layout, q[rows], o[cols], oself[cols]).astype(np.float32)
    assert np.array_equal(whole[rows][:, cols], part)
