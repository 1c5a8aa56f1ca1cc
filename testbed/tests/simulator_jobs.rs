//! The cluster simulator against the API emulator: env and volume resolution, success,
//! failure, activeDeadlineSeconds, deletion, pending pods and infrastructure failures.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use repobox_testbed::emulator::Emulator;
use repobox_testbed::simulator::{ClusterSimulator, PodFailure, SimEvent, SimulatorConfig};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(20);
const NS: &str = "default";

async fn setup(cfg: SimulatorConfig) -> (Emulator, Client, ClusterSimulator) {
    let emu = Emulator::start().await.expect("emulator");
    let client = emu.client().expect("client");
    let mut cfg = cfg;
    cfg.binaries
        .insert("fake-runner".into(), PathBuf::from("/bin/sh"));
    cfg.max_grace_period = Some(Duration::from_secs(2));
    let sim = ClusterSimulator::start(client.clone(), cfg)
        .await
        .expect("simulator");
    (emu, client, sim)
}

fn job(name: &str, script: &str, extra_spec: Value, container_extra: Value) -> Job {
    let mut container = json!({"name": "main", "image": "ghcr.io/repobox/runner:1",
        "command": ["fake-runner", "-c"], "args": [script]});
    merge(&mut container, container_extra);
    let mut spec = json!({"backoffLimit": 0, "template": {"spec": {
        "restartPolicy": "Never", "containers": [container]}}});
    merge(&mut spec, extra_spec);
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("job")
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn condition<'a>(
    job: &'a Job,
    type_: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

async fn wait(sim: &ClusterSimulator, what: &str, pred: impl Fn(&SimEvent) -> bool) -> SimEvent {
    sim.wait_for(TIMEOUT, pred)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

#[tokio::test]
async fn env_volumes_and_success() {
    let (_emu, client, sim) = setup(SimulatorConfig::default()).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "creds"},
        "data": {"token": "czNjcjN0"},          // base64("s3cr3t")
        "stringData": {"other": "plain-text"},
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");
    let script = r#"echo "NAME=$RUNNER_ID"; echo "PLAIN=$PLAIN"; echo "TOKEN=$TOKEN"; echo "OTHER=$OTHER";
echo "FILE=$(cat "$TOKEN_FILE")"; echo "CWD=$(pwd)"; echo hi > "$SCRATCH/out"; cat "$SCRATCH/out"; exit 0"#;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let j = job(
        "env-job",
        script,
        json!({"template": {"spec": {"volumes": [
            {"name": "creds", "secret": {"secretName": "creds", "items": [{"key": "token", "path": "token"}]}},
            {"name": "scratch", "emptyDir": {}}]}}}),
        json!({"workingDir": "/work", "env": [
            {"name": "PLAIN", "value": "hello"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "OTHER", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "other"}}},
            {"name": "RUNNER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "TOKEN_FILE", "value": "/var/run/secrets/repobox/token"},
            {"name": "SCRATCH", "value": "/work"}],
          "volumeMounts": [{"name": "creds", "mountPath": "/var/run/secrets/repobox", "readOnly": true},
                           {"name": "scratch", "mountPath": "/work"}]}),
    );
    jobs.create(&PostParams::default(), &j).await.expect("job");
    wait(
        &sim,
        "job complete",
        |e| matches!(e, SimEvent::JobComplete { job, .. } if job == "env-job"),
    )
    .await;

    let pod_name = sim.pod_of("env-job").unwrap_or_else(|| {
        sim.history()
            .iter()
            .find_map(|e| match e {
                SimEvent::PodCreated { pod, .. } => Some(pod.clone()),
                _ => None,
            })
            .expect("a pod was created")
    });
    assert!(pod_name.starts_with("env-job-") && pod_name.len() == "env-job-".len() + 5);
    let logs = sim.logs(&pod_name);
    assert!(logs.contains(&format!("NAME={pod_name}")), "{logs}");
    assert!(logs.contains("PLAIN=hello"), "{logs}");
    assert!(logs.contains("TOKEN=s3cr3t"), "{logs}");
    assert!(logs.contains("OTHER=plain-text"), "{logs}");
    assert!(logs.contains("FILE=s3cr3t"), "{logs}");
    assert!(
        !logs.contains("CWD=/work\n"),
        "working dir is remapped: {logs}"
    );
    assert!(logs.contains("\nhi\n"), "{logs}");
    assert_eq!(sim.processes_started(), 1);

    let done = jobs.get("env-job").await.expect("job");
    let st = done.status.clone().expect("status");
    assert_eq!(st.succeeded, Some(1));
    assert_eq!(st.active, Some(0));
    assert!(st.start_time.is_some() && st.completion_time.is_some());
    assert_eq!(
        condition(&done, "SuccessCriteriaMet").expect("scm").status,
        "True"
    );
    let complete = condition(&done, "Complete").expect("complete");
    assert_eq!(complete.status, "True");
    assert!(complete.last_transition_time.is_some() && complete.last_probe_time.is_some());

    let pods: Api<Pod> = Api::namespaced(client, NS);
    let pod = pods.get(&pod_name).await.expect("pod");
    assert_eq!(
        pod.labels()
            .get("batch.kubernetes.io/job-name")
            .map(String::as_str),
        Some("env-job")
    );
    assert_eq!(
        pod.labels().get("job-name").map(String::as_str),
        Some("env-job")
    );
    assert_eq!(pod.labels().get("controller-uid"), done.uid().as_ref());
    assert_eq!(pod.owner_references()[0].controller, Some(true));
    let pst = pod.status.expect("pod status");
    assert_eq!(pst.phase.as_deref(), Some("Succeeded"));
    let term = pst.container_statuses.expect("cs")[0]
        .state
        .clone()
        .expect("state")
        .terminated
        .expect("terminated");
    assert_eq!(
        (term.exit_code, term.reason.as_deref()),
        (0, Some("Completed"))
    );
}

