//! What the loops share: the API clients, the caches, the Redis job records, metrics, events,
//! and the few writes more than one loop makes (the Job of an attempt, a status, a terminal
//! phase). The dispatcher is woken through [`Wakeup`], so this module does not depend on it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use repobox_contract::transitions::{FinishOutcome, RetryOutcome};
use serde_json::json;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tracing::{info, warn};

use crate::Result;
use crate::config::Config;
use crate::decide::job_builder;
use crate::decide::job_config::JobConfig;
use crate::decide::plan::{self, Announce, OnTerminal, Step};
use crate::decide::status::{self, Extras};
use crate::error::{is_conflict, is_not_found};
use crate::model::crd::{RepoboxJob, RepoboxJobPhase, RepoboxJobStatus};
use crate::model::labels::FIELD_MANAGER;
use crate::run::metrics::Metrics;
use crate::run::records::JobRecords;
use crate::run::server::Health;

/// Objects per page of the caches' initial lists (the default is 500): a page is held, as text
/// and decoded with its managed fields, until its objects are trimmed and cached, so smaller
/// pages lower the startup peak with thousands of objects.
pub const LIST_PAGE: u32 = 100;

/// Everything the reconciler and the admission loop share.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The operator's settings.
    pub cfg: Arc<Config>,
    /// The runner Jobs' settings, validated once.
    pub job_cfg: JobConfig,
    /// Where the RepoboxJobs and their Jobs live.
    pub namespace: String,
    /// The job records in Redis.
    pub outcomes: JobRecords,
    /// The RepoboxJob cache.
    pub store: Store<RepoboxJob>,
    /// The operator's Jobs, metadata and status only.
    pub jobs: Store<CachedJob>,
    /// Wakes the dispatcher (a slot may have freed up).
    pub dispatch: Wakeup,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Kubernetes Events on the RepoboxJobs.
    pub recorder: Recorder,
    /// Readiness and liveness, for the health server.
    pub health: Arc<Health>,
    /// Set once the RepoboxJob cache holds the initial list ([`Context::store_ready`]).
    pub synced: Arc<AtomicBool>,
    /// Consecutive failures per object, for the error policy's backoff.
    pub(crate) failures: std::sync::Mutex<HashMap<String, u32>>,
}

