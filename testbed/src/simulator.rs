//! A cluster simulator for the API emulator: plays the Job controller for batch/v1 Jobs and runs
//! their pods on a [`Kubelet`] (all containers, init containers first).
//!
//! The emulator only stores objects; nothing would ever run a Job. This module watches Jobs,
//! creates their Pods bound to the kubelet's node (`spec.nodeName` set at creation), follows the
//! kubelet's events for each pod and writes Job status the way Kubernetes 1.31+ does
//! (`SuccessCriteriaMet`/`FailureTarget` first, then `Complete`/`Failed`). Running containers,
//! their env, volumes and pod status are the kubelet's job ([`crate::kubelet`]). Tests await
//! [`SimEvent`]s instead of sleeping.
//!
//! Deliberate simplifications (the real controllers do more): one pod at a time
//! (`parallelism`/`completions` are ignored), pods are kept (not deleted) after a deadline or a
//! backoff failure, and no pod finalizers are used. Containers run without isolation unless
//! [`SimulatorConfig::isolation`] is set (the tests hand host paths to their scripts).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::kubelet::{
    ContainerExit, Fault, Isolation, Kubelet, KubeletConfig, KubeletEvent, NodeSettings,
};

/// The kubelet's node, which the simulator binds its pods to.
pub const NODE_NAME: &str = "repobox-sim-node";

/// How the simulator behaves.
#[derive(Debug, Clone, Default)]
pub struct SimulatorConfig {
    /// Only Jobs in this namespace (None: all namespaces).
    pub namespace: Option<String>,
    /// Container command (or its file name, or the image) → local executable.
    /// E.g. `repobox-job-runner` → `target/debug/repobox-job-runner`, `fake-runner` → `/bin/sh`.
    pub binaries: HashMap<String, PathBuf>,
    /// Keep every pod `Pending` (unschedulable) and never run it.
    pub hold_pending: bool,
    /// Keep pods of Jobs carrying this label (key, value) `Pending`.
    pub hold_pending_label: Option<(String, String)>,
    /// Containers whose image contains this string never start: their pod stays `Pending`
    /// with the container waiting in `ErrImagePull`.
    pub image_pull_error: Option<String>,
    /// Cap on `terminationGracePeriodSeconds` (tests do not want to wait 30 s).
    pub max_grace_period: Option<Duration>,
    /// Extra environment for every process (e.g. `RUST_LOG`); the pod's env wins.
    pub extra_env: Vec<(String, String)>,
    /// Run containers isolated (own namespaces and root, runAsUser; root only), see
    /// [`crate::kubelet`]. Off: plain processes with mount paths remapped to host dirs.
    pub isolation: bool,
}

/// What a simulated pod failure looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodFailure {
    /// The container is killed by the OOM killer: exit code 137, reason `OOMKilled`.
    OomKilled,
    /// The pod is evicted through the Eviction API: SIGTERM, grace period, Pod `Failed` with
    /// condition `DisruptionTarget` reason `EvictionByEvictionAPI`.
    Evicted,
}

/// Things that happened, in order, for tests to await.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEvent {
    /// A Pod object was created for a Job.
    PodCreated {
        namespace: String,
        job: String,
        pod: String,
    },
    /// A pod is held `Pending` (hold knobs or image pull error).
    PodPending {
        namespace: String,
        job: String,
        pod: String,
        reason: String,
    },
    /// The pod's process started.
    PodStarted {
        namespace: String,
        job: String,
        pod: String,
        pid: u32,
    },
    /// SIGTERM was sent to the pod's process.
    Sigterm {
        namespace: String,
        job: String,
        pod: String,
    },
    /// The process ended: `code` (None when killed by a signal) and `signal`.
    PodExited {
        namespace: String,
        job: String,
        pod: String,
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The Job's `activeDeadlineSeconds` expired.
    DeadlineExceeded { namespace: String, job: String },
    /// The Job got its `Complete` condition.
    JobComplete { namespace: String, job: String },
    /// The Job got its `Failed` condition with this reason.
    JobFailed {
        namespace: String,
        job: String,
        reason: String,
    },
    /// The Job or its pod was deleted and the process stopped.
    Stopped {
        namespace: String,
        job: String,
        pod: String,
    },
    /// The Job was deleted but its pod was orphaned (no propagation policy): it keeps running,
    /// as on a real cluster.
    PodOrphaned {
        namespace: String,
        job: String,
        pod: String,
    },
    /// The simulator could not do something (bad command mapping, API error, ...).
    Error {
        namespace: String,
        job: String,
        message: String,
    },
}

