"""Which partitions of submitted runs are done, running, pending or failed (with the tail of their log).

status.py and ``gradsim status``. Each submission by compute.py (``gradsim.cluster.slurm``) leaves
``submission.json`` beside its logs, naming its job array's tasks and their query ranges. Status reads
those, asks squeue/sacct about the tasks, counts what each unfinished range has scored from its progress
log, and shows the tail of a failed task's log. It only reads: nothing here submits, cancels or writes.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Optional

from gradsim.io import read_json, read_jsonl_tolerant
from gradsim.layout import SUBMISSION, partition_paths

# squeue/sacct states, as status reports them. A requeued task is PENDING again (or REQUEUED briefly).
PENDING_STATES = {
    "PENDING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "RESIZING",
    "SUSPENDED",
    "PREEMPTED",
}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


def _expand_job_id(raw: str) -> list[str]:
    """'12_[0-2,5]' (a pending array in squeue/sacct) -> ['12_0', '12_1', '12_2', '12_5']."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", raw)
    if not m:
        return [raw]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        a, _, b = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(a), int(b or a) + 1)]
    return out


def slurm_states(array_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason/exit code). sacct for history, then squeue (live, newer) over it."""
    states: dict[str, tuple[str, str]] = {}
    if not array_ids:
        return states
    ids = ",".join(sorted(set(array_ids)))
    for live, cmd in (
        (False, ["sacct", "-X", "-n", "-P", "-j", ids, "-o", "JobID,State,ExitCode"]),
        (True, ["squeue", "-h", "-r", "-t", "all", "-j", ids, "-o", "%i|%T|%r"]),
    ):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 3:
                continue
            state = parts[1].split()[0] if parts[1].strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
            for jid in _expand_job_id(parts[0]):
                if live and jid in states and state not in RUNNING_STATES | PENDING_STATES:
                    continue  # a finished task: sacct's exit code ("2:0") says more than squeue's NonZeroExitCode
                states[jid] = (state, parts[2])
    return states


def tail(path: Path, n: int = 15) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def queries_scored(run_dir: Path, s: int, e: int, num_queries: Optional[int] = None) -> int:
    paths = partition_paths(run_dir, s, e, num_queries)
    rows = read_jsonl_tolerant(paths.progress)
    n = sum(1 for r in rows if r.get("kind") == "query")
    for r in rows:
        if r.get("kind") == "block":
            try:
                import numpy as np

                with np.load(paths.blocks / r["file"]) as z:
                    n += len(z["index"])
            except (OSError, KeyError, ValueError):
                pass
    return n


def find_submissions(paths: list[Path]) -> list[Path]:
    """submission.json files under the given folders (a submission, a run's jobs folder, or an output dir)."""
    found: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == SUBMISSION:
            found.add(p.resolve())
        elif p.is_dir():
            found.update(x.resolve() for x in p.rglob(SUBMISSION))
    return sorted(found, key=lambda x: (x.parent.parent, x.parent.name))


def collect_status(paths: list[Path], tail_lines: int = 15) -> list[dict]:
    """One entry per run: the latest task of each range and what it is doing."""
    runs: dict[str, dict] = {}
    for sub in find_submissions(paths):
        rec = read_json(sub)
        run = runs.setdefault(rec["run_dir"], {"run_dir": rec["run_dir"], "ranges": {}, "submissions": []})
        run["submissions"].append(str(sub.parent))
        run["num_queries"] = rec["num_queries"]
        # The newest submission's split is the run's; an older task still counts for a range it shares.
        run["ranges"] = {(s, e): run["ranges"].get((s, e)) for s, e in rec["ranges"]}
        for t in rec["tasks"]:
            run["ranges"][(t["start"], t["end"])] = dict(t, backend=rec["backend"], sub_dir=rec["sub_dir"])
    all_ids = [t["job_id"].split("_")[0] for r in runs.values() for t in r["ranges"].values() if t]
    states = slurm_states(all_ids)
    out = []
    for run in runs.values():
        run_dir = Path(run["run_dir"])
        rows = []
        for (s, e), t in sorted(run["ranges"].items()):
            row: dict[str, Any] = {"start": s, "end": e, "job_id": t["job_id"] if t else None}
            slurm_state, why = states.get(t["job_id"], ("", "")) if t else ("", "")
            row["slurm_state"] = slurm_state
            if partition_paths(run_dir, s, e, run.get("num_queries")).results.exists():
                row["status"] = "done"
            elif t is None:
                row["status"] = "not submitted"
            elif slurm_state in RUNNING_STATES:
                row["status"] = "running"
            elif slurm_state in PENDING_STATES:
                row["status"] = "pending"
                row["reason"] = why
            elif slurm_state:
                row["status"] = "failed"
                row["reason"] = (
                    f"{slurm_state} (exit {why})" if slurm_state != "COMPLETED" else "COMPLETED without a results file"
                )
            else:
                row["status"] = "unknown"
                row["reason"] = "not in squeue or sacct (accounting off, or purged)"
            if row["status"] != "done":
                row["scored"] = queries_scored(run_dir, s, e, run.get("num_queries"))
            if row["status"] in ("failed", "unknown") and t:
                row["log_tail"] = {lp: tail(Path(lp), tail_lines) for lp in t["logs"]}
            rows.append(row)
        counts = {k: sum(r["status"] == k for r in rows) for k in ("done", "running", "pending", "failed")}
        out.append(
            {
                "run_dir": str(run_dir),
                "num_queries": run.get("num_queries"),
                "partitions": rows,
                "counts": counts,
                "submissions": run["submissions"],
            }
        )
    return out


def format_status(runs: list[dict]) -> str:
    if not runs:
        return "no submissions found (compute.py writes submission.json under <output-dir>/slurm/)"
    lines = []
    for run in runs:
        c = run["counts"]
        lines.append(
            f"{run['run_dir']}: {len(run['partitions'])} partitions of {run['num_queries']} queries: "
            f"{c['done']} done, {c['running']} running, {c['pending']} pending, {c['failed']} failed"
        )
        for r in run["partitions"]:
            job = f"job {r['job_id']}" if r["job_id"] else ""
            extra = ""
            if "scored" in r:
                extra = f"{r['scored']}/{r['end'] - r['start']} queries scored"
            if r.get("reason"):
                extra = f"{r['reason']}; {extra}" if extra else r["reason"]
            lines.append(f"  [{r['start']}, {r['end']})  {r['status']:<13} {job:<16} {extra}".rstrip())
            for path, t in r.get("log_tail", {}).items():
                lines.append(f"      --- last lines of {path}:" if t else f"      --- {path}: no log (never started?)")
                lines += [f"      | {x}" for x in t]
        whole = [(r["start"], r["end"]) for r in run["partitions"]] == [(0, run["num_queries"])]
        if whole and c["done"]:
            merged = partition_paths(Path(run["run_dir"]), 0, run["num_queries"], run["num_queries"]).results
            lines.append(f"  done (one partition, nothing to combine): {merged}")
        elif c["done"] == len(run["partitions"]):
            lines.append(f"  all done: python slurm_scripts/batch_processing/combine.py {run['run_dir']}")
        elif c["failed"]:
            lines.append("  rerun the same compute.py command to resubmit the unfinished partitions")
    return "\n".join(lines)
