#!/usr/bin/env bash
# Everything pkttrace needs on a fresh Debian 12 machine (root, no kernel
# headers): the BPF toolchain, the tools the lab and tests drive, and a venv
# with pkttrace installed from this checkout (which compiles the BPF object
# and ships it inside the package).  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (apt-get, and pkttrace itself needs root)" >&2
  exit 2
fi

APT_PKGS=(clang llvm libbpf-dev libbpf1 bpftool make iproute2 iptables nftables iperf3 iputils-ping util-linux
          python3-venv)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# a real (non-editable) install: proves the wheel carries the BPF object
.venv/bin/python -m pip install -q ".[test]"
# the source tree's object too, for tests that import tracer from the checkout
make -s -C bpf
echo "setup.sh: ready ($(.venv/bin/pkttrace --help >/dev/null && echo pkttrace installed))"
