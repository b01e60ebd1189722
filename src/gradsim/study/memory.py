"""Memory of the exact path: what a model needs, how many gradients the budget holds, and refusing
early (from the model's config alone, before its weights are loaded) what cannot fit.

Exact mode needs, for P parameters, T tokens, L layers, hidden size h and vocabulary V:
    weights         P x w            (w = 4 bytes; 2 with --dtype bfloat16-weights)
    gradient buffer P x w            (every parameter's .grad is a view into it)
    held gradients  k x P x w        (k = the budget's capacity: a query block, or every needed original;
                                     dots are taken in fp32, a bf16 matrix widened at a time)
    activations     T x (17 L h a + 12 V)   (a = 4 bytes, 2 under bf16: the usual 34 h bytes per layer and
                                     token of 16-bit training, scaled to a, plus fp32 logits and their gradient)
The check before loading assumes T = --max-length, or 2,048 tokens when it is not given (LIMA's longest
samples; the run then measures the real longest sample).

A GPU task's host memory (what its Slurm --mem must cover, host_bytes):
    weights load    P x w            (from_pretrained builds the model on the host before it moves)
    runtime         3 GB on CUDA     (torch, the CUDA libraries and context; 1.5 GB on the CPU), assumed
    data            0.5 GB + results (tokenizer, samples, BM25; the results' Q x C x M float64 arrays x 3)
    kept originals  --host-memory-gb (originals' gradients kept on the host between blocks), plus one
                    pinned P x w buffer to move them when it is set
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from gradsim.config import EMBEDDED_MODEL, Config, env_setting
from gradsim.credentials import hf_token
from gradsim.errors import GradsimError

log = logging.getLogger("gradsim")

GB = 2**30


def budget_gb(cfg: Config, name: str, default: Optional[float]) -> Optional[float]:
    """The budget in GB of Config field ``name`` (memory_gb, ...): the flag, else its environment variable where
    the run runs (GRADSIM_MEMORY_GB, ...), else ``default``."""
    value = getattr(cfg, name)
    if value is not None:
        return float(value)
    from_env = env_setting(name)
    return default if from_env is None else float(from_env)


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    vocab: int
    context: int

    def activation_bytes(self, tokens: int, dtype: str) -> int:
        a = 2 if dtype.startswith("bfloat16") else 4
        return int(tokens * (17 * self.layers * self.hidden * a + 12 * self.vocab))

    def exact_bytes(self, tokens: int, dtype: str, held: int) -> dict[str, int]:
        w = 2 if dtype == "bfloat16-weights" else 4
        parts = {
            "weights": self.params * w,
            "gradient_buffer": self.params * w,
            "held": held * self.params * w,
            "activations": self.activation_bytes(tokens, dtype),
        }
        parts["total"] = sum(parts.values())
        return parts


RUNTIME_GB = {"cuda": 3.0, "cpu": 1.5}
DATA_GB = 0.5


def host_bytes(shape: ModelShape, dtype: str, device_type: str, host_cache_gb: float = 0.0, results: int = 0) -> dict:
    """Host memory of a task whose model runs on ``device_type`` (module docstring): weights load, runtime,
    data and results, originals kept on the host and their pinned buffer."""
    w = 2 if dtype == "bfloat16-weights" else 4
    parts = {
        "weights_load": shape.params * w,
        "runtime": int(RUNTIME_GB[device_type] * GB),
        "data": int(DATA_GB * GB) + results,
        "kept_originals": int(host_cache_gb * GB) + (shape.params * w if host_cache_gb > 0 else 0),
    }
    parts["total"] = sum(parts.values())
    return parts


def device_need_bytes(shape: ModelShape, tokens: int, cfg: Config) -> int:
    """What cfg's run needs on its device at least: the exact path with one held gradient; a projection
    the weights, the activations and (countsketch, trak: from the exact gradient) the gradient buffer."""
    if not cfg.use_random_projection:
        return shape.exact_bytes(tokens, cfg.dtype, held=1)["total"]
    parts = shape.exact_bytes(tokens, cfg.dtype, held=0)
    if cfg.projection in ("tensorsketch", "factorized"):
        return parts["total"] - parts["gradient_buffer"]
    return parts["total"]


def budget_capacity(budget_bytes: float, grad_bytes: int) -> int:
    """Exact gradients a budget of ``budget_bytes`` holds."""
    return int(max(0, budget_bytes) // grad_bytes)


def shape_of_config(config) -> ModelShape:
    """Parameter count and sizes from a transformers config, on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied parameter counts once
    text = getattr(config, "text_config", None) or config
    return ModelShape(
        params,
        int(getattr(text, "num_hidden_layers", 0) or 0),
        int(getattr(text, "hidden_size", 0) or 0),
        int(getattr(text, "vocab_size", 0) or 0),
        int(getattr(text, "max_position_embeddings", 0) or 0),
    )


