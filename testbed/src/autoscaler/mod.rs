//! A cluster-autoscaler model for the test bed: node groups that grow for unschedulable pods
//! and shrink when nodes stay unneeded, as cluster-autoscaler (CA) v1.28 does it, over the test
//! bed's [`kubelet`](crate::kubelet) (which plays the machines) and a real control plane (whose
//! scheduler binds the pods to the new nodes).
//!
//! **Modelled** (CA's FAQ and source; reasons and messages are CA's):
//! - The loop: every [`AutoscalerConfig::scan_interval`] the Pods and Nodes are listed (CA
//!   reads informer caches). Pods with `PodScheduled=False`/`Unschedulable` (and no nominated
//!   node) are considered; those below the expendable priority cutoff never trigger a scale-up;
//!   those the scheduler can still place on a Ready node or on a node coming up (provisioning,
//!   or registered but still carrying the `not-ready` taint the API server puts on new Nodes)
//!   are left to it (`FilterOutSchedulable`).
//! - Scale-up: each group's node template (capacity, labels, taints) runs the scheduler's
//!   filters (unschedulable, taints/tolerations, node selector and required node affinity,
//!   resources: larger of the containers' sum and the largest init container, plus overhead;
//!   pod count); a binpacking estimator (first-fit decreasing) counts nodes, capped at the
//!   group's maximum; one group grows per loop (the option helping most pods). Each helped pod
//!   gets `TriggeredScaleUp` (`pod triggered scale-up: [{group 0->1 (max: 3)}]`); the node is
//!   added after [`AutoscalerConfig::scale_up_delay`] (provisioning, until Ready). When no group
//!   helps, every pod gets `NotTriggerScaleUp` with CA's aggregated reasons
//!   (`pod didn't trigger scale-up: 1 Insufficient cpu, 1 max node group size reached`).
//! - Events go through client-go's recorder as CA configures it: source `cluster-autoscaler`,
//!   one event per involved object per [`AutoscalerConfig::event_spam_window`] (5 min; burst 1),
//!   a repeat of an identical event bumps its `count`.
//! - Scale-down: a group's node is unneeded when its cpu/memory requests are below the
//!   utilization threshold, no pod blocks (not replicated, kube-system, `safe-to-evict: "false"`,
//!   local storage, Karpenter's `do-not-disrupt`) and its pods fit elsewhere; after
//!   [`AutoscalerConfig::scale_down_unneeded_time`] it is tainted `ToBeDeletedByClusterAutoscaler`
//!   (`ScaleDown` event); its pods are listed again (one bound since the scan cancels the
//!   removal: [`AutoscalerEvent::ScaleDownFailed`]), the planned ones evicted through the
//!   Eviction API (`ScaleDown` event on each),
//!   and the machine removed (`node removed by cluster autoscaler`). Empty nodes go in bulk,
//!   occupied ones one at a time; cooldowns after a scale-up and a failure; the group minimum is
//!   kept. Why a node stays is recorded as [`AutoscalerEvent::ScaleDownBlocked`] with CA's
//!   reason names (CA reports these in its status ConfigMap and logs, not as Events).
//! - Test commands: [`Autoscaler::drain`] (cordon, evict every pod, wait until they are gone, as
//!   `kubectl drain` or a termination handler does) and [`Autoscaler::reclaim_spot`] (graceful
//!   node shutdown without a drain handler, see
//!   [`KubeletHandle::shutdown_node`](crate::kubelet::KubeletHandle::shutdown_node), then the
//!   node is gone).
//!
//! **Not modelled**: PodDisruptionBudgets (evictions honour them, as the API server enforces
//! them, but the scale-down simulation does not read them), pod affinity/anti-affinity and
//! topology spread, volumes' zones, DaemonSet pods on templates, the random/least-waste/price
//! expanders, balancing similar groups, cloud quota and backoff after failed provisioning,
//! unready-node handling and `max-node-provision-time`, cluster-wide resource limits, the status
//! ConfigMap, the recorder's aggregation of similar events. Karpenter's consolidation is not
//! modelled either (only its `do-not-disrupt` annotation is honoured).
//!
//! Tests sharing one control plane scope each autoscaler to their namespaces
//! ([`AutoscalerConfig::namespaces`]); CA itself watches every pod.

pub mod sim;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Taint};
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::events::{self, EventName, EventSpec};
use crate::kubelet::{KubeletHandle, NodeSettings};
use sim::{
    Candidate, DrainRules, GroupView, NodeFacts, PodDrain, PodFacts, Resources, ScaleUpPlan,
    Unremovable,
};

/// The taint CA puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// A Node annotation that keeps CA from scaling it down.
pub const SCALE_DOWN_DISABLED: &str = "cluster-autoscaler.kubernetes.io/scale-down-disabled";
/// The label saying whether a node is spot or on-demand capacity (Karpenter's well-known one).
pub const CAPACITY_TYPE_LABEL: &str = "karpenter.sh/capacity-type";
/// The events' `source.component`.
pub const COMPONENT: &str = "cluster-autoscaler";
/// CA's `EvictionRetryTime`: the pause between eviction attempts a PDB refused (429).
const EVICTION_RETRY: Duration = Duration::from_secs(10);
/// CA's `MaxPodEvictionTime`: how long refused evictions are retried.
const MAX_POD_EVICTION_TIME: Duration = Duration::from_secs(120);
/// CA's `podEvictionHeadroom`: extra wait for evicted pods beyond their grace period.
const EVICTION_HEADROOM: Duration = Duration::from_secs(30);

/// One node group (an ASG, a MIG, a node pool): identical nodes between a minimum and a maximum.
#[derive(Debug, Clone)]
pub struct NodeGroup {
    pub name: String,
    /// Per node, as Kubernetes quantities.
    pub cpu: String,
    pub memory: String,
    pub ephemeral_storage: String,
    pub pods: String,
    /// Put on every node (and its template). [`CAPACITY_TYPE_LABEL`] is added from `spot`.
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub min_size: usize,
    pub max_size: usize,
    /// Spot capacity: [`Autoscaler::reclaim_spot`] may take its nodes.
    pub spot: bool,
    /// Nodes that exist when the autoscaler starts (Ready before [`Autoscaler::start`] returns).
    pub initial_size: usize,
}

