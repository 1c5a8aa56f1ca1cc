//! The output sink: every line of git and agent output, masked, batched and capped, goes
//! to `job:{id}:output` and, as one live event per batch, to `job:{id}:events`, so a browser
//! can follow the job live.
//!
//! Two tasks: the batcher collects lines into batches within the event contract's bounds
//! (`flush_lines` lines, `flush_bytes` of JSON, `flush_interval` after the batch's first line:
//! 50 / 256 KiB / 2 s by default, whichever comes first) and applies the cap (once `max_bytes`
//! were admitted, one truncation line, later lines are counted but dropped); the publisher
//! writes each batch with one script that RPUSHes the lines and publishes the event
//! ([`events::push_output`]), so the list and the events never disagree.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use repobox_contract::{Masker, events};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::OutputConfig;

/// What the sink did, for the final log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputStats {
    /// Lines written to `job:{id}:output`.
    pub lines_pushed: usize,
    /// Bytes admitted under `OUTPUT_MAX_BYTES` (each line with its newline).
    pub bytes_pushed: usize,
    /// Lines never written: past the cap, or lost with a batch Redis refused.
    pub lines_dropped: usize,
    /// The cap was reached and the truncation notice written.
    pub truncated: bool,
    /// Batches given up after their retries.
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

/// The sink: a handle plus the batcher and publisher tasks.
pub struct Output {
    handle: OutputHandle,
    batcher: JoinHandle<OutputStats>,
    publisher: JoinHandle<OutputStats>,
}

impl Output {
    /// Starts the batcher and the publisher for `job_id`; every line is masked with `masker`
    /// before it is queued.
    pub fn start(
        con: MultiplexedConnection,
        job_id: &str,
        masker: Arc<Masker>,
        cfg: OutputConfig,
    ) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        // Small: while Redis is slow, lines wait (and batch up) in the line channel.
        let (batch_tx, batch_rx) = mpsc::channel(2);
        let batcher = tokio::spawn(batch_loop(rx, batch_tx, cfg));
        let publisher = tokio::spawn(publish_loop(con, job_id.to_owned(), batch_rx));
        Self {
            handle: OutputHandle { tx, masker },
            batcher,
            publisher,
        }
    }

    /// A handle to write lines with (keep none past [`Output::close`]).
    pub fn handle(&self) -> OutputHandle {
        self.handle.clone()
    }

    /// Flushes everything queued and stops the tasks. Handles still held elsewhere keep
    /// the batcher alive, so drop them first.
    pub async fn close(self) -> OutputStats {
        drop(self.handle);
        let batched = self.batcher.await.unwrap_or_default();
        let published = self.publisher.await.unwrap_or_default();
        OutputStats {
            lines_pushed: published.lines_pushed,
            bytes_pushed: batched.bytes_pushed,
            lines_dropped: batched.lines_dropped + published.lines_dropped,
            truncated: batched.truncated,
            failed_pushes: published.failed_pushes,
        }
    }
}

/// The batch being filled, and the cap's accounting. Pure: the time is passed in.
struct Batcher {
    cfg: OutputConfig,
    lines: Vec<String>,
    /// The batch's lines as JSON, with the commas between them.
    json_bytes: usize,
    /// When the batch must go out (its first line's arrival + `flush_interval`).
    deadline: Option<Instant>,
    stats: OutputStats,
}

impl Batcher {
    fn new(cfg: OutputConfig) -> Self {
        Self {
            lines: Vec::with_capacity(cfg.flush_lines),
            json_bytes: 0,
            deadline: None,
            stats: OutputStats::default(),
            cfg,
        }
    }

    /// Admits a line under the cap; the line that would cross it is replaced by a single
    /// truncation notice. Returns the batches that are complete, in order.
    fn admit(&mut self, line: String, now: Instant) -> Vec<Vec<String>> {
        if self.stats.truncated {
            self.stats.lines_dropped += 1;
            return Vec::new();
        }
        let size = line.len() + 1;
        let line = if self.stats.bytes_pushed + size > self.cfg.max_bytes {
            self.stats.truncated = true;
            self.stats.lines_dropped += 1;
            let notice = format!(
                "==> Output truncated: the {} byte limit was reached; later lines are not shown",
                self.cfg.max_bytes
            );
            self.stats.bytes_pushed += notice.len() + 1;
            notice
        } else {
            self.stats.bytes_pushed += size;
            line
        };
        self.add(&line, now)
    }

