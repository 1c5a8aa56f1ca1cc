//! What the agent's own container costs a job: the hand-off (runner → agent wrapper → agent →
//! exit frame) against spawning the agent directly, as the runner did before the split.
//!
//! For each iteration, on a one-file repository served over smart HTTP:
//! - `direct`: `sh -c <agent>` spawned and awaited from this process (the old in-process agent
//!   step, minus nothing);
//! - `split`: the runner with `AGENT_CONTAINER=true` and a separate `repobox-job-runner agent`
//!   process waiting in the hand-off directory, as the pod's two containers run; the runner's
//!   own "agent finished" duration is the agent step seen end to end (start file written →
//!   exit frame read);
//! - `install`: the init container's `repobox-job-runner install` (copy the binary, make the two
//!   shared directories).
//!
//! Reports medians. Goal: split − direct ≤ 50 ms per job (install included).
//!
//! Run: `cargo bench -p repobox-job-runner --bench handoff` (`BENCH_ITERATIONS`, default 15).

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
const AGENT: &str = "echo change >> BENCH.md";

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let exe = env!("CARGO_BIN_EXE_repobox-job-runner");
    let redis = RedisServer::start().await?;
    let git = GitHost::start(TOKEN).await?;
    git.create_repo("bench/small", &[("README.md", "# small\n")])?;
    let key = EncryptionKey::parse(KEY_HEX)?;
    let mut con = redis.connection().await;
    let tmp = tempfile::tempdir()?;

    let (mut direct, mut split, mut install, mut whole) = (vec![], vec![], vec![], vec![]);
    for i in 0..iterations {
        // The old way: the agent spawned directly in the work tree.
        let dir = tmp.path().join(format!("direct-{i}"));
        std::fs::create_dir_all(&dir)?;
        let start = Instant::now();
        let st = Command::new("/bin/sh")
            .arg("-c")
            .arg(AGENT)
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await?;
        direct.push(start.elapsed());
        anyhow::ensure!(st.status.success());

        // The init container.
        let work = tmp.path().join(format!("work-{i}"));
        let start = Instant::now();
        let st = Command::new(exe)
            .arg("install")
            .arg(tmp.path().join(format!("tools-{i}")))
            .arg(work.join("tree"))
            .arg(work.join("handoff"))
            .env("LOG_FORMAT", "text")
            .stderr(Stdio::null())
            .status()
            .await?;
        install.push(start.elapsed());
        anyhow::ensure!(st.success(), "install failed");

        // The split pod: agent wrapper waiting, runner handing over.
        let id = format!("h{i:07}-bench");
        let job = NewJob::new(
            &id,
            "bench-user",
            &git.url("bench/small"),
            "Benchmark change",
        );
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
        let agent = Command::new(exe)
            .arg("agent")
            .env_clear()
            .env("PATH", std::env::var("PATH")?)
            .env("HANDOFF_DIR", work.join("handoff"))
            .env("AGENT_COMMAND", AGENT)
            .env("LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let start = Instant::now();
        let out = Command::new(exe)
            .env_clear()
            .env("PATH", std::env::var("PATH")?)
            .env("HOME", tmp.path())
            .env("JOB_ID", &id)
            .env("REDIS_URL", redis.url())
            .env("ENCRYPTION_KEY", KEY_HEX)
            .env("TEMP_DIR", &work)
            .env("PRIVATE_DIR", tmp.path().join(format!("private-{i}")))
            .env("AGENT_CONTAINER", "true")
            .env("ALLOW_INSECURE_HTTP", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await?;
        whole.push(start.elapsed());
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "runner failed: {stderr}");
        agent.wait_with_output().await?;
        let step = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "agent finished")
            .and_then(|v| v["duration_ms"].as_u64())
            .context("no agent duration in the runner's log")?;
        split.push(Duration::from_millis(step));
    }
    let (d, s, ins, w) = (
        median(&mut direct),
        median(&mut split),
        median(&mut install),
        median(&mut whole),
    );
    println!("agent hand-off benchmark ({iterations} iterations, one-file repository)");
    println!(
        "  agent spawned directly (before the split) : {:>7.1} ms",
        ms(d)
    );
    println!(
        "  agent step through the hand-off           : {:>7.1} ms",
        ms(s)
    );
    println!(
        "  init container (install)                  : {:>7.1} ms",
        ms(ins)
    );
    println!(
        "  extra per job, hand-off + install (goal <= 50 ms): {:>7.1} ms",
        ms(s.saturating_sub(d) + ins)
    );
    println!(
        "  whole job through the split (clone..push) : {:>7.1} ms",
        ms(w)
    );
    Ok(())
}