impl NodeGroup {
    /// A group of 4-cpu/16Gi nodes, empty at start.
    pub fn new(name: impl Into<String>, min_size: usize, max_size: usize) -> Self {
        NodeGroup {
            name: name.into(),
            cpu: "4".into(),
            memory: "16Gi".into(),
            ephemeral_storage: "100Gi".into(),
            pods: "110".into(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            min_size,
            max_size,
            spot: false,
            initial_size: 0,
        }
    }

    /// The labels its nodes carry (the template's, plus the hostname the kubelet adds).
    fn node_labels(&self, node: &str) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        labels.insert(
            CAPACITY_TYPE_LABEL.into(),
            if self.spot { "spot" } else { "on-demand" }.into(),
        );
        labels.insert("kubernetes.io/hostname".into(), node.into());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        labels.insert("kubernetes.io/arch".into(), "amd64".into());
        labels
    }

    fn node_settings(&self, node: &str) -> NodeSettings {
        let mut labels = self.labels.clone();
        labels.insert(
            CAPACITY_TYPE_LABEL.into(),
            if self.spot { "spot" } else { "on-demand" }.into(),
        );
        NodeSettings {
            name: node.into(),
            cpu: self.cpu.clone(),
            memory: self.memory.clone(),
            ephemeral_storage: self.ephemeral_storage.clone(),
            pods: self.pods.clone(),
            labels,
            taints: self.taints.clone(),
        }
    }
}

/// How the autoscaler behaves; [`Default`] is CA's defaults, [`AutoscalerConfig::quick`] suits
/// tests.
#[derive(Debug, Clone)]
pub struct AutoscalerConfig {
    pub groups: Vec<NodeGroup>,
    /// `--scan-interval` (10 s).
    pub scan_interval: Duration,
    /// Provisioning: from the scale-up decision until the new node is registered and Ready.
    pub scale_up_delay: Duration,
    /// `--scale-down-enabled`.
    pub scale_down_enabled: bool,
    /// `--scale-down-unneeded-time` (10 min).
    pub scale_down_unneeded_time: Duration,
    /// `--scale-down-delay-after-add` (10 min).
    pub scale_down_delay_after_add: Duration,
    /// `--scale-down-delay-after-failure` (3 min).
    pub scale_down_delay_after_failure: Duration,
    /// `--scale-down-utilization-threshold` (0.5).
    pub scale_down_utilization_threshold: f64,
    /// `--expendable-pods-priority-cutoff` (-10): pods below it never trigger a scale-up and
    /// never block a scale-down.
    pub expendable_pods_priority_cutoff: i32,
    /// `--max-graceful-termination-sec` (600 s): the longest grace an eviction gives.
    pub max_graceful_termination: Duration,
    /// `--skip-nodes-with-local-storage` (true).
    pub skip_nodes_with_local_storage: bool,
    /// `--skip-nodes-with-system-pods` (true).
    pub skip_nodes_with_system_pods: bool,
    /// The event recorder's spam window per object (5 min); zero is
    /// `--record-duplicated-events`.
    pub event_spam_window: Duration,
    /// The kubelet's `shutdownGracePeriod` on a spot reclaim (30 s).
    pub shutdown_grace_period: Duration,
    /// Only pods in these namespaces are looked at (empty: all, as CA).
    pub namespaces: Vec<String>,
    /// Put before every node name (`{prefix}{group}-{n}`): Nodes are cluster-wide, so models
    /// of tests sharing one control plane must not name theirs alike (one's scale-down would
    /// delete the other's node under its running pods).
    pub node_prefix: String,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        AutoscalerConfig {
            groups: Vec::new(),
            scan_interval: Duration::from_secs(10),
            scale_up_delay: Duration::from_secs(30),
            scale_down_enabled: true,
            scale_down_unneeded_time: Duration::from_secs(600),
            scale_down_delay_after_add: Duration::from_secs(600),
            scale_down_delay_after_failure: Duration::from_secs(180),
            scale_down_utilization_threshold: 0.5,
            expendable_pods_priority_cutoff: -10,
            max_graceful_termination: Duration::from_secs(600),
            skip_nodes_with_local_storage: true,
            skip_nodes_with_system_pods: true,
            event_spam_window: Duration::from_secs(300),
            shutdown_grace_period: Duration::from_secs(30),
            namespaces: Vec::new(),
            node_prefix: String::new(),
        }
    }
}

impl AutoscalerConfig {
    /// CA's behaviour on a test's clock: a 1 s scan, 1 s provisioning, nodes unneeded for 3 s
    /// removed, scale-down resumes 5 s after a scale-up (time for the scheduler to bind the
    /// pods the new nodes are for).
    pub fn quick(groups: Vec<NodeGroup>) -> Self {
        AutoscalerConfig {
            groups,
            scan_interval: Duration::from_secs(1),
            scale_up_delay: Duration::from_secs(1),
            scale_down_unneeded_time: Duration::from_secs(3),
            scale_down_delay_after_add: Duration::from_secs(5),
            scale_down_delay_after_failure: Duration::from_secs(5),
            max_graceful_termination: Duration::from_secs(30),
            shutdown_grace_period: Duration::from_secs(10),
            ..AutoscalerConfig::default()
        }
    }
}

/// Why a node went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalCause {
    /// Unneeded for long enough: drained and deleted by the autoscaler.
    ScaleDown,
    /// Reclaimed by the cloud ([`Autoscaler::reclaim_spot`]).
    SpotReclaim,
}

/// What the autoscaler did, in order. Pods are `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoscalerEvent {
    /// A group was asked for nodes; each pod got `TriggeredScaleUp`.
    ScaleUp {
        group: String,
        from: usize,
        to: usize,
        max: usize,
        nodes: Vec<String>,
        pods: Vec<String>,
    },
    /// A requested node registered and is Ready.
    NodeReady { group: String, node: String },
    /// Provisioning a node failed; it was given up.
    ScaleUpFailed {
        group: String,
        node: String,
        error: String,
    },
    /// A `NotTriggerScaleUp` event was written on the pod (after the recorder's spam filter).
    NotTriggerScaleUp { pod: String, message: String },
    /// The node became unneeded (its unneeded time starts).
    Unneeded { node: String },
    /// The node cannot be removed (recorded when the reason changes).
    ScaleDownBlocked { node: String, reason: Unremovable },
    /// Scale-down of the node began: tainted `ToBeDeletedByClusterAutoscaler`, its pods
    /// (listed) about to be evicted.
    ScaleDown {
        group: String,
        node: String,
        pods: Vec<String>,
    },
    /// The Eviction API accepted the eviction of a pod.
    Evicted { node: String, pod: String },
    /// A pod could not be evicted (a PDB kept answering 429, or an error).
    EvictionFailed {
        node: String,
        pod: String,
        error: String,
    },
    /// Scale-down of the node was abandoned (its taint removed).
    ScaleDownFailed { node: String, error: String },
    /// [`Autoscaler::drain`] finished: cordoned, these pods evicted and gone.
    Drained { node: String, pods: Vec<String> },
    /// [`Autoscaler::reclaim_spot`] began: the node is shutting down with these pods.
    SpotReclaim { node: String, pods: Vec<String> },
    /// The node is gone (machine removed, Node object deleted).
    NodeRemoved {
        group: String,
        node: String,
        cause: RemovalCause,
    },
}

