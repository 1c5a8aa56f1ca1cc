//! The real `repobox-job-runner` binary against a real redis-server and a real git host
//! (bare repositories behind `git http-backend`, with basic-auth checks).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use repobox_contract::events::{Event, Follower, Step};
use repobox_contract::{EncryptionKey, JobStatus};
use repobox_testbed::forge::{AuthScheme, Fault, ForgeKind};
use repobox_testbed::githost::GitHost;
use repobox_testbed::redis_server::RedisServer;
use repobox_testbed::webapp::{self, NewJob};
use tokio::process::Command;

const TOKEN: &str = "ghp_1234567890abcdefghijTESTTOKEN";
const KEY_HEX: &str = "6f1c2a3b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

struct Fixture {
    redis: RedisServer,
    git: GitHost,
    key: EncryptionKey,
    tmp: tempfile::TempDir,
    con: MultiplexedConnection,
}

struct Run {
    code: i32,
    stderr: String,
}

impl Fixture {
    /// A git host that also serves the GitHub Enterprise API double (`/api/v3`).
    async fn new() -> Self {
        Self::with_forge(ForgeKind::GitHub).await
    }

    async fn with_forge(kind: ForgeKind) -> Self {
        let redis = RedisServer::start().await.unwrap();
        let git = GitHost::start_with_forge(TOKEN, kind).await.unwrap();
        git.create_repo(
            "acme/api",
            &[("README.md", "# api\n"), ("src/lib.rs", "pub fn f() {}\n")],
        )
        .unwrap();
        let con = redis.connection().await;
        Self {
            redis,
            git,
            key: EncryptionKey::parse(KEY_HEX).unwrap(),
            tmp: tempfile::tempdir().unwrap(),
            con,
        }
    }

    fn job(&self, id: &str) -> NewJob {
        NewJob::new(
            id,
            "user-1",
            &self.git.url("acme/api"),
            "Add a greeting file\n\nPlease.",
        )
    }

    async fn seed(&mut self, job: &NewJob, token: &str) {
        let base = self.git.base_url();
        self.seed_at(job, token, &base).await;
    }

    /// Seeds a job whose provider's host is `base_url`.
    async fn seed_at(&mut self, job: &NewJob, token: &str, base_url: &str) {
        let kind = self
            .git
            .forge()
            .map_or("github", |f| f.kind().provider_type());
        webapp::create_job(&mut self.con, job).await.unwrap();
        webapp::create_provider_of_type(
            &mut self.con,
            &job.user_id,
            &job.provider_id,
            &self.key,
            token,
            kind,
            base_url,
        )
        .await
        .unwrap();
    }

    fn work_dir(&self) -> PathBuf {
        self.tmp.path().join("work")
    }

    fn command(&self, job_id: &str, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_repobox-job-runner"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", self.tmp.path())
            .env("JOB_ID", job_id)
            .env("REDIS_URL", self.redis.url())
            .env("ENCRYPTION_KEY", KEY_HEX)
            .env("RUNNER_ID", "runner-test")
            .env("TEMP_DIR", self.work_dir())
            .env("ALLOW_INSECURE_HTTP", "true")
            .env("KILL_GRACE_SECONDS", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn run(&self, job_id: &str, env: &[(&str, &str)]) -> Run {
        self.run_cmd(self.command(job_id, env)).await
    }

    async fn run_cmd(&self, mut cmd: Command) -> Run {
        let out = cmd.output().await.unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn record(&mut self, job_id: &str) -> HashMap<String, String> {
        self.con.hgetall(format!("job:{job_id}")).await.unwrap()
    }

    async fn output(&mut self, job_id: &str) -> Vec<String> {
        self.con
            .lrange(format!("job:{job_id}:output"), 0, -1)
            .await
            .unwrap()
    }

    /// Every key and value in Redis, as text, to prove no secret landed there.
    async fn dump_redis(&mut self) -> String {
        let keys: Vec<String> = self.con.keys("*").await.unwrap();
        let mut all = String::new();
        for k in keys {
            let t: String = redis::cmd("TYPE")
                .arg(&k)
                .query_async(&mut self.con)
                .await
                .unwrap();
            let v = match t.as_str() {
                "hash" => format!(
                    "{:?}",
                    self.con
                        .hgetall::<_, HashMap<String, String>>(&k)
                        .await
                        .unwrap()
                ),
                "list" => format!(
                    "{:?}",
                    self.con.lrange::<_, Vec<String>>(&k, 0, -1).await.unwrap()
                ),
                "string" => self.con.get::<_, String>(&k).await.unwrap(),
                _ => String::new(),
            };
            all.push_str(&k);
            all.push_str(&v);
        }
        all
    }

    /// Asserts the token is in none of: Redis, the logs, the work tree (incl. .git/config).
    async fn assert_token_nowhere(&mut self, logs: &str) {
        assert!(
            !self.dump_redis().await.contains(TOKEN),
            "token found in redis"
        );
        assert!(!logs.contains(TOKEN), "token found in logs");
        assert!(!logs.contains(KEY_HEX), "key found in logs");
        let work = self.work_dir();
        if work.exists() {
            assert_file_tree_lacks(&work, TOKEN);
        }
        // Nor in anything the forge was sent (bodies, titles, paths, queries).
        if let Some(forge) = self.git.forge() {
            let seen = format!("{:?}{:?}", forge.requests(), forge.pull_requests());
            assert!(
                !seen.contains(TOKEN),
                "token sent to the forge outside its header"
            );
        }
    }
}

fn assert_file_tree_lacks(dir: &Path, needle: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            assert_file_tree_lacks(&path, needle);
        } else if meta.is_file()
            && let Ok(bytes) = std::fs::read(&path)
        {
            assert!(
                !String::from_utf8_lossy(&bytes).contains(needle),
                "token found in {}",
                path.display()
            );
        }
    }
}

fn is_iso_millis(s: &str) -> bool {
    s.len() == 24
        && s.ends_with('Z')
        && s.as_bytes()[19] == b'.'
        && s.parse::<jiff::Timestamp>().is_ok()
}

