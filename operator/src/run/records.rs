//! The operator's Redis writes: outcomes the executor could not record (pod killed, deadline,
//! cancellation, bad entries), the per-user running counters for dashboards, and the expiry of
//! finished jobs' output lists.
//!
//! Every status change goes through the contract's atomic transitions, so a terminal state
//! that the executor (or anyone) wrote first is never overwritten, and the status the operator
//! decides (timeout, OOM, eviction, cancellation, bad entry) is published on
//! `job:{jobId}:events` in the same step, exactly when it is written (`contract::events`).

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use repobox_contract::transitions::{self, Finish, FinishOutcome, RetryOutcome};
use repobox_contract::{JobRecord, RecordError, keys, time};

use crate::Result;

/// Sets the expiry of a key only when it exists and has none, so that repeating it (every
/// reconcile of a finished job) never pushes the expiry further out.
const EXPIRE_IF_PERSISTENT: &str = r"
if redis.call('TTL', KEYS[1]) == -1 then
  return redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 0
";

/// The per-pass Redis inputs of admission (see [`JobRecords::pass_inputs`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassInputs {
    /// `runner:paused`'s reason while admission is paused for everyone.
    pub paused: Option<String>,
    /// Users in `runner:paused_users`, with their reason.
    pub paused_users: HashMap<String, String>,
    /// Users' raw `runner:user_limits` values.
    pub user_limits: HashMap<String, String>,
}

/// Redis access for outcomes, over an auto-reconnecting connection.
#[derive(Clone)]
pub struct JobRecords {
    con: ConnectionManager,
    /// `OUTPUT_TTL_SECONDS`; `None` keeps outputs forever.
    output_ttl: Option<Duration>,
    expire_script: std::sync::Arc<redis::Script>,
}

impl JobRecords {
    /// Over `con`; outputs are kept forever until [`JobRecords::with_output_ttl`] sets an expiry.
    pub fn new(con: ConnectionManager) -> Self {
        Self {
            con,
            output_ttl: None,
            expire_script: std::sync::Arc::new(redis::Script::new(EXPIRE_IF_PERSISTENT)),
        }
    }

