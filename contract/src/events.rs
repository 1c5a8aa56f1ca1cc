//! Live job events on Redis pub/sub (`job:{jobId}:events`), so the web app can serve
//! Server-Sent Events without polling.
//!
//! The list `job:{jobId}:output` and the hash `job:{jobId}` stay the truth: an event says what
//! was just appended or changed, and its `seq` ties it to the list. An output event's `seq` is
//! the list index of its first line; a status event's is the list's length when the status
//! changed (how many lines came before it). A client that subscribes, then reads the list,
//! then applies only events that reach past what it read, sees every line once, in order
//! (`docs/redis-contract.md`, "Live events").
//!
//! Every event is published by a Lua script in the same step as the write it reports (the
//! `RPUSH` of the lines, the status transition), so the event and the list never disagree
//! and events come out in the order of the writes. Publishing is best effort: a refused
//! `PUBLISH` (an ACL without the channel) never undoes or fails the write, it is logged.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};

use crate::record::JobStatus;

/// At most this many lines go in one output event (the peer's event batcher's bound).
pub const MAX_BATCH_LINES: usize = 50;
/// At most this many bytes of JSON-encoded lines (with their separating commas) go in one
/// output event, so a subscriber never has to take a message bigger than that.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// A line waits at most this long before it is pushed and published.
pub const MAX_BATCH_DELAY: Duration = Duration::from_secs(2);

/// One message on `job:{jobId}:events`, as JSON:
/// `{"seq":12,"type":"output","lines":["…"],"timestamp":"…"}` or
/// `{"seq":40,"type":"status","status":"success","fields":{"finishedAt":"…",…},"timestamp":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    /// Lines appended to `job:{jobId}:output`; `seq` is the list index of the first one.
    Output {
        /// `seq`: the list index of `lines[0]`.
        seq: u64,
        /// `lines`: the appended lines, exactly as pushed to the list.
        lines: Vec<String>,
        /// `timestamp`: when the event was published.
        timestamp: String,
    },
    /// The job's status changed (or, while `running`, one of its fields: see
    /// [`crate::transitions::set_step`]). `fields` are the other hash fields written in the
    /// same step; `seq` is the number of output lines written before it.
    Status {
        /// `seq`: how many output lines were written before the change.
        seq: u64,
        /// `status`: the job's status after the change.
        status: JobStatus,
        /// `fields`: e.g. `startedAt` and `runnerId` on start; `finishedAt`, `error`, `branch`,
        /// `commitSha` on the end.
        #[serde(default)]
        fields: BTreeMap<String, String>,
        /// `timestamp`: when it was published (the `startedAt` / `finishedAt` it wrote).
        timestamp: String,
    },
}

impl Event {
    /// Parses a message received on the channel.
    pub fn parse(payload: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(payload)
    }

    /// The event's `seq`, whichever kind it is: what [`Follower::apply`] orders by.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Output { seq, .. } | Self::Status { seq, .. } => *seq,
        }
    }
}

/// The event without its `seq`, which only Redis knows (the list's length at the write).
/// The scripts splice `"seq":N` in front exactly as [`with_seq`] does.
pub(crate) fn output_body(lines: &[String], timestamp: &str) -> String {
    serde_json::json!({"type": "output", "lines": lines, "timestamp": timestamp}).to_string()
}

/// A status event's body; `fields` are the hash fields written with the status.
pub(crate) fn status_body(status: JobStatus, fields: &[(&str, &str)], timestamp: &str) -> String {
    let fields: BTreeMap<&str, &str> = fields.iter().copied().collect();
    serde_json::json!({
        "type": "status",
        "status": status.as_str(),
        "fields": fields,
        "timestamp": timestamp,
    })
    .to_string()
}

/// What the Lua helper `PUBLISH_LUA` sends: `seq` first, then the body's members. Kept in
/// Rust so the splice is unit-tested; the Redis tests check the scripts do the same.
pub fn with_seq(body: &str, seq: u64) -> String {
    format!("{{\"seq\":{seq},{}", body.get(1..).unwrap_or_default())
}

