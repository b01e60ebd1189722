"""Build a random-init model of a real model's shape, with the embedded model's tokenizer, for benchmarks.

    uv run python bench/make_model.py --shape amd-olmo-1b [--out DIR] [--seed 0]
    uv run python bench/make_model.py --shape llama-7b --meta        # count parameters, print the memory formula

Shapes (architecture and sizes of the real model; the weights are a seeded random init, not the model):
  amd-olmo-1b   AMD-OLMo-1B-SFT: OlmoForCausalLM, hidden 2048, 16 layers, 16 heads, intermediate 8192,
                vocab 50304, context 2048, tied embeddings, rope_theta 10000, non-parametric LayerNorm
                (OLMo v1): ~1.18B parameters. The model of the original study.
  smollm2-135m  SmolLM2-135M-Instruct (LlamaForCausalLM), the embedded default's shape
  olmo2-1b      OLMo-2-0425-1B (Olmo2ForCausalLM), untied embeddings, vocab 100352
  llama-7b      Llama-2-7B (LlamaForCausalLM), vocab 32000 (meant for --meta)
  tiny          tests/conftest.py's tiny Llama (hidden 32, 2 layers, context 256): CPU smoke runs of the GPU check

The model is saved as fp32 safetensors (save_pretrained) with the embedded SmolLM2 tokenizer and chat
template (or the tokenizer directory given with --tokenizer, e.g. a GPU bundle's, where the embedded
model's package is not installed), into ~/.cache/gradsim/models/<shape> by default (under GRADSIM_CACHE
when set). The build is idempotent (a directory holding the same spec is reused) and atomic (written to a
temporary directory beside the target, then renamed). The vocabulary is raised to the tokenizer's size
where the shape's is smaller, so every token id is a valid row; where it is larger, pad_token_id is the
last (unused) row, as AMD-OLMo's <|padding|> never occurs in text. The directory path is the last line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run without the package installed (e.g. a bare GPU node)
    sys.path.append(str(ROOT / "src"))

SPEC_FILE = "gradsim_make_model.json"
SPEC_VERSION = 1


def _sizes(hidden, intermediate, layers, heads, kv_heads, vocab, context, tied, **extra) -> dict:
    """A shape's config kwargs: its sizes, then what sets it apart (rope, norm eps, biases); every shape has
    silu activations, no attention bias and init 0.02."""
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=context,
        tie_word_embeddings=tied,
        attention_bias=False,
        hidden_act="silu",
        initializer_range=0.02,
        **extra,
    )


# (model class name, config class name, config kwargs) of each real model's shape. _sizes's order: hidden,
# intermediate, layers, attention heads, key/value heads, vocab, context, tied embeddings.
SHAPES: dict[str, tuple[str, str, dict]] = {
    "amd-olmo-1b": (
        "OlmoForCausalLM",
        "OlmoConfig",
        _sizes(2048, 8192, 16, 16, 16, 50304, 2048, True, rope_theta=10000.0, clip_qkv=None),
    ),
    "smollm2-135m": (
        "LlamaForCausalLM",
        "LlamaConfig",
        _sizes(
            576, 1536, 30, 9, 3, 49152, 8192, True, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, mlp_bias=False
        ),
    ),
    "olmo2-1b": (
        "Olmo2ForCausalLM",
        "Olmo2Config",
        _sizes(2048, 8192, 16, 16, 16, 100352, 4096, False, rope_theta=500000.0, rms_norm_eps=1e-6),
    ),
    "tiny": ("LlamaForCausalLM", "LlamaConfig", _sizes(32, 64, 2, 4, 2, 49152, 256, True, mlp_bias=False)),
    "llama-7b": (
        "LlamaForCausalLM",
        "LlamaConfig",
        _sizes(4096, 11008, 32, 32, 32, 32000, 4096, False, rope_theta=10000.0, rms_norm_eps=1e-5, mlp_bias=False),
    ),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_out(shape: str) -> Path:
    from gradsim.core.model import cache_dir

    return cache_dir() / "models" / shape


def load_tokenizer(path=None):
    """The embedded SmolLM2 tokenizer (with its chat template) and the revision of its source; or the
    tokenizer saved in ``path`` (its gradsim_revision.txt, else a hash of its files, as the revision)."""
    import hashlib

    from transformers import AutoTokenizer

    if path is None:
        from gradsim.core.model import embedded_model_dir

        path, revision = embedded_model_dir()
    else:
        path = Path(path)
        rev_file = path / "gradsim_revision.txt"
        if rev_file.is_file():
            revision = rev_file.read_text().strip()
        else:
            h = hashlib.sha256()
            for f in sorted(p for p in path.iterdir() if p.is_file()):
                h.update(f.name.encode() + f.read_bytes())
            revision = "dir-" + h.hexdigest()[:16]
    return AutoTokenizer.from_pretrained(str(path)), revision


def make_config(shape: str, tokenizer=None):
    import transformers

    _, cfg_cls, kwargs = SHAPES[shape]
    kwargs = dict(kwargs)
    notes = []
    if tokenizer is not None:
        n_tok = len(tokenizer)
        if kwargs["vocab_size"] < n_tok:
            notes.append(f"vocab_size raised from {kwargs['vocab_size']} to the tokenizer's {n_tok}")
            kwargs["vocab_size"] = n_tok
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if kwargs["vocab_size"] > n_tok:
            pad = kwargs["vocab_size"] - 1  # an unused row: padding_idx never hits a real token
        kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    cfg.architectures = [SHAPES[shape][0]]
    return cfg, notes


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied Parameter once


def meta_model(shape: str):
    import torch
    import transformers

    cfg, _ = make_config(shape)
    with torch.device("meta"):
        model = getattr(transformers, SHAPES[shape][0])(cfg)
    return cfg, model


def memory_formula(shape: str, params: int, cfg, tokens: int = 553) -> list[str]:
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    p4 = 4 * params
    h, layers, heads, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size
    # Rough activation memory of one forward kept for backward (Korthikanti et al. 2022: 34 T h + 5 a T^2
    # bytes per layer at 16 bits; x2 for fp32, eager attention) plus fp32 logits and their gradient.
    act = 2 * layers * (34 * tokens * h + 5 * heads * tokens**2) + 3 * 4 * tokens * vocab
    return [
        f"shape {shape}: {params:,} parameters (P; tied embeddings counted once)",
        f"fp32 weights 4P = {gb(p4)}; one exact per-sample fp32 gradient 4P = {gb(p4)}",
        f"original study's approach (query gradient kept while each candidate's is computed): "
        f"weights + gradient buffer + kept query = 12P = {gb(3 * p4)} + activations",
        f"gradsim exact, holding a block of b gradients: 4P (2 + b) = {gb(2 * p4)} + b x {gb(p4)} + activations; "
        f"originals kept on scratch disk: 4P each ({gb(p4 * 1030)} for 1,030 LIMA originals)",
        f"activations at T={tokens} tokens (rough, fp32, eager attention): {gb(act)}",
    ]


def spec_of(shape: str, cfg, seed: int, tokenizer_revision: str) -> dict:
    d = cfg.to_dict()
    d.pop("transformers_version", None)
    return {
        "version": SPEC_VERSION,
        "shape": shape,
        "seed": seed,
        "tokenizer": tokenizer_revision,
        "config": json.loads(json.dumps(d, sort_keys=True, default=str)),
    }


def read_spec(path: Path):
    try:
        return json.loads((path / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None


def build(shape: str, out: Path, seed: int, tokenizer=None) -> Path:
    import torch
    import transformers

    tok, tok_rev = load_tokenizer(tokenizer)
    cfg, notes = make_config(shape, tok)
    for n in notes:
        log(f"note: {n}")
    spec = spec_of(shape, cfg, seed, tok_rev)
    existing = read_spec(out)
    if existing is not None and {k: v for k, v in existing.items() if k != "params"} == spec:
        log(f"{out} already holds {shape} (seed {seed}, {existing.get('params', 0):,} parameters): reused")
        return out
    if out.exists():
        log(f"{out} exists with another spec: rebuilding it")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = getattr(transformers, SHAPES[shape][0])(cfg).to(torch.float32).eval()
    params = count_params(model)
    log(f"built {shape}: {params:,} parameters in {time.perf_counter() - t0:.1f} s (seed {seed})")
    ids_max = max(tok.get_vocab().values())
    assert ids_max < model.config.vocab_size, f"tokenizer id {ids_max} >= vocab_size {model.config.vocab_size}"
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model directory is a plain shared cache
    try:
        t0 = time.perf_counter()
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        spec["params"] = params
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
        del model
        if out.exists():  # a directory cannot be replaced by rename: move the old one aside first
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError:  # another process finished first
                other = read_spec(out)
                shutil.rmtree(tmp, ignore_errors=True)
                if other is None or {k: v for k, v in other.items() if k != "params"} != {
                    k: v for k, v in spec.items() if k != "params"
                }:
                    raise
        log(f"saved to {out} in {time.perf_counter() - t0:.1f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", type=Path, help="target directory (default: ~/.cache/gradsim/models/<shape>)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the init (default 0)")
    p.add_argument(
        "--meta",
        action="store_true",
        help="build on the meta device only: count parameters and print the memory formula, save nothing",
    )
    p.add_argument("--tokenizer", type=Path, help="a saved tokenizer directory (default: the embedded model's)")
    p.add_argument("--tokens", type=int, default=553, help="sample length for the activation estimate (--meta)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.meta:
        cfg, model = meta_model(args.shape)
        params = count_params(model)
        for line in memory_formula(args.shape, params, cfg, args.tokens):
            print(line)
        print(json.dumps({"shape": args.shape, "params": params, "architecture": SHAPES[args.shape][0]}))
        return 0
    out = build(args.shape, (args.out or default_out(args.shape)).expanduser().absolute(), args.seed, args.tokenizer)
    spec = read_spec(out) or {}
    print(f"params: {spec.get('params', 0):,}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
