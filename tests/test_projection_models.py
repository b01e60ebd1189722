"""Every projection, and the exact gradient, against its definition applied to plain-autograd gradients on
tiny random models of the families the original study's scale calls for: Llama (with biases, untied),
Qwen3 and Gemma 3 (q/k norms over (B, T, heads, head_dim); Gemma's (1 + w) norms and scaled embedding),
OLMo 2 (q/k norms over the whole projection, post-norms) and OLMo (parameterless LayerNorms, clipped qkv)."""

import math

import pytest
import torch
from conftest import TINY_SIZES
from test_gradients import reference_gradients
from test_projection import countsketch_reference, expected_projection, tensorsketch_reference
from torch import nn

from gradsim.core.gradients import GradientComputer
from gradsim.core.model import LoadedModel
from gradsim.core.projection import (
    CountSketchFeaturizer,
    FactorizedFeaturizer,
    TensorSketchFeaturizer,
    TrakFeaturizer,
    make_allocation,
    stable_seed,
)
from gradsim.data.encode import encode
from gradsim.errors import GradsimError

SIZES = TINY_SIZES


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig, dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM, Qwen3Config, dict(head_dim=16, tie_word_embeddings=True)


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM, Gemma3TextConfig, dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64)


def _olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return Olmo2ForCausalLM, Olmo2Config, dict(tie_word_embeddings=False)


def _olmo():
    from transformers import OlmoConfig, OlmoForCausalLM

    return OlmoForCausalLM, OlmoConfig, dict(clip_qkv=4.0, tie_word_embeddings=True)


FAMILIES = {"llama": _llama, "qwen3": _qwen3, "gemma3": _gemma3, "olmo2": _olmo2, "olmo": _olmo}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, embedded):
    """A tiny random model of the family with the embedded model's tokenizer, scaled as the tiny fixture."""
    model_cls, config_cls, extra = FAMILIES[request.param]()
    tok = embedded.tokenizer
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **SIZES, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return LoadedModel(
        model, tok, f"tiny-{request.param}", "test", torch.device("cpu"), embedded.chat_template_sha256, 256
    )


@pytest.fixture(scope="module")
def encs(family, samples):
    # 128 tokens keep the file fast; the third sample is featurized alone, the first two as a padded batch.
    out = [encode(family.tokenizer, s, n) for s, n in zip(samples[:3], (128, 96, 128))]
    pad = family.model.get_input_embeddings().padding_idx
    assert (out[0].input_ids == pad).any()  # the padding_idx rule is exercised
    return out


@pytest.fixture(scope="module")
def refs(family, encs):
    """Each sample's plain-autograd gradient (HF's own loss), by parameter name."""
    return [reference_gradients(family.model, e) for e in encs]


def check_definition(feats: torch.Tensor, ref: dict, layout, definition, rtol: float = 1e-4) -> None:
    """feats (D,) equal, matrix by matrix, definition(m, name, autograd gradient, slice size)."""
    assert set(ref) == set(layout.names)
    for m, (name, lo, hi) in enumerate(layout.slices()):
        want = definition(m, name, ref[name], hi - lo).double().reshape(-1)
        err = (feats[lo:hi].double() - want).abs().max().item()
        assert err <= rtol * want.abs().max().item() + 1e-9, f"{name}: max abs error {err}"


def check_batch_and_single(f, encs, refs, definition) -> None:
    """The first two samples as one padded batch, and the third alone, each equal to the definition."""
    feats = list(f.features_batch(encs[:2])) + [f.features(encs[2])]
    for x, ref in zip(feats, refs):
        check_definition(x, ref, f.layout, definition)


def no_grads(model: nn.Module) -> bool:
    return all(p.grad is None for p in model.parameters())


def test_exact_gradients_equal_autograd(family, encs, refs):
    gc = GradientComputer(family.model, family.device)
    for enc, ref in zip(encs, refs):
        check_definition(gc.gradient(enc), ref, gc.layout, lambda m, name, g, k: g, rtol=1e-5)


def test_tensorsketch_equals_its_definition_and_calibration_leaves_no_gradient(family, encs, refs):
    GradientComputer(family.model, family.device).gradient(encs[0])  # .grad set, as a previous featurizer may leave it
    f = TensorSketchFeaturizer(family.model, family.device, proj_dim=20_000, seed=3, calibration=encs[:1])
    assert no_grads(family.model)  # the calibration's full-size buffer is released
    assert any(f.exact) and not all(f.exact)

    def definition(m, name, g, k):
        return g if f.exact[m] else tensorsketch_reference(g, k, name, 3)

    check_batch_and_single(f, encs, refs, definition)
    assert no_grads(family.model)


