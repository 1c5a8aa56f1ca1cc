"""The chart's PrometheusRule, evaluated by Prometheus' own rule engine: `promtool test rules`
with input series that must fire each alert and series that must not.

promtool comes with the Debian package `prometheus`; tests/chart/run.sh installs it in CI. Without
it these tests are skipped locally (and fail in CI, where skipping would hide a broken alert)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import NAMESPACE, REQUIRED, merge, one, render

PROMTOOL = shutil.which("promtool")

OURS = f'namespace="{NAMESPACE}"'
ELSEWHERE = 'namespace="elsewhere"'

# What every alert carries besides its name (prometheusRule.alertLabels adds `team`).
WARNING = {"severity": "warning", "team": "platform"}
CRITICAL = {"severity": "critical", "team": "platform"}

VALUES = merge(REQUIRED, {"prometheusRule": {"enabled": True, "alertLabels": {"team": "platform"}}})


@pytest.fixture(scope="module")
def promtool() -> str:
    if PROMTOOL is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI: tests/chart/run.sh should have installed the "
                        "Debian package `prometheus`")
        pytest.skip("promtool not found (Debian package `prometheus`): the alert rules are not "
                    "evaluated")
    return PROMTOOL


@pytest.fixture(scope="module")
def rule_groups() -> list[dict]:
    return one(render(VALUES), "PrometheusRule")["spec"]["groups"]


def annotations_of(groups: list[dict], alert: str) -> dict[str, str]:
    return next(r["annotations"] for g in groups for r in g["rules"] if r.get("alert") == alert)


def run_promtool(promtool: str, tmp_path: Path, groups: list[dict], tests: list[dict]) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    out = subprocess.run([promtool, "test", "rules", "test.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{(tmp_path / 'test.yaml').read_text()}"


def without_annotations(groups: list[dict]) -> list[dict]:
    """The rules without annotations: promtool compares the expanded annotations of every alert
    it expects, and these tests are about when alerts fire (one test checks the text)."""
    groups = copy.deepcopy(groups)
    for g in groups:
        for r in g["rules"]:
            r.pop("annotations", None)
    return groups


# ----- input series -----

def counter(increments: list[int], start: int = 0) -> str:
    """A counter's samples, one a minute, from per-minute increments (first sample: start)."""
    values, total = [str(start)], start
    for inc in increments:
        total += inc
        values.append(str(total))
    return " ".join(values)


def gauge(values: list[float]) -> str:
    return " ".join(str(v) for v in values)


BUCKETS = ["1", "10", "60", "300", "1800", "3600", "+Inf"]


def histogram(metric: str, sel: str, minutes: int,
              observed: Callable[[int], list[float]]) -> list[dict]:
    """Bucket series of a histogram observing `observed(minute)` each minute."""
    series = []
    for le in BUCKETS:
        bound = float("inf") if le == "+Inf" else float(le)
        incs = [sum(1 for v in observed(m) if v <= bound) for m in range(1, minutes + 1)]
        series.append({"series": f'{metric}_bucket{{{sel},le="{le}"}}', "values": counter(incs)})
    return series


def case(series: list[dict], alert: str, checks: list[tuple[str, list[dict]]]) -> dict:
    """One promtool test: the series, and for each eval time the alerts expected (labels)."""
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            {"eval_time": t, "alertname": alert,
             "exp_alerts": [{"exp_labels": labels} for labels in expected]}
            for t, expected in checks
        ],
    }


def s(name: str, values: str) -> dict:
    return {"series": name, "values": values}


# ----- RepoboxIntakeLag: p95 intake latency over 5m > 60 s for 10m -----

INTAKE = "repobox_intake_latency_seconds"

INTAKE_CASES = {
    "slow intake fires": case(
        histogram(INTAKE, OURS, 40, lambda m: [120.0] * 10), "RepoboxIntakeLag",
        [("5m", []), ("20m", [WARNING])]),
    "fast intake does not fire": case(
        histogram(INTAKE, OURS, 40, lambda m: [0.05] * 10), "RepoboxIntakeLag", [("30m", [])]),
    "a slow spell shorter than `for` does not fire": case(
        histogram(INTAKE, OURS, 40, lambda m: [120.0] * 10 if 10 <= m < 16 else [0.05] * 10),
        "RepoboxIntakeLag", [("20m", []), ("35m", [])]),
    "another release's slow intake does not fire": case(
        histogram(INTAKE, ELSEWHERE, 40, lambda m: [120.0] * 10)
        + histogram(INTAKE, OURS, 40, lambda m: [0.05] * 10),
        "RepoboxIntakeLag", [("30m", [])]),
    "no traffic does not fire": case(
        histogram(INTAKE, OURS, 40, lambda m: []), "RepoboxIntakeLag", [("30m", [])]),
}


