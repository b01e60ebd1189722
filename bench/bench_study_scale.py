"""The original study at its own scale: its approach and gradsim's, side by side, on a 1.2B-parameter model.

    uv run python bench/bench_study_scale.py [--model DIR] [--sample-size 3] [--max-length 256] [--device cpu]

On one model (default: a random-init model of AMD-OLMo-1B-SFT's shape, built by bench/make_model.py when
missing) and the first --sample-size originals of the bundled sample with their variants, in one run:

  peak  the machine's fp32 matmul throughput now (2048^3 matmuls, best of --peak-reps), the bound that the
        achieved FLOP/s below are a fraction of.
  (a)   the original study's approach, in this process: for every query of both settings, one backward
        for the query and one for each of its candidates (its own original + the BM25 top-4 others;
        fewer when --sample-size < 5), nothing stored; per-matrix dot products on the flat gradient
        buffers (gradsim.core.gradients.GradientComputer), cosines from them. Peak RSS is this process's
        ru_maxrss; bytes written from /proc/self/io.
  (b)   gradsim itself, as a child process, run first (while this process holds no model, so that
        gradsim's default budget, a share of the free memory, is the machine's):
        uv run main.py --model DIR --setting both --sample-size N --no-baselines --max-length L --output-dir TMP -q
        Peak RSS is the child's (ru_maxrss of RUSAGE_CHILDREN in a wrapper that runs nothing else), bytes
        written are the run's "cost" object and the child's ru_oublock; tokens and passes come from the
        run's metrics.jsonl (and its cost object where present).
Then: the per-matrix cosines of (a) and (b) for every shared (query, candidate) pair (max abs difference),
achieved FLOP/s = 6 x params x tokens / seconds (tokens summed over every forward+backward pass) as a
fraction of the measured peak, and an estimate of the full study (988 queries per setting, both
settings, AMD-OLMo-1B at LIMA's mean length) on one H100 for the original approach (6 passes per query),
gradsim without a store (3.5) and gradsim with the originals kept (1.5).
Output: bench/results/study_scale_<UTC time>.json and a markdown table on stdout.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (what every bench shares)
from common import BUNDLED, LIMA, ROOT, log, utc  # noqa: E402

if str(ROOT / "src") not in sys.path:
    sys.path.append(str(ROOT / "src"))
VARIANTS = {"paraphrased": "paraphrased.jsonl", "model-generated": "model_generated.jsonl"}

# H100 SXM dense peaks (FLOP/s) for the estimate.
H100_PEAKS = {"bf16 tensor": 989e12, "tf32 tensor": 495e12, "fp32 non-tensor": 60e12}
# Backward passes per query of each approach at full scale (both settings, 5 candidates per query).
FULL_PASSES = {
    "original study (1 query + 5 candidates, nothing stored)": 6.0,
    "gradsim, no store (both settings' queries of an id share its 5 candidates: (2 + 5) / 2)": 3.5,
    "gradsim, originals kept (each computed once: (2 queries + 1 original) / 2)": 1.5,
}

# Runs a command and reports its (and only its) resource use: RUSAGE_CHILDREN of a process that has no
# other children. Plain Python: no torch in the wrapper.
WRAPPER = r"""
import json, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
rc = subprocess.call(cmd)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    json.dump({"rc": rc, "wall_s": time.perf_counter() - t0, "maxrss_kb": ru.ru_maxrss, "oublock": ru.ru_oublock,
               "inblock": ru.ru_inblock, "utime_s": ru.ru_utime, "stime_s": ru.ru_stime}, f)
sys.exit(rc)
"""


def machine_info() -> dict:
    return {**common.machine_info(), "loadavg": os.getloadavg()}


def proc_io() -> dict:
    """This process's I/O counters (bytes): write_bytes is what reached the storage layer."""
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}
    except (OSError, ValueError):
        return {}


def rss_now_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device, n: int = 2048, reps: int = 10) -> dict:
    import torch

    a = torch.randn(n, n, dtype=torch.float32, device=device)
    b = torch.randn(n, n, dtype=torch.float32, device=device)
    torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "n": n,
        "reps": reps,
        "fp32_gflops": 2 * n**3 / min(times) / 1e9,
        "fp32_gflops_median": 2 * n**3 / sorted(times)[len(times) // 2] / 1e9,
    }


