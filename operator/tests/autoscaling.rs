//! Under cluster autoscaling, end to end on a real control plane: the real operator and runner,
//! the real scheduler and Job controller, and the test bed's cluster-autoscaler model adding and
//! removing the kubelet's nodes (`repobox_testbed::autoscaler`). Without `REPOBOX_K8S_ASSETS`
//! every test prints one SKIPPED line and returns.

mod real_bed;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use real_bed::*;
use repobox_operator::model::crd::{RepoboxJob, RepoboxJobPhase, reasons};
use repobox_operator::model::names::object_name;
use repobox_testbed::autoscaler::sim::{BlockingPodReason, Unremovable};
use repobox_testbed::autoscaler::{AutoscalerConfig, AutoscalerEvent, NodeGroup, RemovalCause};
use serde_json::json;

/// Nodes with room for two runner pods (runner 250m + agent 500m CPU each).
fn small_group(max: usize) -> NodeGroup {
    let mut g = NodeGroup::new("pool-a", 0, max);
    g.cpu = "2".into();
    g.memory = "4Gi".into();
    g
}

/// What the namespace's RepoboxJobs showed, from one watch (changes arrive in the API
/// server's order, so the concurrency figures are those of the stored states).
#[derive(Default, Clone, Debug)]
struct Seen {
    /// Every `status.reason`, per job.
    reasons: BTreeMap<String, BTreeSet<String>>,
    /// Admitted and unfinished now: job → user.
    admitted: BTreeMap<String, String>,
    /// The most admitted at once, per user and overall.
    max_per_user: BTreeMap<String, usize>,
    max_total: usize,
}

fn record(bed: &RealBed) -> Arc<Mutex<Seen>> {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let out = seen.clone();
    let api: Api<RepoboxJob> = bed.rjs();
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = stream.next().await {
            let Ok(rj) = ev else { continue };
            let mut s = out.lock().expect("seen");
            if let Some(reason) = rj.status.as_ref().and_then(|s| s.reason.clone()) {
                s.reasons.entry(rj.name_any()).or_default().insert(reason);
            }
            if rj.phase().is_admitted() {
                s.admitted.insert(rj.name_any(), rj.spec.user_id.clone());
            } else {
                s.admitted.remove(&rj.name_any());
            }
            let mut per_user: BTreeMap<String, usize> = BTreeMap::new();
            for user in s.admitted.values() {
                *per_user.entry(user.clone()).or_default() += 1;
            }
            for (user, n) in per_user {
                let max = s.max_per_user.entry(user).or_default();
                *max = (*max).max(n);
            }
            s.max_total = s.max_total.max(s.admitted.len());
        }
    });
    seen
}

/// The node the (one) pod of Job `job` runs on.
async fn node_of(bed: &RealBed, job: &str) -> String {
    let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
    let pods = bed.pods().list(&lp).await.expect("pods").items;
    pods.first()
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.node_name.clone())
        .expect("a scheduled pod")
}

