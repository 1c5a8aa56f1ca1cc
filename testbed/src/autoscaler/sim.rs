//! The autoscaler's decisions as pure functions over plain facts, so each rule is unit-tested:
//! quantities and pod requests as the scheduler computes them, the scheduler predicates CA runs
//! against node templates (taints, node affinity/selector, resources) with the scheduler's
//! failure reasons, the binpacking estimator, the scale-up plan and CA's event messages, and the
//! scale-down rules (which pods block a node's removal, utilization, where pods could move).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{
    Container, NodeSelector, NodeSelectorRequirement, Pod, PodSpec, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Requests or allocatable capacity in the scheduler's units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    /// Bytes.
    pub memory: i64,
    /// Bytes.
    pub ephemeral_storage: i64,
    pub pods: i64,
}

impl Resources {
    fn plus(self, o: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.saturating_add(o.milli_cpu),
            memory: self.memory.saturating_add(o.memory),
            ephemeral_storage: self.ephemeral_storage.saturating_add(o.ephemeral_storage),
            pods: self.pods.saturating_add(o.pods),
        }
    }

    fn max(self, o: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.max(o.milli_cpu),
            memory: self.memory.max(o.memory),
            ephemeral_storage: self.ephemeral_storage.max(o.ephemeral_storage),
            pods: self.pods.max(o.pods),
        }
    }

    /// From a resource map (`requests`, `allocatable`, `overhead`); unknown names are ignored.
    pub fn from_map(map: Option<&BTreeMap<String, Quantity>>) -> Resources {
        let get = |k: &str, milli: bool| -> i64 {
            map.and_then(|m| m.get(k))
                .and_then(|q| parse_quantity_milli(&q.0))
                .map(|v| if milli { v } else { ceil_div(v, 1000) })
                .and_then(|v| i64::try_from(v).ok())
                .unwrap_or(0)
        };
        Resources {
            milli_cpu: get("cpu", true),
            memory: get("memory", false),
            ephemeral_storage: get("ephemeral-storage", false),
            pods: get("pods", false),
        }
    }

    /// From the four quantities a node group or NodeSettings names; None if one is malformed.
    pub fn parse(cpu: &str, memory: &str, ephemeral_storage: &str, pods: &str) -> Option<Self> {
        let whole =
            |s: &str| parse_quantity_milli(s).and_then(|v| i64::try_from(ceil_div(v, 1000)).ok());
        Some(Resources {
            milli_cpu: parse_quantity_milli(cpu).and_then(|v| i64::try_from(v).ok())?,
            memory: whole(memory)?,
            ephemeral_storage: whole(ephemeral_storage)?,
            pods: whole(pods)?,
        })
    }
}

fn ceil_div(a: i128, b: i128) -> i128 {
    let q = a / b;
    if a % b != 0 && ((a < 0) == (b < 0)) {
        q + 1
    } else {
        q
    }
}

/// A Kubernetes quantity times 1000, rounded up (`"250m"` → 250, `"1"` → 1000, `"1Gi"` →
/// 1073741824000); None if malformed.
pub fn parse_quantity_milli(q: &str) -> Option<i128> {
    let q = q.trim();
    let (negative, body) = match q.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, q.strip_prefix('+').unwrap_or(q)),
    };
    let end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') || int.len() + frac.len() > 30 {
        return None;
    }
    let digits: i128 = format!("{int}{frac}").parse().ok()?;
    let mut exp10 = 3 - i32::try_from(frac.len()).ok()?;
    let mut factor: i128 = 1;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => factor = 1 << 10,
        "Mi" => factor = 1 << 20,
        "Gi" => factor = 1 << 30,
        "Ti" => factor = 1 << 40,
        "Pi" => factor = 1 << 50,
        "Ei" => factor = 1 << 60,
        s if s.starts_with(['e', 'E']) => exp10 += s[1..].parse::<i32>().ok()?,
        _ => return None,
    }
    let value = digits.checked_mul(factor)?;
    let scaled = if exp10 >= 0 {
        value.checked_mul(10i128.checked_pow(u32::try_from(exp10).ok()?)?)?
    } else {
        ceil_div(value, 10i128.checked_pow(u32::try_from(-exp10).ok()?)?)
    };
    Some(if negative { -scaled } else { scaled })
}

/// What a pod asks of a node, as the scheduler computes it: the larger of the containers' sum
/// and the largest init container, plus the pod overhead, and one pod slot.
pub fn pod_requests(spec: &PodSpec) -> Resources {
    let of =
        |c: &Container| Resources::from_map(c.resources.as_ref().and_then(|r| r.requests.as_ref()));
    let sum = spec
        .containers
        .iter()
        .map(of)
        .fold(Resources::default(), Resources::plus);
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(of)
        .fold(Resources::default(), Resources::max);
    let overhead = Resources::from_map(spec.overhead.as_ref());
    Resources {
        pods: 1,
        ..sum.max(init).plus(overhead)
    }
}

/// The scheduling facts of one pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodFacts {
    /// `namespace/name`.
    pub key: String,
    pub requests: Resources,
    pub node_selector: BTreeMap<String, String>,
    /// `requiredDuringSchedulingIgnoredDuringExecution`.
    pub required_affinity: Option<NodeSelector>,
    pub tolerations: Vec<Toleration>,
    pub priority: i32,
}

impl PodFacts {
    pub fn of(pod: &Pod) -> PodFacts {
        let spec = pod.spec.clone().unwrap_or_default();
        PodFacts {
            key: format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            ),
            requests: pod_requests(&spec),
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            required_affinity: spec
                .affinity
                .as_ref()
                .and_then(|a| a.node_affinity.as_ref())
                .and_then(|n| {
                    n.required_during_scheduling_ignored_during_execution
                        .clone()
                }),
            tolerations: spec.tolerations.clone().unwrap_or_default(),
            priority: spec.priority.unwrap_or(0),
        }
    }
}

/// The scheduling facts of one node (a real one, or a node group's template).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    pub allocatable: Resources,
    /// What the pods bound to it request (`pods` counts them).
    pub requested: Resources,
}

/// The scheduler's reason for a node whose taint the pod does not tolerate (v1.28 wording).
pub fn untolerated_taint_reason(t: &Taint) -> String {
    format!(
        "node(s) had untolerated taint {{{}: {}}}",
        t.key,
        t.value.as_deref().unwrap_or_default()
    )
}
/// NodeAffinity's failure reason.
pub const REASON_AFFINITY: &str = "node(s) didn't match Pod's node affinity/selector";
/// NodeUnschedulable's failure reason.
pub const REASON_UNSCHEDULABLE: &str = "node(s) were unschedulable";

