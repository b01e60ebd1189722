"""The GPU check runs from its bundle in a venv that holds only torch, transformers, numpy and safetensors
(what a bare GPU machine has): bench/gpu_bundle.sh packs <= 48 MiB, and bench/gpu_check.py --bundle DIR
--device cpu --quick passes there, with its key numbers in the report."""

import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BARE = ("torch", "transformers", "numpy", "safetensors")


def uv() -> str:
    path = shutil.which("uv") or shutil.which("uv", path=os.path.expanduser("~/.local/bin"))
    if path is None:
        pytest.fail("uv is not on PATH (CI installs it before uv sync --locked)")
    return path


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([os.path.dirname(uv()), env.get("PATH", "")])
    env.update(extra)
    return env


def bare_venv(where: Path) -> Path:
    """A venv of this interpreter with torch, transformers, numpy and safetensors alone, at this environment's
    versions (and theirs for their own needs: a constraints file of this environment), from uv's cache."""
    constraints = where / "constraints.txt"
    frozen = subprocess.run(
        [uv(), "pip", "freeze", "--python", sys.executable, "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    ).stdout
    constraints.write_text(frozen)
    venv = where / "venv"
    subprocess.run([uv(), "venv", "-q", str(venv), "--python", sys.executable], check=True, env=clean_env())
    python = venv / "bin" / "python"
    subprocess.run(
        [uv(), "pip", "install", "-q", "--python", str(python), "-c", str(constraints), *BARE],
        check=True,
        env=clean_env(),
    )
    return python


@pytest.mark.slow
def test_gpu_check_runs_from_bundle_in_bare_venv(tmp_path):
    bundle = tmp_path / "bundle"
    pack = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_bundle.sh"), str(bundle)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert pack.returncode == 0, pack.stderr[-3000:]
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size <= 48 * 2**20 and manifest["bytes"] <= 48 * 2**20, size
    wheels = {w.name.split("-")[0].lower() for w in (bundle / "wheels").glob("*.whl")}
    assert {"gradsim", "orjson", "psutil", "python_dotenv", "rank_bm25", "tqdm", "traker"} <= wheels
    assert not wheels & set(BARE), "the bundle must not carry what the machine has"
    assert any(w.name.startswith("orjson") and "cp312-manylinux" in w.name for w in (bundle / "wheels").iterdir())
    for w in (bundle / "wheels").glob("*.whl"):
        assert zipfile.ZipFile(w).testzip() is None
    assert (bundle / "tokenizer" / "tokenizer.json").is_file()
    assert (bundle / "data" / "lima_sample" / "original.jsonl").is_file()

    python = bare_venv(tmp_path)
    probe = subprocess.run([str(python), "-c", "import gradsim"], capture_output=True, env=clean_env())
    assert probe.returncode != 0, "the bare venv must not hold gradsim"

    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run(
        [str(python), str(ROOT / "bench" / "gpu_check.py"), "--bundle", str(bundle), "--device", "cpu", "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=clean_env(OUT=str(out)),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (report_path,) = out.glob("gpu_check_*.json")
    report = json.loads(report_path.read_text())
    sections = report["sections"]
    assert all(s["status"] in ("ok", "skipped") for s in sections.values()), sections
    assert sections["environment"]["gradsim_file"].startswith(report["bundle"]["site"])

    exact = sections["exactness_tiny"]["precisions"]
    assert set(exact) == {"float32", "bfloat16", "bfloat16-weights"}  # tf32 is CUDA's
    assert exact["float32"]["rel_err_norm_max"] < 1e-5
    assert exact["float32"]["cosine_min"] > 1 - 1e-9
    for prec, r in exact.items():
        assert r["deterministic"] is True, prec
        assert 0 < r["rel_err_norm_max"] < r["tolerance_rel_err_norm"], (prec, r["rel_err_norm_max"])

    proj = sections["projections_tiny"]["methods"]
    assert set(proj) == {"tensorsketch", "countsketch", "factorized", "trak"}
    for kind, r in proj.items():
        assert "error" not in r, (kind, r.get("error"))
        assert r["deterministic"] is True and r["sha256_run1"] == r["sha256_run2"], kind
        assert r["feature_cosine_min"] > 1 - 1e-6 and r["feature_rel_err_max"] < 1e-4, (kind, r)

    e2e = sections["e2e"]
    assert e2e["rc"] == 0 and e2e["queries"] == 12 and set(e2e["settings"]) == {"paraphrased", "model-generated"}
    assert e2e["tokens_per_s"] > 0 and e2e["cost"]["held_gradients"] >= 1

    tp = sections["throughput"]["precisions"]
    assert set(tp) == {"float32", "bfloat16"}
    for prec, methods in tp.items():
        assert set(methods) == {"exact", "tensorsketch", "countsketch", "factorized", "trak"}
        for kind, r in methods.items():
            assert r["tokens_per_s"] > 0 and r["achieved_tflops_6pt"] > 0, (prec, kind, r)
        assert methods["exact"]["predicted_bytes"]["total"] > 0


def gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_peaks_by_device_name():
    g = gpu_check_module()
    assert g.card_peaks("NVIDIA H100 80GB HBM3")["bf16"] == 989.4  # SXM
    assert g.card_peaks("NVIDIA H100 PCIe")["fp32"] == 51.2
    assert g.card_peaks("NVIDIA H100 NVL")["tf32"] == 417.5
    assert g.card_peaks("NVIDIA H200")["tf32"] == 494.7
    assert g.card_peaks("NVIDIA GH200 480GB")["matched"] == "GH200"
    assert g.card_peaks("NVIDIA A100-SXM4-80GB")["bf16"] == 312.0
    assert g.card_peaks("AMD EPYC") is None


def test_bundle_wheels_fit_by_tag():
    g = gpu_check_module()
    here = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    other = "cp39" if here != "cp39" else "cp310"
    assert g.wheel_fits("tqdm-4.70.1-py3-none-any.whl")
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return
    assert g.wheel_fits(f"orjson-3.13.0-{here}-{here}-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    assert not g.wheel_fits(f"orjson-3.13.0-{other}-{other}-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    assert g.wheel_fits("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.manylinux_2_28_x86_64.whl")
