//! A cluster simulator: plays the job controller and the kubelet for batch/v1 Jobs in the
//! API emulator, running each pod's first container as a local process.
//!
//! The emulator only stores objects; nothing would ever run a Job. This module watches Jobs,
//! creates their Pod objects, runs the container command (mapped to a local executable through
//! [`SimulatorConfig::binaries`]) with its env and volumes resolved, and writes Pod and Job
//! status the way Kubernetes 1.31+ does (`SuccessCriteriaMet`/`FailureTarget` first, then
//! `Complete`/`Failed`). Tests await [`SimEvent`]s instead of sleeping.
//!
//! Deliberate simplifications (the real controllers do more): one pod at a time
//! (`parallelism`/`completions` are ignored), pods are kept (not deleted) after a deadline or a
//! backoff failure, only the first container runs, and no pod finalizers are used.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rand::Rng;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

/// The node name written into running pods.
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
    /// Pods whose first container's image contains this string never start:
    /// they stay `Pending` with the container waiting in `ErrImagePull`.
    pub image_pull_error: Option<String>,
    /// Cap on `terminationGracePeriodSeconds` (tests do not want to wait 30 s).
    pub max_grace_period: Option<Duration>,
    /// Extra environment for every process (e.g. `RUST_LOG`); the pod's env wins.
    pub extra_env: Vec<(String, String)>,
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
    logs: HashMap<String, Arc<Mutex<String>>>,
    started: usize,
    history: Vec<SimEvent>,
}

