//! Errors that stop the executor before it can record a job outcome itself, and the pull /
//! merge request step's errors ([`Error::Forge`]: recorded as `prError`, never fatal).
//! Job failures (auth, push rejected, agent exited, ...) are not errors here: they are
//! outcomes written to the job record (see [`crate::run::Outcome`]).

use repobox_contract::RecordError;

/// What stops the executor without an outcome it could record (see the module doc).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Redis command failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// `job:{jobId}` does not exist (an unusable hash is recorded as a failure instead).
    #[error("{0}")]
    Record(#[from] RecordError),
    /// The Redis client could not be built (`REDIS_URL`, `REDIS_CA_FILE`).
    #[error("{0}")]
    RedisClient(#[from] repobox_contract::RedisClientError),
    /// The pull / merge request could not be opened: one line a user can act on, never a token.
    #[error("{0}")]
    Forge(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