#[tokio::test]
async fn happy_path_pushes_the_branch_and_records_everything() {
    let mut f = Fixture::new().await;
    let job = f.job("a1b2c3d4e5f6");
    f.seed(&job, TOKEN).await;
    let agent = "printf 'hello from the agent\\n' > GREETING.md && echo \"agent saw: $REPOBOX_PROMPT_FILE\" && cat \"$REPOBOX_PROMPT_FILE\" | head -1";
    let run = f
        .run(
            &job.id,
            &[
                ("AGENT_COMMAND", agent),
                ("CLEANUP_AFTER_JOB", "false"),
                ("GIT_AUTHOR_NAME", "Repo Bot"),
                ("GIT_AUTHOR_EMAIL", "bot@example.com"),
            ],
        )
        .await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    let rec = f.record(&job.id).await;
    assert_eq!(rec["status"], "success", "{rec:?}");
    assert_eq!(rec["branch"], "repobox/a1b2c3d4");
    assert_eq!(rec["runnerId"], "runner-test");
    assert!(is_iso_millis(&rec["startedAt"]), "{}", rec["startedAt"]);
    assert!(is_iso_millis(&rec["finishedAt"]));
    assert!(!rec.contains_key("error"));

    let sha = f
        .git
        .branch_sha("acme/api", "repobox/a1b2c3d4")
        .expect("branch pushed");
    assert_eq!(rec["commitSha"], sha);
    assert_eq!(
        f.git.file_at("acme/api", &sha, "GREETING.md").as_deref(),
        Some("hello from the agent\n")
    );
    let msg = f.git.commit_message("acme/api", &sha).unwrap();
    assert!(msg.starts_with("Add a greeting file\n"), "{msg}");
    assert!(msg.contains("Repobox-Job: a1b2c3d4e5f6"), "{msg}");
    assert_eq!(
        f.git.commit_author("acme/api", &sha).unwrap(),
        "Repo Bot <bot@example.com>"
    );
    // The prompt file lives outside the work tree: it is not committed.
    assert_eq!(f.git.file_at("acme/api", &sha, "prompt.txt"), None);

    let out = f.output(&job.id).await;
    let text = out.join("\n");
    assert!(out[0].starts_with("==> Repobox job a1b2c3d4e5f6"), "{text}");
    assert!(text.contains("agent saw: "), "{text}");
    assert!(
        text.contains("Add a greeting file"),
        "the agent read the prompt file: {text}"
    );
    assert!(
        out.last()
            .unwrap()
            .starts_with("==> Done: pushed repobox/a1b2c3d4"),
        "{text}"
    );

    // git asks for credentials only after a 401; every other request was authorized.
    let reqs = f.git.requests();
    assert!(
        reqs.iter().all(|r| r.authorized || r.status == 401),
        "{reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.authorized && r.path.ends_with("git-receive-pack"))
    );
    // The remote URL on disk has no credentials.
    let repo = std::fs::read_dir(f.work_dir())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // The git directory is the runner's, outside the work tree; its remote URL has no
    // credentials and the tree has no `.git` for an agent to steer.
    let config = std::fs::read_to_string(repo.join("private/repo.git/config")).unwrap();
    assert!(config.contains(&f.git.url("acme/api")), "{config}");
    assert!(!repo.join("tree/.git").exists());
    f.assert_token_nowhere(&run.stderr).await;

    // JSON logs with the job's context.
    let started = run
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "job started")
        .unwrap_or_else(|| panic!("no 'job started' JSON log line in {}", run.stderr));
    let span = &started["spans"][0];
    assert_eq!(span["job_id"], "a1b2c3d4e5f6");
    assert_eq!(span["runner_id"], "runner-test");
    assert_eq!(span["user_id"], "user-1");
}

