//! Every operator setting, from flags or environment variables.
//!
//! Names follow the original Go runner's design (`REDIS_URL`, `RUNNER_ID`, `MAX_CONCURRENT_JOBS`,
//! `MAX_JOBS_PER_USER`, `JOB_TIMEOUT`, `TEMP_DIR`, `CLEANUP_AFTER_JOB`) so an existing deployment's
//! environment keeps its meaning. Each flag `--foo-bar` has the environment variable `FOO_BAR`;
//! a flag wins over the variable, the variable over the default.
//!
//! Parsing (clap) checks types and ranges; [`Config::job_config`] turns the runner-pod settings
//! into typed Kubernetes values ([`JobConfig`](crate::decide::job_config::JobConfig)) and reports a malformed one with an
//! [`Error::InvalidConfig`] naming the variable, so the process fails at start-up rather than on
//! the first Job the API server rejects. Optional string settings treat an empty value as unset,
//! so a Helm chart can always render the variable.
//!
//! One file per concern, each a clap group with its own `--help` heading: `redis` (connection,
//! stream, retention, TLS), `quotas` (quotas, queue, job timing), `lease` (leader
//! election), `runner` (runner pod, agent container, what the runner is passed); `job`
//! validates the runner settings into a `JobConfig`. The process-wide settings (identity,
//! namespace, metrics address, logging) stay in [`Config`] itself. Name and quantity checks
//! live in [`crate::model::names`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::decide::job_config::SecretKeyRef;
use crate::decide::quota::Limits;
use crate::error::{Error, Result};
use crate::model::names::{is_dns1123_subdomain, is_secret_key};

mod job;
mod lease;
mod quotas;
mod redis;
mod runner;

pub use job::DO_NOT_DISRUPT;
pub use lease::LeaseSettings;
pub use quotas::QuotaSettings;
pub use redis::{DEFAULT_DEAD_LETTER_STREAM, RedisSettings, RedisUrl};
pub use runner::{AgentSettings, DEFAULT_RUNNER_IMAGE, RunnerEnvSettings, RunnerPodSettings};

/// How the operator logs (shared with the job-runner).
pub use repobox_process::LogFormat;

/// The operator's settings. Parse with `Config::parse()` (flags + environment).
///
/// The process-wide settings are fields here; the rest come in groups (`#[command(flatten)]`),
/// one per concern, each under its own heading in `--help`. A group's field keeps the name of
/// its variable, so `--foo-bar`, `FOO_BAR` and `foo_bar` stay one name.
#[derive(clap::Parser, Clone, Debug, PartialEq)]
#[command(
    name = "repobox-operator",
    version,
    about = "Runs Repobox jobs as Kubernetes Jobs."
)]
pub struct Config {
    /// This operator instance's id, written to `runnerId` of the jobs it handles and used as the
    /// Redis consumer name. Default: `POD_NAME`, else `HOSTNAME`, else `runner-1`.
    #[arg(long, env = "RUNNER_ID")]
    pub runner_id: Option<String>,

    /// The pod name (Downward API); default for `RUNNER_ID`.
    #[arg(long, env = "POD_NAME", hide = true)]
    pub pod_name: Option<String>,

    /// The host name (set by the container runtime to the pod name); fallback for `RUNNER_ID`.
    #[arg(long, env = "HOSTNAME", hide = true)]
    pub hostname: Option<String>,

    /// The operator pod's namespace (Downward API); default for `JOBS_NAMESPACE`.
    #[arg(long, env = "POD_NAMESPACE", hide = true)]
    pub pod_namespace: Option<String>,

    /// The namespace where RepoboxJobs and Jobs live. Default: `POD_NAMESPACE`, else `default`.
    #[arg(long, env = "JOBS_NAMESPACE")]
    pub jobs_namespace: Option<String>,

    /// Address of the `/metrics`, `/healthz` and `/readyz` server.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Log filter, in `tracing_subscriber::EnvFilter` syntax (`info`, `repobox_operator=debug`, …).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Redis, the stream and its retention, TLS.
    #[command(flatten, next_help_heading = "Redis")]
    pub redis: RedisSettings,

    /// Quotas, the queue and job timing.
    #[command(flatten, next_help_heading = "Quotas and queue")]
    pub quotas: QuotaSettings,

    /// Leader election.
    #[command(flatten, next_help_heading = "Leader election")]
    pub lease: LeaseSettings,

    /// The runner pod and its runner container.
    #[command(flatten, next_help_heading = "Runner pods")]
    pub runner_pod: RunnerPodSettings,

    /// The agent container.
    #[command(flatten, next_help_heading = "Agent container")]
    pub agent: AgentSettings,

    /// Passed through to the runner's environment.
    #[command(flatten, next_help_heading = "Passed to the runner")]
    pub runner_env: RunnerEnvSettings,
}

/// Treats an empty or all-blank optional setting as unset.
fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The start-up error for a malformed setting, naming its variable (callers keep secret values
/// out of the reason).
fn invalid(setting: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        setting,
        reason: reason.into(),
    }
}

/// A Secret reference setting pair: a valid Secret name and key, each error naming its setting.
fn secret_ref(name: (&'static str, &str), key: (&'static str, &str)) -> Result<SecretKeyRef> {
    if !is_dns1123_subdomain(name.1) {
        return Err(invalid(
            name.0,
            format!("{:?} is not a valid Secret name", name.1),
        ));
    }
    if !is_secret_key(key.1) {
        return Err(invalid(
            key.0,
            format!("{:?} is not a valid Secret key", key.1),
        ));
    }
    Ok(SecretKeyRef {
        name: name.1.to_owned(),
        key: key.1.to_owned(),
    })
}

