"""--matrices: restricted featurization equals the matching slices of the full gradient, the backward
stops below the lowest chosen layer, and bad selections are refused before anything is written."""

import json

import numpy as np
import pytest
import torch

from gradsim import matrices
from gradsim.config import Config
from gradsim.core.gradients import GradientComputer
from gradsim.data.encode import encode
from gradsim.errors import GradsimError


def test_restricted_gradient_equals_the_full_gradients_slices(tiny, samples):
    enc = encode(tiny.tokenizer, samples[3], 256)
    gc = GradientComputer(tiny.model, tiny.device)
    full = {n: gc.gradient(enc)[lo:hi].clone() for n, lo, hi in gc.layout.slices()}
    gc.release()
    chosen = matrices.resolve(r"layers\.1\.(mlp\.down_proj|self_attn\.q_proj)", list(full), "tiny")
    assert chosen == ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    with matrices.only(tiny.model, chosen):
        gc = GradientComputer(tiny.model, tiny.device)
        assert gc.layout.names == chosen
        g = gc.gradient(enc).clone()
        gc.release()
    assert all(p.requires_grad for p in tiny.model.parameters())  # restored
    off = 0
    for name in chosen:
        n = full[name].numel()
        assert torch.allclose(g[off : off + n], full[name], rtol=1e-5, atol=1e-7 * float(full[name].abs().max()))
        off += n


def test_the_backward_stops_below_the_lowest_chosen_layer(tiny, samples):
    enc = encode(tiny.tokenizer, samples[3], 256)
    reached = []
    handles = [
        layer.register_full_backward_hook(lambda m, gi, go, i=i: reached.append(i))
        for i, layer in enumerate(tiny.model.model.layers)
    ]
    try:
        with matrices.only(tiny.model, ["model.layers.1.mlp.down_proj.weight"]):
            gc = GradientComputer(tiny.model, tiny.device)
            gc.gradient(enc)
            gc.release()
        assert 0 not in reached  # layer 0 is below the chosen matrix: never backpropagated
        reached.clear()
        gc = GradientComputer(tiny.model, tiny.device)
        gc.gradient(enc)
        gc.release()
        assert 0 in reached
    finally:
        for h in handles:
            h.remove()


def test_a_run_with_matrices_scores_the_full_runs_slices(tiny, tmp_path):
    from gradsim.study.run import run

    common = dict(device="cpu", sample_size=4, output_dir=str(tmp_path), top_k=2, baselines=False)
    full = run(Config(**common), lm=tiny)
    spec = "model.layers.1.mlp.down_proj.weight,model.layers.1.mlp.up_proj.weight"
    part = run(Config(matrices=spec, **common), lm=tiny)
    names = full["parameter_names"]
    assert part["parameter_names"] == spec.split(",")[::-1]  # the model's order: up_proj before down_proj
    for name in part["parameter_names"]:
        assert part["summary"]["per_matrix"][name] == full["summary"]["per_matrix"][name]
    for qf, qp in zip(full["queries"], part["queries"]):
        m = [names.index(n) for n in part["parameter_names"]]
        assert np.allclose(np.asarray(qp["per_matrix"]), np.asarray(qf["per_matrix"])[:, m], rtol=1e-5, atol=1e-7)


def test_bad_selections_are_refused_before_anything_is_written(tiny, tmp_path):
    names = GradientComputer(tiny.model, tiny.device).layout.names
    with pytest.raises(GradsimError, match=r"matches none of the model's .* parameter matrices"):
        matrices.resolve(r"layers\.99\.", names, "tiny")
    with pytest.raises(GradsimError, match="is not a valid regular expression"):
        matrices.resolve("layers.(", names, "tiny")
    with pytest.raises(GradsimError, match="'lm_head.weight' is not a parameter of tiny"):
        matrices.resolve("lm_head.weight,model.norm.weight", names, "tiny")
    other = tmp_path / "selection.json"
    other.write_text(json.dumps({"chosen": ["model.layers.20.mlp.down_proj.weight"], "model": "amd/AMD-OLMo-1B-SFT"}))
    with pytest.raises(GradsimError, match="the selection was made for another model"):
        matrices.resolve(str(other), names, "tiny")
    with pytest.raises(GradsimError, match="--matrices restricts the exact gradient"):
        Config(matrices="q_proj", use_random_projection=True, projection="tensorsketch").validate()

    from gradsim.study.run import run

    out = tmp_path / "out"
    with pytest.raises(GradsimError, match="matches none"):
        run(Config(device="cpu", sample_size=4, output_dir=str(out), matrices="nothing_like_this"), lm=tiny)
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