impl SimEvent {
    /// The Job name this event is about.
    pub fn job(&self) -> &str {
        match self {
            SimEvent::PodCreated { job, .. }
            | SimEvent::PodPending { job, .. }
            | SimEvent::PodStarted { job, .. }
            | SimEvent::Sigterm { job, .. }
            | SimEvent::PodExited { job, .. }
            | SimEvent::DeadlineExceeded { job, .. }
            | SimEvent::JobComplete { job, .. }
            | SimEvent::JobFailed { job, .. }
            | SimEvent::Stopped { job, .. }
            | SimEvent::PodOrphaned { job, .. }
            | SimEvent::Error { job, .. } => job,
        }
    }
}

/// Why a running pod must stop.
#[derive(Debug, Clone, PartialEq)]
enum Stop {
    Deleted,
    Fail(PodFailure),
}

struct Run {
    job: String,
    pod: Option<String>,
    stop: mpsc::UnboundedSender<Stop>,
}

#[derive(Default)]
struct State {
    /// By Job uid.
    runs: HashMap<String, Run>,
    history: Vec<SimEvent>,
    /// The Jobs' tasks (aborted on shutdown).
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    client: Client,
    cfg: SimulatorConfig,
    state: Mutex<State>,
    events: broadcast::Sender<SimEvent>,
    kubelet: Kubelet,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: SimEvent) {
        tracing::debug!(?event, "simulator");
        let mut state = self.lock();
        state.history.push(event.clone());
        let _ = self.events.send(event);
    }
}

