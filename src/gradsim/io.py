"""Atomic output writing: every result file appears whole or not at all (temp file + rename)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import orjson

from .errors import GradsimError

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
def atomic_writer(path: Path):
    """A binary file handle whose content replaces ``path`` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any, indent: bool = True) -> None:
    atomic_write_bytes(path, orjson.dumps(obj, option=JSON_OPTS if indent else orjson.OPT_SERIALIZE_NUMPY))


def atomic_write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    atomic_write_bytes(path, b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in rows))


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_writer(path) as f:
        np.save(f, np.ascontiguousarray(arr))


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_writer(path) as f:
        np.savez(f, **arrays)


def append_jsonl(path: Path, row: Any) -> None:
    """Append one line and fsync: used for resumable progress logs (a torn last line is ignored on read)."""
    with open(path, "ab") as f:
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
