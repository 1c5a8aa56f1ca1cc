//! The cluster-autoscaler model on a real control plane (kube-apiserver, kube-controller-manager,
//! kube-scheduler v1.28 from `REPOBOX_K8S_ASSETS`), with the test bed's kubelet playing the
//! machines: scale-up from zero nodes with CA's events, `NotTriggerScaleUp` for a pod no group
//! fits, scale-in of an idle node, of an underused one (its pod evicted and replaced elsewhere)
//! and not of one running a `safe-to-evict: "false"` pod, and the
//! two disruptions a Job with a pod failure policy must survive: a drain (Eviction API) and a
//! spot reclaim (graceful node shutdown). Each test has its own namespace, kubelet, autoscaler
//! and node group (its pods select the group's label).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams, PropagationPolicy};
use kube::runtime::wait::await_condition;
use repobox_testbed::autoscaler::sim::{BlockingPodReason, Unremovable};
use repobox_testbed::autoscaler::{
    Autoscaler, AutoscalerConfig, AutoscalerEvent, NodeGroup, RemovalCause, TO_BE_DELETED_TAINT,
};
use repobox_testbed::control_plane::ControlPlane;
use repobox_testbed::events::list_for;
use repobox_testbed::kubelet::{Kubelet, KubeletConfig, KubeletEvent, NODE_SHUTDOWN_MESSAGE};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
const TEST_LABEL: &str = "repobox.dev/autoscaler-test";

struct Bed {
    client: Client,
    kubelet: Kubelet,
    autoscaler: Autoscaler,
    ns: String,
    group: String,
    test: String,
}

/// The shared control plane, a namespace, a kubelet without nodes and an autoscaler with one
/// group `<test>-pool` (4 cpu, 16Gi, 0..3 nodes) scoped to the namespace; None when SKIPPED.
async fn bed(test: &str, tweak: impl FnOnce(&mut NodeGroup, &mut AutoscalerConfig)) -> Option<Bed> {
    // None (SKIPPED, `shared` prints the one line) without the binaries.
    let cp = ControlPlane::shared().await.expect("control plane")?;
    let client = cp.client().expect("client");
    let ns = format!("autoscaler-{test}");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");
    // The ServiceAccount admission rejects pods until the controller made `default`.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    await_condition(sas, "default", |sa: Option<&ServiceAccount>| sa.is_some())
        .await
        .expect("default service account");
    let kubelet = Kubelet::start(
        client.clone(),
        KubeletConfig {
            nodes: Vec::new(),
            binaries: HashMap::from([("fake-runner".to_string(), PathBuf::from("/bin/sh"))]),
            api_server: Some(cp.server_url().to_owned()),
            max_grace_period: Some(Duration::from_secs(5)),
            heartbeat_interval: Duration::from_secs(5),
            ..KubeletConfig::default()
        },
    )
    .await
    .expect("kubelet");
    let mut group = NodeGroup::new(format!("{test}-pool"), 0, 3);
    group.labels.insert(TEST_LABEL.into(), test.into());
    let mut cfg = AutoscalerConfig::quick(Vec::new());
    cfg.namespaces = vec![ns.clone()];
    tweak(&mut group, &mut cfg);
    let name = group.name.clone();
    cfg.groups.insert(0, group);
    let autoscaler = Autoscaler::start(client.clone(), kubelet.handle(), cfg)
        .await
        .expect("autoscaler");
    Some(Bed {
        client,
        kubelet,
        autoscaler,
        ns,
        group: name,
        test: test.into(),
    })
}

impl Bed {
    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// A pod for this test's group: `cpu` requested, runs until SIGTERM.
    fn pod_spec(&self, cpu: &str) -> Value {
        json!({"restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
            "nodeSelector": {TEST_LABEL: self.test},
            "containers": [{"name": "main", "image": "runner:1",
                "command": ["fake-runner", "-c", "trap 'exit 143' TERM; while :; do sleep 0.1; done"],
                "resources": {"requests": {"cpu": cpu, "memory": "256Mi"}}}]})
    }

    async fn create_pod(&self, name: &str, cpu: &str, extra: Value) -> Pod {
        let mut pod = json!({"metadata": {"name": name}, "spec": self.pod_spec(cpu)});
        merge(&mut pod, extra);
        self.pods()
            .create(
                &PostParams::default(),
                &serde_json::from_value(pod).expect("pod"),
            )
            .await
            .expect("create pod")
    }