#[tokio::test]
async fn no_changes_succeeds_without_a_push_and_cleans_up() {
    let mut f = Fixture::new().await;
    let job = f.job("nochange1");
    f.seed(&job, TOKEN).await;
    let run = f.run(&job.id, &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let rec = f.record(&job.id).await;
    assert_eq!(rec["status"], "success");
    assert!(
        !rec.contains_key("branch") && !rec.contains_key("commitSha"),
        "{rec:?}"
    );
    assert_eq!(f.git.branches("acme/api"), ["main"]);
    assert!(
        f.git
            .requests()
            .iter()
            .all(|r| !r.path.ends_with("git-receive-pack"))
    );
    let out = f.output(&job.id).await;
    assert!(out.last().unwrap().contains("no changes"), "{out:?}");
    // CLEANUP_AFTER_JOB defaults to true: the work tree is gone.
    assert_eq!(std::fs::read_dir(f.work_dir()).unwrap().count(), 0);
    f.assert_token_nowhere(&run.stderr).await;
}

async fn expect_failure(
    f: &mut Fixture,
    job_id: &str,
    env: &[(&str, &str)],
    error_starts: &str,
) -> Run {
    let run = f.run(job_id, env).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    let rec = f.record(job_id).await;
    assert_eq!(rec["status"], "failed", "{rec:?}");
    assert!(
        rec["error"].starts_with(error_starts),
        "error was: {}",
        rec["error"]
    );
    assert!(!rec["error"].contains('\n'));
    assert!(is_iso_millis(&rec["finishedAt"]));
    let out = f.output(job_id).await;
    assert_eq!(
        out.last().unwrap(),
        &format!("==> Failed: {}", rec["error"])
    );
    f.assert_token_nowhere(&run.stderr).await;
    run
}

#[tokio::test]
async fn wrong_token_is_an_authentication_failure() {
    let mut f = Fixture::new().await;
    let job = f.job("wrongtok");
    f.seed(&job, "ghp_thisIsNotTheRightTokenAtAll").await;
    let run = expect_failure(
        &mut f,
        &job.id,
        &[],
        "authentication failed for http://127.0.0.1",
    )
    .await;
    assert!(
        !f.dump_redis()
            .await
            .contains("ghp_thisIsNotTheRightTokenAtAll")
    );
    assert!(!run.stderr.contains("ghp_thisIsNotTheRightTokenAtAll"));
    assert!(f.git.requests().iter().any(|r| r.status == 401));
}

#[tokio::test]
async fn unknown_repository_is_reported() {
    let mut f = Fixture::new().await;
    let mut job = f.job("norepo");
    job.repo_url = f.git.url("acme/missing");
    f.seed(&job, TOKEN).await;
    expect_failure(
        &mut f,
        &job.id,
        &[],
        "repository not found: http://127.0.0.1",
    )
    .await;
}

#[tokio::test]
async fn missing_job_hash_exits_non_zero_and_writes_nothing() {
    let mut f = Fixture::new().await;
    let run = f.run("ghost", &[]).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr.contains("job:ghost does not exist"),
        "{}",
        run.stderr
    );
    let keys: Vec<String> = f.con.keys("*").await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn missing_provider_is_reported() {
    let mut f = Fixture::new().await;
    let job = f.job("noprov");
    webapp::create_job(&mut f.con, &job).await.unwrap();
    expect_failure(
        &mut f,
        &job.id,
        &[],
        "git provider `github-1` not found for user `user-1`",
    )
    .await;
    assert!(
        f.git.requests().is_empty(),
        "no git traffic without a token"
    );
}

#[tokio::test]
async fn tampered_ciphertext_and_wrong_key_fail_decryption() {
    let mut f = Fixture::new().await;
    let job = f.job("tamper");
    f.seed(&job, TOKEN).await;
    let pkey = "git_provider:user-1:github-1";
    let env: String = f.con.hget(pkey, "encryptedToken").await.unwrap();
    let mut parts: Vec<String> = env.split(':').map(str::to_owned).collect();
    parts[2] = parts[2].chars().rev().collect();
    let _: () = f
        .con
        .hset(pkey, "encryptedToken", parts.join(":"))
        .await
        .unwrap();
    expect_failure(&mut f, &job.id, &[], "token decryption failed").await;

    let job2 = f.job("wrongkey");
    f.seed(&job2, TOKEN).await;
    let other_key = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
    expect_failure(&mut f, &job2.id, &[("ENCRYPTION_KEY", other_key)], "token decryption failed: encrypted token could not be decrypted: wrong ENCRYPTION_KEY or tampered ciphertext").await;
}

#[tokio::test]
async fn bad_key_formats_exit_before_touching_the_job() {
    let mut f = Fixture::new().await;
    let job = f.job("badkey");
    f.seed(&job, TOKEN).await;
    for bad in [
        "short",
        "zz".repeat(32).as_str(),
        "dGhpcyBpcyBub3QgMzIgYnl0ZXM=",
    ] {
        let run = f.run(&job.id, &[("ENCRYPTION_KEY", bad)]).await;
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(run.stderr.contains("ENCRYPTION_KEY"), "{}", run.stderr);
        assert!(
            !run.stderr.contains(bad),
            "the bad value is not echoed: {}",
            run.stderr
        );
        assert_eq!(f.record(&job.id).await["status"], "pending");
    }
    // Base64 and raw forms of a valid key work; so does a key file.
    let key_file = f.tmp.path().join("key");
    std::fs::write(&key_file, format!("{KEY_HEX}\n")).unwrap();
    let mut cmd = f.command(
        &job.id,
        &[("ENCRYPTION_KEY_FILE", key_file.to_str().unwrap())],
    );
    cmd.env_remove("ENCRYPTION_KEY");
    let out = cmd.output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(f.record(&job.id).await["status"], "success");
    assert!(f.output(&job.id).await.len() > 1);
}

#[tokio::test]
async fn base_branch_is_cloned_and_branched_from() {
    let mut f = Fixture::new().await;
    f.git
        .create_branch("acme/api", "develop", &[("DEV.md", "dev only\n")])
        .unwrap();
    let mut job = f.job("basebr01");
    job.base_branch = Some("develop".into());
    f.seed(&job, TOKEN).await;
    let run = f
        .run(&job.id, &[("AGENT_COMMAND", "echo change >> DEV.md")])
        .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let sha = f.git.branch_sha("acme/api", "repobox/basebr01").unwrap();
    assert_eq!(
        f.git.file_at("acme/api", &sha, "DEV.md").as_deref(),
        Some("dev only\nchange\n")
    );
    let develop = f.git.branch_sha("acme/api", "develop").unwrap();
    assert_eq!(
        f.git.rev_parse("acme/api", &format!("{sha}^")).unwrap(),
        develop
    );

    let mut job = f.job("basebr02");
    job.base_branch = Some("nope".into());
    f.seed(&job, TOKEN).await;
    expect_failure(&mut f, &job.id, &[], "base branch `nope` not found").await;
}

#[tokio::test]
async fn failing_agent_fails_the_job_without_a_push() {
    let mut f = Fixture::new().await;
    let job = f.job("agentfail");
    f.seed(&job, TOKEN).await;
    let run = expect_failure(
        &mut f,
        &job.id,
        &[(
            "AGENT_COMMAND",
            "echo trying; echo broken >&2; touch x; exit 7",
        )],
        "agent exited with code 7",
    )
    .await;
    assert_eq!(run.code, 1);
    let out = f.output(&job.id).await;
    assert!(
        out.contains(&"trying".to_owned()) && out.contains(&"broken".to_owned()),
        "{out:?}"
    );
    assert_eq!(f.git.branches("acme/api"), ["main"]);
}

#[tokio::test]
async fn the_agent_never_sees_the_token_or_the_key() {
    let mut f = Fixture::new().await;
    let job = f.job("agentenv");
    f.seed(&job, TOKEN).await;
    let run = f
        .run(
            &job.id,
            &[
                ("AGENT_COMMAND", "env | sort > ../agent-env.txt"),
                ("CLEANUP_AFTER_JOB", "false"),
            ],
        )
        .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let work = std::fs::read_dir(f.work_dir())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let env = std::fs::read_to_string(work.join("agent-env.txt")).unwrap();
    // The prompt arrives as a file only (no size limit from execve).
    assert!(!env.contains("REPOBOX_PROMPT="), "{env}");
    let prompt_file = env
        .lines()
        .find_map(|l| l.strip_prefix("REPOBOX_PROMPT_FILE="))
        .expect("REPOBOX_PROMPT_FILE is set");
    assert_eq!(
        std::fs::read_to_string(prompt_file).unwrap(),
        "Add a greeting file\n\nPlease."
    );
    assert!(env.contains("REPOBOX_JOB_ID=agentenv"));
    for secret in [
        TOKEN,
        KEY_HEX,
        "ENCRYPTION_KEY",
        "REDIS_URL",
        "REPOBOX_GIT_TOKEN",
    ] {
        assert!(!env.contains(secret), "{secret} leaked to the agent");
    }
}

#[tokio::test]
async fn branch_already_on_the_remote_and_rejected_push_are_reported() {
    let mut f = Fixture::new().await;
    f.git
        .create_branch_at("acme/api", "repobox/exists01", "main")
        .unwrap();
    let job = f.job("exists01xyz");
    f.seed(&job, TOKEN).await;
    expect_failure(
        &mut f,
        &job.id,
        &[("AGENT_COMMAND", "touch y")],
        "branch repobox/exists01 already exists on the remote",
    )
    .await;

    f.git
        .reject_pushes("acme/api", "pushes to this repository are frozen")
        .unwrap();
    let job = f.job("rejected1");
    f.seed(&job, TOKEN).await;
    expect_failure(
        &mut f,
        &job.id,
        &[("AGENT_COMMAND", "touch z")],
        "push rejected by http://127.0.0.1",
    )
    .await;
    let err = f.record(&job.id).await["error"].clone();
    assert!(
        err.ends_with("pushes to this repository are frozen"),
        "{err}"
    );
}

#[tokio::test]
async fn output_is_capped_with_one_truncation_line() {
    let mut f = Fixture::new().await;
    let job = f.job("capped");
    f.seed(&job, TOKEN).await;
    let run = f
        .run(&job.id, &[("AGENT_COMMAND", "i=0; while [ $i -lt 2000 ]; do echo \"line $i of agent output\"; i=$((i+1)); done"), ("OUTPUT_MAX_BYTES", "4096")])
        .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = f.output(&job.id).await;
    let bytes: usize = out.iter().map(|l| l.len() + 1).sum();
    assert!(bytes <= 4096 + 200, "{bytes} bytes");
    let notices: Vec<_> = out
        .iter()
        .filter(|l| l.starts_with("==> Output truncated"))
        .collect();
    assert_eq!(notices.len(), 1, "{out:?}");
    assert_eq!(out.last().unwrap(), notices[0], "nothing after the notice");
    assert_eq!(f.record(&job.id).await["status"], "success");
}

#[tokio::test]
async fn output_is_flushed_in_batches_while_the_job_runs() {
    let mut f = Fixture::new().await;
    let job = f.job("streaming");
    f.seed(&job, TOKEN).await;
    // The agent waits until the first line it printed is visible in Redis: that only
    // happens if the sink flushes on its timer, not at exit.
    let redis_cli = format!(
        "echo marker-1; until redis-cli -p {} lrange job:streaming:output 0 -1 | grep -q marker-1; do sleep 0.05; done; echo marker-2",
        f.redis.port()
    );
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        f.run(
            &job.id,
            &[("AGENT_COMMAND", &redis_cli), ("OUTPUT_FLUSH_MS", "50")],
        ),
    )
    .await
    .expect("the first batch reached Redis before the agent ended");
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = f.output(&job.id).await;
    let i1 = out.iter().position(|l| l == "marker-1").unwrap();
    let i2 = out.iter().position(|l| l == "marker-2").unwrap();
    assert!(i1 < i2);
}

