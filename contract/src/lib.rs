//! The Redis contract between the Repobox web app, the operator and the job-runner.
//!
//! Everything both Rust binaries must agree on lives here, once: key names ([`keys`]),
//! the job record and its status machine ([`record`]), the atomic status transitions
//! ([`transitions`]), the live events published with every output and status write
//! ([`events`]), the token envelope ([`crypto`]), token masking ([`mask`]), the timestamp
//! format ([`time`]), the URL rules ([`urls`]: Redis URL validation, repository URL
//! cleaning, provider host check), the jobs stream's entry ids ([`stream`]), and between the
//! operator and the runner pod: the pod's layout ([`pod`]) and the runner's environment
//! ([`runner_env`]). `docs/redis-contract.md` describes the same in prose.

#![warn(missing_docs)]

pub mod crypto;
pub mod events;
pub mod keys;
pub mod mask;
pub mod pod;
pub mod record;
pub mod runner_env;
pub mod stream;
pub mod time;
pub mod transitions;
pub mod urls;

pub use crypto::{CryptoError, EncryptionKey, KeyError, Token};
pub use mask::{Masker, mask_token};
pub use record::{JobRecord, JobStatus, ProviderRecord, RecordError};
pub use stream::{EntryId, ParseEntryIdError};

/// Installs rustls' `ring` provider as the process default, once: `rediss://` connections (and
/// kube's client in the operator) need one, and two providers in the build would otherwise
/// leave rustls unable to pick. Call at start-up; later calls do nothing.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why a Redis client could not be built (never contains the URL's password).
#[derive(Debug, thiserror::Error)]
pub enum RedisClientError {
    /// `REDIS_URL` was refused by [`urls::check_redis_url`].
    #[error("REDIS_URL: {0}")]
    Url(#[from] urls::UrlError),
    /// `REDIS_CA_FILE` could not be read.
    #[error("cannot read the Redis CA file {path}: {source}")]
    CaFile {
        /// The file's path, as configured.
        path: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The `redis` crate refused the URL or the CA (only the error kind is kept: the message might
    /// quote the URL).
    #[error("cannot use the Redis URL with its CA: {0}")]
    Tls(String),
}

/// The Redis client both binaries use: the URL checked by [`urls::check_redis_url`], and with
/// `ca_file` (PEM), TLS connections trust that CA instead of the system roots.
pub fn redis_client(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<redis::Client, RedisClientError> {
    urls::check_redis_url(url)?;
    let Some(path) = ca_file else {
        return redis::Client::open(url.trim())
            .map_err(|e| RedisClientError::Tls(format!("{:?}", e.kind())));
    };
    let pem = std::fs::read(path).map_err(|source| RedisClientError::CaFile {
        path: path.display().to_string(),
        source,
    })?;
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    };
    redis::Client::build_with_tls(url.trim(), certs)
        .map_err(|e| RedisClientError::Tls(format!("{:?}", e.kind())))
}
