//! Errors that stop the executor before it can record a job outcome itself, and the pull /
//! merge request step's errors ([`Error::Forge`]: recorded as `prError`, never fatal).
//! Job failures (auth, push rejected, agent exited, ...) are not errors here: they are
//! outcomes written to the job record (see [`crate::run::Outcome`]).

use repobox_contract::RecordError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Record(#[from] RecordError),
    #[error("{0}")]
    RedisClient(#[from] repobox_contract::RedisClientError),
    /// The pull / merge request could not be opened: one line a user can act on, never a token.
    #[error("{0}")]
    Forge(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
