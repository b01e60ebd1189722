"""How long a run or a Slurm task will take, before it is submitted: backward passes, tokens and wall time.

Passes come from the run's own schedule (schedule.make_plan over the BM25 candidates, with the gradients the
task's budget holds), tokens from the samples encoded as the run will encode them, and time from gradsim's
FLOP count, 6 P T per backward pass of T tokens through P parameters (forward 2 P T, backward 4 P T; attention's
share is left out: under 4% at LIMA's lengths), divided by a device throughput that is either measured on that
kind of device (THROUGHPUT, with its source) or an assumed fraction of the card's dense peak (stated).
The time leaves out what the schedule cannot see: originals read back from scratch instead of recomputed (only
ever cheaper), the baselines' forward passes, and the model's load (STARTUP_S, assumed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from gradsim.config import Config

log = logging.getLogger("gradsim")

# Dense (not sparse) peak TFLOP/s by device name, first match wins: NVIDIA's data sheets (the GPU check reads
# the same table for its % of peak).
CARD_PEAKS = (
    ("GH200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0}),
)
PRECISION_KEY = {"float32": "fp32", "tf32": "tf32", "bfloat16": "bf16", "bfloat16-weights": "bf16"}


def card_peaks(name: str) -> Optional[dict]:
    """The dense peaks of the card whose name (a device name, or a gres type like "h100") contains a key."""
    for key, peaks in CARD_PEAKS:
        if key.lower() in name.lower() or name.lower() == key.lower().replace(" ", ""):
            return {"matched": key, **peaks}
    return None


# A GPU of no named type (--gpus 1) is taken to be the smallest of the common data-centre training cards.
DEFAULT_GPU = "a100"
DEFAULT_GPU_MEMORY_GB = 40.0  # A100 40 GB, the smallest of the common data-centre training cards
# Assumed share of the dense peak that per-sample gradients reach on a GPU (batch of one, 0.5-2k tokens): no
# GPU measurement of gradsim has been committed yet (bench/gpu_check.py writes one).
ASSUMED_GPU_FRACTION = 0.4
# Measured on the CPU: the 1.2B shape's exact path (bench/bench_study_scale.py, 2026-12-02, 2-core AMD EPYC Zen 4
# VM, fp32): 0.0655 s per token, 6 x 1.18e9 FLOP per token -> 108 GFLOP/s on 2 cores, 54% of that VM's fp32 peak.
CPU_TFLOPS_PER_CORE = 0.054
CPU_SOURCE = "measured: bench/results/study_scale_20261202T142836Z.json (2-core AMD EPYC VM, fp32, 54% of peak)"
STARTUP_S = 120.0  # assumed: imports, the model's load and its move to the device
# sbatch --time when not given: the estimate times TIME_MARGIN plus TIME_SLACK_MIN minutes (a task that still
# runs out is requeued and resumes where it stopped).
TIME_MARGIN = 2.0
TIME_SLACK_MIN = 15


@dataclass(frozen=True)
class Throughput:
    tflops: float  # achieved, in gradsim's FLOP count
    source: str  # "measured: ..." or "assumed: ..."


def gpu_type(gpus: Optional[str]) -> str:
    """The card of a --gpus value ("a100:1" -> a100); DEFAULT_GPU when it names none the table knows."""
    if gpus and ":" in str(gpus) and card_peaks(str(gpus).split(":")[0]):
        return str(gpus).split(":")[0].lower()
    return DEFAULT_GPU


def throughput(device: str, dtype: str, gpus: Optional[str] = None, cpus: Optional[int] = None) -> Throughput:
    """The throughput a task on this device may expect, with where the figure comes from."""
    if str(device).startswith("cuda"):
        card = gpu_type(gpus)
        precision = PRECISION_KEY[dtype]
        peak = card_peaks(card)[precision]
        named = (
            "" if card != DEFAULT_GPU or (gpus and ":" in str(gpus)) else f" (no GPU type given: {DEFAULT_GPU} assumed)"
        )
        return Throughput(
            peak * ASSUMED_GPU_FRACTION,
            f"assumed: {ASSUMED_GPU_FRACTION:.0%} of the {card.upper()}'s dense {dtype} peak "
            f"({peak:g} TFLOP/s){named}; no GPU measurement yet",
        )
    cores = cpus or 1
    return Throughput(CPU_TFLOPS_PER_CORE * cores, f"{CPU_SOURCE}, scaled to {cores} core(s)")


@dataclass
class Estimate:
    """One task's (or a whole run's) work and time."""

    label: str
    queries: int = 0
    passes: int = 0
    tokens: int = 0  # tokens through the backward passes
    params: int = 0
    tflops: float = 1.0
    startup_s: float = STARTUP_S
    notes: list[str] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return 6.0 * self.params * self.tokens

    @property
    def seconds(self) -> float:
        return self.startup_s + self.flops / (self.tflops * 1e12)

    def add(self, other: Estimate) -> None:
        self.queries += other.queries
        self.passes += other.passes
        self.tokens += other.tokens

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "queries": self.queries,
            "backward_passes": self.passes,
            "tokens": self.tokens,
            "pflop": self.flops / 1e15,
            "seconds": self.seconds,
        }


def format_duration(seconds: float) -> str:
    m = int(math.ceil(seconds / 60))
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min"


def slurm_time(seconds: float) -> str:
    """The sbatch --time for a task estimated at ``seconds``: TIME_MARGIN times it plus TIME_SLACK_MIN minutes."""
    minutes = int(math.ceil(seconds * TIME_MARGIN / 60)) + TIME_SLACK_MIN
    d, rest = divmod(minutes, 1440)
    h, m = divmod(rest, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


def sample_tokens(cfg: Config, samples, max_length: int) -> list[int]:
    """Each sample's trained tokens as the run encodes them (its tokenizer and chat template); where the
    tokenizer cannot be loaded here, a quarter of its characters (noted by the caller)."""
    from gradsim.data.encode import encode

    tok = tokenizer_for(cfg)
    if tok is None:
        return [min(max_length, max(2, (len(s.prompt) + len(s.response)) // 4)) for s in samples]
    return [encode(tok, s, max_length, cfg.loss_on, cfg.turns).num_tokens for s in samples]


_TOKENIZERS: dict = {}


def tokenizer_for(cfg: Config):
    """The run's tokenizer with its chat template (no weights), or None where it cannot be had here."""
    key = (cfg.model_name, cfg.revision, cfg.chat_template)
    if key not in _TOKENIZERS:
        try:
            from gradsim.core.model import load_tokenizer

            _TOKENIZERS[key] = load_tokenizer(cfg)
        except Exception as e:  # no network on a login node, say: the estimate says it approximated
            log.info("estimate: no tokenizer for %s (%s): tokens approximated from characters", cfg.model_name, e)
            _TOKENIZERS[key] = None
    return _TOKENIZERS[key]


