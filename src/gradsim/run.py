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

from . import __version__
from .config import Config
from .data import Dataset, load_dataset, partition_range
from .encode import encode
from .errors import GradsimError
from .features import ExactFeaturizer, FeatureStore, featurize, manifest_key, per_matrix_self_dots
from .features import progress_bar
from .io import append_jsonl, atomic_save_npz, atomic_write_json, atomic_write_jsonl, ensure_writable_dir, read_json, read_jsonl_tolerant
from .model import LoadedModel, load_model, resolve_device
from .retrieval import candidate_lists
from .score import cosine, dense_dots, subset_scores, summarize_arrays, whole_and_per_matrix
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


def make_featurizer(cfg: Config, lm: LoadedModel, data: Optional[Dataset] = None):
    if not cfg.use_random_projection:
        return ExactFeaturizer(lm.model, lm.device, cfg.dtype)
    from .projection import CALIBRATION_SAMPLES, SKETCHES, make_projected_featurizer

    calibration, allocation_path = None, None
    if cfg.projection in SKETCHES and data is not None:
        # The first originals of the whole dataset: the same for every partition and both settings.
        calibration = [encode(lm.tokenizer, s, cfg.max_length) for s in data.originals[:CALIBRATION_SAMPLES]]
        allocation_path = (Path(cfg.output_dir) / "features" / f"{cfg.projection}-allocations"
                           / f"{manifest_key(store_manifest(cfg))}.json")
    return make_projected_featurizer(cfg, lm, memory_budget_bytes() // 4, calibration, allocation_path)


def store_manifest(cfg: Config) -> dict:
    """What determines the originals' features besides the featurizer (the query side is excluded)."""
    return {k: v for k, v in cfg.compat().items()
            if k not in ("setting", "computation_type", "candidates", "top_k", "variant_data", "variant_data_sha256")}


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

    featurizer = make_featurizer(cfg, lm, data)
    layout = featurizer.layout
    cands = candidate_lists(data, cfg.candidates, cfg.top_k)[start:end]
    needed = sorted({j for c in cands for j in c})
    scratch_gb = len(needed) * layout.total * 4 / 2**30
    if not cfg.use_random_projection and scratch_gb > float(os.environ.get("GRADSIM_SCRATCH_GB", "100")):
        raise GradsimError(
            f"exact gradients of {len(needed)} originals need {scratch_gb:.0f} GB of scratch: add --use-random-projection "
            "(or raise GRADSIM_SCRATCH_GB if the disk really has room)")

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
    for r in progress:
        if r.get("kind") == "block":
            done_queries.update(load_block(paths, r))
    metrics = [r["metric"] for r in progress if r.get("kind") == "metric"]
    if done_queries:
        log.info("resuming: %d of %d queries already scored", len(done_queries), end - start)

    todo = [qi for qi in range(start, end) if qi not in done_queries]
    need_originals = sorted({j for qi in todo for j in cands[qi - start]})
    enc_orig = {j: encode(lm.tokenizer, data.originals[j], max_length)
                for j in progress_bar(need_originals, desc="encoding originals", unit="sample")}
    enc_query = {qi: encode(lm.tokenizer, data.queries[qi], max_length)
                 for qi in progress_bar(todo, desc="encoding queries", unit="sample")}

    store = open_original_store(cfg, paths, featurizer, data, needed)
    row_of = {j: r for r, j in enumerate(store_index(store, data))}
    featurize_originals(store, featurizer, lm.tokenizer, [row_of[j] for j in need_originals], enc_orig, data, cfg, device,
                        paths, metrics)

    per_sample_bytes = layout.total * 4
    corpus = cfg.candidates == "all"
    block = max(1, min(256 if corpus else 64, memory_budget_bytes() // per_sample_bytes))
    bar = progress_bar(total=len(todo), desc="gradients (queries)", unit="sample")
    for b0 in range(0, len(todo), block):
        block_q = todo[b0:b0 + block]
        feats, m = featurize(featurizer, [enc_query[qi] for qi in block_q], device, cfg.dtype, "query", bar)
        q = torch.from_numpy(feats)
        qself = per_matrix_self_dots(layout, q)
        if corpus:
            recs = score_against_corpus(store, layout, q, qself, block_q, [cands[qi - start] for qi in block_q], row_of,
                                        paths)
        else:
            recs = []
            for i, qi in enumerate(block_q):
                ofeats, oself = gather_rows(store, [row_of[j] for j in cands[qi - start]])
                dots = dense_dots(layout, q[i:i + 1], ofeats)[0]
                recs.append({"kind": "query", "index": qi, "dots": dots, "qself": qself[i], "cself": oself})
                append_jsonl(paths.progress, recs[-1])
        for rec, row in zip(recs, m):
            append_jsonl(paths.progress, {"kind": "metric", "metric": row})
            done_queries[rec["index"]] = rec
            metrics.append(row)
    bar.close()
    baselines = baseline_scores(cfg, lm, data, cands, start, end, paths, metrics) if cfg.baselines else {}

    result = assemble(cfg, lm, data, cands, start, end, layout.names, done_queries, featurizer, baselines)
    write_outputs(paths, cfg, result, done_queries, start, end, metrics)
    paths.progress.unlink(missing_ok=True)
    shutil.rmtree(block_dir(paths), ignore_errors=True)
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
    manifest = store_manifest(cfg)
    manifest["featurizer"] = getattr(featurizer, "spec", None) or getattr(featurizer, "kind", "exact")
    if cfg.use_random_projection:
        # Projected features are small and shared by every partition and both settings.
        ids = [s.id for s in data.originals]
        root = Path(cfg.output_dir) / "features" / manifest_key(manifest) / "originals"
    else:
        ids = [data.originals[j].id for j in needed]
        root = paths.run_dir / ".scratch" / f"originals_{paths.stem}_{manifest_key(manifest)}"
    return FeatureStore.open(root, manifest, ids, d, shard, scratch=not cfg.use_random_projection)


def featurize_originals(store, featurizer, tokenizer, rows, encs, data, cfg, device, paths, metrics,
                        role: str = "original") -> None:
    index = data.original_index()
    wanted = {store.shard_of(r) for r in rows}
    todo = [(s, e) for (s, e) in store.shard_ranges() if (s, e) in wanted and not store.has_shard(s, e)]
    bar = progress_bar(total=sum(e - s for s, e in todo), desc="gradients (originals)", unit="sample")
    for s, e in todo:
        shard_encs = []
        for r in range(s, e):
            j = index[store.ids[r]]
            shard_encs.append(encs[j] if j in encs else encode(tokenizer, data.originals[j], cfg.max_length))
        feats, m = featurize(featurizer, shard_encs, device, cfg.dtype, role, bar)
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


def block_dir(paths: RunPaths) -> Path:
    return paths.progress.with_name(paths.progress.stem + "_blocks")


def corpus_dots(store: FeatureStore, layout, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(b, N, M) fp32 per-matrix dots of a query block with every stored original, and the originals'
    (N, M) self-dots, one shard at a time: memory is the block plus one shard, whatever N."""
    dots = np.empty((q.shape[0], len(store.ids), len(layout.names)), dtype=np.float32)
    selfd = np.empty((len(store.ids), len(layout.names)), dtype=np.float64)
    for s, e in store.shard_ranges():
        dots[:, s:e] = dense_dots(layout, q, torch.from_numpy(np.array(store.read_features(s, e))))
        selfd[s:e] = store.read_selfdots(s, e)
    return dots, selfd


def score_against_corpus(store, layout, q, qself, block_q, block_cands, row_of, paths: RunPaths) -> list[dict]:
    """Score a query block against the whole corpus; its scores go to one .npz beside the progress log
    (a JSON line per query would be megabytes at LIMA scale)."""
    dots, selfd = corpus_dots(store, layout, q)
    rows = np.array([[row_of[j] for j in c] for c in block_cands], dtype=np.int64)
    name = f"block_{block_q[0]:06d}.npz"
    atomic_save_npz(block_dir(paths) / name, dots=np.take_along_axis(dots, rows[..., None], axis=1), qself=qself,
                    rows=rows, oself=selfd, index=np.array(block_q))
    rec = {"kind": "block", "file": name}
    append_jsonl(paths.progress, rec)
    return list(load_block(paths, rec).values())


def load_block(paths: RunPaths, rec: dict) -> dict[int, dict]:
    with np.load(block_dir(paths) / rec["file"]) as z:
        return {int(qi): {"kind": "query", "index": int(qi), "dots": z["dots"][i], "qself": z["qself"][i],
                          "cself": z["oself"][z["rows"][i]].astype(np.float32)} for i, qi in enumerate(z["index"])}


def baseline_scores(cfg, lm, data: Dataset, cands, start, end, paths, metrics) -> dict[str, np.ndarray]:
    """(Q, C) scores of the baselines for this partition's queries and candidates."""
    from .baselines import RepresentationFeaturizer, candidate_scores
    from .retrieval import bm25_scores

    out = {"baseline_bm25": candidate_scores(bm25_scores(data), list(range(start, end)), cands)}
    rep = RepresentationFeaturizer(lm.model, lm.device, cfg.dtype)
    manifest = dict(model=cfg.model_name, revision=cfg.model_revision, template=cfg.chat_template_sha256,
                    max_length=cfg.max_length, dtype=cfg.dtype, original_data_sha256=cfg.original_data_sha256,
                    sample_size=cfg.sample_size, featurizer=rep.spec)
    ids = [s.id for s in data.originals]
    store = FeatureStore.open(Path(cfg.output_dir) / "features" / manifest_key(manifest) / "representations", manifest,
                              ids, rep.layout.total, 256)
    needed = sorted({j for c in cands for j in c})
    featurize_originals(store, rep, lm.tokenizer, needed, {}, data, cfg, lm.device, paths, metrics, "representation")
    encs = [encode(lm.tokenizer, data.queries[qi], cfg.max_length) for qi in range(start, end)]
    qrep, m = featurize(rep, encs, lm.device, cfg.dtype, "representation")
    metrics.extend(m)
    orep, oself = gather_rows(store, needed)
    qself = per_matrix_self_dots(rep.layout, torch.from_numpy(qrep))
    dots = dense_dots(rep.layout, torch.from_numpy(qrep), orep)  # (Q, len(needed), 2)
    for m_, name in enumerate(rep.layout.names):
        full = np.full((end - start, len(data.originals)), np.nan)
        full[:, needed] = cosine(dots[:, :, m_], qself[:, m_:m_ + 1], oself[None, :, m_])
        out[f"baseline_{name}"] = np.stack([full[k, c] for k, c in enumerate(cands)]).astype(np.float32)
    return out


def bm25_columns(data: Dataset, cands, top_k: int, start: int, end: int) -> np.ndarray:
    """(Q, 1 + top_k) positions, within each query's full-corpus candidate list, of its BM25 candidates."""
    bm25 = candidate_lists(data, "bm25", top_k)[start:end]
    return np.array([[c.index(j) for j in b] for c, b in zip(cands, bm25)], dtype=np.int64)


def assemble(cfg, lm, data, cands, start, end, names, done, featurizer, baselines) -> dict:
    order = list(range(start, end))
    corpus = cfg.candidates == "all"
    dtype = np.float32 if corpus else np.float64  # fp32 dots lose nothing: the matmuls are fp32
    arrays = {"dots": np.stack([np.asarray(done[qi]["dots"], dtype=dtype) for qi in order]),
              "qself": np.stack([np.asarray(done[qi]["qself"], dtype=np.float64) for qi in order]),
              "cself": np.stack([np.asarray(done[qi]["cself"], dtype=dtype) for qi in order])}
    arrays.update(baselines)
    if corpus:
        arrays["bm25_columns"] = bm25_columns(data, cands, cfg.top_k, start, end)
    dots, qself, cself = arrays["dots"], arrays["qself"], arrays["cself"]
    whole = subset_scores(dots, qself, cself, slice(None), cfg.computation_type)
    ranks = true_rank(whole)
    queries = []
    for k, qi in enumerate(order):
        cand_ids = [data.originals[j].id for j in cands[qi - start]]
        rec = {"index": qi, "id": data.queries[qi].id, "rank": int(ranks[k])}
        if corpus:  # the full (Q, N) scores are in scores.npz
            top = np.argsort(-np.nan_to_num(whole[k], nan=-np.inf), kind="stable")[:10]
            rec["top10"] = [cand_ids[t] for t in top]
            rec["top10_scores"] = whole[k][top]
        else:
            rec["candidates"], rec["scores"] = cand_ids, whole[k]
            per_matrix = whole_and_per_matrix(dots[k:k + 1], qself[k:k + 1], cself[k:k + 1], cfg.computation_type)[1]
            rec["per_matrix"] = per_matrix[0]
            if cfg.computation_type == "dot-product":
                rec["query_self"], rec["candidate_self"] = qself[k], cself[k]
        queries.append(rec)
    result = {
        "gradsim_version": cfg.code_version,
        "config": cfg.to_dict(),
        "compat": cfg.compat(),
        "model": {"id": lm.model_id, "revision": lm.revision, "chat_template_sha256": lm.chat_template_sha256},
        "partition": {"start": start, "end": end, "num_queries": len(data.queries)},
        "score": "whole-model dot product" if cfg.computation_type == "dot-product" else "cosine similarity",
        "featurizer": getattr(featurizer, "spec", None) or {"kind": getattr(featurizer, "kind", "exact")},
        "parameter_names": names,
        "queries": queries,
    }
    result.update(summarize_arrays(names, arrays, cfg.computation_type))
    result["_arrays"] = arrays
    return result


def write_outputs(paths: RunPaths, cfg: Config, result: dict, done, start, end, metrics) -> None:
    atomic_save_npz(paths.scores, **result.pop("_arrays"), query_index=np.arange(start, end))
    atomic_write_jsonl(paths.metrics, metrics)
    atomic_write_json(paths.config, {"config": cfg.to_dict(), "compat": cfg.compat(), "argv": sys.argv})
    atomic_write_json(paths.results, result)  # last: its existence marks the partition as finished
