//! `repobox-job-runner agent`: the agent container's entrypoint (and, for local runs, a child
//! the runner starts itself).
//!
//! It waits in the hand-off directory until the runner says the checkout is ready, runs
//! `AGENT_COMMAND` with `sh -c` in the work tree, sends every output line and the exit status
//! back through the FIFO, and stops the command when the runner goes away or a signal comes.
//! It holds nothing secret: its environment is the agent's own.
//!
//! Settings (environment): `HANDOFF_DIR` (required), `AGENT_COMMAND` (required),
//! `KILL_GRACE_SECONDS` (default 5), `AGENT_WAIT_SECONDS` (how long to wait for the runner to
//! appear at all; default 600).

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use repobox_contract::runner_env as env;

use crate::handoff::{self, Frame, Lock, Start};
use crate::output::OutputHandle;
use crate::process::{self, Stdout};

/// The wrapper's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `HANDOFF_DIR`: the hand-off directory shared with the runner container.
    pub handoff_dir: PathBuf,
    /// `AGENT_COMMAND`: the agent command, run by `sh -c` in the work tree.
    pub command: String,
    /// `KILL_GRACE_SECONDS`: between SIGTERM and SIGKILL when the command must stop.
    pub kill_grace: Duration,
    /// `AGENT_WAIT_SECONDS`: how long to wait for the runner to appear at all.
    pub wait_for_runner: Duration,
}

impl AgentConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, crate::config::ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `get` (the environment in production, a map in tests).
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, crate::config::ConfigError> {
        let get = |n: &str| get(n).filter(|v| !v.trim().is_empty());
        let missing = |setting| crate::config::ConfigError {
            setting,
            problem: "is required".into(),
        };
        let secs =
            |setting: &'static str, default: u64| match get(setting) {
                None => Ok(Duration::from_secs(default)),
                Some(v) => v.trim().parse().map(Duration::from_secs).map_err(|_| {
                    crate::config::ConfigError {
                        setting,
                        problem: format!("must be a non-negative integer, not `{v}`"),
                    }
                }),
            };
        Ok(Self {
            handoff_dir: get(env::HANDOFF_DIR)
                .map(PathBuf::from)
                .ok_or_else(|| missing(env::HANDOFF_DIR))?,
            command: get(env::AGENT_COMMAND).ok_or_else(|| missing(env::AGENT_COMMAND))?,
            kill_grace: secs(env::KILL_GRACE_SECONDS, env::DEFAULT_KILL_GRACE_SECONDS)?,
            wait_for_runner: secs(env::AGENT_WAIT_SECONDS, env::DEFAULT_AGENT_WAIT_SECONDS)?,
        })
    }
}

/// Variables the wrapper sets for the agent (on top of its own environment).
pub use repobox_contract::runner_env::AGENT_VARS;

/// Variables of the wrapper's own that the agent does not need.
const WRAPPER_VARS: &[&str] = &[
    env::HANDOFF_DIR,
    env::AGENT_COMMAND,
    env::AGENT_WAIT_SECONDS,
];

/// How the wrapper ended (its exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrapperEnd {
    /// The command ran and its status went back to the runner (whatever it was).
    Reported,
    /// The runner ended before handing over a checkout: nothing to run.
    RunnerGone,
    /// Stopped by a signal.
    Stopped,
}

impl WrapperEnd {
    /// The process exit code: 0 when the status reached the runner or the runner was gone, 143
    /// (128 + SIGTERM) when stopped.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Reported | Self::RunnerGone => 0,
            Self::Stopped => 143,
        }
    }
}

/// Runs the wrapper until the agent has ended and reported, or there is nothing to do.
pub async fn run(cfg: &AgentConfig, stop: CancellationToken) -> std::io::Result<WrapperEnd> {
    let dir = &cfg.handoff_dir;
    // 1. Wait for the checkout, as long as the runner lives.
    let waiting = tokio::time::Instant::now();
    let start: Start = loop {
        if let Some(start) = handoff::read_start(dir)? {
            break start;
        }
        match handoff::is_free(dir, handoff::RUNNER_LOCK) {
            Some(true) => {
                info!("the runner ended before handing over a checkout; nothing to run");
                return Ok(WrapperEnd::RunnerGone);
            }
            None if waiting.elapsed() > cfg.wait_for_runner => {
                warn!(
                    waited_s = cfg.wait_for_runner.as_secs(),
                    "the runner never appeared"
                );
                return Ok(WrapperEnd::RunnerGone);
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(handoff::POLL) => {}
            _ = stop.cancelled() => return Ok(WrapperEnd::Stopped),
        }
    };
    let _lock = Lock::create(dir, handoff::AGENT_LOCK)?;
    let mut fifo = match pipe::OpenOptions::new().open_sender(dir.join(handoff::FIFO)) {
        Ok(f) => f,
        // ENXIO: no reader, the runner is gone.
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENXIO as i32) => {
            return Ok(WrapperEnd::RunnerGone);
        }
        Err(e) => return Err(e),
    };

    // 2. Run the command; its lines go to a channel that a writer task forwards as frames.
    let cancel = CancellationToken::new();
    let (out, mut lines) = OutputHandle::channel(256);
    let writer = tokio::spawn(async move {
        while let Some(s) = lines.recv().await {
            if fifo.write_all(&Frame::Line { s }.encode()).await.is_err() {
                break;
            }
        }
        fifo
    });
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&cfg.command)
        .current_dir(&start.work_tree);
    for name in WRAPPER_VARS {
        cmd.env_remove(name);
    }
    cmd.env(env::REPOBOX_JOB_ID, &start.job_id)
        .env(env::REPOBOX_PROMPT_FILE, &start.prompt_file)
        .env(env::REPOBOX_REPO_URL, &start.repo_url)
        .env(env::REPOBOX_BRANCH, &start.branch)
        .env(env::REPOBOX_WORK_TREE, &start.work_tree);
    // Files the agent creates stay group-writable and readable for the runner (same group).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o002));
    let watch = tokio::spawn(watch_runner(dir.clone(), stop.clone(), cancel.clone()));
    info!(job_id = %start.job_id, "running the agent");
    let result = process::run(cmd, &out, Stdout::Stream, &cancel, cfg.kill_grace).await;
    watch.abort();
    drop(out);
    // Anything the agent left behind (daemons in their own session) goes too; only when this
    // process is its container's init, where every process it may signal is the agent's.
    if std::process::id() == 1 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::SIGKILL);
    }
    let mut fifo = writer.await.map_err(std::io::Error::other)?;
    let frame = match &result {
        Ok(done) => {
            use std::os::unix::process::ExitStatusExt;
            Frame::Exit {
                code: done.status.code(),
                signal: done.status.signal(),
            }
        }
        Err(e) => Frame::Error {
            message: format!("cannot start the agent: {e}"),
        },
    };
    if stop.is_cancelled() {
        let _ = fifo.write_all(&Frame::Stopped.encode()).await;
        return Ok(WrapperEnd::Stopped);
    }
    // The runner may be gone (then there is no one to tell).
    let _ = fifo.write_all(&frame.encode()).await;
    info!(?frame, "agent finished");
    Ok(WrapperEnd::Reported)
}

/// Cancels the agent when the runner goes away or the wrapper is told to stop.
async fn watch_runner(dir: PathBuf, stop: CancellationToken, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(handoff::POLL * 4) => {}
            _ = stop.cancelled() => break,
        }
        if handoff::is_free(&dir, handoff::RUNNER_LOCK) == Some(true) {
            warn!("the runner is gone; stopping the agent");
            break;
        }
    }
    cancel.cancel();
}
