//! Executor benchmark: the real `repobox-job-runner` (release build) against plain git doing
//! the same work — shallow clone, branch, one change, commit, push — on a repository of
//! realistic size (2,000 files, 500 commits) served over smart HTTP with basic auth.
//!
//! Reports the median wall times and their ratio, the executor's peak RSS (its own `VmHWM`,
//! logged in its final line; git children excluded) and the stripped binary size.
//! Goals: ≤ 1.1× raw git, ≤ 16 MiB RSS, ≤ 10 MiB binary.
//!
//! Run: `cargo bench -p repobox-job-runner` (`BENCH_ITERATIONS`, default 7).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use repobox_contract::EncryptionKey;
use repobox_testbed::githost::GitHost;
use repobox_testbed::redis_server::RedisServer;
use repobox_testbed::webapp::{self, NewJob};
use tokio::process::Command;

const TOKEN: &str = "ghp_benchmarkTokenABCDEFGHIJKLMNOP";
const KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let exe = env!("CARGO_BIN_EXE_repobox-job-runner");
    let redis = RedisServer::start().await?;
    let git = GitHost::start(TOKEN).await?;
    let built = Instant::now();
    git.create_large_repo("bench/big", 2000, 500)?;
    eprintln!(
        "repository of 2000 files / 500 commits built in {:?}",
        built.elapsed()
    );
    let url = git.url("bench/big");
    let key = EncryptionKey::parse(KEY_HEX)?;
    let mut con = redis.connection().await;
    let tmp = tempfile::tempdir()?;

    // A GIT_ASKPASS script for the plain-git baseline.
    let askpass = tmp.path().join("askpass.sh");
    std::fs::write(
        &askpass,
        "#!/bin/sh\ncase \"$1\" in Username*) echo oauth2;; *) echo \"$TOKEN\";; esac\n",
    )?;
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;

    let mut runner_times = Vec::new();
    let mut git_times = Vec::new();
    let mut rss = Vec::new();
    for i in 0..iterations {
        // The executor.
        let id = format!("b{i:07}-bench");
        let job = NewJob::new(&id, "bench-user", &url, "Benchmark change");
        webapp::create_job(&mut con, &job).await?;
        webapp::create_provider(
            &mut con,
            "bench-user",
            &job.provider_id,
            &key,
            TOKEN,
            &git.base_url(),
        )
        .await?;
        let work = tmp.path().join(format!("runner-{i}"));
        let start = Instant::now();
        let out = Command::new(exe)
            .env_clear()
            .env("PATH", std::env::var("PATH")?)
            .env("HOME", tmp.path())
            .env("JOB_ID", &id)
            .env("REDIS_URL", redis.url())
            .env("ENCRYPTION_KEY", KEY_HEX)
            .env("TEMP_DIR", &work)
            .env("ALLOW_INSECURE_HTTP", "true")
            .env("AGENT_COMMAND", "echo change >> BENCH.md")
            .env(
                "LOG_LEVEL",
                std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await?;
        runner_times.push(start.elapsed());
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "runner failed: {stderr}");
        let peak = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "job finished")
            .and_then(|v| v["peak_rss_kib"].as_u64())
            .context("no peak_rss_kib in the final log line")?;
        rss.push(peak);
        if std::env::var_os("BENCH_LOG_LEVEL").is_some() {
            eprintln!("{stderr}");
        }

        // Plain git doing the same work.
        let dir = tmp.path().join(format!("raw-{i}"));
        std::fs::create_dir_all(&dir)?;
        let script = format!(
            "set -e; git clone -q --depth=1 -- {url} repo; cd repo; git checkout -q -b raw/{i}; \
             echo change >> BENCH.md; git add -A; git commit -q -m 'Benchmark change'; \
             git push -q origin refs/heads/raw/{i}:refs/heads/raw/{i}"
        );
        let start = Instant::now();
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .current_dir(&dir)
            .env_clear()
            .env("PATH", std::env::var("PATH")?)
            .env("HOME", tmp.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", &askpass)
            .env("TOKEN", TOKEN)
            .env("GIT_AUTHOR_NAME", "Bench")
            .env("GIT_AUTHOR_EMAIL", "bench@example.com")
            .env("GIT_COMMITTER_NAME", "Bench")
            .env("GIT_COMMITTER_EMAIL", "bench@example.com")
            .output()
            .await?;
        git_times.push(start.elapsed());
        anyhow::ensure!(
            out.status.success(),
            "raw git failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(&dir)?;
    }

    let runner = median(&mut runner_times);
    let raw = median(&mut git_times);
    rss.sort();
    let size = std::fs::metadata(exe)?.len();
    println!(
        "executor benchmark ({iterations} iterations, repository of 2000 files / 500 commits)"
    );
    println!(
        "  repobox-job-runner median wall time : {:>8.1} ms",
        runner.as_secs_f64() * 1e3
    );
    println!(
        "  plain git median wall time          : {:>8.1} ms",
        raw.as_secs_f64() * 1e3
    );
    println!(
        "  ratio (goal <= 1.10)                : {:>8.3}",
        runner.as_secs_f64() / raw.as_secs_f64()
    );
    println!(
        "  executor peak RSS, max (goal <= 16 MiB): {:>5.1} MiB",
        *rss.last().unwrap_or(&0) as f64 / 1024.0
    );
    println!(
        "  binary size, stripped (goal <= 10 MiB) : {:>5.1} MiB",
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
