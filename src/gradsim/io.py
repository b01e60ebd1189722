"""Atomic output writing: every result file appears whole or not at all (temp file + rename), and the
one spelling of JSON that is hashed (sorted keys).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import orjson

from gradsim.errors import GradsimError

JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2


def ensure_writable_dir(path: Path) -> Path:
    """Check that ``path`` can be created and written, without creating anything yet."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a directory" if not probe.is_dir() else "is not writable"
        raise GradsimError(f"output directory {path} cannot be written ({probe} {why}): pass a writable --output-dir")
    return path


@contextmanager
def naming(path: Path):
    """An OSError of a write (a full disk: write() names no file) raised with ``path`` as its filename."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def dir_writable(path: Path) -> bool:
    """Whether a file can be created in the directory ``path`` (tried: os.access misjudges read-only mounts
    for root, ACLs and network file systems)."""
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".gradsim-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_writer(path: Path, exclusive: bool = False, outcome: Optional[list] = None):
    """A binary file handle whose content replaces ``path`` only when the block finishes without error.

    ``exclusive``: publish it only if ``path`` does not exist yet (a hard link, which fails if another
    process got there first; then that file stays and this content is dropped). ``outcome``: a list
    that gets True if this content was published, False if it was dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with naming(path), os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: collaborators should read results as usual
        published = True
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                published = False
        if outcome is not None:
            outcome.append(published)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any, indent: bool = True) -> None:
    atomic_write_bytes(path, orjson.dumps(obj, option=JSON_OPTS if indent else orjson.OPT_SERIALIZE_NUMPY))


def load_or_create_json(path: Path, create: Callable[[], Any]) -> Any:
    """The JSON at path; if absent, create() it and write it with an exclusive create, so concurrent
    processes (Slurm partitions) that race all end up using the one file that won."""
    path = Path(path)
    if not path.exists():
        data = create()
        with atomic_writer(path, exclusive=True) as f:
            f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return read_json(path)


def sorted_json(obj: Any) -> bytes:
    """Compact JSON with sorted keys: the same bytes for equal dicts, whatever their insertion order."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def json_sha256(obj: Any) -> str:
    """sha256 (hex) of sorted_json(obj): what identifies a manifest, an allocation or a set of settings."""
    return hashlib.sha256(sorted_json(obj)).hexdigest()


def atomic_write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    atomic_write_bytes(path, b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in rows))


def atomic_save_npy(path: Path, arr: np.ndarray, exclusive: bool = False) -> bool:
    """Write arr to path atomically; ``exclusive``: only if path does not exist yet. Whether it was written."""
    outcome: list[bool] = []
    with atomic_writer(path, exclusive, outcome) as f:
        np.save(f, np.ascontiguousarray(arr))
    return outcome[0]


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_writer(path) as f:
        np.savez(f, **arrays)


def append_jsonl(path: Path, row: Any) -> None:
    """Append one line and fsync: used for resumable progress logs (a torn last line is ignored on read)."""
    with naming(path), open(path, "ab") as f:
        f.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_tolerant(path: Path) -> list[Any]:
    """Read a progress log, dropping a final line torn by a kill mid-write."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            break
    return rows


def read_json(path: Path) -> Any:
    return orjson.loads(Path(path).read_bytes())


def load_json(path: Path, fix: str) -> Any:
    """The JSON at ``path``; a file cut short or damaged (not valid JSON) is refused naming it and ``fix``
    (what to do, e.g. "delete it and rerun the partition")."""
    try:
        return read_json(path)
    except orjson.JSONDecodeError:
        raise GradsimError(f"{path} is truncated or damaged (not valid JSON): {fix}") from None


def load_npz(path: Path, fix: str, read: bool = True) -> dict[str, np.ndarray]:
    """Every array of the .npz at ``path``, read now (``read`` False: only its index, which a file cut short
    lacks); a file cut short or damaged is refused naming it and ``fix``."""
    import zipfile

    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files} if read else {}
    except FileNotFoundError:
        raise GradsimError(f"{path} is missing: {fix}") from None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise GradsimError(f"{path} is truncated or damaged ({type(e).__name__}): {fix}") from None
