#!/usr/bin/env bash
# Release artefacts: the sdist, then FROM it (proving it is complete) one
# wheel per architecture, each carrying the BPF object built for it
# (bpf/Makefile: only the kprobe programs differ).  Cross builds need
# nothing more than clang: the BPF target is the same, only macros change.
#
#   scripts/build-wheels.sh [OUTDIR]      # default dist/
#   -> pkttrace-V.tar.gz, pkttrace-V-py3-none-linux_x86_64.whl,
#      pkttrace-V-py3-none-linux_aarch64.whl
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
PY=${PYTHON:-.venv/bin/python}     # needs the `build` package (the test extra)
mkdir -p "$out"
version=$("$PY" -c 'import re; print(re.search(r"__version__ = \"(.+)\"", open("tracer/version.py").read())[1])')
rm -f "$out/pkttrace-$version.tar.gz" "$out/pkttrace-$version"-*.whl
log=$(mktemp) src=$(mktemp -d) && trap 'rm -rf "$log" "$src"' EXIT
quiet() { "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "build-wheels.sh: failed: $*" >&2; exit 1; }; }
# The sdist from the files git tracks (as they are in the work tree), not
# from the checkout: setuptools adds whatever a stale pkttrace.egg-info/
# SOURCES.txt lists, which would hide a file MANIFEST.in forgot.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    xargs -0 cp -a --parents -t "$src"
else
  cp -a . "$src"
fi
quiet "$PY" -m build --sdist -o "$out" "$src"
for plat in linux_x86_64 linux_aarch64; do
  quiet "$PY" -m build --wheel -o "$out" "-C--build-option=--plat-name=$plat" "$out/pkttrace-$version.tar.gz"
done
ls -1 "$out/pkttrace-$version.tar.gz" "$out/pkttrace-$version"-*.whl
