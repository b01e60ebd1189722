"""The run configuration: one typed object built from .env and command-line flags (flags win).

``Config`` is what the user asked for, validated once and never changed; ``Provenance`` is what a run
found out (the model's commit, the data's hashes, the token limit in force). Both are written beside
every output as one dict (``Config.to_record``), and partition results are only merged when the fields that
decide the numbers (``COMPAT_FIELDS``, of either) agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gradsim.errors import GradsimError
from gradsim.layout import default_output_dir
from gradsim.options import Option, Parser

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

# Fields that change the numbers: partitions (and feature shards) made with different values never mix.
# code_version (the git commit) is not one: a commit during a cluster campaign must not throw away its
# progress, partitions or feature store. It is recorded (config, results' code_versions) as provenance.
COMPAT_FIELDS = (
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
    "skip_overlong",  # in a compat record only when set (RECORDED_WHEN_SET)
)


# Options added after results were first written: recorded (config, results' "config") only when set, so
# that a default run writes the bytes it wrote before they existed.
RECORDED_WHEN_SET = ("ids_file", "allow_nonfinite", "skip_overlong")


@dataclass(frozen=True)
class Config:
    """What the user asked for. Frozen: a run derives per-setting copies (dataclasses.replace) and keeps
    what it finds out in a Provenance, so the caller's Config is never changed."""

    setting: str = "paraphrased"
    computation_type: str = "gradient-similarity"
    loss_on: str = "response"  # response (the study's), prompt or all: see encode.py
    turns: str = "first"  # first (the study's) or all: which turns of each row are used, see data.py/encode.py
    normalize: str = "none"  # normalize.NORMALIZERS: applied to each gradient before it is compared
    damping: float = 1e-2  # relative damping of the adafactor normalizer's second moment
    matrices: Optional[str] = None  # matrices.py: a regex, a comma list or a selection JSON (None: all)
    candidates: str = "bm25"
    top_k: int = 4
    model_name: str = EMBEDDED_MODEL
    revision: Optional[str] = None  # hub branch, tag or commit (None: main); the resolved commit is model_revision
    trust_remote_code: bool = False
    chat_template: Optional[str] = None  # None: the model's own; "tulu" or a Jinja file path
    device: str = "auto"
    use_gpu: bool = True
    dtype: Optional[str] = None  # None: float32, or CUDA_DTYPE where the run is on CUDA (default_dtype)
    sample_size: Optional[int] = None
    ids_file: Optional[str] = None  # only the samples with these ids: a file of ids, or "study" (data.STUDY_IDS)
    max_length: Optional[int] = None
    seed: int = 42
    original_data: str = str(BUNDLED_DATA / "original.jsonl")
    variant_data: Optional[str] = None
    # --setting both: the variants of each setting (default: the bundled files)
    paraphrased_data: Optional[str] = None
    model_generated_data: Optional[str] = None
    partition_start: Optional[int] = None
    partition_end: Optional[int] = None
    output_dir: str = field(default_factory=lambda: str(default_output_dir()))  # data/ where the command runs
    use_random_projection: bool = False
    projection: str = "tensorsketch"
    proj_dim: Optional[int] = None  # None: DEFAULT_PROJ_DIM of the projection
    allocation: str = "norm"  # ALLOCATIONS: how the sketches share --proj-dim among the matrices
    batch_size: int = 1
    baselines: bool = True  # BM25 and representation similarity on the same queries (forward passes only)
    # Budgets of the exact path (they change the schedule, never the numbers). None: from the environment
    # (GRADSIM_MEMORY_GB, GRADSIM_SCRATCH_GB, GRADSIM_HOST_MEMORY_GB), else the defaults in memory.py.
    memory_gb: Optional[float] = None
    scratch_gb: Optional[float] = None
    host_memory_gb: Optional[float] = None
    # Off by default, and then left out of to_record (RECORDED_WHEN_SET), so a default run's files keep their bytes.
    allow_nonfinite: bool = False  # finite.py: drop and count a sample with a NaN/inf gradient instead of stopping
    # Leave out (and count) the rows with no trained token within --max-length instead of stopping. It changes
    # the candidate pool, so it is a compat field (only when set).
    skip_overlong: bool = False
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
    All but code_version are COMPAT_FIELDS (code_version is recorded: a commit during a campaign keeps
    its partitions and stores)."""

    model_revision: Optional[str] = None  # the commit --revision resolved to (LoadedModel.revision)
    chat_template_sha256: Optional[str] = None
    code_version: Optional[str] = None  # run.code_version(): package version and git commit
    original_data_sha256: Optional[str] = None
    variant_data_sha256: Optional[str] = None
    max_length: Optional[int] = None  # --max-length resolved against the model's context (None: not yet)


# Every flag of the study (main.py / gradsim run), in --help order. Other commands pick theirs from here.
OPTIONS = (
    Option("setting", f"one of {', '.join(SETTING_CHOICES)} (both: one run that writes what the two runs would)"),
    Option("computation_type", f"one of {', '.join(COMPUTATION_TYPES)}"),
    Option("candidates", "bm25: own original + BM25 top-k others (the study's protocol); all: every original"),
    Option("top_k", "BM25 candidates besides the true original (4: chance 1/5)"),
    Option("use_random_projection", "project gradients (see --projection, --proj-dim)", const=True),
    Option("projection", f"one of {', '.join(PROJECTIONS)}"),
    Option(
        "proj_dim",
        "projected dimensions in all, shared among the matrices by --allocation (tensorsketch, countsketch; "
        "default 65536); factorized and trak take --dims-per-matrix",
    ),
    Option(
        "allocation",
        "how tensorsketch and countsketch share --proj-dim among the matrices: norm (by calibrated gradient-norm "
        "share), norm-floor (the same, every matrix at least half the uniform share), sqrt (by the square root "
        "of its entries) or uniform; results.json states each matrix's predicted error (per_matrix_fidelity)",
    ),
    Option(
        "loss_on",
        "the tokens whose loss the gradient is of: response (the study's), prompt (every prompt token after the "
        "first, assistant header included) or all",
    ),
    Option(
        "turns",
        "first: each row's first user/assistant exchange (the study's); all: the whole conversation, every "
        "assistant turn trained and every other turn masked (with --loss-on response)",
    ),
    Option(
        "normalize",
        "applied to each gradient before comparing: none, center (minus the originals' mean), unit (each matrix "
        "to unit norm), adafactor (a factored second moment from the originals) or center+unit, adafactor+center, "
        "adafactor+center+unit (exact path, countsketch, trak)",
    ),
    Option("damping", "relative damping of --normalize adafactor"),
    Option(
        "matrices",
        "only these parameter matrices: a regular expression over names, a comma-separated list, or a selection "
        "JSON of gradsim select; weight gradients are formed for those alone and the backward stops below the "
        "lowest (exact path, countsketch, trak; default: all)",
    ),
    Option("seed", "projection seed"),
    Option("partition_start", "first query index of this partition"),
    Option("partition_end", "query index one past the end of this partition"),
    Option(
        "original_data", "original samples: local file (JSONL, JSON, Parquet, ...) or hub id (default: bundled sample)"
    ),
    Option("variant_data", "variants (queries): local file or hub id (default: bundled file of --setting)"),
    Option("paraphrased_data", "with --setting both: the paraphrased variants (default: bundled)"),
    Option("model_generated_data", "with --setting both: the model-generated variants (default: bundled)"),
    Option(
        "memory_gb",
        "exact gradients held at once, in GB (GRADSIM_MEMORY_GB; default: 75%% of the free host memory on CPU, "
        "90%% of the free GPU memory on CUDA, after the model)",
    ),
    Option(
        "scratch_gb",
        "disk for exact gradients of originals kept between blocks, used only where reading one back is measured "
        "cheaper than recomputing it (GRADSIM_SCRATCH_GB; default 0)",
    ),
    Option("host_memory_gb", "on CUDA: host RAM for kept originals' gradients, same rule (GRADSIM_HOST_MEMORY_GB)"),
    Option(
        "allow_nonfinite",
        "drop (and count in results.json) the queries whose gradient, or a candidate's, is NaN or inf, instead "
        "of stopping the run (off: a non-finite value stops it, naming the sample, the matrix and the likely cause)",
        const=True,
    ),
    Option(
        "skip_overlong",
        "leave out, and count in results.json, the rows (originals with their variants, or variants) whose "
        "prompt leaves no trained token within --max-length, instead of stopping the run",
        const=True,
    ),
    Option("model_name", "HF model id or local directory (default: MT_MODEL_NAME or embedded)", flag="--model"),
    Option("revision", "hub branch, tag or commit of --model (default: main); the resolved commit is recorded"),
    Option(
        "trust_remote_code",
        "run the model repository's own Python code (needed by some hub models; off by default)",
        const=True,
    ),
    Option(
        "chat_template",
        "tulu (the original study's) or a Jinja file: replaces the model's own template; required for a model "
        "without one",
    ),
    Option("device", "cpu, cuda or cuda:N (default: MT_DEVICE, else CUDA when available and USE_GPU=1)"),
    Option(
        "dtype",
        f"{', '.join(DTYPES)}: tf32 runs CUDA matmuls in TF32 over fp32 weights and gradients, bfloat16 "
        "autocasts over fp32 weights and gradients, bfloat16-weights stores weights and gradients in bf16 "
        f"(default: MT_DTYPE, else float32 on the CPU and {CUDA_DTYPE} on CUDA, chosen by measured fidelity)",
    ),
    Option("sample_size", "use only the first N originals (default: MT_SAMPLE_SIZE or all)"),
    Option(
        "ids_file",
        "only the samples with these ids: a file of ids, one per line, or study for the original study's 988 LIMA "
        "ids (shipped with gradsim, src/gradsim/study_ids/); the data hashes record the subset",
    ),
    Option("max_length", "truncate longer samples (flagged in the output); default: model context"),
    Option("batch_size", "samples per forward/backward where the method batches"),
    Option("baselines", "skip the BM25 and representation-similarity baselines", flag="--no-baselines", const=False),
    Option("output_dir", "where results go (default: data/)"),
)


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
    default = {f.name: f.default for f in dataclasses.fields(Config)}
    diff = [k for k in COMPAT_FIELDS if old.get(k, default.get(k)) != new.get(k, default.get(k))]
    listed = [f"field {k}: {_short(old.get(k))} vs {_short(new.get(k))}" for k in diff[:limit]]
    if len(diff) > limit:
        listed.append(f"{len(diff) - limit} more")
    return ", ".join(listed)


def check_choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GradsimError(f"unknown {flag} {value!r}: choose one of {', '.join(allowed)}")


def check_at_least(minimum: float, requirement: str, flags) -> None:
    """Refuse the first (flag, value) whose value is below ``minimum`` (None: not given), saying
    "<flag> must be <requirement>, got <value>"."""
    for flag, value in flags:
        if value is not None and value < minimum:
            raise GradsimError(f"{flag} must be {requirement}, got {value}")


def add_quiet_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")


def parse_flags(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> dict[str, Any]:
    """The flags as a dict, less -q/--quiet (add_quiet_flag), which sets the log level: warnings only, or info."""
    args = vars(parser.parse_args(argv))
    quiet = args.pop("quiet")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    return args


def _positive_int_env(name: str) -> Optional[int]:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else None
    except ValueError:
        value = 0
    if value is not None and value < 1:
        raise GradsimError(
            f"{name}={raw!r} is not a positive integer: set it to e.g. 10, or unset it to use all samples"
        )
    return value


def env_defaults(dotenv_path: Optional[str] = None) -> dict[str, Any]:
    """Read the MT_* settings from the environment and a .env file (the real environment wins over .env)."""
    from dotenv import load_dotenv

    load_dotenv(dotenv_path or Path.cwd() / ".env", override=False)
    out: dict[str, Any] = {}
    if os.environ.get("MT_MODEL_NAME", "").strip():
        out["model_name"] = os.environ["MT_MODEL_NAME"].strip()
    if os.environ.get("MT_DEVICE", "").strip():
        out["device"] = os.environ["MT_DEVICE"].strip()
    use_gpu = os.environ.get("USE_GPU", "").strip()
    if use_gpu:
        if use_gpu.lower() not in ("0", "1", "true", "false", "yes", "no"):
            raise GradsimError(f"USE_GPU={use_gpu!r} is not a boolean: set it to 1 or 0")
        out["use_gpu"] = use_gpu.lower() in ("1", "true", "yes")
    if os.environ.get("MT_DTYPE", "").strip():
        out["dtype"] = os.environ["MT_DTYPE"].strip()
    sample_size = _positive_int_env("MT_SAMPLE_SIZE")
    if sample_size is not None:
        out["sample_size"] = sample_size
    return out


def hf_token() -> Optional[str]:
    """The Hugging Face token, read only where needed and never stored in a Config or written anywhere."""
    return os.environ.get("HF_TOKEN") or None


def redact(text: str) -> str:
    """Remove secrets from text that may reach a log or an error message."""
    for name in ("HF_TOKEN", "OPENAI_API_KEY"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
