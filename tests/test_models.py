"""Models as researchers load them: tiny random-init Llama, Qwen3, Gemma 3 and OLMo 2 saved to disk with
the embedded tokenizer and their family's chat template, --revision / --trust-remote-code, the chat
template policy, templates that are not prefix-stable or print today's date, and bf16 weights."""

import hashlib
from datetime import datetime

import pytest
import torch
import transformers
from conftest import TINY_SIZES
from transformers import AutoTokenizer

from gradsim.config import Config
from gradsim.core.gradients import GradientComputer
from gradsim.core.model import TULU_TEMPLATE, check_dtype, embedded_model_dir, load_model
from gradsim.data.encode import IGNORE_INDEX, encode
from gradsim.data.load import Sample
from gradsim.errors import GradsimError

# The families' templates, reduced to what a single-turn conversation exercises (from the models' own
# tokenizer_config.json / chat_template.jinja); their special tokens are plain text to this tokenizer.
LLAMA3_TEMPLATE = (  # Llama 3.2: today's date unless date_string is given
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
    "    {%- else %}\n"
    '        {%- set date_string = "26 Jul 2024" %}\n'
    "    {%- endif %}\n"
    "{%- endif %}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
STRFTIME_TEMPLATE = (  # SmolLM3 / Mistral style: strftime_now called unconditionally
    '{%- set today = strftime_now("%d %B %Y") -%}'
    "{{ '<|im_start|>system\\nToday Date: ' + today + '<|im_end|>\\n' }}"
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    '    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and '
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}{%- set content = message.content %}{%- else %}"
    "{%- set content = '' %}{%- endif %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')"
    " + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}\n"
    "        {%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}\n"
    "{%- endif %}\n"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)
OLMO2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}{% else %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)
DEEPSEEK_R1_TEMPLATE = (  # the generation prompt opens a <think> block the rendered conversation lacks
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def expected_encoding(tok, masked: str, trained: str):
    """Independent construction: the two texts written out by hand, tokenized separately."""
    a = tok(masked, add_special_tokens=False)["input_ids"]
    b = tok(trained, add_special_tokens=False)["input_ids"]
    return a + b, [IGNORE_INDEX] * len(a) + b


def check_labels(enc, tok, masked: str, trained: str):
    ids, labels = expected_encoding(tok, masked, trained)
    assert enc.input_ids.tolist() == ids and enc.labels.tolist() == labels


@pytest.fixture(scope="module")
def tok_dir():
    return embedded_model_dir()[0]


@pytest.fixture
def tok(tok_dir):
    """A fresh copy of the embedded tokenizer (the session fixture's must not be changed)."""
    return AutoTokenizer.from_pretrained(tok_dir)


def tiny_config(family: str, vocab: int):
    common = dict(TINY_SIZES, vocab_size=vocab, max_position_embeddings=512, pad_token_id=2)
    if family == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=True, **common), transformers.LlamaForCausalLM
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=8, **common), transformers.Qwen3ForCausalLM
    if family == "gemma3":
        return (transformers.Gemma3TextConfig(head_dim=8, sliding_window=64, **common), transformers.Gemma3ForCausalLM)
    return transformers.Olmo2Config(**common), transformers.Olmo2ForCausalLM


def save_tiny(path, family: str, tok, template, scale: float = 1.0):
    torch.manual_seed(0)
    cfg, cls = tiny_config(family, len(tok))
    model = cls(cfg)
    if scale != 1.0:  # random init gives near-uniform logits and tiny gradients
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(scale)
    model.save_pretrained(path)
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


FAMILIES = {
    "llama": (LLAMA3_TEMPLATE, "LlamaForCausalLM"),
    "qwen3": (QWEN3_TEMPLATE, "Qwen3ForCausalLM"),
    "gemma3": (GEMMA3_TEMPLATE, "Gemma3ForCausalLM"),
    "olmo2": (OLMO2_TEMPLATE, "Olmo2ForCausalLM"),
}


