//! The output sink: every line of git and agent output, masked, batched and capped, goes
//! to `job:{id}:output` so a browser can follow the job live.
//!
//! Lines are pushed with one RPUSH per batch: after `flush_lines` lines or `flush_interval`
//! after the first unflushed line, whichever comes first. Once `max_bytes` have been pushed,
//! one truncation line is written and later lines are counted but dropped.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use repobox_contract::Masker;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::OutputConfig;

/// What the sink did, for the final log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputStats {
    pub lines_pushed: usize,
    pub bytes_pushed: usize,
    pub lines_dropped: usize,
    pub truncated: bool,
    pub failed_pushes: usize,
}

/// A cheap, cloneable handle to write lines with.
#[derive(Clone)]
pub struct OutputHandle {
    tx: mpsc::Sender<String>,
    masker: Arc<Masker>,
}

impl OutputHandle {
    /// Queues a line (masked here, before it leaves the process in any form).
    pub async fn line(&self, text: &str) {
        let masked = self.masker.mask(text).into_owned();
        // The writer only goes away after every handle is dropped; a send error means
        // the process is shutting down and the line has nowhere to go.
        let _ = self.tx.send(masked).await;
    }

    /// A handle whose lines arrive, unmasked by anything but an empty masker, on the returned
    /// receiver (the agent wrapper forwards them to the runner, which masks them).
    pub fn channel(capacity: usize) -> (OutputHandle, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            OutputHandle {
                tx,
                masker: Arc::new(Masker::new()),
            },
            rx,
        )
    }

    /// A runner's own message, marked so users can tell it from git's output.
    pub async fn note(&self, text: &str) {
        self.line(&format!("==> {text}")).await;
    }
}

/// The sink: a handle plus the writer task that owns the Redis pushes.
pub struct Output {
    handle: OutputHandle,
    writer: JoinHandle<OutputStats>,
}

impl Output {
    pub fn start(
        con: MultiplexedConnection,
        job_id: &str,
        masker: Arc<Masker>,
        cfg: OutputConfig,
    ) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        let key = repobox_contract::keys::job_output(job_id);
        let writer = tokio::spawn(write_loop(con, key, rx, cfg));
        Self {
            handle: OutputHandle { tx, masker },
            writer,
        }
    }

    pub fn handle(&self) -> OutputHandle {
        self.handle.clone()
    }

    /// Flushes everything queued and stops the writer. Handles still held elsewhere keep
    /// the writer alive, so drop them first.
    pub async fn close(self) -> OutputStats {
        drop(self.handle);
        self.writer.await.unwrap_or_default()
    }
}

struct Batch {
    lines: Vec<String>,
    deadline: Option<Instant>,
}

async fn write_loop(
    mut con: MultiplexedConnection,
    key: String,
    mut rx: mpsc::Receiver<String>,
    cfg: OutputConfig,
) -> OutputStats {
    let mut stats = OutputStats::default();
    let mut batch = Batch {
        lines: Vec::with_capacity(cfg.flush_lines),
        deadline: None,
    };
    loop {
        let next = match batch.deadline {
            Some(deadline) => tokio::select! {
                line = rx.recv() => line.map(Some),
                _ = tokio::time::sleep_until(deadline) => Some(None),
            },
            None => rx.recv().await.map(Some),
        };
        match next {
            // A line arrived.
            Some(Some(line)) => {
                admit(&mut batch, &mut stats, line, &cfg);
                if batch.lines.len() >= cfg.flush_lines {
                    flush(&mut con, &key, &mut batch, &mut stats).await;
                }
            }
            // The batch's time is up.
            Some(None) => flush(&mut con, &key, &mut batch, &mut stats).await,
            // Every handle is gone: final flush.
            None => {
                flush(&mut con, &key, &mut batch, &mut stats).await;
                return stats;
            }
        }
    }
}

/// Adds a line to the batch unless the cap is reached; the line that would cross the cap
/// is replaced by a single truncation notice.
fn admit(batch: &mut Batch, stats: &mut OutputStats, line: String, cfg: &OutputConfig) {
    if stats.truncated {
        stats.lines_dropped += 1;
        return;
    }
    let size = line.len() + 1;
    if stats.bytes_pushed + size > cfg.max_bytes {
        stats.truncated = true;
        stats.lines_dropped += 1;
        let notice = format!(
            "==> Output truncated: the {} byte limit was reached; later lines are not shown",
            cfg.max_bytes
        );
        stats.bytes_pushed += notice.len() + 1;
        push_line(batch, cfg, notice);
        return;
    }
    stats.bytes_pushed += size;
    push_line(batch, cfg, line);
}

fn push_line(batch: &mut Batch, cfg: &OutputConfig, line: String) {
    if batch.lines.is_empty() {
        batch.deadline = Some(Instant::now() + cfg.flush_interval);
    }
    batch.lines.push(line);
}

async fn flush(
    con: &mut MultiplexedConnection,
    key: &str,
    batch: &mut Batch,
    stats: &mut OutputStats,
) {
    batch.deadline = None;
    if batch.lines.is_empty() {
        return;
    }
    let lines = std::mem::take(&mut batch.lines);
    // Output is best effort: a Redis hiccup must not fail the job, so retry briefly and
    // then drop the batch with a warning.
    for attempt in 0..3u32 {
        match con.rpush::<_, _, ()>(key, &lines).await {
            Ok(()) => {
                stats.lines_pushed += lines.len();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, lines = lines.len(), "pushing output failed");
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
        }
    }
    stats.failed_pushes += 1;
    stats.lines_dropped += lines.len();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: usize) -> OutputConfig {
        OutputConfig {
            flush_lines: 64,
            flush_interval: Duration::from_millis(200),
            max_bytes: max,
        }
    }

    #[test]
    fn cap_adds_one_notice_then_drops() {
        let mut b = Batch {
            lines: vec![],
            deadline: None,
        };
        let mut s = OutputStats::default();
        let c = cfg(10);
        admit(&mut b, &mut s, "12345".into(), &c); // 6 bytes
        admit(&mut b, &mut s, "1234".into(), &c); // 11 > 10: notice
        admit(&mut b, &mut s, "x".into(), &c);
        assert_eq!(b.lines.len(), 2);
        assert!(b.lines[1].starts_with("==> Output truncated"));
        assert!(s.truncated);
        assert_eq!(s.lines_dropped, 2);
        assert!(b.deadline.is_some());
    }
}
