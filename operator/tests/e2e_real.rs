//! End to end on a REAL control plane (the reference; `e2e.rs` runs the emulator suite):
//! XADD → RepoboxJob → admission → Job → the real Job controller and scheduler → pods run by
//! the test bed's kubelet (two isolated containers: runner, agent) → pushed branch.
//!
//! The operator runs as the chart installs it: the chart's Role/RoleBinding/ServiceAccount
//! (rendered by the real Helm library), its ServiceAccount's token, the Deployment's settings, in
//! a namespace enforcing Pod Security `restricted`; Redis requires a password. Without
//! `REPOBOX_K8S_ASSETS` every test prints one SKIPPED line and returns.

mod real_bed;

use std::collections::HashMap;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use real_bed::*;
use redis::AsyncCommands;
use repobox_contract::JobStatus;
use repobox_contract::events::Event;
use repobox_operator::model::crd::{RepoboxJobPhase, condition_types, find_condition, reasons};
use repobox_operator::model::names::object_name;
use repobox_testbed::kubelet::KubeletEvent;
use serde_json::json;

/// The job a pod belongs to (the Job controller names pods `{job}-{suffix}`).
fn job_of_pod(pod: &str, jobs: &[String]) -> String {
    jobs.iter()
        .find(|j| pod.starts_with(&format!("{j}-")))
        .cloned()
        .unwrap_or_else(|| panic!("pod {pod} belongs to no known job"))
}

