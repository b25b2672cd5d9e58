#!/usr/bin/env bash
# The tests once more against the oldest dependencies pyproject.toml allows
# (its `>=` floors, installed exactly: Debian 12's python3-click 8.1.3,
# python3-pyroute2 0.7.2, python3-prometheus-client 0.16.0, and for the
# web config python3-yaml 6.0, python3-bcrypt 3.2.2), in .venv-floor:
# the unit tests, and the root tests that read device names through pyroute2
# (paths, --iface, renamed and new devices), drive the CLI and serve metrics
# to a real Prometheus (~2 min).  A floor the code outgrew fails here.
#   scripts/test-floor.sh [pytest args]     (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=.venv-floor
[ -x $venv/bin/python ] || "$PY" -m venv $venv
# pyproject's dependencies and its `web` extra with >= turned into ==, and its test extra
read -r floors extra < <($venv/bin/python - <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
floors = [d.replace(">=", "==") for d in p["dependencies"] + p["optional-dependencies"]["web"]]
assert all("==" in f for f in floors), f"a dependency without a floor: {floors}"
print(",".join(floors), ",".join(p["optional-dependencies"]["test"]))
PY
)
$venv/bin/python -m pip install -q ${floors//,/ } ${extra//,/ }
$venv/bin/python -m pip install -q --no-deps --force-reinstall .
$venv/bin/python -m pip check >/dev/null      # the floors satisfy each other
echo "test-floor.sh: $($venv/bin/python -m pip list 2>/dev/null | grep -iE '^(click|pyroute2|prometheus.client|pyyaml|bcrypt) ' | tr -s ' ' | paste -sd,)"
# mypy too (tests/unit/test_types.py): the exporter's Collector subclasses
# prometheus-client's, an ABC in 0.16 and a Protocol later, so the package
# type-checks against both.
exec $venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/unit tests/integration/test_serve.py tests/integration/test_attach.py tests/integration/test_paths.py \
  tests/integration/test_link_churn.py tests/integration/test_cli_process.py tests/integration/test_tunnels.py "$@"
