"""Baselines scored on the same queries and candidates as the gradients, so a result shows whether
gradients beat them: random (in expectation, see score.random_expectation), BM25 over the prompt, and
representation similarity.

Representation similarity is the cosine of the mean last hidden state (after the model's final
norm, the input of lm_head), averaged two ways: over the response tokens (those trained on, i.e.
what the gradient sees) and over all tokens. It is a featurizer like the others (two "matrices" of
d entries), so its features go through the same store and the same dense_dots.
"""

from __future__ import annotations

import numpy as np
import torch

from .encode import IGNORE_INDEX, Encoded
from .gradients import autocast_context
from .projection import layout_from_sizes

REPRESENTATIONS = ("representation_response", "representation_all")


class RepresentationFeaturizer:
    kind = "representation"
    backward_passes = 0

    def __init__(self, model, device, dtype: str = "float32"):
        self.model, self.device, self.dtype = model, device, dtype
        d = model.get_input_embeddings().embedding_dim
        self.layout = layout_from_sizes(list(REPRESENTATIONS), [(d,), (d,)], [d, d])
        self.spec = {
            "kind": self.kind,
            "hidden": "last hidden state (after the final norm)",
            "pooling": ["mean over response tokens", "mean over all tokens"],
        }

    @torch.no_grad()
    def features(self, enc: Encoded) -> torch.Tensor:
        with autocast_context(self.device, self.dtype):
            out = self.model(input_ids=enc.input_ids.to(self.device)[None], output_hidden_states=True, use_cache=False)
        h = out.hidden_states[-1][0].float()
        response = (enc.labels != IGNORE_INDEX).to(self.device)
        return torch.cat([h[response].mean(0), h.mean(0)])


def candidate_scores(full: np.ndarray, query_rows: list[int], cands: list[list[int]]) -> np.ndarray:
    """(Q, C) scores of each query's candidates, from a (queries, originals) score matrix."""
    return np.stack([full[qi, c] for qi, c in zip(query_rows, cands)]).astype(np.float32)