/// Subscribes (confirmed) to a job's live events; the task returns them, up to and including
/// the first terminal status.
async fn collect_events(bed: &RealBed, job_id: &str) -> tokio::task::JoinHandle<Vec<Event>> {
    use futures::StreamExt;
    let client = redis::Client::open(bed.redis.url()).expect("redis url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(repobox_contract::keys::job_events(job_id))
        .await
        .expect("subscribe");
    tokio::spawn(async move {
        let mut events = Vec::new();
        let mut stream = pubsub.into_on_message();
        while let Some(msg) = stream.next().await {
            let ev = Event::parse(&msg.get_payload::<String>().expect("text")).expect("event");
            let done = matches!(&ev, Event::Status { status, .. } if status.is_terminal());
            events.push(ev);
            if done {
                break;
            }
        }
        events
    })
}

/// The terminal status event the operator published, checked against the job hash.
async fn terminal_event(
    bed: &mut RealBed,
    job_id: &str,
    events: tokio::task::JoinHandle<Vec<Event>>,
) -> (JobStatus, std::collections::BTreeMap<String, String>) {
    let events = tokio::time::timeout(WAIT, events)
        .await
        .expect("a terminal status event")
        .expect("collector");
    // The runner's `running` came first, with its pod's name.
    let Some(Event::Status {
        status: JobStatus::Running,
        fields: running,
        ..
    }) = events.first()
    else {
        panic!("the first event is the runner's `running`: {events:?}")
    };
    let Some(Event::Status {
        seq,
        status,
        fields,
        ..
    }) = events.last().cloned()
    else {
        panic!("no terminal status: {events:?}")
    };
    let rec = bed.record(job_id).await;
    assert_eq!(running["runnerId"], rec["runnerId"]);
    assert_eq!(status.as_str(), rec["status"]);
    assert_eq!(fields.get("error"), rec.get("error"));
    assert_eq!(fields["finishedAt"], rec["finishedAt"]);
    // Its `seq` counts the lines before it: the output events' lines, contiguous.
    let mut next = 0;
    for ev in &events[1..events.len() - 1] {
        if let Event::Output { seq, lines, .. } = ev {
            assert_eq!(*seq, next, "{events:?}");
            next += lines.len() as u64;
        }
    }
    assert_eq!(seq, next, "{events:?}");
    (status, fields)
}

async fn pending_entries(bed: &mut RealBed) -> usize {
    let pending: redis::streams::StreamPendingReply = bed
        .con
        .xpending("jobs:stream", "jobs:stream:runners")
        .await
        .expect("xpending");
    pending.count()
}

#[tokio::test]
async fn happy_path_under_per_user_and_global_quotas() {
    let gate = HostGate::new();
    let agent = gate.agent("echo \"from the agent of $REPOBOX_BRANCH\" > AGENT.md");
    let values = json!({
        "config": {"maxJobsPerUser": 2, "maxConcurrentJobs": 3},
        "runner": {"agentCommand": agent},
    });
    let Some(mut bed) = RealBed::new("happy", values).await else {
        return;
    };
    bed.start_operator(&[]);
    let users = [("alice", 3usize), ("bob", 2), ("carol", 1)];
    let mut ids = Vec::new();
    for (user, n) in users {
        for i in 0..n {
            let job = bed.job(&format!("{user}{i:02}-happy"), user);
            bed.submit(&job).await;
            ids.push((job.id.clone(), user));
        }
    }
    let names: Vec<String> = ids.iter().map(|(id, _)| object_name(id)).collect();

    // Three run (the global limit); alice's third waits on her own limit, or on the global one.
    let running = async {
        let mut running = 0;
        for n in &names {
            let rj = bed.wait_rj(n, "admitted or queued with a reason", |rj| {
                rj.phase() == RepoboxJobPhase::Running
                    || rj
                        .status
                        .as_ref()
                        .and_then(|s| s.reason.as_deref())
                        .is_some_and(|r| {
                            r == reasons::USER_QUOTA_EXCEEDED
                                || r == reasons::CLUSTER_QUOTA_EXCEEDED
                        })
            });
            if rj.await.phase() == RepoboxJobPhase::Running {
                running += 1;
            }
        }
        running
    };
    let running = running.await;
    assert!(running <= 3, "{running} running with MAX_CONCURRENT_JOBS=3");
    let alice3 = bed
        .wait_rj(&object_name("alice02-happy"), "queued", |rj| {
            rj.status
                .as_ref()
                .and_then(|s| s.reason.as_deref())
                .is_some()
        })
        .await;
    let s = alice3.status.expect("status");
    assert_eq!(s.phase, Some(RepoboxJobPhase::Queued), "{s:?}");
    assert_eq!(
        find_condition(&s.conditions, condition_types::ADMITTED)
            .expect("Admitted condition")
            .status,
        "False"
    );

    // A runner pod as the real API server admitted it (Pod Security `restricted`): an init
    // container, the runner and the agent, each with its own user; no service-account token.
    let pods = bed.pods().list(&ListParams::default()).await.expect("pods");
    let pod = pods.items.first().expect("a runner pod exists");
    let spec = pod.spec.as_ref().expect("pod spec");
    let containers: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(containers, ["runner", "agent"], "{containers:?}");
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert!(
        spec.volumes
            .iter()
            .flatten()
            .all(|v| !v.name.starts_with("kube-api-access")),
        "no service-account token volume was injected"
    );

    gate.open();
    for (id, _) in &ids {
        bed.wait_phase(&object_name(id), RepoboxJobPhase::Succeeded)
            .await;
    }
    for (id, user) in &ids {
        let name = object_name(id);
        let rec = bed.record(id).await;
        assert_eq!(rec["status"], "success", "{rec:?}");
        let branch = format!("repobox/{}", &id[..8]);
        assert_eq!(rec["branch"], branch);
        let sha = bed.git.branch_sha("acme/api", &branch).expect("pushed");
        assert_eq!(rec["commitSha"], sha);
        assert_eq!(
            bed.git.file_at("acme/api", &sha, "AGENT.md").as_deref(),
            Some(format!("from the agent of {branch}\n").as_str())
        );
        // The real Job controller completed the Job.
        let job = bed.wait_job_condition(&name, "Complete").await;
        assert_eq!(job.status.as_ref().and_then(|s| s.succeeded), Some(1));
        let rj = bed.rjs().get(&name).await.expect("rj");
        assert_eq!(rj.spec.user_id, *user);
        let st = rj.status.clone().expect("status");
        assert_eq!(st.reason.as_deref(), Some(reasons::SUCCEEDED));
        assert_eq!(st.commit_sha.as_deref(), Some(sha.as_str()));
        // The runner opened the pull request; the status shows it (the PR column).
        let forge = bed.git.forge().expect("forge double");
        let pr = forge
            .pull_requests()
            .into_iter()
            .find(|p| p.head == branch)
            .expect("a pull request for the branch");
        assert_eq!(rec["prNumber"], pr.number.to_string(), "{rec:?}");
        assert_eq!(st.pr_url.as_deref(), Some(rec["prUrl"].as_str()));
        assert_eq!(st.pr_number, Some(pr.number as i64));
        assert_eq!(st.pr_error, None);
        // No secret in any Kubernetes object of the job.
        let pods = bed
            .pods()
            .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}")))
            .await
            .expect("pods");
        let text = to_text(&job) + &to_text(&rj) + &to_text(&pods.items);
        for secret in [TOKEN, KEY_HEX, REDIS_PASSWORD] {
            assert!(
                !text.contains(secret),
                "a secret leaked into {name}'s objects"
            );
        }
    }

    // Replay the kubelet's ordered history: never more than 2 per user, 3 in all.
    let mut live: HashMap<String, i64> = HashMap::new();
    let mut total = 0i64;
    let mut max_total = 0i64;
    let user_of: HashMap<String, &str> = ids.iter().map(|(id, u)| (object_name(id), *u)).collect();
    for e in bed.kubelet().history() {
        let (pod, delta) = match &e {
            KubeletEvent::PodRunning { namespace, pod, .. } if *namespace == bed.ns => (pod, 1),
            KubeletEvent::PodFinished { namespace, pod, .. } if *namespace == bed.ns => (pod, -1),
            _ => continue,
        };
        let user = user_of[&job_of_pod(pod, &names)];
        let n = live.entry(user.to_owned()).or_default();
        *n += delta;
        total += delta;
        max_total = max_total.max(total);
        assert!(
            *n <= 2,
            "{user} had more than MAX_JOBS_PER_USER runners at once"
        );
        assert!(total <= 3, "more than MAX_CONCURRENT_JOBS runners at once");
    }
    assert_eq!(max_total, 3, "the global limit was used fully");
    assert_eq!(
        bed.pods_started().len(),
        ids.len(),
        "every job ran exactly once"
    );
    assert_eq!(pending_entries(&mut bed).await, 0);
    for (user, _) in users {
        bed.eventually_counter(user, "0").await;
    }
    // The operator recorded Events through the chart's RBAC.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(bed.admin.clone(), &bed.ns);
    let seen: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() != Some("job-controller"))
        .filter_map(|e| e.reason)
        .collect();
    for r in [reasons::ADMITTED, reasons::SUCCEEDED] {
        assert!(seen.iter().any(|x| x == r), "{r} not in {seen:?}");
    }
    bed.finish().await;
}

