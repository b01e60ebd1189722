"""GPU check: exactness, projections, the 1.2B shape end to end, and throughput, on one CUDA device.

    python bench/gpu_check.py [--device cuda] [--budget-s 540]       # < 10 minutes on one GPU
    uv run python bench/gpu_check.py --device cpu --quick            # smoke test without a GPU (tiny model only)

Sections (each guarded: a failure is reported and the rest still runs; sections are skipped once
--budget-s has passed):
  environment        torch, CUDA, cuDNN, GPU name and memory, fp32 matmul precision, fast_jl / traker / transformers
  exactness_tiny     gradsim.gradients.GradientComputer on --device vs plain CPU autograd of HF's own loss, on a
                     tiny Llama built from a config (as tests/conftest.py `tiny`) with the embedded tokenizer
  exactness_embedded the same on the embedded SmolLM2-135M-Instruct, --samples samples
  projections_*      every projection (tensorsketch, countsketch, factorized, trak) on --device vs the same on the
                     CPU: feature cosine and relative error per sample (the sketches are generated on the CPU, so
                     they should agree to rounding; trak's projector depends on the device: CudaProjector with
                     fast_jl, else BasicProjector whose Gaussian matrix comes from a device-specific generator,
                     so there the check is the pairwise cosines against the exact gradients' instead)
  build_1p2b         bench/make_model.py --shape amd-olmo-1b (random init of AMD-OLMo-1B-SFT's shape)
  e2e_1p2b           main.py --model DIR --setting both --sample-size 3 --no-baselines --device DEVICE, timed
  throughput_*       tokens/s and peak device memory per method (exact fp32, exact bf16 autocast, each
                     projection) on the embedded model and on the 1.2B shape; achieved TFLOP/s = 6 P tokens / s
--quick: the tiny model only, 1 sample, no embedded model and no 1.2B model.
Report: $OUT/gpu_check_<UTC time>.json when $OUT is set, else bench/results/; written after every section.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import importlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run without the package installed (a bare GPU node)
    sys.path.append(str(ROOT / "src"))
BUNDLED = ROOT / "data" / "lima_sample"
METHODS = ("exact-fp32", "exact-bf16", "tensorsketch", "countsketch", "factorized", "trak")
PROJECTIONS = ("tensorsketch", "countsketch", "factorized", "trak")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Checker:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = utc()
        self.path = out_dir / f"gpu_check_{stamp.replace(':', '').replace('-', '')}.json"
        self.report = {"utc": stamp, "argv": sys.argv, "args": vars(args), "sections": {}}
        self.cache: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.report["elapsed_s"] = self.elapsed()
        self.path.write_text(json.dumps(self.report, indent=1, default=str))

    def section(self, name: str, fn, *a, skip: str | None = None):
        if skip:
            self.report["sections"][name] = {"status": "skipped", "reason": skip}
            log(f"[{name}] skipped: {skip}")
            self.save()
            return None
        if self.elapsed() > self.args.budget_s:
            self.report["sections"][name] = {"status": "skipped", "reason": f"time budget {self.args.budget_s} s spent"}
            log(f"[{name}] skipped: time budget spent")
            self.save()
            return None
        log(f"[{name}] ...")
        t0 = time.perf_counter()
        try:
            res = fn(*a)
            rec = {"status": "ok", **(res or {})}
        except Exception as e:
            rec = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        rec["seconds"] = time.perf_counter() - t0
        self.report["sections"][name] = rec
        log(f"[{name}] {rec['status']} in {rec['seconds']:.1f} s" + (f": {rec['error']}" if "error" in rec else ""))
        self.save()
        release()
        return rec


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drop_grads(model) -> None:
    """GradientComputer leaves each .grad as a view of its buffer: drop them, or the buffer stays alive."""
    for p in model.parameters():
        p.grad = None


def peak_mem_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_mb(device) -> dict:
    import torch

    if device.type == "cuda":
        return {
            "max_memory_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "max_memory_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---------------------------------------------------------------- sections


def environment(args) -> dict:
    import torch
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "transformers": transformers.__version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        dev = torch.device(args.device if args.device.startswith("cuda") else "cuda")
        props = torch.cuda.get_device_properties(dev)
        out.update(
            gpu_name=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=props.total_memory / 2**30,
            gpu_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            out["nvidia_smi"] = repr(e)
    try:
        importlib.import_module("fast_jl")
        out["fast_jl"] = "importable"
    except Exception as e:
        out["fast_jl"] = f"not importable: {type(e).__name__}: {e}"
    for mod in ("trak", "gradsim"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "importable")
        except Exception as e:
            out[mod] = f"not importable: {type(e).__name__}: {e}"
    try:
        out["git_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    # The fp32 matmul peak of the device, the bound the throughput section's TFLOP/s compare with.
    dev = torch.device(args.device)
    n = 512 if args.quick else 8192 if dev.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    out["fp32_matmul_tflops"] = matmul_tflops(a, b, dev)
    out["fp32_matmul_n"] = n
    if dev.type == "cuda":
        out["bf16_matmul_tflops"] = matmul_tflops(a.bfloat16(), b.bfloat16(), dev)
    return out


def matmul_tflops(a, b, dev) -> float:
    """Best of 5 timed a @ b after one warm-up, in TFLOP/s."""
    import torch

    torch.mm(a, b)
    sync(dev)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e12


def samples(n: int):
    from gradsim.data import load_samples

    return load_samples(str(BUNDLED / "original.jsonl"))[:n]


def embedded_cpu(chk: Checker):
    """The embedded model on the CPU (loaded once)."""
    if "embedded_cpu" not in chk.cache:
        from gradsim.config import Config
        from gradsim.model import load_model

        chk.cache["embedded_cpu"] = load_model(Config(device="cpu"))
    return chk.cache["embedded_cpu"]


def tokenizer_only():
    from transformers import AutoTokenizer

    from gradsim.model import embedded_model_dir

    path, _ = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_cpu(chk: Checker):
    """tests/conftest.py's tiny Llama: built from a config, the embedded tokenizer, tied embeddings, x8 weights."""
    if "tiny_cpu" in chk.cache:
        return chk.cache["tiny_cpu"]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradsim.model import LoadedModel

    tok = tokenizer_only()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    sha = hashlib.sha256(tok.chat_template.encode()).hexdigest()
    lm = LoadedModel(model, tok, "tiny-llama", "gpu-check", torch.device("cpu"), sha, 256)
    chk.cache["tiny_cpu"] = lm
    return lm


