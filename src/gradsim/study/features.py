"""Per-sample features (exact gradients or their projections) and the sharded store that holds them.

A featurizer turns an encoded sample into one flat fp32 vector whose layout assigns a contiguous
slice to each parameter matrix. The store writes features in shards (each an .npy written
atomically) with a manifest naming everything that determines the numbers, so a rerun (or another
partition) skips finished shards and never mixes incompatible features.
"""

from __future__ import annotations

import hashlib
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from gradsim.core.gradients import GradientComputer, ParamLayout
from gradsim.data.encode import Encoded
from gradsim.errors import GradsimError
from gradsim.io import atomic_save_npy, atomic_write_json, dir_writable, json_sha256, read_json


class Featurizer(Protocol):
    layout: ParamLayout  # names and the slice of the feature vector of each parameter matrix
    backward_passes: int

    def features(self, enc: Encoded) -> torch.Tensor: ...


class ExactFeaturizer:
    """The full per-sample gradient, unprojected."""

    kind = "exact"

    def __init__(self, model, device, dtype="float32"):
        self.computer = GradientComputer(model, device, dtype)
        self.layout = self.computer.layout

    @property
    def backward_passes(self) -> int:
        return self.computer.backward_passes

    def features(self, enc: Encoded) -> torch.Tensor:
        return self.computer.gradient(enc)


def per_matrix_self_dots(layout: ParamLayout, feats: torch.Tensor) -> np.ndarray:
    """(n, M) squared norm of each matrix's slice, for feats of shape (n, D)."""
    out = np.empty((feats.shape[0], len(layout.names)), dtype=np.float64)
    for m, (_, lo, hi) in enumerate(layout.slices()):
        sl = feats[:, lo:hi]
        out[:, m] = (sl * sl).sum(dim=1, dtype=torch.float64).cpu().numpy()
    return out


