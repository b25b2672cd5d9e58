#!/usr/bin/env bash
# The integration tests under the kernels routers run: Debian 12's own 6.1
# and its 6.12 backport, booted in qemu over this machine's root filesystem
# (../shared/kernel-vm/run-vm.sh), once per backend each kernel has.  Prints
# a table kernel x backend x passed/failed/skipped, and the skip reasons
# (each names the kernel feature that is missing).
#
#   scripts/kernel-matrix.sh            # every integration test (~40 min under TCG)
#   scripts/kernel-matrix.sh --subset   # the paths and backend tests under each backend, the qdisc and tunnel tests
#                                       # once per kernel (~45 min): what CI runs
#   scripts/kernel-matrix.sh --run 6.12:fentry --run 6.1:kprobe   # only these kernel:backend pairs
#
# Exit status: 1 if any test failed.  A VM that cannot boot here (no qemu,
# no kernel package reachable: run-vm.sh's status 125) is reported as such
# and does not count as a test failure; --strict makes it one.
set -uo pipefail
cd "$(dirname "$0")/.."

VM=${PKTTRACE_KERNEL_VM:-../shared/kernel-vm/run-vm.sh}
TESTS=(tests/integration)
STRICT=
SUBSET=
ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --subset) SUBSET=1 ;;
    --strict) STRICT=1 ;;
    --run)
      case "${2:-}" in
        6.1:auto|6.1:fentry|6.1:kprobe|6.12:auto|6.12:nflink|6.12:fentry|6.12:kprobe) ONLY+=("${2/:/ }") ;;
        *) echo "kernel-matrix.sh: --run wants KERNEL:BACKEND (6.1:auto|fentry|kprobe, 6.12:auto|nflink|fentry|kprobe), not '${2:-}'" >&2; exit 2 ;;
      esac
      shift ;;
    *) echo "kernel-matrix.sh: unknown option $1 (--subset, --strict, --run KERNEL:BACKEND)" >&2; exit 2 ;;
  esac
  shift
done
if [ ! -f "$VM" ]; then
  echo "kernel-matrix.sh: no kernel VM runner at $VM (set PKTTRACE_KERNEL_VM)" >&2
  exit 2
fi

# kernel backend: 6.1 has no netfilter links (fentry and kprobes); 6.12 has
# all three.  The subset runs each backend's path tests once (and the
# backend comparison, which forces every backend the kernel has, on 6.12);
# the qdisc tests once per kernel (their programs differ by kernel, not by
# backend), and the tunnel tests once per kernel too: on 6.1 under kprobes,
# whose hooks are seen least (encapsulation and decapsulation are found
# where no table is observed).  A 6.1 run costs ~40 s a test under TCG,
# most of it verifying the programs: the tunnel tests under both 6.1
# backends would take CI near its 90 minutes.  The full matrix (no
# --subset) runs every test under every backend.
RUNS=("6.1 auto" "6.1 kprobe" "6.12 nflink" "6.12 fentry" "6.12 kprobe")
[ -n "$SUBSET" ] && RUNS=("6.1 auto" "6.1 kprobe" "6.12 nflink")
subset_tests() {
  local t=tests/integration
  case "$1 $2" in
    "6.1 auto") echo "$t/test_paths.py $t/test_backends.py $t/test_qos.py" ;;
    "6.1 kprobe") echo "$t/test_paths.py $t/test_backends.py $t/test_tunnels.py" ;;
    *) echo "$t/test_paths.py $t/test_backends.py $t/test_qos.py $t/test_tunnels.py" ;;
  esac
}
[ ${#ONLY[@]} -gt 0 ] && RUNS=("${ONLY[@]}")
LOGDIR=$(mktemp -d /tmp/pkttrace-matrix.XXXXXX)
rows=()
failed=0
for run in "${RUNS[@]}"; do
  set -- $run
  kernel=$1 backend=$2
  log="$LOGDIR/$kernel-$backend.log"
  [ -n "$SUBSET" ] && read -ra TESTS <<<"$(subset_tests "$kernel" "$backend")"
  echo "kernel-matrix: Linux $kernel, backend $backend ..." >&2
  KR_TIMEOUT=${KR_TIMEOUT:-3000} KR_ENV="PKTTRACE_BACKEND" PKTTRACE_BACKEND=$backend \
    bash "$VM" "$kernel" -- .venv/bin/python -m pytest -q -p no:cacheprovider -rfEs --durations=10 "${TESTS[@]}" >"$log" 2>&1
  rc=$?
  summary=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed|skipped).* =+$|(passed|failed|error).* in [0-9.]+s" "$log" | tail -1)
  p=$(grep -oE "[0-9]+ passed" <<<"$summary" | grep -oE "[0-9]+" || true)
  f=$(grep -oE "[0-9]+ failed" <<<"$summary" | grep -oE "[0-9]+" || true)
  e=$(grep -oE "[0-9]+ error" <<<"$summary" | grep -oE "[0-9]+" || true)
  s=$(grep -oE "[0-9]+ skipped" <<<"$summary" | grep -oE "[0-9]+" || true)
  if [ "$rc" -eq 125 ] || [ "$rc" -eq 124 ]; then
    state="VM unavailable (run-vm.sh status $rc)"
    [ -n "$STRICT" ] && failed=1
  elif [ "$rc" -ne 0 ]; then
    state="FAILED"
    failed=1
  else
    state="ok"
  fi
  rows+=("$(printf '| %-6s | %-8s | %6s | %6s | %7s | %s' "$kernel" "$backend" "${p:-0}" "$(( ${f:-0} + ${e:-0} ))" "${s:-0}" "$state")")
  grep -E "^SKIPPED" "$log" | sed "s/^/    [$kernel $backend] /" >&2 || true
  if [ "$state" = FAILED ]; then
    grep -E "^(FAILED|ERROR) " "$log" | sed "s/^/    [$kernel $backend] /" >&2 || true
  fi
done

echo
echo "| kernel | backend  | passed | failed | skipped | status"
echo "|--------|----------|--------|--------|---------|-------"
printf '%s\n' "${rows[@]}"
echo "logs: $LOGDIR"
exit $failed
