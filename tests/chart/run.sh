#!/usr/bin/env bash
# Installs the chart checks' Python requirements into the workspace venv and runs them.
#   bash tests/chart/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/chart/requirements.txt
# promtool (Debian package `prometheus`) evaluates the chart's alert rules (test_alerts.py). CI
# installs it; elsewhere those tests are skipped with a message when it is missing.
if ! command -v promtool >/dev/null && [ "${CI:-}" = true ]; then
  echo "installing promtool (Debian package prometheus)"
  if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo); fi
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
exec "$VENV/bin/python" -m pytest -q tests/chart "$@"