def ensure_model(args) -> Path:
    if args.model:
        return Path(args.model).expanduser().absolute()
    # A child process, so building does not count toward (a)'s peak RSS.
    cmd = [sys.executable, str(ROOT / "bench" / "make_model.py"), "--shape", args.shape]
    log(f"model: {' '.join(cmd)}")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"make_model.py failed:\n{res.stderr[-3000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


def load_settings(n: int):
    from gradsim.data.load import load_dataset

    return {s: load_dataset(str(BUNDLED / "original.jsonl"), str(BUNDLED / f), n) for s, f in VARIANTS.items()}


def cosines(dots, qself, cself):
    import numpy as np

    with np.errstate(invalid="ignore", divide="ignore"):
        per = dots / np.sqrt(qself[None, :] * cself)
        whole = dots.sum(-1) / np.sqrt(qself.sum() * cself.sum(-1))
    return per, whole


def per_matrix_dots(layout, a, b):
    """(M,) float64: the dot product of two flat fp32 gradients restricted to each parameter matrix."""
    import numpy as np
    import torch

    out = np.empty(len(layout.names), dtype=np.float64)
    for m, (_, lo, hi) in enumerate(layout.slices()):
        out[m] = torch.dot(a[lo:hi], b[lo:hi]).item()
    return out


