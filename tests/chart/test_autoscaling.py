"""Chart checks of issue 10: autoscaling-friendly runner settings, priority classes, warm
capacity, the PrometheusRule's shape and the Grafana dashboard ConfigMap. (What the alerts do is
in test_alerts.py.)"""

from __future__ import annotations

import json

import pytest

import helm_python as helm

from conftest import (
    CHART, NAMESPACE, RELEASE, REQUIRED, RUNNER_AFFINITY, RUNNER_NODE_SELECTOR,
    RUNNER_TOLERATIONS, VALUE_SETS,
    env_values, json_env, merge, of_kind, one, operator_container, operator_deployment, render,
)

FULLNAME = f"{RELEASE}-repobox-operator"


def env(values: dict) -> dict[str, str]:
    return env_values(operator_container(render(values)))


def schema_rejects(values: dict) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(values)


def schema_accepts(values: dict) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)


# ----- runner values → operator env -----

def test_autoscaling_env_defaults():
    e = env(REQUIRED)
    assert e["RUNNER_EPHEMERAL_STORAGE_REQUEST"] == "2Gi"
    assert e["RUNNER_EPHEMERAL_STORAGE_LIMIT"] == ""
    assert e["AGENT_EPHEMERAL_STORAGE_REQUEST"] == "1Gi"
    assert e["AGENT_EPHEMERAL_STORAGE_LIMIT"] == ""
    assert e["RUNNER_DO_NOT_DISRUPT"] == "true"
    assert e["RUNNER_POD_ANNOTATIONS"] == ""
    assert e["UNSCHEDULABLE_GRACE_SECONDS"] == "60"
    assert e["MAX_DISRUPTION_RETRIES"] == "2"
    assert e["DISRUPTION_RETRY_BACKOFF_SECONDS"] == "10"


def test_autoscaling_env_custom():
    c = operator_container(render(VALUE_SETS["autoscaling"]))
    e = env_values(c)
    assert (e["RUNNER_EPHEMERAL_STORAGE_REQUEST"], e["RUNNER_EPHEMERAL_STORAGE_LIMIT"]) == ("4Gi", "12Gi")
    assert (e["AGENT_EPHEMERAL_STORAGE_REQUEST"], e["AGENT_EPHEMERAL_STORAGE_LIMIT"]) == ("3Gi", "8Gi")
    assert e["RUNNER_DO_NOT_DISRUPT"] == "false"
    assert json_env(c, "RUNNER_POD_ANNOTATIONS") == {
        "example.com/cost-center": "repobox", "sidecar.istio.io/inject": "false"}
    assert e["UNSCHEDULABLE_GRACE_SECONDS"] == "120"
    # 0 is a value, not "unset".
    assert e["MAX_DISRUPTION_RETRIES"] == "0"
    assert e["DISRUPTION_RETRY_BACKOFF_SECONDS"] == "30"


@pytest.mark.parametrize("over,name,want", [
    ({"runner": {"ephemeralStorageRequest": ""}}, "RUNNER_EPHEMERAL_STORAGE_REQUEST", ""),
    # Large numbers keep their digits (no 2.147483648e+09), fractions stay fractions.
    ({"runner": {"ephemeralStorageRequest": 2147483648}}, "RUNNER_EPHEMERAL_STORAGE_REQUEST", "2147483648"),
    ({"runner": {"ephemeralStorageLimit": 1.5}}, "RUNNER_EPHEMERAL_STORAGE_LIMIT", "1.5"),
    ({"runner": {"resources": {"limits": {"memory": 4294967296}}}}, "RUNNER_MEMORY_LIMIT", "4294967296"),
    ({"agent": {"ephemeralStorageRequest": ""}}, "AGENT_EPHEMERAL_STORAGE_REQUEST", ""),
    ({"agent": {"ephemeralStorageLimit": "500Mi"}}, "AGENT_EPHEMERAL_STORAGE_LIMIT", "500Mi"),
    ({"runner": {"unschedulableGraceSeconds": 0}}, "UNSCHEDULABLE_GRACE_SECONDS", "0"),
    ({"runner": {"unschedulableGraceSeconds": 3600}}, "UNSCHEDULABLE_GRACE_SECONDS", "3600"),
    ({"runner": {"disruptionRetryBackoffSeconds": 0}}, "DISRUPTION_RETRY_BACKOFF_SECONDS", "0"),
    ({"runner": {"disruptionRetries": 10}}, "MAX_DISRUPTION_RETRIES", "10"),
    ({"runner": {"podAnnotations": {"a": "1"}}}, "RUNNER_POD_ANNOTATIONS", '{"a":"1"}'),
])
def test_each_autoscaling_value_reaches_its_env(over, name, want):
    assert env(merge(REQUIRED, over))[name] == want


