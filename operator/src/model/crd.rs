//! The `RepoboxJob` custom resource (`repobox.dev/v1alpha1`).
//!
//! One RepoboxJob exists per Redis stream entry the operator accepted. It is the durable, visible
//! queue entry: intake creates it (phase `Queued`), admission moves it to `Starting` when a quota
//! slot is free, the controller creates the owned batch/v1 Job and follows it to a terminal phase.
//! The spec carries identifiers and display data only — never a token: the executor reads the
//! job record and the encrypted token from Redis itself.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The desired state of a RepoboxJob: which Repobox job to run and how.
///
/// Written by intake from the stream entry and the `job:{jobId}` hash. Every field but `cancel`
/// is immutable once created (enforced by CEL transition rules on the identifying fields), so a
/// user cannot, for instance, move a job to another user's quota.
// The `printcolumn(...)` entries repeat `type_ = ...` by design: not a mistake.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "repobox.dev",
    version = "v1alpha1",
    kind = "RepoboxJob",
    plural = "repoboxjobs",
    singular = "repoboxjob",
    shortname = "rbj",
    category = "repobox",
    namespaced,
    status = "RepoboxJobStatus",
    derive = "PartialEq",
    doc = "A Repobox job: one request to run the agent on a repository and push a branch. Created by the repobox-operator from the Redis stream; runs as an owned batch/v1 Job.",
    printcolumn(name = "User", type_ = "string", json_path = ".spec.userId"),
    printcolumn(name = "Repo", type_ = "string", json_path = ".spec.repo"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason"),
    printcolumn(name = "Branch", type_ = "string", json_path = ".status.branch"),
    printcolumn(name = "PR", type_ = "string", json_path = ".status.prUrl"),
    printcolumn(name = "Duration", type_ = "string", json_path = ".status.duration"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Attempt",
        type_ = "integer",
        json_path = ".status.attempt",
        priority = 1
    ),
    printcolumn(
        name = "Job-ID",
        type_ = "string",
        json_path = ".spec.jobId",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RepoboxJobSpec {
    /// The Repobox job id: the `jobId` of the stream entry and the `{jobId}` of `job:{jobId}`.
    #[schemars(length(min = 1, max = 512))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "jobId is immutable"}]))]
    pub job_id: String,

    /// The owner of the job; quotas are counted per user id.
    #[schemars(length(max = 512))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "userId is immutable"}]))]
    pub user_id: String,

    /// The repository, for display only, with any credentials removed.
    // Intake fills it with `crate::model::names::display_repo` of the job record's `repoUrl`.
    pub repo: String,

    /// The Redis stream entry id (`<milliseconds>-<sequence>`) that created this job. Jobs are
    /// admitted in this order, per user.
    #[schemars(regex(pattern = r"^[0-9]{1,20}(-[0-9]{1,20})?$"), length(max = 41))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "streamEntryId is immutable"}]))]
    pub stream_entry_id: String,

    /// The git provider connection id, for display only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,

    /// The branch the job starts from, for display only (the executor reads the job record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_branch: Option<String>,

    /// Overrides the operator's `JOB_TIMEOUT` for this job: the Job's `activeDeadlineSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub timeout_seconds: Option<i64>,

    /// Set to `true` to cancel the job: a queued job is never started, a running one is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<bool>,

    /// The owner's plan when the job was submitted (the optional `plan` field of the stream
    /// entry or job record); `PLAN_LIMITS` maps it to the owner's running limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub plan: Option<String>,
}

impl RepoboxJobSpec {
    /// Whether cancellation was requested.
    pub fn cancel_requested(&self) -> bool {
        self.cancel.unwrap_or(false)
    }
}

/// Where a RepoboxJob is in its life: Queued, then Starting once admitted, Running while its pod
/// runs, and finally Succeeded, Failed or Cancelled.
//
// Queued ──admitted──▶ Starting ──pod running──▶ Running ──▶ Succeeded | Failed
//    └──────────────cancel (any non-terminal phase)──────────▶ Cancelled
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum RepoboxJobPhase {
    /// Waiting for a quota slot (see `status.reason` for which quota).
    Queued,
    /// Admitted: the batch/v1 Job exists (or is being created) but its pod is not running yet.
    Starting,
    /// The runner pod is running.
    Running,
    /// The executor finished and pushed the branch.
    Succeeded,
    /// The job failed (see `status.reason` and `status.message`).
    Failed,
    /// The job was cancelled before it finished.
    Cancelled,
}

impl RepoboxJobPhase {
    /// All phases, in life-cycle order.
    pub const ALL: [RepoboxJobPhase; 6] = [
        Self::Queued,
        Self::Starting,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The phase as serialized (`"Queued"`, …): also usable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "Queued",
            Self::Starting => "Starting",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
        }
    }

    /// A terminal phase never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Admitted jobs hold a quota slot (their user's and the cluster's) until they end.
    pub fn is_admitted(self) -> bool {
        matches!(self, Self::Starting | Self::Running)
    }
}

impl std::fmt::Display for RepoboxJobPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The observed state of a RepoboxJob, written only by the operator through the status
/// subresource. Every field is optional so that an empty or partial status deserializes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepoboxJobStatus {
    /// The life-cycle phase; absent until the operator first processed the job (then Queued).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RepoboxJobPhase>,

    /// A CamelCase reason for the current phase, e.g. UserQuotaExceeded or DeadlineExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// A human-readable explanation of the current phase. Never contains a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Standard conditions: Admitted, Complete and Failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The name of the owned batch/v1 Job of the current attempt, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,

    /// The attempt at the job (absent: the first). A job whose pod was lost to an
    /// infrastructure disruption before its push started runs again as the next attempt, in a
    /// Job of its own, keeping its quota slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub attempt: Option<u32>,

    /// When the Job of the next attempt is created (set once, when the retry is decided).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,

    /// When the operator first saw the job queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<Time>,

    /// When the job was admitted (the Job was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the job reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// The branch the executor pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,

    /// The commit the executor pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_sha: Option<String>,

    /// The pull / merge request opened (or found open) for the pushed branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_url: Option<String>,

    /// Its number (GitHub `#n`, GitLab `!n`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_number: Option<i64>,

    /// Why no request could be opened although the branch was pushed (the job still
    /// succeeded). Never contains a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_error: Option<String>,

    /// How long the job ran, e.g. `1m23s` (set on completion, for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl RepoboxJob {
    /// The object's name, borrowed (always set on objects from the API; `name_any` clones,
    /// which the loops over the whole cache avoid).
    pub fn name_ref(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// The current phase; a job without a status (just created by intake) is `Queued`.
    pub fn phase(&self) -> RepoboxJobPhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or(RepoboxJobPhase::Queued)
    }

    /// Trims a RepoboxJob to what the operator's cache must keep: it holds every RepoboxJob,
    /// finished ones for the retention period (10,000 and more), so what is never read is not
    /// kept. Never read: managed fields, labels and annotations (everything is derived from spec
    /// and status); of a finished job's status, all but its phase and completion time (it is
    /// only waited on for retention, and never written again).
    pub fn trim_for_cache(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.labels = None;
        self.metadata.annotations = None;
        if self.phase().is_terminal()
            && let Some(status) = self.status.as_mut()
        {
            *status = RepoboxJobStatus {
                phase: status.phase,
                completion_time: status.completion_time.take(),
                ..RepoboxJobStatus::default()
            };
        }
    }
}

