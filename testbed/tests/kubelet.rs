//! The kubelet on a real control plane (kube-apiserver, kube-controller-manager, kube-scheduler
//! v1.28 from `REPOBOX_K8S_ASSETS`): isolation between a pod's containers, volumes with
//! fsGroup, the service-account token, graceful deletion, deadlines, eviction, and Jobs run by
//! the real Job controller and scheduler. Every test has its own namespace and its own Node.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use repobox_testbed::control_plane::ControlPlane;
use repobox_testbed::kubelet::{Fault, Kubelet, KubeletConfig, KubeletEvent, NodeSettings};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

struct Bed {
    client: Client,
    kubelet: Kubelet,
    ns: String,
    node: String,
}

/// The shared control plane, a namespace and a kubelet with one node, or None (SKIPPED).
async fn bed(test: &str) -> Option<Bed> {
    bed_with(test, |_| {}).await
}

async fn bed_with(test: &str, tweak: impl FnOnce(&mut KubeletConfig)) -> Option<Bed> {
    // None (SKIPPED, `shared` prints the one line) without the binaries.
    let cp = ControlPlane::shared().await.expect("control plane")?;
    let client = cp.client().expect("client");
    let ns = format!("kubelet-{test}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");
    // The ServiceAccount admission rejects pods until the controller made `default`.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    poll("default service account", || async {
        sas.get_opt("default").await.ok().flatten().is_some()
    })
    .await;
    let node = format!("node-{test}");
    let mut cfg = KubeletConfig {
        nodes: vec![NodeSettings::new(&node)],
        binaries: HashMap::from([("fake-runner".to_string(), PathBuf::from("/bin/sh"))]),
        api_server: Some(cp.server_url().to_owned()),
        max_grace_period: Some(Duration::from_secs(5)),
        heartbeat_interval: Duration::from_secs(5),
        ..KubeletConfig::default()
    };
    tweak(&mut cfg);
    let kubelet = Kubelet::start(client.clone(), cfg).await.expect("kubelet");
    Some(Bed {
        client,
        kubelet,
        ns,
        node,
    })
}

/// Poll until `check` holds (an API condition), panicking after [`WAIT`].
async fn poll<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Bed {
    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn create_pod(&self, pod: Value) -> String {
        let mut pod = pod;
        pod["spec"]["nodeName"] = json!(self.node);
        let pod: Pod = serde_json::from_value(pod).expect("pod");
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod")
            .name_any()
    }

    async fn event(&self, what: &str, pred: impl Fn(&KubeletEvent) -> bool) -> KubeletEvent {
        self.kubelet
            .wait_for(WAIT, pred)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }

    async fn finished(&self, pod: &str) -> KubeletEvent {
        let (ns, pod) = (self.ns.clone(), pod.to_string());
        self.event("pod finished", move |e| {
            matches!(e, KubeletEvent::PodFinished { namespace, pod: p, .. } if *namespace == ns && *p == pod)
        })
        .await
    }
}

fn condition<'a>(
    pod: &'a Pod,
    type_: &str,
) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

#[tokio::test]
async fn containers_of_a_pod_are_isolated_from_each_other_and_the_host() {
    let Some(bed) = bed("isolation").await else {
        return;
    };
    if !bed.kubelet.isolates() {
        println!("SKIPPED: container isolation needs root with mount/PID namespaces");
        return;
    }
    let secrets: Api<Secret> = Api::namespaced(bed.client.clone(), &bed.ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "runner-only"},
                "stringData": {"token": "runner-secret-value"}}))
            .expect("secret"),
        )
        .await
        .expect("secret");
    // The runner holds the secret and keeps running (its command line carries a marker the
    // agent looks for) until the agent is done.
    let runner = r#"umask 002; echo marker-runner-7f3 >/dev/null
if [ "$(cat /var/run/secrets/repobox/token)" = runner-secret-value ]; then echo runner-reads-secret; fi
echo from-runner > /work/shared.txt
while [ ! -f /work/agent-done ]; do sleep 0.1; done
echo "runner-sees=$(cat /work/agent.txt)""#;
    let agent = r#"echo "uid=$(id -u)"; echo "groups=$(id -G)"
