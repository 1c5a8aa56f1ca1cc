//! The Lua transitions against a real redis-server.

use redis::AsyncCommands;
use repobox_contract::JobStatus;
use repobox_contract::transitions::{
    self, Finish, FinishOutcome, PullRequestFields, RetryOutcome, StartOutcome,
};
use repobox_testbed::redis_server::RedisServer;

async fn job(con: &mut redis::aio::MultiplexedConnection, id: &str, status: &str) {
    let _: () = con
        .hset_multiple(
            format!("job:{id}"),
            &[("id", id), ("userId", "u1"), ("status", status)],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn start_is_exclusive_and_respects_terminal_states() {
    let redis = RedisServer::start().await.unwrap();
    let mut con = redis.connection().await;

    assert_eq!(
        transitions::start(&mut con, "nope", "r1", 1, "t")
            .await
            .unwrap(),
        StartOutcome::Missing
    );

    job(&mut con, "a", "pending").await;
    assert_eq!(
        transitions::start(&mut con, "a", "r1", 1, "2026-01-01T00:00:00.000Z")
            .await
            .unwrap(),
        StartOutcome::Started
    );
    assert_eq!(
        transitions::start(&mut con, "a", "r2", 1, "t")
            .await
            .unwrap(),
        StartOutcome::AlreadyRunning {
            runner_id: "r1".into()
        }
    );
    let fields: Vec<String> = con
        .hmget("job:a", &["status", "runnerId", "startedAt"])
        .await
        .unwrap();
    assert_eq!(fields, ["running", "r1", "2026-01-01T00:00:00.000Z"]);

    for s in ["success", "failed", "cancelled"] {
        job(&mut con, s, s).await;
        assert_eq!(
            transitions::start(&mut con, s, "r1", 1, "t").await.unwrap(),
            StartOutcome::AlreadyTerminal(JobStatus::parse(s).unwrap())
        );
        let status: String = con.hget(format!("job:{s}"), "status").await.unwrap();
        assert_eq!(status, s);
    }

    job(&mut con, "odd", "queued").await;
    assert_eq!(
        transitions::start(&mut con, "odd", "r1", 1, "t")
            .await
            .unwrap(),
        StartOutcome::InvalidStatus("queued".into())
    );
}

#[tokio::test]
async fn many_racing_starts_yield_exactly_one_winner() {
    let redis = RedisServer::start().await.unwrap();
    let mut con = redis.connection().await;
    job(&mut con, "race", "pending").await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut c = redis.connection().await;
        tasks.push(tokio::spawn(async move {
            transitions::start(&mut c, "race", &format!("r{i}"), 1, "t")
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        if t.await.unwrap() == StartOutcome::Started {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn finish_never_overwrites_a_terminal_state() {
    let redis = RedisServer::start().await.unwrap();
    let mut con = redis.connection().await;
    job(&mut con, "f", "running").await;
    let fin = Finish::success("t1".into(), Some("repobox/f".into()), Some("abc".into()));
    assert_eq!(
        transitions::finish(&mut con, "f", &fin).await.unwrap(),
        FinishOutcome::Finished
    );
    let fields: Vec<Option<String>> = con
        .hmget(
            "job:f",
            &["status", "finishedAt", "branch", "commitSha", "error"],
        )
        .await
        .unwrap();
    assert_eq!(
        fields,
        [
            Some("success".into()),
            Some("t1".into()),
            Some("repobox/f".into()),
            Some("abc".into()),
            None
        ]
    );

    let late = Finish::failed("t2".into(), "timed out\nafter 5 s");
    assert_eq!(
        transitions::finish(&mut con, "f", &late).await.unwrap(),
        FinishOutcome::AlreadyTerminal(JobStatus::Success)
    );
    let status: String = con.hget("job:f", "status").await.unwrap();
    assert_eq!(status, "success");

    job(&mut con, "g", "pending").await;
    assert_eq!(
        transitions::finish(&mut con, "g", &late).await.unwrap(),
        FinishOutcome::Finished
    );
    let err: String = con.hget("job:g", "error").await.unwrap();
    assert_eq!(err, "timed out after 5 s");

    assert_eq!(
        transitions::finish(&mut con, "none", &late).await.unwrap(),
        FinishOutcome::Missing
    );
}

#[tokio::test]
async fn a_retry_hands_a_running_job_to_exactly_one_runner_of_the_next_attempt() {
    let redis = RedisServer::start().await.unwrap();
    let mut con = redis.connection().await;
    job(&mut con, "r", "pending").await;
    assert_eq!(
        transitions::start(&mut con, "r", "pod-a", 1, "t1")
            .await
            .unwrap(),
        StartOutcome::Started
    );
    assert!(
        transitions::set_step(&mut con, "r", "pod-a", "cloning", "t")
            .await
            .unwrap()
    );
    // Only the holder records steps.
    assert!(
        !transitions::set_step(&mut con, "r", "pod-x", "pushing", "t")
            .await
            .unwrap()
    );
    // A runner of a later attempt that was not announced is stale-in-advance: refused.
    assert_eq!(
        transitions::start(&mut con, "r", "pod-b", 2, "t2")
            .await
            .unwrap(),
        StartOutcome::Superseded {
            attempt: "1".into()
        }
    );

    let note = "==> the runner pod was evicted; running the job again (attempt 2 of 3)";
    assert_eq!(
        transitions::retry(&mut con, "r", 2, note, "t")
            .await
            .unwrap(),
        RetryOutcome::Retrying
    );
    // Repeating the call changes nothing (a reconcile that ran twice).
    assert_eq!(
        transitions::retry(&mut con, "r", 2, note, "t")
            .await
            .unwrap(),
        RetryOutcome::AlreadyAt("2".into())
    );
    let output: Vec<String> = con.lrange("job:r:output", 0, -1).await.unwrap();
    assert_eq!(output, [note]);
    let fields: Vec<Option<String>> = con
        .hmget("job:r", &["status", "attempt", "step", "startedAt"])
        .await
        .unwrap();
    assert_eq!(
        fields,
        [
            Some("running".into()),
            Some("2".into()),
            None,
            Some("t1".into())
        ]
    );

    // The first attempt's runner can never take it back; one runner of attempt 2 wins.
    assert_eq!(
        transitions::start(&mut con, "r", "pod-a", 1, "t3")
            .await
            .unwrap(),
        StartOutcome::Superseded {
            attempt: "2".into()
        }
    );
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut c = redis.connection().await;
        tasks.push(tokio::spawn(async move {
            transitions::start(&mut c, "r", &format!("pod-b{i}"), 2, "t4")
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        match t.await.unwrap() {
            StartOutcome::Started => winners += 1,
            StartOutcome::AlreadyRunning { runner_id } => assert!(runner_id.starts_with("pod-b")),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(winners, 1);
    // The old runner's late step is ignored.
    assert!(
        !transitions::set_step(&mut con, "r", "pod-a", "pushing", "t")
            .await
            .unwrap()
    );

    // A finished job is never retried: the caller adopts its result.
    let fin = Finish::success("t5".into(), Some("repobox/r".into()), None);
    transitions::finish(&mut con, "r", &fin).await.unwrap();
    assert_eq!(
        transitions::retry(&mut con, "r", 3, note, "t")
            .await
            .unwrap(),
        RetryOutcome::AlreadyTerminal(JobStatus::Success)
    );
    assert_eq!(
        transitions::retry(&mut con, "nope", 2, note, "t")
            .await
            .unwrap(),
        RetryOutcome::Missing
    );
}

#[tokio::test]
async fn finish_writes_the_pull_request_fields_with_the_status() {
    let redis = RedisServer::start().await.unwrap();
    let mut con = redis.connection().await;
    job(&mut con, "pr", "running").await;
    let fin = Finish::success("t1".into(), Some("repobox/pr".into()), Some("abc".into()))
        .with_pull_request(PullRequestFields {
            url: Some("https://github.com/acme/api/pull/12".into()),
            number: Some(12),
            error: None,
        });
    assert_eq!(
        transitions::finish(&mut con, "pr", &fin).await.unwrap(),
        FinishOutcome::Finished
    );
    let fields: Vec<Option<String>> = con
        .hmget("job:pr", &["status", "prUrl", "prNumber", "prError"])
        .await
        .unwrap();
    assert_eq!(
        fields,
        [
            Some("success".into()),
            Some("https://github.com/acme/api/pull/12".into()),
            Some("12".into()),
            None
        ]
    );

    job(&mut con, "prerr", "running").await;
    let fin = Finish::success("t1".into(), Some("repobox/x".into()), Some("abc".into()))
        .with_pull_request(PullRequestFields {
            error: Some("could not open\na pull request".into()),
            ..Default::default()
        });
    transitions::finish(&mut con, "prerr", &fin).await.unwrap();
    let fields: Vec<Option<String>> = con
        .hmget("job:prerr", &["status", "prUrl", "prError"])
        .await
        .unwrap();
    assert_eq!(
        fields,
        [
            Some("success".into()),
            None,
            Some("could not open a pull request".into())
        ]
    );
}
