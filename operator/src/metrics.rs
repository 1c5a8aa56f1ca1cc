//! Prometheus metrics of the operator (OpenMetrics text via `prometheus-client`).
//!
//! All names start with `repobox_`. No metric carries a user, job or object label: the label
//! values are small fixed sets (outcomes, bad-entry reasons, error variants), so the series count
//! stays bounded however many users and jobs pass through. Per-job detail belongs in logs and in
//! the RepoboxJob status, not in Prometheus.
//!
//! One [`Metrics`] is created at start-up and shared as `Arc<Metrics>`; every recording method
//! takes `&self` (the metric handles are atomics), and [`Metrics::encode`] renders the whole
//! registry for `/metrics`.

use std::fmt;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The `outcome` label values of `repobox_jobs_finished_total`; anything else is `other`.
pub const OUTCOMES: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// The `reason` label values of `repobox_job_retries_total` (see `retry::kind`).
pub const RETRY_REASONS: [&str; 4] = ["eviction", "preemption", "node_shutdown", "other"];

/// The `reason` label values of `repobox_bad_entries_total`; anything else is `other`.
pub const BAD_ENTRY_REASONS: [&str; 6] = [
    "no_job_id",
    "no_job_hash",
    "no_user_id",
    "terminal",
    "dead_letter",
    "invalid",
];

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

/// A one-label label set; values are `'static` because they always come from a fixed set.
type Label = [(&'static str, &'static str); 1];

/// The operator's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    jobs_received: Counter,
    jobs_admitted: Counter,
    jobs_finished: Family<Label, Counter>,
    bad_entries: Family<Label, Counter>,
    job_retries: Family<Label, Counter>,
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
            job_retries: Family::default(),
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
        };
        for outcome in OUTCOMES {
            let _ = m.jobs_finished.get_or_create(&[("outcome", outcome)]);
        }
        for reason in BAD_ENTRY_REASONS {
            let _ = m.bad_entries.get_or_create(&[("reason", reason)]);
        }
        for reason in RETRY_REASONS {
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
            "job_retries",
            "Jobs run again after an infrastructure disruption of their pod, by kind",
            m.job_retries.clone(),
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

    /// A job runs again after a disruption of `reason` (one of [`RETRY_REASONS`]).
    pub fn job_retried(&self, reason: &str) {
        self.job_retries
            .get_or_create(&[("reason", fixed(&RETRY_REASONS, reason))])
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

    /// The Redis connection was re-established after a failure.
    pub fn redis_reconnected(&self) {
        self.redis_reconnects.inc();
    }
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
}
