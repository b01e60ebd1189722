"""One home per setting: each Config (and Provenance) field says, where it is defined, its flag and help, its
environment variable, and what it does to the numbers and the records (config.Role). These tests change each
field alone and check that every derived place follows its definition: the flags, the environment and .env,
the compat record and its check, the fields recorded only when set, the feature-store and --normalize keys."""

import dataclasses

import pytest

from gradsim.config import (
    COMPAT_FIELDS,
    ENV_OPTIONS,
    OPTIONS,
    RECORDED_WHEN_SET,
    RUN_TIME_ENV,
    Config,
    Provenance,
    compat_differences,
    env_defaults,
    env_setting,
    role_of,
)
from gradsim.errors import GradsimError
from gradsim.study.part import normalizer_manifest, store_manifest

# The compat record's keys in the order results have held them since they were first written (an
# independent copy of the format: a reordering would change the bytes of every results.json and config.json).
WRITTEN_COMPAT = tuple(
    """setting computation_type loss_on turns normalize damping matrices candidates top_k model_name
    model_revision chat_template_sha256 max_length dtype seed use_random_projection projection proj_dim
    allocation original_data_sha256 variant_data_sha256 sample_size skip_overlong""".split()
)

# A valid value other than the default, for each Config field (the test fails on a field added without one).
OTHER = {
    "setting": "model-generated",
    "computation_type": "dot-product",
    "loss_on": "all",
    "turns": "all",
    "normalize": "center",
    "damping": 0.5,
    "matrices": "mlp",
    "candidates": "all",
    "top_k": 2,
    "model_name": "org/model",
    "revision": "v1",
    "trust_remote_code": True,
    "chat_template": "tulu",
    "device": "cpu",
    "use_gpu": False,
    "dtype": "bfloat16",
    "sample_size": 7,
    "ids_file": "study",
    "max_length": 99,
    "seed": 7,
    "original_data": "other.jsonl",
    "variant_data": "variants.jsonl",
    "paraphrased_data": "p.jsonl",
    "model_generated_data": "m.jsonl",
    "partition_start": 3,
    "partition_end": 5,
    "output_dir": "elsewhere",
    "use_random_projection": True,
    "projection": "countsketch",
    "proj_dim": 1024,
    "allocation": "uniform",
    "batch_size": 4,
    "baselines": False,
    "memory_gb": 2.0,
    "scratch_gb": 1.0,
    "host_memory_gb": 3.0,
    "allow_nonfinite": True,
    "skip_overlong": True,
}
PROVENANCE = {
    "model_revision": "abc",
    "chat_template_sha256": "t" * 64,
    "code_version": "1.0+abc",
    "original_data_sha256": "o" * 64,
    "variant_data_sha256": "v" * 64,
    "max_length": 64,
}
SETTINGS = [f.name for f in dataclasses.fields(Config) if f.name != "extra"]
BASE = Config(normalize="unit")
BASE_PROV = Provenance(**{k: "x" if k != "max_length" else 128 for k in PROVENANCE})


def changed(name: str) -> tuple[Config, Provenance]:
    """BASE with only field ``name`` (of Config or Provenance) changed."""
    if name in PROVENANCE and name != "max_length":
        return BASE, dataclasses.replace(BASE_PROV, **{name: PROVENANCE[name]})
    if name == "max_length":  # the record holds the one the run resolved
        return BASE, dataclasses.replace(BASE_PROV, max_length=99)
    return dataclasses.replace(BASE, **{name: OTHER[name]}), BASE_PROV


def test_every_setting_is_a_defined_option_with_a_role():
    assert set(OTHER) == set(SETTINGS), "give a new Config field a valid other value in OTHER"
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name in SETTINGS:
        assert "option" in fields[name].metadata and "role" in fields[name].metadata, name
    # every field with a flag is one of the study's flags, in field order; flagless ones have an env var
    assert [o.field for o in OPTIONS] == [n for n in SETTINGS if fields[n].metadata["option"].cli]
    assert all(o.env for o in ENV_OPTIONS if not o.cli)


@pytest.mark.parametrize("name", SETTINGS + list(PROVENANCE))
def test_a_field_changes_the_records_as_its_role_says(name):
    role = role_of(name)
    cfg, prov = changed(name)
    base_compat, new_compat = BASE.compat(BASE_PROV), cfg.compat(prov)
    differs = compat_differences(base_compat, new_compat)
    assert bool(differs) == role.numbers, (name, differs)
    assert (name in COMPAT_FIELDS) == role.numbers
    if role.numbers:
        assert f"field {name}:" in differs
        store_differs = store_manifest(base_compat) != store_manifest(new_compat)
        assert store_differs == (not role.query_side), name
        norm_differs = normalizer_manifest(base_compat) != normalizer_manifest(new_compat)
        assert norm_differs == (not role.query_side and not role.projection_only), name
    if name in SETTINGS:
        # recorded only when set: absent from a default record, present once set
        assert (name in Config().to_record()) == (not role.when_set), name
        assert name in cfg.to_record(prov)
        assert (name in RECORDED_WHEN_SET) == role.when_set


