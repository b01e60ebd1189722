"""What a range leaves: an earlier attempt resumed or a finished result found; the result assembled from the
finished blocks (non-finite queries, truncation) and its files written, results.json last."""

from __future__ import annotations

import logging
import shutil
import sys
from typing import Optional

import numpy as np

from gradsim.config import compat_differences
from gradsim.core.finite import ALLOW_HINT, NonFiniteError, dropped_record, finite_queries, likely_cause
from gradsim.core.metrics import true_rank
from gradsim.core.score import subset_scores, summarize_arrays, whole_and_per_matrix
from gradsim.data.retrieval import candidate_lists
from gradsim.errors import GradsimError
from gradsim.io import (
    append_jsonl,
    atomic_save_npz,
    atomic_write_json,
    atomic_write_jsonl,
    load_json,
    load_npz,
    read_jsonl_tolerant,
)
from gradsim.study.part import Part, load_block

log = logging.getLogger("gradsim")


def finished_result(p: Part) -> Optional[dict]:
    if not p.paths.results.exists():
        return None
    fix = f"delete it and the other files of this range ({p.paths.results.name}, {p.paths.scores.name}) and rerun"
    done = load_json(p.paths.results, fix)
    load_npz(p.paths.scores, fix, read=False)  # a finished range's scores must open (select, combine read them)
    diff = compat_differences(done.get("compat"), p.compat())
    if not diff:
        log.info("already finished: %s", p.paths.results)
        return done
    raise GradsimError(
        f"{p.paths.results} exists from a different configuration ({diff}; stored vs this run): "
        "use another --output-dir or remove it"
    )


def resume(p: Part) -> None:
    """Keep finished queries and sample metrics from an earlier attempt of this same partition."""
    p.paths.results.parent.mkdir(parents=True, exist_ok=True)
    progress = read_jsonl_tolerant(p.paths.progress)
    diff = compat_differences(progress[0].get("compat"), p.compat()) if progress else ""
    if diff:
        log.warning(
            "progress file %s is from another configuration (%s; stored vs this run): starting this partition afresh",
            p.paths.progress,
            diff,
        )
        progress = []
    version = p.prov.code_version
    if not progress:
        p.paths.progress.unlink(missing_ok=True)
        shutil.rmtree(p.paths.blocks, ignore_errors=True)
        append_jsonl(p.paths.progress, {"kind": "header", "compat": p.compat(), "code_version": version})
    else:
        # A kill mid-append (SIGKILL after Slurm's KillWait, a node crash) can leave a torn last line. The
        # reader stops there, so a line appended after it would be invisible to the next resume: the block
        # it logs would be computed again. Rewrite the log without it, so appends start on a line boundary.
        atomic_write_jsonl(p.paths.progress, progress)
        if progress[0].get("code_version", version) != version:
            log.info("resuming progress made by code %s (now %s)", progress[0]["code_version"], version)
            p.code_versions.add(progress[0]["code_version"])
    for r in progress:
        if "attempt" in r:  # an attempt's record: logged when it began, with each block, and when it ended
            p.attempts[r["attempt"]["attempt"]] = r["attempt"]
        if r.get("kind") == "block":
            p.done.update(load_block(p.paths, r))
            p.groups[f"block:{r['file']}"] = r.get("metrics", [])
        elif r.get("kind") == "shard":
            p.groups[f"shard:{r['key']}"] = r["metrics"]
        elif r.get("kind") == "metric":
            p.groups[f"row:{len(p.groups)}"] = [r["metric"]]
    if p.done:
        log.info("resuming: %d of %d queries already scored (%s)", len(p.done), p.end - p.start, p.cfg.setting)


def bm25_columns(p: Part) -> np.ndarray:
    """(Q, 1 + top_k) positions, within each query's full-corpus candidate list, of its BM25 candidates."""
    bm25 = candidate_lists(p.data, "bm25", p.cfg.top_k, turns=p.cfg.turns)[p.start : p.end]
    return np.array([[c.index(j) for j in b] for c, b in zip(p.cands, bm25)], dtype=np.int64)


