//! The hand-off between the runner and the agent, which run as different users in different
//! containers of one pod and share only the work volume.
//!
//! The runner owns everything secret (the Redis URL, the encryption key, the token, the git
//! directory); the agent gets a plain work tree, the prompt file, and nothing else. They meet in
//! a hand-off directory on the shared volume (the way Tekton's entrypoint hands steps over):
//!
//! | file | written by | what it says |
//! | --- | --- | --- |
//! | `runner.lock` | runner | held (`flock`) for the runner's whole life: free means the runner is gone |
//! | `agent.fifo` | runner creates, agent writes | the agent's output and exit status, one JSON [`Frame`] per line |
//! | `prompt.txt` | runner | the prompt (never an environment variable: no size limit from `execve`) |
//! | `start.json` | runner | the checkout is ready: [`Start`] (renamed into place, so never read half-written) |
//! | `agent.lock` | agent | held while the agent wrapper lives: free (after it existed) means the agent died |
//!
//! Nothing the runner reads here is trusted: files are opened without following symlinks,
//! reads are bounded, and a malformed frame is shown as an output line, never interpreted.
//! The agent can forge its own output or exit status; neither gives it anything.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;

use crate::output::OutputHandle;

/// Held by the runner while it lives.
pub const RUNNER_LOCK: &str = "runner.lock";
/// Held by the agent wrapper while it lives.
pub const AGENT_LOCK: &str = "agent.lock";
/// The agent's frames.
pub const FIFO: &str = "agent.fifo";
/// The checkout is ready.
pub const START: &str = "start.json";
/// The prompt.
pub const PROMPT: &str = "prompt.txt";

/// The longest line kept whole; longer ones are split (a hostile writer cannot make the runner
/// buffer without bound).
pub const MAX_LINE: usize = 64 * 1024;
/// The largest `start.json` the agent reads.
const MAX_START: u64 = 64 * 1024;
/// How long the runner waits for its own stop signal after the agent vanished.
const VANISH_GRACE: Duration = Duration::from_secs(2);
/// How often liveness (the other side's lock) is checked.
pub const POLL: Duration = Duration::from_millis(25);

/// What the agent needs to run: all paths are inside the agent's own mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Start {
    /// The job's id (the agent gets it as `REPOBOX_JOB_ID`).
    pub job_id: String,
    /// The repository URL without credentials.
    pub repo_url: String,
    /// The branch the runner created for the job.
    pub branch: String,
    /// The checkout, where the agent runs.
    pub work_tree: PathBuf,
    /// The prompt's file (the agent gets it as `REPOBOX_PROMPT_FILE`).
    pub prompt_file: PathBuf,
}

/// One line on the FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum Frame {
    /// An output line of the agent.
    Line {
        /// The line, without its newline.
        s: String,
    },
    /// The agent command ended.
    Exit {
        /// The command's exit code, when it exited.
        code: Option<i32>,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
    },
    /// The agent command could not be started.
    Error {
        /// Why, e.g. the spawn error.
        message: String,
    },
    /// The agent container was told to stop (the pod is going: cancelled, timed out, evicted).
    Stopped,
}

impl Frame {
    /// Parses one FIFO line; anything that is not a frame is output text.
    pub fn parse(line: &str) -> Frame {
        serde_json::from_str(line).unwrap_or_else(|_| Frame::Line { s: line.to_owned() })
    }

    /// The frame as one line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// An exclusive `flock` on a file created for it, released when dropped (or when the process
/// dies, however it dies).
pub struct Lock(#[allow(dead_code)] Flock<File>);

impl Lock {
    /// Creates `dir/name` already locked: the lock is taken on a temporary file that is then
    /// renamed into place, so whoever sees the file sees it locked.
    pub fn create(dir: &Path, name: &str) -> std::io::Result<Lock> {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc_o_nofollow())
            .mode(0o644)
            .open(&tmp)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(Lock(lock))
    }
}

/// Whether `dir/name` exists and nobody holds its lock: `None` when it does not exist yet.
/// Never follows a symlink and never blocks (a FIFO planted there opens non-blocking).
pub fn is_free(dir: &Path, name: &str) -> Option<bool> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nofollow() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(dir.join(name))
        .ok()?;
    Some(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok())
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Writes `dir/name` through a temporary file and a rename, readable by the agent.
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

/// How the agent step ended, as the runner saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEnd {
    /// The wrapper reported the command's exit.
    Exited {
        /// The command's exit code, when it exited.
        code: Option<i32>,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
    },
    /// The wrapper could not start the command.
    StartFailed(String),
    /// The agent container never picked the checkout up.
    NeverStarted(Duration),
    /// The wrapper went away without reporting (killed: out of memory, evicted, ...).
    Vanished,
    /// The runner itself was asked to stop.
    Cancelled,
}

