//! The one error type of the operator crate.
//!
//! Every fallible function in the crate returns [`Result`]. Variants carry enough context to be
//! useful in a log line or a Kubernetes event, and never a secret value: settings are named, not
//! echoed, when their value may be sensitive (the Redis URL).

/// Errors raised by the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting (environment variable / flag) has a value the operator cannot use.
    ///
    /// `setting` is the environment variable name, so the message points the operator's
    /// administrator at the exact line of the Deployment to fix.
    #[error("invalid setting {setting}: {reason}")]
    InvalidConfig {
        /// The environment variable name, e.g. `RUNNER_TOLERATIONS`.
        setting: &'static str,
        /// What is wrong with it (never the value of a secret setting).
        reason: String,
    },

    /// A Kubernetes object lacks a field the operator needs (e.g. a RepoboxJob without a `uid`,
    /// which happens when it was not read back from the API server).
    #[error("{kind} {name:?} has no {field}")]
    MissingObjectKey {
        /// The object's kind, e.g. `RepoboxJob`.
        kind: &'static str,
        /// The object's name, empty when the name itself is missing.
        name: String,
        /// The missing field, e.g. `metadata.uid`.
        field: &'static str,
    },

    /// A RepoboxJob's spec or name cannot be turned into a valid Job.
    #[error("invalid RepoboxJob {name:?}: {reason}")]
    InvalidSpec {
        /// The RepoboxJob's name.
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// Serializing an object (e.g. the CRD to YAML) failed.
    #[error("serialization failed: {0}")]
    Serialization(String),

    /// The `/metrics`, `/healthz`, `/readyz` server could not bind its address or failed while
    /// serving (then the probes fail too, so the process should exit).
    #[error("metrics server on {addr}: {source}")]
    MetricsServer {
        /// The address from `METRICS_ADDR`.
        addr: std::net::SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// Leader election cannot work with the given settings (empty identity, zero duration).
    #[error("leader election: {0}")]
    LeaderElection(String),

    /// A call on the leader-election Lease failed (e.g. releasing it at shutdown).
    #[error("Lease {lease}: {source}")]
    Lease {
        /// `namespace/name` of the Lease.
        lease: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// A Kubernetes API call failed (transient ones are retried by the error policy).
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    /// A Redis command failed (the connection is re-established with backoff).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    /// Another replica took the Lease: this one stops so it can restart as a standby.
    #[error("leadership lost")]
    LeadershipLost,

    /// Adding or removing the RepoboxJob finalizer, or the cleanup behind it, failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether an API call failed with `409`: a write conflict (stale `resourceVersion`) or
/// `AlreadyExists` on create. Both mean another writer got there first.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

/// Whether an API call failed because the object does not exist (`404`).
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

impl Error {
    /// A short, stable, CamelCase label for the variant: suitable for a metric label or an
    /// event reason, where the full message would have unbounded cardinality.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidConfig { .. } => "InvalidConfig",
            Error::MissingObjectKey { .. } => "MissingObjectKey",
            Error::InvalidSpec { .. } => "InvalidSpec",
            Error::Serialization(_) => "Serialization",
            Error::MetricsServer { .. } => "MetricsServer",
            Error::LeaderElection(_) => "LeaderElection",
            Error::Lease { .. } => "Lease",
            Error::Kube(_) => "Kube",
            Error::Redis(_) => "Redis",
            Error::Finalizer(_) => "Finalizer",
            Error::LeadershipLost => "LeadershipLost",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_setting_and_field() {
        let e = Error::InvalidConfig {
            setting: "RUNNER_TOLERATIONS",
            reason: "expected an array".into(),
        };
        assert_eq!(
            e.to_string(),
            "invalid setting RUNNER_TOLERATIONS: expected an array"
        );
        let e = Error::MissingObjectKey {
            kind: "RepoboxJob",
            name: "abc".into(),
            field: "metadata.uid",
        };
        assert_eq!(e.to_string(), "RepoboxJob \"abc\" has no metadata.uid");
        let e = Error::InvalidSpec {
            name: "abc".into(),
            reason: "bad".into(),
        };
        assert_eq!(e.to_string(), "invalid RepoboxJob \"abc\": bad");
        assert_eq!(
            Error::Serialization("x".into()).to_string(),
            "serialization failed: x"
        );
    }

    #[test]
    fn api_errors_are_classified() {
        let api = |reason: &str, code: u16| {
            kube::Error::Api(
                kube::core::Status::failure("m", reason)
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(is_conflict(&api("Conflict", 409)));
        assert!(is_conflict(&api("AlreadyExists", 409)));
        assert!(!is_conflict(&api("NotFound", 404)));
        assert!(is_not_found(&api("NotFound", 404)));
        assert!(!is_not_found(&api("Conflict", 409)));
    }

    #[test]
    fn metric_labels_are_stable() {
        assert_eq!(
            Error::InvalidConfig {
                setting: "X",
                reason: String::new()
            }
            .metric_label(),
            "InvalidConfig"
        );
        assert_eq!(
            Error::MissingObjectKey {
                kind: "K",
                name: String::new(),
                field: "f"
            }
            .metric_label(),
            "MissingObjectKey"
        );
        assert_eq!(
            Error::InvalidSpec {
                name: String::new(),
                reason: String::new()
            }
            .metric_label(),
            "InvalidSpec"
        );
        assert_eq!(
            Error::Serialization(String::new()).metric_label(),
            "Serialization"
        );
    }
}
