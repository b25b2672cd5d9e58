#!/usr/bin/env bash
# Run a shell script inside a fresh Debian 12 (bookworm) root, to try the
# README's install path as a new user would (tests/integration/test_packaging.py).
#
#   scripts/bookworm-chroot.sh [--base-only] SCRIPT [FILE...]
#
# The base (debootstrap --variant=minbase + python3, python3-venv: what a
# Debian 12 server has) is made once and cached in $PKTTRACE_BOOKWORM
# (/var/tmp/pkttrace-bookworm, ~2-4 min to make, then ~0).  Each run works in
# a throw-away copy of it, so every run starts from a fresh system; FILEs
# (a wheel) are copied into its /root, SCRIPT runs there with bash as root.
# No network namespace: apt and pip reach the mirrors as the host does.
# Exit 3: the base could not be made (the Debian mirror unreachable).
set -euo pipefail
base=${PKTTRACE_BOOKWORM:-/var/tmp/pkttrace-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base_only=
if [ "${1:-}" = --base-only ]; then base_only=1; shift; fi

if [ "$(id -u)" -ne 0 ]; then echo "bookworm-chroot.sh: run as root (debootstrap, chroot)" >&2; exit 2; fi

if [ ! -e "$base/.pkttrace-base" ]; then
  command -v debootstrap >/dev/null || { echo "bookworm-chroot.sh: debootstrap missing (scripts/setup.sh)" >&2; exit 2; }
  rm -rf "$base.tmp"
  mkdir -p "$(dirname "$base")"
  if ! debootstrap --variant=minbase --include=python3,python3-venv bookworm "$base.tmp" "$mirror" \
       >"$base.log" 2>&1; then
    echo "bookworm-chroot.sh: debootstrap from $mirror failed: $(tail -n 1 "$base.log")" >&2
    rm -rf "$base.tmp"
    exit 3
  fi
  touch "$base.tmp/.pkttrace-base"
  rm -rf "$base" && mv "$base.tmp" "$base"
fi
[ -n "$base_only" ] && exit 0

script=$1; shift
root=$(mktemp -d /var/tmp/pkttrace-bookworm-run.XXXXXX)
trap 'rm -rf --one-file-system "$root"' EXIT
cp -a "$base/." "$root/"
cp "$script" "$root/root/run.sh"
for f in "$@"; do cp "$f" "$root/root/"; done
# What the host's network needs, not part of the install being tried: name
# resolution, and the CA bundle (this host's egress goes through its own CA,
# which a real Debian 12 machine does not need).
cp /etc/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/etc/ssl/certs" && cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
# A private mount namespace: /proc and /dev vanish with it, nothing to undo.
unshare --mount --propagation private bash -c '
  set -e
  mount -t proc proc "$1/proc"
  mount --rbind /dev "$1/dev"
  exec chroot "$1" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
       LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive bash -c "cd /root && bash -euxo pipefail run.sh"
' _ "$root"
