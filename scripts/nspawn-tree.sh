#!/usr/bin/env bash
# The Debian 12 OS tree that tests/integration/test_systemd_nspawn.py boots
# with systemd-nspawn (systemd as PID 1, to run systemd/pkttrace.service
# as DynamicUser=).  Made once, cached in $PKTTRACE_NSPAWN_TREE
# (/var/tmp/pkttrace-nspawn/bookworm, ~1-3 min); the test never writes it
# (it boots with --volatile=overlay).  Exit 3: the mirror was unreachable
# (the test then skips, saying so).
set -euo pipefail
tree=${PKTTRACE_NSPAWN_TREE:-/var/tmp/pkttrace-nspawn/bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ -e "$tree/lib/systemd/systemd" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then echo "nspawn-tree.sh: run as root (debootstrap)" >&2; exit 2; fi
command -v debootstrap >/dev/null || { echo "nspawn-tree.sh: debootstrap missing (scripts/setup.sh)" >&2; exit 2; }
mkdir -p "$(dirname "$tree")"
rm -rf "$tree.tmp"
if ! debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,libbpf1 bookworm "$tree.tmp" \
     "$mirror" >"$tree.log" 2>&1; then
  echo "nspawn-tree.sh: debootstrap from $mirror failed: $(tail -n 1 "$tree.log")" >&2
  rm -rf "$tree.tmp"
  exit 3
fi
rm -rf "$tree" && mv "$tree.tmp" "$tree"
echo "nspawn-tree.sh: made $tree"