def trained_text(family: str, response: str, tok) -> str:
    """What each family's template trains on: the answer as it renders it, and its end of turn."""
    return {
        "llama": response.strip() + "<|eot_id|>",
        "qwen3": response.lstrip("\n") + "<|im_end|>\n",
        "gemma3": response.strip() + "<end_of_turn>\n",
        "olmo2": response + tok.eos_token,
    }[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_encodes_and_differentiates(family, tok, tmp_path, samples):
    template, cls_name = FAMILIES[family]
    path = save_tiny(tmp_path / family, family, tok, template)
    lm = load_model(Config(model_name=str(path), device="cpu"))
    assert type(lm.model).__name__ == cls_name
    assert lm.revision.startswith("local-") and lm.context_length == 512
    assert lm.chat_template_sha256 == hashlib.sha256(template.encode()).hexdigest()
    s = samples[0]
    enc = encode(lm.tokenizer, s, 512)
    trained = trained_text(family, s.response, tok)
    full = lm.tokenizer.apply_chat_template(s.messages(), tokenize=False, date_string="26 Jul 2024")
    assert full.endswith(trained)
    check_labels(enc, lm.tokenizer, full[: -len(trained)], trained)
    g = GradientComputer(lm.model, lm.device).gradient(enc)
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0


def test_no_template_is_refused_unless_chosen(tok, tmp_path, samples):
    path = save_tiny(tmp_path / "m", "llama", tok, None)
    with pytest.raises(GradsimError, match="has no chat template.*--chat-template tulu"):
        load_model(Config(model_name=str(path), device="cpu"))
    lm = load_model(Config(model_name=str(path), device="cpu", chat_template="tulu"))
    assert lm.chat_template_sha256 == hashlib.sha256(TULU_TEMPLATE.encode()).hexdigest()
    s = samples[1]
    check_labels(
        encode(lm.tokenizer, s, 512),
        lm.tokenizer,
        f"<|user|>\n{s.prompt}\n<|assistant|>\n",
        s.response + tok.eos_token + "\n",
    )
    jinja = tmp_path / "olmo2.jinja"
    jinja.write_text(OLMO2_TEMPLATE)
    lm = load_model(Config(model_name=str(path), device="cpu", chat_template=str(jinja)))
    assert lm.chat_template_sha256 == hashlib.sha256(OLMO2_TEMPLATE.encode()).hexdigest()
    with pytest.raises(GradsimError, match="neither 'tulu' nor a readable Jinja file"):
        load_model(Config(model_name=str(path), device="cpu", chat_template=str(tmp_path / "missing.jinja")))


def test_revision_and_trust_remote_code_reach_from_pretrained(tok, tmp_path, monkeypatch):
    path = str(save_tiny(tmp_path / "m", "llama", tok, LLAMA3_TEMPLATE))
    seen = []

    def spy(cls):
        real = cls.from_pretrained

        def from_pretrained(source, **kwargs):
            seen.append((cls.__name__, source, kwargs))
            return real(path, **kwargs)  # the "hub id" is served from the local directory

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    spy(transformers.AutoTokenizer)
    spy(transformers.AutoModelForCausalLM)
    lm = load_model(Config(model_name="org/tiny", revision="v1.0", trust_remote_code=True, device="cpu"))
    assert [(n, s) for n, s, _ in seen] == [("AutoTokenizer", "org/tiny"), ("AutoModelForCausalLM", "org/tiny")]
    for _, _, kwargs in seen:
        assert kwargs["revision"] == "v1.0" and kwargs["trust_remote_code"] is True
    assert lm.revision == "v1.0"  # no hub commit to resolve here: the requested one is recorded
    seen.clear()
    load_model(Config(model_name="org/tiny", device="cpu"))  # the defaults: main, no remote code
    assert all(k["revision"] is None and k["trust_remote_code"] is False for _, _, k in seen)


def test_revision_refused_where_it_cannot_apply(tok, tmp_path):
    path = save_tiny(tmp_path / "m", "llama", tok, LLAMA3_TEMPLATE)
    with pytest.raises(GradsimError, match="local directory.*drop --revision"):
        load_model(Config(model_name=str(path), revision="v1.0", device="cpu"))
    with pytest.raises(GradsimError, match="needs a hub model"):
        Config(revision="v1.0").validate()


def test_cli_flags_reach_the_config(monkeypatch):
    from gradsim.cli.common import build_parser, config_from_args

    assert all(f in build_parser().format_help() for f in ("--revision", "--trust-remote-code", "--chat-template"))

    for var in ("MT_MODEL_NAME", "MT_DTYPE", "MT_DEVICE", "MT_SAMPLE_SIZE", "USE_GPU"):
        monkeypatch.delenv(var, raising=False)
    cfg = config_from_args(
        [
            "--model",
            "org/m",
            "--revision",
            "abc",
            "--trust-remote-code",
            "--chat-template",
            "tulu",
            "--dtype",
            "bfloat16-weights",
        ]
    )
    assert (cfg.revision, cfg.trust_remote_code, cfg.chat_template, cfg.dtype) == (
        "abc",
        True,
        "tulu",
        "bfloat16-weights",
    )
    cfg.validate()
    cfg = config_from_args([])
    assert (cfg.revision, cfg.trust_remote_code, cfg.chat_template) == (None, False, None)


def test_qwen3_template_trains_on_the_answer_only(tok):
    tok.chat_template = QWEN3_TEMPLATE
    s = Sample("q", "What is 2+2?", "It is 4.")
    head = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    enc = encode(tok, s, 512)
    # The empty <think> block the template adds to the last answer is masked with the header.
    check_labels(enc, tok, head + "<think>\n\n</think>\n\n", "It is 4.<|im_end|>\n")
    # The template strips the answer's leading newlines: the trained text is the answer as rendered.
    check_labels(
        encode(tok, Sample("q", s.prompt, "\n\nIt is 4."), 512),
        tok,
        head + "<think>\n\n</think>\n\n",
        "It is 4.<|im_end|>\n",
    )
    # An answer with its own reasoning makes the template rewrite it: refused, naming the way out.
    with pytest.raises(GradsimError, match="q:.*--chat-template tulu"):
        encode(tok, Sample("q", s.prompt, "<think>add</think>It is 4."), 512)


@pytest.mark.parametrize("family", [*FAMILIES, "tulu", "rewrites"])
def test_turns_all_trains_each_answer_or_refuses_a_template_that_rewrites_earlier_turns(family, tok):
    from gradsim.data.load import _parse_row

    # Qwen3's renders an answer differently once another turn follows (its empty <think> block), as does this.
    rewrites = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(earlier) {% endif %}{{ m.content }}<|im_end|>\n"
        "{% endfor %}"
    )
    templates = {f: t for f, (t, _) in FAMILIES.items()} | {"tulu": TULU_TEMPLATE, "rewrites": rewrites}
    tok.chat_template = templates[family]
    s = _parse_row({"id": "m", "conversations": ["What is 2+2?", "It is 4.", "And 3+3?", "Six."]}, "test", 0)
    refused = {
        "qwen3": "the chat template renders the conversation up to assistant turn 1 differently",
        "rewrites": "the chat template renders the conversation up to assistant turn 1 differently",
        # This tokenizer (not Llama 3's own) reads the header's "\n\n" as one token alone, but as two
        # ("\n", "\n") when the answer's first word follows it.
        "llama": "the tokenizer merges tokens across the start of assistant turn 1",
    }
    if family in refused:
        with pytest.raises(GradsimError, match=f"^sample m: {refused[family]}") as e:
            encode(tok, s, 512, "response", "all")
        assert "\n" not in str(e.value)
        return
    enc = encode(tok, s, 512, "response", "all")
    runs, cur = [], []
    for t, lab in zip(enc.input_ids.tolist(), enc.labels.tolist()):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs, cur = runs + [tok.decode(cur)], []
    runs += [tok.decode(cur)] if cur else []
    if family == "tulu":
        assert runs == [f"It is 4.{tok.eos_token}\n", f"Six.{tok.eos_token}\n"]
    else:
        assert runs == [trained_text(family, "It is 4.", tok), trained_text(family, "Six.", tok)]