def test_tensorsketch_the_cuda_way_equals_its_definition(family, encs, refs, monkeypatch):
    """On CUDA every sum into buckets takes the sorted, fixed-order way (projection.Buckets) instead of an atomic
    scatter-add: forced here on the CPU, the sketch still equals its definition."""
    from gradsim.core.projection import buckets, tensorsketch

    taken = []
    for module in (buckets, tensorsketch):  # each module that asks ordered_sums
        monkeypatch.setattr(module, "ordered_sums", lambda t: taken.append(t.shape) or True)
    f = TensorSketchFeaturizer(family.model, family.device, proj_dim=20_000, seed=3, calibration=encs[:1])

    def definition(m, name, g, k):
        return g if f.exact[m] else tensorsketch_reference(g, k, name, 3)

    check_batch_and_single(f, encs, refs, definition)
    assert taken  # the ordered way ran


def test_factorized_equals_its_definition(family, encs, refs):
    f = FactorizedFeaturizer(family.model, family.device, proj_dim=64, seed=3)
    assert any(s.rows is not None for s in f.slots.values())
    check_batch_and_single(f, encs, refs, lambda m, name, g, k: expected_projection(f.slots[name], g))


def test_countsketch_equals_its_definition_with_cached_and_redrawn_signs(family, encs, refs):
    alloc = make_allocation(family.model, family.device, "float32", 20_000, encs[:1])
    cached = CountSketchFeaturizer(family.model, family.device, proj_dim=20_000, seed=3, allocation=alloc)
    # 4 KiB holds the signs of the small matrices but not the embedding's: both paths are exercised
    mixed = CountSketchFeaturizer(
        family.model, family.device, proj_dim=20_000, seed=3, allocation=alloc, sign_cache_bytes=4096
    )
    sketched = [m for m, e in enumerate(cached.exact) if not e]
    assert sketched and all(cached.packed_at[m] is not None for m in sketched)
    assert cached.signs.numel() == sum((math.prod(cached.full.shapes[m]) + 7) // 8 for m in sketched)
    assert {mixed.packed_at[m] is None for m in sketched} == {True, False} and mixed.signs.numel() <= 4096

    def definition(m, name, g, k):
        if cached.exact[m]:
            return g
        gen = torch.Generator().manual_seed(stable_seed(3, f"{name}:signs"))  # the documented seed rule
        return countsketch_reference(g, k, torch.randint(0, 2, (g.numel(),), generator=gen, dtype=torch.int8) * 2 - 1)

    for f in (cached, mixed):
        check_definition(f.features(encs[2]), refs[2], f.layout, definition)


def test_trak_equals_its_definition(family, encs, refs):
    from trak.projectors import BasicProjector, ProjectionType

    k = 16
    f = TrakFeaturizer(family.model, family.device, proj_dim=k, seed=5)
    assert any(f.projected)
    # Generating a matrix's Gaussians is the cost: once per matrix for all three samples, in one block of k
    # columns, as the featurizer's memory_bytes allows for matrices this small.
    projectors = {}

    def definition(m, name, g, size):
        if not f.projected[m]:
            return g
        if name not in projectors:
            projectors[name] = BasicProjector(
                g.numel(),
                k,
                stable_seed(5, name) % 2**31,
                ProjectionType.normal,
                family.device,
                block_size=k,
                dtype=torch.float32,
            )
        return projectors[name].project(g.reshape(1, -1).contiguous(), model_id=0)[0] / math.sqrt(k)

    check_batch_and_single(f, encs, refs, definition)


def test_a_hook_projection_refuses_an_embedding_it_has_no_rule_for(tiny):
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    model = tiny.model
    original = model.model.embed_tokens
    shifted = Shifted(original.num_embeddings, original.embedding_dim, original.padding_idx)
    shifted.weight = original.weight  # the tied lm_head stays tied
    model.model.embed_tokens = shifted
    try:
        with pytest.raises(GradsimError, match="no rule for the embedding Shifted"):
            FactorizedFeaturizer(model, tiny.device, proj_dim=64)
    finally:
        model.model.embed_tokens = original
