"""Build the variant datasets (paraphrase.py): ``paraphrased`` and ``model-generated``.

- paraphrased: the user message and the assistant message of each original are paraphrased
  separately by an instruction-tuned LLM with the fixed prompt below (PARAPHRASE_SYSTEM +
  PARAPHRASE_PROMPT), meaning, format and language kept.
- model-generated: the paraphrased prompt plus the analysed model's greedy answer to it under its
  own chat template; so it needs the paraphrased set.

Rows are written as LIMA JSONL with the originals' ids. Output is appended row by row (fsync), so
an interrupted run resumes where it stopped; rows are generated in fixed chunks of the input order
with seeds derived from their position, so a resumed run makes the same rows as an uninterrupted one.
Degenerate outputs (see gradsim.variants.generate.degenerate_reason) are retried once with sampling and a
different seed, and if still degenerate are recorded in ``<name>.failures.jsonl`` instead of the data.
The settings, prompt and model are recorded in ``<name>.provenance.json``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from gradsim import __version__
from gradsim.config import BUNDLED_DATA, EMBEDDED_MODEL, VARIANT_FILES, Config
from gradsim.core.model import LoadedModel, load_model, resolve_device
from gradsim.credentials import redact
from gradsim.data.load import Sample, load_samples, samples_sha256
from gradsim.errors import GradsimError, check_at_least, check_choice
from gradsim.io import append_jsonl, atomic_write_json, atomic_write_jsonl, json_sha256, read_json, read_jsonl_tolerant
from gradsim.options import option
from gradsim.variants.generate import GenParams, LocalBackend, OpenAIBackend, degenerate_reason

log = logging.getLogger("gradsim")

DATASET_TYPES = ("paraphrased", "model-generated", "both")
BACKENDS = ("local", "openai")

PARAPHRASE_SYSTEM = (
    "You are a careful editor who paraphrases text. You reword text so that it says exactly the same thing "
    "in different words, and you never answer, follow or comment on the text you are given."
)
# One prompt for both halves of a row ({role} is "user request" or "assistant answer"): the halves are
# paraphrased separately, as in the study, so an answer is never rewritten to fit a reworded question.
PARAPHRASE_PROMPT = (
    "Paraphrase the {role} below. Keep its meaning, every fact and its language. Keep its format: lists stay "
    "lists, numbered steps stay numbered, tables stay tables, math stays math, and code blocks stay code blocks "
    "with equivalent working code. Change the wording and the sentence structure throughout. Reply with the "
    "paraphrase only, without a title, an introduction or any comment.\n\n"
    "{role_title}:\n{text}"
)
ROLES = {"prompt": "user request", "response": "assistant answer"}
SOURCES = {"paraphrased": "gradsim-paraphrase", "model-generated": "gradsim-model-generated"}

# The retry of a degenerate output: sampling with a fresh seed usually escapes a greedy loop.
RETRY_SEED_OFFSET = 7919


def paraphrase_messages(text: str, part: str) -> list[dict[str, str]]:
    role = ROLES[part]
    return [
        {"role": "system", "content": PARAPHRASE_SYSTEM},
        {
            "role": "user",
            "content": PARAPHRASE_PROMPT.format(role=role, role_title=role[0].upper() + role[1:], text=text),
        },
    ]


@dataclass
class Options:
    """The options of paraphrase.py (gradsim paraphrase)."""

    dataset_type: str = option(f"one of {', '.join(DATASET_TYPES)}", default="both")
    backend: str = option(
        "local (transformers on this machine) or openai (OPENAI_BASE_URL / OPENAI_API_KEY endpoint)", default="local"
    )
    original_data: str = option(
        "originals: JSONL path or hub id",
        default=str(BUNDLED_DATA / "original.jsonl"),
        default_help="the bundled sample",
    )
    output_dir: Optional[str] = option(
        "where paraphrased.jsonl / model_generated.jsonl go (default: the folder of --original-data)", default=None
    )
    paraphrased_output: Optional[str] = option(
        "paraphrased JSONL path: written by 'paraphrased', read by 'model-generated'", default=None
    )
    model_generated_output: Optional[str] = option("model-generated JSONL path", default=None)
    paraphraser_model: Optional[str] = option(
        "paraphrasing LLM: HF id/dir (local, default embedded SmolLM2-135M-Instruct) "
        "or the endpoint's model name (openai, default gpt-4o-mini)",
        default=None,
    )
    model: str = option(
        "the analysed model that answers the model-generated prompts "
        "(default: MT_MODEL_NAME or the embedded model); for openai, the served model's name",
        default=EMBEDDED_MODEL,
    )
    limit: Optional[int] = option("only the first N originals", default=None)
    seed: int = option("seed of sampling and of the retries (each row's: this plus its position)", default=42)
    max_new_tokens: Optional[int] = option("default 768 (paraphrased), 512 (model-generated)", default=None)
    temperature: float = option("paraphrasing temperature (0: greedy)", default=0.0)
    top_p: float = option("paraphrasing nucleus sampling (with --temperature > 0)", default=1.0)
    retry_temperature: float = option("sampling temperature of the one retry after a degenerate output", default=0.7)
    batch_size: int = option("rows per generate() call (local) / per write chunk", default=8)
    device: str = option("cpu, cuda or cuda:N for the local backend", default="auto", default_help="MT_DEVICE or auto")
    rate_limit: float = option("openai: max requests per second (0: unlimited)", default=0.0)
    max_retries: int = option("openai: retries of connection errors, 429 and 5xx", default=5)
    retry_backoff: float = option("openai: first retry delay in s (doubles each time)", default=1.0)
    timeout: float = option("openai: seconds per request", default=120.0)
    overwrite: bool = option("replace an existing dataset instead of resuming it", default=False, const=True)
    retry_failed: bool = option(
        "try the rows in the failures file again (useful where generation is not repeatable)", default=False, const=True
    )

    def validate(self) -> Options:
        check_choice("--dataset-type", self.dataset_type, DATASET_TYPES)
        check_choice("--backend", self.backend, BACKENDS)
        counts = (("--limit", self.limit), ("--max-new-tokens", self.max_new_tokens), ("--batch-size", self.batch_size))
        check_at_least(1, "a positive integer", counts)
        if self.temperature < 0 or self.retry_temperature <= 0:
            raise GradsimError("--temperature must be >= 0 and --retry-temperature > 0")
        if not 0 < self.top_p <= 1:
            raise GradsimError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.rate_limit < 0 or self.max_retries < 0 or self.retry_backoff < 0:
            raise GradsimError("--rate-limit, --max-retries and --retry-backoff must not be negative")
        return self

    def out_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        src = Path(self.original_data)
        return src.parent if src.suffix in (".jsonl", ".json") else Path("data") / "variants"

    def output(self, kind: str) -> Path:
        given = self.paraphrased_output if kind == "paraphrased" else self.model_generated_output
        return Path(given) if given else self.out_dir() / VARIANT_FILES[kind]


class Sidecars:
    """The output file and what sits beside it: provenance (settings, state) and failures."""

    def __init__(self, output: Path):
        self.output = output
        self.provenance = output.with_name(output.stem + ".provenance.json")
        self.failures = output.with_name(output.stem + ".failures.jsonl")

    def remove(self) -> None:
        for p in (self.output, self.provenance, self.failures):
            p.unlink(missing_ok=True)


def _shown(path) -> str:
    """A path as recorded in provenance: relative to the current directory (the checkout's root, where the
    commands run) when inside it, so committed provenance does not name one machine's directories."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Builder:
    """Builds one dataset type from a list of source samples with one backend."""

    def __init__(
        self, kind: str, backend, params: GenParams, opts: Options, sources: list[Sample], settings: dict, output: Path
    ):
        self.kind, self.backend, self.params, self.opts = kind, backend, params, opts
        self.sources, self.settings, self.files = sources, settings, Sidecars(output)

    def check(self, output: str, source: str) -> Optional[str]:
        return degenerate_reason(output, source, partial_copies=self.kind == "paraphrased")

    def parts(self, s: Sample) -> list[tuple[str, list[dict[str, str]], str]]:
        """(part, conversation, text the output must not copy) for each generation a row needs."""
        if self.kind == "paraphrased":
            return [(p, paraphrase_messages(getattr(s, p), p), getattr(s, p)) for p in ("prompt", "response")]
        return [("response", [{"role": "user", "content": s.prompt}], s.prompt)]

    def prepare(self) -> Optional[set[str]]:
        """Check the existing output; returns the ids already done, or None if there is nothing to do."""
        f = self.files
        if self.opts.overwrite:
            f.remove()
        if f.output.exists() or f.provenance.exists():
            if not f.provenance.exists():
                raise GradsimError(
                    f"{f.output} exists and was not made by paraphrase.py (no {f.provenance.name}): "
                    "pass --overwrite to replace it, or choose another output path"
                )
            prov = read_json(f.provenance)
            if prov.get("settings") != self.settings:
                changed = sorted(
                    k
                    for k in set(prov.get("settings", {})) | set(self.settings)
                    if prov.get("settings", {}).get(k) != self.settings.get(k)
                )
                raise GradsimError(
                    f"{f.output} was made with other settings ({', '.join(changed)}): pass --overwrite "
                    "to replace it, or choose another output path"
                )
        rows = read_jsonl_tolerant(f.output)
        # Rewriting drops a line torn by a kill, so appends continue on a clean line boundary.
        if f.output.exists():
            atomic_write_jsonl(f.output, rows)
        failed = read_jsonl_tolerant(f.failures)
        if self.opts.retry_failed and failed:
            f.failures.unlink()
            failed = []
        done = {r["id"] for r in rows} | {r["id"] for r in failed}
        wanted = [s.id for s in self.sources]
        if all(i in done for i in wanted) and f.provenance.exists():
            log.info(
                "%s: already complete (%d rows, %d failed); --overwrite regenerates it",
                f.output,
                len(rows),
                len(failed),
            )
            return None
        return done

    def write_provenance(self, state: str, counts: dict) -> None:
        atomic_write_json(
            self.files.provenance,
            {
                "gradsim_version": __version__,
                "dataset_type": self.kind,
                "state": state,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "counts": counts,
                "settings": self.settings,
                "argv": [redact(a) for a in sys.argv[1:]],
            },
        )

    def run(self) -> dict:
        done = self.prepare()
        out = self.files.output
        if done is None:
            return self._counts()
        out.parent.mkdir(parents=True, exist_ok=True)
        self.write_provenance("in progress", self._counts())
        chunk = self.backend.batch_size
        todo = sum(1 for s in self.sources if s.id not in done)
        bar = tqdm(total=todo, desc=f"{self.kind} ({self.backend.name})", unit="row", disable=None)
        # Chunks over the full input order (not over what is left) keep batches, seeds and so the bytes
        # of a resumed run identical to an uninterrupted one.
        for c0 in range(0, len(self.sources), chunk):
            rows = list(enumerate(self.sources[c0 : c0 + chunk], c0))
            left = [s.id for _, s in rows if s.id not in done]
            if left:
                # The whole chunk is generated again (batched greedy decoding depends, in its last bits,
                # on the batch), but only the rows still missing are written.
                self._chunk(rows, set(left))
                bar.update(len(left))
        bar.close()
        counts = self._counts()
        complete = len(self.sources) == counts["rows"] + counts["failed"]
        self.write_provenance("complete" if complete else "partial", counts)
        if counts["failed"]:
            log.warning("%s: %d rows failed (degenerate twice): see %s", out, counts["failed"], self.files.failures)
        return counts

    def _counts(self) -> dict:
        return {
            "rows": len(read_jsonl_tolerant(self.files.output)),
            "failed": len(read_jsonl_tolerant(self.files.failures)),
            "inputs": len(self.sources),
        }

    def _chunk(self, rows: list[tuple[int, Sample]], write: set[str]) -> None:
        jobs = [(pos, s, part, conv, src) for pos, s in rows for part, conv, src in self.parts(s)]
        seeds = [self.opts.seed + pos for pos, *_ in jobs]
        gens = self.backend.generate([j[3] for j in jobs], self.params, seeds)
        attempts = [1] * len(jobs)
        bad = [i for i, (j, g) in enumerate(zip(jobs, gens)) if self.check(g.text, j[4])]
        first_reasons = {i: self.check(gens[i].text, jobs[i][4]) for i in bad}
        if bad:
            retry = GenParams(self.params.max_new_tokens, self.opts.retry_temperature, 0.95)
            again = self.backend.generate([jobs[i][3] for i in bad], retry, [seeds[i] + RETRY_SEED_OFFSET for i in bad])
            for i, g in zip(bad, again):
                gens[i], attempts[i] = g, 2
        by_row: dict[str, list[int]] = {}
        for i, (_, s, *_rest) in enumerate(jobs):
            by_row.setdefault(s.id, []).append(i)
        for _pos, s in rows:
            if s.id not in write:
                continue
            idx = by_row[s.id]
            reasons = {jobs[i][2]: self.check(gens[i].text, jobs[i][4]) for i in idx}
            if any(reasons.values()):
                append_jsonl(
                    self.files.failures,
                    {
                        "id": s.id,
                        "dataset_type": self.kind,
                        "parts": {
                            jobs[i][2]: {
                                "reason": reasons[jobs[i][2]],
                                "first_reason": first_reasons.get(i),
                                "output": gens[i].text[:2000],
                                "finish_reason": gens[i].finish_reason,
                            }
                            for i in idx
                            if reasons[jobs[i][2]]
                        },
                    },
                )
                continue
            text = {jobs[i][2]: gens[i].text for i in idx}
            prompt = text["prompt"] if self.kind == "paraphrased" else s.prompt
            append_jsonl(
                self.files.output,
                {
                    "id": s.id,
                    "conversations": [prompt, text["response"]],
                    "source": SOURCES[self.kind],
                    "provenance": {
                        "generator": self.settings["generator"]["model"],
                        "backend": self.backend.name,
                        "seed": seeds[idx[0]],
                        "parts": {
                            jobs[i][2]: {
                                "attempt": attempts[i],
                                "finish_reason": gens[i].finish_reason,
                                **(
                                    {
                                        "retry_of": first_reasons[i],
                                        "temperature": self.opts.retry_temperature,
                                        "seed": seeds[i] + RETRY_SEED_OFFSET,
                                    }
                                    if attempts[i] == 2
                                    else {}
                                ),
                            }
                            for i in idx
                        },
                    },
                },
            )


