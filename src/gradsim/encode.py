"""Encode a sample with the model's chat template; loss only on the assistant turn.

As in open-instruct's SFT encoding, every token up to and including the assistant header is
masked with -100, and the assistant's content plus its end-of-turn tokens are trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Sample
from .errors import GradsimError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    id: str
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, -100 where no loss is taken
    truncated: bool

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_trained(self) -> int:
        # The label at position 0 is never predicted (the loss is shifted by one).
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def encode(tokenizer, sample: Sample, max_length: int) -> Encoded:
    messages = sample.messages()
    prefix_text = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prefix_text):
        raise GradsimError(
            f"sample {sample.id}: the chat template renders the prompt differently with and without the answer; "
            "gradsim needs a template whose generation prompt is a prefix of the full conversation"
        )
    # Special tokens are already written out by the template: do not let the tokenizer add more.
    prefix_ids = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prefix_text):], add_special_tokens=False)["input_ids"]
    ids = prefix_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prefix_ids) + answer_ids
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    enc = Encoded(sample.id, torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), truncated)
    if enc.num_trained == 0:
        raise GradsimError(
            f"sample {sample.id}: no response token is left to train on ({len(prefix_ids)} prompt tokens, "
            f"max length {max_length}): raise --max-length or shorten the prompt"
        )
    return enc
