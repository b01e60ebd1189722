"""The baselines' scores (BM25 and the model's representations) of a range's queries and candidates."""

from __future__ import annotations

import numpy as np
import torch

from gradsim.core.score import cosine, dense_dots
from gradsim.layout import feature_store_dir
from gradsim.study.features import FeatureStore, featurize, manifest_key, per_matrix_self_dots
from gradsim.study.part import Part
from gradsim.study.projected import featurize_into_store, gather_rows


def baseline_scores(p: Part) -> dict[str, np.ndarray]:
    """(Q, C) scores of the baselines for this partition's queries and candidates."""
    from gradsim.core.baselines import candidate_scores
    from gradsim.data.retrieval import bm25_scores

    cfg, lm, data, cands = p.cfg, p.lm, p.data, p.cands
    out = {"baseline_bm25": candidate_scores(bm25_scores(data, cfg.turns), list(range(p.start, p.end)), cands)}
    rep, store = representation_store(p)
    needed = sorted({j for c in cands for j in c})
    # Representations read the whole conversation whatever the loss target.
    featurize_into_store(p, store, rep, needed, "representation", "response")
    encs = [p.encode(data.queries[qi], "response") for qi in range(p.start, p.end)]
    qrep, m = featurize(rep, encs, lm.device, cfg.dtype, "representation", finite=p.finite)
    p.add_metrics(m)
    orep, oself = gather_rows(store, needed)
    cos = representation_cosines(rep.layout, torch.from_numpy(qrep), orep, oself)  # (Q, len(needed), M)
    for m_, name in enumerate(rep.layout.names):
        full = np.full((p.end - p.start, len(data.originals)), np.nan)
        full[:, needed] = cos[:, :, m_]
        out[f"baseline_{name}"] = np.stack([full[k, c] for k, c in enumerate(cands)]).astype(np.float32)
    return out


def representation_cosines(layout, q: torch.Tensor, o: torch.Tensor, oself: np.ndarray) -> np.ndarray:
    """(Q, N, M) cosines of each query's representations with each original's, per pooling/layer slice. In
    float64: a float32 matmul's rounding depends on how many rows it multiplies, so a partition's scores (fewer
    queries and candidates) came out one float32 step from the whole run's; products of float32 values are exact
    in float64 and their sums far below a float32 step, so a query gets the same scores in any partition."""
    qself = per_matrix_self_dots(layout, q)
    dots = dense_dots(layout, q.double(), o.double())
    return cosine(dots, qself[:, None, :], oself[None, :, :])


def representation_store(p: Part):
    """The baselines' representation featurizer and the store of the originals' representations."""
    from gradsim.core.baselines import POOLINGS, RepresentationFeaturizer

    cfg, prov, lm = p.cfg, p.prov, p.lm
    rep = RepresentationFeaturizer(lm.model, lm.device, cfg.dtype, POOLINGS)  # every pooling: one forward
    manifest = dict(
        model=cfg.model_name,
        revision=prov.model_revision,
        template=prov.chat_template_sha256,
        max_length=prov.max_length,
        dtype=cfg.dtype,
        original_data_sha256=prov.original_data_sha256,
        sample_size=cfg.sample_size,
        featurizer=rep.spec,
    )
    store = FeatureStore.open(
        feature_store_dir(cfg.output_dir, manifest_key(manifest), "representations"),
        manifest,
        [s.id for s in p.data.originals],
        rep.layout.total,
        256,
    )
    return rep, store


def check_stores_writable(p: Part) -> None:
    """Before any work: the baselines' representation store must be able to take the shards this range needs."""
    if p.cfg.baselines:
        store = representation_store(p)[1]
        store.check_writable(store.missing(sorted({j for c in p.cands for j in c})))
