"""The run configuration: one typed object built from .env and command-line flags (flags win).

``Config`` is what the user asked for, validated once and never changed; ``Provenance`` is what a run
found out (the model's commit, the data's hashes, the token limit in force). Both are written beside
every output as one dict (``Config.to_record``), and partition results are only merged when the fields that
decide the numbers (``COMPAT_FIELDS``, of either) agree.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gradsim.errors import GradsimError, check_at_least, check_choice
from gradsim.layout import default_output_dir
from gradsim.options import Parser, defaults_of, env_values, options_of
from gradsim.roles import (
    CHANGES_NUMBERS,
    COMPARED,
    DATA,
    METHOD,
    MODEL,
    NAMED_PROJECTION,
    NAMED_QUERY_SIDE,
    PROJECTION,
    PROJECTION_ONLY,
    QUERY_SIDE,
    RUN,
    Role,
    budget,
    define,
    found,
)

SETTINGS = ("paraphrased", "model-generated")
# "both": one run over both settings, writing what two runs would; a candidate's gradient serves both.
SETTING_CHOICES = SETTINGS + ("both",)
COMPUTATION_TYPES = ("gradient-similarity", "dot-product")
CANDIDATE_MODES = ("bm25", "all")
PROJECTIONS = ("countsketch", "tensorsketch", "factorized", "trak")
SKETCHED = ("countsketch", "tensorsketch")  # --proj-dim in all, shared among the matrices by --allocation
# --proj-dim when not given: total dims for the sketches, per parameter matrix for factorized and trak.
DEFAULT_PROJ_DIM = {"countsketch": 65536, "tensorsketch": 65536, "factorized": 4096, "trak": 4096}
# How countsketch and tensorsketch share --proj-dim among the matrices (projection.allocate_dims).
ALLOCATIONS = ("norm", "norm-floor", "sqrt", "uniform")
# float32; tf32: fp32 weights and gradients, CUDA matmuls in TF32; bfloat16: bf16 autocast over fp32 weights and
# gradients; bfloat16-weights: bf16 weights and gradients (half the memory, for models that do not fit otherwise).
DTYPES = ("float32", "tf32", "bfloat16", "bfloat16-weights")
# --dtype when not given: float32 on the CPU; on CUDA the fastest precision whose whole-model top-1 and MRR and
# whose per-matrix table equal fp32's on the bundled study and on the GPU check's data (bench/precision_fidelity.py,
# docs/benchmarks.md "GPU precision"). Measured 2026-12-06 (CPU, TF32 emulated): TF32 changes 3-5 matrices' top-1,
# bf16 27-33, bf16-weights also the whole-model top-1, so fp32 it is until a GPU measurement says otherwise.
CUDA_DTYPE = "float32"
LOSS_TARGETS = ("response", "prompt", "all")  # encode.py builds the labels of each
# first: each row's first user/assistant exchange (the study's); all: every turn, each assistant turn trained
TURNS = ("first", "all")
# normalize.py: what each does and the order in which combined steps apply
NORMALIZERS = ("none", "center", "unit", "center+unit", "adafactor", "adafactor+center", "adafactor+center+unit")
EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"

# Package data (shipped in the wheel): the bundled sample works from a checkout and when installed.
PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DATA = PACKAGE_DIR / "bundled" / "lima_sample"
# The committed reference tables of the bundled data that the analysis falls back on (targets, frontier).
BUNDLED_REFERENCE = PACKAGE_DIR / "bundled" / "reference"
VARIANT_FILES = {"paraphrased": "paraphrased.jsonl", "model-generated": "model_generated.jsonl"}

# Each setting is defined once, as a field of Config (or of Provenance, for what a run finds out): its type and
# default, and in its metadata its flag and help (options.Option: --help, env var, section) and what it does to
# the numbers and the records (Role). Everything else is derived from there: the flags (OPTIONS), the .env and
# environment reading (env_defaults, env_setting), the compat record (COMPAT_FIELDS), the fields recorded only
# when set (RECORDED_WHEN_SET), the feature-store and normalizer keys (study.part.store_manifest), and the Slurm
# task config (the Config itself, serialized). How a field is defined: roles.py.


@dataclass(frozen=True)
class Config:
    """What the user asked for. Frozen: a run derives per-setting copies (dataclasses.replace) and keeps
    what it finds out in a Provenance, so the caller's Config is never changed. The field order is the
    order of the written records (to_record)."""

    setting: str = define(
        f"one of {', '.join(SETTING_CHOICES)} (both: one run that writes what the two runs would)",
        "paraphrased",
        role=NAMED_QUERY_SIDE,
        group=COMPARED,
    )
    computation_type: str = define(
        f"one of {', '.join(COMPUTATION_TYPES)}", "gradient-similarity", role=NAMED_QUERY_SIDE, group=COMPARED
    )
    loss_on: str = define(  # encode.py builds the labels of each
        "the tokens whose loss the gradient is of: response (the study's), prompt (every prompt token after the "
        "first, assistant header included) or all",
        "response",
        role=METHOD,
        group=COMPARED,
    )
    turns: str = define(  # data/load.py, data/encode.py
        "first: each row's first user/assistant exchange (the study's); all: the whole conversation, every "
        "assistant turn trained and every other turn masked (with --loss-on response)",
        "first",
        role=Role(numbers=True, unkeyed_default=True, names_run=True),
        group=COMPARED,
    )
    normalize: str = define(  # core/normalize.py: applied to each gradient before it is compared
        "applied to each gradient before comparing: none, center (minus the originals' mean), unit (each matrix "
        "to unit norm), adafactor (a factored second moment from the originals) or center+unit, adafactor+center, "
        "adafactor+center+unit (exact path, countsketch, trak)",
        "none",
        role=METHOD,
        group=COMPARED,
    )
    damping: float = define("relative damping of --normalize adafactor", 1e-2, role=CHANGES_NUMBERS, group=COMPARED)
    matrices: Optional[str] = define(  # matrices.py (None: all)
        "only these parameter matrices: a regular expression over names, a comma-separated list, or a selection "
        "JSON of gradsim select; weight gradients are formed for those alone and the backward stops below the "
        "lowest (exact path, countsketch, trak; default: all)",
        None,
        role=METHOD,
        group=COMPARED,
    )
    candidates: str = define(
        "bm25: own original + BM25 top-k others (the study's protocol); all: every original",
        "bm25",
        role=NAMED_QUERY_SIDE,
        group=COMPARED,
    )
    top_k: int = define("BM25 candidates besides the true original (4: chance 1/5)", 4, role=QUERY_SIDE, group=COMPARED)
    model_name: str = define(
        "HF model id or local directory (default: MT_MODEL_NAME or embedded)",
        EMBEDDED_MODEL,
        role=CHANGES_NUMBERS,
        flag="--model",
        env="MT_MODEL_NAME",
        group=MODEL,
    )
    # The resolved commit is Provenance.model_revision (a compat field); this is what was asked for.
    revision: Optional[str] = define(
        "hub branch, tag or commit of --model (default: main); the resolved commit is recorded", None, group=MODEL
    )
    trust_remote_code: bool = define(
        "run the model repository's own Python code (needed by some hub models; off by default)",
        False,
        const=True,
        group=MODEL,
    )
    # None: the model's own. Its text's hash is Provenance.chat_template_sha256 (a compat field).
    chat_template: Optional[str] = define(
        "tulu (the original study's) or a Jinja file: replaces the model's own template; required for a model "
        "without one",
        None,
        group=MODEL,
    )
    device: str = define(
        "cpu, cuda or cuda:N (default: MT_DEVICE, else CUDA when available and USE_GPU=1)",
        "auto",
        env="MT_DEVICE",
        group=MODEL,
    )
    use_gpu: bool = define("--device auto picks CUDA where available", True, env="USE_GPU", cli=False)
    dtype: Optional[str] = define(  # None: float32, or CUDA_DTYPE where the run is on CUDA (default_dtype)
        f"{', '.join(DTYPES)}: tf32 runs CUDA matmuls in TF32 over fp32 weights and gradients, bfloat16 "
        "autocasts over fp32 weights and gradients, bfloat16-weights stores weights and gradients in bf16 "
        f"(default: MT_DTYPE, else float32 on the CPU and {CUDA_DTYPE} on CUDA, chosen by measured fidelity)",
        None,
        role=CHANGES_NUMBERS,
        env="MT_DTYPE",
        group=MODEL,
    )
    sample_size: Optional[int] = define(
        "use only the first N originals (default: MT_SAMPLE_SIZE or all)",
        None,
        role=CHANGES_NUMBERS,
        env="MT_SAMPLE_SIZE",
        minimum=1,
        env_help="a positive integer: set it to e.g. 10, or unset it to use all samples",
        group=DATA,
    )
    ids_file: Optional[str] = define(  # a file of ids, or "study" (data.STUDY_IDS); the data hashes record it
        "only the samples with these ids: a file of ids, one per line, or study for the original study's 988 LIMA "
        "ids (shipped with gradsim, src/gradsim/study_ids/); the data hashes record the subset",
        None,
        role=Role(when_set=True),
        group=DATA,
    )
    max_length: Optional[int] = define(  # the one in force is Provenance.max_length
        "truncate longer samples (flagged in the output); default: model context",
        None,
        role=CHANGES_NUMBERS,
        group=DATA,
    )
    seed: int = define("projection seed", 42, role=PROJECTION_ONLY, group=PROJECTION)
    # The data files; their hashes (Provenance) are the compat fields.
    original_data: str = define(
        "original samples: local file (JSONL, JSON, Parquet, ...) or hub id (default: bundled sample)",
        str(BUNDLED_DATA / "original.jsonl"),
        group=DATA,
    )
    variant_data: Optional[str] = define(
        "variants (queries): local file or hub id (default: bundled file of --setting)", None, group=DATA
    )
    paraphrased_data: Optional[str] = define(
        "with --setting both: the paraphrased variants (default: bundled)", None, group=DATA
    )
    model_generated_data: Optional[str] = define(
        "with --setting both: the model-generated variants (default: bundled)", None, group=DATA
    )
    partition_start: Optional[int] = define("first query index of this partition", None, group=RUN)
    partition_end: Optional[int] = define("query index one past the end of this partition", None, group=RUN)
    output_dir: str = define(  # data/ where the command runs
        "where results go (default: data/)", default_factory=lambda: str(default_output_dir()), group=RUN
    )
    use_random_projection: bool = define(
        "project gradients (see --projection, --proj-dim)", False, role=NAMED_PROJECTION, const=True, group=PROJECTION
    )
    projection: str = define(
        f"one of {', '.join(PROJECTIONS)}", "tensorsketch", role=NAMED_PROJECTION, group=PROJECTION
    )
    proj_dim: Optional[int] = define(  # None: DEFAULT_PROJ_DIM of the projection
        "projected dimensions in all, shared among the matrices by --allocation (tensorsketch, countsketch; "
        "default 65536); factorized and trak take --dims-per-matrix",
        None,
        role=NAMED_PROJECTION,
        group=PROJECTION,
    )
    # It changes only the projection, but the --normalize state's key has held it since it was added.
    allocation: str = define(
        "how tensorsketch and countsketch share --proj-dim among the matrices: norm (by calibrated gradient-norm "
        "share), norm-floor (the same, every matrix at least half the uniform share), sqrt (by the square root "
        "of its entries) or uniform; results.json states each matrix's predicted error (per_matrix_fidelity)",
        "norm",
        role=Role(numbers=True, unkeyed_default=True, names_run=True),
        group=PROJECTION,
    )
    batch_size: int = define("samples per forward/backward where the method batches", 1, group=RUN)
    baselines: bool = define(  # BM25 and representation similarity on the same queries (forward passes only)
        "skip the BM25 and representation-similarity baselines", True, flag="--no-baselines", const=False, group=RUN
    )
    # Budgets of the exact path (they change the schedule, never the numbers). None: from the environment where
    # the run runs, else the defaults in study/memory.py.
    memory_gb: Optional[float] = budget(
        "exact gradients held at once, in GB (GRADSIM_MEMORY_GB; default: 75%% of the free host memory on CPU, "
        "90%% of the free GPU memory on CUDA, after the model)",
        "GRADSIM_MEMORY_GB",
    )
    scratch_gb: Optional[float] = budget(
        "disk for exact gradients of originals kept between blocks, used only where reading one back is measured "
        "cheaper than recomputing it (GRADSIM_SCRATCH_GB; default 0)",
        "GRADSIM_SCRATCH_GB",
    )
    host_memory_gb: Optional[float] = budget(
        "on CUDA: host RAM for kept originals' gradients, same rule (GRADSIM_HOST_MEMORY_GB)", "GRADSIM_HOST_MEMORY_GB"
    )
    allow_nonfinite: bool = define(  # core/finite.py
        "drop (and count in results.json) the queries whose gradient, or a candidate's, is NaN or inf, instead "
        "of stopping the run (off: a non-finite value stops it, naming the sample, the matrix and the likely cause)",
        False,
        role=Role(when_set=True),
        const=True,
        group=RUN,
    )
    # It changes the candidate pool, so it changes the numbers.
    skip_overlong: bool = define(
        "leave out, and count in results.json, the rows (originals with their variants, or variants) whose "
        "prompt leaves no trained token within --max-length, instead of stopping the run",
        False,
        role=Role(numbers=True, when_set=True),
        const=True,
        group=DATA,
    )
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """The defaults that depend on other fields (the bundled variants, --proj-dim), set once here."""
        resolved: dict[str, Any] = {}
        if self.setting == "both":
            resolved["paraphrased_data"] = self.paraphrased_data or str(BUNDLED_DATA / VARIANT_FILES["paraphrased"])
            resolved["model_generated_data"] = self.model_generated_data or str(
                BUNDLED_DATA / VARIANT_FILES["model-generated"]
            )
        elif self.variant_data is None:
            resolved["variant_data"] = str(BUNDLED_DATA / VARIANT_FILES.get(self.setting, "paraphrased.jsonl"))
        if self.proj_dim is None:
            resolved["proj_dim"] = DEFAULT_PROJ_DIM.get(self.projection, 4096)
        if self.dtype is None:
            resolved["dtype"] = default_dtype(self.device, self.use_gpu)
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    def validate(self) -> Config:
        check_choice("--setting", self.setting, SETTING_CHOICES)
        if self.setting == "both" and self.variant_data is not None:
            raise GradsimError(
                "--variant-data names one setting's variants: with --setting both give "
                "--paraphrased-data and --model-generated-data instead"
            )
        memory = (("--memory-gb", self.memory_gb), ("--scratch-gb", self.scratch_gb))
        check_at_least(0, ">= 0", (*memory, ("--host-memory-gb", self.host_memory_gb)))
        check_choice("--computation-type", self.computation_type, COMPUTATION_TYPES)
        check_choice("--candidates", self.candidates, CANDIDATE_MODES)
        check_choice("--loss-on", self.loss_on, LOSS_TARGETS)
        check_choice("--turns", self.turns, TURNS)
        if self.turns == "all" and self.loss_on != "response":
            raise GradsimError(
                f"--turns all trains every assistant turn, which --loss-on {self.loss_on} does not: "
                "use --loss-on response with --turns all"
            )
        check_choice("--normalize", self.normalize, NORMALIZERS)
        check_at_least(0, ">= 0", (("--damping", self.damping),))
        if self.matrices is not None and not self.matrices.strip():
            raise GradsimError("--matrices is empty: give a regular expression, a comma list or a selection JSON")
        hooked = self.use_random_projection and self.projection in ("tensorsketch", "factorized")
        if self.matrices is not None and hooked:
            raise GradsimError(
                f"--matrices restricts the exact gradient, which --projection {self.projection} never forms: use "
                "the exact path or --projection countsketch or trak"
            )
        if self.normalize != "none" and hooked:
            raise GradsimError(
                f"--normalize {self.normalize} acts on the flat gradient, which --projection {self.projection} never "
                "forms: use the exact path or --projection countsketch or trak"
            )
        check_choice("--projection", self.projection, PROJECTIONS)
        check_choice("--allocation", self.allocation, ALLOCATIONS)
        if self.allocation != "norm" and not (self.use_random_projection and self.projection in SKETCHED):
            raise GradsimError(
                f"--allocation {self.allocation} shares the dims of --projection countsketch or tensorsketch: add "
                "--use-random-projection with one of them, or drop --allocation"
            )
        check_choice("MT_DTYPE/--dtype", self.dtype, DTYPES)
        if self.revision is not None and not self.revision.strip():
            raise GradsimError("--revision is empty: give a branch, tag or commit of the hub model, or drop it")
        if self.revision is not None and self.model_name == EMBEDDED_MODEL:
            raise GradsimError(
                f"--revision {self.revision!r} needs a hub model: give --model ORG/NAME or drop --revision"
            )
        if self.chat_template is not None and not self.chat_template.strip():
            raise GradsimError("--chat-template is empty: give tulu or the path of a Jinja file")
        if self.top_k < 1:
            raise GradsimError(f"--top-k must be at least 1, got {self.top_k}")
        if self.sample_size is not None and self.sample_size < 1:
            # MT_SAMPLE_SIZE is checked, under its own name, where it is read (env_defaults).
            raise GradsimError(
                f"--sample-size must be a positive integer, got {self.sample_size!r}: give e.g. 10, or drop it "
                "to use all samples"
            )
        if self.max_length is not None and self.max_length < 2:
            raise GradsimError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        check_at_least(1, "a positive integer", (("--proj-dim", self.proj_dim), ("--batch-size", self.batch_size)))
        partition = (("--partition-start", self.partition_start), ("--partition-end", self.partition_end))
        check_at_least(0, ">= 0", partition)
        return self

    def to_record(self, prov: Optional[Provenance] = None) -> dict[str, Any]:
        """This Config with what a run found out, as results' and config.json's "config": the keys, their
        order and values of the one object that held both before they were split (``extra`` last, the
        provenance just before it, max_length the resolved one where the run knows it)."""
        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        for name in RECORDED_WHEN_SET:
            if out[name] in (None, False):
                del out[name]
        found = dataclasses.asdict(prov or Provenance())
        if found["max_length"] is None:  # not resolved yet: what was asked for
            del found["max_length"]
        out.update(found)
        out["extra"] = extra
        return out

    def compat(self, prov: Optional[Provenance] = None) -> dict[str, Any]:
        """The fields of to_record() that decide the numbers (COMPAT_FIELDS)."""
        record = self.to_record(prov)
        return {k: record[k] for k in COMPAT_FIELDS if k in record}  # RECORDED_WHEN_SET: only when set

    def to_dict(self) -> dict[str, Any]:
        """The fields of this Config alone (to_record() adds the provenance)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """The Config of a record (results' "config", old or new): provenance keys are left out, so
        max_length is the one the run resolved."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Provenance:
    """What a run found out rather than was asked: it identifies what the numbers were computed from.
    All but code_version are compat fields (code_version is recorded: a commit during a campaign keeps
    its partitions and stores)."""

    model_revision: Optional[str] = found()  # the commit --revision resolved to (LoadedModel.revision)
    chat_template_sha256: Optional[str] = found()
    code_version: Optional[str] = found(Role())  # run.code_version(): package version and git commit
    original_data_sha256: Optional[str] = found()
    variant_data_sha256: Optional[str] = found(QUERY_SIDE)
    max_length: Optional[int] = found()  # --max-length resolved against the model's context (None: not yet)


def role_of(name: str) -> Role:
    """The Role of a Config or Provenance field (a Provenance field's where both have it: max_length)."""
    return _ROLES[name]


_ROLES = {f.name: f.metadata.get("role", Role()) for cls in (Config, Provenance) for f in dataclasses.fields(cls)}
# The compat record's keys in the order they were first written (kept: results keep their bytes); a numbers
# field added later follows them, in field order.
_FIRST_COMPAT_ORDER = (
    "setting",
    "computation_type",
    "loss_on",
    "turns",
    "normalize",
    "damping",
    "matrices",
    "candidates",
    "top_k",
    "model_name",
    "model_revision",
    "chat_template_sha256",
    "max_length",
    "dtype",
    "seed",
    "use_random_projection",
    "projection",
    "proj_dim",
    "allocation",
    "original_data_sha256",
    "variant_data_sha256",
    "sample_size",
    "skip_overlong",
)
_NUMBERS = [name for name, role in _ROLES.items() if role.numbers]
COMPAT_FIELDS = tuple(k for k in _FIRST_COMPAT_ORDER if k in _NUMBERS) + tuple(
    k for k in _NUMBERS if k not in _FIRST_COMPAT_ORDER
)
RECORDED_WHEN_SET = tuple(f.name for f in dataclasses.fields(Config) if role_of(f.name).when_set)
# Every flag of the study (main.py / gradsim run), in field order under their --help sections.
OPTIONS = options_of(Config)
ENV_OPTIONS = tuple(o for o in options_of(Config, flagless=True) if o.env)
RUN_TIME_ENV = tuple(o.field for o in ENV_OPTIONS if role_of(o.field).env_at_run)  # the budgets
DEFAULTS = defaults_of(Config)


def default_dtype(device: str, use_gpu: bool = True) -> str:
    """--dtype when not given: CUDA_DTYPE for a run on CUDA (``--device cuda[:N]``, or ``auto`` where CUDA is
    available and USE_GPU is on), else float32."""
    if str(device).startswith("cuda"):
        return CUDA_DTYPE
    if device == "auto" and use_gpu:
        import torch

        return CUDA_DTYPE if torch.cuda.is_available() else "float32"
    return "float32"


def add_options(parser: Parser, fields: Optional[tuple[str, ...]] = None) -> None:
    """Add the flags of these Config fields (default: all of OPTIONS) to parser. Each flag's default is
    None (not given), so .env and then Config's own default apply; the help states Config's default."""
    by_field = {o.field: o for o in OPTIONS}
    parser.add_options(Config, [by_field[name] for name in fields] if fields else OPTIONS)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:12] + "..."


