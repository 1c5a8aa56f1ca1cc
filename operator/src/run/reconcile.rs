//! The controller: RepoboxJob (+ owned Jobs) → status, outcome, cancellation and retention.
//!
//! Queued → (admission, see [`crate::run::dispatcher`]) → Starting → Running → Succeeded | Failed;
//! Cancelled from any non-terminal phase. The reconciler is idempotent; it reads the Job from
//! the controller's Job cache (the watch that triggers it), and from the API only when the cache
//! lacks the Job of an admitted job, so a lagging cache never reads as "the Job is gone". Status
//! is written with a named field manager and only when it differs from what is there.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PropagationPolicy};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, predicates};
use kube::runtime::{WatchStreamExt, watcher};
use repobox_contract::JobStatus;
use repobox_contract::transitions::FinishOutcome;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::decide::job_builder;
use crate::decide::retry::{self, AfterDisruption};
use crate::decide::scheduling::{self, PodEvent, Waiting};
use crate::decide::status::{self, Explained, Extras, JobState};
use crate::error::{Category, is_not_found};
use crate::model::crd::{RepoboxJob, RepoboxJobPhase, reasons};
use crate::model::labels::{FINALIZER, MANAGED_BY_SELECTOR};
use crate::run::context::{CachedJob, Context, LIST_PAGE, event, now};
use crate::{Error, Result};
use repobox_contract::transitions::RetryOutcome;

/// How long a new Job's pod may take to start before the RepoboxJob shows `Starting`.
const STARTING_DEBOUNCE: Duration = Duration::from_secs(2);

/// How often a pod waiting for a node is looked at again.
const WAITING_RECHECK: Duration = Duration::from_secs(10);

