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
    }

    #[test]
    fn branch_uses_the_first_eight_characters() {
        assert_eq!(job_branch("0123456789abcdef"), "repobox/01234567");
        assert_eq!(job_branch("short"), "repobox/short");
        // Characters, not bytes: a multi-byte id never splits a code point.
        assert_eq!(job_branch("ééééééééé"), "repobox/éééééééé");
    }
}
