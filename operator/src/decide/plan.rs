//! The reconciler's decisions as one pure function: from what is known about a RepoboxJob (its
//! spec and status, its Job, the runner pod, the job record in Redis) to the steps that bring
//! it where it should be.
//!
//! Facts are gathered lazily: when a decision needs one not gathered yet, [`plan`] returns
//! [`Plan::Need`]; the executor (`run::reconcile`) fetches it and plans again. So the happy
//! path reads nothing it does not need (a running Job costs no Redis read, a pending one no
//! Event list unless its pod is unschedulable), and every branch is a unit test here.
//!
//! Two Redis writes can find that the runner got there first (it recorded its own result).
//! Their steps say so ([`OnTerminal::Replan`], [`Step::RecordRetry`]): the executor then
//! forgets the record it read and plans again, which adopts the runner's result.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use repobox_contract::{JobRecord, JobStatus};

use crate::decide::job_builder;
use crate::decide::retry::{self, AfterDisruption, RetryPolicy};
use crate::decide::scheduling::{self, PodEvent, Waiting};
use crate::decide::status::{self, Explained, Extras, JobState, PodFacts};
use crate::model::crd::{RepoboxJob, RepoboxJobPhase, RepoboxJobStatus, reasons};

/// How long a new Job's pod may take to start before the RepoboxJob shows `Starting`.
pub const STARTING_DEBOUNCE: Duration = Duration::from_secs(2);
/// While jobs wait for a create slot (a burst), a pending pod's first `Starting`
/// explanation (a pod read and a status write) is retried after this long: admissions first.
pub const ADMISSIONS_FIRST_RETRY: Duration = Duration::from_secs(1);
/// The explanation yields to admissions only this long after the Job's creation, so a
/// backlog that never drains cannot hide a pending pod (or its timeout).
pub const ADMISSIONS_FIRST_MAX: Duration = Duration::from_secs(30);

/// How often a pod waiting for a node is looked at again (the autoscaler's word changes).
pub const WAITING_RECHECK: Duration = Duration::from_secs(10);

/// How often a pod pending for another reason is looked at again.
pub const PENDING_RECHECK: Duration = Duration::from_secs(60);

/// After the next attempt's Job is created its watch event brings the next reconcile; this
/// requeue is the safety net.
pub const AFTER_CREATE: Duration = Duration::from_secs(30);

/// The settings the decisions take.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `PENDING_TIMEOUT_SECONDS`.
    pub pending_timeout: Duration,
    /// `UNSCHEDULABLE_GRACE_SECONDS`.
    pub unschedulable_grace: Duration,
    /// How long a finished RepoboxJob is kept.
    pub retention: Duration,
    /// Retries after infrastructure disruptions.
    pub retry: RetryPolicy,
    /// The job's timeout (`activeDeadlineSeconds` of its Job).
    pub timeout_seconds: i64,
}

/// The Job of the current attempt, as far as the decisions need it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobFacts {
    /// The Job's name ([`crate::decide::job_builder::job_name`]: it names the attempt).
    pub name: String,
    /// When the Job was created.
    pub created: Option<Time>,
    /// What its conditions say.
    pub state: JobState,
}

/// What is known so far. `None` means "not gathered yet"; `Some(None)` means "looked, absent".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The current attempt's Job in the operator's cache.
    pub cached_job: Option<Option<JobFacts>>,
    /// The same Job read from the API (asked for only when the cache lacks an admitted job's
    /// Job: a lagging cache must never read as "the Job is gone").
    pub api_job: Option<Option<JobFacts>>,
    /// The runner pod's facts.
    pub pod: Option<Option<PodFacts>>,
    /// The Events on the runner pod (the scheduler's and the cluster autoscaler's).
    pub pod_events: Option<Vec<PodEvent>>,
    /// The job record in Redis.
    pub record: Option<Option<JobRecord>>,
    /// Set when Redis refused a retry (the runner had recorded its result, or the record went):
    /// the Job's failure is then not the outcome, the record is.
    pub retry_refused: bool,
    /// Set while jobs wait for a create slot (their RepoboxJob's or their Job's): the API
    /// server is the bottleneck and informational writes wait (see [`ADMISSIONS_FIRST_RETRY`]).
    pub admissions_waiting: bool,
}

/// A fact to gather before deciding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// [`Observed::cached_job`].
    CachedJob,
    /// [`Observed::api_job`].
    ApiJob,
    /// [`Observed::pod`].
    Pod,
    /// [`Observed::pod_events`].
    PodEvents,
    /// [`Observed::record`].
    Record,
}

/// What to do after the steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Wait for the next change of the RepoboxJob or what it owns.
    AwaitChange,
    /// Look again after this long (e.g. when a timeout or a retry's delay runs out).
    Requeue(Duration),
}

/// When a Redis write finds the job already ended by the runner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTerminal {
    /// Keep the runner's result and carry on.
    Keep,
    /// Forget the record read and plan again (which adopts the runner's result).
    Replan,
}

/// Something worth telling once a status write changed something (or unconditionally, as a
/// [`Step::Announce`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Announce {
    /// An Event on the RepoboxJob.
    Event {
        /// `Normal` or `Warning`.
        type_: EventType,
        /// The Event's CamelCase reason ([`crate::model::crd::reasons`]).
        reason: String,
        /// The human-readable note.
        note: String,
        /// The Event's `action`, e.g. `Retry`.
        action: &'static str,
    },
    /// The job reached a terminal phase (the outcome counter, a log line).
    Finished {
        /// The terminal phase reached.
        phase: RepoboxJobPhase,
        /// Its reason (for the log line).
        reason: String,
    },
    /// A disruption is being retried (the retry counter, a log line).
    Retried {
        /// The attempt that runs next.
        attempt: u32,
        /// The disruption's kind ([`crate::decide::retry::kind`]), the metric label.
        kind: &'static str,
    },
    /// The runner pod runs: record how long it waited for a node and then to start.
    StartTimes {
        /// The attempt's Job, whose first pod is measured.
        job_name: String,
        /// The Job's creation time: where the wait for a node starts.
        created: Option<Time>,
    },
}

