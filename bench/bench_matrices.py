"""The paper's cost argument, measured: a per-sample gradient of a few selected matrices against the full one.

    uv run python bench/bench_matrices.py [--model DIR] [--samples 8] [--max-length 512] [--device cpu]
                                          [--single NAME] [--subset REGEX | --selection selection.json]

With --matrices, gradsim makes only the chosen parameters require gradients: autograd forms weight
gradients for those alone and stops the backward below the lowest layer holding one (matrices.py).
This script times, side by side and interleaved per sample (so drift hits all arms alike), one exact
per-sample gradient (forward + backward into gradsim's flat buffer; the best of --reps) of:
  full     every parameter matrix;
  single   one matrix in the upper half of the layers (default: mlp.down_proj of the layer at 60% depth,
           where the paper's best single matrix of AMD-OLMo-1B-SFT sits: layers.9 of 16);
  subset   a subset: --selection (a gradsim select output), else --subset (default: mlp.down_proj of
           every layer in the upper half).
It checks each restricted gradient against the full gradient's matching slices (max relative
difference), reports seconds per sample, the speed-up over full, and full's achieved FLOP/s
(6 x params x tokens / s) as a fraction of the machine's fp32 matmul peak measured in the same run.
Output: bench/results/matrices_<UTC time>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (what every bench shares)
from common import ROOT  # noqa: E402

if str(ROOT / "src") not in sys.path:
    sys.path.append(str(ROOT / "src"))


def main() -> int:
    import numpy as np
    import torch
    from bench_study_scale import matmul_gflops  # the other benches' peak: best of 2048^3 fp32 matmuls

    from gradsim import matrices
    from gradsim.config import Config
    from gradsim.core.gradients import GradientComputer
    from gradsim.core.model import load_model
    from gradsim.data.encode import encode
    from gradsim.data.load import load_samples

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir or hub id (default: the embedded model)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3, help="timed gradients per sample and arm (the best is kept)")
    ap.add_argument("--single", default=None)
    ap.add_argument("--subset", default=None)
    ap.add_argument("--selection", default=None)
    args = ap.parse_args()

    cfg = Config(device=args.device, **({"model_name": args.model} if args.model else {}))
    lm = load_model(cfg)
    device = lm.device
    full_layout = GradientComputer(lm.model, device).layout
    names = full_layout.names
    full_layout_slices = {n: (lo, hi) for n, lo, hi in full_layout.slices()}
    layers = sorted({int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)\.", n))})
    depth = len(layers)
    single = args.single or next(n for n in names if f"layers.{round(0.6 * (depth - 1))}.mlp.down_proj" in n)
    if args.selection:
        subset_spec, subset_label = args.selection, f"selection {args.selection}"
    else:
        upper = "|".join(str(i) for i in layers[depth // 2 :])
        subset_spec = args.subset or rf"layers\.({upper})\.mlp\.down_proj"
        subset_label = f"regex {subset_spec}"
    arms = {
        "full": None,
        "single": [single],
        "subset": matrices.resolve(subset_spec, names, lm.model_id),
    }
    samples = load_samples(str(common.BUNDLED / "original.jsonl"))[: args.samples]
    encs = [encode(lm.tokenizer, s, min(args.max_length, lm.context_length)) for s in samples]

    def matmul_peak(device) -> float:
        return matmul_gflops(device)["fp32_gflops"] * 1e9

    peak_before = matmul_peak(device)
    params = sum(p.numel() for p in lm.model.parameters())

    def one(arm: str, enc):
        with matrices.only(lm.model, arms[arm]):
            gc = GradientComputer(lm.model, device)
            gc.gradient(enc)  # warm the buffer's pages (fresh allocations are slow on small VMs)
            seconds = float("inf")
            for _ in range(args.reps):  # the best of --reps: a busy moment of the machine is not the method
                t = time.perf_counter()
                g = gc.gradient(enc)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = min(seconds, time.perf_counter() - t)
            out = {n: g[lo:hi].clone() for n, lo, hi in gc.layout.slices()} if arm != "full" else g.clone()
            gc.release()
        return seconds, out

    times = {a: [] for a in arms}
    worst = {a: 0.0 for a in arms if a != "full"}
    for enc in encs:
        t_full, g_full = one("full", enc)
        times["full"].append(t_full)
        for arm in ("single", "subset"):
            t, parts = one(arm, enc)
            times[arm].append(t)
            for n, v in parts.items():
                lo, hi = full_layout_slices[n]
                ref = g_full[lo:hi]
                worst[arm] = max(worst[arm], float((v - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    peak_after = matmul_peak(device)
    peak = max(peak_before, peak_after)  # before and after the arms: the better of the two
    tokens = float(np.mean([e.num_tokens for e in encs]))
    mean = {a: float(np.mean(v)) for a, v in times.items()}
    share = {
        a: sum(full_layout_slices[n][1] - full_layout_slices[n][0] for n in (arms[a] or names)) / params for a in arms
    }
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "model": lm.model_id,
        "device": str(device),
        "params": params,
        "samples": len(encs),
        "reps": args.reps,
        "mean_tokens": tokens,
        "peak_flops": peak,
        "peak_flops_before_after": [peak_before, peak_after],
        "load_average_1min_at_end": os.getloadavg()[0],
        "arms": {
            a: {
                "matrices": arms[a] if a != "subset" else f"{len(arms[a])} matrices ({subset_label})",
                "share_of_parameters": share[a],
                "seconds_per_sample": mean[a],
                "speedup_vs_full": mean["full"] / mean[a],
                "max_rel_diff_vs_full_slices": worst.get(a, 0.0),
            }
            for a in arms
        },
        "full_fraction_of_peak": 6 * params * tokens / mean["full"] / peak,
    }
    out = ROOT / "bench" / "results" / f"matrices_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{lm.model_id}, {len(encs)} samples of {tokens:.0f} tokens on average, {device}; "
        f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; full backward at {result['full_fraction_of_peak']:.0%} of it"
    )
    header = ["arm", "matrices", "share of parameters", "s per sample", "speed-up vs full"]
    rows = []
    for a, r in result["arms"].items():
        what = "all" if a == "full" else (r["matrices"] if isinstance(r["matrices"], str) else r["matrices"][0])
        share, seconds = f"{r['share_of_parameters']:.2%}", f"{r['seconds_per_sample']:.2f}"
        rows.append(
            [a, what, share, seconds, f"{r['speedup_vs_full']:.2f}x", f"{r['max_rel_diff_vs_full_slices']:.1e}"]
        )
    print(common.markdown_table([*header, "max rel. diff vs full's slices"], rows))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
