//! Redis credentials on a real redis-server: the ACL users documented in docs/install.md (read
//! from the page, so the documentation cannot drift) let the real job-runner and the real
//! operator do all their work and nothing else; and the operator speaks TLS to a Redis whose
//! certificate comes from a private CA (`REDIS_CA_FILE`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use repobox_operator::model::crd::RepoboxJobPhase;
use repobox_operator::model::names::object_name;
use repobox_testbed::githost::GitHost;
use repobox_testbed::redis_server::RedisServer;
use repobox_testbed::webapp;
use tokio_util::sync::CancellationToken;

const OPERATOR_PASSWORD: &str = "op-Pa55word-0123456789";
const RUNNER_PASSWORD: &str = "run-Pa55word-0123456789";

/// The `ACL SETUSER repobox-…` lines of docs/install.md with the passwords filled in, as
/// argument lists.
fn documented_acls() -> Vec<Vec<String>> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/install.md");
    let text = std::fs::read_to_string(&doc).unwrap();
    let lines: Vec<Vec<String>> = text
        .lines()
        .filter(|l| l.starts_with("ACL SETUSER repobox-"))
        .map(|l| {
            l.replace("${OPERATOR_REDIS_PASSWORD}", OPERATOR_PASSWORD)
                .replace("${RUNNER_REDIS_PASSWORD}", RUNNER_PASSWORD)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .collect();
    let users: Vec<&str> = lines.iter().map(|l| l[2].as_str()).collect();
    assert_eq!(users, ["repobox-operator", "repobox-runner"], "{doc:?}");
    lines
}

/// `major.minor` of the server.
async fn server_version(con: &mut MultiplexedConnection) -> (u32, u32) {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(con)
        .await
        .unwrap();
    let v = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap()
        .trim();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

async fn create_acl_users(con: &mut MultiplexedConnection) {
    // `CLIENT SETINFO` exists from Redis 7.2; the page says to drop the rule on older servers.
    let has_setinfo = server_version(con).await >= (7, 2);
    for args in documented_acls() {
        let mut cmd = redis::cmd(&args[0]);
        for a in &args[1..] {
            if a == "+client|setinfo" && !has_setinfo {
                continue;
            }
            cmd.arg(a);
        }
        let () = cmd.query_async(con).await.unwrap();
    }
    let () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query_async(con)
        .await
        .unwrap();
}

fn user_url(redis: &RedisServer, user: &str, password: &str) -> String {
    format!("redis://{user}:{password}@127.0.0.1:{}/", redis.port())
}

/// Every refusal Redis logged (`ACL LOG`), as text.
async fn acl_refusals(con: &mut MultiplexedConnection) -> Vec<String> {
    let log: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query_async(con).await.unwrap();
    log.iter().map(|v| format!("{v:?}")).collect()
}

async fn refused(con: &mut MultiplexedConnection, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match cmd.query_async::<redis::Value>(con).await {
        Ok(v) => panic!("{args:?} was allowed: {v:?}"),
        Err(e) => assert!(
            e.code() == Some("NOPERM") || e.to_string().contains("NOPERM"),
            "{args:?} failed, but not for want of permission: {e}"
        ),
    }
}

/// Runs a script through SCRIPT LOAD + EVALSHA (what the runner is allowed) and expects Redis
/// to refuse what the script does.
async fn refused_in_script(con: &mut MultiplexedConnection, script: &str, key: &str) {
    let r: redis::RedisResult<redis::Value> =
        redis::Script::new(script).key(key).invoke_async(con).await;
    let e = r.expect_err(script);
    let text = e.to_string().to_lowercase();
    assert!(
        ["noperm", "can't run this command", "no permissions"]
            .iter()
            .any(|m| text.contains(m)),
        "{script}: {e}"
    );
}

#[tokio::test]
async fn the_runner_acl_allows_the_job_runner_and_nothing_else() {
    let redis = RedisServer::start().await.unwrap();
    let mut admin = redis.connection().await;
    create_acl_users(&mut admin).await;
    let git = GitHost::start(TOKEN).await.unwrap();
    git.create_repo("acme/api", &[("README.md", "# api\n")])
        .unwrap();
    let key = repobox_contract::EncryptionKey::parse(KEY_HEX).unwrap();
    let mut job = webapp::NewJob::new(
        "acljob01-r",
        "user@example.com",
        &git.url("acme/api"),
        "nothing to do",
    );
    job.provider_id = "gh".into();
    // The provider as the web app writes it, `baseUrl` naming the test git host (GitHub
    // Enterprise style) so the runner accepts that host for the token.
    let repo_url = git.url("acme/api");
    let scheme_end = repo_url.find("://").unwrap() + 3;
    let host_end = scheme_end + repo_url[scheme_end..].find('/').unwrap();
    let _: () = admin
        .hset_multiple(
            format!("git_provider:{}:gh", job.user_id),
            &[
                ("type", "github".to_owned()),
                ("baseUrl", repo_url[..host_end].to_owned()),
                ("encryptedToken", key.encrypt(TOKEN)),
            ],
        )
        .await
        .unwrap();
    webapp::submit(&mut admin, &job).await.unwrap();

    // The real job-runner, with nothing but the runner user's URL.
    let work = tempfile::tempdir().unwrap();
    let status = tokio::process::Command::new(repobox_testbed::job_runner_binary().unwrap())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", work.path())
        .env("JOB_ID", &job.id)
        .env(
            "REDIS_URL",
            user_url(&redis, "repobox-runner", RUNNER_PASSWORD),
        )
        .env("ENCRYPTION_KEY", KEY_HEX)
        .env("TEMP_DIR", work.path())
        .env("ALLOW_INSECURE_HTTP", "true")
        .env("LOG_FORMAT", "text")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, status).await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "job-runner exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let record: std::collections::HashMap<String, String> =
        admin.hgetall(format!("job:{}", job.id)).await.unwrap();
    assert_eq!(record["status"], "success", "{record:?}");
    let lines: usize = admin.llen(format!("job:{}:output", job.id)).await.unwrap();
    assert!(lines > 0);
    assert_eq!(
        acl_refusals(&mut admin).await,
        Vec::<String>::new(),
        "the runner needed a command or key its ACL does not grant"
    );

    // Everything else is refused.
    let mut runner = redis::Client::open(user_url(&redis, "repobox-runner", RUNNER_PASSWORD))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = admin.set("runner:user:u:running", 1).await.unwrap();
    for args in [
        &["SCAN", "0"][..],
        &["KEYS", "*"],
        &["GET", "runner:user:u:running"],
        &["SET", "runner:user:u:running", "0"],
        &["HGETALL", "session:abc"],
        &["XADD", "jobs:stream", "*", "jobId", "x"],
        &["XRANGE", "jobs:stream", "-", "+"],
        &[
            "HSET",
            "git_provider:user@example.com:gh",
            "encryptedToken",
            "x",
        ],
        &["DEL", "job:acljob01-r"],
        &["PUBLISH", "session:abc", "x"],
        &["EVAL", "return 1", "0"],
        &["CONFIG", "GET", "*"],
        &["ACL", "LIST"],
        &["FLUSHALL"],
        &["MONITOR"],
    ] {
        refused(&mut runner, args).await;
    }
    refused_in_script(&mut runner, "return redis.call('KEYS', '*')", "job:x").await;
    refused_in_script(
        &mut runner,
        "return redis.call('GET', KEYS[1])",
        "runner:user:u:running",
    )
    .await;
    // The runner's own keys still work for it.
    let provider: std::collections::HashMap<String, String> = runner
        .hgetall(format!("git_provider:{}:gh", job.user_id))
        .await
        .unwrap();
    assert!(provider.contains_key("encryptedToken"));
}

#[tokio::test]
async fn the_operator_and_runner_acls_run_jobs_end_to_end() {
    let gate = Gate::new();
    let agent = gate.agent("echo done > DONE.md");
    let mut bed = Bed::new(&[]).await;
    create_acl_users(&mut bed.con).await;
    // Runner pods read their URL from the Secret the operator names (REDIS_SECRET_NAME).
    let secrets: Api<Secret> = Api::namespaced(bed.client.clone(), NS);
    let runner_url = user_url(&bed.redis, "repobox-runner", RUNNER_PASSWORD);
    secrets
        .patch(
            "repobox-redis",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "stringData": { "url": runner_url } })),
        )
        .await
        .unwrap();
    // A stale counter (SCAN on taking the lease), a bad entry, a poison entry (dead letter).
    let _: () = bed.con.set("runner:user:ghost:running", 3).await.unwrap();
    let _: String = bed
        .con
        .xadd("jobs:stream", "*", &[("jobId", "ghost-job")])
        .await
        .unwrap();
    bed.emu()
        .inject_fault(
            Some("POST"),
            "/apis/repobox.dev/v1alpha1/namespaces/repobox/repoboxjobs",
            500,
            4,
        )
        .await
        .unwrap();
    let poison = bed.job("aclpois1-p", "kim");
    bed.submit(&poison).await;

    let mut cfg = bed.config(&[
        "--agent-command",
        &agent,
        "--max-deliveries",
        "1",
        "--output-ttl-seconds",
        "600",
    ]);
    cfg.redis.redis_url = user_url(&bed.redis, "repobox-operator", OPERATOR_PASSWORD).into();
    let stop = CancellationToken::new();
    let operator = tokio::spawn({
        let (client, stop) = (bed.client.clone(), stop.clone());
        async move { repobox_operator::app::run_with_client(cfg, client, stop).await }
    });

    // The poison entry is dead-lettered and its job failed (the injected faults are all its
    // own: nothing else is submitted until then). No event to await in Redis: bounded polling.
    let mut failed = false;
    for _ in 0..1000 {
        let rec = bed.record(&poison.id).await;
        if rec.get("status").map(String::as_str) == Some("failed") {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        failed,
        "the poison job was failed through the operator user"
    );
    let dead: usize = bed.con.xlen("jobs:stream:dead").await.unwrap();
    assert_eq!(dead, 1);

    let ok = bed.job("acljob02-o", "user@example.com");
    bed.submit(&ok).await;
    let name = object_name(&ok.id);
    bed.wait_phase(&name, RepoboxJobPhase::Running).await;
    bed.eventually_counter("user@example.com", "1").await;
    bed.eventually_counter("ghost", "0").await;
    gate.open();
    bed.wait_phase(&name, RepoboxJobPhase::Succeeded).await;
    let ttl: i64 = bed.con.ttl(format!("job:{}:output", ok.id)).await.unwrap();
    assert!((1..=600).contains(&ttl), "output ttl {ttl}");
    assert_eq!(bed.record(&ok.id).await["status"], "success");
    stop.cancel();
    tokio::time::timeout(WAIT, operator)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        acl_refusals(&mut bed.con).await,
        Vec::<String>::new(),
        "the operator or a runner needed a command or key its ACL does not grant"
    );

    // The operator user never reads tokens, and has no admin commands.
    let mut op = redis::Client::open(user_url(&bed.redis, "repobox-operator", OPERATOR_PASSWORD))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for args in [
        &["HGETALL", "git_provider:user@example.com:gh"][..],
        &["KEYS", "*"],
        &["GET", "session:abc"],
        &["CONFIG", "GET", "*"],
        &["FLUSHALL"],
        &["ACL", "LIST"],
    ] {
        refused(&mut op, args).await;
    }
}

