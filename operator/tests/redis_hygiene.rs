//! What the operator keeps right in Redis across leader changes and over time, on a real
//! redis-server: the per-user running counters, quotas counted by `spec.userId` after a
//! restart, and the bounds on Redis growth (dead-letter cap, stream trimming, output expiry).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, PostParams};
use redis::AsyncCommands;
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};
use repobox_operator::model::crd::RepoboxJobPhase;
use repobox_operator::model::names::object_name;
use repobox_operator::run::records::JobRecords;
use repobox_testbed::redis_server::RedisServer;
use repobox_testbed::simulator::SimEvent;

#[tokio::test]
async fn stale_user_counters_from_another_leader_are_reset_on_taking_the_lease() {
    let gate = Gate::new();
    let agent = gate.agent("true");
    let mut bed = Bed::new(&[]).await;
    // What a previous leader left behind: counters for users this process never saw, and a
    // wrong one for a user it will see.
    for (user, n) in [("ghost", 4), ("user@example.com", 9), ("a:b", 2)] {
        let _: () = bed
            .con
            .set(format!("runner:user:{user}:running"), n)
            .await
            .unwrap();
    }
    let _: () = bed.con.set("runner:other", "keep").await.unwrap();
    bed.start_operator(&["--agent-command", &agent]);
    let job = bed.job("stale001-a", "user@example.com");
    bed.submit(&job).await;
    bed.wait_phase(&object_name(&job.id), RepoboxJobPhase::Running)
        .await;
    bed.eventually_counter("user@example.com", "1").await;
    bed.eventually_counter("ghost", "0").await;
    bed.eventually_counter("a:b", "0").await;
    let other: String = bed.con.get("runner:other").await.unwrap();
    assert_eq!(other, "keep", "only runner:user:*:running keys are touched");
    gate.open();
    bed.wait_phase(&object_name(&job.id), RepoboxJobPhase::Succeeded)
        .await;
    bed.eventually_counter("user@example.com", "0").await;
    bed.stop_operator().await.unwrap();
}

/// The state an operator leaves when it dies between creating a Job and writing the
/// RepoboxJob's status: the Job runs, the RepoboxJob still looks queued. The new operator must
/// count that Job against `spec.userId` (not the hashed `repobox.dev/user` label), so the
/// user's second job waits.
#[tokio::test]
async fn per_user_quota_holds_across_a_restart_for_ids_like_email_addresses() {
    let gate = Gate::new();
    let agent = gate.agent("echo done > DONE.md");
    let mut bed = Bed::new(&[]).await;
    let flags = [
        "--agent-command",
        agent.as_str(),
        "--max-jobs-per-user",
        "1",
    ];
    let user = "user@example.com";
    let a = bed.job("mailqa01-a", user);
    let b = bed.job("mailqb02-b", user);
    let mut created = Vec::new();
    for (job, entry) in [(&a, "1-0"), (&b, "2-0")] {
        // As the web app: hashes and stream entry. The RepoboxJobs exist already when the new
        // operator reads the entries (AlreadyExists: acknowledged, nothing created twice).
        bed.submit(job).await;
        let rj = repobox_operator::run::intake::repobox_job(
            &job.id,
            user,
            entry,
            &bed.record(&job.id).await,
        );
        created.push(bed.rjs().create(&PostParams::default(), &rj).await.unwrap());
    }
    // The dead operator's Job for the first one.
    let job_cfg = bed.config(&flags).job_config().unwrap();
    let job_a = repobox_operator::decide::job_builder::job_for(&created[0], &job_cfg).unwrap();
    let jobs: Api<Job> = Api::namespaced(bed.client.clone(), NS);
    jobs.create(&PostParams::default(), &job_a).await.unwrap();
    let name_a = object_name(&a.id);
    let name_b = object_name(&b.id);

    bed.start_operator(&flags);
    let waiting = bed
        .wait_rj(&name_b, "given a status", |rj| rj.status.is_some())
        .await;
    let status = waiting.status.unwrap();
    assert_eq!(
        (status.phase, status.reason.as_deref()),
        (Some(RepoboxJobPhase::Queued), Some("UserQuotaExceeded")),
        "the second job of {user} must wait for the first: {:?}",
        status.message
    );
    assert!(jobs.get_opt(&name_b).await.unwrap().is_none());
    gate.open();
    bed.wait_phase(&name_a, RepoboxJobPhase::Succeeded).await;
    bed.wait_phase(&name_b, RepoboxJobPhase::Succeeded).await;
    // Never two of the user's runners at once.
    let mut live = 0;
    for ev in bed.sim().history() {
        match ev {
            SimEvent::PodStarted { .. } => live += 1,
            SimEvent::PodExited { .. } => live -= 1,
            _ => {}
        }
        assert!(live <= 1, "two runners of {user} ran at once");
    }
    assert_eq!(bed.sim().pods_started(), 2, "each job ran once");
    bed.stop_operator().await.unwrap();
}