/// Whether `toleration` tolerates `taint` (the API's `ToleratesTaint`).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = toleration.key.as_deref().unwrap_or_default();
    if !effect_ok || (!key.is_empty() && key != taint.key) {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" | "" => {
            !key.is_empty()
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// The first `NoSchedule`/`NoExecute` taint no toleration covers (what TaintToleration reports).
pub fn first_untolerated<'a>(tolerations: &[Toleration], taints: &'a [Taint]) -> Option<&'a Taint> {
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerations.iter().any(|tol| tolerates(tol, t)))
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => match (
            value.and_then(number),
            values.first().and_then(|s| number(s)),
        ) {
            (Some(v), Some(bound)) if values.len() == 1 => {
                if r.operator == "Gt" {
                    v > bound
                } else {
                    v < bound
                }
            }
            _ => false,
        },
        _ => false,
    }
}

/// Whether a node satisfies the pod's `nodeSelector` and required node affinity (terms ORed,
/// requirements within a term ANDed; an empty term matches nothing).
pub fn matches_node(pod: &PodFacts, node_name: &str, labels: &BTreeMap<String, String>) -> bool {
    if !pod
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let Some(selector) = &pod.required_affinity else {
        return true;
    };
    selector.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        (!exprs.is_empty() || !fields.is_empty())
            && exprs
                .iter()
                .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
            && fields
                .iter()
                .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(node_name)))
    })
}

/// The scheduler's filters, in the default profile's order, stopping at the first that fails
/// (as `RunFilterPlugins` does): NodeUnschedulable, TaintToleration, NodeAffinity,
/// NodeResourcesFit (which lists every insufficient resource). `Err` holds the failure reasons.
pub fn check(pod: &PodFacts, node: &NodeFacts) -> Result<(), Vec<String>> {
    if node.unschedulable {
        let cordon = Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        if !pod.tolerations.iter().any(|t| tolerates(t, &cordon)) {
            return Err(vec![REASON_UNSCHEDULABLE.into()]);
        }
    }
    if let Some(t) = first_untolerated(&pod.tolerations, &node.taints) {
        return Err(vec![untolerated_taint_reason(t)]);
    }
    if !matches_node(pod, &node.name, &node.labels) {
        return Err(vec![REASON_AFFINITY.into()]);
    }
    let (want, alloc, used) = (pod.requests, node.allocatable, node.requested);
    let mut reasons = Vec::new();
    if used.pods + 1 > alloc.pods {
        reasons.push("Too many pods".to_string());
    }
    for (name, w, a, u) in [
        ("cpu", want.milli_cpu, alloc.milli_cpu, used.milli_cpu),
        ("memory", want.memory, alloc.memory, used.memory),
        (
            "ephemeral-storage",
            want.ephemeral_storage,
            alloc.ephemeral_storage,
            used.ephemeral_storage,
        ),
    ] {
        if w > 0 && w > a - u {
            reasons.push(format!("Insufficient {name}"));
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons)
    }
}

/// Place `pod` on the first node it fits (reserving its requests there); the node's index.
pub fn place(pod: &PodFacts, nodes: &mut [NodeFacts]) -> Option<usize> {
    let i = nodes.iter().position(|n| check(pod, n).is_ok())?;
    nodes[i].requested = nodes[i].requested.plus(pod.requests);
    Some(i)
}

/// The unschedulable pods CA still has to help, after `FilterOutSchedulable`: pods the
/// scheduler can place on an existing node or on a node already being provisioned are left
/// to it (highest priority first). Indices into `pods`.
pub fn filter_out_schedulable(pods: &[PodFacts], nodes: &mut [NodeFacts]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pods.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(pods[*i].priority));
    let mut left: Vec<usize> = order
        .into_iter()
        .filter(|i| place(&pods[*i], nodes).is_none())
        .collect();
    left.sort_unstable();
    left
}

/// What the binpacking estimator found for one node group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    pub nodes: usize,
    /// Indices (into the estimator's input) of the pods that fit on those nodes.
    pub pods: Vec<usize>,
}

/// CA's binpacking estimator, simply: pods sorted by size (cpu and memory shares of the
/// template) largest first, each put on the first new node with room, a new node opened when
/// none has and fewer than `max_nodes` are open; a pod that fits no empty template is skipped.
pub fn binpack(pods: &[&PodFacts], template: &NodeFacts, max_nodes: usize) -> Estimate {
    let share = |v: i64, of: i64| if of > 0 { v as f64 / of as f64 } else { 0.0 };
    let score = |p: &PodFacts| {
        share(p.requests.milli_cpu, template.allocatable.milli_cpu)
            + share(p.requests.memory, template.allocatable.memory)
    };
    let mut order: Vec<usize> = (0..pods.len()).collect();
    order.sort_by(|a, b| {
        score(pods[*b])
            .partial_cmp(&score(pods[*a]))
            .unwrap_or(Ordering::Equal)
            .then(a.cmp(b))
    });
    let empty = NodeFacts {
        requested: Resources::default(),
        ..template.clone()
    };
    let mut open: Vec<NodeFacts> = Vec::new();
    let mut placed = Vec::new();
    for i in order {
        let pod = pods[i];
        if place(pod, &mut open).is_some() {
            placed.push(i);
            continue;
        }
        if open.len() < max_nodes && check(pod, &empty).is_ok() {
            let mut node = empty.clone();
            node.requested = pod.requests;
            open.push(node);
            placed.push(i);
        }
    }
    placed.sort_unstable();
    Estimate {
        nodes: open.len(),
        pods: placed,
    }
}

/// One node group as the scale-up sees it.
#[derive(Debug, Clone)]
pub struct GroupView {
    pub name: String,
    pub template: NodeFacts,
    /// Nodes it has or is getting.
    pub target_size: usize,
    pub max_size: usize,
}

/// CA's skip reason for a group at its maximum.
pub const REASON_MAX_SIZE: &str = "max node group size reached";

/// One scale-up CA decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleUp {
    /// Index into the groups.
    pub group: usize,
    pub from: usize,
    pub to: usize,
    pub max: usize,
    /// Indices of the pods it is for (each gets `TriggeredScaleUp`).
    pub pods: Vec<usize>,
}