@pytest.mark.parametrize("bad", [
    {"runner": {"ephemeralStorageRequest": "2 Gi"}},
    {"runner": {"ephemeralStorageRequest": "-1Gi"}},
    {"runner": {"ephemeralStorageRequest": -1}},
    {"runner": {"ephemeralStorageLimit": "lots"}},
    {"agent": {"ephemeralStorageRequest": "1GB"}},
    {"agent": {"ephemeralStorageLimit": True}},
    {"agent": {"ephemeralStorage": "1Gi"}},
    {"runner": {"doNotDisrupt": "yes"}},
    {"runner": {"podAnnotations": {"a": 1}}},
    {"runner": {"podAnnotations": {"bad key": "x"}}},
    {"runner": {"podAnnotations": {"/x": "x"}}},
    {"runner": {"podAnnotations": []}},
    {"runner": {"unschedulableGraceSeconds": -1}},
    {"runner": {"unschedulableGraceSeconds": "60"}},
    {"runner": {"disruptionRetries": -1}},
    {"runner": {"disruptionRetries": 11}},
    {"runner": {"disruptionRetries": 1.5}},
    {"runner": {"disruptionRetryBackoffSeconds": -5}},
    {"runner": {"disruptionRetryBackofSeconds": 5}},
])
def test_bad_autoscaling_values_fail_schema_validation(bad):
    schema_rejects(merge(REQUIRED, bad))


def test_good_annotation_keys_pass_schema_validation():
    schema_accepts(merge(REQUIRED, {"runner": {"podAnnotations": {
        "karpenter.sh/do-not-disrupt": "true", "a": "", "x.example.com/A_b-c.d": "v"}}}))


# ----- priority classes -----

def priority_classes(objs) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in of_kind(objs, "PriorityClass")}


def test_no_priority_classes_by_default():
    objs = render(REQUIRED)
    assert not of_kind(objs, "PriorityClass")
    assert "priorityClassName" not in operator_deployment(objs)["spec"]["template"]["spec"]
    assert env_values(operator_container(objs))["RUNNER_PRIORITY_CLASS"] == ""


