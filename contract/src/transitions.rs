//! Atomic status transitions of `job:{jobId}`, as Lua scripts run inside Redis.
//!
//! Each script reads and writes the hash in one step, so two runners can never both
//! start a job, and a terminal status (`success`, `failed`, `cancelled`) is never
//! overwritten — whoever writes first wins, everyone later is told what is there.
//! A script that changes the hash also publishes the status event of the change
//! ([`crate::events`]) in that same step, so only a write that happened is announced, and
//! its `seq` counts exactly the output lines written before it.
//!
//! A job can run more than once only as numbered attempts (`attempt`, absent = 1): the operator
//! moves a job whose pod was lost to an infrastructure disruption to the next attempt with
//! [`retry`], and [`start`] lets exactly one runner of the current attempt take it over, so an
//! earlier attempt's runner can never start (or continue) it again.

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionLike;

use crate::events::{PUBLISH_LUA, status_body, warn_unpublished};
use crate::keys;
use crate::record::JobStatus;

static START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PUBLISH_LUA}
if redis.call('EXISTS', KEYS[1]) == 0 then return {{'missing'}} end
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == '' then status = 'pending' end
if status == 'success' or status == 'failed' or status == 'cancelled' then
  return {{'terminal', status}}
end
if status ~= 'running' and status ~= 'pending' then return {{'invalid', status}} end
local attempt = redis.call('HGET', KEYS[1], 'attempt')
if not attempt or attempt == '' then attempt = '1' end
if attempt ~= ARGV[5] then return {{'superseded', attempt}} end
if status == 'running' then
  if redis.call('HGET', KEYS[1], 'runnerAttempt') == attempt then
    return {{'running', redis.call('HGET', KEYS[1], 'runnerId') or ''}}
  end
  redis.call('HSET', KEYS[1], 'runnerId', ARGV[1], 'runnerAttempt', attempt)
  return {{'started', publish_status(KEYS[2], ARGV[3], ARGV[4])}}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'startedAt', ARGV[2], 'runnerId', ARGV[1],
  'runnerAttempt', attempt)
return {{'started', publish_status(KEYS[2], ARGV[3], ARGV[4])}}
"
    ))
});

static RETRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PUBLISH_LUA}
if redis.call('EXISTS', KEYS[1]) == 0 then return {{'missing'}} end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'success' or status == 'failed' or status == 'cancelled' then
  return {{'terminal', status}}
end
local attempt = redis.call('HGET', KEYS[1], 'attempt')
if not attempt or attempt == '' then attempt = '1' end
if tonumber(ARGV[3]) <= tonumber(attempt) then return {{'current', attempt}} end
redis.call('HSET', KEYS[1], 'attempt', ARGV[3])
redis.call('HDEL', KEYS[1], 'step')
return {{'retrying', publish_status(KEYS[2], ARGV[1], ARGV[2])}}
"
    ))
});

static STEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PUBLISH_LUA}
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return {{'not_holder'}} end
if redis.call('HGET', KEYS[1], 'runnerId') ~= ARGV[3] then return {{'not_holder'}} end
redis.call('HSET', KEYS[1], 'step', ARGV[4])
return {{'updated', publish_status(KEYS[2], ARGV[1], ARGV[2])}}
"
    ))
});

static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PUBLISH_LUA}
if redis.call('EXISTS', KEYS[1]) == 0 then return {{'missing'}} end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'success' or status == 'failed' or status == 'cancelled' then
  return {{'terminal', status}}
end
redis.call('HSET', KEYS[1], 'status', ARGV[3], unpack(ARGV, 4))
return {{'finished', publish_status(KEYS[2], ARGV[1], ARGV[2])}}
"
    ))
});

/// What [`start`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// The job moved from `pending` to `running` for this runner.
    Started,
    /// The job had already ended; it must not run again.
    AlreadyTerminal(JobStatus),
    /// Another runner of the same attempt already moved it to `running`.
    AlreadyRunning {
        /// The `runnerId` in the hash: the pod that holds it.
        runner_id: String,
    },
    /// The job has moved on to a later attempt (`attempt` in the hash): this runner is stale.
    Superseded {
        /// The hash's `attempt`, as written.
        attempt: String,
    },
    /// `job:{jobId}` does not exist.
    Missing,
    /// The status field holds something the contract does not know.
    InvalidStatus(String),
}

/// What [`finish`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishOutcome {
    /// The terminal status and its fields were written (and the event published).
    Finished,
    /// The job had already ended with this status; nothing was written.
    AlreadyTerminal(JobStatus),
    /// `job:{jobId}` does not exist.
    Missing,
}