/// What one scale-up evaluation decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScaleUpPlan {
    /// Grow one group (CA expands one group per loop; the others wait for the next loop).
    Grow(ScaleUp),
    /// No group can help: every pod gets `NotTriggerScaleUp` with this message.
    NoOptions(Vec<(usize, String)>),
}

/// The scale-up for the pods still unschedulable: every group below its maximum whose
/// template fits some of them is an option; the option helping most pods wins (fewer new
/// nodes, then configuration order, break ties: CA's `most-pods` expander, made deterministic).
pub fn plan_scale_up(pods: &[PodFacts], groups: &[GroupView]) -> ScaleUpPlan {
    // Per pod: group name → reasons it was rejected or skipped.
    let mut reasons: Vec<BTreeMap<&str, Vec<String>>> = vec![BTreeMap::new(); pods.len()];
    let mut best: Option<ScaleUp> = None;
    for (gi, g) in groups.iter().enumerate() {
        if g.target_size >= g.max_size {
            for r in &mut reasons {
                r.insert(&g.name, vec![REASON_MAX_SIZE.into()]);
            }
            continue;
        }
        let empty = NodeFacts {
            requested: Resources::default(),
            ..g.template.clone()
        };
        let mut fitting = Vec::new();
        for (pi, p) in pods.iter().enumerate() {
            match check(p, &empty) {
                Ok(()) => fitting.push(pi),
                Err(why) => {
                    reasons[pi].insert(&g.name, why);
                }
            }
        }
        let refs: Vec<&PodFacts> = fitting.iter().map(|i| &pods[*i]).collect();
        let est = binpack(&refs, &g.template, g.max_size - g.target_size);
        if est.nodes == 0 {
            continue;
        }
        let option = ScaleUp {
            group: gi,
            from: g.target_size,
            to: g.target_size + est.nodes,
            max: g.max_size,
            pods: est.pods.iter().map(|i| fitting[*i]).collect(),
        };
        let better = best.as_ref().is_none_or(|b| {
            option.pods.len() > b.pods.len()
                || (option.pods.len() == b.pods.len() && option.to - option.from < b.to - b.from)
        });
        if better {
            best = Some(option);
        }
    }
    match best {
        Some(up) => ScaleUpPlan::Grow(up),
        None => ScaleUpPlan::NoOptions(
            reasons
                .iter()
                .enumerate()
                .map(|(i, r)| (i, not_triggered_message(r)))
                .collect(),
        ),
    }
}

/// CA's `NotTriggerScaleUp` message: each reason counted over the groups that gave it
/// (`pod didn't trigger scale-up: 1 Insufficient cpu, 2 max node group size reached`), sorted
/// (CA's order follows a Go map; sorted keeps tests stable).
pub fn not_triggered_message<S: AsRef<str>>(per_group: &BTreeMap<S, Vec<String>>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for reasons in per_group.values() {
        for r in reasons {
            *counts.entry(r.as_str()).or_default() += 1;
        }
    }
    let mut parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    parts.sort();
    format!("pod didn't trigger scale-up: {}", parts.join(", "))
}

/// CA's `TriggeredScaleUp` message (`ScaleUpInfo` printed with `%v`).
pub fn triggered_message(group: &str, from: usize, to: usize, max: usize) -> String {
    format!("pod triggered scale-up: [{{{group} {from}->{to} (max: {max})}}]")
}

/// Why a pod keeps its node from being removed (CA's `BlockingPodReason`, plus Karpenter's
/// annotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockingPodReason {
    /// No controller CA knows (ReplicaSet, ReplicationController, StatefulSet, Job, DaemonSet).
    NotReplicated,
    /// A `kube-system` pod (CA's `--skip-nodes-with-system-pods`; PDBs are not modelled).
    UnmovableKubeSystemPod,
    /// `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"`.
    NotSafeToEvictAnnotation,
    /// An emptyDir (not in memory) or hostPath volume not listed in
    /// `cluster-autoscaler.kubernetes.io/safe-to-evict-local-volumes`
    /// (`--skip-nodes-with-local-storage`).
    LocalStorageRequested,
    /// `karpenter.sh/do-not-disrupt: "true"` (Karpenter's opt-out; CA itself ignores it).
    DoNotDisruptAnnotation,
}

impl fmt::Display for BlockingPodReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockingPodReason::NotReplicated => "NotReplicated",
            BlockingPodReason::UnmovableKubeSystemPod => "UnmovableKubeSystemPod",
            BlockingPodReason::NotSafeToEvictAnnotation => "NotSafeToEvictAnnotation",
            BlockingPodReason::LocalStorageRequested => "LocalStorageRequested",
            BlockingPodReason::DoNotDisruptAnnotation => "DoNotDisruptAnnotation",
        })
    }
}

/// The annotations that decide a pod's eviction.
pub const SAFE_TO_EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";
pub const SAFE_TO_EVICT_LOCAL_VOLUMES: &str =
    "cluster-autoscaler.kubernetes.io/safe-to-evict-local-volumes";
pub const DO_NOT_DISRUPT: &str = "karpenter.sh/do-not-disrupt";
pub const MIRROR_POD: &str = "kubernetes.io/config.mirror";

/// Which pods block a scale-down (CA's flags of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainRules {
    pub skip_nodes_with_local_storage: bool,
    pub skip_nodes_with_system_pods: bool,
    pub expendable_priority_cutoff: i32,
}

/// What scale-down does with one pod of a node it wants to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodDrain {
    /// Mirror, DaemonSet or finished pods: neither moved nor blocking.
    Ignore,
    /// Below the expendable priority cutoff: evicted, never moved, never blocking.
    Expendable,
    /// Evicted and expected to find room elsewhere.
    Move,
    Blocked(BlockingPodReason),
}