struct Shared {
    client: Client,
    cfg: SimulatorConfig,
    state: Mutex<State>,
    events: broadcast::Sender<SimEvent>,
    base_dir: tempfile::TempDir,
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
        let base_dir = tempfile::Builder::new()
            .prefix("repobox-sim-")
            .tempdir()
            .context("simulator temp dir")?;
        let shared = Arc::new(Shared {
            client,
            cfg,
            state: Mutex::new(State::default()),
            events,
            base_dir,
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

    /// How many processes have been started so far.
    pub fn processes_started(&self) -> usize {
        self.shared.lock().started
    }

    /// Everything the pod's process wrote to stdout and stderr so far.
    pub fn logs(&self, pod_name: &str) -> String {
        self.shared
            .lock()
            .logs
            .get(pod_name)
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
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
        let _ = self.stop.send(true);
        let runs: Vec<_> = self.shared.lock().runs.drain().collect();
        for (_, run) in runs {
            let _ = run.stop.send(Stop::Deleted);
        }
        self.task.abort();
    }
}

impl Drop for ClusterSimulator {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
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
    drop(state);
    let shared = shared.clone();
    tokio::spawn(async move {
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
struct Outcome {
    code: i32,
    reason: &'static str,
    disruption: Option<&'static str>,
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
        tracing::debug!(job = %name, code = out.code, reason = out.reason, "simulated pod ended");
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
        if out.code == 0 {
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
            let hit = codes.values.contains(&out.code);
            let matched = match codes.operator.as_str() {
                "In" => hit,
                "NotIn" => !hit && out.code != 0,
                _ => false,
            };
            if matched {
                return Some((
                    rule.action.clone(),
                    format!(
                        "Container main for pod {ns}/{pod} failed with exit code {} matching {} rule at index {i}",
                        out.code, rule.action
                    ),
                ));
            }
        }
        if let Some(conds) = &rule.on_pod_conditions
            && let Some(reason) = out.disruption
        {
            let _ = reason;
            if conds
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

/// Create one pod for the Job and run it to its end.
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
    let pod_json = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod_name, "namespace": ns, "labels": labels,
            "annotations": tmeta.annotations.clone().unwrap_or_default(),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid,
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": pod_spec,
    });
    let pod: Pod = serde_json::from_value(pod_json).context("build the pod")?;
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create Pod {pod_name}"))?;
    let pod_uid = pod.uid().unwrap_or_default();
    if let Some(run) = shared.lock().runs.get_mut(uid) {
        run.pod = Some(pod_name.clone());
    }
    shared.emit(SimEvent::PodCreated {
        namespace: ns.clone(),
        job: job_name.clone(),
        pod: pod_name.clone(),
    });
    let container = pod_spec
        .containers
        .first()
        .cloned()
        .context("pod template without containers")?;
    let image = container.image.clone().unwrap_or_default();
    let grace = {
        let secs =
            u64::try_from(pod_spec.termination_grace_period_seconds.unwrap_or(30)).unwrap_or(0);
        let g = Duration::from_secs(secs);
        shared.cfg.max_grace_period.map_or(g, |cap| g.min(cap))
    };

    // Held pending: unschedulable, or an image that cannot be pulled.
    let held_label = shared
        .cfg
        .hold_pending_label
        .as_ref()
        .is_some_and(|(k, v)| {
            job.labels().get(k) == Some(v)
                || tmeta.labels.as_ref().and_then(|l| l.get(k)) == Some(v)
        });
    let pull_error = shared
        .cfg
        .image_pull_error
        .as_ref()
        .is_some_and(|m| image.contains(m.as_str()));
    if shared.cfg.hold_pending || held_label || pull_error {
        let (reason, status) = if pull_error {
            (
                "ErrImagePull",
                json!({"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
                    {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now()}],
                  "containerStatuses": [{"name": container.name, "image": image, "imageID": "", "ready": false,
                    "started": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "ErrImagePull",
                      "message": format!("failed to pull and unpack image \"{image}\": not found")}}}]}),
            )
        } else {
            (
                "Unschedulable",
                json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                  "reason": "Unschedulable", "lastProbeTime": null, "lastTransitionTime": now(),
                  "message": "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."}]}),
            )
        };
        patch_pod_status(&pods, &pod_name, status).await?;
        shared.emit(SimEvent::PodPending {
            namespace: ns.clone(),
            job: job_name.clone(),
            pod: pod_name.clone(),
            reason: reason.into(),
        });
        let sleep_until = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            s = stop.recv() => {
                return match s {
                    Some(Stop::Fail(PodFailure::Evicted)) => {
                        mark_pod_failed(&pods, &pod_name, &container.name, 137, "Error", Some("EvictionByEvictionAPI")).await?;
                        Ok(Outcome { code: 137, reason: "Error", disruption: Some("EvictionByEvictionAPI"), deadline: false, deleted: false })
                    }
                    Some(Stop::Fail(PodFailure::OomKilled)) => {
                        mark_pod_failed(&pods, &pod_name, &container.name, 137, "OOMKilled", None).await?;
                        Ok(Outcome { code: 137, reason: "OOMKilled", disruption: None, deadline: false, deleted: false })
                    }
                    Some(Stop::Deleted) | None => {
                        let _ = pods.delete(&pod_name, &DeleteParams::default()).await;
                        shared.emit(SimEvent::Stopped { namespace: ns, job: job_name, pod: pod_name });
                        Ok(Outcome { code: 137, reason: "Error", disruption: None, deadline: false, deleted: true })
                    }
                };
            }
            _ = sleep_until => {
                mark_pod_failed(&pods, &pod_name, &container.name, 137, "Error", None).await?;
                return Ok(Outcome { code: 137, reason: "Error", disruption: None, deadline: true, deleted: false });
            }
        }
    }

    // Resolve the command, env and volumes, then run it.
    let pod_dir = shared.base_dir.path().join(&pod_name);
    std::fs::create_dir_all(&pod_dir).context("pod dir")?;
    let prepared = prepare(
        shared, &ns, &pod_name, &pod_uid, &pod_spec, &container, &pod_dir,
    )
    .await;
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            shared.emit(SimEvent::Error {
                namespace: ns.clone(),
                job: job_name.clone(),
                message: format!("pod {pod_name}: {e:#}"),
            });
            mark_pod_failed(&pods, &pod_name, &container.name, 128, "StartError", None).await?;
            return Ok(Outcome {
                code: 128,
                reason: "StartError",
                disruption: None,
                deadline: false,
                deleted: false,
            });
        }
    };
    let mut cmd = Command::new(&prepared.program);
    cmd.args(&prepared.args)
        .env_clear()
        .envs(prepared.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&prepared.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", prepared.program.display()))?;
    let pid = child.id().unwrap_or(0);
    let log = Arc::new(Mutex::new(String::new()));
    {
        let mut state = shared.lock();
        state.started += 1;
        state.logs.insert(pod_name.clone(), log.clone());
    }
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(capture(out, log.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(capture(err, log.clone())));
    }
    let started_at = now();
    let jobs: Api<Job> = Api::namespaced(shared.client.clone(), &ns);
    pods.patch(
        &pod_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"nodeName": NODE_NAME}})),
    )
    .await
    .context("bind the pod")?;
    patch_pod_status(
        &pods,
        &pod_name,
        json!({"phase": "Running", "startTime": started_at, "hostIP": "10.0.0.1", "podIP": "10.244.0.10",
           "conditions": [
               {"type": "PodScheduled", "status": "True", "lastTransitionTime": started_at},
               {"type": "Initialized", "status": "True", "lastTransitionTime": started_at},
               {"type": "ContainersReady", "status": "True", "lastTransitionTime": started_at},
               {"type": "Ready", "status": "True", "lastTransitionTime": started_at}],
           "containerStatuses": [{"name": container.name, "image": image, "imageID": format!("sim://{image}"),
               "containerID": format!("sim://{pid}"), "ready": true, "started": true, "restartCount": 0,
               "state": {"running": {"startedAt": started_at}}}]}),
    )
    .await?;
    patch_job_status(&jobs, &job_name, json!({"active": 1, "ready": 1})).await?;
    shared.emit(SimEvent::PodStarted {
        namespace: ns.clone(),
        job: job_name.clone(),
        pod: pod_name.clone(),
        pid,
    });

    let sleep_until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let (mut reason, mut disruption, mut deadline_hit, mut deleted) = ("", None, false, false);
    let status = tokio::select! {
        status = child.wait() => status.context("wait for the process")?,
        s = stop.recv() => {
            match s {
                Some(Stop::Fail(PodFailure::OomKilled)) => {
                    reason = "OOMKilled";
                    signal_group(pid, Signal::SIGKILL);
                    child.wait().await.context("wait")?
                }
                Some(Stop::Fail(PodFailure::Evicted)) => {
                    disruption = Some("EvictionByEvictionAPI");
                    terminate(shared, &ns, &job_name, &pod_name, &mut child, pid, grace).await?
                }
                Some(Stop::Deleted) | None => {
                    deleted = true;
                    terminate(shared, &ns, &job_name, &pod_name, &mut child, pid, grace).await?
                }
            }
        }
        _ = sleep_until => {
            deadline_hit = true;
            terminate(shared, &ns, &job_name, &pod_name, &mut child, pid, grace).await?
        }
    };
    // Reap anything the process left behind in its group.
    signal_group(pid, Signal::SIGKILL);
    for r in readers {
        let _ = r.await;
    }
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(9));
    shared.emit(SimEvent::PodExited {
        namespace: ns.clone(),
        job: job_name.clone(),
        pod: pod_name.clone(),
        code: status.code(),
        signal: status.signal(),
    });
    if deleted {
        let _ = pods.delete(&pod_name, &DeleteParams::background()).await;
        shared.emit(SimEvent::Stopped {
            namespace: ns,
            job: job_name,
            pod: pod_name,
        });
        return Ok(Outcome {
            code,
            reason: "Error",
            disruption: None,
            deadline: false,
            deleted: true,
        });
    }
    if reason.is_empty() {
        reason = if code == 0 { "Completed" } else { "Error" };
    }
    if code == 0 && disruption.is_none() && !deadline_hit {
        let fin = now();
        patch_pod_status(
            &pods,
            &pod_name,
            json!({"phase": "Succeeded",
               "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": fin},
                              {"type": "ContainersReady", "status": "False", "reason": "PodCompleted", "lastTransitionTime": fin}],
               "containerStatuses": [{"name": container.name, "image": image, "imageID": format!("sim://{image}"),
                 "containerID": format!("sim://{pid}"), "ready": false, "started": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started_at, "finishedAt": fin}}}]}),
        )
        .await?;
    } else {
        mark_pod_failed(&pods, &pod_name, &container.name, code, reason, disruption).await?;
    }
    Ok(Outcome {
        code,
        reason,
        disruption,
        deadline: deadline_hit,
        deleted: false,
    })
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