/// The fields a terminal transition writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    /// The terminal status to write: `success`, `failed` or `cancelled`.
    pub status: JobStatus,
    /// `finishedAt`.
    pub finished_at: String,
    /// `error`: one line (the constructors fold it with [`one_line`]).
    pub error: Option<String>,
    /// `branch`, when something was pushed.
    pub branch: Option<String>,
    /// `commitSha`, with `branch`.
    pub commit_sha: Option<String>,
    /// `prUrl`, `prNumber`, `prError`: the pull / merge request step after a push.
    pub pull_request: PullRequestFields,
}

/// What the pull / merge request step after a push recorded: the request's URL and number, or
/// why there is none (the job succeeds either way: the branch is pushed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullRequestFields {
    /// `prUrl`: the request's web URL.
    pub url: Option<String>,
    /// `prNumber`: GitHub `number` or GitLab `iid`.
    pub number: Option<u64>,
    /// `prError`: why no request could be opened.
    pub error: Option<String>,
}

impl Finish {
    /// A `success`, with the pushed `branch` and `commitSha` (both `None` when the agent changed
    /// nothing).
    pub fn success(
        finished_at: String,
        branch: Option<String>,
        commit_sha: Option<String>,
    ) -> Self {
        Self {
            status: JobStatus::Success,
            finished_at,
            error: None,
            branch,
            commit_sha,
            pull_request: PullRequestFields::default(),
        }
    }

    /// The same terminal write, with the pull / merge request fields (`prError` folded to one
    /// bounded line like `error`).
    pub fn with_pull_request(mut self, pr: PullRequestFields) -> Self {
        self.pull_request = PullRequestFields {
            error: pr.error.map(|e| one_line(&e)),
            ..pr
        };
        self
    }

    /// A `failed` end; `error` is folded to one bounded line.
    pub fn failed(finished_at: String, error: impl Into<String>) -> Self {
        Self {
            status: JobStatus::Failed,
            finished_at,
            error: Some(one_line(&error.into())),
            branch: None,
            commit_sha: None,
            pull_request: PullRequestFields::default(),
        }
    }

    /// A `cancelled` end; `reason` becomes the `error` field, folded like `failed`'s.
    pub fn cancelled(finished_at: String, reason: impl Into<String>) -> Self {
        Self {
            status: JobStatus::Cancelled,
            finished_at,
            error: Some(one_line(&reason.into())),
            branch: None,
            commit_sha: None,
            pull_request: PullRequestFields::default(),
        }
    }
}

/// The `error` field is one line: newlines folded, length bounded.
pub fn one_line(s: &str) -> String {
    const MAX: usize = 500;
    let folded = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if folded.chars().count() <= MAX {
        folded
    } else {
        let mut cut: String = folded.chars().take(MAX - 1).collect();
        cut.push('…');
        cut
    }
}

fn parse_status(reply: &[String]) -> JobStatus {
    reply
        .get(1)
        .and_then(|s| JobStatus::parse(s))
        .unwrap_or(JobStatus::Failed)
}

/// Moves `job:{jobId}` from `pending` to `running` with `startedAt` and `runnerId`, and
/// publishes the `running` event.
///
/// `attempt` is the runner's attempt number (1 for the first). A `running` job is taken over
/// only by the first runner of a later attempt that [`retry`] announced; `startedAt` keeps the
/// first attempt's time.
pub async fn start<C: ConnectionLike>(
    con: &mut C,
    job_id: &str,
    runner_id: &str,
    attempt: u32,
    started_at: &str,
) -> redis::RedisResult<StartOutcome> {
    let body = status_body(
        JobStatus::Running,
        &[("startedAt", started_at), ("runnerId", runner_id)],
        started_at,
    );
    let reply: Vec<String> = START
        .key(keys::job(job_id))
        .key(keys::job_output(job_id))
        .arg(runner_id)
        .arg(started_at)
        .arg(keys::job_events(job_id))
        .arg(body)
        .arg(attempt.to_string())
        .invoke_async(con)
        .await?;
    Ok(match reply.first().map(String::as_str) {
        Some("started") => {
            warn_unpublished(job_id, reply.get(1).map_or("", String::as_str));
            StartOutcome::Started
        }
        Some("terminal") => StartOutcome::AlreadyTerminal(parse_status(&reply)),
        Some("running") => StartOutcome::AlreadyRunning {
            runner_id: reply.get(1).cloned().unwrap_or_default(),
        },
        Some("missing") => StartOutcome::Missing,
        Some("superseded") => StartOutcome::Superseded {
            attempt: reply.get(1).cloned().unwrap_or_default(),
        },
        _ => StartOutcome::InvalidStatus(reply.get(1).cloned().unwrap_or_default()),
    })
}

/// What [`retry`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// `attempt` was raised, `step` cleared and the note appended to the output.
    Retrying,
    /// The job had already ended (e.g. the runner recorded its result just before it was
    /// stopped): adopt that instead of retrying.
    AlreadyTerminal(JobStatus),
    /// The hash is at this attempt or a later one already (a repeated call): nothing changed.
    AlreadyAt(String),
    /// `job:{jobId}` does not exist.
    Missing,
}