/// CA's drainability rules for one pod, in the order CA applies them: mirror, DaemonSet,
/// `safe-to-evict: "true"`, terminal, then the blocking checks (replicated, kube-system,
/// `safe-to-evict: "false"`, local storage) and Karpenter's `do-not-disrupt`.
pub fn drain_pod(pod: &Pod, rules: &DrainRules) -> PodDrain {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let annotation = |k: &str| annotations.get(k).map(String::as_str);
    let owner = pod
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.kind.as_str());
    if annotation(MIRROR_POD).is_some() || owner == Some("DaemonSet") {
        return PodDrain::Ignore;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return PodDrain::Ignore;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.priority.unwrap_or(0) < rules.expendable_priority_cutoff {
        return PodDrain::Expendable;
    }
    if annotation(SAFE_TO_EVICT) == Some("true") {
        return PodDrain::Move;
    }
    let replicated = matches!(
        owner,
        Some("ReplicaSet" | "ReplicationController" | "StatefulSet" | "Job")
    );
    if !replicated {
        return PodDrain::Blocked(BlockingPodReason::NotReplicated);
    }
    if rules.skip_nodes_with_system_pods && pod.metadata.namespace.as_deref() == Some("kube-system")
    {
        return PodDrain::Blocked(BlockingPodReason::UnmovableKubeSystemPod);
    }
    if annotation(SAFE_TO_EVICT) == Some("false") {
        return PodDrain::Blocked(BlockingPodReason::NotSafeToEvictAnnotation);
    }
    if rules.skip_nodes_with_local_storage {
        let allowed: Vec<&str> = annotation(SAFE_TO_EVICT_LOCAL_VOLUMES)
            .map(|v| v.split(',').map(str::trim).collect())
            .unwrap_or_default();
        let local = spec.volumes.iter().flatten().any(|v| {
            let empty_dir = v
                .empty_dir
                .as_ref()
                .is_some_and(|e| e.medium.as_deref() != Some("Memory"));
            (empty_dir || v.host_path.is_some()) && !allowed.contains(&v.name.as_str())
        });
        if local {
            return PodDrain::Blocked(BlockingPodReason::LocalStorageRequested);
        }
    }
    if annotation(DO_NOT_DISRUPT) == Some("true") {
        return PodDrain::Blocked(BlockingPodReason::DoNotDisruptAnnotation);
    }
    PodDrain::Move
}

/// CA's utilization of a node: the larger of its cpu and memory requests over allocatable.
pub fn utilization(node: &NodeFacts) -> f64 {
    let share = |used: i64, of: i64| if of > 0 { used as f64 / of as f64 } else { 0.0 };
    share(node.requested.milli_cpu, node.allocatable.milli_cpu)
        .max(share(node.requested.memory, node.allocatable.memory))
}

/// Why a node of a group is not removed (CA's `UnremovableReason` names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unremovable {
    /// `cluster-autoscaler.kubernetes.io/scale-down-disabled: "true"` on the Node.
    ScaleDownDisabledAnnotation,
    /// Requests at or above the utilization threshold.
    NotUnderutilized,
    BlockedByPod {
        pod: String,
        reason: BlockingPodReason,
    },
    /// Its pods fit on no other node.
    NoPlaceToMovePods,
    /// Its group would go below its minimum size.
    NodeGroupMinSizeReached,
}

impl fmt::Display for Unremovable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unremovable::ScaleDownDisabledAnnotation => f.write_str("ScaleDownDisabledAnnotation"),
            Unremovable::NotUnderutilized => f.write_str("NotUnderutilized"),
            Unremovable::BlockedByPod { pod, reason } => {
                write!(f, "BlockedByPod: {reason} ({pod})")
            }
            Unremovable::NoPlaceToMovePods => f.write_str("NoPlaceToMovePods"),
            Unremovable::NodeGroupMinSizeReached => f.write_str("NodeGroupMinSizeReached"),
        }
    }
}

/// One scale-down candidate: the node and its pods with what draining does to each.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub node: NodeFacts,
    pub scale_down_disabled: bool,
    pub pods: Vec<(PodFacts, PodDrain)>,
}

/// What removing an unneeded node takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Removal {
    /// Its pods to evict (movable and expendable ones).
    pub evict: Vec<String>,
    /// Where the simulation put each movable pod (node name).
    pub moves: Vec<(PodFacts, String)>,
}

/// Whether a candidate is unneeded: not disabled, below the utilization threshold, no pod
/// blocks, and its movable pods fit on `destinations` (where their requests are then reserved,
/// as CA's simulation memorises new locations).
pub fn unneeded(
    c: &Candidate,
    threshold: f64,
    destinations: &mut [NodeFacts],
) -> Result<Removal, Unremovable> {
    if c.scale_down_disabled {
        return Err(Unremovable::ScaleDownDisabledAnnotation);
    }
    if utilization(&c.node) >= threshold {
        return Err(Unremovable::NotUnderutilized);
    }
    if let Some((p, PodDrain::Blocked(reason))) = c
        .pods
        .iter()
        .find(|(_, d)| matches!(d, PodDrain::Blocked(_)))
    {
        return Err(Unremovable::BlockedByPod {
            pod: p.key.clone(),
            reason: *reason,
        });
    }
    let mut trial = destinations.to_vec();
    let mut moves = Vec::new();
    for (p, d) in &c.pods {
        if *d == PodDrain::Move {
            match place(p, &mut trial) {
                Some(i) => moves.push((p.clone(), trial[i].name.clone())),
                None => return Err(Unremovable::NoPlaceToMovePods),
            }
        }
    }
    destinations.clone_from_slice(&trial);
    Ok(Removal {
        evict: c
            .pods
            .iter()
            .filter(|(_, d)| matches!(d, PodDrain::Move | PodDrain::Expendable))
            .map(|(p, _)| p.key.clone())
            .collect(),
        moves,
    })
}

/// CA's unneeded-node pass over the candidates in order, on one simulated cluster: a node found
/// removable is no destination for the next ones, and the pods it would shed count on the nodes
/// they were put on (which must then move them again to be removable themselves). `nodes` are
/// the nodes pods may go to (the candidates among them). `Ok`: the candidate's own pods to
/// evict.
pub fn find_unneeded(
    candidates: &[Candidate],
    nodes: &[NodeFacts],
    threshold: f64,
) -> Vec<Result<Vec<String>, Unremovable>> {
    let mut cluster: Vec<NodeFacts> = nodes.to_vec();
    let mut removed: Vec<String> = Vec::new();
    let mut moved_in: BTreeMap<String, Vec<PodFacts>> = BTreeMap::new();
    candidates
        .iter()
        .map(|c| {
            let name = &c.node.name;
            let mut sim = c.clone();
            for p in moved_in.get(name).into_iter().flatten() {
                sim.node.requested = sim.node.requested.plus(p.requests);
                sim.pods.push((p.clone(), PodDrain::Move));
            }
            let mut others: Vec<NodeFacts> = cluster
                .iter()
                .filter(|d| d.name != *name && !removed.contains(&d.name))
                .cloned()
                .collect();
            let removal = unneeded(&sim, threshold, &mut others)?;
            for o in others {
                if let Some(d) = cluster.iter_mut().find(|d| d.name == o.name) {
                    *d = o;
                }
            }
            for (p, dest) in removal.moves {
                moved_in.entry(dest).or_default().push(p);
            }
            removed.push(name.clone());
            let own: Vec<&str> = c.pods.iter().map(|(p, _)| p.key.as_str()).collect();
            Ok(removal
                .evict
                .into_iter()
                .filter(|k| own.contains(&k.as_str()))
                .collect())
        })
        .collect()
}

