//! Redis key names, exactly as the web app writes them.

/// The stream the web app XADDs one entry per new job to.
pub const JOBS_STREAM: &str = "jobs:stream";
/// The consumer group the runner side reads `jobs:stream` with.
pub const CONSUMER_GROUP: &str = "jobs:stream:runners";

/// `job:{jobId}` — the job record (hash).
pub fn job(job_id: &str) -> String {
    format!("job:{job_id}")
}

/// `job:{jobId}:output` — the output lines shown to the user (list, RPUSH).
pub fn job_output(job_id: &str) -> String {
    format!("job:{job_id}:output")
}

/// `job:{jobId}:events` — the pub/sub channel of the job's live events (`contract::events`).
pub fn job_events(job_id: &str) -> String {
    format!("job:{job_id}:events")
}

/// `git_provider:{userId}:{providerId}` — a user's git host connection (hash).
pub fn git_provider(user_id: &str, provider_id: &str) -> String {
    format!("git_provider:{user_id}:{provider_id}")
}

/// `runner:user:{userId}:running` — how many of a user's jobs run now (string integer).
pub fn user_running(user_id: &str) -> String {
    format!("runner:user:{user_id}:running")
}

/// `runner:paused` — hash; while its `reason` field exists the runner side takes no new work
/// (intake stops reading, admission starts nothing). Written by `repobox-operator pause`.
pub const PAUSED: &str = "runner:paused";
/// The field of [`PAUSED`] whose presence means "paused"; its value is the reason shown.
pub const PAUSED_REASON_FIELD: &str = "reason";
/// The field of [`PAUSED`] holding when the pause began (RFC 3339), for operators only.
pub const PAUSED_SINCE_FIELD: &str = "since";
/// `runner:paused_users` — hash userId → reason: these users' queued jobs are not started.
pub const PAUSED_USERS: &str = "runner:paused_users";
/// `runner:user_limits` — hash userId → a running limit (integer) or a plan name; optional,
/// written by the web app to change a user's limit without a redeploy.
pub const USER_LIMITS: &str = "runner:user_limits";

/// The branch a job pushes: `repobox/{first 8 chars of jobId}`.
pub fn job_branch(job_id: &str) -> String {
    let prefix: String = job_id.chars().take(8).collect();
    format!("repobox/{prefix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_follow_the_contract() {
        assert_eq!(job("abc"), "job:abc");
        assert_eq!(job_output("abc"), "job:abc:output");
        assert_eq!(job_events("abc"), "job:abc:events");
        assert_eq!(git_provider("u1", "p2"), "git_provider:u1:p2");
        assert_eq!(user_running("u1"), "runner:user:u1:running");
        assert_eq!(PAUSED, "runner:paused");
        assert_eq!(PAUSED_USERS, "runner:paused_users");
        assert_eq!(USER_LIMITS, "runner:user_limits");
    }

    #[test]
    fn branch_uses_the_first_eight_characters() {
        assert_eq!(job_branch("0123456789abcdef"), "repobox/01234567");
        assert_eq!(job_branch("short"), "repobox/short");
        // Characters, not bytes: a multi-byte id never splits a code point.
        assert_eq!(job_branch("ééééééééé"), "repobox/éééééééé");
    }
}
