"""The study, one straight line: load -> encode -> per-sample features -> score -> store -> summarise.

A run covers the queries [start, end) of one setting. Original samples are featurized once per run
into a feature store; queries are featurized in memory-bounded blocks and scored against their
candidates. Finished work is logged to a progress file, so a killed or preempted run resumes where
it stopped and ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .config import Config
from .data import Dataset, load_dataset, partition_range
from .encode import encode
from .errors import GradsimError
from .features import ExactFeaturizer, FeatureStore, featurize, manifest_key, per_matrix_self_dots
from .io import append_jsonl, atomic_save_npz, atomic_write_json, atomic_write_jsonl, ensure_writable_dir, read_json, read_jsonl_tolerant
from .model import LoadedModel, load_model, resolve_device
from .retrieval import candidate_lists
from .score import dense_dots, summarize_scores, whole_and_per_matrix
from .metrics import true_rank

log = logging.getLogger("gradsim")


def code_version() -> str:
    """Package version plus git commit (with -dirty when the tree has changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{__version__}+{commit}{'-dirty' if dirty else ''}" if commit else __version__


def memory_budget_bytes() -> int:
    return int(float(os.environ.get("GRADSIM_MEMORY_GB", "4")) * 2**30)


@dataclass
class RunPaths:
    run_dir: Path
    start: int
    end: int
    partitioned: bool

    @property
    def stem(self) -> str:
        return f"{self.start:05d}-{self.end:05d}"

    @property
    def part_dir(self) -> Path:
        return self.run_dir / "partitions"

    @property
    def results(self) -> Path:
        return (self.part_dir / f"results_{self.stem}.json") if self.partitioned else self.run_dir / "results.json"

    @property
    def scores(self) -> Path:
        return self.results.with_name(self.results.name.replace("results", "scores").replace(".json", ".npz"))

    @property
    def metrics(self) -> Path:
        return self.results.with_name(self.results.name.replace("results", "metrics").replace(".json", ".jsonl"))

    @property
    def config(self) -> Path:
        return self.results.with_name(self.results.name.replace("results", "config"))

    @property
    def progress(self) -> Path:
        return self.results.with_name(self.results.name.replace("results", "progress").replace(".json", ".jsonl"))


def run_name(cfg: Config) -> str:
    name = cfg.setting
    if cfg.candidates == "all":
        name += "-all"
    if cfg.use_random_projection:
        name += f"-{cfg.projection}{cfg.proj_dim}"
    return name


def make_featurizer(cfg: Config, lm: LoadedModel):
    if not cfg.use_random_projection:
        return ExactFeaturizer(lm.model, lm.device, cfg.dtype)
    from .projection import make_projected_featurizer

    return make_projected_featurizer(cfg, lm, memory_budget_bytes() // 4)


def prepare(cfg: Config) -> tuple[Dataset, int, int]:
    cfg.validate()
    data = load_dataset(cfg.original_data, cfg.variant_data, cfg.sample_size)
    cfg.original_data_sha256, cfg.variant_data_sha256 = data.original_sha256, data.variant_sha256
    start, end = partition_range(len(data.queries), cfg.partition_start, cfg.partition_end)
    return data, start, end


def run(cfg: Config, lm: Optional[LoadedModel] = None) -> dict:
    data, start, end = prepare(cfg)
    partitioned = (start, end) != (0, len(data.queries))
    paths = RunPaths(Path(cfg.output_dir) / cfg.computation_type / run_name(cfg), start, end, partitioned)
    ensure_writable_dir(paths.part_dir if partitioned else paths.run_dir)
    device = lm.device if lm is not None else resolve_device(cfg)
    log.info("gradsim %s: model=%s device=%s dtype=%s queries=[%d, %d) of %d", __version__, cfg.model_name, device,
             cfg.dtype, start, end, len(data.queries))
    lm = lm or load_model(cfg, device)
    cfg.model_revision, cfg.chat_template_sha256 = lm.revision, lm.chat_template_sha256
    cfg.code_version = code_version()
    max_length = min(cfg.max_length or lm.context_length, lm.context_length)
    cfg.max_length = max_length

    if paths.results.exists():
        done = read_json(paths.results)
        if done.get("compat") == cfg.compat():
            log.info("already finished: %s", paths.results)
            return done
        raise GradsimError(f"{paths.results} exists from a different configuration: use another --output-dir or remove it")

    featurizer = make_featurizer(cfg, lm)
    layout = featurizer.layout
    cands = candidate_lists(data, cfg.candidates, cfg.top_k)[start:end]
    needed = sorted({j for c in cands for j in c})

    # Resume: keep finished queries and sample metrics from an earlier attempt of this same partition.
    paths.results.parent.mkdir(parents=True, exist_ok=True)
    progress = read_jsonl_tolerant(paths.progress)
    if progress and progress[0].get("compat") != cfg.compat():
        log.warning("progress file %s is from another configuration; starting this partition afresh", paths.progress)
        progress = []
    if not progress:
        paths.progress.unlink(missing_ok=True)
        append_jsonl(paths.progress, {"kind": "header", "compat": cfg.compat()})
    done_queries = {r["index"]: r for r in progress if r.get("kind") == "query"}
    metrics = [r["metric"] for r in progress if r.get("kind") == "metric"]
    if done_queries:
        log.info("resuming: %d of %d queries already scored", len(done_queries), end - start)

    todo = [qi for qi in range(start, end) if qi not in done_queries]
    need_originals = sorted({j for qi in todo for j in cands[qi - start]})
    enc_orig = {j: encode(lm.tokenizer, data.originals[j], max_length)
                for j in tqdm(need_originals, desc="encoding originals", unit="sample", disable=None)}
    enc_query = {qi: encode(lm.tokenizer, data.queries[qi], max_length)
                 for qi in tqdm(todo, desc="encoding queries", unit="sample", disable=None)}

    store = open_original_store(cfg, paths, featurizer, data, needed)
    row_of = {j: r for r, j in enumerate(store_index(store, data))}
    featurize_originals(store, featurizer, lm.tokenizer, [row_of[j] for j in need_originals], enc_orig, data, cfg, device,
                        paths, metrics)

    per_sample_bytes = layout.total * 4
    block = max(1, min(64, memory_budget_bytes() // per_sample_bytes))
    bar = tqdm(total=len(todo), desc="gradients (queries)", unit="sample", disable=None)
    for b0 in range(0, len(todo), block):
        block_q = todo[b0:b0 + block]
        feats, m = featurize(featurizer, [enc_query[qi] for qi in block_q], device, cfg.dtype, "query", bar)
        qself = per_matrix_self_dots(layout, torch.from_numpy(feats))
        q = torch.from_numpy(feats)
        for i, qi in enumerate(block_q):
            cand = cands[qi - start]
            rows = [row_of[j] for j in cand]
            ofeats, oself = gather_rows(store, rows)
            dots = dense_dots(layout, q[i:i + 1], ofeats)[0]
            rec = {"kind": "query", "index": qi, "dots": dots, "qself": qself[i], "cself": oself}
            append_jsonl(paths.progress, rec)
            append_jsonl(paths.progress, {"kind": "metric", "metric": m[i]})
            done_queries[qi] = rec
            metrics.append(m[i])
    bar.close()

    result = assemble(cfg, lm, data, cands, start, end, layout.names, done_queries, featurizer)
    write_outputs(paths, cfg, result, done_queries, start, end, metrics)
    paths.progress.unlink(missing_ok=True)
    if not cfg.use_random_projection:
        shutil.rmtree(store.root, ignore_errors=True)  # exact gradients are 0.5 GB a sample: scratch only
        with contextlib.suppress(OSError):
            store.root.parent.rmdir()  # .scratch, when no other partition is using it
    return read_json(paths.results)  # the result as stored, whether computed now or earlier


def store_index(store: FeatureStore, data: Dataset) -> list[int]:
    index = data.original_index()
    return [index[i] for i in store.ids]


def open_original_store(cfg, paths: RunPaths, featurizer, data: Dataset, needed: list[int]) -> FeatureStore:
    d = featurizer.layout.total
    shard = max(1, min(256, memory_budget_bytes() // (d * 4)))
    manifest = {k: v for k, v in cfg.compat().items() if k not in ("setting", "computation_type", "candidates", "top_k", "variant_data")}
    manifest["featurizer"] = getattr(featurizer, "spec", None) or getattr(featurizer, "kind", "exact")
    if cfg.use_random_projection:
        # Projected features are small and shared by every partition and both settings.
        ids = [s.id for s in data.originals]
        root = Path(cfg.output_dir) / "features" / manifest_key(manifest) / "originals"
    else:
        ids = [data.originals[j].id for j in needed]
        root = paths.run_dir / ".scratch" / f"originals_{paths.stem}_{manifest_key(manifest)}"
    return FeatureStore.open(root, manifest, ids, d, shard)


def featurize_originals(store, featurizer, tokenizer, rows, encs, data, cfg, device, paths, metrics) -> None:
    index = data.original_index()
    wanted = {store.shard_of(r) for r in rows}
    todo = [(s, e) for (s, e) in store.shard_ranges() if (s, e) in wanted and not store.has_shard(s, e)]
    bar = tqdm(total=sum(e - s for s, e in todo), desc="gradients (originals)", unit="sample", disable=None)
    for s, e in todo:
        shard_encs = []
        for r in range(s, e):
            j = index[store.ids[r]]
            shard_encs.append(encs[j] if j in encs else encode(tokenizer, data.originals[j], cfg.max_length))
        feats, m = featurize(featurizer, shard_encs, device, cfg.dtype, "original", bar)
        store.write_shard(s, e, feats, per_matrix_self_dots(featurizer.layout, torch.from_numpy(feats)))
        for row in m:
            append_jsonl(paths.progress, {"kind": "metric", "metric": row})
            metrics.append(row)
    bar.close()


def gather_rows(store: FeatureStore, rows: list[int]) -> tuple[torch.Tensor, np.ndarray]:
    feats = np.empty((len(rows), store.dim), dtype=np.float32)
    selfd = np.empty((len(rows), len(store.read_selfdots(*store.shard_of(rows[0]))[0])), dtype=np.float64)
    for k, r in enumerate(rows):
        s, e = store.shard_of(r)
        feats[k] = store.read_features(s, e)[r - s]
        selfd[k] = store.read_selfdots(s, e)[r - s]
    return torch.from_numpy(feats), selfd


def assemble(cfg, lm, data, cands, start, end, names, done, featurizer) -> dict:
    order = list(range(start, end))
    dots = np.stack([np.asarray(done[qi]["dots"], dtype=np.float64) for qi in order])
    qself = np.stack([np.asarray(done[qi]["qself"], dtype=np.float64) for qi in order])
    cself = np.stack([np.asarray(done[qi]["cself"], dtype=np.float64) for qi in order])
    whole, per_matrix = whole_and_per_matrix(dots, qself, cself, cfg.computation_type)
    ranks = true_rank(whole)
    queries = []
    for k, qi in enumerate(order):
        cand_ids = [data.originals[j].id for j in cands[qi - start]]
        rec = {"index": qi, "id": data.queries[qi].id, "candidates": cand_ids, "rank": int(ranks[k]),
               "scores": whole[k]}
        if cfg.candidates == "bm25":
            rec["per_matrix"] = per_matrix[k]
            if cfg.computation_type == "dot-product":
                rec["query_self"], rec["candidate_self"] = qself[k], cself[k]
        queries.append(rec)
    return {
        "gradsim_version": cfg.code_version,
        "config": cfg.to_dict(),
        "compat": cfg.compat(),
        "model": {"id": lm.model_id, "revision": lm.revision, "chat_template_sha256": lm.chat_template_sha256},
        "partition": {"start": start, "end": end, "num_queries": len(data.queries)},
        "score": "whole-model dot product" if cfg.computation_type == "dot-product" else "cosine similarity",
        "parameter_names": names,
        "queries": queries,
        "summary": summarize_scores(names, dots, qself, cself, cfg.computation_type),
        "_arrays": (dots, qself, cself),
    }


def write_outputs(paths: RunPaths, cfg: Config, result: dict, done, start, end, metrics) -> None:
    dots, qself, cself = result.pop("_arrays")
    atomic_save_npz(paths.scores, dots=dots.astype(np.float64), qself=qself, cself=cself,
                    query_index=np.arange(start, end))
    atomic_write_jsonl(paths.metrics, metrics)
    atomic_write_json(paths.config, {"config": cfg.to_dict(), "compat": cfg.compat(), "argv": sys.argv})
    atomic_write_json(paths.results, result)  # last: its existence marks the partition as finished