    /// A Job whose pod failure policy takes `action` (`FailJob`, `Ignore`) on
    /// `DisruptionTarget`; `template` is merged into its pod template.
    async fn create_job(&self, name: &str, action: &str, template: Value) -> Job {
        let mut pod = json!({"spec": self.pod_spec("500m")});
        merge(&mut pod, template);
        let job = json!({"metadata": {"name": name}, "spec": {
            "backoffLimit": 3,
            "podFailurePolicy": {"rules": [
                {"action": action, "onPodConditions": [{"type": "DisruptionTarget"}]}]},
            "template": pod}});
        self.jobs()
            .create(
                &PostParams::default(),
                &serde_json::from_value(job).expect("job"),
            )
            .await
            .expect("create job")
    }

    async fn autoscaler_event(
        &self,
        what: &str,
        pred: impl Fn(&AutoscalerEvent) -> bool,
    ) -> AutoscalerEvent {
        self.autoscaler
            .wait_for(WAIT, pred)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }

    async fn kubelet_event(
        &self,
        what: &str,
        pred: impl Fn(&KubeletEvent) -> bool,
    ) -> KubeletEvent {
        self.kubelet
            .wait_for(WAIT, pred)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }

    /// The Job's first pod, once it runs; (pod name, node name).
    async fn job_pod_running(&self, job: &str) -> (String, String) {
        let (ns, prefix) = (self.ns.clone(), format!("{job}-"));
        let e = self
            .kubelet_event("the Job's pod runs", move |e| {
                matches!(e, KubeletEvent::PodRunning { namespace, pod, .. }
                    if *namespace == ns && pod.starts_with(&prefix))
            })
            .await;
        let pod = e.pod().to_string();
        let node = self
            .pods()
            .get(&pod)
            .await
            .expect("pod")
            .spec
            .and_then(|s| s.node_name)
            .expect("bound");
        (pod, node)
    }

    /// Wait for the Job's `Failed` condition; its reason and message.
    async fn job_failed(&self, job: &str) -> (String, String) {
        let failed = |j: Option<&Job>| -> Option<(String, String)> {
            j?.status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "Failed" && c.status == "True")
                .map(|c| {
                    (
                        c.reason.clone().unwrap_or_default(),
                        c.message.clone().unwrap_or_default(),
                    )
                })
        };
        let job = tokio::time::timeout(
            WAIT,
            await_condition(self.jobs(), job, move |j: Option<&Job>| failed(j).is_some()),
        )
        .await
        .expect("the Job fails in time")
        .expect("watch the Job");
        failed(job.as_ref()).expect("Failed condition")
    }

    async fn node_gone(&self, node: &str) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        tokio::time::timeout(
            WAIT,
            await_condition(nodes, node, |n: Option<&Node>| n.is_none()),
        )
        .await
        .expect("the Node goes away in time")
        .expect("watch the Node");
    }

    /// Events with `reason` about `object` (in `namespace`).
    async fn events(&self, namespace: &str, object: &str, reason: &str) -> Vec<Event> {
        list_for(&self.client, namespace, object, reason)
            .await
            .expect("list events")
    }
}

fn merge(into: &mut Value, extra: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, extra) {
        for (k, v) in b {
            match a.get_mut(&k) {
                Some(existing @ Value::Object(_)) if v.is_object() => merge(existing, v),
                _ => {
                    a.insert(k, v);
                }
            }
        }
    }
}

fn source(e: &Event) -> &str {
    e.source
        .as_ref()
        .and_then(|s| s.component.as_deref())
        .unwrap_or_default()
}