/// Where a node of a group is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Provisioning,
    Ready,
    /// [`Autoscaler::drain`] is emptying it.
    Draining,
    /// Being scaled down or reclaimed.
    Deleting,
}

#[derive(Debug, Clone)]
struct Managed {
    group: usize,
    phase: Phase,
}

/// An event the recorder decided to write.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    Create(EventName),
    Bump(EventName, i32),
}

/// client-go's recorder as CA configures it: the spam filter (one event per object per
/// window) and the repeat counting of identical events.
#[derive(Debug, Default)]
struct Recorder {
    window: Duration,
    /// Spam key (source + involved object) → when its last event was accepted.
    accepted: HashMap<String, Instant>,
    /// Event key (spam key + type, reason, message) → the event written and its count.
    seen: HashMap<String, (EventName, i32)>,
}

impl Recorder {
    fn decide(
        &mut self,
        object: &ObjectReference,
        type_: &str,
        reason: &str,
        message: &str,
        now: Instant,
        wall: jiff::Timestamp,
    ) -> Option<Write> {
        let spam_key = format!(
            "{COMPONENT}/{}/{}/{}/{}/{}",
            object.kind.as_deref().unwrap_or_default(),
            object.namespace.as_deref().unwrap_or_default(),
            object.name.as_deref().unwrap_or_default(),
            object.uid.as_deref().unwrap_or_default(),
            object.api_version.as_deref().unwrap_or_default(),
        );
        let since = self.accepted.get(&spam_key).map(|t| now.duration_since(*t));
        if !sim::spam_filter_allows(since, self.window) {
            return None;
        }
        self.accepted.insert(spam_key.clone(), now);
        let key = format!("{spam_key}/{type_}/{reason}/{message}");
        match self.seen.get_mut(&key) {
            Some((at, count)) => {
                *count += 1;
                Some(Write::Bump(at.clone(), *count))
            }
            None => {
                let at = events::event_name(object, wall);
                self.seen.insert(key, (at.clone(), 1));
                Some(Write::Create(at))
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    nodes: BTreeMap<String, Managed>,
    /// Next node number per group.
    next_index: Vec<usize>,
    unneeded_since: HashMap<String, Instant>,
    blocked: HashMap<String, Unremovable>,
    recorder: Recorder,
    last_scale_up: Option<Instant>,
    last_scale_down_failure: Option<Instant>,
    /// An occupied node is being scaled down (CA takes them one at a time).
    occupied_deletion: bool,
    history: Vec<AutoscalerEvent>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    client: Client,
    kubelet: KubeletHandle,
    cfg: AutoscalerConfig,
    /// Each group's per-node allocatable.
    capacity: Vec<Resources>,
    state: Mutex<State>,
    /// The history's length, for waiters.
    seq: watch::Sender<usize>,
    /// Completed scan loops.
    scans: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: AutoscalerEvent) {
        tracing::info!(?event, "autoscaler");
        let len = {
            let mut st = self.lock();
            st.history.push(event);
            st.history.len()
        };
        self.seq.send_replace(len);
    }

    fn spawn(self: &Arc<Self>, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let mut st = self.lock();
        st.tasks.retain(|t| !t.is_finished());
        st.tasks.push(handle);
    }

    fn in_scope(&self, pod: &Pod) -> bool {
        self.cfg.namespaces.is_empty()
            || pod
                .namespace()
                .is_some_and(|ns| self.cfg.namespaces.contains(&ns))
    }

    fn template(&self, group: usize, name: &str) -> NodeFacts {
        let g = &self.cfg.groups[group];
        NodeFacts {
            name: name.into(),
            labels: g.node_labels(name),
            taints: g.taints.clone(),
            unschedulable: false,
            allocatable: self.capacity[group],
            requested: Resources::default(),
        }
    }

    /// Write an event through the recorder; whether it was written.
    async fn record(
        &self,
        object: &ObjectReference,
        type_: &str,
        reason: &str,
        message: &str,
    ) -> bool {
        let decision = self.lock().recorder.decide(
            object,
            type_,
            reason,
            message,
            Instant::now(),
            jiff::Timestamp::now(),
        );
        let spec = EventSpec {
            object,
            type_,
            reason,
            message,
            component: COMPONENT,
            host: None,
        };
        let written = match decision {
            None => return false,
            Some(Write::Create(at)) => events::create(&self.client, &at, &spec).await,
            Some(Write::Bump(at, count)) => match events::bump(&self.client, &at, count).await {
                Ok(true) => Ok(()),
                Ok(false) => {
                    let fresh = events::event_name(object, jiff::Timestamp::now());
                    events::create(&self.client, &fresh, &spec).await
                }
                Err(e) => Err(e),
            },
        };
        match written {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), reason, "autoscaler: event");
                false
            }
        }
    }
}

/// The running autoscaler; stops on drop.
pub struct Autoscaler {
    shared: Arc<Shared>,
}

/// A lossless reader of the autoscaler's history, from the moment it was made.
pub struct AutoscalerCursor {
    shared: Arc<Shared>,
    next: usize,
    rx: watch::Receiver<usize>,
}