/// One side effect, in the order given.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Wake the dispatcher (a slot may have freed up, or a queued job wants one).
    PokeDispatcher,
    /// Create the Job of the attempt the RepoboxJob is at.
    CreateJob,
    /// Delete a Job (and its pod, background propagation); a missing Job is fine.
    DeleteJob(String),
    /// Delete the RepoboxJob itself (retention); a missing one is fine.
    DeleteRepoboxJob,
    /// End the job record: `failed`, or `cancelled` when `phase` is `Cancelled`.
    RecordEnd {
        /// `Failed` or `Cancelled`.
        phase: RepoboxJobPhase,
        /// The record's one-line `error`.
        error: String,
        /// What to do when the runner already ended the job.
        on_terminal: OnTerminal,
    },
    /// Move the job record to a new attempt, with `note` appended to its output. If the
    /// record has ended or gone, plan again with [`Observed::retry_refused`].
    RecordRetry {
        /// The new attempt.
        attempt: u32,
        /// The line appended to the job's output.
        note: String,
    },
    /// Let the job's output expire (it is finished).
    ExpireOutput,
    /// Write the status if it differs from the current one; then announce.
    WriteStatus {
        /// The status wanted.
        status: Box<RepoboxJobStatus>,
        /// Announced only when the write changed something.
        if_changed: Vec<Announce>,
    },
    /// Announce regardless of any write.
    Announce(Announce),
}

/// The decision: gather a fact first, or act.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Gather this fact, then plan again.
    Need(Need),
    /// Carry out these steps in order, then wait or requeue.
    Act(Vec<Step>, Then),
}

impl Plan {
    fn act(steps: Vec<Step>, then: Then) -> Self {
        Plan::Act(steps, then)
    }

    fn wait(then: Then) -> Self {
        Plan::Act(Vec::new(), then)
    }
}

/// The Job of the attempt `rj` is at.
pub fn current_job_name(rj: &RepoboxJob) -> String {
    job_builder::job_name(&rj.name_any(), job_builder::attempt(rj))
}

/// Decides the next steps for a RepoboxJob that is not being deleted.
pub fn plan(rj: &RepoboxJob, obs: &Observed, s: &Settings, now: Timestamp) -> Plan {
    let phase = rj.phase();
    if phase.is_terminal() {
        return retention(rj, s, now);
    }
    if rj.spec.cancel_requested() {
        let why = "cancelled: spec.cancel was set";
        let mut steps = vec![Step::DeleteJob(current_job_name(rj))];
        steps.extend(finish(
            rj,
            RepoboxJobPhase::Cancelled,
            reasons::CANCELLED,
            why,
            Extras::default(),
            Some(why),
            now,
        ));
        return Plan::act(steps, Then::Requeue(s.retention));
    }
    let Some(cached) = &obs.cached_job else {
        return Plan::Need(Need::CachedJob);
    };
    let job = match (cached, phase) {
        (Some(job), _) => Some(job),
        // Whether a queued job's Job exists is the dispatcher's business (its overlay and
        // AlreadyExists cover a lagging cache): nothing to ask the API.
        (None, RepoboxJobPhase::Queued) => {
            return Plan::act(vec![Step::PokeDispatcher], Then::AwaitChange);
        }
        // An admitted job: confirm with the API before calling its Job gone.
        (None, _) => match &obs.api_job {
            None => return Plan::Need(Need::ApiJob),
            Some(job) => job.as_ref(),
        },
    };
    match job {
        Some(job) => observe(rj, job, obs, s, now),
        None if awaits_next_attempt(rj) => next_attempt(rj, now),
        None => job_missing(rj, obs, s, now),
    }
}

/// What to do when the RepoboxJob is being deleted: an unfinished job is cancelled first.
pub fn plan_cleanup(rj: &RepoboxJob) -> Vec<Step> {
    let mut steps = Vec::new();
    if !rj.phase().is_terminal() {
        let why = "cancelled: the RepoboxJob was deleted";
        steps.extend([
            Step::DeleteJob(current_job_name(rj)),
            Step::RecordEnd {
                phase: RepoboxJobPhase::Cancelled,
                error: why.to_owned(),
                on_terminal: OnTerminal::Keep,
            },
            Step::ExpireOutput,
            Step::Announce(Announce::Finished {
                phase: RepoboxJobPhase::Cancelled,
                reason: reasons::CANCELLED.to_owned(),
            }),
        ]);
    }
    steps.push(Step::PokeDispatcher);
    steps
}

/// A retry was decided and its Job is not created yet.
fn awaits_next_attempt(rj: &RepoboxJob) -> bool {
    rj.status
        .as_ref()
        .is_some_and(|s| s.reason.as_deref() == Some(reasons::RETRYING))
        && job_builder::attempt(rj) > 1
}

/// Creates the next attempt's Job once its wait is over. The job keeps its quota slot all the
/// while: its phase stays `Starting`.
fn next_attempt(rj: &RepoboxJob, now: Timestamp) -> Plan {
    let due = rj
        .status
        .as_ref()
        .and_then(|s| s.next_attempt_time.as_ref())
        .map(|t| t.0);
    let wait = due
        .map(|due| due.duration_since(now))
        .filter(|d| d.is_positive())
        .map(|d| d.unsigned_abs())
        .unwrap_or_default();
    if !wait.is_zero() {
        return Plan::wait(Then::Requeue(wait));
    }
    Plan::act(vec![Step::CreateJob], Then::Requeue(AFTER_CREATE))
}

fn since(t: Option<&Time>, now: Timestamp) -> Duration {
    t.map(|t| now.duration_since(t.0).unsigned_abs())
        .unwrap_or_default()
}

