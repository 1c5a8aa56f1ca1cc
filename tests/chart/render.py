"""Renders the chart with the real Helm library (as the chart checks do) and prints the objects
as one JSON array, for tests in other languages (the operator's e2e suite on a real API server
applies the chart's RBAC, ServiceAccounts and Secrets, and runs the operator with the
Deployment's environment).

    python tests/chart/render.py RELEASE NAMESPACE < values.json > objects.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

import helm_python as helm

CHART = Path(__file__).resolve().parents[2] / "charts" / "repobox-operator"


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    release, namespace = sys.argv[1], sys.argv[2]
    values = json.load(sys.stdin)
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    json.dump(objects, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
