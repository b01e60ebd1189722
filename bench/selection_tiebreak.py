"""How the tie-break of greedy selection's first step changes its held-out score (numpy only, from a
finished --candidates all run's results.json and scores.npz; no gradients).

    uv run python bench/selection_tiebreak.py runs/lima1030/gradient-similarity/paraphrased-all

greedy_select adds the matrix with the highest (MRR, top-1) on the choosing half and breaks ties by the
smaller matrix. When many matrices score 1.000 on the choosing half, that picks the smallest of them, not
the most separating. This compares it, over the frontier's 10 splits, with breaking ties by the mean
margin (true original's cosine minus the best distractor's) on the choosing half.
"""

import json
import sys

import numpy as np

from gradsim.metrics import summarize_ranks
from gradsim.score import subset_scores
from gradsim.selection import greedy_select, split_queries

run = sys.argv[1]
res = json.load(open(f"{run}/results.json"))
names, numel = res["parameter_names"], np.array(res["parameter_numel"])
z = np.load(f"{run}/scores.npz")
dots, qs, cs = z["dots"], z["qself"], z["cself"]
ctype = res["config"]["computation_type"]
M = len(names)
per = [subset_scores(dots, qs, cs, [m], ctype) for m in range(M)]  # (Q, C) each


def margin(s, rows):
    s = s[rows]
    return float(np.nanmean(s[:, 0] - np.nanmax(s[:, 1:], axis=1)))


out = {"size": [], "margin": []}
for seed in range(10):
    ch, rep = split_queries(dots.shape[0], seed)
    own = [summarize_ranks(per[m][ch]) for m in range(M)]
    by_size = names.index(greedy_select(names, dots, qs, cs, ctype, ch, rep, 1, numel)["chosen"][0])  # as shipped
    by_margin = max(range(M), key=lambda m: (own[m]["mrr"], own[m]["top1"], margin(per[m], ch)))
    for k, m in (("size", by_size), ("margin", by_margin)):
        out[k].append((names[m], int(numel[m]), summarize_ranks(per[m][rep])["top1"]))
for k, v in out.items():
    t = [x[2] for x in v]
    print(
        k,
        f"held-out top1 mean {np.mean(t):.3f} [{np.percentile(t, 2.5):.2f}-{np.percentile(t, 97.5):.2f}]",
        sorted({(n, s) for n, s, _ in v}),
    )
tied = sum(1 for m in range(M) if summarize_ranks(per[m])["top1"] == 1.0)
print("matrices at top-1 1.000 on all queries:", tied, "of", M)