#[tokio::test]
async fn from_zero_nodes_every_job_succeeds_under_quotas_and_the_nodes_go_afterwards() {
    let values = json!({
        "config": {"maxJobsPerUser": 2, "maxConcurrentJobs": 6},
        "runner": {"agentCommand": "echo \"$REPOBOX_BRANCH\" > SCALED.md"},
    });
    let Some(mut bed) = RealBed::without_nodes("scale", values).await else {
        return;
    };
    let mut cfg = AutoscalerConfig::quick(vec![small_group(3)]);
    // Long enough that pods visibly wait for their node (the operator writes `Starting` after
    // a 2 s debounce).
    cfg.scale_up_delay = Duration::from_secs(4);
    let autoscaler = bed.autoscaler(cfg).await;
    let seen = record(&bed);
    bed.start_operator(&[]);

    let users = ["ana", "ben", "cai", "dev", "eli"];
    let mut names = Vec::new();
    for i in 0..6 {
        for user in users {
            let job = bed.job(&format!("{user}{i:04}-scale"), user);
            bed.submit(&job).await;
            names.push((object_name(&job.id), job.id.clone()));
        }
    }
    for (name, id) in &names {
        let rj = bed
            .wait_rj(name, "finished", |rj| rj.phase().is_terminal())
            .await;
        let s = rj.status.expect("status");
        assert_eq!(
            s.phase,
            Some(RepoboxJobPhase::Succeeded),
            "{name} must succeed (no job fails while a node is added): {s:?}"
        );
        assert_eq!(bed.record(id).await["status"], "success");
    }

    // The autoscaler grew the group from zero, within its maximum, for pods the operator said
    // were waiting for a node.
    let history = autoscaler.history();
    let ups: Vec<_> = history
        .iter()
        .filter_map(|e| match e {
            AutoscalerEvent::ScaleUp { from, to, max, .. } => Some((*from, *to, *max)),
            _ => None,
        })
        .collect();
    assert!(!ups.is_empty(), "{history:#?}");
    assert_eq!(ups[0].0, 0, "scaled from zero");
    assert!(ups.iter().all(|(_, to, max)| to <= max));
    let seen = seen.lock().expect("seen").clone();
    let waited = seen
        .reasons
        .values()
        .filter(|r| r.contains(reasons::WAITING_FOR_NODE))
        .count();
    assert!(waited > 0, "some job showed WaitingForNode: {seen:?}");
    // (A pod the autoscaler expects to fit on a node already coming gets no event of its own,
    // so `Unschedulable` with the scheduler's message may show meanwhile: not a failure.)
    assert!(
        !seen.reasons.values().any(|r| r.contains(reasons::RETRYING)),
        "no job was disrupted: {seen:?}"
    );
    // Quotas held all along: each user at most 2 admitted, everyone at most 6.
    assert_eq!(seen.max_per_user.len(), users.len(), "{seen:?}");
    assert!(seen.max_per_user.values().all(|n| *n <= 2), "{seen:?}");
    assert!(seen.max_total <= 6, "{seen:?}");
    assert!(seen.max_total >= 2, "jobs ran side by side: {seen:?}");
    for user in users {
        bed.eventually_counter(user, "0").await;
    }

    // Then every node goes again (nothing running blocks it).
    let added: usize = ups.iter().map(|(from, to, _)| to - from).sum();
    let mut removed = 0;
    while removed < added {
        autoscaler
            .wait_for(WAIT, |e| {
                matches!(
                    e,
                    AutoscalerEvent::NodeRemoved {
                        cause: RemovalCause::ScaleDown,
                        ..
                    }
                )
            })
            .await
            .expect("scale-in");
        removed = autoscaler
            .history()
            .iter()
            .filter(|e| matches!(e, AutoscalerEvent::NodeRemoved { .. }))
            .count();
        if removed < added {
            autoscaler.wait_scans(1).await.expect("scan");
        }
    }
    assert!(autoscaler.nodes("pool-a").is_empty());
    assert!(
        !autoscaler
            .history()
            .iter()
            .any(|e| matches!(e, AutoscalerEvent::Evicted { .. })),
        "scale-in evicted no runner pod"
    );
    autoscaler.stop();
    bed.finish().await;
}