impl Context {
    /// The namespace comes from `cfg`; [`Context::store_ready`] stays false until the cache syncs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        cfg: Arc<Config>,
        job_cfg: JobConfig,
        outcomes: JobRecords,
        store: Store<RepoboxJob>,
        jobs: Store<CachedJob>,
        dispatch: Wakeup,
        metrics: Arc<Metrics>,
        recorder: Recorder,
        health: Arc<Health>,
    ) -> Self {
        let namespace = cfg.jobs_namespace().to_owned();
        Self {
            client,
            cfg,
            job_cfg,
            namespace,
            outcomes,
            store,
            jobs,
            dispatch,
            metrics,
            recorder,
            health,
            synced: Arc::new(AtomicBool::new(false)),
            failures: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Whether the cache holds the initial list (admission must not decide on a partial view).
    pub fn store_ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub(crate) fn rj_api(&self) -> Api<RepoboxJob> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub(crate) fn job_api(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates the Job of the current attempt at `rj` (idempotent: AlreadyExists is success):
    /// the admission loop for a first attempt, the reconciler for the next ones.
    pub async fn create_job(&self, rj: &RepoboxJob) -> Result<()> {
        let job = job_builder::job_for(rj, &self.job_cfg)?;
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match self.job_api().create(&params, &job).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn cached_job_api(&self) -> Api<CachedJob> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Publishes an event on the RepoboxJob; failures are logged, never fatal.
    pub async fn publish(&self, rj: &RepoboxJob, ev: Event) {
        if let Err(e) = self.recorder.publish(&ev, &rj.object_ref(&())).await {
            warn!(job = %rj.name_any(), error = %e, "publishing an event failed");
        }
    }

    /// Writes `status` when it differs from the RepoboxJob's current one.
    async fn write_status(&self, rj: &RepoboxJob, status: RepoboxJobStatus) -> Result<bool> {
        if rj.status.as_ref() == Some(&status) {
            return Ok(false);
        }
        let patch = json!({
            "apiVersion": RepoboxJob::api_version(&()),
            "kind": RepoboxJob::kind(&()),
            "status": status,
        });
        self.rj_api()
            .patch_status(
                &rj.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        Ok(true)
    }

    /// Writes a `Queued` status with its waiting reason (from the admission loop).
    pub async fn ensure_queued(&self, rj: &RepoboxJob, reason: &str, message: &str) -> Result<()> {
        let steps = plan::queued(rj, reason, message, jiff::Timestamp::now());
        self.execute(rj, steps).await.map(drop)
    }

    /// Ends a job that can never run (e.g. an invalid spec): status, Redis, event.
    pub async fn fail_permanently(&self, rj: &RepoboxJob, reason: &str, message: &str) {
        let steps = plan::finish(
            rj,
            RepoboxJobPhase::Failed,
            reason,
            message,
            Extras::default(),
            Some(message),
            jiff::Timestamp::now(),
        );
        if let Err(e) = self.execute(rj, steps).await {
            warn!(job = %rj.name_any(), error = %e, "recording a permanent failure failed");
        }
    }
}

/// What [`Context::execute`] ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Executed {
    /// Every step was carried out.
    Done,
    /// A Redis write found the job already ended by the runner: plan again.
    Replan,
}

impl Context {
    /// Carries out a plan's steps in order.
    pub async fn execute(&self, rj: &RepoboxJob, steps: Vec<Step>) -> Result<Executed> {
        let job_id = &rj.spec.job_id;
        for step in steps {
            match step {
                Step::PokeDispatcher => self.dispatch.poke(),
                Step::CreateJob => {
                    self.create_job(rj).await?;
                    info!(job = %rj.name_any(), attempt = job_builder::attempt(rj), "next attempt's Job created");
                }
                Step::DeleteJob(name) => self.delete_job(&name).await?,
                Step::DeleteRepoboxJob => {
                    info!(job = %rj.name_any(), "retention period over; deleting the RepoboxJob");
                    match self
                        .rj_api()
                        .delete(&rj.name_any(), &DeleteParams::background())
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Step::RecordEnd {
                    phase,
                    error,
                    on_terminal,
                } => {
                    let outcome = if phase == RepoboxJobPhase::Cancelled {
                        self.outcomes.cancel(job_id, &error).await?
                    } else {
                        self.outcomes.fail(job_id, &error).await?
                    };
                    if let FinishOutcome::AlreadyTerminal(s) = outcome {
                        if on_terminal == OnTerminal::Replan {
                            return Ok(Executed::Replan);
                        }
                        info!(job = %rj.name_any(), status = %s, "job record had already ended; keeping it");
                    }
                }
                Step::RecordRetry { attempt, note } => {
                    match self.outcomes.retry(job_id, attempt, &note).await? {
                        RetryOutcome::Retrying | RetryOutcome::AlreadyAt(_) => {}
                        // The runner recorded its result before it was stopped (or the record
                        // went): that decides, as for any ended Job.
                        RetryOutcome::AlreadyTerminal(_) | RetryOutcome::Missing => {
                            return Ok(Executed::Replan);
                        }
                    }
                }
                Step::ExpireOutput => self.outcomes.expire_output(job_id).await,
                Step::WriteStatus { status, if_changed } => {
                    if self.write_status(rj, *status).await? {
                        for a in if_changed {
                            self.announce(rj, a).await?;
                        }
                    }
                }
                Step::Announce(a) => self.announce(rj, a).await?,
            }
        }
        Ok(Executed::Done)
    }

    /// Tells what happened: an Event, a metric, a log line.
    async fn announce(&self, rj: &RepoboxJob, a: Announce) -> Result<()> {
        match a {
            Announce::Event {
                type_,
                reason,
                note,
                action,
            } => {
                self.publish(rj, event(type_, &reason, &note, action)).await;
            }
            Announce::Finished { phase, reason } => {
                self.metrics.job_finished(match phase {
                    RepoboxJobPhase::Succeeded => "succeeded",
                    RepoboxJobPhase::Cancelled => "cancelled",
                    _ => "failed",
                });
                info!(job = %rj.name_any(), user = %rj.spec.user_id, phase = %phase, %reason, "job finished");
            }
            Announce::Retried { attempt, kind } => {
                self.metrics.job_retried(kind);
                warn!(job = %rj.name_any(), attempt, kind, "runner pod disrupted; running the job again");
            }
            // Once per attempt: how long the pod waited for a node, then to start.
            Announce::StartTimes { job_name, created } => {
                if let Some(pod) = self.first_pod(&job_name).await? {
                    let (scheduling, startup) =
                        status::start_times(&pod, created.map(|t| t.0), jiff::Timestamp::now());
                    if let Some(d) = scheduling {
                        self.metrics.pod_scheduled(d);
                    }
                    if let Some(d) = startup {
                        self.metrics.pod_started(d);
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes the Job and, with background propagation, its pod (batch/v1 Jobs would otherwise
    /// orphan their pods). A missing Job is fine.
    pub async fn delete_job(&self, name: &str) -> Result<()> {
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..Default::default()
        };
        match self.job_api().delete(name, &params).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The (first) pod of a Job, to explain a failure or a long wait.
    pub async fn first_pod(&self, job_name: &str) -> Result<Option<Pod>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        // From the API server's watch cache (`resourceVersion=0`), not a quorum read of every pod
        // of the namespace from etcd: anything a watch has shown us is already in that cache.
        let params = ListParams::default()
            .labels(&format!("job-name={job_name}"))
            .match_any();
        let list = pods.list(&params).await?;
        Ok(list.items.into_iter().next())
    }
}

/// A Job as the Job cache keeps it: metadata and status. The reconciler never reads a Job's
/// spec, and `k8s_openapi`'s `Job` takes 2.5 KiB before anything is filled in (the pod template
/// is inline), so the cache decodes only these two parts. Read the `Job` from the API when more
/// is needed.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct CachedJob {
    /// The Job's metadata.
    pub metadata: ObjectMeta,
    /// The Job's status (conditions, counts, times).
    pub status: Option<k8s_openapi::api::batch::v1::JobStatus>,
}

impl CachedJob {
    /// Keeps what is read of a Job: its name and namespace (the cache's key), creation time
    /// (how long its pod waited), owner references (which RepoboxJob a Job event wakes) and
    /// status. Labels, annotations, managed fields, uid, resourceVersion and generation are
    /// never read from the cache (deletes go by name), and with 10,000 Jobs cached they cost
    /// megabytes.
    pub fn trim(&mut self) {
        let m = &mut self.metadata;
        m.managed_fields = None;
        m.annotations = None;
        m.labels = None;
        m.uid = None;
        m.resource_version = None;
        m.generation = None;
    }
}

impl Resource for CachedJob {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Job::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        Job::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        Job::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        Job::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The handle between the dispatcher and the rest: wakes it for a pass soon (many wakes before
/// the pass runs coalesce into one), and says whether jobs wait for a create slot, their
/// RepoboxJob's in the intake or their Job's in the dispatcher (a burst: informational writes
/// then wait, see `plan::ADMISSIONS_FIRST_RETRY`).
#[derive(Clone)]
pub struct Wakeup {
    notify: Arc<Notify>,
    /// Jobs waiting for a create slot (intake or dispatcher).
    backlog: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Default for Wakeup {
    fn default() -> Self {
        Self {
            notify: Arc::default(),
            backlog: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

/// Counts one job as waiting for a create slot while it lives.
struct Waiting(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Waiting {
    fn drop(&mut self) {
        change_backlog(&self.0, |n| n.saturating_sub(1));
    }
}

/// Sets the backlog to `change(count)`, telling its waiters only when that empties or fills
/// it (see [`emptiness_changed`]).
fn change_backlog(
    backlog: &tokio::sync::watch::Sender<usize>,
    change: impl FnOnce(usize) -> usize,
) {
    backlog.send_if_modified(|n| {
        let before = *n;
        *n = change(before);
        emptiness_changed(before, *n)
    });
}

/// Whether a change of the backlog from `before` to `after` is one its waiters need to hear
/// about: only [`Wakeup::admissions_drained`] waits on it, for "none waits". In a burst
/// thousands of slot grants and releases would otherwise wake every admitted job's waiting
/// Event task each time (a profile showed those wake-ups at several per cent of the CPU).
fn emptiness_changed(before: usize, after: usize) -> bool {
    (before == 0) != (after == 0)
}

impl Wakeup {
    /// Asks for a dispatcher pass.
    pub fn poke(&self) {
        self.notify.notify_one();
    }

    /// Resolves at the next poke (or at once if one is pending).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Marks a job as waiting for a create slot until the guard is dropped.
    fn waiting_for_slot(&self) -> Waiting {
        change_backlog(&self.backlog, |n| n + 1);
        Waiting(Arc::clone(&self.backlog))
    }

    /// Takes a create slot from `slots` (the intake's or the dispatcher's), counted as waiting
    /// (see [`Wakeup::admissions_waiting`]) until it is granted; `None` only if `slots` was
    /// closed.
    pub async fn create_slot<'a>(&self, slots: &'a Semaphore) -> Option<SemaphorePermit<'a>> {
        let _waiting = self.waiting_for_slot();
        slots.acquire().await.ok()
    }

    /// Whether jobs wait for a create slot now.
    pub fn admissions_waiting(&self) -> bool {
        *self.backlog.borrow() > 0
    }

    /// Resolves once no job waits for a create slot.
    pub async fn admissions_drained(&self) {
        let mut rx = self.backlog.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// An Event on a RepoboxJob; the note is bounded as the API server requires.
pub fn event(type_: EventType, reason: &str, note: &str, action: &str) -> Event {
    Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_owned(),
        secondary: None,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

    use super::*;

    #[test]
    fn backlog_waiters_hear_only_when_it_empties_or_fills() {
        let wakeup = Wakeup::default();
        let mut rx = wakeup.backlog.subscribe();
        let a = wakeup.waiting_for_slot();
        assert!(rx.has_changed().expect("open"), "0 → 1 is news");
        rx.mark_unchanged();
        let b = wakeup.waiting_for_slot();
        drop(a);
        assert!(!rx.has_changed().expect("open"), "1 → 2 → 1 is not");
        assert_eq!(*rx.borrow(), 1, "the count itself is kept");
        drop(b);
        assert!(rx.has_changed().expect("open"), "1 → 0 is news");
        assert_eq!(*rx.borrow_and_update(), 0);
        assert!(emptiness_changed(0, 1) && emptiness_changed(1, 0));
        assert!(!emptiness_changed(1, 2) && !emptiness_changed(2, 1) && !emptiness_changed(0, 0));
    }

    #[tokio::test]
    async fn the_backlog_counts_admitted_jobs_waiting_for_a_slot() {
        let wakeup = Wakeup::default();
        assert!(!wakeup.admissions_waiting());
        let (a, b) = (wakeup.waiting_for_slot(), wakeup.waiting_for_slot());
        assert!(wakeup.admissions_waiting());
        let drained = tokio::spawn({
            let wakeup = wakeup.clone();
            async move { wakeup.admissions_drained().await }
        });
        drop(a);
        assert!(wakeup.admissions_waiting(), "one still waits");
        tokio::task::yield_now().await;
        assert!(!drained.is_finished());
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), drained)
            .await
            .expect("resolved once none waits")
            .expect("the task ran");
        assert!(!wakeup.admissions_waiting());
    }

    #[test]
    fn the_job_cache_keeps_what_is_read() {
        let full = CachedJob {
            metadata: ObjectMeta {
                name: Some("job-1".into()),
                namespace: Some("jobs".into()),
                uid: Some("0f9e".into()),
                resource_version: Some("42".into()),
                generation: Some(1),
                creation_timestamp: Some(Time(jiff::Timestamp::UNIX_EPOCH)),
                labels: Some([("a".to_owned(), "b".to_owned())].into()),
                annotations: Some([("c".to_owned(), "d".to_owned())].into()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "repobox.dev/v1alpha1".into(),
                    kind: "RepoboxJob".into(),
                    name: "job-1".into(),
                    uid: "u-1".into(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..Default::default()
            },
            status: Some(k8s_openapi::api::batch::v1::JobStatus {
                ready: Some(1),
                ..Default::default()
            }),
        };
        let mut trimmed = full.clone();
        trimmed.trim();
        let (m, f) = (&trimmed.metadata, &full.metadata);
        assert_eq!((&m.name, &m.namespace), (&f.name, &f.namespace));
        assert_eq!(m.creation_timestamp, f.creation_timestamp);
        assert_eq!(m.owner_references, f.owner_references);
        assert_eq!(trimmed.status, full.status);
        assert_eq!(
            (&m.uid, &m.resource_version, m.generation),
            (&None, &None, None)
        );
        assert_eq!((&m.labels, &m.annotations), (&None, &None));
        // The cache's key is unchanged.
        assert_eq!(
            kube::runtime::reflector::ObjectRef::from_obj(&trimmed).name,
            "job-1"
        );
    }
}