if [ -e /var/run/secrets/repobox/token ]; then echo secret-visible; else echo secret-absent; fi
while [ ! -f /work/shared.txt ]; do sleep 0.1; done
echo "read=$(cat /work/shared.txt)"; echo "group=$(stat -c %g /work/shared.txt)"
echo from-agent >> /work/shared.txt && echo append-ok
echo agent-file > /work/agent.txt
echo "pids=$(ls /proc | grep -E '^[0-9]+$' | tr '\n' ' ')"
echo "pid1=$(tr '\0' ' ' < /proc/1/cmdline | cut -c1-16)"
echo "runner-visible=$(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\0' ' ' | grep -c 'marker-runne[r]')"
for p in /work/wt-kubelet /work/briefs /root /var/lib; do [ -e "$p" ] && echo "visible $p"; done
echo "tmp=[$(ls -A /tmp)]"
touch /work/agent-done"#;
    let name = bed
        .create_pod(json!({"metadata": {"name": "two-uids"}, "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
            "securityContext": {"fsGroup": 2000},
            "volumes": [
                {"name": "key", "secret": {"secretName": "runner-only", "defaultMode": 0o400}},
                {"name": "work", "emptyDir": {}}],
            "containers": [
                {"name": "runner", "image": "runner:1", "command": ["sh", "-c", runner],
                 "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "allowPrivilegeEscalation": false},
                 "volumeMounts": [{"name": "key", "mountPath": "/var/run/secrets/repobox", "readOnly": true},
                                  {"name": "work", "mountPath": "/work"}]},
                {"name": "agent", "image": "agent:1", "command": ["sh", "-c", agent],
                 "securityContext": {"runAsUser": 65533, "runAsGroup": 65533, "allowPrivilegeEscalation": false,
                                     "capabilities": {"drop": ["ALL"]}},
                 "volumeMounts": [{"name": "work", "mountPath": "/work"}]}]}}))
        .await;
    let fin = bed.finished(&name).await;
    let agent_log = bed.kubelet.logs(&bed.ns, &name, "agent");
    let runner_log = bed.kubelet.logs(&bed.ns, &name, "runner");
    let KubeletEvent::PodFinished { phase, .. } = &fin else {
        unreachable!()
    };
    assert_eq!(
        phase, "Succeeded",
        "{fin:?}\nagent: {agent_log}\nrunner: {runner_log}"
    );

    // The agent runs as its own UID, with the pod's fsGroup as a supplementary group.
    assert!(agent_log.contains("uid=65533\n"), "{agent_log}");
    assert!(agent_log.contains("groups=65533 2000\n"), "{agent_log}");
    // It cannot reach what only the runner mounts.
    assert!(agent_log.contains("secret-absent"), "{agent_log}");
    assert!(runner_log.contains("runner-reads-secret"), "{runner_log}");
    // The emptyDir is shared, group-owned by fsGroup, writable by both.
    assert!(agent_log.contains("read=from-runner"), "{agent_log}");
    assert!(agent_log.contains("group=2000"), "{agent_log}");
    assert!(agent_log.contains("append-ok"), "{agent_log}");
    assert!(
        runner_log.contains("runner-sees=agent-file"),
        "{runner_log}"
    );
    // Its own PID namespace: PID 1 is its shell, the runner's processes are not there.
    let pids: Vec<u32> = agent_log
        .lines()
        .find_map(|l| l.strip_prefix("pids="))
        .expect("pids line")
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect();
    // Only this shell (PID 1) and the pipeline it is running; small numbers of a fresh namespace.
    assert!(
        pids.contains(&1) && pids.len() <= 6 && pids.iter().all(|p| *p < 100),
        "{agent_log}"
    );
    assert!(agent_log.contains("pid1=sh -c echo \"uid"), "{agent_log}");
    assert!(agent_log.contains("runner-visible=0"), "{agent_log}");
    // Nothing of the host's /work, /root, /var or /tmp.
    assert!(!agent_log.contains("visible /"), "{agent_log}");
    assert!(agent_log.contains("tmp=[]"), "{agent_log}");

    // The pod status as a kubelet writes it.
    let pod = bed.pods().get(&name).await.expect("pod");
    let st = pod.status.clone().expect("status");
    assert_eq!(st.phase.as_deref(), Some("Succeeded"));
    assert_eq!(st.host_ip.as_deref(), Some("127.0.0.1"));
    assert!(st.start_time.is_some());
    let cs = st.container_statuses.clone().expect("container statuses");
    assert_eq!(cs.len(), 2);
    for c in &cs {
        let t = c
            .state
            .clone()
            .and_then(|s| s.terminated)
            .expect("terminated");
        assert_eq!(
            (t.exit_code, t.reason.as_deref()),
            (0, Some("Completed")),
            "{c:?}"
        );
        assert!(t.started_at.is_some() && t.finished_at.is_some());
    }
    assert_eq!(
        condition(&pod, "PodScheduled").map(|c| c.status.as_str()),
        Some("True")
    );
    assert_eq!(
        condition(&pod, "Initialized").map(|c| c.status.as_str()),
        Some("True")
    );
    let ready = condition(&pod, "Ready").expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("False", Some("PodCompleted"))
    );
}

