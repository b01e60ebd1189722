"""The original study's published numbers as a gradsim run: ``gradsim import-study``.

The study (AMD-OLMo-1B-SFT on 988 LIMA queries, 5 candidates each) published, per setting, JSON files
of every (query, candidate, parameter matrix) gradient dot product and every sample's per-matrix self
dot product, in query ranges ("parts") or as one combined file each:

    dot_products[_part_<a>_<b>].json              {query id: {candidate id: {matrix: dot}}}
    original_dot_products[_part_<a>_<b>].json     {candidate id: {matrix: self dot}}  (the range's candidates)
    paraphrased_dot_products[_part_<a>_<b>].json  {query id: {matrix: self dot}}      (also in model-generated)

They are read one file at a time (orjson), checked, and written as the run folder ``gradsim run`` writes
(run.assemble and run.write_outputs): ``<output-dir>/<computation-type>/<setting>/`` for both the cosine
and the dot-product view, with ``study_import`` in results.json saying where the numbers came from.
The true original is the candidate whose id is the query's; it becomes column 0 (gradsim's convention),
the others keep their order. Cosines are formed in float64 from the dots and self dots as published;
a candidate's self dot is taken from its own range's file (they differ slightly between ranges).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import orjson

from gradsim.config import COMPUTATION_TYPES, SETTINGS, Config, Provenance
from gradsim.data.load import Dataset, Sample
from gradsim.errors import GradsimError
from gradsim.io import ensure_writable_dir, json_sha256, read_json
from gradsim.layout import RunPaths, run_dir
from gradsim.options import option

_FILE = re.compile(
    r"^(?P<kind>dot_products|original_dot_products|paraphrased_dot_products|model_generated_dot_products)"
    r"(?:_part_(?P<a>\d+)_(?P<b>\d+))?\.json$"
)
QUERY_SELF_KINDS = ("paraphrased_dot_products", "model_generated_dot_products")
# Shapes of the models whose study files gradsim knows (their Hugging Face configs' sizes): entries per matrix.
KNOWN_SHAPES = {"amd/AMD-OLMo-1B-SFT": {"hidden_size": 2048, "intermediate_size": 8192, "vocab_size": 50304}}
RULE = (
    "cosine = dot / sqrt(query self * candidate self) in float64, per matrix and over any subset; the true "
    "original is the candidate whose id is the query's (column 0 here); the candidates' self dots are their "
    "own range's"
)


@dataclass(frozen=True)
class PartFiles:
    """The three files of one query range [start, end) (None: a combined file, all queries)."""

    start: Optional[int]
    end: Optional[int]
    dots: Path
    candidate_self: Path
    query_self: Path


@dataclass
class Study:
    """The checked numbers of one setting, in query order: (Q, C, M) dots and candidate self dots with the
    true original at column 0, (Q, M) query self dots."""

    names: list[str]
    query_ids: list[str]
    candidates: list[list[str]]
    dots: np.ndarray
    qself: np.ndarray
    cself: np.ndarray
    ranges: list[tuple[int, int]]  # each part's queries [start, end) in this order
    files: list[dict]  # name, sha256, bytes of every file read
    listed_first: int  # queries whose true original the files list first


def find_parts(path: Path) -> list[PartFiles]:
    """The study's files under ``path``: its parts in query order, or its combined files."""
    if not path.is_dir():
        raise GradsimError(f"{path} is not a folder: give the folder of the study's dot-product files")
    found: dict[tuple, dict[str, Path]] = {}
    for f in path.iterdir():
        m = _FILE.match(f.name)
        if m:
            key = (int(m["a"]), int(m["b"])) if m["a"] is not None else (None, None)
            kind = "query_self" if m["kind"] in QUERY_SELF_KINDS else m["kind"]
            found.setdefault(key, {})[kind] = f
    if not found:
        raise GradsimError(f"{path}: no dot_products[_part_<a>_<b>].json files: give the folder of the study's files")
    parts = {k: v for k, v in found.items() if k != (None, None)} or found  # parts when there are any
    out = []
    for (a, b), kinds in sorted(parts.items(), key=lambda kv: kv[0][0] or 0):
        missing = [k for k in ("dot_products", "original_dot_products", "query_self") if k not in kinds]
        if missing:
            what = {"query_self": "paraphrased_dot_products"}
            tag = f"_part_{a}_{b}" if a is not None else ""
            raise GradsimError(f"{path}: {', '.join(what.get(k, k) + tag + '.json' for k in missing)} missing")
        out.append(PartFiles(a, b, kinds["dot_products"], kinds["original_dot_products"], kinds["query_self"]))
    ranges = [(p.start, p.end) for p in out if p.start is not None]
    pos = 0
    for a, b in ranges:
        if a != pos or b <= a:
            raise GradsimError(f"{path}: parts do not tile the queries: expected a part from {pos}, got [{a}, {b})")
        pos = b
    return out


