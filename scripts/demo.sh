#!/usr/bin/env bash
# The main job on the built-in lab: set up, bring the lab up, trace the
# router while sending traffic through it, print every packet's path.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PKT=.venv/bin/pkttrace
exec "$PKT" lab demo "$@"