#[tokio::test]
async fn init_containers_and_the_service_account_token() {
    let Some(bed) = bed("token").await else {
        return;
    };
    // A service account that may read pods in the namespace.
    let sas: Api<ServiceAccount> = Api::namespaced(bed.client.clone(), &bed.ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "reader"}})).expect("sa"),
    )
    .await
    .expect("sa");
    let rbs: Api<RoleBinding> = Api::namespaced(bed.client.clone(), &bed.ns);
    rbs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "reader-view"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": bed.ns}]}))
        .expect("rb"),
    )
    .await
    .expect("rolebinding");
    // `install` copies a file into an emptyDir; `main` lists pods with the mounted token.
    let list = r#"cat "$SHARED/installed"
T="$SA/token"; NS=$(cat "$SA/namespace")
curl -sS --max-time 10 --cacert "$SA/ca.crt" -H "Authorization: Bearer $(cat "$T")" \
  "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/$NS/pods" \
  | grep -o '"kind": *"PodList"'"#;
    let sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let name = bed
        .create_pod(json!({"metadata": {"name": "with-token"}, "spec": {
            "restartPolicy": "Never", "serviceAccountName": "reader",
            "volumes": [{"name": "shared", "emptyDir": {}}],
            "initContainers": [{"name": "install", "image": "tools:1",
                "command": ["fake-runner", "-c", "echo installed-by-init > \"$SHARED/installed\""],
                "env": [{"name": "SHARED", "value": "/shared"}],
                "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}],
            "containers": [{"name": "main", "image": "tools:1", "command": ["sh", "-c", list],
                "env": [{"name": "SA", "value": sa_dir}, {"name": "SHARED", "value": "/shared"}],
                "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}]}}))
        .await;
    let fin = bed.finished(&name).await;
    let logs = bed.kubelet.logs(&bed.ns, &name, "main");
    assert!(
        matches!(&fin, KubeletEvent::PodFinished { phase, .. } if phase == "Succeeded"),
        "{fin:?}\n{logs}\ninit: {}",
        bed.kubelet.logs(&bed.ns, &name, "install")
    );
    assert!(logs.contains("installed-by-init"), "{logs}");
    assert!(logs.contains("PodList"), "{logs}");
    let pod = bed.pods().get(&name).await.expect("pod");
    let init = pod
        .status
        .clone()
        .and_then(|s| s.init_container_statuses)
        .expect("init statuses");
    assert_eq!(
        init[0]
            .state
            .clone()
            .and_then(|s| s.terminated)
            .map(|t| t.reason),
        Some(Some("Completed".into()))
    );
    // The admission plugin added the token volume; with automount off there is none.
    let name = bed
        .create_pod(json!({"metadata": {"name": "no-token"}, "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": false,
            "containers": [{"name": "main", "image": "tools:1", "command": ["sh", "-c",
                "if [ -e \"$SA/token\" ]; then echo token-present; else echo token-absent; fi"],
                "env": [{"name": "SA", "value": sa_dir}]}]}}))
        .await;
    bed.finished(&name).await;
    let logs = bed.kubelet.logs(&bed.ns, &name, "main");
    assert!(logs.contains("token-absent"), "{logs}");
}

#[tokio::test]
async fn deletion_deadlines_eviction_and_image_pulls() {
    let Some(bed) = bed("stop").await else {
        return;
    };
    // Graceful deletion: one container exits on SIGTERM, the other ignores it and is killed
    // when the grace period (3 s) ends; then the kubelet deletes the pod for good.
    let name = bed
        .create_pod(json!({"metadata": {"name": "graceful"}, "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 3,
            "containers": [
                {"name": "polite", "image": "x:1", "command": ["sh", "-c",
                    "trap 'echo got-term; exit 0' TERM; while :; do sleep 0.1; done"]},
                {"name": "stubborn", "image": "x:1", "command": ["sh", "-c",
                    "trap 'echo ignoring-term' TERM; while :; do sleep 0.1; done"]}]}}))
        .await;
    let n = name.clone();
    bed.event(
        "running",
        move |e| matches!(e, KubeletEvent::PodRunning { pod, .. } if *pod == n),
    )
    .await;
    let started = Instant::now();
    bed.pods()
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
    let fin = bed.finished(&name).await;
    let took = started.elapsed();
    let KubeletEvent::PodFinished {
        containers,
        deleted,
        phase,
        ..
    } = &fin
    else {
        unreachable!()
    };
    assert!(*deleted, "{fin:?}");
    assert_eq!(
        phase, "Failed",
        "the stubborn container was killed: {fin:?}"
    );
    let exit = |n: &str| {
        containers
            .iter()
            .find(|c| c.name == n)
            .expect("exit")
            .clone()
    };
    assert_eq!(exit("polite").exit_code, 0);
    assert_eq!(
        (exit("stubborn").exit_code, exit("stubborn").signal),
        (137, Some(9))
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert!(
        bed.kubelet
            .logs(&bed.ns, &name, "polite")
            .contains("got-term")
    );
    assert!(
        bed.kubelet
            .logs(&bed.ns, &name, "stubborn")
            .contains("ignoring-term")
    );
    let pods = bed.pods();
    poll("pod removed", || async {
        pods.get_opt(&name).await.ok().flatten().is_none()
    })
    .await;

    // The pod's own activeDeadlineSeconds.
    let name = bed
        .create_pod(json!({"metadata": {"name": "deadline"}, "spec": {
            "restartPolicy": "Never", "activeDeadlineSeconds": 2, "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": "x:1", "command": ["sh", "-c",
                "trap 'exit 143' TERM; while :; do sleep 0.1; done"]}]}}))
        .await;
    let fin = bed.finished(&name).await;
    assert!(
        matches!(&fin, KubeletEvent::PodFinished { phase, reason: Some(r), .. } if phase == "Failed" && r == "DeadlineExceeded"),
        "{fin:?}"
    );
    let st = bed
        .pods()
        .get(&name)
        .await
        .expect("pod")
        .status
        .expect("status");
    assert_eq!(st.reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(
        st.message.as_deref(),
        Some("Pod was active on the node longer than the specified deadline")
    );

    // Eviction through the real Eviction API: DisruptionTarget, SIGTERM, gone.
    let name = bed
        .create_pod(json!({"metadata": {"name": "evicted"}, "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "c", "image": "x:1", "command": ["sh", "-c",
                "trap 'exit 143' TERM; while :; do sleep 0.1; done"]}]}}))
        .await;
    let n = name.clone();
    bed.event(
        "running",
        move |e| matches!(e, KubeletEvent::PodRunning { pod, .. } if *pod == n),
    )
    .await;
    bed.kubelet
        .fault(&bed.ns, &name, Fault::Evict)
        .expect("evict");
    let fin = bed.finished(&name).await;
    assert!(
        matches!(&fin, KubeletEvent::PodFinished { disruption: Some(d), deleted: true, .. } if d == "EvictionByEvictionAPI"),
        "{fin:?}"
    );

    // OOM kill: exit 137, reason OOMKilled, pod Failed (kept).
    let name = bed
        .create_pod(json!({"metadata": {"name": "oom"}, "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "x:1", "command": ["sh", "-c", "while :; do sleep 0.1; done"]}]}}))
        .await;
    let n = name.clone();
    bed.event(
        "running",
        move |e| matches!(e, KubeletEvent::PodRunning { pod, .. } if *pod == n),
    )
    .await;
    bed.kubelet
        .fault(&bed.ns, &name, Fault::OomKill { container: None })
        .expect("oom");
    bed.finished(&name).await;
    let st = bed
        .pods()
        .get(&name)
        .await
        .expect("pod")
        .status
        .expect("status");
    assert_eq!(st.phase.as_deref(), Some("Failed"));
    let t = st.container_statuses.expect("cs")[0]
        .state
        .clone()
        .and_then(|s| s.terminated)
        .expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("OOMKilled")));
}

#[tokio::test]
async fn image_pull_errors_keep_the_pod_pending() {
    let Some(bed) = bed_with("pull", |cfg| {
        cfg.image_pull_error = Some("broken-image".into());
    })
    .await
    else {
        return;
    };
    let name = bed
        .create_pod(json!({"metadata": {"name": "pull"}, "spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "registry.example/broken-image:1", "command": ["true"]}]}}))
        .await;
    let n = name.clone();
    bed.event(
        "pull error",
        move |e| matches!(e, KubeletEvent::ImagePullError { pod, .. } if *pod == n),
    )
    .await;
    let pods = bed.pods();
    poll("ErrImagePull in the status", || async {
        pods.get(&name)
            .await
            .ok()
            .and_then(|p| p.status)
            .is_some_and(|s| {
                s.phase.as_deref() == Some("Pending")
                    && s.container_statuses
                        .unwrap_or_default()
                        .first()
                        .and_then(|c| {
                            c.state
                                .clone()
                                .and_then(|s| s.waiting)
                                .and_then(|w| w.reason)
                        })
                        == Some("ErrImagePull".into())
            })
    })
    .await;
    assert_eq!(bed.kubelet.containers_started(), 0);
}

#[tokio::test]
async fn real_jobs_are_scheduled_run_and_stopped_at_their_deadline() {
    let Some(bed) = bed("jobs").await else {
        return;
    };
    // The node is Ready for the node lifecycle controller and the scheduler.
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let node = nodes.get(&bed.node).await.expect("node");
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .and_then(|cs| cs.into_iter().find(|c| c.type_ == "Ready"))
        .expect("Ready condition");
    assert_eq!(ready.status, "True");

    let jobs: Api<Job> = Api::namespaced(bed.client.clone(), &bed.ns);
    let job = |name: &str, script: &str, extra: Value| -> Job {
        let mut spec = json!({"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
            "nodeSelector": {"kubernetes.io/hostname": bed.node},
            "containers": [{"name": "main", "image": "runner:1", "command": ["fake-runner", "-c", script]}]}}});
        if let (Value::Object(s), Value::Object(e)) = (&mut spec, extra) {
            s.extend(e);
        }
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("job")
    };
    let has = |j: &Job, type_: &str| -> Option<String> {
        j.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == type_ && c.status == "True")
            .map(|c| c.reason.clone().unwrap_or_default())
    };

    jobs.create(
        &PostParams::default(),
        &job("ok", "echo job-ran", json!({})),
    )
    .await
    .expect("job");
    poll("Job Complete", || async {
        jobs.get("ok")
            .await
            .ok()
            .is_some_and(|j| has(&j, "Complete").is_some())
    })
    .await;
    let pods = bed.pods();
    let pod = pods
        .list(&kube::api::ListParams::default().labels("job-name=ok"))
        .await
        .expect("pods")
        .items
        .into_iter()
        .next()
        .expect("the Job's pod");
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        Some(bed.node.clone())
    );
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.phase.clone()).as_deref(),
        Some("Succeeded")
    );
    assert!(
        bed.kubelet
            .logs(&bed.ns, &pod.name_any(), "main")
            .contains("job-ran")
    );

    jobs.create(
        &PostParams::default(),
        &job(
            "slow",
            "trap 'echo got-term; exit 143' TERM; while :; do sleep 0.1; done",
            json!({"activeDeadlineSeconds": 3}),
        ),
    )
    .await
    .expect("job");
    poll("Job Failed with DeadlineExceeded", || async {
        jobs.get("slow")
            .await
            .ok()
            .and_then(|j| has(&j, "Failed"))
            .as_deref()
            == Some("DeadlineExceeded")
    })
    .await;
    // The Job controller deleted the pod; the kubelet stopped it with SIGTERM and finished it.
    let ns = bed.ns.clone();
    let fin = bed
        .event("the deadline's pod stopped", move |e| {
            matches!(e, KubeletEvent::PodFinished { namespace, pod, deleted: true, .. }
                if *namespace == ns && pod.starts_with("slow-"))
        })
        .await;
    let KubeletEvent::PodFinished {
        pod, containers, ..
    } = &fin
    else {
        unreachable!()
    };
    assert_eq!(containers[0].exit_code, 143, "{fin:?}");
    assert!(bed.kubelet.logs(&bed.ns, pod, "main").contains("got-term"));
    assert!(
        bed.kubelet
            .history()
            .iter()
            .any(|e| matches!(e, KubeletEvent::Sigterm { pod: p, .. } if p == pod))
    );
}