#[tokio::test]
async fn terminal_jobs_are_not_run_again() {
    let mut f = Fixture::new().await;
    for status in ["success", "failed", "cancelled"] {
        let job = f.job(&format!("term-{status}"));
        f.seed(&job, TOKEN).await;
        let _: () = f
            .con
            .hset(format!("job:{}", job.id), "status", status)
            .await
            .unwrap();
        let before = f.record(&job.id).await;
        let run = f.run(&job.id, &[("AGENT_COMMAND", "touch x")]).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(f.record(&job.id).await, before);
        assert!(f.output(&job.id).await.is_empty());
    }
    assert!(f.git.requests().is_empty());
}

#[tokio::test]
async fn two_runners_racing_for_one_job_push_once() {
    let mut f = Fixture::new().await;
    let job = f.job("race0001");
    f.seed(&job, TOKEN).await;
    let env = [("AGENT_COMMAND", "echo raced > RACE.md")];
    let a = f
        .command(&job.id, &env)
        .env("RUNNER_ID", "runner-a")
        .output();
    let b = f
        .command(&job.id, &env)
        .env("RUNNER_ID", "runner-b")
        .output();
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.status.code(), Some(0));
    assert_eq!(b.status.code(), Some(0));
    let rec = f.record(&job.id).await;
    assert_eq!(rec["status"], "success");
    let winner = rec["runnerId"].clone();
    assert!(winner == "runner-a" || winner == "runner-b");
    let loser_log = if winner == "runner-a" {
        &b.stderr
    } else {
        &a.stderr
    };
    // The loser either found the job running or, if it came late, already finished.
    let loser_log = String::from_utf8_lossy(loser_log);
    assert!(
        loser_log.contains("already running elsewhere") || loser_log.contains("already finished"),
        "{loser_log}"
    );
    let pushes = f
        .git
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("git-receive-pack"))
        .count();
    assert_eq!(pushes, 1);
    let out = f.output(&job.id).await;
    assert_eq!(
        out.iter()
            .filter(|l| l.starts_with("==> Repobox job"))
            .count(),
        1,
        "{out:?}"
    );
}

#[tokio::test]
async fn sigterm_mid_clone_stops_git_and_leaves_the_status_to_the_operator() {
    let mut f = Fixture::new().await;
    // A "git host" that accepts the connection and never answers: the clone hangs.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut job = f.job("sigterm1");
    let base = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    job.repo_url = format!("{base}/acme/api.git");
    f.seed_at(&job, TOKEN, &base).await;
    let child = f.command(&job.id, &[]).spawn().unwrap();
    let pid = child.id().unwrap() as i32;
    // The clone is in flight once git has connected.
    let (_conn, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .unwrap()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("exits well within the grace period")
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = f.record(&job.id).await;
    assert_eq!(
        rec["status"], "running",
        "the operator records the terminal status"
    );
    let lines = f.output(&job.id).await;
    assert!(
        lines.last().unwrap().starts_with("==> Stopped:"),
        "{lines:?}"
    );
    assert_eq!(
        std::fs::read_dir(f.work_dir()).unwrap().count(),
        0,
        "work tree cleaned up"
    );
    f.assert_token_nowhere(&String::from_utf8_lossy(&out.stderr))
        .await;
}

#[tokio::test]
async fn redis_password_and_urls_never_reach_the_logs() {
    let redis = RedisServer::start_with_password("s3cret-redis-pass")
        .await
        .unwrap();
    let mut f = Fixture::new().await;
    f.con = redis.connection().await;
    let job = f.job("redispw1");
    f.seed(&job, TOKEN).await;
    let run = f.run(&job.id, &[("REDIS_URL", &redis.url())]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stderr.contains("s3cret-redis-pass"));
    assert_eq!(f.record(&job.id).await["status"], "success");
}

// ----- The agent in its own container (as in a pod): two processes, one hand-off directory -----

impl Fixture {
    /// The runner as the pod's `runner` container starts it: the agent runs elsewhere.
    fn pod_runner(&self, job_id: &str, env: &[(&str, &str)]) -> Command {
        let mut cmd = self.command(job_id, env);
        cmd.env("AGENT_CONTAINER", "true")
            .env("PRIVATE_DIR", self.tmp.path().join("private"));
        cmd
    }

    /// The agent container's entrypoint: only its own environment (no Redis URL, no key).
    fn pod_agent(&self, command: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_repobox-job-runner"));
        cmd.arg("agent")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", self.tmp.path().join("agent-home"))
            .env("HANDOFF_DIR", self.work_dir().join("handoff"))
            .env("AGENT_COMMAND", command)
            .env("AGENT_API_KEY", "agent-own-secret")
            .env("LOG_FORMAT", "text")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }
}

/// Waits for a file a child process creates (the agent's "I am running" marker).
async fn wait_for_file(path: &Path) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} never appeared", path.display()));
}

