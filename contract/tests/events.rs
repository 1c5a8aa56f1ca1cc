//! Live events against a real redis-server: every write that the contract's scripts make is
//! published on `job:{id}:events` in the same step, with a `seq` that matches the list.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use repobox_contract::events::{self, Event};
use repobox_contract::transitions::{self, Finish, FinishOutcome, StartOutcome};
use repobox_contract::{JobStatus, keys};
use repobox_testbed::redis_server::RedisServer;

/// Subscribed (the server confirmed) before it is returned.
async fn subscribe(redis: &RedisServer, job_id: &str) -> redis::aio::PubSub {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(keys::job_events(job_id)).await.unwrap();
    pubsub
}

async fn next_event(pubsub: &mut redis::aio::PubSub) -> Event {
    let msg = tokio::time::timeout(Duration::from_secs(10), pubsub.on_message().next())
        .await
        .expect("an event within 10 s")
        .expect("the subscription is open");
    Event::parse(&msg.get_payload::<String>().unwrap()).unwrap()
}

fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn output_and_status_writes_are_published_with_list_positions() {
    let redis = RedisServer::start().await.unwrap();
    let mut con = redis.connection().await;
    let mut sub = subscribe(&redis, "j1").await;
    let _: () = con
        .hset_multiple("job:j1", &[("userId", "u"), ("status", "pending")])
        .await
        .unwrap();

    let t = "2026-01-01T00:00:00.000Z";
    assert_eq!(
        transitions::start(&mut con, "j1", "r1", 1, t)
            .await
            .unwrap(),
        StartOutcome::Started
    );
    let batch1: Vec<String> = vec!["one".into(), "two \"quoted\" \u{1}".into()];
    let batch2: Vec<String> = vec!["three".into()];
    assert_eq!(
        events::push_output(&mut con, "j1", &batch1, t)
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        events::push_output(&mut con, "j1", &batch2, t)
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        events::push_output(&mut con, "j1", &[], t).await.unwrap(),
        None
    );
    assert!(
        transitions::set_step(&mut con, "j1", "r1", "pushing", t)
            .await
            .unwrap()
    );
    let fin = Finish::success(t.into(), Some("repobox/j1".into()), Some("abc".into()));
    assert_eq!(
        transitions::finish(&mut con, "j1", &fin).await.unwrap(),
        FinishOutcome::Finished
    );
    // Refused transitions publish nothing.
    assert_eq!(
        transitions::finish(&mut con, "j1", &Finish::failed(t.into(), "late"))
            .await
            .unwrap(),
        FinishOutcome::AlreadyTerminal(JobStatus::Success)
    );
    assert!(
        !transitions::set_step(&mut con, "j1", "r1", "pushing", t)
            .await
            .unwrap()
    );

    let want = [
        Event::Status {
            seq: 0,
            status: JobStatus::Running,
            fields: fields(&[("startedAt", t), ("runnerId", "r1")]),
            timestamp: t.into(),
        },
        Event::Output {
            seq: 0,
            lines: batch1.clone(),
            timestamp: t.into(),
        },
        Event::Output {
            seq: 2,
            lines: batch2.clone(),
            timestamp: t.into(),
        },
        Event::Status {
            seq: 3,
            status: JobStatus::Running,
            fields: fields(&[("step", "pushing")]),
            timestamp: t.into(),
        },
        Event::Status {
            seq: 3,
            status: JobStatus::Success,
            fields: fields(&[
                ("finishedAt", t),
                ("branch", "repobox/j1"),
                ("commitSha", "abc"),
            ]),
            timestamp: t.into(),
        },
    ];
    for w in want {
        assert_eq!(next_event(&mut sub).await, w);
    }
    // Nothing else came: the next message is one published now.
    let _: i64 = con
        .publish(
            keys::job_events("j1"),
            "{\"seq\":0,\"type\":\"status\",\"status\":\"pending\",\"timestamp\":\"end\"}",
        )
        .await
        .unwrap();
    assert!(
        matches!(next_event(&mut sub).await, Event::Status { timestamp, .. } if timestamp == "end")
    );

    let list: Vec<String> = con.lrange("job:j1:output", 0, -1).await.unwrap();
    assert_eq!(list, [batch1, batch2].concat());
    let step: String = con.hget("job:j1", "step").await.unwrap();
    assert_eq!(step, "pushing");
    let status: String = con.hget("job:j1", "status").await.unwrap();
    assert_eq!(
        status, "success",
        "a late step write never touches a finished record"
    );
}

#[tokio::test]
async fn large_batches_are_pushed_whole() {
    let redis = RedisServer::start().await.unwrap();
    let mut con = redis.connection().await;
    let mut sub = subscribe(&redis, "big").await;
    // More arguments than Lua's `unpack` takes at once.
    let lines: Vec<String> = (0..2500).map(|i| format!("line {i}")).collect();
    assert_eq!(
        events::push_output(&mut con, "big", &lines, "t")
            .await
            .unwrap(),
        Some(0)
    );
    let Event::Output {
        seq, lines: got, ..
    } = next_event(&mut sub).await
    else {
        panic!("an output event")
    };
    assert_eq!((seq, &got), (0, &lines));
    let list: Vec<String> = con.lrange("job:big:output", 0, -1).await.unwrap();
    assert_eq!(list, lines);
}

#[tokio::test]
async fn a_refused_publish_never_undoes_the_write() {
    let redis = RedisServer::start().await.unwrap();
    let mut admin = redis.connection().await;
    // A user as the runner's was before events: no PUBLISH, no channel.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "old",
            "reset",
            "on",
            ">pw",
            "~job:*",
            "-@all",
            "+hgetall",
            "+rpush",
            "+llen",
            "+evalsha",
            "+script|load",
            "+exists",
            "+hget",
            "+hset",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://old:pw@127.0.0.1:{}/", redis.port());
    let mut old = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = admin
        .hset_multiple("job:o", &[("userId", "u"), ("status", "pending")])
        .await
        .unwrap();
    assert_eq!(
        transitions::start(&mut old, "o", "r", 1, "t")
            .await
            .unwrap(),
        StartOutcome::Started
    );
    assert_eq!(
        events::push_output(&mut old, "o", &["kept".to_owned()], "t")
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        transitions::finish(&mut old, "o", &Finish::failed("t".into(), "e"))
            .await
            .unwrap(),
        FinishOutcome::Finished
    );
    let rec: std::collections::HashMap<String, String> = admin.hgetall("job:o").await.unwrap();
    assert_eq!(rec["status"], "failed");
    let list: Vec<String> = admin.lrange("job:o:output", 0, -1).await.unwrap();
    assert_eq!(list, ["kept"]);
    // Redis logged the refusals: that is how an operator finds the missing ACL rule.
    let log: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(!log.is_empty());
}
