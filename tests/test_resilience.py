"""Issue 26: bf16 on every path, cost across attempts, one-line errors where tracebacks were (tiny model)."""

import copy

import pytest
import torch

from gradsim.config import Config
from gradsim.model import LoadedModel
from gradsim.run import run


def cfg_for(tmp_path, **kw):
    base = dict(device="cpu", sample_size=4, output_dir=str(tmp_path), top_k=2, baselines=False)
    base.update(kw)
    return Config(**base)


def bf16(tiny) -> LoadedModel:
    model = copy.deepcopy(tiny.model)
    for p in model.parameters():  # parameters only, as load_model does
        p.data = p.data.to(torch.bfloat16)
    return LoadedModel(model, tiny.tokenizer, "tiny-llama-bf16", "test", tiny.device, tiny.chat_template_sha256, 256)


def test_bf16_weights_with_scratch_keep_originals_and_give_the_same_scores(tiny, tmp_path):
    lm = bf16(tiny)
    ref = run(cfg_for(tmp_path / "ref", dtype="bfloat16-weights", memory_gb=0.0035), lm=lm)  # one bf16 gradient
    kept = run(cfg_for(tmp_path / "kept", dtype="bfloat16-weights", memory_gb=0.0035, scratch_gb=0.1), lm=lm)
    assert kept["cost"]["scratch_bytes_written"] > 0 and kept["cost"]["originals_reused"] > 0
    assert kept["queries"] == ref["queries"]
    assert not list((tmp_path / "kept").rglob(".scratch"))


def test_stale_scratch_of_a_dead_run_is_removed_by_the_next(tiny, tmp_path):
    stale = tmp_path / "gradient-similarity" / "paraphrased" / ".scratch" / "00000-00004"
    stale.mkdir(parents=True)
    (stale / "original_0000001.tmp").write_bytes(b"\0" * 1000)  # a kill mid-write
    (stale / "original_0000002.bin").write_bytes(b"\0" * 1000)
    run(cfg_for(tmp_path, sample_size=4), lm=tiny)
    assert not (stale.parent).exists()


def stop_after(monkeypatch, blocks: int, exc=KeyboardInterrupt):
    """Part.record raises ``exc`` once ``blocks`` blocks are logged (an interrupt, a kill between blocks)."""
    import gradsim.run as runmod

    real, n = runmod.Part.record, [0]

    def dying(self, *a, **k):
        if n[0] >= blocks:
            raise exc()
        n[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(runmod.Part, "record", dying)
    return lambda: monkeypatch.setattr(runmod.Part, "record", real)


def test_cost_sums_every_attempt_and_lists_how_each_ended(tiny, tmp_path, monkeypatch):
    import gradsim.run as runmod

    clean = run(cfg_for(tmp_path / "ref", sample_size=6, memory_gb=0.013), lm=tiny)["cost"]  # 3 blocks of 2
    cfg = cfg_for(tmp_path / "cut", sample_size=6, memory_gb=0.013)
    restore = stop_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, lm=tiny)  # attempt 1: one block, then Ctrl-C
    restore()
    restore = stop_after(monkeypatch, 1)
    monkeypatch.setattr(runmod, "end_attempt", lambda parts, exc: None)  # SIGKILL: nothing runs on the way out
    with pytest.raises(KeyboardInterrupt):
        run(cfg, lm=tiny)  # attempt 2: one more block, then killed
    restore()
    monkeypatch.undo()
    cost = run(cfg, lm=tiny)["cost"]
    assert [a["end"] for a in cost["attempts"]] == ["interrupted", "killed", "finished"]
    # Ctrl-C ends attempt 1 after computing its second block (logged with its end); the kill loses what attempt
    # 2 spent after its last logged block; every pass logged counts, so the sum is at least a clean run's.
    assert [a["query_passes"] for a in cost["attempts"]] == [4, 2, 2]
    assert cost["query_passes"] == 8 >= clean["query_passes"] == 6 and cost["num_queries"] == 6
    assert cost["original_passes"] >= clean["original_passes"] and cost["tokens"] >= clean["tokens"]
    assert cost["seconds"] == pytest.approx(sum(a["seconds"] for a in cost["attempts"])) and cost["mode"]
    assert clean["attempts"] == [dict(clean["attempts"][0], end="finished")] and len(clean["attempts"]) == 1


def test_a_rerun_after_a_failed_write_keeps_the_cost_of_the_attempt_that_computed(tiny, tmp_path, monkeypatch):
    import gradsim.run as runmod

    cfg = cfg_for(tmp_path, sample_size=3)
    real = runmod.write_outputs

    def full_disk(p, result):
        raise OSError(27, "File too large")

    monkeypatch.setattr(runmod, "write_outputs", full_disk)
    with pytest.raises(OSError):
        run(cfg, lm=tiny)
    monkeypatch.setattr(runmod, "write_outputs", real)
    cost = run(cfg, lm=tiny)["cost"]
    assert [a["end"] for a in cost["attempts"]] == ["error", "finished"]
    assert cost["query_passes"] == 3 and cost["mode"] and cost["seconds"] > 0


def test_combine_sums_the_partitions_costs(tiny, tmp_path):
    from gradsim.combine import merge_partitions

    for s, e in ((0, 2), (2, 4)):
        run(cfg_for(tmp_path, partition_start=s, partition_end=e), lm=tiny)
    merged = merge_partitions(tmp_path / "gradient-similarity" / "paraphrased")["cost"]
    assert merged["query_passes"] == 4 and merged["num_queries"] == 4 and merged["partitions"] == 2
    assert [a["partition"] for a in merged["attempts"]] == [[0, 2], [2, 4]]