def on_device(lm, device):
    """A copy of a loaded model on another device (the CPU original is kept for the reference)."""
    from dataclasses import replace

    if lm.device == device:
        return lm
    return replace(lm, model=copy.deepcopy(lm.model).to(device), device=device)


def reference_gradient(model, enc):
    """Plain CPU autograd of HF's own loss (its shift and -100 masking), flattened in parameter order."""
    import torch

    out = model(input_ids=enc.input_ids[None], labels=enc.labels[None], use_cache=False)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    return torch.cat([g.reshape(-1) for g in grads])


def exactness(chk: Checker, which: str, n: int) -> dict:
    import torch

    from gradsim.encode import encode
    from gradsim.gradients import GradientComputer

    lm_cpu = tiny_cpu(chk) if which == "tiny" else embedded_cpu(chk)
    device = torch.device(chk.args.device)
    lm_dev = on_device(lm_cpu, device)
    gcomp = GradientComputer(lm_dev.model, device, "float32")
    per = []
    tol = 1e-4 if which == "tiny" else 1e-3
    for s in samples(n):
        enc = encode(lm_cpu.tokenizer, s, lm_cpu.context_length)
        ref = reference_gradient(lm_cpu.model, enc)
        got = gcomp.gradient(enc).detach().cpu().clone()
        worst, worst_name = 0.0, None
        for name, lo, hi in gcomp.layout.slices():
            r = ref[lo:hi]
            scale = r.abs().max().item()
            err = (got[lo:hi] - r).abs().max().item() / scale if scale > 0 else (got[lo:hi] - r).abs().max().item()
            if err > worst:
                worst, worst_name = err, name
        per.append(
            {
                "id": s.id,
                "tokens": enc.num_tokens,
                "max_rel_err_per_matrix": worst,
                "worst_matrix": worst_name,
                "rel_err_norm": ((got - ref).norm() / ref.norm()).item(),
                "cosine": torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=0).item(),
            }
        )
        del ref, got
    drop_grads(lm_dev.model)
    del gcomp
    worst = max(p["max_rel_err_per_matrix"] for p in per)
    return {
        "model": which,
        "device": str(device),
        "reference": "CPU autograd of HF's loss (labels)",
        "params": sum(p.numel() for p in lm_cpu.model.parameters()),
        "samples": per,
        "max_rel_err": worst,
        "tolerance": tol,
        "within_tolerance": worst <= tol,
    }


