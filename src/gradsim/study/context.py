"""One study as every command sees it: each setting's Config, its data, the model, what the run found out
(Provenance) and how a sample is encoded for it. run, frontier, targets and select build it here, so a
sample is read, cut and encoded the same way, and hashed the same way, whichever command reads it.

    studies = open_study(cfg)            # one Study per setting (--setting both: two), the model loaded once
    s = studies[0]
    enc = s.encode(sample)               # its --turns, cut at the max length in force, loss on --loss-on
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from gradsim.config import SETTINGS, Config, Provenance
from gradsim.core.model import LoadedModel, load_model, resolve_device
from gradsim.data.encode import Encoded, encode
from gradsim.data.load import Dataset, load_dataset
from gradsim.errors import GradsimError


def setting_configs(cfg: Config) -> list[Config]:
    """One Config per setting: ``both`` gives the two that separate runs would have."""
    if cfg.setting != "both":
        return [cfg]
    data = {"paraphrased": cfg.paraphrased_data, "model-generated": cfg.model_generated_data}
    return [
        dataclasses.replace(cfg, setting=s, variant_data=data[s], paraphrased_data=None, model_generated_data=None)
        for s in SETTINGS
    ]


def load_data(cfg: Config) -> Dataset:
    """One setting's originals and variants as its Config reads them: --turns, --ids-file, --sample-size (the
    data hashes cover exactly that)."""
    return load_dataset(cfg.original_data, cfg.variant_data, cfg.sample_size, cfg.turns, cfg.ids_file)


def check_unchanged(data: Dataset, record: dict, where: str) -> None:
    """Refuse data whose hashes differ from a finished run's record (its files changed since it ran)."""
    if data.original_sha256 != record.get("original_data_sha256") or data.variant_sha256 != record.get(
        "variant_data_sha256"
    ):
        raise GradsimError(
            f"the data files of {where} changed since it ran ({record.get('original_data')}, "
            f"{record.get('variant_data')}): run it again"
        )


def resolved_max_length(cfg: Config, lm: LoadedModel) -> int:
    """--max-length as it applies: at most the model's context (the whole context when not given)."""
    return min(cfg.max_length or lm.context_length, lm.context_length)


def provenance(cfg: Config, data: Dataset, lm: LoadedModel, version: Optional[str]) -> Provenance:
    """What a run over this data with this model finds out: the model's commit and chat template, the code,
    the data's hashes and the max length in force."""
    return Provenance(
        model_revision=lm.revision,
        chat_template_sha256=lm.chat_template_sha256,
        code_version=version,
        original_data_sha256=data.original_sha256,
        variant_data_sha256=data.variant_sha256,
        max_length=resolved_max_length(cfg, lm),
    )


def encode_sample(cfg: Config, prov: Provenance, lm: LoadedModel, sample, loss_on: Optional[str] = None) -> Encoded:
    """A sample as a study trains on it: its --turns, cut at the max length in force, the loss on ``loss_on``
    (default: --loss-on)."""
    return encode(lm.tokenizer, sample, prov.max_length, loss_on or cfg.loss_on, cfg.turns)


@dataclass(frozen=True)
class Study:
    """One setting of a study once the model is loaded: what was asked (cfg), the data, the model and what the
    run found out (prov)."""

    cfg: Config
    data: Dataset
    lm: LoadedModel
    prov: Provenance

    @property
    def max_length(self) -> int:
        return self.prov.max_length

    def encode(self, sample, loss_on: Optional[str] = None) -> Encoded:
        """A sample as this study trains on it (encode_sample)."""
        return encode_sample(self.cfg, self.prov, self.lm, sample, loss_on)


def open_study(
    cfg: Config, lm: Optional[LoadedModel] = None, version: Optional[str] = None, data: Optional[dict] = None
) -> list[Study]:
    """Each setting's Study (``--setting both``: two) over one loaded model (``lm``, else loaded from cfg).
    ``data``: each setting's Dataset where the caller already read it (else load_data)."""
    cfgs = setting_configs(cfg)
    datasets = [data[c.setting] if data and c.setting in data else load_data(c) for c in cfgs]
    lm = lm or load_model(cfg, resolve_device(cfg))
    return [Study(c, d, lm, provenance(c, d, lm, version)) for c, d in zip(cfgs, datasets)]
