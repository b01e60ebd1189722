"""The study at scale: the exact path's schedule (hand-computed), and refusing before any weight is
loaded what the model's config alone shows cannot fit."""

import pytest
from conftest import config_only_model

from gradsim.cli import main
from gradsim.study.schedule import later_uses, make_plan, plan_blocks


def test_blocks_keep_an_ids_two_queries_together_and_grow_by_overlap():
    # queries 0/1 are one id in both settings (candidates coincide), 2 shares most with them, 3 nothing.
    cands = [[0, 1, 2], [0, 1, 2], [1, 2, 3], [7, 8, 9]]
    groups = [0, 0, 1, 7]
    assert plan_blocks(cands, groups, 3) == [[0, 1, 2], [3]]
    assert plan_blocks(cands, groups, 2) == [[0, 1], [2, 3]]  # a block is filled even where nothing overlaps
    assert plan_blocks(cands, groups, 1) == [[0], [1], [2], [3]]  # a group larger than the budget is split


def test_plan_counts_passes_and_holds_originals_when_they_fit_and_save_passes():
    cands = [[0, 1, 2], [0, 1, 2], [1, 2, 3], [7, 8, 9]]
    groups = [0, 0, 1, 7]
    held_queries = make_plan(cands, groups, 2)
    assert held_queries.mode == "hold-queries"
    # blocks [0, 1], [2, 3] need {0, 1, 2}, {1, 2, 3, 7, 8, 9}: 9 original passes for 4 queries
    assert held_queries.original_passes == 9 and held_queries.passes_per_query() == pytest.approx(13 / 4)
    # With a budget of 7 all 4 queries form one block needing the 7 distinct originals once: holding the
    # originals instead would save nothing, so queries stay held.
    assert make_plan(cands, groups, 7).mode == "hold-queries" and make_plan(cands, groups, 7).original_passes == 7
    spread = [[0, 1], [2, 3], [0, 2], [1, 3]]
    plan = make_plan(spread, [0, 2, 0, 1], 4)
    assert plan.mode == "hold-queries" and plan.blocks == [[0, 1, 2, 3]] and plan.original_passes == 4
    plan = make_plan(spread, [0, 2, 5, 6], 4)  # no shared groups; one block of all 4 still fits
    assert plan.original_passes == 4
    assert later_uses([[0], [1, 2]], [[5, 6], [6], [7]]) == {5: [0], 6: [0, 1], 7: [1]}


def test_hold_originals_when_every_original_fits_but_queries_do_not():
    # 6 queries over 3 originals, budget 3: query blocks of 3 need all 3 originals twice (6 passes);
    # holding the 3 originals needs them once (3).
    cands = [[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]]
    plan = make_plan(cands, [0, 1, 2, 0, 1, 2], 3)
    assert plan.mode == "hold-originals" and plan.original_passes == 3 and plan.passes_per_query() == 1.5


@pytest.fixture(scope="module")
def big_config_dir(tmp_path_factory):
    """A model directory holding only a config: a Llama of ~6.7B parameters (no weights)."""
    d = tmp_path_factory.mktemp("llama-7b-config")
    config_only_model(d, "llama-7b")
    return d


def cli(tmp_path, capsys, *argv):
    out = tmp_path / "out"
    code = main(["--output-dir", str(out), "--device", "cpu", *argv])
    return code, capsys.readouterr().err.strip(), out


def test_a_model_that_cannot_fit_is_refused_from_its_config_alone(big_config_dir, tmp_path, capsys, monkeypatch):
    import psutil

    # Pretend the machine has 16 GB: a 6.7B model's exact gradient path needs ~60 GB in fp32.
    monkeypatch.setattr(
        psutil, "virtual_memory", lambda: type("vm", (), {"total": 16 * 2**30, "available": 12 * 2**30})()
    )
    code, err, out = cli(tmp_path, capsys, "--model", str(big_config_dir))
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert "6.74B parameters" in err and "on cpu" in err and "has 16.0 GB" in err
    assert "--dtype bfloat16-weights" in err and "--use-random-projection" in err
    assert not out.exists()  # no weights exist in that directory: the refusal came first


def test_a_budget_that_holds_no_gradient_is_refused_naming_the_size(big_config_dir, tmp_path, capsys):
    code, err, out = cli(tmp_path, capsys, "--model", str(big_config_dir), "--memory-gb", "2")
    assert code == 2 and len(err.splitlines()) == 1
    assert "--memory-gb 2 holds no exact gradient" in err and "25.10 GB each" in err and "at least 25.10" in err
    assert not out.exists()


def test_both_settings_refuse_a_single_variant_file(tmp_path, capsys):
    code, err, out = cli(tmp_path, capsys, "--setting", "both", "--variant-data", "x.jsonl")
    assert code == 2 and "--paraphrased-data and --model-generated-data" in err
    assert not out.exists()
