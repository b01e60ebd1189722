"""compute.py's planning without a cluster: splitting, resources from flags and .env, the rendered scripts."""

import pytest

from gradsim.cli.cluster import compute_main
from gradsim.cluster.resources import time_minutes
from gradsim.cluster.slurm import split_ranges
from gradsim.errors import GradsimError


@pytest.mark.parametrize("n_queries,n", [(48, 10), (6, 3), (7, 3), (5, 5), (3, 10)])
def test_split_ranges_are_contiguous_and_balanced(n_queries, n):
    ranges = split_ranges(0, n_queries, n)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_queries
    assert all(e1 == s2 for (_, e1), (s2, _) in zip(ranges, ranges[1:]))
    sizes = [e - s for s, e in ranges]
    assert len(ranges) == min(n, n_queries) and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_split_ranges_within_a_subrange():
    assert split_ranges(10, 20, 3) == [(10, 14), (14, 17), (17, 20)]


@pytest.mark.parametrize(
    "spec,minutes",
    [("90", 90), ("1:30", 2), ("04:00:00", 240), ("1-00", 1440), ("2-03:04", 2 * 1440 + 184), ("0:0:59", 1)],
)
def test_slurm_time_formats(spec, minutes):
    assert time_minutes(spec) == minutes


@pytest.mark.parametrize("spec", ["", "1h", "0", "1:xx"])
def test_bad_time_is_refused(spec):
    with pytest.raises(GradsimError):
        time_minutes(spec)


def study(tmp_path):
    return [
        "--setting",
        "paraphrased",
        "--computation-type",
        "gradient-similarity",
        "--sample-size",
        "6",
        "--output-dir",
        str(tmp_path / "out"),
        "--num-partitions",
        "4",
        "--dry-run",
    ]