def estimate_shares(
    cfg: Config, shares: list[tuple[Config, object, int, int]], params: int, capacity: Optional[int], max_length: int
) -> Estimate:
    """Passes and tokens of one task covering ``shares`` ((setting's Config, Dataset, start, end) each, one
    schedule as exact.score_exact makes it), with ``capacity`` exact gradients held (None: a projected run, each
    needed original featurized once)."""
    from gradsim.data.retrieval import candidate_lists
    from gradsim.study.schedule import fewest_held, make_plan

    est = Estimate("task", params=params)
    cands, q_tokens = [], []
    for c, data, start, end in shares:
        cands += candidate_lists(data, c.candidates, c.top_k, turns=c.turns)[start:end]
        q_tokens += sample_tokens(c, data.queries[start:end], max_length)
    needed = sorted({j for c in cands for j in c})
    originals = shares[0][1].originals  # both settings read the same originals (run.prepare checks it)
    o_tokens = dict(zip(needed, sample_tokens(cfg, [originals[j] for j in needed], max_length)))
    est.queries = len(cands)
    if tokenizer_for(cfg) is None:
        est.notes.append("tokens approximated as a quarter of the characters (the tokenizer cannot be loaded here)")
    if not cands:
        return est
    if capacity is None:
        est.passes = len(cands) + len(o_tokens)
        est.tokens = sum(q_tokens) + sum(o_tokens.values())
        return est
    groups = [c[0] for c in cands]
    plan = make_plan(cands, groups, fewest_held(cands, groups, max(1, capacity)))  # as exact.score_exact
    est.passes = len(cands) + plan.original_passes
    if plan.mode == "hold-originals":
        est.tokens = sum(q_tokens) + sum(o_tokens.values())
    else:
        est.tokens = sum(q_tokens) + sum(
            sum(o_tokens[j] for j in {j for q in b for j in cands[q]}) for b in plan.blocks
        )
    return est