#[tokio::test]
async fn the_agent_in_its_own_container_gets_the_tree_and_streams_back() {
    let mut f = Fixture::new().await;
    let job = f.job("podsplit1");
    f.seed(&job, TOKEN).await;
    std::fs::create_dir_all(f.tmp.path().join("agent-home")).unwrap();
    // The agent container may start first: it waits for the checkout.
    let agent = f
        .pod_agent("echo \"agent in $PWD\"; env | sort > \"$HOME/env.txt\"; echo split > SPLIT.md; echo to-stderr >&2")
        .spawn()
        .unwrap();
    let runner = f.pod_runner(&job.id, &[]).output().await.unwrap();
    let agent = agent.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&runner.stderr);
    assert_eq!(runner.status.code(), Some(0), "{stderr}");
    assert_eq!(
        agent.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&agent.stderr)
    );
    let rec = f.record(&job.id).await;
    assert_eq!(rec["status"], "success", "{rec:?}");
    let sha = f.git.branch_sha("acme/api", "repobox/podsplit").unwrap();
    assert_eq!(
        f.git.file_at("acme/api", &sha, "SPLIT.md").as_deref(),
        Some("split\n")
    );
    let out = f.output(&job.id).await.join("\n");
    assert!(
        out.contains("agent in ") && out.contains("/work/tree"),
        "{out}"
    );
    assert!(out.contains("to-stderr"), "stderr lines stream too: {out}");
    // The agent's environment is its own plus the hand-off variables, never the runner's.
    let env = std::fs::read_to_string(f.tmp.path().join("agent-home/env.txt")).unwrap();
    assert!(env.contains("AGENT_API_KEY=agent-own-secret"), "{env}");
    assert!(env.contains("REPOBOX_PROMPT_FILE="), "{env}");
    for leaked in [
        "REDIS_URL",
        "ENCRYPTION_KEY",
        TOKEN,
        KEY_HEX,
        "HANDOFF_DIR",
        "AGENT_COMMAND",
    ] {
        assert!(!env.contains(leaked), "{leaked} reached the agent: {env}");
    }
    // The git directory is the runner's private one, outside the shared work volume.
    assert!(!f.work_dir().join("tree/.git").exists());
    f.assert_token_nowhere(&stderr).await;
}

#[tokio::test]
async fn an_agent_container_that_never_starts_fails_the_job_with_the_reason() {
    let mut f = Fixture::new().await;
    let job = f.job("podnostart");
    f.seed(&job, TOKEN).await;
    let run = f
        .run_cmd(f.pod_runner(&job.id, &[("AGENT_START_TIMEOUT_SECONDS", "1")]))
        .await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    let rec = f.record(&job.id).await;
    assert_eq!(rec["status"], "failed");
    assert_eq!(
        rec["error"],
        "the agent container did not start within 1 s (is its image pullable?)"
    );
    assert_eq!(f.git.branch_sha("acme/api", "repobox/podnosta"), None);
}

#[tokio::test]
async fn an_agent_killed_mid_run_fails_the_job_and_pushes_nothing() {
    let mut f = Fixture::new().await;
    let job = f.job("podkilled");
    f.seed(&job, TOKEN).await;
    let marker = f.tmp.path().join("agent-started");
    let agent = f
        .pod_agent(&format!(
            "echo half > HALF.md; touch {}; sleep 60",
            marker.display()
        ))
        .spawn()
        .unwrap();
    let agent_pid = agent.id().unwrap() as i32;
    let runner = f.pod_runner(&job.id, &[]).spawn().unwrap();
    // The OOM killer's way: SIGKILL, no chance to report.
    wait_for_file(&marker).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), runner.wait_with_output())
        .await
        .expect("the runner notices the agent is gone")
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = f.record(&job.id).await;
    assert_eq!(rec["status"], "failed");
    assert!(
        rec["error"].contains("the agent stopped before it finished"),
        "{rec:?}"
    );
    assert_eq!(
        f.git.branch_sha("acme/api", "repobox/podkille"),
        None,
        "nothing pushed"
    );
}

#[tokio::test]
async fn the_agent_stops_when_the_runner_dies() {
    let mut f = Fixture::new().await;
    let job = f.job("podrunnerdies");
    f.seed(&job, TOKEN).await;
    let marker = f.tmp.path().join("agent-started");
    let agent = f
        .pod_agent(&format!("touch {}; sleep 60", marker.display()))
        .spawn()
        .unwrap();
    let runner = f.pod_runner(&job.id, &[]).spawn().unwrap();
    wait_for_file(&marker).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runner.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), agent.wait_with_output())
        .await
        .expect("the agent wrapper ends with its runner, not after its own 60 s")
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_repository_on_another_host_than_the_providers_is_refused_before_the_token_is_used() {
    let mut f = Fixture::new().await;
    let other = GitHost::start("other-host-token").await.unwrap();
    other
        .create_repo("evil/sink", &[("README.md", "x\n")])
        .unwrap();
    let mut job = f.job("hostcheck1");
    job.repo_url = format!("{}?token=abc#frag", other.url("evil/sink"));
    f.seed(&job, TOKEN).await;
    let run = f.run(&job.id, &[("AGENT_COMMAND", "touch x")]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    let rec = f.record(&job.id).await;
    assert_eq!(rec["status"], "failed");
    assert_eq!(
        rec["error"],
        format!(
            "repository host `127.0.0.1:{}` is not the git provider's host `127.0.0.1:{}`: the token is only sent to its own provider",
            other.port(),
            f.git.port()
        )
    );
    assert!(
        other.requests().is_empty(),
        "no request reached the other host"
    );
    assert!(
        !run.stderr.contains("token=abc"),
        "query strings never reach the logs"
    );
    assert!(!f.output(&job.id).await.join("\n").contains("token=abc"));
}

#[tokio::test]
async fn a_prompt_too_large_for_the_limit_fails_clearly_and_nul_bytes_are_fine() {
    let mut f = Fixture::new().await;
    let mut job = f.job("bigprompt1");
    job.prompt = "x".repeat(repobox_job_runner::run::MAX_PROMPT_BYTES + 1);
    f.seed(&job, TOKEN).await;
    let run = f.run(&job.id, &[("AGENT_COMMAND", "touch x")]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(
        f.record(&job.id).await["error"],
        format!(
            "the prompt is {} bytes; the limit is {} bytes",
            repobox_job_runner::run::MAX_PROMPT_BYTES + 1,
            repobox_job_runner::run::MAX_PROMPT_BYTES
        )
    );
    // 200 KiB with a NUL: more than execve takes in one variable, fine as a file.
    let mut job = f.job("bigprompt2");
    job.prompt = format!("line one\n{}\0tail", "y".repeat(200 * 1024));
    f.seed(&job, TOKEN).await;
    let run = f
        .run(
            &job.id,
            &[(
                "AGENT_COMMAND",
                "wc -c < \"$REPOBOX_PROMPT_FILE\" > SIZE.txt",
            )],
        )
        .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let sha = f.git.branch_sha("acme/api", "repobox/bigpromp").unwrap();
    assert_eq!(
        f.git.file_at("acme/api", &sha, "SIZE.txt").unwrap().trim(),
        (job.prompt.len()).to_string()
    );
}

/// A subscription to the job's events, confirmed by the server before it is returned.
async fn subscribe_events(redis: &RedisServer, job_id: &str) -> redis::aio::PubSub {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(repobox_contract::keys::job_events(job_id))
        .await
        .unwrap();
    pubsub
}

/// Waits (bounded) for an event that satisfies `want`, passing over the others.
async fn await_event(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    what: &str,
    want: impl Fn(&Event) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(ev) = events.recv().await {
            if want(&ev) {
                return;
            }
        }
        panic!("the events ended before {what}");
    })
    .await
    .unwrap_or_else(|_| panic!("no event with {what} within 60 s"));
}

