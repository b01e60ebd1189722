"""Encode a sample with the model's chat template, and choose which tokens the loss is taken on.

The conversation's rendering is split in two at the start of the answer: the prompt (everything up to
and including the assistant header) and the response (the assistant's content plus its end-of-turn
tokens). ``--loss-on`` picks the tokens whose next-token loss is averaged:
- ``response`` (the study's, as in open-instruct's SFT encoding): the prompt is masked with -100;
- ``prompt``: every prompt token after the first (the first is never predicted), the assistant header
  included, so that prompt and response partition the predicted tokens of the conversation. Causal
  attention means these losses never see the response, so the sequence is the prompt alone;
- ``all``: both. Its gradient is the token-weighted mean of the other two,
  (n_prompt g_prompt + n_response g_response) / (n_prompt + n_response), which ``combine_targets``
  uses to get all three targets from two backward passes.

The boundary is found in the rendering of the whole conversation, not from the generation prompt:
templates such as Qwen3's (an empty <think> block before the last answer) or DeepSeek-R1's (a
generation prompt the conversation does not contain) render the prompt differently with and
without the answer. Anything such a template inserts before the answer is masked like the header.

``--turns all`` (a row's whole conversation; ``loss_on`` response only) trains every assistant turn
as open-instruct's SFT encoding does: each assistant message's content and its end-of-turn tokens,
everything else (user turns, headers) masked. The conversation is tokenized whole; each assistant turn
is located by rendering the conversation up to it (split as above) and tokenizing that prefix, which
must be a prefix of the whole conversation's text and tokens. A template that renders earlier turns
differently once later ones follow (Qwen3 drops earlier reasoning), or a tokenizer that merges tokens
across a turn's boundary, breaks that and is refused. A sample of one exchange is encoded as with
``--turns first``. Truncation is the same: the tokens past max_length are cut, labels with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

import torch

from gradsim.config import LOSS_TARGETS, TURNS
from gradsim.data.load import Sample
from gradsim.errors import GradsimError

IGNORE_INDEX = -100

# Templates that print today's date (Llama 3.x, SmolLM3, Mistral) would give other tokens, and so other
# gradients, on another day. They render this fixed date instead: Llama 3.1's own default.
TEMPLATE_DATE = date(2024, 7, 26)
DATE_STRING = TEMPLATE_DATE.strftime("%d %b %Y")  # "26 Jul 2024", what Llama 3.x templates take as date_string
# apply_chat_template turns callables passed as variables into plain strings, so strftime_now (a Jinja
# global of transformers) is shadowed by a macro defined in front of the template; it formats the fixed
# date with each literal format the template uses. The trailing newline is eaten by trim_blocks, so the
# template itself renders exactly as before.
_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(["'])(.*?)\1\s*\)""")
_FIXED_CLOCK = (
    "{%- macro strftime_now(format) -%}"
    "{%- if format in gradsim_fixed_dates -%}{{ gradsim_fixed_dates[format] }}"
    "{%- else -%}{{ raise_exception('gradsim fixes the date of strftime_now only for literal formats') }}"
    "{%- endif -%}{%- endmacro %}\n"
)
# Stands in for the answer to find where the template puts it: letters and digits only, so that no
# template rule about whitespace or <think> tags touches it.
PLACEHOLDER = "GradsimAnswerPlaceholder7c1e9"
PROMPT_PLACEHOLDER = "GradsimPromptPlaceholder3b8d2"


