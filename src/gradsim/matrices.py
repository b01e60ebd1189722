"""--matrices: featurize only a chosen subset of parameter matrices (the paper's "select" arm, and its cost).

The subset is a regular expression over parameter names (``layers\\.9\\.mlp\\.down_proj``), a
comma-separated list of names, or a selection JSON written by ``gradsim select`` (its ``chosen``
matrices). Only the chosen parameters require gradients while a run computes: autograd then forms
weight gradients for those alone, and the backward stops below the lowest layer that holds one (no
parameter and no input below it needs a gradient), so a matrix in the upper half of the model costs a
fraction of the full backward. The per-matrix dots of the chosen matrices are exactly the matching
slices of the full gradient's.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from gradsim.errors import GradsimError, refuse_missing


def resolve(spec: str, names: list[str], model_id: str = "") -> list[str]:
    """The parameter names (in the model's order) that ``spec`` selects; an error when it selects none or
    names a matrix the model lacks."""
    spec = spec.strip()
    if spec.endswith(".json"):
        from gradsim.io import read_json

        path = Path(spec)
        if not path.is_file():
            raise GradsimError(
                f"--matrices {spec}: no such selection file: run gradsim select first, or check the path"
            )
        chosen = read_json(path).get("chosen")
        if not isinstance(chosen, list) or not chosen:
            raise GradsimError(f"--matrices {spec}: the file has no 'chosen' matrices: give a gradsim select output")
        where = f"are not parameters of {model_id or 'this model'}: the selection was made for another model"
        try:
            refuse_missing(chosen, names, "matrices", where)
        except GradsimError as e:
            raise GradsimError(f"--matrices {spec}: {e}") from None
        wanted = set(chosen)
        return [n for n in names if n in wanted]
    if "," in spec:
        listed = [s.strip() for s in spec.split(",") if s.strip()]
        missing = [s for s in listed if s not in names]
        if missing:
            raise GradsimError(
                f"--matrices: {missing[0]!r} is not a parameter of {model_id or 'this model'}: "
                "give full names as in results.json's parameter_names"
            )
        return [n for n in names if n in set(listed)]
    try:
        pattern = re.compile(spec)
    except re.error as e:
        raise GradsimError(f"--matrices {spec!r} is not a valid regular expression ({e}): fix the pattern") from None
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise GradsimError(
            f"--matrices {spec!r} matches none of the model's {len(names)} parameter matrices "
            f"(e.g. {names[len(names) // 2]}): fix the pattern"
        )
    return chosen


def spec_tag(spec: str) -> str:
    """A short, stable tag of a --matrices value for run folder names."""
    return hashlib.sha256(spec.encode()).hexdigest()[:8]


@contextmanager
def only(model: torch.nn.Module, chosen: list[str] | None):
    """Within the block, only the ``chosen`` parameters require gradients (None: leave the model as it is).
    The previous flags are restored on exit."""
    if chosen is None:
        yield
        return
    keep = set(chosen)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep and before[n])
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])
