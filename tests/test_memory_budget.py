"""The exact path's default budget (issue 26): within a cgroup's memory limit, capped on the CPU, and never
holding more gradients than save backward passes."""

from __future__ import annotations

import pytest
import torch
from conftest import cgroup_tree

from gradsim.config import Config
from gradsim.study import memory
from gradsim.study.memory import GB, cgroup_memory, gradient_capacity
from gradsim.study.schedule import fewest_held, make_plan


def test_cgroup_v2_limit_is_the_tightest_of_the_path_and_its_ancestors(tmp_path):
    root, proc = cgroup_tree(
        tmp_path,
        "0::/slurm/job_7/step_0",
        {
            "slurm/memory.max": "max\n",
            "slurm/memory.current": str(9 * GB),
            "slurm/job_7/memory.max": str(3 * GB),  # the job's --mem 3G
            "slurm/job_7/memory.current": str(1 * GB),
            "slurm/job_7/step_0/memory.max": "max\n",
            "slurm/job_7/step_0/memory.current": str(GB // 2),
        },
    )
    assert cgroup_memory(root, proc) == (3 * GB, 1 * GB)


def test_cgroup_v1_reads_the_memory_controller_and_ignores_no_limit(tmp_path):
    root, proc = cgroup_tree(
        tmp_path,
        "9:cpu,cpuacct:/x\n4:memory:/docker/abc",
        {
            "memory/docker/abc/memory.limit_in_bytes": str(8 * GB),
            "memory/docker/abc/memory.usage_in_bytes": str(2 * GB),
            "memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
            "memory/memory.usage_in_bytes": str(20 * GB),
        },
    )
    assert cgroup_memory(root, proc) == (8 * GB, 2 * GB)
    proc.write_text("4:memory:/\n")
    assert cgroup_memory(root, proc) is None  # the root's limit is "none"
    assert cgroup_memory(root, tmp_path / "missing") is None


def test_cpu_default_budget_is_capped_and_fits_the_cgroup(monkeypatch):
    cpu, grad = torch.device("cpu"), GB // 2
    monkeypatch.setattr(memory, "cgroup_memory", lambda: None)
    monkeypatch.setenv("GRADSIM_MEMORY_GB", "")
    # plenty of free memory: capped at CPU_DEFAULT_HELD_GB (3 GB: 6 gradients of 0.5 GB)
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("vm", (), {"total": 64 * GB, "available": 60 * GB}))
    assert gradient_capacity(Config(), grad, cpu) == 6
    # large gradients: two, where they fit
    assert gradient_capacity(Config(), 4 * GB, cpu) == 2
    # a job's cgroup of 3 GB with 1 GB used: 75% of the 2 GB left
    monkeypatch.setattr(memory, "cgroup_memory", lambda: (3 * GB, 1 * GB))
    assert gradient_capacity(Config(), grad, cpu) == 3
    # --memory-gb is taken as given
    assert gradient_capacity(Config(memory_gb=5.0), grad, cpu) == 10


def test_fewest_held_keeps_the_passes_with_fewer_gradients():
    # 6 queries in 3 ids (both settings), each id's candidates its own original and two shared ones
    cands = [[0, 5, 6], [0, 5, 6], [1, 5, 6], [1, 5, 6], [2, 5, 6], [2, 5, 6]]
    groups = [c[0] for c in cands]

    def passes(k):
        p = make_plan(cands, groups, k)
        return p.num_queries + p.original_passes

    k = fewest_held(cands, groups, 40)
    assert passes(k) == passes(40) and k < 40
    assert passes(k - 1) > passes(40)  # one fewer would cost passes
    assert fewest_held(cands, groups, 1) == 1


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 8])
def test_fewest_held_never_costs_a_pass(capacity):
    import random

    rnd = random.Random(capacity)
    cands = [[q // 2, *rnd.sample(range(10, 30), 4)] for q in range(24)]
    groups = [c[0] for c in cands]
    k = fewest_held(cands, groups, capacity)
    full, fewer = make_plan(cands, groups, capacity), make_plan(cands, groups, k)
    assert k <= capacity and fewer.num_queries + fewer.original_passes <= full.num_queries + full.original_passes