def load_file(path: Path, files: list[dict]) -> Any:
    """One study file, parsed; its name, sha256 and size appended to ``files``."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise GradsimError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise GradsimError(f"{path}: not valid JSON (truncated or corrupt?): {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise GradsimError(f"{path}: expected a JSON object keyed by sample id")
    files.append({"file": path.name, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)})
    return data


def matrix_values(entry: Any, names: list[str], where: str, positive: bool = False) -> list[float]:
    """An entry {matrix: number} as a list in ``names``' order, refused if its matrices differ or (self
    dots, ``positive``) a value is not a positive number."""
    if not isinstance(entry, dict):
        raise GradsimError(f"{where}: expected an object of per-matrix numbers")
    if entry.keys() != set(names):
        missing, extra = sorted(set(names) - entry.keys()), sorted(entry.keys() - set(names))
        raise GradsimError(
            f"{where}: its matrices differ from the first entry's ({len(missing)} missing, e.g. "
            f"{(missing or ['-'])[0]}; {len(extra)} extra, e.g. {(extra or ['-'])[0]})"
        )
    out = [entry[n] for n in names]
    for n, v in zip(names, out):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise GradsimError(f"{where}: {n} is {v!r}, not a finite number")
        if positive and v <= 0:
            raise GradsimError(f"{where}: self dot product of {n} is {v!r}; it must be positive")
    return out


def read_study(path: Path) -> Study:
    """Every part of the study under ``path``, read one file at a time and checked (module docstring)."""
    parts = find_parts(path)
    names: list[str] = []
    files: list[dict] = []
    seen: dict[str, str] = {}
    qids, cands, dots, qself, cself, ranges, first = [], [], [], [], [], [], 0
    for part in parts:
        d = load_file(part.dots, files)
        if part.start is not None and len(d) != part.end - part.start:
            raise GradsimError(f"{part.dots}: {len(d)} queries, but its name says [{part.start}, {part.end})")
        start = len(qids)
        for qid, row in d.items():
            where = f"{part.dots.name}: query {qid}"
            if qid in seen:
                raise GradsimError(f"{where}: duplicate query id (also in {seen[qid]})")
            seen[qid] = part.dots.name
            if not isinstance(row, dict) or qid not in row:
                raise GradsimError(f"{where}: its true original {qid} (the candidate with its id) is not a candidate")
            if cands and len(row) != len(cands[0]):
                raise GradsimError(f"{where}: {len(row)} candidates, the first query has {len(cands[0])}")
            if not names:
                names = list(row[qid]) if isinstance(row[qid], dict) else []
            first += next(iter(row)) == qid
            order = [qid, *(c for c in row if c != qid)]
            qids.append(qid)
            cands.append(order)
            dots.append(np.array([matrix_values(row[c], names, f"{where}, candidate {c}") for c in order]))
        del d
        own = load_file(part.candidate_self, files)
        for order in cands[start:]:
            for c in order:
                if c not in own:
                    raise GradsimError(f"{part.candidate_self.name}: candidate {c} has no self dot product")
            cself.append(
                np.array([matrix_values(own[c], names, f"{part.candidate_self.name}: {c}", True) for c in order])
            )
        del own
        qs = load_file(part.query_self, files)
        for qid in qids[start:]:
            if qid not in qs:
                raise GradsimError(f"{part.query_self.name}: query {qid} has no self dot product")
            qself.append(np.array(matrix_values(qs[qid], names, f"{part.query_self.name}: {qid}", True)))
        del qs
        ranges.append((start, len(qids)))
    if not qids:
        raise GradsimError(f"{path}: the study's files hold no query")
    # Each file is parsed, checked and turned into float64 rows before the next is read: memory is one file
    # plus the (Q, C, M) arrays.
    return Study(names, qids, cands, np.stack(dots), np.stack(qself), np.stack(cself), ranges, files, first)


def model_from_path(path: Path) -> Optional[str]:
    """The model a study folder names: ``.../<org>/<name>/sample_size/<size>``."""
    parts = path.resolve().parts
    if "sample_size" in parts:
        i = parts.index("sample_size")
        if i >= 2:
            return f"{parts[i - 2]}/{parts[i - 1]}"
    return None


def matrix_numel(names: list[str], model: str, config_file: Optional[str]) -> list[int]:
    """Entries of each matrix, from the model's shape (KNOWN_SHAPES, or a Hugging Face config.json)."""
    try:
        shape = read_json(config_file) if config_file else KNOWN_SHAPES.get(model)
    except (OSError, ValueError) as e:
        raise GradsimError(f"--model-config {config_file}: cannot be read as JSON ({e})") from None
    if config_file and not all(k in shape for k in ("hidden_size", "intermediate_size", "vocab_size")):
        raise GradsimError(f"--model-config {config_file}: needs hidden_size, intermediate_size and vocab_size")
    if shape is None:
        raise GradsimError(
            f"gradsim does not know the matrix shapes of {model}: give its Hugging Face config.json with --model-config"
        )
    from gradsim.core.metrics import component_of

    h, inter = shape["hidden_size"], shape["intermediate_size"]
    vocab = shape.get("embedding_size") or shape["vocab_size"]
    heads = shape.get("num_attention_heads") or 1
    kv = h * (shape.get("num_key_value_heads") or heads) // heads
    size = {"q": h * h, "k": h * kv, "v": h * kv, "o": h * h, "gate": h * inter, "up": h * inter}
    size.update(down=h * inter, embedding=vocab * h, norm=h)
    out = []
    for n in names:
        c = component_of(n)
        if c not in size:
            raise GradsimError(f"matrix {n}: gradsim cannot tell its shape from the model's config")
        out.append(int(size[c]))
    return out


