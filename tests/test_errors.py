"""Every bad input: a one-line error naming the problem, exit code 2, nothing written, no secret leaked."""

import os
import subprocess
import sys

import orjson
import pytest
from conftest import ROOT

from gradsim.cli import main
from gradsim.config import BUNDLED_DATA

SECRET = "hf_SECRETtoken1234567890"
ORIG = str(BUNDLED_DATA / "original.jsonl")


def write_jsonl(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows))
    return str(path)


def run_cli(tmp_path, capsys, monkeypatch, *argv, env=None):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.chdir(tmp_path)  # no stray .env
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    code = main(["--output-dir", str(out), "--device", "cpu", *argv])
    cap = capsys.readouterr()
    return code, cap.err.strip(), cap.out, out


def case_rows(tmp_path):
    ok = {"id": "lima_0", "conversations": ["q", "a"]}
    return {
        "malformed": (write_jsonl(tmp_path / "bad.jsonl", [orjson.dumps(ok), b"{not json"]), "not valid JSON"),
        "no conversations": (
            write_jsonl(tmp_path / "noconv.jsonl", [{"id": "x", "text": "hi"}]),
            "neither 'conversations' nor 'messages'",
        ),
        "roles": (
            write_jsonl(
                tmp_path / "roles.jsonl",
                [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
            ),
            "not alternating",
        ),
        "empty response": (
            write_jsonl(tmp_path / "empty.jsonl", [{"conversations": ["a question", "  "]}]),
            "empty response",
        ),
        "missing": (str(tmp_path / "nope.jsonl"), "does not exist"),
    }


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--setting", "summarised"], "unknown --setting 'summarised'"),
        (["--computation-type", "l2"], "unknown --computation-type 'l2'"),
        (["--turns", "every"], "unknown --turns 'every': choose one of first, all"),
        (["--turns", "all", "--loss-on", "prompt"], "--turns all trains every assistant turn"),
        (["--partition-start", "5", "--partition-end", "5"], "is empty"),
        (["--partition-start", "0", "--partition-end", "4800"], "outside the data"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--model", "no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
        (["--output-dir", "/dev/null/results"], "cannot be written"),
    ],
)
def test_bad_flags(tmp_path, capsys, monkeypatch, argv, needle):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err, out, outdir = run_cli(tmp_path, capsys, monkeypatch, *argv)
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("error: ") and needle in err, err
    assert SECRET not in err + out
    assert not outdir.exists()


@pytest.mark.parametrize("which", ["malformed", "no conversations", "roles", "empty response", "missing"])
@pytest.mark.parametrize("role", ["--original-data", "--variant-data"])
def test_bad_data_files(tmp_path, capsys, monkeypatch, which, role):
    path, needle = case_rows(tmp_path)[which]
    code, err, _, outdir = run_cli(tmp_path, capsys, monkeypatch, role, path)
    assert code == 2 and err.count("\n") == 0 and needle in err, err
    assert not outdir.exists()


def test_variant_without_original(tmp_path, capsys, monkeypatch):
    variants = write_jsonl(tmp_path / "v.jsonl", [{"id": "lima_999", "conversations": ["q", "a"]}])
    code, err, _, outdir = run_cli(tmp_path, capsys, monkeypatch, "--variant-data", variants)
    assert code == 2 and "'lima_999' has no original" in err and not outdir.exists()


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_sample_size_must_be_positive(tmp_path, capsys, monkeypatch, value):
    code, err, _, outdir = run_cli(tmp_path, capsys, monkeypatch, env={"MT_SAMPLE_SIZE": value})
    assert code == 2 and "MT_SAMPLE_SIZE" in err and not outdir.exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_sample_size_flag_is_named_as_given(tmp_path, capsys, monkeypatch, value):
    code, err, _, outdir = run_cli(tmp_path, capsys, monkeypatch, f"--sample-size={value}")
    assert code == 2 and err.count("\n") == 0 and not outdir.exists()
    assert err.startswith(f"error: --sample-size must be a positive integer, got {value}") and "MT_" not in err, err


def test_hub_dataset_unreachable_says_how_to_use_the_bundled_sample(tmp_path, capsys, monkeypatch):
    code, err, _, outdir = run_cli(tmp_path, capsys, monkeypatch, "--original-data", "GAIR/lima")
    assert code == 2 and "bundled sample" in err and SECRET not in err and not outdir.exists()


@pytest.mark.slow
def test_real_process_exit_code_and_single_line(tmp_path):
    env = dict(os.environ, HF_TOKEN=SECRET)
    p = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--setting", "nope", "--output-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: unknown --setting 'nope': choose one of paraphrased, model-generated, both"
    ]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model", ["/nonexistent/models/x", "./models/x", "models/org/x", "~/no-such-model-dir"])