impl Config {
    /// The runner id: `RUNNER_ID`, else `POD_NAME`, else `HOSTNAME`, else `runner-1`.
    pub fn runner_id(&self) -> &str {
        non_empty(&self.runner_id)
            .or_else(|| non_empty(&self.pod_name))
            .or_else(|| non_empty(&self.hostname))
            .unwrap_or("runner-1")
    }

    /// The jobs namespace: `JOBS_NAMESPACE`, else `POD_NAMESPACE`, else `default`.
    pub fn jobs_namespace(&self) -> &str {
        non_empty(&self.jobs_namespace)
            .or_else(|| non_empty(&self.pod_namespace))
            .unwrap_or("default")
    }

    /// The Lease namespace: `LEASE_NAMESPACE`, else `POD_NAMESPACE`, else the jobs namespace.
    pub fn lease_namespace(&self) -> &str {
        non_empty(&self.lease.lease_namespace)
            .or_else(|| non_empty(&self.pod_namespace))
            .unwrap_or_else(|| self.jobs_namespace())
    }

    /// The quota limits for [`crate::decide::quota::decide`].
    pub fn limits(&self) -> Limits {
        Limits {
            per_user: self.quotas.max_jobs_per_user as usize,
            global: self.quotas.max_concurrent_jobs as usize,
        }
    }

    /// `PLAN_LIMITS`, parsed (checked by [`Config::validate`] at start-up).
    pub fn plan_limits(&self) -> Result<crate::decide::tiers::PlanLimits> {
        crate::decide::tiers::PlanLimits::parse(&self.quotas.plan_limits)
            .map_err(|e| invalid("PLAN_LIMITS", e))
    }

    /// `MAX_QUEUED_PER_USER`; `None` when off.
    pub fn max_queued_per_user(&self) -> Option<usize> {
        (self.quotas.max_queued_per_user > 0).then_some(self.quotas.max_queued_per_user as usize)
    }

    /// `CLAIM_MIN_IDLE_SECONDS` as a duration.
    pub fn claim_min_idle(&self) -> Duration {
        Duration::from_secs(self.redis.claim_min_idle_seconds)
    }

    /// `OUTPUT_TTL_SECONDS` as a duration; `None` when outputs are kept forever.
    pub fn output_ttl(&self) -> Option<Duration> {
        (self.redis.output_ttl_seconds > 0)
            .then(|| Duration::from_secs(u64::from(self.redis.output_ttl_seconds)))
    }

    /// `RETENTION_SECONDS` as a duration.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.quotas.retention_seconds)
    }

    /// `PENDING_TIMEOUT_SECONDS` as a duration.
    pub fn pending_timeout(&self) -> Duration {
        Duration::from_secs(self.quotas.pending_timeout_seconds)
    }

    /// `UNSCHEDULABLE_GRACE_SECONDS` as a duration.
    pub fn unschedulable_grace(&self) -> Duration {
        Duration::from_secs(self.runner_pod.unschedulable_grace_seconds)
    }

    /// The retry policy for infrastructure disruptions.
    pub fn retry_policy(&self) -> crate::decide::retry::RetryPolicy {
        crate::decide::retry::RetryPolicy {
            max_retries: self.runner_pod.max_disruption_retries,
            backoff: Duration::from_secs(self.runner_pod.disruption_retry_backoff_seconds),
        }
    }

    /// `LEASE_DURATION_SECONDS` as a duration.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease.lease_duration_seconds)
    }

    /// `JOB_TIMEOUT` as a duration.
    pub fn job_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.quotas.job_timeout))
    }

    /// Checks everything clap cannot: the Redis URL scheme, namespace and Lease names, and all
    /// runner settings (through [`Config::job_config`]). Call once at start-up.
    pub fn validate(&self) -> Result<()> {
        repobox_contract::urls::check_redis_url(self.redis.redis_url.expose())
            .map_err(|e| invalid("REDIS_URL", e.to_string()))?;
        if !crate::model::names::is_dns1123_label(self.jobs_namespace()) {
            return Err(invalid(
                "JOBS_NAMESPACE",
                format!("{:?} is not a valid namespace name", self.jobs_namespace()),
            ));
        }
        if !crate::model::names::is_dns1123_label(self.lease_namespace()) {
            return Err(invalid(
                "LEASE_NAMESPACE",
                format!("{:?} is not a valid namespace name", self.lease_namespace()),
            ));
        }
        if !is_dns1123_subdomain(&self.lease.lease_name) {
            return Err(invalid(
                "LEASE_NAME",
                format!("{:?} is not a valid object name", self.lease.lease_name),
            ));
        }
        for (setting, value) in [
            ("STREAM_KEY", &self.redis.stream_key),
            ("CONSUMER_GROUP", &self.redis.consumer_group),
            ("DEAD_LETTER_STREAM", &self.redis.dead_letter_stream),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(setting, "must not be empty"));
            }
        }
        if self.redis.dead_letter_stream == self.redis.stream_key {
            return Err(invalid("DEAD_LETTER_STREAM", "must differ from STREAM_KEY"));
        }
        self.redis.validate_tls()?;
        self.plan_limits()?;
        self.job_config().map(|_| ())
    }
}

#[cfg(test)]
pub(crate) mod tests;