    /// Finished jobs' `job:{id}:output` expire after `ttl` (`None`: kept forever).
    pub fn with_output_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.output_ttl = ttl;
        self
    }

    /// `job:{jobId}`, or `None` when the hash does not exist (or is unusable).
    pub async fn record(&self, job_id: &str) -> Result<Option<JobRecord>> {
        let Some(hash) = self.record_fields(job_id).await? else {
            return Ok(None);
        };
        Ok(match JobRecord::from_hash(job_id, hash) {
            Ok(r) => Some(r),
            Err(RecordError::Missing { .. }) => None,
            Err(e) => {
                tracing::warn!(job_id, error = %e, "job record is unusable");
                None
            }
        })
    }

    /// The raw fields of `job:{jobId}`; `None` when the hash does not exist.
    pub async fn record_fields(&self, job_id: &str) -> Result<Option<HashMap<String, String>>> {
        let mut con = self.con.clone();
        let hash: HashMap<String, String> = con.hgetall(keys::job(job_id)).await?;
        Ok((!hash.is_empty()).then_some(hash))
    }

    /// Marks the job `failed` with `error` unless it already ended (and then publishes it).
    pub async fn fail(&self, job_id: &str, error: &str) -> Result<FinishOutcome> {
        let mut con = self.con.clone();
        Ok(transitions::finish(&mut con, job_id, &Finish::failed(time::now(), error)).await?)
    }

    /// Moves an unfinished job to attempt `attempt` and appends `note` to its output (see
    /// [`transitions::retry`]).
    pub async fn retry(&self, job_id: &str, attempt: u32, note: &str) -> Result<RetryOutcome> {
        let mut con = self.con.clone();
        Ok(transitions::retry(&mut con, job_id, attempt, note, &time::now()).await?)
    }

    /// Marks the job `cancelled` unless it already ended (and then publishes it).
    pub async fn cancel(&self, job_id: &str, reason: &str) -> Result<FinishOutcome> {
        let mut con = self.con.clone();
        Ok(transitions::finish(&mut con, job_id, &Finish::cancelled(time::now(), reason)).await?)
    }

    /// Sets `runner:user:{userId}:running`.
    pub async fn set_user_running(&self, user_id: &str, running: usize) -> Result<()> {
        let mut con = self.con.clone();
        let _: () = con.set(keys::user_running(user_id), running).await?;
        Ok(())
    }

    /// What an admission pass reads besides the cluster, in one round trip: the global pause
    /// reason, and for `users` (those with queued jobs) their pause reason and their
    /// `runner:user_limits` value. HMGET of known fields only: never a scan of the hashes.
    pub async fn pass_inputs(&self, users: &[&str]) -> Result<PassInputs> {
        let mut con = self.con.clone();
        let mut pipe = redis::pipe();
        pipe.hget(keys::PAUSED, keys::PAUSED_REASON_FIELD);
        if users.is_empty() {
            let (paused,): (Option<String>,) = pipe.query_async(&mut con).await?;
            return Ok(PassInputs {
                paused,
                ..PassInputs::default()
            });
        }
        pipe.cmd("HMGET").arg(keys::PAUSED_USERS).arg(users);
        pipe.cmd("HMGET").arg(keys::USER_LIMITS).arg(users);
        let (paused, held, limits): (Option<String>, Vec<Option<String>>, Vec<Option<String>>) =
            pipe.query_async(&mut con).await?;
        let pair = |values: Vec<Option<String>>| -> HashMap<String, String> {
            users
                .iter()
                .zip(values)
                .filter_map(|(u, v)| Some(((*u).to_owned(), v?)))
                .collect()
        };
        Ok(PassInputs {
            paused,
            paused_users: pair(held),
            user_limits: pair(limits),
        })
    }

    /// The user ids that have a `runner:user:{userId}:running` key, whoever wrote it (SCAN, so
    /// Redis is never blocked).
    pub async fn user_running_ids(&self) -> Result<Vec<String>> {
        let (prefix, suffix) = user_running_affixes();
        let mut con = self.con.clone();
        let mut iter: redis::AsyncIter<String> = con
            .scan_match(format!("{}*{}", glob_escape(&prefix), glob_escape(&suffix)))
            .await?;
        let mut users = Vec::new();
        while let Some(key) = iter.next_item().await {
            if let Some(user) = user_of_running_key(&key?) {
                users.push(user.to_owned());
            }
        }
        users.sort();
        users.dedup();
        Ok(users)
    }

    /// Starts the expiry of a finished job's `job:{jobId}:output` (`OUTPUT_TTL_SECONDS`). Does
    /// nothing when outputs are kept, when the list does not exist, or when it already expires.
    /// Best effort: a failure is logged and never holds up recording an outcome (the retention
    /// pass tries again before the RepoboxJob is deleted).
    pub async fn expire_output(&self, job_id: &str) {
        let Some(ttl) = self.output_ttl else {
            return;
        };
        let mut con = self.con.clone();
        let r: redis::RedisResult<i64> = self
            .expire_script
            .key(keys::job_output(job_id))
            .arg(ttl.as_secs().max(1))
            .invoke_async(&mut con)
            .await;
        if let Err(e) = r {
            tracing::warn!(job_id, error = %e, "setting the output's expiry failed");
        }
    }
}

/// What comes before and after the user id in `runner:user:{userId}:running`, taken from the
/// contract's key function so the two can never disagree.
fn user_running_affixes() -> (String, String) {
    const MARK: &str = "\u{0}";
    let key = keys::user_running(MARK);
    match key.split_once(MARK) {
        Some((p, s)) => (p.to_owned(), s.to_owned()),
        None => (key, String::new()),
    }
}

/// The user id of a `runner:user:{userId}:running` key (user ids may contain `:`).
pub fn user_of_running_key(key: &str) -> Option<&str> {
    let (prefix, suffix) = user_running_affixes();
    key.strip_prefix(prefix.as_str())?
        .strip_suffix(suffix.as_str())
        .filter(|u| !u.is_empty())
}

/// Escapes the glob characters of a SCAN MATCH pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_come_back_from_running_keys() {
        for user in ["alice", "user@example.com", "a:b:running", "x*y"] {
            assert_eq!(user_of_running_key(&keys::user_running(user)), Some(user));
        }
        assert_eq!(user_of_running_key("runner:user::running"), None);
        assert_eq!(user_of_running_key("runner:user:alice"), None);
        assert_eq!(user_of_running_key("job:alice:running"), None);
    }

    #[test]
    fn the_scan_pattern_matches_only_running_keys() {
        let (prefix, suffix) = user_running_affixes();
        assert_eq!(prefix, "runner:user:");
        assert_eq!(suffix, ":running");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
