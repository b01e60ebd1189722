"""Issue 26: bf16 on every path, cost across attempts, one-line errors where tracebacks were (tiny model)."""

import copy

import pytest
import torch

from gradsim.config import Config
from gradsim.core.model import LoadedModel
from gradsim.io import read_json
from gradsim.study.run import run


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
    import gradsim.study.run as runmod

    real, n = runmod.Part.record, [0]

    def dying(self, *a, **k):
        if n[0] >= blocks:
            raise exc()
        n[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(runmod.Part, "record", dying)
    return lambda: monkeypatch.setattr(runmod.Part, "record", real)


def test_cost_sums_every_attempt_and_lists_how_each_ended(tiny, tmp_path, monkeypatch):
    import gradsim.study.run as runmod

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
    import gradsim.study.run as runmod
    from gradsim.errors import GradsimError

    cfg = cfg_for(tmp_path, sample_size=3)
    real = runmod.write_outputs

    def full_disk(p, result):
        raise OSError(27, "File too large")

    monkeypatch.setattr(runmod, "write_outputs", full_disk)
    with pytest.raises(GradsimError, match="File too large"):
        run(cfg, lm=tiny)
    monkeypatch.setattr(runmod, "write_outputs", real)
    cost = run(cfg, lm=tiny)["cost"]
    assert [a["end"] for a in cost["attempts"]] == ["error", "finished"]
    assert cost["query_passes"] == 3 and cost["mode"] and cost["seconds"] > 0


def test_combine_sums_the_partitions_costs(tiny, tmp_path):
    from gradsim.cluster.combine import merge_partitions

    for s, e in ((0, 2), (2, 4)):
        run(cfg_for(tmp_path, partition_start=s, partition_end=e), lm=tiny)
    merged = merge_partitions(tmp_path / "gradient-similarity" / "paraphrased")["cost"]
    assert merged["query_passes"] == 4 and merged["num_queries"] == 4 and merged["partitions"] == 2
    assert [a["partition"] for a in merged["attempts"]] == [[0, 2], [2, 4]]


# One-line errors where tracebacks were
# --------------------------------------------------------------------------------------------


def partitioned(tiny, tmp_path):
    for s, e in ((0, 2), (2, 4)):
        run(cfg_for(tmp_path, partition_start=s, partition_end=e), lm=tiny)
    return tmp_path / "gradient-similarity" / "paraphrased"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["results_00000-00002.json", "scores_00000-00002.npz"])
def test_combine_and_a_rerun_name_a_truncated_partition_file(tiny, tmp_path, capsys, damaged):
    from gradsim.cli.cluster import combine_main
    from gradsim.errors import GradsimError

    run_dir = partitioned(tiny, tmp_path)
    truncate(run_dir / "partitions" / damaged)
    capsys.readouterr()
    assert combine_main([str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and damaged in err and "truncated or damaged" in err and "rerun the partition" in err
    assert not (run_dir / "results.json").exists()
    with pytest.raises(GradsimError, match=f"{damaged}.*truncated or damaged.*delete it"):
        run(cfg_for(tmp_path, partition_start=0, partition_end=2), lm=tiny)


def test_a_full_disk_leaves_no_scores_without_results_and_the_rerun_resumes(tiny, tmp_path, monkeypatch, capsys):
    import errno

    import gradsim.study.outputs
    import gradsim.study.run as runmod
    from gradsim.cli import main
    from gradsim.io import atomic_writer

    real = gradsim.study.outputs.atomic_write_json  # looked up where results.json is written (write_outputs)

    def full(path, obj, indent=True):
        if path.name != "results.json":
            return real(path, obj, indent)
        with atomic_writer(path):
            raise OSError(errno.EFBIG, "File too large")  # write() names no file

    monkeypatch.setattr(gradsim.study.outputs, "atomic_write_json", full)
    monkeypatch.setattr(runmod, "load_model", lambda cfg, device: tiny)
    monkeypatch.setattr(runmod, "check_exact_fits", lambda cfg, device: None)
    argv = ["--output-dir", str(tmp_path), "--device", "cpu", "--sample-size", "3", "--top-k", "1", "--no-baselines"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    out = tmp_path / "gradient-similarity" / "paraphrased"
    assert len(err) == 1 and str(out / "results.json") in err[0] and "File too large" in err[0], err
    assert "rerun the same command" in err[0]
    assert not (out / "scores.npz").exists() and not (out / "results.json").exists()
    assert (out / "progress.jsonl").exists()  # resumable
    monkeypatch.setattr(gradsim.study.outputs, "atomic_write_json", real)
    assert main(argv) == 0
    res = read_json(out / "results.json")
    assert res["cost"]["query_passes"] == 3 and [a["end"] for a in res["cost"]["attempts"]] == ["error", "finished"]


def test_a_read_only_feature_store_that_needs_shards_is_refused_before_any_work(tiny, tmp_path, monkeypatch):
    import os

    import gradsim.study.features
    from gradsim.errors import GradsimError

    run(cfg_for(tmp_path, sample_size=2, baselines=True), lm=tiny)
    store = next(tmp_path.rglob("representations"))
    for f in store.glob("*_000000_*.npy"):
        f.unlink()  # the shard this store still needs
    if os.geteuid() == 0:  # root writes anywhere: a read-only mount is what stops it
        monkeypatch.setattr(gradsim.study.features, "dir_writable", lambda path: False)
    else:
        store.chmod(0o555)
    try:
        with pytest.raises(
            GradsimError, match="feature store .*representations needs 1 more shards but is not writable"
        ):
            run(cfg_for(tmp_path, sample_size=2, baselines=True, setting="model-generated"), lm=tiny)
    finally:
        store.chmod(0o755)
    assert not list((tmp_path / "gradient-similarity" / "model-generated").glob("progress*"))  # no work done


def test_select_on_a_folder_without_a_run_says_what_is_there(tiny, tmp_path, capsys):
    from gradsim.cli.analysis import select_main

    (tmp_path / "empty").mkdir()
    assert select_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no finished run" in err, err
    run(
        cfg_for(tmp_path / "out", sample_size=2, use_random_projection=True, projection="countsketch", proj_dim=4096),
        lm=tiny,
    )
    capsys.readouterr()
    assert select_main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "paraphrased-countsketch4096" in err, err


def test_combine_refuses_a_partition_holding_nonfinite_scores(tiny, tmp_path, capsys):
    import numpy as np

    from gradsim.cli.cluster import combine_main

    run_dir = partitioned(tiny, tmp_path)
    damaged = run_dir / "partitions" / "scores_00002-00004.npz"
    with np.load(damaged) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["dots"][0, 0, 0] = np.nan  # what a run made before the finite check could hold
    np.savez(damaged, **arrays)
    capsys.readouterr()
    assert combine_main([str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scores_00002-00004.npz holds 1 non-finite dots" in err, err
    assert not (run_dir / "results.json").exists()


def test_end_reasons_and_a_never_closed_attempt_reads_as_killed():
    from gradsim.study.cost import closed, end_reason

    assert end_reason(SystemExit(143)) == "SIGTERM"  # lock.exit_on_sigterm's exit
    assert end_reason(KeyboardInterrupt()) == "interrupted" and end_reason(OSError(28, "full")) == "error"
    logged = {2: {"attempt": 2, "end": "running"}, 1: {"attempt": 1, "end": "SIGTERM"}}
    assert [a["end"] for a in closed(logged)] == ["SIGTERM", "killed"]