/// SIGTERM the container's main process, wait the grace period, then SIGKILL the whole group.
async fn terminate(
    shared: &Arc<Shared>,
    ns: &str,
    job: &str,
    pod: &str,
    child: &mut tokio::process::Child,
    pid: u32,
    grace: Duration,
) -> Result<std::process::ExitStatus> {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    shared.emit(SimEvent::Sigterm {
        namespace: ns.to_string(),
        job: job.to_string(),
        pod: pod.to_string(),
    });
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.context("wait"),
        Err(_) => {
            signal_group(pid, Signal::SIGKILL);
            child.wait().await.context("wait after SIGKILL")
        }
    }
}

fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

async fn capture(reader: impl tokio::io::AsyncRead + Unpin, log: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
        l.push_str(&line);
        l.push('\n');
    }
}

struct Prepared {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    workdir: PathBuf,
}

/// Resolve the executable, env (values, Secret/ConfigMap refs, field refs, envFrom) and volumes
/// (secret, configMap, emptyDir as local dirs), remapping mount paths to the local dirs.
async fn prepare(
    shared: &Arc<Shared>,
    ns: &str,
    pod_name: &str,
    pod_uid: &str,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    container: &k8s_openapi::api::core::v1::Container,
    pod_dir: &Path,
) -> Result<Prepared> {
    let secrets: Api<Secret> = Api::namespaced(shared.client.clone(), ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(shared.client.clone(), ns);

    // Volumes → local dirs.
    let mut volume_dirs: HashMap<String, PathBuf> = HashMap::new();
    for vol in spec.volumes.iter().flatten() {
        let dir = pod_dir.join("volumes").join(&vol.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("volume dir {}", dir.display()))?;
        if let Some(sv) = &vol.secret {
            let sname = sv.secret_name.clone().unwrap_or_default();
            match secrets.get_opt(&sname).await? {
                Some(secret) => {
                    let data = secret_data(&secret)?;
                    write_items(&dir, &data, sv.items.as_deref())?;
                }
                None if sv.optional == Some(true) => {}
                None => bail!("secret {ns}/{sname} for volume {} not found", vol.name),
            }
        } else if let Some(cv) = &vol.config_map {
            match config_maps.get_opt(&cv.name).await? {
                Some(cm) => {
                    let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                    for (k, v) in cm.data.unwrap_or_default() {
                        data.insert(k, v.into_bytes());
                    }
                    write_items(&dir, &data, cv.items.as_deref())?;
                }
                None if cv.optional == Some(true) => {}
                None => bail!(
                    "configmap {ns}/{} for volume {} not found",
                    cv.name,
                    vol.name
                ),
            }
        }
        volume_dirs.insert(vol.name.clone(), dir);
    }
    // mountPath → local path, longest first so nested mounts win.
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let base = volume_dirs
            .get(&m.name)
            .with_context(|| format!("volumeMount {} has no volume", m.name))?;
        let local = match &m.sub_path {
            Some(sub) if !sub.is_empty() => base.join(sub),
            _ => base.clone(),
        };
        mounts.push((m.mount_path.trim_end_matches('/').to_string(), local));
    }
    mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let remap = |value: &str| -> String {
        for (mount, local) in &mounts {
            if value == mount.as_str() {
                return local.display().to_string();
            }
            if let Some(rest) = value.strip_prefix(&format!("{mount}/")) {
                return local.join(rest).display().to_string();
            }
        }
        value.to_string()
    };

    // Env.
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        ("HOSTNAME".into(), pod_name.to_string()),
        ("HOME".into(), pod_dir.display().to_string()),
    ];
    env.extend(shared.cfg.extra_env.iter().cloned());
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(name, _)| *name != k);
        env.push((k, v));
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(sr) = &from.secret_ref {
            match secrets.get_opt(&sr.name).await? {
                Some(secret) => {
                    for (k, v) in secret_data(&secret)? {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into(),
                        );
                    }
                }
                None if sr.optional == Some(true) => {}
                None => bail!("secret {ns}/{} for envFrom not found", sr.name),
            }
        }
        if let Some(cr) = &from.config_map_ref {
            match config_maps.get_opt(&cr.name).await? {
                Some(cm) => {
                    for (k, v) in cm.data.unwrap_or_default() {
                        set(&mut env, format!("{prefix}{k}"), v);
                    }
                }
                None if cr.optional == Some(true) => {}
                None => bail!("configmap {ns}/{} for envFrom not found", cr.name),
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(v) = &var.value {
            v.clone()
        } else if let Some(from) = &var.value_from {
            if let Some(sk) = &from.secret_key_ref {
                let secret = secrets.get_opt(&sk.name).await?;
                let data = match &secret {
                    Some(s) => secret_data(s)?,
                    None => BTreeMap::new(),
                };
                match data.get(&sk.key) {
                    Some(v) => String::from_utf8_lossy(v).into_owned(),
                    None if sk.optional == Some(true) => continue,
                    None => bail!(
                        "secret {ns}/{} key {} for env {} not found",
                        sk.name,
                        sk.key,
                        var.name
                    ),
                }
            } else if let Some(ck) = &from.config_map_key_ref {
                let cm = config_maps.get_opt(&ck.name).await?;
                match cm
                    .and_then(|c| c.data)
                    .and_then(|d| d.get(&ck.key).cloned())
                {
                    Some(v) => v,
                    None if ck.optional == Some(true) => continue,
                    None => bail!(
                        "configmap {ns}/{} key {} for env {} not found",
                        ck.name,
                        ck.key,
                        var.name
                    ),
                }
            } else if let Some(f) = &from.field_ref {
                match f.field_path.as_str() {
                    "metadata.name" => pod_name.to_string(),
                    "metadata.namespace" => ns.to_string(),
                    "metadata.uid" => pod_uid.to_string(),
                    "spec.nodeName" => NODE_NAME.to_string(),
                    "spec.serviceAccountName" => spec
                        .service_account_name
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    "status.podIP" => "10.244.0.10".into(),
                    "status.hostIP" => "10.0.0.1".into(),
                    other => bail!("unsupported fieldRef {other} for env {}", var.name),
                }
            } else {
                bail!("unsupported valueFrom for env {}", var.name)
            }
        } else {
            String::new()
        };
        set(&mut env, var.name.clone(), value);
    }
    // $(VAR) expansion in values is left out; rewrite paths under mounts.
    let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k, remap(&v))).collect();

    // Command.
    let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
    argv.extend(container.args.clone().unwrap_or_default());
    let image = container.image.clone().unwrap_or_default();
    let (program, args) = if container.command.as_ref().is_some_and(|c| !c.is_empty()) {
        let cmd0 = argv.remove(0);
        (resolve_binary(&shared.cfg, &cmd0)?, argv)
    } else {
        (resolve_binary(&shared.cfg, &image)?, argv)
    };
    let args = args.iter().map(|a| remap(a)).collect();
    let workdir = match &container.working_dir {
        Some(w) if !w.is_empty() => {
            let local = PathBuf::from(remap(w));
            if local.is_absolute() && local.starts_with(pod_dir) {
                local
            } else {
                // An image path the process cannot use here: give it a private dir instead.
                pod_dir.join("workdir")
            }
        }
        _ => pod_dir.join("workdir"),
    };
    std::fs::create_dir_all(&workdir).context("working dir")?;
    Ok(Prepared {
        program,
        args,
        env,
        workdir,
    })
}

