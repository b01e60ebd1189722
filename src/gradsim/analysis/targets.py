"""Where is the signal? Loss target x normalizer, beside the baselines, in one run (``gradsim targets``).

For every original and every query of both settings, two backward passes give the gradient of the loss
on the prompt and on the response; the gradient of the loss on all tokens is their token-weighted mean
(encode.combine_targets), so three targets cost two passes. Each gradient is sketched per matrix
(CountSketch, ``--dims-per-matrix`` dims per matrix; a matrix with fewer entries is kept exact), once
as it is and once scaled by the Adafactor-style second moment (normalize.py) estimated from the
originals in a first pass. Centring and per-matrix unit norms are exact in sketch space (centring is
linear; a matrix's slice is its own sketch). The table ranks each query's true original among its 1 + k
BM25 candidates (the study's protocol) and among the whole corpus, beside BM25, representation
similarity (several poolings and layers) and random, with bootstrap 95% intervals over queries.

    uv run gradsim targets                      # bundled data, both settings; ~15 min on 2 cores
    uv run gradsim targets --sample-size 8      # a quick look

The table is printed and written (atomically) to ``<output-dir>/targets/targets.json`` with the
configuration, model revision, code version and seeds that reproduce it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from gradsim.config import (
    LOSS_TARGETS,
    SETTINGS,
    Config,
    Provenance,
)
from gradsim.core.metrics import rank_intervals, true_rank
from gradsim.core.normalize import (
    NORMALIZERS,
    FactoredSecondMoment,
    cosine_matrix,
    normalized_features,
    parse_normalizer,
)
from gradsim.data.encode import combine_targets
from gradsim.errors import GradsimError
from gradsim.options import option
from gradsim.study.features import progress_bar

log = logging.getLogger("gradsim")

TARGETS = LOSS_TARGETS  # all three from two backward passes per sample
KINDS = ("raw", "adafactor")  # features as they are, and scaled by the second moment
DEFAULT_LAYERS = (-1,)


@dataclass
class TargetOptions:
    """The options of gradsim targets beside the study's (Config)."""

    dims_per_matrix: int = option("CountSketch dims per matrix", default=2048)
    bootstrap: int = option("bootstrap resamples for the intervals", default=2000)
    layers: list[int] = option(
        "hidden-state layers for representation similarity (-1: last, after the final norm; 0: embeddings)",
        default_factory=lambda: list(DEFAULT_LAYERS),
        nargs="+",
    )


def per_matrix_allocation(model, dims_per_matrix: int) -> dict:
    """A countsketch allocation giving every matrix the same dims (kept exact when it has fewer entries)."""
    from gradsim.core.projection import fitted_dims, trainable

    names, shapes = trainable(model)
    numel = [math.prod(s) for s in shapes]
    # Small matrices exact; a sketched size lowered to be coprime with the matrix's sides (countsketch's rule).
    dims = [n if n <= dims_per_matrix else fitted_dims(dims_per_matrix, s, "coprime") for n, s in zip(numel, shapes)]
    return {
        "total": int(sum(dims)),
        "calibration_ids": [],
        "names": names,
        "fit": "coprime",
        "shares": [1.0 / len(names)] * len(names),
        "dims": dims,
        "rule": f"{dims_per_matrix} dims per matrix (fewer entries: exact), lowered to coprime with its sides",
    }