def run_original(args, lm, datasets) -> dict:
    """(a) per query: its gradient and each candidate's, recomputed every time, nothing stored."""
    import numpy as np
    import torch

    from gradsim.core.gradients import GradientComputer
    from gradsim.data.encode import encode
    from gradsim.data.retrieval import candidate_lists

    max_length = min(args.max_length, lm.context_length)
    io0 = proc_io()
    rss_loaded = rss_now_mb()
    gcomp = GradientComputer(lm.model, lm.device, "float32")
    names = gcomp.layout.names
    qbuf = torch.empty_like(gcomp.buffer)  # the query's gradient, kept while its candidates stream past
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    queries, tokens, passes = [], 0, 0
    t_grad = t_dots = 0.0
    t_start = time.perf_counter()
    for setting, data in datasets.items():
        cands = candidate_lists(data, "bm25", args.top_k)
        enc_o = [encode(lm.tokenizer, s, max_length) for s in data.originals]
        for qi, q in enumerate(data.queries):
            eq = encode(lm.tokenizer, q, max_length)
            t0 = time.perf_counter()
            qbuf.copy_(gcomp.gradient(eq))
            sync(lm.device)
            t1 = time.perf_counter()
            qself = per_matrix_dots(gcomp.layout, qbuf, qbuf)
            t_grad += t1 - t0
            t_dots += time.perf_counter() - t1
            tokens += eq.num_tokens
            dots, cself = [], []
            for j in cands[qi]:
                t0 = time.perf_counter()
                c = gcomp.gradient(enc_o[j])
                sync(lm.device)
                t1 = time.perf_counter()
                dots.append(per_matrix_dots(gcomp.layout, qbuf, c))
                cself.append(per_matrix_dots(gcomp.layout, c, c))
                t_grad += t1 - t0
                t_dots += time.perf_counter() - t1
                tokens += enc_o[j].num_tokens
            dots, cself = np.stack(dots), np.stack(cself)
            per, whole = cosines(dots, qself, cself)
            rank = int(1 + (whole[1:] >= whole[0]).sum())  # ties count against the true original
            queries.append(
                {
                    "setting": setting,
                    "id": q.id,
                    "candidates": [data.originals[j].id for j in cands[qi]],
                    "tokens": eq.num_tokens,
                    "truncated": eq.truncated,
                    "rank": rank,
                    "scores": whole.tolist(),
                    "per_matrix": per.tolist(),
                }
            )
            log(
                f"(a) {setting} {q.id}: {1 + len(cands[qi])} backward passes, whole-model cosines "
                f"{np.round(whole, 4).tolist()}, rank {rank}"
            )
    seconds = time.perf_counter() - t_start
    passes = gcomp.backward_passes
    io1 = proc_io()
    rec = {
        "approach": "original study: per query, 1 + candidates backward passes, nothing stored",
        "queries": len(queries),
        "backward_passes": passes,
        "passes_per_query": passes / max(1, len(queries)),
        "tokens": tokens,
        "seconds": seconds,
        "seconds_gradients": t_grad,
        "seconds_dots": t_dots,
        "seconds_per_token": seconds / max(1, tokens),
        "peak_rss_mb": maxrss_mb(),
        "rss_after_model_load_mb": rss_loaded,
        "bytes_written": io1.get("write_bytes", 0) - io0.get("write_bytes", 0) if io0 else None,
        "bytes_written_source": "/proc/self/io write_bytes during (a)",
        "max_length": max_length,
        "parameter_names": names,
        "per_query": queries,
    }
    if lm.device.type == "cuda":
        rec["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(lm.device) / 2**20
    return rec


def free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS before (b) runs
    except OSError:
        pass


def gradsim_command(args, model_dir: Path, out_dir: Path) -> list[str]:
    uv = shutil.which("uv")
    head = [uv, "run", "main.py"] if uv and not args.no_uv else [sys.executable, str(ROOT / "main.py")]
    cmd = head + [
        "--model",
        str(model_dir),
        "--setting",
        "both",
        "--sample-size",
        str(args.sample_size),
        "--no-baselines",
        "--max-length",
        str(args.max_length),
        "--output-dir",
        str(out_dir),
        "-q",
    ]
    if args.device:
        cmd += ["--device", args.device]
    if args.memory_gb is not None:
        cmd += ["--memory-gb", str(args.memory_gb)]
    return cmd


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def dir_bytes(path: Path) -> int:
    total = 0
    for p in Path(path).rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def expected_gradsim_work(lm, datasets, args) -> dict:
    """Tokens of every query and of every needed original once (both settings share the originals):
    the fallback for (b)'s token count when its metrics are missing."""
    from gradsim.data.encode import encode
    from gradsim.data.retrieval import candidate_lists

    max_length = min(args.max_length, lm.context_length)
    tq, nq, needed = 0, 0, {}
    for data in datasets.values():
        tq += sum(encode(lm.tokenizer, q, max_length).num_tokens for q in data.queries)
        nq += len(data.queries)
        for c in candidate_lists(data, "bm25", args.top_k):
            for j in c:
                needed.setdefault(data.originals[j].id, data.originals[j])
    to = sum(encode(lm.tokenizer, s, max_length).num_tokens for s in needed.values())
    return {
        "queries": nq,
        "originals_needed": len(needed),
        "tokens_queries": tq,
        "tokens_originals_once": to,
        "min_passes": nq + len(needed),
    }


def run_gradsim(args, model_dir: Path, expected: dict | None = None) -> dict:
    """(b) gradsim as a child process, measured by a wrapper that runs nothing else."""
    out_dir = Path(tempfile.mkdtemp(prefix="gradsim-study-scale-", dir=args.scratch_dir))
    usage_file = out_dir.with_name(out_dir.name + ".usage.json")
    cmd = gradsim_command(args, model_dir, out_dir)
    log(f"(b) {' '.join(cmd)}")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(usage_file)] + cmd, capture_output=True, text=True, cwd=ROOT, env=env
    )
    wall = time.perf_counter() - t0
    usage = read_json(usage_file) or {}
    usage_file.unlink(missing_ok=True)
    rec = {
        "approach": "gradsim (main.py --setting both)",
        "command": cmd,
        "rc": res.returncode,
        "wall_s": wall,
        "stdout_tail": res.stdout[-2000:],
        "stderr_tail": res.stderr[-3000:],
        "child_usage": usage,
        "peak_rss_mb": usage.get("maxrss_kb", 0) / 1024 if usage else None,
        "child_bytes_written_oublock": usage.get("oublock", 0) * 512 if usage else None,
        "output_dir_bytes": dir_bytes(out_dir),
        "env": {k: v for k, v in os.environ.items() if k.startswith("GRADSIM_")},
    }
    settings = {}
    for setting in VARIANTS:
        run_dir = out_dir / "gradient-similarity" / setting
        result = read_json(run_dir / "results.json")
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        settings[setting] = {
            "results": result is not None,
            "cost": (result or {}).get("cost"),
            "summary": ((result or {}).get("summary") or {}).get("whole_model"),
            "queries": (result or {}).get("queries") or [],
            "parameter_names": (result or {}).get("parameter_names"),
            "metrics": metrics,
        }
    rec["settings"] = settings
    rec.update(aggregate_gradsim(settings, wall, expected))
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    else:
        rec["output_dir"] = str(out_dir)
    return rec


