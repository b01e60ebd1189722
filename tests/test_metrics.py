"""Ranking, metrics, component grouping and BM25 candidate lists against hand-computed expectations
(not the code's own helpers)."""

import numpy as np
import pytest

from gradsim.core.metrics import component_of, layer_of, mean_margin, summarize, true_rank
from gradsim.core.score import random_expectation
from gradsim.data.load import Dataset, Sample
from gradsim.data.retrieval import candidate_lists, user_text


def test_rank_counts_ties_against_the_true_original_and_nan_last():
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # clear first
            [0.5, 0.5, 0.1],  # tied with another: rank 2
            [0.1, 0.3, 0.2],  # last
            [np.nan, 0.1, 0.2],  # a zero gradient never wins
            [0.5, np.nan, 0.2],  # another's NaN does not beat it
        ]
    )
    assert true_rank(scores).tolist() == [1, 2, 3, 3, 1]
    assert true_rank(np.array([[0.2, 0.9, 0.7]]), true_pos=1).tolist() == [1]


def test_top1_mrr_and_recall_by_hand():
    out = summarize([1, 2, 3, 10])
    assert out["n"] == 4
    assert out["top1"] == pytest.approx(0.25)
    assert out["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 10) / 4)  # 0.48333
    assert out["recall@1"] == pytest.approx(0.25)
    assert out["recall@5"] == pytest.approx(0.75)
    assert out["recall@10"] == pytest.approx(1.0)
    chance = random_expectation(5)
    assert chance["top1"] == pytest.approx(0.2)
    assert chance["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5)  # 0.45667
    assert chance["recall@5"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name,component,layer",
    [
        ("model.layers.3.self_attn.q_proj.weight", "q", 3),
        ("model.layers.3.self_attn.k_proj.weight", "k", 3),
        ("model.layers.12.mlp.down_proj.weight", "down", 12),
        ("model.layers.0.mlp.gate_proj.weight", "gate", 0),
        ("model.layers.1.self_attn.q_norm.weight", "norm", 1),  # Qwen3 / Gemma 3: a norm, not q
        ("model.layers.0.input_layernorm.weight", "norm", 0),
        ("model.norm.weight", "norm", None),
        ("model.embed_tokens.weight", "embedding", None),
        ("lm_head.weight", "embedding", None),
    ],
)
def test_component_and_layer_of_real_parameter_names(name, component, layer):
    assert component_of(name) == component
    assert layer_of(name) == layer


def test_bm25_candidates_by_hand():
    """Query 0 repeats original 0's prompt ("apple banana"): original 2 shares "apple", the others share
    nothing (score 0, ties broken by index), so its BM25 list with k=2 is [0, 2, 1]. Query 1 ("fig elder
    cherry") shares "cherry" with originals 1 and 2 (equal lengths: a tie, broken by index). Six documents:
    Okapi's IDF of a term in half of them is 0, which would tie everything."""
    prompts = ["apple banana", "cherry date", "apple cherry", "elder fig", "grape honey", "kiwi lemon"]
    originals = [Sample(f"o{i}", p, "answer") for i, p in enumerate(prompts)]
    queries = [Sample("o0", "apple banana", "x"), Sample("o3", "fig elder cherry", "y")]
    data = Dataset(originals, queries)
    assert candidate_lists(data, "bm25", 2) == [[0, 2, 1], [3, 1, 2]]
    assert candidate_lists(data, "all", 2) == [[0, 1, 2, 3, 4, 5], [3, 0, 1, 2, 4, 5]]


def test_bm25_reads_every_user_turn_with_turns_all():
    """The same six originals, each with a second exchange whose user turn is the only text query 0 shares
    with original 4 ("grape honey"): with --turns first BM25 reads first prompts only (query 0 matches
    nothing: ties by index), with --turns all it reads every user turn the run uses, so original 4 comes
    first. A last user turn without an answer is not used (it has no loss), so it is not read either."""
    prompts = ["apple banana", "cherry date", "apple cherry", "elder fig", "grape honey", "kiwi lemon"]
    later = ["mango", "nut", "olive", "pear", "grape honey", "quince"]
    originals = [
        Sample(f"o{i}", p, "answer", rest=(("user", w), ("assistant", "ok")))
        for i, (p, w) in enumerate(zip(prompts, later))
    ]
    query = Sample("o0", "zzz", "x", rest=(("user", "grape honey"), ("assistant", "ok"), ("user", "kiwi lemon")))
    data = Dataset(originals, [query])
    assert user_text(query, "all") == "zzz\ngrape honey" and user_text(query) == "zzz"
    assert candidate_lists(data, "bm25", 2) == [[0, 1, 2]]
    assert candidate_lists(data, "bm25", 2, turns="all") == [[0, 4, 1]]


def test_mean_margin_skips_nan_rows():
    s = np.array([[0.9, 0.5, 0.7], [0.2, 0.6, 0.1], [np.nan, np.nan, np.nan]])
    assert mean_margin(s) == pytest.approx(((0.9 - 0.7) + (0.2 - 0.6)) / 2)
    assert mean_margin(s[2:]) == float("-inf")