/// Lua shared by every script that publishes: `publish` sends a body with its `seq`,
/// `publish_status` takes `seq` from the output list's length. Both return the refusal (an
/// ACL without `PUBLISH` or the channel) instead of raising it, so the write they follow stands.
pub(crate) const PUBLISH_LUA: &str = r#"
local function publish(channel, body, seq)
  local r = redis.pcall('PUBLISH', channel,
    '{"seq":' .. string.format('%d', seq) .. ',' .. string.sub(body, 2))
  if type(r) == 'table' and r.err then return r.err end
  return ''
end
local function publish_status(list, channel, body)
  local len = redis.pcall('LLEN', list)
  if type(len) == 'table' and len.err then return len.err end
  return publish(channel, body, len)
end
"#;

static PUSH_OUTPUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PUBLISH_LUA}
local n = 0
for i = 3, #ARGV, 1000 do
  n = redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local seq = n - (#ARGV - 2)
return {{seq, publish(ARGV[1], ARGV[2], seq)}}
"
    ))
});

/// Appends `lines` to `job:{jobId}:output` and publishes them as one output event, in one
/// atomic step. Returns the event's `seq` (the list index of the first line), `None` for no
/// lines (nothing is written). The caller keeps batches within the `MAX_BATCH_*` bounds.
pub async fn push_output<C: ConnectionLike>(
    con: &mut C,
    job_id: &str,
    lines: &[String],
    timestamp: &str,
) -> redis::RedisResult<Option<u64>> {
    if lines.is_empty() {
        return Ok(None);
    }
    let mut inv = PUSH_OUTPUT.key(crate::keys::job_output(job_id));
    inv.arg(crate::keys::job_events(job_id))
        .arg(output_body(lines, timestamp))
        .arg(lines);
    let (seq, refused): (u64, String) = inv.invoke_async(con).await?;
    warn_unpublished(job_id, &refused);
    Ok(Some(seq))
}

/// Logs a `PUBLISH` that Redis refused (the write itself went through).
pub(crate) fn warn_unpublished(job_id: &str, refused: &str) {
    if !refused.is_empty() {
        tracing::warn!(
            job_id,
            error = refused,
            "the live event was not published (does the Redis user lack `+publish &job:*:events`?)"
        );
    }
}

/// What a subscriber does with one event ([`Follower::apply`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Show these lines: the part of the event not read from the list yet.
    Lines(&'a [String]),
    /// The status moved on; `fields` are the hash fields written with it.
    Status(JobStatus, &'a BTreeMap<String, String>),
    /// Nothing new: lines already read from the list, or a status older than the one held.
    Skip,
    /// Lines `from..to` were never seen (the subscription dropped messages): read them with
    /// `LRANGE job:{jobId}:output from to-1`, count them with [`Follower::read`], then apply
    /// the event again.
    Gap {
        /// The first missing list index (the follower's [`Follower::next`]).
        from: u64,
        /// The event's `seq`: one past the last missing index.
        to: u64,
    },
}

/// A subscriber's position in one job: how many lines of `job:{jobId}:output` it has shown
/// and the status it holds. The resume procedure of `docs/redis-contract.md`: subscribe,
/// read the list (and the hash), start a `Follower` there, apply every event.
///
/// ```
/// use repobox_contract::JobStatus;
/// use repobox_contract::events::{Event, Follower, Step};
///
/// let output = |seq, lines: &[&str]| Event::Output {
///     seq,
///     lines: lines.iter().map(|l| l.to_string()).collect(),
///     timestamp: "2026-11-23T10:15:30.123Z".into(),
/// };
/// // Subscribed, then read two lines from `job:{jobId}:output` and `running` from the hash.
/// let mut f = Follower::new(2, Some(JobStatus::Running));
/// // An event published before the read overlaps it: only the unread line is shown.
/// let overlap = output(1, &["b", "c"]);
/// assert_eq!(f.apply(&overlap), Step::Lines(&["c".to_string()]));
/// // Lines 3..5 were dropped by the subscription: read them from the list, then apply again.
/// let later = output(5, &["f"]);
/// assert_eq!(f.apply(&later), Step::Gap { from: 3, to: 5 });
/// f.read(2);
/// assert_eq!(f.apply(&later), Step::Lines(&["f".to_string()]));
/// assert_eq!(f.next(), 6);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Follower {
    next: u64,
    status: Option<JobStatus>,
}