def study_dataset(study: Study, path: Path) -> Dataset:
    """Ids only (the study published no text): the queries in order, the originals those first."""
    originals = list(dict.fromkeys([*study.query_ids, *(c for row in study.candidates for c in row)]))
    return Dataset(
        [Sample(i, "", "") for i in originals],
        [Sample(i, "", "") for i in study.query_ids],
        json_sha256(sorted(originals)),  # of the originals' ids: the same for both settings
        json_sha256(study.files),
    )


def imported_parts(study: Study, path: Path, setting: str, computation_type: str, opts) -> list:
    """One run.Part per range written (the whole run, or with ``opts.partitions`` each part), whose
    parameter sizes come from the model's shape rather than a loaded model."""
    from gradsim.core.model import LoadedModel
    from gradsim.study.run import Part, code_version

    @dataclass
    class ImportedPart(Part):
        sizes: tuple = ()

        def parameter_sizes(self):
            return self.sizes

    model = opts.model or model_from_path(path)
    if model is None:
        raise GradsimError(f"{path} does not name the model (.../<org>/<name>/sample_size/...): give --model")
    sizes = (study.names, matrix_numel(study.names, model, opts.model_config))
    data = study_dataset(study, path)
    cfg = Config(
        setting=setting,
        computation_type=computation_type,
        model_name=model,
        chat_template="tulu",
        candidates="bm25",
        top_k=study.dots.shape[1] - 1,
        original_data=str(path),
        variant_data=str(path),
        output_dir=str(opts.output_dir),
        baselines=False,
        extra={"imported_from": "study"},
    )
    prov = Provenance(None, None, code_version(), data.original_sha256, data.variant_sha256, None)
    lm = LoadedModel(None, None, model, None, None, None, 0)
    index = {s.id: j for j, s in enumerate(data.originals)}
    n = len(study.query_ids)
    ranges = study.ranges if opts.partitions else [(0, n)]
    out = []
    for s, e in ranges:
        p = ImportedPart(cfg, prov, lm, data, s, e, RunPaths(run_dir(cfg), s, e, bool(opts.partitions)), sizes=sizes)
        p.cut = {"queries": set(), "originals": set()}
        p.cands = [[index[c] for c in study.candidates[qi]] for qi in range(s, e)]
        p.done = {q: {"dots": study.dots[q], "qself": study.qself[q], "cself": study.cself[q]} for q in range(s, e)}
        out.append(p)
    return out


