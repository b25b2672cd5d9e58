#!/usr/bin/env bash
# Set up (apt packages, .venv with pkttrace, BPF object), then run the
# benchmark harness; arguments go to `python -m benchmarks.run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m benchmarks.run "$@"
