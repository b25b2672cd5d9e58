#!/usr/bin/env bash
# The benchmark under the kernels routers run, once per backend: Debian 12's
# 6.1 (fentry, kprobe) and 6.12 (netfilter links, fentry, kprobe), booted in
# qemu (../shared/kernel-vm/run-vm.sh).  Under TCG only ratios to the
# untraced baseline measured in the same run mean anything (and BPF ns/pkt
# compared between backends of one kernel); absolute rates do not.
#
#   scripts/kernel-bench.sh                         # every kernel:backend pair (~10 min each)
#   scripts/kernel-bench.sh --run 6.1:fentry        # only these pairs
#
# Each run's tables go to $OUT/<kernel>-<backend>/latest.md (OUT defaults to
# benchmarks/results/kernels-<time>, git-ignored); the summary prints each mode's ratio.
set -uo pipefail
cd "$(dirname "$0")/.."

VM=${PKTTRACE_KERNEL_VM:-../shared/kernel-vm/run-vm.sh}
ARGS=(--reps 2 --duration 3 --modes baseline,filter-nomatch,serve,trace-all --records 50000)
RUNS=("6.1 fentry" "6.1 kprobe" "6.12 nflink" "6.12 fentry" "6.12 kprobe")
ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --run)
      case "${2:-}" in
        6.1:fentry|6.1:kprobe|6.12:nflink|6.12:fentry|6.12:kprobe) ONLY+=("${2/:/ }") ;;
        *) echo "kernel-bench.sh: --run wants KERNEL:BACKEND (6.1:fentry|kprobe, 6.12:nflink|fentry|kprobe), not '${2:-}'" >&2; exit 2 ;;
      esac
      shift ;;
    *) echo "kernel-bench.sh: unknown option $1 (--run KERNEL:BACKEND)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#ONLY[@]} -gt 0 ] && RUNS=("${ONLY[@]}")
if [ ! -f "$VM" ]; then
  echo "kernel-bench.sh: no kernel VM runner at $VM (set PKTTRACE_KERNEL_VM)" >&2
  exit 2
fi
# under the checkout: the guest sees the host's filesystem, but not its /tmp
OUT=${OUT:-benchmarks/results/kernels-$(date +%Y%m%dT%H%M%S)}
failed=0
for run in "${RUNS[@]}"; do
  set -- $run
  kernel=$1 backend=$2
  dir="$OUT/$kernel-$backend"
  mkdir -p "$dir"
  echo "kernel-bench: Linux $kernel, backend $backend ..." >&2
  KR_TIMEOUT=${KR_TIMEOUT:-2400} KR_ENV="PKTTRACE_BACKEND" PKTTRACE_BACKEND=$backend \
    bash "$VM" "$kernel" -- .venv/bin/python -m benchmarks.run "${ARGS[@]}" --output "$dir" >"$dir/run.log" 2>&1 \
    || { echo "    [$kernel $backend] failed: see $dir/run.log" >&2; failed=1; continue; }
  echo "## Linux $kernel, backend $backend"
  # the throughput table: mode, UDP pps, ratio, ..., BPF ns/pkt
  awk -F'|' '/^### Throughput/{t=1; next} /^###/{t=0} t && /^\| [a-z]/{printf "| %-14s | %s | %s | %s |\n", $2, $3, $4, $6}' \
    "$dir/latest.md" | sed 's/  */ /g'
done
echo "results: $OUT"
exit $failed
