"""The projected path: originals featurized once into a store shared by every partition and both settings,
queries in blocks against it."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from gradsim.config import Config
from gradsim.core.score import dense_dots
from gradsim.layout import allocation_file, feature_store_dir
from gradsim.study.exact import attach_normalizer
from gradsim.study.features import FeatureStore, featurize, manifest_key, per_matrix_self_dots, progress_bar
from gradsim.study.part import Part, encode_all, store_manifest


def memory_budget_bytes(cfg: Config) -> int:
    """Memory for feature blocks of the projected path: --memory-gb / GRADSIM_MEMORY_GB, default 4 GB."""
    from gradsim.study.memory import GB, budget_gb

    return int(budget_gb(cfg, "memory_gb", 4.0) * GB)


def make_featurizer(p: Part):
    from gradsim.core.projection import CALIBRATION_SAMPLES, SKETCHES, make_projected_featurizer

    cfg = p.cfg
    calibration, allocation_path = None, None
    if cfg.projection in SKETCHES:
        # The first originals of the whole dataset: the same for every partition and both settings.
        calibration = [p.encode(s) for s in p.data.originals[:CALIBRATION_SAMPLES]]
        allocation_path = allocation_file(cfg.output_dir, cfg.projection, manifest_key(store_manifest(p.compat())))
    return make_projected_featurizer(cfg, p.lm, memory_budget_bytes(cfg) // 4, calibration, allocation_path)


def score_projected(parts: list[Part]) -> None:
    from gradsim.core.projection import per_matrix_fidelity

    first = parts[0]
    cfg, lm, data = first.cfg, first.lm, first.data
    featurizer = make_featurizer(first)
    layout = featurizer.layout
    normalizer = attach_normalizer(first, featurizer.computer) if cfg.normalize != "none" else None
    fidelity = per_matrix_fidelity(featurizer)
    for p in parts:
        p.featurizer_spec, p.normalizer, p.fidelity = featurizer.spec, normalizer, fidelity
    manifest = dict(store_manifest(first.compat()), featurizer=featurizer.spec)
    store = FeatureStore.open(
        feature_store_dir(cfg.output_dir, manifest_key(manifest), "originals"),
        manifest,
        [s.id for s in data.originals],
        layout.total,
        max(1, min(256, memory_budget_bytes(cfg) // (layout.total * 4))),
    )
    row_of = {j: j for j in range(len(data.originals))}
    need = sorted({j for p in parts for qi in p.todo for j in p.cands[qi - p.start]})
    featurize_into_store(first, store, featurizer, need)
    block = max(1, min(256 if cfg.candidates == "all" else 64, memory_budget_bytes(cfg) // (layout.total * 4)))
    for p in parts:
        todo = p.todo
        enc = dict(zip(todo, encode_all(p, [p.data.queries[qi] for qi in todo], "queries")))
        bar = progress_bar(total=len(todo), desc=f"features ({p.cfg.setting} queries)", unit="sample")
        for b0 in range(0, len(todo), block):
            block_q = todo[b0 : b0 + block]
            feats, m = featurize(featurizer, [enc[qi] for qi in block_q], lm.device, cfg.dtype, "query", bar, p.finite)
            q = torch.from_numpy(feats)
            qself = per_matrix_self_dots(layout, q)
            dots, cself = [], []
            if cfg.candidates == "all":
                all_dots, selfd = corpus_dots(store, layout, q)
                for i, qi in enumerate(block_q):
                    rows = [row_of[j] for j in p.cands[qi - p.start]]
                    dots.append(all_dots[i, rows])
                    cself.append(selfd[rows].astype(np.float32))
            else:
                for i, qi in enumerate(block_q):
                    ofeats, oself = gather_rows(store, [row_of[j] for j in p.cands[qi - p.start]])
                    dots.append(dense_dots(layout, q[i : i + 1], ofeats)[0])
                    cself.append(oself)
            p.record(block_q, dots, list(qself), cself, m)
        bar.close()


def featurize_into_store(
    p: Part, store, featurizer, rows: list[int], role: str = "original", loss_on: Optional[str] = None
) -> None:
    """Featurize the originals ``rows`` not yet in the store; encoded for ``loss_on`` (default: the run's)."""
    todo = store.missing(rows)
    store.check_writable(todo)
    store.check_room(sum(e - s for s, e in todo), store.dim * 4 + len(featurizer.layout.names) * 8)
    bar = progress_bar(total=sum(e - s for s, e in todo), desc=f"features ({role}s)", unit="sample")
    index = p.data.original_index()
    for s, e in todo:
        encs = [p.encode(p.data.originals[index[store.ids[r]]], loss_on) for r in range(s, e)]
        feats, m = featurize(featurizer, encs, p.lm.device, p.cfg.dtype, role, bar, p.finite)
        p.shard_metrics(f"{store.root.name}:{s}-{e}", m)
        store.write_shard(s, e, feats, lambda f: per_matrix_self_dots(featurizer.layout, torch.from_numpy(f)))
    bar.close()


def gather_rows(store: FeatureStore, rows: list[int]) -> tuple[torch.Tensor, np.ndarray]:
    feats = np.empty((len(rows), store.dim), dtype=np.float32)
    selfd = np.empty((len(rows), len(store.read_selfdots(*store.shard_of(rows[0]))[0])), dtype=np.float64)
    for k, r in enumerate(rows):
        s, e = store.shard_of(r)
        feats[k] = store.read_features(s, e)[r - s]
        selfd[k] = store.read_selfdots(s, e)[r - s]
    return torch.from_numpy(feats), selfd


def corpus_dots(store: FeatureStore, layout, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(b, N, M) fp32 per-matrix dots of a query block with every stored original, and the originals'
    (N, M) self-dots, one shard at a time: memory is the block plus one shard, whatever N."""
    dots = np.empty((q.shape[0], len(store.ids), len(layout.names)), dtype=np.float32)
    selfd = np.empty((len(store.ids), len(layout.names)), dtype=np.float64)
    for s, e in store.shard_ranges():
        dots[:, s:e] = dense_dots(layout, q, torch.from_numpy(np.array(store.read_features(s, e))))
        selfd[s:e] = store.read_selfdots(s, e)
    return dots, selfd