#[tokio::test]
async fn a_job_no_node_group_can_fit_fails_within_the_grace_with_the_autoscalers_reason() {
    let values = json!({"runner": {"agentCommand": "true"}});
    let Some(mut bed) = RealBed::without_nodes("nofit", values).await else {
        return;
    };
    let autoscaler = bed
        .autoscaler(AutoscalerConfig::quick(vec![small_group(3)]))
        .await;
    bed.start_operator(&[
        ("--runner-memory-request", "64Gi"),
        ("--runner-memory-limit", "64Gi"),
        ("--unschedulable-grace-seconds", "3"),
    ]);
    let job = bed.job("huge0001-nofit", "fay");
    let started = tokio::time::Instant::now();
    bed.submit(&job).await;
    let name = object_name(&job.id);
    let rj = bed.wait_phase(&name, RepoboxJobPhase::Failed).await;
    let s = rj.status.expect("status");
    assert_eq!(s.reason.as_deref(), Some(reasons::UNSCHEDULABLE), "{s:?}");
    let message = s.message.unwrap_or_default();
    assert!(
        message.starts_with("no node can run the job and the cluster autoscaler will not add one")
            && message.contains("pod didn't trigger scale-up")
            && message.contains("Insufficient memory"),
        "{message}"
    );
    // Within the grace (plus the autoscaler's scan and the operator's recheck), not after the
    // ten-minute pending timeout.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let rec = bed.record(&job.id).await;
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["error"], message);
    // `kubectl describe repoboxjob` shows it: an Event on the RepoboxJob.
    let events: Api<Event> = Api::namespaced(bed.admin.clone(), &bed.ns);
    let on_rj = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("events")
        .items;
    assert!(
        on_rj.iter().any(|e| e
            .message
            .as_deref()
            .is_some_and(|m| m.contains("didn't trigger scale-up"))),
        "{:?}",
        on_rj.iter().map(|e| &e.message).collect::<Vec<_>>()
    );
    // No node was added for it.
    assert!(
        !autoscaler
            .history()
            .iter()
            .any(|e| matches!(e, AutoscalerEvent::ScaleUp { .. }))
    );
    bed.wait_no_pods(&name).await;
    autoscaler.stop();
    bed.finish().await;
}

#[tokio::test]
async fn a_drained_node_reruns_a_cloning_job_elsewhere_but_never_a_pushing_one() {
    let gate = HostGate::new();
    let values = json!({"runner": {"agentCommand": gate.agent("echo drained > DRAIN.md")}});
    let Some(mut bed) = RealBed::without_nodes("drain", values).await else {
        return;
    };
    let autoscaler = bed
        .autoscaler(AutoscalerConfig::quick(vec![small_group(3)]))
        .await;
    bed.start_operator(&[("--disruption-retry-backoff-seconds", "1")]);

    // Drained mid-clone (the git host holds the fetch): the job runs again on another node and
    // pushes once.
    bed.git.hold_fetches();
    let job = bed.job("drain001-clone", "gus");
    bed.submit(&job).await;
    let name = object_name(&job.id);
    bed.wait_step(&job.id, "cloning").await;
    assert!(
        bed.git.wait_fetch_held(WAIT).await,
        "the clone never reached the host"
    );
    let first_node = node_of(&bed, &name).await;
    autoscaler.drain(&first_node).await.expect("drain");
    bed.git.release_fetches();
    let rj = bed
        .wait_rj(&name, "at attempt 2", |rj| {
            rj.status.as_ref().and_then(|s| s.attempt) == Some(2)
        })
        .await;
    let s = rj.status.expect("status");
    assert_eq!(s.reason.as_deref(), Some(reasons::RETRYING), "{s:?}");
    assert!(
        s.message
            .as_deref()
            .is_some_and(|m| m.contains("during the cloning step")),
        "{s:?}"
    );
    let retry_job = format!("{name}-r2");
    bed.wait_rj(&name, "running again", |rj| {
        rj.phase() == RepoboxJobPhase::Running
            && rj.status.as_ref().and_then(|s| s.job_name.as_deref()) == Some(retry_job.as_str())
    })
    .await;
    let second_node = node_of(&bed, &retry_job).await;
    assert_ne!(
        second_node, first_node,
        "the cordoned node takes no new pod"
    );
    gate.open();
    let rj = bed.wait_phase(&name, RepoboxJobPhase::Succeeded).await;
    let branch = rj.status.and_then(|s| s.branch).expect("branch");
    assert_eq!(
        bed.git.file_at("acme/api", &branch, "DRAIN.md").as_deref(),
        Some("drained\n")
    );
    let pushes = |bed: &RealBed| {
        bed.git
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/git-receive-pack") && r.authorized)
            .count()
    };
    assert_eq!(pushes(&bed), 1, "one push");

    // Drained while pushing: failed with a clear error, not run again, not pushed twice.
    bed.git.hold_pushes("acme/api").expect("hold");
    let job = bed.job("drain002-push", "gus");
    bed.submit(&job).await;
    let name = object_name(&job.id);
    bed.wait_step(&job.id, "pushing").await;
    assert!(
        bed.git.wait_push_held("acme/api", WAIT).await,
        "the push never arrived"
    );
    let node = node_of(&bed, &name).await;
    let drain = autoscaler.drain(&node);
    let failed = bed.wait_phase(&name, RepoboxJobPhase::Failed);
    let (drained, rj) = tokio::join!(drain, failed);
    drained.expect("drain");
    let s = rj.status.expect("status");
    assert_eq!(s.reason.as_deref(), Some(reasons::EVICTED), "{s:?}");
    assert!(
        s.message
            .as_deref()
            .is_some_and(|m| m.contains("during the pushing step")),
        "{s:?}"
    );
    assert_eq!(s.attempt, None);
    bed.git.release_pushes("acme/api").expect("release");
    assert!(pushes(&bed) <= 2, "the second job pushed at most once");
    autoscaler.stop();
    bed.finish().await;
}

