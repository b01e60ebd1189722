"""Per-matrix fidelity of the projections against exact gradients, per method, size and allocation rule.

    uv run python bench/bench_fidelity.py [--samples 12] [--max-length 256] [--sizes 16384 65536 262144]

On the embedded model (SmolLM2-135M-Instruct) and the first --samples usable rows of the bundled data (the
--calibration rows after them calibrate the sketches' allocations, once for every rule and size): exact fp32
per-sample gradients are formed once and kept, then for every pair of samples and every parameter matrix the
cosine of the matrix's projected gradients is compared with that of its exact ones.
  countsketch    every --allocation rule and --sizes total, sketched from the kept exact gradients
  tensorsketch   --tensorsketch-rules at 65,536 (or the largest size below), formed in the hooks (a backward each)
  factorized     --factorized-dims per matrix (LoGra's Kronecker sketch, one backward per sample)
For each: the distribution over matrices of each matrix's cosine error (mean |error| over the pairs: median,
p90, worst), the p90 of |error| over every (pair, matrix), the whole-model cosine error beside them, how many
matrices per_matrix_fidelity flags noisy, and how its predicted sd compares with the observed one.
Results: <out>/fidelity_<UTC time>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_featurize  # noqa: E402  (the machine description every bench shares)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "gradsim" / "bundled" / "lima_sample" / "original.jsonl"


def per_matrix_gram(x: torch.Tensor, slices) -> np.ndarray:
    """(n, n, M) fp64 dot products of the rows of x (n, D) within each matrix's slice."""
    return np.stack([(x[:, lo:hi].double() @ x[:, lo:hi].double().T).numpy() for _, lo, hi in slices], axis=-1)


