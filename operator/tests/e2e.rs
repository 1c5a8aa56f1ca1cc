//! End to end: XADD → RepoboxJob → admission → Job → the real job-runner (run by the cluster
//! simulator) → pushed branch → `Succeeded`, with the job hash and the status both checked.

mod common;

use common::*;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use redis::AsyncCommands;
use repobox_operator::model::crd::{RepoboxJobPhase, condition_types, find_condition, reasons};
use repobox_operator::model::names::object_name;
use repobox_testbed::simulator::SimEvent;

#[tokio::test]
async fn xadd_to_pushed_branch_to_succeeded() {
    let mut bed = Bed::new(&[("AGENT_COMMAND", "echo 'from the agent' > AGENT.md")]).await;
    bed.start_operator(&["--agent-command", "echo 'from the agent' > AGENT.md"]);
    let job = bed.job("e2e00001-happy", "alice");
    let name = object_name(&job.id);
    // Record every phase the RepoboxJob shows, to check they only move forward.
    let phases = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let (api, phases) = (bed.rjs(), phases.clone());
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        tokio::spawn(async move {
            let mut s = watcher(api, cfg)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(Ok(rj)) = s.next().await {
                let mut p = phases.lock().unwrap();
                if p.last() != Some(&rj.phase()) {
                    p.push(rj.phase());
                }
            }
        })
    };
    let entry = bed.submit(&job).await;

    let rj = bed.wait_phase(&name, RepoboxJobPhase::Succeeded).await;
    // The recorder's own watch delivers the same change independently: let it catch up.
    tokio::time::timeout(WAIT, async {
        while phases.lock().unwrap().last() != Some(&RepoboxJobPhase::Succeeded) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the recorder never saw Succeeded: {:?}",
            phases.lock().unwrap()
        )
    });
    recorder.abort();
    let seen = phases.lock().unwrap().clone();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "phases went backwards: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&RepoboxJobPhase::Succeeded));
    let status = rj.status.clone().unwrap();
    let rec = bed.record(&job.id).await;
    assert_eq!(rec["status"], "success", "{rec:?}");
    assert_eq!(rec["branch"], "repobox/e2e00001");
    let sha = bed
        .git
        .branch_sha("acme/api", "repobox/e2e00001")
        .expect("branch pushed");
    assert_eq!(rec["commitSha"], sha);
    assert_eq!(status.branch.as_deref(), Some("repobox/e2e00001"));
    assert_eq!(status.commit_sha.as_deref(), Some(sha.as_str()));
    // The pull request the runner opened, in the job hash and the status (the PR column).
    let forge = bed.git.forge().unwrap();
    assert_eq!(forge.pull_requests().len(), 1);
    assert_eq!(rec["prNumber"], "1");
    assert_eq!(rec["prUrl"], forge.web_url("acme/api", 1));
    assert_eq!(status.pr_url.as_deref(), Some(rec["prUrl"].as_str()));
    assert_eq!(status.pr_number, Some(1));
    assert_eq!(status.reason.as_deref(), Some(reasons::SUCCEEDED));
    assert_eq!(status.job_name.as_deref(), Some(name.as_str()));
    assert!(
        status.duration.is_some()
            && status.start_time.is_some()
            && status.completion_time.is_some()
    );
    assert_eq!(
        find_condition(&status.conditions, condition_types::COMPLETE)
            .unwrap()
            .status,
        "True"
    );
    assert_eq!(
        find_condition(&status.conditions, condition_types::ADMITTED)
            .unwrap()
            .status,
        "True"
    );
    assert_eq!(rj.spec.stream_entry_id, entry);
    assert_eq!(rj.spec.user_id, "alice");
    assert_eq!(
        bed.git.file_at("acme/api", &sha, "AGENT.md").as_deref(),
        Some("from the agent\n")
    );
    assert!(
        rec["runnerId"].starts_with(&format!("{name}-")),
        "RUNNER_ID is the pod name: {}",
        rec["runnerId"]
    );

    // The entry was acknowledged, the counter is back to zero, events were recorded.
    let pending: redis::streams::StreamPendingReply = bed
        .con
        .xpending("jobs:stream", "jobs:stream:runners")
        .await
        .unwrap();
    assert_eq!(pending.count(), 0);
    bed.eventually_counter("alice", "0").await;
    let ev_api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(bed.client.clone(), NS);
    let reasons_seen: Vec<String> = ev_api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()))
        .filter_map(|e| e.reason)
        .collect();
    for r in [reasons::ADMITTED, reasons::SUCCEEDED] {
        assert!(
            reasons_seen.iter().any(|x| x == r),
            "{r} not in {reasons_seen:?}"
        );
    }
    bed.eventually_metric("repobox_jobs_finished_total{outcome=\"succeeded\"}", 1.0)
        .await;
    assert_eq!(bed.metric("repobox_jobs_received_total").await, Some(1.0));
    assert_eq!(bed.metric("repobox_jobs_admitted_total").await, Some(1.0));
    // No secret anywhere in the Kubernetes objects.
    let job_obj: Api<Job> = Api::namespaced(bed.client.clone(), NS);
    let text = to_text(&job_obj.get(&name).await.unwrap()) + &to_text(&rj);
    for secret in [TOKEN, KEY_HEX] {
        assert!(!text.contains(secret));
    }
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn per_user_limit_holds_for_a_burst_of_one_hundred() {
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&["--max-jobs-per-user", "3", "--max-concurrent-jobs", "10"]);
    let mut names = Vec::new();
    for i in 0..100 {
        let job = bed.job(&format!("burst{i:03}-x"), "bob");
        bed.submit(&job).await;
        names.push(object_name(&job.id));
    }
    for n in &names {
        bed.wait_phase(n, RepoboxJobPhase::Succeeded).await;
    }
    // Replay the simulator's ordered event history: never more than 3 runners at once.
    let mut live = 0i64;
    let mut max_live = 0i64;
    for ev in bed.sim().history() {
        match ev {
            SimEvent::PodStarted { .. } => live += 1,
            SimEvent::PodExited { .. } => live -= 1,
            _ => {}
        }
        max_live = max_live.max(live);
        assert!(live <= 3, "more than MAX_JOBS_PER_USER runners at once");
    }
    assert_eq!(max_live, 3, "the limit was used fully");
    assert_eq!(
        bed.sim().processes_started(),
        100,
        "every job ran exactly once"
    );
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn queued_jobs_show_why_and_users_take_turns() {
    // The agent waits for the gate, so slots stay taken until the test frees them.
    let gate = Gate::new();
    let agent = gate.agent("true");
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&[
        "--max-jobs-per-user",
        "2",
        "--max-concurrent-jobs",
        "2",
        "--agent-command",
        &agent,
    ]);
    for i in 0..4 {
        let job = bed.job(&format!("carol{i}-aa"), "carol");
        bed.submit(&job).await;
    }
    let first = object_name("carol0-aa");
    bed.wait_phase(&first, RepoboxJobPhase::Running).await;
    bed.wait_phase(&object_name("carol1-aa"), RepoboxJobPhase::Running)
        .await;
    let waiting = bed
        .wait_rj(&object_name("carol2-aa"), "queued", |rj| {
            rj.status
                .as_ref()
                .and_then(|s| s.reason.as_deref())
                .is_some()
        })
        .await;
    let s = waiting.status.unwrap();
    assert_eq!(s.phase, Some(RepoboxJobPhase::Queued));
    assert!(
        matches!(
            s.reason.as_deref(),
            Some(reasons::USER_QUOTA_EXCEEDED) | Some(reasons::CLUSTER_QUOTA_EXCEEDED)
        ),
        "{s:?}"
    );
    assert_eq!(
        find_condition(&s.conditions, condition_types::ADMITTED)
            .unwrap()
            .status,
        "False"
    );
    bed.eventually_counter("carol", "2").await;

    // Dave arrives later; when a slot frees, dave goes before carol's third job.
    let dave = bed.job("dave0-bb", "dave");
    bed.submit(&dave).await;
    let dave_rj = bed
        .wait_rj(&object_name("dave0-bb"), "queued", |rj| rj.status.is_some())
        .await;
    assert_eq!(
        dave_rj.status.unwrap().reason.as_deref(),
        Some(reasons::CLUSTER_QUOTA_EXCEEDED)
    );
    gate.open();
    for n in [
        "carol0-aa",
        "carol1-aa",
        "carol2-aa",
        "carol3-aa",
        "dave0-bb",
    ] {
        bed.wait_phase(&object_name(n), RepoboxJobPhase::Succeeded)
            .await;
    }
    let start = |n: &str| {
        let jobs = bed.sim().history();
        jobs.iter()
            .position(|e| matches!(e, SimEvent::PodStarted { job, .. } if job == &object_name(n)))
            .unwrap()
    };
    // A slot that frees goes to dave (no job running) no later than to carol's fourth job:
    // carol's burst cannot push dave back.
    assert!(
        start("dave0-bb") < start("carol3-aa"),
        "round-robin: dave before carol's fourth job"
    );
    assert!(start("carol2-aa") < start("carol3-aa"), "FIFO per user");
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn deadline_exceeded_is_recorded_as_timed_out() {
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&["--job-timeout", "2", "--agent-command", "sleep 60"]);
    let job = bed.job("slow0001-dl", "erin");
    bed.submit(&job).await;
    let name = object_name(&job.id);
    let rj = bed.wait_phase(&name, RepoboxJobPhase::Failed).await;
    let s = rj.status.unwrap();
    assert_eq!(
        s.reason.as_deref(),
        Some(reasons::DEADLINE_EXCEEDED),
        "{s:?}"
    );
    let rec = bed.record(&job.id).await;
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["error"], "timed out after 2 s");
    assert_eq!(s.message.as_deref(), Some("timed out after 2 s"));
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn deleting_or_cancelling_a_running_job_stops_it_and_records_cancelled() {
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&["--agent-command", "sleep 60", "--max-jobs-per-user", "1"]);
    let a = bed.job("cancel01-del", "frank");
    let b = bed.job("cancel02-spec", "frank");
    bed.submit(&a).await;
    bed.submit(&b).await;
    let (na, nb) = (object_name(&a.id), object_name(&b.id));
    bed.wait_phase(&na, RepoboxJobPhase::Running).await;
    bed.rjs()
        .delete(&na, &DeleteParams::default())
        .await
        .unwrap();
    bed.wait_gone(&na).await;
    let rec = bed.record(&a.id).await;
    assert_eq!(rec["status"], "cancelled", "{rec:?}");
    assert_eq!(rec["error"], "cancelled: the RepoboxJob was deleted");
    bed.sim()
        .wait_for(
            WAIT,
            |e| matches!(e, SimEvent::PodExited { job, .. } if job == &na),
        )
        .await
        .unwrap();

    // The slot freed at once: b starts; then cancel it through its spec.
    bed.wait_phase(&nb, RepoboxJobPhase::Running).await;
    bed.rjs()
        .patch(
            &nb,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
        )
        .await
        .unwrap();
    let rj = bed.wait_phase(&nb, RepoboxJobPhase::Cancelled).await;
    assert_eq!(
        rj.status.unwrap().reason.as_deref(),
        Some(reasons::CANCELLED)
    );
    assert_eq!(bed.record(&b.id).await["status"], "cancelled");
    bed.sim()
        .wait_for(
            WAIT,
            |e| matches!(e, SimEvent::PodExited { job, .. } if job == &nb),
        )
        .await
        .unwrap();
    bed.eventually_counter("frank", "0").await;
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn bad_and_poison_entries_are_acknowledged_and_recorded() {
    let mut bed = Bed::new(&[]).await;
    // Every RepoboxJob create for the poison job fails with a 500.
    let poison = bed.job("poison01-p", "gina");
    bed.emu()
        .inject_fault(
            Some("POST"),
            "/apis/repobox.dev/v1alpha1/namespaces/repobox/repoboxjobs",
            500,
            1000,
        )
        .await
        .unwrap();
    bed.start_operator(&["--max-deliveries", "2"]);
    bed.submit(&poison).await;
    // Block on the dead-letter stream until the entry arrives (needs MAX_DELIVERIES claim
    // cycles of CLAIM_MIN_IDLE_SECONDS).
    let mut blocking = redis::Client::open(bed.redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .unwrap();
    let opts = redis::streams::StreamReadOptions::default().block(60_000);
    let reply: Option<redis::streams::StreamReadReply> = blocking
        .xread_options(&["jobs:stream:dead"], &["0"], &opts)
        .await
        .unwrap();
    let dead = reply
        .expect("the poison entry was dead-lettered")
        .keys
        .remove(0)
        .ids;
    assert_eq!(dead.len(), 1);
    let rec = bed.record(&poison.id).await;
    assert_eq!(rec["status"], "failed");
    assert!(rec["error"].contains("dead-letter"), "{}", rec["error"]);
    bed.emu().clear_faults().await.unwrap();

    // Bad entries: no jobId, no hash, no userId, already terminal.
    let _: String = bed
        .con
        .xadd("jobs:stream", "*", &[("foo", "bar")])
        .await
        .unwrap();
    let _: String = bed
        .con
        .xadd("jobs:stream", "*", &[("jobId", "ghost-job")])
        .await
        .unwrap();
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
        .unwrap();
    let _: String = bed
        .con
        .xadd("jobs:stream", "*", &[("jobId", "nouser01")])
        .await
        .unwrap();
    let done = bed.job("done0001-t", "gina");
    repobox_testbed::webapp::create_job(&mut bed.con, &done)
        .await
        .unwrap();
    let _: () = bed
        .con
        .hset("job:done0001-t", "status", "success")
        .await
        .unwrap();
    repobox_testbed::webapp::enqueue(&mut bed.con, &done)
        .await
        .unwrap();
    // A good job after them proves the loop survived.
    let good = bed.job("good0001-g", "gina");
    bed.submit(&good).await;
    bed.wait_phase(&object_name(&good.id), RepoboxJobPhase::Succeeded)
        .await;
    let rec = bed.record("nouser01").await;
    assert_eq!(rec["status"], "failed");
    assert!(rec["error"].contains("no userId"), "{}", rec["error"]);
    assert_eq!(bed.record(&done.id).await["status"], "success");
    assert!(
        bed.rjs()
            .get_opt(&object_name("ghost-job"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        bed.rjs()
            .get_opt(&object_name(&done.id))
            .await
            .unwrap()
            .is_none()
    );
    let pending: redis::streams::StreamPendingReply = bed
        .con
        .xpending("jobs:stream", "jobs:stream:runners")
        .await
        .unwrap();
    assert_eq!(pending.count(), 0, "every entry acknowledged");
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn injected_api_errors_are_retried_without_loss_or_duplicates() {
    let mut bed = Bed::new(&[]).await;
    bed.emu()
        .inject_fault(
            Some("POST"),
            "/apis/batch/v1/namespaces/repobox/jobs",
            500,
            2,
        )
        .await
        .unwrap();
    bed.emu()
        .inject_fault(
            Some("POST"),
            "/apis/repobox.dev/v1alpha1/namespaces/repobox/repoboxjobs",
            429,
            1,
        )
        .await
        .unwrap();
    bed.emu()
        .inject_fault(
            Some("PATCH"),
            "/apis/repobox.dev/v1alpha1/namespaces/repobox/repoboxjobs/.*/status",
            409,
            2,
        )
        .await
        .unwrap();
    bed.start_operator(&[]);
    let job = bed.job("faults01-f", "hank");
    bed.submit(&job).await;
    bed.wait_phase(&object_name(&job.id), RepoboxJobPhase::Succeeded)
        .await;
    assert_eq!(bed.sim().processes_started(), 1);
    let jobs: Api<Job> = Api::namespaced(bed.client.clone(), NS);
    assert_eq!(
        jobs.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    let statuses: Vec<u16> = bed
        .emu()
        .requests()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.status)
        .collect();
    for code in [500, 409] {
        assert!(
            statuses.contains(&code),
            "fault {code} was injected and seen"
        );
    }
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn restart_mid_flight_loses_nothing_and_runs_nothing_twice() {
    let gate = Gate::new();
    let agent = gate.agent("echo done > DONE.md");
    let mut bed = Bed::new(&[]).await;
    let flags = [
        "--agent-command",
        agent.as_str(),
        "--max-concurrent-jobs",
        "2",
    ];

    // Crash point 1: an entry read by a consumer that died before creating the RepoboxJob.
    let j1 = bed.job("restart1-read", "ivy");
    webapp_submit_and_read_as(&mut bed, &j1, "dead-pod-1").await;
    // Crash point 2: RepoboxJob created, entry never acknowledged.
    let j2 = bed.job("restart2-ack", "ivy");
    webapp_submit_and_read_as(&mut bed, &j2, "dead-pod-2").await;
    let rj2 =
        repobox_operator::run::intake::repobox_job(&j2.id, "ivy", "1-0", &bed.record(&j2.id).await);
    bed.rjs().create(&Default::default(), &rj2).await.unwrap();

    bed.start_operator(&flags);
    let n1 = object_name(&j1.id);
    let n2 = object_name(&j2.id);
    bed.wait_phase(&n1, RepoboxJobPhase::Running).await;
    bed.wait_phase(&n2, RepoboxJobPhase::Running).await;
    // Crash point 3: kill the operator while both run, with more work queued behind them.
    let j3 = bed.job("restart3-q", "ivy");
    bed.submit(&j3).await;
    bed.wait_rj(&object_name(&j3.id), "queued", |rj| rj.status.is_some())
        .await;
    bed.kill_operator().await;
    gate.open();
    bed.start_operator(&flags);
    for n in [&n1, &n2, &object_name(&j3.id)] {
        bed.wait_phase(n, RepoboxJobPhase::Succeeded).await;
    }
    assert_eq!(bed.sim().pods_started(), 3, "each job ran exactly once");
    for j in [&j1, &j2, &j3] {
        assert_eq!(bed.record(&j.id).await["status"], "success");
    }
    let pending: redis::streams::StreamPendingReply = bed
        .con
        .xpending("jobs:stream", "jobs:stream:runners")
        .await
        .unwrap();
    assert_eq!(pending.count(), 0);
    bed.stop_operator().await.unwrap();
}

/// Submits like the web app and reads the entry as `consumer` without acknowledging it: the
/// state a consumer leaves when it dies right after XREADGROUP.
async fn webapp_submit_and_read_as(
    bed: &mut Bed,
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
        .unwrap();
    assert_eq!(reply.keys[0].ids.len(), 1);
}

#[tokio::test]
async fn redis_restart_is_survived() {
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&[]);
    let a = bed.job("redis001-a", "jack");
    bed.submit(&a).await;
    bed.wait_phase(&object_name(&a.id), RepoboxJobPhase::Succeeded)
        .await;
    bed.redis.restart().await.unwrap();
    bed.con = bed.redis.connection().await;
    let b = bed.job("redis002-b", "jack");
    bed.submit(&b).await;
    bed.wait_phase(&object_name(&b.id), RepoboxJobPhase::Succeeded)
        .await;
    assert_eq!(bed.record(&b.id).await["status"], "success");
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn backpressure_pauses_the_intake_at_max_queued() {
    let gate = Gate::new();
    let agent = gate.agent("true");
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&[
        "--max-queued",
        "3",
        "--max-concurrent-jobs",
        "1",
        "--agent-command",
        &agent,
    ]);
    let mut ids = Vec::new();
    for i in 0..12 {
        let job = bed.job(&format!("bp{i:02}-pressure"), ["kim", "lee", "max"][i % 3]);
        bed.submit(&job).await;
        ids.push(job.id);
    }
    // Once the fourth job waits, one runs and MAX_QUEUED (3) wait: the intake must pause.
    bed.wait_phase(&object_name(&ids[0]), RepoboxJobPhase::Running)
        .await;
    bed.wait_rj(&object_name(&ids[3]), "queued", |rj| rj.status.is_some())
        .await;
    bed.eventually_metric("repobox_intake_paused", 1.0).await;
    // One admitted + MAX_QUEUED queued; the rest wait safely in the stream, unread.
    let rjs = bed.rjs().list(&ListParams::default()).await.unwrap().items;
    assert_eq!(
        rjs.len(),
        4,
        "{:?}",
        rjs.iter()
            .map(|r| r.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg("jobs:stream")
        .query_async(&mut bed.con)
        .await
        .unwrap();
    let read = match groups[0].get("entries-read") {
        Some(redis::Value::Int(n)) => *n,
        other => panic!("entries-read: {other:?}"),
    };
    assert_eq!(read, 4, "only what fits under the cap was read");
    gate.open();
    for id in &ids {
        bed.wait_phase(&object_name(id), RepoboxJobPhase::Succeeded)
            .await;
    }
    bed.eventually_metric("repobox_intake_paused", 0.0).await;
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn killed_and_stuck_pods_are_explained_in_redis() {
    let mut bed = Bed::new_with(&[], |sim| {
        sim.image_pull_error = Some("broken-image".into());
    })
    .await;
    // Retries after a disruption are proved on the real control plane (e2e_real); here an
    // eviction with retries off must fail the job and say why.
    bed.start_operator(&[
        "--agent-command",
        "sleep 60",
        "--pending-timeout-seconds",
        "2",
        "--max-disruption-retries",
        "0",
    ]);

    // OOM: the simulator kills the runner like the kernel would.
    let oom = bed.job("oom00001-k", "nia");
    bed.submit(&oom).await;
    let n = object_name(&oom.id);
    bed.wait_phase(&n, RepoboxJobPhase::Running).await;
    bed.sim()
        .fail_pod(&n, repobox_testbed::simulator::PodFailure::OomKilled)
        .unwrap();
    let rj = bed.wait_phase(&n, RepoboxJobPhase::Failed).await;
    assert_eq!(
        rj.status.unwrap().reason.as_deref(),
        Some(reasons::OOM_KILLED)
    );
    let rec = bed.record(&oom.id).await;
    assert_eq!(rec["status"], "failed");
    assert!(rec["error"].contains("out of memory"), "{}", rec["error"]);

    // Eviction: the pod failure policy fails the Job; the reason says so.
    let ev = bed.job("evict001-e", "nia");
    bed.submit(&ev).await;
    let n = object_name(&ev.id);
    bed.wait_phase(&n, RepoboxJobPhase::Running).await;
    bed.sim()
        .fail_pod(&n, repobox_testbed::simulator::PodFailure::Evicted)
        .unwrap();
    let rj = bed.wait_phase(&n, RepoboxJobPhase::Failed).await;
    assert_eq!(rj.status.unwrap().reason.as_deref(), Some(reasons::EVICTED));
    assert!(bed.record(&ev.id).await["error"].contains("evicted"));
    bed.stop_operator().await.unwrap();

    // An image that cannot be pulled: pending too long, then failed with the pull error.
    bed.start_operator(&[
        "--runner-image",
        "registry.example/broken-image:1",
        "--pending-timeout-seconds",
        "2",
    ]);
    let pull = bed.job("pull0001-i", "nia");
    bed.submit(&pull).await;
    let n = object_name(&pull.id);
    let rj = bed.wait_phase(&n, RepoboxJobPhase::Failed).await;
    assert_eq!(
        rj.status.unwrap().reason.as_deref(),
        Some(reasons::PENDING_TOO_LONG)
    );
    let rec = bed.record(&pull.id).await;
    assert!(
        rec["error"].contains("could not be pulled"),
        "{}",
        rec["error"]
    );
    let jobs: Api<Job> = Api::namespaced(bed.client.clone(), NS);
    assert!(
        jobs.get_opt(&n).await.unwrap().is_none(),
        "the stuck Job was deleted"
    );
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn only_the_leader_consumes_and_a_standby_takes_over() {
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&[]);
    // The first replica holds the Lease before the second starts (which one wins a start-up
    // race is not what this test is about).
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), NS);
    tokio::time::timeout(
        WAIT,
        await_condition(leases, "repobox-operator", |l: Option<&Lease>| {
            l.and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.as_deref())
                == Some("operator-0")
        }),
    )
    .await
    .expect("the first replica leads")
    .unwrap();
    // A second replica with its own identity: it must wait for the Lease.
    let mut cfg_b = bed.config(&[]);
    cfg_b.runner_id = Some("operator-standby".into());
    let stop_b = tokio_util::sync::CancellationToken::new();
    let b = tokio::spawn(repobox_operator::app::run_with_client(
        cfg_b,
        bed.client.clone(),
        stop_b.clone(),
    ));

    let first = bed.job("ha000001-a", "omar");
    bed.submit(&first).await;
    bed.wait_phase(&object_name(&first.id), RepoboxJobPhase::Succeeded)
        .await;
    let info: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg("jobs:stream")
        .arg("jobs:stream:runners")
        .query_async(&mut bed.con)
        .await
        .unwrap();
    let consumers: Vec<String> = info
        .iter()
        .filter_map(|c| match c.get("name") {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(
        consumers,
        ["operator-0"],
        "the standby never read the stream"
    );

    // The leader dies without releasing the Lease; the standby takes over after it expires.
    bed.kill_operator().await;
    let second = bed.job("ha000002-b", "omar");
    bed.submit(&second).await;
    bed.wait_phase(&object_name(&second.id), RepoboxJobPhase::Succeeded)
        .await;
    assert_eq!(bed.record(&second.id).await["status"], "success");
    stop_b.cancel();
    tokio::time::timeout(WAIT, b)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn finished_jobs_are_deleted_after_the_retention_period() {
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&["--retention-seconds", "1"]);
    let job = bed.job("retain01-r", "pia");
    bed.submit(&job).await;
    let name = object_name(&job.id);
    bed.wait_phase(&name, RepoboxJobPhase::Succeeded).await;
    bed.wait_gone(&name).await;
    // The record stays in Redis: retention only concerns the Kubernetes object.
    assert_eq!(bed.record(&job.id).await["status"], "success");
    bed.stop_operator().await.unwrap();
}
