//! The Redis contract between the Repobox web app, the operator and the job-runner.
//!
//! Everything both Rust binaries must agree on lives here, once: key names ([`keys`]),
//! the job record and its status machine ([`record`]), the atomic status transitions
//! ([`transitions`]), the token envelope ([`crypto`]), token masking ([`mask`]), the
//! timestamp format ([`time`]) and the URL rules ([`urls`]: Redis URL validation, repository
//! URL cleaning, provider host check). `docs/redis-contract.md` describes the same in prose.

pub mod crypto;
pub mod keys;
pub mod mask;
pub mod record;
pub mod time;
pub mod transitions;
pub mod urls;

pub use crypto::{CryptoError, EncryptionKey, KeyError, Token};
pub use mask::{Masker, mask_token};
pub use record::{JobRecord, JobStatus, ProviderRecord, RecordError};

/// Installs rustls' `ring` provider as the process default, once: `rediss://` connections (and
/// kube's client in the operator) need one, and two providers in the build would otherwise
/// leave rustls unable to pick. Call at start-up; later calls do nothing.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