def aggregate_gradsim(settings: dict, wall: float, expected: dict | None = None) -> dict:
    """Passes, tokens and seconds of the whole (both settings) run, from what the run wrote.

    A joint run may write the same cost object (or the same metrics) into both settings' folders: those
    are counted once; different ones are summed."""
    costs = [s["cost"] for s in settings.values() if s["cost"]]
    joint_cost = len(costs) == 2 and costs[0] == costs[1]
    use_costs = costs[:1] if joint_cost else costs

    def csum(*keys):
        vals = []
        for c in use_costs:
            v = c
            for k in keys:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                vals.append(v)
        return sum(vals) if vals else None

    ms = [[m for m in s["metrics"] if m.get("role") in ("query", "original")] for s in settings.values()]
    joint_metrics = len(ms) == 2 and ms[0] == ms[1] and bool(ms[0])
    rows = ms[0] if joint_metrics else [m for x in ms for m in x]
    n_queries = sum(len(s["queries"]) for s in settings.values())
    out = {
        "cost_counted": "once (both settings report the same cost)"
        if joint_cost
        else f"summed over {len(costs)} file(s)",
        "metrics_counted": "once (identical in both settings)" if joint_metrics else "summed over settings",
        "queries": n_queries,
        "backward_passes_query": csum("backward_passes", "query"),
        "backward_passes_original": csum("backward_passes", "original"),
        "scratch_bytes_written": csum("scratch_bytes_written"),
        "scratch_bytes_read": csum("scratch_bytes_read"),
        "held_gradients": max(
            [c.get("held_gradients") for c in costs if isinstance(c.get("held_gradients"), int)], default=None
        ),
        "cost_seconds": csum("seconds"),
        "metrics_passes": len(rows),
        "metrics_passes_by_role": {r: sum(1 for m in rows if m.get("role") == r) for r in ("query", "original")},
        # every pass's tokens (the cost object counts each recomputed original; metrics.jsonl lists an original once)
        "tokens": csum("tokens") or sum(int(m.get("tokens", 0)) for m in rows),
        "metrics_seconds": sum(float(m.get("seconds", 0.0)) for m in rows),
        "reported_passes_per_query": [c.get("passes_per_query") for c in costs],
    }
    bq, bo = out["backward_passes_query"], out["backward_passes_original"]
    passes = (bq + bo) if bq is not None and bo is not None else out["metrics_passes"]
    out["backward_passes"] = passes
    out["passes_per_query"] = passes / n_queries if n_queries else None
    # Seconds of featurizing + scoring: the run's own figure when it reports one, else its per-sample
    # metrics, else the child's wall time (which also counts interpreter start-up and model loading).
    for key, src in (("cost_seconds", "cost.seconds"), ("metrics_seconds", "metrics.jsonl seconds"), (None, "wall")):
        v = out[key] if key else wall
        if v:
            out["seconds"], out["seconds_source"] = v, src
            break
    if not out["tokens"] and expected and bq is not None and bo is not None:
        # No metrics: the queries' tokens, plus the originals' at their mean length for each original pass.
        out["tokens"] = int(
            expected["tokens_queries"] * bq / max(1, expected["queries"])
            + expected["tokens_originals_once"] * bo / max(1, expected["originals_needed"])
        )
        out["tokens_source"] = "estimated from the encodings and cost.backward_passes (no metrics.jsonl)"
    out["seconds_per_token"] = out["seconds"] / out["tokens"] if out.get("tokens") else None
    return out