fn resolve_binary(cfg: &SimulatorConfig, name: &str) -> Result<PathBuf> {
    if let Some(p) = cfg.binaries.get(name) {
        return Ok(p.clone());
    }
    let base = Path::new(name)
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    if let Some(p) = cfg.binaries.get(&base) {
        return Ok(p.clone());
    }
    // Images: match without tag/registry, e.g. `ghcr.io/x/repobox-job-runner:1.2` → `repobox-job-runner`.
    let image_name = base.split([':', '@']).next().unwrap_or_default();
    if let Some(p) = cfg.binaries.get(image_name) {
        return Ok(p.clone());
    }
    bail!("no local binary mapped for {name:?} (SimulatorConfig::binaries)")
}

fn secret_data(secret: &Secret) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for (k, v) in secret.data.clone().unwrap_or_default() {
        out.insert(k, v.0);
    }
    for (k, v) in secret.string_data.clone().unwrap_or_default() {
        out.insert(k, v.into_bytes());
    }
    Ok(out)
}

fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
) -> Result<()> {
    let pairs: Vec<(String, &Vec<u8>)> = match items {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|i| {
                data.get(&i.key)
                    .map(|v| (i.path.clone(), v))
                    .with_context(|| format!("key {} not found", i.key))
            })
            .collect::<Result<_>>()?,
        _ => data.iter().map(|(k, v)| (k.clone(), v)).collect(),
    };
    for (path, value) in pairs {
        let file = dir.join(&path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, value).with_context(|| format!("write {}", file.display()))?;
    }
    Ok(())
}
