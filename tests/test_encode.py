import pytest

from gradsim.data.encode import IGNORE_INDEX, encode
from gradsim.data.load import Sample
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


TWO_EXCHANGES = ["What is 2+2?", "It is 4.", "And 3+3?", "That is 6, twice 3."]


def two_exchanges():
    from gradsim.data.load import _parse_row

    return _parse_row({"id": "mt", "conversations": TWO_EXCHANGES}, "test", 0)


def labelled_runs(tok, enc):
    """The texts of each maximal run of labelled tokens: computed here from the labels alone."""
    runs, cur = [], []
    for t, lab in zip(enc.input_ids.tolist(), enc.labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == t  # a trained label is the token itself (the model shifts it)
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_turns_all_trains_every_assistant_turn_and_nothing_else(embedded):
    tok, s = embedded.tokenizer, two_exchanges()
    enc = encode(tok, s, 4096, "response", "all")
    # The tokens are the chat template's rendering of the whole conversation, tokenized whole.
    conversation = [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, TWO_EXCHANGES)]
    whole = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    assert enc.input_ids.tolist() == whole
    assert labelled_runs(tok, enc) == ["It is 4.<|im_end|>\n", "That is 6, twice 3.<|im_end|>\n"]
    masked = tok.decode([t for t, lab in zip(enc.input_ids.tolist(), enc.labels.tolist()) if lab == IGNORE_INDEX])
    assert "What is 2+2?" in masked and "And 3+3?" in masked and masked.count("<|im_start|>assistant\n") == 2
    assert tok.decode(enc.input_ids[: enc.prompt_tokens]).endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_turns_first_on_a_multi_turn_row_is_the_first_exchange(embedded):
    tok, s = embedded.tokenizer, two_exchanges()
    single = encode(tok, Sample("mt", "What is 2+2?", "It is 4."), 4096)
    for enc in (encode(tok, s, 4096), encode(tok, s, 4096, "response", "first")):
        assert enc.input_ids.tolist() == single.input_ids.tolist() and enc.labels.tolist() == single.labels.tolist()
    # One exchange: --turns all is --turns first.
    one = encode(tok, Sample("mt", "What is 2+2?", "It is 4."), 4096, "response", "all")
    assert one.labels.tolist() == single.labels.tolist() and one.input_ids.tolist() == single.input_ids.tolist()


def test_turns_all_truncation_cuts_tokens_and_labels_together(embedded):
    tok, s = embedded.tokenizer, two_exchanges()
    full = encode(tok, s, 4096, "response", "all")
    short = encode(tok, s, full.num_tokens - 4, "response", "all")
    assert short.truncated and not full.truncated
    assert short.input_ids.tolist() == full.input_ids[:-4].tolist()
    assert short.labels.tolist() == full.labels[:-4].tolist()
    with pytest.raises(GradsimError, match="sample mt: no response token is left"):
        encode(tok, s, full.prompt_tokens, "response", "all")


def test_turns_all_refuses_other_loss_targets(embedded):
    with pytest.raises(GradsimError, match="^--turns all trains every assistant turn: use it with --loss-on response"):
        encode(embedded.tokenizer, two_exchanges(), 4096, "prompt", "all")


def test_turns_all_gradient_is_autograd_of_the_mean_loss_over_the_assistant_turns(tiny):
    import torch

    from gradsim.core.gradients import GradientComputer

    enc = encode(tiny.tokenizer, two_exchanges(), 256, "response", "all")
    gc = GradientComputer(tiny.model, tiny.device)
    flat = gc.gradient(enc).clone()
    logits = tiny.model(input_ids=enc.input_ids[None], use_cache=False).logits[0]
    trained = enc.labels[1:] != IGNORE_INDEX
    assert int(trained.sum()) == enc.num_trained > 0
    loss = torch.nn.functional.cross_entropy(logits[:-1][trained], enc.labels[1:][trained])  # mean over them
    named = dict(tiny.model.named_parameters())
    ref = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    assert set(ref) == set(gc.layout.names)
    for name, lo, hi in gc.layout.slices():
        r = ref[name].reshape(-1)
        assert (flat[lo:hi] - r).abs().max() <= 1e-5 * r.abs().max() + 1e-12, name