def cosines(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-matrix (n, n, M) and whole-model (n, n) cosines of a per-matrix Gram array."""
    d = np.sqrt(np.einsum("iim->im", gram))
    per = gram / (d[:, None, :] * d[None, :, :] + 1e-300)
    whole = gram.sum(-1)
    n = np.sqrt(np.diag(whole))
    return per, whole / np.outer(n, n)


def compare(exact_gram: np.ndarray, gram: np.ndarray, fid: dict) -> dict:
    ce, we = cosines(exact_gram)
    cs, ws = cosines(gram)
    iu = np.triu_indices(gram.shape[0], 1)
    err = np.abs(cs[iu] - ce[iu])  # (pairs, M)
    per_matrix = err.mean(0)
    whole = np.abs(ws[iu] - we[iu])
    mats = list(fid["matrices"].values())
    sd = np.array([m["predicted_sd"] for m in mats])
    noisy = np.array([m["noisy"] for m in mats])
    sketched = sd > 0
    rms = np.sqrt((err**2).mean(0))
    observed_p90 = np.percentile(err, 90, axis=0)
    k = np.array([m["dims"] for m in mats])[sketched]
    return {
        "dims": int(sum(m["dims"] for m in mats)),
        "sketched_dims": {"min": int(k.min()), "median": int(np.median(k)), "max": int(k.max())} if k.size else None,
        "pairs": int(err.shape[0]),
        "matrices": int(err.shape[1]),
        "per_matrix_mae": {
            "median": float(np.median(per_matrix)),
            "p90": float(np.percentile(per_matrix, 90)),
            "worst": float(per_matrix.max()),
        },
        "pooled_p90": float(np.percentile(err, 90)),
        "matrices_p90_over_0.05": int((observed_p90 > 0.05).sum()),
        "whole_mae": float(whole.mean()),
        "whole_max": float(whole.max()),
        "exact_matrices": int((~sketched).sum()),
        "flagged_noisy": int(noisy.sum()),
        # Among the flagged, how many really have a p90 error over 0.05 on these pairs; among the rest, how many not.
        "flag_precision": float((observed_p90[noisy] > 0.05).mean()) if noisy.any() else None,
        "unflagged_ok": float((observed_p90[~noisy] <= 0.05).mean()) if (~noisy).any() else None,
        "observed_over_predicted_sd": float(np.median(rms[sketched] / sd[sketched])) if sketched.any() else None,
    }


def machine_info() -> dict:
    """bench_featurize's machine description, with the load average before the run."""
    return {**bench_featurize.machine_info(), "loadavg_before": list(os.getloadavg())}


def run(args) -> dict:
    from gradsim.config import ALLOCATIONS, Config
    from gradsim.core.gradients import GradientComputer
    from gradsim.core.model import load_model
    from gradsim.core.projection import (
        CountSketchFeaturizer,
        FactorizedFeaturizer,
        TensorSketchFeaturizer,
        allocation_from_shares,
        calibration_shares,
        per_matrix_fidelity,
    )
    from gradsim.data.encode import encode
    from gradsim.data.load import load_samples
    from gradsim.errors import GradsimError

    t_start = time.perf_counter()
    torch.manual_seed(0)
    lm = load_model(Config(device="cpu"))
    rows = load_samples(str(args.data))
    usable = []  # rows with a response token left at --max-length
    for s in rows:
        try:
            usable.append(encode(lm.tokenizer, s, args.max_length))
        except GradsimError:
            continue
        if len(usable) == args.samples + args.calibration:
            break
    encs, cal = usable[: args.samples], usable[args.samples :]
    names, shares = calibration_shares(lm.model, lm.device, "float32", cal)
    shapes = [tuple(p.shape) for p in lm.model.parameters() if p.requires_grad]

    gc = GradientComputer(lm.model, lm.device)
    exact = torch.empty(len(encs), gc.layout.total)
    for i, e in enumerate(encs):
        exact[i] = gc.gradient(e)
    gc.release()
    exact_gram = per_matrix_gram(exact, gc.layout.slices())
    print(f"exact gradients and Gram: {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    records = []

    def add(method, rule, size, f, feats, seconds):
        rec = {"method": method, "allocation": rule, "size": size, "seconds": round(seconds, 1)}
        rec.update(compare(exact_gram, per_matrix_gram(feats, f.layout.slices()), per_matrix_fidelity(f)))
        records.append(rec)
        print(f"{method} {rule} {size}: {rec}", file=sys.stderr, flush=True)

    for size in args.sizes:
        for rule in ALLOCATIONS:
            t0 = time.perf_counter()
            alloc = allocation_from_shares(names, shapes, shares, size, [e.id for e in cal], "coprime", rule)
            f = CountSketchFeaturizer(lm.model, lm.device, "float32", size, 42, allocation=alloc, rule=rule)
            feats = torch.stack([f.sketch(g, torch.empty(f.layout.total)) for g in exact])
            add("countsketch", rule, size, f, feats, time.perf_counter() - t0)
            del f
    size = max([s for s in args.sizes if s <= 65536] or args.sizes)
    for rule in args.tensorsketch_rules:
        t0 = time.perf_counter()
        alloc = allocation_from_shares(names, shapes, shares, size, [e.id for e in cal], "fft", rule)
        f = TensorSketchFeaturizer(lm.model, lm.device, "float32", size, 42, allocation=alloc, rule=rule)
        feats = torch.cat([f.features_batch([e]) for e in encs])
        add("tensorsketch", rule, size, f, feats, time.perf_counter() - t0)
    for k in args.factorized_dims:
        t0 = time.perf_counter()
        f = FactorizedFeaturizer(lm.model, lm.device, "float32", k, 42)
        feats = torch.cat([f.features_batch([e]) for e in encs])
        add("factorized", "-", k, f, feats, time.perf_counter() - t0)
    return {
        "machine": machine_info(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": lm.model_id,
        "tokens": [e.num_tokens for e in encs],
        "seconds": round(time.perf_counter() - t_start, 1),
        "records": records,
    }


def table(out: dict) -> str:
    lines = [
        "| method | allocation | size | dims | exact matrices | sketched dims min / median | "
        "per-matrix cos err median | p90 | worst | pooled p90 | whole-model cos MAE | whole max | flagged noisy | "
        "flag precision | observed/predicted sd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in out["records"]:
        pm = r["per_matrix_mae"]
        sk = r["sketched_dims"] or {}
        lines.append(
            f"| {r['method']} | {r['allocation']} | {r['size']} | {r['dims']} | {r['exact_matrices']} | "
            f"{sk.get('min', '-')} / {sk.get('median', '-')} | "
            f"{pm['median']:.4f} | {pm['p90']:.4f} | {pm['worst']:.4f} | {r['pooled_p90']:.4f} | "
            f"{r['whole_mae']:.4f} | {r['whole_max']:.4f} | {r['flagged_noisy']}/{r['matrices']} | "
            f"{fmt(r['flag_precision'])} | {fmt(r['observed_over_predicted_sd'])} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--calibration", type=int, default=8, help="calibration rows (as gradsim runs)")
    p.add_argument("--data", type=Path, default=BUNDLED)
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144], help="countsketch totals")
    p.add_argument("--tensorsketch-rules", nargs="*", default=["norm", "norm-floor"])
    p.add_argument("--factorized-dims", type=int, nargs="*", default=[4096])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    out = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fidelity_{out['machine']['utc'].replace('-', '').replace(':', '')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(table(out))
    print(f"\n{out['seconds']} s; load average before {out['machine']['loadavg_before']}; written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