def test_created_priority_classes_are_used():
    objs = render(merge(REQUIRED, {"priorityClasses": {"create": True}}))
    pcs = priority_classes(objs)
    assert sorted(pcs) == [f"{FULLNAME}-operator", f"{FULLNAME}-runner"]
    op, runner = pcs[f"{FULLNAME}-operator"], pcs[f"{FULLNAME}-runner"]
    assert (op["value"], runner["value"]) == (100000, 1000)
    assert op["globalDefault"] is False and runner["globalDefault"] is False
    assert runner["preemptionPolicy"] == "PreemptLowerPriority"
    spec = operator_deployment(objs)["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == f"{FULLNAME}-operator"
    assert env_values(operator_container(objs))["RUNNER_PRIORITY_CLASS"] == f"{FULLNAME}-runner"


def test_explicit_priority_class_names_win_and_are_not_created():
    objs = render(merge(REQUIRED, {
        "priorityClasses": {"create": True},
        "priorityClassName": "system-cluster-critical",
        "runner": {"priorityClassName": "batch-high"},
    }))
    assert not of_kind(objs, "PriorityClass")
    assert operator_deployment(objs)["spec"]["template"]["spec"]["priorityClassName"] == "system-cluster-critical"
    assert env_values(operator_container(objs))["RUNNER_PRIORITY_CLASS"] == "batch-high"
    # Only one of them given: the other is still created.
    objs = render(merge(REQUIRED, {"priorityClasses": {"create": True},
                                   "runner": {"priorityClassName": "batch-high"}}))
    assert sorted(priority_classes(objs)) == [f"{FULLNAME}-operator"]


def test_priority_class_names_and_values_are_configurable():
    objs = render(merge(REQUIRED, {"priorityClasses": {
        "create": True,
        "operator": {"name": "repobox-operator", "value": 5000},
        "runner": {"name": "repobox-runner", "value": 10, "preemptionPolicy": "Never"},
    }}))
    pcs = priority_classes(objs)
    assert pcs["repobox-operator"]["value"] == 5000
    assert (pcs["repobox-runner"]["value"], pcs["repobox-runner"]["preemptionPolicy"]) == (10, "Never")
    assert env_values(operator_container(objs))["RUNNER_PRIORITY_CLASS"] == "repobox-runner"


@pytest.mark.parametrize("bad", [
    {"priorityClasses": {"create": "yes"}},
    {"priorityClasses": {"runner": {"value": -1}}},
    {"priorityClasses": {"runner": {"value": 1000000001}}},
    {"priorityClasses": {"operator": {"value": 2000000000}}},
    {"priorityClasses": {"runner": {"preemptionPolicy": "Always"}}},
    {"priorityClasses": {"runner": {"name": "Runner"}}},
    {"priorityClasses": {"runner": {"globalDefault": True}}},
])
def test_bad_priority_values_fail_schema_validation(bad):
    schema_rejects(merge(REQUIRED, bad))


# ----- warm capacity -----

def warm(objs) -> dict:
    found = [d for d in of_kind(objs, "Deployment")
             if d["metadata"]["labels"]["app.kubernetes.io/component"] == "warm-capacity"]
    assert len(found) == 1
    return found[0]


def requests_of(spec: dict) -> dict[str, list[str]]:
    return {c["name"]: c.get("resources", {}).get("requests", {}) for c in spec["containers"]}


def test_no_warm_capacity_by_default():
    objs = render(REQUIRED)
    assert len(of_kind(objs, "Deployment")) == 1


def test_warm_capacity_is_a_runner_pod_worth_of_pause_pods_on_runner_nodes():
    objs = render(VALUE_SETS["autoscaling"])
    dep = warm(objs)
    c = env_values(operator_container(objs))
    assert dep["metadata"]["namespace"] == c["JOBS_NAMESPACE"] == "repobox-jobs"
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # Never selects the operator's pods (nor they its).
    op_sel = operator_deployment(objs)["spec"]["selector"]["matchLabels"]
    assert not op_sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # Same nodes as runner pods.
    assert spec["nodeSelector"] == RUNNER_NODE_SELECTOR == json_env(operator_container(objs), "RUNNER_NODE_SELECTOR")
    assert spec["tolerations"] == RUNNER_TOLERATIONS
    assert spec["affinity"] == RUNNER_AFFINITY
    # One runner pod's worth: a twin of each runner pod container (runner and agent).
    assert requests_of(spec) == {
        "runner": {"cpu": "250m", "memory": "256Mi", "ephemeral-storage": "4Gi"},
        "agent": {"cpu": "500m", "memory": "512Mi", "ephemeral-storage": "3Gi"},
    }
    for container in spec["containers"]:
        assert container["image"] == "registry.k8s.io/pause:3.9"
        assert "limits" not in container.get("resources", {})
    # No token, no service links, preempted at once.
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["serviceAccountName"] == c["RUNNER_SERVICE_ACCOUNT"]
    assert spec["terminationGracePeriodSeconds"] == 0


def test_warm_capacity_priority_is_below_runners_and_above_the_autoscaler_cutoff():
    objs = render(VALUE_SETS["autoscaling"])
    spec = warm(objs)["spec"]["template"]["spec"]
    pcs = priority_classes(objs)
    warm_pc = pcs[spec["priorityClassName"]]
    assert warm_pc["value"] == -5
    assert warm_pc["preemptionPolicy"] == "Never"
    assert warm_pc["globalDefault"] is False
    runner_pc = pcs[env_values(operator_container(objs))["RUNNER_PRIORITY_CLASS"]]
    assert -10 <= warm_pc["value"] < 0 < runner_pc["value"]
    assert runner_pc["preemptionPolicy"] == "PreemptLowerPriority"


def test_warm_capacity_without_chart_priority_classes_still_gets_its_own():
    objs = render(merge(REQUIRED, {"warmCapacity": {"enabled": True, "priority": -10}}))
    assert [(p["metadata"]["name"], p["value"]) for p in of_kind(objs, "PriorityClass")] == [
        (f"{FULLNAME}-warm-capacity", -10)]
    spec = warm(objs)["spec"]["template"]["spec"]
    # No agent command: runner pods have one container, so do the placeholders.
    assert requests_of(spec) == {"runner": {"cpu": "250m", "memory": "256Mi", "ephemeral-storage": "2Gi"}}
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
        assert key not in spec


def test_warm_capacity_explicit_sizes_replace_the_runner_pod_sum():
    objs = render(merge(REQUIRED, {
        "runner": {"agentCommand": "agent"},
        "warmCapacity": {"enabled": True, "cpu": "2", "memory": "4Gi",
                         "image": {"repository": "mirror.example.com/pause", "tag": "3.10",
                                   "pullPolicy": "Always"},
                         "imagePullSecrets": ["mirror-cred"]},
    }))
    spec = warm(objs)["spec"]["template"]["spec"]
    # cpu and memory given: all of it on the first container; ephemeral storage still the sum.
    assert requests_of(spec) == {
        "runner": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "2Gi"},
        "agent": {"ephemeral-storage": "1Gi"},
    }
    assert {c["image"] for c in spec["containers"]} == {"mirror.example.com/pause:3.10"}
    assert {c["imagePullPolicy"] for c in spec["containers"]} == {"Always"}
    assert spec["imagePullSecrets"] == [{"name": "mirror-cred"}]