#[tokio::test]
async fn non_zero_exit_fails_the_job() {
    let (_emu, client, sim) = setup(SimulatorConfig::default()).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    jobs.create(
        &PostParams::default(),
        &job("exit3", "echo bye; exit 3", json!({}), json!({})),
    )
    .await
    .expect("job");
    let ev = wait(
        &sim,
        "job failed",
        |e| matches!(e, SimEvent::JobFailed { job, .. } if job == "exit3"),
    )
    .await;
    assert!(matches!(ev, SimEvent::JobFailed { reason, .. } if reason == "BackoffLimitExceeded"));
    let exited = wait(
        &sim,
        "exit",
        |e| matches!(e, SimEvent::PodExited { job, .. } if job == "exit3"),
    )
    .await;
    assert!(matches!(exited, SimEvent::PodExited { code: Some(3), .. }));
    let failed = jobs.get("exit3").await.expect("job");
    let cond = condition(&failed, "Failed").expect("Failed condition");
    assert_eq!(cond.reason.as_deref(), Some("BackoffLimitExceeded"));
    assert_eq!(
        cond.message.as_deref(),
        Some("Job has reached the specified backoff limit")
    );
    assert!(condition(&failed, "FailureTarget").is_some());
    assert_eq!(failed.status.as_ref().and_then(|s| s.failed), Some(1));
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let pod = pods
        .get(
            &sim.history()
                .iter()
                .find_map(|e| match e {
                    SimEvent::PodCreated { pod, .. } => Some(pod.clone()),
                    _ => None,
                })
                .expect("pod"),
        )
        .await
        .expect("pod");
    let pst = pod.status.expect("status");
    assert_eq!(pst.phase.as_deref(), Some("Failed"));
    let term = pst.container_statuses.expect("cs")[0]
        .state
        .clone()
        .expect("state")
        .terminated
        .expect("t");
    assert_eq!((term.exit_code, term.reason.as_deref()), (3, Some("Error")));
}

#[tokio::test]
async fn active_deadline_sends_sigterm_and_fails_the_job() {
    let (_emu, client, sim) = setup(SimulatorConfig::default()).await;
    let marker_dir = tempfile::tempdir().expect("tmp");
    let marker = marker_dir.path().join("got-term");
    let script = r#"trap 'echo term > "$MARKER"; exit 143' TERM; echo started; while true; do sleep 0.1; done"#;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    jobs.create(
        &PostParams::default(),
        &job(
            "slow",
            script,
            json!({"activeDeadlineSeconds": 1}),
            json!({"env": [{"name": "MARKER", "value": marker.display().to_string()}]}),
        ),
    )
    .await
    .expect("job");
    wait(
        &sim,
        "deadline",
        |e| matches!(e, SimEvent::DeadlineExceeded { job, .. } if job == "slow"),
    )
    .await;
    let ev = wait(
        &sim,
        "failed",
        |e| matches!(e, SimEvent::JobFailed { job, .. } if job == "slow"),
    )
    .await;
    assert!(matches!(ev, SimEvent::JobFailed { reason, .. } if reason == "DeadlineExceeded"));
    assert!(
        sim.history()
            .iter()
            .any(|e| matches!(e, SimEvent::Sigterm { job, .. } if job == "slow"))
    );
    assert_eq!(
        std::fs::read_to_string(&marker)
            .expect("marker written by the TERM trap")
            .trim(),
        "term"
    );
    let failed = jobs.get("slow").await.expect("job");
    let cond = condition(&failed, "Failed").expect("Failed");
    assert_eq!(cond.reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(
        cond.message.as_deref(),
        Some("Job was active longer than specified deadline")
    );
}