/// A CA, and a server certificate for 127.0.0.1 signed by it (openssl CLI).
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=repobox-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext",
    ]);
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

#[tokio::test]
async fn the_operator_trusts_a_private_redis_ca_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path());
    let port = repobox_testbed::free_port();
    let mut server = tokio::process::Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&ca)
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            "tls-Pa55",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server starts");
    let url = format!("rediss://:tls-Pa55@127.0.0.1:{port}/");
    let config = |ca: Option<&Path>| {
        let mut args = vec![
            "repobox-operator".to_owned(),
            "--redis-url".to_owned(),
            url.clone(),
        ];
        if let Some(ca) = ca {
            args.extend(["--redis-ca-file".to_owned(), ca.display().to_string()]);
        }
        <repobox_operator::config::Config as clap::Parser>::try_parse_from(args).unwrap()
    };

    // With the CA: PING over TLS (retried while the server starts: no readiness event).
    let cfg = config(Some(&ca));
    cfg.validate().unwrap();
    let client = repobox_operator::app::redis_client(&cfg).unwrap();
    let mut pong = None;
    for _ in 0..250 {
        if let Ok(mut con) = client.get_multiplexed_async_connection().await {
            pong = redis::cmd("PING")
                .query_async::<String>(&mut con)
                .await
                .ok();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pong.as_deref(), Some("PONG"));

    // Without it the system roots do not know the CA: the handshake fails.
    let untrusted = repobox_operator::app::redis_client(&config(None)).unwrap();
    let Err(err) = untrusted.get_multiplexed_async_connection().await else {
        panic!("a certificate from an unknown CA must be refused");
    };
    assert!(
        !err.to_string().contains("tls-Pa55"),
        "the password never reaches an error"
    );
    // A CA file that cannot be read names the setting, not the URL.
    let missing = config(Some(&dir.path().join("nope.crt")));
    let Err(err) = repobox_operator::app::redis_client(&missing) else {
        panic!("a missing CA file must be an error");
    };
    let err = err.to_string();
    assert!(
        err.contains("REDIS_CA_FILE") && !err.contains("tls-Pa55"),
        "{err}"
    );
    let _ = server.kill().await;
}