def test_warm_capacity_with_no_runner_requests_at_all():
    objs = render(merge(REQUIRED, {
        "runner": {"resources": {"requests": {"cpu": "", "memory": ""}}, "ephemeralStorageRequest": ""},
        "warmCapacity": {"enabled": True, "memory": 1073741824},
    }))
    spec = warm(objs)["spec"]["template"]["spec"]
    assert requests_of(spec) == {"runner": {"memory": "1073741824"}}


def test_warm_capacity_pods_are_restricted():
    spec = warm(render(VALUE_SETS["autoscaling"]))["spec"]["template"]["spec"]
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any(k in spec for k in ("hostNetwork", "hostPID", "hostIPC", "volumes"))
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert not c.get("ports") and not c.get("env") and not c.get("volumeMounts")


@pytest.mark.parametrize("bad", [
    {"warmCapacity": {"priority": -11}},
    {"warmCapacity": {"priority": 0}},
    {"warmCapacity": {"priority": 1000}},
    {"warmCapacity": {"replicas": -1}},
    {"warmCapacity": {"cpu": "two"}},
    {"warmCapacity": {"memory": "1 Gi"}},
    {"warmCapacity": {"ephemeralStorage": -1}},
    {"warmCapacity": {"image": {"repository": ""}}},
    {"warmCapacity": {"image": {"pullPolicy": "Sometimes"}}},
    {"warmCapacity": {"imagePullSecrets": [{"name": "x"}]}},
    {"warmCapacity": {"enable": True}},
])
def test_bad_warm_capacity_values_fail_schema_validation(bad):
    schema_rejects(merge(REQUIRED, bad))


@pytest.mark.parametrize("priority", [-10, -5, -1])
def test_warm_capacity_priority_range(priority):
    schema_accepts(merge(REQUIRED, {"warmCapacity": {"enabled": True, "priority": priority}}))


# ----- PrometheusRule and dashboard: shape (behaviour: test_alerts.py) -----

ALERTS = ["RepoboxIntakeLag", "RepoboxJobsQueuedTooLong", "RepoboxRunnerPodsWaitingForNode",
          "RepoboxJobFailureRatioHigh", "RepoboxNoLeader"]


def rules_of(values: dict) -> list[dict]:
    pr = one(render(values), "PrometheusRule")
    return [r for g in pr["spec"]["groups"] for r in g["rules"]]


def test_no_prometheus_rule_or_dashboard_by_default():
    objs = render(REQUIRED)
    assert not of_kind(objs, "PrometheusRule")
    assert not of_kind(objs, "ConfigMap")


def test_prometheus_rule_has_every_alert_with_labels_and_annotations():
    objs = render(VALUE_SETS["autoscaling"])
    pr = one(objs, "PrometheusRule")
    assert pr["apiVersion"] == "monitoring.coreos.com/v1"
    assert pr["metadata"]["namespace"] == NAMESPACE
    assert pr["metadata"]["labels"]["release"] == "prometheus"
    rules = [r for g in pr["spec"]["groups"] for r in g["rules"]]
    assert [r["alert"] for r in rules] == ALERTS
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["labels"]["team"] == "platform"
        assert set(r["annotations"]) == {"summary", "description", "runbook_url"}
        assert r["annotations"]["runbook_url"] == f"docs/operations.md#{r['alert'].lower()}"
        assert f'namespace="{NAMESPACE}"' in r["expr"]
        assert r["for"]
    assert {r["alert"]: r["labels"]["severity"] for r in rules}["RepoboxNoLeader"] == "critical"


def test_every_alert_has_a_runbook_entry_in_the_docs():
    ops = (CHART.parents[1] / "docs" / "operations.md").read_text()
    for alert in ALERTS:
        assert f"### {alert}\n" in ops, alert


