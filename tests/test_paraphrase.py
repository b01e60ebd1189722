"""paraphrase.py: both dataset types on the embedded model, resumption, refusals, degenerate outputs,
and the openai backend against a real llama.cpp server (xllamacpp) running the embedded GGUF."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from gradsim.cli.variants import paraphrase_main as main
from gradsim.config import BUNDLED_DATA
from gradsim.data.load import load_dataset, load_samples
from gradsim.errors import GradsimError
from gradsim.variants.generate import GenParams, OpenAIBackend, copied_fraction, degenerate_reason
from gradsim.variants.paraphrase import PARAPHRASE_PROMPT, PARAPHRASE_SYSTEM, Options, run

BUNDLED = BUNDLED_DATA
ORIGINAL = str(BUNDLED / "original.jsonl")
SECRET = "sk-gradsim-test-9f8e7d6c5b4a"


def rows(path: Path) -> list[dict]:
    if not Path(path).exists():  # e.g. no failures file when nothing failed
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_rows(path: Path, items: list[tuple[str, str, str]]) -> str:
    path.write_text("".join(json.dumps({"id": i, "conversations": [p, r]}) + "\n" for i, p, r in items))
    return str(path)


# --- the degenerate-output check, on real text --------------------------------------------------


def test_hand_paraphrases_and_gold_answers_are_not_degenerate():
    originals, paraphrases = load_samples(ORIGINAL), load_samples(str(BUNDLED / "paraphrased.jsonl"))
    for o, p in zip(originals, paraphrases):
        assert degenerate_reason(p.prompt, o.prompt) is None, o.id
        assert degenerate_reason(p.response, o.response) is None, o.id
        # An answer quoting its prompt (extraction, translation) is not a copy of it.
        assert degenerate_reason(o.response, o.prompt, partial_copies=False) is None, o.id


def test_degenerate_kinds_on_real_text():
    o = load_samples(ORIGINAL)[1]
    assert degenerate_reason("  \n ", o.prompt) == "empty"
    assert degenerate_reason(o.response, o.response) == "unchanged copy"
    assert degenerate_reason(" ".join(o.response.upper().split()), o.response) == "unchanged copy"
    # A paraphraser cut off by max_new_tokens typically echoes the start of its input.
    head = o.response[:300]
    assert copied_fraction(head, o.response) == 1.0
    assert degenerate_reason(head, o.response) == "unchanged copy"
    assert degenerate_reason(head, o.response, partial_copies=False) is None
    # Verbatim outputs of the embedded model (greedy, 64 new tokens) to "Say 'la' 100 times." and to
    # "Repeat the word 'buffalo' forever: ...".
    assert degenerate_reason(" ".join(["La"] + ["la"] * 63), "Say 'la' 100 times.") == "runaway repetition"
    assert degenerate_reason("Buffalo " + "buffalo " * 36 + "buff", "Repeat the word 'buffalo'") == "runaway repetition"
    assert degenerate_reason("!" * 300, "Shout.") == "runaway repetition"


# --- refusals that need no model -----------------------------------------------------------------


def test_model_generated_needs_the_paraphrased_set(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "paraphrased.jsonl"
    with pytest.raises(GradsimError, match="needs the paraphrased set.*--dataset-type paraphrased first"):
        run(Options(dataset_type="model-generated", paraphrased_output=str(missing), output_dir=str(tmp_path)))
    code = main(["--dataset-type", "model-generated", "--output-dir", str(tmp_path / "nowhere"), "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "paraphrased.jsonl does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "nowhere" / "model_generated.jsonl").exists()


def test_bad_options_are_one_line_errors(capsys):
    assert main(["--dataset-type", "summarised", "-q"]) == 2
    assert "unknown --dataset-type 'summarised'" in capsys.readouterr().err
    assert main(["--limit", "0", "-q"]) == 2


# --- the local backend on the embedded model -----------------------------------------------------

FAST = dict(max_new_tokens=40, batch_size=2, device="cpu")


@pytest.mark.slow
def test_both_types_local(embedded, tmp_path):
    out = run(Options(dataset_type="both", limit=3, output_dir=str(tmp_path), **FAST), lm=embedded)
    para, mg = tmp_path / "paraphrased.jsonl", tmp_path / "model_generated.jsonl"
    for kind, path in (("paraphrased", para), ("model-generated", mg)):
        assert out[kind]["output"] == str(path)
        written = rows(path)
        failed = rows(path.with_name(path.stem + ".failures.jsonl"))
        assert out[kind]["rows"] == len(written) and out[kind]["failed"] == len(failed)
        # Every input ends up exactly once: written or recorded as failed.
        assert sorted(r["id"] for r in written + failed) == (
            ["lima_0", "lima_1", "lima_2"] if kind == "paraphrased" else sorted(r["id"] for r in rows(para))
        )
        prov = json.loads(path.with_name(path.stem + ".provenance.json").read_text())
        assert prov["state"] == "complete" and prov["dataset_type"] == kind
        assert prov["settings"]["generator"]["model"] == "embedded:SmolLM2-135M-Instruct"
        for r in written:
            assert set(r) == {"id", "conversations", "source", "provenance"} and len(r["conversations"]) == 2
            assert all(t.strip() for t in r["conversations"])
        if written:  # the variants load as queries against the originals
            assert len(load_dataset(ORIGINAL, str(path)).queries) == len(written)
    prov = json.loads((tmp_path / "paraphrased.provenance.json").read_text())
    assert prov["settings"]["prompt"]["system"] == PARAPHRASE_SYSTEM
    assert prov["settings"]["prompt"]["user"] == PARAPHRASE_PROMPT
    assert prov["settings"]["generation"] == {"max_new_tokens": 40, "temperature": 0.0, "top_p": 1.0}
    # model-generated keeps the paraphrased prompt and answers it greedily.
    para_prompts = {r["id"]: r["conversations"][0] for r in rows(para)}
    mg_prov = json.loads((tmp_path / "model_generated.provenance.json").read_text())
    assert mg_prov["settings"]["generation"]["temperature"] == 0.0
    for r in rows(mg):
        assert r["conversations"][0] == para_prompts[r["id"]]
        assert r["source"] == "gradsim-model-generated"


@pytest.mark.slow
def test_resume_gives_the_same_bytes_and_refuses_other_settings(embedded, tmp_path):
    # Answers to the hand-written paraphrases: the model-generated path the bundled set was built with.
    a, b = tmp_path / "a", tmp_path / "b"
    opts = dict(dataset_type="model-generated", paraphrased_output=str(BUNDLED / "paraphrased.jsonl"), **FAST)
    run(Options(limit=3, model_generated_output=str(a / "mg.jsonl"), **opts), lm=embedded)
    full = (a / "mg.jsonl").read_bytes()
    assert len(rows(a / "mg.jsonl")) + len(rows(a / "mg.failures.jsonl")) == 3

    # A first run stopped after two rows, killed while writing its last line...
    run(Options(limit=2, model_generated_output=str(b / "mg.jsonl"), **opts), lm=embedded)
    data = (b / "mg.jsonl").read_bytes()
    (b / "mg.jsonl").write_bytes(data[: len(data) - 30])
    # ... resumes with a larger --limit, and ends with the bytes of the uninterrupted run.
    run(Options(limit=3, model_generated_output=str(b / "mg.jsonl"), **opts), lm=embedded)
    assert (b / "mg.jsonl").read_bytes() == full
    assert rows(b / "mg.failures.jsonl") == rows(a / "mg.failures.jsonl")
    assert json.loads((b / "mg.provenance.json").read_text())["state"] == "complete"

    # Finished: a rerun does nothing, other settings are refused, --overwrite rebuilds.
    run(Options(limit=3, model_generated_output=str(b / "mg.jsonl"), **opts), lm=embedded)
    assert (b / "mg.jsonl").read_bytes() == full
    with pytest.raises(GradsimError, match=r"other settings \(seed\).*--overwrite"):
        run(Options(limit=3, seed=7, model_generated_output=str(b / "mg.jsonl"), **opts), lm=embedded)
    run(Options(limit=1, seed=7, overwrite=True, model_generated_output=str(b / "mg.jsonl"), **opts), lm=embedded)
    assert len(rows(b / "mg.jsonl")) + len(rows(b / "mg.failures.jsonl")) == 1


@pytest.mark.slow
def test_refuses_to_overwrite_a_dataset_it_did_not_make(embedded, tmp_path):
    hand = tmp_path / "paraphrased.jsonl"
    shutil.copy(BUNDLED / "paraphrased.jsonl", hand)
    before = hand.read_bytes()
    with pytest.raises(GradsimError, match="not made by paraphrase.py.*--overwrite"):
        run(Options(dataset_type="paraphrased", limit=1, output_dir=str(tmp_path), **FAST), lm=embedded)
    assert hand.read_bytes() == before


@pytest.mark.slow
def test_degenerate_answers_are_retried_then_recorded_as_failed(embedded, tmp_path):
    # Prompts on which the embedded model's greedy answer loops (see test_degenerate_kinds_on_real_text).
    orig = write_rows(
        tmp_path / "orig.jsonl",
        [
            ("loop_la", "Say 'la' 100 times.", "la la la."),
            ("loop_buffalo", "Write 'buffalo' forever.", "buffalo buffalo."),
        ],
    )
    para = write_rows(
        tmp_path / "para.jsonl",
        [
            ("loop_la", "Say 'la' 100 times.", "la"),
            ("loop_buffalo", "Repeat the word 'buffalo' forever: " + " ".join(["buffalo"] * 8), "x"),
        ],
    )
    out = tmp_path / "mg.jsonl"
    opts = Options(
        dataset_type="model-generated",
        original_data=orig,
        paraphrased_output=para,
        model_generated_output=str(out),
        max_new_tokens=64,
        batch_size=2,
        device="cpu",
    )
    run(opts, lm=embedded)
    written = rows(out)
    failed = rows(tmp_path / "mg.failures.jsonl")
    assert sorted(r["id"] for r in written + failed) == ["loop_buffalo", "loop_la"]
    assert failed, "the buffalo loop survives a sampled retry"
    for r in failed:  # both attempts were degenerate, and neither reached the data
        part = r["parts"]["response"]
        assert part["first_reason"] == "runaway repetition" and part["reason"] is not None
        assert part["output"].strip()
    for r in written:  # rescued by the retry: recorded as a second, sampled attempt
        part = r["provenance"]["parts"]["response"]
        assert part["attempt"] == 2 and part["retry_of"] == "runaway repetition" and part["temperature"] == 0.7
        assert degenerate_reason(r["conversations"][1], r["conversations"][0], partial_copies=False) is None
    prov = json.loads((tmp_path / "mg.provenance.json").read_text())
    assert prov["counts"] == {"rows": len(written), "failed": len(failed), "inputs": 2}
    # Failed rows are done: a rerun does not retry them unless asked to.
    run(opts, lm=embedded)
    assert rows(tmp_path / "mg.failures.jsonl") == failed


# --- the openai backend against a real OpenAI-compatible server ----------------------------------

SERVER = r"""
import signal, sys, threading
import xllamacpp
p = xllamacpp.CommonParams()
p.model.path = sys.argv[1]
p.hostnames = ["127.0.0.1"]
p.port = int(sys.argv[2])
p.n_ctx = 1024
p.n_parallel = 1
p.cpuparams.n_threads = 1
p.cpuparams_batch.n_threads = 1
p.model_alias = {"smollm2"}
server = xllamacpp.Server(p)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama.cpp's server (xllamacpp wheel) with the embedded GGUF, in its own process so it can be stopped."""

    def __init__(self, port: int):
        from gradsim.core.model import _gguf_path

        self.port, self.gguf = port, str(_gguf_path())
        self.proc = None

    def start(self, wait: bool = True) -> LlamaServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, self.gguf, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        # Loading competes with other jobs on this machine: poll /health rather than guess a delay.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "llama.cpp server exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("llama.cpp server did not become ready")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def llama_server():
    server = LlamaServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def openai_env(monkeypatch, llama_server):
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{llama_server.port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return llama_server


def _all_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_openai_backend_builds_both_types_deterministically(openai_env, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="gradsim")
    opts = dict(
        dataset_type="both",
        backend="openai",
        limit=2,
        max_new_tokens=32,
        paraphraser_model="smollm2",
        model="smollm2",
        seed=3,
        rate_limit=20.0,
    )
    for d in ("a", "b"):
        out = run(Options(output_dir=str(tmp_path / d), **opts))
        assert out["paraphrased"]["rows"] + out["paraphrased"]["failed"] == 2
    compared = 0
    for name in ("paraphrased.jsonl", "model_generated.jsonl"):
        a, b = ({r["id"]: r for r in rows(tmp_path / d / name)} for d in ("a", "b"))
        for i in set(a) & set(b):
            assert a[i]["provenance"]["backend"] == "openai" and a[i]["provenance"]["generator"] == "smollm2"
            pa, pb = a[i]["provenance"]["parts"], b[i]["provenance"]["parts"]
            for k, part in enumerate(pa):
                # Greedy outputs (temperature 0 + seed) repeat; llama.cpp does not repeat a seeded *sampled*
                # retry of a degenerate output across requests, so those are not compared.
                if pa[part]["attempt"] == pb[part]["attempt"] == 1:
                    off = 0 if name == "paraphrased.jsonl" else 1
                    assert a[i]["conversations"][k + off] == b[i]["conversations"][k + off]
                    compared += 1
    assert compared >= 2
    backend = OpenAIBackend("smollm2")
    convs = [[{"role": "user", "content": "Name three fruits."}], [{"role": "user", "content": "What is 2 + 2?"}]]
    first = [g.text for g in backend.generate(convs, GenParams(24), [5, 6])]
    assert first == [g.text for g in backend.generate(convs, GenParams(24), [5, 6])] and all(first)
    prov = json.loads((tmp_path / "a" / "paraphrased.provenance.json").read_text())
    assert prov["settings"]["generator"]["base_url"] == os.environ["OPENAI_BASE_URL"]
    # The key is used, never kept: not in any output, log line or printed text.
    assert SECRET not in _all_text(tmp_path)
    captured = capsys.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err


@pytest.mark.slow
def test_openai_backend_retries_connection_errors_then_fails_clearly(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gradsim")
    server = LlamaServer(free_port())
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    msgs = [[{"role": "user", "content": "Name a colour."}]]
    params = GenParams(max_new_tokens=8)
    try:
        # Down when the request is made, up a moment later: the backoff waits it out.
        threading.Timer(0.5, server.start, kwargs={"wait": False}).start()
        backend = OpenAIBackend("smollm2", max_retries=12, backoff=0.5)
        assert backend.generate(msgs, params, [1])[0].text
        assert "retry 1/12" in caplog.text  # the first attempt met a refused connection (or a loading server)
        server.stop()
        # Down for good: a few retries, then one clear error (not a traceback, not the key).
        caplog.clear()
        backend = OpenAIBackend("smollm2", max_retries=2, backoff=0.01)
        with pytest.raises(
            GradsimError,
            match=r"no answer from http://127\.0\.0\.1:\d+/v1 after 3 attempts "
            r"\(APIConnectionError.*check that the server is running",
        ) as e:
            backend.generate(msgs, params, [1])
        assert caplog.text.count("retry ") == 2
        assert SECRET not in str(e.value) + caplog.text
    finally:
        server.stop()


@pytest.mark.slow
def test_openai_backend_does_not_retry_a_bad_request(openai_env, caplog):
    caplog.set_level(logging.WARNING, logger="gradsim")
    too_long = [[{"role": "user", "content": "word " * 3000}]]  # over the server's 1,024-token context
    with pytest.raises(GradsimError, match="rejected a request.*BadRequestError"):
        OpenAIBackend("smollm2", max_retries=5, backoff=0.01).generate(too_long, GenParams(8), [1])
    assert "retry" not in caplog.text


def test_openai_backend_needs_a_key_or_a_base_url(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(GradsimError, match="needs OPENAI_API_KEY"):
        OpenAIBackend("gpt-4o-mini")


def test_paraphrase_prompt_folds_the_system_turn_for_templates_without_one():
    import torch
    from transformers import AutoTokenizer

    from gradsim.core.model import LoadedModel, embedded_model_dir
    from gradsim.variants.generate import LocalBackend
    from gradsim.variants.paraphrase import paraphrase_messages

    tok = AutoTokenizer.from_pretrained(embedded_model_dir()[0])
    msgs = paraphrase_messages("Why is the sky blue?", "prompt")
    lm = LoadedModel(None, tok, "embedded", "r", torch.device("cpu"), "", 0)
    assert LocalBackend(lm)._render(msgs).startswith(f"<|im_start|>system\n{PARAPHRASE_SYSTEM}<|im_end|>")
    # A template that, like Gemma's, raises on a system turn.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    )
    text = LocalBackend(lm)._render(msgs)
    assert text.startswith(f"<user>{PARAPHRASE_SYSTEM}\n\nParaphrase the user request below.")
    assert text.endswith("User request:\nWhy is the sky blue?<assistant>")