fn has_line(ev: &Event, line: &str) -> bool {
    matches!(ev, Event::Output { lines, .. } if lines.iter().any(|l| l == line))
}

#[tokio::test]
async fn live_events_carry_every_line_once_in_order_and_a_late_subscriber_resumes_from_the_list() {
    let mut f = Fixture::new().await;
    let job = f.job("events01e5f6");
    f.seed(&job, TOKEN).await;
    let gate = f.tmp.path().join("gate");
    // 120 lines, a wait for the test, 80 more lines; one of them is the token, which the
    // runner masks before it leaves the process in any form.
    let agent = format!(
        "i=0; while [ $i -lt 120 ]; do echo \"part1 $i\"; i=$((i+1)); done; \
         until [ -e '{}' ]; do sleep 0.02; done; \
         echo \"leak: $LEAK\"; i=0; while [ $i -lt 80 ]; do echo \"part2 $i\"; i=$((i+1)); done; \
         echo live > EVENTS.md",
        gate.display()
    );

    // Subscriber A: from before the job starts to its terminal status.
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let a = subscribe_events(&f.redis, &job.id).await;
    let collector = tokio::spawn(async move {
        let mut raw = Vec::new();
        let mut stream = a.into_on_message();
        while let Some(msg) = stream.next().await {
            let payload: String = msg.get_payload().unwrap();
            let ev = Event::parse(&payload).unwrap();
            let done = matches!(&ev, Event::Status { status, .. } if status.is_terminal());
            raw.push(payload);
            let _ = tx.send(ev);
            if done {
                break;
            }
        }
        raw
    });

    let mut cmd = f.command(
        &job.id,
        &[
            ("AGENT_COMMAND", &agent),
            ("AGENT_ENV", "LEAK"),
            ("LEAK", TOKEN),
            ("OUTPUT_FLUSH_MS", "50"),
        ],
    );
    let runner = cmd.spawn().unwrap();

    // Subscriber B joins mid-run, once part 1 is out; it reads the list only after part 2
    // started to flow, so some events it receives are already in what it read.
    await_event(&mut seen, "part1 119", |e| has_line(e, "part1 119")).await;
    let mut b = subscribe_events(&f.redis, &job.id).await;
    std::fs::write(&gate, "").unwrap();
    await_event(&mut seen, "part2 0", |e| has_line(e, "part2 0")).await;
    let history = f.output(&job.id).await;
    let status = f.record(&job.id).await.get("status").cloned();
    assert_eq!(status.as_deref(), Some("running"));
    let mut follower = Follower::new(history.len() as u64, JobStatus::parse("running"));
    let mut b_lines = history.clone();
    let mut skipped = 0;
    let mut b_stream = b.on_message();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), b_stream.next())
            .await
            .expect("B's events keep coming")
            .expect("B's subscription is open");
        let ev = Event::parse(&msg.get_payload::<String>().unwrap()).unwrap();
        match follower.apply(&ev) {
            Step::Lines(l) => b_lines.extend_from_slice(l),
            Step::Skip => skipped += 1,
            Step::Status(s, _) if s.is_terminal() => break,
            Step::Status(..) => {}
            Step::Gap { from, to } => panic!("B missed lines {from}..{to}"),
        }
    }

    let out = runner.wait_with_output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = tokio::time::timeout(Duration::from_secs(60), collector)
        .await
        .unwrap()
        .unwrap();
    let list = f.output(&job.id).await;
    let rec = f.record(&job.id).await;

    // A: the running status first, the success last, output in between.
    let events: Vec<Event> = raw.iter().map(|p| Event::parse(p).unwrap()).collect();
    let Some(Event::Status {
        seq: 0,
        status: JobStatus::Running,
        fields,
        ..
    }) = events.first()
    else {
        panic!(
            "the first event is `running` at seq 0: {:?}",
            events.first()
        )
    };
    assert_eq!(fields["runnerId"], "runner-test");
    assert_eq!(fields["startedAt"], rec["startedAt"]);
    let Some(Event::Status {
        seq,
        status: JobStatus::Success,
        fields,
        ..
    }) = events.last()
    else {
        panic!("the last event is `success`: {:?}", events.last())
    };
    assert_eq!(*seq, list.len() as u64, "the status follows every line");
    for k in ["finishedAt", "branch", "commitSha"] {
        assert_eq!(fields[k], rec[k], "{k}");
    }
    // Output events: contiguous seqs from 0, at most 50 lines each, exactly the list. (Any
    // status event between is a running job's progress, placed after the lines before it.)
    let mut a_lines: Vec<String> = Vec::new();
    for ev in &events[1..events.len() - 1] {
        match ev {
            Event::Output { seq, lines, .. } => {
                assert_eq!(*seq, a_lines.len() as u64, "no gap, no overlap");
                assert!(!lines.is_empty() && lines.len() <= 50, "{}", lines.len());
                a_lines.extend_from_slice(lines);
            }
            Event::Status { seq, status, .. } => {
                assert_eq!(*status, JobStatus::Running, "{ev:?}");
                assert_eq!(*seq, a_lines.len() as u64, "{ev:?}");
            }
        }
    }
    assert_eq!(a_lines, list, "every line once, in order");
    for part in [("part1", 120), ("part2", 80)] {
        for i in 0..part.1 {
            let line = format!("{} {i}", part.0);
            assert_eq!(a_lines.iter().filter(|l| **l == line).count(), 1, "{line}");
        }
    }
    assert!(events.len() > 6, "several batches: {}", events.len());

    // B: the list up to its read, then events, gives the same lines once.
    assert_eq!(
        b_lines, list,
        "the resume procedure loses and repeats nothing"
    );
    assert!(skipped >= 1, "B's read overlapped events it had received");
    assert!(history.iter().any(|l| l == "part2 0"));

    // Secrets: masked in the events as in the list.
    assert!(raw.iter().all(|p| !p.contains(TOKEN)), "token in an event");
    assert!(list.iter().any(|l| l == "leak: ghp_****OKEN"), "{list:?}");
    f.assert_token_nowhere(&String::from_utf8_lossy(&out.stderr))
        .await;
}

