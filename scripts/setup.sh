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

# systemd: systemd-analyze (the unit file test); prometheus: prometheus and
# promtool (the exporter's integration tests start a private server);
# openssl: certificates for the TLS tests; groff-base, man-db: the man page
# tests; linux-libc-dev: the syscall-number table checked against its headers;
# systemd-container: systemd-nspawn boots the unit under a real systemd
# (tests/integration/test_systemd_nspawn.py, tree from scripts/nspawn-tree.sh);
# tcpdump: the ground truth the ECMP tests compare pkttrace's choice with;
# qemu-system-x86, busybox-static, cpio, xz-utils, kmod: ../shared/kernel-vm/
# run-vm.sh, which runs the tests under Debian's 6.1 and 6.12 kernels
# (scripts/kernel-matrix.sh); debootstrap: the README's install path tried
# on a fresh Debian 12 (tests/integration/test_packaging.py); tshark: reads
# the pcap-ng files pkttrace writes back in the tests; libpcap0.8: compiles
# filter expressions (pcap_compile, at run time; no -dev needed); chromium:
# the headless browser that loads serve's live page
# (tests/integration/test_page_browser.py, which fails without it).
APT_PKGS=(clang llvm libbpf-dev libbpf1 bpftool make iproute2 iptables nftables iperf3 iputils-ping util-linux
          python3-venv systemd systemd-container prometheus tcpdump libpcap0.8 tshark debootstrap
          openssl groff-base man-db linux-libc-dev chromium
          qemu-system-x86 busybox-static cpio xz-utils kmod)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  # Packages with a daemon (prometheus) must not start it: the tests run
  # their own server on a free port.  A policy-rc.d that exits 101 tells
  # invoke-rc.d/deb-systemd-invoke "not now"; keep one that already exists
  # (Docker images ship one), else add ours for this install only.
  policy=/usr/sbin/policy-rc.d own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# added by pkttrace scripts/setup.sh during apt-get install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  # wireshark-common (tshark's) asks whether non-root users may capture:
  # answer no beforehand, so the install never stops for a question
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  # prometheus goes in without its Recommends (node-exporter, another daemon)
  others=() prom=
  for p in "${missing[@]}"; do
    if [ "$p" = prometheus ]; then prom=1; else others+=("$p"); fi
  done
  if [ ${#others[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${others[@]}" >/dev/null
  fi
  if [ -n "$prom" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # We installed it, so its service is ours to keep off: not enabled for
    # the next boot, and stopped if it got started regardless.
    if [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    else
      systemctl disable prometheus.service >/dev/null 2>&1 || true
      [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
  fi
  if [ -n "$own_policy" ]; then rm -f "$policy"; trap - EXIT; fi
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
