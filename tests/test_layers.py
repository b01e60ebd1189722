"""The package's layers (issue 25): the folder shows them and this test enforces them.

From the bottom: the foundation modules at the package root (errors, io, options, roles, config, credentials, layout,
matrices), then
data (reading, encoding, candidates), core (the model, gradients, projections, scores), study (one run from config
to outputs), then cluster, analysis and variants side by side, and cli on top, the only layer that parses argv,
prints results and turns errors into exit codes. A module may import its own subpackage and any layer below its
own, never one beside or above it; every import counts, those inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gradsim

PKG = Path(gradsim.__file__).resolve().parent
ROOT_MODULES = {"__init__", "errors", "io", "options", "roles", "config", "credentials", "layout", "matrices"}
RANK = {"": 0, "data": 1, "core": 2, "study": 3, "cluster": 4, "analysis": 4, "variants": 4, "cli": 5}


def layer_of(module: str) -> str:
    """'' for the root's foundation modules, else the subpackage: gradsim.core.score -> core."""
    parts = module.split(".")
    assert parts[0] == "gradsim", module
    if len(parts) == 1 or parts[1] in ROOT_MODULES:
        return ""
    if parts[1] == "__main__":  # python -m gradsim: the command layer's entry point
        return "cli"
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every gradsim import in a file, relative ones resolved."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "gradsim"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "gradsim":
                continue
            # `from gradsim import x` / `from gradsim.core import score` name modules themselves
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append(
                    (
                        node.lineno,
                        sub
                        if (PKG.parent / sub.replace(".", "/")).exists()
                        or (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                        else base,
                    )
                )
    return found


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_every_subpackage_has_a_rank():
    subpackages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert subpackages == set(RANK) - {""}, "a new subpackage needs its place in RANK (and docs/architecture.md)"
    loose = {p.stem for p in PKG.glob("*.py")} - ROOT_MODULES - {"__main__"}
    assert not loose, f"modules at the package root outside the foundation: {sorted(loose)}"


def test_no_module_imports_a_layer_beside_or_above_its_own():
    wrong = []
    for path in modules():
        mine = layer_of(module_name(path))
        for line, target in imports(path):
            theirs = layer_of(target)
            if theirs == mine or RANK[theirs] < RANK[mine]:
                continue
            wrong.append(f"{path.relative_to(PKG)}:{line} ({mine or 'root'}) imports {target} ({theirs or 'root'})")
    assert not wrong, "layer order broken:\n" + "\n".join(wrong)


def test_nothing_below_cli_imports_it():
    below = [
        f"{p.relative_to(PKG)}:{line}"
        for p in modules()
        if layer_of(module_name(p)) != "cli"
        for line, target in imports(p)
        if layer_of(target) == "cli"
    ]
    assert not below, f"modules below the command layer import it: {below}"


def test_the_checker_sees_a_violation(tmp_path):
    """The rule is not vacuous: a core module importing the study layer (even inside a function) is found."""
    fake = PKG / "core" / "_layer_probe.py"
    fake.write_text("def f():\n    from ..study import run\n    from gradsim.cli import main\n")
    try:
        found = imports(fake)
    finally:
        fake.unlink()
    assert [layer_of(t) for _, t in found] == ["study", "cli"]
