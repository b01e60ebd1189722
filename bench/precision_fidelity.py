"""Which precision may a GPU run use by default? Each precision's ranking against fp32's, on the bundled study.

    uv run python bench/precision_fidelity.py [--device cpu|cuda] [--sample-size N] [--out DIR]

Runs the bundled study (both settings, exact gradients, 1-of-5 BM25 protocol, no baselines) once per
precision and compares each with the fp32 run:
  float32            the reference
  tf32               fp32 storage, matmul inputs rounded to TF32 (10-bit mantissa), fp32 accumulation: on CUDA
                     gradsim's own --dtype tf32; on the CPU, which has no TF32, emulated (every aten mm / bmm /
                     addmm / baddbmm of the forward and the backward gets its inputs rounded to TF32 first)
  bfloat16           --dtype bfloat16: bf16 autocast over fp32 weights and gradients
  bfloat16-weights   --dtype bfloat16-weights: weights and gradients in bf16
A precision passes when, in both settings, whole-model top-1 and MRR equal fp32's and so does every parameter
matrix's top-1 and MRR (the per-matrix table, and with it the ranking of the matrices, is fp32's). How many
(query, matrix) ranks moved is reported beside it. The
rule in gradsim.core.model.CUDA_DTYPE: the fastest passing precision is the default on CUDA.
Results: <out>/precision_<UTC time>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradsim.config import Config
from gradsim.core.metrics import true_rank
from gradsim.core.score import whole_and_per_matrix
from gradsim.layout import run_dir
from gradsim.study.run import run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_info  # noqa: E402  (what every bench shares)

ARMS = ("float32", "tf32", "bfloat16", "bfloat16-weights")


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (1 sign, 8 exponent, 10 mantissa bits; ties to even), as fp32."""
    if x.dtype != torch.float32:
        return x
    i = x.contiguous().view(torch.int32)
    lsb = (i >> 13) & 1
    rounded = (i + 0x0FFF + lsb) & ~0x1FFF
    return rounded.view(torch.float32).view(x.shape)


class EmulatedTF32(TorchDispatchMode):
    """Every fp32 matrix product (forward and backward) with its inputs rounded to TF32."""

    OPS = {"mm", "bmm", "addmm", "baddbmm"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in self.OPS:
            args = tuple(round_tf32(a) if isinstance(a, torch.Tensor) else a for a in args)
        return func(*args, **kwargs)


def per_setting_ranks(result: dict, run_dir: Path) -> dict:
    arrays = np.load(run_dir / "scores.npz")
    whole, per = whole_and_per_matrix(
        arrays["dots"], arrays["qself"], arrays["cself"], result["config"]["computation_type"]
    )
    return {
        "whole": true_rank(whole),
        "per_matrix": true_rank(np.moveaxis(per, -1, 1)),  # (Q, M)
        "summary": result["summary"]["whole_model"],
    }


def run_arm(arm: str, args, out: Path) -> tuple[dict, float]:
    dtype = arm
    emulate = arm == "tf32" and args.device == "cpu"
    if emulate:
        dtype = "float32"
    cfg = Config(
        setting="both",
        dtype=dtype,
        device=args.device,
        sample_size=args.sample_size,
        baselines=False,
        output_dir=str(out / arm),
    )
    t0 = time.perf_counter()
    if emulate:
        with EmulatedTF32():
            result = run(cfg)
    else:
        result = run(cfg)
    seconds = time.perf_counter() - t0
    ranks = {
        s: per_setting_ranks(r, run_dir(dataclasses.replace(cfg, setting=s))) for s, r in result["settings"].items()
    }
    # the exact path's seconds over every attempt (a resumed arm's wall time here is only its last attempt's)
    return ranks, next(iter(result["settings"].values()))["cost"]["seconds"] or seconds


def compare(ref: dict, other: dict) -> dict:
    """Per setting: whole-model top-1 and MRR, each matrix's top-1 and MRR (the per-matrix table, and so the
    ranking of the matrices), each against fp32's; and, as information, the (query, matrix) ranks that moved."""
    out = {}
    for setting in ref:
        a, b = ref[setting], other[setting]
        table_a = [(a["per_matrix"] == 1).mean(0), (1.0 / a["per_matrix"]).mean(0)]
        table_b = [(b["per_matrix"] == 1).mean(0), (1.0 / b["per_matrix"]).mean(0)]
        moved = a["per_matrix"] != b["per_matrix"]
        out[setting] = {
            "top1": b["summary"]["top1"],
            "mrr": b["summary"]["mrr"],
            "top1_equal": a["summary"]["top1"] == b["summary"]["top1"],
            "mrr_equal": a["summary"]["mrr"] == b["summary"]["mrr"],
            "whole_ranks_equal": bool((a["whole"] == b["whole"]).all()),
            "per_matrix_table_equal": bool(all((x == y).all() for x, y in zip(table_a, table_b))),
            "matrices_top1_differing": int((table_a[0] != table_b[0]).sum()),
            "matrices_mrr_differing": int((table_a[1] != table_b[1]).sum()),
            "max_matrix_top1_difference": float(np.abs(table_a[0] - table_b[0]).max()),
            "query_matrix_ranks_moved": int(moved.sum()),
            "query_matrix_cells": int(moved.size),
        }
    out["passes"] = all(
        v["top1_equal"] and v["mrr_equal"] and v["per_matrix_table_equal"] for k, v in out.items() if k != "passes"
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sample-size", type=int, default=None)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument(
        "--work", default=None, help="keep each arm's run here (default: a temporary folder); a rerun resumes them"
    )
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    report = {
        "machine": machine_info(),
        "argv": sys.argv,
        "device": args.device,
        "arms": {},
    }
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = Path(args.out) / f"precision_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gradsim-precision-") as tmp:
        work = Path(args.work or tmp)
        ref = None
        for arm in ["float32"] + [a for a in args.arms if a != "float32"]:
            ranks, seconds = run_arm(arm, args, work)
            print(f"{arm}: {seconds:.0f} s of gradients", file=sys.stderr, flush=True)
            ref = ranks if arm == "float32" else ref
            rec = {"seconds": seconds, "emulated": arm == "tf32" and args.device == "cpu"}
            rec.update(compare(ref, ranks))
            report["arms"][arm] = rec
            path.write_text(json.dumps(report, indent=1, default=str))  # after every arm
    print(
        "| precision | s | setting | top-1 | MRR | = fp32 top-1, MRR | matrices whose top-1 / MRR differ "
        "| (query, matrix) ranks moved | passes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for arm, rec in report["arms"].items():
        for setting in ("paraphrased", "model-generated"):
            v = rec[setting]
            name = f"{arm}{' (emulated)' if rec['emulated'] else ''}"
            print(
                f"| {name} | {rec['seconds']:.0f} | {setting} | {v['top1']:.4f} | {v['mrr']:.4f} "
                f"| {v['top1_equal'] and v['mrr_equal']} | {v['matrices_top1_differing']} / "
                f"{v['matrices_mrr_differing']} | {v['query_matrix_ranks_moved']} of {v['query_matrix_cells']} "
                f"| {rec['passes']} |"
            )
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
