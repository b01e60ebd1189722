"""How a setting is defined: a field of config.Config (or config.Provenance) with its command-line option
(options.Option: flag, help, --help section, environment variable) and its Role, what it does to the numbers
and to the records that hold them. config.py derives the flags, the environment reading, the compat record,
the store keys and the fields recorded only when set from these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gradsim.options import Option


@dataclass(frozen=True)
class Role:
    """What a setting does to the numbers and to the records that hold them."""

    # It changes the numbers: a compat field (COMPAT_FIELDS); partitions, feature shards and finished runs made
    # with different values never mix. code_version is not one: a commit during a cluster campaign must not
    # throw away its progress, partitions or feature store (it is recorded as provenance).
    numbers: bool = False
    query_side: bool = False  # it changes only the queries' side (scoring): left out of feature-store keys
    projection_only: bool = False  # it changes only the projection: left out of the --normalize state's key
    # Added after results were first written: recorded (config, compat) only when set, so that a default run
    # writes the bytes it wrote before the option existed.
    when_set: bool = False
    # Added after feature stores were first keyed: a store key leaves it out at its default, so that stores and
    # allocation files made before keep their keys.
    unkeyed_default: bool = False
    # Its environment variable is read where the run runs (a Slurm task: on its node), not into the Config.
    env_at_run: bool = False
    # Away from its default it names the run's folder (layout.run_dir: a method variant gets its own); a numbers
    # field that names none (the model, the data, dtype, top_k, ...) is refused by a finished run's compat check.
    names_run: bool = False


def define(
    help: str, default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, role=Role(), **kw
):
    """A Config field: a command-line option (keywords of options.Option) with its Role."""
    meta = {"option": Option("", help, **kw), "role": role}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def budget(help: str, env: str):
    """A Config field of a budget in GB (None: its environment variable where the run runs, else a default)."""
    return define(help, None, role=Role(env_at_run=True), env=env, minimum=0, env_help=SIZE_IN_GB, group=RUN)


def found(role: Role = Role(numbers=True)):
    """A Provenance field (what a run finds out, None until then) with its Role."""
    return field(default=None, metadata={"role": role})


CHANGES_NUMBERS = Role(numbers=True)
QUERY_SIDE = Role(numbers=True, query_side=True)
PROJECTION_ONLY = Role(numbers=True, projection_only=True)
METHOD = Role(numbers=True, names_run=True)
NAMED_QUERY_SIDE = Role(numbers=True, query_side=True, names_run=True)
NAMED_PROJECTION = Role(numbers=True, projection_only=True, names_run=True)
SIZE_IN_GB = "a size in GB: set it to e.g. 8, or unset it"
# --help sections (in the order of their first field)
COMPARED, MODEL, DATA, PROJECTION, RUN = "what is compared", "model", "data", "projection", "run"
