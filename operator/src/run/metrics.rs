//! Prometheus metrics of the operator (OpenMetrics text via `prometheus-client`).
//!
//! All names start with `repobox_`. No metric carries a job or object label, and all label values
//! but one are small fixed sets (outcomes, bad-entry and retry reasons, error variants), so the
//! series count stays bounded however many jobs pass through. The exception is
//! `repobox_user_jobs{user,state}`, the queue depth per user: it holds series only for users with
//! a queued or running job (at most `MAX_QUEUED` + `MAX_CONCURRENT_JOBS` users) and drops a user's
//! series when the user has none left. The `plan` label of `repobox_plan_limit` and
//! `repobox_users_by_plan` takes the configured plan names plus `default` and `custom` (see
//! `tiers`), bounded by the configuration. Per-job detail belongs in logs and in the RepoboxJob
//! status, not in Prometheus.
//!
//! One [`Metrics`] is created at start-up and shared as `Arc<Metrics>`; every recording method
//! takes `&self` (the metric handles are atomics), and [`Metrics::encode`] renders the whole
//! registry for `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The `outcome` label values of `repobox_jobs_finished_total`; anything else is `other`.
pub const OUTCOMES: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// The `reason` label values of `repobox_bad_entries_total`; anything else is `other`.
pub const BAD_ENTRY_REASONS: [&str; 7] = [
    "no_job_id",
    "no_job_hash",
    "no_user_id",
    "terminal",
    "dead_letter",
    "invalid",
    "user_queue_full",
];

/// The `reason` label values of `repobox_job_retries_total`: why a runner pod was lost and its job
/// run again; anything else is `other`.
pub const RETRY_REASONS: [&str; 3] = ["eviction", "preemption", "node_shutdown"];

/// The `state` label values of `repobox_user_jobs`.
pub const USER_JOB_STATES: [&str; 2] = ["queued", "running"];

/// The label value used for an outcome or reason outside the fixed sets, so a caller's typo or a
/// new case cannot grow the series count without bound (it shows up as `other` instead).
const OTHER: &str = "other";

/// Admission wait (queued → admitted): from an idle cluster (milliseconds) to a long queue
/// behind per-user limits (hours).
const ADMISSION_WAIT_BUCKETS: [f64; 16] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
    14400.0,
];

/// Intake latency (stream entry added → RepoboxJob created): normally milliseconds; seconds to
/// minutes under backpressure or after a Redis outage or a leader change.
const INTAKE_LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// One reconciliation: a few API calls, so milliseconds; the tail shows a slow API server.
const RECONCILE_DURATION_BUCKETS: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One admission pass (a decision over every cached job): well under a millisecond with a few
/// hundred jobs; milliseconds with tens of thousands.
const ADMISSION_PASS_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// Pod scheduling (admitted → runner pod bound to a node): under a second on a node with room;
/// the cluster autoscaler or Karpenter adding a node takes one to several minutes; the last
/// buckets reach `PENDING_TIMEOUT_SECONDS` (600 s by default).
const POD_SCHEDULING_BUCKETS: [f64; 17] = [
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0,
    450.0, 600.0,
];

/// Pod start-up (scheduled → runner running): image pulls and the init container; seconds on a
/// warm node, a minute or more for a large image on a new one.
const POD_STARTUP_BUCKETS: [f64; 15] = [
    0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0,
];

/// A one-label label set; values are `'static` because they always come from a fixed set.
type Label = [(&'static str, &'static str); 1];