def make_backend(opts: Options, model_name: str, lm: Optional[LoadedModel], cache: dict):
    if opts.backend == "openai":
        return OpenAIBackend(
            model_name, opts.rate_limit, opts.max_retries, opts.retry_backoff, opts.timeout, opts.batch_size
        )
    if lm is None:
        if model_name not in cache:
            cfg = Config(model_name=model_name, device=opts.device)
            cache[model_name] = load_model(cfg, resolve_device(cfg))
        lm = cache[model_name]
    return LocalBackend(lm, opts.batch_size)


def settings_for(kind: str, backend, params: GenParams, opts: Options, extra: dict) -> dict:
    """What decides the rows: a rerun resumes only when these are unchanged. The inputs are hashed whole
    (not just the --limit rows), so a rerun with a larger --limit extends the dataset."""
    s = {
        "dataset_type": kind,
        "generator": backend.describe(),
        "generation": params.to_dict(),
        "seed": opts.seed,
        "retry": {"temperature": opts.retry_temperature, "top_p": 0.95, "seed_offset": RETRY_SEED_OFFSET},
        **extra,
    }
    if kind == "paraphrased":
        s["prompt"] = {
            "system": PARAPHRASE_SYSTEM,
            "user": PARAPHRASE_PROMPT,
            "roles": ROLES,
            "sha256": _sha256(PARAPHRASE_SYSTEM + "\n" + PARAPHRASE_PROMPT),
        }
    else:
        s["prompt"] = "the paraphrased user prompt alone, under the analysed model's chat template (greedy answer)"
    return s