/// Follows the Job of an admitted RepoboxJob.
fn observe(rj: &RepoboxJob, job: &JobFacts, obs: &Observed, s: &Settings, now: Timestamp) -> Plan {
    let extras = || Extras {
        job_name: Some(job.name.clone()),
        start_time: job.created.clone(),
        ..Default::default()
    };
    match &job.state {
        // Phases never go backwards (see `status::progress_phase`).
        state @ (JobState::Pending | JobState::Running)
            if status::progress_phase(rj.phase(), state).is_none() =>
        {
            Plan::wait(Then::AwaitChange)
        }
        JobState::Pending => {
            let pending = since(job.created.as_ref(), now);
            // Most pods start within moments: only a pod still pending after a short debounce
            // gets its own `Starting` write (one API write per job saved on the happy path).
            if rj.phase() == RepoboxJobPhase::Queued && pending < STARTING_DEBOUNCE {
                return Plan::wait(Then::Requeue(STARTING_DEBOUNCE - pending));
            }
            // In a burst the API server's time goes to creating Jobs first; the explanation
            // (a pod read and a status write) follows once the creates keep up.
            if rj.phase() == RepoboxJobPhase::Queued
                && obs.admissions_waiting
                && pending < ADMISSIONS_FIRST_MAX
            {
                return Plan::wait(Then::Requeue(ADMISSIONS_FIRST_RETRY));
            }
            // Why the pod is not running: waiting for a node the autoscaler adds, or for none.
            let Some(facts) = &obs.pod else {
                return Plan::Need(Need::Pod);
            };
            let waiting = match facts.as_ref().and_then(|f| f.unschedulable.as_deref()) {
                Some(unschedulable) => match &obs.pod_events {
                    None => return Plan::Need(Need::PodEvents),
                    Some(events) => scheduling::waiting(Some(unschedulable), events),
                },
                None => Waiting::NotForNode,
            };
            if let Some(error) = waiting.give_up(now, s.unschedulable_grace) {
                let mut steps = vec![Step::DeleteJob(job.name.clone())];
                steps.extend(finish(
                    rj,
                    RepoboxJobPhase::Failed,
                    reasons::UNSCHEDULABLE,
                    &error,
                    extras(),
                    Some(&error),
                    now,
                ));
                return Plan::act(steps, Then::Requeue(s.retention));
            }
            let (reason, message) = match (waiting.reason(), waiting.message()) {
                (Some(reason), Some(message)) => (reason, message),
                _ => (reasons::JOB_CREATED, "waiting for the runner pod to start"),
            };
            let desired = status::with_phase(
                rj,
                RepoboxJobPhase::Starting,
                reason,
                message,
                extras(),
                &Time(now),
            );
            let announce = waiting
                .reason()
                .map(|_| event(EventType::Normal, reason, message, "Schedule"));
            let mut steps = vec![Step::WriteStatus {
                status: Box::new(desired),
                if_changed: announce.into_iter().collect(),
            }];
            let limit = s.pending_timeout;
            if pending >= limit {
                let Explained { reason, error } =
                    status::explain_pending(limit.as_secs(), facts.as_ref());
                steps.push(Step::DeleteJob(job.name.clone()));
                steps.extend(finish(
                    rj,
                    RepoboxJobPhase::Failed,
                    reason,
                    &error,
                    extras(),
                    Some(&error),
                    now,
                ));
                return Plan::act(steps, Then::Requeue(s.retention));
            }
            let recheck = if waiting == Waiting::NotForNode {
                PENDING_RECHECK
            } else {
                WAITING_RECHECK
            };
            Plan::act(steps, Then::Requeue((limit - pending).min(recheck)))
        }
        JobState::Running => {
            let desired = status::with_phase(
                rj,
                RepoboxJobPhase::Running,
                reasons::POD_RUNNING,
                "the runner is running",
                extras(),
                &Time(now),
            );
            let steps = vec![Step::WriteStatus {
                status: Box::new(desired),
                if_changed: vec![
                    event(
                        EventType::Normal,
                        reasons::POD_RUNNING,
                        "the runner pod is running",
                        "Run",
                    ),
                    Announce::StartTimes {
                        job_name: job.name.clone(),
                        created: job.created.clone(),
                    },
                ],
            }];
            Plan::act(steps, Then::AwaitChange)
        }
        JobState::Succeeded => adopt_record(rj, obs, s, None, now),
        JobState::Failed { reason, message } => {
            adopt_record(rj, obs, s, Some((reason, message)), now)
        }
    }
}

/// The Job ended (or is gone): take the outcome the executor recorded, or record the one it
/// could not.
fn adopt_record(
    rj: &RepoboxJob,
    obs: &Observed,
    s: &Settings,
    job_failure: Option<(&str, &str)>,
    now: Timestamp,
) -> Plan {
    let Some(record) = &obs.record else {
        return Plan::Need(Need::Record);
    };
    let job_failure = job_failure.filter(|_| !obs.retry_refused);
    let mut extras = Extras {
        job_name: Some(current_job_name(rj)),
        ..Default::default()
    };
    let (phase, reason, message) = match record.as_ref().map(|r| r.status) {
        Some(JobStatus::Success) => {
            let r = record.as_ref();
            extras.branch = r.and_then(|r| r.branch.clone());
            extras.commit_sha = r.and_then(|r| r.commit_sha.clone());
            extras.pr_url = r.and_then(|r| r.pr_url.clone());
            extras.pr_number = r.and_then(|r| r.pr_number.as_deref()?.parse().ok());
            extras.pr_error = r.and_then(|r| r.pr_error.clone());
            let message = match &extras.branch {
                Some(b) => format!("pushed {b}"),
                None => "finished: no changes were needed".to_owned(),
            };
            (RepoboxJobPhase::Succeeded, reasons::SUCCEEDED, message)
        }
        Some(JobStatus::Failed) => {
            let error = record.as_ref().and_then(|r| r.error.clone());
            let error = error.unwrap_or_else(|| "the job failed".into());
            (RepoboxJobPhase::Failed, reasons::JOB_FAILED, error)
        }
        Some(JobStatus::Cancelled) => {
            let why = record.as_ref().and_then(|r| r.error.clone());
            let why = why.unwrap_or_else(|| "cancelled".into());
            (RepoboxJobPhase::Cancelled, reasons::CANCELLED, why)
        }
        None => (
            RepoboxJobPhase::Failed,
            reasons::JOB_FAILED,
            "the job record disappeared from Redis before the job finished".to_owned(),
        ),
        // The executor did not record an outcome: the pod was killed or never ran the job.
        Some(JobStatus::Pending | JobStatus::Running) => {
            let Explained { reason, error } = match job_failure {
                Some((job_reason, job_message)) => {
                    let Some(facts) = &obs.pod else {
                        return Plan::Need(Need::Pod);
                    };
                    let explained = status::explain_job_failure(
                        job_reason,
                        job_message,
                        s.timeout_seconds,
                        facts.as_ref(),
                    );
                    if explained.reason != reasons::EVICTED {
                        explained
                    } else {
                        // An infrastructure disruption: run again if that is safe.
                        let disruption = facts.as_ref().and_then(|f| f.disruption.as_deref());
                        let recorded_step = record.as_ref().and_then(|r| r.step.as_deref());
                        match retry::after_disruption(
                            job_builder::attempt(rj),
                            s.retry,
                            recorded_step,
                            &retry::describe(disruption),
                        ) {
                            AfterDisruption::Fail(e) => e,
                            AfterDisruption::Retry {
                                attempt,
                                delay,
                                message,
                            } => {
                                let kind = retry::kind(disruption);
                                return schedule_retry(rj, attempt, delay, &message, kind, now);
                            }
                        }
                    }
                }
                None => Explained {
                    reason: reasons::JOB_FAILED,
                    error: "the job runner exited without recording a result".into(),
                },
            };
            // Record it; if the executor won a race and ended it meanwhile, adopt that instead.
            let mut steps = vec![Step::RecordEnd {
                phase: RepoboxJobPhase::Failed,
                error: error.clone(),
                on_terminal: OnTerminal::Replan,
            }];
            steps.extend(finish(
                rj,
                RepoboxJobPhase::Failed,
                reason,
                &error,
                extras,
                None,
                now,
            ));
            return Plan::act(steps, Then::Requeue(s.retention));
        }
    };
    let steps = finish(rj, phase, reason, &message, extras, None, now);
    Plan::act(steps, Then::Requeue(s.retention))
}

