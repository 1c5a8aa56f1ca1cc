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
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, predicates};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::decide::job_builder;
use crate::decide::plan::{self, JobFacts, Need, Observed, Plan, Settings, Then};
use crate::decide::scheduling::PodEvent;
use crate::decide::status;
use crate::error::Category;
use crate::model::crd::{RepoboxJob, RepoboxJobPhase};
use crate::model::labels::{FINALIZER, MANAGED_BY_SELECTOR};
use crate::run::context::{CachedJob, Context, Executed, LIST_PAGE, event};
use crate::{Error, Result};

/// Reconciles running at once.
const RECONCILE_CONCURRENCY: u16 = 16;

/// Plans per reconcile before giving up for now: each gathers one fact or re-reads the record
/// after a race with the runner, so a handful is plenty.
const MAX_PLANS: usize = 8;

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

/// Plans and executes until the plan is carried out (see [`plan`] for the decisions).
async fn apply(rj: &RepoboxJob, ctx: &Context) -> Result<Action> {
    let settings = settings(rj, ctx);
    let mut obs = Observed {
        admissions_waiting: ctx.dispatch.admissions_waiting(),
        ..Observed::default()
    };
    let mut pod = None;
    for _ in 0..MAX_PLANS {
        match plan::plan(rj, &obs, &settings, jiff::Timestamp::now()) {
            Plan::Need(need) => gather(need, rj, ctx, &mut obs, &mut pod).await?,
            Plan::Act(steps, then) => {
                if ctx.execute(rj, steps).await? == Executed::Replan {
                    // The runner ended the job first: adopt what it recorded.
                    obs.record = None;
                    obs.retry_refused = true;
                    continue;
                }
                return Ok(match then {
                    Then::AwaitChange => Action::await_change(),
                    Then::Requeue(d) => Action::requeue(d),
                });
            }
        }
    }
    warn!(job = %rj.name_any(), "no settled plan after {MAX_PLANS} rounds; trying again shortly");
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// The decisions' settings for `rj`.
fn settings(rj: &RepoboxJob, ctx: &Context) -> Settings {
    Settings {
        pending_timeout: ctx.cfg.pending_timeout(),
        unschedulable_grace: ctx.cfg.unschedulable_grace(),
        retention: ctx.cfg.retention(),
        retry: ctx.cfg.retry_policy(),
        timeout_seconds: job_builder::timeout_seconds(rj, &ctx.job_cfg),
    }
}

fn job_facts(job: &CachedJob) -> JobFacts {
    JobFacts {
        name: job.name_any(),
        created: job.metadata.creation_timestamp.clone(),
        state: status::job_state_of(job.status.as_ref()),
    }
}

/// Fetches the fact a plan asked for.
async fn gather(
    need: Need,
    rj: &RepoboxJob,
    ctx: &Context,
    obs: &mut Observed,
    pod: &mut Option<Pod>,
) -> Result<()> {
    let name = plan::current_job_name(rj);
    match need {
        Need::CachedJob => {
            let cached = ctx.jobs.get(&ObjectRef::new(&name).within(&ctx.namespace));
            obs.cached_job = Some(cached.as_deref().map(job_facts));
        }
        Need::ApiJob => {
            let job = ctx.cached_job_api().get_opt(&name).await?;
            obs.api_job = Some(job.as_ref().map(job_facts));
        }
        Need::Pod => {
            *pod = ctx.first_pod(&name).await?;
            obs.pod = Some(pod.as_ref().map(status::pod_facts));
        }
        Need::PodEvents => {
            obs.pod_events = Some(match pod.as_ref() {
                Some(pod) => pod_events(ctx, pod).await,
                None => Vec::new(),
            });
        }
        Need::Record => obs.record = Some(ctx.outcomes.record(&rj.spec.job_id).await?),
    }
    Ok(())
}

/// The RepoboxJob is being deleted: an unfinished job is cancelled first.
async fn cleanup(rj: &RepoboxJob, ctx: &Context) -> Result<Action> {
    ctx.execute(rj, plan::plan_cleanup(rj)).await?;
    Ok(Action::await_change())
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
    // From the watch cache, as `Context::first_pod`: an etcd read of every Event of the
    // namespace would cost far more than a slightly older view of them.
    match events
        .list(&ListParams::default().fields(&selector).match_any())
        .await
    {
        Ok(list) => list.items.iter().map(PodEvent::from_event).collect(),
        Err(e) => {
            warn!(pod = %pod.name_any(), error = %e, "reading the pod's events failed");
            Vec::new()
        }
    }
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
        // See `RepoboxJob::trim_for_cache` for what the cache keeps.
        .modify(RepoboxJob::trim_for_cache)
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
    .modify(CachedJob::trim)
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