def assemble(p: Part, baselines: dict, cost: Optional[dict]) -> dict:
    cfg, prov, lm, data, start, end = p.cfg, p.prov, p.lm, p.data, p.start, p.end
    order = list(range(start, end))
    corpus = cfg.candidates == "all"
    dtype = np.float32 if corpus else np.float64  # fp32 dots lose nothing: the matmuls are fp32
    arrays = {
        "dots": np.stack([np.asarray(p.done[qi]["dots"], dtype=dtype) for qi in order]),
        "qself": np.stack([np.asarray(p.done[qi]["qself"], dtype=np.float64) for qi in order]),
        "cself": np.stack([np.asarray(p.done[qi]["cself"], dtype=dtype) for qi in order]),
    }
    arrays.update(baselines)
    if corpus:
        arrays["bm25_columns"] = bm25_columns(p)
    whole = subset_scores(arrays["dots"], arrays["qself"], arrays["cself"], slice(None), cfg.computation_type)
    keep = finite_queries(arrays) & np.isfinite(whole).all(-1)
    nonfinite = None
    if cfg.allow_nonfinite or not keep.all():
        nonfinite = dropped_nonfinite(p, arrays, order, keep)
        arrays = {k: v[keep] for k, v in arrays.items()}
        whole, order = whole[keep], [qi for qi, k in zip(order, keep) if k]
    dots, qself, cself = arrays["dots"], arrays["qself"], arrays["cself"]
    ranks = true_rank(whole)
    queries = []
    for k, qi in enumerate(order):
        cand_ids = [data.originals[j].id for j in p.cands[qi - start]]
        rec = {"index": qi, "id": data.queries[qi].id, "rank": int(ranks[k])}
        if corpus:  # the full (Q, N) scores are in scores.npz
            top = np.argsort(-np.nan_to_num(whole[k], nan=-np.inf), kind="stable")[:10]
            rec["top10"] = [cand_ids[t] for t in top]
            rec["top10_scores"] = whole[k][top]
        else:
            rec["candidates"], rec["scores"] = cand_ids, whole[k]
            per_matrix = whole_and_per_matrix(
                dots[k : k + 1], qself[k : k + 1], cself[k : k + 1], cfg.computation_type
            )[1]
            rec["per_matrix"] = per_matrix[0]
            if cfg.computation_type == "dot-product":
                rec["query_self"], rec["candidate_self"] = qself[k], cself[k]
        queries.append(rec)
    names, numel = p.parameter_sizes()
    result = {
        "gradsim_version": prov.code_version,
        "config": cfg.to_record(prov),
        "compat": p.compat(),
        "model": {"id": lm.model_id, "revision": lm.revision, "chat_template_sha256": lm.chat_template_sha256},
        "partition": {"start": start, "end": end, "num_queries": len(data.queries)},
        "score": "whole-model dot product" if cfg.computation_type == "dot-product" else "cosine similarity",
        "featurizer": p.featurizer_spec or {"kind": "exact"},
        "normalizer": p.normalizer or {"normalizer": "none"},
        "parameter_names": names,
        "parameter_numel": numel,  # storage per matrix (frontier.py)
        "queries": queries,
        "code_versions": sorted(p.code_versions | {prov.code_version}),  # all that computed these numbers
        "truncated": truncation(p),
        "data_dropped": data.dropped,  # turns (with --turns first) and system messages of the rows left unused
    }
    if cost is not None:
        result["cost"] = cost
    if nonfinite is not None:
        result["nonfinite"] = nonfinite
    if cfg.skip_overlong:
        result["skipped_overlong"] = data.skipped
    if p.fidelity is not None:  # the per-matrix scores' predicted error (exact runs have none)
        result["per_matrix_fidelity"] = p.fidelity
    result.update(summarize_arrays(names, arrays, cfg.computation_type))
    result["_arrays"], result["_query_index"] = arrays, np.array(order, dtype=np.int64)
    return result


def dropped_nonfinite(p: Part, arrays: dict, order: list[int], keep: np.ndarray) -> dict:
    """The queries whose scores are not finite (their gradient, a candidate's, or a 0/0 cosine): refused,
    naming the first, unless --allow-nonfinite, which drops them; what was dropped (finite.dropped_record)."""
    data = p.data
    query_ids = [data.queries[qi].id for qi in order]
    cand_ids = [[data.originals[j].id for j in p.cands[qi - p.start]] for qi in order]
    record = dropped_record(arrays, keep, query_ids, cand_ids)
    if not p.cfg.allow_nonfinite:
        k = int(np.flatnonzero(~keep)[0])
        raise NonFiniteError(
            f"the scores of query {query_ids[k]} (against {', '.join(cand_ids[k])}) are not finite (NaN or inf, "
            f"e.g. a zero gradient's cosine): {likely_cause(p.lm.model, p.cfg.dtype)}; no results were written "
            f"({ALLOW_HINT})"
        )
    if keep.sum() == 0:
        raise NonFiniteError(
            f"every query of {p.cfg.setting} [{p.start}, {p.end}) has a non-finite gradient or score: "
            f"{likely_cause(p.lm.model, p.cfg.dtype)}; no results were written"
        )
    if record["queries_dropped"]:
        log.warning(
            "--allow-nonfinite: %d of %d queries dropped (non-finite: %d queries, %d candidate originals; ids in "
            "results.json -> nonfinite)",
            record["queries_dropped"],
            len(order),
            len(record["nonfinite_query_ids"]),
            len(record["nonfinite_original_ids"]),
        )
    return record


def truncation(p: Part) -> dict:
    """The samples of this range cut at --max-length (their gradients see only the first max_length
    tokens): its queries, and the originals among their candidates."""
    data = p.data
    queries = [data.queries[qi].id for qi in range(p.start, p.end) if data.queries[qi].id in p.cut["queries"]]
    needed = sorted({j for c in p.cands for j in c})
    originals = [data.originals[j].id for j in needed if data.originals[j].id in p.cut["originals"]]
    return {
        "max_length": p.prov.max_length,
        "queries": len(queries),
        "originals": len(originals),
        "query_ids": queries,
        "original_ids": originals,
    }


def log_truncation(result: dict) -> None:
    t, setting = result["truncated"], result["config"]["setting"]
    n = result["partition"]["end"] - result["partition"]["start"]
    level = logging.WARNING if t["queries"] or t["originals"] else logging.INFO
    log.log(
        level,
        "%s: %d of %d queries and %d originals (candidates) truncated at --max-length %d (ids in results.json)",
        setting,
        t["queries"],
        n,
        t["originals"],
        t["max_length"],
    )


def write_outputs(p: Part, result: dict) -> None:
    """Write a range's files, results.json last (its existence marks the range finished). A write that fails
    (a full disk) removes what this call wrote, so no scores file is left without its results, and leaves the
    progress log and blocks: rerunning the same command resumes and only writes again."""
    paths = p.paths
    try:
        atomic_save_npz(paths.scores, **result.pop("_arrays"), query_index=result.pop("_query_index"))
        atomic_write_jsonl(paths.metrics, p.metrics)
        atomic_write_json(paths.config, {"config": p.cfg.to_record(p.prov), "compat": p.compat(), "argv": sys.argv})
        atomic_write_json(paths.results, result)
    except OSError:
        if not paths.results.exists():
            for f in (paths.scores, paths.metrics, paths.config):
                f.unlink(missing_ok=True)
        raise
