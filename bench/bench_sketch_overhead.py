"""Interleaved A/B: the countsketch's cost on top of the exact backward, and the matmul speed at the model's own shapes.

    uv run python bench/bench_sketch_overhead.py [--samples 10]

Timing two methods in separate processes minutes apart (bench_featurize.py) carries this VM's run-to-run
noise (the same work varies by 10-20%); here, in one process and alternating sample by sample, each
sample's exact gradient is timed alone and then again followed by its sketch, so the difference is the
sketch's. It also times fp32 matmuls at the shapes of SmolLM2-135M's linear layers for a sequence of the
samples' mean length (forward and both backward products), the bound those layers could reach, beside
the 2048^3 square matmul peak. Writes bench/results/overhead_<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_featurize import BUNDLED, LIMA, machine_info, matmul_gflops  # noqa: E402


def shape_gflops(t: int, d: int = 576, ff: int = 1536, kv: int = 192, vocab: int = 49152, reps: int = 3) -> float:
    """fp32 GFLOP/s over one layer's linear products (q, k, v, o, gate, up, down) and lm_head at T tokens,
    each as forward (x W^T), input gradient (g W) and weight gradient (g^T x)."""
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)]
    flops, seconds = 0.0, 0.0
    for out_f, in_f in shapes + [(vocab, d)]:
        scale = 30 if (out_f, in_f) != (vocab, d) else 1  # 30 layers, one head
        x, w, g = torch.randn(t, in_f), torch.randn(out_f, in_f), torch.randn(t, out_f)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            x @ w.T
            g @ w
            g.T @ x
            best = min(best, time.perf_counter() - t0)
        flops += scale * 3 * 2 * t * in_f * out_f
        seconds += scale * best
    return flops / seconds / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--proj-dim", type=int, default=65536)
    p.add_argument("--data", type=Path, default=LIMA if LIMA.exists() else BUNDLED)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    from gradsim.config import Config
    from gradsim.core.model import load_model
    from gradsim.core.projection import CountSketchFeaturizer
    from gradsim.data.encode import encode
    from gradsim.data.load import load_samples

    lm = load_model(Config(device="cpu"))
    rows = load_samples(str(args.data))
    encs = [encode(lm.tokenizer, s, 2048) for s in rows[: args.samples]]
    cal = [encode(lm.tokenizer, s, 2048) for s in (rows[64:72] or rows[:8])]
    f = CountSketchFeaturizer(lm.model, lm.device, "float32", args.proj_dim, 42, calibration=cal)
    f.computer.gradient(encs[0])  # warm-up
    t_grad = t_both = t_sketch = 0.0
    for e in encs:
        t0 = time.perf_counter()
        f.computer.gradient(e)
        t_grad += time.perf_counter() - t0
        t0 = time.perf_counter()
        g = f.computer.gradient(e)
        t1 = time.perf_counter()
        f.sketch(g, torch.empty(f.layout.total))
        t_both += time.perf_counter() - t0
        t_sketch += time.perf_counter() - t1
    mean_t = round(sum(e.num_tokens for e in encs) / len(encs))
    out = {
        "machine": machine_info(),
        "argv": sys.argv,
        "samples": len(encs),
        "mean_tokens": mean_t,
        "seconds_gradient_only": t_grad,
        "seconds_gradient_then_sketch": t_both,
        "seconds_sketch": t_sketch,
        "ratio": t_both / t_grad,
        "sketch_fraction_of_gradient": t_sketch / t_grad,
        "matmul_peak_2048_gflops": matmul_gflops(torch.float32),
        "matmul_model_shapes_gflops": shape_gflops(mean_t),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"overhead_{out['machine']['utc'].replace(':', '')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("machine", "argv")}, indent=1))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
