"""Candidate originals for each query: the original study's BM25 protocol, or the whole corpus."""

from __future__ import annotations

import re

import numpy as np
from rank_bm25 import BM25Okapi

from .data import Dataset

_WORD = re.compile(r"\w+", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_scores(dataset: Dataset) -> np.ndarray:
    """BM25 (Okapi) score of each query's prompt against each original's prompt: (Q, N)."""
    bm25 = BM25Okapi([_tokens(s.prompt) for s in dataset.originals])
    return np.stack([bm25.get_scores(_tokens(q.prompt)) for q in dataset.queries])


def candidate_lists(dataset: Dataset, mode: str, top_k: int, scores: np.ndarray | None = None) -> list[list[int]]:
    """Indices into dataset.originals per query, the true original first.

    bm25: the true original plus the top_k other originals by BM25 over the prompt (ties broken by
    index, so the lists are deterministic). all: every original.
    """
    index = dataset.original_index()
    n = len(dataset.originals)
    if mode == "all":
        return [[index[q.id]] + [j for j in range(n) if j != index[q.id]] for q in dataset.queries]
    if scores is None:
        scores = bm25_scores(dataset)
    out = []
    for qi, q in enumerate(dataset.queries):
        true = index[q.id]
        order = np.lexsort((np.arange(n), -scores[qi]))  # by score desc, then index asc
        others = [int(j) for j in order if j != true][:top_k]
        out.append([true] + others)
    return out
