"""Inputs that used to give wrong numbers or unreadable files with no warning."""

import logging
import os
import stat

import orjson
import pytest
from conftest import cpu_config

from gradsim.config import BUNDLED_DATA, Config
from gradsim.data.load import load_dataset
from gradsim.errors import GradsimError
from gradsim.io import atomic_write_json
from gradsim.study.run import run


def write_jsonl(path, rows):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return str(path)


def test_variants_without_ids_and_a_missing_row_are_refused_not_linked_by_position(tmp_path):
    originals = write_jsonl(
        tmp_path / "o.jsonl", [{"conversations": [f"question {i}", f"answer {i}"]} for i in range(4)]
    )
    # A paraphrase of row 1 failed and was dropped: row 2's variant now sits at index 1.
    variants = write_jsonl(tmp_path / "v.jsonl", [{"conversations": [f"q {i}", f"a {i}"]} for i in (0, 2, 3)])
    with pytest.raises(GradsimError, match=r"3 of its 3 rows have no 'id'.*4 rows.*give every variant the 'id'"):
        load_dataset(originals, variants)
    # With as many rows, row numbers are the original study's own convention (lima_<row>).
    same = write_jsonl(tmp_path / "w.jsonl", [{"conversations": [f"q {i}", f"a {i}"]} for i in range(4)])
    assert [q.id for q in load_dataset(originals, same).queries] == ["lima_0", "lima_1", "lima_2", "lima_3"]
    # Explicit ids link whatever is missing.
    named = write_jsonl(tmp_path / "n.jsonl", [{"id": f"lima_{i}", "conversations": ["q", "a"]} for i in (0, 2, 3)])
    assert [q.id for q in load_dataset(originals, named).queries] == ["lima_0", "lima_2", "lima_3"]


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_write_json(tmp_path / "s.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_top_k_beyond_the_corpus_warns_and_reports_the_real_chance(tiny, tmp_path, caplog):
    cfg = cpu_config(tmp_path, 3, top_k=4, baselines=False, original_data=str(BUNDLED_DATA / "original.jsonl"))
    with caplog.at_level(logging.WARNING, logger="gradsim"):
        res = run(cfg, lm=tiny)
    assert "--top-k 4 asks for more BM25 candidates than the 2 other originals" in caplog.text
    assert "chance is 1/3, not 1/5" in caplog.text
    assert res["baselines"]["random"]["top1"] == pytest.approx(1 / 3)
    assert all(len(q["candidates"]) == 3 for q in res["queries"])


def test_the_gradsim_command_lists_its_verbs_and_forwards_to_them(capsys):
    from gradsim.cli import COMMANDS, gradsim_main

    assert gradsim_main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("run", "paraphrase", "submit", "status", "combine", "select", "analyze"))
    assert gradsim_main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        gradsim_main(["run", "--help"])
    assert e.value.code == 0 and "--setting" in capsys.readouterr().out
    assert gradsim_main(["memory", "512"]) == 0 and "AMD-OLMo-1B-SFT" in capsys.readouterr().out
    assert set(COMMANDS) >= {"run", "submit", "status", "combine"}


def test_progress_in_a_log_is_a_line_per_item(capsys):
    """stderr is not a terminal under pytest: every update is written at once."""
    from gradsim.study.features import progress_bar

    bar = progress_bar(total=3, desc="gradients", unit="pass")
    for _ in range(3):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and all("gradients" in line for line in lines)  # one plain line per update
    counts = [next(f"{i}/3" for i in range(4) if f"{i}/3" in line) for line in lines]
    assert counts[:4] == ["0/3", "1/3", "2/3", "3/3"]


