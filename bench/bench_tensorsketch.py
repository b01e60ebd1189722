"""TensorSketch through the FFT only against the default (matrices with a large k sketched directly from
their weight gradient), side by side in one process, on the same samples:

    uv run python bench/bench_tensorsketch.py [--samples 6] [--sizes 65536 262144 1048576] [--frontier]

For each total size (and, with --frontier, the bundled frontier's multi-size pass: 2^10..2^20 in one
backward), seconds per sample with tensorsketch.DIRECT_RATIO = 0 (every matrix through the FFT) and with the
default, the number of matrices sketched directly, and the largest difference between the two feature
vectors relative to their largest entry (the two ways give the same sketch up to float rounding). The
embedded model, the bundled originals at full length; the first sample of each configuration is a warm-up.
Results: <out>/tensorsketch_<UTC time>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_featurize import machine_info, matmul_gflops  # noqa: E402

from gradsim.config import Config  # noqa: E402
from gradsim.core.model import load_model, resolve_device  # noqa: E402
from gradsim.core.multisize import make_multi_size  # noqa: E402
from gradsim.core.projection import tensorsketch  # noqa: E402
from gradsim.data.encode import encode  # noqa: E402
from gradsim.data.load import load_dataset  # noqa: E402
from gradsim.study.features import featurize  # noqa: E402

FRONTIER_SIZES = [2**10, 2**12, 2**14, 2**16, 2**18, 2**20]


def timed(spec, lm, encs, calibration, ratio: int) -> tuple[float, int, torch.Tensor]:
    tensorsketch.DIRECT_RATIO = ratio
    multi = make_multi_size(spec, lm.model, lm.device, dtype="float32", seed=42, calibration=calibration)
    direct = sum(
        s.direct for p in multi.parts for s in p.slots.values() if isinstance(s, tensorsketch._TensorSketchSlot)
    )
    featurize(multi, encs[:1], lm.device, "float32", "original")  # warm-up
    t0 = time.perf_counter()
    feats, _ = featurize(multi, encs[1:], lm.device, "float32", "original")
    return (time.perf_counter() - t0) / (len(encs) - 1), direct, torch.from_numpy(feats)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=6, help="timed samples + 1 warm-up")
    p.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144, 1048576])
    p.add_argument("--frontier", action="store_true", help="also the frontier's multi-size pass (2^10..2^20)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    default_ratio = tensorsketch.DIRECT_RATIO
    cfg = Config()
    lm = load_model(cfg, resolve_device(cfg))
    data = load_dataset(cfg.original_data, cfg.variant_data, None, "first")
    encs = [encode(lm.tokenizer, s, lm.context_length) for s in data.originals[: args.samples + 8]]
    calibration, encs = encs[:8], encs[8:]
    configs = [({"tensorsketch": [k]}, f"{k:,}") for k in args.sizes]
    if args.frontier:
        configs.append(({"tensorsketch": FRONTIER_SIZES}, "2^10..2^20 in one pass"))
    rows = []
    for spec, label in configs:
        fft_s, _, fft = timed(spec, lm, encs, calibration, 0)
        def_s, direct, feats = timed(spec, lm, encs, calibration, default_ratio)
        diff = float((feats - fft).abs().max() / fft.abs().max())
        rows.append({"sizes": label, "fft_s": fft_s, "default_s": def_s, "direct_matrices": direct, "rel_diff": diff})
        print(rows[-1], flush=True)
    out = {
        "machine": machine_info(),
        "fp32_matmul_gflops": matmul_gflops(torch.float32),
        "tokens": [e.num_tokens for e in encs[1:]],
        "direct_ratio": default_ratio,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tensorsketch_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\n{out['machine']}; fp32 matmul peak {out['fp32_matmul_gflops']:.0f} GFLOP/s; tokens {out['tokens']}\n")
    print("| total dims | FFT only, s/sample | default, s/sample | speed-up | matrices direct | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['sizes']} | {r['fft_s']:.2f} | {r['default_s']:.2f} | {r['fft_s'] / r['default_s']:.2f}x "
            f"| {r['direct_matrices']} | {r['rel_diff']:.1e} |"
        )
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