def make_featurizer(kind: str, lm, allocation=None, dim: int | None = None):
    from gradsim.features import ExactFeaturizer
    from gradsim.projection import CountSketchFeaturizer, FactorizedFeaturizer, TensorSketchFeaturizer, TrakFeaturizer

    if kind == "exact-fp32":
        return ExactFeaturizer(lm.model, lm.device, "float32")
    if kind == "exact-bf16":
        return ExactFeaturizer(lm.model, lm.device, "bfloat16")
    if kind == "tensorsketch":
        return TensorSketchFeaturizer(lm.model, lm.device, "float32", dim or 65536, 42, 1, allocation=allocation)
    if kind == "countsketch":
        return CountSketchFeaturizer(lm.model, lm.device, "float32", dim or 65536, 42, 1, allocation=allocation)
    if kind == "factorized":
        return FactorizedFeaturizer(lm.model, lm.device, "float32", dim or 4096, 42, 1)
    if kind == "trak":
        return TrakFeaturizer(lm.model, lm.device, "float32", dim or 4096, 42, 1, memory_bytes=2**30)
    raise ValueError(kind)


def has_fast_jl() -> bool:
    try:
        importlib.import_module("fast_jl")
        return True
    except Exception:
        return False


def default_dim(kind: str, which: str, device) -> int:
    """gradsim's defaults, except: the sketches on the tiny model (~1.6M parameters) get 4,096 dims, and trak
    gets 512 per matrix unless CudaProjector (CUDA + fast_jl) does it: BasicProjector draws grad_dim x proj_dim
    normals per matrix per call, which at 4,096 takes minutes per sample on a CPU."""
    if kind in ("tensorsketch", "countsketch"):
        return 4096 if which == "tiny" else 65536
    if kind == "trak":
        return 4096 if (device.type == "cuda" and has_fast_jl()) else 512
    return 4096


def allocation_for(kind: str, lm, calib, dim: int):
    """One allocation (from exact gradients of the calibration samples, on lm's device) for both sides."""
    if kind not in ("tensorsketch", "countsketch"):
        return None
    from gradsim.projection import make_allocation

    alloc = make_allocation(lm.model, lm.device, "float32", dim, calib, "fft" if kind == "tensorsketch" else "coprime")
    drop_grads(lm.model)
    return alloc


def features_of(f, encs):
    import torch

    return torch.stack([f.features(e).detach().float().cpu().clone() for e in encs])


def whole_cos_matrix(feats, layout):
    """(n, n) whole-model cosines of the rows of feats (fp64)."""
    x = feats.double()
    g = x @ x.T
    d = g.diagonal().sqrt()
    return (g / d[:, None] / d[None, :]).numpy()


def projections(chk: Checker, which: str, n: int) -> dict:
    import numpy as np
    import torch

    from gradsim.encode import encode
    from gradsim.gradients import GradientComputer

    lm_cpu = tiny_cpu(chk) if which == "tiny" else embedded_cpu(chk)
    device = torch.device(chk.args.device)
    lm_dev = on_device(lm_cpu, device)
    encs = [encode(lm_cpu.tokenizer, s, lm_cpu.context_length) for s in samples(n)]
    calib = encs[: max(1, min(2, n))]
    out = {"model": which, "device": str(device), "samples": len(encs), "methods": {}}
    exact_cos = None
    if len(encs) >= 2:
        gcomp = GradientComputer(lm_dev.model, device, "float32")
        exact = torch.stack([gcomp.gradient(e).detach().cpu().clone() for e in encs])
        exact_cos = whole_cos_matrix(exact, gcomp.layout)
        drop_grads(lm_dev.model)
        del gcomp, exact
        out["exact_pairwise_cosine"] = exact_cos[np.triu_indices(len(encs), 1)].tolist()
    for kind in PROJECTIONS:
        rec: dict = {}
        try:
            # The CPU side of trak is always BasicProjector: 512 dims per matrix keeps it to seconds (and is a
            # multiple of 512, so CUDA + fast_jl still uses CudaProjector on the device side).
            dim = 512 if kind == "trak" else default_dim(kind, which, device)
            t0 = time.perf_counter()
            alloc = allocation_for(kind, lm_cpu, calib, dim)
            f_cpu = make_featurizer(kind, lm_cpu, alloc, dim)
            a = features_of(f_cpu, encs)
            t_cpu = time.perf_counter() - t0
            drop_grads(lm_cpu.model)
            del f_cpu
            t0 = time.perf_counter()
            f_dev = make_featurizer(kind, lm_dev, alloc, dim)
            b = features_of(f_dev, encs)
            sync(device)
            t_dev = time.perf_counter() - t0
            if kind == "trak":
                m = next((i for i, p in enumerate(f_dev.projected) if p), None)
                rec["projector_on_device"] = type(f_dev.projector(m)).__name__ if m is not None else "none (all exact)"
            drop_grads(lm_dev.model)
            del f_dev
            cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
            rel = (a - b).norm(dim=1) / a.norm(dim=1)
            rec.update(
                dims=int(a.shape[1]),
                proj_dim=dim,
                seconds_cpu=t_cpu,
                seconds_device=t_dev,
                feature_cosine_min=cos.min().item(),
                feature_rel_err_max=rel.max().item(),
                same_projection_expected=kind != "trak" or device.type == "cpu",
            )
            if exact_cos is not None:
                iu = np.triu_indices(len(encs), 1)
                pc, pd = whole_cos_matrix(a, None)[iu], whole_cos_matrix(b, None)[iu]
                rec.update(
                    pairwise_cosine_cpu=pc.tolist(),
                    pairwise_cosine_device=pd.tolist(),
                    pairwise_abs_err_cpu=float(np.abs(pc - exact_cos[iu]).max()),
                    pairwise_abs_err_device=float(np.abs(pd - exact_cos[iu]).max()),
                )
            if rec["same_projection_expected"]:
                rec["agrees"] = rec["feature_cosine_min"] > 1 - 1e-4
            else:
                rec["agrees"] = "n/a (device-specific projector: compare the pairwise cosines)"
        except Exception as e:
            rec = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        out["methods"][kind] = rec
        release()
    return out


