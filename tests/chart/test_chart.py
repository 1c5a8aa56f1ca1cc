"""Chart checks: lint, render under several value sets, validate against the Kubernetes 1.28
schemas, and assert the properties the chart promises (security, secrets, RBAC, network policy,
labels, agreement with the operator's configuration)."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import helm_python as helm

from conftest import (
    CHART, CRD_FILE, JOB_BUILDER_RS, KUBE_VERSION, NAMESPACE, OPERATOR_REDIS_URL, RELEASE,
    REQUIRED, RUNNER_AFFINITY, RUNNER_NODE_SELECTOR, RUNNER_REDIS_URL, RUNNER_TOLERATIONS,
    SECRET_STRINGS, VALUE_SETS,
    config_defaults, config_env_names, config_rs_source, env_of, env_values, json_env, merge, of_kind, one,
    operator_container, operator_deployment, render, render_raw, rust_int_const, rust_str_const,
)

# Kinds kubernetes-validate cannot know (CRD-defined elsewhere): skipped explicitly.
UNKNOWN_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                 ("monitoring.coreos.com/v1", "PrometheusRule")}

# Kinds without a namespace.
CLUSTER_SCOPED_KINDS = {"PriorityClass"}

POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "ReplicaSet"}

STANDARD_LABELS = [
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
    "app.kubernetes.io/component", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by",
    "helm.sh/chart",
]


# ----- lint, schema validation of the output, the CRD -----

@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_has_no_errors(name):
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}.0")
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not errors, report


def test_every_manifest_validates_against_kubernetes_schemas(rendered):
    name, objs = rendered
    assert objs, name
    checked = 0
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in UNKNOWN_KINDS:
            continue
        version = kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        assert version == KUBE_VERSION
        checked += 1
    assert checked >= 8, name


def test_crd_validates_against_kubernetes_schemas():
    with helm.Chart.load(CHART) as chart:
        crds = chart.crds
    assert [c["filename"] for c in crds] == ["repobox-operator/crds/repoboxjobs.repobox.dev.yaml"]
    crd = yaml.safe_load(crds[0]["data"])
    assert kubernetes_validate.validate(crd, KUBE_VERSION, strict=True) == KUBE_VERSION
    assert crd["metadata"]["name"] == "repoboxjobs.repobox.dev"


def test_chart_crd_is_the_generated_one():
    chart_crd = CHART / "crds" / CRD_FILE.name
    assert chart_crd.read_bytes() == CRD_FILE.read_bytes(), (
        "charts/repobox-operator/crds/ differs from crds/: run "
        "`cp crds/*.yaml charts/repobox-operator/crds/`")
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(
        p.name for p in CRD_FILE.parent.glob("*.yaml"))


def test_chart_metadata():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.28.0-0"
    cargo = (Path(CHART).parents[1] / "Cargo.toml").read_text()
    assert f'version = "{meta["appVersion"]}"' in cargo, "appVersion != workspace version"


# ----- typos and missing values fail -----

@pytest.mark.parametrize("bad", [
    {"replicaCount2": 3},
    {"runner": {"resourcez": {}}},
    {"runner": {"resources": {"requests": {"gpu": "1"}}}},
    {"config": {"maxJobsPerUsr": 4}},
    {"networkPolicy": {"enabeld": False}},
    {"config": {"maxJobsPerUser": 0}},
    {"config": {"logFormat": "xml"}},
    {"runner": {"image": {"pullPolicy": "Sometimes"}}},
    {"redis": {"tls": {"caSecret": "redis-ca", "caSecretKey": "a/b"}}},
    {"redis": {"runner": {"existingSecret": "Not_A_Name"}}},
    {"redis": {"runnerUrl": "redis://r"}},
    {"config": {"outputTtlSeconds": -1}},
    {"config": {"deadLetterMaxLen": 0}},
    {"networkPolicy": {"redis": {"namespace": "Redis"}}},
    {"agent": {"uid": 65532}},
    {"agent": {"extraEnv": {"1BAD": "x"}}},
    {"agent": {"extraEnv": {"OK": 1}}},
    {"agent": {"imag": {}}},
])
def test_typo_or_bad_value_fails_schema_validation(bad):
    values = merge(REQUIRED, bad)
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmError):
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_defaults_pass_schema_validation():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(REQUIRED)
        chart.validate_schema({})


@pytest.mark.parametrize("values,needles", [
    ({"encryptionKey": {"value": "0" * 64}}, ["redis.url", "redis.existingSecret"]),
    ({"redis": {"url": "redis://r:6379"}}, ["encryptionKey.value", "encryptionKey.existingSecret"]),
    (merge(REQUIRED, {"redis": {"url": "http://r"}}), ["redis.url must start with"]),
    (merge(REQUIRED, {"encryptionKey": {"value": "short"}}), ["encryptionKey.value must be 32 bytes"]),
    (merge(REQUIRED, {"replicaCount": 2, "leaderElection": {"enabled": False}}),
     ["leaderElection.enabled"]),
])
def test_missing_or_bad_required_values_fail_with_a_clear_message(values, needles):
    with pytest.raises(helm.HelmError) as err:
        render_raw(values)
    for n in needles:
        assert n in str(err.value), str(err.value)


# ----- pod security -----

def pod_specs(objs):
    for o in objs:
        if o["kind"] in POD_KINDS:
            spec = o["spec"]
            if o["kind"] == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            if o["kind"] != "Pod":
                spec = spec["template"]["spec"]
            yield o, spec


def test_every_pod_has_the_restricted_security_context(rendered):
    name, objs = rendered
    specs = list(pod_specs(objs))
    assert specs, name
    for obj, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] == 65532
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["runAsNonRoot"] is True, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc.get("privileged") is not True
            assert sc.get("seccompProfile", {"type": "RuntimeDefault"})["type"] == "RuntimeDefault"


def test_operator_probes_ports_and_downward_api(rendered):
    name, objs = rendered
    dep = operator_deployment(objs)
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    env = env_of(c)
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env_values(c)["METRICS_ADDR"] == "0.0.0.0:8080"
    lease = int(env_values(c)["LEASE_DURATION_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] > lease
    assert c["image"] == "ghcr.io/repobox/repobox-operator:0.1.0"


# ----- secrets -----

def test_no_secret_value_outside_secrets(rendered):
    name, objs = rendered
    for obj in objs:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        for s in SECRET_STRINGS:
            assert s not in text, f"{name}: secret value in {obj['kind']}/{obj['metadata']['name']}"
    notes = render_raw(VALUE_SETS[name])["repobox-operator/templates/NOTES.txt"]
    for s in SECRET_STRINGS:
        assert s not in notes
    assert not of_kind(objs, "ConfigMap") or all(
        s not in yaml.safe_dump(cm) for cm in of_kind(objs, "ConfigMap") for s in SECRET_STRINGS)


def test_operator_reads_redis_url_from_a_secret(rendered):
    name, objs = rendered
    c = operator_container(objs)
    env = env_of(c)
    ref = env["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    values = env_values(c)
    assert "REDIS_URL" not in values
    assert "ENCRYPTION_KEY" not in env
    if name == "redis-users":
        # Separate credentials: the runner pods are pointed at their own Secret.
        assert ref["name"] != values["REDIS_SECRET_NAME"]
    else:
        assert ref["name"] == values["REDIS_SECRET_NAME"]
        assert ref["key"] == values["REDIS_SECRET_KEY"]
    assert not c.get("envFrom")


def test_chart_created_secrets():
    objs = render(VALUE_SETS["defaults"])
    c = env_values(operator_container(objs))
    redis = one(objs, "Secret", c["REDIS_SECRET_NAME"])
    assert redis["stringData"] == {c["REDIS_SECRET_KEY"]: VALUE_SETS["defaults"]["redis"]["url"]}
    key = one(objs, "Secret", c["ENCRYPTION_KEY_SECRET_NAME"])
    assert key["stringData"] == {c["ENCRYPTION_KEY_SECRET_KEY"]: VALUE_SETS["defaults"]["encryptionKey"]["value"]}
    assert len(of_kind(objs, "Secret")) == 2


def test_existing_secrets_are_referenced_not_created():
    objs = render(VALUE_SETS["existing-secrets"])
    assert not of_kind(objs, "Secret")
    c = operator_container(objs)
    values = env_values(c)
    assert (values["REDIS_SECRET_NAME"], values["REDIS_SECRET_KEY"]) == ("my-redis", "redis-url")
    assert (values["ENCRYPTION_KEY_SECRET_NAME"], values["ENCRYPTION_KEY_SECRET_KEY"]) == (
        "my-encryption-key", "ENCRYPTION_KEY")
    assert env_of(c)["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "redis-url"}


def test_secrets_follow_the_jobs_namespace():
    objs = render(VALUE_SETS["runner-custom"])
    redis = [s for s in of_kind(objs, "Secret") if s["metadata"]["name"].endswith("-redis")]
    assert sorted(s["metadata"]["namespace"] for s in redis) == ["repobox", "repobox-jobs"]
    key = [s for s in of_kind(objs, "Secret") if s["metadata"]["name"].endswith("-encryption-key")]
    assert [s["metadata"]["namespace"] for s in key] == ["repobox-jobs"]


def test_operator_and_runner_get_separate_redis_credentials():
    objs = render(VALUE_SETS["redis-users"])
    c = operator_container(objs)
    values = env_values(c)
    operator_ref = env_of(c)["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    operator_secret = one(objs, "Secret", operator_ref["name"])
    assert operator_secret["metadata"]["namespace"] == NAMESPACE
    assert operator_secret["stringData"] == {operator_ref["key"]: OPERATOR_REDIS_URL}
    runner_secret = one(objs, "Secret", values["REDIS_SECRET_NAME"])
    assert runner_secret["metadata"]["namespace"] == "repobox-jobs" == values["JOBS_NAMESPACE"]
    assert runner_secret["stringData"] == {values["REDIS_SECRET_KEY"]: RUNNER_REDIS_URL}
    # Each URL lives only where its pods are: the operator's never reaches the jobs namespace.
    redis_secrets = [s for s in of_kind(objs, "Secret") if "url" in s.get("stringData", {})]
    assert sorted((s["metadata"]["namespace"], s["stringData"]["url"]) for s in redis_secrets) == [
        (NAMESPACE, OPERATOR_REDIS_URL), ("repobox-jobs", RUNNER_REDIS_URL)]


def test_runner_redis_existing_secret_is_referenced_not_created():
    objs = render(merge(REQUIRED, {"redis": {"runner": {
        "existingSecret": "runner-redis", "existingSecretKey": "REDIS_URL"}}}))
    values = env_values(operator_container(objs))
    assert (values["REDIS_SECRET_NAME"], values["REDIS_SECRET_KEY"]) == ("runner-redis", "REDIS_URL")
    names = {(s["metadata"]["name"], s["metadata"]["namespace"]) for s in of_kind(objs, "Secret")}
    assert ("runner-redis", NAMESPACE) not in names
    # The operator's chart-created Secret stays in the release namespace only.
    assert [n for n in names if n[0].endswith("-redis")] == [("repobox-repobox-operator-redis", NAMESPACE)]


def test_redis_ca_is_mounted_into_the_operator_and_named_for_runners():
    objs = render(VALUE_SETS["redis-users"])
    spec = operator_deployment(objs)["spec"]["template"]["spec"]
    c = spec["containers"][0]
    values = env_values(c)
    vol = [v for v in spec["volumes"] if v["name"] == "redis-ca"][0]
    assert vol["secret"] == {"secretName": "redis-ca", "items": [{"key": "ca.pem", "path": "ca.crt"}]}
    mount = [m for m in c["volumeMounts"] if m["name"] == "redis-ca"][0]
    assert mount["readOnly"] is True
    assert values["REDIS_CA_FILE"] == mount["mountPath"] + "/ca.crt"
    assert (values["REDIS_CA_SECRET_NAME"], values["REDIS_CA_SECRET_KEY"]) == ("redis-ca", "ca.pem")
    # Without a CA nothing is mounted and the operator uses the system roots.
    objs = render(VALUE_SETS["defaults"])
    spec = operator_deployment(objs)["spec"]["template"]["spec"]
    assert [v["name"] for v in spec["volumes"]] == ["tmp"]
    assert env_values(spec["containers"][0])["REDIS_CA_FILE"] == ""
    assert env_values(spec["containers"][0])["REDIS_CA_SECRET_NAME"] == ""


@pytest.mark.parametrize("values,needle", [
    (merge(REQUIRED, {"redis": {"tls": {"caSecret": "redis-ca"}}}),
     "redis.tls.caSecret is set, so redis.url must be a TLS URL"),
    (merge(REQUIRED, {"redis": {"runner": {"url": "http://r"}}}), "redis.runner.url must start with"),
    (merge(REQUIRED, {"redis": {"url": OPERATOR_REDIS_URL, "runner": {"url": "redis://r:6379"},
                                "tls": {"caSecret": "redis-ca"}}}),
     "redis.runner.url must be a TLS URL"),
])
def test_bad_redis_urls_fail_with_a_clear_message(values, needle):
    with pytest.raises(helm.HelmError) as err:
        render_raw(values)
    assert needle in str(err.value), str(err.value)


def notes_of(values: dict) -> str:
    return render_raw(values)["repobox-operator/templates/NOTES.txt"]


@pytest.mark.parametrize("values,warned", [
    (REQUIRED, []),
    (VALUE_SETS["redis-users"], []),
    (VALUE_SETS["existing-secrets"], []),
    (merge(REQUIRED, {"redis": {"url": "redis://redis.redis.svc:6379/0"}}), ["redis.url"]),
    # A user name alone is not a password.
    (merge(REQUIRED, {"redis": {"url": "rediss://repobox@redis.redis.svc:6380"}}), ["redis.url"]),
    (merge(REQUIRED, {"redis": {"url": "redis+unix:///run/redis.sock?pass=x"}}), []),
    (merge(REQUIRED, {"redis": {"runner": {"url": "redis://redis.redis.svc:6379"}}}),
     ["redis.runner.url"]),
    (merge(REQUIRED, {"redis": {"url": "redis://r:6379", "runner": {"url": "redis://r:6379"}}}),
     ["redis.runner.url", "redis.url"]),
])
def test_notes_warn_when_a_redis_url_has_no_password(values, warned):
    notes = notes_of(values)
    found = sorted(line.split()[1] for line in notes.splitlines()
                   if line.startswith("WARNING:") and "has no password" in line)
    assert found == warned, notes


# ----- RBAC -----

EXPECTED_RULES = {
    ("repobox.dev", "repoboxjobs"): {"get", "list", "watch", "create", "update", "patch", "delete"},
    ("repobox.dev", "repoboxjobs/status"): {"get", "update", "patch"},
    ("repobox.dev", "repoboxjobs/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    # list/watch: the autoscaler's and the scheduler's events on runner pods.
    ("", "events"): {"create", "patch", "list", "watch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
EXPECTED_LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def rules_by_resource(roles):
    got: dict[tuple[str, str], set[str]] = {}
    for role in roles:
        for rule in role["rules"]:
            for verb in rule["verbs"]:
                assert verb != "*"
            for g in rule["apiGroups"]:
                assert g != "*"
                for r in rule["resources"]:
                    assert r != "*" and "*" not in r
                    got.setdefault((g, r), set()).update(rule["verbs"])
    return got


def test_rbac_is_namespaced_and_least_privilege(rendered):
    name, objs = rendered
    assert not of_kind(objs, "ClusterRole") and not of_kind(objs, "ClusterRoleBinding")
    jobs_ns = env_values(operator_container(objs))["JOBS_NAMESPACE"]
    lease_ns = env_values(operator_container(objs))["LEASE_NAMESPACE"]
    lease_name = env_values(operator_container(objs))["LEASE_NAME"]
    roles = of_kind(objs, "Role")
    main = [r for r in roles if r["metadata"]["namespace"] == jobs_ns and "leases" not in json.dumps(r)]
    assert rules_by_resource(main) == EXPECTED_RULES
    lease_roles = [r for r in roles if "leases" in json.dumps(r)]
    assert [r["metadata"]["namespace"] for r in lease_roles] == [lease_ns]
    assert rules_by_resource(lease_roles) == EXPECTED_LEASE_RULES
    for rule in lease_roles[0]["rules"]:
        if set(rule["verbs"]) & {"get", "update"}:
            assert rule["resourceNames"] == [lease_name]
    all_rules = rules_by_resource(roles)
    assert not any(r in ("secrets", "configmaps") for _, r in all_rules)
    # Every Role is bound to the operator's ServiceAccount only.
    sa = operator_deployment(objs)["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = of_kind(objs, "RoleBinding")
    assert sorted(b["roleRef"]["name"] for b in bindings) == sorted(r["metadata"]["name"] for r in roles)
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
        role = one(roles, "Role", b["roleRef"]["name"])
        assert role["metadata"]["namespace"] == b["metadata"]["namespace"]


def test_runner_service_account_has_no_token_and_no_binding(rendered):
    name, objs = rendered
    c = env_values(operator_container(objs))
    runner_sa = one(objs, "ServiceAccount", c["RUNNER_SERVICE_ACCOUNT"])
    assert runner_sa["automountServiceAccountToken"] is False
    assert runner_sa["metadata"]["namespace"] == c["JOBS_NAMESPACE"]
    for b in of_kind(objs, "RoleBinding"):
        assert all(s["name"] != runner_sa["metadata"]["name"] for s in b["subjects"])
    op_sa = one(objs, "ServiceAccount", operator_deployment(objs)["spec"]["template"]["spec"]["serviceAccountName"])
    assert op_sa["metadata"]["name"] != runner_sa["metadata"]["name"]


# ----- replicas, PDB, leader election -----

def test_single_replica_has_no_pdb():
    objs = render(VALUE_SETS["defaults"])
    assert operator_deployment(objs)["spec"]["replicas"] == 1
    assert not of_kind(objs, "PodDisruptionBudget")


def test_two_replicas_have_a_pdb_and_leader_election():
    objs = render(VALUE_SETS["two-replicas"])
    dep = operator_deployment(objs)
    assert dep["spec"]["replicas"] == 2
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    env = env_values(operator_container(objs))
    assert env["LEADER_ELECTION"] == "true"
    spec = dep["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"


# ----- runner settings -----

def test_runner_settings_reach_the_operator_env():
    objs = render(VALUE_SETS["runner-custom"])
    c = operator_container(objs)
    env = env_values(c)
    assert json_env(c, "RUNNER_NODE_SELECTOR") == RUNNER_NODE_SELECTOR
    assert json_env(c, "RUNNER_TOLERATIONS") == RUNNER_TOLERATIONS
    assert json_env(c, "RUNNER_AFFINITY") == RUNNER_AFFINITY
    assert env["RUNNER_IMAGE"] == "registry.example.com/repobox/job-runner:1.2.3"
    assert env["RUNNER_IMAGE_PULL_POLICY"] == "Always"
    assert env["RUNNER_IMAGE_PULL_SECRETS"] == "regcred"
    assert (env["RUNNER_CPU_REQUEST"], env["RUNNER_CPU_LIMIT"]) == ("1", "4")
    assert (env["RUNNER_MEMORY_REQUEST"], env["RUNNER_MEMORY_LIMIT"]) == ("1Gi", "4Gi")
    assert (env["RUNNER_EPHEMERAL_STORAGE"], env["RUNNER_TMP_SIZE_LIMIT"]) == ("20Gi", "2Gi")
    assert env["RUNNER_PRIORITY_CLASS"] == "repobox-jobs"
    assert env["JOB_TTL_SECONDS"] == "600"
    assert env["RUNNER_ENV_FROM_SECRETS"] == "agent-api-keys,agent-extra"
    assert env["AGENT_COMMAND"] == "agent --non-interactive"
    assert env["ALLOW_INSECURE_HTTP"] == "true"
    assert env["OPEN_PULL_REQUESTS"] == "false"
    assert (env["GIT_CA_CONFIGMAP"], env["GIT_CA_KEY"]) == ("git-ca", "bundle.pem")
    assert env["AGENT_IMAGE"] == "registry.example.com/agents/claude:7"
    assert env["AGENT_UID"] == "2000"
    assert (env["AGENT_CPU_REQUEST"], env["AGENT_CPU_LIMIT"]) == ("2", "8")
    assert (env["AGENT_MEMORY_REQUEST"], env["AGENT_MEMORY_LIMIT"]) == ("4Gi", "16Gi")
    assert json.loads(env["AGENT_EXTRA_ENV"]) == {"MODEL": "large", "MAX_TURNS": "40"}
    assert env["GIT_CLONE_DEPTH"] == "0"
    assert env["JOBS_NAMESPACE"] == "repobox-jobs"
    assert env["LEASE_NAMESPACE"] == NAMESPACE
    # Large numbers stay integers (no 2e+06).
    assert env["RETENTION_SECONDS"] == "2000000"
    assert (env["MAX_JOBS_PER_USER"], env["MAX_CONCURRENT_JOBS"]) == ("2", "50")


def test_runner_scheduling_json_is_valid_kubernetes():
    """What the operator will put into the runner pod spec validates as a pod spec."""
    c = operator_container(render(VALUE_SETS["runner-custom"]))
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
        "spec": {
            "containers": [{"name": "runner", "image": "i"}],
            "nodeSelector": json_env(c, "RUNNER_NODE_SELECTOR"),
            "tolerations": json_env(c, "RUNNER_TOLERATIONS"),
            "affinity": json_env(c, "RUNNER_AFFINITY"),
        },
    }
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


def test_empty_scheduling_is_rendered_as_unset():
    env = env_values(operator_container(render(VALUE_SETS["defaults"])))
    for k in ["RUNNER_NODE_SELECTOR", "RUNNER_TOLERATIONS", "RUNNER_AFFINITY", "RUNNER_PRIORITY_CLASS",
              "RUNNER_ENV_FROM_SECRETS", "RUNNER_IMAGE_PULL_SECRETS", "AGENT_COMMAND",
              "AGENT_IMAGE", "AGENT_EXTRA_ENV", "GIT_CA_CONFIGMAP"]:
        assert env[k] == "", k
    assert env["ALLOW_INSECURE_HTTP"] == "false"
    assert env["OPEN_PULL_REQUESTS"] == "true"


# ----- agreement with operator/src/config.rs -----

def test_operator_env_names_are_config_rs_names(rendered):
    name, objs = rendered
    known = config_env_names()
    set_by_chart = set(env_of(operator_container(objs)))
    unknown = set_by_chart - known
    assert not unknown, f"{name}: the chart sets env vars operator/src/config.rs does not read: {unknown}"


def test_chart_sets_every_config_rs_setting():
    # HOSTNAME is the runtime's; RUNNER_ID defaults to POD_NAME (the lease identity).
    not_by_chart = {"HOSTNAME", "RUNNER_ID"}
    set_by_chart = set(env_of(operator_container(render(VALUE_SETS["defaults"]))))
    missing = config_env_names() - not_by_chart - set_by_chart
    assert not missing, f"operator settings the chart cannot set: {missing}"


def test_chart_defaults_match_config_rs_defaults():
    """Where the operator has a literal default, the chart's default is the same, except where
    the chart deliberately derives it from the release."""
    derived = {"LEASE_NAME", "RUNNER_SERVICE_ACCOUNT", "REDIS_SECRET_NAME", "REDIS_SECRET_KEY",
               "ENCRYPTION_KEY_SECRET_NAME", "ENCRYPTION_KEY_SECRET_KEY", "RUNNER_IMAGE"}
    env = env_values(operator_container(render(VALUE_SETS["defaults"])))
    defaults = config_defaults()
    assert len(defaults) > 20, defaults
    diffs = {k: (env[k], v) for k, v in defaults.items()
             if k in env and k not in derived and env[k] != v}
    assert not diffs, f"chart default != config.rs default (chart, config.rs): {diffs}"


def test_quota_tiers_and_per_user_queue_cap():
    env = env_values(operator_container(render(VALUE_SETS["defaults"])))
    assert env["PLAN_LIMITS"] == "" and env["MAX_QUEUED_PER_USER"] == "0"
    objs = render(merge(VALUE_SETS["defaults"], {"config": {
        "planLimits": {"free": 1, "pro": 4}, "maxQueuedPerUser": 20}}))
    c = operator_container(objs)
    assert json_env(c, "PLAN_LIMITS") == {"free": 1, "pro": 4}
    assert env_values(c)["MAX_QUEUED_PER_USER"] == "20"


@pytest.mark.parametrize("plans", [{"free": 0}, {"free": "1"}, {"default": 2}, {"a b": 1},
                                   {"pro": 1001}])
def test_schema_rejects_unusable_plan_limits(plans):
    values = merge(REQUIRED, {"config": {"planLimits": plans}})
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(values)


def test_runner_image_repository_matches_the_operator_default():
    src = config_rs_source()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f'"{values["runner"]["image"]["repository"]}:"' in src


# ----- network policy -----

def runner_policy(objs):
    sel = {"app.kubernetes.io/name": rust_str_const(JOB_BUILDER_RS, "APP_NAME"),
           "app.kubernetes.io/managed-by": rust_str_const(JOB_BUILDER_RS, "MANAGED_BY")}
    found = [p for p in of_kind(objs, "NetworkPolicy") if p["spec"]["podSelector"].get("matchLabels") == sel]
    assert len(found) == 1, "no NetworkPolicy selects the runner pods by job_builder's labels"
    return found[0]


def test_networkpolicy_runner_egress(rendered):
    name, objs = rendered
    if name == "networkpolicy-off":
        assert not of_kind(objs, "NetworkPolicy")
        return
    env = env_values(operator_container(objs))
    pol = runner_policy(objs)
    assert pol["metadata"]["namespace"] == env["JOBS_NAMESPACE"]
    spec = pol["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert not spec.get("ingress")
    ipblocks = [peer["ipBlock"] for rule in spec["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
    for rule in spec["egress"]:
        assert rule.get("to"), "an egress rule without `to` allows every destination"
        assert rule.get("ports"), "an egress rule without ports allows every port"
    wide = [b for b in ipblocks if b["cidr"] == "0.0.0.0/0"]
    assert wide, ipblocks
    for b in wide:
        assert "169.254.169.254/32" in b["except"]
    ports = sorted({p["port"] for rule in spec["egress"] for p in rule["ports"]})
    assert 53 in ports and 6379 in ports and 443 in ports
    assert 6443 not in ports
    if name == "servicemonitor":
        for cidr in ["172.18.0.2/32", "10.96.0.1/32"]:
            assert cidr in wide[0]["except"]
        v6 = [b for b in ipblocks if b["cidr"] == "::/0"]
        assert v6 and v6[0]["except"] == ["fd00:ec2::254/128"]
        assert {"cidr": "10.20.0.0/24"} in ipblocks
        # redis.podSelector: null leaves only the CIDR rule.
        redis_rules = [r for r in spec["egress"] if r["ports"] == [{"protocol": "TCP", "port": 6379}]]
        assert redis_rules[0]["to"] == [{"ipBlock": {"cidr": "10.20.0.0/24"}}]


def redis_peers(policy: dict) -> list[dict]:
    return [peer for rule in policy["spec"]["egress"]
            if {p["port"] for p in rule["ports"]} == {6379}
            for peer in rule["to"] if "podSelector" in peer]


@pytest.mark.parametrize("over,selector", [
    ({}, {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}),
    ({"namespace": "redis"}, {"matchLabels": {"kubernetes.io/metadata.name": "redis"}}),
    ({"namespace": "redis", "namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "Exists"}]}},
     {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "Exists"}]}),
])
def test_networkpolicy_redis_rule_defaults_to_the_release_namespace(over, selector):
    objs = render(merge(REQUIRED, {"jobsNamespace": "repobox-jobs",
                                   "networkPolicy": {"redis": over}}))
    policies = of_kind(objs, "NetworkPolicy")
    assert len(policies) == 2
    for pol in policies:
        peers = redis_peers(pol)
        assert len(peers) == 1, pol["metadata"]["name"]
        assert peers[0]["namespaceSelector"] == selector
        assert peers[0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "redis"}}
    notes = notes_of(merge(REQUIRED, {"networkPolicy": {"redis": over}}))
    if not over.get("namespaceSelector"):
        assert f"Redis pods are reachable in namespace {over.get('namespace', NAMESPACE)} only" in notes


def test_networkpolicy_operator(rendered):
    name, objs = rendered
    if name == "networkpolicy-off":
        return
    dep = operator_deployment(objs)
    pols = [p for p in of_kind(objs, "NetworkPolicy")
            if p["spec"]["podSelector"].get("matchLabels") == dep["spec"]["selector"]["matchLabels"]]
    assert len(pols) == 1
    spec = pols[0]["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert [p["port"] for rule in spec["ingress"] for p in rule["ports"]] == [8080]
    egress_ports = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
    assert {53, 6379, 443, 6443} <= egress_ports
    if name == "servicemonitor":
        api = [r for r in spec["egress"] if {p["port"] for p in r["ports"]} == {443, 6443}][0]
        assert api["to"] == [{"ipBlock": {"cidr": "172.18.0.2/32"}}, {"ipBlock": {"cidr": "10.96.0.1/32"}}]
        assert spec["ingress"][0]["from"]


# ----- metrics -----

def test_metrics_service_and_servicemonitor():
    objs = render(VALUE_SETS["defaults"])
    assert not of_kind(objs, "ServiceMonitor")
    objs = render(VALUE_SETS["servicemonitor"])
    svc = one(objs, "Service")
    dep = operator_deployment(objs)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    for k, v in sm["spec"]["selector"]["matchLabels"].items():
        assert svc["metadata"]["labels"][k] == v


# ----- labels, NOTES -----

def test_standard_labels_on_every_object(rendered):
    name, objs = rendered
    for obj in objs:
        labels = obj["metadata"].get("labels", {})
        for key in STANDARD_LABELS:
            assert labels.get(key), f"{name}: {obj['kind']}/{obj['metadata']['name']} lacks {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "repobox"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    dep = operator_deployment(objs)
    tmpl = dep["spec"]["template"]["metadata"]["labels"]
    for key in STANDARD_LABELS:
        assert tmpl.get(key)


def test_every_namespaced_object_has_an_explicit_namespace(rendered):
    name, objs = rendered
    for obj in objs:
        if obj["kind"] in CLUSTER_SCOPED_KINDS:
            assert "namespace" not in obj["metadata"], f"{obj['kind']}/{obj['metadata']['name']}"
            continue
        assert obj["metadata"].get("namespace"), f"{obj['kind']}/{obj['metadata']['name']}"


def test_notes_tell_how_to_watch_jobs():
    notes = render_raw(VALUE_SETS["runner-custom"])["repobox-operator/templates/NOTES.txt"]
    assert "kubectl get repoboxjobs -n repobox-jobs" in notes
    assert "kubectl describe rbj" in notes


def test_runner_uid_matches_the_chart_and_image():
    assert rust_int_const(JOB_BUILDER_RS, "RUNNER_UID") == 65532
