"""Can this node run gradsim on its device? What torch, CUDA and the driver say (``gradsim doctor``).

The same facts name what is missing when a run asks for CUDA and finds none (model.resolve_device): a GPU
task that silently fell back to the CPU would run for days within a memory request sized for the GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

# The locked torch is a CUDA 13 build: its kernels need an NVIDIA driver of the 580 series or newer.
DRIVER_FOR_CUDA = {"13": 580, "12": 525, "11": 450}


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> Optional[float]:
    """The tightest CPU quota, in CPUs, over this process's cgroup and its ancestors (a container's --cpus, a
    Slurm job under cgroup CPU limits), cgroup v2 (cpu.max) or v1 (cpu.cfs_quota_us / cpu.cfs_period_us); None
    where no quota is set or none can be read."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    best: Optional[float] = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            bases, v2 = [root, root / "unified"], True
        elif "cpu" in controllers.split(","):
            bases, v2 = [root / "cpu", root / "cpu,cpuacct"], False
        else:
            continue
        for base in bases:
            d = base / path.lstrip("/")
            while True:
                cpus = None
                try:
                    if v2:
                        quota, period = (d / "cpu.max").read_text().split()[:2]
                        if quota != "max":
                            cpus = int(quota) / int(period)
                    else:
                        quota = int((d / "cpu.cfs_quota_us").read_text())
                        if quota > 0:
                            cpus = quota / int((d / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    pass
                if cpus is not None and cpus > 0 and (best is None or cpus < best):
                    best = cpus
                if d == base or d.parent == d:
                    break
                d = d.parent
    return best


def cpu_threads() -> int:
    """How many threads this process's CPU share runs well: the CPUs it may run on (its affinity mask, which
    Slurm's task/affinity and taskset set) within its cgroup's CPU quota (a container's --cpus), at least 1."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    quota = cgroup_cpus()
    if quota is not None:
        allowed = min(allowed, max(1, int(quota)))  # a fraction of a CPU runs one thread
    return max(1, allowed)


def limit_cpu_threads() -> int:
    """Run torch's intra-op pool at most at cpu_threads() (torch sizes it from the machine's cores, not the
    cgroup quota); an OMP_NUM_THREADS or an earlier torch.set_num_threads below that is kept. Returns the count."""
    import torch

    threads = min(torch.get_num_threads(), cpu_threads())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def nvidia_smi(fields: str, timeout: float = 10) -> subprocess.CompletedProcess:
    """nvidia-smi's answer for ``--query-gpu=<fields>`` as CSV without a header (raises as subprocess.run does)."""
    cmd = ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def driver_version() -> Optional[str]:
    """The NVIDIA kernel driver's version, from /proc or nvidia-smi; None where neither says."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
        if m:
            return m.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = nvidia_smi("driver_version").stdout.strip()
            return out.splitlines()[0].strip() if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def facts() -> dict:
    """torch and its CUDA build, the driver, CUDA_VISIBLE_DEVICES, and each visible device with its memory."""
    import torch

    cuda_build = torch.version.cuda
    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda_build": cuda_build,
        "driver": driver_version(),
        "driver_needed": None,
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
    }
    if cuda_build:
        out["driver_needed"] = DRIVER_FOR_CUDA.get(cuda_build.split(".")[0])
    if out["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            props = torch.cuda.get_device_properties(i)
            out["devices"].append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gb": round(total / 2**30, 1),
                    "free_gb": round(free / 2**30, 1),
                    "bf16": bool(torch.cuda.is_bf16_supported()),
                }
            )
    return out


def cuda_missing(want: str) -> str:
    """One line: CUDA was asked for and is not there, what this node has, and what to do."""
    f = facts()
    build = f"CUDA {f['torch_cuda_build']} build" if f["torch_cuda_build"] else "CPU-only build"
    driver = f"driver {f['driver']}" if f["driver"] else "no NVIDIA driver found"
    if f["driver_needed"] and f["driver"]:
        major = int(f["driver"].split(".")[0])
        if major < f["driver_needed"]:
            driver += f" (this torch needs >= {f['driver_needed']})"
    visible = f["CUDA_VISIBLE_DEVICES"]
    visible = "unset" if visible is None else repr(visible)
    if not f["torch_cuda_build"]:
        todo = "install a CUDA build of torch (README: GPU clusters)"
    elif f["driver"] is None:
        todo = "run on a GPU node (sbatch --gres=gpu:1 / gradsim submit --gpus 1), or in a container with --nv"
    elif f["driver_needed"] and int(f["driver"].split(".")[0]) < f["driver_needed"]:
        todo = "install the torch build for this driver's CUDA (README: GPU clusters) or load a newer driver"
    else:
        todo = "check that the job was given a GPU (CUDA_VISIBLE_DEVICES) and run gradsim doctor there"
    return (
        f"device {want!r} asked for, but CUDA is not available here (torch {f['torch']}, {build}, {driver}, "
        f"CUDA_VISIBLE_DEVICES {visible}): {todo}; or run on the CPU with --device cpu (MT_DEVICE=cpu)"
    )


def format_facts(f: dict) -> str:
    build = f"CUDA {f['torch_cuda_build']}" if f["torch_cuda_build"] else "CPU-only"
    lines = [
        f"python        {f['python']}",
        f"torch         {f['torch']} ({build} build)",
        f"driver        {f['driver'] or 'none found'}"
        + (f" (this torch needs >= {f['driver_needed']})" if f["driver_needed"] else ""),
        f"CUDA_VISIBLE_DEVICES  {f['CUDA_VISIBLE_DEVICES'] if f['CUDA_VISIBLE_DEVICES'] is not None else 'unset'}",
        f"CUDA available  {f['cuda_available']}",
    ]
    for d in f["devices"]:
        lines.append(
            f"cuda:{d['index']}        {d['name']} (compute {d['capability']}), {d['memory_gb']} GB, "
            f"{d['free_gb']} GB free, bf16 {'yes' if d['bf16'] else 'no'}"
        )
    return "\n".join(lines)