def test_a_prompt_longer_than_max_length_fails_before_anything_is_written(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = cpu_config(out, 3, max_length=8, baselines=False, original_data=str(BUNDLED_DATA / "original.jsonl"))
    with pytest.raises(GradsimError, match=r"no response token is left to train on .*raise --max-length") as e:
        run(cfg, lm=tiny)
    assert "\n" not in str(e.value)
    assert not out.exists()  # no progress log, lock or empty folder
    assert "encoding" not in capsys.readouterr().err  # no progress bar was open when it failed


def test_a_file_that_is_not_utf8_names_line_column_and_byte(tmp_path):
    from gradsim.data.load import load_samples

    path = tmp_path / "latin1.jsonl"
    ok = orjson.dumps({"conversations": ["q", "a"]})
    path.write_bytes(ok + b"\n" + '{"conversations": ["caf\u00e9 \u00e0 la", "a"]}\n'.encode("latin-1"))
    with pytest.raises(GradsimError) as e:
        load_samples(str(path))
    # Column in characters: 'é' is the 24th character of line 2.
    assert str(e.value) == f"{path}: line 2 is not UTF-8 text (byte 0xe9 at column 24): save the file as UTF-8"
    # Valid multi-byte characters before the bad byte count as one column each.
    path.write_bytes('{"conversations": ["\u00fc", "'.encode() + b"\xff" + b'"]}\n')
    with pytest.raises(GradsimError, match=r"line 1 is not UTF-8 text \(byte 0xff at column 26\)"):
        load_samples(str(path))


def test_sharegpt_rows_are_read_like_lima_rows(tmp_path):
    from gradsim.data.load import load_samples

    sharegpt = [
        {"id": "a", "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "r1"}]},
        {
            "id": "b",
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "q2"},
                {"from": "gpt", "value": "r2"},
            ],
        },
    ]
    lima = [{"id": "a", "conversations": ["q1", "r1"]}, {"id": "b", "conversations": ["q2", "r2"]}]
    assert load_samples(write_jsonl(tmp_path / "s.jsonl", sharegpt)) == load_samples(
        write_jsonl(tmp_path / "l.jsonl", lima)
    )
    bad = [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "r"}]}]
    with pytest.raises(GradsimError, match=r"row 0 \(lima_0\) has ShareGPT roles \['bot'\]: use human, gpt"):
        load_samples(write_jsonl(tmp_path / "b.jsonl", bad))


def bundled_rows(name="original.jsonl"):
    return [orjson.loads(line) for line in (BUNDLED_DATA / name).read_bytes().splitlines() if line.strip()]


def messages_rows():
    """The bundled originals in messages format, a system turn in front of every other row."""
    out = []
    for i, r in enumerate(bundled_rows()):
        msgs = [
            {"role": "user", "content": r["conversations"][0]},
            {"role": "assistant", "content": r["conversations"][1]},
        ]
        out.append({"id": r["id"], "messages": ([{"role": "system", "content": "hi"}] if i % 2 else []) + msgs})
    return out


def test_local_files_in_other_formats_give_the_same_samples(tmp_path):
    import gzip
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradsim.data.load import load_samples, samples_sha256

    expected = load_samples(str(BUNDLED_DATA / "original.jsonl"))
    rows = bundled_rows()
    jsonl = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    # Rows of every format in one file: a schema inferred from the first rows would break on the others.
    mixed = [r if i % 3 == 0 else m for i, (r, m) in enumerate(zip(rows, messages_rows()))]
    mixed[1] = {
        "id": rows[1]["id"],
        "conversations": [{"from": "human", "value": rows[1]["conversations"][0]}]
        + [{"from": "gpt", "value": rows[1]["conversations"][1]}],
    }
    files = {
        "bom.jsonl": codecs_bom() + jsonl,
        "array.json": orjson.dumps(rows),
        "pretty.json": json.dumps(rows, indent=2, ensure_ascii=False).encode(),
        "bom-pretty.json": codecs_bom() + json.dumps(mixed, indent=4).encode(),
        "rows.jsonl.gz": gzip.compress(jsonl),
        "mixed.jsonl": b"".join(orjson.dumps(r) + b"\n" for r in mixed),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    pq.write_table(pa.Table.from_pylist(messages_rows()), tmp_path / "messages.parquet")
    before = sorted(p.name for p in tmp_path.iterdir())
    for name in [*files, "rows.parquet", "messages.parquet"]:
        got = load_samples(str(tmp_path / name))
        assert got == expected and samples_sha256(got) == samples_sha256(expected), name
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache written beside the data


def codecs_bom():
    import codecs

    return codecs.BOM_UTF8


def test_a_broken_json_array_or_parquet_names_the_file_and_line(tmp_path):
    from gradsim.data.load import load_samples

    path = tmp_path / "broken.json"
    path.write_bytes(b'[\n  {"conversations": ["q", "a"]},\n  {"conversations" ["q", "a"]}\n]\n')
    with pytest.raises(GradsimError, match=rf"^{path}:3 is not valid JSON \(.* at column \d+\): fix the line"):
        load_samples(str(path))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(GradsimError, match=r"cannot read .*bad.parquet as parquet \(.*\): check the file") as e:
        load_samples(str(tmp_path / "bad.parquet"))
    assert "\n" not in str(e.value)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(GradsimError, match=r"bad.jsonl.gz is not a valid gz file"):
        load_samples(str(tmp_path / "bad.jsonl.gz"))
    with pytest.raises(GradsimError, match=r"^data file .*nope.parquet does not exist: check the path"):
        load_samples(str(tmp_path / "nope.parquet"))


def multi_turn_originals(tmp_path):
    """The bundled originals; row 0 with a second exchange, row 1 with a system message, row 2 with both."""
    rows = messages_rows()
    rows[0]["messages"] = [m for m in rows[0]["messages"] if m["role"] != "system"]
    rows[0]["messages"] += [{"role": "user", "content": "and then?"}, {"role": "assistant", "content": "then."}]
    rows[1]["messages"] = [{"role": "system", "content": "be brief"}] + rows[1]["messages"][-2:]
    rows[2]["messages"] = [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}]
    rows[2]["messages"] += [m for m in messages_rows()[2]["messages"] if m["role"] != "system"]
    rows[2]["messages"] += [{"role": "user", "content": "more"}]
    for r in rows[3:]:
        r["messages"] = [m for m in r["messages"] if m["role"] != "system"]
    return write_jsonl(tmp_path / "multi.jsonl", rows)