def model_shape(cfg: Config) -> Optional[ModelShape]:
    """The shape of cfg's model from its config file, or None where the config cannot be read here
    (load_model then reports why)."""
    from transformers import AutoConfig

    if cfg.model_name == EMBEDDED_MODEL:
        from gradsim.core.model import embedded_model_dir

        source, kwargs = str(embedded_model_dir()[0]), {}
    else:
        source = cfg.model_name
        from gradsim.core.model import model_source_kwargs

        kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "token": hf_token()}
        kwargs.update(model_source_kwargs(source, cfg.revision))  # a missing path or no hub: fails here, at once
    try:
        return shape_of_config(AutoConfig.from_pretrained(source, **kwargs))
    except Exception as e:  # unknown id, no network, remote code not trusted: load_model says which
        log.debug("no shape for %s: %s", cfg.model_name, e)
        return None


def cgroup_memory(
    root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")
) -> Optional[tuple[int, int]]:
    """(limit, usage) bytes of the tightest memory limit over this process's cgroup and its ancestors (a Slurm
    job's --mem, a container's limit), cgroup v2 or v1; None where no limit is set or none can be read."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    best: Optional[tuple[int, int]] = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: 0::/path
            bases, limit_file, usage_file = [root, root / "unified"], "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            bases, limit_file, usage_file = [root / "memory"], "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for base in bases:
            d = base / path.lstrip("/")
            while True:
                try:
                    raw = (d / limit_file).read_text().strip()
                    usage = int((d / usage_file).read_text().strip())
                except (OSError, ValueError):
                    raw = None
                if raw and raw != "max" and int(raw) < 2**60:  # v1 writes "no limit" as a huge number
                    limit = int(raw)
                    if best is None or limit - usage < best[0] - best[1]:
                        best = (limit, usage)
                if d == base or d.parent == d:
                    break
                d = d.parent
    return best


def device_bytes(device: torch.device) -> tuple[int, int]:
    """(total, free now) bytes of the device's memory: host RAM for the CPU, within this process's cgroup
    limit where one is set (a Slurm job, a container)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    import psutil

    vm = psutil.virtual_memory()
    total, free = int(vm.total), int(vm.available)
    limited = cgroup_memory()
    if limited is not None:
        total, free = min(total, limited[0]), min(free, max(0, limited[0] - limited[1]))
    return total, free


# The CPU default holds at most this much of exact gradients (or two gradients, where two are larger): the
# default study then peaks under 6 GB, so a second run or a notebook fits beside it; holding more saves few
# passes (gradient_capacity, then run's fewest_held).
CPU_DEFAULT_HELD_GB = 3.0


def check_exact_fits(cfg: Config, device: torch.device) -> None:
    """Refuse, before loading weights, a run whose model cannot fit the device or whose budget holds
    no gradient, naming the numbers and the flag to change."""
    from gradsim.core.model import check_dtype

    check_dtype(cfg.dtype, device)
    shape = model_shape(cfg)
    if shape is None:
        return
    grad = shape.params * (2 if cfg.dtype == "bfloat16-weights" else 4)
    budget = budget_gb(cfg, "memory_gb", None)
    if budget is not None and budget * GB < grad:
        raise GradsimError(
            f"--memory-gb {budget:g} holds no exact gradient of {cfg.model_name} "
            f"({shape.params / 1e9:.2f}B parameters: {grad / GB:.2f} GB each): set --memory-gb "
            f"(GRADSIM_MEMORY_GB) to at least {grad / GB:.2f}, or use --use-random-projection"
        )
    tokens = min(cfg.max_length or 2048, shape.context or 2048)
    need = shape.exact_bytes(tokens, cfg.dtype, held=1)
    total, _free = device_bytes(device)
    if need["total"] > total:
        hint = (
            "--dtype bfloat16-weights, " if cfg.dtype != "bfloat16-weights" else ""
        ) + "--use-random-projection, a shorter --max-length or a larger device"
        raise GradsimError(
            f"exact gradients of {cfg.model_name} ({shape.params / 1e9:.2f}B parameters) need "
            f"{need['total'] / GB:.1f} GB on {device} (weights, gradient buffer, one held gradient, "
            f"activations of {tokens} tokens); it has {total / GB:.1f} GB: use {hint}"
        )


