"""Projections against independent references: the Kronecker projection of the autograd gradient
(factorized) and the traker library's own BasicProjector (trak); determinism across processes."""

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_gradients import reference_gradients

from gradsim.core import projection
from gradsim.core.gradients import GradientComputer
from gradsim.core.projection import (
    CountSketchFeaturizer,
    FactorizedFeaturizer,
    TensorSketchFeaturizer,
    TrakFeaturizer,
    _TensorSketchSlot,
    allocate_dims,
    make_allocation,
    smooth_at_most,
    split_dim,
    stable_seed,
)
from gradsim.data.encode import encode
from gradsim.errors import GradsimError
from gradsim.io import load_or_create_json


def expected_projection(slot, grad: torch.Tensor) -> torch.Tensor:
    """R_rows^T grad R_cols (or grad @ R for a vector), in float64, from the full gradient."""
    g = grad.double()
    if g.dim() == 1:
        return g if slot.cols is None else g @ slot.cols.double()
    if slot.rows is not None:
        g = slot.rows.double().T @ g
    if slot.cols is not None:
        g = g @ slot.cols.double()
    return g.reshape(-1)


@pytest.mark.parametrize("proj_dim", [64, 16])
def test_factorized_equals_projection_of_the_exact_gradient(tiny, samples, proj_dim):
    f = FactorizedFeaturizer(tiny.model, tiny.device, proj_dim=proj_dim, seed=3)
    assert f.layout.names == GradientComputer(tiny.model, tiny.device).layout.names
    for s in samples[:3]:
        enc = encode(tiny.tokenizer, s, 256)
        assert (enc.input_ids == tiny.model.model.embed_tokens.padding_idx).any()  # the padding_idx rule is exercised
        feats = f.features(enc).double()
        ref = reference_gradients(tiny.model, enc)
        for name, lo, hi in f.layout.slices():
            want = expected_projection(f.slots[name], ref[name])
            err = (feats[lo:hi] - want).abs().max().item()
            assert err <= 1e-4 * want.abs().max().item() + 1e-9, f"{s.id} {name}: max abs error {err}"


def test_factorized_is_the_kronecker_sketch_of_vec_grad(tiny, samples):
    """The vec ordering: features of W equal (R_rows kron R_cols)^T vec(grad W), row-major vec."""
    f = FactorizedFeaturizer(tiny.model, tiny.device, proj_dim=64, seed=3)
    enc = encode(tiny.tokenizer, samples[0], 256)
    feats = f.features(enc).double()
    ref = reference_gradients(tiny.model, enc)
    name = "model.layers.1.mlp.down_proj.weight"
    slot = f.slots[name]
    kron = torch.kron(slot.rows.double(), slot.cols.double())
    want = kron.T @ ref[name].double().reshape(-1)
    lo = dict((n, (a, b)) for n, a, b in f.layout.slices())[name][0]
    assert torch.allclose(feats[lo : lo + want.numel()], want, rtol=1e-4, atol=1e-7 * want.abs().max().item())


def test_batched_featurization_equals_one_at_a_time(tiny, samples):
    f = FactorizedFeaturizer(tiny.model, tiny.device, proj_dim=64, seed=1)
    encs = [encode(tiny.tokenizer, s, n) for s, n in zip(samples[:3], (256, 200, 150))]
    assert len({e.num_tokens for e in encs}) == 3  # padding is exercised
    batched = f.features_batch(encs)
    for i, e in enumerate(encs):
        single = f.features(e)
        assert torch.allclose(batched[i], single, rtol=1e-4, atol=1e-5 * single.abs().max().item())


@pytest.mark.parametrize("size", [1, 7, 64])
def test_ordered_bucket_sums_equal_the_scatter_add_and_ignore_entry_order(size):
    """The CUDA way of summing into buckets (sorted once, float64 prefix sums; projection.Buckets) against an
    float64 scatter-add, for a fixed index and for per-row indices (bucket_sum), and the same bytes twice."""
    gen = torch.Generator().manual_seed(size)
    a = torch.randn(3, 5000, generator=gen)
    index = torch.randint(0, size, (5000,), generator=gen)
    want = torch.zeros(3, size, dtype=torch.float64).index_add_(1, index, a.double())
    b = projection.Buckets(index, size)
    got = b.sum(a, ordered=True)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got, b.sum(a.clone(), ordered=True))
    assert torch.allclose(b.sum(a, ordered=False).double(), want, rtol=1e-5, atol=1e-4)  # fp32 adds
    rows = torch.randint(0, size, (3, 5000), generator=gen)
    want_rows = torch.zeros(3, size, dtype=torch.float64).scatter_add_(1, rows, a.double())
    got_rows = projection.bucket_sum(a, rows, size, ordered=True)
    assert torch.allclose(got_rows.double(), want_rows, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_rows, projection.bucket_sum(a, rows, size, ordered=True))