/// Reconciles running at once.
const RECONCILE_CONCURRENCY: u16 = 16;
/// Reconciles one RepoboxJob behind the finalizer.
pub async fn reconcile(rj: Arc<RepoboxJob>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let api = ctx.rj_api();
    finalizer(&api, FINALIZER, rj, |ev| async {
        match ev {
            Finalizer::Apply(rj) => apply(&rj, &ctx).await,
            Finalizer::Cleanup(rj) => cleanup(&rj, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    })
}

async fn apply(rj: &RepoboxJob, ctx: &Context) -> Result<Action> {
    let phase = rj.phase();
    if phase.is_terminal() {
        return retention(rj, ctx).await;
    }
    if rj.spec.cancel_requested() {
        return cancel(rj, ctx, "cancelled: spec.cancel was set")
            .await
            .map(|_| Action::requeue(ctx.cfg.retention()));
    }
    let name = current_job_name(rj);
    let job = match ctx.jobs.get(&ObjectRef::new(&name).within(&ctx.namespace)) {
        Some(job) => Some(job),
        // Whether a queued job's Job exists is the admission loop's business (its overlay and
        // AlreadyExists cover a lagging cache): nothing to ask the API.
        None if phase == RepoboxJobPhase::Queued => None,
        // An admitted job: confirm with the API before calling its Job gone.
        None => ctx.cached_job_api().get_opt(&name).await?.map(Arc::new),
    };
    match (phase, job) {
        (RepoboxJobPhase::Queued, None) => {
            ctx.dispatch.poke();
            Ok(Action::await_change())
        }
        (_, Some(job)) => observe(rj, &job, ctx).await,
        (_, None) if awaits_next_attempt(rj) => start_next_attempt(rj, ctx).await,
        (_, None) => job_missing(rj, ctx).await,
    }
}

/// The Job of the attempt the RepoboxJob is at.
fn current_job_name(rj: &RepoboxJob) -> String {
    job_builder::job_name(&rj.name_any(), job_builder::attempt(rj))
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
async fn start_next_attempt(rj: &RepoboxJob, ctx: &Context) -> Result<Action> {
    let due = rj
        .status
        .as_ref()
        .and_then(|s| s.next_attempt_time.as_ref())
        .map(|t| t.0);
    let wait = due
        .map(|due| due.duration_since(jiff::Timestamp::now()))
        .filter(|d| d.is_positive())
        .map(|d| d.unsigned_abs())
        .unwrap_or_default();
    if !wait.is_zero() {
        return Ok(Action::requeue(wait));
    }
    ctx.create_job(rj).await?;
    info!(job = %rj.name_any(), attempt = job_builder::attempt(rj), "next attempt's Job created");
    // Its watch event brings the next reconcile; the requeue is a safety net.
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Follows the Job of an admitted RepoboxJob.
async fn observe(rj: &RepoboxJob, job: &CachedJob, ctx: &Context) -> Result<Action> {
    let name = job.name_any();
    let extras = || Extras {
        job_name: Some(name.clone()),
        start_time: job.metadata.creation_timestamp.clone(),
        ..Default::default()
    };
    match status::job_state_of(job.status.as_ref()) {
        // Phases never go backwards (see `status::progress_phase`).
        ref state @ (JobState::Pending | JobState::Running)
            if status::progress_phase(rj.phase(), state).is_none() =>
        {
            Ok(Action::await_change())
        }
        JobState::Pending => {
            let pending = job
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| jiff::Timestamp::now().duration_since(t.0).unsigned_abs())
                .unwrap_or_default();
            // Most pods start within moments: only a pod still pending after a short debounce
            // gets its own `Starting` write (one API write per job saved on the happy path).
            if rj.phase() == RepoboxJobPhase::Queued && pending < STARTING_DEBOUNCE {
                return Ok(Action::requeue(STARTING_DEBOUNCE - pending));
            }
            // Why the pod is not running: waiting for a node the autoscaler adds, or for none.
            let pod = first_pod(ctx, &name).await?;
            let facts = pod.as_ref().map(status::pod_facts);
            let waiting = match (
                &pod,
                facts.as_ref().and_then(|f| f.unschedulable.as_deref()),
            ) {
                (Some(pod), Some(unschedulable)) => {
                    let events = pod_events(ctx, pod).await;
                    scheduling::waiting(Some(unschedulable), &events)
                }
                _ => Waiting::NotForNode,
            };
            if let Some(error) =
                waiting.give_up(jiff::Timestamp::now(), ctx.cfg.unschedulable_grace())
            {
                delete_job(ctx, &name).await?;
                return ctx
                    .finish(
                        rj,
                        RepoboxJobPhase::Failed,
                        reasons::UNSCHEDULABLE,
                        &error,
                        extras(),
                        Some(&error),
                    )
                    .await;
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
                &now(),
            );
            if ctx.write_status(rj, desired).await? && waiting.reason().is_some() {
                ctx.publish(rj, event(EventType::Normal, reason, message, "Schedule"))
                    .await;
            }
            let limit = ctx.cfg.pending_timeout();
            if pending >= limit {
                let Explained { reason, error } =
                    status::explain_pending(limit.as_secs(), facts.as_ref());
                delete_job(ctx, &name).await?;
                return ctx
                    .finish(
                        rj,
                        RepoboxJobPhase::Failed,
                        reason,
                        &error,
                        extras(),
                        Some(&error),
                    )
                    .await;
            }
            // A pod waiting for a node is looked at again soon: the autoscaler's word changes.
            let recheck = if waiting == Waiting::NotForNode {
                Duration::from_secs(60)
            } else {
                WAITING_RECHECK
            };
            Ok(Action::requeue((limit - pending).min(recheck)))
        }
        JobState::Running => {
            let desired = status::with_phase(
                rj,
                RepoboxJobPhase::Running,
                reasons::POD_RUNNING,
                "the runner is running",
                extras(),
                &now(),
            );
            if ctx.write_status(rj, desired).await? {
                ctx.publish(
                    rj,
                    event(
                        EventType::Normal,
                        reasons::POD_RUNNING,
                        "the runner pod is running",
                        "Run",
                    ),
                )
                .await;
                // Once per attempt: how long the pod waited for a node, then to start.
                if let Some(pod) = first_pod(ctx, &name).await? {
                    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
                    let (scheduling, startup) =
                        status::start_times(&pod, created, jiff::Timestamp::now());
                    if let Some(d) = scheduling {
                        ctx.metrics.pod_scheduled(d);
                    }
                    if let Some(d) = startup {
                        ctx.metrics.pod_started(d);
                    }
                }
            }
            Ok(Action::await_change())
        }
        JobState::Succeeded => adopt_record(rj, ctx, None).await,
        JobState::Failed { reason, message } => {
            adopt_record(rj, ctx, Some((reason, message))).await
        }
    }
}

/// The Job ended: take the outcome the executor recorded, or record the one it could not.
async fn adopt_record(
    rj: &RepoboxJob,
    ctx: &Context,
    job_failure: Option<(String, String)>,
) -> Result<Action> {
    let name = current_job_name(rj);
    let record = ctx.outcomes.record(&rj.spec.job_id).await?;
    let recorded_step = record.as_ref().and_then(|r| r.step.clone());
    let mut extras = Extras {
        job_name: Some(name.clone()),
        ..Default::default()
    };
    match record.as_ref().map(|r| r.status) {
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
            ctx.finish(
                rj,
                RepoboxJobPhase::Succeeded,
                reasons::SUCCEEDED,
                &message,
                extras,
                None,
            )
            .await
        }
        Some(JobStatus::Failed) => {
            let error = record
                .and_then(|r| r.error)
                .unwrap_or_else(|| "the job failed".into());
            ctx.finish(
                rj,
                RepoboxJobPhase::Failed,
                reasons::JOB_FAILED,
                &error,
                extras,
                None,
            )
            .await
        }
        Some(JobStatus::Cancelled) => {
            let why = record
                .and_then(|r| r.error)
                .unwrap_or_else(|| "cancelled".into());
            ctx.finish(
                rj,
                RepoboxJobPhase::Cancelled,
                reasons::CANCELLED,
                &why,
                extras,
                None,
            )
            .await
        }
        None => {
            let error = "the job record disappeared from Redis before the job finished";
            ctx.finish(
                rj,
                RepoboxJobPhase::Failed,
                reasons::JOB_FAILED,
                error,
                extras,
                None,
            )
            .await
        }
        // The executor did not record an outcome: the pod was killed or never ran the job.
        Some(JobStatus::Pending | JobStatus::Running) => {
            let Explained { reason, error } = match &job_failure {
                Some((job_reason, job_message)) => {
                    let pod = first_pod(ctx, &name).await?;
                    let facts = pod.as_ref().map(status::pod_facts);
                    let timeout = job_builder::timeout_seconds(rj, &ctx.job_cfg);
                    let explained = status::explain_job_failure(
                        job_reason,
                        job_message,
                        timeout,
                        facts.as_ref(),
                    );
                    if explained.reason != reasons::EVICTED {
                        explained
                    } else {
                        // An infrastructure disruption: run again if that is safe.
                        let disruption = facts.as_ref().and_then(|f| f.disruption.as_deref());
                        let what = retry::describe(disruption);
                        match retry::after_disruption(
                            job_builder::attempt(rj),
                            ctx.cfg.retry_policy(),
                            recorded_step.as_deref(),
                            &what,
                        ) {
                            AfterDisruption::Fail(e) => e,
                            AfterDisruption::Retry {
                                attempt,
                                delay,
                                message,
                            } => {
                                let kind = retry::kind(disruption);
                                return schedule_retry(rj, ctx, attempt, delay, &message, kind)
                                    .await;
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
            match ctx.outcomes.fail(&rj.spec.job_id, &error).await? {
                FinishOutcome::AlreadyTerminal(_) => {
                    Box::pin(adopt_record(rj, ctx, job_failure)).await
                }
                _ => {
                    ctx.finish(rj, RepoboxJobPhase::Failed, reason, &error, extras, None)
                        .await
                }
            }
        }
    }
}

/// Moves the job to its next attempt: Redis first (the attempt a runner may start, the note in
/// the output), then the status with the time the new Job is due. Repeating it is harmless.
async fn schedule_retry(
    rj: &RepoboxJob,
    ctx: &Context,
    attempt: u32,
    delay: Duration,
    message: &str,
    kind: &'static str,
) -> Result<Action> {
    let note = format!("==> {message}");
    match ctx.outcomes.retry(&rj.spec.job_id, attempt, &note).await? {
        RetryOutcome::Retrying | RetryOutcome::AlreadyAt(_) => {}
        // The runner recorded its result before it was stopped (or the record went): that
        // decides, as for any ended Job.
        RetryOutcome::AlreadyTerminal(_) | RetryOutcome::Missing => {
            return Box::pin(adopt_record(rj, ctx, None)).await;
        }
    }
    let due = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::try_from(delay).unwrap_or_default())
        .unwrap_or_else(|_| jiff::Timestamp::now());
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
        &now(),
    );
    if ctx.write_status(rj, desired).await? {
        ctx.metrics.job_retried(kind);
        warn!(job = %rj.name_any(), attempt, kind, "runner pod disrupted; running the job again");
        ctx.publish(
            rj,
            event(EventType::Warning, reasons::RETRYING, message, "Retry"),
        )
        .await;
    }
    Ok(Action::requeue(delay))
}

/// An admitted RepoboxJob whose Job is gone (deleted by hand, or by TTL before we saw it end).
async fn job_missing(rj: &RepoboxJob, ctx: &Context) -> Result<Action> {
    match ctx
        .outcomes
        .record(&rj.spec.job_id)
        .await?
        .map(|r| r.status)
    {
        Some(s) if s.is_terminal() => adopt_record(rj, ctx, None).await,
        _ => {
            let error = "the Job was deleted before the job finished";
            let extras = Extras {
                job_name: Some(rj.name_any()),
                ..Default::default()
            };
            ctx.finish(
                rj,
                RepoboxJobPhase::Failed,
                reasons::JOB_MISSING,
                error,
                extras,
                Some(error),
            )
            .await
        }
    }
}

/// Stops the job and records `cancelled` (status, Redis, event); frees the slot at once.
async fn cancel(rj: &RepoboxJob, ctx: &Context, why: &str) -> Result<Action> {
    delete_job(ctx, &current_job_name(rj)).await?;
    ctx.finish(
        rj,
        RepoboxJobPhase::Cancelled,
        reasons::CANCELLED,
        why,
        Extras::default(),
        Some(why),
    )
    .await
}

/// The RepoboxJob is being deleted: an unfinished job is cancelled first.
async fn cleanup(rj: &RepoboxJob, ctx: &Context) -> Result<Action> {
    if !rj.phase().is_terminal() {
        let why = "cancelled: the RepoboxJob was deleted";
        delete_job(ctx, &current_job_name(rj)).await?;
        ctx.outcomes.cancel(&rj.spec.job_id, why).await?;
        ctx.outcomes.expire_output(&rj.spec.job_id).await;
        ctx.metrics.job_finished("cancelled");
        info!(job = %rj.name_any(), "job cancelled by deletion");
    }
    ctx.dispatch.poke();
    Ok(Action::await_change())
}

/// Finished RepoboxJobs are deleted after the retention period.
async fn retention(rj: &RepoboxJob, ctx: &Context) -> Result<Action> {
    let finished = rj
        .status
        .as_ref()
        .and_then(|s| s.completion_time.as_ref())
        .map(|t| t.0);
    let Some(finished) = finished else {
        return Ok(Action::await_change());
    };
    let age = jiff::Timestamp::now()
        .duration_since(finished)
        .unsigned_abs();
    let keep = ctx.cfg.retention();
    if age >= keep {
        info!(job = %rj.name_any(), "retention period over; deleting the RepoboxJob");
        // A line pushed after the job was seen finished may have created the list anew.
        ctx.outcomes.expire_output(&rj.spec.job_id).await;
        match ctx
            .rj_api()
            .delete(&rj.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(keep - age))
}

/// Deletes the Job and, with background propagation, its pod (batch/v1 Jobs would otherwise
/// orphan their pods). A missing Job is fine.
async fn delete_job(ctx: &Context, name: &str) -> Result<()> {
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    match ctx.job_api().delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The Events on a pod (the scheduler's and the cluster autoscaler's), to explain a long wait.
/// Reading them is best effort: without them (e.g. RBAC without `list` on events) the pod's
/// condition still explains the wait, and the pending timeout still applies.
async fn pod_events(ctx: &Context, pod: &Pod) -> Vec<PodEvent> {
    let events: Api<CoreEvent> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut selector = format!(
        "involvedObject.kind=Pod,involvedObject.name={}",
        pod.name_any()
    );
    if let Some(uid) = pod.uid() {
        selector.push_str(&format!(",involvedObject.uid={uid}"));
    }
    match events.list(&ListParams::default().fields(&selector)).await {
        Ok(list) => list.items.iter().map(PodEvent::from_event).collect(),
        Err(e) => {
            warn!(pod = %pod.name_any(), error = %e, "reading the pod's events failed");
            Vec::new()
        }
    }
}

/// The (first) pod of a Job, to explain a failure or a long wait.
async fn first_pod(ctx: &Context, job_name: &str) -> Result<Option<Pod>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={job_name}")))
        .await?;
    Ok(list.items.into_iter().next())
}

/// Decides what a failed reconcile means, from [`Error::category`] alone: a permanent error
/// (the object can never be processed as it is) becomes a Warning Event on the RepoboxJob and
/// waits for the object to change; anything else requeues with per-object exponential backoff
/// (1 s … 5 min). Every failure is counted and logged.
pub fn error_policy(rj: Arc<RepoboxJob>, err: &Error, ctx: Arc<Context>) -> Action {
    let name = rj.name_any();
    ctx.metrics.reconcile_failed(err.metric_label());
    if err.category() == Category::Permanent {
        warn!(job = %name, error = %err, "reconcile failed permanently; waiting for a change");
        let note = err.to_string();
        let reason = err.metric_label();
        tokio::spawn(async move {
            ctx.publish(&rj, event(EventType::Warning, reason, &note, "Reconcile"))
                .await;
        });
        return Action::await_change();
    }
    let attempts = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(name.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let delay = backoff(attempts);
    warn!(job = %name, error = %err, attempts, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

/// 1 s after the first failure, doubling, at most 5 minutes.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << (attempts.clamp(1, 10) - 1)).min(Duration::from_secs(300))
}

/// Runs the controller until `shutdown` fires. Status-only changes (our own writes) are
/// filtered out by a generation predicate; deletion marks still pass.
pub async fn run(
    ctx: Arc<Context>,
    writer: reflector::store::Writer<RepoboxJob>,
    job_writer: reflector::store::Writer<CachedJob>,
    shutdown: CancellationToken,
) {
    let rj_api = ctx.rj_api();
    // Admission must not decide on a partial view: it waits for the initial list (and for
    // every relist after a watch error) to be complete.
    let on_init = ctx.clone();
    let deletion: fn(&RepoboxJob) -> Option<u64> =
        |rj| rj.metadata.deletion_timestamp.as_ref().map(|_| 1u64);
    let stream = watcher(rj_api, watcher::Config::default().page_size(LIST_PAGE))
        .default_backoff()
        // The cache holds every RepoboxJob (finished ones for the retention period):
        // managedFields are never read, so they are not kept.
        // Nor labels and annotations: the operator derives everything from spec and status.
        .modify(|rj| {
            rj.managed_fields_mut().clear();
            rj.metadata.labels = None;
            rj.metadata.annotations = None;
        })
        .reflect(writer)
        .inspect(move |ev| match ev {
            Ok(watcher::Event::InitDone) => {
                on_init.synced.store(true, Ordering::Relaxed);
                on_init.health.set_cache_synced(true);
                on_init.dispatch.poke();
            }
            // A new queued job wakes admission straight from the watch, not after its turn in
            // the reconcile queue (which a burst makes long).
            Ok(watcher::Event::Apply(rj))
                if rj.phase() == RepoboxJobPhase::Queued
                    && rj.metadata.deletion_timestamp.is_none() =>
            {
                on_init.dispatch.poke();
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(
            (predicates::generation as fn(&RepoboxJob) -> Option<u64>)
                .combine(deletion)
                .combine(predicates::finalizers as fn(&RepoboxJob) -> Option<u64>),
            Default::default(),
        );
    // The Jobs' watch fills the Job cache before it triggers their owners' reconciles, so a
    // reconcile sees at least the change that triggered it.
    let jobs = watcher(
        ctx.cached_job_api(),
        watcher::Config::default()
            .labels(MANAGED_BY_SELECTOR)
            .page_size(LIST_PAGE),
    )
    .default_backoff()
    .modify(|job| {
        job.metadata.managed_fields = None;
        job.metadata.annotations = None;
        job.metadata.labels = None;
    })
    .reflect(job_writer)
    .touched_objects();
    let stop = shutdown.clone();
    // Bounded concurrency: a restart with thousands of cached jobs must not start thousands
    // of reconciles (and API calls) at once.
    Controller::for_stream(stream, ctx.store.clone())
        .with_config(controller::Config::default().concurrency(RECONCILE_CONCURRENCY))
        .owns_stream(jobs)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            let ctx = ctx.clone();
            async move {
                match result {
                    Ok((obj, _)) => {
                        if let Ok(mut f) = ctx.failures.lock() {
                            f.remove(&obj.name);
                        }
                        tracing::debug!(job = %obj.name, "reconciled");
                    }
                    Err(e) => warn!(error = %e, "controller error"),
                }
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes() {
        let secs: Vec<u64> = (0..12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }
}
