//! Runs a child (git or the agent) in its own process group, streams its output lines to
//! the sink, and stops the whole group on cancellation: SIGTERM, then SIGKILL after a grace
//! period. The executor itself never blocks on a child it was asked to stop.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::output::OutputHandle;

/// How many trailing stderr lines are kept to explain a failure.
const TAIL: usize = 20;

/// What became of a child.
#[derive(Debug)]
pub struct Finished {
    /// How the child exited.
    pub status: ExitStatus,
    /// Captured stdout, when asked for (otherwise streamed).
    pub stdout: String,
    /// The last lines of stderr (already masked by the sink's masker when streamed).
    pub stderr_tail: Vec<String>,
    /// The child was stopped because the run was cancelled.
    pub cancelled: bool,
}

impl Finished {
    /// Whether it exited with 0 and was not stopped for a cancellation.
    pub fn success(&self) -> bool {
        self.status.success() && !self.cancelled
    }
}

/// Where a child's stdout goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stdout {
    /// Each line goes to the job's output.
    Stream,
    /// Kept in [`Finished::stdout`] (for output the runner parses).
    Capture,
}

/// Spawns `cmd` and waits for it, streaming its lines to `out`.
pub async fn run(
    mut cmd: Command,
    out: &OutputHandle,
    stdout_mode: Stdout,
    cancel: &CancellationToken,
    grace: Duration,
) -> std::io::Result<Finished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));

    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_stdout = out.clone();
    let stdout_task = tokio::spawn(async move {
        match stdout {
            Some(s) => read_lines(s, &out_stdout, stdout_mode == Stdout::Stream).await,
            None => VecDeque::new(),
        }
    });
    let out_stderr = out.clone();
    let stderr_task = tokio::spawn(async move {
        match stderr {
            Some(s) => read_lines(s, &out_stderr, true).await,
            None => VecDeque::new(),
        }
    });

    let mut cancelled = false;
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = cancel.cancelled() => {
            cancelled = true;
            signal_group(pgid, Signal::SIGTERM);
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    signal_group(pgid, Signal::SIGKILL);
                    child.wait().await?
                }
            }
        }
    };
    // Whatever the child left running in its group (a backgrounded helper) goes too, so
    // the pipes close and the readers finish.
    signal_group(pgid, Signal::SIGKILL);

    let stdout_lines = stdout_task.await.unwrap_or_default();
    let stderr_tail = stderr_task.await.unwrap_or_default();
    Ok(Finished {
        status,
        stdout: if stdout_mode == Stdout::Capture {
            stdout_lines.into_iter().collect::<Vec<_>>().join("\n")
        } else {
            String::new()
        },
        stderr_tail: stderr_tail.into_iter().collect(),
        cancelled,
    })
}

fn signal_group(pgid: Option<Pid>, signal: Signal) {
    if let Some(pgid) = pgid {
        // ESRCH (the group is already gone) is the expected outcome most of the time.
        let _ = killpg(pgid, signal);
    }
}

/// Reads lines (split on `\n` and `\r`, lossily decoded). Streams them when asked; keeps
/// all of them when capturing, otherwise only the last [`TAIL`].
async fn read_lines<R: AsyncRead + Unpin>(
    reader: R,
    out: &OutputHandle,
    stream: bool,
) -> VecDeque<String> {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    let mut kept = VecDeque::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&buf);
        for line in text.split(['\n', '\r']).filter(|l| !l.trim().is_empty()) {
            if stream {
                out.line(line).await;
                if kept.len() == TAIL {
                    kept.pop_front();
                }
            }
            kept.push_back(line.to_owned());
        }
    }
    kept
}
