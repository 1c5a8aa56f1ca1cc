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

/// What an error means for whoever meets it. Decided here, once, for every error of the crate:
/// the controller's error policy, the dispatcher and the intake all ask [`Error::category`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// The operator cannot start with its settings or environment (a setting, the metrics
    /// port, leader election): the process exits and the Deployment needs fixing.
    Startup,
    /// This object can never be processed as it is (an invalid spec, a request the API server
    /// rejects as invalid): report it and wait for the object to change. Retrying cannot help.
    Permanent,
    /// Worth retrying with backoff: the API server or Redis is unavailable, overloaded, or a
    /// write lost a race.
    Transient,
}

/// A Kubernetes API error of this HTTP status.
fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// 404: the object does not exist (deleting it again is success).
pub fn is_not_found(e: &kube::Error) -> bool {
    api_code(e) == Some(404)
}

/// 409: the object exists already, or a write raced another (creates are idempotent on it).
pub fn is_conflict(e: &kube::Error) -> bool {
    api_code(e) == Some(409)
}

/// 400 / 422: the API server rejects the object itself (schema, CEL, admission): permanent.
pub fn is_invalid(e: &kube::Error) -> bool {
    matches!(api_code(e), Some(400 | 422))
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

    /// Whether this error is fatal at start-up, permanent for its object, or transient.
    pub fn category(&self) -> Category {
        match self {
            Error::InvalidConfig { .. }
            | Error::MetricsServer { .. }
            | Error::LeaderElection(_)
            | Error::LeadershipLost => Category::Startup,
            Error::MissingObjectKey { .. }
            | Error::InvalidSpec { .. }
            | Error::Serialization(_) => Category::Permanent,
            Error::Kube(e) | Error::Lease { source: e, .. } if is_invalid(e) => Category::Permanent,
            Error::Kube(_) | Error::Lease { .. } | Error::Redis(_) => Category::Transient,
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.category(),
                kube::runtime::finalizer::Error::AddFinalizer(e)
                | kube::runtime::finalizer::Error::RemoveFinalizer(e)
                    if is_invalid(e) =>
                {
                    Category::Permanent
                }
                _ => Category::Transient,
            },
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

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("x", "Reason")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn api_errors_are_classified_by_status() {
        assert!(is_not_found(&api_error(404)));
        assert!(!is_not_found(&api_error(409)));
        assert!(is_conflict(&api_error(409)));
        assert!(!is_conflict(&api_error(404)));
        for code in [400, 422] {
            assert!(is_invalid(&api_error(code)), "{code}");
            assert_eq!(Error::Kube(api_error(code)).category(), Category::Permanent);
        }
        for code in [401, 403, 404, 409, 410, 429, 500, 503, 504] {
            assert!(!is_invalid(&api_error(code)), "{code}");
            assert_eq!(
                Error::Kube(api_error(code)).category(),
                Category::Transient,
                "{code}"
            );
        }
    }

    #[test]
    fn every_variant_has_a_category() {
        let startup = [
            Error::InvalidConfig {
                setting: "X",
                reason: String::new(),
            },
            Error::LeaderElection(String::new()),
            Error::LeadershipLost,
        ];
        for e in startup {
            assert_eq!(e.category(), Category::Startup, "{e}");
        }
        let permanent = [
            Error::MissingObjectKey {
                kind: "K",
                name: String::new(),
                field: "f",
            },
            Error::InvalidSpec {
                name: String::new(),
                reason: String::new(),
            },
            Error::Serialization(String::new()),
        ];
        for e in permanent {
            assert_eq!(e.category(), Category::Permanent, "{e}");
        }
        let redis = redis::RedisError::from((redis::ErrorKind::Io, "down"));
        assert_eq!(Error::Redis(redis).category(), Category::Transient);
        // Behind the finalizer, the reconcile's own error decides.
        let inner = Error::InvalidSpec {
            name: String::new(),
            reason: String::new(),
        };
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(
            inner,
        )));
        assert_eq!(wrapped.category(), Category::Permanent);
        let add = kube::runtime::finalizer::Error::<Error>::AddFinalizer(api_error(503));
        assert_eq!(
            Error::Finalizer(Box::new(add)).category(),
            Category::Transient
        );
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
