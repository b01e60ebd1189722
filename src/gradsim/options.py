"""Command-line options from typed definitions: one dataclass per command, one place for each default.

A command's options are the fields of a dataclass. The field gives the type and the default; its
``option(...)`` metadata gives the help text and, where needed, the flag name, choices, nargs, a
positional place or an environment variable read when the flag is not given::

    @dataclass
    class SelectOptions:
        run_dir: str = option("a finished run", positional=True)
        seed: int = option("seed of the split", default=0)

    parser = Parser(prog="gradsim select")
    parser.add_options(SelectOptions)
    opts = from_args(SelectOptions, parser.parse_args(argv))

Every flag's argparse default is None ("not given"): :func:`from_args` takes the given values over a
fallback (the environment, .env) over the dataclass's own defaults, and the help states the default
from the dataclass, so the parser never holds a default of its own. ``Config``'s fields are defined the same
way (``roles.define``: an Option with the setting's Role); ``config.OPTIONS`` is their options.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

from gradsim.errors import GradsimError


@dataclass(frozen=True)
class Option:
    """A command-line option of a dataclass field: type and default come from the field, the rest from here."""

    field: str
    help: str
    flag: Optional[str] = None  # default: --<field with dashes>
    const: Any = None  # a flag without a value sets the field to this (a bool field: True)
    choices: Optional[tuple[Any, ...]] = None
    nargs: Any = None  # as argparse's ("*", "+"); a list field without nargs is a repeatable flag (append)
    positional: bool = False
    metavar: Optional[str] = None
    env: Optional[str] = None  # read when the flag is not given (env_values); a list field's value is ';'-separated
    default_help: Optional[str] = None  # the default as the help states it, where the value itself says too little
    group: Optional[str] = None  # the --help section it is listed under (sections in order of first appearance)
    minimum: Optional[float] = None  # the smallest value its environment variable may hold (env_values)
    # What its environment variable must hold, as a refusal says it: "a size in GB: set it to e.g. 8, or unset it"
    env_help: Optional[str] = None
    cli: bool = True  # False: set by its environment variable only, no flag (e.g. USE_GPU)

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")


def option(help: str, default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **kw):
    """A dataclass field that is a command-line option (keywords: those of :class:`Option`)."""
    meta = {"option": Option("", help, **kw)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positionals(help: str, default_help: Optional[str] = None, default_factory: Any = list, **kw):
    """A list field given as zero or more positional arguments; none given: default_factory()."""
    return option(help, default_factory=default_factory, positional=True, default_help=default_help, **kw)


def options_of(cls: type, flagless: bool = False) -> tuple[Option, ...]:
    """The options of a dataclass, in field order (fields without option metadata are not options); those
    without a flag (``cli=False``, read from the environment only) too when ``flagless``."""
    return tuple(
        dataclasses.replace(f.metadata["option"], field=f.name)
        for f in dataclasses.fields(cls)
        if "option" in f.metadata and (flagless or f.metadata["option"].cli)
    )


def defaults_of(cls: type) -> dict[str, Any]:
    """Each field's default (a default_factory called); fields without one are left out."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _value_type(hint: Any) -> tuple[Any, bool]:
    """(the type argparse converts one value with, whether the field holds a list) of a field's type hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X]
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (list, tuple):
        args = typing.get_args(hint)
        return (args[0] if args else str), True
    return hint, False


def shown_default(o: Option, default: Any) -> Optional[str]:
    """The default as --help states it, or None where it states none (no default, an on/off flag)."""
    if o.default_help is not None:
        return o.default_help
    if o.const is not None or default is None or default is False or default is dataclasses.MISSING or default == []:
        return None
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    return str(default)


def help_text(o: Option, default: Any, is_list: bool = False) -> str:
    """The option's help with its environment variable and default appended, unless the help states them."""
    parts = []
    if o.env and o.env not in o.help:
        parts.append(o.env + (", ';'-separated" if is_list else ""))
    shown = shown_default(o, default)
    if shown is not None and "default" not in o.help:
        parts.append("default: " + shown.replace("%", "%%"))
    return f"{o.help} ({'; '.join(parts)})" if parts else o.help


# The command a parser's program was started as by ``gradsim COMMAND`` (cli.gradsim_main): its usage line
# names that (``gradsim submit``), not the script or module it also runs as (compute.py, python -m ...).
_invoked_as: Optional[str] = None