def compat_differences(old: Optional[dict], new: Optional[dict], limit: int = 3) -> str:
    """'' when two compat dicts agree on COMPAT_FIELDS (other keys, e.g. an older file's code_version,
    are ignored); else what differs, old value first: ``field dtype: float32 vs bfloat16, ...``."""
    old, new = old or {}, new or {}
    # A field added since a file was written reads as its default there (e.g. loss_on: the study's response).
    diff = [k for k in COMPAT_FIELDS if old.get(k, DEFAULTS.get(k)) != new.get(k, DEFAULTS.get(k))]
    listed = [f"field {k}: {_short(old.get(k))} vs {_short(new.get(k))}" for k in diff[:limit]]
    if len(diff) > limit:
        listed.append(f"{len(diff) - limit} more")
    return ", ".join(listed)


def env_defaults(dotenv_path: Optional[str] = None) -> dict[str, Any]:
    """The settings whose environment variable is set (MT_MODEL_NAME, MT_DEVICE, USE_GPU, MT_DTYPE,
    MT_SAMPLE_SIZE: each field's ``env``), from the environment and a .env file (the real environment wins
    over .env), converted and checked; those read where the run runs (Role.env_at_run) are left to it."""
    from dotenv import load_dotenv

    load_dotenv(dotenv_path or Path.cwd() / ".env", override=False)
    return env_values(Config, os.environ, [o.field for o in ENV_OPTIONS if o.field not in RUN_TIME_ENV])


def env_setting(name: str) -> Any:
    """The value of Config field ``name`` from its environment variable where the run runs (None: not set)."""
    return env_values(Config, os.environ, [name]).get(name)