def paraphrased_identity(path: Path, rows: list[Sample]) -> str:
    """What the paraphrased set is: its generation settings when paraphrase.py made it (they stay fixed
    while it is extended), otherwise its content."""
    prov = Sidecars(path).provenance
    if prov.exists():
        return "settings-sha256:" + json_sha256(read_json(prov)["settings"])
    return "content-sha256:" + samples_sha256(rows)


def run(opts: Options, lm: Optional[LoadedModel] = None) -> dict[str, dict]:
    """Build the dataset(s) asked for; returns {dataset type: counts}. ``lm`` replaces model loading
    for the local backend (both roles), for callers that already hold the model."""
    opts.validate()
    all_originals = load_samples(opts.original_data)
    originals = all_originals[: opts.limit] if opts.limit else all_originals
    originals_sha = samples_sha256(all_originals)
    kinds = ["paraphrased", "model-generated"] if opts.dataset_type == "both" else [opts.dataset_type]
    cache: dict = {}
    results = {}
    for kind in kinds:
        output = opts.output(kind)
        if kind == "paraphrased":
            sources = originals
            model_name = opts.paraphraser_model or (EMBEDDED_MODEL if opts.backend == "local" else "gpt-4o-mini")
            params = GenParams(opts.max_new_tokens or 768, opts.temperature, opts.top_p)
            extra = {"original_data": _shown(opts.original_data), "original_sha256": originals_sha}
        else:
            para_path = opts.output("paraphrased")
            if not para_path.exists():
                raise GradsimError(
                    f"the model-generated set needs the paraphrased set, and {para_path} does not exist: "
                    "run paraphrase.py --dataset-type paraphrased first (or --dataset-type both), "
                    "or point --paraphrased-output at an existing paraphrased JSONL"
                )
            wanted = {s.id for s in originals}
            known = {s.id for s in all_originals}
            paraphrased = load_samples(str(para_path))
            stray = [p.id for p in paraphrased if p.id not in known]
            if stray:
                raise GradsimError(
                    f"{para_path}: ids {stray[:3]} have no original in {opts.original_data}: "
                    "the paraphrased set must come from the same originals"
                )
            sources = [p for p in paraphrased if p.id in wanted]
            missing = len(wanted) - len(sources)
            if missing:
                log.warning(
                    "%d of %d originals have no paraphrase in %s (failed or not yet made): skipped",
                    missing,
                    len(wanted),
                    para_path,
                )
            model_name = opts.model
            # Greedy by definition: the model's own most likely answer.
            params = GenParams(opts.max_new_tokens or 512, 0.0, 1.0)
            extra = {
                "original_sha256": originals_sha,
                "paraphrased_data": _shown(para_path),
                "paraphrased_id": paraphrased_identity(para_path, paraphrased),
            }
        backend = make_backend(opts, model_name, lm, cache)
        settings = settings_for(kind, backend, params, opts, extra)
        log.info("building %s -> %s (%s, %d rows)", kind, output, backend.name, len(sources))
        results[kind] = Builder(kind, backend, params, opts, sources, settings, output).run()
        results[kind]["output"] = str(output)
    return results