/// The `{user, state}` label set of `repobox_user_jobs`: the user id is data, so it is owned (and
/// escaped, see [`escape_label_value`]).
type UserLabel = [(&'static str, String); 2];

/// The `{plan}` label set: plan names come from the configuration (validated by `tiers`).
type PlanLabel = [(&'static str, String); 1];

/// One user's jobs, the value of the map given to [`Metrics::set_user_jobs`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserJobs {
    /// RepoboxJobs of the user waiting for admission.
    pub queued: i64,
    /// RepoboxJobs of the user admitted and not finished.
    pub running: i64,
}

/// The operator's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    jobs_received: Counter,
    jobs_admitted: Counter,
    jobs_finished: Family<Label, Counter>,
    bad_entries: Family<Label, Counter>,
    reconcile_errors: Family<Label, Counter>,
    reconciliations: Counter,
    redis_reconnects: Counter,
    jobs_queued: Gauge,
    jobs_running: Gauge,
    leader: Gauge,
    intake_paused: Gauge,
    admission_wait: Histogram,
    intake_latency: Histogram,
    reconcile_duration: Histogram,
    admission_pass: Histogram,
    pod_scheduling: Histogram,
    pod_startup: Histogram,
    pods_waiting_for_node: Gauge,
    job_retries: Family<Label, Counter>,
    user_jobs: Family<UserLabel, Gauge>,
    paused: Gauge,
    paused_users: Gauge,
    plan_limit: Family<PlanLabel, Gauge>,
    users_by_plan: Family<PlanLabel, Gauge>,
    invalid_limits: Counter,
    /// The (escaped) users `user_jobs` has series for, so the next snapshot can drop the ones
    /// that left.
    users_with_series: Mutex<BTreeSet<String>>,
    /// The plan labels `users_by_plan` has series for.
    plans_with_series: Mutex<BTreeSet<String>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates every metric and registers it under the `repobox` prefix.
    ///
    /// Labelled counters are pre-created for every known label value, so a dashboard sees a
    /// `0` series (and `rate()` works) before the first event of each kind.
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("repobox"),
            jobs_received: Counter::default(),
            jobs_admitted: Counter::default(),
            jobs_finished: Family::default(),
            bad_entries: Family::default(),
            reconcile_errors: Family::default(),
            reconciliations: Counter::default(),
            redis_reconnects: Counter::default(),
            jobs_queued: Gauge::default(),
            jobs_running: Gauge::default(),
            leader: Gauge::default(),
            intake_paused: Gauge::default(),
            admission_wait: Histogram::new(ADMISSION_WAIT_BUCKETS),
            intake_latency: Histogram::new(INTAKE_LATENCY_BUCKETS),
            reconcile_duration: Histogram::new(RECONCILE_DURATION_BUCKETS),
            admission_pass: Histogram::new(ADMISSION_PASS_BUCKETS),
            pod_scheduling: Histogram::new(POD_SCHEDULING_BUCKETS),
            pod_startup: Histogram::new(POD_STARTUP_BUCKETS),
            pods_waiting_for_node: Gauge::default(),
            job_retries: Family::default(),
            user_jobs: Family::default(),
            paused: Gauge::default(),
            paused_users: Gauge::default(),
            plan_limit: Family::default(),
            users_by_plan: Family::default(),
            invalid_limits: Counter::default(),
            users_with_series: Mutex::new(BTreeSet::new()),
            plans_with_series: Mutex::new(BTreeSet::new()),
        };
        for outcome in OUTCOMES {
            let _ = m.jobs_finished.get_or_create(&[("outcome", outcome)]);
        }
        for reason in BAD_ENTRY_REASONS {
            let _ = m.bad_entries.get_or_create(&[("reason", reason)]);
        }
        for reason in RETRY_REASONS.into_iter().chain([OTHER]) {
            let _ = m.job_retries.get_or_create(&[("reason", reason)]);
        }

        // Counters get their `_total` suffix and histograms their `_seconds` unit suffix from
        // prometheus-client, as OpenMetrics requires.
        let registry = &mut m.registry;
        registry.register(
            "jobs_received",
            "Stream entries turned into RepoboxJobs",
            m.jobs_received.clone(),
        );
        registry.register(
            "jobs_admitted",
            "RepoboxJobs admitted (their Job created)",
            m.jobs_admitted.clone(),
        );
        registry.register(
            "jobs_finished",
            "RepoboxJobs that reached a terminal phase, by outcome",
            m.jobs_finished.clone(),
        );
        registry.register(
            "bad_entries",
            "Stream entries not turned into a RepoboxJob, by reason",
            m.bad_entries.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations, by error kind",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconciliations",
            "Reconciliations started",
            m.reconciliations.clone(),
        );
        registry.register(
            "redis_reconnects",
            "Redis connections re-established after a failure",
            m.redis_reconnects.clone(),
        );
        registry.register(
            "jobs_queued",
            "RepoboxJobs waiting for admission",
            m.jobs_queued.clone(),
        );
        registry.register(
            "jobs_running",
            "RepoboxJobs admitted and not finished",
            m.jobs_running.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        registry.register(
            "intake_paused",
            "1 while intake stops reading the stream because too many jobs are queued",
            m.intake_paused.clone(),
        );
        registry.register_with_unit(
            "admission_wait",
            "Time from RepoboxJob queued to admitted",
            Unit::Seconds,
            m.admission_wait.clone(),
        );
        registry.register_with_unit(
            "intake_latency",
            "Time from the stream entry's id timestamp to its RepoboxJob being created",
            Unit::Seconds,
            m.intake_latency.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Duration of one reconciliation",
            Unit::Seconds,
            m.reconcile_duration.clone(),
        );
        registry.register_with_unit(
            "admission_pass_duration",
            "Duration of one admission pass (its count is the number of passes)",
            Unit::Seconds,
            m.admission_pass.clone(),
        );
        registry.register_with_unit(
            "pod_scheduling",
            "Time from RepoboxJob admitted to its runner pod scheduled on a node",
            Unit::Seconds,
            m.pod_scheduling.clone(),
        );
        registry.register_with_unit(
            "pod_startup",
            "Time from runner pod scheduled to the runner running",
            Unit::Seconds,
            m.pod_startup.clone(),
        );
        registry.register(
            "pods_waiting_for_node",
            "Runner pods pending because no node fits them (waiting for the autoscaler)",
            m.pods_waiting_for_node.clone(),
        );
        registry.register(
            "job_retries",
            "Jobs run again after their runner pod was lost, by reason",
            m.job_retries.clone(),
        );
        registry.register(
            "user_jobs",
            "RepoboxJobs per user and state (queued or running); users without jobs have no series",
            m.user_jobs.clone(),
        );
        registry.register(
            "paused",
            "1 while the runner side is paused (runner:paused): no intake, no admission",
            m.paused.clone(),
        );
        registry.register(
            "paused_users",
            "Users whose queued jobs are held (runner:paused_users)",
            m.paused_users.clone(),
        );
        registry.register(
            "plan_limit",
            "Running limit per user of each plan (PLAN_LIMITS; default is MAX_JOBS_PER_USER)",
            m.plan_limit.clone(),
        );
        registry.register(
            "users_by_plan",
            "Users with queued or running jobs, by the plan their limit comes from",
            m.users_by_plan.clone(),
        );
        registry.register(
            "invalid_limits",
            "Unusable per-user limits or plans met by admission (the default applied)",
            m.invalid_limits.clone(),
        );
        m
    }

    /// The registry in OpenMetrics text format (the body of `/metrics`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error could only come from a metric's own
        // encoder, and a partial page is still better than none for a scrape.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// A stream entry became a RepoboxJob, `latency` after the entry was added to the stream
    /// (from the entry id's millisecond timestamp; pass zero if the clocks make it negative).
    pub fn job_received(&self, latency: Duration) {
        self.jobs_received.inc();
        self.intake_latency.observe(latency.as_secs_f64());
    }

    /// A RepoboxJob was admitted after waiting `wait` in the queue.
    pub fn job_admitted(&self, wait: Duration) {
        self.jobs_admitted.inc();
        self.admission_wait.observe(wait.as_secs_f64());
    }

    /// A RepoboxJob finished; `outcome` is one of [`OUTCOMES`] (anything else counts as `other`).
    pub fn job_finished(&self, outcome: &str) {
        self.jobs_finished
            .get_or_create(&[("outcome", fixed(&OUTCOMES, outcome))])
            .inc();
    }

    /// A stream entry was rejected or dead-lettered; `reason` is one of [`BAD_ENTRY_REASONS`]
    /// (anything else counts as `other`).
    pub fn bad_entry(&self, reason: &str) {
        self.bad_entries
            .get_or_create(&[("reason", fixed(&BAD_ENTRY_REASONS, reason))])
            .inc();
    }

    /// A reconciliation starts: counts it and returns a timer that records its duration when
    /// finished or dropped (so an early `?` return is still measured).
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.reconciliations.inc();
        ReconcileTimer {
            histogram: self.reconcile_duration.clone(),
            start: Instant::now(),
            recorded: false,
        }
    }

    /// An admission pass took `took`.
    pub fn admission_pass(&self, took: Duration) {
        self.admission_pass.observe(took.as_secs_f64());
    }

    /// A reconciliation failed; `label` is [`crate::Error::metric_label`], a fixed set.
    pub fn reconcile_failed(&self, label: &'static str) {
        self.reconcile_errors
            .get_or_create(&[("error", label)])
            .inc();
    }

    /// The current queue: RepoboxJobs waiting for admission and admitted-but-unfinished ones.
    /// Set from the controller's cache after each admission pass, so it is always a snapshot,
    /// never drifting increments.
    pub fn set_queue(&self, queued: i64, running: i64) {
        self.jobs_queued.set(queued);
        self.jobs_running.set(running);
    }

    /// Whether this replica holds the leader Lease.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Whether intake is paused by backpressure (`MAX_QUEUED` reached).
    pub fn set_intake_paused(&self, paused: bool) {
        self.intake_paused.set(i64::from(paused));
    }

    /// Whether the runner side is paused, and how many users are held one by one.
    pub fn set_paused(&self, paused: bool, users: i64) {
        self.paused.set(i64::from(paused));
        self.paused_users.set(users);
    }

    /// The configured limits: each plan's, and `default` (`MAX_JOBS_PER_USER`). Set once.
    pub fn set_plan_limits(&self, plans: &crate::decide::tiers::PlanLimits, default_limit: u32) {
        let all = plans
            .iter()
            .chain([(crate::decide::tiers::DEFAULT_PLAN, default_limit)]);
        for (plan, limit) in all {
            self.plan_limit
                .get_or_create(&[("plan", escape_label_value(plan))])
                .set(i64::from(limit));
        }
    }

    /// Users with work per plan label, a snapshot: labels are the configured plans, `default`
    /// and `custom`; every label seen once keeps a series (set to 0 when it has no user).
    pub fn set_users_by_plan(&self, counts: &BTreeMap<String, i64>) {
        let mut known = self
            .plans_with_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for plan in known.iter() {
            if !counts.contains_key(plan) {
                self.users_by_plan
                    .get_or_create(&[("plan", plan.clone())])
                    .set(0);
            }
        }
        for (plan, n) in counts {
            let label = escape_label_value(plan);
            self.users_by_plan
                .get_or_create(&[("plan", label.clone())])
                .set(*n);
            known.insert(label);
        }
    }

    /// Admission met an unusable limit or plan and applied the default.
    pub fn invalid_limit(&self) {
        self.invalid_limits.inc();
    }

    /// The Redis connection was re-established after a failure.
    pub fn redis_reconnected(&self) {
        self.redis_reconnects.inc();
    }

    /// A runner pod was bound to a node `wait` after its RepoboxJob was admitted.
    pub fn pod_scheduled(&self, wait: Duration) {
        self.pod_scheduling.observe(wait.as_secs_f64());
    }

    /// A runner reached Running `startup` after its pod was scheduled.
    pub fn pod_started(&self, startup: Duration) {
        self.pod_startup.observe(startup.as_secs_f64());
    }

    /// How many runner pods are pending because no node fits them. A snapshot, like
    /// [`Metrics::set_queue`].
    pub fn set_pods_waiting_for_node(&self, pods: i64) {
        self.pods_waiting_for_node.set(pods);
    }

    /// A job is run again after its runner pod was lost; `reason` is one of [`RETRY_REASONS`]
    /// (anything else counts as `other`).
    pub fn job_retried(&self, reason: &str) {
        self.job_retries
            .get_or_create(&[("reason", fixed(&RETRY_REASONS, reason))])
            .inc();
    }

    /// Replaces the per-user queue depth with this snapshot (user id → jobs). Users in the map
    /// get both `state` series; users no longer in it, or with no job in either state, lose
    /// theirs, so departed users do not linger as zero series.
    pub fn set_user_jobs(&self, per_user: &BTreeMap<String, UserJobs>) {
        // One snapshot at a time: two interleaved callers could otherwise remove each other's
        // users. A poisoned lock only means an earlier caller panicked; the set is still usable.
        let mut known = self
            .users_with_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (set, remove) = user_series_changes(&known, per_user);
        for (user, jobs) in &set {
            for (state, value) in [("queued", jobs.queued), ("running", jobs.running)] {
                self.user_jobs
                    .get_or_create(&[("user", user.clone()), ("state", state.to_owned())])
                    .set(value);
            }
        }
        for user in &remove {
            for state in USER_JOB_STATES {
                self.user_jobs
                    .remove(&[("user", user.clone()), ("state", state.to_owned())]);
            }
        }
        *known = set.into_keys().collect();
    }
}