#[tokio::test]
async fn deadline_exceeded_by_the_real_job_controller_is_timed_out() {
    let values = json!({
        "config": {"jobTimeoutSeconds": 4},
        "runner": {"agentCommand": "sleep 120"},
    });
    let Some(mut bed) = RealBed::new("deadline", values).await else {
        return;
    };
    bed.start_operator(&[]);
    let job = bed.job("slow0001-dl", "erin");
    let events = collect_events(&bed, &job.id).await;
    bed.submit(&job).await;
    let name = object_name(&job.id);
    let rj = bed.wait_phase(&name, RepoboxJobPhase::Failed).await;
    let s = rj.status.expect("status");
    assert_eq!(
        s.reason.as_deref(),
        Some(reasons::DEADLINE_EXCEEDED),
        "{s:?}"
    );
    assert_eq!(s.message.as_deref(), Some("timed out after 4 s"));
    let rec = bed.record(&job.id).await;
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["error"], "timed out after 4 s");
    // The operator published the status it wrote itself.
    let (status, fields) = terminal_event(&mut bed, &job.id, events).await;
    assert_eq!(status, JobStatus::Failed);
    assert_eq!(fields["error"], "timed out after 4 s");
    // The real Job controller failed the Job and removed its running pod (SIGTERM first).
    let j = bed.wait_job_condition(&name, "Failed").await;
    let failed = j
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed condition");
    assert_eq!(failed.reason.as_deref(), Some("DeadlineExceeded"));
    bed.wait_no_pods(&name).await;
    assert!(
        bed.kubelet()
            .history()
            .iter()
            .any(|e| matches!(e, KubeletEvent::Sigterm { pod, .. } if pod.starts_with(&name))),
        "the runner pod was stopped"
    );
    bed.eventually_counter("erin", "0").await;
    bed.finish().await;
}