def sample_metric(enc: Encoded, seconds: float, device: torch.device, dtype: str, role: str) -> dict:
    cuda = device.type == "cuda"
    return {
        "id": enc.id,
        "role": role,
        "tokens": enc.num_tokens,
        "trained_tokens": enc.num_trained,
        "truncated": enc.truncated,
        "seconds": round(seconds, 4),
        "device": str(device),
        "dtype": dtype,
        "vram_alloc_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1) if cuda else None,
        "vram_reserved_mb": round(torch.cuda.memory_reserved(device) / 2**20, 1) if cuda else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def progress_bar(*args, **kwargs):
    """tqdm; in a log file or CI (stderr not a terminal) one line per finished item, so a log never
    shows a count behind the work done (a Slurm task's log is read while it runs)."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if tty else 0)
    if not tty:
        kwargs.setdefault("miniters", 1)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("file", _Lines(sys.stderr))
    return tqdm(*args, **kwargs)


class _Lines:
    """A stream for tqdm in logs: its carriage-return redraws become one line each."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def manifest_key(manifest: dict) -> str:
    return json_sha256(manifest)[:16]


@dataclass
class FeatureStore:
    root: Path
    manifest: dict
    ids: list[str]
    dim: int
    shard_size: int

    @classmethod
    def open(
        cls, root: Path, manifest: dict, ids: list[str], dim: int, shard_size: int, scratch: bool = False
    ) -> FeatureStore:
        """Open (or create) a store; a scratch store made with other settings is rebuilt, a shared one refused."""
        root = Path(root)
        try:
            return cls._open(root, manifest, ids, dim, shard_size, scratch)
        except PermissionError as e:
            raise GradsimError(
                f"the feature store {root} cannot be created or written ({e.strerror}: {e.filename}): make it "
                "writable, or pass another --output-dir"
            ) from None

    @classmethod
    def _open(cls, root: Path, manifest: dict, ids: list[str], dim: int, shard_size: int, scratch: bool):
        if scratch and (root / "manifest.json").exists():
            old = read_json(root / "manifest.json")
            if old.get("shard_size") != shard_size or old.get("dim") != dim:
                shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        full = dict(
            manifest,
            ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            dim=dim,
            shard_size=shard_size,
            num_samples=len(ids),
        )
        mpath = root / "manifest.json"
        if mpath.exists():
            old = read_json(mpath)
            if old != full:
                diff = sorted(k for k in set(old) | set(full) if old.get(k) != full.get(k))
                raise GradsimError(
                    f"feature store {root} was made with a different configuration ({', '.join(diff)}): "
                    "use another --output-dir or delete that directory"
                )
        else:
            atomic_write_json(mpath, full)
        return cls(root, full, ids, dim, shard_size)

    def missing(self, rows: list[int]) -> list[tuple[int, int]]:
        """The shards holding ``rows`` that are not written yet."""
        wanted = {self.shard_of(r) for r in rows}
        return [(s, e) for (s, e) in self.shard_ranges() if (s, e) in wanted and not self.has_shard(s, e)]

    def check_writable(self, shards: list[tuple[int, int]]) -> None:
        """Refuse, before any is computed, ``shards`` the store would have to add but cannot (read-only)."""
        if shards and not dir_writable(self.root):
            raise GradsimError(
                f"the feature store {self.root} needs {len(shards)} more shards but is not writable: make it "
                "writable (chmod u+w), or pass another --output-dir (a store with every shard may stay read-only)"
            )

    def check_room(self, rows: int, row_bytes: int) -> None:
        """Refuse, before computing them, ``rows`` features (fp32 features and their self-dots) that the
        store's disk cannot hold."""
        need, free = rows * row_bytes, shutil.disk_usage(self.root).free
        if need > free:
            raise GradsimError(
                f"the feature store {self.root} needs {need / 2**30:.2f} GB more ({rows} samples x {self.dim} dims "
                f"x 4 bytes) and its disk has {free / 2**30:.2f} GB free: free some space, pass another "
                "--output-dir, or give a smaller --proj-dim"
            )

    def shard_ranges(self) -> list[tuple[int, int]]:
        n = len(self.ids)
        return [(s, min(s + self.shard_size, n)) for s in range(0, n, self.shard_size)]

    def _path(self, s: int, e: int, what: str) -> Path:
        return self.root / f"{what}_{s:06d}_{e:06d}.npy"

    def has_shard(self, s: int, e: int) -> bool:
        return self._path(s, e, "features").exists() and self._path(s, e, "selfdots").exists()

    def write_shard(self, s: int, e: int, feats: np.ndarray, selfdots_of: Callable[[np.ndarray], np.ndarray]) -> None:
        """Store rows [s, e): their features, and ``selfdots_of(features)``.

        No lock is needed (partitions of one campaign share the store and may write one shard at once):
        each file appears whole or not at all (rename), the first features written win (exclusive
        create; a later writer's, equal up to rounding, are dropped) and the self-dots are computed from
        the features that won, so a shard's two files always agree, whoever wrote them. A shard is
        complete once both exist (has_shard): features without self-dots, left by a kill, are finished
        by the next writer from the features already there."""
        path = self._path(s, e, "features")
        if not atomic_save_npy(path, feats, exclusive=True):
            feats = np.load(path)
        atomic_save_npy(self._path(s, e, "selfdots"), selfdots_of(feats), exclusive=True)

    def read_features(self, s: int, e: int) -> np.ndarray:
        return np.load(self._path(s, e, "features"), mmap_mode="r")

    def read_selfdots(self, s: int, e: int) -> np.ndarray:
        return np.load(self._path(s, e, "selfdots"))

    def shard_of(self, i: int) -> tuple[int, int]:
        s = (i // self.shard_size) * self.shard_size
        return s, min(s + self.shard_size, len(self.ids))


def featurize(featurizer, encs: list[Encoded], device, dtype: str, role: str, progress=None, finite=None):
    """Features of several samples as an (n, D) fp32 CPU array plus per-sample metrics.

    Featurizers with ``features_batch`` take ``batch_size`` samples per forward/backward; a sample's
    seconds are then its batch's time split evenly. Each batch is checked finite where it is made
    (``finite``, a finite.FiniteCheck: by default a non-finite feature stops the run).
    """
    from gradsim.core.finite import FiniteCheck

    finite = finite if finite is not None else FiniteCheck(dtype=dtype)
    d = featurizer.layout.total
    out = np.empty((len(encs), d), dtype=np.float32)
    metrics = []
    step = getattr(featurizer, "batch_size", 1) if hasattr(featurizer, "features_batch") else 1
    for b0 in range(0, len(encs), step):
        batch = encs[b0 : b0 + step]
        t0 = time.perf_counter()
        feats = featurizer.features_batch(batch) if step > 1 else featurizer.features(batch[0])[None]
        finite.rows(featurizer.layout, feats.detach(), [e.id for e in batch], role)
        out[b0 : b0 + len(batch)] = feats.detach().float().cpu().numpy()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - t0) / len(batch)
        for enc in batch:
            metrics.append(sample_metric(enc, seconds, device, dtype, role))
            if progress is not None:
                progress.update(1)
        if progress is not None and device.type == "cuda":
            m = metrics[-1]
            progress.write(f"[GPU] device={device} allocMB={m['vram_alloc_mb']} reservedMB={m['vram_reserved_mb']}")
    return out, metrics