def test_non_prefix_template_is_handled(tok):
    tok.chat_template = DEEPSEEK_R1_TEMPLATE
    s = Sample("d", "Name a prime.", "Seven.")
    prompt = tok.apply_chat_template(s.messages()[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(s.messages(), tokenize=False)
    assert not full.startswith(prompt)  # what encode refused before
    check_labels(
        encode(tok, s, 512),
        tok,
        f"{tok.bos_token}<｜User｜>Name a prime.<｜Assistant｜>",
        "Seven.<｜end▁of▁sentence｜>",
    )


def test_reordering_templates_are_refused(tok):
    s = Sample("r", "Name a prime.", "Seven.")
    # The answer rendered before the prompt: the "end of turn" would be the prompt itself.
    tok.chat_template = (
        "{% for m in messages|reverse %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
        "+ '<|im_end|>\\n' }}{% endfor %}"
    )
    with pytest.raises(GradsimError, match="r:.*--chat-template tulu or --chat-template PATH"):
        encode(tok, s, 512)
    # The answer's length written into its header.
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + (m['content']|length|string) "
        "+ '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    with pytest.raises(GradsimError, match="--chat-template tulu"):
        encode(tok, s, 512)


class _Clock:
    def __init__(self, when: datetime):
        self.when = when

    def now(self, tz=None):
        return self.when


@pytest.mark.parametrize(
    "template,shown", [(LLAMA3_TEMPLATE, "Today Date: 26 Jul 2024"), (STRFTIME_TEMPLATE, "Today Date: 26 July 2024")]
)
def test_dated_templates_render_the_same_every_day(template, shown, tok, monkeypatch):
    from transformers.utils import chat_template_utils

    tok.chat_template = template
    s = Sample("t", "Hello?", "Hi.")
    runs, raw = [], []
    for day in (datetime(2025, 1, 3), datetime(2031, 12, 30)):
        monkeypatch.setattr(chat_template_utils, "datetime", _Clock(day))
        raw.append(tok.apply_chat_template(s.messages(), tokenize=False))
        runs.append(encode(tok, s, 512))
    if template is STRFTIME_TEMPLATE:
        assert raw[0] != raw[1]  # the patched clock does reach the template
    assert torch.equal(runs[0].input_ids, runs[1].input_ids) and torch.equal(runs[0].labels, runs[1].labels)
    assert shown in tok.decode(runs[0].input_ids)


def test_bfloat16_weights_gradient_close_to_fp32(tok, tmp_path, samples):
    path = save_tiny(tmp_path / "m", "llama", tok, LLAMA3_TEMPLATE, scale=8.0)
    lm32 = load_model(Config(model_name=str(path), device="cpu"))
    lm16 = load_model(Config(model_name=str(path), device="cpu", dtype="bfloat16-weights"))
    assert {p.dtype for p in lm16.model.parameters()} == {torch.bfloat16}
    # RoPE's frequencies stay fp32: only the weights are stored in bf16.
    assert all(b.dtype == torch.float32 for n, b in lm16.model.named_buffers() if "inv_freq" in n)
    for s in samples[:2]:
        enc = encode(lm32.tokenizer, s, 256)
        g32 = GradientComputer(lm32.model, lm32.device, "float32").gradient(enc).clone()
        gc16 = GradientComputer(lm16.model, lm16.device, "bfloat16-weights")
        g16 = gc16.gradient(enc)
        assert gc16.buffer.dtype == torch.bfloat16
        cos = torch.nn.functional.cosine_similarity(g32.double(), g16.double(), dim=0).item()
        assert 0.99 < cos < 1.0 + 1e-9, f"{s.id}: cosine {cos}"
        assert not torch.equal(g32, g16.float())  # the bf16 run did run in bf16


def test_bfloat16_refused_where_the_device_cannot_run_it(monkeypatch):
    from contextlib import nullcontext

    check_dtype("bfloat16", torch.device("cpu"))  # torch runs bf16 on CPUs
    check_dtype("float32", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device", lambda d: nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    for dtype in ("bfloat16", "bfloat16-weights"):
        with pytest.raises(GradsimError, match=f"--dtype {dtype} needs bf16 support, which Tesla T4 lacks.*float32"):
            check_dtype(dtype, torch.device("cuda"))
