"""GPU check: exactness, projections, determinism, the 1.2B shape end to end, throughput and memory, on one device.

On a bare GPU machine (torch, transformers and numpy installed; no gradsim, no network), from a bundle that
bench/gpu_bundle.sh packs here (<= 48 MiB: gradsim's wheel, the small wheels it imports, the embedded
tokenizer, the sample data; models are built from configs with random weights, so no weights travel):

    bash bench/gpu_bundle.sh .gpu_bundle                                    # here, with the project env
    python3 bench/gpu_check.py --bundle .gpu_bundle --device cuda           # there: < 8 minutes on an H100/H200

With the device tool of this workplace (15 minutes of device time in all, the machine's start included),
pack the bundle here from the tree you mean to check (.gpu_bundle/ is git-ignored, so it must be carried;
the report warns when src/gradsim has changed since), then one call:
    run(command="PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --bundle .gpu_bundle --device cuda",
        carry=[".gpu_bundle"], timeout_s=560)
and give_back; commit the JSON report it writes under $OUT (it comes back under the reply's files_at).

    uv run python bench/gpu_check.py --device cpu --quick                   # the same code path, tiny model, 1-2 min
    python bench/gpu_check.py --bundle DIR --device cpu --quick             # ... from a bundle, in a bare venv

--bundle DIR: the wheels in DIR/wheels that fit this interpreter are unpacked into a temporary folder that
goes on sys.path AFTER the site-packages (the machine's torch, transformers, numpy, tqdm are never
replaced); the tokenizer and the sample data come from DIR. Subprocesses (make_model.py, main.py) start
through the same path setup. Without --bundle, gradsim is imported from the environment (or src/).

Sections (each guarded: a failure is reported and the rest still runs; a section is skipped once --budget-s
has passed; the JSON report is written after every section):
  environment          torch, CUDA, GPU, driver, matmul TFLOP/s measured, the card's dense peaks, bundle contents
  exactness_tiny       per-sample gradients (gradsim.core.gradients.GradientComputer) on --device for float32, tf32
                       (CUDA only: fp32 storage, TF32 matmuls), bfloat16 (autocast) and bfloat16-weights, against
                       a CPU float64 reference (the same model cast to float64, plain autograd of the shifted
                       cross-entropy over the response tokens: HF's loss, computed in float64); relative L2 error,
                       worst per-matrix max error, cosine; and determinism: two passes, sha256 of the bytes
  projections_tiny     tensorsketch, countsketch, factorized on --device against the same on the CPU (same seeds,
                       same allocation); trak on --device against its own projector applied to the CPU float64
                       gradients (its CPU BasicProjector is far too slow at scale and draws device-specific
                       matrices); determinism: two fresh featurizers, sha256 of the features
  build_model          bench/make_model.py --shape amd-olmo-1b (random init of AMD-OLMo-1B-SFT, 1.18B), tiny
                       with --quick
  e2e                  main.py --model DIR --setting both --sample-size 32 --max-length 256 --no-baselines (64
                       queries through the streamed exact path), timed; peak device memory (max_memory_allocated)
                       against memory.py's prediction (ModelShape.exact_bytes with the run's held gradients)
  throughput           on the built model, for fp32, tf32 (CUDA) and bf16 autocast: exact and each projection,
                       tokens/s, TFLOP/s by gradsim's count 6 P T per pass and % of the card's dense peak for
                       that precision; exact: peak device memory against ModelShape.exact_bytes (held 0)
  exactness_135m,      the same as the tiny ones on the SmolLM2-135M shape (random init), when time is left
  projections_135m
--quick: the tiny model everywhere, 2 samples of at most 128 tokens, sample size 6 end to end (12 queries), 1 timed
sample per method (70 s to 2 minutes on 2 shared CPU cores). --shape: another bench/make_model.py shape for
build_model, e2e and throughput.
Report: $OUT/gpu_check_<UTC time>.json when $OUT is set, else bench/results/. Exit 1 when a section failed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ("tensorsketch", "countsketch", "factorized", "trak")
# Headline tolerance of each precision's relative L2 error of a per-sample gradient (informational: the numbers
# are the result; the fp32 one is what gradsim promises).
TOLERANCE = {"float32": 1e-4, "tf32": 2e-2, "bfloat16": 1e-1, "bfloat16-weights": 2e-1}
# Started in a subprocess (make_model.py, main.py): the same sys.path setup as this process, then the script;
# at exit the peak device memory goes to $GPU_CHECK_PEAK_FILE.
BOOT = """import atexit, json, os, runpy, sys
sys.path.append(sys.argv[1])
def _peak():
    f = os.environ.get("GPU_CHECK_PEAK_FILE")
    torch = sys.modules.get("torch")
    if f and torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        with open(f, "w") as fh:
            json.dump({"max_memory_allocated": torch.cuda.max_memory_allocated(),
                       "max_memory_reserved": torch.cuda.max_memory_reserved()}, fh)
