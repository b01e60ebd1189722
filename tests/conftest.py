from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest
import torch

from gradsim.config import BUNDLED_DATA, Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here; fail fast instead of retrying
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = BUNDLED_DATA


# The tiny test models' shape (the tiny fixture's Llama; test_projection_models' families add their own keys).
TINY_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def cpu_config(output_dir, sample_size: int, **kw) -> Config:
    """The tests' small study: on the CPU, the first ``sample_size`` originals, results under ``output_dir``."""
    return Config(device="cpu", sample_size=sample_size, output_dir=str(output_dir), **kw)


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M-Instruct), loaded once."""
    from gradsim.config import Config
    from gradsim.core.model import load_model

    return load_model(Config(device="cpu"))


@pytest.fixture(scope="session")
def tiny(embedded):
    """A tiny Llama built from a config, with the embedded model's real tokenizer and chat template,
    tied embeddings and padding_idx on <|im_end|> like SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradsim.core.model import LoadedModel

    torch.manual_seed(0)
    tok = embedded.tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, pad_token_id=tok.pad_token_id, **TINY_SIZES)
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives near-uniform logits and tiny gradients; scale up for a meaningful comparison.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return LoadedModel(model, tok, "tiny-llama", "test", torch.device("cpu"), embedded.chat_template_sha256, 256)


@pytest.fixture(scope="session")
def tiny_model_dir(request, tmp_path_factory) -> Path:
    """The tiny model saved as a model folder (for commands and Slurm tasks that load a --model)."""
    # Looked up here rather than requested: pytest sets up session fixtures before module ones, so a
    # requested `tiny` would load the embedded model even when the module is about to be skipped.
    tiny = request.getfixturevalue("tiny")
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def samples():
    from gradsim.data.load import load_samples

    return load_samples(str(BUNDLED / "original.jsonl"))


def require_live_slurm(mp: pytest.MonkeyPatch) -> None:
    """Skip unless a Slurm controller answers (fail instead under GRADSIM_REQUIRE_SLURM=1, as in CI);
    point SLURM_CONF at start.sh's cluster when it is there."""
    give_up = pytest.fail if os.environ.get("GRADSIM_REQUIRE_SLURM") == "1" else pytest.skip
    if shutil.which("sbatch") is None:
        give_up("sbatch is not on PATH; start the cluster with slurm_scripts/cluster/start.sh")
    # start.sh also installs /etc/slurm/slurm.conf, but not over someone else's file.
    base = Path(os.environ.get("GRADSIM_SLURM_BASE", "/tmp/gradsim-slurm"))
    if "SLURM_CONF" not in os.environ and (base / "conf" / "slurm.conf").is_file():
        mp.setenv("SLURM_CONF", str(base / "conf" / "slurm.conf"))
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    if not conf.is_file():
        # Without one the Slurm clients retry for a minute before giving up.
        give_up(f"no Slurm config at {conf}; run slurm_scripts/cluster/start.sh")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        answer = (ping.stdout + ping.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        answer = repr(exc)
    if "is UP" not in answer:
        give_up(f"Slurm controller is not UP ({answer!r}); run slurm_scripts/cluster/start.sh")


T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout_s: float, what: str | Callable[[], str], every_s: float = 0.5) -> T:
    """Poll probe() until it returns something truthy; fail after timeout_s saying `what` (or what())."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what if isinstance(what, str) else what()}")
        time.sleep(every_s)


def cgroup_tree(tmp, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup holding ``files`` (path under it -> text) and a fake /proc/self/cgroup of one line:
    (root, proc) for memory.cgroup_memory and doctor.cgroup_cpus."""
    proc, root = tmp / "proc_cgroup", tmp / "cg"
    proc.write_text(proc_line + "\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root, proc


def config_only_model(directory: Path, shape: str):
    """A model directory holding only the config of a real model's shape (bench/make_model.py's SHAPES, e.g.
    amd-olmo-1b, llama-7b), no weights: what gradsim reads before it loads any. Returns the config."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from make_model import make_config
    finally:
        sys.path.remove(str(ROOT / "bench"))
    config = make_config(shape)[0]
    config.save_pretrained(directory)
    return config
