//! Plays the web app's side of the Redis contract: writes job and provider hashes and
//! XADDs stream entries exactly as the Next.js app does, so tests and the demo submit jobs
//! the real way.

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use repobox_contract::{EncryptionKey, keys, time};

/// A job as the web app creates it.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub user_id: String,
    pub provider_id: String,
    pub repo_url: String,
    pub base_branch: Option<String>,
    pub prompt: String,
    /// `openPullRequest` (`true`/`false`), when the job sets it.
    pub open_pull_request: Option<String>,
}

impl NewJob {
    pub fn new(id: &str, user_id: &str, repo_url: &str, prompt: &str) -> Self {
        Self {
            id: id.to_owned(),
            user_id: user_id.to_owned(),
            provider_id: "github-1".to_owned(),
            repo_url: repo_url.to_owned(),
            base_branch: None,
            prompt: prompt.to_owned(),
            open_pull_request: None,
        }
    }
}

/// Writes `job:{id}` with status `pending` (no stream entry).
pub async fn create_job(con: &mut MultiplexedConnection, job: &NewJob) -> redis::RedisResult<()> {
    let mut fields = vec![
        ("id", job.id.clone()),
        ("userId", job.user_id.clone()),
        ("providerId", job.provider_id.clone()),
        ("repoUrl", job.repo_url.clone()),
        ("prompt", job.prompt.clone()),
        ("status", "pending".to_owned()),
        ("createdAt", time::now()),
    ];
    if let Some(b) = &job.base_branch {
        fields.push(("baseBranch", b.clone()));
    }
    if let Some(v) = &job.open_pull_request {
        fields.push(("openPullRequest", v.clone()));
    }
    con.hset_multiple(keys::job(&job.id), &fields).await
}

/// Writes `git_provider:{user}:{provider}` with the token encrypted like Node's crypto: a
/// GitHub provider whose `baseUrl` (GitHub Enterprise style) is `base_url`, e.g. the test git
/// host's [`crate::githost::GitHost::base_url`] — the runner only sends the token there.
pub async fn create_provider(
    con: &mut MultiplexedConnection,
    user_id: &str,
    provider_id: &str,
    key: &EncryptionKey,
    token: &str,
    base_url: &str,
) -> redis::RedisResult<()> {
    create_provider_of_type(con, user_id, provider_id, key, token, "github", base_url).await
}

/// Like [`create_provider`], for a provider of `kind` (`github` or `gitlab`).
pub async fn create_provider_of_type(
    con: &mut MultiplexedConnection,
    user_id: &str,
    provider_id: &str,
    key: &EncryptionKey,
    token: &str,
    kind: &str,
    base_url: &str,
) -> redis::RedisResult<()> {
    con.hset_multiple(
        keys::git_provider(user_id, provider_id),
        &[
            ("type", kind.to_owned()),
            ("baseUrl", base_url.to_owned()),
            ("encryptedToken", key.encrypt(token)),
        ],
    )
    .await
}

/// XADDs the job's stream entry (`jobId`, `userId`) and returns the entry id.
pub async fn enqueue(con: &mut MultiplexedConnection, job: &NewJob) -> redis::RedisResult<String> {
    con.xadd(
        keys::JOBS_STREAM,
        "*",
        &[("jobId", job.id.as_str()), ("userId", job.user_id.as_str())],
    )
    .await
}

/// Creates the job hash and enqueues it: what the web app does on "Run".
pub async fn submit(con: &mut MultiplexedConnection, job: &NewJob) -> redis::RedisResult<String> {
    create_job(con, job).await?;
    enqueue(con, job).await
}