    /// Adds a line to the batch (in pieces when it alone would not fit in one), closing the
    /// batch before a piece that would cross `flush_bytes` and when it reaches `flush_lines`.
    fn add(&mut self, line: &str, now: Instant) -> Vec<Vec<String>> {
        let mut ready = Vec::new();
        // A piece with its comma fits in an empty batch.
        for piece in events::split_line(line, self.cfg.flush_bytes - 1) {
            let size = events::json_len(piece) + 1;
            if !self.lines.is_empty() && self.json_bytes + size > self.cfg.flush_bytes {
                ready.extend(self.take());
            }
            if self.lines.is_empty() {
                self.deadline = Some(now + self.cfg.flush_interval);
            }
            self.lines.push(piece.to_owned());
            self.json_bytes += size;
            if self.lines.len() >= self.cfg.flush_lines {
                ready.extend(self.take());
            }
        }
        ready
    }

    /// The batch so far, if any; the next line starts a new one.
    fn take(&mut self) -> Option<Vec<String>> {
        self.deadline = None;
        self.json_bytes = 0;
        (!self.lines.is_empty()).then(|| std::mem::take(&mut self.lines))
    }
}

/// Turns lines into batches until every handle is gone, then sends the last one.
async fn batch_loop(
    mut rx: mpsc::Receiver<String>,
    tx: mpsc::Sender<Vec<String>>,
    cfg: OutputConfig,
) -> OutputStats {
    let mut b = Batcher::new(cfg);
    loop {
        let next = match b.deadline {
            Some(deadline) => tokio::select! {
                line = rx.recv() => line.map(Some),
                _ = tokio::time::sleep_until(deadline) => Some(None),
            },
            None => rx.recv().await.map(Some),
        };
        let ready = match next {
            Some(Some(line)) => b.admit(line, Instant::now()),
            // The batch's time is up.
            Some(None) => b.take().into_iter().collect(),
            // Every handle is gone: the last batch.
            None => {
                if let Some(batch) = b.take() {
                    send(&tx, batch, &mut b.stats).await;
                }
                return b.stats;
            }
        };
        for batch in ready {
            send(&tx, batch, &mut b.stats).await;
        }
    }
}

async fn send(tx: &mpsc::Sender<Vec<String>>, batch: Vec<String>, stats: &mut OutputStats) {
    if let Err(mpsc::error::SendError(lost)) = tx.send(batch).await {
        // The publisher is gone (it only stops when this loop does, or panicked).
        stats.lines_dropped += lost.len();
    }
}

/// Writes each batch to the list and the channel in one step.
async fn publish_loop(
    mut con: MultiplexedConnection,
    job_id: String,
    mut rx: mpsc::Receiver<Vec<String>>,
) -> OutputStats {
    let mut stats = OutputStats::default();
    while let Some(lines) = rx.recv().await {
        publish(&mut con, &job_id, lines, &mut stats).await;
    }
    stats
}