impl Follower {
    /// After reading `lines_read` lines from the list and, if read, the hash's status.
    pub fn new(lines_read: u64, status: Option<JobStatus>) -> Self {
        Self {
            next: lines_read,
            status,
        }
    }

    /// The list index of the first line not shown yet.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The status held (`None` until the hash or a status event told it).
    pub fn status(&self) -> Option<JobStatus> {
        self.status
    }

    /// Counts `count` more lines read from the list (after a [`Step::Gap`]).
    pub fn read(&mut self, count: u64) {
        self.next += count;
    }

    /// Applies one received event and says what to show: a line already read is never shown
    /// twice, and missing lines come back as a [`Step::Gap`].
    pub fn apply<'e>(&mut self, event: &'e Event) -> Step<'e> {
        if event.seq() > self.next {
            return Step::Gap {
                from: self.next,
                to: event.seq(),
            };
        }
        match event {
            Event::Output { seq, lines, .. } => {
                let end = seq + lines.len() as u64;
                if end <= self.next {
                    return Step::Skip;
                }
                let fresh = &lines[(self.next - seq) as usize..];
                self.next = end;
                Step::Lines(fresh)
            }
            Event::Status { status, fields, .. } => {
                let moves = match self.status {
                    None => true,
                    // A `running` job's other fields change while it stays `running`.
                    Some(JobStatus::Running) => *status != JobStatus::Pending,
                    Some(JobStatus::Pending) => true,
                    Some(_) => false,
                };
                if !moves {
                    return Step::Skip;
                }
                self.status = Some(*status);
                Step::Status(*status, fields)
            }
        }
    }
}

/// The size of `s` as a JSON string (quotes and escapes included), exactly as `serde_json`
/// writes it: what a line costs in an output event.
pub fn json_len(s: &str) -> usize {
    2 + s.bytes().map(escaped_len).sum::<usize>()
}

fn escaped_len(b: u8) -> usize {
    match b {
        b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
        0x00..=0x1f => 6,
        _ => 1,
    }
}

