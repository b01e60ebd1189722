"""Test-only slowdown of the Slurm tasks, installed from outside the package.

tests/test_slurm_compute.py puts this folder on PYTHONPATH in the environment it submits from; the
array tasks inherit that environment, so Python imports this module at start-up (site.py imports
``sitecustomize``) in every task. With GRADSIM_TEST_SLOWDOWN=S it sleeps S seconds before each query's
gradient or features, so that a test can preempt a task while it is mid-run, and logs which queries
each attempt computed ("test slowdown: featurized queries <id> ..."). Without the variable it does
nothing; it never imports gradsim itself, it only patches gradsim.study.projected and gradsim.study.stream once
the task imports them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import time

log = logging.getLogger("gradsim")


def _slow_projected(module, seconds: float) -> None:
    real_featurize = module.featurize

    def slow(featurizer, encs, device, dtype, role, *args, **kwargs):
        if role == "query":
            time.sleep(seconds * len(encs))
        out = real_featurize(featurizer, encs, device, dtype, role, *args, **kwargs)
        if role == "query":
            log.info("test slowdown: featurized queries %s", " ".join(e.id for e in encs))
        return out

    module.featurize = slow


def _slow_stream(module, seconds: float) -> None:
    real_gradient = module.ExactStream._gradient

    def slow_gradient(self, enc, role, out, q=None):
        if role == "query":
            time.sleep(seconds)
        g = real_gradient(self, enc, role, out, q)
        if role == "query":
            log.info("test slowdown: featurized queries %s", enc.id)
        return g

    module.ExactStream._gradient = slow_gradient


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules as usual and patches each right after it has executed."""

    def __init__(self, patches: dict, seconds: float) -> None:
        self.patches, self.seconds = patches, seconds

    def find_spec(self, fullname, path, target=None):
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        loader, seconds = spec.loader, self.seconds
        real_exec = loader.exec_module

        def exec_module(module):
            real_exec(module)
            patch(module, seconds)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    seconds = float(os.environ.get("GRADSIM_TEST_SLOWDOWN", "0") or 0)
    if seconds > 0:
        sys.meta_path.insert(
            0,
            _PatchOnImport({"gradsim.study.projected": _slow_projected, "gradsim.study.stream": _slow_stream}, seconds),
        )


install()
