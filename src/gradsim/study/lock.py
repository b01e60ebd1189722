"""One process at a time per query range of a run: a lock file beside its progress log.

Two runs of the same range would share its progress log, block files and scratch folder: one could
adopt the other's live progress, or delete its scratch when it finishes. The lock file holds JSON
{pid, host, started, slurm_job} naming its holder, and is held with fcntl.flock (released by the kernel when
the process dies, however it dies; a killed run leaves the file behind). A second run is refused with a
message naming the holder. A lock left behind by a dead process is taken over with a warning: on this
host when its flock is free or its pid is gone; on any host when it names this same Slurm job (a
requeued task: Slurm runs one attempt of a job at a time), or a Slurm job that squeue says is no longer
running (a cancelled task resubmitted to another node). Any other lock from another host is refused,
since that process cannot be checked from here (and flock may not reach across nodes of a cluster file
system): the message says to remove the file if that process is dead. A run ended by SIGTERM (scancel)
releases its locks like one that fails (exit_on_sigterm); only SIGKILL leaves a lock file behind.

Shared feature stores are not locked: partitions of one campaign write them at once, one shard per
file, safely (FeatureStore.write_shard).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import orjson

from gradsim.errors import GradsimError

log = logging.getLogger("gradsim")

# flock errors that mean "this file system does not do flock", not "someone holds it"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def slurm_job() -> Optional[str]:
    """This process's Slurm job (an array task as JOB_TASK), the same in every attempt of a requeued job."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


# squeue states of a job whose processes may still run
_LIVE_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}


def slurm_job_ended(job: str) -> bool:
    """Whether squeue says Slurm job ``job`` runs no more (False when squeue cannot tell)."""
    import shutil
    import subprocess

    if not job or shutil.which("squeue") is None:
        return False
    try:
        p = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    if p.returncode != 0:
        return "invalid job id" in p.stderr.lower()  # long gone from the controller's memory
    return not {line.strip() for line in p.stdout.splitlines()} & _LIVE_STATES


def _holder(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    if not raw.strip():
        return None  # free (or its holder is about to write itself in)
    try:
        h = orjson.loads(raw)
    except orjson.JSONDecodeError:
        h = None
    return h if isinstance(h, dict) else {}  # foreign content: held by someone unknown


def _refuse(path: Path, h: Optional[dict], what: str) -> GradsimError:
    h = h or {}
    who = f"process {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('started', '?')}"
    return GradsimError(
        f"{what} is in use by {who} (lock {path}): wait for that run to finish, "
        "or remove the lock file if that process is dead"
    )


def acquire(path: Path, what: str) -> int:
    """Take the lock at ``path`` (created if absent); returns its open descriptor, to pass to release()."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    job = slurm_job()
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _refuse(path, _holder(fd), what) from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                flocked = False  # the holder's pid and host decide alone
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder released (removed) it while we opened it: try the new one
                os.close(fd)
                continue
            h = _holder(fd)
            if h is not None:
                pid = h.get("pid")
                # On this host a free flock means its holder is gone (a live one, even this process
                # through another descriptor, would hold it); without flock, the pid tells.
                here = h.get("host") == host and isinstance(pid, int)
                theirs = h.get("slurm_job")
                dead = (
                    (here and (flocked or not _alive(pid)))
                    or (job is not None and theirs == job)
                    or (isinstance(theirs, str) and slurm_job_ended(theirs))
                )
                if not dead:
                    # flock held, yet a live holder named (another host, or no flock here): refuse
                    raise _refuse(path, h, what)
                log.warning(
                    "taking over the lock %s of process %s on %s (started %s), which is no longer running",
                    path,
                    pid,
                    h.get("host"),
                    h.get("started"),
                )
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            me = {"pid": os.getpid(), "host": host, "started": now, "slurm_job": job}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, orjson.dumps(me) + b"\n")
            os.fsync(fd)
            if not flocked:
                log.debug("no flock on %s: the lock relies on its holder's pid and host", path)
            return fd
        except BaseException:
            os.close(fd)
            raise
    raise GradsimError(f"could not take the lock {path} (it kept changing hands): retry in a moment")


def release(path: Path, fd: int) -> None:
    """Remove the lock file (while still holding it, so no one takes a file about to vanish) and let go."""
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


@contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold the lock at ``path`` for the block; released on exit, error or interrupt alike."""
    fd = acquire(path, what)
    try:
        yield
    finally:
        release(path, fd)


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM (scancel, a node's shutdown) ends the process through the usual
    exit path, so its locks are released (Python's default dies on the spot). Only where SIGTERM has
    its default handling: a handler someone else set (submitit's) is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not (
        signal.SIG_DFL
    ):
        yield
        return

    def stop(signum, frame):
        log.warning("SIGTERM: stopping; rerun the same command to resume")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