def test_no_atomic_adds_reach_cuda():
    """Every scatter_add_ / index_add_ of the projection package sits behind ordered_sums (the CPU side of
    Buckets)."""
    import importlib
    import inspect
    import pkgutil

    src = "".join(
        inspect.getsource(importlib.import_module(f"{projection.__name__}.{m.name}"))
        for m in pkgutil.iter_modules(projection.__path__)
    )
    for op in ("scatter_add_", "index_add_"):
        for line in [ln for ln in src.splitlines() if op in ln]:
            assert "new_zeros" in line or "out[:, self.lo" in line, line
    assert src.count("scatter_add_") + src.count("index_add_") == 4  # Buckets, bucket_sum, two CPU branches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensorsketch_is_deterministic(tiny, samples):
    model = tiny.model.to("cuda")
    try:
        encs = [encode(tiny.tokenizer, s, 256) for s in samples[:2]]
        f = TensorSketchFeaturizer(model, torch.device("cuda"), proj_dim=20_000, seed=3, calibration=encs[:1])
        first = [f.features(e).cpu() for e in encs]
        assert all(torch.equal(x, f.features(e).cpu()) for x, e in zip(first, encs))
    finally:
        tiny.model.to("cpu")


def test_sketch_sizes_and_seeds():
    assert split_dim(4096) == (64, 64) and split_dim(512) == (16, 32) and split_dim(7) == (1, 7)
    assert stable_seed(42, "a") == stable_seed(42, "a") != stable_seed(43, "a") != stable_seed(42, "b")
    assert stable_seed(42, "a") == int.from_bytes(hashlib.sha256(b"42:a").digest()[:8], "big") >> 1


_DIGEST = """
import hashlib, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from gradsim.core.projection import FactorizedFeaturizer

def digest(proj_dim, seed):
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=2)
    f = FactorizedFeaturizer(LlamaForCausalLM(cfg), torch.device("cpu"), proj_dim=proj_dim, seed=seed)
    h = hashlib.sha256()
    for s in f.slots.values():
        for m in (s.rows, s.cols):
            h.update(b"-" if m is None else m.numpy().tobytes())
    return h.hexdigest()

if __name__ == "__main__":
    print(digest(int(sys.argv[1]), int(sys.argv[2])))
"""


