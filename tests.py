"""Quick checks that the per-sample gradients are right, on the embedded model (the original's tests.py).

    uv run tests.py

1. different samples tokenize and differentiate differently;
2. a re-run gives bit-identical gradients;
3. the gradients equal a plain autograd backward of HF's own loss, per sample.
The full suite is `uv run pytest` (see README).
"""

import sys

import torch

from gradsim.config import BUNDLED_DATA, Config
from gradsim.core.gradients import GradientComputer
from gradsim.core.model import load_model
from gradsim.data.encode import encode
from gradsim.data.load import load_samples


def main() -> int:
    lm = load_model(Config(device="cpu"))
    samples = load_samples(str(BUNDLED_DATA / "original.jsonl"))[:2]
    encs = [encode(lm.tokenizer, s, lm.context_length) for s in samples]
    gc = GradientComputer(lm.model, lm.device)
    failures = []

    def check(name, ok):
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
        if not ok:
            failures.append(name)

    check("different samples tokenize differently", encs[0].input_ids.tolist() != encs[1].input_ids.tolist())
    g0 = gc.gradient(encs[0]).clone()
    g1 = gc.gradient(encs[1]).clone()
    check("different samples have different gradients", not torch.allclose(g0, g1))
    check("a re-run gives bit-identical gradients", torch.equal(gc.gradient(encs[0]), g0))
    out = lm.model(input_ids=encs[0].input_ids[None], labels=encs[0].labels[None], use_cache=False)
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.loss, list(lm.model.parameters()))])
    err = ((g0 - ref).abs().max() / ref.abs().max()).item()
    check(f"equal to a plain autograd backward (max relative error {err:.1e})", err < 1e-4)
    print(f"{len(failures)} failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