#[tokio::test]
async fn pending_pods_from_zero_nodes_get_nodes_and_run() {
    let Some(bed) = bed("scaleup", |_, _| {}).await else {
        return;
    };
    // Three 1.5-cpu pods on 4-cpu nodes: two nodes, one scale-up for all three.
    let names = ["web-0", "web-1", "web-2"];
    for n in names {
        bed.create_pod(n, "1500m", json!({})).await;
    }
    let up = bed
        .autoscaler_event("scale-up", |e| matches!(e, AutoscalerEvent::ScaleUp { .. }))
        .await;
    let AutoscalerEvent::ScaleUp {
        group,
        from,
        to,
        max,
        nodes,
        mut pods,
    } = up
    else {
        unreachable!()
    };
    pods.sort();
    assert_eq!(
        (group.as_str(), from, to, max),
        (bed.group.as_str(), 0, 2, 3)
    );
    assert_eq!(
        pods,
        names.map(|n| format!("{}/{n}", bed.ns)).to_vec(),
        "every pending pod is in the one scale-up"
    );
    for n in &nodes {
        bed.autoscaler_event(
            "node Ready",
            |e| matches!(e, AutoscalerEvent::NodeReady { node, .. } if node == n),
        )
        .await;
    }
    // The real scheduler binds them to the new nodes; the kubelet runs them.
    for n in names {
        let ns = bed.ns.clone();
        bed.kubelet_event("pod runs", move |e| {
            matches!(e, KubeletEvent::PodRunning { namespace, pod, .. } if *namespace == ns && pod == n)
        })
        .await;
        let pod = bed.pods().get(n).await.expect("pod");
        let node = pod.spec.and_then(|s| s.node_name).expect("bound");
        assert!(nodes.contains(&node), "{n} on {node}, not one of {nodes:?}");
        let events = bed.events(&bed.ns, n, "TriggeredScaleUp").await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(
            events[0].message.as_deref(),
            Some(format!("pod triggered scale-up: [{{{} 0->2 (max: 3)}}]", bed.group).as_str())
        );
        assert_eq!(source(&events[0]), "cluster-autoscaler");
        assert_eq!(events[0].type_.as_deref(), Some("Normal"));
    }
    // Running pods fit: no second scale-up.
    bed.autoscaler.wait_scans(2).await.expect("scans");
    let ups = bed
        .autoscaler
        .history()
        .into_iter()
        .filter(|e| matches!(e, AutoscalerEvent::ScaleUp { .. }))
        .count();
    assert_eq!(ups, 1);
}

#[tokio::test]
async fn pods_no_group_fits_get_not_trigger_scale_up_and_expendable_ones_nothing() {
    let Some(bed) = bed("notrigger", |_, cfg| {
        // A second group that is full from the start.
        let mut full = NodeGroup::new("notrigger-full", 0, 0);
        full.labels.insert(TEST_LABEL.into(), "notrigger".into());
        cfg.groups.push(full);
    })
    .await
    else {
        return;
    };
    let huge = bed.create_pod("huge", "64", json!({})).await;
    let message = "pod didn't trigger scale-up: 1 Insufficient cpu, 1 max node group size reached";
    let key = format!("{}/huge", bed.ns);
    let e = bed
        .autoscaler_event(
            "NotTriggerScaleUp",
            |e| matches!(e, AutoscalerEvent::NotTriggerScaleUp { pod, .. } if *pod == key),
        )
        .await;
    assert_eq!(
        e,
        AutoscalerEvent::NotTriggerScaleUp {
            pod: key.clone(),
            message: message.into()
        }
    );
    let events = bed.events(&bed.ns, "huge", "NotTriggerScaleUp").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].message.as_deref(), Some(message));
    assert_eq!(source(&events[0]), "cluster-autoscaler");
    assert_eq!(
        events[0].involved_object.uid, huge.metadata.uid,
        "about the pod"
    );

    // An expendable pod (priority below -10) that would fit never triggers a scale-up.
    let classes: Api<PriorityClass> = Api::all(bed.client.clone());
    let class: PriorityClass = serde_json::from_value(
        json!({"metadata": {"name": "repobox-test-expendable"}, "value": -20}),
    )
    .expect("class");
    match classes.create(&PostParams::default(), &class).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("priority class: {e}"),
    }
    // The Priority admission reads classes from its informer: a new one takes a moment.
    let mut pod = json!({"metadata": {"name": "expendable"}, "spec": bed.pod_spec("500m")});
    pod["spec"]["priorityClassName"] = json!("repobox-test-expendable");
    let pod: Pod = serde_json::from_value(pod).expect("pod");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match bed.pods().create(&PostParams::default(), &pod).await {
            Ok(_) => break,
            Err(kube::Error::Api(e))
                if e.code == 403
                    && e.message.contains("no PriorityClass")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("create the expendable pod: {e}"),
        }
    }
    let pods = bed.pods();
    tokio::time::timeout(
        WAIT,
        await_condition(pods, "expendable", |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable")
                    })
                })
        }),
    )
    .await
    .expect("the scheduler gives up on it")
    .expect("watch");
    // Several scans later: still one NotTriggerScaleUp (the recorder's 5-minute spam window,
    // event count 1), no scale-up, nothing on the expendable pod.
    bed.autoscaler.wait_scans(4).await.expect("scans");
    let history = bed.autoscaler.history();
    assert_eq!(
        history
            .iter()
            .filter(|e| matches!(e, AutoscalerEvent::NotTriggerScaleUp { .. }))
            .count(),
        1,
        "{history:#?}"
    );
    assert!(
        !history
            .iter()
            .any(|e| matches!(e, AutoscalerEvent::ScaleUp { .. })),
        "{history:#?}"
    );
    let events = bed.events(&bed.ns, "huge", "NotTriggerScaleUp").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].count, Some(1));
    for reason in ["NotTriggerScaleUp", "TriggeredScaleUp"] {
        assert!(bed.events(&bed.ns, "expendable", reason).await.is_empty());
    }
}

