#!/usr/bin/env bash
# The integration tests under the kernels routers run: Debian 12's own 6.1
# and its 6.12 backport, booted in qemu over this machine's root filesystem
# (../shared/kernel-vm/run-vm.sh), once per backend each kernel has.  Prints
# a table kernel x backend x passed/failed/skipped, and the skip reasons
# (each names the kernel feature that is missing).
#
#   scripts/kernel-matrix.sh            # every integration test (~40 min under TCG)
#   scripts/kernel-matrix.sh --subset   # the path tests under each backend; the backend, qdisc and tunnel
#                                       # tests once per kernel (~25 min, two guests at a time): what CI runs
#   scripts/kernel-matrix.sh --run 6.12:fentry --run 6.1:kprobe   # only these kernel:backend pairs
#   PKTTRACE_MATRIX_JOBS=1 scripts/kernel-matrix.sh ...               # one guest at a time (default 2)
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
# all three.  The subset runs each backend's path tests once, and the
# backend comparison (which forces every backend the kernel has, whatever
# PKTTRACE_BACKEND says) once per kernel;
# the qdisc tests once per kernel (their programs differ by kernel, not by
# backend), and the tunnel tests once per kernel too: on 6.1 under kprobes,
# whose hooks are seen least (encapsulation and decapsulation are found
# where no table is observed).  A 6.1 run costs ~40 s a test under TCG,
# most of it verifying the programs: the tunnel tests under both 6.1
# backends would take CI near its 90 minutes.  The full matrix (no
# --subset) runs every test under every backend.
RUNS=("6.1 auto" "6.1 kprobe" "6.12 nflink" "6.12 fentry" "6.12 kprobe")
[ -n "$SUBSET" ] && RUNS=("6.1 kprobe" "6.1 auto" "6.12 nflink")   # the longest first
subset_tests() {
  local t=tests/integration
  case "$1 $2" in
    "6.1 auto") echo "$t/test_paths.py $t/test_backends.py $t/test_qos.py" ;;
    "6.1 kprobe") echo "$t/test_paths.py $t/test_tunnels.py" ;;
    *) echo "$t/test_paths.py $t/test_backends.py $t/test_qos.py $t/test_tunnels.py" ;;
  esac
}
[ ${#ONLY[@]} -gt 0 ] && RUNS=("${ONLY[@]}")
LOGDIR=$(mktemp -d /tmp/pkttrace-matrix.XXXXXX)

# One kernel:backend run in its VM; its exit status goes to LOGDIR.
run_one() {
  local kernel=$1 backend=$2 log="$LOGDIR/$1-$2.log" tests=("${TESTS[@]}")
  [ -n "$SUBSET" ] && read -ra tests <<<"$(subset_tests "$kernel" "$backend")"
  echo "kernel-matrix: Linux $kernel, backend $backend ..." >&2
  # COLUMNS: pytest's summary line keeps the assertion's message only
  # where the terminal is wide enough (the guest's has no width)
  KR_TIMEOUT=${KR_TIMEOUT:-3000} KR_ENV="PKTTRACE_BACKEND COLUMNS" PKTTRACE_BACKEND=$backend COLUMNS=200 \
    bash "$VM" "$kernel" -- .venv/bin/python -m pytest -q -p no:cacheprovider -rfEs --durations=10 "${tests[@]}" >"$log" 2>&1
  echo $? >"$LOGDIR/$kernel-$backend.rc"
}

# Runs side by side: a TCG guest keeps about one host core busy (its test
# process and the verifier are one thread), so on two cores two guests
# take about half the time of one after the other.
JOBS=${PKTTRACE_MATRIX_JOBS:-2}
case "$JOBS" in ''|*[!0-9]*|0) echo "kernel-matrix.sh: PKTTRACE_MATRIX_JOBS wants a number >= 1, not '$JOBS'" >&2; exit 2 ;; esac
# run-vm.sh fetches and unpacks a kernel on its first use, with no lock:
# a kernel that more than one run boots gets one short boot first, alone,
# so that its runs side by side find it unpacked
if [ "$JOBS" -gt 1 ]; then
  for k in $(printf '%s\n' "${RUNS[@]}" | cut -d' ' -f1 | sort | uniq -d); do
    KR_TIMEOUT=600 bash "$VM" "$k" -- true >"$LOGDIR/$k-warm-up.log" 2>&1 ||
      echo "kernel-matrix: Linux $k did not boot for its warm-up (see $LOGDIR/$k-warm-up.log)" >&2
  done
fi
running=0
for run in "${RUNS[@]}"; do
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_one $run &
  running=$((running + 1))
done
wait

rows=()
failed=0
for run in "${RUNS[@]}"; do
  set -- $run
  kernel=$1 backend=$2
  log="$LOGDIR/$kernel-$backend.log"
  rc=$(cat "$LOGDIR/$kernel-$backend.rc" 2>/dev/null || echo 1)
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
    # the failures themselves (assertion, captured output): CI keeps no
    # log directory, and a failure that comes once in many runs must be
    # readable from what CI printed
    # (pytest writes ERRORS before FAILURES: one range from the first)
    sed -n '/^=* \(ERRORS\|FAILURES\) =*$/,/^=* short test summary/p' "$log" |
      tail -n 400 | sed "s/^/    [$kernel $backend] /" >&2 || true
  fi
done

echo
echo "| kernel | backend  | passed | failed | skipped | status"
echo "|--------|----------|--------|--------|---------|-------"
printf '%s\n' "${rows[@]}"
echo "logs: $LOGDIR"
exit $failed
