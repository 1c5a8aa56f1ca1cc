#!/usr/bin/env bash
# Installs the chart checks' Python requirements into the workspace venv and runs them.
#   bash tests/chart/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/chart/requirements.txt
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
exec "$VENV/bin/python" -m pytest -q tests/chart "$@"