def test_turns_and_system_messages_left_out_are_counted_and_logged(tmp_path, caplog):
    originals = multi_turn_originals(tmp_path)
    variants = str(BUNDLED_DATA / "paraphrased.jsonl")
    with caplog.at_level(logging.WARNING, logger="gradsim"):
        data = load_dataset(originals, variants)
    assert data.dropped["original"] == {
        "rows_with_later_turns": 2,
        "later_turns": 3,
        "rows_with_system_messages": 2,
        "system_messages": 3,
    }
    assert set(data.dropped["variant"].values()) == {0}
    assert caplog.text.count("only the first exchange") == 1
    assert f"{originals}: only the first exchange of each row is used: 2 of its 48 rows have later turns" in caplog.text
    # The samples (and their hash) are those of the single-turn file.
    bundled = load_dataset(str(BUNDLED_DATA / "original.jsonl"), variants)
    assert data.originals == bundled.originals and data.original_sha256 == bundled.original_sha256
    # Counted over the samples used.
    assert load_dataset(originals, variants, sample_size=1).dropped["original"]["later_turns"] == 2


def test_results_report_what_the_data_held_beyond_the_first_exchange(tiny, tmp_path):
    cfg = cpu_config(tmp_path / "out", 3, top_k=2, baselines=False, original_data=multi_turn_originals(tmp_path))
    res = run(cfg, lm=tiny)
    assert res["data_dropped"]["original"]["later_turns"] == 3
    assert res["data_dropped"]["original"]["system_messages"] == 3
    assert res["data_dropped"]["variant"]["later_turns"] == 0


def test_turns_all_uses_every_answered_turn_and_counts_only_what_is_left_out(tmp_path, caplog):
    originals = multi_turn_originals(tmp_path)
    variants = str(BUNDLED_DATA / "paraphrased.jsonl")
    first = load_dataset(originals, variants)
    with caplog.at_level(logging.WARNING, logger="gradsim"):
        data = load_dataset(originals, variants, turns="all")
    # Row 0's second exchange is used; row 2's last user turn has no answer: it alone is left out.
    assert data.dropped["original"] == {
        "rows_with_later_turns": 1,
        "later_turns": 1,
        "rows_with_system_messages": 2,
        "system_messages": 3,
    }
    assert first.dropped["original"]["later_turns"] == 3
    assert "every answered turn is used: 1 of its 48 rows have a last user turn without answer" in caplog.text
    assert [m["content"] for m in data.originals[0].messages("all")][2:] == ["and then?", "then."]
    assert len(data.originals[2].messages("all")) == 2
    # The hash tells the inputs apart: the later turns are in it; single-exchange data hashes the same either way.
    assert data.original_sha256 != first.original_sha256
    assert data.variant_sha256 == first.variant_sha256
    bundled = str(BUNDLED_DATA / "original.jsonl")
    assert (
        load_dataset(bundled, variants, turns="all").original_sha256 == load_dataset(bundled, variants).original_sha256
    )


def test_turns_all_reaches_the_parser_the_run_name_and_the_results(tiny, tmp_path):
    from gradsim.cli.common import build_parser, config_from_args
    from gradsim.layout import run_dir
    from gradsim.study.run import store_manifest

    assert "--turns" in build_parser().format_help()
    cfg = config_from_args(["--turns", "all", "--device", "cpu"])
    assert cfg.turns == "all" and "turns" in cfg.compat()
    assert run_dir(cfg).name == "paraphrased-turns-all" and run_dir(Config()).name == "paraphrased"
    # Feature stores made before --turns existed keep their keys; --turns all gets its own.
    assert "turns" not in store_manifest(Config().compat()) and store_manifest(cfg.compat())["turns"] == "all"
    originals = multi_turn_originals(tmp_path)
    cfg = cpu_config(tmp_path / "out", 3, top_k=2, baselines=False, original_data=originals, turns="all")
    res = run(cfg, lm=tiny)
    assert res["compat"]["turns"] == "all"
    assert res["data_dropped"]["original"]["later_turns"] == 1  # row 2's unanswered last user turn
    assert (tmp_path / "out" / "gradient-similarity" / "paraphrased-turns-all" / "results.json").is_file()