/// Nodes joining and leaving at runtime, and graceful node shutdown as the v1.28 kubelet's
/// shutdown manager does it: `Ready=False`, pods terminated with `DisruptionTarget`
/// (`TerminationByKubelet`) then `Failed`/`Terminated`, new pods rejected, the Node gone.
#[tokio::test]
async fn nodes_join_and_shut_down_gracefully() {
    let Some(bed) = bed("shutdown").await else {
        return;
    };
    let extra = "node-shutdown-extra";
    let mut settings = NodeSettings::new(extra);
    settings.taints = vec![
        serde_json::from_value(
            json!({"key": "repobox.dev/extra", "value": "yes", "effect": "NoSchedule"}),
        )
        .expect("taint"),
    ];
    bed.kubelet.add_node(settings).await.expect("add node");
    assert!(bed.kubelet.node_names().contains(&extra.to_string()));
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let node = nodes.get(extra).await.expect("the Node");
    assert_eq!(
        node.spec.and_then(|s| s.taints).map(|t| t[0].key.clone()),
        Some("repobox.dev/extra".into())
    );
    let bound = |name: &str, script: &str| -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {
            "nodeName": extra, "restartPolicy": "Never", "terminationGracePeriodSeconds": 3,
            "containers": [{"name": "c", "image": "x:1", "command": ["sh", "-c", script]}]}}))
        .expect("pod")
    };
    // Ignores SIGTERM: killed when its 3 s are up, which keeps the node shutting down a while.
    bed.pods()
        .create(
            &PostParams::default(),
            &bound(
                "stubborn",
                "trap 'echo term' TERM; while :; do sleep 0.1; done",
            ),
        )
        .await
        .expect("pod");
    bed.event(
        "running",
        |e| matches!(e, KubeletEvent::PodRunning { pod, .. } if pod == "stubborn"),
    )
    .await;
    let handle = bed.kubelet.handle();
    let shutdown =
        tokio::spawn(async move { handle.shutdown_node(extra, Duration::from_secs(10)).await });
    bed.event(
        "shutdown began",
        |e| matches!(e, KubeletEvent::NodeShutdown { node } if node == extra),
    )
    .await;
    // The node reports itself not ready while its pods stop.
    let not_ready = |n: Option<&Node>| {
        n.and_then(|n| n.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| {
                c.status == "False"
                    && c.reason.as_deref() == Some("KubeletNotReady")
                    && c.message.as_deref() == Some("node is shutting down")
            })
    };
    tokio::time::timeout(
        WAIT,
        kube::runtime::wait::await_condition(nodes.clone(), extra, not_ready),
    )
    .await
    .expect("Ready=False in time")
    .expect("watch the Node");
    // Bound while the node shuts down: not admitted.
    bed.pods()
        .create(&PostParams::default(), &bound("late", "true"))
        .await
        .expect("pod");
    let late = bed.finished("late").await;
    assert!(
        matches!(&late, KubeletEvent::PodFinished { phase, reason: Some(r), started: false, .. }
            if phase == "Failed" && r == "NodeShutdown"),
        "{late:?}"
    );
    let st = bed
        .pods()
        .get("late")
        .await
        .expect("pod")
        .status
        .expect("status");
    assert_eq!(
        st.message.as_deref(),
        Some("Pod was rejected as the node is shutting down.")
    );
    let fin = bed.finished("stubborn").await;
    assert!(
        matches!(&fin, KubeletEvent::PodFinished { phase, reason: Some(r), disruption: Some(d), deleted: false, .. }
            if phase == "Failed" && r == "Terminated" && d == "TerminationByKubelet"),
        "{fin:?}"
    );
    let KubeletEvent::PodFinished { containers, .. } = &fin else {
        unreachable!()
    };
    assert_eq!(
        containers[0].signal,
        Some(9),
        "killed after its grace period"
    );
    shutdown.await.expect("join").expect("shutdown");
    bed.event(
        "node removed",
        |e| matches!(e, KubeletEvent::NodeRemoved { node } if node == extra),
    )
    .await;
    let history = bed.kubelet.history();
    let at =
        |pred: &dyn Fn(&KubeletEvent) -> bool| history.iter().position(pred).expect("in history");
    assert!(
        at(&|e| matches!(e, KubeletEvent::NodeShutdown { .. }))
            < at(&|e| matches!(e, KubeletEvent::Sigterm { pod, .. } if pod == "stubborn"))
    );
    assert!(nodes.get_opt(extra).await.expect("get").is_none());
    assert!(!bed.kubelet.node_names().contains(&extra.to_string()));
    let st = bed
        .pods()
        .get("stubborn")
        .await
        .expect("pod kept")
        .status
        .expect("status");
    assert_eq!(
        (st.phase.as_deref(), st.reason.as_deref()),
        (Some("Failed"), Some("Terminated"))
    );
    // The bed's own node is untouched.
    assert!(bed.kubelet.node_names().contains(&bed.node));
}