def gradient_capacity(
    cfg: Config, grad_bytes: int, device: torch.device, tokens: int = 0, shape: Optional[ModelShape] = None
) -> int:
    """How many exact gradients the budget holds: --memory-gb, else 90% of the free GPU memory on CUDA, or on
    the CPU 75% of the free host memory (within the cgroup's limit) up to CPU_DEFAULT_HELD_GB or two gradients,
    after the model, its gradient buffer and its activations."""
    budget = budget_gb(cfg, "memory_gb", None)
    if budget is None:
        _total, free = device_bytes(device)
        act = shape.activation_bytes(tokens, cfg.dtype) if shape is not None else 0
        # The host keeps a quarter for the page cache, the tokenizer, baselines and other processes.
        budget_bytes = int(max(0, free - act) * (0.9 if device.type == "cuda" else 0.75))
        if device.type != "cuda":
            budget_bytes = min(budget_bytes, max(int(CPU_DEFAULT_HELD_GB * GB), 2 * grad_bytes))
    else:
        budget_bytes = int(budget * GB)
    capacity = budget_capacity(budget_bytes, grad_bytes)
    if capacity < 1:
        raise GradsimError(
            f"the memory budget ({budget_bytes / GB:.2f} GB) holds no exact gradient of "
            f"{grad_bytes / GB:.2f} GB: set --memory-gb (GRADSIM_MEMORY_GB) to at least "
            f"{grad_bytes / GB:.2f}, or use --use-random-projection"
        )
    return int(capacity)


# Real shapes, for the table in the README (gradsim memory); parameter counts from bench/make_model.py --meta.
KNOWN_SHAPES = {
    "SmolLM2-135M (embedded)": ModelShape(134_515_008, 30, 576, 49152, 8192),
    "AMD-OLMo-1B-SFT (1.2B)": ModelShape(1_176_764_416, 16, 2048, 50304, 2048),
    "Llama-2-7B shape": ModelShape(6_738_415_616, 32, 4096, 32000, 4096),
}


def memory_table(tokens: int = 2048) -> str:
    """Markdown: GB needed on the device per model and mode, with one held gradient (the minimum) and
    the gradient size that each further held gradient adds."""
    rows = [
        "| model | params | exact fp32 | exact bf16 autocast | exact bf16 weights | + per held gradient (fp32 / bf16) |",
        "|---|---|---|---|---|---|",
    ]
    for name, shape in KNOWN_SHAPES.items():
        cells = [
            f"{shape.exact_bytes(tokens, d, held=1)['total'] / GB:.1f}"
            for d in ("float32", "bfloat16", "bfloat16-weights")
        ]
        rows.append(
            f"| {name} | {shape.params / 1e9:.2f}B | {' | '.join(cells)} | {shape.params * 4 / GB:.2f} / {shape.params * 2 / GB:.2f} |"
        )
    return "\n".join(rows)


# The full study, for the time table: LIMA's 988 single-turn ids in both settings, 1-of-5 BM25 candidates, the
# mean length with the embedded tokenizer, and 3.5 passes per query (blocks of an id's two queries, no store;
# docs/benchmarks.md). A run's own schedule and lengths are what `gradsim submit --dry-run` estimates.
STUDY_QUERIES, STUDY_MEAN_TOKENS, STUDY_PASSES_PER_QUERY = 2 * 988, 651, 3.5


def time_table() -> str:
    """Markdown: estimated time of the full study per model, device and precision (estimate.throughput)."""
    from gradsim.study.estimate import STARTUP_S, Estimate, format_duration, throughput

    devices = [
        ("CPU, 16 cores", "cpu", "float32", None),
        ("A100 fp32", "cuda", "float32", "a100:1"),
        ("A100 TF32", "cuda", "tf32", "a100:1"),
        ("H100 fp32", "cuda", "float32", "h100:1"),
        ("H100 TF32", "cuda", "tf32", "h100:1"),
        ("H100 bf16", "cuda", "bfloat16", "h100:1"),
    ]
    rows = ["| model | " + " | ".join(d[0] for d in devices) + " |", "|---|" + "---|" * len(devices)]
    passes = int(STUDY_QUERIES * STUDY_PASSES_PER_QUERY)
    for name, shape in KNOWN_SHAPES.items():
        cells = []
        for _, device, dtype, gpus in devices:
            tp = throughput(device, dtype, gpus, 16)
            est = Estimate("study", passes=passes, tokens=passes * STUDY_MEAN_TOKENS, params=shape.params)
            est.tflops, est.startup_s = tp.tflops, STARTUP_S
            cells.append(format_duration(est.seconds))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