#[tokio::test]
async fn scale_in_never_evicts_a_running_runner_pod() {
    let gate = HostGate::new();
    let values = json!({"runner": {"agentCommand": gate.agent("echo kept > KEPT.md")}});
    let Some(mut bed) = RealBed::without_nodes("keep", values).await else {
        return;
    };
    let mut cfg = AutoscalerConfig::quick(vec![small_group(2)]);
    // Only the operator's annotation may keep the node: the emptyDir rule is off.
    cfg.skip_nodes_with_local_storage = false;
    let autoscaler = bed.autoscaler(cfg).await;
    bed.start_operator(&[]);
    let job = bed.job("keep0001-scalein", "hal");
    bed.submit(&job).await;
    let name = object_name(&job.id);
    bed.wait_phase(&name, RepoboxJobPhase::Running).await;
    let node = node_of(&bed, &name).await;

    // The node is underused (one small pod) and would go, but the runner pod blocks it.
    let blocked = autoscaler
        .wait_for(WAIT, |e| {
            matches!(
                e,
                AutoscalerEvent::ScaleDownBlocked {
                    node: n,
                    reason: Unremovable::BlockedByPod {
                        reason: BlockingPodReason::NotSafeToEvictAnnotation,
                        ..
                    },
                } if *n == node
            )
        })
        .await;
    blocked.expect("scale-down blocked by the runner pod");
    // Well past the unneeded time: still there, its pod never evicted (another, empty node the
    // autoscaler may have added meanwhile can go: that is not ours to judge).
    autoscaler.wait_scans(6).await.expect("scans");
    assert!(autoscaler.nodes("pool-a").contains(&node));
    assert!(
        !autoscaler.history().iter().any(|e| match e {
            AutoscalerEvent::Evicted { node: n, .. }
            | AutoscalerEvent::ScaleDown { node: n, .. } => {
                *n == node
            }
            _ => false,
        }),
        "{:#?}",
        autoscaler.history()
    );
    gate.open();
    let rj = bed.wait_phase(&name, RepoboxJobPhase::Succeeded).await;
    assert_eq!(rj.status.and_then(|s| s.attempt), None, "never disrupted");
    // Once the job is done, the node goes.
    autoscaler
        .wait_for(
            WAIT,
            |e| matches!(e, AutoscalerEvent::NodeRemoved { node: n, .. } if *n == node),
        )
        .await
        .expect("scale-in after the job");
    autoscaler.stop();
    bed.finish().await;
}