/// The runner's side: creates the hand-off directory, holds its lock, hands the checkout over
/// and follows the agent's frames.
pub struct RunnerSide {
    dir: PathBuf,
    /// Opened by [`RunnerSide::start`] (it needs the async runtime; `prepare` may run before).
    fifo: Option<pipe::Receiver>,
    _lock: Lock,
}

impl RunnerSide {
    /// Creates `dir` (group-writable: the agent runs as another user in the pod's group) with
    /// the runner's lock and the FIFO. Needs no async runtime.
    pub fn prepare(dir: &Path) -> std::io::Result<RunnerSide> {
        std::fs::create_dir_all(dir)?;
        set_mode(dir, 0o2775)?;
        let lock = Lock::create(dir, RUNNER_LOCK)?;
        let fifo_path = dir.join(FIFO);
        let _ = std::fs::remove_file(&fifo_path);
        nix::unistd::mkfifo(&fifo_path, nix::sys::stat::Mode::from_bits_truncate(0o620))
            .map_err(std::io::Error::from)?;
        // Group write for the agent; mkfifo's mode is filtered by the umask.
        set_mode(&fifo_path, 0o620)?;
        Ok(RunnerSide {
            dir: dir.to_owned(),
            fifo: None,
            _lock: lock,
        })
    }

    /// The hand-off directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the prompt file and returns its path.
    pub fn write_prompt(&self, prompt: &str) -> std::io::Result<PathBuf> {
        write_atomic(&self.dir, PROMPT, prompt.as_bytes())?;
        Ok(self.dir.join(PROMPT))
    }

    /// Opens the FIFO for reading (before the agent can open it for writing: it treats "no
    /// reader" as "the runner is gone"), then tells the agent to start. Call within the async
    /// runtime.
    pub fn start(&mut self, start: &Start) -> std::io::Result<()> {
        // Read-write: the runner never sees end-of-file while it waits for the first writer.
        self.fifo = Some(
            pipe::OpenOptions::new()
                .read_write(true)
                .unchecked(false)
                .open_receiver(self.dir.join(FIFO))?,
        );
        let json = serde_json::to_vec(start).map_err(std::io::Error::other)?;
        write_atomic(&self.dir, START, &json)
    }

    /// Follows the agent until it ends: output lines go to `out` (masked there); the agent's
    /// death without a report, a start that never comes, and cancellation end the wait too.
    pub async fn follow(
        &mut self,
        out: &OutputHandle,
        cancel: &CancellationToken,
        start_timeout: Duration,
    ) -> AgentEnd {
        let Some(mut fifo) = self.fifo.take() else {
            return AgentEnd::StartFailed("the agent was never started".into());
        };
        let started_waiting = tokio::time::Instant::now();
        let mut lines = LineSplitter::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut tick = tokio::time::interval(POLL * 4);
        let mut seen_agent = false;
        loop {
            tokio::select! {
                read = fifo.read(&mut buf) => {
                    let n = match read {
                        Ok(n) => n,
                        Err(e) => return AgentEnd::StartFailed(format!("cannot read the agent's output: {e}")),
                    };
                    for line in lines.push(&buf[..n]) {
                        if let Some(end) = handle_frame(&line, out).await {
                            return end;
                        }
                    }
                }
                _ = tick.tick() => {
                    match is_free(&self.dir, AGENT_LOCK) {
                        None if !seen_agent && started_waiting.elapsed() > start_timeout => {
                            return AgentEnd::NeverStarted(start_timeout);
                        }
                        None => {}
                        Some(false) => seen_agent = true,
                        Some(true) => {
                            // Gone: take what it managed to write, then report.
                            for line in drain(&mut fifo, &mut lines, &mut buf) {
                                if let Some(end) = handle_frame(&line, out).await {
                                    return end;
                                }
                            }
                            // Containers of a pod that is going are stopped together: give
                            // the runner's own signal a moment to arrive before calling the
                            // agent's end unexplained.
                            return tokio::select! {
                                _ = cancel.cancelled() => AgentEnd::Cancelled,
                                _ = tokio::time::sleep(VANISH_GRACE) => AgentEnd::Vanished,
                            };
                        }
                    }
                }
                _ = cancel.cancelled() => return AgentEnd::Cancelled,
            }
        }
    }
}