#[tokio::test]
async fn deleting_the_job_stops_the_process() {
    let (_emu, client, sim) = setup(SimulatorConfig::default()).await;
    let marker_dir = tempfile::tempdir().expect("tmp");
    let marker = marker_dir.path().join("stopped");
    let script = r#"trap 'echo term > "$MARKER"; exit 143' TERM; while true; do sleep 0.1; done"#;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    jobs.create(
        &PostParams::default(),
        &job(
            "doomed",
            script,
            json!({}),
            json!({"env": [{"name": "MARKER", "value": marker.display().to_string()}]}),
        ),
    )
    .await
    .expect("job");
    let started = wait(
        &sim,
        "started",
        |e| matches!(e, SimEvent::PodStarted { job, .. } if job == "doomed"),
    )
    .await;
    let SimEvent::PodStarted { pod, .. } = started else {
        unreachable!()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    assert_eq!(
        pods.get(&pod)
            .await
            .expect("pod")
            .status
            .expect("st")
            .phase
            .as_deref(),
        Some("Running")
    );
    jobs.delete("doomed", &DeleteParams::background())
        .await
        .expect("delete");
    wait(
        &sim,
        "stopped",
        |e| matches!(e, SimEvent::Stopped { job, .. } if job == "doomed"),
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker").trim(),
        "term"
    );
    assert!(
        pods.get_opt(&pod).await.expect("get").is_none(),
        "pod deleted"
    );
}

#[tokio::test]
async fn hold_pending_and_infrastructure_failures() {
    let cfg = SimulatorConfig {
        hold_pending_label: Some(("sim/hold".into(), "true".into())),
        ..Default::default()
    };
    let (_emu, client, sim) = setup(cfg).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let policy = json!({"podFailurePolicy": {"rules": [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}});
    let mut held = job("held", "exit 0", policy.clone(), json!({}));
    held.metadata.labels = Some([("sim/hold".to_string(), "true".to_string())].into());
    jobs.create(&PostParams::default(), &held)
        .await
        .expect("job");
    let ev = wait(
        &sim,
        "pending",
        |e| matches!(e, SimEvent::PodPending { job, .. } if job == "held"),
    )
    .await;
    let SimEvent::PodPending { pod, reason, .. } = ev else {
        unreachable!()
    };
    assert_eq!(reason, "Unschedulable");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let p = pods.get(&pod).await.expect("pod");
    let st = p.status.expect("status");
    assert_eq!(st.phase.as_deref(), Some("Pending"));
    let sched = &st.conditions.expect("conds")[0];
    assert_eq!(
        (
            sched.type_.as_str(),
            sched.status.as_str(),
            sched.reason.as_deref()
        ),
        ("PodScheduled", "False", Some("Unschedulable"))
    );
    assert_eq!(sim.processes_started(), 0);

    // Eviction matched by the podFailurePolicy → Job Failed reason PodFailurePolicy.
    sim.fail_pod("held", PodFailure::Evicted).expect("evict");
    let ev = wait(
        &sim,
        "evicted job fails",
        |e| matches!(e, SimEvent::JobFailed { job, .. } if job == "held"),
    )
    .await;
    assert!(matches!(ev, SimEvent::JobFailed { reason, .. } if reason == "PodFailurePolicy"));
    let p = pods.get(&pod).await.expect("pod");
    let conds = p.status.expect("st").conditions.expect("conds");
    assert!(
        conds.iter().any(|c| c.type_ == "DisruptionTarget"
            && c.reason.as_deref() == Some("EvictionByEvictionAPI"))
    );

    // OOM kill of a running pod: exit 137, reason OOMKilled, counted as a failure.
    jobs.create(
        &PostParams::default(),
        &job(
            "oom",
            "while true; do sleep 0.1; done",
            json!({}),
            json!({}),
        ),
    )
    .await
    .expect("job");
    let started = wait(
        &sim,
        "oom started",
        |e| matches!(e, SimEvent::PodStarted { job, .. } if job == "oom"),
    )
    .await;
    let SimEvent::PodStarted { pod, .. } = started else {
        unreachable!()
    };
    sim.fail_pod("oom", PodFailure::OomKilled).expect("oom");
    let ev = wait(
        &sim,
        "oom job fails",
        |e| matches!(e, SimEvent::JobFailed { job, .. } if job == "oom"),
    )
    .await;
    assert!(matches!(ev, SimEvent::JobFailed { reason, .. } if reason == "BackoffLimitExceeded"));
    let p = pods.get(&pod).await.expect("pod");
    let term = p.status.expect("st").container_statuses.expect("cs")[0]
        .state
        .clone()
        .expect("state")
        .terminated
        .expect("terminated");
    assert_eq!(
        (term.exit_code, term.reason.as_deref()),
        (137, Some("OOMKilled"))
    );
}
