"""Config is what the user asked for (frozen); what a run finds out is its Provenance. Split, they
still write what the one object wrote: results' "config" and "compat", feature-store, allocation and
normalizer keys, run folder names (so runs, partitions and stores made before keep matching)."""

import dataclasses

import pytest
from conftest import cpu_config

from gradsim.config import BUNDLED_DATA, COMPAT_FIELDS, RECORDED_WHEN_SET, VARIANT_FILES, Config, Provenance
from gradsim.io import read_json
from gradsim.study.features import manifest_key
from gradsim.study.run import run

# A tiny projected run of both settings (tests/conftest.py's tiny model, code version pinned) as the
# code wrote it before Config and Provenance were split: the keys in their order, and the values
# (paths as written by the test). Its feature-store, allocation and normalizer keys likewise.
TEMPLATE_SHA = "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788"
ORIGINAL_SHA = "ec262345625f5e768dab3de4a7da91fa4729a688e7a2d52d746f7466196fb618"
VARIANT_SHA = {
    "paraphrased": "9daa737ac8a1191ceeb5c5235fa36686ec35abf8ae6ecac06478cf126989e503",
    "model-generated": "1a70e889d281c900ef4b137f64878c1bfbe3c89bfc02be6ca43d2401127b6fc1",
}
REPRESENTATIONS_KEY = "35d684ecd2209ec3"
ALLOCATION_KEY = "d5222e182bb50e76"
NORMALIZER_KEY = "627256870fa75c52"
# The originals' store is keyed by these (the query side and the defaults of later options left out)
# and the featurizer's spec, whose calibrated allocation is numbers: its key is checked by derivation.
QUERY_SIDE = ("setting", "computation_type", "candidates", "top_k", "variant_data_sha256")
# Options added later are recorded only when set (RECORDED_WHEN_SET): a default run's records keep their keys.
DEFAULT_COMPAT = tuple(k for k in COMPAT_FIELDS if k not in RECORDED_WHEN_SET)
STORE_FIELDS = tuple(k for k in DEFAULT_COMPAT if k not in QUERY_SIDE and k != "turns")  # --turns first: left out


def expected_config(setting: str, out: str) -> dict:
    return {
        "setting": setting,
        "computation_type": "gradient-similarity",
        "loss_on": "response",
        "turns": "first",
        "normalize": "center",
        "damping": 0.01,
        "matrices": None,
        "candidates": "bm25",
        "top_k": 2,
        "model_name": "embedded:SmolLM2-135M-Instruct",
        "revision": None,
        "trust_remote_code": False,
        "chat_template": None,
        "device": "cpu",
        "use_gpu": True,
        "dtype": "float32",
        "sample_size": 4,
        "max_length": 256,
        "seed": 42,
        "original_data": str(BUNDLED_DATA / "original.jsonl"),
        "variant_data": str(BUNDLED_DATA / VARIANT_FILES[setting]),
        "paraphrased_data": None,
        "model_generated_data": None,
        "partition_start": 0,
        "partition_end": 3,
        "output_dir": out,
        "use_random_projection": True,
        "projection": "countsketch",
        "proj_dim": 512,
        "allocation": "norm-floor",
        "batch_size": 1,
        "baselines": True,
        "memory_gb": None,
        "scratch_gb": None,
        "host_memory_gb": None,
        "model_revision": "test",
        "chat_template_sha256": TEMPLATE_SHA,
        "code_version": "pinned",
        "original_data_sha256": ORIGINAL_SHA,
        "variant_data_sha256": VARIANT_SHA[setting],
        "extra": {},
    }


def test_a_config_is_frozen_and_its_defaults_resolved_once():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 9
    assert cfg.proj_dim == 65536 and cfg.variant_data == str(BUNDLED_DATA / "paraphrased.jsonl")
    both = Config(setting="both", projection="trak")
    assert both.proj_dim == 4096 and both.variant_data is None
    assert both.model_generated_data == str(BUNDLED_DATA / "model_generated.jsonl")
    assert dataclasses.replace(cfg, top_k=9).top_k == 9 and cfg.top_k == 4


def test_the_record_is_the_config_with_what_the_run_found_out():
    cfg = Config(max_length=100)
    assert cfg.to_record()["max_length"] == 100  # nothing found out yet: what was asked
    record = cfg.to_record(Provenance(model_revision="abc", code_version="v", max_length=64))
    assert list(record) == [k for k in Config().to_dict() if k not in RECORDED_WHEN_SET][:-1] + [
        "model_revision",
        "chat_template_sha256",
        "code_version",
        "original_data_sha256",
        "variant_data_sha256",
        "extra",
    ]
    assert record["max_length"] == 64 and record["model_revision"] == "abc" and cfg.max_length == 100
    assert list(cfg.compat()) == list(DEFAULT_COMPAT) and cfg.compat(Provenance(max_length=64))["max_length"] == 64
    assert Config.from_dict(record) == dataclasses.replace(cfg, max_length=64)  # provenance keys left out
    when_set = Config(allow_nonfinite=True, skip_overlong=True)
    assert when_set.to_record()["allow_nonfinite"] is True and when_set.compat()["skip_overlong"] is True
    assert Config.from_dict(when_set.to_record()) == when_set


def test_a_run_writes_what_it_wrote_before_and_leaves_the_config_alone(tiny, tmp_path, monkeypatch):
    import gradsim.study.run as runmod

    monkeypatch.setattr(runmod, "code_version", lambda: "pinned")
    out = tmp_path / "out"
    cfg = cpu_config(
        out,
        4,
        setting="both",
        top_k=2,
        use_random_projection=True,
        projection="countsketch",
        proj_dim=512,
        normalize="center",
        allocation="norm-floor",
        partition_start=0,
        partition_end=3,
    )
    asked = dataclasses.replace(cfg)
    results = run(cfg, lm=tiny)["settings"]
    assert cfg == asked
    for setting, res in results.items():
        expected = expected_config(setting, str(out))
        assert list(res["config"]) == list(expected) and res["config"] == expected
        assert list(res["compat"]) == list(DEFAULT_COMPAT) and res["compat"] == {k: expected[k] for k in DEFAULT_COMPAT}
        name = f"{setting}-countsketch512-alloc-norm-floor-norm-center"
        assert (out / "gradient-similarity" / name / "partitions" / "results_00000-00003.json").is_file()
    features = out / "features"
    stores = {p.name: sorted(q.name for q in p.iterdir()) for p in features.iterdir()}
    originals = next(k for k, v in stores.items() if v == ["originals"])
    assert stores == {
        originals: ["originals"],
        REPRESENTATIONS_KEY: ["representations"],
        "countsketch-allocations": [f"{ALLOCATION_KEY}.json"],
        "normalizers": [f"{NORMALIZER_KEY}.npz"],
    }
    manifest = read_json(features / originals / "originals" / "manifest.json")
    keyed = {k: v for k, v in manifest.items() if k not in ("ids_sha256", "dim", "shard_size", "num_samples")}
    assert list(keyed) == [*STORE_FIELDS, "featurizer"] and manifest_key(keyed) == originals
    assert {k: keyed[k] for k in STORE_FIELDS} == {k: expected_config("paraphrased", "")[k] for k in STORE_FIELDS}
