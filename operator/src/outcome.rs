//! The operator's Redis writes: outcomes the executor could not record (pod killed, deadline,
//! cancellation, bad entries) and the per-user running counters for dashboards.
//!
//! Every status change goes through the contract's atomic transitions, so a terminal state
//! that the executor (or anyone) wrote first is never overwritten.

use std::collections::HashMap;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use repobox_contract::transitions::{self, Finish, FinishOutcome};
use repobox_contract::{JobRecord, RecordError, keys, time};

use crate::Result;

/// Redis access for outcomes, over an auto-reconnecting connection.
#[derive(Clone)]
pub struct Outcomes {
    con: ConnectionManager,
}

impl Outcomes {
    pub fn new(con: ConnectionManager) -> Self {
        Self { con }
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

    /// Marks the job `failed` with `error` unless it already ended.
    pub async fn fail(&self, job_id: &str, error: &str) -> Result<FinishOutcome> {
        let mut con = self.con.clone();
        Ok(transitions::finish(&mut con, job_id, &Finish::failed(time::now(), error)).await?)
    }

    /// Marks the job `cancelled` unless it already ended.
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
}