def test_sbatch_dry_run_takes_resources_from_env_and_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("GRADSIM_SLURM_ACCOUNT", "GRADSIM_SLURM_PARTITION"):
        # main.py's .env loading copies .env into os.environ; this makes monkeypatch undo that too.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    (tmp_path / ".env").write_text("GRADSIM_SLURM_ACCOUNT=lab42\nGRADSIM_SLURM_PARTITION=from-dotenv\n")
    monkeypatch.setenv("GRADSIM_SLURM_PARTITION", "gpu")  # the environment wins over .env
    monkeypatch.setenv("GRADSIM_SLURM_EXTRA", "--constraint=a100;#SBATCH --exclusive")
    monkeypatch.setenv("GRADSIM_SLURM_CONTAINER", "apptainer exec --nv img.sif")
    monkeypatch.setenv("GRADSIM_SLURM_SETUP", "module load cuda/12")
    monkeypatch.setenv("GRADSIM_SLURM_MEM", "4G")
    assert (
        compute_main(
            [
                *study(tmp_path),
                "--backend",
                "sbatch",
                "--mem",
                "16G",
                "--gpus",
                "a100:1",
                "--qos",
                "high",
                "--time",
                "2:00:00",
                "--max-parallel",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab42",
        "#SBATCH --mem=16G",
        "#SBATCH --gres=gpu:a100:1",
        "#SBATCH --qos=high",
        "#SBATCH --time=2:00:00",
        "#SBATCH --constraint=a100",
        "#SBATCH --exclusive",
        "#SBATCH --array=0-3%2",
        "module load cuda/12",
        "STARTS=(0 2 4 5)",
        "ENDS=(2 4 5 6)",
    ):
        assert line in out, line
    assert "apptainer exec --nv img.sif " in out and "-m gradsim task " in out and "task_config.json" in out
    assert "{{" not in out and "nothing was submitted" in out
    assert not (tmp_path / "out").exists()


def test_submitit_dry_run_prints_submitits_script(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        compute_main(
            [
                *study(tmp_path),
                "--backend",
                "submitit",
                "--partition",
                "debug",
                "--time",
                "30",
                "--container",
                "apptainer exec img.sif",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "#SBATCH --partition=debug" in out and "#SBATCH --time=30" in out and "#SBATCH --array=0-3" in out
    assert "apptainer exec img.sif " in out and "submitit.core._submit" in out
    assert "PartitionTask" in out and "starts=[0, 2, 4, 5]" in out
    assert not (tmp_path / "out").exists()


def test_bad_flags_are_refused_before_anything_is_submitted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert compute_main([*study(tmp_path), "--backend", "pbs"]) == 2
    assert "--backend" in capsys.readouterr().err
    assert compute_main([*study(tmp_path), "--time", "soon"]) == 2
    assert "--time" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_memory_request_comes_from_the_models_estimate(tmp_path, caplog):
    """Without --mem a task asks for what the model needs with an explicit budget of 2 held gradients
    (the node's free memory says nothing about the job's share); a smaller --mem is warned about."""
    import logging

    from gradsim.cli.cluster import plan_from_argv as plan
    from gradsim.cluster.resources import Resources, parse_mem_gb

    argv = ["--setting", "paraphrased", "--output-dir", str(tmp_path), "--device", "cpu", "--max-length", "512"]
    p = plan(argv, 2, "sbatch", Resources())
    # embedded model: 134.5M params; weights + buffer + activations of 512 tokens + 2 held + 2 GB, rounded up
    assert p.resources.mem == "5G"
    # 2 x 0.501 GB, rounded up so that the budget the task reads holds both (1.00 held only one)
    assert p.task_cfg.memory_gb == 1.01 and p.cfg.memory_gb is None
    from gradsim.study.memory import GB, budget_capacity

    assert budget_capacity(1.01 * GB, 134_515_008 * 4) == 2 and budget_capacity(1.00 * GB, 134_515_008 * 4) == 1
    with caplog.at_level(logging.WARNING, logger="gradsim"):
        plan(argv, 2, "sbatch", Resources(mem="1G"))
    assert "--mem 1G is below the 5 GB a task is estimated to need" in caplog.text
    assert parse_mem_gb("512") == 0.5 and parse_mem_gb("32G") == 32 and parse_mem_gb("1T") == 1024
    assert parse_mem_gb("4000M") == pytest.approx(3.906, abs=1e-3) and parse_mem_gb("lots") is None


def test_a_finished_partition_of_other_rows_is_refused_not_skipped(tmp_path):
    """A finished range made from other rows (another --ids-file, or changed files) has the submitted
    settings but other data hashes: resubmitting must not count it as done."""
    import orjson

    from gradsim.cli.cluster import plan_from_argv as plan
    from gradsim.cli.common import config_from_args
    from gradsim.cluster.resources import Resources
    from gradsim.data.load import load_dataset
    from gradsim.layout import partition_paths, run_dir

    argv = ["--setting", "paraphrased", "--sample-size", "6", "--output-dir", str(tmp_path / "out")]
    cfg = config_from_args(argv)
    data = load_dataset(cfg.original_data, cfg.variant_data, 6)
    done = partition_paths(run_dir(cfg).resolve(), 0, 3, 6).results
    done.parent.mkdir(parents=True)
    compat = {**cfg.compat(), "original_data_sha256": data.original_sha256, "variant_data_sha256": "other"}
    done.write_bytes(orjson.dumps({"compat": compat}))
    with pytest.raises(GradsimError, match="differs in: variant_data_sha256"):
        plan(argv, 2, "sbatch", Resources())
    done.write_bytes(orjson.dumps({"compat": {**compat, "variant_data_sha256": data.variant_sha256}}))
    assert plan(argv, 2, "sbatch", Resources()).todo == [(3, 6)]


@pytest.mark.slow
def test_skip_overlong_plans_over_the_rows_the_tasks_keep(tmp_path, embedded):
    """--skip-overlong leaves rows out before the queries are indexed: the plan splits the queries the tasks will
    have (the run's own filter with the model loaded), so no task's range lies past the data."""
    from gradsim.cli.cluster import plan_from_argv as plan
    from gradsim.cluster.resources import Resources
    from gradsim.config import Config
    from gradsim.study.context import load_data
    from gradsim.study.part import skip_overlong

    argv = ["--sample-size", "12", "--max-length", "100", "--skip-overlong", "--output-dir", str(tmp_path)]
    p = plan(argv, 3, "sbatch", Resources())
    cfg = Config(sample_size=12, max_length=100, skip_overlong=True, output_dir=str(tmp_path))
    kept = skip_overlong(cfg, load_data(cfg), embedded)
    assert len(kept.queries) < 12  # the case: some rows are left out
    assert p.num_queries == len(kept.queries) and p.ranges[-1][1] == len(kept.queries)
