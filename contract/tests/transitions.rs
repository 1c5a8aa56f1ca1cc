//! The Lua transitions against a real redis-server.

use redis::AsyncCommands;
use repobox_contract::JobStatus;
use repobox_contract::transitions::{self, Finish, FinishOutcome, PullRequestFields, StartOutcome};
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
        transitions::start(&mut con, "nope", "r1", "t")
            .await
            .unwrap(),
        StartOutcome::Missing
    );

    job(&mut con, "a", "pending").await;
    assert_eq!(
        transitions::start(&mut con, "a", "r1", "2026-01-01T00:00:00.000Z")
            .await
            .unwrap(),
        StartOutcome::Started
    );
    assert_eq!(
        transitions::start(&mut con, "a", "r2", "t").await.unwrap(),
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
            transitions::start(&mut con, s, "r1", "t").await.unwrap(),
            StartOutcome::AlreadyTerminal(JobStatus::parse(s).unwrap())
        );
        let status: String = con.hget(format!("job:{s}"), "status").await.unwrap();
        assert_eq!(status, s);
    }

    job(&mut con, "odd", "queued").await;
    assert_eq!(
        transitions::start(&mut con, "odd", "r1", "t")
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
            transitions::start(&mut c, "race", &format!("r{i}"), "t")
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
