"""Helpers of bench/gpu_bundle.sh (run in the project environment): the pins, a wheel repacked from an
installed pure-Python distribution, the tokenizer, and the manifest with the bundle's size.

    python bench/gpu_bundle.py pins NAME...          # NAME==VERSION of this environment, one a line
    python bench/gpu_bundle.py repack NAME==VERSION DIR
    python bench/gpu_bundle.py tokenizer DIR
    python bench/gpu_bundle.py manifest DIR LIMIT_BYTES PIN...
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
import zipfile
from importlib.metadata import distribution, version
from pathlib import Path


def pins(names: list[str]) -> None:
    for name in names:
        print(f"{name}=={version(name)}")


def repack(pin: str, dest: Path) -> Path:
    """A py3-none-any wheel of an installed pure-Python distribution (for one the index has no wheel of:
    traker publishes an sdist only; or any pure one when the index cannot be reached), from its RECORD'ed
    files."""
    name, want = pin.split("==")
    dist = distribution(name)
    if dist.version != want:
        sys.exit(f"{name} {dist.version} is installed, not {want}: run uv sync --locked")
    if "Root-Is-Purelib: true" not in (dist.read_text("WHEEL") or ""):
        sys.exit(
            f"no {pin} wheel for CPython 3.12 manylinux x86_64 came from the package index (is it reachable? "
            "`python3 -m pip download` needs it), and the installed one is not pure Python, so it cannot be repacked"
        )
    base = f"{dist.metadata['Name'].replace('-', '_')}-{want}"
    info = f"{base}.dist-info"
    out = dest / f"{base}-py3-none-any.whl"
    rows = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files or []:
            parts = f.parts
            if parts[0] == ".." or f.suffix == ".pyc":  # scripts outside site-packages, bytecode
                continue
            if parts[0].endswith(".dist-info"):
                if f.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "uv_build.json"):
                    continue
                arc = "/".join((info, *parts[1:]))
            else:
                arc = "/".join(parts)
            data = Path(dist.locate_file(f)).read_bytes()
            z.writestr(arc, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append((arc, f"sha256={digest}", str(len(data))))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([*rows, (f"{info}/RECORD", "", "")])
        z.writestr(f"{info}/RECORD", buf.getvalue())
    print(f"repacked the installed {name} as {out.name}", file=sys.stderr)
    return out


def tokenizer(dest: Path) -> None:
    """The embedded SmolLM2 tokenizer with its chat template, and the revision it came from."""
    from transformers import AutoTokenizer

    from gradsim.core.model import embedded_model_dir

    path, _revision = embedded_model_dir()
    AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(dest))
    shutil.copy(Path(path) / "gradsim_revision.txt", dest / "gradsim_revision.txt")


def manifest(d: Path, limit: int, pinned: list[str]) -> int:
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    size = sum(p.stat().st_size for p in files)
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    m = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": commit,
        "pins": pinned,
        "wheels": [p.name for p in sorted((d / "wheels").glob("*.whl"))],
        "tokenizer_revision": (d / "tokenizer" / "gradsim_revision.txt").read_text().strip(),
        "files": len(files),
        "bytes": size,
        "limit_bytes": limit,
    }
    (d / "MANIFEST.json").write_text(json.dumps(m, indent=1) + "\n")
    for w in m["wheels"]:
        print(f"  {w}", file=sys.stderr)
    print(f"bundle {d}: {len(files)} files, {size / 2**20:.2f} MiB (limit {limit / 2**20:.0f} MiB)")
    if size > limit:
        print(f"gpu_bundle.sh: {size / 2**20:.2f} MiB is over the {limit / 2**20:.0f} MiB limit", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    if cmd == "pins":
        pins(rest)
    elif cmd == "repack":
        repack(rest[0], Path(rest[1]))
    elif cmd == "tokenizer":
        tokenizer(Path(rest[0]))
    elif cmd == "manifest":
        return manifest(Path(rest[0]), int(rest[1]), rest[2:])
    else:
        sys.exit(f"unknown command {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