#[tokio::test]
async fn the_dead_letter_stream_is_capped() {
    let mut bed = Bed::new(&[]).await;
    // A dead-letter stream that grew before the cap existed.
    let mut last = String::new();
    for i in 0..1000 {
        last = bed
            .con
            .xadd("jobs:stream:dead", "*", &[("old", i.to_string())])
            .await
            .unwrap();
    }
    bed.emu()
        .inject_fault(
            Some("POST"),
            "/apis/repobox.dev/v1alpha1/namespaces/repobox/repoboxjobs",
            500,
            1000,
        )
        .await
        .unwrap();
    bed.start_operator(&["--max-deliveries", "1", "--dead-letter-maxlen", "10"]);
    let poison = bed.job("capped01-p", "hal");
    bed.submit(&poison).await;
    let mut blocking = redis::Client::open(bed.redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .unwrap();
    let reply: Option<StreamReadReply> = blocking
        .xread_options(
            &["jobs:stream:dead"],
            &[&last],
            &StreamReadOptions::default().block(60_000),
        )
        .await
        .unwrap();
    let new = reply.expect("the poison entry was dead-lettered").keys[0]
        .ids
        .clone();
    assert_eq!(new.len(), 1);
    let len: usize = bed.con.xlen("jobs:stream:dead").await.unwrap();
    // `MAXLEN ~ 10` removes whole stream nodes (100 entries each by default): at least 10
    // entries stay, and at most one node more.
    assert!(
        (10..=110).contains(&len),
        "dead-letter stream has {len} entries"
    );
    let newest: StreamRangeReply = bed
        .con
        .xrevrange_count("jobs:stream:dead", "+", "-", 1)
        .await
        .unwrap();
    assert_eq!(newest.ids[0].id, new[0].id, "the newest entry is kept");
    bed.emu().clear_faults().await.unwrap();
    bed.stop_operator().await.unwrap();
}

/// `trim_acknowledged` on a real stream: acknowledged entries below the oldest pending one
/// go; pending and undelivered entries, and entries another group still needs, stay.
#[tokio::test]
async fn acknowledged_entries_are_trimmed_and_nothing_else() {
    let redis = RedisServer::start().await.unwrap();
    let mut con = redis.connection().await;
    let stream = "jobs:stream";
    let mut ids = Vec::new();
    for i in 1..=10 {
        let id: String = con
            .xadd(stream, "*", &[("jobId", format!("j{i}"))])
            .await
            .unwrap();
        ids.push(id);
    }
    let remaining = |con: &mut redis::aio::MultiplexedConnection| {
        let mut con = con.clone();
        async move {
            let r: StreamRangeReply = con.xrange_all(stream).await.unwrap();
            r.ids.into_iter().map(|e| e.id).collect::<Vec<_>>()
        }
    };
    let _: () = con.xgroup_create(stream, "runners", "0").await.unwrap();
    // Deliver 1..6 to one consumer; acknowledge 1, 2, 3 and 5; 4 and 6 stay pending.
    let _: StreamReadReply = con
        .xread_options(
            &[stream],
            &[">"],
            &StreamReadOptions::default()
                .group("runners", "pod-a")
                .count(6),
        )
        .await
        .unwrap();
    let _: usize = con
        .xack(stream, "runners", &[&ids[0], &ids[1], &ids[2], &ids[4]])
        .await
        .unwrap();
    let trimmed = repobox_operator::run::intake::trim_acknowledged(&mut con, stream)
        .await
        .unwrap();
    assert_eq!(trimmed, 3);
    assert_eq!(remaining(&mut con).await, ids[3..].to_vec());

    // Everything delivered is acknowledged: all of it goes, the undelivered 7..10 stay...
    let _: usize = con
        .xack(stream, "runners", &[&ids[3], &ids[5]])
        .await
        .unwrap();
    // ...unless another group has not read as far: it saw only up to entry 5.
    let _: () = con.xgroup_create(stream, "audit", &ids[4]).await.unwrap();
    repobox_operator::run::intake::trim_acknowledged(&mut con, stream)
        .await
        .unwrap();
    assert_eq!(remaining(&mut con).await, ids[5..].to_vec());
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(stream)
        .arg("audit")
        .query_async(&mut con)
        .await
        .unwrap();
    repobox_operator::run::intake::trim_acknowledged(&mut con, stream)
        .await
        .unwrap();
    assert_eq!(remaining(&mut con).await, ids[6..].to_vec());

    // A stream without groups, or no stream at all, is left alone.
    let _: String = con.xadd("other", "*", &[("a", "b")]).await.unwrap();
    for key in ["other", "missing"] {
        let n = repobox_operator::run::intake::trim_acknowledged(&mut con, key)
            .await
            .unwrap();
        assert_eq!(n, 0);
    }
    let len: usize = con.xlen("other").await.unwrap();
    assert_eq!(len, 1);
}

#[tokio::test]
async fn output_expiry_is_set_once_and_never_extended() {
    let redis = RedisServer::start().await.unwrap();
    let mut con = redis.connection().await;
    let manager = redis::aio::ConnectionManager::new(redis::Client::open(redis.url()).unwrap())
        .await
        .unwrap();
    let _: () = con.rpush("job:a:output", "line").await.unwrap();
    let _: () = con.rpush("job:b:output", "line").await.unwrap();

    let keep = JobRecords::new(manager.clone()).with_output_ttl(None);
    keep.expire_output("a").await;
    let ttl: i64 = con.ttl("job:a:output").await.unwrap();
    assert_eq!(ttl, -1, "OUTPUT_TTL_SECONDS=0 keeps the output");

    let expiring = JobRecords::new(manager).with_output_ttl(Some(Duration::from_secs(3600)));
    expiring.expire_output("a").await;
    let ttl: i64 = con.ttl("job:a:output").await.unwrap();
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
    // A key that already expires keeps its expiry (a later reconcile must not extend it).
    let _: () = con.expire("job:b:output", 100).await.unwrap();
    expiring.expire_output("b").await;
    let ttl: i64 = con.ttl("job:b:output").await.unwrap();
    assert!((90..=100).contains(&ttl), "ttl {ttl}");
    // A missing list is not created.
    expiring.expire_output("c").await;
    let exists: bool = con.exists("job:c:output").await.unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn finished_jobs_expire_their_output_and_leave_no_stream_entries() {
    let mut bed = Bed::new(&[]).await;
    bed.start_operator(&["--output-ttl-seconds", "3600"]);
    let mut names = HashMap::new();
    for i in 0..3 {
        let job = bed.job(&format!("expire{i:02}-x"), "iris");
        bed.submit(&job).await;
        names.insert(job.id.clone(), object_name(&job.id));
    }
    for (id, name) in &names {
        bed.wait_phase(name, RepoboxJobPhase::Succeeded).await;
        let ttl: i64 = bed.con.ttl(format!("job:{id}:output")).await.unwrap();
        assert!(
            (1..=3600).contains(&ttl),
            "job:{id}:output has ttl {ttl} once the job is terminal"
        );
        let lines: usize = bed.con.llen(format!("job:{id}:output")).await.unwrap();
        assert!(lines > 0, "the output is still readable");
        let rec = bed.record(id).await;
        assert_eq!(rec["status"], "success");
        let ttl: i64 = bed.con.ttl(format!("job:{id}")).await.unwrap();
        assert_eq!(ttl, -1, "the job record itself never expires");
    }
    // The trim runs after each reclaim pass (every 0.5 s with CLAIM_MIN_IDLE_SECONDS=1): all
    // three entries were acknowledged, so the stream empties. No event to await in Redis:
    // bounded polling.
    let mut len = usize::MAX;
    for _ in 0..250 {
        len = bed.con.xlen("jobs:stream").await.unwrap();
        if len == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(len, 0, "acknowledged entries were trimmed");
    bed.stop_operator().await.unwrap();
}