impl AutoscalerCursor {
    /// The next event (waits for it).
    pub async fn next(&mut self) -> Option<AutoscalerEvent> {
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

impl Autoscaler {
    /// Check the groups, bring up their initial nodes and start the loop. `kubelet` plays the
    /// machines ([`crate::kubelet::Kubelet::handle`]).
    pub async fn start(
        client: Client,
        kubelet: KubeletHandle,
        cfg: AutoscalerConfig,
    ) -> Result<Autoscaler> {
        let mut names = HashSet::new();
        let mut capacity = Vec::new();
        for g in &cfg.groups {
            if !names.insert(g.name.as_str()) {
                bail!("node group {} is defined twice", g.name);
            }
            if g.min_size > g.max_size || g.initial_size > g.max_size {
                bail!(
                    "node group {}: need min ({}) and initial ({}) sizes at most max ({})",
                    g.name,
                    g.min_size,
                    g.initial_size,
                    g.max_size
                );
            }
            capacity.push(
                Resources::parse(&g.cpu, &g.memory, &g.ephemeral_storage, &g.pods)
                    .with_context(|| format!("node group {}: a malformed quantity", g.name))?,
            );
        }
        let (seq, _) = watch::channel(0);
        let (scans, _) = watch::channel(0);
        let state = State {
            next_index: vec![1; cfg.groups.len()],
            recorder: Recorder {
                window: cfg.event_spam_window,
                ..Recorder::default()
            },
            ..State::default()
        };
        let shared = Arc::new(Shared {
            client,
            kubelet,
            cfg,
            capacity,
            state: Mutex::new(state),
            seq,
            scans,
        });
        for gi in 0..shared.cfg.groups.len() {
            for _ in 0..shared.cfg.groups[gi].initial_size {
                let name = new_node(&shared, gi);
                provision(shared.clone(), gi, name, Duration::ZERO).await;
            }
        }
        let looped = shared.clone();
        shared.spawn(async move { run(looped).await });
        Ok(Autoscaler { shared })
    }

    /// Every event so far.
    pub fn history(&self) -> Vec<AutoscalerEvent> {
        self.shared.lock().history.clone()
    }

    /// A lossless cursor over events from now on.
    pub fn cursor(&self) -> AutoscalerCursor {
        let rx = self.shared.seq.subscribe();
        let next = self.shared.lock().history.len();
        AutoscalerCursor {
            shared: self.shared.clone(),
            next,
            rx,
        }
    }

    /// Wait (up to `timeout`) for an event matching `pred`, including ones already past.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&AutoscalerEvent) -> bool,
    ) -> Result<AutoscalerEvent> {
        let mut cursor = AutoscalerCursor {
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
            bail!("autoscaler stopped")
        })
        .await
        .map_err(|_| {
            anyhow!(
                "no matching autoscaler event within {timeout:?}; history: {:#?}",
                self.history()
            )
        })?
    }

    /// Wait until `n` more scan loops have completed (to show that something did not happen).
    pub async fn wait_scans(&self, n: u64) -> Result<()> {
        let mut rx = self.shared.scans.subscribe();
        let target = *rx.borrow_and_update() + n;
        let limit = self.shared.cfg.scan_interval * u32::try_from(n + 2).unwrap_or(u32::MAX)
            + Duration::from_secs(30);
        tokio::time::timeout(limit, rx.wait_for(|s| *s >= target))
            .await
            .map_err(|_| anyhow!("{n} scans did not complete within {limit:?}"))?
            .map_err(|_| anyhow!("autoscaler stopped"))?;
        Ok(())
    }

    /// The nodes a group has now (provisioning ones included), by name.
    pub fn nodes(&self, group: &str) -> Vec<String> {
        let Some(gi) = self.shared.cfg.groups.iter().position(|g| g.name == group) else {
            return Vec::new();
        };
        self.shared
            .lock()
            .nodes
            .iter()
            .filter(|(_, m)| m.group == gi)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Drain a node as `kubectl drain` (or a spot termination handler) does: cordon it, evict
    /// every pod but mirror, DaemonSet and finished ones through the Eviction API (each with its
    /// own grace period; the API server adds `DisruptionTarget`/`EvictionByEvictionAPI`, the
    /// kubelet stops the pod and reports it `Failed`), and wait until they are gone. The node
    /// stays, cordoned (scale-down removes it once unneeded).
    pub async fn drain(&self, node: &str) -> Result<()> {
        let sh = &self.shared;
        let previous = {
            let mut st = sh.lock();
            st.nodes.get_mut(node).map(|m| {
                let p = m.phase;
                if p == Phase::Ready {
                    m.phase = Phase::Draining;
                }
                p
            })
        };
        if previous == Some(Phase::Deleting) {
            bail!("node {node} is being deleted");
        }
        let result = drain_node(sh, node).await;
        if previous == Some(Phase::Ready)
            && let Some(m) = sh.lock().nodes.get_mut(node)
            && m.phase == Phase::Draining
        {
            m.phase = Phase::Ready;
        }
        let pods = result?;
        sh.emit(AutoscalerEvent::Drained {
            node: node.into(),
            pods,
        });
        Ok(())
    }

    /// The cloud reclaims a spot node with no drain handler: graceful node shutdown (pods get
    /// `DisruptionTarget`/`TerminationByKubelet` and end `Failed`, reason `Terminated`), then
    /// the node is gone. Only nodes of spot groups can be reclaimed.
    pub async fn reclaim_spot(&self, node: &str) -> Result<()> {
        let sh = &self.shared;
        let group = {
            let mut st = sh.lock();
            let m = st
                .nodes
                .get_mut(node)
                .with_context(|| format!("node {node} does not belong to a node group"))?;
            let g = &sh.cfg.groups[m.group];
            if !g.spot {
                bail!(
                    "node {node} is on-demand capacity (group {}): not reclaimed",
                    g.name
                );
            }
            if matches!(m.phase, Phase::Provisioning | Phase::Deleting) {
                bail!("node {node} is {:?}", m.phase);
            }
            m.phase = Phase::Deleting;
            g.name.clone()
        };
        let pods = pods_on(&sh.client, node)
            .await
            .unwrap_or_default()
            .iter()
            .filter(|p| !is_terminal(p))
            .map(key)
            .collect();
        sh.emit(AutoscalerEvent::SpotReclaim {
            node: node.into(),
            pods,
        });
        let result = sh
            .kubelet
            .shutdown_node(node, sh.cfg.shutdown_grace_period)
            .await;
        forget_node(sh, node);
        result?;
        sh.emit(AutoscalerEvent::NodeRemoved {
            group,
            node: node.into(),
            cause: RemovalCause::SpotReclaim,
        });
        Ok(())
    }

    /// Stop the loop and every provisioning or deletion under way; idempotent.
    pub fn stop(&self) {
        let mut st = self.shared.lock();
        for t in st.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Autoscaler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// A pod the scheduler gave up on: `PodScheduled=False`, reason `Unschedulable`, not bound, not
/// being deleted, not waiting for a preemption.
fn is_unschedulable(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    spec.and_then(|s| s.node_name.as_deref())
        .is_none_or(str::is_empty)
        && pod.metadata.deletion_timestamp.is_none()
        && !is_terminal(pod)
        && status
            .and_then(|s| s.nominated_node_name.as_deref())
            .is_none_or(str::is_empty)
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
            })
}

/// Ready as CA's readiness check sees it: condition `Ready=True` and no `not-ready` or
/// `unreachable` taint (the API server's NodeTaint admission puts `not-ready` on every new Node
/// until the node lifecycle controller sees it Ready).
fn node_ready(node: &Node) -> bool {
    let condition = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| {
            ts.iter().any(|t| {
                t.key == "node.kubernetes.io/not-ready" || t.key == "node.kubernetes.io/unreachable"
            })
        });
    condition && !tainted
}

