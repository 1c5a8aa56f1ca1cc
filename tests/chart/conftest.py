"""Shared helpers of the chart checks: render the chart with the real Helm library (offline),
parse the operator's Rust sources for the names the chart must agree with."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import helm_python as helm

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "repobox-operator"
# The operator's settings (one file per concern) and the names its Jobs are built from.
CONFIG_DIR = ROOT / "operator" / "src" / "config"
JOB_BUILDER_RS = [ROOT / "operator" / "src" / "model" / f for f in ("pod_layout.rs", "labels.rs")]
RUNNER_ENV_RS = ROOT / "contract" / "src" / "runner_env.rs"
CRD_FILE = ROOT / "crds" / "repoboxjobs.repobox.dev.yaml"

RELEASE = "repobox"
NAMESPACE = "repobox"
KUBE_VERSION = "1.28"

# Test secret values: they may appear only inside `kind: Secret`.
REDIS_PASSWORD = "S3cr3tRedisPassw0rd"
REDIS_URL = f"redis://default:{REDIS_PASSWORD}@redis-master.redis.svc:6379/0"
ENCRYPTION_KEY = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
# One ACL user per side (docs/install.md), over TLS with a private CA.
OPERATOR_REDIS_PASSWORD = "0perat0rRedisPassw0rd"
RUNNER_REDIS_PASSWORD = "Runn3rRedisPassw0rd"
OPERATOR_REDIS_URL = f"rediss://repobox-operator:{OPERATOR_REDIS_PASSWORD}@redis.redis.svc:6379/0"
RUNNER_REDIS_URL = f"rediss://repobox-runner:{RUNNER_REDIS_PASSWORD}@redis.redis.svc:6379/0"
SECRET_STRINGS = [REDIS_URL, REDIS_PASSWORD, ENCRYPTION_KEY, OPERATOR_REDIS_URL,
                  OPERATOR_REDIS_PASSWORD, RUNNER_REDIS_URL, RUNNER_REDIS_PASSWORD]

REQUIRED = {"redis": {"url": REDIS_URL}, "encryptionKey": {"value": ENCRYPTION_KEY}}

RUNNER_NODE_SELECTOR = {"repobox.dev/pool": "jobs", "kubernetes.io/arch": "amd64"}
RUNNER_TOLERATIONS = [
    {"key": "repobox.dev/jobs", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
     "tolerationSeconds": 300},
]
RUNNER_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [
                    {"key": "node.kubernetes.io/instance-type", "operator": "In",
                     "values": ["m6i.xlarge", "m6i.2xlarge"]}]}
            ]
        }
    },
    "podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "repobox-job-runner"}}}}
        ]
    },
}


def merge(base: dict, *overs: dict) -> dict:
    out = copy.deepcopy(base)
    for over in overs:
        for k, v in over.items():
            if v is None:
                out[k] = None  # as Helm: null removes a default
            elif isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
    return out


# The value sets every rendering check runs under.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": REQUIRED,
    "existing-secrets": {
        "redis": {"existingSecret": "my-redis", "existingSecretKey": "redis-url"},
        "encryptionKey": {"existingSecret": "my-encryption-key", "existingSecretKey": "ENCRYPTION_KEY"},
    },
    "networkpolicy-off": merge(REQUIRED, {"networkPolicy": {"enabled": False}}),
    "two-replicas": merge(REQUIRED, {
        "replicaCount": 2,
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "repobox-operator"}}}],
        "priorityClassName": "system-cluster-critical",
    }),
    "runner-custom": merge(REQUIRED, {
        "jobsNamespace": "repobox-jobs",
        "runner": {
            "image": {"repository": "registry.example.com/repobox/job-runner", "tag": "1.2.3",
                      "pullPolicy": "Always"},
            "imagePullSecrets": ["regcred"],
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                          "limits": {"cpu": 4, "memory": "4Gi"}},
            "ephemeralStorage": "20Gi",
            "tmpSizeLimit": "2Gi",
            "nodeSelector": RUNNER_NODE_SELECTOR,
            "tolerations": RUNNER_TOLERATIONS,
            "affinity": RUNNER_AFFINITY,
            "priorityClassName": "repobox-jobs",
            "ttlSecondsAfterFinished": 600,
            "envFromSecrets": ["agent-api-keys", "agent-extra"],
            "agentCommand": "agent --non-interactive",
            "allowInsecureHttp": True,
            "openPullRequests": False,
            "gitCaConfigMap": "git-ca",
            "gitCaKey": "bundle.pem",
            "git": {"cloneDepth": 0},
        },
        "agent": {
            "image": {"repository": "registry.example.com/agents/claude", "tag": "7"},
            "uid": 2000,
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": 8, "memory": "16Gi"}},
            "extraEnv": {"MODEL": "large", "MAX_TURNS": "40"},
        },
        "config": {"maxJobsPerUser": 2, "maxConcurrentJobs": 50, "retentionSeconds": 2000000},
    }),
    "redis-users": merge(REQUIRED, {
        "jobsNamespace": "repobox-jobs",
        "redis": {"url": OPERATOR_REDIS_URL, "runner": {"url": RUNNER_REDIS_URL},
                  "tls": {"caSecret": "redis-ca", "caSecretKey": "ca.pem"}},
        "networkPolicy": {"redis": {"namespace": "redis"}},
    }),
    # Autoscaling-friendly runners, priorities, warm capacity, alerts and the dashboard, runners
    # in their own namespace and node pool.
    "autoscaling": merge(REQUIRED, {
        "jobsNamespace": "repobox-jobs",
        "priorityClasses": {"create": True},
        "warmCapacity": {"enabled": True, "replicas": 3},
        "runner": {
            "nodeSelector": RUNNER_NODE_SELECTOR,
            "tolerations": RUNNER_TOLERATIONS,
            "affinity": RUNNER_AFFINITY,
            "agentCommand": "agent --non-interactive",
            "ephemeralStorageRequest": "4Gi",
            "ephemeralStorageLimit": "12Gi",
            "doNotDisrupt": False,
            "podAnnotations": {"example.com/cost-center": "repobox", "sidecar.istio.io/inject": "false"},
            "unschedulableGraceSeconds": 120,
            "disruptionRetries": 0,
            "disruptionRetryBackoffSeconds": 30,
        },
        "agent": {"ephemeralStorageRequest": "3Gi", "ephemeralStorageLimit": "8Gi"},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"},
                           "alertLabels": {"team": "platform"}},
        "grafanaDashboard": {"enabled": True, "folder": "Repobox", "namespace": "monitoring"},
    }),
    "servicemonitor": merge(REQUIRED, {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "networkPolicy": {
            "apiServer": {"cidrs": ["172.18.0.2/32", "10.96.0.1/32"]},
            "redis": {"cidrs": ["10.20.0.0/24"], "podSelector": None},
            "blockedCidrs": ["169.254.169.254/32", "fd00:ec2::254/128"],
            "gitHosts": {"cidrs": ["0.0.0.0/0", "::/0"], "ports": [443, 22]},
            "metrics": {"from": [{"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": "monitoring"}}}]},
        },
    }),
}


def render_raw(values: dict | None, namespace: str = NAMESPACE) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=namespace, is_install=True)


def render(values: dict | None, namespace: str = NAMESPACE) -> list[dict]:
    """The rendered objects (NOTES.txt excluded)."""
    objs = []
    for path, text in sorted(render_raw(values, namespace).items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objs.append(doc)
    return objs


def of_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def operator_deployment(objs: list[dict]) -> dict:
    """The operator's Deployment (warm capacity adds another one)."""
    found = [o for o in of_kind(objs, "Deployment")
             if o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
    assert len(found) == 1, f"expected one operator Deployment, found {len(found)}"
    return found[0]


def operator_container(objs: list[dict]) -> dict:
    dep = operator_deployment(objs)
    return dep["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def env_values(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.fixture(scope="session", params=sorted(VALUE_SETS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(VALUE_SETS[request.param])


# ----- The operator's sources -----

def config_rs_source() -> str:
    """The settings' definitions in operator/src/config/ (not their unit tests)."""
    parts = []
    for path in sorted(CONFIG_DIR.glob("*.rs")):
        if path.name != "tests.rs":
            parts.append(path.read_text().split("#[cfg(test)]", 1)[0])
    return "\n".join(parts)


def runner_env_default(name: str) -> str:
    """A `pub const DEFAULT_…` of contract::runner_env, as the literal it is."""
    m = re.search(rf'pub const {name}: [^=]+= "?([^";]*)"?;', RUNNER_ENV_RS.read_text())
    assert m, f"{name} not found in {RUNNER_ENV_RS}"
    return m.group(1)


def config_env_names() -> set[str]:
    """Every `env = "NAME"` of the clap `Config` in operator/src/config.rs."""
    names = set(re.findall(r'\benv\s*=\s*"([A-Z][A-Z0-9_]*)"', config_rs_source()))
    assert len(names) > 20, f"could not parse config.rs env names: {names}"
    return names


def config_defaults() -> dict[str, str]:
    """`env = "NAME"` -> literal default (`default_value = "…"` or `default_value_t = …`), where
    the default is a literal."""
    out = {}
    for block in re.findall(r"#\[arg\((.*?)\)\]\s*\n", config_rs_source(), flags=re.S):
        m = re.search(r'\benv\s*=\s*"([A-Z0-9_]+)"', block)
        if not m:
            continue
        d = re.search(r'default_value\s*=\s*"([^"]*)"', block) or re.search(
            r"default_value_t\s*=\s*([A-Za-z0-9_:]+)", block)
        if d:
            v = d.group(1)
            if v.startswith("LogFormat::"):
                v = v.split("::")[1].lower()
            if v.startswith("runner_env::"):
                v = runner_env_default(v.split("::")[1])
            out[m.group(1)] = v
    return out


def _sources(path) -> str:
    paths = path if isinstance(path, list) else [path]
    return "\n".join(p.read_text() for p in paths)


def rust_str_const(path, name: str) -> str:
    m = re.search(rf'pub const {name}: &str = "([^"]*)";', _sources(path))
    assert m, f"{name} not found in {path}"
    return m.group(1)


def rust_int_const(path, name: str) -> int:
    m = re.search(rf"pub const {name}: i\d+ = (\d+);", _sources(path))
    assert m, f"{name} not found in {path}"
    return int(m.group(1))


def json_env(container: dict, name: str) -> Any:
    raw = env_values(container)[name]
    return json.loads(raw) if raw else None