/// What [`Metrics::set_user_jobs`] changes: the (escaped) users whose series are set, with their
/// counts, and the previously known users whose series are removed. A user with nothing queued
/// or running counts as absent.
fn user_series_changes(
    previous: &BTreeSet<String>,
    current: &BTreeMap<String, UserJobs>,
) -> (BTreeMap<String, UserJobs>, BTreeSet<String>) {
    let set: BTreeMap<String, UserJobs> = current
        .iter()
        .filter(|(_, jobs)| jobs.queued != 0 || jobs.running != 0)
        .map(|(user, jobs)| (escape_label_value(user), *jobs))
        .collect();
    let remove = previous
        .iter()
        .filter(|user| !set.contains_key(*user))
        .cloned()
        .collect();
    (set, remove)
}

/// A label value in the OpenMetrics text format's escaped form (`\\`, `\"`, `\n`).
/// prometheus-client writes label values verbatim, and a user id is arbitrary text from the web
/// app: unescaped, a quote or newline in it would corrupt the scrape or forge series.
fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `value` if it is one of `known`, else `other`: keeps label values a fixed, `'static` set.
fn fixed(known: &[&'static str], value: &str) -> &'static str {
    known.iter().copied().find(|k| *k == value).unwrap_or(OTHER)
}

/// Measures one reconciliation; records into `repobox_reconcile_duration_seconds` on
/// [`ReconcileTimer::finish`] or, if never finished, on drop.
#[must_use = "the duration is recorded when the timer is finished or dropped"]
#[derive(Debug)]
pub struct ReconcileTimer {
    histogram: Histogram,
    start: Instant,
    recorded: bool,
}

impl ReconcileTimer {
    /// Records the elapsed time now and returns it.
    pub fn finish(mut self) -> Duration {
        self.record()
    }

    fn record(&mut self) -> Duration {
        let elapsed = self.start.elapsed();
        if !self.recorded {
            self.recorded = true;
            self.histogram.observe(elapsed.as_secs_f64());
        }
        elapsed
    }
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.record();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line starting with `series ` (name plus labels), if any.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    #[test]
    fn fresh_registry_has_every_metric_at_zero() {
        let text = Metrics::new().encode();
        for (name, kind) in [
            ("repobox_jobs_received", "counter"),
            ("repobox_jobs_admitted", "counter"),
            ("repobox_jobs_finished", "counter"),
            ("repobox_bad_entries", "counter"),
            ("repobox_reconciliations", "counter"),
            ("repobox_redis_reconnects", "counter"),
            ("repobox_jobs_queued", "gauge"),
            ("repobox_jobs_running", "gauge"),
            ("repobox_leader", "gauge"),
            ("repobox_intake_paused", "gauge"),
            ("repobox_admission_wait_seconds", "histogram"),
            ("repobox_intake_latency_seconds", "histogram"),
            ("repobox_reconcile_duration_seconds", "histogram"),
            ("repobox_pod_scheduling_seconds", "histogram"),
            ("repobox_pod_startup_seconds", "histogram"),
            ("repobox_pods_waiting_for_node", "gauge"),
            ("repobox_job_retries", "counter"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind} missing in\n{text}"
            );
        }
        // Error labels are open-ended (new variants), so that family appears with its first
        // error; an empty family is not encoded at all.
        assert!(!text.contains("reconcile_errors"), "{text}");
        assert_eq!(sample(&text, "repobox_jobs_received_total"), Some(0.0));
        assert_eq!(sample(&text, "repobox_leader"), Some(0.0));
        for outcome in OUTCOMES {
            let series = format!("repobox_jobs_finished_total{{outcome=\"{outcome}\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        for reason in BAD_ENTRY_REASONS {
            let series = format!("repobox_bad_entries_total{{reason=\"{reason}\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        for reason in RETRY_REASONS.into_iter().chain(["other"]) {
            let series = format!("repobox_job_retries_total{{reason=\"{reason}\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        assert_eq!(sample(&text, "repobox_pods_waiting_for_node"), Some(0.0));
        // No user has a job yet, so the per-user family has no series and is not encoded.
        assert!(!text.contains("repobox_user_jobs"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn recording_methods_show_up_in_the_encoding() {
        let m = Metrics::new();
        m.job_received(Duration::from_millis(30));
        m.job_received(Duration::from_millis(70));
        m.job_admitted(Duration::from_secs(90));
        m.job_finished("succeeded");
        m.job_finished("succeeded");
        m.job_finished("cancelled");
        m.job_finished("exploded");
        m.bad_entry("no_user_id");
        m.bad_entry("user:alice");
        m.reconcile_failed("InvalidSpec");
        m.set_queue(7, 3);
        m.set_leader(true);
        m.set_intake_paused(true);
        m.redis_reconnected();
        let text = m.encode();

        let s = |series: &str| sample(&text, series);
        assert_eq!(s("repobox_jobs_received_total"), Some(2.0));
        assert_eq!(s("repobox_intake_latency_seconds_count"), Some(2.0));
        let sum = s("repobox_intake_latency_seconds_sum").unwrap_or_default();
        assert!((sum - 0.1).abs() < 1e-9, "{sum}");
        assert_eq!(
            s("repobox_intake_latency_seconds_bucket{le=\"0.05\"}"),
            Some(1.0)
        );
        assert_eq!(s("repobox_jobs_admitted_total"), Some(1.0));
        assert_eq!(
            s("repobox_admission_wait_seconds_bucket{le=\"60.0\"}"),
            Some(0.0)
        );
        assert_eq!(
            s("repobox_admission_wait_seconds_bucket{le=\"120.0\"}"),
            Some(1.0)
        );
        assert_eq!(
            s("repobox_jobs_finished_total{outcome=\"succeeded\"}"),
            Some(2.0)
        );
        assert_eq!(
            s("repobox_jobs_finished_total{outcome=\"cancelled\"}"),
            Some(1.0)
        );
        assert_eq!(
            s("repobox_jobs_finished_total{outcome=\"other\"}"),
            Some(1.0)
        );
        assert!(!text.contains("exploded"));
        assert_eq!(
            s("repobox_bad_entries_total{reason=\"no_user_id\"}"),
            Some(1.0)
        );
        assert_eq!(s("repobox_bad_entries_total{reason=\"other\"}"), Some(1.0));
        assert!(!text.contains("alice"), "no user data in labels");
        assert_eq!(
            s("repobox_reconcile_errors_total{error=\"InvalidSpec\"}"),
            Some(1.0)
        );
        assert_eq!(s("repobox_jobs_queued"), Some(7.0));
        assert_eq!(s("repobox_jobs_running"), Some(3.0));
        assert_eq!(s("repobox_leader"), Some(1.0));
        assert_eq!(s("repobox_intake_paused"), Some(1.0));
        assert_eq!(s("repobox_redis_reconnects_total"), Some(1.0));

        m.set_leader(false);
        m.set_intake_paused(false);
        let text = m.encode();
        assert_eq!(sample(&text, "repobox_leader"), Some(0.0));
        assert_eq!(sample(&text, "repobox_intake_paused"), Some(0.0));
    }

    #[test]
    fn reconcile_timer_records_once_on_finish_or_drop() {
        let m = Metrics::new();
        let t = m.reconcile_started();
        let _elapsed = t.finish();
        {
            let _t = m.reconcile_started();
        }
        let text = m.encode();
        assert_eq!(sample(&text, "repobox_reconciliations_total"), Some(2.0));
        assert_eq!(
            sample(&text, "repobox_reconcile_duration_seconds_count"),
            Some(2.0)
        );
    }

    #[test]
    fn scheduling_startup_waiting_and_retries_show_up_in_the_encoding() {
        let m = Metrics::new();
        m.pod_scheduled(Duration::from_millis(300));
        m.pod_scheduled(Duration::from_secs(95));
        m.pod_started(Duration::from_secs(4));
        m.set_pods_waiting_for_node(3);
        m.job_retried("eviction");
        m.job_retried("eviction");
        m.job_retried("preemption");
        m.job_retried("node_shutdown");
        m.job_retried("cosmic_ray");
        let text = m.encode();
        let s = |series: &str| sample(&text, series);

        assert_eq!(s("repobox_pod_scheduling_seconds_count"), Some(2.0));
        assert_eq!(
            s("repobox_pod_scheduling_seconds_bucket{le=\"0.5\"}"),
            Some(1.0)
        );
        assert_eq!(
            s("repobox_pod_scheduling_seconds_bucket{le=\"90.0\"}"),
            Some(1.0)
        );
        assert_eq!(
            s("repobox_pod_scheduling_seconds_bucket{le=\"120.0\"}"),
            Some(2.0)
        );
        assert_eq!(s("repobox_pod_startup_seconds_count"), Some(1.0));
        assert_eq!(
            s("repobox_pod_startup_seconds_bucket{le=\"3.0\"}"),
            Some(0.0)
        );
        assert_eq!(
            s("repobox_pod_startup_seconds_bucket{le=\"5.0\"}"),
            Some(1.0)
        );
        assert_eq!(s("repobox_pods_waiting_for_node"), Some(3.0));
        assert_eq!(
            s("repobox_job_retries_total{reason=\"eviction\"}"),
            Some(2.0)
        );
        assert_eq!(
            s("repobox_job_retries_total{reason=\"preemption\"}"),
            Some(1.0)
        );
        assert_eq!(
            s("repobox_job_retries_total{reason=\"node_shutdown\"}"),
            Some(1.0)
        );
        assert_eq!(s("repobox_job_retries_total{reason=\"other\"}"), Some(1.0));
        assert!(!text.contains("cosmic_ray"), "fixed reasons only");

        m.set_pods_waiting_for_node(0);
        assert_eq!(
            sample(&m.encode(), "repobox_pods_waiting_for_node"),
            Some(0.0)
        );
    }

    #[test]
    fn buckets_are_strictly_increasing_and_end_at_the_pending_timeout() {
        for buckets in [&POD_SCHEDULING_BUCKETS[..], &POD_STARTUP_BUCKETS[..]] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
            // PENDING_TIMEOUT_SECONDS' default: a pod waiting longer fails its job.
            assert_eq!(buckets.last(), Some(&600.0));
        }
    }

    fn jobs(queued: i64, running: i64) -> UserJobs {
        UserJobs { queued, running }
    }

    fn users(list: &[(&str, UserJobs)]) -> BTreeMap<String, UserJobs> {
        list.iter().map(|(u, j)| ((*u).to_owned(), *j)).collect()
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|u| (*u).to_owned()).collect()
    }

    #[test]
    fn user_series_changes_cases() {
        // (previous users, snapshot, users set, users removed)
        type Case = (
            BTreeSet<String>,
            BTreeMap<String, UserJobs>,
            Vec<&'static str>,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (names(&[]), users(&[]), vec![], vec![]),
            (names(&["alice"]), users(&[]), vec![], vec!["alice"]),
            (
                names(&[]),
                users(&[("alice", jobs(2, 1)), ("bob", jobs(0, 3))]),
                vec!["alice", "bob"],
                vec![],
            ),
            (
                names(&["alice", "bob"]),
                users(&[("bob", jobs(1, 0))]),
                vec!["bob"],
                vec!["alice"],
            ),
            // Nothing queued or running: the same as absent.
            (
                names(&["alice"]),
                users(&[("alice", jobs(0, 0)), ("bob", jobs(0, 0))]),
                vec![],
                vec!["alice"],
            ),
            (names(&[]), users(&[("carol", jobs(0, 0))]), vec![], vec![]),
            // A user who comes back is simply set again.
            (
                names(&["alice"]),
                users(&[("alice", jobs(1, 1))]),
                vec!["alice"],
                vec![],
            ),
            // Keys are compared in their escaped form, the form the registry holds.
            (
                names(&["a\\\"b"]),
                users(&[("a\"b", jobs(1, 0))]),
                vec!["a\\\"b"],
                vec![],
            ),
            (
                names(&["a\"b"]),
                users(&[("a\"b", jobs(1, 0))]),
                vec!["a\\\"b"],
                vec!["a\"b"],
            ),
        ];
        for (previous, current, want_set, want_remove) in cases {
            let (set, remove) = user_series_changes(&previous, &current);
            assert_eq!(
                set.keys().map(String::as_str).collect::<Vec<_>>(),
                want_set,
                "{previous:?} {current:?}"
            );
            assert_eq!(
                remove.iter().map(String::as_str).collect::<Vec<_>>(),
                want_remove,
                "{previous:?} {current:?}"
            );
            for (user, counts) in &current {
                if let Some(got) = set.get(&escape_label_value(user)) {
                    assert_eq!(got, counts);
                }
            }
        }
    }

    #[test]
    fn escape_label_value_cases() {
        for (raw, escaped) in [
            ("", ""),
            ("alice", "alice"),
            ("user@example.com", "user@example.com"),
            ("ünï cødé ✓", "ünï cødé ✓"),
            ("a\"b", "a\\\"b"),
            ("a\\b", "a\\\\b"),
            ("a\nb", "a\\nb"),
            ("\\\"\n", "\\\\\\\"\\n"),
            ("a\rb\tc", "a\rb\tc"),
        ] {
            assert_eq!(escape_label_value(raw), escaped, "{raw:?}");
        }
    }

    #[test]
    fn user_jobs_follow_each_snapshot() {
        let m = Metrics::new();
        m.set_user_jobs(&users(&[
            ("alice", jobs(2, 1)),
            ("bob", jobs(0, 3)),
            ("carol", jobs(0, 0)),
        ]));
        let text = m.encode();
        assert!(text.contains("# TYPE repobox_user_jobs gauge\n"), "{text}");
        let s = |series: &str| sample(&text, series);
        assert_eq!(
            s("repobox_user_jobs{user=\"alice\",state=\"queued\"}"),
            Some(2.0)
        );
        assert_eq!(
            s("repobox_user_jobs{user=\"alice\",state=\"running\"}"),
            Some(1.0)
        );
        assert_eq!(
            s("repobox_user_jobs{user=\"bob\",state=\"queued\"}"),
            Some(0.0)
        );
        assert_eq!(
            s("repobox_user_jobs{user=\"bob\",state=\"running\"}"),
            Some(3.0)
        );
        assert!(!text.contains("carol"), "{text}");

        // alice's jobs ended: her series go, bob's are updated.
        m.set_user_jobs(&users(&[("bob", jobs(1, 2))]));
        let text = m.encode();
        assert!(!text.contains("alice"), "{text}");
        assert_eq!(
            sample(&text, "repobox_user_jobs{user=\"bob\",state=\"queued\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "repobox_user_jobs{user=\"bob\",state=\"running\"}"),
            Some(2.0)
        );

        m.set_user_jobs(&BTreeMap::new());
        assert!(!m.encode().contains("repobox_user_jobs{"));
    }

    #[test]
    fn a_hostile_user_id_cannot_forge_series() {
        let m = Metrics::new();
        let evil = "x\",state=\"running\"} 99\nrepobox_leader 1\n#";
        m.set_user_jobs(&users(&[(evil, jobs(1, 0))]));
        let text = m.encode();
        // Still exactly one leader sample, at 0, and every user_jobs line is one series.
        let leader: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("repobox_leader"))
            .collect();
        assert_eq!(leader, ["repobox_leader 0"], "{text}");
        let mut series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("repobox_user_jobs{"))
            .collect();
        series.sort_unstable();
        assert_eq!(
            series,
            [
                "repobox_user_jobs{user=\"x\\\",state=\\\"running\\\"} 99\\nrepobox_leader 1\\n#\",state=\"queued\"} 1",
                "repobox_user_jobs{user=\"x\\\",state=\\\"running\\\"} 99\\nrepobox_leader 1\\n#\",state=\"running\"} 0",
            ],
            "{text}"
        );
        // And it can be removed again.
        m.set_user_jobs(&BTreeMap::new());
        assert!(!m.encode().contains("repobox_user_jobs{"));
    }
}
