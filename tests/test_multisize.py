"""One backward, many sizes: each size's features equal the featurizer built and run alone, and the
whole multi-size featurization costs one backward pass per sample."""

import pytest
import torch

from gradsim.core.multisize import make_multi_size
from gradsim.core.projection import SKETCHES, FactorizedFeaturizer, TrakFeaturizer, _TensorSketchSlot, make_allocation
from gradsim.data.encode import encode
from gradsim.errors import GradsimError

SIZES = {"tensorsketch": [256, 1024, 4096], "countsketch": [256, 1024, 4096], "factorized": [16, 64], "trak": [8, 32]}


def alone(kind, tiny, k, seed, allocation, rule="norm"):
    if kind in SKETCHES:
        cls = SKETCHES[kind]
        return cls(tiny.model, tiny.device, "float32", k, seed, allocation=allocation, rule=rule)
    if kind == "trak":
        return TrakFeaturizer(tiny.model, tiny.device, "float32", k, seed)
    return FactorizedFeaturizer(tiny.model, tiny.device, "float32", k, seed)


@pytest.mark.parametrize("kind", list(SIZES))
def test_each_size_equals_the_featurizer_alone(tiny, samples, kind):
    encs = [encode(tiny.tokenizer, s, 256) for s in samples[:2]]
    calibration = encs if kind in SKETCHES else None
    multi = make_multi_size(kind, tiny.model, tiny.device, SIZES[kind], seed=5, calibration=calibration)
    feats = torch.stack([multi.features(e) for e in encs])
    assert multi.backward_passes == len(encs)  # one pass per sample for all sizes
    if kind == "tensorsketch":  # slots through the FFT, and slots sketched directly from one shared weight gradient
        assert {s.direct for p in multi.parts for s in p.slots.values() if isinstance(s, _TensorSketchSlot)} == {
            False,
            True,
        }
    parts = multi.split(feats)
    assert len(parts) == len(SIZES[kind])
    for k, got in zip(SIZES[kind], parts):
        allocation = None
        if kind in SKETCHES:  # what a run of this size alone would calibrate on the same samples
            allocation = make_allocation(tiny.model, tiny.device, "float32", k, encs, SKETCHES[kind].fit)
        f = alone(kind, tiny, k, 5, allocation)
        want = torch.stack([f.features(e) for e in encs])
        assert got.shape == want.shape, (kind, k)
        scale = want.abs().max().item()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * scale), f"{kind} size {k}: {(got - want).abs().max()}"
    if kind in SKETCHES:  # the sizes differ: the smaller ones are not the larger truncated
        assert parts[0].shape[1] < parts[-1].shape[1]


@pytest.mark.parametrize(
    "family", [{"countsketch": [256, 1024], "trak": [8]}, {"tensorsketch": [512], "factorized": [16]}]
)
def test_one_pass_serves_several_projections_of_a_family(tiny, samples, family):
    encs = [encode(tiny.tokenizer, s, 256) for s in samples[:2]]
    multi = make_multi_size(family, tiny.model, tiny.device, seed=5, calibration=encs)
    feats = torch.stack([multi.features(e) for e in encs])
    assert multi.backward_passes == len(encs)
    got = multi.split(feats)
    i = 0
    for kind, sizes in family.items():
        for k in sizes:
            allocation = (
                make_allocation(tiny.model, tiny.device, "float32", k, encs, SKETCHES[kind].fit)
                if kind in SKETCHES
                else None
            )
            want = torch.stack([alone(kind, tiny, k, 5, allocation).features(e) for e in encs])
            assert torch.allclose(got[i], want, rtol=1e-5, atol=1e-6 * want.abs().max().item()), (kind, k)
            i += 1


def test_a_mixed_family_is_refused(tiny, samples):
    encs = [encode(tiny.tokenizer, s, 256) for s in samples[:1]]
    with pytest.raises(GradsimError, match="not a mix"):
        make_multi_size({"countsketch": [256], "tensorsketch": [256]}, tiny.model, tiny.device, calibration=encs)


def test_batched_multi_size_equals_one_at_a_time(tiny, samples):
    encs = [encode(tiny.tokenizer, s, n) for s, n in zip(samples[:3], (256, 200, 150))]
    multi = make_multi_size(
        "tensorsketch", tiny.model, tiny.device, [256, 2048], seed=1, batch_size=3, calibration=encs
    )
    batched = multi.features_batch(encs)
    assert multi.backward_passes == 1
    for i, e in enumerate(encs):
        single = multi.features(e)
        assert torch.allclose(batched[i], single, rtol=1e-4, atol=1e-5 * single.abs().max().item())


def test_bad_sizes_and_kinds_are_refused(tiny):
    with pytest.raises(GradsimError, match="unknown projection"):
        make_multi_size("gaussian", tiny.model, tiny.device, [64])
    with pytest.raises(GradsimError, match="positive"):
        make_multi_size("factorized", tiny.model, tiny.device, [0, 64])


def test_an_allocation_rule_reaches_every_size(tiny, samples):
    encs = [encode(tiny.tokenizer, s, 256) for s in samples[:2]]
    multi = make_multi_size(
        "countsketch", tiny.model, tiny.device, [512, 2048], seed=2, calibration=encs, rule="norm-floor"
    )
    got = multi.split(torch.stack([multi.features(e) for e in encs]))
    for k, g in zip([512, 2048], got):
        a = make_allocation(tiny.model, tiny.device, "float32", k, encs, "coprime", "norm-floor")
        assert multi.parts[[512, 2048].index(k)].allocation["dims"] == a["dims"]
        want = torch.stack([alone("countsketch", tiny, k, 2, a, "norm-floor").features(e) for e in encs])
        assert torch.allclose(g, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