# ----- RepoboxJobsQueuedTooLong: p95 admission wait > 30 min, or queued 30 min, none admitted -----

WAIT = "repobox_admission_wait_seconds"
QUEUED = f'repobox_jobs_queued{{{OURS},pod="op-a"}}'
ADMITTED = f'repobox_jobs_admitted_total{{{OURS},pod="op-a"}}'

QUEUE_CASES = {
    "long admission waits fire": case(
        histogram(WAIT, OURS, 40, lambda m: [3000.0] * 5), "RepoboxJobsQueuedTooLong",
        [("25m", [WARNING])]),
    "a stuck queue fires": case(
        [s(QUEUED, gauge([4] * 61)), s(ADMITTED, counter([0] * 60, start=7))],
        "RepoboxJobsQueuedTooLong", [("25m", []), ("40m", [WARNING])]),
    "a moving queue does not fire": case(
        [s(QUEUED, gauge([4] * 61)), s(ADMITTED, counter([1] * 60))]
        + histogram(WAIT, OURS, 60, lambda m: [20.0]),
        "RepoboxJobsQueuedTooLong", [("40m", []), ("60m", [])]),
    "a queue that emptied within the window does not fire": case(
        [s(QUEUED, gauge([4] * 25 + [0] + [4] * 35)), s(ADMITTED, counter([0] * 60, start=7))],
        "RepoboxJobsQueuedTooLong", [("40m", [])]),
    # The window must really have passed: a queue seen for 20 minutes (operator just started,
    # or history cut off) has not waited 30.
    "a queue younger than the window does not fire": case(
        [s(QUEUED, gauge([4] * 61)), s(ADMITTED, counter([0] * 60, start=7))],
        "RepoboxJobsQueuedTooLong", [("20m", []), ("29m", []), ("34m", [])]),
    "an empty queue does not fire": case(
        [s(QUEUED, gauge([0] * 61)), s(ADMITTED, counter([0] * 60))],
        "RepoboxJobsQueuedTooLong", [("50m", [])]),
    "the standby's stale gauge does not hide the leader's": case(
        [s(QUEUED, gauge([4] * 61)), s(ADMITTED, counter([0] * 60)),
         s(f'repobox_jobs_queued{{{OURS},pod="op-b"}}', gauge([0] * 61))],
        "RepoboxJobsQueuedTooLong", [("40m", [WARNING])]),
}


# ----- RepoboxRunnerPodsWaitingForNode: pods waiting without a break for 10m -----

WAITING = f'repobox_pods_waiting_for_node{{{OURS},pod="op-a"}}'

NODE_CASES = {
    "pods waiting past the provisioning time fire": case(
        [s(WAITING, gauge([2] * 31))], "RepoboxRunnerPodsWaitingForNode",
        [("5m", []), ("15m", [WARNING])]),
    "nodes arriving in time do not fire": case(
        # Pods wait up to 8 minutes at a time, then get nodes.
        [s(WAITING, gauge(([2] * 8 + [0]) * 4))], "RepoboxRunnerPodsWaitingForNode",
        [("15m", []), ("30m", [])]),
    "no waiting pods do not fire": case(
        [s(WAITING, gauge([0] * 31))], "RepoboxRunnerPodsWaitingForNode", [("30m", [])]),
    "another release's waiting pods do not fire": case(
        [s(WAITING, gauge([0] * 31)),
         s(f'repobox_pods_waiting_for_node{{{ELSEWHERE},pod="op-x"}}', gauge([5] * 31))],
        "RepoboxRunnerPodsWaitingForNode", [("30m", [])]),
}


# ----- RepoboxJobFailureRatioHigh: > 25% of >= 10 jobs in 1h failed, for 15m -----

def finished(outcome: str, per_minute: list[int]) -> dict:
    return s(f'repobox_jobs_finished_total{{{OURS},pod="op-a",outcome="{outcome}"}}',
             counter(per_minute))


def every(n: int, minutes: int = 90) -> list[int]:
    """One job every n minutes."""
    return [1 if m % n == 0 else 0 for m in range(1, minutes + 1)]