def build_1p2b(chk: Checker) -> dict:
    remaining = max(30.0, chk.args.budget_s - chk.elapsed())
    cmd = [sys.executable, str(ROOT / "bench" / "make_model.py"), "--shape", "amd-olmo-1b"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=remaining, env=child_env())
    if res.returncode != 0:
        raise RuntimeError(f"make_model.py exited {res.returncode}: {res.stderr[-1500:]}")
    lines = res.stdout.strip().splitlines()
    chk.cache["dir_1p2b"] = lines[-1]
    return {"dir": lines[-1], "stdout": lines[-3:], "wall_s": time.perf_counter() - t0}


def child_env() -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if x)
    return env


def e2e_1p2b(chk: Checker) -> dict:
    model_dir = chk.cache.get("dir_1p2b")
    if not model_dir:
        raise RuntimeError("no 1.2B model (build_1p2b failed or was skipped)")
    out_dir = Path(tempfile.mkdtemp(prefix="gradsim-gpu-e2e-"))
    cmd = [
        sys.executable,
        str(ROOT / "main.py"),
        "--model",
        model_dir,
        "--setting",
        "both",
        "--sample-size",
        "3",
        "--no-baselines",
        "--device",
        chk.args.device,
        "--output-dir",
        str(out_dir),
        "-q",
    ]
    remaining = max(60.0, chk.args.budget_s - chk.elapsed())
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=remaining, env=child_env())
    wall = time.perf_counter() - t0
    rec = {
        "command": cmd,
        "rc": res.returncode,
        "wall_s": wall,
        "stdout": res.stdout[-2000:],
        "stderr_tail": res.stderr[-2500:],
        "settings": {},
    }
    for setting in ("paraphrased", "model-generated"):
        d = out_dir / "gradient-similarity" / setting
        try:
            r = json.loads((d / "results.json").read_text())
        except (OSError, ValueError):
            rec["settings"][setting] = {"results": False}
            continue
        metrics = []
        try:
            metrics = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        except (OSError, ValueError):
            pass
        vram = [m.get("vram_alloc_mb") for m in metrics if isinstance(m.get("vram_alloc_mb"), (int, float))]
        rec["settings"][setting] = {
            "results": True,
            "whole_model": (r.get("summary") or {}).get("whole_model"),
            "cost": r.get("cost"),
            "queries": len(r.get("queries") or []),
            "max_vram_alloc_mb": max(vram, default=None),
            "samples": len(metrics),
        }
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    if res.returncode != 0:
        raise RuntimeError(f"main.py exited {res.returncode} after {wall:.0f} s: {res.stderr.strip()[-600:]}")
    return rec