def test_prometheus_rule_thresholds_and_selector_are_values():
    rules = {r["alert"]: r for r in rules_of(merge(REQUIRED, {"prometheusRule": {
        "enabled": True,
        "selector": 'job="repobox-metrics",cluster="eu1"',
        "runbookBaseUrl": "https://wiki.example.com/repobox/operations",
        "intakeLag": {"thresholdSeconds": 15, "for": "3m", "severity": "critical"},
        "jobsQueuedTooLong": {"minutes": 45},
        "podsWaitingForNode": {"for": "20m"},
        "failureRatio": {"threshold": 0.5, "window": "6h", "minJobs": 50},
        "noLeader": {"enabled": False},
    }}))}
    assert sorted(rules) == sorted(set(ALERTS) - {"RepoboxNoLeader"})
    for r in rules.values():
        assert 'job="repobox-metrics",cluster="eu1"' in r["expr"]
        assert "namespace=" not in r["expr"]
        assert r["annotations"]["runbook_url"].startswith("https://wiki.example.com/repobox/operations#")
    lag = rules["RepoboxIntakeLag"]
    assert "> 15" in lag["expr"] and lag["for"] == "3m" and lag["labels"]["severity"] == "critical"
    queued = rules["RepoboxJobsQueuedTooLong"]["expr"]
    assert "> 2700" in queued and "[45m:1m]" in queued and "[45m]" in queued
    assert rules["RepoboxRunnerPodsWaitingForNode"]["for"] == "20m"
    ratio = rules["RepoboxJobFailureRatioHigh"]["expr"]
    assert "> 0.5" in ratio and "[6h]" in ratio and ">= 50" in ratio


@pytest.mark.parametrize("bad", [
    {"prometheusRule": {"intakeLag": {"for": "ten minutes"}}},
    {"prometheusRule": {"intakeLag": {"thresholdSeconds": 0}}},
    {"prometheusRule": {"jobsQueuedTooLong": {"minutes": 0}}},
    {"prometheusRule": {"failureRatio": {"threshold": 1.5}}},
    {"prometheusRule": {"failureRatio": {"window": "1 hour"}}},
    {"prometheusRule": {"failureRatio": {"minJobs": 0}}},
    {"prometheusRule": {"noLeader": {"severity": ""}}},
    {"prometheusRule": {"selector": '{namespace="x"}'}},
    {"prometheusRule": {"alertLabels": {"bad-label": "x"}}},
    {"prometheusRule": {"runbookBaseUrl": "https://x/#a"}},
    {"prometheusRule": {"intakelag": {}}},
    {"grafanaDashboard": {"labelValue": "not ok"}},
    {"grafanaDashboard": {"label": "bad label"}},
    {"grafanaDashboard": {"namespace": "Monitoring"}},
    {"grafanaDashboard": {"folders": "x"}},
])
def test_bad_alert_and_dashboard_values_fail_schema_validation(bad):
    schema_rejects(merge(REQUIRED, bad))


def test_grafana_dashboard_configmap():
    objs = render(VALUE_SETS["autoscaling"])
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Repobox"}
    assert list(cm["data"]) == ["repobox-operator.json"]
    dash = json.loads(cm["data"]["repobox-operator.json"])
    assert dash == json.loads((CHART / "files" / "repobox-dashboard.json").read_text())

    objs = render(merge(REQUIRED, {"grafanaDashboard": {
        "enabled": True, "label": "example.com/dashboard", "labelValue": "repobox",
        "folderAnnotation": "k8s-sidecar-target-directory"}}))
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["labels"]["example.com/dashboard"] == "repobox"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert "annotations" not in cm["metadata"]


def dashboard() -> dict:
    return json.loads((CHART / "files" / "repobox-dashboard.json").read_text())


def panel_exprs(dash: dict) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p.get("targets", [])]
            for p in dash["panels"] if p["type"] != "row"}


def test_dashboard_shows_what_operators_need():
    exprs = panel_exprs(dashboard())
    wanted = {
        "Queue depth per user": "repobox_user_jobs",
        "Admission wait": "repobox_admission_wait_seconds_bucket",
        "Time to running": "repobox_pod_startup_seconds_bucket",
        "Outcomes": "repobox_jobs_finished_total",
        "Pods waiting for a node": "repobox_pods_waiting_for_node",
        "Intake lag": "repobox_intake_latency_seconds_bucket",
        "Leader": "repobox_leader",
    }
    for title, metric in wanted.items():
        assert any(metric in e for e in exprs[title]), (title, exprs.get(title))
    assert any("repobox_pod_scheduling_seconds_bucket" in e for e in exprs["Time to running"])


def test_dashboard_is_portable():
    dash = dashboard()
    ds_vars = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert [v["name"] for v in ds_vars] == ["datasource"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        # The data source chosen in the dashboard, never a uid of someone's Grafana.
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            # Scoped to the namespace picked in the dashboard.
            assert 'namespace="$namespace"' in t["expr"], (p["title"], t["expr"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