/// A real node's scheduling facts, its pods' requests summed.
fn node_facts(node: &Node, pods: &[&Pod]) -> NodeFacts {
    let spec = node.spec.clone().unwrap_or_default();
    NodeFacts {
        name: node.name_any(),
        labels: node.labels().clone(),
        taints: spec.taints.unwrap_or_default(),
        unschedulable: spec.unschedulable == Some(true),
        allocatable: Resources::from_map(node.status.as_ref().and_then(|s| s.allocatable.as_ref())),
        requested: pods
            .iter()
            .map(|p| sim::pod_requests(&p.spec.clone().unwrap_or_default()))
            .fold(Resources::default(), |a, b| Resources {
                milli_cpu: a.milli_cpu + b.milli_cpu,
                memory: a.memory + b.memory,
                ephemeral_storage: a.ephemeral_storage + b.ephemeral_storage,
                pods: a.pods + b.pods,
            }),
    }
}

/// Reserve a name for a group's next node and count it as provisioning.
fn new_node(sh: &Shared, group: usize) -> String {
    let mut st = sh.lock();
    let index = st.next_index[group];
    st.next_index[group] += 1;
    let name = format!(
        "{}{}-{index}",
        sh.cfg.node_prefix, sh.cfg.groups[group].name
    );
    st.nodes.insert(
        name.clone(),
        Managed {
            group,
            phase: Phase::Provisioning,
        },
    );
    name
}

/// Provisioning: after `delay`, the machine joins (the kubelet registers a Ready Node).
async fn provision(sh: Arc<Shared>, group: usize, node: String, delay: Duration) {
    tokio::time::sleep(delay).await;
    let g = &sh.cfg.groups[group];
    match sh.kubelet.add_node(g.node_settings(&node)).await {
        Ok(()) => {
            if let Some(m) = sh.lock().nodes.get_mut(&node) {
                m.phase = Phase::Ready;
            }
            sh.emit(AutoscalerEvent::NodeReady {
                group: g.name.clone(),
                node,
            });
        }
        Err(e) => {
            sh.lock().nodes.remove(&node);
            sh.emit(AutoscalerEvent::ScaleUpFailed {
                group: g.name.clone(),
                node,
                error: format!("{e:#}"),
            });
        }
    }
}

fn forget_node(sh: &Shared, node: &str) {
    let mut st = sh.lock();
    st.nodes.remove(node);
    st.unneeded_since.remove(node);
    st.blocked.remove(node);
}

async fn run(sh: Arc<Shared>) {
    let mut tick = tokio::time::interval(sh.cfg.scan_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = run_once(&sh).await {
            tracing::warn!(error = %format!("{e:#}"), "autoscaler loop");
        }
        sh.scans.send_modify(|n| *n += 1);
    }
}

/// One iteration of CA's `RunOnce`: scale up for unschedulable pods, else consider scale-down.
async fn run_once(sh: &Arc<Shared>) -> Result<()> {
    let nodes = Api::<Node>::all(sh.client.clone())
        .list(&ListParams::default())
        .await
        .context("list Nodes")?
        .items;
    let pods = Api::<Pod>::all(sh.client.clone())
        .list(&ListParams::default())
        .await
        .context("list Pods")?
        .items;
    let mut bound: HashMap<String, Vec<&Pod>> = HashMap::new();
    for p in pods.iter().filter(|p| !is_terminal(p)) {
        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.as_deref())
            && !n.is_empty()
        {
            bound.entry(n.to_string()).or_default().push(p);
        }
    }
    let no_pods = Vec::new();
    let ready: Vec<&Node> = nodes.iter().filter(|n| node_ready(n)).collect();
    let facts: Vec<NodeFacts> = ready
        .iter()
        .map(|n| node_facts(n, bound.get(&n.name_any()).unwrap_or(&no_pods)))
        .collect();

    if scale_up(sh, &pods, &facts).await {
        return Ok(());
    }
    if sh.cfg.scale_down_enabled {
        scale_down(sh, &ready, &facts, &bound).await;
    }
    Ok(())
}

/// The scale-up half; true when a group was grown (scale-down then waits for the next loop).
async fn scale_up(sh: &Arc<Shared>, pods: &[Pod], facts: &[NodeFacts]) -> bool {
    let cutoff = sh.cfg.expendable_pods_priority_cutoff;
    let pending: Vec<&Pod> = pods
        .iter()
        .filter(|p| sh.in_scope(p) && is_unschedulable(p))
        .filter(|p| p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0) >= cutoff)
        .collect();
    if pending.is_empty() {
        return false;
    }
    let pod_facts: Vec<PodFacts> = pending.iter().map(|p| PodFacts::of(p)).collect();
    let (mut sim_nodes, groups) = {
        let st = sh.lock();
        let mut sim_nodes: Vec<NodeFacts> = facts
            .iter()
            .filter(|f| {
                st.nodes
                    .get(&f.name)
                    .is_none_or(|m| m.phase != Phase::Deleting)
            })
            .cloned()
            .collect();
        // Nodes coming up (provisioning, or registered but not ready yet) count as empty
        // templates, as CA counts its upcoming and not-started nodes.
        for (name, m) in &st.nodes {
            let starting = m.phase != Phase::Deleting && !facts.iter().any(|f| f.name == *name);
            if starting {
                sim_nodes.push(sh.template(m.group, name));
            }
        }
        let groups: Vec<GroupView> = sh
            .cfg
            .groups
            .iter()
            .enumerate()
            .map(|(gi, g)| GroupView {
                name: g.name.clone(),
                template: sh.template(gi, &format!("template-node-for-{}", g.name)),
                target_size: st.nodes.values().filter(|m| m.group == gi).count(),
                max_size: g.max_size,
            })
            .collect();
        (sim_nodes, groups)
    };
    let left = sim::filter_out_schedulable(&pod_facts, &mut sim_nodes);
    if left.is_empty() {
        return false;
    }
    let left_facts: Vec<PodFacts> = left.iter().map(|i| pod_facts[*i].clone()).collect();
    match sim::plan_scale_up(&left_facts, &groups) {
        ScaleUpPlan::Grow(up) => {
            let g = &sh.cfg.groups[up.group];
            let new_nodes: Vec<String> = (up.from..up.to).map(|_| new_node(sh, up.group)).collect();
            sh.lock().last_scale_up = Some(Instant::now());
            let helped: Vec<&Pod> = up.pods.iter().map(|i| pending[left[*i]]).collect();
            sh.emit(AutoscalerEvent::ScaleUp {
                group: g.name.clone(),
                from: up.from,
                to: up.to,
                max: up.max,
                nodes: new_nodes.clone(),
                pods: helped.iter().map(|p| key(p)).collect(),
            });
            for n in new_nodes {
                let task = provision(sh.clone(), up.group, n, sh.cfg.scale_up_delay);
                sh.spawn(task);
            }
            let message = sim::triggered_message(&g.name, up.from, up.to, up.max);
            for p in helped {
                sh.record(
                    &events::reference(p),
                    "Normal",
                    "TriggeredScaleUp",
                    &message,
                )
                .await;
            }
            true
        }
        ScaleUpPlan::NoOptions(messages) => {
            for (i, message) in messages {
                let p = pending[left[i]];
                if sh
                    .record(
                        &events::reference(p),
                        "Normal",
                        "NotTriggerScaleUp",
                        &message,
                    )
                    .await
                {
                    sh.emit(AutoscalerEvent::NotTriggerScaleUp {
                        pod: key(p),
                        message,
                    });
                }
            }
            false
        }
    }
}