#[tokio::test]
async fn an_idle_node_is_scaled_in() {
    let Some(bed) = bed("idle", |g, _| g.initial_size = 1).await else {
        return;
    };
    let node = format!("{}-1", bed.group);
    let removed = bed
        .autoscaler_event("node removed", |e| {
            matches!(e, AutoscalerEvent::NodeRemoved { .. })
        })
        .await;
    assert_eq!(
        removed,
        AutoscalerEvent::NodeRemoved {
            group: bed.group.clone(),
            node: node.clone(),
            cause: RemovalCause::ScaleDown
        }
    );
    // Ready, unneeded, scaled down (no pods to evict), removed: in that order.
    let steps: Vec<&str> = bed
        .autoscaler
        .history()
        .iter()
        .filter_map(|e| match e {
            AutoscalerEvent::NodeReady { .. } => Some("ready"),
            AutoscalerEvent::Unneeded { .. } => Some("unneeded"),
            AutoscalerEvent::ScaleDown { pods, .. } if pods.is_empty() => Some("scale-down"),
            AutoscalerEvent::NodeRemoved { .. } => Some("removed"),
            _ => None,
        })
        .collect();
    assert_eq!(steps, ["ready", "unneeded", "scale-down", "removed"]);
    bed.node_gone(&node).await;
    bed.kubelet_event(
        "kubelet removed the node",
        |e| matches!(e, KubeletEvent::NodeRemoved { node: n } if *n == node),
    )
    .await;
    let messages: Vec<String> = bed
        .events("default", &node, "ScaleDown")
        .await
        .iter()
        .filter(|e| source(e) == "cluster-autoscaler")
        .filter_map(|e| e.message.clone())
        .collect();
    // CA's recorder lets one event per object through every 5 minutes: the taint's event is
    // written, `node removed by cluster autoscaler` right after it is dropped, as on a cluster.
    assert_eq!(
        messages,
        ["marked the node as toBeDeleted/unschedulable"],
        "{messages:?}"
    );
    assert!(bed.autoscaler.nodes(&bed.group).is_empty());
}