class TargetSketcher:
    """Per sample: prompt and response gradients (two backward passes), their combination for ``all``,
    each sketched per matrix, raw and (once estimated) scaled by each target's second moment."""

    def __init__(self, study, dims_per_matrix: int, seed: int, damping: float, dtype="float32"):
        from gradsim.core.projection import CountSketchFeaturizer

        lm = study.lm
        allocation = per_matrix_allocation(lm.model, dims_per_matrix)
        self.sketch = CountSketchFeaturizer(
            lm.model, lm.device, dtype, allocation["total"], seed, allocation=allocation
        )
        self.study, self.lm, self.device = study, lm, lm.device
        self.computer = self.sketch.computer
        full = self.computer.layout
        self.prompt_grad = torch.empty(full.total, dtype=torch.float32, device=lm.device)
        self.all_grad = torch.empty_like(self.prompt_grad)
        self.moments = {t: FactoredSecondMoment(full, damping) for t in TARGETS}
        self.layout = self.sketch.layout
        self.slices = [(lo, hi) for _, lo, hi in self.layout.slices()]
        self.tokens = {"prompt": 0, "response": 0}

    def gradients(self, sample) -> dict[str, torch.Tensor]:
        """The three targets' flat gradients (views of reused buffers: use them before the next call)."""
        ep = self.study.encode(sample, "prompt")
        er = self.study.encode(sample, "response")
        gp = self.prompt_grad.copy_(self.computer.gradient(ep))
        gr = self.computer.gradient(er)
        ga = combine_targets(gp, ep.num_trained, gr, er.num_trained, out=self.all_grad)
        self.tokens["prompt"] += ep.num_tokens
        self.tokens["response"] += er.num_tokens
        return {"prompt": gp, "response": gr, "all": ga}

    def estimate(self, samples, bar=None) -> None:
        """First pass: the second moment of each target from these samples (the originals)."""
        for s in samples:
            for t, g in self.gradients(s).items():
                self.moments[t].add(g)
            if bar is not None:
                bar.update(1)
        for m in self.moments.values():
            m.finish(self.device)

    def features(self, samples, bar=None) -> dict[tuple[str, str], np.ndarray]:
        """{(target, kind): (n, D) fp32 sketches} of the samples."""
        out = {(t, k): np.empty((len(samples), self.layout.total), np.float32) for t in TARGETS for k in KINDS}
        buf = torch.empty(self.layout.total, dtype=torch.float32, device=self.device)
        for i, s in enumerate(samples):
            for t, g in self.gradients(s).items():
                out[t, "raw"][i] = self.sketch.sketch(g, buf).cpu().numpy()
                out[t, "adafactor"][i] = self.sketch.sketch(self.moments[t].apply_(g), buf).cpu().numpy()
            if bar is not None:
                bar.update(1)
        return out

    def release(self) -> None:
        self.computer.release()


def scores_for(feats_q: np.ndarray, feats_o: np.ndarray, slices, normalizer: str) -> np.ndarray:
    """(nq, N) whole-model cosine of queries with originals after a normalizer (its features: raw or
    adafactor-scaled, chosen by the caller)."""
    steps = parse_normalizer(normalizer)
    mean = feats_o.mean(0, keepdims=True) if "center" in steps else None
    q = normalized_features(feats_q, mean, slices, "unit" in steps)
    o = normalized_features(feats_o, mean, slices, "unit" in steps)
    return cosine_matrix(q, o)


def bootstrap(ranks: np.ndarray, resamples: int, seed: int) -> dict:
    """top-1 and MRR of the ranks, with percentile 95% intervals over queries resampled with replacement."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {"n": int(len(r)), "top1": float((r == 1).mean()), "mrr": float((1.0 / r).mean())}
    ci = rank_intervals(r, seed, resamples)  # the shared helper: the same resamples and numbers as before
    out["top1_ci"], out["mrr_ci"] = ci["top1"], ci["mrr"]
    return out


def protocol_ranks(full: np.ndarray, cands: list[list[int]]) -> np.ndarray:
    """Rank of each query's true original (first in its candidate list) among its candidates."""
    from gradsim.core.baselines import candidate_scores

    return true_rank(candidate_scores(full, list(range(len(cands))), cands))


def random_rows(num_candidates: int, n: int) -> dict:
    from gradsim.core.score import random_expectation

    e = random_expectation(num_candidates)
    return {"n": n, "top1": e["top1"], "mrr": e["mrr"], "top1_ci": None, "mrr_ci": None}