// ----- the pull / merge request after the push -----

const AGENT_CHANGE: &str = "printf 'hello\\n' > GREETING.md && echo more >> README.md";

/// Every API request went with the forge's documented header, the token and a User-Agent.
fn assert_api_auth(f: &Fixture, scheme: AuthScheme) {
    let reqs = f.git.forge().unwrap().requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert!(r.authorized && r.auth == scheme, "{r:?}");
        assert!(
            r.user_agent
                .as_deref()
                .is_some_and(|ua| ua.starts_with("repobox-job-runner/")),
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn a_pull_request_is_opened_on_github_after_the_push() {
    let mut f = Fixture::new().await;
    let job = f.job("prgh0001");
    f.seed(&job, TOKEN).await;
    let run = f.run(&job.id, &[("AGENT_COMMAND", AGENT_CHANGE)]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    let rec = f.record(&job.id).await;
    assert_eq!(rec["status"], "success", "{rec:?}");
    let forge = f.git.forge().unwrap().clone();
    let prs = forge.pull_requests();
    assert_eq!(prs.len(), 1, "{prs:?}");
    let pr = &prs[0];
    assert_eq!(
        (pr.project.as_str(), pr.head.as_str(), pr.base.as_str()),
        ("acme/api", "repobox/prgh0001", "main"),
        "the default branch, asked from the API"
    );
    assert_eq!(pr.title, "Add a greeting file");
    assert!(
        pr.body.starts_with("Add a greeting file\n\nPlease."),
        "{}",
        pr.body
    );
    assert!(
        pr.body.contains(&format!("commit {}", rec["commitSha"])),
        "{}",
        pr.body
    );
    assert!(
        pr.body
            .contains("- added `GREETING.md`\n- modified `README.md`\n"),
        "{}",
        pr.body
    );
    assert!(pr.body.contains("job `prgh0001`"), "{}", pr.body);
    assert_eq!(rec["prNumber"], "1");
    assert_eq!(rec["prUrl"], forge.web_url("acme/api", 1));
    assert!(!rec.contains_key("prError"), "{rec:?}");

    // GitHub Enterprise's API on the git host, Bearer token: repo, list, create.
    assert_api_auth(&f, AuthScheme::Bearer);
    let calls: Vec<(String, String, u16)> = forge
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.path.clone(), r.status))
        .collect();
    assert_eq!(
        calls,
        [
            ("GET".into(), "/api/v3/repos/acme/api".into(), 200),
            ("GET".into(), "/api/v3/repos/acme/api/pulls".into(), 200),
            ("POST".into(), "/api/v3/repos/acme/api/pulls".into(), 201),
        ]
    );
    let list = &forge.requests()[1];
    assert!(
        list.query
            .as_deref()
            .unwrap()
            .contains("head=acme%3Arepobox%2Fprgh0001"),
        "{list:?}"
    );

    let out = f.output(&job.id).await.join("\n");
    assert!(
        out.contains(&format!(
            "==> Opened pull request #1 into main: {}",
            rec["prUrl"]
        )),
        "{out}"
    );
    f.assert_token_nowhere(&run.stderr).await;
}

#[tokio::test]
async fn a_merge_request_is_opened_on_gitlab_into_the_base_branch() {
    let mut f = Fixture::with_forge(ForgeKind::GitLab).await;
    f.git
        .create_branch("acme/api", "develop", &[("DEV.md", "dev\n")])
        .unwrap();
    let mut job = f.job("prgl0001");
    job.base_branch = Some("develop".into());
    job.prompt = format!("{}\nsecond line", "t".repeat(150));
    f.seed(&job, TOKEN).await;
    let run = f.run(&job.id, &[("AGENT_COMMAND", AGENT_CHANGE)]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    let rec = f.record(&job.id).await;
    let forge = f.git.forge().unwrap().clone();
    let prs = forge.pull_requests();
    assert_eq!(prs.len(), 1, "{prs:?}");
    assert_eq!(
        (prs[0].head.as_str(), prs[0].base.as_str()),
        ("repobox/prgl0001", "develop")
    );
    // The title is the first line, bounded.
    assert_eq!(prs[0].title.chars().count(), 100);
    assert!(prs[0].title.ends_with('…'));
    assert_eq!(rec["prNumber"], "1");
    assert_eq!(rec["prUrl"], forge.web_url("acme/api", 1));
    assert!(rec["prUrl"].ends_with("/acme/api/-/merge_requests/1"));

    // PRIVATE-TOKEN, the project as one encoded segment; no default-branch call (base given).
    assert_api_auth(&f, AuthScheme::PrivateToken);
    let calls: Vec<(String, String)> = forge
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    assert_eq!(
        calls,
        [
            (
                "GET".into(),
                "/api/v4/projects/acme%2Fapi/merge_requests".into()
            ),
            (
                "POST".into(),
                "/api/v4/projects/acme%2Fapi/merge_requests".into()
            ),
        ]
    );
    let out = f.output(&job.id).await.join("\n");
    assert!(
        out.contains("==> Opened merge request !1 into develop"),
        "{out}"
    );
    f.assert_token_nowhere(&run.stderr).await;
}

#[tokio::test]
async fn a_lost_create_response_finds_the_request_instead_of_opening_a_second() {
    for kind in [ForgeKind::GitHub, ForgeKind::GitLab] {
        let mut f = Fixture::with_forge(kind).await;
        let job = f.job("lostresp");
        f.seed(&job, TOKEN).await;
        let forge = f.git.forge().unwrap().clone();
        // The forge creates the request, then the answer is lost (a 502 from a proxy); the
        // runner retries, is told it already exists (GitHub 422, GitLab 409), and finds it.
        forge.fail_next("POST", Fault::After(502));
        let run = f.run(&job.id, &[("AGENT_COMMAND", AGENT_CHANGE)]).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(forge.pull_requests().len(), 1, "{kind:?}");
        let posts: Vec<u16> = forge
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .map(|r| r.status)
            .collect();
        let conflict = if kind == ForgeKind::GitHub { 422 } else { 409 };
        assert_eq!(posts, [502, conflict], "{kind:?}");
        let rec = f.record(&job.id).await;
        assert_eq!(rec["prNumber"], "1", "{kind:?}");
        assert!(!rec.contains_key("prError"), "{rec:?}");
        let out = f.output(&job.id).await.join("\n");
        assert!(out.contains("==> Found the open "), "{out}");
        f.assert_token_nowhere(&run.stderr).await;
    }
}

#[tokio::test]
async fn an_open_request_of_the_branch_is_found_across_pages() {
    for kind in [ForgeKind::GitHub, ForgeKind::GitLab] {
        let mut f = Fixture::with_forge(kind).await;
        let job = f.job("pagedpr1");
        f.seed(&job, TOKEN).await;
        let forge = f.git.forge().unwrap().clone();
        // Three open requests for the head branch (an earlier attempt, retargeted copies), one
        // item per page: the runner pages until it finds the one into the default branch.
        forge.seed("acme/api", "repobox/pagedpr1", "release", "old");
        forge.seed("acme/api", "repobox/pagedpr1", "hotfix", "old");
        let main = forge.seed("acme/api", "repobox/pagedpr1", "main", "the one");
        forge.seed("acme/api", "someone/else", "main", "other");
        forge.set_max_per_page(1);
        let run = f.run(&job.id, &[("AGENT_COMMAND", AGENT_CHANGE)]).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        let rec = f.record(&job.id).await;
        assert_eq!(rec["prNumber"], main.to_string(), "{kind:?} {rec:?}");
        assert_eq!(rec["prUrl"], forge.web_url("acme/api", main));
        assert_eq!(forge.pull_requests().len(), 4, "nothing new opened");
        let lists = forge
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("s"))
            .count();
        assert!(lists >= 2, "{kind:?}: paged {lists} times");
        assert!(forge.requests().iter().all(|r| r.method != "POST"));
        f.assert_token_nowhere(&run.stderr).await;
    }
}

#[tokio::test]
async fn a_refused_request_keeps_the_pushed_branch_and_says_why() {
    let mut f = Fixture::new().await;
    let forge = f.git.forge().unwrap().clone();
    // The API no longer takes the token (git still does): 401 "Bad credentials".
    forge.set_token("ghp_someOtherTokenTheApiWants");
    let job = f.job("prerr001");
    f.seed(&job, TOKEN).await;
    let run = f.run(&job.id, &[("AGENT_COMMAND", AGENT_CHANGE)]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let rec = f.record(&job.id).await;
    assert_eq!(rec["status"], "success");
    assert_eq!(rec["branch"], "repobox/prerr001");
    assert!(f.git.branch_sha("acme/api", "repobox/prerr001").is_some());
    assert!(!rec.contains_key("prUrl") && !rec.contains_key("prNumber"));
    assert!(
        rec["prError"].starts_with("the GitHub API refused the token (401: Bad credentials)"),
        "{}",
        rec["prError"]
    );
    let out = f.output(&job.id).await;
    let text = out.join("\n");
    assert!(
        text.contains(&format!(
            "==> Could not open a pull request (the branch is pushed): {}",
            rec["prError"]
        )),
        "{text}"
    );
    assert!(
        out.last().unwrap().starts_with("==> Done: pushed"),
        "{text}"
    );

    // A server error is not retried blindly and is reported too.
    let job = f.job("prerr002");
    f.seed(&job, TOKEN).await;
    forge.set_token(TOKEN);
    forge.fail_next("POST", Fault::Before(500));
    let run = f.run(&job.id, &[("AGENT_COMMAND", AGENT_CHANGE)]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let rec = f.record(&job.id).await;
    assert_eq!(
        rec["prError"],
        "the GitHub API answered 500: injected failure"
    );
    f.assert_token_nowhere(&run.stderr).await;
}

#[tokio::test]
async fn requests_are_off_globally_per_job_and_without_changes() {
    let mut f = Fixture::new().await;
    let forge = f.git.forge().unwrap().clone();

    let job = f.job("proff001");
    f.seed(&job, TOKEN).await;
    let run = f
        .run(
            &job.id,
            &[
                ("AGENT_COMMAND", AGENT_CHANGE),
                ("OPEN_PULL_REQUESTS", "false"),
            ],
        )
        .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = f.output(&job.id).await.join("\n");
    assert!(
        out.contains("==> No pull request: turned off for this installation"),
        "{out}"
    );

    let mut job = f.job("proff002");
    job.open_pull_request = Some("false".into());
    f.seed(&job, TOKEN).await;
    let run = f.run(&job.id, &[("AGENT_COMMAND", AGENT_CHANGE)]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = f.output(&job.id).await.join("\n");
    assert!(
        out.contains("==> No pull request: turned off for this job"),
        "{out}"
    );

    // No changes: nothing pushed, so nothing to ask for.
    let job = f.job("proff003");
    f.seed(&job, TOKEN).await;
    let run = f.run(&job.id, &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    for id in ["proff001", "proff002", "proff003"] {
        let rec = f.record(id).await;
        assert_eq!(rec["status"], "success", "{id}");
        assert!(
            !rec.contains_key("prUrl") && !rec.contains_key("prError"),
            "{id}: {rec:?}"
        );
    }
    assert!(forge.requests().is_empty(), "{:?}", forge.requests());
    assert!(forge.pull_requests().is_empty());
}

#[tokio::test]
async fn git_and_the_api_trust_git_ssl_cainfo_over_https() {
    use repobox_testbed::tls_proxy::TlsProxy;
    let mut f = Fixture::new().await;
    let proxy = TlsProxy::start(f.git.port()).unwrap();
    let ca = f.tmp.path().join("git-ca.pem");
    std::fs::write(&ca, proxy.ca_pem()).unwrap();
    let mut job = f.job("tlspr001");
    job.repo_url = format!("{}/acme/api.git", proxy.base_url());
    f.seed_at(&job, TOKEN, &proxy.base_url()).await;
    let ca_s = ca.to_string_lossy().into_owned();
    // https only (no ALLOW_INSECURE_HTTP); the private CA is trusted through GIT_SSL_CAINFO,
    // by git and by the API client alike.
    let mut cmd = f.command(
        &job.id,
        &[
            ("AGENT_COMMAND", AGENT_CHANGE),
            ("GIT_SSL_CAINFO", ca_s.as_str()),
        ],
    );
    cmd.env_remove("ALLOW_INSECURE_HTTP");
    let run = f.run_cmd(cmd).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let rec = f.record(&job.id).await;
    assert_eq!(rec["status"], "success", "{rec:?}");
    assert_eq!(rec["prNumber"], "1", "{rec:?}");
    let forge = f.git.forge().unwrap().clone();
    assert_eq!(forge.pull_requests()[0].head, "repobox/tlspr001");
    assert_api_auth(&f, AuthScheme::Bearer);

    // Without the CA the same job fails at the first TLS handshake (git's clone).
    let mut job = f.job("tlspr002");
    job.repo_url = format!("{}/acme/api.git", proxy.base_url());
    f.seed_at(&job, TOKEN, &proxy.base_url()).await;
    let mut cmd = f.command(&job.id, &[("AGENT_COMMAND", AGENT_CHANGE)]);
    cmd.env_remove("ALLOW_INSECURE_HTTP");
    let run = f.run_cmd(cmd).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(forge.pull_requests().len(), 1);
    f.assert_token_nowhere(&run.stderr).await;
}
