"""Two runs on one machine (issue 26): torch's pool fits the process's CPU share, and oversubscribed threads wait
passively instead of spinning (two default runs at once each ran ~4x slower than alone with active waiting)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import cgroup_tree

from gradsim.core import doctor
from gradsim.core.doctor import cgroup_cpus, cpu_threads, limit_cpu_threads


def test_cgroup_v2_cpu_quota_is_the_tightest_of_the_path_and_its_ancestors(tmp_path):
    files = {"cpu.max": "max 100000\n", "docker/cpu.max": "400000 100000\n", "docker/abc/cpu.max": "150000 100000\n"}
    root, proc = cgroup_tree(tmp_path, "0::/docker/abc", files)  # 4 CPUs for all containers, --cpus 1.5 for this one
    assert cgroup_cpus(root, proc) == 1.5
    (root / "docker/abc/cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(root, proc) == 4.0


def test_cgroup_v1_cpu_quota_and_no_quota(tmp_path):
    quota = {"cpu,cpuacct/job/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}
    root, proc = cgroup_tree(tmp_path, "5:cpu,cpuacct:/job\n3:memory:/job", quota)
    assert cgroup_cpus(root, proc) == 2.0
    (root / "cpu,cpuacct/job/cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert cgroup_cpus(root, proc) is None
    assert cgroup_cpus(root, tmp_path / "missing") is None


def test_threads_follow_affinity_and_quota(monkeypatch):
    allowed = len(os.sched_getaffinity(0))
    monkeypatch.setattr(doctor, "cgroup_cpus", lambda: None)
    assert cpu_threads() == allowed
    monkeypatch.setattr(doctor, "cgroup_cpus", lambda: 0.5)  # half a CPU still runs one thread
    assert cpu_threads() == 1
    before = torch.get_num_threads()
    try:
        assert limit_cpu_threads() == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(doctor, "cgroup_cpus", lambda: 64.0)  # never raised above what torch chose
        torch.set_num_threads(1)
        assert limit_cpu_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_importing_gradsim_makes_omp_wait_passively_unless_told_otherwise():
    probe = "import os, gradsim; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"