/// Whatever is still buffered in the FIFO, without waiting.
fn drain(fifo: &mut pipe::Receiver, lines: &mut LineSplitter, buf: &mut [u8]) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(n) = fifo.try_read(buf) {
        if n == 0 {
            break;
        }
        out.extend(lines.push(&buf[..n]));
    }
    out.extend(lines.finish());
    out
}

impl Drop for RunnerSide {
    /// The FIFO has served its purpose; a FIFO left in a kept work directory would block
    /// whoever reads it next.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join(FIFO));
    }
}

async fn handle_frame(line: &str, out: &OutputHandle) -> Option<AgentEnd> {
    match Frame::parse(line) {
        Frame::Line { s } => {
            if !s.trim().is_empty() {
                out.line(&s).await;
            }
            None
        }
        Frame::Exit { code, signal } => Some(AgentEnd::Exited { code, signal }),
        Frame::Error { message } => Some(AgentEnd::StartFailed(message)),
        Frame::Stopped => Some(AgentEnd::Cancelled),
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes, decoding lossily.
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; returns the lines they completed (a longer line than [`MAX_LINE`] in pieces).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                lines.push(String::from_utf8_lossy(&self.pending).into_owned());
                self.pending.clear();
            } else {
                self.pending.push(b);
                if self.pending.len() >= MAX_LINE {
                    lines.push(String::from_utf8_lossy(&self.pending).into_owned());
                    self.pending.clear();
                }
            }
        }
        lines
    }

    /// The unterminated rest at the end of the stream, if any.
    pub fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| {
            let s = String::from_utf8_lossy(&self.pending).into_owned();
            self.pending.clear();
            s
        })
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Reads `dir/start.json` if it is there: a regular file, not a symlink, bounded.
pub fn read_start(dir: &Path) -> std::io::Result<Option<Start>> {
    use std::io::Read;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nofollow() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(dir.join(START))
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("start.json is not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_START).read_to_string(&mut text)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| std::io::Error::other(format!("start.json is malformed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_output() {
        for f in [
            Frame::Line {
                s: "hello {\"t\":1}".into(),
            },
            Frame::Exit {
                code: Some(3),
                signal: None,
            },
            Frame::Exit {
                code: None,
                signal: Some(9),
            },
            Frame::Error {
                message: "no sh".into(),
            },
            Frame::Stopped,
        ] {
            let line = String::from_utf8(f.encode()).unwrap();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(Frame::parse(line.trim_end()), f);
        }
        assert_eq!(
            Frame::parse("plain text"),
            Frame::Line {
                s: "plain text".into()
            }
        );
        assert_eq!(
            Frame::parse("{\"t\":\"nope\"}"),
            Frame::Line {
                s: "{\"t\":\"nope\"}".into()
            }
        );
    }

    #[test]
    fn lines_are_bounded() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"a\nb"), ["a"]);
        assert_eq!(s.push(b"c\n"), ["bc"]);
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let lines = s.push(&long);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
        assert_eq!(s.finish().map(|l| l.len()), Some(5));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn locks_tell_liveness() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(is_free(dir.path(), RUNNER_LOCK), None);
        let lock = Lock::create(dir.path(), RUNNER_LOCK).unwrap();
        assert_eq!(is_free(dir.path(), RUNNER_LOCK), Some(false));
        drop(lock);
        assert_eq!(is_free(dir.path(), RUNNER_LOCK), Some(true));
    }

    #[test]
    fn start_file_is_never_followed_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_start(dir.path()).unwrap().is_none());
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "{}").unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join(START)).unwrap();
        assert!(read_start(dir.path()).is_err());
        std::fs::remove_file(dir.path().join(START)).unwrap();
        let start = Start {
            job_id: "j".into(),
            repo_url: "https://h/r.git".into(),
            branch: "repobox/j".into(),
            work_tree: "/work/tree".into(),
            prompt_file: "/work/handoff/prompt.txt".into(),
        };
        write_atomic(dir.path(), START, &serde_json::to_vec(&start).unwrap()).unwrap();
        assert_eq!(read_start(dir.path()).unwrap(), Some(start));
    }
}
