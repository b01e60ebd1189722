"""Slurm tasks get the study's Config typed (issue 25, step 4): gradsim submit reads the flags once and writes
task_config.json; `gradsim task` (what an sbatch task starts) runs exactly that Config over its range, equal to
main.py over the same range, and refuses data files that changed since the submission."""

from __future__ import annotations

import shutil

import numpy as np

from gradsim.cli import gradsim_main
from gradsim.cli.cluster import plan_from_argv
from gradsim.cluster.resources import Resources
from gradsim.cluster.slurm import read_task_config
from gradsim.cluster.submit import sbatch_script, write_task_config
from gradsim.config import BUNDLED_DATA
from gradsim.layout import RunPaths


def test_a_task_runs_its_submissions_typed_config(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("original.jsonl", "paraphrased.jsonl"):
        shutil.copy(BUNDLED_DATA / name, data / name)
    monkeypatch.chdir(tmp_path)  # relative paths: the task must get them absolute
    study = ["--model", str(tiny_model_dir), "--sample-size", "4", "--device", "cpu", "--no-baselines"]
    study += ["--original-data", "data/original.jsonl", "--variant-data", "data/paraphrased.jsonl"]
    p = plan_from_argv([*study, "--output-dir", "out", "-q"], 2, "sbatch", Resources())
    path = write_task_config(p)
    cfg, hashes = read_task_config(path)
    assert cfg == p.task_cfg and cfg.partition_start is None and cfg.memory_gb == p.task_cfg.memory_gb
    assert cfg.original_data == str(data / "original.jsonl") and cfg.output_dir == str(tmp_path / "out")
    assert hashes["paraphrased"]["variant_data_sha256"]
    script = sbatch_script(p)
    assert f"-m gradsim task {path} -q --partition-start" in script and "--model" not in script

    s, e = p.todo[0]
    assert gradsim_main(["task", str(path), "--partition-start", str(s), "--partition-end", str(e), "-q"]) == 0
    # main.py over the same range, with the same budget, elsewhere: the same scores
    ref = ["--output-dir", "ref", "--memory-gb", str(cfg.memory_gb), "--partition-start", str(s)]
    assert gradsim_main(["run", *study, *ref, "--partition-end", str(e), "-q"]) == 0
    capsys.readouterr()
    run = "gradient-similarity/paraphrased"
    got = np.load(RunPaths(tmp_path / "out" / run, s, e, True).scores)
    want = np.load(RunPaths(tmp_path / "ref" / run, s, e, True).scores)
    assert sorted(got.files) == sorted(want.files)
    for k in want.files:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    variants = data / "paraphrased.jsonl"  # the data changed after the submission: a variant reworded
    variants.write_text(variants.read_text().replace(" the ", " THE ", 1))
    s, e = p.todo[1]
    assert gradsim_main(["task", str(path), "--partition-start", str(s), "--partition-end", str(e)]) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "Traceback" not in err
    assert not RunPaths(tmp_path / "out" / run, s, e, True).results.exists()


def test_a_missing_or_foreign_task_config_is_one_line(tmp_path, capsys):
    assert gradsim_main(["task", str(tmp_path / "task_config.json")]) == 2
    assert "task_config.json" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"config": {}}')
    assert gradsim_main(["task", str(tmp_path / "other.json")]) == 2
    assert "not a gradsim task config" in capsys.readouterr().err
