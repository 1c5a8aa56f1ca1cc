//! A kubelet for the test bed: registers Nodes, runs the pods bound to them as local processes
//! (isolated in their own namespaces when running as root) and writes pod status as the v1.28
//! kubelet does. Works against any API server: the emulator or a real kube-apiserver.
//!
//! - **Nodes**: registered with capacity/allocatable from [`NodeSettings`] and a `Ready`
//!   condition; every [`KubeletConfig::heartbeat_interval`] the Lease in `kube-node-lease` is
//!   renewed and the conditions' heartbeat refreshed, so the node lifecycle controller keeps the
//!   node Ready. Nodes join and leave at runtime ([`KubeletHandle::add_node`],
//!   [`KubeletHandle::remove_node`]: the machine is gone, its containers killed, the Node
//!   deleted as the cloud node controller does) and shut down gracefully as the v1.28 kubelet's
//!   shutdown manager does on a spot reclaim ([`KubeletHandle::shutdown_node`]).
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
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
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
    /// Set on the Node when it is created, as `--register-with-taints` does.
    pub taints: Vec<Taint>,
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
            taints: Vec::new(),
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
    /// Graceful node shutdown began ([`KubeletHandle::shutdown_node`]): the node reports
    /// `Ready=False` and its pods are being terminated.
    NodeShutdown {
        node: String,
    },
    /// The node is gone ([`KubeletHandle::remove_node`]): heartbeats stopped, containers killed,
    /// the Node object deleted.
    NodeRemoved {
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
            KubeletEvent::NodeRegistered { .. }
            | KubeletEvent::NodeShutdown { .. }
            | KubeletEvent::NodeRemoved { .. } => "",
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
    /// Graceful node shutdown with this shutdown grace period.
    NodeShutdown(Duration),
    /// The machine is gone: every process dies at once, no status is written.
    NodeGone,
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
    /// The registered nodes, by name.
    nodes: BTreeMap<String, NodeEntry>,
}

/// A node this kubelet runs: its heartbeat and pod watch stop when `stop` says so.
struct NodeEntry {
    settings: NodeSettings,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Graceful shutdown began: `Ready=False`, new pods are rejected.
    shutting_down: bool,
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
    /// Bumped whenever a pod worker has ended (waits for a node's pods watch it).
    workers_done: watch::Sender<u64>,
    /// True once the kubelet stops.
    stopped: watch::Sender<bool>,
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
}

/// A cloneable handle on a running kubelet's nodes, for what plays the cloud (the autoscaler):
/// it does not keep the kubelet running, and fails once the [`Kubelet`] is gone.
#[derive(Clone)]
pub struct KubeletHandle {
    shared: Arc<Shared>,
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
    /// Register the nodes (there may be none: an autoscaler adds them) and start running their
    /// pods.
    pub async fn start(client: Client, cfg: KubeletConfig) -> Result<Self> {
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
        let (workers_done, _) = watch::channel(0);
        let (stopped, _) = watch::channel(false);
        let nodes = cfg.nodes.clone();
        let shared = Arc::new(Shared {
            client,
            cfg,
            isolates,
            overlay,
            eviction_api,
            state: Mutex::new(State::default()),
            events,
            seq,
            workers_done,
            stopped,
            dir,
        });
        let kubelet = Kubelet { shared };
        for n in nodes {
            kubelet.add_node(n).await?;
        }
        Ok(kubelet)
    }

    /// A handle on the nodes for an autoscaler (or any other player of the cloud).
    pub fn handle(&self) -> KubeletHandle {
        KubeletHandle {
            shared: self.shared.clone(),
        }
    }

    /// See [`KubeletHandle::add_node`].
    pub async fn add_node(&self, settings: NodeSettings) -> Result<()> {
        self.handle().add_node(settings).await
    }

    /// See [`KubeletHandle::remove_node`].
    pub async fn remove_node(&self, name: &str) -> Result<()> {
        self.handle().remove_node(name).await
    }

    /// See [`KubeletHandle::shutdown_node`].
    pub async fn shutdown_node(&self, name: &str, grace: Duration) -> Result<()> {
        self.handle().shutdown_node(name, grace).await
    }

    /// Whether containers run isolated (root, namespaces available, isolation not turned off).
    /// Tests that depend on isolation must print a SKIPPED line when this is false.
    pub fn isolates(&self) -> bool {
        self.shared.isolates
    }