def run_targets(cfg: Config, opts: TargetOptions, lm=None) -> dict:
    from gradsim import __version__
    from gradsim.core.baselines import RepresentationFeaturizer
    from gradsim.data.retrieval import bm25_scores, candidate_lists
    from gradsim.study.context import load_data, open_study, setting_configs
    from gradsim.study.run import code_version

    cfg.validate()
    if cfg.turns != "first":
        raise GradsimError(
            "gradsim targets compares the prompt and response targets of each row's first exchange: drop --turns"
        )
    started = time.time()
    both = cfg if cfg.setting == "both" else dataclasses.replace(cfg, setting="both", variant_data=None)
    data = {c.setting: load_data(c) for c in setting_configs(both)}
    originals = data["paraphrased"].originals
    if len(originals) < 2:
        raise GradsimError(f"{len(originals)} original: the normalizers and the corpus need at least 2")
    studies = {st.cfg.setting: st for st in open_study(both, lm, data=data)}
    study = studies["paraphrased"]
    lm, max_length = study.lm, study.max_length
    rep = RepresentationFeaturizer(lm.model, lm.device, cfg.dtype, ("response", "prompt", "all", "last"), opts.layers)
    for s in SETTINGS:  # refuse bad input (a target with no token left) before any gradient
        for sample in [*originals, *data[s].queries]:
            for t in ("prompt", "response"):
                study.encode(sample, t)

    sk = TargetSketcher(study, opts.dims_per_matrix, cfg.seed, cfg.damping, cfg.dtype)
    queries = {s: data[s].queries for s in SETTINGS}
    total = 2 * len(originals) + sum(len(q) for q in queries.values())
    bar = progress_bar(total=total, desc="gradients (2 passes each)", unit="sample")
    sk.estimate(originals, bar)
    feats_o = sk.features(originals, bar)
    feats_q = {s: sk.features(queries[s], bar) for s in SETTINGS}
    bar.close()
    sk.release()

    rep_slices = [(lo, hi) for _, lo, hi in rep.layout.slices()]

    def reps(samples):
        encs = [study.encode(s, "response") for s in samples]
        return torch.stack([rep.features(e).cpu() for e in encs]).numpy()

    rep_o = reps(originals)
    rows, scores = [], {}
    for s in SETTINGS:
        d = data[s]
        bm25 = candidate_lists(d, "bm25", cfg.top_k)
        protocols = {
            f"BM25 1-of-{len(bm25[0])}": bm25,
            f"corpus 1-of-{len(originals)}": candidate_lists(d, "all", cfg.top_k),
        }
        methods: dict[tuple[str, str, str], np.ndarray] = {}
        for t in TARGETS:
            for norm in NORMALIZERS:
                kind = "adafactor" if norm.startswith("adafactor") else "raw"
                methods["gradient", t, norm] = scores_for(feats_q[s][t, kind], feats_o[t, kind], sk.slices, norm)
        methods["bm25", "prompt", "-"] = bm25_scores(d)
        rep_q = reps(d.queries)
        for name, (lo, hi) in zip(rep.layout.names, rep_slices):
            methods["representation", name.removeprefix("representation_"), "-"] = cosine_matrix(
                rep_q[:, lo:hi], rep_o[:, lo:hi]
            )
        scores.update({(s, *k): v for k, v in methods.items()})
        for proto, cands in protocols.items():
            for (method, target, norm), full in methods.items():
                stats = bootstrap(protocol_ranks(full, cands), opts.bootstrap, cfg.seed)
                rows.append(dict(setting=s, protocol=proto, method=method, target=target, normalizer=norm, **stats))
            rows.append(
                dict(
                    setting=s,
                    protocol=proto,
                    method="random",
                    target="-",
                    normalizer="-",
                    **random_rows(len(cands[0]), len(cands)),
                )
            )
    return {
        "gradsim_version": __version__,
        "code_version": code_version(),
        "config": cfg.to_record(Provenance(max_length=max_length)),
        "options": {
            "dims_per_matrix": opts.dims_per_matrix,
            "damping": cfg.damping,
            "bootstrap": opts.bootstrap,
            "layers": list(opts.layers),
            "seeds": {"sketch": cfg.seed, "bootstrap": cfg.seed},
        },
        "model": {"id": lm.model_id, "revision": lm.revision, "chat_template_sha256": lm.chat_template_sha256},
        "data": {
            s: {"originals_sha256": data[s].original_sha256, "queries_sha256": data[s].variant_sha256} for s in SETTINGS
        },
        "sketch": {**sk.sketch.spec, "dims_per_matrix": opts.dims_per_matrix},
        "normalizers": {
            "second_moment": sk.moments["response"].to_dict(),
            "order": "adafactor, then center, then unit",
        },
        "tokens": sk.tokens,
        "seconds": round(time.time() - started, 1),
        "rows": rows,
        "_scores": scores,  # {(setting, method, target, normalizer): (Q, N) scores}, not written
    }


def format_table(result: dict) -> str:
    """One block per setting: each method's top-1 and MRR (95% interval) under each protocol."""

    def cell(r):
        if r["top1_ci"] is None:
            return f"{r['top1']:.3f}              {r['mrr']:.3f}"
        lo, hi = r["top1_ci"]
        return f"{r['top1']:.3f} [{lo:.2f},{hi:.2f}] {r['mrr']:.3f}"

    lines = []
    for s in SETTINGS:
        mine = [r for r in result["rows"] if r["setting"] == s]
        protos = list(dict.fromkeys(r["protocol"] for r in mine))
        n = mine[0]["n"]
        lines.append(f"\n{s} (n={n} queries): top-1 [95% CI] and MRR")
        head = f"{'method':<16} {'loss on':<18} {'normalizer':<22}" + "".join(f" {p:<26}" for p in protos)
        lines.append(head)
        keys = list(dict.fromkeys((r["method"], r["target"], r["normalizer"]) for r in mine))
        by = {(r["method"], r["target"], r["normalizer"], r["protocol"]): r for r in mine}
        for k in keys:
            lines.append(f"{k[0]:<16} {k[1]:<18} {k[2]:<22}" + "".join(f" {cell(by[(*k, p)]):<26}" for p in protos))
    return "\n".join(lines)