/// The same kubelet against the API emulator (no control plane needed): a pod shaped like the
/// runner's (an `install` init container filling an emptyDir, `runner` with a secret, `agent`
/// without), then the emulated eviction (the emulator has no Eviction API).
#[tokio::test]
async fn runner_shaped_pod_and_emulated_eviction_on_the_emulator() {
    let emu = repobox_testbed::emulator::Emulator::start()
        .await
        .expect("emulator");
    let client = emu.client().expect("client");
    let kubelet = Kubelet::start(
        client.clone(),
        KubeletConfig {
            nodes: vec![NodeSettings::new("emu-node")],
            binaries: HashMap::from([("repobox-job-runner".to_string(), PathBuf::from("/bin/sh"))]),
            max_grace_period: Some(Duration::from_secs(2)),
            ..KubeletConfig::default()
        },
    )
    .await
    .expect("kubelet");
    let isolated = kubelet.isolates();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "key"}, "stringData": {"key": "k3y"}}),
            )
            .expect("secret"),
        )
        .await
        .expect("secret");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "runner-pod"}, "spec": {
        "nodeName": "emu-node", "restartPolicy": "Never", "securityContext": {"fsGroup": 2000},
        "volumes": [{"name": "bin", "emptyDir": {}}, {"name": "work", "emptyDir": {}},
                    {"name": "key", "secret": {"secretName": "key", "defaultMode": 0o400}}],
        "initContainers": [{"name": "install", "image": "ghcr.io/repobox/repobox-job-runner:1",
            "args": ["-c", "echo 'echo runner-binary-ran' > \"$BIN/runner.sh\""],
            "env": [{"name": "BIN", "value": "/opt/repobox"}],
            "volumeMounts": [{"name": "bin", "mountPath": "/opt/repobox"}]}],
        "containers": [
            {"name": "runner", "image": "tools:1", "command": ["sh", "-c", "sh \"$BIN/runner.sh\"; cat \"$KEY\""],
             "env": [{"name": "BIN", "value": "/opt/repobox"}, {"name": "KEY", "value": "/etc/repobox/key"}],
             "securityContext": {"runAsUser": 65532},
             "volumeMounts": [{"name": "bin", "mountPath": "/opt/repobox", "readOnly": true},
                              {"name": "key", "mountPath": "/etc/repobox", "readOnly": true},
                              {"name": "work", "mountPath": "/work"}]},
            {"name": "agent", "image": "tools:1", "command": ["sh", "-c",
                "if [ -e /etc/repobox/key ]; then echo key-visible; else echo key-absent; fi; id -u"],
             "securityContext": {"runAsUser": 65533},
             "volumeMounts": [{"name": "work", "mountPath": "/work"}]}]}}))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let fin = kubelet
        .wait_for(
            WAIT,
            |e| matches!(e, KubeletEvent::PodFinished { pod, .. } if pod == "runner-pod"),
        )
        .await
        .expect("finished");
    let runner = kubelet.logs("default", "runner-pod", "runner");
    let agent = kubelet.logs("default", "runner-pod", "agent");
    assert!(
        matches!(&fin, KubeletEvent::PodFinished { phase, .. } if phase == "Succeeded"),
        "{fin:?}\nrunner: {runner}\nagent: {agent}"
    );
    assert!(runner.contains("runner-binary-ran"), "{runner}");
    assert!(runner.contains("k3y"), "{runner}");
    if isolated {
        assert!(
            agent.contains("key-absent") && agent.contains("65533"),
            "{agent}"
        );
    } else {
        println!(
            "SKIPPED (isolation part): container isolation needs root with mount/PID namespaces"
        );
    }
    let st = pods
        .get("runner-pod")
        .await
        .expect("pod")
        .status
        .expect("status");
    assert_eq!(st.phase.as_deref(), Some("Succeeded"));
    assert_eq!(st.init_container_statuses.map(|s| s.len()), Some(1));

    // Emulated eviction: DisruptionTarget first, SIGTERM, grace, pod Failed and kept.
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "evict-me"}, "spec": {
        "nodeName": "emu-node", "restartPolicy": "Never",
        "containers": [{"name": "c", "image": "x:1", "command": ["sh", "-c",
            "trap 'echo term; exit 143' TERM; while :; do sleep 0.1; done"]}]}}))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    kubelet
        .wait_for(
            WAIT,
            |e| matches!(e, KubeletEvent::PodRunning { pod, .. } if pod == "evict-me"),
        )
        .await
        .expect("running");
    kubelet
        .fault("default", "evict-me", Fault::Evict)
        .expect("evict");
    let fin = kubelet
        .wait_for(
            WAIT,
            |e| matches!(e, KubeletEvent::PodFinished { pod, .. } if pod == "evict-me"),
        )
        .await
        .expect("finished");
    assert!(
        matches!(&fin, KubeletEvent::PodFinished { phase, disruption: Some(d), deleted: false, .. }
            if phase == "Failed" && d == "EvictionByEvictionAPI"),
        "{fin:?}"
    );
    let p = pods.get("evict-me").await.expect("pod kept");
    let dt = condition(&p, "DisruptionTarget").expect("DisruptionTarget");
    assert_eq!(dt.reason.as_deref(), Some("EvictionByEvictionAPI"));
    assert!(kubelet.logs("default", "evict-me", "c").contains("term"));
}