    /// The registered node names.
    pub fn node_names(&self) -> Vec<String> {
        self.handle().node_names()
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
        self.shared.stopped.send_replace(true);
        let mut state = self.shared.lock();
        for t in state.tasks.drain(..) {
            t.abort();
        }
        for (_, n) in std::mem::take(&mut state.nodes) {
            for t in n.tasks {
                t.abort();
            }
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

/// The message the v1.28 kubelet's shutdown manager writes on the pods it terminates.
pub const NODE_SHUTDOWN_MESSAGE: &str = "Pod was terminated in response to imminent node shutdown.";
/// What the shutdown manager's admission answers for pods bound while the node shuts down.
const NODE_SHUTDOWN_NOT_ADMITTED: (&str, &str) = (
    "NodeShutdown",
    "Pod was rejected as the node is shutting down.",
);
/// How long removal and shutdown wait for pod workers beyond their grace periods.
const WORKER_HEADROOM: Duration = Duration::from_secs(15);

impl KubeletHandle {
    /// Register a Node (with its Lease) and start its heartbeats and pods: a new machine has
    /// joined. Fails when the name is taken or the kubelet has stopped.
    pub async fn add_node(&self, settings: NodeSettings) -> Result<()> {
        let shared = &self.shared;
        if *shared.stopped.borrow() {
            bail!("the kubelet has stopped");
        }
        let name = settings.name.clone();
        let (stop, stop_rx) = watch::channel(false);
        {
            let mut st = shared.lock();
            if st.nodes.contains_key(&name) {
                bail!("node {name} is already registered");
            }
            st.nodes.insert(
                name.clone(),
                NodeEntry {
                    settings: settings.clone(),
                    stop,
                    tasks: Vec::new(),
                    shutting_down: false,
                },
            );
        }
        if let Err(e) = node::register(&shared.client, &settings, &shared.cfg.node_ip).await {
            shared.lock().nodes.remove(&name);
            return Err(e);
        }
        let tasks = vec![
            tokio::spawn(heartbeats(shared.clone(), name.clone(), stop_rx.clone())),
            tokio::spawn(watch_pods(shared.clone(), name.clone(), stop_rx)),
        ];
        match shared.lock().nodes.get_mut(&name) {
            Some(entry) => entry.tasks = tasks,
            None => tasks.iter().for_each(JoinHandle::abort),
        }
        shared.emit(KubeletEvent::NodeRegistered { node: name });
        Ok(())
    }

    /// The machine is gone (an instance terminated): heartbeats stop, every container of the
    /// node is killed at once without a status write, and the Node object is deleted, as the
    /// cloud node lifecycle controller does for a vanished instance. Pods still bound to it are
    /// left to the pod garbage collector, as on a real cluster.
    pub async fn remove_node(&self, name: &str) -> Result<()> {
        let shared = &self.shared;
        let entry = shared
            .lock()
            .nodes
            .remove(name)
            .with_context(|| format!("node {name} is not registered with this kubelet"))?;
        entry.stop.send_replace(true);
        let uids = self.pods_on(name, || Msg::NodeGone);
        // Let an in-flight heartbeat finish, so that it cannot re-register the Node below.
        for t in entry.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(WORKER_HEADROOM, t).await.is_err() {
                abort.abort();
            }
        }
        self.wait_workers(&uids, WORKER_HEADROOM).await;
        let nodes: Api<Node> = Api::all(shared.client.clone());
        match nodes.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("delete Node {name}")),
        }
        shared.emit(KubeletEvent::NodeRemoved {
            node: name.to_string(),
        });
        Ok(())
    }

    /// Graceful node shutdown as the v1.28 kubelet's shutdown manager does it (a spot instance
    /// reclaimed without a drain handler): a `NodeShutdown` event on the Node, `Ready=False`
    /// (`node is shutting down`), new pods rejected, and every pod terminated with a grace
    /// period of min(its own, `grace`): condition `DisruptionTarget` (reason
    /// `TerminationByKubelet`) first, then phase `Failed` with reason `Terminated` and
    /// [`NODE_SHUTDOWN_MESSAGE`]. Then the machine goes away ([`Self::remove_node`]).
    pub async fn shutdown_node(&self, name: &str, grace: Duration) -> Result<()> {
        let shared = &self.shared;
        let settings = {
            let mut st = shared.lock();
            let entry = st
                .nodes
                .get_mut(name)
                .with_context(|| format!("node {name} is not registered with this kubelet"))?;
            if entry.shutting_down {
                bail!("node {name} is already shutting down");
            }
            entry.shutting_down = true;
            entry.settings.clone()
        };
        shared.emit(KubeletEvent::NodeShutdown {
            node: name.to_string(),
        });
        self.node_shutdown_event(name).await;
        if let Err(e) = node::heartbeat(&shared.client, &settings, true).await {
            tracing::warn!(node = %name, error = %format!("{e:#}"), "kubelet: Ready=False on shutdown");
        }
        let uids = self.pods_on(name, || Msg::NodeShutdown(grace));
        let capped = shared.cfg.max_grace_period.map_or(grace, |c| grace.min(c));
        self.wait_workers(&uids, capped + WORKER_HEADROOM).await;
        self.remove_node(name).await
    }

