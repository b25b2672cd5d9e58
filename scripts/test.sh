#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test: unit tests on recorded data,
# and integration tests that build netns labs and trace real packets (root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# the OS tree the systemd-nspawn test boots (cached; made once, ~1-3 min):
# without it that test skips and says why
scripts/nspawn-tree.sh || echo "test.sh: no nspawn tree (see above): test_systemd_nspawn.py will skip" >&2
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@" || rc=$?
# again with the oldest dependencies the floors allow (Debian 12's versions)
# in .venv-floor (PKTTRACE_NO_FLOOR=1 skips it)
if [ -z "${PKTTRACE_NO_FLOOR:-}" ]; then
  scripts/test-floor.sh || rc=1
fi
# then the integration tests that exercise every backend, under Debian 12's
# 6.1 (fentry, kprobe) and 6.12 (netfilter links) kernels in qemu
# (PKTTRACE_NO_MATRIX=1 skips it, e.g. when iterating on one test)
if [ -z "${PKTTRACE_NO_MATRIX:-}" ]; then
  scripts/kernel-matrix.sh --subset || rc=1
fi
exit $rc