RATIO_CASES = {
    "half the jobs failing fires": case(
        [finished("failed", [1] * 90), finished("succeeded", [1] * 90),
         finished("cancelled", [0] * 90)],
        "RepoboxJobFailureRatioHigh", [("10m", []), ("80m", [WARNING])]),
    "a tenth failing does not fire": case(
        [finished("failed", [1] * 90), finished("succeeded", [9] * 90),
         finished("cancelled", [0] * 90)],
        "RepoboxJobFailureRatioHigh", [("80m", [])]),
    "too few jobs do not fire, even all failing": case(
        [finished("failed", every(10)), finished("succeeded", [0] * 90)],
        "RepoboxJobFailureRatioHigh", [("80m", [])]),
    "cancelled jobs are not counted": case(
        # 30% of non-cancelled jobs fail; counting the cancellations would make it 10%.
        [finished("failed", [3] * 90), finished("succeeded", [7] * 90),
         finished("cancelled", [20] * 90)],
        "RepoboxJobFailureRatioHigh", [("80m", [WARNING])]),
    "no jobs do not fire": case(
        [finished("failed", [0] * 90), finished("succeeded", [0] * 90)],
        "RepoboxJobFailureRatioHigh", [("80m", [])]),
}


# ----- RepoboxNoLeader: no replica is leader (or none is scraped) for 5m -----

def leader(pod: str, values: list[int], sel: str = OURS) -> dict:
    return s(f'repobox_leader{{{sel},pod="{pod}"}}', gauge(values))


LEADER_CASES = {
    "no replica leading fires": case(
        [leader("op-a", [0] * 21), leader("op-b", [0] * 21)], "RepoboxNoLeader",
        [("3m", []), ("10m", [CRITICAL])]),
    "no operator scraped at all fires": case(
        [leader("op-x", [1] * 21, sel=ELSEWHERE)], "RepoboxNoLeader", [("10m", [CRITICAL])]),
    "one leader does not fire": case(
        [leader("op-a", [1] * 21), leader("op-b", [0] * 21)], "RepoboxNoLeader", [("20m", [])]),
    "a hand-over shorter than `for` does not fire": case(
        # op-a leads, dies at 6m; op-b takes over at 9m.
        [leader("op-a", [1] * 6 + [0] * 15), leader("op-b", [0] * 9 + [1] * 12)],
        "RepoboxNoLeader", [("8m", []), ("20m", [])]),
}


ALL_CASES = {
    **{f"RepoboxIntakeLag: {k}": v for k, v in INTAKE_CASES.items()},
    **{f"RepoboxJobsQueuedTooLong: {k}": v for k, v in QUEUE_CASES.items()},
    **{f"RepoboxRunnerPodsWaitingForNode: {k}": v for k, v in NODE_CASES.items()},
    **{f"RepoboxJobFailureRatioHigh: {k}": v for k, v in RATIO_CASES.items()},
    **{f"RepoboxNoLeader: {k}": v for k, v in LEADER_CASES.items()},
}


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_alert(name, promtool, rule_groups, tmp_path):
    run_promtool(promtool, tmp_path, without_annotations(rule_groups), [ALL_CASES[name]])


def test_every_alert_has_firing_and_quiet_cases(rule_groups):
    alerts = {r["alert"] for g in rule_groups for r in g["rules"]}
    for alert in alerts:
        checks = [c for t in ALL_CASES.values() for c in t["alert_rule_test"]
                  if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in checks), f"{alert}: no case where it fires"
        assert any(not c["exp_alerts"] for c in checks), f"{alert}: no case where it stays quiet"


def test_alert_annotations_expand(promtool, rule_groups, tmp_path):
    """The annotation templates render with the alert's value (one alert, the full text)."""
    ann = annotations_of(rule_groups, "RepoboxRunnerPodsWaitingForNode")
    assert "{{ $value }}" in ann["description"]
    expected = {k: v.replace("{{ $value }}", "2") for k, v in ann.items()}
    test = case([s(WAITING, gauge([2] * 31))], "RepoboxRunnerPodsWaitingForNode",
                [("15m", [WARNING])])
    test["alert_rule_test"][0]["exp_alerts"][0]["exp_annotations"] = expected
    run_promtool(promtool, tmp_path, rule_groups, [test])


@pytest.mark.parametrize("over", [
    {},
    {"selector": 'job="repobox-metrics"', "intakeLag": {"thresholdSeconds": 2.5},
     "failureRatio": {"window": "6h", "threshold": 0.05}, "jobsQueuedTooLong": {"minutes": 90}},
])
def test_promtool_checks_the_rendered_rules(promtool, tmp_path, over):
    groups = one(render(merge(VALUES, {"prometheusRule": over})), "PrometheusRule")["spec"]["groups"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    out = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout, out.stdout