    /// The registered node names.
    pub fn node_names(&self) -> Vec<String> {
        self.shared.lock().nodes.keys().cloned().collect()
    }

    /// Send `msg()` to every pod worker of `node`; their uids.
    fn pods_on(&self, node: &str, msg: impl Fn() -> Msg) -> HashSet<String> {
        let st = self.shared.lock();
        st.pods
            .iter()
            .filter(|(_, e)| e.node == node)
            .map(|(uid, e)| {
                let _ = e.tx.send(msg());
                uid.clone()
            })
            .collect()
    }

    /// Wait (up to `timeout`) until none of these pod workers runs any more.
    async fn wait_workers(&self, uids: &HashSet<String>, timeout: Duration) {
        let mut rx = self.shared.workers_done.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if !self.shared.lock().pods.keys().any(|u| uids.contains(u)) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(?timeout, "kubelet: pod workers did not end in time");
        }
    }

    /// The `NodeShutdown` event the shutdown manager records on its Node.
    async fn node_shutdown_event(&self, name: &str) {
        let client = &self.shared.client;
        let node = match Api::<Node>::all(client.clone()).get(name).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "kubelet: NodeShutdown event");
                return;
            }
        };
        let object = crate::events::reference(&node);
        let at = crate::events::event_name(&object, jiff::Timestamp::now());
        let spec = crate::events::EventSpec {
            object: &object,
            type_: "Normal",
            reason: "NodeShutdown",
            message: "Shutdown manager detected shutdown event",
            component: "kubelet",
            host: Some(name),
        };
        if let Err(e) = crate::events::create(client, &at, &spec).await {
            tracing::warn!(node = %name, error = %format!("{e:#}"), "kubelet: NodeShutdown event");
        }
    }
}

/// Renew the node's Lease and status every heartbeat interval until the node or the kubelet
/// stops; a Node deleted behind our back is registered again (as a restarted kubelet would).
async fn heartbeats(shared: Arc<Shared>, node: String, mut stop: watch::Receiver<bool>) {
    let mut stopped = shared.stopped.subscribe();
    let mut tick = tokio::time::interval(shared.cfg.heartbeat_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = stopped.changed() => return,
            _ = tick.tick() => {}
        }
        let Some((n, shutting_down)) = shared
            .lock()
            .nodes
            .get(&node)
            .map(|e| (e.settings.clone(), e.shutting_down))
        else {
            return;
        };
        if let Err(e) = node::heartbeat(&shared.client, &n, shutting_down).await {
            if *stop.borrow() {
                return;
            }
            tracing::warn!(node = %n.name, error = %format!("{e:#}"), "kubelet heartbeat");
            if let Err(e) = node::register(&shared.client, &n, &shared.cfg.node_ip).await {
                tracing::warn!(node = %n.name, error = %format!("{e:#}"), "kubelet re-registration");
            }
        }
    }
}

async fn watch_pods(shared: Arc<Shared>, node: String, mut stop: watch::Receiver<bool>) {
    let mut stopped = shared.stopped.subscribe();
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = std::pin::pin!(watcher::watcher(pods, cfg));
    // Pods seen during a relist: any pod of ours not among them is gone.
    let mut relist: Option<HashSet<String>> = None;
    loop {
        let next = tokio::select! {
            _ = stop.changed() => return,
            _ = stopped.changed() => return,
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
    let Some(node_entry) = state.nodes.get(node) else {
        // The node was just removed; its watch is ending.
        return;
    };
    if node_entry.shutting_down {
        // The shutdown manager's admission: the pod fails without running.
        state.done.insert(uid);
        let shared = shared.clone();
        drop(state);
        tokio::spawn(reject(shared, pod, NODE_SHUTDOWN_NOT_ADMITTED));
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

/// A pod the node does not admit: phase `Failed` with the admission's reason and message.
async fn reject(shared: Arc<Shared>, pod: Pod, (reason, message): (&str, &str)) {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &namespace);
    let patch =
        serde_json::json!({"status": {"phase": "Failed", "reason": reason, "message": message}});
    if let Err(e) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::debug!(error = %e, "kubelet: reject pod");
    }
    shared.emit(KubeletEvent::PodFinished {
        namespace,
        pod: name,
        phase: "Failed".into(),
        reason: Some(reason.into()),
        disruption: None,
        started: false,
        init: Vec::new(),
        containers: Vec::new(),
        deleted: false,
    });
}