/// The running simulator; stops (killing its processes) on drop or [`ClusterSimulator::shutdown`].
pub struct ClusterSimulator {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl ClusterSimulator {
    /// Start watching Jobs and simulating them.
    pub async fn start(client: Client, cfg: SimulatorConfig) -> Result<Self> {
        let (events, _) = broadcast::channel(4096);
        let kubelet = Kubelet::start(
            client.clone(),
            KubeletConfig {
                nodes: vec![NodeSettings::new(NODE_NAME)],
                binaries: cfg.binaries.clone(),
                isolation: if cfg.isolation {
                    Isolation::Auto
                } else {
                    Isolation::Off
                },
                max_grace_period: cfg.max_grace_period,
                extra_env: cfg.extra_env.clone(),
                image_pull_error: cfg.image_pull_error.clone(),
                // The emulator has no node lifecycle controller: heartbeats would only add
                // Lease writes to the request log the benchmarks count.
                heartbeat_interval: Duration::from_secs(3600),
                ..KubeletConfig::default()
            },
        )
        .await
        .context("start the kubelet")?;
        let shared = Arc::new(Shared {
            client,
            cfg,
            state: Mutex::new(State::default()),
            events,
            kubelet,
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(main_loop(shared.clone(), stop_rx));
        Ok(ClusterSimulator { shared, task, stop })
    }

    /// A receiver of every future event.
    pub fn subscribe(&self) -> broadcast::Receiver<SimEvent> {
        self.shared.events.subscribe()
    }

    /// Every event so far.
    pub fn history(&self) -> Vec<SimEvent> {
        self.shared.lock().history.clone()
    }

    /// Wait (up to `timeout`) for an event matching `pred`, including ones already past.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&SimEvent) -> bool,
    ) -> Result<SimEvent> {
        let mut rx = {
            let state = self.shared.lock();
            if let Some(e) = state.history.iter().find(|e| pred(e)) {
                return Ok(e.clone());
            }
            // Subscribed under the lock: no event can slip between the check and the receiver.
            self.shared.events.subscribe()
        };
        tokio::time::timeout(timeout, async {
            loop {
                match rx.recv().await {
                    Ok(e) if pred(&e) => return Ok(e),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => bail!("simulator stopped"),
                }
            }
        })
        .await
        .map_err(|_| {
            anyhow!(
                "no matching simulator event within {timeout:?}; history: {:#?}",
                self.history()
            )
        })?
    }

    /// How many container processes have been started so far.
    pub fn processes_started(&self) -> usize {
        self.shared.kubelet.containers_started()
    }

    /// How many pods have started running so far (a pod runs several containers).
    pub fn pods_started(&self) -> usize {
        self.history()
            .iter()
            .filter(|e| matches!(e, SimEvent::PodStarted { .. }))
            .count()
    }

    /// Everything the pod's containers wrote to stdout and stderr so far.
    pub fn logs(&self, pod_name: &str) -> String {
        self.shared.kubelet.pod_logs(pod_name)
    }

    /// The kubelet running the pods (its events, per-container logs, isolation).
    pub fn kubelet(&self) -> &Kubelet {
        &self.shared.kubelet
    }

    /// The current pod of a Job (by Job name, any namespace).
    pub fn pod_of(&self, job_name: &str) -> Option<String> {
        self.shared
            .lock()
            .runs
            .values()
            .find(|r| r.job == job_name)
            .and_then(|r| r.pod.clone())
    }

    /// Make the Job's current pod fail like infrastructure would (OOM kill, eviction).
    pub fn fail_pod(&self, job_name: &str, failure: PodFailure) -> Result<()> {
        let state = self.shared.lock();
        let run = state
            .runs
            .values()
            .find(|r| r.job == job_name)
            .with_context(|| format!("no simulated Job {job_name}"))?;
        run.stop
            .send(Stop::Fail(failure))
            .map_err(|_| anyhow!("Job {job_name} is no longer running"))
    }

    /// Stop simulating and kill every process.
    pub async fn shutdown(self) {
        self.stop_all();
    }

    fn stop_all(&self) {
        let _ = self.stop.send(true);
        self.task.abort();
        let tasks: Vec<_> = {
            let mut state = self.shared.lock();
            state.runs.clear();
            state.tasks.drain(..).collect()
        };
        for t in tasks {
            t.abort();
        }
        self.shared.kubelet.stop();
    }
}

impl Drop for ClusterSimulator {
    fn drop(&mut self) {
        self.stop_all();
    }
}

async fn main_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let client = shared.client.clone();
    let (jobs, pods): (Api<Job>, Api<Pod>) = match &shared.cfg.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let job_events =
        watcher::watcher(jobs, watcher::Config::default()).map(|e| Either::Job(Box::new(e)));
    let pod_events = watcher::watcher(
        pods,
        watcher::Config::default().labels("batch.kubernetes.io/controller-uid"),
    )
    .map(|e| Either::Pod(Box::new(e)));
    let mut events = std::pin::pin!(futures::stream::select(job_events, pod_events));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            next = events.next() => match next {
                Some(Either::Job(e)) => match *e {
                    Ok(Event::Apply(job) | Event::InitApply(job)) => on_job(&shared, job),
                    Ok(Event::Delete(job)) => on_job_deleted(&shared, job).await,
                    Ok(_) => {}
                    Err(e) => watch_error(e).await,
                },
                Some(Either::Pod(e)) => match *e {
                    Ok(Event::Delete(pod)) => on_pod_gone(&shared, &pod),
                    Ok(Event::Apply(pod)) if pod.metadata.deletion_timestamp.is_some() => {
                        on_pod_gone(&shared, &pod)
                    }
                    Ok(_) => {}
                    Err(e) => watch_error(e).await,
                },
                None => break,
            },
        }
    }
    let runs: Vec<_> = shared.lock().runs.drain().collect();
    for (_, run) in runs {
        let _ = run.stop.send(Stop::Deleted);
    }
}