def throughput(chk: Checker, which: str) -> dict:
    import torch

    from gradsim.encode import encode

    device = torch.device(chk.args.device)
    if which == "tiny":
        lm = on_device(tiny_cpu(chk), device)
    else:
        from gradsim.config import Config
        from gradsim.model import load_model

        name = chk.cache.get("dir_1p2b") if which == "1p2b" else None
        if which == "1p2b" and not name:
            raise RuntimeError("no 1.2B model (build_1p2b failed or was skipped)")
        t0 = time.perf_counter()
        lm = load_model(Config(model_name=name, device=str(device)) if name else Config(device=str(device)), device)
        load_s = time.perf_counter() - t0
    n = 1 if chk.args.quick else chk.args.throughput_samples
    max_len = min(chk.args.max_length or lm.context_length, lm.context_length)
    encs = [encode(lm.tokenizer, s, max_len) for s in samples(n + 2)]
    calib, encs = encs[:2], encs[2:] if len(encs) > 2 else encs
    params = sum(p.numel() for p in lm.model.parameters())
    out = {
        "model": which,
        "device": str(device),
        "params": params,
        "samples": len(encs),
        "tokens": sum(e.num_tokens for e in encs),
        "max_length": max_len,
        "methods": {},
    }
    if which != "tiny":
        out["load_seconds"] = load_s
    ref = None
    for kind in METHODS:
        if chk.elapsed() > chk.args.budget_s:
            out["methods"][kind] = {"skipped": "time budget spent"}
            continue
        rec: dict = {}
        try:
            dim = default_dim(kind, which, device)
            t0 = time.perf_counter()
            alloc = allocation_for(kind, lm, calib, dim)
            f = make_featurizer(kind, lm, alloc, dim)
            sync(device)
            rec["setup_seconds"] = time.perf_counter() - t0  # incl. calibration (exact backwards) for the sketches
            if kind == "trak":
                m = next((i for i, p in enumerate(f.projected) if p), None)
                rec["projector"] = type(f.projector(m)).__name__ if m is not None else "none (all exact)"
            t0 = time.perf_counter()
            first = f.features(encs[0])
            sync(device)
            warm = time.perf_counter() - t0
            rec["first_sample_seconds"] = warm
            if kind == "exact-fp32":
                ref = first.detach().clone()
            elif kind == "exact-bf16" and ref is not None:
                rec["cosine_vs_fp32"] = torch.nn.functional.cosine_similarity(
                    first.detach().double(), ref.double(), dim=0
                ).item()
                ref = None
            del first
            m = len(encs) if warm <= 0 else max(1, min(len(encs), int(chk.args.method_cap_s / warm)))
            peak_mem_reset(device)
            t0 = time.perf_counter()
            for e in encs[:m]:
                f.features(e)
            sync(device)
            dt = time.perf_counter() - t0
            tokens = sum(e.num_tokens for e in encs[:m])
            rec.update(
                samples=m,
                tokens=tokens,
                seconds=dt,
                tokens_per_s=tokens / dt,
                samples_per_s=m / dt,
                achieved_tflops_6pt=6 * params * tokens / dt / 1e12,
                dims=int(f.layout.total),
                backward_passes=getattr(f, "backward_passes", None),
                **peak_mem_mb(device),
            )
            drop_grads(lm.model)
            del f
        except Exception as e:
            rec = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            drop_grads(lm.model)
        out["methods"][kind] = rec
        release()
        ref = ref if kind == "exact-fp32" else None
    del lm
    return out


# ---------------------------------------------------------------- summary


