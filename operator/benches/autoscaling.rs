//! What warm capacity is worth under cluster autoscaling: time from XADD to the runner running,
//! with cold nodes and with warm ones, on a real control plane (`REPOBOX_K8S_ASSETS`) with the
//! test bed's cluster-autoscaler model, the real operator and the real runner.
//!
//! - **Cold**: no nodes; `BENCH_JOBS` (4) jobs of different users arrive at once; the autoscaler
//!   adds nodes after `BENCH_NODE_DELAY_SECONDS` (30, a fast cloud's provisioning time).
//! - **Warm**: the same, but a Deployment of `BENCH_JOBS` pause pods, each the size of a runner
//!   pod, runs at priority -5 (above the autoscaler's expendable cutoff of -10), the runner pods
//!   at 1000: the scheduler preempts pause pods for runners at once, and the displaced pause pods
//!   make the autoscaler add the next nodes (the chart's `warmCapacity`).
//!
//! Run: `REPOBOX_K8S_ASSETS=/path/to/kube-binaries cargo bench -p repobox-operator --bench
//! autoscaling` (needs the chart test venv, as the e2e tests: `make chart` once).

#[path = "../tests/real_bed/mod.rs"]
mod real_bed;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use real_bed::RealBed;
use repobox_operator::model::crd::{RepoboxJob, RepoboxJobPhase};
use repobox_operator::model::names::object_name;
use repobox_testbed::autoscaler::{AutoscalerConfig, NodeGroup};
use serde_json::json;

const RUNNER_CLASS: &str = "repobox-bench-runner";
const WARM_CLASS: &str = "repobox-bench-warm";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn group(delay: Duration) -> AutoscalerConfig {
    let mut g = NodeGroup::new("pool", 0, 20);
    // Two runner pods per node (runner 250m + agent 500m CPU each).
    g.cpu = "2".into();
    g.memory = "4Gi".into();
    let mut cfg = AutoscalerConfig::quick(vec![g]);
    cfg.scale_up_delay = delay;
    // Nodes stay while the bench runs.
    cfg.scale_down_enabled = false;
    cfg
}

/// When each RepoboxJob was first seen `Running` (its runner pod running), from one watch.
fn running_times(api: Api<RepoboxJob>) -> Arc<Mutex<BTreeMap<String, Instant>>> {
    let seen: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let out = seen.clone();
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(Ok(rj)) = stream.next().await {
            if rj.phase() >= RepoboxJobPhase::Running {
                out.lock()
                    .expect("times")
                    .entry(rj.name_any())
                    .or_insert_with(Instant::now);
            }
        }
    });
    seen
}

/// Submits `jobs` jobs at once and returns each one's XADD → Running time, sorted.
async fn run_jobs(bed: &mut RealBed, label: &str, jobs: usize) -> Vec<Duration> {
    let times = running_times(bed.rjs());
    let mut sent = Vec::new();
    for i in 0..jobs {
        let job = bed.job(&format!("{label}{i:04}-bench"), &format!("user{i}"));
        let at = Instant::now();
        bed.submit(&job).await;
        sent.push((object_name(&job.id), at));
    }
    for (name, _) in &sent {
        bed.wait_phase(name, RepoboxJobPhase::Succeeded).await;
    }
    let times = times.lock().expect("times").clone();
    let mut out: Vec<Duration> = sent
        .iter()
        .map(|(name, at)| {
            times
                .get(name)
                .map(|t| t.duration_since(*at))
                .unwrap_or_default()
        })
        .collect();
    out.sort();
    out
}

async fn priority_classes(admin: &Client) {
    let api: Api<PriorityClass> = Api::all(admin.clone());
    for (name, value, preempt) in [
        (RUNNER_CLASS, 1000, "PreemptLowerPriority"),
        (WARM_CLASS, -5, "Never"),
    ] {
        let pc: PriorityClass = serde_json::from_value(json!({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": name}, "value": value, "preemptionPolicy": preempt,
        }))
        .expect("priority class");
        match api.create(&PostParams::default(), &pc).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("priority class {name}: {e}"),
        }
    }
}

/// Pause pods the size of one runner pod each, at the warm priority, on the bed's pool.
async fn warm_capacity(bed: &RealBed, replicas: usize) {
    let (key, value) = bed.pool_label();
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "warm-capacity", "namespace": bed.ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "warm-capacity"}},
            "template": {
                "metadata": {"labels": {"app": "warm-capacity"}},
                "spec": {
                    "priorityClassName": WARM_CLASS,
                    "terminationGracePeriodSeconds": 0,
                    "automountServiceAccountToken": false,
                    "nodeSelector": {key: value},
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65534,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "pause", "image": "registry.k8s.io/pause:3.9",
                        "command": ["sleep", "infinity"],
                        "resources": {"requests": {"cpu": "750m", "memory": "768Mi",
                                                   "ephemeral-storage": "3Gi"}},
                        "securityContext": {"allowPrivilegeEscalation": false,
                                            "capabilities": {"drop": ["ALL"]}},
                    }],
                },
            },
        },
    }))
    .expect("deployment");
    let api: Api<Deployment> = Api::namespaced(bed.admin.clone(), &bed.ns);
    api.create(&PostParams::default(), &deployment)
        .await
        .expect("warm capacity");
    // Until every pause pod runs on a node of its own making.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = bed.pods();
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        let running = pods
            .list(&ListParams::default().labels("app=warm-capacity"))
            .await
            .expect("pods")
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        if running == replicas {
            return;
        }
        assert!(Instant::now() < until, "warm capacity never came up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn report(label: &str, times: &[Duration]) {
    let secs: Vec<String> = times
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64()))
        .collect();
    let p50 = times[times.len() / 2];
    let max = times[times.len() - 1];
    println!(
        "{label:<6} XADD -> runner running: p50 {:.1} s, max {:.1} s   (each: {})",
        p50.as_secs_f64(),
        max.as_secs_f64(),
        secs.join(", ")
    );
}

#[tokio::main]
async fn main() {
    let jobs: usize = env_or("BENCH_JOBS", 4);
    let delay = Duration::from_secs(env_or("BENCH_NODE_DELAY_SECONDS", 30));
    let values = json!({"runner": {"agentCommand": "true"}});

    let Some(mut cold) = RealBed::without_nodes("bench-cold", values.clone()).await else {
        return;
    };
    let autoscaler = cold.autoscaler(group(delay)).await;
    cold.start_operator(&[]);
    let cold_times = run_jobs(&mut cold, "cold", jobs).await;
    autoscaler.stop();
    cold.finish().await;

    let Some(mut warm) = RealBed::without_nodes("bench-warm", values).await else {
        return;
    };
    priority_classes(&warm.admin).await;
    let autoscaler = warm.autoscaler(group(delay)).await;
    let setup = Instant::now();
    warm_capacity(&warm, jobs).await;
    let warm_setup = setup.elapsed();
    warm.start_operator(&[("--runner-priority-class", RUNNER_CLASS)]);
    let warm_times = run_jobs(&mut warm, "warm", jobs).await;
    let _ = Api::<Deployment>::namespaced(warm.admin.clone(), &warm.ns)
        .delete("warm-capacity", &DeleteParams::default())
        .await;
    autoscaler.stop();
    warm.finish().await;

    println!(
        "{jobs} jobs at once, node provisioning {} s, two runner pods per node",
        delay.as_secs()
    );
    report("cold", &cold_times);
    report("warm", &warm_times);
    println!(
        "(warm capacity itself took {:.1} s to come up, before the jobs)",
        warm_setup.as_secs_f64()
    );
}