/// Condition types set on a RepoboxJob.
pub mod condition_types {
    /// `True` once a quota slot was granted; `False` with the quota reason while waiting.
    pub const ADMITTED: &str = "Admitted";
    /// `True` when the job succeeded.
    pub const COMPLETE: &str = "Complete";
    /// `True` when the job failed or was cancelled.
    pub const FAILED: &str = "Failed";
}

/// Reasons used in `status.reason` and in conditions, shared by every part of the operator so
/// that dashboards and alerts can rely on them.
pub mod reasons {
    /// Waiting: the user already has `MAX_JOBS_PER_USER` jobs admitted.
    pub const USER_QUOTA_EXCEEDED: &str = "UserQuotaExceeded";
    /// Waiting: `MAX_CONCURRENT_JOBS` jobs are admitted cluster-wide.
    pub const CLUSTER_QUOTA_EXCEEDED: &str = "ClusterQuotaExceeded";
    /// Waiting: admission is paused (`runner:paused`, or the user in `runner:paused_users`).
    pub const PAUSED: &str = "Paused";
    /// Warning: a user's limit from Redis or the job's plan is unusable; the default applies.
    pub const INVALID_LIMIT: &str = "InvalidLimit";
    /// Queued, not yet evaluated by admission.
    pub const QUEUED: &str = "Queued";
    /// A quota slot was granted.
    pub const ADMITTED: &str = "Admitted";
    /// The batch/v1 Job was created.
    pub const JOB_CREATED: &str = "JobCreated";
    /// The runner pod is running.
    pub const POD_RUNNING: &str = "PodRunning";
    /// The job succeeded.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The runner exited with an error (the executor's message is in the job record).
    pub const JOB_FAILED: &str = "JobFailed";
    /// The job ran longer than its timeout (`activeDeadlineSeconds`).
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    /// The Job failed through its pod failure policy (a disruption or a non-zero exit).
    pub const POD_FAILURE_POLICY: &str = "PodFailurePolicy";
    /// The pod was evicted or preempted (a `DisruptionTarget` condition).
    pub const EVICTED: &str = "Evicted";
    /// The runner container was killed for exceeding its memory limit.
    pub const OOM_KILLED: &str = "OOMKilled";
    /// The job was cancelled.
    pub const CANCELLED: &str = "Cancelled";
    /// The pod cannot be scheduled and no node is coming for it (the scheduler's or the cluster
    /// autoscaler's message says why).
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// The pod waits for a node the cluster autoscaler is adding (`TriggeredScaleUp`).
    pub const WAITING_FOR_NODE: &str = "WaitingForNode";
    /// The pod was lost to an infrastructure disruption before the push; the job runs again.
    pub const RETRYING: &str = "Retrying";
    /// The pod stayed pending longer than `PENDING_TIMEOUT_SECONDS`.
    pub const PENDING_TOO_LONG: &str = "PendingTooLong";
    /// The owned Job disappeared before the job finished.
    pub const JOB_MISSING: &str = "JobMissing";
    /// The RepoboxJob cannot be turned into a Job (e.g. an invalid name).
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// The condition of `type_` in `conditions`, if any.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Builds a condition. `status` maps to `"True"`/`"False"`; `now` becomes the
/// `lastTransitionTime` if [`set_condition`] records a transition.
pub fn new_condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Sets `new` in `conditions` (keyed by type) and returns whether anything changed.
///
/// Like apimachinery's `meta.SetStatusCondition`: when a condition of the same type exists and its
/// `status` is unchanged, its `lastTransitionTime` is kept and only reason, message and
/// observedGeneration are updated — so a controller that recomputes its conditions on every pass
/// does not write a fresh timestamp (and a needless status patch) each time. A changed status or a
/// new type takes `new` as is, including its `lastTransitionTime`.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        None => {
            conditions.push(new);
            true
        }
        Some(existing) if existing.status != new.status => {
            *existing = new;
            true
        }
        Some(existing) => {
            let mut changed = false;
            if existing.reason != new.reason {
                existing.reason = new.reason;
                changed = true;
            }
            if existing.message != new.message {
                existing.message = new.message;
                changed = true;
            }
            if existing.observed_generation != new.observed_generation {
                existing.observed_generation = new.observed_generation;
                changed = true;
            }
            changed
        }
    }
}

