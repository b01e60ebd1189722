"""Load LIMA-format data: original samples and their variants (queries), linked by stable ids.

Files: JSON text (JSON Lines or one JSON array of rows, one line or pretty-printed; .jsonl, .json,
.ndjson, optionally .gz/.bz2/.xz; a UTF-8 BOM is skipped) is read here with orjson; any other local
format the ``datasets`` library reads (Parquet, Arrow, CSV/TSV, ...) through ``datasets.load_dataset``
into a temporary cache (offline, nothing written beside the data); a hub id through the hub. JSON text
is not read through ``datasets`` on purpose: importing it alone takes about 2 s (a 48-row file takes
10 ms here), and its json builder infers one Arrow schema for all rows, which does not hold for a file
that mixes LIMA, ShareGPT and messages rows. Either way every row gets the same checks, and the content
hash (samples_sha256) is of the parsed samples, so it does not depend on the file's format.

Accepted row formats (local file or a Hugging Face hub dataset):
- LIMA: ``{"conversations": ["user", "assistant", ...], "id"?: ...}``
- messages (Tulu-v2 mixture): ``{"messages": [{"role": "user", "content": ...}, ...], "id"?: ...}``
- ShareGPT: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}], "id"?: ...}``
  (roles human -> user, gpt -> assistant)
System turns are dropped. Only the first user/assistant exchange is used (the study is single-turn)
unless ``--turns all``: then each row's whole conversation is used, every assistant turn trained and
every other turn masked (encode.py). This holds for the variants (queries) as for the originals: a
variant is encoded with its own whole conversation, usually one exchange (a paraphrase), so an
original's later turns are compared against whatever later turns its variant has, if any. A last
user turn with no answer has no loss and is left out (and counted) either way.
A row without ``id`` gets ``lima_<row index>``.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import orjson

from gradsim.config import PACKAGE_DIR, TURNS
from gradsim.credentials import hf_token, redact
from gradsim.errors import GradsimError, refuse_missing

log = logging.getLogger("gradsim")


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    response: str
    positional_id: bool = field(default=False, compare=False)  # no "id" in the row: lima_<row index>
    # What the row held beyond the sample (the study is single-turn): turns after the first exchange, and
    # system messages. Not part of the sample (nor of its equality or content hash): counted in Dataset.dropped.
    later_turns: int = field(default=0, compare=False)
    system_messages: int = field(default=0, compare=False)
    # The turns after the first exchange, as (role, content), alternating user/assistant (system turns
    # dropped): used by --turns all only, so (like later_turns) not part of equality.
    rest: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def used_rest(self) -> tuple[tuple[str, str], ...]:
        """The later turns --turns all uses: all but a last user turn that has no answer (it has no loss)."""
        return self.rest[: len(self.rest) // 2 * 2]

    def messages(self, turns: str = "first") -> list[dict[str, str]]:
        """The conversation encoded: the first exchange, or (``turns="all"``) every user/assistant turn."""
        first = [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]
        if turns == "first":
            return first
        if turns != "all":
            raise GradsimError(f"unknown --turns {turns!r}: choose one of {', '.join(TURNS)}")
        for k, (role, content) in enumerate(self.used_rest, 3):
            if not isinstance(content, str) or not content.strip():
                raise GradsimError(f"sample {self.id}: turn {k} ({role}) is empty or not text: fix or drop the row")
        return first + [{"role": r, "content": c} for r, c in self.used_rest]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _turns(row: dict, where: str, index: int, sid: str) -> tuple[list[str], list[Any]]:
    """(roles, contents) of a row in any accepted format, system turns included."""
    if "conversations" in row:
        turns = row["conversations"]
        if isinstance(turns, list) and all(isinstance(t, str) for t in turns):  # LIMA
            return ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))], turns
        if isinstance(turns, list) and all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
            unknown = sorted({str(t["from"]) for t in turns if t["from"] not in SHAREGPT_ROLES})
            if unknown:
                raise GradsimError(
                    f"{where}: row {index} ({sid}) has ShareGPT roles {unknown}: use human, gpt (and system)"
                )
            return [SHAREGPT_ROLES[t["from"]] for t in turns], [t["value"] for t in turns]
        raise GradsimError(
            f"{where}: row {index} ({sid}) 'conversations' must be a list of strings (LIMA) "
            "or of {from, value} objects (ShareGPT)"
        )
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise GradsimError(f"{where}: row {index} ({sid}) 'messages' must be a list of {{role, content}} objects")
        return [m["role"] for m in msgs], [m["content"] for m in msgs]
    raise GradsimError(
        f"{where}: row {index} ({sid}) has neither 'conversations' nor 'messages': "
        "use LIMA, ShareGPT or messages format"
    )


def _parse_row(row: Any, where: str, index: int) -> Sample:
    if not isinstance(row, dict):
        raise GradsimError(f"{where}: row {index} is not a JSON object: each line must hold one LIMA row")
    positional = row.get("id") is None
    sid = f"lima_{index}" if positional else str(row["id"])
    roles, contents = _turns(row, where, index, sid)
    kept = [(r, c) for r, c in zip(roles, contents) if r != "system"]
    system = len(roles) - len(kept)
    roles, contents = [r for r, _ in kept], [c for _, c in kept]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if roles != expected:
        raise GradsimError(
            f"{where}: row {index} ({sid}) has roles {roles}, not alternating user/assistant: fix or drop the row"
        )
    if len(contents) < 2:
        raise GradsimError(
            f"{where}: row {index} ({sid}) has no assistant response: each row needs a user and an assistant turn"
        )
    prompt, response = contents[0], contents[1]
    if not isinstance(prompt, str) or not prompt.strip():
        raise GradsimError(f"{where}: row {index} ({sid}) has an empty user prompt: fix or drop the row")
    if not isinstance(response, str) or not response.strip():
        raise GradsimError(f"{where}: row {index} ({sid}) has an empty response: fix or drop the row")
    rest = tuple(zip(roles[2:], contents[2:]))
    return Sample(sid, prompt, response, positional, len(contents) - 2, system, rest)


def _check_utf8(raw: bytes, path: Path) -> None:
    """A file that is not UTF-8: where, in the user's terms (line, column in characters, the byte)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        lineno = raw.count(b"\n", 0, e.start) + 1
        column = len(raw[line_start : e.start].decode("utf-8")) + 1
        raise GradsimError(
            f"{path}: line {lineno} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}): "
            "save the file as UTF-8"
        ) from None


JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = (".gz", ".bz2", ".xz")
TABULAR_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv")  # read through datasets (any other it knows, too)


def _decompress(raw: bytes, path: Path) -> bytes:
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}[path.suffix]
    try:
        return opener(raw)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as e:
        raise GradsimError(f"{path} is not a valid {path.suffix[1:]} file ({e}): check the file") from None


def _read_json_text(path: Path) -> list[Any]:
    """JSON Lines, or one JSON array of rows (on one line or pretty-printed); a UTF-8 BOM is skipped."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise GradsimError(f"cannot read {path} ({e.strerror}): check the path") from None
    if path.suffix in COMPRESSIONS:
        raw = _decompress(raw, path)
    raw = raw.removeprefix(codecs.BOM_UTF8)
    _check_utf8(raw, path)
    if raw.lstrip()[:1] == b"[":
        try:
            rows = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise GradsimError(
                f"{path}:{e.lineno} is not valid JSON ({e.msg} at column {e.colno}): fix the line; "
                "the file must be a JSON array of rows, or JSON Lines"
            ) from None
    else:
        rows = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise GradsimError(
                    f"{path}:{lineno} is not valid JSON ({e}): fix the line; the file must be JSON Lines"
                ) from None
    if not rows:
        raise GradsimError(f"{path} holds no rows: give a JSONL file with one LIMA row per line")
    return rows


def _datasets_builder(path: Path) -> Optional[tuple[str, dict]]:
    """The packaged ``datasets`` builder for a file that is not JSON text, or None."""
    name = path.name.lower()
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    suffix = Path(name).suffix
    if not suffix or suffix in JSON_SUFFIXES:
        return None
    try:
        from datasets.packaged_modules import _EXTENSION_TO_MODULE as known
    except ImportError:  # a datasets without the private table: the common formats
        known = {
            ".parquet": ("parquet", {}),
            ".arrow": ("arrow", {}),
            ".csv": ("csv", {}),
            ".tsv": ("csv", {"sep": "\t"}),
        }
    return known.get(suffix)


def _read_with_datasets(path: Path, builder: str, kwargs: dict) -> list[Any]:
    """Rows of a file in any format ``datasets`` reads, through a temporary cache (nothing is written beside
    the data, nothing is fetched: packaged builders work offline). Columns a row lacks come back as None
    and are dropped, as in JSON."""
    import tempfile

    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="gradsim-data-") as cache:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, **kwargs)
            rows = ds.to_list()
            del ds
    except Exception as e:  # each builder raises its own types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GradsimError(f"cannot read {path} as {builder} ({msg}): check the file, or give it as JSONL") from None
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    rows = [{k: v for k, v in r.items() if v is not None} if isinstance(r, dict) else r for r in rows]
    if not rows:
        raise GradsimError(f"{path} holds no rows: give a file with one LIMA row per record")
    return rows


def _read_local(path: Path) -> list[Any]:
    builder = _datasets_builder(path)
    return _read_json_text(path) if builder is None else _read_with_datasets(path, *builder)


def _load_hub(name: str, turns: str = "first") -> list[Any]:
    """Load a dataset from the Hugging Face hub (GAIR/lima, or a Tulu-style mixture filtered to LIMA)."""
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train", token=hf_token())
    except Exception as e:  # hub errors come in many types; all mean the same to the user
        msg = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise GradsimError(
            f"cannot load dataset {name!r} from the Hugging Face hub ({msg}): give a local JSONL path, "
            "or omit --original-data/--variant-data to use the bundled sample"
        ) from None
    rows = list(ds)
    if rows and "dataset" in rows[0] and "messages" in rows[0]:
        # Tulu-v2 mixture: keep the LIMA subset, and (unless --turns all) drop multi-turn rows as the study did.
        rows = [r for r in rows if str(r.get("dataset", "")).startswith("lima")]
        if turns == "all":
            return rows
        lima = len(rows)
        rows = [r for r in rows if len([m for m in r["messages"] if m["role"] != "system"]) == 2]
        if len(rows) < lima:
            log.info(
                "%s: %d of its %d LIMA rows are multi-turn: skipped, as the study did", name, lima - len(rows), lima
            )
    return rows


def load_samples(source: str, turns: str = "first") -> list[Sample]:
    path = Path(source)
    suffixes = set(path.suffixes) & {*JSON_SUFFIXES, *COMPRESSIONS, *TABULAR_SUFFIXES}
    looks_like_file = bool(suffixes) or path.exists() or source.startswith((".", "/", "~"))
    if looks_like_file:
        path = path.expanduser()
        if not path.exists():
            raise GradsimError(f"data file {source} does not exist: check the path (or use a hub id such as GAIR/lima)")
        rows = _read_local(path)
    else:
        rows = _load_hub(source, turns)
    samples = [_parse_row(r, source, i) for i, r in enumerate(rows)]
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise GradsimError(f"{source}: id {s.id!r} appears twice: ids must be unique")
        seen.add(s.id)
    return samples


def dropped_counts(samples: list[Sample], turns: str = "first") -> dict[str, int]:
    """What the rows of these samples held that the run does not use: system messages, and the turns
    after the first exchange (with ``turns="all"``, only a last user turn that has no answer)."""
    later = [s.later_turns if turns == "first" else len(s.rest) - len(s.used_rest) for s in samples]
    return {
        "rows_with_later_turns": sum(n > 0 for n in later),
        "later_turns": sum(later),
        "rows_with_system_messages": sum(s.system_messages > 0 for s in samples),
        "system_messages": sum(s.system_messages for s in samples),
    }


def log_dropped(source: str, samples: list[Sample], turns: str = "first") -> dict[str, int]:
    counts = dropped_counts(samples, turns)
    if counts["later_turns"] or counts["system_messages"]:
        log.warning(
            "%s: %s: %d of its %d rows have %s (%d turns left out), %d rows have system messages (%d left out)",
            source,
            "only the first exchange of each row is used" if turns == "first" else "every answered turn is used",
            counts["rows_with_later_turns"],
            len(samples),
            "later turns" if turns == "first" else "a last user turn without answer",
            counts["later_turns"],
            counts["rows_with_system_messages"],
            counts["system_messages"],
        )
    return counts


@dataclass
class Dataset:
    originals: list[Sample]
    queries: list[Sample]  # the variants, each linked to the original with the same id
    original_sha256: str = ""
    variant_sha256: str = ""
    # Per file ("original", "variant"), of the samples used: turns and system messages left out (dropped_counts).
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    # --skip-overlong: the ids of the rows left out (run.skip_overlong), by file ("originals", "queries")
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def original_index(self) -> dict[str, int]:
        return {s.id: i for i, s in enumerate(self.originals)}


# The original study's 988 LIMA ids (--ids-file study); where they come from: study_ids/README.md.
STUDY_IDS = PACKAGE_DIR / "study_ids" / "lima_988.txt"


def read_ids(spec: str) -> list[str]:
    """The ids of --ids-file: a file with one id per line (blank lines and # comments skipped), or ``study``."""
    path = STUDY_IDS if spec == "study" else Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GradsimError(f"--ids-file {spec}: cannot be read ({e}): give a file of ids, one per line") from None
    ids = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise GradsimError(f"--ids-file {spec}: holds no id")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise GradsimError(f"--ids-file {spec}: id {dup} is listed twice")
    return ids


def load_dataset(
    original_source: str,
    variant_source: str,
    sample_size: Optional[int] = None,
    turns: str = "first",
    ids_file: Optional[str] = None,
) -> Dataset:
    """The originals and their variants; ``turns`` (--turns) decides what of each row is used (and so
    what the content hashes and the dropped counts cover); ``ids_file`` (--ids-file) keeps only the rows
    with those ids, in the files' order, before ``sample_size`` takes the first of them."""
    if turns not in TURNS:
        raise GradsimError(f"unknown --turns {turns!r}: choose one of {', '.join(TURNS)}")
    originals = load_samples(original_source, turns)
    queries = load_samples(variant_source, turns)
    unnamed = sum(q.positional_id for q in queries)
    if unnamed and len(queries) != len(originals):
        # Ids by row index link the i-th variant to the i-th original: once a row is missing (a failed
        # paraphrase) every later variant would be scored against the wrong original.
        raise GradsimError(
            f"{variant_source}: {unnamed} of its {len(queries)} rows have no 'id', and the originals have "
            f"{len(originals)} rows: linking them by row number would pair variants with the wrong originals; "
            "give every variant the 'id' of its original"
        )
    by_id = {s.id for s in originals}
    for q in queries:
        if q.id not in by_id:
            raise GradsimError(
                f"{variant_source}: variant id {q.id!r} has no original in {original_source}: "
                "the ids must link the files"
            )
    if ids_file is not None:
        wanted = read_ids(ids_file)
        try:
            refuse_missing(wanted, by_id, "ids", f"are not among the originals of {original_source}")
        except GradsimError as e:
            raise GradsimError(f"--ids-file {ids_file}: {e}") from None
        keep = set(wanted)
        originals = [s for s in originals if s.id in keep]
        queries = [q for q in queries if q.id in keep]
    if sample_size is not None:
        originals = originals[:sample_size]
        keep = {s.id for s in originals}
        queries = [q for q in queries if q.id in keep]
    dropped = {
        "original": log_dropped(original_source, originals, turns),
        "variant": log_dropped(variant_source, queries, turns),
    }
    return Dataset(originals, queries, samples_sha256(originals, turns), samples_sha256(queries, turns), dropped)


def samples_sha256(samples: list[Sample], turns: str = "first") -> str:
    """Content hash of the samples used (so results from different paths to the same data still match).
    With ``turns="all"`` a row's later turns are part of it; a single-exchange row hashes the same either way."""
    h = hashlib.sha256()
    for s in samples:
        later = [list(t) for t in s.used_rest] if turns == "all" else []
        h.update(orjson.dumps([s.id, s.prompt, s.response, *([later] if later else [])]) + b"\n")
    return h.hexdigest()


def partition_range(n_queries: int, start: Optional[int], end: Optional[int]) -> tuple[int, int]:
    s = 0 if start is None else start
    e = n_queries if end is None else end
    if s >= e:
        raise GradsimError(f"partition [{s}, {e}) is empty: --partition-start must be below --partition-end")
    if e > n_queries:
        raise GradsimError(
            f"partition [{s}, {e}) lies outside the data ({n_queries} queries): use --partition-end <= {n_queries}"
        )
    return s, e
