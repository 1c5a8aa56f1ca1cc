//! The `RedisServer` fixture against the real `redis-server`.

use redis::AsyncCommands;
use repobox_testbed::redis_server::RedisServer;

#[tokio::test]
async fn set_and_get_round_trip() {
    let redis = RedisServer::start().await.expect("start redis-server");
    assert_eq!(
        redis.url(),
        format!("redis://127.0.0.1:{}/", redis.port()),
        "URL without password"
    );
    let mut con = redis.connection().await;
    let _: () = con.set("greeting", "hello").await.expect("SET");
    let got: String = con.get("greeting").await.expect("GET");
    assert_eq!(got, "hello");

    // Persistence is off: nothing should be saved to disk behind the test's back.
    let save: String = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async::<Vec<String>>(&mut con)
        .await
        .expect("CONFIG GET save")
        .into_iter()
        .nth(1)
        .expect("CONFIG GET returns name and value");
    assert_eq!(save, "");
}

#[tokio::test]
async fn two_servers_are_independent() {
    let a = RedisServer::start().await.expect("start first");
    let b = RedisServer::start().await.expect("start second");
    assert_ne!(a.port(), b.port());
    let mut ca = a.connection().await;
    let mut cb = b.connection().await;
    let _: () = ca.set("only-in-a", 1).await.expect("SET");
    let in_b: Option<i64> = cb.get("only-in-a").await.expect("GET");
    assert_eq!(in_b, None);
}

#[tokio::test]
async fn restart_answers_again_on_the_same_port() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    let port = redis.port();
    let url = redis.url();
    let old_pid = redis.pid().expect("running server has a pid");
    let mut con = redis.connection().await;
    let _: () = con.set("k", "v").await.expect("SET before restart");

    redis.stop().await;
    assert_eq!(redis.pid(), None, "stopped server has no pid");
    let err = redis::cmd("PING")
        .query_async::<String>(&mut con)
        .await
        .expect_err("PING must fail while the server is down");
    assert!(
        err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error(),
        "unexpected error kind: {err:?}"
    );

    redis.restart().await.expect("restart");
    assert_eq!(redis.port(), port, "same port after restart");
    assert_eq!(redis.url(), url, "same URL after restart");
    assert_ne!(redis.pid(), Some(old_pid), "a new process");

    // A fresh client built from the URL the code under test holds reaches the new server.
    let client = redis::Client::open(url).expect("parse URL");
    let mut fresh = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect after restart");
    let pong: String = redis::cmd("PING")
        .query_async(&mut fresh)
        .await
        .expect("PING after restart");
    assert_eq!(pong, "PONG");
    // Persistence is off, so the restart lost the data, as documented.
    let lost: Option<String> = fresh.get("k").await.expect("GET after restart");
    assert_eq!(lost, None);
}

#[tokio::test]
async fn password_is_required_and_accepted() {
    let password = "s3cret/with:odd@chars";
    let redis = RedisServer::builder()
        .requirepass(password)
        .start()
        .await
        .expect("start redis-server with a password");
    assert!(
        redis.url().contains("@127.0.0.1:"),
        "URL carries credentials"
    );
    assert!(
        !redis.url().contains(password),
        "odd characters are percent-encoded in the URL"
    );

    // Without the password: connecting works (no HELLO/AUTH is sent) but commands are refused.
    let anon = redis::Client::open(redis.url_without_password()).expect("parse URL");
    let refused = match anon.get_multiplexed_async_connection().await {
        Ok(mut con) => redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async::<()>(&mut con)
            .await
            .expect_err("unauthenticated SET must be refused"),
        Err(e) => e,
    };
    assert!(
        refused.to_string().contains("NOAUTH") || refused.code() == Some("NOAUTH"),
        "expected NOAUTH, got {refused:?}"
    );

    // With the password URL everything works.
    let mut con = redis.connection().await;
    let _: () = con.set("k", "v").await.expect("authenticated SET");
    let got: String = con.get("k").await.expect("authenticated GET");
    assert_eq!(got, "v");

    // Same password after a restart.
    let mut redis = redis;
    redis.restart().await.expect("restart");
    let mut con = redis.connection().await;
    let _: () = con.set("k2", "v2").await.expect("SET after restart");
}

#[tokio::test]
async fn drop_kills_the_process() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let pid = redis.pid().expect("pid");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"));
    nix::sys::signal::kill(pid, None).expect("process is alive while the fixture lives");
    drop(redis);

    assert_eq!(
        nix::sys::signal::kill(pid, None),
        Err(nix::errno::Errno::ESRCH),
        "process is gone (killed and reaped) once the fixture is dropped"
    );
}
