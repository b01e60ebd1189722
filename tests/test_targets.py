"""Loss targets (--loss-on) against HF's own loss with independently built labels, the combination of
targets from one featurization, the normalizers against plain torch on exact gradients, and the table."""

import dataclasses

import numpy as np
import pytest
import torch

from gradsim.core.gradients import GradientComputer
from gradsim.data.encode import IGNORE_INDEX, combine_targets, encode
from gradsim.errors import GradsimError


def hf_gradient(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A plain autograd backward of HF's own loss (mean over the labels that are not -100)."""
    model.zero_grad(set_to_none=True)
    model(input_ids=ids[None], labels=labels[None]).loss.backward()
    out = torch.cat([p.grad.flatten() for _, p in model.named_parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return out


def reference_labels(tokenizer, sample, loss_on: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole conversation and labels for a target, from the template's own generation prompt."""
    msgs = sample.messages()
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert whole.startswith(prompt)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(tokenizer(whole, add_special_tokens=False)["input_ids"])
    labels = ids.clone()
    if loss_on == "response":
        labels[: len(p_ids)] = IGNORE_INDEX
    elif loss_on == "prompt":
        labels[len(p_ids) :] = IGNORE_INDEX
    return ids, labels


def short(samples):
    """A sample that fits the tiny model's 256 positions untruncated."""
    return min(samples, key=lambda s: len(s.prompt) + len(s.response))


@pytest.mark.parametrize("loss_on", ["response", "prompt", "all"])
def test_each_loss_target_is_hf_loss_with_its_labels(tiny, samples, loss_on):
    """The prompt target is computed on the prompt alone; HF's loss here sees the whole conversation
    (causal attention: the same gradient)."""
    s = short(samples)
    enc = encode(tiny.tokenizer, s, 256, loss_on)
    assert not enc.truncated
    ids, labels = reference_labels(tiny.tokenizer, s, loss_on)
    if loss_on == "prompt":
        assert enc.num_tokens == enc.prompt_tokens < ids.numel()
    else:
        assert torch.equal(enc.input_ids, ids) and torch.equal(enc.labels, labels)
    gc = GradientComputer(tiny.model, tiny.device)
    ours = gc.gradient(enc).clone()
    gc.release()
    ref = hf_gradient(tiny.model, ids, labels)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_all_is_the_token_weighted_mean_of_prompt_and_response(tiny, samples):
    s = short(samples)
    encs = {t: encode(tiny.tokenizer, s, 256, t) for t in ("prompt", "response", "all")}
    gc = GradientComputer(tiny.model, tiny.device)
    g = {t: gc.gradient(e).clone() for t, e in encs.items()}
    gc.release()
    n_p, n_r = encs["prompt"].num_trained, encs["response"].num_trained
    assert n_p + n_r == encs["all"].num_trained
    combined = combine_targets(g["prompt"], n_p, g["response"], n_r)
    assert torch.allclose(combined, g["all"], rtol=1e-4, atol=1e-6 * float(g["all"].abs().max()))


def test_a_target_with_no_token_left_is_refused(tiny, samples):
    with pytest.raises(GradsimError, match="no response token is left to train on with --loss-on response"):
        encode(tiny.tokenizer, samples[0], 8, "response")
    with pytest.raises(GradsimError, match="unknown --loss-on 'answer'"):
        encode(tiny.tokenizer, samples[0], 256, "answer")


def reference_normalized(G_o: torch.Tensor, G_q: torch.Tensor, layout, steps, damping: float):
    """Plain torch on stacked exact gradients (n, P), from the definitions in normalize.py's docstring."""
    G_o, G_q = G_o.double().clone(), G_q.double().clone()
    if "adafactor" in steps:
        for (_, lo, hi), shape in zip(layout.slices(), layout.shapes):
            sq = G_o[:, lo:hi].square()
            if len(shape) == 1:
                v = sq.mean(0)
                d = 1 / torch.sqrt(v + damping * v.mean())
            else:
                sq = sq.view(len(G_o), shape[0], -1)
                r, c = sq.sum(2).mean(0), sq.sum(1).mean(0)
                v_hat_scale = torch.outer(r + damping * r.mean(), c + damping * c.mean()) / r.sum()
                d = (1 / torch.sqrt(v_hat_scale)).flatten()
            G_o[:, lo:hi] *= d
            G_q[:, lo:hi] *= d
    if "center" in steps:
        mu = G_o.mean(0)
        G_o, G_q = G_o - mu, G_q - mu
    if "unit" in steps:
        for _, lo, hi in layout.slices():
            G_o[:, lo:hi] /= G_o[:, lo:hi].norm(dim=1, keepdim=True)
            G_q[:, lo:hi] /= G_q[:, lo:hi].norm(dim=1, keepdim=True)
    return torch.nn.functional.normalize(G_q, dim=1) @ torch.nn.functional.normalize(G_o, dim=1).T


def sketcher(lm, *args):
    """A TargetSketcher over a tiny model at 256 tokens (a Study of the default config, no data)."""
    from gradsim.analysis.targets import TargetSketcher
    from gradsim.config import Config, Provenance
    from gradsim.study.context import Study

    return TargetSketcher(Study(Config(device="cpu"), None, lm, Provenance(max_length=256)), *args)


@pytest.mark.slow
def test_targets_and_normalizers_equal_plain_torch_on_exact_gradients(tiny, samples):
    """TargetSketcher with more dims per matrix than any matrix has keeps every gradient exact; each
    (target, normalizer) score matrix must equal plain torch on HF-loss gradients (``all`` computed
    directly, not combined), with the adafactor scale from its full (not factored-in-place) form."""
    from gradsim.analysis.targets import TARGETS, scores_for
    from gradsim.core.normalize import NORMALIZERS, parse_normalizer

    origs, queries = samples[:4], samples[4:7]
    damping = 0.05
    sk = sketcher(tiny, 10**8, 0, damping)
    assert all(sk.sketch.exact)
    sk.estimate(origs)
    fo, fq = sk.features(origs), sk.features(queries)
    sk.release()
    layout = sk.computer.layout

    def hf(sample, target):
        enc = encode(tiny.tokenizer, sample, 256, target)
        return hf_gradient(tiny.model, enc.input_ids, enc.labels)

    for t in TARGETS:
        G_o = torch.stack([hf(s, t) for s in origs])
        G_q = torch.stack([hf(s, t) for s in queries])
        for norm in NORMALIZERS:
            kind = "adafactor" if norm.startswith("adafactor") else "raw"
            ours = scores_for(fq[t, kind], fo[t, kind], sk.slices, norm)
            ref = reference_normalized(G_o, G_q, layout, parse_normalizer(norm), damping).numpy()
            assert np.abs(ours - ref).max() < 2e-4, (t, norm, np.abs(ours - ref).max())


def test_sketched_target_scores_track_the_exact_ones(tiny, samples):
    """With 256 dims per matrix the sketch's whole-model cosines stay close to the exact ones."""
    from gradsim.analysis.targets import scores_for

    origs, queries = samples[:4], samples[4:6]
    exact = sketcher(tiny, 10**8, 0, 0.01)
    exact.estimate(origs)
    e_o, e_q = exact.features(origs), exact.features(queries)
    exact.release()
    small = sketcher(tiny, 256, 0, 0.01)
    assert not all(small.sketch.exact)
    small.estimate(origs)
    s_o, s_q = small.features(origs), small.features(queries)
    small.release()
    for t in ("prompt", "response"):
        err = np.abs(
            scores_for(s_q[t, "raw"], s_o[t, "raw"], small.slices, "none")
            - scores_for(e_q[t, "raw"], e_o[t, "raw"], exact.slices, "none")
        )
        assert err.max() < 0.1, err.max()


def test_an_unknown_normalizer_and_too_few_originals_are_refused(tiny, samples):
    from gradsim.core.normalize import FactoredSecondMoment, parse_normalizer

    with pytest.raises(GradsimError, match="unknown normalizer 'whiten'"):
        parse_normalizer("whiten")
    gc = GradientComputer(tiny.model, tiny.device)
    m = FactoredSecondMoment(gc.layout)
    m.add(gc.gradient(encode(tiny.tokenizer, samples[0], 256)))
    gc.release()
    with pytest.raises(GradsimError, match="1 is too few, give at least 2 originals"):
        m.finish(tiny.device)


@pytest.mark.slow
@pytest.mark.parametrize("loss_on", ["prompt", "all"])
def test_table_scores_equal_a_main_run_with_that_loss_target(tiny, tmp_path, loss_on):
    """Targets from one featurization (``all`` combined from prompt and response) against separate exact
    runs of the study with --loss-on: the same whole-model cosines for every query and original."""
    from gradsim.analysis.targets import TargetOptions
    from gradsim.config import Config
    from gradsim.core.score import subset_scores
    from gradsim.data.load import load_dataset
    from gradsim.data.retrieval import candidate_lists
    from gradsim.study.run import run

    common = dict(device="cpu", sample_size=4, output_dir=str(tmp_path), top_k=3)
    opts = TargetOptions(dims_per_matrix=10**8, bootstrap=50, layers=[-1, 1])
    table = run_targets_for_test(Config(setting="both", **common), opts, tiny)
    for setting in ("paraphrased", "model-generated"):
        cfg = Config(setting=setting, candidates="all", loss_on=loss_on, baselines=False, **common)
        run(cfg, lm=tiny)
        z = np.load(tmp_path / "gradient-similarity" / f"{setting}-all-loss-{loss_on}" / "scores.npz")
        whole = subset_scores(z["dots"], z["qself"], z["cself"], slice(None), "gradient-similarity")
        data = load_dataset(cfg.original_data, cfg.variant_data, 4)
        ours = table["_scores"][setting, "gradient", loss_on, "none"]
        picked = np.stack([ours[q, c] for q, c in enumerate(candidate_lists(data, "all", 3))])
        assert np.abs(picked - whole).max() < 1e-4
    rows = [r for r in table["rows"] if r["method"] == "representation"]
    assert {r["target"] for r in rows} == {
        "response",
        "prompt",
        "all",
        "last",
        "response_layer1",
        "all_layer1",
        "prompt_layer1",
        "last_layer1",
    }


def run_targets_for_test(cfg, opts, lm):
    from gradsim.analysis.targets import run_targets

    return run_targets(cfg, opts, lm)


@pytest.mark.slow
@pytest.mark.parametrize(
    "normalizer,projection", [("adafactor+center+unit", None), ("center", "countsketch"), ("adafactor", "trak")]
)
def test_main_run_normalizers_equal_plain_torch(tiny, tmp_path, normalizer, projection):
    """--normalize in the study itself: the exact path's whole-model cosines equal plain torch on HF-loss
    gradients normalized by the definitions; countsketch and trak track them within their sketch noise.
    A second setting reuses the state estimated by the first."""
    from gradsim.config import Config
    from gradsim.core.normalize import parse_normalizer
    from gradsim.core.score import subset_scores
    from gradsim.data.load import load_dataset
    from gradsim.data.retrieval import candidate_lists
    from gradsim.study.run import run

    common = dict(device="cpu", sample_size=4, output_dir=str(tmp_path), candidates="all", baselines=False)
    kw = dict(use_random_projection=True, projection=projection, proj_dim=2**19 if projection == "countsketch" else 512)
    if projection == "trak":  # traker's CPU projector draws its matrices anew per call: a batch shares them
        kw["batch_size"] = 4
    cfg = Config(normalize=normalizer, damping=0.05, **common, **(kw if projection else {}))
    result = run(cfg, lm=tiny)
    assert result["normalizer"]["normalizer"] == normalizer and result["normalizer"]["estimation_backward_passes"] == 4
    from gradsim.layout import run_dir

    z = np.load(run_dir(cfg) / "scores.npz")
    ours = subset_scores(z["dots"], z["qself"], z["cself"], slice(None), "gradient-similarity")
    data = load_dataset(cfg.original_data, cfg.variant_data, 4)

    def hf(sample):
        enc = encode(tiny.tokenizer, sample, 256, "response")
        return hf_gradient(tiny.model, enc.input_ids, enc.labels)

    G_o = torch.stack([hf(s) for s in data.originals])
    G_q = torch.stack([hf(s) for s in data.queries])
    gc = GradientComputer(tiny.model, tiny.device)
    layout = gc.layout
    gc.release()
    ref = reference_normalized(G_o, G_q, layout, parse_normalizer(normalizer), 0.05).numpy()
    picked = np.stack([ref[q, c] for q, c in enumerate(candidate_lists(data, "all", 4))])
    # exact: fp32 rounding; sketch noise for countsketch (1/3 of the entries; measured 2.3e-4) and trak (512 dims
    # per matrix)
    assert np.abs(picked - ours).max() < {None: 2e-4, "countsketch": 0.01, "trak": 0.15}[projection], np.abs(
        picked - ours
    ).max()
    other = run(dataclasses.replace(cfg, setting="model-generated", variant_data=None).validate(), lm=tiny)
    assert other["normalizer"]["estimation_backward_passes"] == 0


def test_normalize_is_refused_where_the_flat_gradient_is_never_formed():
    from gradsim.config import Config

    with pytest.raises(GradsimError, match="--normalize center acts on the flat gradient"):
        Config(normalize="center", use_random_projection=True, projection="tensorsketch").validate()
    with pytest.raises(GradsimError, match="unknown --normalize 'whiten'"):
        Config(normalize="whiten").validate()


def test_targets_command_refuses_too_few_originals_and_writes_nothing(tmp_path, capsys):
    from gradsim.cli.analysis import targets_main as main

    assert main(["--sample-size", "1", "--output-dir", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 original: the normalizers and the corpus need at least 2") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
