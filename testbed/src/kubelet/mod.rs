//! A kubelet for the test bed: registers Nodes, runs the pods bound to them as local processes
//! (isolated in their own namespaces when running as root) and writes pod status as the v1.28
//! kubelet does. Works against any API server: the emulator or a real kube-apiserver.
//!
//! - **Nodes**: registered with capacity/allocatable from [`NodeSettings`] and a `Ready`
//!   condition; every [`KubeletConfig::heartbeat_interval`] the Lease in `kube-node-lease` is
//!   renewed and the conditions' heartbeat refreshed, so the node lifecycle controller keeps the
//!   node Ready.
//! - **Pods** with `spec.nodeName` = one of our nodes: volumes written (emptyDir, secret,
//!   configMap, downwardAPI, projected incl. service-account tokens via TokenRequest, hostPath),
//!   init containers run in order to completion, then all containers at once; status goes
//!   through the status subresource: `Pending` → `Running` → `Succeeded`/`Failed` with
//!   conditions and container states. Containers are never restarted (restartPolicy is read only
//!   for the phase).
//! - **Deletion**: on `deletionTimestamp`, SIGTERM to every container's main process, the grace
//!   period (capped by [`KubeletConfig::max_grace_period`]), SIGKILL, the final status, then a
//!   delete with `gracePeriodSeconds=0`, as the kubelet finishes a graceful delete. A pod that
//!   vanishes at once (the emulator deletes immediately) is stopped the same way.
//! - **Isolation** (root, [`Isolation::Auto`]): see `runtime`; each container has its own mount,
//!   PID, UTS and IPC namespaces and private root, runs as its `runAsUser`/`runAsGroup` with the
//!   pod's `fsGroup`/`supplementalGroups`, `no_new_privs` (unless `allowPrivilegeEscalation:
//!   true`) and containerd's default capability bounding set minus `drop`. The network namespace
//!   is the host's: pods reach Redis, git and the API server on loopback; `podIP` = `hostIP` =
//!   [`KubeletConfig::node_ip`], as for `hostNetwork` pods. Without isolation, paths under mount
//!   points are remapped to the host volume directories.
//! - Tests await [`KubeletEvent`]s ([`Kubelet::wait_for`], [`Kubelet::cursor`]) and read each
//!   container's output with [`Kubelet::logs`].
//!
//! The service-account token volume is added to pods by the API server's ServiceAccount
//! admission (honouring `automountServiceAccountToken`), not by the kubelet; this kubelet writes
//! whatever projected volume the pod has. The emulator has no admission, so its pods have none.
//! Tokens are not refreshed (tests are short).

mod env;
mod node;
mod runtime;
mod status;
mod volumes;
mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

/// One Node this kubelet registers and runs pods for.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub name: String,
    pub cpu: String,
    pub memory: String,
    pub ephemeral_storage: String,
    pub pods: String,
    pub labels: BTreeMap<String, String>,
}

impl NodeSettings {
    /// A node with room for a few dozen test pods.
    pub fn new(name: impl Into<String>) -> Self {
        NodeSettings {
            name: name.into(),
            cpu: "16".into(),
            memory: "64Gi".into(),
            ephemeral_storage: "500Gi".into(),
            pods: "110".into(),
            labels: BTreeMap::new(),
        }
    }
}

/// Whether containers get namespaces and a private root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// When running as root and the kernel allows it (probed at start).
    #[default]
    Auto,
    /// Never: plain child processes with remapped paths, running as the kubelet's user.
    Off,
}

/// How the kubelet behaves.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub nodes: Vec<NodeSettings>,
    /// Container command (or its file name, or the image name without registry and tag) →
    /// local executable. Unmapped commands are looked up as host paths / on the system `PATH`.
    pub binaries: HashMap<String, PathBuf>,
    pub isolation: Isolation,
    /// The API server URL containers reach (sets `KUBERNETES_SERVICE_HOST`/`PORT`).
    pub api_server: Option<String>,
    /// Cap on grace periods (tests do not want to wait 30 s).
    pub max_grace_period: Option<Duration>,
    /// Extra environment for every container (e.g. `RUST_LOG`); the pod's env wins.
    pub extra_env: Vec<(String, String)>,
    /// Containers whose image contains this string never start: waiting `ErrImagePull`, the pod
    /// stays `Pending`.
    pub image_pull_error: Option<String>,
    /// Lease renewal and node status heartbeat.
    pub heartbeat_interval: Duration,
    /// The node's InternalIP, also every pod's `hostIP` and `podIP`.
    pub node_ip: String,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        KubeletConfig {
            nodes: vec![NodeSettings::new("repobox-node")],
            binaries: HashMap::new(),
            isolation: Isolation::Auto,
            api_server: None,
            max_grace_period: None,
            extra_env: Vec::new(),
            image_pull_error: None,
            heartbeat_interval: Duration::from_secs(10),
            node_ip: "127.0.0.1".into(),
        }
    }
}

