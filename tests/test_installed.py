"""gradsim works installed, not only from a checkout (issue 25, step 5): the wheel built by `uv build` is installed
into a fresh venv and run from a folder outside the checkout. The bundled sample, the sbatch template and the
reference tables are package data; a Slurm task starts as `python -m gradsim run`, not as the checkout's main.py.

The venv gets the locked dependencies from uv's cache (`uv sync --offline --no-install-project` into it: the lock
honours pyproject's [tool.uv] exclude-dependencies, which a plain `uv pip install WHEEL` would not, and needs no
index), then the wheel alone (`uv pip install --no-deps`). About a minute, most of it the tiny run's model load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the built wheel and the locked dependencies; its bin folder."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    tmp = tmp_path_factory.mktemp("installed")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTHONPATH")}
    _run([uv, "build", "--wheel", "--out-dir", tmp / "dist"], ROOT, env)
    (wheel,) = (tmp / "dist").glob("gradsim-*.whl")
    venv = tmp / "venv"
    _run([uv, "venv", "-q", "--python", sys.executable, venv], tmp, env)
    deps = dict(env, UV_PROJECT_ENVIRONMENT=str(venv))
    _run([uv, "sync", "--offline", "--locked", "--no-dev", "--no-install-project", "-q"], ROOT, deps)
    _run([uv, "pip", "install", "--offline", "-q", "--no-deps", "--python", venv / "bin" / "python", wheel], tmp, env)
    return venv / "bin"


@pytest.fixture()
def elsewhere(tmp_path) -> tuple[Path, dict]:
    """A working folder outside the checkout and an environment with nothing pointing at the checkout."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert ROOT not in cwd.resolve().parents
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return cwd, dict(env, OMP_NUM_THREADS="1")


def test_the_package_is_imported_from_the_venv_with_its_data(installed, elsewhere):
    cwd, env = elsewhere
    code = (
        "import gradsim, gradsim.config as c, gradsim.cluster.submit as s; print(gradsim.__file__); "
        "print(all(p.is_file() for p in (c.BUNDLED_DATA / 'original.jsonl', s.TEMPLATE, "
        "c.BUNDLED_REFERENCE / 'frontier.json', c.BUNDLED_REFERENCE / 'targets-bundled.json')))"
    )
    where, ok = _run([installed / "python", "-c", code], cwd, env).stdout.split()
    assert Path(where).is_relative_to(installed.parent) and ok == "True"


def test_help_and_a_cut_pipe(installed, elsewhere):
    cwd, env = elsewhere
    out = _run([installed / "gradsim", "--help"], cwd, env).stdout
    assert out.startswith("usage: gradsim COMMAND") and "submit" in out
    # `gradsim --help | head -3`: the reader is gone before gradsim writes; no traceback.
    cut = subprocess.run(f"{installed / 'gradsim'} --help | true", shell=True, cwd=cwd, env=env, capture_output=True)
    assert b"Traceback" not in cut.stderr and b"BrokenPipe" not in cut.stderr


def test_a_tiny_run_from_outside_the_checkout(installed, elsewhere):
    cwd, env = elsewhere
    out = cwd / "out"
    flags = ("--sample-size", "2", "--no-baselines", "--max-length", "64", "--output-dir", out, "-q")
    proc = _run([installed / "gradsim", "run", *flags], cwd, env)
    assert "paraphrased / gradient-similarity (bm25, n=2): top-1" in proc.stdout
    results = json.loads((out / "gradient-similarity" / "paraphrased" / "results.json").read_text())
    assert Path(results["config"]["original_data"]).is_relative_to(installed.parent)  # the wheel's bundled sample
    assert results["summary"]["whole_model"]["n"] == 2


def test_submit_dry_run_from_outside_the_checkout(installed, elsewhere):
    cwd, env = elsewhere
    flags = ("--num-partitions", "2", "--dry-run", "--backend", "sbatch", "--output-dir", cwd / "out2")
    out = _run([installed / "gradsim", "submit", *flags], cwd, env).stdout
    assert "48 queries in 2 partitions ([0, 24), [24, 48))" in out and "nothing was submitted" in out
    assert "#SBATCH --array=0-1" in out and "{{" not in out
    (command,) = [ln for ln in out.splitlines() if "--partition-start" in ln]
    assert command.startswith(f"{installed / 'python'} -m gradsim task ") and str(ROOT) not in command
    assert not (cwd / "out2").exists()  # a dry run writes nothing