def test_a_missing_model_directory_is_not_sent_to_the_hub(tmp_path, capsys, monkeypatch, model):
    import gradsim.core.model

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(gradsim.core.model, "hub_reachable", no_hub)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    code, err, _, outdir = run_cli(tmp_path, capsys, monkeypatch, "--model", model)
    assert code == 2 and err.count("\n") == 0 and not outdir.exists(), err
    assert err == f"error: model directory {model} does not exist: check the path, or give a hub id ORG/NAME"


def test_a_hub_model_without_the_hub_fails_at_once(tmp_path, capsys, monkeypatch):
    import socket

    import gradsim.core.model

    def refused(*a, **k):
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    gradsim.core.model.hub_reachable.cache_clear()
    try:
        code, err, _, outdir = run_cli(tmp_path, capsys, monkeypatch, "--model", "no-such-org/no-such-model")
    finally:
        gradsim.core.model.hub_reachable.cache_clear()
    assert code == 2 and err.count("\n") == 0 and not outdir.exists(), err
    assert "cannot be reached" in err and "HF_HUB_OFFLINE=1" in err and "local model directory" in err


@pytest.mark.parametrize("env", ["GRADSIM_MEMORY_GB", "GRADSIM_SCRATCH_GB", "GRADSIM_HOST_MEMORY_GB"])
@pytest.mark.parametrize("finished", [False, True])
def test_budget_variables_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, env, finished):
    import gradsim.study.run

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(gradsim.study.run, "load_model", no_model)
    if finished:  # a finished run folder is no reason to pass an invalid environment unseen
        done = tmp_path / "out" / "gradient-similarity" / "paraphrased"
        done.mkdir(parents=True)
        (done / "results.json").write_bytes(b"{}")
    code, err, _, _ = run_cli(tmp_path, capsys, monkeypatch, "--sample-size", "2", env={env: "-3"})
    assert code == 2 and err == f"error: {env}='-3' is not a size in GB: set it to e.g. 8, or unset it", err


def test_an_unsupported_device_names_the_variable_it_came_from(tmp_path, capsys, monkeypatch):
    import gradsim.study.run

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(gradsim.study.run, "load_model", no_model)
    monkeypatch.setenv("MT_DEVICE", "tpu")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["--output-dir", str(out), "--sample-size", "2"]) == 2  # no --device: MT_DEVICE decides
    err = capsys.readouterr().err.strip()
    assert "MT_DEVICE='tpu'" in err and err.count("\n") == 0 and not out.exists(), err
    assert main(["--output-dir", str(out), "--sample-size", "2", "--device", "tpu:0"]) == 2
    assert "--device 'tpu:0'" in capsys.readouterr().err


def test_a_local_model_folder_without_a_tokenizer_blames_neither_the_hub_nor_the_environment(
    tiny, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "my-model"
    tiny.model.save_pretrained(folder)  # the weights, no tokenizer
    capsys.readouterr()
    code, err, _, outdir = run_cli(tmp_path, capsys, monkeypatch, "--model", str(folder), "--sample-size", "2")
    assert code == 2 and err.count("\n") == 0 and not outdir.exists(), err
    assert str(folder) in err and "tokenizer" in err and "hub" not in err and "MT_MODEL_NAME" not in err, err


def test_skip_overlong_leaves_out_and_counts_the_rows_that_cannot_train(tiny, tmp_path):
    """At 70 tokens originals lima_4 and lima_5 (prompts of 98 and 73 tokens) and the variant lima_2 (73)
    have no response token left: the run stops, naming the flag; with it they are left out and counted."""
    from gradsim.config import Config
    from gradsim.errors import GradsimError
    from gradsim.study.run import run

    cfg = dict(device="cpu", sample_size=6, top_k=1, max_length=70, baselines=False, output_dir=str(tmp_path))
    with pytest.raises(GradsimError, match="sample lima_4: no response token is left.*--skip-overlong"):
        run(Config(**cfg), lm=tiny)
    res = run(Config(**cfg, skip_overlong=True), lm=tiny)
    assert res["skipped_overlong"] == {"originals": ["lima_4", "lima_5"], "queries": ["lima_2", "lima_4", "lima_5"]}
    assert [q["id"] for q in res["queries"]] == ["lima_0", "lima_1", "lima_3"]
    assert res["compat"]["skip_overlong"] is True and res["config"]["skip_overlong"] is True
    assert (tmp_path / "gradient-similarity" / "paraphrased" / "results.json").is_file()  # the run's usual name