/// An infrastructure failure to inflict on a running pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The kernel's OOM killer: SIGKILL, exit 137, reason `OOMKilled`. `None`: the first
    /// running container.
    OomKill { container: Option<String> },
    /// The Eviction API. On a server without it (the emulator) it is emulated: condition
    /// `DisruptionTarget` (reason `EvictionByEvictionAPI`), SIGTERM, grace, pod `Failed`, and the
    /// pod is kept.
    Evict,
    /// Stop the pod like a deadline would (SIGTERM, grace, SIGKILL) and leave it `Failed`,
    /// without deleting it.
    Terminate,
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerExit {
    pub name: String,
    pub exit_code: i32,
    pub signal: Option<i32>,
    /// `Completed`, `Error`, `OOMKilled`, `StartError`.
    pub reason: String,
}

/// Things that happened, in order, for tests to await.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeletEvent {
    NodeRegistered {
        node: String,
    },
    /// A container's process started (`pid`: the process the kubelet signals).
    ContainerStarted {
        namespace: String,
        pod: String,
        container: String,
        pid: u32,
    },
    /// All containers run and the `Running` status is written (`pid`: the first container's).
    PodRunning {
        namespace: String,
        pod: String,
        pid: u32,
    },
    /// A container's image "cannot be pulled": it waits in `ErrImagePull`.
    ImagePullError {
        namespace: String,
        pod: String,
        container: String,
    },
    /// SIGTERM was sent to a container's main process.
    Sigterm {
        namespace: String,
        pod: String,
        container: String,
    },
    ContainerExited {
        namespace: String,
        pod: String,
        exit: ContainerExit,
    },
    /// Every process of the pod has ended and the final status is written (when the pod still
    /// exists); when `deleted`, the pod was deleted (or vanished) and is gone now.
    PodFinished {
        namespace: String,
        pod: String,
        phase: String,
        /// Pod-level reason (`DeadlineExceeded`).
        reason: Option<String>,
        /// The `DisruptionTarget` condition's reason, if the pod has one.
        disruption: Option<String>,
        /// Whether any regular container started.
        started: bool,
        init: Vec<ContainerExit>,
        containers: Vec<ContainerExit>,
        deleted: bool,
    },
    /// The kubelet could not do something (bad mapping, API error, failed mount, ...).
    Error {
        namespace: String,
        pod: String,
        message: String,
    },
}

impl KubeletEvent {
    /// The pod this event is about (empty for node events).
    pub fn pod(&self) -> &str {
        match self {
            KubeletEvent::NodeRegistered { .. } => "",
            KubeletEvent::ContainerStarted { pod, .. }
            | KubeletEvent::PodRunning { pod, .. }
            | KubeletEvent::ImagePullError { pod, .. }
            | KubeletEvent::Sigterm { pod, .. }
            | KubeletEvent::ContainerExited { pod, .. }
            | KubeletEvent::PodFinished { pod, .. }
            | KubeletEvent::Error { pod, .. } => pod,
        }
    }
}

/// What a pod worker is told.
#[derive(Debug)]
pub(crate) enum Msg {
    Update(Box<Pod>),
    Gone,
    Fault(Fault),
}

struct PodEntry {
    namespace: String,
    name: String,
    node: String,
    tx: mpsc::UnboundedSender<Msg>,
}

/// One container's output.
type Log = Arc<Mutex<String>>;

#[derive(Default)]
struct State {
    /// Pods being run, by uid.
    pods: HashMap<String, PodEntry>,
    /// Pods finished by this kubelet (their later events only matter for deletion).
    done: HashSet<String>,
    /// Terminal pods whose deletion this kubelet already completed.
    finalized: HashSet<String>,
    /// (namespace, pod) → (container, output) in start order.
    logs: HashMap<(String, String), Vec<(String, Log)>>,
    started: usize,
    history: Vec<KubeletEvent>,
    /// Process groups of running containers (killed on shutdown).
    groups: HashSet<i32>,
    tasks: Vec<JoinHandle<()>>,
}

pub(crate) struct Shared {
    client: Client,
    cfg: KubeletConfig,
    isolates: bool,
    /// Whether sandboxes get overlays of the system dirs (else read-only binds).
    overlay: bool,
    /// Whether the server serves `pods/eviction` (a real one) or not (the emulator).
    eviction_api: bool,
    state: Mutex<State>,
    events: broadcast::Sender<KubeletEvent>,
    seq: watch::Sender<usize>,
    dir: tempfile::TempDir,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn emit(&self, event: KubeletEvent) {
        tracing::debug!(?event, "kubelet");
        let len = {
            let mut state = self.lock();
            state.history.push(event.clone());
            let _ = self.events.send(event);
            state.history.len()
        };
        self.seq.send_replace(len);
    }
}