async fn publish(
    con: &mut MultiplexedConnection,
    job_id: &str,
    lines: Vec<String>,
    stats: &mut OutputStats,
) {
    // Output is best effort: a Redis hiccup must not fail the job, so retry briefly and
    // then drop the batch with a warning.
    for attempt in 0..3u32 {
        let now = repobox_contract::time::now();
        match events::push_output(con, job_id, &lines, &now).await {
            Ok(_) => {
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
            max_bytes: max,
            ..OutputConfig::default()
        }
    }

    fn lines(n: usize, prefix: &str) -> Vec<String> {
        (0..n).map(|i| format!("{prefix} {i}")).collect()
    }

    #[test]
    fn defaults_are_the_event_bounds() {
        let c = OutputConfig::default();
        assert_eq!(
            (c.flush_lines, c.flush_bytes, c.flush_interval),
            (50, 256 * 1024, Duration::from_secs(2))
        );
    }

    #[test]
    fn cap_adds_one_notice_then_drops() {
        let mut b = Batcher::new(cfg(10));
        let now = Instant::now();
        assert!(b.admit("12345".into(), now).is_empty()); // 6 bytes
        assert!(b.admit("1234".into(), now).is_empty()); // 11 > 10: notice
        assert!(b.admit("x".into(), now).is_empty());
        let batch = b.take().unwrap();
        assert_eq!(batch.len(), 2);
        assert!(batch[1].starts_with("==> Output truncated"));
        assert!(b.stats.truncated);
        assert_eq!(b.stats.lines_dropped, 2);
        assert_eq!(b.take(), None);
    }

    #[test]
    fn a_batch_closes_at_fifty_lines() {
        let mut b = Batcher::new(OutputConfig::default());
        let now = Instant::now();
        let mut out = Vec::new();
        for l in lines(120, "line") {
            out.extend(b.admit(l, now));
        }
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), [50, 50]);
        assert_eq!(b.lines.len(), 20);
        assert_eq!(out.concat(), lines(100, "line"));
    }

    #[test]
    fn a_batch_closes_before_crossing_256_kib_of_json() {
        let mut b = Batcher::new(OutputConfig::default());
        let now = Instant::now();
        // 100 KiB lines: two fit (2 × 102,403 bytes of JSON), a third would not.
        let big = "y".repeat(100 * 1024);
        let mut out = Vec::new();
        for _ in 0..5 {
            out.extend(b.admit(big.clone(), now));
        }
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2]);
        for batch in &out {
            let json: usize = batch.iter().map(|l| events::json_len(l) + 1).sum();
            assert!(json <= 256 * 1024, "{json}");
        }
        // Escapes count: 64 KiB of control characters is 384 KiB as JSON.
        let mut b = Batcher::new(OutputConfig::default());
        let ctl = "\u{1}".repeat(64 * 1024);
        let out = b.admit(ctl.clone(), now);
        let rest = b.take().unwrap();
        assert_eq!(out.len(), 1, "the first 256 KiB went out at once");
        let all: Vec<String> = out.into_iter().flatten().chain(rest).collect();
        assert_eq!(all.concat(), ctl, "the line arrives whole, in pieces");
        for piece in &all {
            assert!(events::json_len(piece) < 256 * 1024);
        }
    }

    #[test]
    fn the_deadline_is_set_by_the_first_line_of_a_batch() {
        let mut b = Batcher::new(OutputConfig::default());
        let t0 = Instant::now();
        b.admit("a".into(), t0);
        b.admit("b".into(), t0 + Duration::from_secs(1));
        assert_eq!(b.deadline, Some(t0 + Duration::from_secs(2)));
        b.take();
        assert_eq!(b.deadline, None);
        b.admit("c".into(), t0 + Duration::from_secs(3));
        assert_eq!(b.deadline, Some(t0 + Duration::from_secs(5)));
    }

    /// The batcher task with tokio's paused clock: time only moves when every task waits.
    fn spawn_batcher(
        cfg: OutputConfig,
    ) -> (
        mpsc::Sender<String>,
        mpsc::Receiver<Vec<String>>,
        JoinHandle<OutputStats>,
    ) {
        let (tx, rx) = mpsc::channel(1024);
        let (btx, brx) = mpsc::channel(16);
        (tx, brx, tokio::spawn(batch_loop(rx, btx, cfg)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_line_goes_out_two_seconds_after_it_arrived() {
        let (tx, mut batches, task) = spawn_batcher(OutputConfig::default());
        let t0 = Instant::now();
        tx.send("first".into()).await.unwrap();
        // Virtual time: the clock only jumps once the batcher has taken the line and waits.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tx.send("second".into()).await.unwrap();
        let batch = batches.recv().await.unwrap();
        assert_eq!(batch, ["first", "second"]);
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(2),
            "not before, not later"
        );

        // The next batch's clock starts with its own first line.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t1 = Instant::now();
        tx.send("third".into()).await.unwrap();
        assert_eq!(batches.recv().await.unwrap(), ["third"]);
        assert_eq!(t1.elapsed(), Duration::from_secs(2));

        drop(tx);
        assert_eq!(batches.recv().await, None);
        assert_eq!(task.await.unwrap().lines_dropped, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_batches_do_not_wait_and_the_rest_goes_out_at_close() {
        let (tx, mut batches, task) = spawn_batcher(OutputConfig::default());
        let t0 = Instant::now();
        for l in lines(130, "l") {
            tx.send(l).await.unwrap();
        }
        assert_eq!(batches.recv().await.unwrap().len(), 50);
        assert_eq!(batches.recv().await.unwrap().len(), 50);
        assert_eq!(t0.elapsed(), Duration::ZERO, "full batches go at once");
        drop(tx);
        assert_eq!(batches.recv().await.unwrap().len(), 30);
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "closing flushes without waiting"
        );
        assert_eq!(batches.recv().await, None);
        let stats = task.await.unwrap();
        assert_eq!(
            stats.bytes_pushed,
            lines(130, "l").iter().map(|l| l.len() + 1).sum::<usize>()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_interval_below_the_bound_is_used() {
        let (tx, mut batches, _task) = spawn_batcher(OutputConfig {
            flush_interval: Duration::from_millis(200),
            ..OutputConfig::default()
        });
        let t0 = Instant::now();
        tx.send("x".into()).await.unwrap();
        assert_eq!(batches.recv().await.unwrap(), ["x"]);
        assert_eq!(t0.elapsed(), Duration::from_millis(200));
    }
}
