import pytest

from gradsim.data import Sample
from gradsim.encode import IGNORE_INDEX, encode
from gradsim.errors import GradsimError


def test_loss_only_on_the_assistant_turn(embedded, samples):
    tok, s = embedded.tokenizer, samples[0]
    enc = encode(tok, s, 4096)
    labels = enc.labels.tolist()
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in labels[:first]) and all(t != IGNORE_INDEX for t in labels[first:])
    prompt_text = tok.decode(enc.input_ids[:first])
    assert prompt_text.endswith("<|im_start|>assistant\n") and s.prompt in prompt_text
    trained = tok.decode(enc.input_ids[first:])
    assert trained == s.response + "<|im_end|>\n"  # the response and its end-of-turn, nothing of the prompt


def test_matches_the_chat_template_tokenization(embedded, samples):
    tok = embedded.tokenizer
    for s in samples[:5]:
        enc = encode(tok, s, 4096)
        full = tok(tok.apply_chat_template(s.messages(), tokenize=False), add_special_tokens=False)["input_ids"]
        assert enc.input_ids.tolist() == full


def test_truncation_is_flagged(embedded, samples):
    enc = encode(embedded.tokenizer, samples[0], 4096)
    short = encode(embedded.tokenizer, samples[0], enc.num_tokens - 5)
    assert short.truncated and not enc.truncated
    assert short.num_tokens == enc.num_tokens - 5
    assert short.input_ids.tolist() == enc.input_ids[:-5].tolist()


def test_no_trainable_token_names_the_sample(embedded):
    s = Sample("lima_99", "word " * 200, "An answer.")
    with pytest.raises(GradsimError, match="lima_99"):
        encode(embedded.tokenizer, s, 50)