atexit.register(_peak)
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- the bundle


def wheel_fits(filename: str) -> bool:
    """Whether a wheel's tags fit this interpreter (packaging's rule where it is installed, as with
    transformers; else: pure, or this CPython on Linux x86_64 / abi3)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename

        _, _, _, tags = parse_wheel_filename(filename)
        return not tags.isdisjoint(set(sys_tags()))
    except ImportError:
        pass
    parts = filename[:-4].split("-")
    py, abi, plat = parts[-3].split("."), parts[-2].split("."), parts[-1].split(".")
    if "any" in plat:
        return any(p.startswith("py3") for p in py)
    if platform.system() != "Linux" or not any(platform.machine() in p for p in plat):
        return False
    cp = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    if cp in abi:
        return cp in py
    return "abi3" in abi and any(p.startswith("cp3") and int(p[3:]) <= sys.version_info[1] for p in py)


def use_bundle(bundle: Path) -> dict:
    """Unpack DIR/wheels' wheels that fit this interpreter into a temporary folder and append it to sys.path."""
    from importlib.metadata import PackageNotFoundError, version

    wheels = sorted((bundle / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"--bundle {bundle}: no wheels in {bundle / 'wheels'}: pack it with bench/gpu_bundle.sh")
    site = Path(tempfile.mkdtemp(prefix="gradsim-bundle-site-"))
    used, unused = [], []
    for w in wheels:
        if not wheel_fits(w.name):
            unused.append(w.name)
            continue
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
        for data in site.glob("*.data"):  # a wheel's purelib/platlib go beside the others
            for sub in ("purelib", "platlib"):
                if (data / sub).is_dir():
                    shutil.copytree(data / sub, site, dirs_exist_ok=True)
            shutil.rmtree(data)
        used.append(w.name)
    sys.path.append(str(site))
    system = {}
    for name in ("torch", "transformers", "numpy", "safetensors", "tokenizers", "tqdm", "packaging"):
        try:
            system[name] = version(name)
        except PackageNotFoundError:
            system[name] = None
    manifest = {}
    try:
        manifest = json.loads((bundle / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        pass
    return {
        "dir": str(bundle),
        "site": str(site),
        "wheels_used": used,
        "wheels_not_for_this_python": unused,
        "before_bundle_on_sys_path": system,
        "manifest": {k: manifest.get(k) for k in ("created_utc", "git_commit", "bytes", "pins")},
    }


def stale_files(site: Path) -> list[str]:
    """The modules of src/gradsim that differ from (or are missing in) the bundle's wheel: a bundle packed
    before the last edit checks the older code."""
    src = ROOT / "src" / "gradsim"
    if not src.is_dir():
        return []
    return sorted(
        f.name
        for f in src.glob("*.py")
        if not (site / "gradsim" / f.name).is_file() or (site / "gradsim" / f.name).read_bytes() != f.read_bytes()
    )


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
        self.work = Path(tempfile.mkdtemp(prefix="gradsim-gpu-check-"))
        self.max_length = min(args.max_length, 128) if args.quick else args.max_length
        self.shape = args.shape or ("tiny" if args.quick else "amd-olmo-1b")
        bundle = Path(args.bundle) if args.bundle else None
        if bundle is not None:
            self.report["bundle"] = use_bundle(bundle)
            self.report["bundle"]["stale_files"] = stale_files(Path(self.report["bundle"]["site"]))
            if self.report["bundle"]["stale_files"]:
                log(f"warning: the bundle's gradsim differs from src/ in {self.report['bundle']['stale_files']}")
            self.site = self.report["bundle"]["site"]
            self.tokenizer_dir = bundle / "tokenizer"
            self.data_dir = bundle / "data" / "lima_sample"
        else:
            self.site = str(ROOT / "src")
            if self.site not in sys.path:  # run without the package installed
                sys.path.append(self.site)
            self.tokenizer_dir = None
            self.data_dir = ROOT / "src" / "gradsim" / "bundled" / "lima_sample"

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

    def run_script(self, script: Path, args: list[str], peak_file: Path | None = None) -> subprocess.CompletedProcess:
        """Run a script of this repository in a subprocess with this process's sys.path setup."""
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        if peak_file is not None:
            env["GPU_CHECK_PEAK_FILE"] = str(peak_file)
        remaining = max(60.0, self.args.budget_s - self.elapsed() + 120)
        cmd = [sys.executable, "-c", BOOT, self.site, str(script), *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=remaining, env=env)


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
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem(device) -> dict:
    import torch

    if device.type == "cuda":
        sync(device)
        return {
            "max_memory_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "max_memory_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def sha256_of(t) -> str:
    """sha256 of a tensor's bytes (any dtype), on the host."""
    import torch

    flat = t.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def gradsim_dtype(precision: str) -> str:
    """gradsim's --dtype for a precision: tf32 is float32 with TF32 matmuls (tf32_mode) until gradsim has it."""
    from gradsim.config import DTYPES

    if precision == "tf32":
        return "tf32" if "tf32" in DTYPES else "float32"
    return precision


@contextmanager
def tf32_mode(on: bool):
    """TF32 matmuls and convolutions on CUDA while on (gradsim's --dtype tf32 sets the same), and off
    otherwise, so that fp32 is fp32 whatever the process's defaults."""
    import torch

    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def card_peaks(name: str) -> dict | None:
    """The device's dense peaks (gradsim.study.estimate.card_peaks: one table for the check and the estimates)."""
    from gradsim.study.estimate import card_peaks as peaks

    return peaks(name)


# ---------------------------------------------------------------- sections


def environment(chk: Checker) -> dict:
    import torch
    import transformers

    import gradsim

    args = chk.args
    out = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "transformers": transformers.__version__,
        "gradsim_file": gradsim.__file__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for mod in ("trak", "fast_jl"):
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
    dev = torch.device(args.device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        out.update(
            gpu_name=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=total / 2**30,
            gpu_free_gib=free / 2**30,
            gpu_count=torch.cuda.device_count(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            peaks_tflops=card_peaks(props.name),
        )
        try:
            from gradsim.core.doctor import nvidia_smi

            smi = nvidia_smi("name,driver_version,memory.total,clocks.max.sm", timeout=20)
            out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (ImportError, OSError, subprocess.SubprocessError) as e:  # ImportError: a bundle older than src
            out["nvidia_smi"] = repr(e)
    # Measured matmul rates: what the throughput's % compare with where the card has no data-sheet peak.
    n = 8192 if dev.type == "cuda" else 512 if args.quick else 1024
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    out["matmul_n"] = n
    with tf32_mode(False):
        out["matmul_tflops"] = {"fp32": matmul_tflops(a, b, dev)}
    if dev.type == "cuda":
        with tf32_mode(True):
            out["matmul_tflops"]["tf32"] = matmul_tflops(a, b, dev)
    out["matmul_tflops"]["bf16"] = matmul_tflops(a.bfloat16(), b.bfloat16(), dev)
    chk.cache["peaks"] = out.get("peaks_tflops")
    chk.cache["matmul"] = out["matmul_tflops"]
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


def make_model_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import make_model
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return make_model


def tokenizer(chk: Checker):
    if "tokenizer" not in chk.cache:
        tok, revision = make_model_module().load_tokenizer(chk.tokenizer_dir)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        chk.cache["tokenizer"] = (tok, revision)
    return chk.cache["tokenizer"]


def samples(chk: Checker, n: int):
    from gradsim.data.load import load_samples

    return load_samples(str(chk.data_dir / "original.jsonl"))[:n]


def cpu_model(chk: Checker, which: str):
    """A model on the CPU built from a config (seeded random init) with the embedded tokenizer: tiny (as
    tests/conftest.py's, weights x8 so the logits are not uniform) or the SmolLM2-135M shape."""
    key = f"cpu_{which}"
    if key in chk.cache:
        return chk.cache[key]
    import torch
    import transformers

    from gradsim.core.model import LoadedModel

    mm = make_model_module()
    tok, revision = tokenizer(chk)
    shape = {"tiny": "tiny", "135m": "smollm2-135m"}[which]
    cfg, _ = mm.make_config(shape, tok)
    torch.manual_seed(0)
    model = getattr(transformers, mm.SHAPES[shape][0])(cfg).to(torch.float32).eval()
    if which == "tiny":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(8.0)
    sha = hashlib.sha256(tok.chat_template.encode()).hexdigest()
    lm = LoadedModel(model, tok, f"{shape}-random", revision, torch.device("cpu"), sha, cfg.max_position_embeddings)
    chk.cache[key] = lm
    return lm


def encodings(chk: Checker, lm, n: int):
    """The first n samples that keep a trained token within the max length."""
    from gradsim.data.encode import encode
    from gradsim.errors import GradsimError

    max_len = min(lm.context_length, chk.max_length)
    out = []
    for s in samples(chk, None):
        try:
            out.append(encode(lm.tokenizer, s, max_len))
        except GradsimError:  # a prompt longer than max_len
            continue
        if len(out) == n:
            break
    return out


def reference_gradients(chk: Checker, which: str, encs) -> list:
    """CPU float64 gradients of each sample's loss, flattened in parameter order (kept for the projections).
    HF's loss upcasts logits to fp32, so it is computed here in float64 the same way: logits at t predict the
    token at t+1, labels -100 ignored, mean over the trained tokens."""
    key = f"ref64_{which}"
    if key in chk.cache:
        return chk.cache[key]
    import torch
    import torch.nn.functional as F

    model = copy.deepcopy(cpu_model(chk, which).model).double()
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    refs = []
    for enc in encs:
        logits = model(input_ids=enc.input_ids[None], use_cache=False).logits
        loss = F.cross_entropy(logits[0, :-1], enc.labels[1:], ignore_index=-100)
        grads = torch.autograd.grad(loss, params)
        refs.append(torch.cat([g.reshape(-1) for g in grads]))
    del model, params
    chk.cache[key] = refs
    return refs


def device_copy(lm, device, precision: str):
    """A copy of a CPU model on the device, its parameters in bf16 for bfloat16-weights (as load_model does)."""
    from dataclasses import replace

    import torch

    model = copy.deepcopy(lm.model)
    if precision == "bfloat16-weights":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    return replace(lm, model=model.to(device), device=device)


def compare(got, ref, layout) -> dict:
    """got (any dtype) against the float64 reference: relative L2 error, worst per-matrix max error (max |diff|
    over the matrix's max |ref|), cosine."""
    import torch

    got = got.detach().double().cpu()
    worst, worst_name = 0.0, None
    for name, lo, hi in layout.slices():
        r = ref[lo:hi]
        scale = r.abs().max().item()
        diff = (got[lo:hi] - r).abs().max().item()
        err = diff / scale if scale > 0 else diff
        if err > worst:
            worst, worst_name = err, name
    return {
        "rel_err_norm": ((got - ref).norm() / ref.norm()).item(),
        "max_rel_err_per_matrix": worst,
        "worst_matrix": worst_name,
        "cosine": torch.nn.functional.cosine_similarity(got, ref, dim=0).item(),
    }


def precisions(device, with_weights: bool = True) -> list[str]:
    out = ["float32"] + (["tf32"] if device.type == "cuda" else []) + ["bfloat16"]
    return out + (["bfloat16-weights"] if with_weights else [])


def exactness(chk: Checker, which: str, n: int) -> dict:
    import torch

    from gradsim.core.gradients import GradientComputer

    device = torch.device(chk.args.device)
    lm = cpu_model(chk, which)
    encs = encodings(chk, lm, n)
    t0 = time.perf_counter()
    refs = reference_gradients(chk, which, encs)
    out = {
        "model": lm.model_id,
        "device": str(device),
        "params": sum(p.numel() for p in lm.model.parameters()),
        "reference": "CPU float64 autograd of the shifted cross-entropy over the response tokens (HF's loss)",
        "reference_seconds": time.perf_counter() - t0,
        "tokens": [e.num_tokens for e in encs],
        "precisions": {},
    }
    if device.type == "cpu":
        out["tf32"] = "skipped: TF32 is a CUDA matmul mode"
    for prec in precisions(device):
        rec: dict = {"gradsim_dtype": gradsim_dtype(prec)}
        try:
            lm_dev = device_copy(lm, device, prec)
            with tf32_mode(prec == "tf32"):
                gcomp = GradientComputer(lm_dev.model, device, gradsim_dtype(prec))
                per, same = [], True
                for enc, ref in zip(encs, refs):
                    g = gcomp.gradient(enc)
                    first = sha256_of(g)
                    per.append(compare(g, ref, gcomp.layout))
                    second = sha256_of(gcomp.gradient(enc))
                    same = same and first == second
                rec["tf32_matmul_in_effect"] = torch.backends.cuda.matmul.allow_tf32
            rec.update(
                samples=per,
                rel_err_norm_max=max(p["rel_err_norm"] for p in per),
                max_rel_err_per_matrix=max(p["max_rel_err_per_matrix"] for p in per),
                cosine_min=min(p["cosine"] for p in per),
                tolerance_rel_err_norm=TOLERANCE[prec],
                deterministic=same,
            )
            rec["within_tolerance"] = rec["rel_err_norm_max"] <= TOLERANCE[prec]
            del gcomp, lm_dev
        except Exception as e:
            rec.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        out["precisions"][prec] = rec
        release()
    return out


def projection_dim(kind: str, which: str, device) -> int:
    """gradsim's defaults (65,536 in all for the sketches, 4,096 per matrix for factorized and trak), except
    4,096 for the sketches on the tiny model, and for trak 512 per matrix (64 on the tiny model) unless
    CudaProjector (CUDA + fast_jl) does it: BasicProjector draws entries x proj_dim normals per matrix per sample."""
    from gradsim.core.projection import uses_cuda_projector

    if kind in ("tensorsketch", "countsketch"):
        return 4096 if which == "tiny" else 65536
    if kind == "trak":
        return 4096 if uses_cuda_projector(device, 4096) else 64 if which == "tiny" else 512
    return 4096


def make_featurizer(kind: str, lm, dtype: str, allocation=None, dim: int | None = None):
    from gradsim.core.projection import (
        CountSketchFeaturizer,
        FactorizedFeaturizer,
        TensorSketchFeaturizer,
        TrakFeaturizer,
    )
    from gradsim.study.features import ExactFeaturizer

    if kind == "exact":
        return ExactFeaturizer(lm.model, lm.device, dtype)
    if kind == "tensorsketch":
        return TensorSketchFeaturizer(lm.model, lm.device, dtype, dim, 42, 1, allocation=allocation)
    if kind == "countsketch":
        return CountSketchFeaturizer(lm.model, lm.device, dtype, dim, 42, 1, allocation=allocation)
    if kind == "factorized":
        return FactorizedFeaturizer(lm.model, lm.device, dtype, dim, 42, 1)
    if kind == "trak":
        return TrakFeaturizer(lm.model, lm.device, dtype, dim, 42, 1, memory_bytes=2**30)
    raise ValueError(kind)


def allocation_for(kind: str, lm, dtype: str, calib, dim: int):
    """The sketches' allocation (from exact gradients of the calibration samples), shared by both sides."""
    if kind not in ("tensorsketch", "countsketch"):
        return None
    from gradsim.core.projection import make_allocation

    alloc = make_allocation(lm.model, lm.device, dtype, dim, calib, "fft" if kind == "tensorsketch" else "coprime")
    drop_grads(lm.model)
    return alloc


def features_of(f, encs):
    import torch

    return torch.stack([f.features(e).detach().float().cpu().clone() for e in encs])


def projections(chk: Checker, which: str, n: int) -> dict:
    import torch

    device = torch.device(chk.args.device)
    lm_cpu = cpu_model(chk, which)
    lm_dev = device_copy(lm_cpu, device, "float32")
    encs = encodings(chk, lm_cpu, n)
    calib = encs[:2]
    out = {"model": lm_cpu.model_id, "device": str(device), "samples": len(encs), "methods": {}}
    for kind in PROJECTIONS:
        rec: dict = {}
        try:
            dim = projection_dim(kind, which, device)
            alloc = allocation_for(kind, lm_cpu, "float32", calib, dim)
            t0 = time.perf_counter()
            f_dev = make_featurizer(kind, lm_dev, "float32", alloc, dim)
            b = features_of(f_dev, encs)
            sync(device)
            t_dev = time.perf_counter() - t0
            f_again = make_featurizer(kind, lm_dev, "float32", alloc, dim)
            b2 = features_of(f_again, encs)
            del f_again
            drop_grads(lm_dev.model)
            t0 = time.perf_counter()
            if kind == "trak":
                # The device's own projector applied to the CPU float64 gradients (rounded to fp32).
                refs = reference_gradients(chk, which, encs)
                a = torch.empty(len(encs), f_dev.layout.total, dtype=torch.float32, device=device)
                f_dev.project(torch.stack(refs).float(), a)
                a = a.cpu()
                m = next((i for i, p in enumerate(f_dev.projected) if p), None)
                rec["projector"] = type(f_dev.projector(m)).__name__ if m is not None else "none (all exact)"
                rec["reference"] = "the device's projector applied to the CPU float64 gradients"
            else:
                f_cpu = make_featurizer(kind, lm_cpu, "float32", alloc, dim)
                a = features_of(f_cpu, encs)
                drop_grads(lm_cpu.model)
                del f_cpu
                rec["reference"] = "the same featurizer (seed, allocation) on the CPU, float32"
            t_ref = time.perf_counter() - t0
            del f_dev
            cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
            rel = (a.double() - b.double()).norm(dim=1) / a.double().norm(dim=1)
            rec.update(
                dims=int(a.shape[1]),
                proj_dim=dim,
                seconds_device=t_dev,
                seconds_reference=t_ref,
                feature_cosine_min=cos.min().item(),
                feature_rel_err_max=rel.max().item(),
                sha256_run1=sha256_of(b),
                sha256_run2=sha256_of(b2),
                deterministic=sha256_of(b) == sha256_of(b2),
            )
        except Exception as e:
            rec = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            drop_grads(lm_dev.model)
            drop_grads(lm_cpu.model)
        out["methods"][kind] = rec
        release()
    del lm_dev
    return out


def build_model(chk: Checker) -> dict:
    """bench/make_model.py's build, in this process (its random init and save_pretrained)."""
    shape = chk.shape
    mm = make_model_module()
    out = mm.build(shape, chk.work / "models" / shape, 0, chk.tokenizer_dir)
    chk.cache["model_dir"] = str(out)
    spec = mm.read_spec(out) or {}
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"shape": shape, "dir": str(out), "params": spec.get("params"), "bytes": size}


def model_shape(model_dir: str):
    from transformers import AutoConfig

    from gradsim.study.memory import shape_of_config

    return shape_of_config(AutoConfig.from_pretrained(model_dir))


def e2e(chk: Checker) -> dict:
    model_dir = chk.cache.get("model_dir")
    if not model_dir:
        raise RuntimeError("no model (build_model failed or was skipped)")
    out_dir = chk.work / "e2e"
    peak_file = chk.work / "e2e_peak.json"
    n = 6 if chk.args.quick else chk.args.e2e_samples  # BM25's top 4 others need 5 originals at least
    max_len = chk.max_length
    args = [
        *("--model", model_dir, "--setting", "both", "--sample-size", str(n), "--max-length", str(max_len)),
        *("--no-baselines", "--device", chk.args.device, "--output-dir", str(out_dir)),
        *("--original-data", str(chk.data_dir / "original.jsonl")),
        *("--paraphrased-data", str(chk.data_dir / "paraphrased.jsonl")),
        *("--model-generated-data", str(chk.data_dir / "model_generated.jsonl")),
    ]
    t0 = time.perf_counter()
    res = chk.run_script(ROOT / "main.py", args, peak_file)
    wall = time.perf_counter() - t0
    rec: dict = {"args": args, "rc": res.returncode, "wall_s": wall, "stdout_tail": res.stdout[-1500:], "settings": {}}
    if res.returncode != 0:
        rec["stderr_tail"] = res.stderr[-2500:]
        raise RuntimeError(f"main.py exited {res.returncode} after {wall:.0f} s: {res.stderr.strip()[-800:]}")
    cost, dtype = None, None
    for path in sorted(out_dir.glob("gradient-similarity/*/results.json")):
        r = json.loads(path.read_text())
        cost = r.get("cost") or cost
        dtype = (r.get("config") or {}).get("dtype", dtype)
        rec["settings"][(r.get("config") or {}).get("setting", path.parent.name)] = {
            "queries": len(r.get("queries") or []),
            "whole_model": (r.get("summary") or {}).get("whole_model"),
        }
    rec["queries"] = sum(s["queries"] for s in rec["settings"].values())
    rec["dtype"] = dtype
    rec["cost"] = cost
    if cost and cost.get("seconds"):
        rec["tokens_per_s"] = cost["tokens"] / cost["seconds"]
        shape = model_shape(model_dir)
        rec["achieved_tflops_6pt"] = 6 * shape.params * cost["tokens"] / cost["seconds"] / 1e12
        rec.update(pct_of_peak(chk, "tf32" if dtype == "tf32" else "bf16" if dtype == "bfloat16" else "fp32", rec))
        # Cost's held_gradients is the budget's capacity; a block holds at most the queries (hold-queries) or
        # the needed originals (hold-originals) of the run.
        capacity = int(cost.get("held_gradients") or 0)
        most = cost.get("num_queries", 0) if cost.get("mode") == "hold-queries" else n
        held = min(capacity, most) if most else capacity
        pred = shape.exact_bytes(max_len, dtype or "float32", held=held)
        rec["predicted_bytes"] = {**pred, "held_gradients": held, "capacity": capacity, "tokens": max_len}
    if peak_file.is_file():
        peak = json.loads(peak_file.read_text())
        rec["max_memory_allocated_mb"] = peak["max_memory_allocated"] / 2**20
        rec["max_memory_reserved_mb"] = peak["max_memory_reserved"] / 2**20
        if "predicted_bytes" in rec:
            rec["peak_over_predicted"] = peak["max_memory_allocated"] / rec["predicted_bytes"]["total"]
    shutil.rmtree(out_dir, ignore_errors=True)
    return rec


def pct_of_peak(chk: Checker, prec: str, rec: dict) -> dict:
    """% of the card's dense data-sheet peak for the precision; on a card without one (a CPU), of the
    matmul rate measured in environment."""
    peaks = chk.cache.get("peaks")
    if peaks and prec in peaks:
        return {"pct_of_dense_peak": 100 * rec["achieved_tflops_6pt"] / peaks[prec], "peak_tflops": peaks[prec]}
    measured = (chk.cache.get("matmul") or {}).get(prec)
    if measured:
        return {"pct_of_measured_matmul": 100 * rec["achieved_tflops_6pt"] / measured}
    return {}


def throughput(chk: Checker) -> dict:
    import torch

    from gradsim.config import Config
    from gradsim.core.model import load_model
    from gradsim.study.memory import shape_of_config

    model_dir = chk.cache.get("model_dir")
    if not model_dir:
        raise RuntimeError("no model (build_model failed or was skipped)")
    device = torch.device(chk.args.device)
    t0 = time.perf_counter()
    lm = load_model(Config(model_name=model_dir, device=str(device)), device)
    load_s = time.perf_counter() - t0
    which = "tiny" if chk.shape == "tiny" else "big"
    n, c = (1, 1) if chk.args.quick else (chk.args.throughput_samples, 2)
    encs = encodings(chk, lm, n + c)
    calib, encs = encs[:c], encs[c:]
    shape = shape_of_config(lm.model.config)
    params = sum(p.numel() for p in lm.model.parameters())
    out = {
        "model": model_dir,
        "device": str(device),
        "params": params,
        "samples": len(encs),
        "tokens": sum(e.num_tokens for e in encs),
        "load_seconds": load_s,
        "flop_count": "6 x params x tokens per backward pass",
        "precisions": {},
    }
    for prec in precisions(device, with_weights=False):
        short = {"float32": "fp32", "tf32": "tf32", "bfloat16": "bf16"}[prec]
        dtype = gradsim_dtype(prec)
        recs = out["precisions"][prec] = {}
        for kind in ("exact", *PROJECTIONS):
            if chk.elapsed() > chk.args.budget_s:
                recs[kind] = {"skipped": "time budget spent"}
                continue
            rec: dict = {}
            try:
                with tf32_mode(prec == "tf32"):
                    dim = projection_dim(kind, which, device)
                    t0 = time.perf_counter()
                    alloc = allocation_for(kind, lm, dtype, calib, dim)
                    f = make_featurizer(kind, lm, dtype, alloc, dim)
                    sync(device)
                    rec["setup_seconds"] = time.perf_counter() - t0  # incl. the sketches' calibration
                    t0 = time.perf_counter()
                    f.features(encs[0])
                    sync(device)
                    warm = time.perf_counter() - t0
                    m = max(1, min(len(encs), int(chk.args.method_cap_s / max(warm, 1e-6))))
                    peak_mem_reset(device)
                    t0 = time.perf_counter()
                    for e in encs[:m]:
                        f.features(e)
                    sync(device)
                    dt = time.perf_counter() - t0
                    rec["tf32_matmul_in_effect"] = torch.backends.cuda.matmul.allow_tf32
                tokens = sum(e.num_tokens for e in encs[:m])
                rec.update(
                    first_sample_seconds=warm,
                    samples=m,
                    tokens=tokens,
                    seconds=dt,
                    tokens_per_s=tokens / dt,
                    achieved_tflops_6pt=6 * params * tokens / dt / 1e12,
                    dims=int(f.layout.total),
                    **peak_mem(device),
                )
                rec.update(pct_of_peak(chk, short, rec))
                if kind == "trak":
                    pm = next((i for i, p in enumerate(f.projected) if p), None)
                    rec["projector"] = type(f.projector(pm)).__name__ if pm is not None else "none (all exact)"
                if kind == "exact":
                    longest = max(e.num_tokens for e in encs[:m])
                    pred = shape.exact_bytes(longest, dtype if dtype != "tf32" else "float32", held=0)
                    rec["predicted_bytes"] = {**pred, "held_gradients": 0, "tokens": longest}
                    if "max_memory_allocated_mb" in rec:
                        rec["peak_over_predicted"] = rec["max_memory_allocated_mb"] * 2**20 / pred["total"]
                drop_grads(lm.model)
                del f
            except Exception as e:
                rec = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
                drop_grads(lm.model)
            recs[kind] = rec
            release()
    del lm
    return out


# ---------------------------------------------------------------- summary


def summary(report: dict) -> str:
    lines = [f"gpu_check {report['utc']} ({report['elapsed_s']:.0f} s)"]
    if "bundle" in report:
        b = report["bundle"]
        lines.append(f"- bundle {b['dir']}: {len(b['wheels_used'])} wheels used ({', '.join(b['wheels_used'])})")
        if b.get("stale_files"):
            lines.append(f"  WARNING: the bundle's gradsim differs from src/gradsim in {', '.join(b['stale_files'])}")
    for name, s in report["sections"].items():
        head = f"- {name}: {s['status']}" + (f" ({s['seconds']:.1f} s)" if "seconds" in s else "")
        if s["status"] == "skipped":
            lines.append(f"{head}: {s['reason']}")
            continue
        if s["status"] == "error":
            lines.append(f"{head}: {s['error'][:300]}")
            continue
        if name == "environment":
            mm = ", ".join(f"{k} {v:.3g}" for k, v in s["matmul_tflops"].items())
            lines.append(
                f"{head}: torch {s['torch']} (CUDA {s['torch_cuda']}), transformers {s['transformers']}, "
                f"GPU {s.get('gpu_name', 'none')}, matmul TFLOP/s {mm}; gradsim from {s['gradsim_file']}"
            )
        elif name.startswith("exactness"):
            parts = []
            for prec, r in s["precisions"].items():
                if "error" in r:
                    parts.append(f"{prec} ERROR {r['error'][:120]}")
                else:
                    parts.append(
                        f"{prec} rel err {r['rel_err_norm_max']:.1e} (cos {r['cosine_min']:.7f}, "
                        f"{'deterministic' if r['deterministic'] else 'NOT deterministic'})"
                    )
            lines.append(f"{head}: {s['model']} vs CPU float64: " + "; ".join(parts))
        elif name.startswith("projections"):
            parts = []
            for k, r in s["methods"].items():
                if "error" in r:
                    parts.append(f"{k} ERROR {r['error'][:120]}")
                    continue
                parts.append(
                    f"{k} cos {r['feature_cosine_min']:.7f} rel err {r['feature_rel_err_max']:.1e} "
                    f"{'deterministic' if r['deterministic'] else 'NOT deterministic'}"
                )
            lines.append(f"{head}: " + "; ".join(parts))
        elif name == "build_model":
            lines.append(f"{head}: {s['shape']}, {s['params']:,} params, {s['bytes'] / 2**20:.0f} MiB in {s['dir']}")
        elif name == "e2e":
            mem = ""
            if "peak_over_predicted" in s:
                mem = (
                    f", peak {s['max_memory_allocated_mb']:.0f} MB = {s['peak_over_predicted']:.2f} x predicted "
                    f"({s['predicted_bytes']['held_gradients']} held)"
                )
            rate = f", {s['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in s else ""
            pct = s.get("pct_of_dense_peak", s.get("pct_of_measured_matmul"))
            rate += f" ({s['achieved_tflops_6pt']:.3g} TFLOP/s, {pct:.1f}% of peak)" if pct is not None else ""
            lines.append(f"{head}: {s['queries']} queries ({s['dtype']}) in {s['wall_s']:.0f} s{rate}{mem}")
        elif name == "throughput":
            lines.append(f"{head}: {s['params']:,} params, {s['samples']} samples, {s['tokens']} tokens")
            lines.append("  | precision | method | tokens/s | TFLOP/s (6PT) | % peak | peak mem MB | x predicted |")
            lines.append("  |---|---|---|---|---|---|---|")
            for prec, methods in s["precisions"].items():
                for k, r in methods.items():
                    if "tokens_per_s" not in r:
                        lines.append(f"  | {prec} | {k} | | | | | {r.get('error', r.get('skipped', ''))[:100]} |")
                        continue
                    pct = r.get("pct_of_dense_peak", r.get("pct_of_measured_matmul"))
                    mem = r.get("max_memory_allocated_mb", r.get("peak_rss_mb"))
                    ratio = f"{r['peak_over_predicted']:.2f}" if "peak_over_predicted" in r else ""
                    lines.append(
                        f"  | {prec} | {k} | {r['tokens_per_s']:.0f} | {r['achieved_tflops_6pt']:.4f} | "
                        f"{'' if pct is None else f'{pct:.1f}'} | {mem:.0f} | {ratio} |"
                    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--bundle", help="a folder packed by bench/gpu_bundle.sh: import gradsim and its needs from it")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--quick", action="store_true", help="the tiny model everywhere, a handful of samples")
    p.add_argument(
        "--shape",
        help="bench/make_model.py's shape for build_model, e2e and throughput (default amd-olmo-1b; tiny with --quick)",
    )
    p.add_argument("--samples", type=int, default=2, help="samples for the exactness and projection checks")
    p.add_argument("--e2e-samples", type=int, default=32, help="originals end to end (x2 settings = queries)")
    p.add_argument("--throughput-samples", type=int, default=6, help="timed samples per method and precision")
    p.add_argument("--max-length", type=int, default=256, help="truncate samples to this many tokens (default 256)")
    p.add_argument("--method-cap-s", type=float, default=15.0, help="time a method on fewer samples past this")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining sections after this many seconds")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chk = Checker(args)
    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log(f"CUDA asked for but torch {torch.__version__} (CUDA {torch.version.cuda}) sees none: use --device cpu")
        return 2
    n = 2 if args.quick else args.samples
    full_only = "--quick" if args.quick else None
    try:
        chk.section("environment", environment, chk)
        chk.section("exactness_tiny", exactness, chk, "tiny", n)
        chk.section("projections_tiny", projections, chk, "tiny", n)
        chk.section("build_model", build_model, chk)
        chk.section("e2e", e2e, chk)
        chk.section("throughput", throughput, chk)
        chk.section("exactness_135m", exactness, chk, "135m", n, skip=full_only)
        chk.section("projections_135m", projections, chk, "135m", n, skip=full_only)
    finally:
        shutil.rmtree(chk.work, ignore_errors=True)
        if "bundle" in chk.report:
            shutil.rmtree(chk.report["bundle"]["site"], ignore_errors=True)
    chk.save()
    print(summary(chk.report))
    print(f"report: {chk.path}")
    failed = [k for k, s in chk.report["sections"].items() if s["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
