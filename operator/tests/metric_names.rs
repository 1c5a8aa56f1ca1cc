//! Every `repobox_*` series the chart's alerts and dashboard query is one the operator really
//! exports: an alert on a misspelt or renamed metric never fires, and nothing would notice.
//!
//! The operator side is the real registry, encoded after one sample of every recording method
//! (so labelled families and histogram series are all present); the chart side is every
//! `repobox_…` name in `charts/repobox-operator/templates/` and `files/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use repobox_operator::run::metrics::{Metrics, UserJobs};

/// The registry's text after one sample of everything.
fn exported() -> String {
    let m = Metrics::new();
    m.job_received(Duration::from_millis(20));
    m.job_admitted(Duration::from_secs(3));
    m.job_finished("succeeded");
    m.bad_entry("invalid");
    let _elapsed = m.reconcile_started().finish();
    m.reconcile_failed("InvalidSpec");
    m.set_queue(2, 1);
    m.set_leader(true);
    m.set_intake_paused(false);
    m.redis_reconnected();
    m.pod_scheduled(Duration::from_secs(40));
    m.pod_started(Duration::from_secs(5));
    m.set_pods_waiting_for_node(1);
    m.job_retried("eviction");
    m.set_paused(true, 1);
    m.set_plan_limits(
        &repobox_operator::decide::tiers::PlanLimits::parse(r#"{"free": 1}"#).unwrap(),
        3,
    );
    m.set_users_by_plan(&BTreeMap::from([("free".to_owned(), 2)]));
    m.invalid_limit();
    m.set_user_jobs(&BTreeMap::from([(
        "alice".to_owned(),
        UserJobs {
            queued: 2,
            running: 1,
        },
    )]));
    m.encode()
}

/// The series names of an OpenMetrics text: what PromQL can select (`_total`, `_bucket`,
/// `_sum`, `_count` included; the family names of `# TYPE` lines are not selectable).
fn series_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `repobox_[a-z0-9_]+` word in `text`.
fn referenced_names(text: &str) -> BTreeSet<String> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = BTreeSet::new();
    for (start, _) in text.match_indices("repobox_") {
        if text[..start].chars().next_back().is_some_and(is_word) {
            continue;
        }
        let rest = &text[start..];
        let end = rest.find(|c: char| !is_word(c)).unwrap_or(rest.len());
        out.insert(rest[..end].to_owned());
    }
    out
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/repobox-operator")
}

/// (file, names it references) for every file of the chart's templates/ and files/.
fn chart_references() -> Result<Vec<(PathBuf, BTreeSet<String>)>> {
    let mut out = Vec::new();
    for dir in ["templates", "files"] {
        let dir = chart_dir().join(dir);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
            out.push((path, referenced_names(&text)));
        }
    }
    out.sort();
    Ok(out)
}

#[test]
fn every_metric_the_chart_queries_is_exported() -> Result<()> {
    let exported = series_names(&exported());
    let refs = chart_references()?;

    let mut unknown = Vec::new();
    for (path, names) in &refs {
        for name in names.difference(&exported) {
            unknown.push(format!("{}: {name}", path.display()));
        }
    }
    assert!(
        unknown.is_empty(),
        "the chart queries series the operator does not export:\n{}\nexported: {exported:#?}",
        unknown.join("\n")
    );

    // Not vacuous: the rules and the dashboard were found and read.
    let in_file = |file: &str| {
        refs.iter()
            .find(|(p, _)| p.file_name().is_some_and(|f| f == file))
            .map(|(_, names)| names.len())
            .unwrap_or(0)
    };
    assert!(in_file("prometheusrule.yaml") >= 6, "{refs:#?}");
    assert!(in_file("repobox-dashboard.json") >= 15, "{refs:#?}");
    Ok(())
}

#[test]
fn series_names_follow_prometheus_naming() {
    let names = series_names(&exported());
    for name in [
        "repobox_jobs_finished_total",
        "repobox_admission_wait_seconds_bucket",
        "repobox_admission_wait_seconds_sum",
        "repobox_admission_wait_seconds_count",
        "repobox_pod_scheduling_seconds_bucket",
        "repobox_pod_startup_seconds_bucket",
        "repobox_pods_waiting_for_node",
        "repobox_job_retries_total",
        "repobox_user_jobs",
        "repobox_leader",
    ] {
        assert!(names.contains(name), "{name} not in {names:#?}");
    }
    // A counter's family name is not a series: a query for it finds nothing.
    assert!(!names.contains("repobox_jobs_finished"));
    assert!(!names.contains("repobox_admission_wait_seconds"));
}

#[test]
fn referenced_names_finds_whole_words_only() {
    let text = r#"rate(repobox_jobs_finished_total{outcome="x"}[5m]) / notrepobox_x
"expr": "max(repobox_leader)" repobox_user_jobs{state="queued"} repobox-operator repobox.fullname"#;
    assert_eq!(
        referenced_names(text),
        BTreeSet::from([
            "repobox_jobs_finished_total".to_owned(),
            "repobox_leader".to_owned(),
            "repobox_user_jobs".to_owned(),
        ])
    );
}
