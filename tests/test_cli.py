"""Every command's options come from typed definitions (gradsim.options): help text on every option, the
defaults --help states are the dataclasses' own, and parsing nothing gives exactly those defaults."""

import dataclasses
import sys
from pathlib import Path

import pytest

from gradsim.cli import COMMANDS, gradsim_main
from gradsim.errors import GradsimError
from gradsim.options import Parser, defaults_of, env_values, from_args, given, option, shown_default

# The least each command needs to parse (its required positionals and flags).
REQUIRED = {
    "select": ["RUN"],
    "frontier": ["RUN"],
    "analyze": ["--execute", "nb.ipynb"],
    "compare": ["A", "B"],
    "import-study": ["DIR", "--setting", "paraphrased", "--output-dir", "OUT"],
}
# Flags that are no dataclass field: argparse's own -h and -q (options.add_quiet_flag).
UNTYPED = ("help", "quiet")


def parser_of(name: str) -> Parser:
    return COMMANDS[name].load()[1]()


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No .env and none of the variables the commands fall back on."""
    monkeypatch.chdir(tmp_path)
    import os

    for var in list(os.environ):
        if var.startswith(("MT_", "GRADSIM_")) or var == "USE_GPU":
            monkeypatch.delenv(var)


def squeezed(text: str) -> str:
    return "".join(text.split())  # --help wraps lines anywhere, hyphens included


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_has_help_and_states_its_typed_default(name):
    parser = parser_of(name)
    assert parser.definitions, f"{name}: no typed definition"
    typed = {o.field: (cls, o) for cls, options in parser.definitions for o in options}
    shown_help = squeezed(parser.format_help())
    for action in parser._actions:
        what = f"{name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help.strip(), f"{what}: no help"
        if action.dest in UNTYPED:
            continue
        assert action.dest in typed, f"{what}: not from a typed definition"
        cls, o = typed[action.dest]
        assert action.default is None, f"{what}: the parser holds a default of its own"
        default = defaults_of(cls).get(o.field, dataclasses.MISSING)
        shown = shown_default(o, default)
        if shown is None:
            continue
        assert "default" in action.help, f"{what}: the help does not state the default {shown!r}"
        if "default" not in o.help:  # stated by the mechanism: it must be the dataclass's own
            assert squeezed(f"default: {shown}") in shown_help, f"{what}: --help does not show default {shown!r}"
            if o.default_help is None:
                assert shown == (" ".join(map(str, default)) if isinstance(default, list) else str(default))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_parsing_no_options_gives_the_typed_defaults(name, no_env):
    parser = parser_of(name)
    args, rest = parser.parse_known_args(REQUIRED.get(name, []))
    assert rest == []
    for cls, _ in parser.definitions:
        required = {f.name for f in dataclasses.fields(cls)} - set(defaults_of(cls))
        values = given(cls, args)
        assert set(values) == required, f"{name}: {cls.__name__} got values nobody gave: {set(values) - required}"
        assert from_args(cls, args) == cls(**values)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_gradsim_command_help_exits_0(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # gradsim_main sets it; restored after
    with pytest.raises(SystemExit) as e:
        gradsim_main([name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: gradsim {name} "), out[:80]
    assert not any(other in out.split("\n\n")[0] for other in ("compute.py", "status.py", "python -m", "main.py"))


def test_commands_build_their_typed_options_with_the_environment(no_env, monkeypatch, tmp_path):
    from gradsim.cli.cluster import ComputeOptions
    from gradsim.cli.cluster import compute_parser as build_parser
    from gradsim.cli.common import config_from_args
    from gradsim.cli.variants import options_from_args
    from gradsim.cluster.resources import Resources, resources_from
    from gradsim.config import Config
    from gradsim.variants.paraphrase import Options

    assert config_from_args([]) == Config()
    assert options_from_args([]) == Options()
    args = build_parser().parse_known_args([])[0]
    assert resources_from(args) == Resources() and from_args(ComputeOptions, args) == ComputeOptions()

    monkeypatch.setenv("MT_DEVICE", "cpu")
    monkeypatch.setenv("MT_MODEL_NAME", "org/model")
    assert (options_from_args([]).device, options_from_args(["--device", "meta"]).device) == ("cpu", "meta")
    assert config_from_args([]).model_name == options_from_args([]).model == "org/model"

    (tmp_path / ".env").write_text("GRADSIM_SLURM_MAX_REQUEUES=7\nGRADSIM_SLURM_SETUP=a; b\n")
    monkeypatch.setenv("GRADSIM_SLURM_MAX_REQUEUES", "3")  # the environment over .env
    res = resources_from(build_parser().parse_known_args(["--time", "30"])[0])
    assert (res.max_requeues, res.setup, res.time) == (3, ["a", "b"], "30")
    res = resources_from(build_parser().parse_known_args(["--setup", "c", "--max-requeues", "0"])[0])
    assert (res.max_requeues, res.setup) == (0, ["c"])  # flags over both


def test_environment_values_are_typed_and_bad_ones_refused():
    @dataclasses.dataclass
    class Opts:
        n: int | None = option("a count", default=None, env="N")
        names: list[str] = option("names", default_factory=list, env="NAMES")
        kept: str = option("not in the environment", default="x", env="KEPT")

    assert env_values(Opts, {"N": " 4 ", "NAMES": "a;;b ", "KEPT": "  "}) == {"n": 4, "names": ["a", "b"]}
    with pytest.raises(GradsimError, match="N='four' is not an integer"):
        env_values(Opts, {"N": "four"})
    p = Parser()
    p.add_options(Opts)
    assert "(N; default" not in p.format_help() and "(NAMES, ';'-separated)" in p.format_help()
    assert from_args(Opts, p.parse_args(["--names", "c", "--names", "d"]), fallback={"n": 2}) == Opts(2, ["c", "d"])


def test_bad_values_are_usage_errors(capsys):
    from gradsim.cli.analysis import select_main
    from gradsim.cli.tools import memory_main

    for main, argv in ((select_main, []), (select_main, ["RUN", "--protocol", "all"]), (memory_main, ["many"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_dims_per_matrix_names_the_size_of_factorized_and_trak(caplog):
    """--proj-dim is the sketches' total; factorized and trak take --dims-per-matrix (both are Config.proj_dim)."""
    from gradsim.cli.common import config_from_args

    base = ["--use-random-projection", "--projection"]
    assert config_from_args([*base, "factorized", "--dims-per-matrix", "64"]).proj_dim == 64
    assert config_from_args([*base, "trak"]).proj_dim == 4096
    assert config_from_args([*base, "countsketch", "--proj-dim", "1024"]).proj_dim == 1024
    with caplog.at_level("WARNING", logger="gradsim"):
        assert config_from_args([*base, "trak", "--proj-dim", "32"]).proj_dim == 32  # as before, with a warning
    assert "--dims-per-matrix 32 says so" in caplog.text
    with pytest.raises(GradsimError, match="--dims-per-matrix is for --projection factorized or trak"):
        config_from_args([*base, "tensorsketch", "--dims-per-matrix", "64"])
    with pytest.raises(GradsimError, match="give --dims-per-matrix only"):
        config_from_args([*base, "factorized", "--proj-dim", "32", "--dims-per-matrix", "64"])


def test_dims_per_matrix_error_is_one_line_and_exit_2(tmp_path):
    import subprocess

    r = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--use-random-projection",
            "--dims-per-matrix",
            "64",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --dims-per-matrix is for")
    assert not any(tmp_path.iterdir())