#[tokio::test]
async fn an_underused_node_is_drained_and_its_pod_moves() {
    let Some(bed) = bed("move", |g, cfg| {
        g.initial_size = 2;
        g.min_size = 1;
        // Time for the Job's pod to land before the first node's unneeded time is up.
        cfg.scale_down_unneeded_time = Duration::from_secs(12);
    })
    .await
    else {
        return;
    };
    let (first, second) = (format!("{}-1", bed.group), format!("{}-2", bed.group));
    // New Nodes carry `node.kubernetes.io/not-ready` until the node lifecycle controller has
    // seen them Ready: let both be schedulable, so that the scheduler's preference decides.
    for n in [&first, &second] {
        let nodes: Api<Node> = Api::all(bed.client.clone());
        let untainted = |n: Option<&Node>| {
            n.is_some_and(|n| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_none_or(|t| t.is_empty())
            })
        };
        tokio::time::timeout(WAIT, await_condition(nodes, n, untainted))
            .await
            .expect("untainted in time")
            .expect("watch the Node");
    }
    // The scheduler prefers the first node; CA's simulation ignores preferences, so the pod
    // can move to the second, and the first (below 50 % used) is unneeded. `Ignore` on
    // `DisruptionTarget`: the Job replaces an evicted pod without counting a failure.
    bed.create_job(
        "mover",
        "Ignore",
        json!({"spec": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "preference": {"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [first]}]}}]}}}}),
    )
    .await;
    let (pod, node) = bed.job_pod_running("mover").await;
    assert_eq!(node, first);
    let key = format!("{}/{pod}", bed.ns);
    let f = first.clone();
    let down = bed
        .autoscaler_event(
            "scale-down",
            move |e| matches!(e, AutoscalerEvent::ScaleDown { node, .. } if *node == f),
        )
        .await;
    assert_eq!(
        down,
        AutoscalerEvent::ScaleDown {
            group: bed.group.clone(),
            node: first.clone(),
            pods: vec![key.clone()]
        }
    );
    let f = first.clone();
    bed.autoscaler_event("node removed", move |e| {
        matches!(e, AutoscalerEvent::NodeRemoved { node, cause: RemovalCause::ScaleDown, .. } if *node == f)
    })
    .await;
    assert!(
        bed.autoscaler
            .history()
            .contains(&AutoscalerEvent::Evicted {
                node: first.clone(),
                pod: key
            })
    );
    // The eviction as the kubelet saw it, CA's event on the pod, and the replacement running
    // on the second node, which stays (the group's minimum, and it runs the pod).
    let p = pod.clone();
    let fin = bed
        .kubelet_event(
            "the evicted pod finished",
            move |e| matches!(e, KubeletEvent::PodFinished { pod, .. } if *pod == p),
        )
        .await;
    assert!(
        matches!(&fin, KubeletEvent::PodFinished { disruption: Some(d), .. } if d == "EvictionByEvictionAPI"),
        "{fin:?}"
    );
    let events = bed.events(&bed.ns, &pod, "ScaleDown").await;
    assert_eq!(
        events.first().and_then(|e| e.message.as_deref()),
        Some("deleting pod for node scale down"),
        "{events:?}"
    );
    let (ns, old) = (bed.ns.clone(), pod.clone());
    let replacement = bed
        .kubelet_event("the replacement runs", move |e| {
            matches!(e, KubeletEvent::PodRunning { namespace, pod, .. }
                if *namespace == ns && pod.starts_with("mover-") && *pod != old)
        })
        .await;
    let placed = bed
        .pods()
        .get(replacement.pod())
        .await
        .expect("pod")
        .spec
        .and_then(|s| s.node_name);
    assert_eq!(placed.as_deref(), Some(second.as_str()));
    bed.node_gone(&first).await;
    assert_eq!(bed.autoscaler.nodes(&bed.group), [second]);
}

#[tokio::test]
async fn a_node_running_a_safe_to_evict_false_pod_is_not_scaled_in() {
    let Some(bed) = bed("keep", |_, _| {}).await else {
        return;
    };
    bed.create_job(
        "keeper",
        "FailJob",
        json!({"metadata": {"annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}}}),
    )
    .await;
    let (pod, node) = bed.job_pod_running("keeper").await;
    let blocked = bed
        .autoscaler_event("removal blocked", |e| {
            matches!(
                e,
                AutoscalerEvent::ScaleDownBlocked {
                    reason: Unremovable::BlockedByPod { .. },
                    ..
                }
            )
        })
        .await;
    assert_eq!(
        blocked,
        AutoscalerEvent::ScaleDownBlocked {
            node: node.clone(),
            reason: Unremovable::BlockedByPod {
                pod: format!("{}/{pod}", bed.ns),
                reason: BlockingPodReason::NotSafeToEvictAnnotation
            }
        }
    );
    // Well past the unneeded time (3 s) and the cooldown after the scale-up (5 s): still there.
    bed.autoscaler.wait_scans(10).await.expect("scans");
    assert!(
        !bed.autoscaler.history().iter().any(|e| matches!(
            e,
            AutoscalerEvent::ScaleDown { .. } | AutoscalerEvent::NodeRemoved { .. }
        )),
        "{:#?}",
        bed.autoscaler.history()
    );
    let n = Api::<Node>::all(bed.client.clone())
        .get(&node)
        .await
        .expect("the node is still there");
    assert!(
        !n.spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == TO_BE_DELETED_TAINT)
    );
    // Once the pod is gone the node is unneeded and goes.
    bed.jobs()
        .delete(
            "keeper",
            &DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            },
        )
        .await
        .expect("delete the Job");
    let n2 = node.clone();
    bed.autoscaler_event("node removed", move |e| {
        matches!(e, AutoscalerEvent::NodeRemoved { node, cause: RemovalCause::ScaleDown, .. } if *node == n2)
    })
    .await;
    bed.node_gone(&node).await;
}

#[tokio::test]
async fn drain_fails_a_job_whose_failure_policy_fails_on_disruption() {
    let Some(bed) = bed("drain", |_, _| {}).await else {
        return;
    };
    bed.create_job("drained", "FailJob", json!({})).await;
    let (pod, node) = bed.job_pod_running("drained").await;
    bed.autoscaler.drain(&node).await.expect("drain");
    let key = format!("{}/{pod}", bed.ns);
    assert!(
        bed.autoscaler
            .history()
            .contains(&AutoscalerEvent::Drained {
                node: node.clone(),
                pods: vec![key.clone()]
            })
    );
    // The API server's DisruptionTarget, SIGTERM, Failed: the Job controller applies FailJob.
    let p = pod.clone();
    let fin = bed
        .kubelet_event(
            "the pod finished",
            move |e| matches!(e, KubeletEvent::PodFinished { pod, .. } if *pod == p),
        )
        .await;
    assert!(
        matches!(&fin, KubeletEvent::PodFinished { phase, disruption: Some(d), .. }
            if phase == "Failed" && d == "EvictionByEvictionAPI"),
        "{fin:?}"
    );
    let (reason, message) = bed.job_failed("drained").await;
    assert_eq!(reason, "PodFailurePolicy", "{message}");
    assert!(message.contains("DisruptionTarget"), "{message}");
    // The node stays, cordoned.
    let n = Api::<Node>::all(bed.client.clone())
        .get(&node)
        .await
        .expect("node");
    assert_eq!(n.spec.and_then(|s| s.unschedulable), Some(true));
}

#[tokio::test]
async fn spot_reclaim_fails_a_job_through_graceful_node_shutdown() {
    let Some(bed) = bed("spot", |g, _| g.spot = true).await else {
        return;
    };
    bed.create_job("reclaimed", "FailJob", json!({})).await;
    let (pod, node) = bed.job_pod_running("reclaimed").await;
    bed.autoscaler.reclaim_spot(&node).await.expect("reclaim");
    let key = format!("{}/{pod}", bed.ns);
    let history = bed.autoscaler.history();
    assert!(
        history.contains(&AutoscalerEvent::SpotReclaim {
            node: node.clone(),
            pods: vec![key]
        }),
        "{history:#?}"
    );
    assert!(history.contains(&AutoscalerEvent::NodeRemoved {
        group: bed.group.clone(),
        node: node.clone(),
        cause: RemovalCause::SpotReclaim
    }));
    // The kubelet's shutdown manager: DisruptionTarget/TerminationByKubelet, then Failed with
    // reason Terminated; the pod is kept.
    let p = pod.clone();
    let fin = bed
        .kubelet_event(
            "the pod finished",
            move |e| matches!(e, KubeletEvent::PodFinished { pod, .. } if *pod == p),
        )
        .await;
    assert!(
        matches!(&fin, KubeletEvent::PodFinished { phase, reason: Some(r), disruption: Some(d), deleted: false, .. }
            if phase == "Failed" && r == "Terminated" && d == "TerminationByKubelet"),
        "{fin:?}"
    );
    let (reason, message) = bed.job_failed("reclaimed").await;
    assert_eq!(reason, "PodFailurePolicy", "{message}");
    assert!(message.contains("DisruptionTarget"), "{message}");
    // What the pod says (the pod garbage collector removes it only 40 s after its node).
    {
        let st = bed
            .pods()
            .get(&pod)
            .await
            .expect("the pod is kept")
            .status
            .expect("status");
        assert_eq!(
            (
                st.phase.as_deref(),
                st.reason.as_deref(),
                st.message.as_deref()
            ),
            (
                Some("Failed"),
                Some("Terminated"),
                Some(NODE_SHUTDOWN_MESSAGE)
            )
        );
        let dt = st
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "DisruptionTarget")
            .expect("DisruptionTarget");
        assert_eq!(
            (
                dt.status.as_str(),
                dt.reason.as_deref(),
                dt.message.as_deref()
            ),
            (
                "True",
                Some("TerminationByKubelet"),
                Some(NODE_SHUTDOWN_MESSAGE)
            )
        );
    }
    bed.node_gone(&node).await;
    let shutdown = bed.events("default", &node, "NodeShutdown").await;
    assert_eq!(shutdown.len(), 1, "{shutdown:?}");
    assert_eq!(source(&shutdown[0]), "kubelet");
    assert_eq!(
        shutdown[0].message.as_deref(),
        Some("Shutdown manager detected shutdown event")
    );
    // On-demand capacity is not reclaimed.
    let err = bed
        .autoscaler
        .reclaim_spot("no-such-node")
        .await
        .expect_err("not a group's node");
    assert!(err.to_string().contains("does not belong"), "{err:#}");
}