#[tokio::test]
async fn cancel_by_delete_and_by_spec_stops_the_pod_and_records_cancelled() {
    let values = json!({
        "config": {"maxJobsPerUser": 1},
        "runner": {"agentCommand": "sleep 120"},
    });
    let Some(mut bed) = RealBed::new("cancel", values).await else {
        return;
    };
    bed.start_operator(&[]);
    let a = bed.job("cancel01-del", "frank");
    let b = bed.job("cancel02-spec", "frank");
    bed.submit(&a).await;
    // Subscribed while b waits for a's slot, so its whole life is seen.
    let b_events = collect_events(&bed, &b.id).await;
    bed.submit(&b).await;
    let (na, nb) = (object_name(&a.id), object_name(&b.id));
    bed.wait_phase(&na, RepoboxJobPhase::Running).await;
    let job_uid = bed.jobs().get(&na).await.expect("job").uid();
    bed.rjs()
        .delete(&na, &DeleteParams::default())
        .await
        .expect("delete");
    bed.wait_gone(&na).await;
    let rec = bed.record(&a.id).await;
    assert_eq!(rec["status"], "cancelled", "{rec:?}");
    assert_eq!(rec["error"], "cancelled: the RepoboxJob was deleted");
    // The Job and its pod go away: owner references and the real garbage collector.
    bed.wait_no_pods(&na).await;
    let until = tokio::time::Instant::now() + WAIT;
    while let Some(j) = bed.jobs().get_opt(&na).await.expect("get job") {
        assert_eq!(j.uid(), job_uid);
        assert!(
            tokio::time::Instant::now() < until,
            "the Job of {na} was not collected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // The slot freed: b starts; then cancel it through its spec.
    bed.wait_phase(&nb, RepoboxJobPhase::Running).await;
    bed.patch_spec(&nb, json!({"cancel": true}))
        .await
        .expect("patch");
    let rj = bed.wait_phase(&nb, RepoboxJobPhase::Cancelled).await;
    assert_eq!(
        rj.status.expect("status").reason.as_deref(),
        Some(reasons::CANCELLED)
    );
    assert_eq!(bed.record(&b.id).await["status"], "cancelled");
    let (status, fields) = terminal_event(&mut bed, &b.id, b_events).await;
    assert_eq!(status, JobStatus::Cancelled);
    assert!(fields["error"].starts_with("cancelled"), "{fields:?}");
    bed.wait_no_pods(&nb).await;
    bed.eventually_counter("frank", "0").await;
    bed.finish().await;
}

#[tokio::test]
async fn a_users_jobs_start_in_the_order_they_were_submitted() {
    // One slot for the user: each job starts only after the one before it ended, so the
    // order the pods start in is the order of admission. The entries arrive back to back and
    // the intake creates their RepoboxJobs concurrently, so a later one may exist first (the
    // mocked-API test `a_job_whose_earlier_entry_is_still_on_its_way_waits_for_it` forces that
    // case; this one checks the whole path on the real API).
    let values = json!({
        "config": {"maxJobsPerUser": 1},
        "runner": {"agentCommand": "echo \"$REPOBOX_BRANCH\" > ORDER.md"},
    });
    let Some(mut bed) = RealBed::new("order", values).await else {
        return;
    };
    bed.start_operator(&[]);
    let mut names = Vec::new();
    for i in 0..6 {
        let job = bed.job(&format!("gina{i:02}-order"), "gina");
        bed.submit(&job).await;
        names.push(object_name(&job.id));
    }
    for name in &names {
        bed.wait_phase(name, RepoboxJobPhase::Succeeded).await;
    }
    let started: Vec<String> = bed
        .pods_started()
        .iter()
        .filter_map(|pod| pod.rsplit_once('-').map(|(job, _)| job.to_owned()))
        .collect();
    assert_eq!(started, names, "pods started in submission order");
    bed.eventually_counter("gina", "0").await;
    bed.finish().await;
}

/// Submits like the web app and reads the entry as `consumer` without acknowledging it: the
/// state a consumer leaves when it dies right after XREADGROUP.
async fn submit_and_read_as(
    bed: &mut RealBed,
    job: &repobox_testbed::webapp::NewJob,
    consumer: &str,
) {
    bed.submit(job).await;
    let _: Result<(), _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("jobs:stream")
        .arg("jobs:stream:runners")
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(&mut bed.con)
        .await;
    let opts = redis::streams::StreamReadOptions::default()
        .group("jobs:stream:runners", consumer)
        .count(1);
    let reply: redis::streams::StreamReadReply = bed
        .con
        .xread_options(&["jobs:stream"], &[">"], &opts)
        .await
        .expect("xreadgroup");
    assert_eq!(reply.keys[0].ids.len(), 1);
}

#[tokio::test]
async fn restart_at_each_crash_point_loses_nothing_and_runs_nothing_twice() {
    let gate = HostGate::new();
    let values = json!({
        "config": {"maxConcurrentJobs": 3},
        "runner": {"agentCommand": gate.agent("echo done > DONE.md")},
    });
    let Some(mut bed) = RealBed::new("restart", values).await else {
        return;
    };
    // Crash point 1: an entry read by a consumer that died before creating the RepoboxJob.
    let j1 = bed.job("restart1-read", "ivy");
    submit_and_read_as(&mut bed, &j1, "dead-pod-1").await;
    // Crash point 2: RepoboxJob created (as intake does), entry never acknowledged.
    let j2 = bed.job("restart2-ack", "ivy");
    submit_and_read_as(&mut bed, &j2, "dead-pod-2").await;
    let rec2 = bed.record(&j2.id).await;
    let rj2 = repobox_operator::run::intake::repobox_job(&j2.id, "ivy", "1-0", &rec2);
    let as_operator: Api<repobox_operator::model::crd::RepoboxJob> =
        Api::namespaced(bed.operator_client.clone(), &bed.ns);
    as_operator
        .create(&PostParams::default(), &rj2)
        .await
        .expect("create rj2");
    // Crash point 3: RepoboxJob and its Job created (the request the admitter sends), status
    // never written, entry never acknowledged.
    let j3 = bed.job("restart3-job", "ivy");
    submit_and_read_as(&mut bed, &j3, "dead-pod-3").await;
    let rec3 = bed.record(&j3.id).await;
    let rj3 = as_operator
        .create(
            &PostParams::default(),
            &repobox_operator::run::intake::repobox_job(&j3.id, "ivy", "2-0", &rec3),
        )
        .await
        .expect("create rj3");
    let job_cfg = bed
        .config("crashed-operator", &[])
        .job_config()
        .expect("job config");
    let job3 = repobox_operator::decide::job_builder::job_for(&rj3, &job_cfg).expect("job");
    let job3_uid =
        Api::<k8s_openapi::api::batch::v1::Job>::namespaced(bed.operator_client.clone(), &bed.ns)
            .create(
                &PostParams {
                    field_manager: Some(repobox_operator::model::labels::FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &job3,
            )
            .await
            .expect("create job3")
            .uid();

    bed.start_operator(&[]);
    let (n1, n2, n3) = (
        object_name(&j1.id),
        object_name(&j2.id),
        object_name(&j3.id),
    );
    for n in [&n1, &n2, &n3] {
        bed.wait_phase(n, RepoboxJobPhase::Running).await;
    }
    // Crash point 4: kill the operator while they run, with more work queued behind them.
    let j4 = bed.job("restart4-q", "ivy");
    bed.submit(&j4).await;
    let n4 = object_name(&j4.id);
    bed.wait_rj(&n4, "queued", |rj| rj.status.is_some()).await;
    bed.kill_operator().await;
    gate.open();
    bed.start_operator(&[]);
    for n in [&n1, &n2, &n3, &n4] {
        bed.wait_phase(n, RepoboxJobPhase::Succeeded).await;
    }
    assert_eq!(bed.pods_started().len(), 4, "each job ran exactly once");
    assert_eq!(
        bed.jobs().get(&n3).await.expect("job3").uid(),
        job3_uid,
        "Job 3 adopted, not recreated"
    );
    for j in [&j1, &j2, &j3, &j4] {
        assert_eq!(bed.record(&j.id).await["status"], "success");
    }
    assert_eq!(pending_entries(&mut bed).await, 0);
    bed.finish().await;
}

#[tokio::test]
async fn a_standby_takes_over_the_real_lease() {
    let Some(mut bed) = RealBed::new("leader", json!({})).await else {
        return;
    };
    bed.start_operator(&[]);
    let first = bed.job("ha000001-a", "omar");
    bed.submit(&first).await;
    bed.wait_phase(&object_name(&first.id), RepoboxJobPhase::Succeeded)
        .await;
    // A second replica, same ServiceAccount (the chart's Lease Role), its own pod name.
    let (standby, stop_standby) = bed.spawn_replica("repobox-operator-standby");
    let leases: Api<Lease> = Api::namespaced(bed.admin.clone(), &bed.ns);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert_eq!(
        holder(leases.get(&bed.lease_name).await.expect("lease")),
        "repobox-operator-0"
    );
    let second = bed.job("ha000002-b", "omar");
    bed.submit(&second).await;
    bed.wait_phase(&object_name(&second.id), RepoboxJobPhase::Succeeded)
        .await;
    let info: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg("jobs:stream")
        .arg("jobs:stream:runners")
        .query_async(&mut bed.con)
        .await
        .expect("xinfo");
    let consumers: Vec<String> = info
        .iter()
        .filter_map(|c| match c.get("name") {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(
        consumers,
        ["repobox-operator-0"],
        "the standby never read the stream"
    );

    // The leader dies without releasing the Lease; the standby takes over once it expires.
    bed.kill_operator().await;
    let third = bed.job("ha000003-c", "omar");
    bed.submit(&third).await;
    bed.wait_phase(&object_name(&third.id), RepoboxJobPhase::Succeeded)
        .await;
    assert_eq!(bed.record(&third.id).await["status"], "success");
    let lease = leases.get(&bed.lease_name).await.expect("lease");
    let spec = lease.spec.clone().expect("lease spec");
    assert_eq!(
        spec.holder_identity.as_deref(),
        Some("repobox-operator-standby")
    );
    assert!(spec.lease_transitions.unwrap_or(0) >= 1, "{spec:?}");
    stop_standby.cancel();
    tokio::time::timeout(WAIT, standby)
        .await
        .expect("standby stops")
        .expect("no panic")
        .expect("standby ends cleanly");
    bed.finish().await;
}

#[tokio::test]
async fn retention_deletes_the_repoboxjob_and_the_collector_its_job_and_pod() {
    let values = json!({"config": {"retentionSeconds": 1}});
    let Some(mut bed) = RealBed::new("retention", values).await else {
        return;
    };
    bed.start_operator(&[]);
    let job = bed.job("retain01-r", "pia");
    bed.submit(&job).await;
    let name = object_name(&job.id);
    bed.wait_phase(&name, RepoboxJobPhase::Succeeded).await;
    bed.wait_gone(&name).await;
    bed.wait_no_pods(&name).await;
    let until = tokio::time::Instant::now() + WAIT;
    while bed.jobs().get_opt(&name).await.expect("get job").is_some() {
        assert!(
            tokio::time::Instant::now() < until,
            "the Job outlived its RepoboxJob"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The record stays in Redis: retention only concerns the Kubernetes objects.
    assert_eq!(bed.record(&job.id).await["status"], "success");
    bed.finish().await;
}

#[tokio::test]
async fn bad_entries_are_acknowledged_and_recorded_and_the_crd_validates() {
    let Some(mut bed) = RealBed::new("bad", json!({})).await else {
        return;
    };
    bed.start_operator(&[]);
    // No jobId, no hash, no userId, already terminal.
    let _: String = bed
        .con
        .xadd("jobs:stream", "*", &[("foo", "bar")])
        .await
        .expect("xadd");
    let _: String = bed
        .con
        .xadd("jobs:stream", "*", &[("jobId", "ghost-job")])
        .await
        .expect("xadd");
    let _: () = bed
        .con
        .hset_multiple(
            "job:nouser01",
            &[
                ("id", "nouser01"),
                ("status", "pending"),
                ("repoUrl", "https://x/y.git"),
            ],
        )
        .await
        .expect("hset");
    let _: String = bed
        .con
        .xadd("jobs:stream", "*", &[("jobId", "nouser01")])
        .await
        .expect("xadd");
    let done = bed.job("done0001-t", "gina");
    repobox_testbed::webapp::create_job(&mut bed.con, &done)
        .await
        .expect("job");
    let _: () = bed
        .con
        .hset("job:done0001-t", "status", "success")
        .await
        .expect("hset");
    repobox_testbed::webapp::enqueue(&mut bed.con, &done)
        .await
        .expect("enqueue");
    // A userId the CRD's schema refuses (maxLength 512): the real API server answers 422.
    let long_user = "u".repeat(600);
    let invalid = bed.job("invalid1-v", &long_user);
    bed.submit(&invalid).await;
    // A good job after them proves the loop survived.
    let good = bed.job("good0001-g", "gina");
    bed.submit(&good).await;
    let good_name = object_name(&good.id);
    bed.wait_phase(&good_name, RepoboxJobPhase::Succeeded).await;

    let rec = bed.record("nouser01").await;
    assert_eq!(rec["status"], "failed");
    assert!(rec["error"].contains("no userId"), "{}", rec["error"]);
    assert_eq!(bed.record(&done.id).await["status"], "success");
    let rec = bed.record(&invalid.id).await;
    assert_eq!(rec["status"], "failed", "{rec:?}");
    assert!(
        rec["error"].contains("could not be accepted"),
        "{}",
        rec["error"]
    );
    for id in ["ghost-job", done.id.as_str(), invalid.id.as_str()] {
        assert!(
            bed.rjs()
                .get_opt(&object_name(id))
                .await
                .expect("get")
                .is_none()
        );
    }
    assert_eq!(
        pending_entries(&mut bed).await,
        0,
        "every entry acknowledged"
    );

    // CEL on the real API server: the owner of a job cannot be changed afterwards.
    let err = bed
        .patch_spec(&good_name, json!({"userId": "mallory"}))
        .await
        .expect_err("userId is immutable");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains("userId is immutable"), "{}", s.message);
        }
        e => panic!("unexpected error {e}"),
    }
    bed.finish().await;
}

/// The ServiceAccount the chart binds may not read Secrets: the operator only names them.
#[tokio::test]
async fn the_operator_account_cannot_read_secrets_or_touch_other_namespaces() {
    let Some(bed) = RealBed::new("rbac", json!({})).await else {
        return;
    };
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(bed.operator_client.clone(), &bed.ns);
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("listing Secrets must be forbidden: {other:?}"),
    }
    let pods: Api<Pod> = Api::namespaced(bed.operator_client.clone(), "default");
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("other namespaces must be forbidden: {other:?}"),
    }
    bed.finish().await;
}

/// Evicts the (one) pod of the Job `job` through the Eviction API, as `kubectl drain` and the
/// cluster autoscaler do; the real API server marks it `DisruptionTarget`.
async fn evict_pod_of(bed: &RealBed, job: &str) -> String {
    let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
    let pod = bed.pods().list(&lp).await.expect("list pods").items;
    let pod = pod.first().expect("a pod of the job").name_any();
    bed.pods()
        .evict(&pod, &kube::api::EvictParams::default())
        .await
        .expect("evict");
    pod
}

fn pushes_to(bed: &RealBed, repo: &str) -> usize {
    bed.git
        .requests()
        .iter()
        .filter(|r| {
            r.method == "POST" && r.path == format!("/{repo}.git/git-receive-pack") && r.authorized
        })
        .count()
}

#[tokio::test]
async fn a_pod_evicted_before_the_push_runs_again_and_pushes_once() {
    let gate = HostGate::new();
    let agent = gate.agent("echo \"second attempt\" > RETRY.md");
    let values = json!({"runner": {"agentCommand": agent}});
    let Some(mut bed) = RealBed::new("retry", values).await else {
        return;
    };
    bed.start_operator(&[("--disruption-retry-backoff-seconds", "1")]);
    let job = bed.job("retry001-evict", "gina");
    bed.submit(&job).await;
    let name = object_name(&job.id);
    bed.wait_step(&job.id, "agent").await;
    let first_pod = evict_pod_of(&bed, &name).await;

    // The real Job controller fails the Job through rule 0 of its pod failure policy; the
    // operator runs the job again as attempt 2, in a Job of its own, keeping the user's slot.
    let rj = bed
        .wait_rj(&name, "at attempt 2", |rj| {
            rj.status.as_ref().and_then(|s| s.attempt) == Some(2)
        })
        .await;
    let s = rj.status.expect("status");
    assert_eq!(s.phase, Some(RepoboxJobPhase::Starting), "{s:?}");
    assert_eq!(s.reason.as_deref(), Some(reasons::RETRYING), "{s:?}");
    let message = s.message.clone().unwrap_or_default();
    assert!(
        // The condition's reason when the pod is still there to read, else its type.
        (message.contains("EvictionByEvictionAPI") || message.contains("DisruptionTarget"))
            && message.contains("during the agent step")
            && message.contains("attempt 2 of 3"),
        "{message}"
    );
    assert_eq!(s.job_name.as_deref(), Some(format!("{name}-r2").as_str()));
    let old = bed.wait_job_condition(&name, "Failed").await;
    let failed = old
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed condition");
    assert_eq!(failed.reason.as_deref(), Some("PodFailurePolicy"));
    // Redis shows the job running on, with the reason in its output.
    let rec = bed.record(&job.id).await;
    assert_eq!(rec["status"], "running", "{rec:?}");
    assert_eq!(rec["attempt"], "2", "{rec:?}");
    let output: Vec<String> = bed
        .con
        .lrange(format!("job:{}:output", job.id), 0, -1)
        .await
        .expect("output");
    assert!(
        output
            .iter()
            .any(|l| l.contains("running the job again (attempt 2 of 3)")),
        "{output:?}"
    );
    // The first attempt's pod is gone before the agent may go on.
    bed.wait_no_pods(&name).await;
    gate.open();

    let rj = bed.wait_phase(&name, RepoboxJobPhase::Succeeded).await;
    let s = rj.status.expect("status");
    assert_eq!(s.attempt, Some(2));
    let branch = s.branch.expect("branch");
    assert_eq!(
        bed.git.file_at("acme/api", &branch, "RETRY.md").as_deref(),
        Some("second attempt\n")
    );
    assert_eq!(pushes_to(&bed, "acme/api"), 1, "pushed exactly once");
    let rec = bed.record(&job.id).await;
    assert_eq!(rec["status"], "success", "{rec:?}");
    assert_eq!(rec["runnerAttempt"], "2", "{rec:?}");
    assert_ne!(
        rec["runnerId"], first_pod,
        "the second attempt's pod finished it"
    );
    bed.eventually_counter("gina", "0").await;
    bed.finish().await;
}

#[tokio::test]
async fn a_pod_evicted_while_pushing_fails_and_is_not_run_again() {
    let values = json!({"runner": {"agentCommand": "echo change > PUSHED.md"}});
    let Some(mut bed) = RealBed::new("pushing", values).await else {
        return;
    };
    bed.git.hold_pushes("acme/api").expect("hold pushes");
    bed.start_operator(&[("--disruption-retry-backoff-seconds", "1")]);
    let job = bed.job("push0001-evict", "hank");
    bed.submit(&job).await;
    let name = object_name(&job.id);
    bed.wait_step(&job.id, "pushing").await;
    assert!(
        bed.git.wait_push_held("acme/api", WAIT).await,
        "the push never reached the host"
    );
    evict_pod_of(&bed, &name).await;

    let rj = bed.wait_phase(&name, RepoboxJobPhase::Failed).await;
    let s = rj.status.expect("status");
    assert_eq!(s.reason.as_deref(), Some(reasons::EVICTED), "{s:?}");
    let message = s.message.unwrap_or_default();
    assert!(
        message.contains("during the pushing step") && message.contains("avoid pushing twice"),
        "{message}"
    );
    assert_eq!(s.attempt, None, "never run again");
    let rec = bed.record(&job.id).await;
    assert_eq!(rec["status"], "failed", "{rec:?}");
    assert_eq!(rec["error"], message);
    assert!(!rec.contains_key("attempt"), "{rec:?}");
    assert!(
        bed.jobs()
            .get_opt(&format!("{name}-r2"))
            .await
            .expect("get")
            .is_none(),
        "no second attempt"
    );
    bed.git.release_pushes("acme/api").expect("release");
    assert!(pushes_to(&bed, "acme/api") <= 1, "never pushed twice");
    bed.eventually_counter("hank", "0").await;
    bed.finish().await;
}
