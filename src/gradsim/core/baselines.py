"""Baselines scored on the same queries and candidates as the gradients, so a result shows whether
gradients beat them: random (in expectation, see score.random_expectation), BM25 over the prompt, and
representation similarity.

Representation similarity is the cosine of pooled hidden states. A pooling is one of ``POOLINGS``:
the mean over the response tokens (those the study's loss trains on, i.e. what its gradient sees),
over the prompt tokens (up to and including the assistant header), over all tokens, or the last
token's state; a layer is an index into the model's hidden states (-1, the default: the last, after
the model's final norm, i.e. the input of lm_head; 0: the embeddings). The study runs the response
and all-token means of the last layer. It is a featurizer like the others (one "matrix" of d entries
per layer and pooling), so its features go through the same store and the same dense_dots.
"""

from __future__ import annotations

import numpy as np
import torch

from gradsim.core.gradients import autocast_context
from gradsim.core.projection import layout_from_sizes
from gradsim.data.encode import Encoded
from gradsim.errors import GradsimError

POOLINGS = ("response", "prompt", "all", "last")
POOLING_RULES = {
    "response": "mean over response tokens",
    "prompt": "mean over prompt tokens (assistant header included)",
    "all": "mean over all tokens",
    "last": "the last token's state",
}
REPRESENTATIONS = ("representation_response", "representation_all")  # the study's baseline


def representation_name(pooling: str, layer: int = -1) -> str:
    return f"representation_{pooling}" + ("" if layer == -1 else f"_layer{layer}")


class RepresentationFeaturizer:
    kind = "representation"
    backward_passes = 0

    def __init__(self, model, device, dtype: str = "float32", poolings=("response", "all"), layers=(-1,)):
        self.model, self.device, self.dtype = model, device, dtype
        depth = model.config.num_hidden_layers
        for pooling in poolings:
            if pooling not in POOLINGS:
                raise GradsimError(f"unknown pooling {pooling!r}: choose from {', '.join(POOLINGS)}")
        for layer in layers:
            if not -depth - 1 <= layer <= depth:
                raise GradsimError(
                    f"layer {layer} is outside the model's hidden states 0..{depth} (or -1 for the last)"
                )
        self.poolings, self.layers = tuple(poolings), tuple(layers)
        d = model.get_input_embeddings().embedding_dim
        names = [representation_name(p, lay) for lay in self.layers for p in self.poolings]
        self.layout = layout_from_sizes(names, [(d,)] * len(names), [d] * len(names))
        self.spec = {
            "kind": self.kind,
            "hidden": "hidden_states[layer] of the model (-1: the last, after the final norm)",
            "layers": list(self.layers),
            "pooling": [POOLING_RULES[p] for p in self.poolings],
        }

    @torch.no_grad()
    def features(self, enc: Encoded) -> torch.Tensor:
        if enc.loss_on == "prompt" and "response" in self.poolings:
            raise GradsimError("representations over the response need the whole conversation: encode for response")
        with autocast_context(self.device, self.dtype):
            out = self.model(input_ids=enc.input_ids.to(self.device)[None], output_hidden_states=True, use_cache=False)
        k = enc.prompt_tokens
        parts = []
        for layer in self.layers:
            h = out.hidden_states[layer][0].float()
            pooled = {"response": h[k:].mean(0), "prompt": h[:k].mean(0), "all": h.mean(0), "last": h[-1]}
            parts.extend(pooled[p] for p in self.poolings)
        return torch.cat(parts)


def candidate_scores(full: np.ndarray, query_rows: list[int], cands: list[list[int]]) -> np.ndarray:
    """(Q, C) scores of each query's candidates, from a (queries, originals) score matrix."""
    return np.stack([full[qi, c] for qi, c in zip(query_rows, cands)]).astype(np.float32)