/// A failing watch is retried by the watcher itself; pause so a dead API is not hammered.
async fn watch_error(e: watcher::Error) {
    tracing::debug!(error = %e, "simulator watch error");
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Jobs and pods merged into one stream (boxed: the events are large).
enum Either {
    Job(Box<std::result::Result<Event<Job>, watcher::Error>>),
    Pod(Box<std::result::Result<Event<Pod>, watcher::Error>>),
}

fn is_terminal(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

fn on_job(shared: &Arc<Shared>, job: Job) {
    let Some(uid) = job.uid() else { return };
    if job.metadata.deletion_timestamp.is_some() {
        if let Some(run) = shared.lock().runs.get(&uid) {
            let _ = run.stop.send(Stop::Deleted);
        }
        return;
    }
    let mut state = shared.lock();
    if state.runs.contains_key(&uid) || is_terminal(&job) {
        return;
    }
    // A Job started by someone else (e.g. a previous simulator) is not ours to run.
    if job.status.as_ref().is_some_and(|s| s.start_time.is_some()) {
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    state.runs.insert(
        uid.clone(),
        Run {
            job: job.name_any(),
            pod: None,
            stop: tx,
        },
    );
    let task_shared = shared.clone();
    let task = tokio::spawn(async move {
        let shared = task_shared;
        let ns = job.namespace().unwrap_or_default();
        let name = job.name_any();
        if let Err(e) = run_job(&shared, &job, rx).await {
            shared.emit(SimEvent::Error {
                namespace: ns,
                job: name,
                message: format!("{e:#}"),
            });
        }
    });
    state.tasks.retain(|t| !t.is_finished());
    state.tasks.push(task);
}

async fn on_job_deleted(shared: &Arc<Shared>, job: Job) {
    let Some(uid) = job.uid() else { return };
    let (pod, stop) = {
        let state = shared.lock();
        match state.runs.get(&uid) {
            Some(run) => (run.pod.clone(), run.stop.clone()),
            None => return,
        }
    };
    let ns = job.namespace().unwrap_or_default();
    // The emulator's garbage collector runs before the DELETED event: the pod is either gone
    // (background propagation) or orphaned (batch/v1 default), as on a real cluster.
    if let Some(pod_name) = pod {
        let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
        if let Ok(Some(p)) = pods.get_opt(&pod_name).await
            && p.metadata.deletion_timestamp.is_none()
            && !p.owner_references().iter().any(|r| r.uid == uid)
        {
            shared.lock().runs.remove(&uid);
            shared.emit(SimEvent::PodOrphaned {
                namespace: ns,
                job: job.name_any(),
                pod: pod_name,
            });
            return;
        }
    }
    let _ = stop.send(Stop::Deleted);
}

fn on_pod_gone(shared: &Arc<Shared>, pod: &Pod) {
    let state = shared.lock();
    if let Some(run) = state
        .runs
        .values()
        .find(|r| r.pod.as_deref() == Some(pod.name_any().as_str()))
    {
        let _ = run.stop.send(Stop::Deleted);
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| jiff::Timestamp::now().to_string())
}

fn condition(type_: &str, reason: &str, message: &str) -> Value {
    let t = now();
    json!({"type": type_, "status": "True", "reason": reason, "message": message,
           "lastProbeTime": t, "lastTransitionTime": t})
}

fn random_suffix() -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// How one pod attempt ended.
#[derive(Debug, Default)]
struct Outcome {
    /// The pod's phase is `Succeeded`.
    succeeded: bool,
    /// The exit code that decided the pod's fate (the first failing container, else the first).
    code: i32,
    reason: String,
    /// The pod's `DisruptionTarget` reason, if any.
    disruption: Option<String>,
    /// Every exit, init containers first.
    exits: Vec<ContainerExit>,
    deadline: bool,
    deleted: bool,
}

async fn run_job(
    shared: &Arc<Shared>,
    job: &Job,
    mut stop: mpsc::UnboundedReceiver<Stop>,
) -> Result<()> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let uid = job.uid().context("job uid")?;
    let jobs: Api<Job> = Api::namespaced(shared.client.clone(), &ns);
    let spec = job.spec.clone().context("job spec")?;
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let start = tokio::time::Instant::now();
    let deadline = spec
        .active_deadline_seconds
        .map(|s| start + Duration::from_secs(u64::try_from(s).unwrap_or(0)));
    patch_job_status(
        &jobs,
        &name,
        json!({"startTime": now(), "active": 1, "ready": 0, "uncountedTerminatedPods": {}}),
    )
    .await?;
    let mut failed = 0;
    loop {
        let out = run_pod(shared, job, &uid, deadline, &mut stop).await?;
        tracing::debug!(job = %name, code = out.code, reason = %out.reason, "simulated pod ended");
        if out.deleted {
            shared.lock().runs.remove(&uid);
            return Ok(());
        }
        if out.deadline {
            shared.emit(SimEvent::DeadlineExceeded {
                namespace: ns.clone(),
                job: name.clone(),
            });
            failed += 1;
            return finish_failed(
                shared,
                &jobs,
                &ns,
                &name,
                &uid,
                failed,
                "DeadlineExceeded",
                "Job was active longer than specified deadline",
            )
            .await;
        }
        if out.succeeded {
            let msg = "Reached expected number of succeeded pods";
            patch_job_status(
                &jobs,
                &name,
                json!({"active": 0, "ready": 0, "succeeded": 1,
                       "conditions": [condition("SuccessCriteriaMet", "CompletionsReached", msg)]}),
            )
            .await?;
            patch_job_status(
                &jobs,
                &name,
                json!({"completionTime": now(), "conditions": [
                    condition("SuccessCriteriaMet", "CompletionsReached", msg),
                    condition("Complete", "CompletionsReached", msg)]}),
            )
            .await?;
            shared.lock().runs.remove(&uid);
            shared.emit(SimEvent::JobComplete {
                namespace: ns,
                job: name,
            });
            return Ok(());
        }
        // podFailurePolicy first, like the job controller.
        let pod_name = shared
            .lock()
            .runs
            .get(&uid)
            .and_then(|r| r.pod.clone())
            .unwrap_or_default();
        match match_failure_policy(job, &out, &ns, &pod_name) {
            Some((action, message)) if action == "FailJob" => {
                return finish_failed(
                    shared,
                    &jobs,
                    &ns,
                    &name,
                    &uid,
                    failed + 1,
                    "PodFailurePolicy",
                    &message,
                )
                .await;
            }
            Some((action, _)) if action == "Ignore" => {
                patch_job_status(&jobs, &name, json!({"active": 1, "ready": 0})).await?;
                continue;
            }
            _ => {}
        }
        failed += 1;
        if failed > backoff_limit {
            return finish_failed(
                shared,
                &jobs,
                &ns,
                &name,
                &uid,
                failed,
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
            )
            .await;
        }
        patch_job_status(
            &jobs,
            &name,
            json!({"active": 1, "ready": 0, "failed": failed}),
        )
        .await?;
    }
}

#[allow(clippy::too_many_arguments)]
async fn finish_failed(
    shared: &Arc<Shared>,
    jobs: &Api<Job>,
    ns: &str,
    name: &str,
    uid: &str,
    failed: i32,
    reason: &str,
    message: &str,
) -> Result<()> {
    patch_job_status(
        jobs,
        name,
        json!({"active": 0, "ready": 0, "failed": failed,
               "conditions": [condition("FailureTarget", reason, message)]}),
    )
    .await?;
    patch_job_status(
        jobs,
        name,
        json!({"conditions": [condition("FailureTarget", reason, message),
                              condition("Failed", reason, message)]}),
    )
    .await?;
    shared.lock().runs.remove(uid);
    shared.emit(SimEvent::JobFailed {
        namespace: ns.to_string(),
        job: name.to_string(),
        reason: reason.to_string(),
    });
    Ok(())
}

/// The first matching `podFailurePolicy` rule: (action, message for the Job condition).
fn match_failure_policy(job: &Job, out: &Outcome, ns: &str, pod: &str) -> Option<(String, String)> {
    let rules = job
        .spec
        .as_ref()?
        .pod_failure_policy
        .as_ref()?
        .rules
        .clone();
    for (i, rule) in rules.iter().enumerate() {
        if let Some(codes) = &rule.on_exit_codes {
            let hit = out.exits.iter().find(|e| {
                let named = codes.container_name.as_ref().is_none_or(|n| *n == e.name);
                let listed = codes.values.contains(&e.exit_code);
                named
                    && match codes.operator.as_str() {
                        "In" => listed,
                        "NotIn" => !listed && e.exit_code != 0,
                        _ => false,
                    }
            });
            if let Some(e) = hit {
                return Some((
                    rule.action.clone(),
                    format!(
                        "Container {} for pod {ns}/{pod} failed with exit code {} matching {} rule at index {i}",
                        e.name, e.exit_code, rule.action
                    ),
                ));
            }
        }
        if let Some(conds) = &rule.on_pod_conditions
            && out.disruption.is_some()
            && conds
                .iter()
                .any(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        {
            return Some((
                rule.action.clone(),
                format!(
                    "Pod {ns}/{pod} has condition DisruptionTarget matching {} rule at index {i}",
                    rule.action
                ),
            ));
        }
    }
    None
}

async fn patch_job_status(jobs: &Api<Job>, name: &str, status: Value) -> Result<()> {
    jobs.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .with_context(|| format!("patch Job {name} status"))?;
    Ok(())
}

async fn patch_pod_status(pods: &Api<Pod>, name: &str, status: Value) -> Result<()> {
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .with_context(|| format!("patch Pod {name} status"))?;
    Ok(())
}

/// Create one pod for the Job and follow it on the kubelet to its end.
async fn run_pod(
    shared: &Arc<Shared>,
    job: &Job,
    uid: &str,
    deadline: Option<tokio::time::Instant>,
    stop: &mut mpsc::UnboundedReceiver<Stop>,
) -> Result<Outcome> {
    let ns = job.namespace().unwrap_or_default();
    let job_name = job.name_any();
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let pod_name = format!("{job_name}-{}", random_suffix());
    let tmeta = template.metadata.clone().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = tmeta.labels.clone().unwrap_or_default();
    labels.insert("job-name".into(), job_name.clone());
    labels.insert("batch.kubernetes.io/job-name".into(), job_name.clone());
    labels.insert("controller-uid".into(), uid.to_string());
    labels.insert("batch.kubernetes.io/controller-uid".into(), uid.to_string());
    let pod_spec = template.spec.clone().unwrap_or_default();
    // Held pending: unschedulable, so never bound to the kubelet's node.
    let held = shared.cfg.hold_pending
        || shared
            .cfg
            .hold_pending_label
            .as_ref()
            .is_some_and(|(k, v)| {
                job.labels().get(k) == Some(v)
                    || tmeta.labels.as_ref().and_then(|l| l.get(k)) == Some(v)
            });
    let mut spec_json = serde_json::to_value(&pod_spec).context("pod spec")?;
    if !held {
        spec_json["nodeName"] = json!(NODE_NAME);
    }
    let pod_json = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod_name, "namespace": ns, "labels": labels,
            "annotations": tmeta.annotations.clone().unwrap_or_default(),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid,
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": spec_json,
    });
    let pod: Pod = serde_json::from_value(pod_json).context("build the pod")?;
    // Follow the kubelet from before the pod exists: no event can be missed.
    let mut cursor = shared.kubelet.cursor();
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create Pod {pod_name}"))?;
    if let Some(run) = shared.lock().runs.get_mut(uid) {
        run.pod = Some(pod_name.clone());
    }
    shared.emit(SimEvent::PodCreated {
        namespace: ns.clone(),
        job: job_name.clone(),
        pod: pod_name.clone(),
    });
    let first_container = pod_spec
        .containers
        .first()
        .map(|c| c.name.clone())
        .context("pod template without containers")?;
    if held {
        return hold(
            shared,
            &pods,
            &ns,
            &job_name,
            &pod_name,
            &first_container,
            deadline,
            stop,
        )
        .await;
    }

    let jobs: Api<Job> = Api::namespaced(shared.client.clone(), &ns);
    let (mut started, mut deadline_hit, mut pull_reported) = (false, false, false);
    loop {
        let sleep = async {
            match deadline {
                Some(d) if !deadline_hit => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = cursor.next() => {
                let Some(ev) = ev else { bail!("the kubelet stopped") };
                let ours = |namespace: &str, pod: &str| namespace == ns && pod == pod_name;
                match ev {
                    KubeletEvent::ImagePullError { namespace, pod, .. }
                        if ours(&namespace, &pod) && !pull_reported =>
                    {
                        pull_reported = true;
                        shared.emit(SimEvent::PodPending {
                            namespace, job: job_name.clone(), pod, reason: "ErrImagePull".into(),
                        });
                    }
                    KubeletEvent::PodRunning { namespace, pod, pid } if ours(&namespace, &pod) => {
                        started = true;
                        patch_job_status(&jobs, &job_name, json!({"active": 1, "ready": 1})).await?;
                        shared.emit(SimEvent::PodStarted { namespace, job: job_name.clone(), pod, pid });
                    }
                    KubeletEvent::Sigterm { namespace, pod, .. } if ours(&namespace, &pod) => {
                        shared.emit(SimEvent::Sigterm { namespace, job: job_name.clone(), pod });
                    }
                    KubeletEvent::Error { namespace, pod, message } if ours(&namespace, &pod) => {
                        shared.emit(SimEvent::Error {
                            namespace, job: job_name.clone(), message: format!("pod {pod}: {message}"),
                        });
                    }
                    KubeletEvent::PodFinished {
                        namespace, pod, phase, disruption, init, containers, deleted, ..
                    } if ours(&namespace, &pod) => {
                        let decisive = containers
                            .iter()
                            .find(|c| c.exit_code != 0)
                            .or_else(|| init.iter().find(|c| c.exit_code != 0))
                            .or_else(|| containers.first())
                            .cloned();
                        if started {
                            shared.emit(SimEvent::PodExited {
                                namespace: ns.clone(),
                                job: job_name.clone(),
                                pod: pod_name.clone(),
                                code: decisive.as_ref().and_then(|c| c.signal.is_none().then_some(c.exit_code)),
                                signal: decisive.as_ref().and_then(|c| c.signal),
                            });
                        }
                        if deleted {
                            shared.emit(SimEvent::Stopped { namespace: ns, job: job_name, pod: pod_name });
                        }
                        let succeeded = phase == "Succeeded" && !deadline_hit;
                        let code = decisive.as_ref().map_or(137, |c| c.exit_code);
                        let reason = decisive.as_ref().map_or_else(|| "Error".to_string(), |c| c.reason.clone());
                        return Ok(Outcome {
                            succeeded,
                            code: if succeeded || code != 0 { code } else { 1 },
                            reason,
                            disruption,
                            exits: init.into_iter().chain(containers).collect(),
                            deadline: deadline_hit,
                            deleted,
                        });
                    }
                    _ => {}
                }
            }
            s = stop.recv() => match s {
                Some(Stop::Fail(f)) => {
                    let fault = match f {
                        PodFailure::OomKilled => Fault::OomKill { container: None },
                        PodFailure::Evicted => Fault::Evict,
                    };
                    if let Err(e) = shared.kubelet.fault(&ns, &pod_name, fault) {
                        shared.emit(SimEvent::Error { namespace: ns.clone(), job: job_name.clone(), message: format!("{e:#}") });
                    }
                }
                Some(Stop::Deleted) | None => {
                    // The kubelet stops the containers when the pod goes.
                    match pods.delete(&pod_name, &DeleteParams::background()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => shared.emit(SimEvent::Error { namespace: ns.clone(), job: job_name.clone(), message: format!("delete pod {pod_name}: {e}") }),
                    }
                }
            },
            _ = sleep => {
                // The Job's deadline: stop the pod and keep it, Failed.
                deadline_hit = true;
                if let Err(e) = shared.kubelet.fault(&ns, &pod_name, Fault::Terminate) {
                    shared.emit(SimEvent::Error { namespace: ns.clone(), job: job_name.clone(), message: format!("{e:#}") });
                }
            }
        }
    }
}

/// A pod that is never scheduled: `PodScheduled=False`, until a failure, deletion or deadline.
#[allow(clippy::too_many_arguments)]
async fn hold(
    shared: &Arc<Shared>,
    pods: &Api<Pod>,
    ns: &str,
    job_name: &str,
    pod_name: &str,
    container: &str,
    deadline: Option<tokio::time::Instant>,
    stop: &mut mpsc::UnboundedReceiver<Stop>,
) -> Result<Outcome> {
    patch_pod_status(
        pods,
        pod_name,
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
          "reason": "Unschedulable", "lastProbeTime": null, "lastTransitionTime": now(),
          "message": "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."}]}),
    )
    .await?;
    shared.emit(SimEvent::PodPending {
        namespace: ns.to_string(),
        job: job_name.to_string(),
        pod: pod_name.to_string(),
        reason: "Unschedulable".into(),
    });
    let sleep_until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let failed = |code: i32, reason: &str, disruption: Option<&str>, deadline: bool| Outcome {
        succeeded: false,
        code,
        reason: reason.into(),
        disruption: disruption.map(str::to_string),
        exits: vec![ContainerExit {
            name: container.to_string(),
            exit_code: code,
            signal: None,
            reason: reason.into(),
        }],
        deadline,
        deleted: false,
    };
    tokio::select! {
        s = stop.recv() => match s {
            Some(Stop::Fail(PodFailure::Evicted)) => {
                mark_pod_failed(pods, pod_name, container, 137, "Error", Some("EvictionByEvictionAPI")).await?;
                Ok(failed(137, "Error", Some("EvictionByEvictionAPI"), false))
            }
            Some(Stop::Fail(PodFailure::OomKilled)) => {
                mark_pod_failed(pods, pod_name, container, 137, "OOMKilled", None).await?;
                Ok(failed(137, "OOMKilled", None, false))
            }
            Some(Stop::Deleted) | None => {
                let _ = pods.delete(pod_name, &DeleteParams::default()).await;
                shared.emit(SimEvent::Stopped { namespace: ns.to_string(), job: job_name.to_string(), pod: pod_name.to_string() });
                Ok(Outcome { deleted: true, code: 137, reason: "Error".into(), ..Outcome::default() })
            }
        },
        _ = sleep_until => {
            mark_pod_failed(pods, pod_name, container, 137, "Error", None).await?;
            Ok(failed(137, "Error", None, true))
        }
    }
}

async fn mark_pod_failed(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    code: i32,
    reason: &str,
    disruption: Option<&str>,
) -> Result<()> {
    let fin = now();
    let mut conditions = vec![
        json!({"type": "Ready", "status": "False", "reason": "PodFailed", "lastTransitionTime": fin}),
        json!({"type": "ContainersReady", "status": "False", "reason": "PodFailed", "lastTransitionTime": fin}),
    ];
    if let Some(d) = disruption {
        conditions.push(
            json!({"type": "DisruptionTarget", "status": "True", "reason": d,
            "message": "Eviction API: evicting", "lastTransitionTime": fin}),
        );
    }
    patch_pod_status(
        pods,
        pod,
        json!({"phase": "Failed", "conditions": conditions,
           "containerStatuses": [{"name": container, "ready": false, "started": false, "restartCount": 0,
             "image": "", "imageID": "",
             "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": fin}}}]}),
    )
    .await
}