/// Removes the condition of `type_`; returns whether one was removed.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

/// A short human duration such as `45s`, `1m23s` or `2h0m5s`, as shown in the DURATION column.
/// Negative durations (clock skew) show as `0s`.
pub fn format_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// [`format_duration`] of the time between two timestamps (whole seconds, rounded down).
pub fn duration_between(start: &Time, end: &Time) -> String {
    let secs = end.0.as_second().saturating_sub(start.0.as_second());
    format_duration(secs)
}

/// The path the generated CRD is checked in at, relative to the workspace root.
pub const CRD_PATH: &str = "crds/repoboxjobs.repobox.dev.yaml";

/// The command that regenerates [`CRD_PATH`].
pub const CRDGEN_COMMAND: &str =
    "cargo run -p repobox-operator -- crdgen --out crds/repoboxjobs.repobox.dev.yaml";

/// The CustomResourceDefinition as YAML, with a header saying it is generated. `crdgen` writes
/// exactly this, and the drift test compares the checked-in file against it.
pub fn crd_yaml() -> Result<String> {
    let yaml = serde_yaml::to_string(&RepoboxJob::crd())
        .map_err(|e| Error::Serialization(format!("RepoboxJob CRD to YAML: {e}")))?;
    Ok(format!(
        "# Generated by `repobox-operator crdgen` from operator/src/model/crd.rs; do not edit.\n\
         # Regenerate with: {CRDGEN_COMMAND}\n{yaml}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use serde_json::json;

    fn ts(s: i64) -> Time {
        match k8s_openapi::jiff::Timestamp::from_second(s) {
            Ok(t) => Time(t),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_cache_keeps_what_the_operator_reads() {
        let full = || {
            let mut rj = RepoboxJob::new("j1", spec());
            rj.metadata.labels = Some([("a".to_owned(), "b".to_owned())].into());
            rj.metadata.annotations = Some([("c".to_owned(), "d".to_owned())].into());
            rj.metadata.finalizers = Some(vec!["repobox.dev/cancel-in-redis".into()]);
            rj.status = Some(RepoboxJobStatus {
                phase: Some(RepoboxJobPhase::Running),
                reason: Some("PodRunning".into()),
                message: Some("the runner is running".into()),
                conditions: vec![new_condition(
                    "Ready",
                    true,
                    "PodRunning",
                    "m",
                    Some(1),
                    ts(5),
                )],
                job_name: Some("j1".into()),
                start_time: Some(ts(5)),
                completion_time: Some(ts(9)),
                branch: Some("repobox/j1".into()),
                ..Default::default()
            });
            rj
        };
        // An unfinished job keeps its whole spec and status (the reconciler writes it).
        let mut running = full();
        running.trim_for_cache();
        assert_eq!(running.status, full().status);
        assert_eq!(running.spec, full().spec);
        assert_eq!(running.metadata.labels, None);
        assert_eq!(running.metadata.annotations, None);
        assert_eq!(running.metadata.finalizers, full().metadata.finalizers);
        // A finished one keeps its phase and completion time (retention), and its spec.
        for phase in [
            RepoboxJobPhase::Succeeded,
            RepoboxJobPhase::Failed,
            RepoboxJobPhase::Cancelled,
        ] {
            let mut done = full();
            done.status.as_mut().unwrap().phase = Some(phase);
            done.trim_for_cache();
            assert_eq!(
                done.status,
                Some(RepoboxJobStatus {
                    phase: Some(phase),
                    completion_time: Some(ts(9)),
                    ..Default::default()
                })
            );
            assert_eq!(done.spec, full().spec);
            assert_eq!(done.phase(), phase);
        }
    }

    fn spec() -> RepoboxJobSpec {
        RepoboxJobSpec {
            job_id: "j1".into(),
            user_id: "u1".into(),
            repo: "https://github.com/acme/api.git".into(),
            stream_entry_id: "1700000000000-0".into(),
            provider_id: None,
            base_branch: None,
            timeout_seconds: None,
            cancel: None,
            plan: None,
        }
    }

    #[test]
    fn resource_identity() {
        assert_eq!(RepoboxJob::group(&()), "repobox.dev");
        assert_eq!(RepoboxJob::version(&()), "v1alpha1");
        assert_eq!(RepoboxJob::kind(&()), "RepoboxJob");
        assert_eq!(RepoboxJob::plural(&()), "repoboxjobs");
        assert_eq!(RepoboxJob::api_version(&()), "repobox.dev/v1alpha1");
        assert_eq!(RepoboxJob::crd_name(), "repoboxjobs.repobox.dev");
    }

    #[test]
    fn spec_serializes_camel_case_and_omits_absent_options() {
        let v = serde_json::to_value(spec()).unwrap();
        assert_eq!(
            v,
            json!({"jobId": "j1", "userId": "u1", "repo": "https://github.com/acme/api.git", "streamEntryId": "1700000000000-0"})
        );
        let full = RepoboxJobSpec {
            provider_id: Some("p".into()),
            base_branch: Some("main".into()),
            timeout_seconds: Some(60),
            cancel: Some(true),
            plan: Some("pro".into()),
            ..spec()
        };
        let v = serde_json::to_value(&full).unwrap();
        assert_eq!(v["providerId"], "p");
        assert_eq!(v["baseBranch"], "main");
        assert_eq!(v["timeoutSeconds"], 60);
        assert_eq!(v["cancel"], true);
        assert_eq!(v["plan"], "pro");
        let back: RepoboxJobSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, full);
        assert!(back.cancel_requested());
        assert!(!spec().cancel_requested());
        assert!(
            !RepoboxJobSpec {
                cancel: Some(false),
                ..spec()
            }
            .cancel_requested()
        );
    }

    #[test]
    fn empty_status_deserializes() {
        let s: RepoboxJobStatus = serde_json::from_value(json!({})).unwrap();
        assert_eq!(s, RepoboxJobStatus::default());
        assert_eq!(serde_json::to_value(&s).unwrap(), json!({}));
        let rj: RepoboxJob = serde_json::from_value(json!({
            "apiVersion": "repobox.dev/v1alpha1", "kind": "RepoboxJob",
            "metadata": {"name": "j1"},
            "spec": {"jobId": "j1", "userId": "u1", "repo": "r", "streamEntryId": "1-0"},
            "status": {}
        }))
        .unwrap();
        assert_eq!(rj.phase(), RepoboxJobPhase::Queued);
        let rj: RepoboxJob = serde_json::from_value(json!({
            "apiVersion": "repobox.dev/v1alpha1", "kind": "RepoboxJob",
            "metadata": {"name": "j1"},
            "spec": {"jobId": "j1", "userId": "u1", "repo": "r", "streamEntryId": "1-0"}
        }))
        .unwrap();
        assert!(rj.status.is_none());
        assert_eq!(rj.phase(), RepoboxJobPhase::Queued);
    }

    #[test]
    fn full_status_round_trips() {
        let status = RepoboxJobStatus {
            phase: Some(RepoboxJobPhase::Succeeded),
            reason: Some(reasons::SUCCEEDED.into()),
            message: Some("pushed".into()),
            conditions: vec![new_condition(
                condition_types::COMPLETE,
                true,
                reasons::SUCCEEDED,
                "ok",
                Some(2),
                ts(100),
            )],
            job_name: Some("j1".into()),
            attempt: Some(2),
            next_attempt_time: Some(ts(3)),
            queued_at: Some(ts(1)),
            start_time: Some(ts(2)),
            completion_time: Some(ts(85)),
            branch: Some("repobox/j1".into()),
            commit_sha: Some("abc".into()),
            pr_url: Some("https://github.com/acme/api/pull/7".into()),
            pr_number: Some(7),
            pr_error: None,
            duration: Some("1m23s".into()),
            observed_generation: Some(2),
        };
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["phase"], "Succeeded");
        assert_eq!(v["jobName"], "j1");
        assert_eq!(v["queuedAt"], "1970-01-01T00:00:01Z");
        assert_eq!(v["startTime"], "1970-01-01T00:00:02Z");
        assert_eq!(v["completionTime"], "1970-01-01T00:01:25Z");
        assert_eq!(v["commitSha"], "abc");
        assert_eq!(v["prUrl"], "https://github.com/acme/api/pull/7");
        assert_eq!(v["prNumber"], 7);
        assert!(v.get("prError").is_none());
        assert_eq!(v["observedGeneration"], 2);
        assert_eq!(v["conditions"][0]["type"], "Complete");
        assert_eq!(v["conditions"][0]["status"], "True");
        assert_eq!(
            v["conditions"][0]["lastTransitionTime"],
            "1970-01-01T00:01:40Z"
        );
        let back: RepoboxJobStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, status);
        let rj = RepoboxJob {
            status: Some(status),
            ..RepoboxJob::new("j1", spec())
        };
        assert_eq!(rj.phase(), RepoboxJobPhase::Succeeded);
    }

    #[test]
    fn phases_serialize_as_their_names() {
        for p in RepoboxJobPhase::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), json!(p.as_str()));
            assert_eq!(p.to_string(), p.as_str());
            let back: RepoboxJobPhase = serde_json::from_value(json!(p.as_str())).unwrap();
            assert_eq!(back, p);
        }
        assert!(serde_json::from_value::<RepoboxJobPhase>(json!("queued")).is_err());
    }

    #[test]
    fn phase_predicates() {
        use RepoboxJobPhase::*;
        let terminal: Vec<_> = RepoboxJobPhase::ALL
            .into_iter()
            .filter(|p| p.is_terminal())
            .collect();
        assert_eq!(terminal, vec![Succeeded, Failed, Cancelled]);
        let admitted: Vec<_> = RepoboxJobPhase::ALL
            .into_iter()
            .filter(|p| p.is_admitted())
            .collect();
        assert_eq!(admitted, vec![Starting, Running]);
        assert!(!Queued.is_terminal() && !Queued.is_admitted());
    }

    #[test]
    fn set_condition_adds_new_types() {
        let mut cs = Vec::new();
        assert!(set_condition(
            &mut cs,
            new_condition(
                "Admitted",
                false,
                "UserQuotaExceeded",
                "wait",
                Some(1),
                ts(10)
            )
        ));
        assert!(set_condition(
            &mut cs,
            new_condition("Complete", false, "Running", "", Some(1), ts(11))
        ));
        assert_eq!(cs.len(), 2);
        assert_eq!(
            find_condition(&cs, "Admitted").map(|c| c.status.as_str()),
            Some("False")
        );
        assert_eq!(
            find_condition(&cs, "Complete").map(|c| c.last_transition_time.clone()),
            Some(ts(11))
        );
        assert!(find_condition(&cs, "Failed").is_none());
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_unchanged() {
        let mut cs = vec![new_condition(
            "Admitted",
            false,
            "UserQuotaExceeded",
            "wait",
            Some(1),
            ts(10),
        )];
        // Identical apart from the timestamp: nothing changes.
        assert!(!set_condition(
            &mut cs,
            new_condition(
                "Admitted",
                false,
                "UserQuotaExceeded",
                "wait",
                Some(1),
                ts(99)
            )
        ));
        assert_eq!(cs[0].last_transition_time, ts(10));
        // Reason changes, status does not: updated, timestamp kept.
        assert!(set_condition(
            &mut cs,
            new_condition(
                "Admitted",
                false,
                "ClusterQuotaExceeded",
                "wait",
                Some(1),
                ts(99)
            )
        ));
        assert_eq!(cs[0].reason, "ClusterQuotaExceeded");
        assert_eq!(cs[0].last_transition_time, ts(10));
        // Message only.
        assert!(set_condition(
            &mut cs,
            new_condition(
                "Admitted",
                false,
                "ClusterQuotaExceeded",
                "still",
                Some(1),
                ts(99)
            )
        ));
        assert_eq!(cs[0].message, "still");
        // observedGeneration only.
        assert!(set_condition(
            &mut cs,
            new_condition(
                "Admitted",
                false,
                "ClusterQuotaExceeded",
                "still",
                Some(2),
                ts(99)
            )
        ));
        assert_eq!(cs[0].observed_generation, Some(2));
        assert_eq!(cs[0].last_transition_time, ts(10));
        // Status changes: everything replaced, new timestamp.
        assert!(set_condition(
            &mut cs,
            new_condition("Admitted", true, "Admitted", "go", Some(2), ts(50))
        ));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].status, "True");
        assert_eq!(cs[0].last_transition_time, ts(50));
        assert!(!set_condition(
            &mut cs,
            new_condition("Admitted", true, "Admitted", "go", Some(2), ts(60))
        ));
        assert_eq!(cs[0].last_transition_time, ts(50));
    }

    #[test]
    fn set_condition_only_touches_its_type() {
        let mut cs = vec![
            new_condition("Admitted", true, "Admitted", "", None, ts(1)),
            new_condition("Complete", false, "Running", "", None, ts(2)),
        ];
        assert!(set_condition(
            &mut cs,
            new_condition("Complete", true, "Succeeded", "", None, ts(3))
        ));
        assert_eq!(
            cs[0],
            new_condition("Admitted", true, "Admitted", "", None, ts(1))
        );
        assert_eq!(cs[1].last_transition_time, ts(3));
        assert!(remove_condition(&mut cs, "Admitted"));
        assert!(!remove_condition(&mut cs, "Admitted"));
        assert_eq!(cs.len(), 1);
    }

    #[test]
    fn new_condition_fields() {
        let c = new_condition(
            "Failed",
            true,
            reasons::OOM_KILLED,
            String::from("oom"),
            Some(3),
            ts(7),
        );
        assert_eq!(c.type_, "Failed");
        assert_eq!(c.status, "True");
        assert_eq!(c.reason, "OOMKilled");
        assert_eq!(c.message, "oom");
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(c.last_transition_time, ts(7));
        assert_eq!(
            new_condition("Failed", false, "X", "", None, ts(0)).status,
            "False"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(-5), "0s");
        assert_eq!(format_duration(45), "45s");
        assert_eq!(format_duration(60), "1m0s");
        assert_eq!(format_duration(83), "1m23s");
        assert_eq!(format_duration(3599), "59m59s");
        assert_eq!(format_duration(3600), "1h0m0s");
        assert_eq!(format_duration(7205), "2h0m5s");
        assert_eq!(format_duration(90000), "25h0m0s");
        assert_eq!(duration_between(&ts(100), &ts(183)), "1m23s");
        assert_eq!(duration_between(&ts(183), &ts(100)), "0s");
    }

    #[test]
    fn reasons_are_camel_case() {
        let all = [
            reasons::USER_QUOTA_EXCEEDED,
            reasons::CLUSTER_QUOTA_EXCEEDED,
            reasons::QUEUED,
            reasons::ADMITTED,
            reasons::JOB_CREATED,
            reasons::POD_RUNNING,
            reasons::SUCCEEDED,
            reasons::JOB_FAILED,
            reasons::DEADLINE_EXCEEDED,
            reasons::POD_FAILURE_POLICY,
            reasons::EVICTED,
            reasons::OOM_KILLED,
            reasons::CANCELLED,
            reasons::UNSCHEDULABLE,
            reasons::WAITING_FOR_NODE,
            reasons::RETRYING,
            reasons::PENDING_TOO_LONG,
            reasons::JOB_MISSING,
            reasons::INVALID_SPEC,
            condition_types::ADMITTED,
            condition_types::COMPLETE,
            condition_types::FAILED,
        ];
        for r in all {
            assert!(
                r.chars().next().is_some_and(|c| c.is_ascii_uppercase()),
                "{r}"
            );
            assert!(r.chars().all(|c| c.is_ascii_alphanumeric()), "{r}");
        }
        // The Job controller's own reasons are reused verbatim.
        assert_eq!(reasons::DEADLINE_EXCEEDED, "DeadlineExceeded");
        assert_eq!(reasons::POD_FAILURE_POLICY, "PodFailurePolicy");
    }

    #[test]
    fn crd_definition() {
        let crd = serde_json::to_value(RepoboxJob::crd()).unwrap();
        assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(crd["metadata"]["name"], "repoboxjobs.repobox.dev");
        let spec = &crd["spec"];
        assert_eq!(spec["group"], "repobox.dev");
        assert_eq!(spec["scope"], "Namespaced");
        assert_eq!(spec["names"]["kind"], "RepoboxJob");
        assert_eq!(spec["names"]["plural"], "repoboxjobs");
        assert_eq!(spec["names"]["shortNames"], json!(["rbj"]));
        assert_eq!(spec["names"]["categories"], json!(["repobox"]));
        let v = &spec["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        assert_eq!(v["served"], true);
        assert_eq!(v["storage"], true);
        assert_eq!(v["subresources"], json!({"status": {}}));
        let cols: Vec<(String, String, String)> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["type"].as_str().unwrap().to_owned(),
                    c["jsonPath"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let want = [
            ("User", "string", ".spec.userId"),
            ("Repo", "string", ".spec.repo"),
            ("Phase", "string", ".status.phase"),
            ("Reason", "string", ".status.reason"),
            ("Branch", "string", ".status.branch"),
            ("PR", "string", ".status.prUrl"),
            ("Duration", "string", ".status.duration"),
            ("Age", "date", ".metadata.creationTimestamp"),
            ("Attempt", "integer", ".status.attempt"),
            ("Job-ID", "string", ".spec.jobId"),
            ("Message", "string", ".status.message"),
        ];
        assert_eq!(cols.len(), want.len());
        for (got, want) in cols.iter().zip(want) {
            assert_eq!((got.0.as_str(), got.1.as_str(), got.2.as_str()), want);
        }
        let schema = &v["schema"]["openAPIV3Schema"]["properties"];
        let spec_schema = &schema["spec"];
        let mut required: Vec<&str> = spec_schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        required.sort();
        assert_eq!(required, ["jobId", "repo", "streamEntryId", "userId"]);
        assert_eq!(
            spec_schema["properties"]["timeoutSeconds"]["minimum"].as_f64(),
            Some(1.0)
        );
        assert_eq!(spec_schema["properties"]["jobId"]["minLength"], 1);
        // Bounded lengths keep the CEL transition rules' estimated cost low.
        for f in ["jobId", "userId", "streamEntryId"] {
            assert!(spec_schema["properties"][f]["maxLength"].is_u64(), "{f}");
            assert!(
                spec_schema["properties"][f]["x-kubernetes-validations"].is_array(),
                "{f}"
            );
        }
        assert!(spec_schema["properties"]["streamEntryId"]["pattern"].is_string());
        assert_eq!(
            spec_schema["properties"]["userId"]["x-kubernetes-validations"][0]["rule"],
            "self == oldSelf"
        );
        let status = &schema["status"];
        assert_eq!(
            status["properties"]["phase"]["enum"],
            json!([
                "Queued",
                "Starting",
                "Running",
                "Succeeded",
                "Failed",
                "Cancelled"
            ])
        );
        assert_eq!(
            status["properties"]["conditions"]["x-kubernetes-list-type"],
            "map"
        );
        assert_eq!(
            status["properties"]["conditions"]["x-kubernetes-list-map-keys"],
            json!(["type"])
        );
        // Kubernetes 1.28 does not serve selectableFields (1.30+).
        assert!(v.get("selectableFields").is_none());
    }

    #[test]
    fn crd_yaml_has_header_and_parses() {
        let yaml = crd_yaml().unwrap();
        assert!(yaml.starts_with("# Generated by `repobox-operator crdgen`"));
        assert!(yaml.contains(CRDGEN_COMMAND));
        let back: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(back, RepoboxJob::crd());
    }
}
