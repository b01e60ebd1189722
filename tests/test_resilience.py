"""Issue 26: bf16 on every path, cost across attempts, one-line errors where tracebacks were (tiny model)."""

import copy

import torch

from gradsim.config import Config
from gradsim.model import LoadedModel
from gradsim.run import run


def cfg_for(tmp_path, **kw):
    base = dict(device="cpu", sample_size=4, output_dir=str(tmp_path), top_k=2, baselines=False)
    base.update(kw)
    return Config(**base)


def bf16(tiny) -> LoadedModel:
    model = copy.deepcopy(tiny.model)
    for p in model.parameters():  # parameters only, as load_model does
        p.data = p.data.to(torch.bfloat16)
    return LoadedModel(model, tiny.tokenizer, "tiny-llama-bf16", "test", tiny.device, tiny.chat_template_sha256, 256)


def test_bf16_weights_with_scratch_keep_originals_and_give_the_same_scores(tiny, tmp_path):
    lm = bf16(tiny)
    ref = run(cfg_for(tmp_path / "ref", dtype="bfloat16-weights", memory_gb=0.0035), lm=lm)  # one bf16 gradient
    kept = run(cfg_for(tmp_path / "kept", dtype="bfloat16-weights", memory_gb=0.0035, scratch_gb=0.1), lm=lm)
    assert kept["cost"]["scratch_bytes_written"] > 0 and kept["cost"]["originals_reused"] > 0
    assert kept["queries"] == ref["queries"]
    assert not list((tmp_path / "kept").rglob(".scratch"))


def test_stale_scratch_of_a_dead_run_is_removed_by_the_next(tiny, tmp_path):
    stale = tmp_path / "gradient-similarity" / "paraphrased" / ".scratch" / "00000-00004"
    stale.mkdir(parents=True)
    (stale / "original_0000001.tmp").write_bytes(b"\0" * 1000)  # a kill mid-write
    (stale / "original_0000002.bin").write_bytes(b"\0" * 1000)
    run(cfg_for(tmp_path, sample_size=4), lm=tiny)
    assert not (stale.parent).exists()