def test_the_compat_record_keeps_its_written_key_order():
    assert COMPAT_FIELDS == WRITTEN_COMPAT
    everything = dataclasses.replace(BASE, skip_overlong=True)
    assert list(everything.compat(BASE_PROV)) == list(WRITTEN_COMPAT)


def test_a_field_left_out_of_a_store_key_at_its_default_is_in_it_otherwise():
    for name in ("turns", "allocation"):
        assert role_of(name).unkeyed_default
        assert name not in store_manifest(BASE.compat(BASE_PROV))
        cfg, prov = changed(name)
        assert store_manifest(cfg.compat(prov))[name] == OTHER[name]


ENV_VALUES = {
    "model_name": ("org/from-env", "org/from-env"),
    "device": ("cpu", "cpu"),
    "use_gpu": ("no", False),
    "dtype": ("bfloat16", "bfloat16"),
    "sample_size": (" 12 ", 12),
    "memory_gb": ("1.5", 1.5),
    "scratch_gb": ("0", 0.0),
    "host_memory_gb": ("2", 2.0),
}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env
    for o in ENV_OPTIONS:  # set, then unset: monkeypatch restores each (also what a .env loads) afterwards
        monkeypatch.setenv(o.env, "")
        monkeypatch.delenv(o.env)
    return monkeypatch


def test_each_environment_variable_reaches_its_field_once(clean_env):
    assert {o.field for o in ENV_OPTIONS} == set(ENV_VALUES)
    assert env_defaults() == {}
    for o in ENV_OPTIONS:
        clean_env.setenv(o.env, ENV_VALUES[o.field][0])
    # the budgets are read where the run runs (a Slurm task: on its node), not into the Config
    expected = {k: v for k, (_, v) in ENV_VALUES.items() if k not in RUN_TIME_ENV}
    assert env_defaults() == expected
    assert {k: env_setting(k) for k in RUN_TIME_ENV} == {k: ENV_VALUES[k][1] for k in RUN_TIME_ENV}


def test_dotenv_is_read_and_the_environment_wins(clean_env, tmp_path):
    (tmp_path / ".env").write_text("MT_SAMPLE_SIZE=3\nMT_DTYPE=bfloat16\n")
    clean_env.setenv("MT_DTYPE", "float32")
    got = env_defaults()
    assert got == {"sample_size": 3, "dtype": "float32"}


@pytest.mark.parametrize(
    "var, raw, says",
    [
        ("MT_SAMPLE_SIZE", "0", "MT_SAMPLE_SIZE='0' is not a positive integer"),
        ("MT_SAMPLE_SIZE", "ten", "MT_SAMPLE_SIZE='ten' is not a positive integer"),
        ("USE_GPU", "maybe", "USE_GPU='maybe' is not a boolean: set it to 1 or 0"),
        ("GRADSIM_MEMORY_GB", "-1", "GRADSIM_MEMORY_GB='-1' is not a size in GB"),
    ],
)
def test_a_bad_environment_value_is_refused_in_one_line(clean_env, var, raw, says):
    clean_env.setenv(var, raw)
    with pytest.raises(GradsimError) as err:
        env_defaults() if var != "GRADSIM_MEMORY_GB" else env_setting("memory_gb")
    assert str(err.value).startswith(says) and "\n" not in str(err.value)


def test_the_readme_configuration_table_names_every_flag_and_variable():
    """The README's Configuration table is written by hand: each study flag is in it, each environment
    variable on its flag's row."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    for o in OPTIONS:
        assert any(f"`{o.flag_name}`" in row for row in rows), f"README's Configuration table lacks {o.flag_name}"
    for o in ENV_OPTIONS:
        row = next((row for row in rows if row.startswith(f"| `{o.env}`")), None)
        assert row is not None, f"README's Configuration table lacks {o.env}"
        assert not o.cli or f"`{o.flag_name}`" in row, f"{o.env}: its row should name {o.flag_name}"


@pytest.mark.parametrize("name", SETTINGS)
def test_a_field_names_the_run_folder_as_its_role_says(name):
    from gradsim.layout import run_dir

    base = dataclasses.replace(BASE, use_random_projection=True)  # the projection's fields name only projected runs
    cfg = dataclasses.replace(base, **{name: False if name == "use_random_projection" else OTHER[name]})

    def folder(c):
        return run_dir(c).relative_to(c.output_dir)

    assert (folder(cfg) != folder(base)) == role_of(name).names_run, (name, folder(cfg))