def compare(a: dict, b: dict) -> dict:
    """Max abs difference of per-matrix and whole-model cosines over shared (query, candidate, matrix)."""
    import numpy as np

    names_a = a["parameter_names"]
    worst, worst_whole, n_pairs, n_vals, nan_mismatch, rank_diff = 0.0, 0.0, 0, 0, 0, 0
    missing = []
    for qa in a["per_query"]:
        sb = b["settings"].get(qa["setting"]) or {}
        qb = next((q for q in sb.get("queries", []) if q.get("id") == qa["id"]), None)
        if qb is None or "per_matrix" not in qb:
            missing.append(f"{qa['setting']}/{qa['id']}")
            continue
        names_b = sb.get("parameter_names") or names_a
        col = [names_b.index(n) if n in names_b else None for n in names_a]
        if qb.get("rank") is not None and qb["rank"] != qa["rank"]:
            rank_diff += 1
        for ci, cid in enumerate(qa["candidates"]):
            if cid not in qb.get("candidates", []):
                continue
            cb = qb["candidates"].index(cid)
            n_pairs += 1
            pa = np.array(qa["per_matrix"][ci], dtype=np.float64)
            pb = np.array(
                [np.nan if (k is None or qb["per_matrix"][cb][k] is None) else qb["per_matrix"][cb][k] for k in col],
                dtype=np.float64,
            )
            both = ~np.isnan(pa) & ~np.isnan(pb)
            nan_mismatch += int((np.isnan(pa) != np.isnan(pb)).sum())
            if both.any():
                worst = max(worst, float(np.abs(pa[both] - pb[both]).max()))
                n_vals += int(both.sum())
            if qb.get("scores") is not None and qb["scores"][cb] is not None:
                worst_whole = max(worst_whole, abs(qa["scores"][ci] - qb["scores"][cb]))
    return {
        "pairs": n_pairs,
        "values": n_vals,
        "max_abs_diff_per_matrix_cosine": worst,
        "max_abs_diff_whole_model_cosine": worst_whole,
        "nan_mismatches": nan_mismatch,
        "queries_with_different_rank": rank_diff,
        "queries_missing_in_b": missing,
    }


def mean_lima_tokens(tokenizer, context: int) -> dict:
    from gradsim.data.encode import encode
    from gradsim.data.load import load_samples

    if not LIMA.exists():
        return {"mean_tokens": 553.0, "source": "assumed (../shared/data/lima/train.jsonl not found)"}
    lens, trunc = [], 0
    for s in load_samples(str(LIMA)):
        try:
            e = encode(tokenizer, s, context)
        except Exception:  # a row the template cannot take: left out
            continue
        lens.append(e.num_tokens)
        trunc += e.truncated
    return {
        "mean_tokens": sum(lens) / len(lens),
        "samples": len(lens),
        "truncated": trunc,
        "max_length": context,
        "source": f"{LIMA} (first exchange, this model's tokenizer and chat template, truncated at {context})",
    }


def estimate(
    params: int,
    mean_tokens: float,
    queries_per_setting: int,
    settings: int,
    fraction: float,
    measured_flops: dict[str, float],
) -> dict:
    q = queries_per_setting * settings
    flop_per_pass = 6 * params * mean_tokens
    rows = []
    for label, ppq in FULL_PASSES.items():
        flop = q * ppq * flop_per_pass
        row = {
            "approach": label,
            "passes_per_query": ppq,
            "total_flop": flop,
            "h100_hours": {k: flop / (peak * fraction) / 3600 for k, peak in H100_PEAKS.items()},
            "this_machine_hours": {k: flop / f / 3600 for k, f in measured_flops.items() if f},
        }
        rows.append(row)
    return {
        "formula": "hours = Q x passes_per_query x 6 x P x L / (peak x fraction) / 3600; "
        f"Q = {queries_per_setting} queries x {settings} settings = {q}, P = {params:,} parameters, "
        f"L = {mean_tokens:.0f} tokens per sample (forward 2PL + backward 4PL FLOPs per pass; "
        "attention's T^2 term left out)",
        "queries": q,
        "params": params,
        "mean_tokens": mean_tokens,
        "flop_per_pass": flop_per_pass,
        "assumed_fraction_of_peak": fraction,
        "h100_peaks_flops": H100_PEAKS,
        "rows": rows,
        "kept_originals_scratch_bytes": 4 * params * queries_per_setting,
        "note": "'this machine' uses the FLOP/s achieved in this run by each approach (fp32, this device)",
    }


def fmt_bytes(b) -> str:
    if b is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return str(b)


