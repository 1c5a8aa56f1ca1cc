//! Atomic status transitions of `job:{jobId}`, as Lua scripts run inside Redis.
//!
//! Each script reads and writes the hash in one step, so two runners can never both
//! start a job, and a terminal status (`success`, `failed`, `cancelled`) is never
//! overwritten — whoever writes first wins, everyone later is told what is there.

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionLike;

use crate::record::JobStatus;

static START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == '' then status = 'pending' end
if status == 'success' or status == 'failed' or status == 'cancelled' then
  return {'terminal', status}
end
if status == 'running' then
  return {'running', redis.call('HGET', KEYS[1], 'runnerId') or ''}
end
if status ~= 'pending' then return {'invalid', status} end
redis.call('HSET', KEYS[1], 'status', 'running', 'startedAt', ARGV[2], 'runnerId', ARGV[1])
return {'started'}
",
    )
});

static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'success' or status == 'failed' or status == 'cancelled' then
  return {'terminal', status}
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], unpack(ARGV, 2))
return {'finished'}
",
    )
});

/// What [`start`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// The job moved from `pending` to `running` for this runner.
    Started,
    /// The job had already ended; it must not run again.
    AlreadyTerminal(JobStatus),
    /// Another runner (or an earlier attempt) already moved it to `running`.
    AlreadyRunning { runner_id: String },
    /// `job:{jobId}` does not exist.
    Missing,
    /// The status field holds something the contract does not know.
    InvalidStatus(String),
}

/// What [`finish`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishOutcome {
    Finished,
    AlreadyTerminal(JobStatus),
    Missing,
}

/// The fields a terminal transition writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub status: JobStatus,
    pub finished_at: String,
    pub error: Option<String>,
    pub branch: Option<String>,
    pub commit_sha: Option<String>,
    /// `prUrl`, `prNumber`, `prError`: the pull / merge request step after a push.
    pub pull_request: PullRequestFields,
}

/// What the pull / merge request step after a push recorded: the request's URL and number, or
/// why there is none (the job succeeds either way: the branch is pushed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullRequestFields {
    pub url: Option<String>,
    pub number: Option<u64>,
    pub error: Option<String>,
}

impl Finish {
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

/// Moves `job:{jobId}` from `pending` to `running` with `startedAt` and `runnerId`.
pub async fn start<C: ConnectionLike>(
    con: &mut C,
    job_id: &str,
    runner_id: &str,
    started_at: &str,
) -> redis::RedisResult<StartOutcome> {
    let reply: Vec<String> = START
        .key(crate::keys::job(job_id))
        .arg(runner_id)
        .arg(started_at)
        .invoke_async(con)
        .await?;
    Ok(match reply.first().map(String::as_str) {
        Some("started") => StartOutcome::Started,
        Some("terminal") => StartOutcome::AlreadyTerminal(parse_status(&reply)),
        Some("running") => StartOutcome::AlreadyRunning {
            runner_id: reply.get(1).cloned().unwrap_or_default(),
        },
        Some("missing") => StartOutcome::Missing,
        _ => StartOutcome::InvalidStatus(reply.get(1).cloned().unwrap_or_default()),
    })
}

/// Moves `job:{jobId}` to a terminal status unless it already is in one.
pub async fn finish<C: ConnectionLike>(
    con: &mut C,
    job_id: &str,
    fin: &Finish,
) -> redis::RedisResult<FinishOutcome> {
    let mut inv = FINISH.key(crate::keys::job(job_id));
    inv.arg(fin.status.as_str())
        .arg("finishedAt")
        .arg(&fin.finished_at);
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
            inv.arg(field).arg(v);
        }
    }
    let reply: Vec<String> = inv.invoke_async(con).await?;
    Ok(match reply.first().map(String::as_str) {
        Some("finished") => FinishOutcome::Finished,
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