/// The scale-down half: track unneeded nodes, remove those unneeded long enough.
async fn scale_down(
    sh: &Arc<Shared>,
    ready: &[&Node],
    facts: &[NodeFacts],
    bound: &HashMap<String, Vec<&Pod>>,
) {
    let now = Instant::now();
    let rules = drain_rules(&sh.cfg);
    let no_pods = Vec::new();
    let mut events = Vec::new();
    let mut chosen: Vec<(String, usize, Vec<Pod>)> = Vec::new();
    {
        let mut st = sh.lock();
        let candidates: Vec<(&Node, usize)> = ready
            .iter()
            .filter_map(|n| {
                st.nodes
                    .get(&n.name_any())
                    .filter(|m| m.phase == Phase::Ready)
                    .map(|m| (*n, m.group))
            })
            .collect();
        let deleting: HashSet<&String> = st
            .nodes
            .iter()
            .filter(|(_, m)| m.phase == Phase::Deleting)
            .map(|(n, _)| n)
            .collect();
        let destinations: Vec<NodeFacts> = facts
            .iter()
            .filter(|f| !deleting.contains(&f.name))
            .cloned()
            .collect();
        let built: Vec<Candidate> = candidates
            .iter()
            .map(|(node, _)| {
                let pods = bound.get(&node.name_any()).unwrap_or(&no_pods);
                Candidate {
                    node: node_facts(node, pods),
                    scale_down_disabled: node
                        .annotations()
                        .get(SCALE_DOWN_DISABLED)
                        .map(String::as_str)
                        == Some("true"),
                    pods: pods
                        .iter()
                        .map(|p| (PodFacts::of(p), sim::drain_pod(p, &rules)))
                        .collect(),
                }
            })
            .collect();
        let results: Vec<(String, Result<Vec<String>, Unremovable>)> = built
            .iter()
            .map(|c| c.node.name.clone())
            .zip(sim::find_unneeded(
                &built,
                &destinations,
                sh.cfg.scale_down_utilization_threshold,
            ))
            .collect();
        let removable: HashMap<String, Vec<String>> = results
            .iter()
            .filter_map(|(n, r)| r.as_ref().ok().map(|e| (n.clone(), e.clone())))
            .collect();
        for (name, result) in results {
            match result {
                Ok(_) => {
                    st.blocked.remove(&name);
                    if !st.unneeded_since.contains_key(&name) {
                        st.unneeded_since.insert(name.clone(), now);
                        events.push(AutoscalerEvent::Unneeded { node: name });
                    }
                }
                Err(reason) => {
                    st.unneeded_since.remove(&name);
                    note_blocked(&mut st, &mut events, &name, reason);
                }
            }
        }
        let cooling = st
            .last_scale_up
            .is_some_and(|t| now < t + sh.cfg.scale_down_delay_after_add)
            || st
                .last_scale_down_failure
                .is_some_and(|t| now < t + sh.cfg.scale_down_delay_after_failure);
        if !cooling {
            let pods_by_key: HashMap<String, &Pod> =
                bound.values().flatten().map(|p| (key(p), *p)).collect();
            for (node, group) in &candidates {
                let name = node.name_any();
                let Some(evict) = removable.get(&name) else {
                    continue;
                };
                if st
                    .unneeded_since
                    .get(&name)
                    .is_none_or(|t| now < *t + sh.cfg.scale_down_unneeded_time)
                {
                    continue;
                }
                let active = st
                    .nodes
                    .values()
                    .filter(|m| m.group == *group && m.phase != Phase::Deleting)
                    .count();
                if active <= sh.cfg.groups[*group].min_size {
                    note_blocked(
                        &mut st,
                        &mut events,
                        &name,
                        Unremovable::NodeGroupMinSizeReached,
                    );
                    continue;
                }
                if !evict.is_empty() {
                    if st.occupied_deletion {
                        continue;
                    }
                    st.occupied_deletion = true;
                }
                if let Some(m) = st.nodes.get_mut(&name) {
                    m.phase = Phase::Deleting;
                }
                let pods = evict
                    .iter()
                    .filter_map(|k| pods_by_key.get(k).map(|p| (*p).clone()))
                    .collect();
                chosen.push((name, *group, pods));
            }
        }
    }
    for e in events {
        sh.emit(e);
    }
    for (node, group, pods) in chosen {
        let task = delete_node(sh.clone(), node, group, pods);
        sh.spawn(task);
    }
}

fn note_blocked(
    st: &mut State,
    events: &mut Vec<AutoscalerEvent>,
    node: &str,
    reason: Unremovable,
) {
    if st.blocked.get(node) != Some(&reason) {
        st.blocked.insert(node.to_string(), reason.clone());
        events.push(AutoscalerEvent::ScaleDownBlocked {
            node: node.to_string(),
            reason,
        });
    }
}

/// CA's actuation of one node's scale-down; on failure the taint goes and the node stays.
async fn delete_node(sh: Arc<Shared>, node: String, group: usize, pods: Vec<Pod>) {
    let occupied = !pods.is_empty();
    let result = actuate(&sh, &node, group, pods).await;
    {
        let mut st = sh.lock();
        if occupied {
            st.occupied_deletion = false;
        }
        if result.is_err() {
            st.last_scale_down_failure = Some(Instant::now());
            if let Some(m) = st.nodes.get_mut(&node) {
                m.phase = Phase::Ready;
            }
            st.unneeded_since.remove(&node);
        }
    }
    match result {
        Ok(()) => {
            forget_node(&sh, &node);
            sh.emit(AutoscalerEvent::NodeRemoved {
                group: sh.cfg.groups[group].name.clone(),
                node,
                cause: RemovalCause::ScaleDown,
            });
        }
        Err(e) => {
            let error = format!("{e:#}");
            if let Err(e) = set_to_be_deleted(&sh.client, &node, false).await {
                tracing::warn!(error = %format!("{e:#}"), "autoscaler: untaint");
            }
            sh.emit(AutoscalerEvent::ScaleDownFailed { node, error });
        }
    }
}

