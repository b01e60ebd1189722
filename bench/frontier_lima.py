"""The frontier on real LIMA (../shared/data/lima: never copied into the project): the 27 hand-written
paraphrases of its dev set against their originals plus other LIMA rows as distractors.

    uv run python bench/frontier_lima.py [--corpus 1030] [--max-length 2048] [--out runs/lima]

--corpus N keeps the 27 linked originals and N - 27 other rows (seeded) whose first prompt leaves answer tokens
within --max-length (those that do not are counted and left out); 1030 is all of LIMA. The exact
run (full corpus, so both protocols) and the frontier over it are timed; the frontier lands in
<out>/gradient-similarity/frontier/.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMA = ROOT.parent / "shared" / "data" / "lima"


def prompt_fits(row: dict, max_length: int) -> bool:
    """Whether a row's first prompt, in the embedded model's chat template, leaves room for answer tokens."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        from gradsim.core.model import embedded_model_dir

        _TOKENIZER = AutoTokenizer.from_pretrained(str(embedded_model_dir()[0]))
    chat = [{"role": "user", "content": row["conversations"][0]}]
    return len(_TOKENIZER.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)) < max_length - 8


_TOKENIZER = None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=int, default=1030)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "lima")
    p.add_argument("--sizes", default="1024,4096,16384,65536,262144")
    p.add_argument("--projections", default="tensorsketch,countsketch,factorized")
    a = p.parse_args()
    if not (LIMA / "train.jsonl").exists():
        print(f"skipped: {LIMA} is absent (real LIMA is for benchmarks only)")
        return 0
    rows = [json.loads(line) for line in (LIMA / "train.jsonl").open()]
    dev = [json.loads(line) for line in (LIMA / "paraphrased-dev.jsonl").open()]
    linked = sorted({int(d["id"].split("_")[1]) for d in dev})
    others = [i for i in range(len(rows)) if i not in set(linked) and prompt_fits(rows[i], a.max_length)]
    print(
        f"{len(rows) - len(linked) - len(others)} other rows left out: their prompt leaves no answer token within "
        f"--max-length {a.max_length}"
    )
    keep = sorted(linked + random.Random(0).sample(others, max(0, min(len(others), a.corpus - len(linked)))))
    data = a.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    with (data / "original.jsonl").open("w") as f:
        for i in keep:
            f.write(json.dumps({"id": f"lima_{i}", **rows[i]}) + "\n")
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "--setting",
            "paraphrased",
            "--candidates",
            "all",
            "--original-data",
            str(data / "original.jsonl"),
            "--variant-data",
            str(LIMA / "paraphrased-dev.jsonl"),
            "--max-length",
            str(a.max_length),
            "--output-dir",
            str(a.out),
        ],
        check=True,
    )
    t1 = time.time()
    run = a.out / "gradient-similarity" / "paraphrased-all"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gradsim.analysis.frontier",
            str(run),
            "--sizes",
            a.sizes,
            "--projections",
            a.projections,
        ],
        check=True,
    )
    t2 = time.time()
    print(
        f"corpus {len(keep)} originals, 27 queries, max length {a.max_length}: exact run {t1 - t0:.0f} s, "
        f"frontier {t2 - t1:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