def provenance(study: Study, path: Path, model: str) -> dict:
    return {
        "source": str(path.resolve()),
        "model": model,
        "files": study.files,
        "files_sha256": json_sha256(study.files),
        "queries": len(study.query_ids),
        "candidates_per_query": int(study.dots.shape[1]),
        "matrices": len(study.names),
        "true_original_listed_first": study.listed_first,
        "rule": RULE,
        "ids_note": "the study published no text: config's original/variant data sha256 are of the ids and files",
    }


def import_study(path: Path, setting: str, opts) -> list[dict]:
    """Read and check the study under ``path``, then write its cosine and dot-product runs; the results as
    stored. Nothing is written unless every file passed its checks."""
    from gradsim.study.run import assemble, write_outputs

    path = Path(path)
    if setting not in SETTINGS:
        raise GradsimError(f"unknown --setting {setting!r}: choose one of {', '.join(SETTINGS)}")
    study = read_study(path)
    ensure_writable_dir(Path(opts.output_dir))
    plans = []
    for ct in COMPUTATION_TYPES:
        parts = imported_parts(study, path, setting, ct, opts)
        for p in parts:
            if p.paths.results.exists():
                old = (read_json(p.paths.results).get("study_import") or {}).get("files_sha256")
                if old != json_sha256(study.files):
                    raise GradsimError(
                        f"{p.paths.results} exists and is not an import of these files: use another --output-dir"
                    )
        plans.append(parts)
    results = []
    for parts in plans:
        for p in parts:
            result = assemble(p, {}, None)
            result["study_import"] = provenance(study, path, p.cfg.model_name)
            write_outputs(p, result)
            results.append(read_json(p.paths.results))
    return results


@dataclass
class ImportOptions:
    """The options of gradsim import-study."""

    path: str = option(
        "the folder of the study's files (dot_products_part_<a>_<b>.json, original_dot_products_part_..., "
        "paraphrased_dot_products_part_..., or the combined files)",
        positional=True,
    )
    setting: str = option("which setting the files are of", choices=SETTINGS)
    output_dir: str = option("where the runs go: <output-dir>/<computation-type>/<setting>/")
    model: Optional[str] = option(
        "the model the numbers are of", default=None, default_help="named in PATH: .../<org>/<name>/sample_size/..."
    )
    model_config: Optional[str] = option(
        "a Hugging Face config.json giving the matrices' shapes, for a model gradsim has no shapes of", default=None
    )
    partitions: bool = option(
        "write each part as a partition of the run (gradsim combine merges them)", default=False, const=True
    )