/// Cuts a line whose JSON form is longer than `max_json` bytes into pieces that fit (at
/// character boundaries; a piece always holds at least one character), so no single line
/// can make an event exceed [`MAX_BATCH_BYTES`]. A line that fits comes back whole.
pub fn split_line(line: &str, max_json: usize) -> Vec<&str> {
    if json_len(line) <= max_json {
        return vec![line];
    }
    let budget = max_json.saturating_sub(2);
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, c) in line.char_indices() {
        let mut buf = [0u8; 4];
        let cost: usize = c.encode_utf8(&mut buf).bytes().map(escaped_len).sum();
        if used + cost > budget && i > start {
            pieces.push(&line[start..i]);
            start = i;
            used = 0;
        }
        used += cost;
    }
    pieces.push(&line[start..]);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn events_parse_from_what_the_scripts_send() {
        let body = output_body(&["a \"b\"".into(), "c".into()], "2026-01-02T03:04:05.000Z");
        let ev = Event::parse(&with_seq(&body, 7)).unwrap();
        assert_eq!(
            ev,
            Event::Output {
                seq: 7,
                lines: vec!["a \"b\"".into(), "c".into()],
                timestamp: "2026-01-02T03:04:05.000Z".into(),
            }
        );
        assert_eq!(ev.seq(), 7);

        let body = status_body(
            JobStatus::Failed,
            &[("finishedAt", "t1"), ("error", "timed out after 4 s")],
            "t1",
        );
        let ev = Event::parse(&with_seq(&body, 40)).unwrap();
        assert_eq!(
            ev,
            Event::Status {
                seq: 40,
                status: JobStatus::Failed,
                fields: [("finishedAt", "t1"), ("error", "timed out after 4 s")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                timestamp: "t1".into(),
            }
        );
        let text = with_seq(&body, 40);
        assert!(text.starts_with("{\"seq\":40,"), "{text}");
        assert!(text.contains("\"type\":\"status\""), "{text}");
    }

    #[test]
    fn unknown_types_and_statuses_are_rejected() {
        assert!(Event::parse(r#"{"seq":1,"type":"other","timestamp":"t"}"#).is_err());
        assert!(
            Event::parse(r#"{"seq":1,"type":"status","status":"weird","timestamp":"t"}"#).is_err()
        );
        // `fields` may be absent.
        assert!(
            Event::parse(r#"{"seq":1,"type":"status","status":"running","timestamp":"t"}"#).is_ok()
        );
    }

    #[test]
    fn json_len_counts_escapes() {
        assert_eq!(json_len(""), 2);
        assert_eq!(json_len("abc"), 5);
        assert_eq!(json_len("a\"b\\"), 8);
        assert_eq!(json_len("\n\t\r\u{8}\u{c}"), 12);
        assert_eq!(json_len("\u{1}"), 8);
        assert_eq!(json_len("é"), 4);
        assert_eq!(json_len("\u{7f}"), 3);
    }

    #[test]
    fn long_lines_are_cut_to_fit() {
        assert_eq!(split_line("short", 100), vec!["short"]);
        let line = "x".repeat(25);
        let pieces = split_line(&line, 12);
        assert_eq!(pieces, vec!["x".repeat(10), "x".repeat(10), "x".repeat(5)]);
        // Escapes count: ten control characters are 60 bytes of JSON.
        let ctl = "\u{1}".repeat(10);
        let pieces = split_line(&ctl, 20);
        assert!(pieces.iter().all(|p| json_len(p) <= 20), "{pieces:?}");
        assert_eq!(pieces.concat(), ctl);
        // A budget smaller than one character still makes progress.
        assert_eq!(split_line("ab", 2), vec!["a", "b"]);
    }

    fn out(seq: u64, lines: &[&str]) -> Event {
        Event::Output {
            seq,
            lines: lines.iter().map(|l| l.to_string()).collect(),
            timestamp: "t".into(),
        }
    }

    fn status(seq: u64, s: JobStatus) -> Event {
        Event::Status {
            seq,
            status: s,
            fields: BTreeMap::new(),
            timestamp: "t".into(),
        }
    }

    fn shown(step: Step<'_>) -> Vec<String> {
        match step {
            Step::Lines(l) => l.to_vec(),
            other => panic!("expected lines, got {other:?}"),
        }
    }

    #[test]
    fn a_follower_shows_each_line_once() {
        // Read 3 lines from the list; events from before and after that overlap it.
        let mut f = Follower::new(3, Some(JobStatus::Running));
        assert_eq!(f.apply(&out(0, &["a", "b"])), Step::Skip);
        assert_eq!(f.apply(&out(2, &["c"])), Step::Skip);
        assert_eq!(shown(f.apply(&out(3, &["d", "e"]))), ["d", "e"]);
        assert_eq!(f.next(), 5);
        assert_eq!(f.apply(&out(3, &["d", "e"])), Step::Skip, "a repeat");
        // A batch the list read cut through (not produced by atomic writes, handled anyway).
        let mut g = Follower::new(4, None);
        assert_eq!(shown(g.apply(&out(3, &["d", "e"]))), ["e"]);
    }

    #[test]
    fn a_follower_reports_gaps_and_resumes_after_reading_them() {
        let mut f = Follower::new(2, None);
        let ev = out(5, &["f"]);
        assert_eq!(f.apply(&ev), Step::Gap { from: 2, to: 5 });
        assert_eq!(f.next(), 2, "nothing moved");
        f.read(3);
        assert_eq!(shown(f.apply(&ev)), ["f"]);
        // A status counts the lines before it: missing ones are a gap too.
        assert_eq!(
            f.apply(&status(9, JobStatus::Success)),
            Step::Gap { from: 6, to: 9 }
        );
        assert_eq!(f.status(), None);
    }

    #[test]
    fn a_follower_never_moves_the_status_back() {
        let fields = BTreeMap::new();
        let mut f = Follower::new(0, None);
        assert_eq!(
            f.apply(&status(0, JobStatus::Running)),
            Step::Status(JobStatus::Running, &fields)
        );
        assert_eq!(f.apply(&status(0, JobStatus::Pending)), Step::Skip);
        // Progress of a running job (its fields) is applied.
        assert_eq!(
            f.apply(&status(0, JobStatus::Running)),
            Step::Status(JobStatus::Running, &fields)
        );
        assert_eq!(
            f.apply(&status(0, JobStatus::Cancelled)),
            Step::Status(JobStatus::Cancelled, &fields)
        );
        for s in [
            JobStatus::Pending,
            JobStatus::Running,
            JobStatus::Success,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ] {
            assert_eq!(f.apply(&status(0, s)), Step::Skip, "{s} after cancelled");
        }
        assert_eq!(f.status(), Some(JobStatus::Cancelled));
        // A snapshot that is already terminal ignores the `running` event it raced with.
        let mut g = Follower::new(0, Some(JobStatus::Success));
        assert_eq!(g.apply(&status(0, JobStatus::Running)), Step::Skip);
        let mut p = Follower::new(0, Some(JobStatus::Pending));
        assert_eq!(
            p.apply(&status(0, JobStatus::Failed)),
            Step::Status(JobStatus::Failed, &fields)
        );
    }

    proptest! {
        /// Any cut of the history between "read from the list" and "received as events",
        /// with repeats, gives every line exactly once, in order.
        #[test]
        fn any_overlap_of_list_and_events_gives_every_line_once(
            sizes in proptest::collection::vec(1usize..5, 1..12),
            cut in any::<proptest::sample::Index>(),
            from in any::<proptest::sample::Index>(),
        ) {
            let mut events = Vec::new();
            let mut all = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                let lines: Vec<String> = (0..*n).map(|j| format!("{i}.{j}")).collect();
                events.push(Event::Output { seq: all.len() as u64, lines: lines.clone(), timestamp: "t".into() });
                all.extend(lines);
            }
            // The list was read after `cut` batches; events are received from `from` on
            // (subscribed before the read: from <= cut).
            let cut = cut.index(events.len() + 1);
            let from = from.index(cut + 1);
            let read: usize = sizes[..cut].iter().sum();
            let mut f = Follower::new(read as u64, None);
            let mut seen = all[..read].to_vec();
            for ev in &events[from..] {
                match f.apply(ev) {
                    Step::Lines(l) => seen.extend_from_slice(l),
                    Step::Skip => {}
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(seen, all);
        }

        #[test]
        fn json_len_matches_serde_json(s in any::<String>()) {
            prop_assert_eq!(json_len(&s), serde_json::to_string(&s).unwrap().len());
        }

        #[test]
        fn split_pieces_fit_and_rejoin(s in any::<String>(), max in 8usize..64) {
            let pieces = split_line(&s, max);
            prop_assert_eq!(pieces.concat(), s.clone());
            for p in &pieces {
                prop_assert!(json_len(p) <= max, "{:?} is {} > {}", p, json_len(p), max);
            }
        }

        #[test]
        fn the_seq_splice_keeps_the_body(lines in proptest::collection::vec(any::<String>(), 1..5), seq in any::<u64>()) {
            let ev = Event::parse(&with_seq(&output_body(&lines, "t"), seq)).unwrap();
            prop_assert_eq!(ev, Event::Output { seq, lines, timestamp: "t".into() });
        }
    }
}