/// Moves the job to its next attempt: Redis first (the attempt a runner may start, the note in
/// the output), then the status with the time the new Job is due. Repeating it is harmless.
fn schedule_retry(
    rj: &RepoboxJob,
    attempt: u32,
    delay: Duration,
    message: &str,
    kind: &'static str,
    now: Timestamp,
) -> Plan {
    let due = jiff::SignedDuration::try_from(delay)
        .ok()
        .and_then(|d| now.checked_add(d).ok())
        .unwrap_or(now);
    let desired = status::with_phase(
        rj,
        RepoboxJobPhase::Starting,
        reasons::RETRYING,
        message,
        Extras {
            job_name: Some(job_builder::job_name(&rj.name_any(), attempt)),
            attempt: Some(attempt),
            next_attempt_time: Some(Time(due)),
            ..Default::default()
        },
        &Time(now),
    );
    let steps = vec![
        Step::RecordRetry {
            attempt,
            note: format!("==> {message}"),
        },
        Step::WriteStatus {
            status: Box::new(desired),
            if_changed: vec![
                Announce::Retried { attempt, kind },
                event(EventType::Warning, reasons::RETRYING, message, "Retry"),
            ],
        },
    ];
    Plan::act(steps, Then::Requeue(delay))
}

/// An admitted RepoboxJob whose Job is gone (deleted by hand, or by TTL before we saw it end).
fn job_missing(rj: &RepoboxJob, obs: &Observed, s: &Settings, now: Timestamp) -> Plan {
    let Some(record) = &obs.record else {
        return Plan::Need(Need::Record);
    };
    if record.as_ref().is_some_and(|r| r.status.is_terminal()) {
        return adopt_record(rj, obs, s, None, now);
    }
    let error = "the Job was deleted before the job finished";
    let extras = Extras {
        job_name: Some(rj.name_any()),
        ..Default::default()
    };
    let steps = finish(
        rj,
        RepoboxJobPhase::Failed,
        reasons::JOB_MISSING,
        error,
        extras,
        Some(error),
        now,
    );
    Plan::act(steps, Then::Requeue(s.retention))
}

/// Finished RepoboxJobs are deleted after the retention period.
fn retention(rj: &RepoboxJob, s: &Settings, now: Timestamp) -> Plan {
    let finished = rj
        .status
        .as_ref()
        .and_then(|st| st.completion_time.as_ref());
    let Some(finished) = finished else {
        return Plan::wait(Then::AwaitChange);
    };
    let age = since(Some(finished), now);
    if age >= s.retention {
        // A line pushed after the job was seen finished may have created the list anew.
        return Plan::act(
            vec![Step::ExpireOutput, Step::DeleteRepoboxJob],
            Then::AwaitChange,
        );
    }
    Plan::wait(Then::Requeue(s.retention - age))
}

fn event(type_: EventType, reason: &str, note: &str, action: &'static str) -> Announce {
    Announce::Event {
        type_,
        reason: reason.to_owned(),
        note: note.to_owned(),
        action,
    }
}

/// A queued job's waiting reason, the dispatcher's word; an Event when the reason changes.
pub fn queued(rj: &RepoboxJob, reason: &str, message: &str, now: Timestamp) -> Vec<Step> {
    let new_reason = rj.status.as_ref().and_then(|s| s.reason.as_deref()) != Some(reason);
    let desired = status::with_phase(
        rj,
        RepoboxJobPhase::Queued,
        reason,
        message,
        Extras::default(),
        &Time(now),
    );
    vec![Step::WriteStatus {
        status: Box::new(desired),
        if_changed: new_reason
            .then(|| event(EventType::Normal, reason, message, "Queue"))
            .into_iter()
            .collect(),
    }]
}

