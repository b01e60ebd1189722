#!/usr/bin/env bash
# Pack what a bare GPU machine lacks for bench/gpu_check.py into DIR (<= 48 MiB):
#
#   bash bench/gpu_bundle.sh DIR
#
#   DIR/wheels/     gradsim as a wheel (uv build), and the small wheels it imports on the run path, at the
#                   versions of this environment (uv.lock's): orjson, python-dotenv, tqdm, psutil, rank-bm25,
#                   traker (--no-deps: it needs only torch, numpy and tqdm). Binary ones for CPython 3.12
#                   manylinux x86_64 (the GPU image's Python) and for this interpreter when it is another.
#                   Never torch, transformers, numpy or safetensors: the machine has its own, and
#                   gpu_check.py puts the bundle on sys.path after the site-packages, so it replaces nothing.
#   DIR/tokenizer/  the embedded SmolLM2 tokenizer and chat template (save_pretrained); models are built from
#                   configs with random weights (bench/make_model.py), so no weights travel.
#   DIR/data/lima_sample/  the bundled sample data.
#   DIR/MANIFEST.json      what is in it, with versions and the bundle's size.
#
# Needs the project environment (uv sync --locked) and pip with access to the package index (pip download);
# the machine that runs the check needs neither. DIR's contents are replaced if it holds an earlier bundle, refused if it
# holds anything else.
set -euo pipefail
DIR=${1:?usage: bash bench/gpu_bundle.sh DIR}
LIMIT=$((48 * 1024 * 1024))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$HOME/.local/bin:$PATH"
cd "$ROOT"

if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR")" ] && [ ! -f "$DIR/.gradsim_bundle" ]; then
  echo "gpu_bundle.sh: $DIR exists and is not an earlier bundle (no .gradsim_bundle): give an empty or new folder" >&2
  exit 2
fi
rm -rf "$DIR/wheels" "$DIR/tokenizer" "$DIR/data" "$DIR/MANIFEST.json"
mkdir -p "$DIR/wheels" "$DIR/tokenizer" "$DIR/data"
touch "$DIR/.gradsim_bundle"
DIR=$(cd "$DIR" && pwd)

# 1. gradsim itself.
uv build --wheel --quiet --out-dir "$DIR/wheels" >&2

# 2. Its run-path dependencies, at this environment's versions (uv sync --locked: uv.lock's).
PY=(uv run --locked --no-sync python)
mapfile -t PINS < <("${PY[@]}" bench/gpu_bundle.py pins orjson python-dotenv tqdm psutil rank-bm25 traker)
PIP=(python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$DIR/wheels")
PLAT=(--implementation cp --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# The local interpreter's binary wheels too when it is not CPython 3.12 (the CPU test's venv uses it).
PYV=$("${PY[@]}" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
for pin in "${PINS[@]}"; do
  if "${PIP[@]}" "${PLAT[@]}" "$pin" 2>/dev/null; then
    if [ "$PYV" != "3.12" ]; then "${PIP[@]}" --implementation cp --python-version "$PYV" "$pin" >&2; fi
  else  # no wheel from the index (traker publishes an sdist only; or no network): the installed pure one
    "${PY[@]}" bench/gpu_bundle.py repack "$pin" "$DIR/wheels"
  fi
done
rm -f "$DIR/wheels/.gitignore"  # written by uv build

# 3. The embedded tokenizer (with its chat template and the revision it came from), and the sample data.
"${PY[@]}" bench/gpu_bundle.py tokenizer "$DIR/tokenizer"
cp -r src/gradsim/bundled/lima_sample "$DIR/data/"

# 4. Manifest, and the size against the limit.
"${PY[@]}" bench/gpu_bundle.py manifest "$DIR" "$LIMIT" "${PINS[@]}"
