//! The Redis contract between the Repobox web app, the operator and the job-runner.
//!
//! Everything both Rust binaries must agree on lives here, once: key names ([`keys`]),
//! the job record and its status machine ([`record`]), the atomic status transitions
//! ([`transitions`]), the token envelope ([`crypto`]), token masking ([`mask`]) and the
//! timestamp format ([`time`]). `docs/redis-contract.md` describes the same in prose.

pub mod crypto;
pub mod keys;
pub mod mask;
pub mod record;
pub mod time;
pub mod transitions;

pub use crypto::{CryptoError, EncryptionKey, KeyError, Token};
pub use mask::{Masker, mask_token};
pub use record::{JobRecord, JobStatus, ProviderRecord, RecordError};