async fn actuate(sh: &Arc<Shared>, node: &str, group: usize, pods: Vec<Pod>) -> Result<()> {
    let node_obj = set_to_be_deleted(&sh.client, node, true).await?;
    let node_ref = events::reference(&node_obj);
    // The scan's pod list is older than the taint: a pod bound in between cancels the removal
    // (the node is in use again) rather than being lost with the node.
    let newcomers = bound_since_scan(sh, node, &pods).await?;
    if !newcomers.is_empty() {
        bail!("pods were bound to {node} after the scan, the node is in use: {newcomers:?}");
    }
    sh.record(
        &node_ref,
        "Normal",
        "ScaleDown",
        "marked the node as toBeDeleted/unschedulable",
    )
    .await;
    sh.emit(AutoscalerEvent::ScaleDown {
        group: sh.cfg.groups[group].name.clone(),
        node: node.into(),
        pods: pods.iter().map(key).collect(),
    });
    let max_grace = i64::try_from(sh.cfg.max_graceful_termination.as_secs()).unwrap_or(i64::MAX);
    let evictions = pods.iter().map(|p| {
        let grace = p
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .min(max_grace);
        async move {
            sh.record(
                &events::reference(p),
                "Normal",
                "ScaleDown",
                "deleting pod for node scale down",
            )
            .await;
            match evict(&sh.client, p, Some(grace)).await {
                Ok(()) => {
                    sh.emit(AutoscalerEvent::Evicted {
                        node: node.into(),
                        pod: key(p),
                    });
                    Ok(())
                }
                Err(e) => {
                    sh.record(
                        &events::reference(p),
                        "Warning",
                        "ScaleDownFailed",
                        "failed to delete pod for ScaleDown",
                    )
                    .await;
                    let error = format!("{e:#}");
                    sh.emit(AutoscalerEvent::EvictionFailed {
                        node: node.into(),
                        pod: key(p),
                        error: error.clone(),
                    });
                    Err(anyhow!(
                        "failed to evict pod {} within allowed timeout (last error: {error})",
                        key(p)
                    ))
                }
            }
        }
    });
    for r in futures::future::join_all(evictions).await {
        r?;
    }
    let uids: HashSet<String> = pods.iter().filter_map(|p| p.uid()).collect();
    if !wait_gone(
        &sh.client,
        node,
        uids,
        sh.cfg.max_graceful_termination + EVICTION_HEADROOM,
    )
    .await
    {
        tracing::warn!(%node, "autoscaler: evicted pods still there; deleting the node anyway");
    }
    sh.kubelet.remove_node(node).await?;
    sh.record(
        &node_ref,
        "Normal",
        "ScaleDown",
        "node removed by cluster autoscaler",
    )
    .await;
    Ok(())
}

/// Add (or remove) the `ToBeDeletedByClusterAutoscaler` taint (value: unix seconds,
/// `NoSchedule`), guarded by the Node's resourceVersion.
async fn set_to_be_deleted(client: &Client, node: &str, on: bool) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    for _ in 0..5 {
        let current = api
            .get(node)
            .await
            .with_context(|| format!("get Node {node}"))?;
        let mut taints: Vec<Taint> = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        taints.retain(|t| t.key != TO_BE_DELETED_TAINT);
        if on {
            taints.push(Taint {
                key: TO_BE_DELETED_TAINT.into(),
                value: Some(jiff::Timestamp::now().as_second().to_string()),
                effect: "NoSchedule".into(),
                time_added: None,
            });
        }
        let patch = json!({"metadata": {"resourceVersion": current.resource_version()},
                           "spec": {"taints": taints}});
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(n) => return Ok(n),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("taint Node {node}")),
        }
    }
    bail!("taint Node {node}: kept conflicting")
}

/// Evict one pod, retrying while the API answers 429 (a PodDisruptionBudget) for up to
/// [`MAX_POD_EVICTION_TIME`]; a pod already gone counts as evicted.
async fn evict(client: &Client, pod: &Pod, grace: Option<i64>) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let params = EvictParams {
        delete_options: grace.map(|g| DeleteParams {
            grace_period_seconds: u32::try_from(g).ok(),
            ..DeleteParams::default()
        }),
        ..EvictParams::default()
    };
    let until = Instant::now() + MAX_POD_EVICTION_TIME;
    loop {
        match api.evict(&pod.name_any(), &params).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 429 && Instant::now() < until => {
                // The retry pacing of CA's eviction loop.
                tokio::time::sleep(EVICTION_RETRY).await;
            }
            Err(e) => return Err(e).with_context(|| format!("evict pod {}", key(pod))),
        }
    }
}

/// The pods bound to a node.
async fn pods_on(client: &Client, node: &str) -> Result<Vec<Pod>> {
    Ok(Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .context("list the node's pods")?
        .items)
}

/// Wait (watching the node's pods) until none of `uids` exists; false on timeout.
/// CA's drainability settings.
fn drain_rules(cfg: &AutoscalerConfig) -> DrainRules {
    DrainRules {
        skip_nodes_with_local_storage: cfg.skip_nodes_with_local_storage,
        skip_nodes_with_system_pods: cfg.skip_nodes_with_system_pods,
        expendable_priority_cutoff: cfg.expendable_pods_priority_cutoff,
    }
}

/// Pods on `node` now that the scale-down did not plan for (`planned`), ignoring those a
/// removal never waits for (mirror, DaemonSet, finished, expendable).
async fn bound_since_scan(sh: &Shared, node: &str, planned: &[Pod]) -> Result<Vec<String>> {
    let rules = drain_rules(&sh.cfg);
    let planned: HashSet<String> = planned.iter().filter_map(ResourceExt::uid).collect();
    let api: Api<Pod> = Api::all(sh.client.clone());
    let on_node = api
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .with_context(|| format!("listing the pods of {node}"))?;
    Ok(on_node
        .items
        .iter()
        .filter(|p| p.uid().is_some_and(|u| !planned.contains(&u)))
        .filter(|p| {
            !matches!(
                sim::drain_pod(p, &rules),
                PodDrain::Ignore | PodDrain::Expendable
            )
        })
        .map(key)
        .collect())
}

