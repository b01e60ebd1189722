"""Candidate originals for each query: the original study's BM25 protocol, or the whole corpus."""

from __future__ import annotations

import re

import numpy as np
from rank_bm25 import BM25Okapi

from gradsim.data.load import Dataset, Sample

_WORD = re.compile(r"\w+", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def user_text(sample: Sample, turns: str = "first") -> str:
    """What BM25 reads of a sample: its prompt; with --turns all, every user turn the run uses."""
    if turns != "all":
        return sample.prompt
    return "\n".join([sample.prompt, *(content for role, content in sample.used_rest if role == "user")])


def bm25_scores(dataset: Dataset, turns: str = "first") -> np.ndarray:
    """BM25 (Okapi) score of each query's user text against each original's (user_text): (Q, N)."""
    bm25 = BM25Okapi([_tokens(user_text(s, turns)) for s in dataset.originals])
    return np.stack([bm25.get_scores(_tokens(user_text(q, turns))) for q in dataset.queries])


def candidate_lists(
    dataset: Dataset, mode: str, top_k: int, scores: np.ndarray | None = None, turns: str = "first"
) -> list[list[int]]:
    """Indices into dataset.originals per query, the true original first.

    bm25: the true original plus the top_k other originals by BM25 over the prompt (with --turns all, every
    user turn; ties broken by index, so the lists are deterministic). all: every original.
    """
    index = dataset.original_index()
    n = len(dataset.originals)
    if mode == "all":
        return [[index[q.id]] + [j for j in range(n) if j != index[q.id]] for q in dataset.queries]
    if scores is None:
        scores = bm25_scores(dataset, turns)
    out = []
    for qi, q in enumerate(dataset.queries):
        true = index[q.id]
        order = np.lexsort((np.arange(n), -scores[qi]))  # by score desc, then index asc
        others = [int(j) for j in order if j != true][:top_k]
        out.append([true] + others)
    return out