/// Moves a RepoboxJob to a terminal phase; `redis_error`, when given, is recorded as the
/// job's `failed` (or `cancelled`) error unless the job record already ended. The output
/// expires before the status says finished: whoever sees the job finished sees it expiring.
pub fn finish(
    rj: &RepoboxJob,
    phase: RepoboxJobPhase,
    reason: &str,
    message: &str,
    extras: Extras,
    redis_error: Option<&str>,
    now: Timestamp,
) -> Vec<Step> {
    let mut steps = Vec::new();
    if let Some(error) = redis_error {
        steps.push(Step::RecordEnd {
            phase,
            error: error.to_owned(),
            on_terminal: OnTerminal::Keep,
        });
    }
    steps.push(Step::ExpireOutput);
    let type_ = if phase == RepoboxJobPhase::Succeeded {
        EventType::Normal
    } else {
        EventType::Warning
    };
    steps.push(Step::WriteStatus {
        status: Box::new(status::with_phase(
            rj,
            phase,
            reason,
            message,
            extras,
            &Time(now),
        )),
        if_changed: vec![
            event(type_, reason, message, "Finish"),
            Announce::Finished {
                phase,
                reason: reason.to_owned(),
            },
        ],
    });
    steps.push(Step::PokeDispatcher);
    steps
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::decide::scheduling::{NOT_TRIGGER_SCALE_UP, TRIGGERED_SCALE_UP};
    use crate::model::crd::RepoboxJobSpec;

    const NOW: &str = "2026-01-01T01:00:00Z";

    fn now() -> Timestamp {
        NOW.parse().unwrap()
    }

    /// `secs` seconds before [`NOW`].
    fn ago(secs: i64) -> Time {
        Time(now() - jiff::SignedDuration::from_secs(secs))
    }

    fn settings() -> Settings {
        Settings {
            pending_timeout: Duration::from_secs(600),
            unschedulable_grace: Duration::from_secs(60),
            retention: Duration::from_secs(3600),
            retry: RetryPolicy {
                max_retries: 2,
                backoff: Duration::from_secs(10),
            },
            timeout_seconds: 900,
        }
    }

    fn rj(phase: Option<RepoboxJobPhase>) -> RepoboxJob {
        let mut rj = RepoboxJob::new(
            "job-1",
            RepoboxJobSpec {
                job_id: "job-1".into(),
                user_id: "u".into(),
                repo: "https://h/r.git".into(),
                stream_entry_id: "1-0".into(),
                provider_id: None,
                base_branch: None,
                timeout_seconds: None,
                cancel: None,
                plan: None,
            },
        );
        rj.metadata = ObjectMeta {
            name: Some("job-1".into()),
            generation: Some(1),
            creation_timestamp: Some(ago(100)),
            ..Default::default()
        };
        rj.status = phase.map(|phase| RepoboxJobStatus {
            phase: Some(phase),
            ..Default::default()
        });
        rj
    }

    fn job(state: JobState, age_secs: i64) -> JobFacts {
        JobFacts {
            name: "job-1".into(),
            created: Some(ago(age_secs)),
            state,
        }
    }

    fn record(status: &str, extra: &[(&str, &str)]) -> JobRecord {
        let mut map: HashMap<String, String> = [
            ("userId", "u"),
            ("providerId", "p"),
            ("repoUrl", "https://h/r.git"),
            ("status", status),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        map.retain(|_, v| !v.is_empty());
        JobRecord::from_hash("job-1", map).unwrap()
    }

    /// What the plan comes to once every fact it asks for is taken from `facts`; panics if it
    /// asks for one that `facts` lacks, and returns the needs in the order asked.
    fn settle(rj: &RepoboxJob, facts: &Observed) -> (Vec<Need>, Vec<Step>, Then) {
        let mut obs = Observed {
            retry_refused: facts.retry_refused,
            admissions_waiting: facts.admissions_waiting,
            ..Default::default()
        };
        let mut needs = Vec::new();
        loop {
            match plan(rj, &obs, &settings(), now()) {
                Plan::Act(steps, then) => return (needs, steps, then),
                Plan::Need(need) => {
                    needs.push(need);
                    match need {
                        Need::CachedJob => {
                            obs.cached_job = Some(facts.cached_job.clone().expect("cached job"));
                        }
                        Need::ApiJob => obs.api_job = Some(facts.api_job.clone().expect("api job")),
                        Need::Pod => obs.pod = Some(facts.pod.clone().expect("pod")),
                        Need::PodEvents => {
                            obs.pod_events = Some(facts.pod_events.clone().expect("events"));
                        }
                        Need::Record => obs.record = Some(facts.record.clone().expect("record")),
                    }
                }
            }
        }
    }

    /// The phase and reason a step list writes last.
    fn written(steps: &[Step]) -> Vec<(RepoboxJobPhase, String)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::WriteStatus { status, .. } => {
                    Some((status.phase.unwrap(), status.reason.clone().unwrap()))
                }
                _ => None,
            })
            .collect()
    }

    fn kinds(steps: &[Step]) -> Vec<&'static str> {
        steps
            .iter()
            .map(|s| match s {
                Step::PokeDispatcher => "poke",
                Step::CreateJob => "create-job",
                Step::DeleteJob(_) => "delete-job",
                Step::DeleteRepoboxJob => "delete-rj",
                Step::RecordEnd { .. } => "record-end",
                Step::RecordRetry { .. } => "record-retry",
                Step::ExpireOutput => "expire-output",
                Step::WriteStatus { .. } => "write-status",
                Step::Announce(_) => "announce",
            })
            .collect()
    }

    fn finished(rj: &mut RepoboxJob, phase: RepoboxJobPhase, secs_ago: Option<i64>) {
        let status = rj.status.get_or_insert_default();
        status.phase = Some(phase);
        status.completion_time = secs_ago.map(ago);
    }

    #[test]
    fn finished_jobs_are_deleted_after_retention_and_not_before() {
        for phase in [
            RepoboxJobPhase::Succeeded,
            RepoboxJobPhase::Failed,
            RepoboxJobPhase::Cancelled,
        ] {
            let mut r = rj(None);
            finished(&mut r, phase, None);
            assert_eq!(
                settle(&r, &Observed::default()),
                (vec![], vec![], Then::AwaitChange)
            );
            finished(&mut r, phase, Some(600));
            assert_eq!(
                settle(&r, &Observed::default()),
                (vec![], vec![], Then::Requeue(Duration::from_secs(3000)))
            );
            finished(&mut r, phase, Some(3600));
            let (needs, steps, then) = settle(&r, &Observed::default());
            assert!(needs.is_empty());
            assert_eq!(steps, [Step::ExpireOutput, Step::DeleteRepoboxJob]);
            assert_eq!(then, Then::AwaitChange);
        }
    }

    #[test]
    fn spec_cancel_deletes_the_job_and_records_cancelled_without_reading_anything() {
        for phase in [
            None,
            Some(RepoboxJobPhase::Queued),
            Some(RepoboxJobPhase::Running),
        ] {
            let mut r = rj(phase);
            r.spec.cancel = Some(true);
            let (needs, steps, then) = settle(&r, &Observed::default());
            assert!(needs.is_empty());
            assert_eq!(
                kinds(&steps),
                [
                    "delete-job",
                    "record-end",
                    "expire-output",
                    "write-status",
                    "poke"
                ]
            );
            assert_eq!(steps[0], Step::DeleteJob("job-1".into()));
            assert!(matches!(
                &steps[1],
                Step::RecordEnd {
                    phase: RepoboxJobPhase::Cancelled,
                    on_terminal: OnTerminal::Keep,
                    ..
                }
            ));
            assert_eq!(
                written(&steps),
                [(RepoboxJobPhase::Cancelled, reasons::CANCELLED.to_owned())]
            );
            assert_eq!(then, Then::Requeue(Duration::from_secs(3600)));
        }
    }

    #[test]
    fn a_queued_job_without_a_job_pokes_the_dispatcher_and_never_asks_the_api() {
        for phase in [None, Some(RepoboxJobPhase::Queued)] {
            let facts = Observed {
                cached_job: Some(None),
                ..Default::default()
            };
            let (needs, steps, then) = settle(&rj(phase), &facts);
            assert_eq!(needs, [Need::CachedJob]);
            assert_eq!(steps, [Step::PokeDispatcher]);
            assert_eq!(then, Then::AwaitChange);
        }
    }

    #[test]
    fn an_admitted_job_missing_from_the_cache_is_confirmed_with_the_api() {
        let r = rj(Some(RepoboxJobPhase::Running));
        let facts = Observed {
            cached_job: Some(None),
            api_job: Some(Some(job(JobState::Running, 50))),
            ..Default::default()
        };
        let (needs, steps, _) = settle(&r, &facts);
        assert_eq!(needs, [Need::CachedJob, Need::ApiJob]);
        assert_eq!(
            written(&steps),
            [(RepoboxJobPhase::Running, reasons::POD_RUNNING.to_owned())]
        );
    }

    #[test]
    fn a_job_gone_before_the_end_fails_unless_the_runner_recorded_the_outcome() {
        let r = rj(Some(RepoboxJobPhase::Running));
        let mut facts = Observed {
            cached_job: Some(None),
            api_job: Some(None),
            record: Some(Some(record("running", &[]))),
            ..Default::default()
        };
        let (needs, steps, _) = settle(&r, &facts);
        assert_eq!(needs, [Need::CachedJob, Need::ApiJob, Need::Record]);
        assert_eq!(
            kinds(&steps),
            ["record-end", "expire-output", "write-status", "poke"]
        );
        assert_eq!(
            written(&steps),
            [(RepoboxJobPhase::Failed, reasons::JOB_MISSING.to_owned())]
        );

        facts.record = Some(Some(record("success", &[("branch", "repobox/job-1")])));
        let (_, steps, _) = settle(&r, &facts);
        assert_eq!(kinds(&steps), ["expire-output", "write-status", "poke"]);
        assert_eq!(
            written(&steps),
            [(RepoboxJobPhase::Succeeded, reasons::SUCCEEDED.to_owned())]
        );
    }

    fn retrying(due_in_secs: i64) -> RepoboxJob {
        let mut r = rj(Some(RepoboxJobPhase::Starting));
        let s = r.status.get_or_insert_default();
        s.reason = Some(reasons::RETRYING.into());
        s.attempt = Some(2);
        s.next_attempt_time = Some(ago(-due_in_secs));
        r
    }

    #[test]
    fn the_next_attempt_is_created_when_due() {
        let facts = Observed {
            cached_job: Some(None),
            api_job: Some(None),
            ..Default::default()
        };
        let (needs, steps, then) = settle(&retrying(7), &facts);
        assert_eq!(needs, [Need::CachedJob, Need::ApiJob]);
        assert!(steps.is_empty());
        assert_eq!(then, Then::Requeue(Duration::from_secs(7)));
        let (_, steps, then) = settle(&retrying(-1), &facts);
        assert_eq!(steps, [Step::CreateJob]);
        assert_eq!(then, Then::Requeue(AFTER_CREATE));
        assert_eq!(current_job_name(&retrying(0)), "job-1-r2");
    }

    #[test]
    fn a_fresh_pending_pod_costs_nothing_during_the_debounce() {
        let facts = Observed {
            cached_job: Some(Some(job(JobState::Pending, 0))),
            ..Default::default()
        };
        let (needs, steps, then) = settle(&rj(Some(RepoboxJobPhase::Queued)), &facts);
        assert_eq!(needs, [Need::CachedJob]);
        assert!(steps.is_empty());
        assert_eq!(then, Then::Requeue(STARTING_DEBOUNCE));
    }

    #[test]
    fn in_a_burst_the_first_starting_explanation_waits_for_the_admissions() {
        let burst = |age| Observed {
            cached_job: Some(Some(job(JobState::Pending, age))),
            pod: Some(Some(PodFacts::default())),
            admissions_waiting: true,
            ..Default::default()
        };
        // No pod read, no write: asked again in a second.
        let (needs, steps, then) = settle(&rj(Some(RepoboxJobPhase::Queued)), &burst(3));
        assert_eq!(needs, [Need::CachedJob]);
        assert!(steps.is_empty(), "{steps:?}");
        assert_eq!(then, Then::Requeue(ADMISSIONS_FIRST_RETRY));
        // Not for ever: past the bound the pod is read and explained as usual.
        let late = ADMISSIONS_FIRST_MAX.as_secs() as i64;
        let (needs, steps, _) = settle(&rj(Some(RepoboxJobPhase::Queued)), &burst(late));
        assert_eq!(needs, [Need::CachedJob, Need::Pod]);
        assert!(!steps.is_empty());
        // A job already showing `Starting` is followed as usual.
        let (needs, _, _) = settle(&rj(Some(RepoboxJobPhase::Starting)), &burst(3));
        assert_ne!(needs, [Need::CachedJob]);
    }

    #[test]
    fn a_pod_pending_for_another_reason_shows_starting_quietly() {
        let facts = Observed {
            cached_job: Some(Some(job(JobState::Pending, 30))),
            pod: Some(Some(PodFacts::default())),
            ..Default::default()
        };
        let (needs, steps, then) = settle(&rj(Some(RepoboxJobPhase::Queued)), &facts);
        assert_eq!(needs, [Need::CachedJob, Need::Pod]);
        assert_eq!(
            written(&steps),
            [(RepoboxJobPhase::Starting, reasons::JOB_CREATED.to_owned())]
        );
        assert!(matches!(&steps[0], Step::WriteStatus { if_changed, .. } if if_changed.is_empty()));
        assert_eq!(then, Then::Requeue(PENDING_RECHECK));
    }

    fn pod_event(reason: &str, secs_ago: i64) -> PodEvent {
        let t = ago(secs_ago).0;
        PodEvent {
            reason: reason.into(),
            message: format!("{reason} message"),
            first: Some(t),
            last: Some(t),
        }
    }

    fn unschedulable(events: Vec<PodEvent>, age: i64) -> Observed {
        Observed {
            cached_job: Some(Some(job(JobState::Pending, age))),
            pod: Some(Some(PodFacts {
                unschedulable: Some("0/1 nodes are available".into()),
                ..Default::default()
            })),
            pod_events: Some(events),
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_waiting_for_a_scale_up_says_so_and_is_never_failed_for_it() {
        let facts = unschedulable(vec![pod_event(TRIGGERED_SCALE_UP, 300)], 400);
        let (needs, steps, then) = settle(&rj(Some(RepoboxJobPhase::Starting)), &facts);
        assert_eq!(needs, [Need::CachedJob, Need::Pod, Need::PodEvents]);
        assert_eq!(
            written(&steps),
            [(
                RepoboxJobPhase::Starting,
                reasons::WAITING_FOR_NODE.to_owned()
            )]
        );
        assert!(matches!(&steps[0], Step::WriteStatus { if_changed, .. } if if_changed.len() == 1));
        assert_eq!(then, Then::Requeue(WAITING_RECHECK));
    }

    #[test]
    fn a_pod_no_node_group_fits_fails_after_the_grace() {
        let r = rj(Some(RepoboxJobPhase::Starting));
        let within = unschedulable(vec![pod_event(NOT_TRIGGER_SCALE_UP, 30)], 40);
        let (_, steps, _) = settle(&r, &within);
        assert_eq!(
            written(&steps),
            [(RepoboxJobPhase::Starting, reasons::UNSCHEDULABLE.to_owned())]
        );
        let past = unschedulable(vec![pod_event(NOT_TRIGGER_SCALE_UP, 90)], 100);
        let (_, steps, then) = settle(&r, &past);
        assert_eq!(
            kinds(&steps),
            [
                "delete-job",
                "record-end",
                "expire-output",
                "write-status",
                "poke"
            ]
        );
        assert_eq!(
            written(&steps),
            [(RepoboxJobPhase::Failed, reasons::UNSCHEDULABLE.to_owned())]
        );
        assert_eq!(then, Then::Requeue(Duration::from_secs(3600)));
    }

    #[test]
    fn a_pod_pending_past_the_timeout_fails_with_the_reason() {
        let facts = Observed {
            cached_job: Some(Some(job(JobState::Pending, 601))),
            pod: Some(Some(PodFacts {
                waiting_reason: Some("ImagePullBackOff".into()),
                ..Default::default()
            })),
            ..Default::default()
        };
        let (_, steps, _) = settle(&rj(Some(RepoboxJobPhase::Starting)), &facts);
        assert_eq!(
            kinds(&steps),
            [
                "write-status",
                "delete-job",
                "record-end",
                "expire-output",
                "write-status",
                "poke"
            ]
        );
        let last = written(&steps).pop().unwrap();
        assert_eq!(last.0, RepoboxJobPhase::Failed);
    }

    #[test]
    fn a_running_pod_is_written_once_with_its_start_times() {
        for phase in [
            Some(RepoboxJobPhase::Queued),
            Some(RepoboxJobPhase::Starting),
        ] {
            let facts = Observed {
                cached_job: Some(Some(job(JobState::Running, 30))),
                ..Default::default()
            };
            let (needs, steps, then) = settle(&rj(phase), &facts);
            assert_eq!(needs, [Need::CachedJob]);
            assert_eq!(
                written(&steps),
                [(RepoboxJobPhase::Running, reasons::POD_RUNNING.to_owned())]
            );
            let Step::WriteStatus { if_changed, .. } = &steps[0] else {
                panic!("{steps:?}")
            };
            assert!(matches!(if_changed[1], Announce::StartTimes { .. }));
            assert_eq!(then, Then::AwaitChange);
        }
    }

    #[test]
    fn phases_never_go_backwards() {
        let facts = Observed {
            cached_job: Some(Some(job(JobState::Pending, 30))),
            ..Default::default()
        };
        let (needs, steps, then) = settle(&rj(Some(RepoboxJobPhase::Running)), &facts);
        assert_eq!(
            (needs, steps, then),
            (vec![Need::CachedJob], vec![], Then::AwaitChange)
        );
    }

    fn ended(state: JobState, record: JobRecord, pod: PodFacts) -> Observed {
        Observed {
            cached_job: Some(Some(job(state, 300))),
            record: Some(Some(record)),
            pod: Some(Some(pod)),
            ..Default::default()
        }
    }

    #[test]
    fn the_runners_recorded_outcome_is_adopted() {
        let r = rj(Some(RepoboxJobPhase::Running));
        let cases = [
            ("success", RepoboxJobPhase::Succeeded, reasons::SUCCEEDED),
            ("failed", RepoboxJobPhase::Failed, reasons::JOB_FAILED),
            ("cancelled", RepoboxJobPhase::Cancelled, reasons::CANCELLED),
        ];
        for (status, phase, reason) in cases {
            let facts = ended(
                JobState::Succeeded,
                record(status, &[("error", "boom")]),
                PodFacts::default(),
            );
            let (needs, steps, _) = settle(&r, &facts);
            assert_eq!(needs, [Need::CachedJob, Need::Record], "{status}");
            assert_eq!(
                kinds(&steps),
                ["expire-output", "write-status", "poke"],
                "{status}"
            );
            assert_eq!(written(&steps), [(phase, reason.to_owned())], "{status}");
        }
    }

    #[test]
    fn a_success_carries_branch_commit_and_pull_request() {
        let rec = record(
            "success",
            &[
                ("branch", "repobox/abc"),
                ("commitSha", "c0ffee"),
                ("prUrl", "https://h/pr/7"),
                ("prNumber", "7"),
            ],
        );
        let (_, steps, _) = settle(
            &rj(Some(RepoboxJobPhase::Running)),
            &ended(JobState::Succeeded, rec, PodFacts::default()),
        );
        let Step::WriteStatus { status, .. } = &steps[1] else {
            panic!("{steps:?}")
        };
        assert_eq!(status.message.as_deref(), Some("pushed repobox/abc"));
        assert_eq!(status.branch.as_deref(), Some("repobox/abc"));
        assert_eq!(status.pr_number, Some(7));
    }

    #[test]
    fn a_job_that_ended_without_a_recorded_result_is_explained_and_recorded() {
        let r = rj(Some(RepoboxJobPhase::Running));
        let oom = PodFacts {
            terminated_reason: Some("OOMKilled".into()),
            exit_code: Some(137),
            ..Default::default()
        };
        let failed = JobState::Failed {
            reason: "PodFailurePolicy".into(),
            message: "Container runner exited with 137".into(),
        };
        let (needs, steps, _) = settle(&r, &ended(failed, record("running", &[]), oom));
        assert_eq!(needs, [Need::CachedJob, Need::Record, Need::Pod]);
        assert_eq!(
            kinds(&steps),
            ["record-end", "expire-output", "write-status", "poke"]
        );
        assert!(matches!(
            &steps[0],
            Step::RecordEnd {
                on_terminal: OnTerminal::Replan,
                ..
            }
        ));
        assert_eq!(
            written(&steps),
            [(RepoboxJobPhase::Failed, reasons::OOM_KILLED.to_owned())]
        );
        let deadline = JobState::Failed {
            reason: "DeadlineExceeded".into(),
            message: String::new(),
        };
        let (_, steps, _) = settle(
            &r,
            &ended(deadline, record("running", &[]), PodFacts::default()),
        );
        assert_eq!(
            written(&steps),
            [(
                RepoboxJobPhase::Failed,
                reasons::DEADLINE_EXCEEDED.to_owned()
            )]
        );
        // A Job that succeeded although the runner recorded nothing.
        let (needs, steps, _) = settle(
            &r,
            &ended(
                JobState::Succeeded,
                record("running", &[]),
                PodFacts::default(),
            ),
        );
        assert_eq!(needs, [Need::CachedJob, Need::Record]);
        assert_eq!(
            written(&steps),
            [(RepoboxJobPhase::Failed, reasons::JOB_FAILED.to_owned())]
        );
    }

    fn evicted() -> (JobState, PodFacts) {
        (
            JobState::Failed {
                reason: "PodFailurePolicy".into(),
                message: "Pod matched rule 0 (DisruptionTarget)".into(),
            },
            PodFacts {
                disruption: Some("EvictionByEvictionAPI".into()),
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_disruption_before_the_push_is_retried_as_a_new_attempt() {
        let r = rj(Some(RepoboxJobPhase::Running));
        let (state, pod) = evicted();
        let (_, steps, then) = settle(
            &r,
            &ended(state, record("running", &[("step", "agent")]), pod),
        );
        assert_eq!(kinds(&steps), ["record-retry", "write-status"]);
        assert!(
            matches!(&steps[0], Step::RecordRetry { attempt: 2, note } if note.starts_with("==> "))
        );
        let Step::WriteStatus { status, if_changed } = &steps[1] else {
            panic!("{steps:?}")
        };
        assert_eq!(status.phase, Some(RepoboxJobPhase::Starting));
        assert_eq!(status.reason.as_deref(), Some(reasons::RETRYING));
        assert_eq!(status.attempt, Some(2));
        assert_eq!(status.job_name.as_deref(), Some("job-1-r2"));
        assert_eq!(status.next_attempt_time, Some(ago(-10)));
        assert!(matches!(
            if_changed[0],
            Announce::Retried {
                attempt: 2,
                kind: "eviction"
            }
        ));
        assert_eq!(then, Then::Requeue(Duration::from_secs(10)));
    }

    #[test]
    fn a_disruption_during_the_push_fails_the_job() {
        let (state, pod) = evicted();
        let rec = record("running", &[("step", "pushing")]);
        let (_, steps, _) = settle(&rj(Some(RepoboxJobPhase::Running)), &ended(state, rec, pod));
        assert_eq!(
            kinds(&steps),
            ["record-end", "expire-output", "write-status", "poke"]
        );
        assert_eq!(
            written(&steps),
            [(RepoboxJobPhase::Failed, reasons::EVICTED.to_owned())]
        );
    }

    #[test]
    fn a_refused_retry_adopts_the_record() {
        let (state, pod) = evicted();
        let mut facts = ended(state, record("success", &[("branch", "repobox/x")]), pod);
        facts.retry_refused = true;
        let (_, steps, _) = settle(&rj(Some(RepoboxJobPhase::Running)), &facts);
        assert_eq!(
            written(&steps),
            [(RepoboxJobPhase::Succeeded, reasons::SUCCEEDED.to_owned())]
        );
        // Refused and still unfinished in Redis (a race): failed, not retried again.
        let (state, pod) = evicted();
        let mut facts = ended(state, record("running", &[("step", "agent")]), pod);
        facts.retry_refused = true;
        let (_, steps, _) = settle(&rj(Some(RepoboxJobPhase::Running)), &facts);
        assert_eq!(
            kinds(&steps),
            ["record-end", "expire-output", "write-status", "poke"]
        );
    }

    #[test]
    fn a_vanished_record_fails_the_job() {
        let facts = Observed {
            cached_job: Some(Some(job(JobState::Succeeded, 300))),
            record: Some(None),
            ..Default::default()
        };
        let (_, steps, _) = settle(&rj(Some(RepoboxJobPhase::Running)), &facts);
        assert_eq!(kinds(&steps), ["expire-output", "write-status", "poke"]);
        let Step::WriteStatus { status, .. } = &steps[1] else {
            panic!("{steps:?}")
        };
        assert!(status.message.as_deref().unwrap().contains("disappeared"));
    }

    #[test]
    fn cleanup_cancels_only_unfinished_jobs() {
        let steps = plan_cleanup(&rj(Some(RepoboxJobPhase::Running)));
        assert_eq!(
            kinds(&steps),
            [
                "delete-job",
                "record-end",
                "expire-output",
                "announce",
                "poke"
            ]
        );
        let mut done = rj(None);
        finished(&mut done, RepoboxJobPhase::Succeeded, Some(5));
        assert_eq!(plan_cleanup(&done), [Step::PokeDispatcher]);
    }

    #[test]
    fn a_queued_reason_is_announced_only_when_it_changes() {
        let mut r = rj(Some(RepoboxJobPhase::Queued));
        let steps = queued(&r, reasons::USER_QUOTA_EXCEEDED, "1 of 1 running", now());
        assert!(matches!(&steps[0], Step::WriteStatus { if_changed, .. } if if_changed.len() == 1));
        r.status.as_mut().unwrap().reason = Some(reasons::USER_QUOTA_EXCEEDED.into());
        let steps = queued(&r, reasons::USER_QUOTA_EXCEEDED, "1 of 1 running", now());
        assert!(matches!(&steps[0], Step::WriteStatus { if_changed, .. } if if_changed.is_empty()));
    }
}
