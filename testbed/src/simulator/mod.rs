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

mod job;
mod pod;
mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use kube::Client;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::kubelet::{Isolation, Kubelet, KubeletConfig, NodeSettings};

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
    stop: tokio::sync::watch::Sender<bool>,
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
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(watch::main_loop(shared.clone(), stop_rx));
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