def fmt(v, spec=".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def report(out: dict) -> str:
    peak = out["peak"]["fp32_gflops"]
    params = out["model"]["params"]
    lines = [
        f"model {out['model']['dir']} ({params:,} parameters), first {out['args']['sample_size']} originals, "
        f"both settings, max length {out['args']['max_length']}, device {out['device']}",
        f"fp32 matmul peak (this run, {peak:.1f} GFLOP/s at {out['peak']['n']}^3)",
        "",
        "| approach | queries | backward passes | passes/query | tokens (fwd+bwd) | seconds | s/token | "
        "achieved GFLOP/s (6PT) | % of fp32 peak | peak RSS | bytes written |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("a", "b"):
        r = out.get(key) or {}
        if not r or r.get("error"):
            lines.append(f"| ({key}) | error: {(r or {}).get('error', 'not run')[:80]} |||||||||")
            continue
        gflops = 6 * params * r["tokens"] / r["seconds"] / 1e9 if r.get("tokens") and r.get("seconds") else None
        written = r.get("bytes_written")
        if key == "b":
            written = r.get("scratch_bytes_written")
            extra = f" (cost); oublock {fmt_bytes(r.get('child_bytes_written_oublock'))}; outputs {fmt_bytes(r.get('output_dir_bytes'))}"
        else:
            extra = ""
        lines.append(
            f"| ({key}) {'original study' if key == 'a' else 'gradsim --setting both'} | {r.get('queries')} | "
            f"{r.get('backward_passes')} | {fmt(r.get('passes_per_query'), '.2f')} | {r.get('tokens')} | "
            f"{fmt(r.get('seconds'), '.1f')}{' (' + r['seconds_source'] + ')' if key == 'b' and 'seconds_source' in r else ''} | "
            f"{fmt(r.get('seconds_per_token'), '.4f')} | {fmt(gflops, '.1f')} | "
            f"{fmt(100 * gflops / peak if gflops else None, '.0f')}% | {fmt((r.get('peak_rss_mb') or 0) / 1024, '.1f')} GB | "
            f"{fmt_bytes(written)}{extra} |"
        )
    c = out.get("comparison") or {}
    if c:
        lines += [
            "",
            f"(a) vs (b): {c['pairs']} shared (query, candidate) pairs, {c['values']} per-matrix cosines: "
            f"max abs diff {c['max_abs_diff_per_matrix_cosine']:.2e} per matrix, "
            f"{c['max_abs_diff_whole_model_cosine']:.2e} whole model; NaN mismatches {c['nan_mismatches']}; "
            f"queries ranked differently {c['queries_with_different_rank']}; missing in (b): "
            f"{c['queries_missing_in_b'] or 'none'}",
        ]
    e = out.get("estimate")
    if e:
        lines += [
            "",
            f"Full-study estimate ({e['queries']} queries, AMD-OLMo-1B shape, L = {e['mean_tokens']:.0f} "
            f"tokens: {out['lima_length']['source']}):",
            f"  {e['formula']}",
            f"  H100 columns assume {e['assumed_fraction_of_peak']:.0%} of the dense peak "
            f"({', '.join(f'{k} {v / 1e12:.0f} TFLOP/s' for k, v in e['h100_peaks_flops'].items())}); "
            f"'this machine' columns use the FLOP/s achieved above.",
            "",
            "| approach | passes/query | PFLOP | "
            + " | ".join(f"H100 {k} h" for k in H100_PEAKS)
            + " | this machine at (a)'s rate h | at (b)'s rate h |",
            "|---|---|---|" + "---|" * len(H100_PEAKS) + "---|---|",
        ]
        for r in e["rows"]:
            tm = r["this_machine_hours"]
            lines.append(
                f"| {r['approach']} | {r['passes_per_query']} | {r['total_flop'] / 1e15:.0f} | "
                + " | ".join(f"{r['h100_hours'][k]:.2f}" for k in H100_PEAKS)
                + f" | {fmt(tm.get('a'), '.0f')} | {fmt(tm.get('b'), '.0f')} |"
            )
        lines.append(
            f"(keeping every original's exact fp32 gradient needs {fmt_bytes(e['kept_originals_scratch_bytes'])}"
            f" of scratch for {e['queries'] // 2} originals)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = common.doc_parser(__doc__, epilog_from=2)
    p.add_argument("--model", help="model directory (default: bench/make_model.py --shape SHAPE, built when missing)")
    p.add_argument("--shape", default="amd-olmo-1b", help="make_model.py shape when --model is not given")
    p.add_argument("--sample-size", type=int, default=3, help="first N originals (and their variants)")
    p.add_argument("--max-length", type=int, default=256, help="truncate samples to this many tokens")
    p.add_argument("--top-k", type=int, default=4, help="BM25 candidates besides the true original")
    p.add_argument("--device", default="cpu", help="device of (a) and, via --device, of (b)")
    p.add_argument("--peak-reps", type=int, default=10)
    p.add_argument("--queries-per-setting", type=int, default=988, help="full-study estimate: queries per setting")
    p.add_argument(
        "--assumed-fraction",
        type=float,
        default=0.4,
        help="full-study estimate: achieved fraction of the H100's dense peak (default 0.4)",
    )
    p.add_argument("--memory-gb", type=float, help="(b)'s --memory-gb (default: gradsim's own, from free memory)")
    p.add_argument("--skip-a", action="store_true", help="run only (b)")
    p.add_argument("--skip-b", action="store_true", help="run only (a)")
    p.add_argument("--no-uv", action="store_true", help="run (b) with this interpreter instead of `uv run`")
    p.add_argument("--keep", action="store_true", help="keep (b)'s output directory")
    p.add_argument("--scratch-dir", help="where (b)'s output directory goes (default: the system temp dir)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from gradsim.config import Config
    from gradsim.core.model import load_model

    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = utc()
    path = args.out / f"study_scale_{stamp.replace(':', '').replace('-', '')}.json"
    out: dict = {
        "utc": stamp,
        "argv": sys.argv,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "device": str(device),
    }

    def save():
        path.write_text(json.dumps(out, indent=1, default=str))

    model_dir = ensure_model(args)
    out["model"] = {"dir": str(model_dir)}
    spec = read_json(model_dir / "gradsim_make_model.json")
    if spec:
        out["model"]["make_model_spec"] = {k: spec.get(k) for k in ("shape", "seed", "params", "tokenizer")}

    log(f"peak: fp32 {2048}^3 matmuls on {device}")
    out["peak"] = matmul_gflops(device, 2048, args.peak_reps)
    out["peak"]["maxrss_mb_before_model"] = maxrss_mb()
    log(f"peak: {out['peak']['fp32_gflops']:.1f} GFLOP/s")

    # (b) first, while this process holds no model: its budget (from free memory) is then the machine's.
    out["rss_mb_before_b"] = rss_now_mb()
    if not args.skip_b:
        try:
            out["b"] = run_gradsim(args, model_dir, None)
            if out["b"]["rc"] != 0:
                out["b"]["error"] = f"main.py exited {out['b']['rc']}: {out['b']['stderr_tail'][-300:]}"
        except Exception as e:
            out["b"] = {"error": f"{type(e).__name__}: {e}"}
        save()

    t0 = time.perf_counter()
    lm = load_model(Config(model_name=str(model_dir), device=str(device)), device)
    out["model"]["load_seconds"] = time.perf_counter() - t0
    out["model"]["params"] = sum(p.numel() for p in lm.model.parameters())
    out["model"]["context_length"] = lm.context_length
    out["lima_length"] = mean_lima_tokens(lm.tokenizer, lm.context_length)
    datasets = load_settings(args.sample_size)
    out["data"] = {s: {"originals": len(d.originals), "queries": len(d.queries)} for s, d in datasets.items()}
    out["expected_b"] = expected_gradsim_work(lm, datasets, args)
    save()
    if not args.skip_a:
        try:
            out["a"] = run_original(args, lm, datasets)
        except Exception as e:  # keep going: (b) and the estimate are still worth having
            out["a"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    for prm in lm.model.parameters():  # GradientComputer's .grad views keep its buffer alive
        prm.grad = None
    del lm, datasets
    free_memory()
    if "per_query" in (out.get("a") or {}) and "settings" in (out.get("b") or {}):
        out["comparison"] = compare(out["a"], out["b"])
    params = out["model"]["params"]
    rates = {
        k: 6 * params * out[k]["tokens"] / out[k]["seconds"]
        for k in ("a", "b")
        if (out.get(k) or {}).get("tokens") and (out.get(k) or {}).get("seconds")
    }
    for k, f in rates.items():
        out[k]["achieved_flops"] = f
        out[k]["fraction_of_fp32_peak"] = f / (out["peak"]["fp32_gflops"] * 1e9)
    # The estimate is for the AMD-OLMo-1B shape; with another model it scales by this model's parameters.
    out["estimate"] = estimate(
        params, out["lima_length"]["mean_tokens"], args.queries_per_setting, 2, args.assumed_fraction, rates
    )
    save()
    print(report(out))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