/// client-go's event spam filter as CA configures it (burst 1, one token per `window` per
/// involved object): whether an event about an object whose last accepted event was
/// `since_last` ago passes. A zero window is `--record-duplicated-events`.
pub fn spam_filter_allows(
    since_last: Option<std::time::Duration>,
    window: std::time::Duration,
) -> bool {
    window.is_zero() || since_last.is_none_or(|d| d >= window)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        NodeAffinity, NodeSelectorTerm, ResourceRequirements, Volume,
    };
    use serde_json::json;

    fn q(map: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
        Some(
            map.iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect(),
        )
    }

    fn container(requests: &[(&str, &str)]) -> Container {
        Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                requests: q(requests),
                ..ResourceRequirements::default()
            }),
            ..Container::default()
        }
    }

    fn pod(key: &str, cpu: i64, mem: i64) -> PodFacts {
        PodFacts {
            key: key.into(),
            requests: Resources {
                milli_cpu: cpu,
                memory: mem,
                ephemeral_storage: 0,
                pods: 1,
            },
            ..PodFacts::default()
        }
    }

    fn node(name: &str, cpu: i64, mem: i64) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            allocatable: Resources {
                milli_cpu: cpu,
                memory: mem,
                ephemeral_storage: 100 << 30,
                pods: 110,
            },
            ..NodeFacts::default()
        }
    }

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            time_added: None,
        }
    }

    fn toleration(key: &str, op: &str, value: &str, effect: &str) -> Toleration {
        Toleration {
            key: Some(key.into()).filter(|k: &String| !k.is_empty()),
            operator: Some(op.into()),
            value: Some(value.into()).filter(|v: &String| !v.is_empty()),
            effect: Some(effect.into()).filter(|e: &String| !e.is_empty()),
            toleration_seconds: None,
        }
    }

    #[test]
    fn quantities_parse_like_the_api() {
        let cases = [
            ("250m", Some(250)),
            ("1", Some(1000)),
            ("1.5", Some(1500)),
            ("0.1", Some(100)),
            ("2k", Some(2_000_000)),
            ("1Ki", Some(1_024_000)),
            ("64Gi", Some(64 * (1i128 << 30) * 1000)),
            ("1G", Some(1_000_000_000_000)),
            ("1e3", Some(1_000_000)),
            ("1E-3", Some(1)),
            ("100n", Some(1)), // rounded up
            ("1u", Some(1)),
            ("-1", Some(-1000)),
            ("+2", Some(2000)),
            (".5", Some(500)),
            ("", None),
            ("abc", None),
            ("1.2.3", None),
            ("1Qi", None),
            ("1e", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_quantity_milli(s), want, "{s}");
        }
        assert_eq!(
            Resources::parse("4", "16Gi", "100Gi", "110"),
            Some(Resources {
                milli_cpu: 4000,
                memory: 16 << 30,
                ephemeral_storage: 100 << 30,
                pods: 110
            })
        );
        assert_eq!(Resources::parse("4", "lots", "1", "1"), None);
    }

    #[test]
    fn requests_are_the_larger_of_containers_and_init_plus_overhead() {
        let spec = PodSpec {
            containers: vec![
                container(&[("cpu", "500m"), ("memory", "1Gi")]),
                container(&[("cpu", "250m")]),
            ],
            init_containers: Some(vec![
                container(&[("cpu", "2"), ("memory", "100Mi")]),
                container(&[("ephemeral-storage", "1Gi")]),
            ]),
            overhead: q(&[("cpu", "100m")]),
            ..PodSpec::default()
        };
        assert_eq!(
            pod_requests(&spec),
            Resources {
                milli_cpu: 2100,
                memory: 1 << 30,
                ephemeral_storage: 1 << 30,
                pods: 1
            }
        );
        assert_eq!(
            pod_requests(&PodSpec::default()),
            Resources {
                pods: 1,
                ..Resources::default()
            }
        );
    }

    #[test]
    fn tolerations_follow_the_api() {
        let t = taint("spot", "true", "NoSchedule");
        assert!(tolerates(
            &toleration("spot", "Equal", "true", "NoSchedule"),
            &t
        ));
        assert!(tolerates(&toleration("spot", "Equal", "true", ""), &t));
        assert!(tolerates(&toleration("spot", "Exists", "", ""), &t));
        assert!(tolerates(&toleration("", "Exists", "", ""), &t), "wildcard");
        assert!(!tolerates(&toleration("spot", "Equal", "false", ""), &t));
        assert!(!tolerates(
            &toleration("spot", "Equal", "true", "NoExecute"),
            &t
        ));
        assert!(!tolerates(&toleration("other", "Exists", "", ""), &t));
        assert!(
            !tolerates(&toleration("", "Equal", "true", ""), &t),
            "Equal needs a key"
        );
        let taints = [
            taint("soft", "x", "PreferNoSchedule"),
            taint("a", "1", "NoSchedule"),
            taint("b", "2", "NoExecute"),
        ];
        assert_eq!(
            first_untolerated(&[], &taints).map(|t| t.key.as_str()),
            Some("a"),
            "PreferNoSchedule never blocks"
        );
        assert_eq!(
            first_untolerated(&[toleration("a", "Exists", "", "")], &taints)
                .map(|t| t.key.as_str()),
            Some("b")
        );
        assert_eq!(
            first_untolerated(&[toleration("", "Exists", "", "")], &taints),
            None
        );
        assert_eq!(
            untolerated_taint_reason(&taints[1]),
            "node(s) had untolerated taint {a: 1}"
        );
    }

    #[test]
    fn node_selector_and_affinity() {
        let labels: BTreeMap<String, String> = [("pool", "spot"), ("zone", "a"), ("gen", "5")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut p = pod("ns/p", 0, 0);
        assert!(matches_node(&p, "n", &labels));
        p.node_selector.insert("pool".into(), "spot".into());
        assert!(matches_node(&p, "n", &labels));
        p.node_selector.insert("pool".into(), "ondemand".into());
        assert!(!matches_node(&p, "n", &labels));
        p.node_selector.clear();
        let req = |key: &str, op: &str, values: &[&str]| NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        let term = |exprs: Vec<NodeSelectorRequirement>, fields: Vec<NodeSelectorRequirement>| {
            NodeSelectorTerm {
                match_expressions: Some(exprs),
                match_fields: Some(fields),
            }
        };
        let with = |terms: Vec<NodeSelectorTerm>| PodFacts {
            required_affinity: Some(NodeSelector {
                node_selector_terms: terms,
            }),
            ..pod("ns/p", 0, 0)
        };
        let yes = [
            vec![term(vec![req("zone", "In", &["a", "b"])], vec![])],
            vec![term(vec![req("zone", "NotIn", &["b"])], vec![])],
            vec![term(vec![req("missing", "NotIn", &["b"])], vec![])],
            vec![term(vec![req("pool", "Exists", &[])], vec![])],
            vec![term(vec![req("missing", "DoesNotExist", &[])], vec![])],
            vec![term(vec![req("gen", "Gt", &["4"])], vec![])],
            vec![term(vec![req("gen", "Lt", &["6"])], vec![])],
            vec![term(vec![], vec![req("metadata.name", "In", &["n"])])],
            // Terms are ORed.
            vec![
                term(vec![req("zone", "In", &["z"])], vec![]),
                term(vec![req("zone", "In", &["a"])], vec![]),
            ],
        ];
        for terms in yes {
            assert!(
                matches_node(&with(terms.clone()), "n", &labels),
                "{terms:?}"
            );
        }
        let no = [
            vec![term(vec![req("zone", "In", &["b"])], vec![])],
            vec![term(vec![req("pool", "DoesNotExist", &[])], vec![])],
            vec![term(vec![req("gen", "Gt", &["5"])], vec![])],
            vec![term(vec![req("pool", "Gt", &["1"])], vec![])],
            // Requirements within a term are ANDed.
            vec![term(
                vec![req("zone", "In", &["a"]), req("pool", "In", &["x"])],
                vec![],
            )],
            vec![term(vec![], vec![req("metadata.name", "In", &["other"])])],
            vec![term(vec![], vec![])],
            vec![],
        ];
        for terms in no {
            assert!(
                !matches_node(&with(terms.clone()), "n", &labels),
                "{terms:?}"
            );
        }
        let _ = NodeAffinity::default();
    }

    #[test]
    fn predicates_report_like_the_scheduler() {
        let mut n = node("n", 4000, 8 << 30);
        assert_eq!(check(&pod("a", 4000, 8 << 30), &n), Ok(()));
        assert_eq!(
            check(&pod("a", 5000, 1), &n),
            Err(vec!["Insufficient cpu".to_string()])
        );
        assert_eq!(
            check(&pod("a", 5000, 9 << 30), &n),
            Err(vec![
                "Insufficient cpu".to_string(),
                "Insufficient memory".to_string()
            ])
        );
        let mut big_disk = pod("a", 0, 0);
        big_disk.requests.ephemeral_storage = 200 << 30;
        assert_eq!(
            check(&big_disk, &n),
            Err(vec!["Insufficient ephemeral-storage".to_string()])
        );
        n.requested = Resources {
            milli_cpu: 3500,
            memory: 0,
            ephemeral_storage: 0,
            pods: 110,
        };
        assert_eq!(
            check(&pod("a", 1000, 0), &n),
            Err(vec![
                "Too many pods".to_string(),
                "Insufficient cpu".to_string()
            ])
        );
        // The first failing filter wins: taints before affinity before resources.
        let mut tainted = node("t", 1, 1);
        tainted.taints = vec![taint("spot", "true", "NoSchedule")];
        let mut picky = pod("a", 5000, 0);
        picky.node_selector.insert("pool".into(), "x".into());
        assert_eq!(
            check(&picky, &tainted),
            Err(vec![
                "node(s) had untolerated taint {spot: true}".to_string()
            ])
        );
        picky.tolerations = vec![toleration("spot", "Exists", "", "")];
        assert_eq!(
            check(&picky, &tainted),
            Err(vec![REASON_AFFINITY.to_string()])
        );
        let mut cordoned = node("c", 4000, 1 << 30);
        cordoned.unschedulable = true;
        assert_eq!(
            check(&pod("a", 1, 1), &cordoned),
            Err(vec![REASON_UNSCHEDULABLE.to_string()])
        );
    }

    #[test]
    fn schedulable_pods_are_left_to_the_scheduler() {
        // One node with room for one 1-cpu pod; the high-priority pod gets it.
        let mut nodes = vec![node("n", 1000, 1 << 30)];
        let mut low = pod("ns/low", 1000, 0);
        low.priority = 0;
        let mut high = pod("ns/high", 1000, 0);
        high.priority = 100;
        let pods = [low, high, pod("ns/huge", 8000, 0)];
        assert_eq!(filter_out_schedulable(&pods, &mut nodes), vec![0, 2]);
        assert_eq!(nodes[0].requested.milli_cpu, 1000);
    }

    #[test]
    fn binpacking_opens_as_few_nodes_as_it_can() {
        let template = node("tpl", 4000, 16 << 30);
        let pods = [
            pod("a", 1000, 1 << 30),
            pod("b", 3000, 1 << 30),
            pod("c", 2000, 1 << 30),
            pod("d", 2000, 1 << 30),
            pod("huge", 5000, 0),
        ];
        let refs: Vec<&PodFacts> = pods.iter().collect();
        // Decreasing: b(3) c(2) d(2) a(1): [b a] [c d]; huge fits no template.
        assert_eq!(
            binpack(&refs, &template, 10),
            Estimate {
                nodes: 2,
                pods: vec![0, 1, 2, 3]
            }
        );
        // Capped at one node: b and a only.
        assert_eq!(
            binpack(&refs, &template, 1),
            Estimate {
                nodes: 1,
                pods: vec![0, 1]
            }
        );
        assert_eq!(
            binpack(&refs, &template, 0),
            Estimate {
                nodes: 0,
                pods: vec![]
            }
        );
        // The pods limit counts too.
        let mut two_pods = template.clone();
        two_pods.allocatable.pods = 2;
        let small = [pod("1", 1, 1), pod("2", 1, 1), pod("3", 1, 1)];
        let refs: Vec<&PodFacts> = small.iter().collect();
        assert_eq!(binpack(&refs, &two_pods, 5).nodes, 2);
    }

    fn group(name: &str, cpu: i64, target: usize, max: usize) -> GroupView {
        GroupView {
            name: name.into(),
            template: node(&format!("{name}-template"), cpu, 16 << 30),
            target_size: target,
            max_size: max,
        }
    }

    #[test]
    fn scale_up_plan_and_messages() {
        let pods = [
            pod("ns/a", 2000, 0),
            pod("ns/b", 2000, 0),
            pod("ns/c", 2000, 0),
        ];
        // One group of 4-cpu nodes: two nodes for three pods.
        let plan = plan_scale_up(&pods, &[group("pool", 4000, 0, 3)]);
        assert_eq!(
            plan,
            ScaleUpPlan::Grow(ScaleUp {
                group: 0,
                from: 0,
                to: 2,
                max: 3,
                pods: vec![0, 1, 2]
            })
        );
        assert_eq!(
            triggered_message("pool", 0, 2, 3),
            "pod triggered scale-up: [{pool 0->2 (max: 3)}]"
        );
        // Capped by the maximum: one more node, for two of the pods.
        let ScaleUpPlan::Grow(up) = plan_scale_up(&pods, &[group("pool", 4000, 2, 3)]) else {
            panic!("grow")
        };
        assert_eq!((up.from, up.to, up.pods.len()), (2, 3, 2));
        // The group that helps most pods wins; on a tie the fewer nodes, then the first.
        let ScaleUpPlan::Grow(up) = plan_scale_up(
            &pods,
            &[group("small", 2000, 0, 10), group("big", 8000, 0, 10)],
        ) else {
            panic!("grow")
        };
        assert_eq!((up.group, up.to), (1, 1));
        let ScaleUpPlan::Grow(up) =
            plan_scale_up(&pods, &[group("x", 8000, 0, 5), group("y", 8000, 0, 5)])
        else {
            panic!("grow")
        };
        assert_eq!(up.group, 0);

        // Too big for every group, or the group is full.
        let huge = [pod("ns/huge", 16000, 32 << 30)];
        assert_eq!(
            plan_scale_up(&huge, &[group("pool", 4000, 0, 3)]),
            ScaleUpPlan::NoOptions(vec![(
                0,
                "pod didn't trigger scale-up: 1 Insufficient cpu, 1 Insufficient memory".into()
            )])
        );
        assert_eq!(
            plan_scale_up(&pods[..1], &[group("pool", 4000, 3, 3)]),
            ScaleUpPlan::NoOptions(vec![(
                0,
                "pod didn't trigger scale-up: 1 max node group size reached".into()
            )])
        );
        let mut selective = pod("ns/sel", 100, 0);
        selective.node_selector.insert("pool".into(), "gpu".into());
        let ScaleUpPlan::NoOptions(msgs) = plan_scale_up(
            &[selective],
            &[
                group("a", 4000, 0, 3),
                group("b", 4000, 0, 3),
                group("c", 4000, 3, 3),
            ],
        ) else {
            panic!("no options")
        };
        assert_eq!(
            msgs[0].1,
            "pod didn't trigger scale-up: 1 max node group size reached, 2 node(s) didn't match Pod's node affinity/selector"
        );
        // No groups at all.
        assert_eq!(
            plan_scale_up(&pods[..1], &[]),
            ScaleUpPlan::NoOptions(vec![(0, "pod didn't trigger scale-up: ".into())])
        );
    }

    fn k8s_pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    #[test]
    fn drainability_rules() {
        let rules = DrainRules {
            skip_nodes_with_local_storage: true,
            skip_nodes_with_system_pods: true,
            expendable_priority_cutoff: -10,
        };
        let job = json!([{"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": "u", "controller": true}]);
        let ds = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "d", "uid": "u", "controller": true}]);
        let cases = [
            (
                json!({"metadata": {"namespace": "ns", "ownerReferences": job}}),
                PodDrain::Move,
            ),
            (
                json!({"metadata": {"namespace": "ns"}}),
                PodDrain::Blocked(BlockingPodReason::NotReplicated),
            ),
            (
                json!({"metadata": {"namespace": "ns", "annotations": {SAFE_TO_EVICT: "true"}}}),
                PodDrain::Move,
            ),
            (
                json!({"metadata": {"namespace": "ns", "ownerReferences": ds}}),
                PodDrain::Ignore,
            ),
            (
                json!({"metadata": {"namespace": "ns", "annotations": {MIRROR_POD: "x"}}}),
                PodDrain::Ignore,
            ),
            (
                json!({"metadata": {"namespace": "ns"}, "status": {"phase": "Succeeded"}}),
                PodDrain::Ignore,
            ),
            (
                json!({"metadata": {"namespace": "ns"}, "spec": {"containers": [], "priority": -11}}),
                PodDrain::Expendable,
            ),
            (
                json!({"metadata": {"namespace": "ns"}, "spec": {"containers": [], "priority": -10}}),
                PodDrain::Blocked(BlockingPodReason::NotReplicated),
            ),
            (
                json!({"metadata": {"namespace": "kube-system", "ownerReferences": job}}),
                PodDrain::Blocked(BlockingPodReason::UnmovableKubeSystemPod),
            ),
            (
                json!({"metadata": {"namespace": "ns", "ownerReferences": job, "annotations": {SAFE_TO_EVICT: "false"}}}),
                PodDrain::Blocked(BlockingPodReason::NotSafeToEvictAnnotation),
            ),
            (
                json!({"metadata": {"namespace": "ns", "ownerReferences": job, "annotations": {DO_NOT_DISRUPT: "true"}}}),
                PodDrain::Blocked(BlockingPodReason::DoNotDisruptAnnotation),
            ),
            (
                json!({"metadata": {"namespace": "ns", "ownerReferences": job},
                    "spec": {"containers": [], "volumes": [{"name": "work", "emptyDir": {}}]}}),
                PodDrain::Blocked(BlockingPodReason::LocalStorageRequested),
            ),
            (
                json!({"metadata": {"namespace": "ns", "ownerReferences": job},
                    "spec": {"containers": [], "volumes": [{"name": "work", "emptyDir": {"medium": "Memory"}},
                                                            {"name": "tok", "projected": {"sources": []}}]}}),
                PodDrain::Move,
            ),
            (
                json!({"metadata": {"namespace": "ns", "ownerReferences": job,
                                 "annotations": {SAFE_TO_EVICT_LOCAL_VOLUMES: "work, cache"}},
                    "spec": {"containers": [], "volumes": [{"name": "work", "emptyDir": {}}, {"name": "cache", "hostPath": {"path": "/x"}}]}}),
                PodDrain::Move,
            ),
        ];
        for (p, want) in cases {
            assert_eq!(drain_pod(&k8s_pod(p.clone()), &rules), want, "{p}");
        }
        let lenient = DrainRules {
            skip_nodes_with_local_storage: false,
            ..rules
        };
        let with_dir = k8s_pod(
            json!({"metadata": {"namespace": "ns", "ownerReferences": job},
            "spec": {"containers": [], "volumes": [{"name": "work", "emptyDir": {}}]}}),
        );
        assert_eq!(drain_pod(&with_dir, &lenient), PodDrain::Move);
        let _ = Volume::default();
    }

    #[test]
    fn scale_down_decisions() {
        let mut busy = node("busy", 4000, 8 << 30);
        busy.requested.milli_cpu = 2000;
        let cand = |pods: Vec<(PodFacts, PodDrain)>, requested: i64| Candidate {
            node: NodeFacts {
                requested: Resources {
                    milli_cpu: requested,
                    ..Resources::default()
                },
                ..node("c", 4000, 8 << 30)
            },
            scale_down_disabled: false,
            pods,
        };
        let empty = cand(vec![], 0);
        assert_eq!(unneeded(&empty, 0.5, &mut []).map(|r| r.evict), Ok(vec![]));
        assert_eq!(
            unneeded(
                &Candidate {
                    scale_down_disabled: true,
                    ..empty.clone()
                },
                0.5,
                &mut []
            ),
            Err(Unremovable::ScaleDownDisabledAnnotation)
        );
        assert_eq!(
            unneeded(&cand(vec![], 2000), 0.5, &mut []),
            Err(Unremovable::NotUnderutilized)
        );
        let blocked = cand(
            vec![
                (pod("ns/ok", 100, 0), PodDrain::Move),
                (
                    pod("ns/keep", 100, 0),
                    PodDrain::Blocked(BlockingPodReason::NotSafeToEvictAnnotation),
                ),
            ],
            200,
        );
        let err = unneeded(&blocked, 0.5, &mut [busy.clone()]).expect_err("blocked");
        assert_eq!(
            err,
            Unremovable::BlockedByPod {
                pod: "ns/keep".into(),
                reason: BlockingPodReason::NotSafeToEvictAnnotation
            }
        );
        assert_eq!(
            err.to_string(),
            "BlockedByPod: NotSafeToEvictAnnotation (ns/keep)"
        );
        let movable = cand(
            vec![
                (pod("ns/m", 1500, 0), PodDrain::Move),
                (pod("ns/x", 100, 0), PodDrain::Expendable),
                (pod("ns/ds", 100, 0), PodDrain::Ignore),
            ],
            1700,
        );
        assert_eq!(
            unneeded(&movable, 0.5, &mut []),
            Err(Unremovable::NoPlaceToMovePods)
        );
        let mut dest = [busy.clone()];
        let removal = unneeded(&movable, 0.5, &mut dest).expect("unneeded");
        assert_eq!(removal.evict, ["ns/m", "ns/x"]);
        assert_eq!(removal.moves, [(pod("ns/m", 1500, 0), "busy".to_string())]);
        // The move is memorised: the same room is not offered twice.
        assert_eq!(dest[0].requested.milli_cpu, 3500);
        assert_eq!(
            unneeded(&movable, 0.5, &mut dest),
            Err(Unremovable::NoPlaceToMovePods)
        );
        assert!((utilization(&busy) - 0.5).abs() < f64::EPSILON);
    }

    #[test]
    fn the_unneeded_pass_follows_the_pods_it_moves() {
        let cand = |name: &str, pods: Vec<(PodFacts, PodDrain)>| {
            let requested = pods
                .iter()
                .map(|(p, _)| p.requests)
                .fold(Resources::default(), Resources::plus);
            Candidate {
                node: NodeFacts {
                    requested,
                    ..node(name, 4000, 8 << 30)
                },
                scale_down_disabled: false,
                pods,
            }
        };
        let a = cand("a", vec![(pod("ns/job", 1000, 0), PodDrain::Move)]);
        let b = cand("b", vec![]);
        let nodes = [a.node.clone(), b.node.clone()];
        // a's pod would go to b; b then holds it and has nowhere to put it (a is going).
        assert_eq!(
            find_unneeded(&[a.clone(), b.clone()], &nodes, 0.5),
            vec![
                Ok(vec!["ns/job".to_string()]),
                Err(Unremovable::NoPlaceToMovePods)
            ]
        );
        // With a third node b can go too, and evicts nothing of its own.
        let c = node("c", 4000, 8 << 30);
        let mut nodes3 = nodes.to_vec();
        nodes3.push(c);
        assert_eq!(
            find_unneeded(&[a.clone(), b.clone()], &nodes3, 0.5),
            vec![Ok(vec!["ns/job".to_string()]), Ok(vec![])]
        );
        // A blocked node stays, and stays a destination.
        let blocked = cand(
            "a",
            vec![(
                pod("ns/keep", 100, 0),
                PodDrain::Blocked(BlockingPodReason::NotReplicated),
            )],
        );
        let r = find_unneeded(&[blocked, b], &nodes, 0.5);
        assert!(matches!(r[0], Err(Unremovable::BlockedByPod { .. })));
        assert_eq!(r[1], Ok(vec![]));
    }

    #[test]
    fn spam_filter_is_one_event_per_object_per_window() {
        use std::time::Duration;
        let w = Duration::from_secs(300);
        assert!(spam_filter_allows(None, w));
        assert!(!spam_filter_allows(Some(Duration::from_secs(10)), w));
        assert!(spam_filter_allows(Some(w), w));
        assert!(spam_filter_allows(Some(Duration::ZERO), Duration::ZERO));
    }
}
