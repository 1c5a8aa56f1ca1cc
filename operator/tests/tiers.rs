//! Quota tiers, the per-user queue cap, and pause / resume, end to end: the real operator and
//! the real job-runner (run by the cluster simulator) on a real redis-server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use redis::AsyncCommands;
use repobox_operator::model::crd::{RepoboxJob, RepoboxJobPhase, reasons};
use repobox_operator::model::names::object_name;

fn status_of(rj: &RepoboxJob) -> (Option<&str>, &str) {
    let s = rj.status.as_ref();
    (
        s.and_then(|s| s.reason.as_deref()),
        s.and_then(|s| s.message.as_deref()).unwrap_or(""),
    )
}

/// Waits for the Warning Event `reason` on any object (watch, no polling).
async fn await_event(bed: &Bed, reason: &str) -> Event {
    let api: Api<Event> = Api::namespaced(bed.client.clone(), NS);
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    tokio::time::timeout(WAIT, async {
        while let Some(ev) = stream.next().await {
            if let Ok(e) = ev
                && e.reason.as_deref() == Some(reason)
            {
                return e;
            }
        }
        panic!("event watch ended")
    })
    .await
    .unwrap_or_else(|_| panic!("no {reason} event"))
}

#[tokio::test]
async fn plans_limit_each_user_and_redis_limits_apply_on_the_next_pass() {
    let gate = Gate::new();
    let agent = gate.agent("true");
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&[
        "--plan-limits",
        r#"{"free": 1, "pro": 3}"#,
        "--max-jobs-per-user",
        "2",
        "--max-concurrent-jobs",
        "20",
        "--agent-command",
        &agent,
    ]);
    let free: Vec<String> = (0..4).map(|i| format!("fay{i}-free")).collect();
    let pro: Vec<String> = (0..4).map(|i| format!("pat{i}-pro")).collect();
    for (f, p) in free.iter().zip(&pro) {
        let job = bed.job(f, "fay");
        bed.submit_with_plan(&job, "free").await;
        let job = bed.job(p, "pat");
        bed.submit_with_plan(&job, "pro").await;
    }
    // free: 1 runs, pro: 3 run; the rest say why, naming the plan.
    bed.wait_phase(&object_name(&free[0]), RepoboxJobPhase::Running)
        .await;
    for p in &pro[..3] {
        bed.wait_phase(&object_name(p), RepoboxJobPhase::Running)
            .await;
    }
    let fay1 = bed
        .wait_rj(&object_name(&free[1]), "waiting for its plan", |rj| {
            status_of(rj).0 == Some(reasons::USER_QUOTA_EXCEEDED)
        })
        .await;
    assert_eq!(
        status_of(&fay1).1,
        "waiting: user fay has 1 of 1 jobs running for plan free"
    );
    let pat3 = bed
        .wait_rj(&object_name(&pro[3]), "waiting for its plan", |rj| {
            status_of(rj).0 == Some(reasons::USER_QUOTA_EXCEEDED)
        })
        .await;
    assert_eq!(
        status_of(&pat3).1,
        "waiting: user pat has 3 of 3 jobs running for plan pro"
    );
    assert_eq!(
        bed.metric("repobox_plan_limit{plan=\"free\"}").await,
        Some(1.0)
    );
    assert_eq!(
        bed.metric("repobox_plan_limit{plan=\"pro\"}").await,
        Some(3.0)
    );
    assert_eq!(
        bed.metric("repobox_plan_limit{plan=\"default\"}").await,
        Some(2.0)
    );
    bed.eventually_metric("repobox_users_by_plan{plan=\"free\"}", 1.0)
        .await;
    bed.eventually_metric("repobox_users_by_plan{plan=\"pro\"}", 1.0)
        .await;

    // The web app raises fay's limit in Redis: it applies on the next pass, no poke needed.
    let raised = Instant::now();
    let _: () = bed
        .con
        .hset("runner:user_limits", "fay", "2")
        .await
        .unwrap();
    bed.wait_phase(&object_name(&free[1]), RepoboxJobPhase::Running)
        .await;
    let took = raised.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let fay2 = bed
        .wait_rj(&object_name(&free[2]), "custom limit message", |rj| {
            status_of(rj).1.contains("2 of 2")
        })
        .await;
    assert!(
        status_of(&fay2).1.contains("runner:user_limits"),
        "{:?}",
        status_of(&fay2)
    );

    // An unusable value: a Warning, the job's plan still applies, nothing crashes.
    let _: () = bed
        .con
        .hset("runner:user_limits", "pat", "lots")
        .await
        .unwrap();
    let warning = await_event(&bed, reasons::INVALID_LIMIT).await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let note = warning.note.unwrap_or_default();
    assert!(
        note.contains("\"lots\"") && note.contains("plan pro"),
        "{note}"
    );
    bed.eventually_metric("repobox_invalid_limits_total", 1.0)
        .await;
    // A plan the configuration does not know: MAX_JOBS_PER_USER (2) applies.
    let odd = bed.job("ody0-gold", "ody");
    bed.submit_with_plan(&odd, "gold").await;
    let odd2 = bed.job("ody1-gold", "ody");
    bed.submit_with_plan(&odd2, "gold").await;
    let odd3 = bed.job("ody2-gold", "ody");
    bed.submit_with_plan(&odd3, "gold").await;
    let ody = bed
        .wait_rj(&object_name("ody2-gold"), "default limit", |rj| {
            status_of(rj).0 == Some(reasons::USER_QUOTA_EXCEEDED)
        })
        .await;
    assert!(
        status_of(&ody)
            .1
            .contains("2 of 2 jobs running for plan default"),
        "{:?}",
        status_of(&ody)
    );
    bed.eventually_metric("repobox_invalid_limits_total", 2.0)
        .await;

    gate.open();
    for id in free.iter().chain(&pro) {
        bed.wait_phase(&object_name(id), RepoboxJobPhase::Succeeded)
            .await;
    }
    // ody's jobs only had to show the default limit; they must end (one was seen killed under
    // load on a busy 2-core machine, unrelated to admission).
    for id in ["ody0-gold", "ody1-gold", "ody2-gold"] {
        bed.wait_rj(&object_name(id), "terminal", |rj| rj.phase().is_terminal())
            .await;
    }
    let rj = bed.rjs().get(&object_name(&pro[0])).await.unwrap();
    assert_eq!(rj.spec.plan.as_deref(), Some("pro"));
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn a_users_entries_beyond_max_queued_per_user_fail_at_intake() {
    let gate = Gate::new();
    let agent = gate.agent("true");
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&[
        "--max-queued-per-user",
        "2",
        "--max-jobs-per-user",
        "1",
        "--agent-command",
        &agent,
    ]);
    let first = bed.job("quinn0-q", "quinn");
    bed.submit(&first).await;
    bed.wait_phase(&object_name(&first.id), RepoboxJobPhase::Running)
        .await;
    // One runs; two may wait; the fourth is refused with a clear error.
    let ids: Vec<String> = (1..4).map(|i| format!("quinn{i}-q")).collect();
    for id in &ids {
        let job = bed.job(id, "quinn");
        bed.submit(&job).await;
    }
    let rec = bed.eventually_status(&ids[2], "failed").await;
    assert!(
        rec["error"].contains("MAX_QUEUED_PER_USER") && rec["error"].contains("quinn"),
        "{rec:?}"
    );
    // Another user is not affected.
    let other = bed.job("rita0-q", "rita");
    bed.submit(&other).await;
    bed.wait_phase(&object_name(&other.id), RepoboxJobPhase::Running)
        .await;
    for id in &ids[..2] {
        bed.wait_rj(&object_name(id), "queued", |rj| rj.status.is_some())
            .await;
    }
    assert!(
        bed.rjs()
            .get_opt(&object_name(&ids[2]))
            .await
            .unwrap()
            .is_none(),
        "the refused job never became a RepoboxJob"
    );
    bed.eventually_metric("repobox_bad_entries_total{reason=\"user_queue_full\"}", 1.0)
        .await;
    gate.open();
    for id in [&first.id, &ids[0], &ids[1], &other.id] {
        bed.wait_phase(&object_name(id), RepoboxJobPhase::Succeeded)
            .await;
    }
    assert_eq!(bed.record(&ids[2]).await["status"], "failed");
    let pending: redis::streams::StreamPendingReply = bed
        .con
        .xpending("jobs:stream", "jobs:stream:runners")
        .await
        .unwrap();
    assert_eq!(pending.count(), 0, "the refused entry was acknowledged");
    bed.stop_operator().await.unwrap();
}

