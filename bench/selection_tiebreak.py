"""How the tie-break of greedy selection's first step changes its held-out score (numpy only, from a
finished --candidates all run's results.json and scores.npz; no gradients).

    uv run python bench/selection_tiebreak.py runs/lima1030/gradient-similarity/paraphrased-all

greedy_select adds the matrix with the highest (MRR, top-1) on the choosing half. When many matrices
score 1.000 there, the tie-break decides. It used to be the smaller matrix, which picks the smallest of the
tied, not the most separating; it is now the mean margin (true original's score minus the best
distractor's) on the choosing half, then size. This compares the two, over the frontier's 10 splits:
"size" is the old key, "margin" is greedy_select as it ships.
"""

import json
import sys

import numpy as np

from gradsim.analysis.selection import greedy_select, split_queries
from gradsim.core.metrics import summarize_ranks
from gradsim.core.score import subset_scores

run = sys.argv[1]
res = json.load(open(f"{run}/results.json"))
names, numel = res["parameter_names"], np.array(res["parameter_numel"])
z = np.load(f"{run}/scores.npz")
dots, qs, cs = z["dots"], z["qself"], z["cself"]
ctype = res["config"]["computation_type"]
M = len(names)
per = [subset_scores(dots, qs, cs, [m], ctype) for m in range(M)]  # (Q, C) each


out = {"size": [], "margin": []}
for seed in range(10):
    ch, rep = split_queries(dots.shape[0], seed)
    own = [summarize_ranks(per[m][ch]) for m in range(M)]
    by_size = max(range(M), key=lambda m: (own[m]["mrr"], own[m]["top1"], -numel[m]))  # the old key
    by_margin = names.index(greedy_select(names, dots, qs, cs, ctype, ch, rep, 1, numel)["chosen"][0])  # as shipped
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