/// Moves an unfinished job to attempt `attempt` (> the current one), publishing the change,
/// then appends `note` to its output (and its events). The status stays what it was
/// (`running` once a runner started), so the user sees the job running on; the next attempt's
/// runner takes it over in [`start`]. A repeated call changes nothing and adds no note.
pub async fn retry<C: ConnectionLike>(
    con: &mut C,
    job_id: &str,
    attempt: u32,
    note: &str,
    timestamp: &str,
) -> redis::RedisResult<RetryOutcome> {
    let attempt_text = attempt.to_string();
    let reply: Vec<String> = RETRY
        .key(keys::job(job_id))
        .key(keys::job_output(job_id))
        .arg(keys::job_events(job_id))
        .arg(status_body(
            JobStatus::Running,
            &[("attempt", attempt_text.as_str())],
            timestamp,
        ))
        .arg(&attempt_text)
        .invoke_async(con)
        .await?;
    Ok(match reply.first().map(String::as_str) {
        Some("retrying") => {
            warn_unpublished(job_id, reply.get(1).map_or("", String::as_str));
            crate::events::push_output(con, job_id, &[note.to_owned()], timestamp).await?;
            RetryOutcome::Retrying
        }
        Some("terminal") => RetryOutcome::AlreadyTerminal(parse_status(&reply)),
        Some("current") => RetryOutcome::AlreadyAt(reply.get(1).cloned().unwrap_or_default()),
        _ => RetryOutcome::Missing,
    })
}

/// Records the step the runner `runner_id` has reached (see [`crate::record::step`]) and
/// publishes it, only while that runner holds the job: the operator reads it to know whether
/// running the job again is safe. Returns whether it was written.
pub async fn set_step<C: ConnectionLike>(
    con: &mut C,
    job_id: &str,
    runner_id: &str,
    step: &str,
    timestamp: &str,
) -> redis::RedisResult<bool> {
    let reply: Vec<String> = STEP
        .key(keys::job(job_id))
        .key(keys::job_output(job_id))
        .arg(keys::job_events(job_id))
        .arg(status_body(
            JobStatus::Running,
            &[("step", step)],
            timestamp,
        ))
        .arg(runner_id)
        .arg(step)
        .invoke_async(con)
        .await?;
    match reply.first().map(String::as_str) {
        Some("updated") => {
            warn_unpublished(job_id, reply.get(1).map_or("", String::as_str));
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Moves `job:{jobId}` to a terminal status unless it already is in one, and publishes the
/// status event (with the fields written) when it did.
pub async fn finish<C: ConnectionLike>(
    con: &mut C,
    job_id: &str,
    fin: &Finish,
) -> redis::RedisResult<FinishOutcome> {
    let mut fields = vec![("finishedAt", fin.finished_at.as_str())];
    let pr_number = fin.pull_request.number.map(|n| n.to_string());
    for (field, value) in [
        ("error", &fin.error),
        ("branch", &fin.branch),
        ("commitSha", &fin.commit_sha),
        ("prUrl", &fin.pull_request.url),
        ("prNumber", &pr_number),
        ("prError", &fin.pull_request.error),
    ] {
        if let Some(v) = value {
            fields.push((field, v.as_str()));
        }
    }
    let mut inv = FINISH.key(keys::job(job_id));
    inv.key(keys::job_output(job_id))
        .arg(keys::job_events(job_id))
        .arg(status_body(fin.status, &fields, &fin.finished_at))
        .arg(fin.status.as_str());
    for (field, value) in &fields {
        inv.arg(*field).arg(*value);
    }
    let reply: Vec<String> = inv.invoke_async(con).await?;
    Ok(match reply.first().map(String::as_str) {
        Some("finished") => {
            warn_unpublished(job_id, reply.get(1).map_or("", String::as_str));
            FinishOutcome::Finished
        }
        Some("terminal") => FinishOutcome::AlreadyTerminal(parse_status(&reply)),
        _ => FinishOutcome::Missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_request_errors_are_folded_too() {
        let fin = Finish::success("t".into(), Some("b".into()), Some("s".into()))
            .with_pull_request(PullRequestFields {
                url: None,
                number: None,
                error: Some("a\nb".into()),
            });
        assert_eq!(fin.pull_request.error.as_deref(), Some("a b"));
        assert_eq!(
            Finish::failed("t".into(), "x").pull_request,
            PullRequestFields::default()
        );
    }

    #[test]
    fn errors_are_folded_to_one_bounded_line() {
        assert_eq!(one_line("a\nb\r\n  c"), "a b c");
        let long = "x".repeat(2000);
        let out = one_line(&long);
        assert_eq!(out.chars().count(), 500);
        assert!(out.ends_with('…'));
    }
}