@dataclass
class Encoded:
    id: str
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, -100 where no loss is taken
    truncated: bool
    # tokens of the prompt (up to and including the assistant header) in input_ids; with --turns all, the
    # tokens before the first assistant turn's answer
    prompt_tokens: int = 0
    loss_on: str = "response"

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_trained(self) -> int:
        # The label at position 0 is never predicted (the loss is shifted by one).
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def render(tokenizer, messages: list[dict[str, str]], **kwargs) -> str:
    """The tokenizer's chat template applied to messages, with the date fixed to TEMPLATE_DATE."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: apply_chat_template's own choice when given no name
        template = template.get("default")
    if not isinstance(template, str):
        raise GradsimError("the tokenizer has no chat template: choose one with --chat-template tulu or a file path")
    dates = {}
    if "strftime_now" in template:
        dates = {m.group(2): TEMPLATE_DATE.strftime(m.group(2)) for m in _STRFTIME_CALL.finditer(template)}
        template = _FIXED_CLOCK + template
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, date_string=DATE_STRING, gradsim_fixed_dates=dates, **kwargs
    )


def split_conversation(tokenizer, sample: Sample, messages: list[dict[str, str]] | None = None) -> tuple[str, str]:
    """(masked text, trained text) whose concatenation is the rendering of the whole conversation
    (``messages``, ending with an assistant turn; default: the sample's first exchange).

    The trained text is the last answer as the template renders it (e.g. trimmed) and what follows it:
    the end-of-turn tokens. The template is rendered once more with a placeholder for the answer; the
    answer is located only if everything around the placeholder is rendered identically with the real
    answer."""
    from jinja2 import TemplateError

    messages = sample.messages() if messages is None else messages
    marked = messages[:-1] + [{**messages[-1], "content": PLACEHOLDER}]
    # A template that reorders turns could put the prompt after the answer, where it would be trained on.
    order = [{**m, "content": PROMPT_PLACEHOLDER} for m in messages[:-1]] + marked[-1:]
    try:
        full, with_placeholder, ordered = (render(tokenizer, m) for m in (messages, marked, order))
    except TemplateError as e:
        raise GradsimError(
            f"sample {sample.id}: the chat template failed to render it ({str(e)[:200]!r}): "
            "choose another with --chat-template tulu or --chat-template PATH"
        ) from None
    if with_placeholder.count(PLACEHOLDER) == 1 and ordered.rfind(PROMPT_PLACEHOLDER) < ordered.find(PLACEHOLDER):
        before, after = with_placeholder.split(PLACEHOLDER)
        if len(full) >= len(before) + len(after) and full.startswith(before) and full.endswith(after):
            return before, full[len(before) :]
    raise GradsimError(
        f"sample {sample.id}: the chat template changes the conversation around the answer depending on its "
        "content, so the trained tokens cannot be located: choose --chat-template tulu or --chat-template PATH"
    )


def assistant_spans(tokenizer, sample: Sample) -> tuple[list[int], list[tuple[int, int]]]:
    """The tokens of the sample's whole conversation, and the [start, end) token span of each assistant
    turn's trained tokens (its answer and end-of-turn tokens), found from the renderings of the
    conversation up to each assistant turn (module docstring)."""
    messages = sample.messages("all")
    full = render(tokenizer, messages)
    # Special tokens are already written out by the template: do not let the tokenizer add more.
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]

    def tokens_before(text: str, turn: int, where: str) -> int:
        head = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids[: len(head)] != head:
            raise GradsimError(
                f"sample {sample.id}: the tokenizer merges tokens across the {where} of assistant turn {turn} "
                "(the tokens of the text before it are not a prefix of the conversation's), so --turns all "
                "cannot mask the turns apart: use --turns first or another --chat-template"
            )
        return len(head)

    spans = []
    for k in range(1, len(messages), 2):  # the assistant turns (data.py checked the roles alternate)
        turn = len(spans) + 1
        before, answer = split_conversation(tokenizer, sample, messages[: k + 1])
        if not full.startswith(before + answer):
            raise GradsimError(
                f"sample {sample.id}: the chat template renders the conversation up to assistant turn {turn} "
                "differently once later turns follow, so --turns all cannot locate each assistant turn: use "
                "--turns first or another --chat-template"
            )
        spans.append((tokens_before(before, turn, "start"), tokens_before(before + answer, turn, "end")))
    return ids, spans


class OverlongError(GradsimError):
    """A sample cut at the max length with no trained token left (--skip-overlong leaves such rows out)."""


def encode(tokenizer, sample: Sample, max_length: int, loss_on: str = "response", turns: str = "first") -> Encoded:
    """The sample's tokens and labels for the loss target ``loss_on`` and the turns ``turns`` (module
    docstring), cut to max_length."""
    if loss_on not in LOSS_TARGETS:
        raise GradsimError(f"unknown --loss-on {loss_on!r}: choose one of {', '.join(LOSS_TARGETS)}")
    if turns not in TURNS:
        raise GradsimError(f"unknown --turns {turns!r}: choose one of {', '.join(TURNS)}")
    if turns == "all" and loss_on != "response":
        raise GradsimError(f"--turns all trains every assistant turn: use it with --loss-on response, not {loss_on}")
    if turns == "all" and sample.used_rest:
        ids, spans = assistant_spans(tokenizer, sample)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        n_prompt = spans[0][0]
    else:
        prefix_text, answer_text = split_conversation(tokenizer, sample)
        # Special tokens are already written out by the template: do not let the tokenizer add more.
        prefix_ids = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
        answer_ids = [] if loss_on == "prompt" else tokenizer(answer_text, add_special_tokens=False)["input_ids"]
        ids = prefix_ids + answer_ids
        labels = (prefix_ids if loss_on != "response" else [IGNORE_INDEX] * len(prefix_ids)) + answer_ids
        n_prompt = len(prefix_ids)
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    enc = Encoded(
        sample.id,
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        truncated,
        min(n_prompt, max_length),
        loss_on,
    )
    if enc.num_trained == 0:
        what = "prompt" if loss_on == "prompt" else "response"
        skip = " (--skip-overlong leaves such rows out and counts them)" if truncated else ""
        raise (OverlongError if truncated else GradsimError)(
            f"sample {sample.id}: no {what} token is left to train on with --loss-on {loss_on} "
            f"({n_prompt} prompt tokens, max length {max_length}): raise --max-length, shorten the prompt "
            f"or choose another --loss-on{skip}"
        )
    return enc


def combine_targets(g_prompt: torch.Tensor, n_prompt: int, g_response: torch.Tensor, n_response: int, out=None):
    """The gradient of the loss on all tokens from those on the prompt and on the response (same sample):
    the token-weighted mean, exact because each loss is a mean over its own tokens."""
    n = n_prompt + n_response
    out = torch.empty_like(g_prompt) if out is None else out
    torch.mul(g_prompt, n_prompt / n, out=out)
    return out.add_(g_response, alpha=n_response / n)
