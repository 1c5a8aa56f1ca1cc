//! The job record (`job:{jobId}`) and the git provider record, read from Redis hashes.

use std::collections::HashMap;

/// The job's `status` field. Terminal states are never left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Written by the web app; waiting for admission and a runner.
    Pending,
    /// A runner took it ([`crate::transitions::start`]).
    Running,
    /// Ended well: pushed a branch, or the agent changed nothing.
    Success,
    /// Ended with an `error` a user can act on.
    Failed,
    /// Cancelled (the RepoboxJob was deleted or got `spec.cancel`); `error` says why.
    Cancelled,
}

impl JobStatus {
    /// The value as stored in the `status` field and in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Reads a `status` field value; `None` for anything the contract does not name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "success" => Self::Success,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// Whether the status is final (`success`, `failed`, `cancelled`): no transition leaves it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Success | Self::Failed | Self::Cancelled)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `step` field: how far the runner of the current attempt got. The operator runs a job
/// again after an infrastructure disruption only while nothing can have left the pod yet.
pub mod step {
    /// Cloning the repository.
    pub const CLONING: &str = "cloning";
    /// The agent is changing the tree.
    pub const AGENT: &str = "agent";
    /// Committing the agent's changes (local only).
    pub const COMMITTING: &str = "committing";
    /// Pushing the branch: from here on the remote may have changed.
    pub const PUSHING: &str = "pushing";
    /// Every step, in order.
    pub const ALL: [&str; 4] = [CLONING, AGENT, COMMITTING, PUSHING];

    /// Whether a job whose runner was lost at `step` (`None`: it never recorded one) can run
    /// again without doing anything twice. Unknown steps are not safe.
    pub fn retry_safe(step: Option<&str>) -> bool {
        matches!(step, None | Some("" | CLONING | AGENT | COMMITTING))
    }
}

/// Why a hash is not a usable record. Names the key and the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The hash is empty or absent.
    #[error("{key} does not exist")]
    Missing {
        /// The Redis key, e.g. `job:{jobId}`.
        key: String,
    },
    /// A required field is absent or empty.
    #[error("{key} has no `{field}` field")]
    MissingField {
        /// The Redis key.
        key: String,
        /// The hash field that is missing, e.g. `repoUrl`.
        field: &'static str,
    },
    /// `status` holds a value [`JobStatus::parse`] does not know.
    #[error("{key} has an unknown status `{value}`")]
    BadStatus {
        /// The Redis key.
        key: String,
        /// The `status` value found.
        value: String,
    },
}

/// `job:{jobId}` as the web app wrote it and the runner side updated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// `id` (the key's id when the hash has none).
    pub id: String,
    /// `userId`: whose job it is (quotas, the provider key).
    pub user_id: String,
    /// `providerId`: which `git_provider:{userId}:{providerId}` holds the token.
    pub provider_id: String,
    /// `repoUrl`: the HTTPS clone URL as the web app wrote it.
    pub repo_url: String,
    /// `baseBranch`: the branch to start from; `None` means the remote's default branch.
    pub base_branch: Option<String>,
    /// `prompt`: the task for the agent (empty when absent).
    pub prompt: String,
    /// `createdAt`: when the web app queued the job.
    pub created_at: Option<String>,
    /// `status` (`pending` when absent).
    pub status: JobStatus,
    /// `startedAt`: when the first attempt's runner took the job.
    pub started_at: Option<String>,
    /// `finishedAt`: set by every terminal transition.
    pub finished_at: Option<String>,
    /// `branch`: the pushed branch, on `success` when something was pushed.
    pub branch: Option<String>,
    /// `commitSha`: the pushed commit, with `branch`.
    pub commit_sha: Option<String>,
    /// `error`: one line a user can act on, on `failed` and `cancelled`.
    pub error: Option<String>,
    /// `runnerId`: the pod of the current attempt.
    pub runner_id: Option<String>,
    /// The attempt the job is at (1 unless the operator retried it).
    pub attempt: u32,
    /// The step the current attempt's runner reached ([`step`]).
    pub step: Option<String>,
    /// `openPullRequest` as the web app wrote it (`true`/`false`; absent: the runner's
    /// default). Kept as text: the runner decides what an odd value means (see its `forge`).
    pub open_pull_request: Option<String>,
    /// The pull / merge request the runner opened or found after the push.
    pub pr_url: Option<String>,
    /// Its number (GitHub `number`, GitLab `iid`), as text.
    pub pr_number: Option<String>,
    /// Why no request could be opened although the branch was pushed (the job still succeeded).
    pub pr_error: Option<String>,
}