/// The group's `lag`: entries in the stream never delivered to it.
async fn group_lag(bed: &mut Bed) -> i64 {
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg("jobs:stream")
        .query_async(&mut bed.con)
        .await
        .unwrap();
    match groups[0].get("lag") {
        Some(redis::Value::Int(n)) => *n,
        other => panic!("lag: {other:?}"),
    }
}

#[tokio::test]
async fn pause_holds_everything_across_a_restart_and_resume_runs_it_all() {
    let gate = Gate::new();
    let agent = gate.agent("true");
    let mut bed = Bed::new(&[]).await;
    let flags = [
        "--max-jobs-per-user",
        "1",
        "--agent-command",
        agent.as_str(),
    ];
    bed.start_operator(&flags);
    let running = bed.job("pam0-run", "pam");
    bed.submit(&running).await;
    let queued = bed.job("pam1-wait", "pam");
    bed.submit(&queued).await;
    bed.wait_phase(&object_name(&running.id), RepoboxJobPhase::Running)
        .await;
    bed.wait_rj(&object_name(&queued.id), "queued", |rj| {
        status_of(rj).0 == Some(reasons::USER_QUOTA_EXCEEDED)
    })
    .await;

    // The documented command.
    let out = bed
        .operator_cli(&["pause", "--reason", "database maintenance"])
        .await;
    assert!(
        out.contains("paused since") && out.contains("database maintenance"),
        "{out}"
    );
    let held = bed
        .wait_rj(&object_name(&queued.id), "paused", |rj| {
            status_of(rj).0 == Some(reasons::PAUSED)
        })
        .await;
    assert_eq!(status_of(&held).1, "waiting: paused: database maintenance");
    bed.eventually_metric("repobox_paused", 1.0).await;
    let (code, body) = bed.readyz().await.unwrap();
    assert_eq!(code, 200, "paused on purpose is still ready");
    assert!(body.contains("paused: database maintenance"), "{body}");

    // The running job finishes; nothing else starts.
    gate.open();
    bed.wait_phase(&object_name(&running.id), RepoboxJobPhase::Succeeded)
        .await;
    bed.eventually_metric("repobox_jobs_running", 0.0).await;
    bed.eventually_metric("repobox_jobs_queued", 1.0).await;
    let rj = bed.rjs().get(&object_name(&queued.id)).await.unwrap();
    assert_eq!(rj.phase(), RepoboxJobPhase::Queued);

    // A restart (a leader change) keeps the pause: it lives in Redis. New entries stay
    // unread in the stream.
    bed.stop_operator().await.unwrap();
    bed.start_operator(&flags);
    bed.eventually_metric("repobox_paused", 1.0).await;
    let later = bed.job("pam2-new", "pam");
    bed.submit(&later).await;
    bed.eventually_metric("repobox_jobs_queued", 1.0).await;
    bed.eventually_metric("repobox_jobs_running", 0.0).await;
    assert_eq!(group_lag(&mut bed).await, 1, "the new entry waits in Redis");
    assert_eq!(
        bed.rjs()
            .get(&object_name(&queued.id))
            .await
            .unwrap()
            .phase(),
        RepoboxJobPhase::Queued
    );
    assert!(
        bed.rjs()
            .get_opt(&object_name(&later.id))
            .await
            .unwrap()
            .is_none(),
        "not read while paused"
    );

    // Per-user pause on top: resuming everyone still holds that user.
    bed.operator_cli(&["pause", "--user", "pam", "--reason", "billing"])
        .await;
    let out = bed.operator_cli(&["resume"]).await;
    assert!(out.starts_with("running (not paused); 1 user(s)"), "{out}");
    bed.eventually_metric("repobox_paused", 0.0).await;
    bed.eventually_metric("repobox_paused_users", 1.0).await;
    let held = bed
        .wait_rj(&object_name(&later.id), "read and held", |rj| {
            status_of(rj).0 == Some(reasons::PAUSED)
        })
        .await;
    assert_eq!(status_of(&held).1, "waiting: paused for user pam: billing");
    let (_, body) = bed.readyz().await.unwrap();
    assert!(!body.contains("paused"), "{body}");

    // Resume the user: everything runs.
    bed.operator_cli(&["resume", "--user", "pam"]).await;
    for j in [&queued, &later] {
        bed.wait_phase(&object_name(&j.id), RepoboxJobPhase::Succeeded)
            .await;
        assert_eq!(bed.record(&j.id).await["status"], "success");
    }
    assert_eq!(group_lag(&mut bed).await, 0);
    let rjs = bed.rjs().list(&ListParams::default()).await.unwrap().items;
    assert_eq!(rjs.len(), 3);
    bed.stop_operator().await.unwrap();
}
