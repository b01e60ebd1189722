"""Byte-identity of two code versions' outputs: the bundled study (both settings), a projected run, a
partitioned run and its combine, select and frontier, run by each version on the same machine, every file compared.

Each version runs from its own checkout (a git worktree of --base / --head; "." is this working tree) on this
checkout's environment with PYTHONPATH pointing at that version's src/. Files are compared byte for byte; JSON
files that differ are compared again without the fields that change from one run to the next (wall times, the
code version, the attempt log), and reported as "equal but for" those. Exit 1 when any file differs otherwise, or
exists in one version only. Refactors of issue 25 keep this at 0.

  python bench/byte_identity.py --base caa3ebe            # that commit against this working tree
  python bench/byte_identity.py --base HEAD --head HEAD   # the same version twice: what varies by itself
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, doc_parser, log

# Fields that differ between two runs of one version: times, memory readings, the code that ran, the attempt log,
# the command line.
VOLATILE = {
    "seconds",
    "backward_seconds_per_token",
    "code_versions",
    "code_version",
    "attempts",
    "utc",
    "argv",
    "gradsim_version",  # the package version and the commit
    "peak_rss_mb",
    "peak_rss_bytes",
    "peak_device_bytes",
    "wall_seconds",
    "started",
    "finished",
}

N = "6"  # queries: enough for every stage to have work, small enough for a few minutes per version


def pipeline(src: Path, out: Path) -> list[list[str]]:
    py, main = sys.executable, str(src / "main.py")
    gradsim = [py, "-m", "gradsim"]
    exact = out / "exact" / "gradient-similarity"
    small = ["--sample-size", N, "-q"]
    return [
        [py, main, "--setting", "both", "--output-dir", str(out / "exact"), *small],
        [py, main, "--use-random-projection", "--proj-dim", "4096", "--output-dir", str(out / "proj"), *small],
        *[
            [py, main, "--partition-start", a, "--partition-end", b, "--output-dir", str(out / "parts"), *small]
            for a, b in (("0", "3"), ("3", N))
        ],
        [*gradsim, "combine", "--output-dir", str(out / "parts")],
        [*gradsim, "select", str(exact / "paraphrased")],
        [
            *gradsim,
            "frontier",
            str(exact / "paraphrased"),
            str(exact / "model-generated"),
            "--projections",
            "tensorsketch,countsketch",
            "--sizes",
            "1024,4096",
            "--splits",
            "2",
            "--max-size",
            "3",
            "--output-dir",
            str(out / "frontier"),
        ],
    ]


def checkout(rev: str, tmp: Path) -> Path:
    if rev == ".":
        return ROOT
    path = tmp / f"src-{rev}"
    add = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev]
    subprocess.run(add, check=True, capture_output=True)
    return path


def run_version(rev: str, tmp: Path, src: Path | None = None, name: str = "") -> Path:
    src = src or checkout(rev, tmp)
    out = tmp / f"out-{rev}{name}"
    env = {**os.environ, "PYTHONPATH": str(src / "src"), "PYTHONHASHSEED": "0"}
    for cmd in pipeline(src, out):
        log(f"[{rev}] {' '.join(Path(c).name if c.startswith('/') else c for c in cmd)}")
        done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"[{rev}] exit {done.returncode}: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return out


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def volatile_found(value, found: set) -> set:
    if isinstance(value, dict):
        for k, v in value.items():
            if k in VOLATILE:
                found.add(k)
            volatile_found(v, found)
    elif isinstance(value, list):
        for v in value:
            volatile_found(v, found)
    return found


def parse(path: Path, roots: dict[str, str]):
    """A JSON or JSONL file's values, with each version's own folders (its checkout, its outputs) written as the
    same placeholder; None for other files."""
    if path.suffix not in (".json", ".jsonl"):
        return None
    text = path.read_text()
    for root, name in roots.items():
        text = text.replace(root, name)
    if path.suffix == ".json":
        return [json.loads(text)]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def differences(a, b, where: str = "") -> list[str]:
    """The key paths where two parsed values differ (first few)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where or "(value)"]


def compare(a: Path, b: Path, roots_a: dict, roots_b: dict) -> tuple[list[str], list[str], list[str]]:
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    same, nearly, differ = [], [], []
    for rel in sorted(files_a | files_b, key=str):
        if rel not in files_a or rel not in files_b:
            differ.append(f"{rel} (only in {'head' if rel in files_b else 'base'})")
            continue
        pa, pb = a / rel, b / rel
        if pa.read_bytes() == pb.read_bytes():
            same.append(str(rel))
            continue
        ja, jb = parse(pa, roots_a), parse(pb, roots_b)
        if ja is not None and strip(ja) == strip(jb):
            nearly.append(f"{rel} (but for {', '.join(sorted(volatile_found(ja, set())))})")
        elif ja is not None:
            diff = differences(strip(ja), strip(jb))
            differ.append(f"{rel}: {', '.join(diff[:4])}" + (f" and {len(diff) - 4} more" if len(diff) > 4 else ""))
        else:
            differ.append(str(rel))
    return same, nearly, differ


def main() -> int:
    ap = doc_parser(__doc__)
    ap.add_argument("--base", default="HEAD", help="git revision, or . for this working tree (default: HEAD)")
    ap.add_argument("--head", default=".", help="git revision, or . for this working tree (default: .)")
    ap.add_argument("--keep", action="store_true", help="keep the worktrees and outputs (printed)")
    ap.add_argument("--compare", type=Path, help="only compare the outputs kept (--keep) in this folder again")
    args = ap.parse_args()
    tmp = args.compare or Path(tempfile.mkdtemp(prefix="gradsim-identity-"))
    args.keep = args.keep or args.compare is not None
    try:
        if args.compare:
            out_a, out_b = tmp / f"out-{args.base}", tmp / f"out-{args.head}"
        else:
            out_a = run_version(args.base, tmp)
        if args.compare:
            pass
        elif args.head != args.base:
            out_b = run_version(args.head, tmp)
        else:  # the same version twice: what varies by itself
            out_b = run_version(args.base, tmp, ROOT if args.base == "." else tmp / f"src-{args.base}", "-again")
        src_a = ROOT if args.base == "." else tmp / f"src-{args.base}"
        src_b = ROOT if args.head == "." else tmp / f"src-{args.head}"
        roots_a = {str(out_a): "<out>", str(src_a): "<checkout>"}
        roots_b = {str(out_b): "<out>", str(src_b): "<checkout>"}
        same, nearly, differ = compare(out_a, out_b, roots_a, roots_b)
        print(
            f"{args.base} vs {args.head}: {len(same)} files byte-identical, {len(nearly)} equal but for "
            f"run-to-run fields, {len(differ)} different"
        )
        for line in nearly:
            print(f"  equal  {line}")
        for line in differ:
            print(f"  DIFFER {line}")
        return 1 if differ else 0
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            for wt in tmp.glob("src-*"):
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