fn take(map: &mut HashMap<String, String>, field: &str) -> Option<String> {
    map.remove(field).filter(|v| !v.is_empty())
}

impl JobRecord {
    /// Builds the record from an HGETALL reply. `job_id` is the id from the key, used
    /// when the hash lacks an `id` field.
    pub fn from_hash(job_id: &str, mut map: HashMap<String, String>) -> Result<Self, RecordError> {
        let key = crate::keys::job(job_id);
        if map.is_empty() {
            return Err(RecordError::Missing { key });
        }
        let required = |map: &mut HashMap<String, String>, field: &'static str| {
            take(map, field).ok_or_else(|| RecordError::MissingField {
                key: key.clone(),
                field,
            })
        };
        let status = match take(&mut map, "status") {
            None => JobStatus::Pending,
            Some(v) => JobStatus::parse(&v).ok_or_else(|| RecordError::BadStatus {
                key: key.clone(),
                value: v,
            })?,
        };
        Ok(Self {
            id: take(&mut map, "id").unwrap_or_else(|| job_id.to_owned()),
            user_id: required(&mut map, "userId")?,
            provider_id: required(&mut map, "providerId")?,
            repo_url: required(&mut map, "repoUrl")?,
            base_branch: take(&mut map, "baseBranch"),
            prompt: take(&mut map, "prompt").unwrap_or_default(),
            created_at: take(&mut map, "createdAt"),
            status,
            started_at: take(&mut map, "startedAt"),
            finished_at: take(&mut map, "finishedAt"),
            branch: take(&mut map, "branch"),
            commit_sha: take(&mut map, "commitSha"),
            error: take(&mut map, "error"),
            runner_id: take(&mut map, "runnerId"),
            attempt: take(&mut map, "attempt")
                .and_then(|a| a.parse().ok())
                .filter(|a| *a >= 1)
                .unwrap_or(1),
            step: take(&mut map, "step"),
            open_pull_request: take(&mut map, "openPullRequest"),
            pr_url: take(&mut map, "prUrl"),
            pr_number: take(&mut map, "prNumber"),
            pr_error: take(&mut map, "prError"),
        })
    }
}

/// `git_provider:{userId}:{providerId}`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderRecord {
    /// `type`: `github` or `gitlab` (absent: `github`); see [`crate::urls::ProviderHost`].
    pub kind: Option<String>,
    /// `baseUrl`: the self-hosted or Enterprise instance, when not github.com / gitlab.com.
    pub base_url: Option<String>,
    /// `encryptedToken`: the token in the [`crate::crypto`] envelope, never decrypted here.
    pub encrypted_token: String,
}

impl std::fmt::Debug for ProviderRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderRecord")
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("encrypted_token", &"<encrypted>")
            .finish()
    }
}