def summary(report: dict) -> str:
    lines = [f"gpu_check {report['utc']} ({report['elapsed_s']:.0f} s)"]
    for name, s in report["sections"].items():
        head = f"- {name}: {s['status']}" + (f" ({s['seconds']:.1f} s)" if "seconds" in s else "")
        if s["status"] == "skipped":
            lines.append(f"{head}: {s['reason']}")
            continue
        if s["status"] == "error":
            lines.append(f"{head}: {s['error'][:300]}")
            continue
        if name == "environment":
            lines.append(
                f"{head}: torch {s['torch']} (CUDA {s['torch_cuda']}), GPU {s.get('gpu_name', 'none')}, "
                f"fast_jl {s['fast_jl'].split(':')[0]}, fp32 matmul {s['fp32_matmul_tflops']:.2f} TFLOP/s"
                + (f", bf16 {s['bf16_matmul_tflops']:.1f}" if "bf16_matmul_tflops" in s else "")
                + f", matmul precision {s['float32_matmul_precision']}"
            )
        elif name.startswith("exactness"):
            lines.append(
                f"{head}: max rel error {s['max_rel_err']:.2e} over {len(s['samples'])} sample(s) "
                f"(tolerance {s['tolerance']:.0e}: {'ok' if s['within_tolerance'] else 'EXCEEDED'}); "
                f"min cosine {min(x['cosine'] for x in s['samples']):.9f}"
            )
        elif name.startswith("projections"):
            parts = []
            for k, r in s["methods"].items():
                if "error" in r:
                    parts.append(f"{k} ERROR {r['error'][:120]}")
                    continue
                p = f"{k} cos {r['feature_cosine_min']:.6f} relerr {r['feature_rel_err_max']:.1e}"
                if "pairwise_abs_err_device" in r:
                    p += (
                        f" pairwise-vs-exact cpu {r['pairwise_abs_err_cpu']:.3f} dev {r['pairwise_abs_err_device']:.3f}"
                    )
                if "projector_on_device" in r:
                    p += f" [{r['projector_on_device']}]"
                parts.append(p)
            lines.append(f"{head}: " + "; ".join(parts))
        elif name == "build_1p2b":
            lines.append(f"{head}: {s['dir']} ({'; '.join(s['stdout'][:-1])})")
        elif name == "e2e_1p2b":
            per = "; ".join(
                f"{k}: top-1 {(v.get('whole_model') or {}).get('top1')}, cost {v.get('cost')}"
                for k, v in s["settings"].items()
            )
            lines.append(f"{head}: rc {s['rc']}, wall {s['wall_s']:.0f} s; {per}")
        elif name.startswith("throughput"):
            lines.append(f"{head}: {s['params']:,} params, {s['samples']} samples, {s['tokens']} tokens")
            lines.append("  | method | tokens/s | TFLOP/s (6PT) | peak mem MB | setup s | notes |")
            lines.append("  |---|---|---|---|---|---|")
            for k, r in s["methods"].items():
                if "tokens_per_s" not in r:
                    lines.append(f"  | {k} | | | | | {r.get('error', r.get('skipped', ''))[:120]} |")
                    continue
                mem = r.get("max_memory_allocated_mb", r.get("peak_rss_mb"))
                note = f"cos vs fp32 {r['cosine_vs_fp32']:.5f}; " if "cosine_vs_fp32" in r else ""
                note += f"{r['dims']:,} dims" + (f", {r['projector']}" if "projector" in r else "")
                lines.append(
                    f"  | {k} | {r['tokens_per_s']:.0f} | {r['achieved_tflops_6pt']:.3f} | {mem:.0f} | "
                    f"{r['setup_seconds']:.1f} | {note} |"
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--quick", action="store_true", help="tiny model only, 1 sample, no embedded or 1.2B model")
    p.add_argument("--samples", type=int, default=2, help="samples for the exactness and projection checks")
    p.add_argument("--throughput-samples", type=int, default=6, help="timed samples per method")
    p.add_argument("--max-length", type=int, help="truncate throughput samples (default: the model's context)")
    p.add_argument("--method-cap-s", type=float, default=30.0, help="time a method on fewer samples past this")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip the remaining sections after this many seconds")
    p.add_argument("--skip-1p2b", action="store_true", help="skip building and running the 1.2B shape")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chk = Checker(args)
    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log("warning: CUDA asked for but not available; every device section will fail (use --device cpu)")
    n = 1 if args.quick else args.samples
    quick = "--quick" if args.quick else None
    skip_big = quick or ("--skip-1p2b" if args.skip_1p2b else None)
    chk.section("environment", environment, args)
    chk.section("exactness_tiny", exactness, chk, "tiny", n)
    chk.section("exactness_embedded", exactness, chk, "embedded", n, skip=quick)
    chk.section("projections_tiny", projections, chk, "tiny", n)
    chk.section("projections_embedded", projections, chk, "embedded", n, skip=quick)
    chk.cache.pop("embedded_cpu", None)
    release()
    chk.section("throughput_tiny", throughput, chk, "tiny", skip=None if args.quick else "only with --quick")
    chk.section("throughput_embedded", throughput, chk, "embedded", skip=quick)
    chk.section("build_1p2b", build_1p2b, chk, skip=skip_big)
    chk.section("e2e_1p2b", e2e_1p2b, chk, skip=skip_big)
    chk.section("throughput_1p2b", throughput, chk, "1p2b", skip=skip_big)
    chk.save()
    print(summary(chk.report))
    print(f"report: {chk.path}")
    failed = [k for k, s in chk.report["sections"].items() if s["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
