"""Featurization benchmark: the original study's approach, a naive loop + traker, and gradsim, side by side.

    uv run python bench/bench_featurize.py [--samples 64] [--fidelity-samples 16] [--out bench/results]

Every method runs in its own child process (so peak RSS is its own) on the same real-length samples:
the first --samples rows of ../shared/data/lima/train.jsonl when present, else the bundled sample.
  peak           fp32 and bf16 matmul GFLOP/s on this machine, now (the bound the others are measured against)
  a-original     the original study: per query, its gradient and its 5 candidates' gradients, each from its
                 own forward/backward, cosine of the full flattened gradients (measured on --a-queries queries)
  b-naive-trak   exact gradient + traker BasicProjector on the whole flattened gradient (k = --b-dim); the
                 projection is timed on the first --b-params entries and extrapolated linearly (its cost is
                 generating grad_dim x k normals), labelled as such
  exact-*        gradsim exact per-sample gradients (fp32 / bf16)
  factorized-*   gradsim LoGra-style projection (per-matrix k; fp32 / bf16; batch sizes)
  trak-*         gradsim exact gradients + traker's projector per parameter matrix
  tensorsketch-* gradsim TensorSketch per matrix formed in the hooks, no exact gradient (the default projection);
                 dims shared by norm, calibrated on the 8 rows after the benchmark's
  countsketch-*  gradsim exact gradients + a CountSketch per matrix, dims shared by norm, same calibration;
                 countsketch-sweep: other sizes' fidelity from the kept exact gradients
Fidelity is measured on the first --fidelity-samples samples: the Gram matrix of each method's features
(per parameter matrix) against that of the exact fp32 gradients, as whole-model cosine errors and as
top-1 agreement (for each sample, is its most similar other sample the same?).
Results: <out>/bench_<UTC time>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (what every bench shares)
from common import LIMA, ROOT, machine_info  # noqa: E402, F401  (bench_sketch_overhead imports them from here)

BUNDLED = common.BUNDLED / "original.jsonl"


def load(args):
    from gradsim.config import Config
    from gradsim.core.model import load_model
    from gradsim.data.encode import encode
    from gradsim.data.load import load_samples

    lm = load_model(Config(device="cpu"))
    rows = load_samples(str(args.data))
    encs = [encode(lm.tokenizer, s, args.max_length) for s in rows[: args.samples]]
    # countsketch's calibration: the 8 rows after the benchmark's (held out from it) when there are any
    cal = rows[args.samples : args.samples + 8] or rows[:8]
    args.calibration = [encode(lm.tokenizer, s, args.max_length) for s in cal]
    return lm, encs


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(dtype, n=2048, reps=6) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def gram_by_matrix(x, layout, chunk: int = 1 << 21) -> np.ndarray:
    """(n, n, M) per-matrix dot products of the rows of x ((n, D) array or memmap), fp64 accumulation."""
    g = np.zeros((x.shape[0], x.shape[0], len(layout.names)))
    for m, (_, lo, hi) in enumerate(layout.slices()):
        for c0 in range(lo, hi, chunk):
            block = torch.from_numpy(np.asarray(x[:, c0 : min(c0 + chunk, hi)], dtype=np.float64))
            g[:, :, m] += (block @ block.T).numpy()
    return g


def timed_features(featurizer, encs, batch: int):
    """(seconds, features of every sample as a list of (D,) fp32 arrays or None when not kept)."""
    t0 = time.perf_counter()
    out = []
    for b0 in range(0, len(encs), batch):
        chunk = encs[b0 : b0 + batch]
        f = (
            featurizer.features_batch(chunk)
            if hasattr(featurizer, "features_batch")
            else featurizer.features(chunk[0])[None]
        )
        out.extend(f.detach().float().cpu().numpy().copy())
    return time.perf_counter() - t0, out


def worker(args) -> dict:
    from gradsim.core.projection import FactorizedFeaturizer, TrakFeaturizer
    from gradsim.study.features import ExactFeaturizer

    torch.manual_seed(0)
    method = args.worker
    if method == "peak":
        # bf16 at 512^3: where the CPU has no bf16 instructions a 2048^3 bf16 matmul takes over a minute.
        return {
            "method": "peak",
            "fp32_gflops": matmul_gflops(torch.float32, reps=10),
            "bf16_gflops": matmul_gflops(torch.bfloat16, n=512, reps=3),
        }
    lm, encs = load(args)
    encs = encs[: args.worker_samples or len(encs)]
    tokens = sum(e.num_tokens for e in encs)
    nfid = min(args.fidelity_samples, len(encs))
    scratch = Path(args.scratch)
    rec = {"method": method, "samples": len(encs), "tokens": tokens}

    if method.startswith("exact"):
        dtype = method.split("-")[1]
        f = ExactFeaturizer(lm.model, lm.device, dtype)
        mm = np.lib.format.open_memmap(
            scratch / f"exact-{dtype}.npy", mode="w+", dtype=np.float32, shape=(nfid, f.layout.total)
        )
        rec["seconds"] = 0.0
        for i, e in enumerate(encs):
            t0 = time.perf_counter()
            g = f.features(e)
            rec["seconds"] += time.perf_counter() - t0  # not the copy of the kept gradients to disk
            if i < nfid:
                mm[i] = g.numpy()
        mm.flush()
        rec["backward_passes"] = f.backward_passes
        np.save(scratch / f"gram-{method}.npy", gram_by_matrix(mm, f.layout))
        if dtype == "bfloat16":  # per-sample gradient cosine against fp32
            ref = np.load(scratch / "exact-float32.npy", mmap_mode="r")
            rec["cosine_vs_fp32"] = [
                float(np.dot(mm[i], ref[i]) / np.linalg.norm(mm[i]) / np.linalg.norm(ref[i])) for i in range(nfid)
            ]
        rec["layout"] = f.layout.names
    elif method.startswith(("factorized", "trak")):
        kind, k, dtype, batch = method.split("-")  # e.g. factorized-4096-float32-b1
        cls = FactorizedFeaturizer if kind == "factorized" else TrakFeaturizer
        f = cls(lm.model, lm.device, dtype, int(k), 42, int(batch[1:]))
        n = len(encs) if kind == "factorized" else min(len(encs), args.trak_samples)
        rec["samples"], rec["tokens"] = n, sum(e.num_tokens for e in encs[:n])
        rec["seconds"], feats = timed_features(f, encs[:n], int(batch[1:]))
        rec["backward_passes"] = f.backward_passes
        rec["dims"] = int(f.layout.total)
        if n >= nfid:
            np.save(scratch / f"gram-{method}.npy", gram_by_matrix(np.stack(feats[:nfid]), f.layout))
    elif method.startswith("tensorsketch"):
        from gradsim.core.projection import TensorSketchFeaturizer

        _, k, dtype, batch = method.split("-")
        t0 = time.perf_counter()
        f = TensorSketchFeaturizer(lm.model, lm.device, dtype, int(k), 42, int(batch[1:]), calibration=args.calibration)
        rec["seconds_calibration"] = time.perf_counter() - t0
        rec["calibration_samples"] = len(args.calibration)
        rec["seconds"], feats = timed_features(f, encs, int(batch[1:]))
        rec["backward_passes"] = f.backward_passes
        rec["dims"] = int(f.layout.total)
        rec["exact_matrices"] = int(sum(f.exact))
        np.save(scratch / f"gram-{method}.npy", gram_by_matrix(np.stack(feats[:nfid]), f.layout))
    elif method.startswith("countsketch-sweep"):
        # Fidelity at other sizes, from the exact fp32 gradients the exact worker kept (sketching is linear).
        from gradsim.core.projection import CountSketchFeaturizer

        ref = np.load(scratch / "exact-float32.npy", mmap_mode="r")
        rec["fidelity_by_dims"] = {}
        for k in args.sketch_dims:
            f = CountSketchFeaturizer(lm.model, lm.device, "float32", k, 42, calibration=args.calibration)
            feats = np.stack(
                [
                    f.sketch(torch.from_numpy(np.array(ref[i])), torch.empty(f.layout.total)).numpy()
                    for i in range(ref.shape[0])
                ]
            )
            np.save(scratch / f"gram-countsketch-{k}-sweep.npy", gram_by_matrix(feats, f.layout))
            rec["fidelity_by_dims"][k] = int(f.layout.total)
        rec["samples"] = 0
    elif method.startswith("countsketch"):
        from gradsim.core.projection import CountSketchFeaturizer

        _, k, dtype, batch = method.split("-")
        t0 = time.perf_counter()
        f = CountSketchFeaturizer(lm.model, lm.device, dtype, int(k), 42, calibration=args.calibration)
        rec["seconds_calibration"] = time.perf_counter() - t0
        rec["calibration_samples"] = len(args.calibration)
        t_sketch = 0.0
        feats = []
        t0 = time.perf_counter()
        for e in encs:
            g = f.computer.gradient(e)
            t1 = time.perf_counter()
            feats.append(f.sketch(g, torch.empty(f.layout.total)).numpy().copy())
            t_sketch += time.perf_counter() - t1
        rec["seconds"] = time.perf_counter() - t0
        rec["seconds_sketch"] = t_sketch
        rec["backward_passes"] = f.backward_passes
        rec["dims"] = int(f.layout.total)
        rec["exact_matrices"] = int(sum(f.exact))
        np.save(scratch / f"gram-{method}.npy", gram_by_matrix(np.stack(feats[:nfid]), f.layout))
    elif method == "a-original":
        from gradsim.core.gradients import GradientComputer

        gc = GradientComputer(lm.model, lm.device)
        nq = min(args.a_queries, len(encs) - 5)
        t0 = time.perf_counter()
        for qi in range(nq):  # candidates: the next 5 samples (the protocol's 1-of-5)
            q = gc.gradient(encs[qi]).clone()
            for ci in range(qi + 1, qi + 6):
                c = gc.gradient(encs[ci])
                float(torch.dot(q, c) / (q.norm() * c.norm()))
        rec["seconds"] = time.perf_counter() - t0
        rec.update(
            queries=nq,
            backward_passes=gc.backward_passes,
            samples=6 * nq,
            tokens=sum(encs[qi].num_tokens + sum(e.num_tokens for e in encs[qi + 1 : qi + 6]) for qi in range(nq)),
        )
    elif method == "b-naive-trak":
        from trak.projectors import BasicProjector, ProjectionType

        ns = min(args.b_samples, len(encs))
        f = ExactFeaturizer(lm.model, lm.device)
        sub = min(args.b_params, f.layout.total)
        proj = BasicProjector(sub, args.b_dim, 0, ProjectionType.normal, lm.device)
        t_grad = t_proj = 0.0
        for e in encs[:ns]:
            t0 = time.perf_counter()
            g = f.features(e)
            t_grad += time.perf_counter() - t0
            t0 = time.perf_counter()
            proj.project(g[:sub][None].contiguous(), model_id=0)
            t_proj += time.perf_counter() - t0
        scale = f.layout.total / sub
        rec.update(
            samples=ns,
            tokens=sum(e.num_tokens for e in encs[:ns]),
            backward_passes=f.backward_passes,
            seconds_gradient=t_grad,
            seconds_projection_measured=t_proj,
            projected_params=sub,
            seconds=t_grad + t_proj * scale,
            extrapolated=f"projection x{scale:.1f} from {sub:,} of {f.layout.total:,} gradient entries",
            dims=args.b_dim,
        )
    else:
        raise SystemExit(f"unknown method {method}")
    rec["peak_rss_mb"] = peak_rss_mb()
    return rec


def fidelity(scratch: Path, method: str, exact_gram: np.ndarray) -> dict | None:
    p = scratch / f"gram-{method}.npy"
    if not p.exists():
        return None
    g = np.load(p)
    if g.shape != exact_gram.shape:  # featurized fewer samples than the fidelity set
        return None

    def whole_cos(gram):
        d = gram.sum(-1)
        n = np.sqrt(np.diag(d))
        return d / np.outer(n, n)

    a, b = whole_cos(exact_gram), whole_cos(g)
    off = ~np.eye(a.shape[0], dtype=bool)
    err = np.abs(a - b)[off]
    top_a = np.where(off, a, -np.inf).argmax(1)
    top_b = np.where(off, b, -np.inf).argmax(1)
    return {
        "cos_mae": float(err.mean()),
        "cos_max_err": float(err.max()),
        "top1_agreement": float((top_a == top_b).mean()),
        "pairs": int(off.sum()),
    }


def run_all(args) -> dict:
    from gradsim.core.projection import split_dim  # noqa: F401  (fail early if the package is broken)

    scratch = Path(tempfile.mkdtemp(prefix="gradsim-bench-", dir=args.scratch_dir))
    # Most important first: under a time limit the run can be stopped and what finished is kept.
    cs = f"countsketch-{args.sketch_dim}-float32-b1"
    ts = f"tensorsketch-{args.sketch_dim}-float32-b1"
    methods = ["peak", "exact-float32", ts, cs, "a-original"]
    methods += [f"tensorsketch-{k}-float32-b1" for k in args.sketch_dims if k != args.sketch_dim]
    methods += [f"factorized-{args.proj_dim}-float32-b1", f"factorized-{args.proj_dim}-bfloat16-b1", "exact-bfloat16"]
    methods += [f"factorized-{k}-float32-b1" for k in sorted(set(args.fidelity_dims) - {args.proj_dim})]
    methods += ["countsketch-sweep"]
    methods += [
        "b-naive-trak",
        f"trak-{args.trak_dim}-float32-b{args.trak_batch}",
        f"factorized-{args.proj_dim}-float32-b{args.batch}",
    ]
    if args.only:
        methods = [m for m in methods if m in ("peak", "exact-float32") or m in args.only]
    full = {"exact-float32", ts, cs} | set(args.full or [])
    out = {"machine": machine_info(), "argv": sys.argv, "data": str(args.data), "params": 134_515_008, "records": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_{out['machine']['utc'].replace(':', '')}.json"
    for m in methods:
        load_before = os.getloadavg()
        # Throughput on every sample for the headline methods; the other variants on the fidelity samples.
        n = args.samples if m in full else args.bf16_samples if "bfloat16" in m else args.fidelity_samples
        cmd = [sys.executable, __file__, "--worker", m, "--scratch", str(scratch), "--worker-samples", str(n)]
        cmd += passthrough(args)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rec = {"method": m, "error": res.stderr[-2000:]}
        else:
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            rec.setdefault("method", m)
        rec["wall_s"] = time.perf_counter() - t0
        rec["loadavg_before"], rec["loadavg_after"] = load_before, os.getloadavg()
        if (scratch / "gram-exact-float32.npy").exists():
            exact_gram = np.load(scratch / "gram-exact-float32.npy")
            rec["fidelity"] = fidelity(scratch, m, exact_gram)
            for k, dims in (rec.get("fidelity_by_dims") or {}).items():
                rec["fidelity_by_dims"][k] = dict(fidelity(scratch, f"countsketch-{k}-sweep", exact_gram), dims=dims)
        out["records"].append(rec)
        path.write_text(json.dumps(out, indent=1))  # after every method: a stopped run keeps what finished
        print(
            f"{m}: {json.dumps({k: v for k, v in rec.items() if k not in ('layout', 'cosine_vs_fp32')})}",
            file=sys.stderr,
            flush=True,
        )
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    out["path"] = str(path)
    return out


def passthrough(args) -> list[str]:
    return [
        "--samples",
        str(args.samples),
        "--fidelity-samples",
        str(args.fidelity_samples),
        "--data",
        str(args.data),
        "--max-length",
        str(args.max_length),
        "--a-queries",
        str(args.a_queries),
        "--b-samples",
        str(args.b_samples),
        "--b-params",
        str(args.b_params),
        "--b-dim",
        str(args.b_dim),
        "--trak-samples",
        str(args.trak_samples),
        "--sketch-dims",
        *map(str, args.sketch_dims),
    ]


def table(out: dict) -> str:
    recs = {r["method"]: r for r in out["records"] if "error" not in r}
    peak = recs["peak"]
    params = out["params"]
    lines = [
        f"matmul peak (this run): fp32 {peak['fp32_gflops']:.0f} GFLOP/s, bf16 {peak['bf16_gflops']:.0f} GFLOP/s",
        "",
        "| method | dims | samples | samples/s | backward passes | peak RSS MB | % fp32 matmul peak (6PT) | "
        "cos MAE | cos max err | top-1 agree | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in recs.items():
        for k, fid in (r.get("fidelity_by_dims") or {}).items():
            lines.append(
                f"| countsketch-{k} (from kept exact grads) | {fid['dims']} | {fid['pairs']} pairs | n/a | n/a | "
                f"n/a | n/a | {fid['cos_mae']:.4f} | {fid['cos_max_err']:.4f} | {fid['top1_agreement']:.4f} | "
                f"{r['loadavg_before'][0]:.1f} |"
            )
        if name == "peak" or "seconds" not in r:
            continue
        sps = r["samples"] / r["seconds"]
        frac = 6 * params * r["tokens"] / r["seconds"] / 1e9 / peak["fp32_gflops"]
        fid = r.get("fidelity") or {}
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "n/a"  # noqa: E731
        lines.append(
            f"| {name}{' (extrapolated)' if 'extrapolated' in r else ''} | {r.get('dims', 'full')} | "
            f"{r['samples']} | {sps:.3f} | {r['backward_passes']} | {r['peak_rss_mb']:.0f} | {100 * frac:.0f}% | "
            f"{fmt(fid.get('cos_mae'))} | {fmt(fid.get('cos_max_err'))} | {fmt(fid.get('top1_agreement'))} | "
            f"{r['loadavg_before'][0]:.1f} |"
        )
    return "\n".join(lines)


def ratios(out: dict) -> str:
    """The issue's targets as ratios of this run's measurements."""
    r = {x["method"]: x for x in out["records"] if "seconds" in x or "fp32_gflops" in x}
    # Per token: methods ran on different subsets (64 samples, the 16 fidelity ones, (a)'s queries and
    # candidates) of different mean lengths; s/token x the 64 samples' mean length compares like with like.
    ref = r.get("exact-float32") or next(x for x in r.values() if "seconds" in x)
    mean_len = ref["tokens"] / ref["samples"]
    per = {m: x["seconds"] / x["tokens"] * mean_len for m, x in r.items() if "seconds" in x}
    lines = [f"(times per sample of the benchmark's mean length, {mean_len:.0f} tokens: s/token x {mean_len:.0f})"]
    ex = per.get("exact-float32")
    for m, s in per.items():
        if m.startswith("factorized") and ex:
            lines.append(f"- {m}: {s / ex:.2f} x the time of an exact fp32 forward+backward per sample")
        if m.startswith(("countsketch", "tensorsketch")) and ex:
            x = r[m]
            part = (
                f"; the sketch itself {x['seconds_sketch'] / x['seconds']:.1%} of its time"
                if "seconds_sketch" in x
                else ""
            )
            lines.append(
                f"- {m}: {s / ex:.2f} x the time of an exact fp32 forward+backward per sample{part}; "
                f"calibration (once per run, {x['calibration_samples']} exact backwards) "
                f"{x['seconds_calibration']:.0f} s"
            )
    if "a-original" in r and ex:
        a = r["a-original"]
        a_q = 6 * a["seconds"] / a["tokens"] * mean_len  # 6 forward/backward passes per query
        for m, s in per.items():
            if m.startswith(("exact", "factorized", "countsketch", "tensorsketch")):
                # gradsim's 1-of-5: each query and each original featurized once (N queries, N originals);
                # with both settings, each original serves two queries (1.5 featurizations per query).
                lines.append(
                    f"- end-to-end 1-of-5 per query, (a) {a_q:.1f} s vs {m} {2 * s:.1f} s: {a_q / (2 * s):.1f}x "
                    f"(both settings: {a_q / (1.5 * s):.1f}x)"
                )
    for fp32, bf16 in (("exact-float32", "exact-bfloat16"),):
        if fp32 in per and bf16 in per:
            lines.append(f"- {bf16} throughput / {fp32}: {per[fp32] / per[bf16]:.2f}x")
    for m, x in r.items():
        if m.startswith("factorized") and m.endswith("bfloat16-b1"):
            f32 = m.replace("bfloat16", "float32")
            if f32 in per:
                lines.append(f"- {m} throughput / {f32}: {per[f32] / per[m]:.2f}x")
    if "exact-bfloat16" in r and r["exact-bfloat16"].get("cosine_vs_fp32"):
        c = r["exact-bfloat16"]["cosine_vs_fp32"]
        lines.append(
            f"- bf16 vs fp32 exact gradient cosine: mean {np.mean(c):.5f}, min {np.min(c):.5f} ({len(c)} samples)"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--fidelity-samples", type=int, default=16)
    p.add_argument("--data", type=Path, default=LIMA if LIMA.exists() else BUNDLED)
    p.add_argument("--max-length", type=int, default=2048, help="the original study's context (longer samples are cut)")
    p.add_argument("--proj-dim", type=int, default=4096, help="factorized: per-matrix dims timed in bf16 and batched")
    p.add_argument(
        "--bf16-samples", type=int, default=16, help="samples for the bf16 methods (slow without bf16 hardware)"
    )
    p.add_argument("--fidelity-dims", type=int, nargs="+", default=[240, 1024, 4096])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--sketch-dim", type=int, default=65536, help="tensorsketch, countsketch: total dims timed on every sample"
    )
    p.add_argument(
        "--sketch-dims",
        type=int,
        nargs="+",
        default=[16384, 65536, 262144],
        help="total dims whose fidelity is measured: countsketch from the kept exact gradients, "
        "tensorsketch by featurizing the fidelity samples",
    )
    p.add_argument("--a-queries", type=int, default=2)
    p.add_argument("--b-samples", type=int, default=2)
    p.add_argument("--b-params", type=int, default=1_000_000)
    p.add_argument("--b-dim", type=int, default=4096)
    p.add_argument("--trak-samples", type=int, default=16)
    p.add_argument("--trak-dim", type=int, default=32)
    p.add_argument("--trak-batch", type=int, default=8, help="gradients projected per traker call (0.5 GB each)")
    p.add_argument("--only", nargs="+", help="run only these methods (plus peak and exact-float32)")
    p.add_argument(
        "--full",
        nargs="+",
        help="methods timed on every sample besides exact, tensorsketch and countsketch "
        "(the others run on the fidelity samples)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--scratch-dir", default=None, help="where exact gradients of the fidelity samples go (~0.5 GB each)"
    )
    p.add_argument("--report", type=Path, help="print the table and ratios of a saved bench_*.json, run nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--worker-samples", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.report:
        saved = json.loads(args.report.read_text())
        print(table(saved) + "\n\n" + ratios(saved))
        return 0
    out = run_all(args)
    print(table(out) + "\n\n" + ratios(out))
    print(f"\nwritten: {out['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