impl ProviderRecord {
    /// Builds the record from an HGETALL reply of `git_provider:{user_id}:{provider_id}` (the ids
    /// only name the key in errors).
    pub fn from_hash(
        user_id: &str,
        provider_id: &str,
        mut map: HashMap<String, String>,
    ) -> Result<Self, RecordError> {
        let key = crate::keys::git_provider(user_id, provider_id);
        if map.is_empty() {
            return Err(RecordError::Missing { key });
        }
        Ok(Self {
            kind: take(&mut map, "type"),
            base_url: take(&mut map, "baseUrl"),
            encrypted_token: take(&mut map, "encryptedToken").ok_or(RecordError::MissingField {
                key,
                field: "encryptedToken",
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn status_round_trip_and_terminality() {
        for s in [
            JobStatus::Pending,
            JobStatus::Running,
            JobStatus::Success,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ] {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        assert!(!JobStatus::Pending.is_terminal());
        assert!(!JobStatus::Running.is_terminal());
        assert!(JobStatus::Success.is_terminal());
        assert!(JobStatus::Failed.is_terminal());
        assert!(JobStatus::Cancelled.is_terminal());
        assert_eq!(JobStatus::parse("done"), None);
    }

    #[test]
    fn parses_a_web_app_record() {
        let r = JobRecord::from_hash(
            "j1",
            hash(&[
                ("id", "j1"),
                ("userId", "u1"),
                ("providerId", "p1"),
                ("repoUrl", "https://github.com/acme/api.git"),
                ("prompt", "Fix the bug"),
                ("status", "pending"),
                ("createdAt", "2026-11-23T10:15:30.123Z"),
                ("baseBranch", ""),
            ]),
        )
        .unwrap();
        assert_eq!(r.user_id, "u1");
        assert_eq!(r.status, JobStatus::Pending);
        assert_eq!(r.base_branch, None, "empty optional fields read as absent");
        assert_eq!(r.open_pull_request, None);
        assert_eq!(r.pr_url, None);
    }

    #[test]
    fn parses_the_pull_request_fields() {
        let r = JobRecord::from_hash(
            "j1",
            hash(&[
                ("userId", "u1"),
                ("providerId", "p1"),
                ("repoUrl", "https://github.com/acme/api.git"),
                ("status", "success"),
                ("openPullRequest", "false"),
                ("prUrl", "https://github.com/acme/api/pull/7"),
                ("prNumber", "7"),
                ("prError", ""),
            ]),
        )
        .unwrap();
        assert_eq!(r.open_pull_request.as_deref(), Some("false"));
        assert_eq!(
            r.pr_url.as_deref(),
            Some("https://github.com/acme/api/pull/7")
        );
        assert_eq!(r.pr_number.as_deref(), Some("7"));
        assert_eq!(r.pr_error, None);
    }

    #[test]
    fn attempt_and_step_default_to_a_first_attempt_that_recorded_nothing() {
        let base = [("userId", "u"), ("providerId", "p"), ("repoUrl", "x")];
        let r = JobRecord::from_hash("j", hash(&base)).unwrap();
        assert_eq!((r.attempt, r.step), (1, None));
        for (raw, want) in [("3", 3), ("1", 1), ("0", 1), ("-2", 1), ("two", 1), ("", 1)] {
            let mut h = hash(&base);
            h.insert("attempt".into(), raw.into());
            h.insert("step".into(), "agent".into());
            let r = JobRecord::from_hash("j", h).unwrap();
            assert_eq!(r.attempt, want, "attempt {raw:?}");
            assert_eq!(r.step.as_deref(), Some("agent"));
        }
    }

    #[test]
    fn retry_is_safe_only_before_the_push() {
        assert!(step::retry_safe(None));
        assert!(step::retry_safe(Some("")));
        let safe: Vec<bool> = step::ALL
            .iter()
            .map(|s| step::retry_safe(Some(s)))
            .collect();
        assert_eq!(safe, [true, true, true, false]);
        assert!(
            !step::retry_safe(Some("pull_request")),
            "unknown steps are unsafe"
        );
    }

    #[test]
    fn missing_hash_and_fields_are_named() {
        assert_eq!(
            JobRecord::from_hash("j1", HashMap::new())
                .unwrap_err()
                .to_string(),
            "job:j1 does not exist"
        );
        let err =
            JobRecord::from_hash("j1", hash(&[("userId", "u1"), ("providerId", "p")])).unwrap_err();
        assert_eq!(err.to_string(), "job:j1 has no `repoUrl` field");
        let err = JobRecord::from_hash(
            "j1",
            hash(&[
                ("userId", "u"),
                ("providerId", "p"),
                ("repoUrl", "x"),
                ("status", "weird"),
            ]),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "job:j1 has an unknown status `weird`");
    }

    #[test]
    fn provider_debug_hides_the_ciphertext() {
        let p = ProviderRecord::from_hash("u", "p", hash(&[("encryptedToken", "a:b:c")])).unwrap();
        assert!(!format!("{p:?}").contains("a:b:c"));
        assert_eq!(
            ProviderRecord::from_hash("u", "p", hash(&[("type", "github")]))
                .unwrap_err()
                .to_string(),
            "git_provider:u:p has no `encryptedToken` field"
        );
    }
}