/// The running kubelet; stops (killing every container) on drop or [`Kubelet::shutdown`].
pub struct Kubelet {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

/// A lossless reader of the kubelet's events, from the moment it was made.
pub struct EventCursor {
    shared: Arc<Shared>,
    next: usize,
    rx: watch::Receiver<usize>,
}

impl EventCursor {
    /// The next event (waits for it); None once the kubelet is gone.
    pub async fn next(&mut self) -> Option<KubeletEvent> {
        loop {
            if let Some(e) = self.shared.lock().history.get(self.next).cloned() {
                self.next += 1;
                return Some(e);
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

impl Kubelet {
    /// Register the nodes and start running their pods.
    pub async fn start(client: Client, cfg: KubeletConfig) -> Result<Self> {
        if cfg.nodes.is_empty() {
            bail!("a kubelet needs at least one node");
        }
        let dir = tempfile::Builder::new()
            .prefix("repobox-kubelet-")
            .tempdir()
            .context("kubelet state dir")?;
        let (isolates, overlay) = match cfg.isolation {
            Isolation::Off => (false, false),
            Isolation::Auto => match runtime::probe_isolation(dir.path()).await {
                Ok(overlay) => (true, overlay),
                Err(why) => {
                    tracing::warn!(%why, "kubelet: containers run without isolation");
                    (false, false)
                }
            },
        };
        let eviction_api = client
            .list_core_api_resources("v1")
            .await
            .map(|l| l.resources.iter().any(|r| r.name == "pods/eviction"))
            .unwrap_or(false);
        let (events, _) = broadcast::channel(4096);
        let (seq, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            client: client.clone(),
            cfg,
            isolates,
            overlay,
            eviction_api,
            state: Mutex::new(State::default()),
            events,
            seq,
            dir,
        });
        for n in &shared.cfg.nodes {
            node::register(&client, n, &shared.cfg.node_ip).await?;
            shared.emit(KubeletEvent::NodeRegistered {
                node: n.name.clone(),
            });
        }
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(heartbeats(shared.clone(), stop_rx.clone()))];
        for n in &shared.cfg.nodes {
            tasks.push(tokio::spawn(watch_pods(
                shared.clone(),
                n.name.clone(),
                stop_rx.clone(),
            )));
        }
        shared.lock().tasks.extend(tasks);
        Ok(Kubelet { shared, stop })
    }

    /// Whether containers run isolated (root, namespaces available, isolation not turned off).
    /// Tests that depend on isolation must print a SKIPPED line when this is false.
    pub fn isolates(&self) -> bool {
        self.shared.isolates
    }

    /// The registered node names.
    pub fn node_names(&self) -> Vec<String> {
        self.shared
            .cfg
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    /// A receiver of every future event.
    pub fn subscribe(&self) -> broadcast::Receiver<KubeletEvent> {
        self.shared.events.subscribe()
    }

    /// A lossless cursor over events from now on.
    pub fn cursor(&self) -> EventCursor {
        let rx = self.shared.seq.subscribe();
        let next = self.shared.lock().history.len();
        EventCursor {
            shared: self.shared.clone(),
            next,
            rx,
        }
    }

    /// Every event so far.
    pub fn history(&self) -> Vec<KubeletEvent> {
        self.shared.lock().history.clone()
    }

    /// Wait (up to `timeout`) for an event matching `pred`, including ones already past.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&KubeletEvent) -> bool,
    ) -> Result<KubeletEvent> {
        let mut cursor = EventCursor {
            shared: self.shared.clone(),
            next: 0,
            rx: self.shared.seq.subscribe(),
        };
        tokio::time::timeout(timeout, async {
            while let Some(e) = cursor.next().await {
                if pred(&e) {
                    return Ok(e);
                }
            }
            bail!("kubelet stopped")
        })
        .await
        .map_err(|_| {
            anyhow!(
                "no matching kubelet event within {timeout:?}; history: {:#?}",
                self.history()
            )
        })?
    }

    /// How many container processes have been started so far.
    pub fn containers_started(&self) -> usize {
        self.shared.lock().started
    }

    /// What a container wrote to stdout and stderr so far.
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> String {
        self.shared
            .lock()
            .logs
            .get(&(namespace.to_string(), pod.to_string()))
            .and_then(|cs| cs.iter().find(|(c, _)| c == container))
            .map(|(_, l)| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Every container's output of a pod (any namespace), in start order.
    pub fn pod_logs(&self, pod: &str) -> String {
        let state = self.shared.lock();
        state
            .logs
            .iter()
            .filter(|((_, p), _)| p == pod)
            .flat_map(|(_, cs)| cs.iter())
            .map(|(_, l)| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// Inflict an infrastructure failure on a running pod.
    pub fn fault(&self, namespace: &str, pod: &str, fault: Fault) -> Result<()> {
        let state = self.shared.lock();
        let entry = state
            .pods
            .values()
            .find(|e| e.namespace == namespace && e.name == pod)
            .with_context(|| format!("pod {namespace}/{pod} is not running on this kubelet"))?;
        entry
            .tx
            .send(Msg::Fault(fault))
            .map_err(|_| anyhow!("pod {namespace}/{pod} has finished"))
    }

    /// Stop: kill every container and end the watches. Nodes stay registered.
    pub async fn shutdown(self) {
        self.stop();
    }

    /// Kill every container (SIGKILL) and end the watches and heartbeats; idempotent.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        let mut state = self.shared.lock();
        for t in state.tasks.drain(..) {
            t.abort();
        }
        for g in state.groups.drain() {
            let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
        }
        state.pods.clear();
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| jiff::Timestamp::now().to_string())
}

async fn heartbeats(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.cfg.heartbeat_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        for n in &shared.cfg.nodes {
            if let Err(e) = node::heartbeat(&shared.client, n).await {
                tracing::warn!(node = %n.name, error = %format!("{e:#}"), "kubelet heartbeat");
                if let Err(e) = node::register(&shared.client, n, &shared.cfg.node_ip).await {
                    tracing::warn!(node = %n.name, error = %format!("{e:#}"), "kubelet re-registration");
                }
            }
        }
    }
}

async fn watch_pods(shared: Arc<Shared>, node: String, mut stop: watch::Receiver<bool>) {
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = std::pin::pin!(watcher::watcher(pods, cfg));
    // Pods seen during a relist: any pod of ours not among them is gone.
    let mut relist: Option<HashSet<String>> = None;
    loop {
        let next = tokio::select! {
            _ = stop.changed() => return,
            next = events.next() => next,
        };
        match next {
            Some(Ok(Event::Init)) => relist = Some(HashSet::new()),
            Some(Ok(Event::InitApply(pod))) => {
                if let (Some(seen), Some(uid)) = (relist.as_mut(), pod.uid()) {
                    seen.insert(uid);
                }
                on_pod(&shared, &node, pod);
            }
            Some(Ok(Event::InitDone)) => {
                if let Some(seen) = relist.take() {
                    let state = shared.lock();
                    for (uid, entry) in &state.pods {
                        if entry.node == node && !seen.contains(uid) {
                            let _ = entry.tx.send(Msg::Gone);
                        }
                    }
                }
            }
            Some(Ok(Event::Apply(pod))) => on_pod(&shared, &node, pod),
            Some(Ok(Event::Delete(pod))) => {
                if let Some(uid) = pod.uid()
                    && let Some(entry) = shared.lock().pods.get(&uid)
                {
                    let _ = entry.tx.send(Msg::Gone);
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "kubelet pod watch");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None => return,
        }
    }
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn on_pod(shared: &Arc<Shared>, node: &str, pod: Pod) {
    let Some(uid) = pod.uid() else { return };
    let mut state = shared.lock();
    if let Some(entry) = state.pods.get(&uid) {
        let _ = entry.tx.send(Msg::Update(Box::new(pod)));
        return;
    }
    if state.done.contains(&uid) || is_terminal(&pod) || pod.metadata.deletion_timestamp.is_some() {
        // Nothing (more) to run; a deletion of a pod that is not running is completed at once.
        if pod.metadata.deletion_timestamp.is_some() && state.finalized.insert(uid.clone()) {
            let shared = shared.clone();
            drop(state);
            tokio::spawn(async move {
                if let Err(e) = delete_now(&shared.client, &pod).await {
                    tracing::debug!(error = %format!("{e:#}"), "kubelet final delete");
                }
            });
        }
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    state.pods.insert(
        uid.clone(),
        PodEntry {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            node: node.to_string(),
            tx,
        },
    );
    let task = tokio::spawn(worker::run(shared.clone(), pod, rx));
    state.tasks.retain(|t| !t.is_finished());
    state.tasks.push(task);
}

/// Delete with `gracePeriodSeconds=0`, for this very pod (uid precondition).
pub(crate) async fn delete_now(client: &Client, pod: &Pod) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&pod.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e).context("delete the pod"),
    }
}