async fn wait_gone(
    client: &Client,
    node: &str,
    mut uids: HashSet<String>,
    timeout: Duration,
) -> bool {
    if uids.is_empty() {
        return true;
    }
    let api: Api<Pod> = Api::all(client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = std::pin::pin!(watcher::watcher(api, cfg).default_backoff());
    let mut relist: Option<HashSet<String>> = None;
    tokio::time::timeout(timeout, async {
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => relist = Some(HashSet::new()),
                Ok(Event::InitApply(p)) => {
                    if let (Some(seen), Some(uid)) = (relist.as_mut(), p.uid()) {
                        seen.insert(uid);
                    }
                }
                Ok(Event::InitDone) => {
                    if let Some(seen) = relist.take() {
                        uids.retain(|u| seen.contains(u));
                    }
                }
                Ok(Event::Delete(p)) => {
                    if let Some(uid) = p.uid() {
                        uids.remove(&uid);
                    }
                }
                Ok(Event::Apply(_)) | Err(_) => {}
            }
            if uids.is_empty() && relist.is_none() {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

/// Cordon, evict, wait: the pods evicted.
async fn drain_node(sh: &Arc<Shared>, node: &str) -> Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(sh.client.clone());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .with_context(|| format!("cordon Node {node}"))?;
    let pods: Vec<Pod> = pods_on(&sh.client, node)
        .await?
        .into_iter()
        .filter(|p| {
            sim::drain_pod(
                p,
                &DrainRules {
                    skip_nodes_with_local_storage: false,
                    skip_nodes_with_system_pods: false,
                    expendable_priority_cutoff: i32::MIN,
                },
            ) != PodDrain::Ignore
        })
        .collect();
    for p in &pods {
        evict(&sh.client, p, None).await?;
        sh.emit(AutoscalerEvent::Evicted {
            node: node.into(),
            pod: key(p),
        });
    }
    let uids: HashSet<String> = pods.iter().filter_map(|p| p.uid()).collect();
    let limit = sh.cfg.max_graceful_termination + EVICTION_HEADROOM;
    if !wait_gone(&sh.client, node, uids, limit).await {
        bail!("drain {node}: evicted pods still there after {limit:?}");
    }
    Ok(pods.iter().map(key).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str, uid: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some(uid.into()),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn recorder_filters_spam_per_object_and_counts_repeats() {
        let mut r = Recorder {
            window: Duration::from_secs(300),
            ..Recorder::default()
        };
        let t0 = Instant::now();
        let wall = jiff::Timestamp::from_second(1_700_000_000).expect("ts");
        let a = obj("a", "1");
        let first = r.decide(&a, "Normal", "NotTriggerScaleUp", "m", t0, wall);
        let Some(Write::Create(at)) = first else {
            panic!("create: {first:?}")
        };
        assert_eq!(at.namespace, "ns");
        assert_eq!(at.name, format!("a.{:x}", 1_700_000_000_000_000_000u128));
        // Within the window nothing about the same object passes, whatever the reason.
        assert_eq!(
            r.decide(
                &a,
                "Normal",
                "NotTriggerScaleUp",
                "m",
                t0 + Duration::from_secs(10),
                wall
            ),
            None
        );
        assert_eq!(
            r.decide(
                &a,
                "Normal",
                "TriggeredScaleUp",
                "x",
                t0 + Duration::from_secs(10),
                wall
            ),
            None
        );
        // Another object has its own bucket.
        assert!(matches!(
            r.decide(
                &obj("b", "2"),
                "Normal",
                "NotTriggerScaleUp",
                "m",
                t0 + Duration::from_secs(10),
                wall
            ),
            Some(Write::Create(_))
        ));
        // After the window, the same event is a repeat of the first.
        assert_eq!(
            r.decide(
                &a,
                "Normal",
                "NotTriggerScaleUp",
                "m",
                t0 + Duration::from_secs(300),
                wall
            ),
            Some(Write::Bump(at.clone(), 2))
        );
        // A different message is a new event.
        assert!(matches!(
            r.decide(
                &a,
                "Normal",
                "NotTriggerScaleUp",
                "other",
                t0 + Duration::from_secs(600),
                wall
            ),
            Some(Write::Create(_))
        ));
        // A zero window records every event.
        let mut all = Recorder::default();
        assert!(all.decide(&a, "Normal", "R", "m", t0, wall).is_some());
        assert_eq!(
            all.decide(&a, "Normal", "R", "m", t0, wall),
            Some(Write::Bump(events::event_name(&a, wall), 2))
        );
    }

    #[test]
    fn group_nodes_carry_the_template_labels() {
        let mut g = NodeGroup::new("spot-pool", 0, 3);
        g.spot = true;
        g.labels.insert("pool".into(), "spot".into());
        let s = g.node_settings("spot-pool-1");
        assert_eq!(
            s.labels.get(CAPACITY_TYPE_LABEL).map(String::as_str),
            Some("spot")
        );
        assert_eq!(s.labels.get("pool").map(String::as_str), Some("spot"));
        let labels = g.node_labels("spot-pool-1");
        assert_eq!(
            labels.get("kubernetes.io/hostname").map(String::as_str),
            Some("spot-pool-1")
        );
        for (k, v) in &s.labels {
            assert_eq!(
                labels.get(k),
                Some(v),
                "the template has what the node gets"
            );
        }
    }

    #[test]
    fn unschedulable_pods_are_the_schedulers_rejects() {
        let pod = |v: serde_json::Value| -> Pod { serde_json::from_value(v).expect("pod") };
        let cond = json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]);
        assert!(is_unschedulable(&pod(
            json!({"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": cond}})
        )));
        assert!(!is_unschedulable(&pod(
            json!({"metadata": {"name": "p"}, "status": {"phase": "Pending"}})
        )));
        assert!(!is_unschedulable(&pod(json!({"metadata": {"name": "p"},
            "status": {"phase": "Pending", "nominatedNodeName": "n", "conditions": cond}}))));
        assert!(!is_unschedulable(&pod(json!({"metadata": {"name": "p"},
            "spec": {"containers": [], "nodeName": "n"}, "status": {"conditions": cond}}))));
        assert!(!is_unschedulable(&pod(
            json!({"metadata": {"name": "p", "deletionTimestamp": "2024-01-01T00:00:00Z"},
            "status": {"conditions": cond}})
        )));
        let other =
            json!([{"type": "PodScheduled", "status": "False", "reason": "SchedulerError"}]);
        assert!(!is_unschedulable(&pod(
            json!({"metadata": {"name": "p"}, "status": {"conditions": other}})
        )));
    }
}
