"""The run configuration: one typed object built from .env and command-line flags (flags win).

It is written beside every output, and partition results are only merged when the fields that
decide the numbers (``COMPAT_FIELDS``) agree.
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

from .errors import GradsimError

SETTINGS = ("paraphrased", "model-generated")
# "both": one run over both settings, writing what two runs would; a candidate's gradient serves both.
SETTING_CHOICES = SETTINGS + ("both",)
COMPUTATION_TYPES = ("gradient-similarity", "dot-product")
CANDIDATE_MODES = ("bm25", "all")
PROJECTIONS = ("countsketch", "tensorsketch", "factorized", "trak")
# --proj-dim when not given: total dims for the sketches, per parameter matrix for factorized and trak.
DEFAULT_PROJ_DIM = {"countsketch": 65536, "tensorsketch": 65536, "factorized": 4096, "trak": 4096}
# float32; bfloat16: bf16 autocast over fp32 weights and gradients; bfloat16-weights: bf16 weights and
# gradients (half the memory, for models that do not fit otherwise).
DTYPES = ("float32", "bfloat16", "bfloat16-weights")
EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DATA = REPO_ROOT / "data" / "lima_sample"
VARIANT_FILES = {"paraphrased": "paraphrased.jsonl", "model-generated": "model_generated.jsonl"}

# Fields that change the numbers: partitions (and feature shards) made with different values never mix.
# code_version (the git commit) is not one: a commit during a cluster campaign must not throw away its
# progress, partitions or feature store. It is recorded (config, results' code_versions) as provenance.
COMPAT_FIELDS = (
    "setting",
    "computation_type",
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
    "original_data_sha256",
    "variant_data_sha256",
    "sample_size",
)


@dataclass
class Config:
    setting: str = "paraphrased"
    computation_type: str = "gradient-similarity"
    candidates: str = "bm25"
    top_k: int = 4
    model_name: str = EMBEDDED_MODEL
    revision: Optional[str] = None  # hub branch, tag or commit (None: main); the resolved commit is model_revision
    trust_remote_code: bool = False
    chat_template: Optional[str] = None  # None: the model's own; "tulu" or a Jinja file path
    device: str = "auto"
    use_gpu: bool = True
    dtype: str = "float32"
    sample_size: Optional[int] = None
    max_length: Optional[int] = None
    seed: int = 42
    original_data: str = str(BUNDLED_DATA / "original.jsonl")
    variant_data: Optional[str] = None
    # --setting both: the variants of each setting (default: the bundled files)
    paraphrased_data: Optional[str] = None
    model_generated_data: Optional[str] = None
    partition_start: Optional[int] = None
    partition_end: Optional[int] = None
    output_dir: str = str(REPO_ROOT / "data")
    use_random_projection: bool = False
    projection: str = "tensorsketch"
    proj_dim: Optional[int] = None  # None: DEFAULT_PROJ_DIM of the projection
    batch_size: int = 1
    baselines: bool = True  # BM25 and representation similarity on the same queries (forward passes only)
    # Budgets of the exact path (they change the schedule, never the numbers). None: from the environment
    # (GRADSIM_MEMORY_GB, GRADSIM_SCRATCH_GB, GRADSIM_HOST_MEMORY_GB), else the defaults in memory.py.
    memory_gb: Optional[float] = None
    scratch_gb: Optional[float] = None
    host_memory_gb: Optional[float] = None
    # Filled in once the model and data are loaded (they are part of what makes results comparable).
    model_revision: Optional[str] = None
    chat_template_sha256: Optional[str] = None
    code_version: Optional[str] = None
    original_data_sha256: Optional[str] = None
    variant_data_sha256: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.setting == "both":
            self.paraphrased_data = self.paraphrased_data or str(BUNDLED_DATA / VARIANT_FILES["paraphrased"])
            self.model_generated_data = self.model_generated_data or str(
                BUNDLED_DATA / VARIANT_FILES["model-generated"]
            )
        elif self.variant_data is None:
            self.variant_data = str(BUNDLED_DATA / VARIANT_FILES.get(self.setting, "paraphrased.jsonl"))
        if self.proj_dim is None:
            self.proj_dim = DEFAULT_PROJ_DIM.get(self.projection, 4096)

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
        check_choice("--projection", self.projection, PROJECTIONS)
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
            raise GradsimError(f"MT_SAMPLE_SIZE must be a positive integer, got {self.sample_size!r}")
        if self.max_length is not None and self.max_length < 2:
            raise GradsimError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        check_at_least(1, "a positive integer", (("--proj-dim", self.proj_dim), ("--batch-size", self.batch_size)))
        partition = (("--partition-start", self.partition_start), ("--partition-end", self.partition_end))
        check_at_least(0, ">= 0", partition)
        return self

    def compat(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in COMPAT_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:12] + "..."


def compat_differences(old: Optional[dict], new: Optional[dict], limit: int = 3) -> str:
    """'' when two compat dicts agree on COMPAT_FIELDS (other keys, e.g. an older file's code_version,
    are ignored); else what differs, old value first: ``field dtype: float32 vs bfloat16, ...``."""
    old, new = old or {}, new or {}
    diff = [k for k in COMPAT_FIELDS if old.get(k) != new.get(k)]
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