@pytest.mark.slow
def test_two_processes_build_bit_identical_projections():
    here = {"__name__": "in_process"}
    exec(_DIGEST, here)
    env = dict(os.environ, PYTHONHASHSEED=str(hash("salt") % 1000 + 1))  # another salt for Python's hash()
    other = subprocess.run(
        [sys.executable, "-c", _DIGEST, "16", "7"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    mine = here["digest"](16, 7)
    assert other == mine and len(mine) == 64
    assert here["digest"](16, 8) != mine


def test_trak_features_equal_the_basic_projector(tiny, samples):
    from trak.projectors import BasicProjector, ProjectionType

    k = 64
    f = TrakFeaturizer(tiny.model, tiny.device, proj_dim=k, seed=5)
    enc = encode(tiny.tokenizer, samples[0], 256)
    feats = f.features(enc)
    exact = GradientComputer(tiny.model, tiny.device).gradient(enc).clone()
    out = dict((n, (lo, hi)) for n, lo, hi in f.layout.slices())
    checked = 0
    for m, (name, lo, hi) in enumerate(f.full.slices()):
        olo, ohi = out[name]
        if not f.projected[m]:  # no larger than its projection: kept exact
            assert torch.equal(feats[olo:ohi], exact[lo:hi])
            continue
        pr = f.projector(m)
        ref = BasicProjector(
            hi - lo,
            k,
            stable_seed(5, name) % 2**31,
            ProjectionType.normal,
            tiny.device,
            block_size=pr.block_size,
            dtype=torch.float32,
        )
        want = ref.project(exact[lo:hi][None].contiguous(), model_id=0)[0] / math.sqrt(k)
        assert torch.allclose(feats[olo:ohi], want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
        checked += 1
    assert checked >= 10


# ---- countsketch -------------------------------------------------------------------------------


def countsketch_reference(grad: torch.Tensor, k: int, signs: torch.Tensor) -> torch.Tensor:
    """The definition, in float64: S[bucket(i), i] = sign(i) with bucket(i) = i mod k, as a sparse matrix."""
    n = grad.numel()
    idx = torch.stack([torch.arange(n) % k, torch.arange(n)])
    S = torch.sparse_coo_tensor(idx, signs.double(), (k, n))
    return torch.sparse.mm(S, grad.double().reshape(-1, 1))[:, 0]


@pytest.fixture(scope="module")
def tiny_calibration(tiny, samples):
    return [encode(tiny.tokenizer, s, 256) for s in samples[:4]]


def test_countsketch_equals_the_sparse_sketch_of_the_autograd_gradient(tiny, samples, tiny_calibration):
    f = CountSketchFeaturizer(tiny.model, tiny.device, proj_dim=20_000, seed=3, calibration=tiny_calibration)
    assert f.layout.names == GradientComputer(tiny.model, tiny.device).layout.names
    assert f.layout.total <= 20_000 and any(f.exact) and not all(f.exact)
    enc = encode(tiny.tokenizer, samples[5], 256)
    feats = f.features(enc)
    ref = reference_gradients(tiny.model, enc)
    for (name, lo, hi), exact, shape in zip(f.layout.slices(), f.exact, f.layout.shapes):
        g = ref[name].reshape(-1)
        if exact:
            want = g.double()
        else:
            assert all(math.gcd(hi - lo, d) == 1 for d in shape), name  # buckets coprime to the sides
            gen = torch.Generator().manual_seed(stable_seed(3, f"{name}:signs"))  # the documented seed rule
            signs = torch.randint(0, 2, (g.numel(),), generator=gen, dtype=torch.int8) * 2 - 1
            want = countsketch_reference(g, hi - lo, signs)
        err = (feats[lo:hi].double() - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item() + 1e-9, f"{name}: max abs error {err}"


def test_countsketch_inner_products_are_unbiased_and_close(tiny, samples, tiny_calibration):
    """Over independent seeds the sketched dot product averages to the exact one (the JL property),
    and one sketch's whole-model cosine is within the variance bound of the exact cosine."""
    encs = [encode(tiny.tokenizer, s, 256) for s in samples[6:8]]
    gc = GradientComputer(tiny.model, tiny.device)
    a, b = (gc.gradient(e).clone().double() for e in encs)
    alloc = make_allocation(tiny.model, tiny.device, "float32", 4000, tiny_calibration)
    dots, coss = [], []
    for seed in range(60):
        f = CountSketchFeaturizer(tiny.model, tiny.device, proj_dim=4000, seed=seed, allocation=alloc)
        fa, fb = (
            f.sketch(a.float(), torch.empty(f.layout.total)).double(),
            f.sketch(b.float(), torch.empty(f.layout.total)).double(),
        )
        dots.append(float(fa @ fb))
        coss.append(float(fa @ fb / fa.norm() / fb.norm()))
    exact_dot, exact_cos = float(a @ b), float(a @ b / a.norm() / b.norm())
    sem = np.std(dots) / math.sqrt(len(dots))
    assert abs(np.mean(dots) - exact_dot) < 4 * sem + 1e-12
    assert np.std(dots) > 0  # really random across seeds
    # One sketch's error, predicted per matrix: a CountSketch of k_m dims gives matrix m's dot with variance
    # <= (|a_m|^2 |b_m|^2 + <a_m, b_m>^2) / k_m (exact matrices: 0); the matrices are sketched independently,
    # so the whole dot's sd is the root of the sum, and the cosine's error is that over |a| |b| to first
    # order (the norms' own sketch errors add at most as much again: the factor 2 below).
    var = 0.0
    for (_, lo, hi), k, exact in zip(f.full.slices(), f.dims, f.exact):
        if not exact:
            am, bm = a[lo:hi], b[lo:hi]
            var += float(am.norm() ** 2 * bm.norm() ** 2 + (am @ bm) ** 2) / k
    predicted = math.sqrt(var) / float(a.norm() * b.norm())
    assert predicted < 0.1  # a bound that can fail: not one that admits any cosine
    assert np.mean(np.abs(np.array(coss) - exact_cos)) < 2 * predicted


def test_allocation_follows_norm_shares_and_keeps_small_matrices_exact():
    shapes = [(1000, 50), (64,), (300, 40), (64,)]
    k = allocate_dims(np.array([0.5, 0.3, 0.1, 0.1]), shapes, 2000)
    assert k[1] == 64 and k[3] == 64  # offered more than their entries: exact
    assert k.sum() <= 2000 and k[0] > k[2] > 1
    for d, shape in zip(k, shapes):
        if d < math.prod(shape):
            assert all(math.gcd(int(d), s) == 1 for s in shape)
    assert (allocate_dims(np.array([1.0, 0, 0, 0]), shapes, 10**6) == [math.prod(s) for s in shapes]).all()
    fft = allocate_dims(np.array([0.5, 0.3, 0.1, 0.1]), shapes, 2000, "fft")
    assert fft[1] == 64 and fft.sum() <= 2000
    assert all(smooth_at_most(int(d)) == d for d, shape in zip(fft, shapes) if d < math.prod(shape))
    assert [smooth_at_most(n) for n in (1, 7, 241, 1000, 1023)] == [1, 6, 240, 1000, 1000]


def test_allocation_file_is_created_once_and_reused(tmp_path):
    path = tmp_path / "alloc" / "a.json"
    first = load_or_create_json(path, lambda: {"dims": [1, 2]})
    second = load_or_create_json(path, lambda: {"dims": [3, 4]})  # a later (or racing) process
    assert first == second == {"dims": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temp files left


_SIGNS_DIGEST = """
import hashlib, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from gradsim.core.projection import CountSketchFeaturizer, TensorSketchFeaturizer, allocate_dims
import numpy as np

cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=2)
model = LlamaForCausalLM(cfg)
names = [n for n, p in model.named_parameters()]
shapes = [tuple(p.shape) for n, p in model.named_parameters()]
dims = allocate_dims(np.ones(len(names)), shapes, 3000).tolist()
alloc = {"names": names, "total": 3000, "calibration_ids": [], "dims": dims}
f = CountSketchFeaturizer(model, torch.device("cpu"), proj_dim=3000, seed=int(sys.argv[1]), allocation=alloc)
print(hashlib.sha256(f.signs.numpy().tobytes()).hexdigest(), f.spec["allocation_sha256"])
alloc = dict(alloc, fit="fft", dims=allocate_dims(np.ones(len(names)), shapes, 3000, "fft").tolist())
t = TensorSketchFeaturizer(model, torch.device("cpu"), proj_dim=3000, seed=int(sys.argv[1]), allocation=alloc)
h = hashlib.sha256()
for s in t.slots.values():
    for a in ("h_rows", "s_rows", "h_cols", "s_cols", "h", "s"):
        if hasattr(s, a):
            h.update(getattr(s, a).numpy().tobytes())
print(h.hexdigest())
"""


@pytest.mark.slow
def test_sketch_hashes_and_signs_are_bit_identical_across_processes():
    env = dict(os.environ, PYTHONHASHSEED="123")
    runs = [
        subprocess.run(
            [sys.executable, "-c", _SIGNS_DIGEST, seed], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        for seed in ("7", "7", "8")
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


# ---- tensorsketch ------------------------------------------------------------------------------


def tensorsketch_reference(grad: torch.Tensor, k: int, name: str, seed: int) -> torch.Tensor:
    """The definition, in float64, from the exact gradient: entry (i, j) is added with sign s_r(i) s_c(j)
    into bucket (h_r(i) + h_c(j)) mod k; hashes and signs drawn as documented (h_r, s_r, h_c, s_c).
    A vector is a plain CountSketch (h, s). No FFT, no hooks."""
    gen = torch.Generator().manual_seed(stable_seed(seed, f"{name}:tensorsketch"))

    def draw(n):
        h = torch.randint(0, k, (n,), generator=gen)
        return h, torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1

    g = grad.double()
    if g.dim() == 1:
        h, s = draw(g.numel())
        return torch.zeros(k, dtype=torch.float64).index_add_(0, h, g * s)
    h_r, s_r = draw(g.shape[0])
    h_c, s_c = draw(g.shape[1])
    bucket = (h_r[:, None] + h_c[None, :]) % k
    return torch.zeros(k, dtype=torch.float64).index_add_(
        0, bucket.reshape(-1), (g * s_r[:, None] * s_c[None, :]).reshape(-1)
    )


def check_tensorsketch(f, lm, enc, seed, rtol):
    feats = f.features(enc).double()
    ref = reference_gradients(lm.model, enc)
    for (name, lo, hi), exact in zip(f.layout.slices(), f.exact):
        want = ref[name].double().reshape(-1) if exact else tensorsketch_reference(ref[name], hi - lo, name, seed)
        err = (feats[lo:hi] - want).abs().max().item()
        assert err <= rtol * want.abs().max().item() + 1e-9, f"{name}: max abs error {err}"


@pytest.mark.parametrize("ratio", [0, projection.DIRECT_RATIO, 10**9], ids=["fft", "default", "direct"])
def test_tensorsketch_equals_the_sketch_of_the_autograd_gradient(tiny, samples, tiny_calibration, monkeypatch, ratio):
    """Every matrix through the FFT (ratio 0), every one directly from its weight gradient (10^9), and the
    default mix: each the same sketch as the definition."""
    monkeypatch.setattr("gradsim.core.projection.tensorsketch.DIRECT_RATIO", ratio)
    f = TensorSketchFeaturizer(tiny.model, tiny.device, proj_dim=20_000, seed=3, calibration=tiny_calibration)
    direct = {s.direct for s in f.slots.values() if isinstance(s, _TensorSketchSlot)}
    assert direct == ({False} if ratio == 0 else {True} if ratio == 10**9 else {False, True})
    assert f.layout.names == GradientComputer(tiny.model, tiny.device).layout.names
    assert f.layout.total <= 20_000 and any(f.exact) and not all(f.exact)
    assert all(smooth_at_most(hi - lo) == hi - lo for (_, lo, hi), e in zip(f.layout.slices(), f.exact) if not e)
    for s in samples[4:6]:
        enc = encode(tiny.tokenizer, s, 256)
        assert (enc.input_ids == tiny.model.model.embed_tokens.padding_idx).any()  # the padding_idx rule is exercised
        check_tensorsketch(f, tiny, enc, 3, 1e-4)


@pytest.mark.slow
def test_tensorsketch_on_the_embedded_model(embedded, samples):
    """The real model (tied 49,152 x 576 embedding, 30 layers) at the default size, one short sample."""
    encs = [encode(embedded.tokenizer, s, 128) for s in samples[:2]]
    f = TensorSketchFeaturizer(embedded.model, embedded.device, proj_dim=65536, seed=11, calibration=encs[:1])
    assert 60_000 < f.layout.total <= 65536
    check_tensorsketch(f, embedded, encs[1], 11, 1e-3)


@pytest.mark.slow
def test_tensorsketch_batched_equals_one_at_a_time_and_is_unbiased(tiny, samples, tiny_calibration):
    encs = [encode(tiny.tokenizer, s, n) for s, n in zip(samples[:3], (256, 200, 150))]
    f = TensorSketchFeaturizer(tiny.model, tiny.device, proj_dim=4000, seed=1, calibration=tiny_calibration)
    batched = f.features_batch(encs)
    for i, e in enumerate(encs):
        single = f.features(e)
        assert torch.allclose(batched[i], single, rtol=1e-4, atol=1e-5 * single.abs().max().item())
    gc = GradientComputer(tiny.model, tiny.device)
    a, b = (gc.gradient(e).clone().double() for e in encs[:2])
    dots = []
    for seed in range(40):
        f = TensorSketchFeaturizer(tiny.model, tiny.device, proj_dim=4000, seed=seed, allocation=f.allocation)
        fa, fb = f.features_batch(encs[:2]).double()
        dots.append(float(fa @ fb))
    sem = np.std(dots) / math.sqrt(len(dots))
    assert np.std(dots) > 0 and abs(np.mean(dots) - float(a @ b)) < 4 * sem + 1e-12


def test_tensorsketch_refuses_an_allocation_made_for_countsketch(tiny, tiny_calibration):
    alloc = make_allocation(tiny.model, tiny.device, "float32", 4000, tiny_calibration)
    with pytest.raises(GradsimError, match="tensorsketch allocation was made for another"):
        TensorSketchFeaturizer(tiny.model, tiny.device, proj_dim=4000, allocation=alloc)


def test_trak_projection_does_not_depend_on_the_memory_budget(tiny, samples):
    """traker's BasicProjector seeds each block of columns apart, so its block size must not follow the
    memory budget (it did: features then changed with GRADSIM_MEMORY_GB); what it does depend on is recorded."""
    enc = encode(tiny.tokenizer, samples[0], 256)
    big = TrakFeaturizer(tiny.model, tiny.device, proj_dim=64, seed=5, memory_bytes=2**30)
    small = TrakFeaturizer(tiny.model, tiny.device, proj_dim=64, seed=5, memory_bytes=4096)
    assert torch.equal(big.features(enc), small.features(enc))
    assert big.spec == small.spec
    assert big.spec["projector"] == "BasicProjector" and big.spec["device_type"] == "cpu"
