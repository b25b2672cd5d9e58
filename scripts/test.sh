#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test: unit tests on recorded data,
# and integration tests that build netns labs and trace real packets (root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