@contextmanager
def invoked_as(prog: str):
    """Parsers made within the block name ``prog`` in their usage line."""
    global _invoked_as
    before, _invoked_as = _invoked_as, prog
    try:
        yield
    finally:
        _invoked_as = before


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose options come from typed definitions (add_options); ``definitions`` lists
    them, so a test can check every command's help and defaults against its dataclasses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _invoked_as is not None:
            kwargs["prog"] = _invoked_as
        super().__init__(*args, **kwargs)
        self.definitions: list[tuple[type, tuple[Option, ...]]] = []
        self.sections: dict[str, Any] = {}  # --help sections by title (Option.group, add_options' title)

    @classmethod
    def of(cls, options: type, prog: str, description: str) -> Parser:
        """A command's parser: every option of the dataclass ``options``."""
        parser = cls(prog=prog, description=description)
        parser.add_options(options)
        return parser

    def add_options(self, cls: type, options: Optional[Iterable[Option]] = None, title: Optional[str] = None) -> None:
        """Add these options of dataclass ``cls`` (default: all of options_of(cls)), under ``title`` when given."""
        options = tuple(options_of(cls) if options is None else options)
        hints = typing.get_type_hints(cls)
        defaults = defaults_of(cls)
        for o in options:
            section = title or o.group
            if section and section not in self.sections:
                self.sections[section] = self.add_argument_group(section)
            target = self.sections[section] if section else self
            default = defaults.get(o.field, dataclasses.MISSING)
            kind, is_list = _value_type(hints[o.field])
            kw: dict[str, Any] = {"help": help_text(o, default, is_list)}
            if o.metavar:
                kw["metavar"] = o.metavar
            if o.const is not None:
                target.add_argument(o.flag_name, dest=o.field, action="store_const", const=o.const, **kw)
                continue
            if kind is bool:
                raise TypeError(f"{cls.__name__}.{o.field}: a bool option needs const (the value the flag sets)")
            kw.update(type=kind, choices=o.choices)
            if o.positional:
                nargs = o.nargs or ("*" if default is not dataclasses.MISSING else None)
                target.add_argument(o.field, nargs=nargs, **kw)
                continue
            if is_list and o.nargs is None:
                kw["action"] = "append"
            target.add_argument(o.flag_name, dest=o.field, nargs=o.nargs, required=default is dataclasses.MISSING, **kw)
        self.definitions.append((cls, options))


def given(cls: type, args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``cls`` that were given (an unfilled positional list counts as not given)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names and v is not None and v != []}


def from_args(cls: type, args: argparse.Namespace | Mapping[str, Any], fallback: Optional[Mapping[str, Any]] = None):
    """An instance of ``cls``: the given options over ``fallback`` (e.g. the environment; None there: not set)
    over its defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in (fallback or {}).items() if k in names and v is not None}
    values.update(given(cls, args))
    return cls(**values)


BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def env_values(cls: type, environ: Mapping[str, str], fields: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """The fields of ``cls`` (or these of them) whose option names an environment variable that is set (and not
    blank), converted to the field's type and checked against the option's minimum; a list field's value is
    ';'-separated, a bool one 1/0, true/false or yes/no. A value that does not convert is refused in one line."""
    hints = typing.get_type_hints(cls)
    wanted = None if fields is None else set(fields)
    out: dict[str, Any] = {}
    for o in options_of(cls, flagless=True):
        raw = (environ.get(o.env) or "").strip() if o.env and (wanted is None or o.field in wanted) else ""
        if not raw:
            continue
        kind, is_list = _value_type(hints[o.field])
        if is_list:
            out[o.field] = [x.strip() for x in raw.split(";") if x.strip()]
            continue
        if kind is bool:
            if raw.lower() not in BOOLEANS:
                raise GradsimError(f"{o.env}={raw!r} is not a boolean: set it to 1 or 0")
            out[o.field] = BOOLEANS[raw.lower()]
            continue
        try:
            value = kind(raw)
        except ValueError:
            value = None
        if value is None or (o.minimum is not None and value < o.minimum):
            what = {int: "an integer", float: "a number"}.get(kind, f"a valid {kind.__name__}")
            if o.minimum is not None:
                what += f" >= {o.minimum}"
            raise GradsimError(f"{o.env}={raw!r} is not {o.env_help or what}")
        out[o.field] = value
    return out


def add_quiet_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")


def parse_flags(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> dict[str, Any]:
    """The flags as a dict, less -q/--quiet (add_quiet_flag), which sets the log level: warnings only, or info."""
    args = vars(parser.parse_args(argv))
    quiet = args.pop("quiet")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    return args
