//! Every operator setting, from flags or environment variables.
//!
//! Names follow the original Go runner's design (`REDIS_URL`, `RUNNER_ID`, `MAX_CONCURRENT_JOBS`,
//! `MAX_JOBS_PER_USER`, `JOB_TIMEOUT`, `TEMP_DIR`, `CLEANUP_AFTER_JOB`) so an existing deployment's
//! environment keeps its meaning. Each flag `--foo-bar` has the environment variable `FOO_BAR`;
//! a flag wins over the variable, the variable over the default.
//!
//! Parsing (clap) checks types and ranges; [`Config::job_config`] turns the runner-pod settings
//! into typed Kubernetes values ([`JobConfig`]) and reports a malformed one with an
//! [`Error::InvalidConfig`] naming the variable, so the process fails at start-up rather than on
//! the first Job the API server rejects. Optional string settings treat an empty value as unset,
//! so a Helm chart can always render the variable.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use repobox_contract::keys;

use crate::decide::job_config::{
    AgentConfig, ConfigMapKeyRef, JobConfig, RunnerResources, SecretKeyRef,
};
use crate::decide::quota::Limits;
use crate::error::{Error, Result};

/// Default runner image: the job-runner image released with this operator version, so the two
/// binaries that share the Redis contract always match.
pub const DEFAULT_RUNNER_IMAGE: &str = concat!(
    "ghcr.io/repobox/repobox-job-runner:",
    env!("CARGO_PKG_VERSION")
);

/// The default dead-letter stream for entries that exceeded `MAX_DELIVERIES`.
pub const DEFAULT_DEAD_LETTER_STREAM: &str = "jobs:stream:dead";

/// The Redis URL, whose `Debug` and `Display` mask the password (it is printed in start-up logs).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL with its password, for connecting. Never log this.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password (or a password-only userinfo) replaced by `****`.
    pub fn masked(&self) -> String {
        let url = self.0.as_str();
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            return url.to_owned();
        };
        let rest = &url[scheme_end..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let Some(at) = rest[..authority_end].rfind('@') else {
            return url.to_owned();
        };
        let userinfo = &rest[..at];
        let masked = match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:****"),
            None => "****".to_owned(),
        };
        format!("{}{masked}{}", &url[..scheme_end], &rest[at..])
    }
}

impl From<String> for RedisUrl {
    fn from(s: String) -> Self {
        RedisUrl(s)
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = std::convert::Infallible;

    /// Never fails: validation happens in [`Config::validate`], whose error does not echo the
    /// value (clap's would, password included).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(RedisUrl(s.to_owned()))
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// Log output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// The operator's settings. Parse with `Config::parse()` (flags + environment).
#[derive(clap::Parser, Clone, Debug, PartialEq)]
#[command(
    name = "repobox-operator",
    version,
    about = "Runs Repobox jobs as Kubernetes Jobs."
)]
pub struct Config {
    // ----- Redis and the stream -----
    /// Redis connection URL (`redis://[user:password@]host:port[/db]`, `rediss://…`).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: RedisUrl,

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

    /// The stream the web app adds jobs to.
    #[arg(long, env = "STREAM_KEY", default_value = keys::JOBS_STREAM)]
    pub stream_key: String,

    /// The runners' consumer group (created if missing).
    #[arg(long, env = "CONSUMER_GROUP", default_value = keys::CONSUMER_GROUP)]
    pub consumer_group: String,

    /// Where entries go after `MAX_DELIVERIES` failed deliveries.
    #[arg(long, env = "DEAD_LETTER_STREAM", default_value = DEFAULT_DEAD_LETTER_STREAM)]
    pub dead_letter_stream: String,

    /// How often an entry may be delivered before it is dead-lettered.
    #[arg(long, env = "MAX_DELIVERIES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_deliveries: u32,

    /// Pending entries idle this long (another instance died holding them) are claimed.
    #[arg(long, env = "CLAIM_MIN_IDLE_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub claim_min_idle_seconds: u64,

    // ----- Redis retention: what the operator caps, trims and expires -----
    /// Approximate cap of the dead-letter stream (`XADD … MAXLEN ~`).
    #[arg(long, env = "DEAD_LETTER_MAXLEN", default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
    pub dead_letter_maxlen: u64,

    /// Expiry of `job:{id}:output` once the job is terminal, in seconds (0 keeps it forever).
    #[arg(long, env = "OUTPUT_TTL_SECONDS", default_value_t = 604800)]
    pub output_ttl_seconds: u32,

    // ----- Redis TLS -----
    /// A PEM CA bundle the operator trusts for `rediss://` instead of the system roots (a Redis
    /// with a private CA).
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    /// The Secret (in the jobs namespace) whose key `REDIS_CA_SECRET_KEY` runner pods mount as
    /// their Redis CA; unset: runners trust the system roots.
    #[arg(long, env = "REDIS_CA_SECRET_NAME")]
    pub redis_ca_secret_name: Option<String>,

    /// The key of the CA certificate in `REDIS_CA_SECRET_NAME`.
    #[arg(long, env = "REDIS_CA_SECRET_KEY", default_value = "ca.crt")]
    pub redis_ca_secret_key: String,

    // ----- Quotas and queue -----
    /// Maximum jobs running at once, in all (the contract's `MAX_CONCURRENT_JOBS`).
    #[arg(long, env = "MAX_CONCURRENT_JOBS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_jobs: u32,

    /// Maximum jobs of one user running at once (the contract's `MAX_JOBS_PER_USER`).
    #[arg(long, env = "MAX_JOBS_PER_USER", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_jobs_per_user: u32,

    /// Backpressure: intake stops reading the stream while this many RepoboxJobs are queued.
    #[arg(long, env = "MAX_QUEUED", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queued: u32,

    /// At most this many queued jobs per user (0: no per-user cap): a user's entry beyond it
    /// fails at intake with a clear error, so one user cannot fill the queue.
    #[arg(long, env = "MAX_QUEUED_PER_USER", default_value_t = 0)]
    pub max_queued_per_user: u32,

    /// Quota tiers: a JSON object of plan name → running limit per user, e.g.
    /// `{"free": 1, "pro": 4}`. A job's `plan` (or the user's value in `runner:user_limits`)
    /// selects one; users without a usable plan get `MAX_JOBS_PER_USER`.
    #[arg(long, env = "PLAN_LIMITS", default_value = "")]
    pub plan_limits: String,

    /// Default job timeout in seconds (the Job's `activeDeadlineSeconds`); a RepoboxJob's
    /// `spec.timeoutSeconds` overrides it.
    #[arg(long, env = "JOB_TIMEOUT", default_value_t = 3600, value_parser = clap::value_parser!(u32).range(1..))]
    pub job_timeout: u32,

    /// Finished RepoboxJobs are deleted this long after completion.
    #[arg(long, env = "RETENTION_SECONDS", default_value_t = 86400, value_parser = clap::value_parser!(u64).range(1..))]
    pub retention_seconds: u64,

    /// A runner pod pending (unschedulable, image pull failing, …) this long fails the job.
    #[arg(long, env = "PENDING_TIMEOUT_SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub pending_timeout_seconds: u64,

    /// The namespace where RepoboxJobs and Jobs live. Default: `POD_NAMESPACE`, else `default`.
    #[arg(long, env = "JOBS_NAMESPACE")]
    pub jobs_namespace: Option<String>,

    // ----- Process -----
    /// Address of the `/metrics`, `/healthz` and `/readyz` server.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Run only while holding the Lease (for more than one replica).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub leader_election: bool,

    /// The Lease used for leader election.
    #[arg(long, env = "LEASE_NAME", default_value = "repobox-operator")]
    pub lease_name: String,

    /// The Lease's namespace. Default: `POD_NAMESPACE`, else the jobs namespace.
    #[arg(long, env = "LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a Lease is valid without renewal.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_duration_seconds: u64,

    /// Log filter, in `tracing_subscriber::EnvFilter` syntax (`info`, `repobox_operator=debug`, …).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    // ----- Runner Jobs -----
    /// The job-runner image.
    #[arg(long, env = "RUNNER_IMAGE", default_value = DEFAULT_RUNNER_IMAGE)]
    pub runner_image: String,

    /// The runner container's `imagePullPolicy`.
    #[arg(long, env = "RUNNER_IMAGE_PULL_POLICY", default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub runner_image_pull_policy: String,

    /// Comma-separated Secret names for pulling the runner image.
    #[arg(long, env = "RUNNER_IMAGE_PULL_SECRETS", value_delimiter = ',')]
    pub runner_image_pull_secrets: Vec<String>,

    /// The runner pods' ServiceAccount (its token is not mounted).
    #[arg(long, env = "RUNNER_SERVICE_ACCOUNT", default_value = "repobox-runner")]
    pub runner_service_account: String,

    /// CPU request of the runner container (git and Redis work; a Kubernetes quantity;
    /// empty: none).
    #[arg(long, env = "RUNNER_CPU_REQUEST", default_value = "250m")]
    pub runner_cpu_request: String,

    /// CPU limit of the runner container (empty: none).
    #[arg(long, env = "RUNNER_CPU_LIMIT", default_value = "1")]
    pub runner_cpu_limit: String,

    /// Memory request of the runner container (empty: none).
    #[arg(long, env = "RUNNER_MEMORY_REQUEST", default_value = "256Mi")]
    pub runner_memory_request: String,

    /// Memory limit of the runner container (empty: none).
    #[arg(long, env = "RUNNER_MEMORY_LIMIT", default_value = "1Gi")]
    pub runner_memory_limit: String,

    /// `ephemeral-storage` request of the runner container: the git directory, `/tmp` and the
    /// work tree's share, so an autoscaler plans a node with the disk a job needs (empty: none).
    #[arg(long, env = "RUNNER_EPHEMERAL_STORAGE_REQUEST", default_value = "2Gi")]
    pub runner_ephemeral_storage_request: String,

    /// `ephemeral-storage` limit of the runner container (empty: none; the volumes' size
    /// limits still apply).
    #[arg(long, env = "RUNNER_EPHEMERAL_STORAGE_LIMIT", default_value = "")]
    pub runner_ephemeral_storage_limit: String,

    /// Put `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"` and
    /// `karpenter.sh/do-not-disrupt: "true"` on runner pods, so scale-in never stops a job.
    #[arg(long, env = "RUNNER_DO_NOT_DISRUPT", default_value_t = true, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub runner_do_not_disrupt: bool,

    /// Extra runner pod annotations, as a JSON object of strings.
    #[arg(long, env = "RUNNER_POD_ANNOTATIONS")]
    pub runner_pod_annotations: Option<String>,

    /// A runner pod the cluster autoscaler says no node group can ever fit fails the job after
    /// this long (the autoscaler may change its mind when node groups change).
    #[arg(long, env = "UNSCHEDULABLE_GRACE_SECONDS", default_value_t = 60)]
    pub unschedulable_grace_seconds: u64,

    /// How many times a job whose pod was lost to an infrastructure disruption (eviction,
    /// preemption, node drain or shutdown) before its push started runs again.
    #[arg(long, env = "MAX_DISRUPTION_RETRIES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=10))]
    pub max_disruption_retries: u32,

    /// Wait before the first retry after a disruption; doubled for each further one.
    #[arg(long, env = "DISRUPTION_RETRY_BACKOFF_SECONDS", default_value_t = 10)]
    pub disruption_retry_backoff_seconds: u64,

    /// The agent container's image (default: the runner image). Any image with `/bin/sh`
    /// works: the init container copies the agent wrapper into it.
    #[arg(long, env = "AGENT_IMAGE")]
    pub agent_image: Option<String>,

    /// The agent container's user and group id: never the runner's, so the agent cannot read
    /// what only the runner may.
    #[arg(long, env = "AGENT_UID", default_value_t = 65533, value_parser = clap::value_parser!(i64).range(1..))]
    pub agent_uid: i64,

    /// CPU request of the agent container (empty: none).
    #[arg(long, env = "AGENT_CPU_REQUEST", default_value = "500m")]
    pub agent_cpu_request: String,

    /// CPU limit of the agent container (empty: none).
    #[arg(long, env = "AGENT_CPU_LIMIT", default_value = "2")]
    pub agent_cpu_limit: String,

    /// Memory request of the agent container (empty: none).
    #[arg(long, env = "AGENT_MEMORY_REQUEST", default_value = "512Mi")]
    pub agent_memory_request: String,

    /// Memory limit of the agent container (empty: none).
    #[arg(long, env = "AGENT_MEMORY_LIMIT", default_value = "2Gi")]
    pub agent_memory_limit: String,

    /// `ephemeral-storage` request of the agent container (its `/tmp` and what it writes to the
    /// tree; empty: none).
    #[arg(long, env = "AGENT_EPHEMERAL_STORAGE_REQUEST", default_value = "1Gi")]
    pub agent_ephemeral_storage_request: String,

    /// `ephemeral-storage` limit of the agent container (empty: none).
    #[arg(long, env = "AGENT_EPHEMERAL_STORAGE_LIMIT", default_value = "")]
    pub agent_ephemeral_storage_limit: String,

    /// Plain environment of the agent container, as a JSON object of strings (e.g.
    /// `{"MODEL":"large"}`); credentials belong in `RUNNER_ENV_FROM_SECRETS`.
    #[arg(long, env = "AGENT_EXTRA_ENV")]
    pub agent_extra_env: Option<String>,

    /// Size limit of the work-tree volume (`emptyDir.sizeLimit` of `TEMP_DIR`; empty: none).
    #[arg(long, env = "RUNNER_EPHEMERAL_STORAGE", default_value = "10Gi")]
    pub runner_ephemeral_storage: String,

    /// Size limit of the `/tmp` (`HOME`) volume (empty: none).
    #[arg(long, env = "RUNNER_TMP_SIZE_LIMIT", default_value = "1Gi")]
    pub runner_tmp_size_limit: String,

    /// Runner `nodeSelector`, as a JSON object of strings.
    #[arg(long, env = "RUNNER_NODE_SELECTOR")]
    pub runner_node_selector: Option<String>,

    /// Runner `tolerations`, as a JSON array of Kubernetes tolerations.
    #[arg(long, env = "RUNNER_TOLERATIONS")]
    pub runner_tolerations: Option<String>,

    /// Runner `affinity`, as a JSON Kubernetes affinity object.
    #[arg(long, env = "RUNNER_AFFINITY")]
    pub runner_affinity: Option<String>,

    /// Runner `priorityClassName`.
    #[arg(long, env = "RUNNER_PRIORITY_CLASS")]
    pub runner_priority_class: Option<String>,

    /// Comma-separated Secret names whose keys become environment variables of the agent
    /// container (`envFrom`), e.g. the agent's API key. The operator only references them; the
    /// runner container never sees them.
    #[arg(long, env = "RUNNER_ENV_FROM_SECRETS", value_delimiter = ',')]
    pub runner_env_from_secrets: Vec<String>,

    /// Finished Jobs (and their pods and logs) are deleted this long after finishing
    /// (`ttlSecondsAfterFinished`). Keep it well above the controller's reaction time.
    #[arg(long, env = "JOB_TTL_SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(i32).range(0..))]
    pub job_ttl_seconds: i32,

    /// The runner pod's `terminationGracePeriodSeconds` (time to record a cancellation).
    #[arg(long, env = "RUNNER_TERMINATION_GRACE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(i64).range(0..))]
    pub runner_termination_grace_seconds: i64,

    /// The Secret holding the Redis URL for the runner pods.
    #[arg(long, env = "REDIS_SECRET_NAME", default_value = "repobox-redis")]
    pub redis_secret_name: String,

    /// The key of the Redis URL in `REDIS_SECRET_NAME`.
    #[arg(long, env = "REDIS_SECRET_KEY", default_value = "url")]
    pub redis_secret_key: String,

    /// The Secret holding `ENCRYPTION_KEY` for the runner pods (mounted as a file).
    #[arg(
        long,
        env = "ENCRYPTION_KEY_SECRET_NAME",
        default_value = "repobox-encryption-key"
    )]
    pub encryption_key_secret_name: String,

    /// The key of the encryption key in `ENCRYPTION_KEY_SECRET_NAME`.
    #[arg(long, env = "ENCRYPTION_KEY_SECRET_KEY", default_value = "key")]
    pub encryption_key_secret_key: String,

    // ----- Passed through to the runner pods -----
    /// The runner's work directory (an `emptyDir`), passed as `TEMP_DIR`.
    #[arg(long, env = "TEMP_DIR", default_value = "/work")]
    pub temp_dir: String,

    /// Passed to the runner: delete the work tree after the job.
    #[arg(long, env = "CLEANUP_AFTER_JOB", default_value_t = true, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub cleanup_after_job: bool,

    /// Passed to the runner: commit author name.
    #[arg(long, env = "GIT_AUTHOR_NAME", default_value = "Repobox")]
    pub git_author_name: String,

    /// Passed to the runner: commit author e-mail.
    #[arg(
        long,
        env = "GIT_AUTHOR_EMAIL",
        default_value = "repobox@users.noreply.repobox.dev"
    )]
    pub git_author_email: String,

    /// Passed to the runner: `git clone --depth` (0: full clone).
    #[arg(long, env = "GIT_CLONE_DEPTH", default_value_t = 1)]
    pub git_clone_depth: u32,

    /// The agent command, run with `sh -c` in the agent container (unset: no agent container,
    /// the job commits nothing). Must not contain a secret: it is visible in the Job; use
    /// `RUNNER_ENV_FROM_SECRETS` for credentials.
    #[arg(long, env = "AGENT_COMMAND")]
    pub agent_command: Option<String>,

    /// Passed to the runner: allow `http://` repository URLs (an in-cluster git host without
    /// TLS). The token then crosses the network in clear.
    #[arg(long, env = "ALLOW_INSECURE_HTTP", default_value_t = false, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub allow_insecure_http: bool,

    /// Passed to the runner: after a push, open (or find) a pull / merge request from the
    /// job's branch into its base branch. A job can only turn it off (`openPullRequest=false`).
    #[arg(long, env = "OPEN_PULL_REQUESTS", default_value_t = true, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub open_pull_requests: bool,

    /// A ConfigMap holding the CA bundle of the git host (a private CA), mounted into the
    /// runner container and passed to git as `GIT_SSL_CAINFO`.
    #[arg(long, env = "GIT_CA_CONFIGMAP")]
    pub git_ca_configmap: Option<String>,

    /// The key of the CA bundle in `GIT_CA_CONFIGMAP`.
    #[arg(long, env = "GIT_CA_KEY", default_value = "ca.crt")]
    pub git_ca_key: String,
}

/// Treats an empty or all-blank optional setting as unset.
fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The annotations that keep autoscalers from scaling in a node under a running job.
pub const DO_NOT_DISRUPT: [(&str, &str); 2] = [
    ("cluster-autoscaler.kubernetes.io/safe-to-evict", "false"),
    ("karpenter.sh/do-not-disrupt", "true"),
];

/// A Kubernetes qualified name (annotation and label keys): an optional DNS subdomain prefix
/// and `/`, then 1–63 characters of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let b = name.as_bytes();
    prefix.is_none_or(is_dns1123_subdomain)
        && !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        setting,
        reason: reason.into(),
    }
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
        non_empty(&self.lease_namespace)
            .or_else(|| non_empty(&self.pod_namespace))
            .unwrap_or_else(|| self.jobs_namespace())
    }

    /// The quota limits for [`crate::decide::quota::decide`].
    pub fn limits(&self) -> Limits {
        Limits {
            per_user: self.max_jobs_per_user as usize,
            global: self.max_concurrent_jobs as usize,
        }
    }

    /// `PLAN_LIMITS`, parsed (checked by [`Config::validate`] at start-up).
    pub fn plan_limits(&self) -> Result<crate::decide::tiers::PlanLimits> {
        crate::decide::tiers::PlanLimits::parse(&self.plan_limits)
            .map_err(|e| invalid("PLAN_LIMITS", e))
    }

    /// `MAX_QUEUED_PER_USER`; `None` when off.
    pub fn max_queued_per_user(&self) -> Option<usize> {
        (self.max_queued_per_user > 0).then_some(self.max_queued_per_user as usize)
    }

    /// `CLAIM_MIN_IDLE_SECONDS` as a duration.
    pub fn claim_min_idle(&self) -> Duration {
        Duration::from_secs(self.claim_min_idle_seconds)
    }

    /// `OUTPUT_TTL_SECONDS` as a duration; `None` when outputs are kept forever.
    pub fn output_ttl(&self) -> Option<Duration> {
        (self.output_ttl_seconds > 0)
            .then(|| Duration::from_secs(u64::from(self.output_ttl_seconds)))
    }

    /// The Redis TLS settings: a CA file only makes sense for a TLS URL; the runner CA Secret
    /// must be a valid name and key.
    fn validate_redis_tls(&self) -> Result<()> {
        if self.redis_ca_file.is_some() {
            let scheme = self.redis_url.expose().split_once("://").map(|(s, _)| s);
            if !matches!(scheme, Some("rediss" | "valkeys")) {
                return Err(invalid(
                    "REDIS_CA_FILE",
                    "is only used with a TLS URL (rediss://) in REDIS_URL",
                ));
            }
        }
        if let Some(name) = non_empty(&self.redis_ca_secret_name) {
            secret_ref(
                ("REDIS_CA_SECRET_NAME", name),
                ("REDIS_CA_SECRET_KEY", &self.redis_ca_secret_key),
            )?;
        }
        Ok(())
    }

    /// `RETENTION_SECONDS` as a duration.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_seconds)
    }

    /// `PENDING_TIMEOUT_SECONDS` as a duration.
    pub fn pending_timeout(&self) -> Duration {
        Duration::from_secs(self.pending_timeout_seconds)
    }

    /// `UNSCHEDULABLE_GRACE_SECONDS` as a duration.
    pub fn unschedulable_grace(&self) -> Duration {
        Duration::from_secs(self.unschedulable_grace_seconds)
    }

    /// The retry policy for infrastructure disruptions.
    pub fn retry_policy(&self) -> crate::decide::retry::RetryPolicy {
        crate::decide::retry::RetryPolicy {
            max_retries: self.max_disruption_retries,
            backoff: Duration::from_secs(self.disruption_retry_backoff_seconds),
        }
    }

    /// `LEASE_DURATION_SECONDS` as a duration.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease_duration_seconds)
    }

    /// `JOB_TIMEOUT` as a duration.
    pub fn job_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.job_timeout))
    }

    /// Checks everything clap cannot: the Redis URL scheme, namespace and Lease names, and all
    /// runner settings (through [`Config::job_config`]). Call once at start-up.
    pub fn validate(&self) -> Result<()> {
        repobox_contract::urls::check_redis_url(self.redis_url.expose())
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
        if !is_dns1123_subdomain(&self.lease_name) {
            return Err(invalid(
                "LEASE_NAME",
                format!("{:?} is not a valid object name", self.lease_name),
            ));
        }
        for (setting, value) in [
            ("STREAM_KEY", &self.stream_key),
            ("CONSUMER_GROUP", &self.consumer_group),
            ("DEAD_LETTER_STREAM", &self.dead_letter_stream),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(setting, "must not be empty"));
            }
        }
        if self.dead_letter_stream == self.stream_key {
            return Err(invalid("DEAD_LETTER_STREAM", "must differ from STREAM_KEY"));
        }
        self.validate_redis_tls()?;
        self.plan_limits()?;
        self.job_config().map(|_| ())
    }

    /// The typed runner Job settings, or the first malformed one.
    pub fn job_config(&self) -> Result<JobConfig> {
        if self.runner_image.trim().is_empty() || self.runner_image.chars().any(char::is_whitespace)
        {
            return Err(invalid(
                "RUNNER_IMAGE",
                "must be a non-empty image reference without spaces",
            ));
        }
        let names = |setting: &'static str, list: &[String]| -> Result<Vec<String>> {
            list.iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if is_dns1123_subdomain(s) {
                        Ok(s.to_owned())
                    } else {
                        Err(invalid(
                            setting,
                            format!("{s:?} is not a valid Secret name"),
                        ))
                    }
                })
                .collect()
        };
        let image_pull_secrets =
            names("RUNNER_IMAGE_PULL_SECRETS", &self.runner_image_pull_secrets)?;
        let env_from_secrets = names("RUNNER_ENV_FROM_SECRETS", &self.runner_env_from_secrets)?;
        if !is_dns1123_subdomain(&self.runner_service_account) {
            return Err(invalid(
                "RUNNER_SERVICE_ACCOUNT",
                format!(
                    "{:?} is not a valid ServiceAccount name",
                    self.runner_service_account
                ),
            ));
        }

        let resources = resources(
            [
                "RUNNER_CPU_REQUEST",
                "RUNNER_CPU_LIMIT",
                "RUNNER_MEMORY_REQUEST",
                "RUNNER_MEMORY_LIMIT",
                "RUNNER_EPHEMERAL_STORAGE_REQUEST",
                "RUNNER_EPHEMERAL_STORAGE_LIMIT",
            ],
            [
                &self.runner_cpu_request,
                &self.runner_cpu_limit,
                &self.runner_memory_request,
                &self.runner_memory_limit,
                &self.runner_ephemeral_storage_request,
                &self.runner_ephemeral_storage_limit,
            ],
        )?;
        let agent = match non_empty(&self.agent_command) {
            None => None,
            Some(command) => Some(self.agent_config(command, env_from_secrets)?),
        };
        let git_ca = match non_empty(&self.git_ca_configmap) {
            None => None,
            Some(name) if !is_dns1123_subdomain(name) => {
                return Err(invalid(
                    "GIT_CA_CONFIGMAP",
                    format!("{name:?} is not a valid ConfigMap name"),
                ));
            }
            Some(_) if self.git_ca_key.trim().is_empty() => {
                return Err(invalid("GIT_CA_KEY", "must not be empty"));
            }
            Some(name) => Some(ConfigMapKeyRef {
                name: name.to_owned(),
                key: self.git_ca_key.trim().to_owned(),
            }),
        };

        let node_selector: Option<BTreeMap<String, String>> =
            json_setting("RUNNER_NODE_SELECTOR", &self.runner_node_selector)?;
        let tolerations: Option<Vec<Toleration>> =
            json_setting("RUNNER_TOLERATIONS", &self.runner_tolerations)?;
        let affinity: Option<Affinity> = json_setting("RUNNER_AFFINITY", &self.runner_affinity)?;

        let mut pod_annotations: BTreeMap<String, String> =
            json_setting("RUNNER_POD_ANNOTATIONS", &self.runner_pod_annotations)?
                .unwrap_or_default();
        if let Some(bad) = pod_annotations.keys().find(|k| !is_qualified_name(k)) {
            return Err(invalid(
                "RUNNER_POD_ANNOTATIONS",
                format!("{bad:?} is not a valid annotation key"),
            ));
        }
        if self.runner_do_not_disrupt {
            for (k, v) in DO_NOT_DISRUPT {
                pod_annotations.insert(k.to_owned(), v.to_owned());
            }
        }

        let priority_class_name = non_empty(&self.runner_priority_class).map(str::to_owned);
        if let Some(pc) = &priority_class_name
            && !is_dns1123_subdomain(pc)
        {
            return Err(invalid(
                "RUNNER_PRIORITY_CLASS",
                format!("{pc:?} is not a valid PriorityClass name"),
            ));
        }

        let redis_secret = secret_ref(
            ("REDIS_SECRET_NAME", &self.redis_secret_name),
            ("REDIS_SECRET_KEY", &self.redis_secret_key),
        )?;
        let encryption_key_secret = secret_ref(
            (
                "ENCRYPTION_KEY_SECRET_NAME",
                &self.encryption_key_secret_name,
            ),
            ("ENCRYPTION_KEY_SECRET_KEY", &self.encryption_key_secret_key),
        )?;

        let temp_dir = self.temp_dir.trim_end_matches('/').to_owned();
        if !temp_dir.starts_with('/')
            || temp_dir.split('/').any(|c| c == ".." || c == ".")
            || temp_dir.contains("//")
            || [
                crate::model::pod_layout::TMP_DIR,
                crate::model::pod_layout::ENCRYPTION_KEY_DIR,
                crate::model::pod_layout::PRIVATE_DIR,
                crate::model::pod_layout::TOOLS_DIR,
                crate::model::pod_layout::GIT_CA_DIR,
            ]
            .contains(&temp_dir.as_str())
        {
            return Err(invalid(
                "TEMP_DIR",
                format!(
                    "{:?} must be an absolute, normalised path other than /, /tmp and the pod's other mounts",
                    self.temp_dir
                ),
            ));
        }

        Ok(JobConfig {
            image: self.runner_image.trim().to_owned(),
            image_pull_policy: self.runner_image_pull_policy.clone(),
            image_pull_secrets,
            service_account: self.runner_service_account.clone(),
            resources,
            agent,
            work_size_limit: quantity("RUNNER_EPHEMERAL_STORAGE", &self.runner_ephemeral_storage)?,
            tmp_size_limit: quantity("RUNNER_TMP_SIZE_LIMIT", &self.runner_tmp_size_limit)?,
            node_selector,
            tolerations,
            affinity,
            priority_class_name,
            pod_annotations,
            default_timeout_seconds: i64::from(self.job_timeout),
            ttl_seconds_after_finished: self.job_ttl_seconds,
            termination_grace_period_seconds: self.runner_termination_grace_seconds,
            redis_secret,
            encryption_key_secret,
            temp_dir,
            cleanup_after_job: self.cleanup_after_job,
            git_author_name: self.git_author_name.clone(),
            git_author_email: self.git_author_email.clone(),
            git_clone_depth: self.git_clone_depth,
            allow_insecure_http: self.allow_insecure_http,
            open_pull_requests: self.open_pull_requests,
            git_ca,
            redis_ca: match non_empty(&self.redis_ca_secret_name) {
                None => None,
                Some(name) => Some(secret_ref(
                    ("REDIS_CA_SECRET_NAME", name),
                    ("REDIS_CA_SECRET_KEY", &self.redis_ca_secret_key),
                )?),
            },
        })
    }

    /// The agent container's settings (`AGENT_*`, `RUNNER_ENV_FROM_SECRETS`).
    fn agent_config(&self, command: &str, env_from_secrets: Vec<String>) -> Result<AgentConfig> {
        let image = match non_empty(&self.agent_image) {
            None => self.runner_image.trim().to_owned(),
            Some(i) if i.chars().any(char::is_whitespace) => {
                return Err(invalid(
                    "AGENT_IMAGE",
                    "must be an image reference without spaces",
                ));
            }
            Some(i) => i.to_owned(),
        };
        if self.agent_uid == crate::model::pod_layout::RUNNER_UID {
            return Err(invalid(
                "AGENT_UID",
                format!(
                    "must differ from the runner's uid {}: the agent must not be able to read the runner's files",
                    crate::model::pod_layout::RUNNER_UID
                ),
            ));
        }
        let extra_env: BTreeMap<String, String> =
            json_setting("AGENT_EXTRA_ENV", &self.agent_extra_env)?.unwrap_or_default();
        for name in extra_env.keys() {
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(invalid(
                    "AGENT_EXTRA_ENV",
                    format!("{name:?} is not a valid environment variable name"),
                ));
            }
            if crate::model::pod_layout::AGENT_RESERVED_ENV.contains(&name.as_str()) {
                return Err(invalid(
                    "AGENT_EXTRA_ENV",
                    format!("{name} is set by the operator"),
                ));
            }
        }
        Ok(AgentConfig {
            command: command.to_owned(),
            image,
            uid: self.agent_uid,
            resources: resources(
                [
                    "AGENT_CPU_REQUEST",
                    "AGENT_CPU_LIMIT",
                    "AGENT_MEMORY_REQUEST",
                    "AGENT_MEMORY_LIMIT",
                    "AGENT_EPHEMERAL_STORAGE_REQUEST",
                    "AGENT_EPHEMERAL_STORAGE_LIMIT",
                ],
                [
                    &self.agent_cpu_request,
                    &self.agent_cpu_limit,
                    &self.agent_memory_request,
                    &self.agent_memory_limit,
                    &self.agent_ephemeral_storage_request,
                    &self.agent_ephemeral_storage_limit,
                ],
            )?,
            extra_env,
            env_from_secrets,
        })
    }
}

/// Requests and limits from four settings (cpu request, cpu limit, memory request, memory
/// limit), each request within its limit.
fn resources(settings: [&'static str; 6], values: [&str; 6]) -> Result<RunnerResources> {
    let r = RunnerResources {
        cpu_request: quantity(settings[0], values[0])?,
        cpu_limit: quantity(settings[1], values[1])?,
        memory_request: quantity(settings[2], values[2])?,
        memory_limit: quantity(settings[3], values[3])?,
        ephemeral_storage_request: quantity(settings[4], values[4])?,
        ephemeral_storage_limit: quantity(settings[5], values[5])?,
    };
    request_within_limit(settings[0], &r.cpu_request, settings[1], &r.cpu_limit)?;
    request_within_limit(settings[2], &r.memory_request, settings[3], &r.memory_limit)?;
    request_within_limit(
        settings[4],
        &r.ephemeral_storage_request,
        settings[5],
        &r.ephemeral_storage_limit,
    )?;
    Ok(r)
}

/// Parses a JSON setting into `T`; unset or blank gives `None`.
fn json_setting<T: serde::de::DeserializeOwned>(
    setting: &'static str,
    value: &Option<String>,
) -> Result<Option<T>> {
    match non_empty(value) {
        None => Ok(None),
        Some(s) => serde_json::from_str(s)
            .map(Some)
            .map_err(|e| invalid(setting, format!("malformed JSON: {e}"))),
    }
}

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

/// A Kubernetes quantity setting; empty means unset. Negative quantities are rejected.
fn quantity(setting: &'static str, value: &str) -> Result<Option<Quantity>> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    match parse_quantity(value) {
        Some(v) if v >= 0.0 => Ok(Some(Quantity(value.to_owned()))),
        Some(_) => Err(invalid(setting, format!("{value:?} must not be negative"))),
        None => Err(invalid(
            setting,
            format!("{value:?} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 2Gi)"),
        )),
    }
}

fn request_within_limit(
    request_setting: &'static str,
    request: &Option<Quantity>,
    limit_setting: &'static str,
    limit: &Option<Quantity>,
) -> Result<()> {
    if let (Some(req), Some(lim)) = (request, limit)
        && let (Some(r), Some(l)) = (parse_quantity(&req.0), parse_quantity(&lim.0))
        && r > l
    {
        return Err(invalid(
            request_setting,
            format!("{} exceeds {limit_setting} ({})", req.0, lim.0),
        ));
    }
    Ok(())
}

/// The numeric value of a Kubernetes quantity (`<sign><number><suffix>`, suffix one of the
/// binary `Ki Mi Gi Ti Pi Ei`, decimal `m k M G T P E` or none, or an exponent `e<n>`/`E<n>`),
/// or `None` when it is not one. Approximate (f64): used for validation and comparisons only; the
/// original string is what goes into the Job.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1.0, &s[1..]),
        b'-' => (-1.0, &s[1..]),
        _ => (1.0, s),
    };
    let num_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(num_end);
    let digits = number.replace('.', "");
    if digits.is_empty() || number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let multiplier = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e = &exp[1..];
            let unsigned = e.strip_prefix(['+', '-']).unwrap_or(e);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            10f64.powi(e.parse().ok()?)
        }
        _ => return None,
    };
    Some(sign * value * multiplier)
}

/// True when `s` is a DNS-1123 subdomain (most object names): at most 253 characters, dot-separated
/// DNS-1123 labels.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(crate::model::names::is_dns1123_label)
}

/// True when `s` is a valid Secret / ConfigMap key (`[-._a-zA-Z0-9]+`, at most 253, not `.` or
/// `..`): also safe as a file name under a volume mount.
pub fn is_secret_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    /// Parses `args` with `env` as the environment, ignoring the real process environment (so
    /// tests are hermetic and need no `set_var`). Environment values are injected as flags placed
    /// before `args`, which keeps clap's precedence (flag over environment over default).
    pub(crate) fn parse_with_env(
        args: &[&str],
        env: &[(&str, &str)],
    ) -> std::result::Result<Config, clap::Error> {
        let mut cmd = Config::command();
        let mut argv: Vec<String> = vec!["repobox-operator".into()];
        for arg in cmd.get_arguments() {
            let (Some(name), Some(long)) = (arg.get_env(), arg.get_long()) else {
                continue;
            };
            if let Some((_, v)) = env.iter().find(|(k, _)| std::ffi::OsStr::new(k) == name) {
                argv.push(format!("--{long}={v}"));
            }
        }
        argv.extend(args.iter().map(|s| s.to_string()));
        cmd = cmd.mut_args(|a| a.env(None)).args_override_self(true);
        let matches = cmd.try_get_matches_from(argv)?;
        Config::from_arg_matches(&matches)
    }

    /// A config with only the required setting, as the tests of other modules need.
    pub(crate) fn test_config(env: &[(&str, &str)]) -> Config {
        let mut all = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "REDIS_URL") {
            all.push(("REDIS_URL", "redis://localhost:6379"));
        }
        match parse_with_env(&[], &all) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    pub(crate) fn test_job_config(env: &[(&str, &str)]) -> JobConfig {
        test_config(env).job_config().unwrap()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn every_flag_has_its_env_var() {
        let cmd = Config::command();
        let mut pairs: Vec<(String, String)> = cmd
            .get_arguments()
            .filter(|a| a.get_id() != "help" && a.get_id() != "version")
            .map(|a| {
                let long = a.get_long().unwrap_or_default().to_owned();
                let env = a
                    .get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (long, env)
            })
            .collect();
        pairs.sort();
        for (long, env) in &pairs {
            assert_eq!(
                &long.replace('-', "_").to_uppercase(),
                env,
                "--{long} must read {env}"
            );
        }
        let envs: Vec<&str> = pairs.iter().map(|(_, e)| e.as_str()).collect();
        for required in [
            "REDIS_URL",
            "RUNNER_ID",
            "MAX_CONCURRENT_JOBS",
            "MAX_JOBS_PER_USER",
            "JOB_TIMEOUT",
            "JOBS_NAMESPACE",
            "STREAM_KEY",
            "CONSUMER_GROUP",
            "DEAD_LETTER_STREAM",
            "MAX_DELIVERIES",
            "CLAIM_MIN_IDLE_SECONDS",
            "MAX_QUEUED",
            "MAX_QUEUED_PER_USER",
            "PLAN_LIMITS",
            "RETENTION_SECONDS",
            "PENDING_TIMEOUT_SECONDS",
            "METRICS_ADDR",
            "LEADER_ELECTION",
            "LEASE_NAME",
            "LOG_LEVEL",
            "LOG_FORMAT",
            "RUNNER_IMAGE",
            "RUNNER_IMAGE_PULL_POLICY",
            "RUNNER_SERVICE_ACCOUNT",
            "RUNNER_CPU_REQUEST",
            "RUNNER_CPU_LIMIT",
            "RUNNER_MEMORY_REQUEST",
            "RUNNER_MEMORY_LIMIT",
            "RUNNER_EPHEMERAL_STORAGE",
            "RUNNER_NODE_SELECTOR",
            "RUNNER_TOLERATIONS",
            "RUNNER_AFFINITY",
            "RUNNER_PRIORITY_CLASS",
            "JOB_TTL_SECONDS",
            "RUNNER_TERMINATION_GRACE_SECONDS",
            "REDIS_SECRET_NAME",
            "REDIS_SECRET_KEY",
            "ENCRYPTION_KEY_SECRET_NAME",
            "ENCRYPTION_KEY_SECRET_KEY",
            "TEMP_DIR",
            "CLEANUP_AFTER_JOB",
            "GIT_AUTHOR_NAME",
            "GIT_AUTHOR_EMAIL",
            "GIT_CLONE_DEPTH",
            "AGENT_COMMAND",
            "POD_NAME",
            "POD_NAMESPACE",
            "HOSTNAME",
        ] {
            assert!(envs.contains(&required), "{required} missing");
        }
    }

    #[test]
    fn invalid_plan_limits_are_refused_at_start_up() {
        for bad in ["{", r#"{"free": 0}"#, r#"{"default": 2}"#] {
            let err = test_config(&[("PLAN_LIMITS", bad)]).validate().unwrap_err();
            assert!(err.to_string().contains("PLAN_LIMITS"), "{err}");
        }
        test_config(&[("PLAN_LIMITS", r#"{"free": 1}"#)])
            .validate()
            .unwrap();
    }

    #[test]
    fn redis_url_is_required() {
        let err = parse_with_env(&[], &[]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(err.to_string().contains("--redis-url"));
    }

    #[test]
    fn defaults() {
        let c = test_config(&[]);
        assert_eq!(c.redis_url.expose(), "redis://localhost:6379");
        assert_eq!(c.runner_id(), "runner-1");
        assert_eq!(c.max_concurrent_jobs, 10);
        assert_eq!(c.max_jobs_per_user, 3);
        assert_eq!(
            c.limits(),
            Limits {
                per_user: 3,
                global: 10
            }
        );
        assert_eq!(c.job_timeout, 3600);
        assert_eq!(c.job_timeout(), Duration::from_secs(3600));
        assert_eq!(c.jobs_namespace(), "default");
        assert_eq!(c.lease_namespace(), "default");
        assert_eq!(c.stream_key, "jobs:stream");
        assert_eq!(c.consumer_group, "jobs:stream:runners");
        assert_eq!(c.dead_letter_stream, "jobs:stream:dead");
        assert_eq!(c.max_deliveries, 5);
        assert_eq!(c.claim_min_idle(), Duration::from_secs(60));
        assert_eq!(c.max_queued, 500);
        assert_eq!(c.max_queued_per_user(), None);
        assert_eq!(
            c.plan_limits().unwrap(),
            crate::decide::tiers::PlanLimits::default()
        );
        assert_eq!(c.retention(), Duration::from_secs(86400));
        assert_eq!(c.pending_timeout(), Duration::from_secs(600));
        assert_eq!(
            c.metrics_addr,
            "0.0.0.0:8080".parse::<SocketAddr>().unwrap()
        );
        assert!(c.leader_election);
        assert_eq!(c.lease_name, "repobox-operator");
        assert_eq!(c.lease_duration(), Duration::from_secs(15));
        assert_eq!(c.log_level, "info");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.runner_image, DEFAULT_RUNNER_IMAGE);
        assert!(DEFAULT_RUNNER_IMAGE.ends_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(c.runner_image_pull_policy, "IfNotPresent");
        assert!(c.runner_image_pull_secrets.is_empty());
        assert_eq!(c.runner_service_account, "repobox-runner");
        assert_eq!(c.runner_cpu_request, "250m");
        assert_eq!(c.runner_cpu_limit, "1");
        assert_eq!(c.runner_memory_request, "256Mi");
        assert_eq!(c.runner_memory_limit, "1Gi");
        assert_eq!(c.agent_image, None);
        assert_eq!(c.agent_uid, 65533);
        assert_eq!(c.agent_cpu_request, "500m");
        assert_eq!(c.agent_cpu_limit, "2");
        assert_eq!(c.agent_memory_request, "512Mi");
        assert_eq!(c.agent_memory_limit, "2Gi");
        assert_eq!(c.agent_extra_env, None);
        assert!(!c.allow_insecure_http);
        assert!(c.open_pull_requests);
        assert_eq!(c.git_ca_configmap, None);
        assert_eq!(c.git_ca_key, "ca.crt");
        assert_eq!(c.runner_ephemeral_storage, "10Gi");
        assert_eq!(c.runner_tmp_size_limit, "1Gi");
        assert_eq!(c.runner_node_selector, None);
        assert_eq!(c.runner_tolerations, None);
        assert_eq!(c.runner_affinity, None);
        assert_eq!(c.runner_priority_class, None);
        assert!(c.runner_env_from_secrets.is_empty());
        assert_eq!(c.job_ttl_seconds, 3600);
        assert_eq!(c.runner_termination_grace_seconds, 30);
        assert_eq!(c.redis_secret_name, "repobox-redis");
        assert_eq!(c.redis_secret_key, "url");
        assert_eq!(c.encryption_key_secret_name, "repobox-encryption-key");
        assert_eq!(c.encryption_key_secret_key, "key");
        assert_eq!(c.temp_dir, "/work");
        assert!(c.cleanup_after_job);
        assert_eq!(c.git_author_name, "Repobox");
        assert_eq!(c.git_author_email, "repobox@users.noreply.repobox.dev");
        assert_eq!(c.git_clone_depth, 1);
        assert_eq!(c.agent_command, None);
        c.validate().unwrap();
    }

    #[test]
    fn default_job_config() {
        let j = test_job_config(&[]);
        assert_eq!(
            j,
            JobConfig {
                image: DEFAULT_RUNNER_IMAGE.into(),
                image_pull_policy: "IfNotPresent".into(),
                image_pull_secrets: vec![],
                service_account: "repobox-runner".into(),
                resources: RunnerResources {
                    cpu_request: Some(Quantity("250m".into())),
                    cpu_limit: Some(Quantity("1".into())),
                    memory_request: Some(Quantity("256Mi".into())),
                    memory_limit: Some(Quantity("1Gi".into())),
                    ephemeral_storage_request: Some(Quantity("2Gi".into())),
                    ephemeral_storage_limit: None,
                },
                agent: None,
                work_size_limit: Some(Quantity("10Gi".into())),
                tmp_size_limit: Some(Quantity("1Gi".into())),
                node_selector: None,
                tolerations: None,
                affinity: None,
                priority_class_name: None,
                pod_annotations: BTreeMap::from([
                    (
                        "cluster-autoscaler.kubernetes.io/safe-to-evict".into(),
                        "false".into()
                    ),
                    ("karpenter.sh/do-not-disrupt".into(), "true".into()),
                ]),
                default_timeout_seconds: 3600,
                ttl_seconds_after_finished: 3600,
                termination_grace_period_seconds: 30,
                redis_secret: SecretKeyRef {
                    name: "repobox-redis".into(),
                    key: "url".into()
                },
                encryption_key_secret: SecretKeyRef {
                    name: "repobox-encryption-key".into(),
                    key: "key".into()
                },
                temp_dir: "/work".into(),
                cleanup_after_job: true,
                git_author_name: "Repobox".into(),
                git_author_email: "repobox@users.noreply.repobox.dev".into(),
                git_clone_depth: 1,
                allow_insecure_http: false,
                open_pull_requests: true,
                git_ca: None,
                redis_ca: None,
            }
        );
    }

    #[test]
    fn autoscaling_settings() {
        let j = test_job_config(&[
            ("RUNNER_EPHEMERAL_STORAGE_REQUEST", "5Gi"),
            ("RUNNER_EPHEMERAL_STORAGE_LIMIT", "20Gi"),
            ("RUNNER_DO_NOT_DISRUPT", "false"),
            (
                "RUNNER_POD_ANNOTATIONS",
                r#"{"example.com/team":"repobox","sidecar.istio.io/inject":"false"}"#,
            ),
        ]);
        assert_eq!(
            j.resources.ephemeral_storage_request,
            Some(Quantity("5Gi".into()))
        );
        assert_eq!(
            j.resources.ephemeral_storage_limit,
            Some(Quantity("20Gi".into()))
        );
        assert_eq!(
            j.pod_annotations,
            BTreeMap::from([
                ("example.com/team".into(), "repobox".into()),
                ("sidecar.istio.io/inject".into(), "false".into()),
            ]),
            "without do-not-disrupt only the extra annotations"
        );
        let j = test_job_config(&[
            ("RUNNER_EPHEMERAL_STORAGE_REQUEST", ""),
            (
                "RUNNER_POD_ANNOTATIONS",
                r#"{"karpenter.sh/do-not-disrupt":"false"}"#,
            ),
        ]);
        assert_eq!(j.resources.ephemeral_storage_request, None);
        assert_eq!(
            j.pod_annotations["karpenter.sh/do-not-disrupt"], "true",
            "RUNNER_DO_NOT_DISRUPT wins over an extra annotation"
        );

        for (env, setting) in [
            (
                vec![("RUNNER_EPHEMERAL_STORAGE_REQUEST", "lots")],
                "RUNNER_EPHEMERAL_STORAGE_REQUEST",
            ),
            (
                vec![
                    ("RUNNER_EPHEMERAL_STORAGE_REQUEST", "4Gi"),
                    ("RUNNER_EPHEMERAL_STORAGE_LIMIT", "1Gi"),
                ],
                "RUNNER_EPHEMERAL_STORAGE_REQUEST",
            ),
            (
                vec![
                    ("AGENT_COMMAND", "a"),
                    ("AGENT_EPHEMERAL_STORAGE_LIMIT", "1x"),
                ],
                "AGENT_EPHEMERAL_STORAGE_LIMIT",
            ),
            (
                vec![("RUNNER_POD_ANNOTATIONS", r#"{"bad key!":"x"}"#)],
                "RUNNER_POD_ANNOTATIONS",
            ),
            (
                vec![("RUNNER_POD_ANNOTATIONS", r#"["not","an","object"]"#)],
                "RUNNER_POD_ANNOTATIONS",
            ),
        ] {
            let err = test_config(&env).job_config().unwrap_err();
            assert!(
                matches!(&err, Error::InvalidConfig { setting: s, .. } if *s == setting),
                "{env:?}: {err}"
            );
        }
    }

    #[test]
    fn qualified_names() {
        for ok in ["a", "example.com/x", "a.b-c_d", "x/Y9", &"a".repeat(63)] {
            assert!(is_qualified_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/x",
            "x/",
            "-a",
            "a-",
            "bad key",
            "UPPER.example/x",
            &"a".repeat(64),
        ] {
            assert!(!is_qualified_name(bad), "{bad}");
        }
    }

    #[test]
    fn retry_and_unschedulable_settings() {
        let c = test_config(&[]);
        assert_eq!(c.unschedulable_grace(), Duration::from_secs(60));
        assert_eq!(
            c.retry_policy(),
            crate::decide::retry::RetryPolicy {
                max_retries: 2,
                backoff: Duration::from_secs(10)
            }
        );
        let c = test_config(&[
            ("UNSCHEDULABLE_GRACE_SECONDS", "5"),
            ("MAX_DISRUPTION_RETRIES", "0"),
            ("DISRUPTION_RETRY_BACKOFF_SECONDS", "1"),
        ]);
        assert_eq!(c.unschedulable_grace(), Duration::from_secs(5));
        assert_eq!(c.retry_policy().max_retries, 0);
        assert_eq!(c.retry_policy().backoff, Duration::from_secs(1));
    }

    #[test]
    fn agent_container_settings() {
        let j = test_job_config(&[("AGENT_COMMAND", "agent --fast")]);
        let a = j.agent.expect("an agent command gives an agent container");
        assert_eq!(a.command, "agent --fast");
        assert_eq!(a.image, DEFAULT_RUNNER_IMAGE, "the runner image by default");
        assert_eq!(a.uid, 65533);
        assert_eq!(
            a.resources,
            RunnerResources {
                cpu_request: Some(Quantity("500m".into())),
                cpu_limit: Some(Quantity("2".into())),
                memory_request: Some(Quantity("512Mi".into())),
                memory_limit: Some(Quantity("2Gi".into())),
                ephemeral_storage_request: Some(Quantity("1Gi".into())),
                ephemeral_storage_limit: None,
            }
        );
        assert!(a.extra_env.is_empty() && a.env_from_secrets.is_empty());

        let a = test_job_config(&[
            ("AGENT_COMMAND", "x"),
            ("AGENT_IMAGE", "registry.example/agent:2"),
            ("AGENT_UID", "1000"),
            ("AGENT_CPU_REQUEST", "1"),
            ("AGENT_MEMORY_LIMIT", ""),
            ("AGENT_EXTRA_ENV", r#"{"MODEL":"large","B_2":""}"#),
            ("RUNNER_ENV_FROM_SECRETS", "agent-keys"),
        ])
        .agent
        .unwrap();
        assert_eq!(a.image, "registry.example/agent:2");
        assert_eq!(a.uid, 1000);
        assert_eq!(a.resources.cpu_request, Some(Quantity("1".into())));
        assert_eq!(a.resources.memory_limit, None);
        assert_eq!(
            a.extra_env.into_iter().collect::<Vec<_>>(),
            [
                ("B_2".to_owned(), String::new()),
                ("MODEL".to_owned(), "large".to_owned())
            ]
        );
        assert_eq!(a.env_from_secrets, ["agent-keys"]);

        for (k, v) in [
            ("AGENT_UID", "65532"),
            ("AGENT_IMAGE", "a b"),
            ("AGENT_EXTRA_ENV", "[1]"),
            ("AGENT_EXTRA_ENV", r#"{"1X":"y"}"#),
            ("AGENT_EXTRA_ENV", r#"{"HANDOFF_DIR":"/x"}"#),
            ("AGENT_CPU_REQUEST", "3"),
        ] {
            let e = test_config(&[("AGENT_COMMAND", "x"), (k, v)])
                .job_config()
                .unwrap_err()
                .to_string();
            assert!(e.contains(k), "{k}: {e}");
        }
    }

    #[test]
    fn git_transport_settings() {
        let j = test_job_config(&[
            ("ALLOW_INSECURE_HTTP", "true"),
            ("GIT_CA_CONFIGMAP", "git-ca"),
        ]);
        assert!(j.allow_insecure_http);
        assert_eq!(
            j.git_ca,
            Some(ConfigMapKeyRef {
                name: "git-ca".into(),
                key: "ca.crt".into()
            })
        );
        for env in [
            [("GIT_CA_CONFIGMAP", "Bad_Name"), ("GIT_CA_KEY", "ca.crt")],
            [("GIT_CA_CONFIGMAP", "ok"), ("GIT_CA_KEY", " ")],
        ] {
            let k = if env[0].1 == "ok" { env[1].0 } else { env[0].0 };
            let e = test_config(&env).job_config().unwrap_err().to_string();
            assert!(e.contains(k), "{k}: {e}");
        }
    }

    #[test]
    fn every_env_override() {
        let env = [
            ("REDIS_URL", "rediss://u:p@redis.example:6380/2"),
            ("RUNNER_ID", "op-7"),
            ("POD_NAME", "pod-x"),
            ("HOSTNAME", "host-x"),
            ("POD_NAMESPACE", "ops"),
            ("STREAM_KEY", "s"),
            ("CONSUMER_GROUP", "g"),
            ("DEAD_LETTER_STREAM", "d"),
            ("MAX_DELIVERIES", "9"),
            ("CLAIM_MIN_IDLE_SECONDS", "30"),
            ("DEAD_LETTER_MAXLEN", "77"),
            ("OUTPUT_TTL_SECONDS", "60"),
            ("REDIS_CA_FILE", "/etc/redis-ca/ca.crt"),
            ("REDIS_CA_SECRET_NAME", "redis-ca"),
            ("REDIS_CA_SECRET_KEY", "ca.pem"),
            ("MAX_CONCURRENT_JOBS", "20"),
            ("MAX_JOBS_PER_USER", "4"),
            ("MAX_QUEUED", "50"),
            ("MAX_QUEUED_PER_USER", "7"),
            ("PLAN_LIMITS", r#"{"free": 1, "pro": 4}"#),
            ("JOB_TIMEOUT", "120"),
            ("RETENTION_SECONDS", "10"),
            ("PENDING_TIMEOUT_SECONDS", "11"),
            ("JOBS_NAMESPACE", "jobs"),
            ("METRICS_ADDR", "127.0.0.1:9090"),
            ("LEADER_ELECTION", "false"),
            ("LEASE_NAME", "lease-x"),
            ("LEASE_NAMESPACE", "leases"),
            ("LEASE_DURATION_SECONDS", "20"),
            ("LOG_LEVEL", "debug"),
            ("LOG_FORMAT", "text"),
            ("RUNNER_IMAGE", "registry.example/runner:1"),
            ("RUNNER_IMAGE_PULL_POLICY", "Always"),
            ("RUNNER_IMAGE_PULL_SECRETS", "pull-a,pull-b"),
            ("RUNNER_SERVICE_ACCOUNT", "sa"),
            ("RUNNER_CPU_REQUEST", "1"),
            ("RUNNER_CPU_LIMIT", "4"),
            ("RUNNER_MEMORY_REQUEST", "1Gi"),
            ("RUNNER_MEMORY_LIMIT", "4Gi"),
            ("RUNNER_EPHEMERAL_STORAGE_REQUEST", "3Gi"),
            ("RUNNER_EPHEMERAL_STORAGE_LIMIT", "30Gi"),
            ("RUNNER_DO_NOT_DISRUPT", "false"),
            ("RUNNER_POD_ANNOTATIONS", r#"{"a.example/b":"c"}"#),
            ("UNSCHEDULABLE_GRACE_SECONDS", "30"),
            ("MAX_DISRUPTION_RETRIES", "1"),
            ("DISRUPTION_RETRY_BACKOFF_SECONDS", "2"),
            ("RUNNER_EPHEMERAL_STORAGE", "20Gi"),
            ("RUNNER_TMP_SIZE_LIMIT", "2Gi"),
            ("RUNNER_NODE_SELECTOR", r#"{"pool":"jobs"}"#),
            (
                "RUNNER_TOLERATIONS",
                r#"[{"key":"jobs","operator":"Exists","effect":"NoSchedule"}]"#,
            ),
            (
                "RUNNER_AFFINITY",
                r#"{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"k","operator":"In","values":["v"]}]}]}}}"#,
            ),
            ("RUNNER_PRIORITY_CLASS", "low"),
            ("RUNNER_ENV_FROM_SECRETS", "agent-keys"),
            ("JOB_TTL_SECONDS", "60"),
            ("RUNNER_TERMINATION_GRACE_SECONDS", "5"),
            ("REDIS_SECRET_NAME", "r-sec"),
            ("REDIS_SECRET_KEY", "redis-url"),
            ("ENCRYPTION_KEY_SECRET_NAME", "e-sec"),
            ("ENCRYPTION_KEY_SECRET_KEY", "ENCRYPTION_KEY"),
            ("TEMP_DIR", "/data/work/"),
            ("CLEANUP_AFTER_JOB", "0"),
            ("GIT_AUTHOR_NAME", "Bot"),
            ("GIT_AUTHOR_EMAIL", "bot@example.com"),
            ("GIT_CLONE_DEPTH", "0"),
            ("AGENT_COMMAND", "agent --fast"),
            ("AGENT_IMAGE", "registry.example/agent:3"),
            ("AGENT_UID", "2000"),
            ("AGENT_CPU_REQUEST", "100m"),
            ("AGENT_CPU_LIMIT", "3"),
            ("AGENT_MEMORY_REQUEST", "128Mi"),
            ("AGENT_MEMORY_LIMIT", "3Gi"),
            ("AGENT_EPHEMERAL_STORAGE_REQUEST", "512Mi"),
            ("AGENT_EPHEMERAL_STORAGE_LIMIT", "4Gi"),
            ("AGENT_EXTRA_ENV", r#"{"MODEL":"m"}"#),
            ("ALLOW_INSECURE_HTTP", "true"),
            ("OPEN_PULL_REQUESTS", "false"),
            ("GIT_CA_CONFIGMAP", "git-ca"),
            ("GIT_CA_KEY", "bundle.pem"),
        ];
        // Guard against a setting added without being covered here.
        let covered: Vec<&str> = env.iter().map(|(k, _)| *k).collect();
        for a in Config::command().get_arguments() {
            if let Some(e) = a.get_env() {
                assert!(covered.contains(&e.to_str().unwrap()), "{e:?} not covered");
            }
        }
        let c = parse_with_env(&[], &env).unwrap();
        c.validate().unwrap();
        assert_eq!(c.redis_url.expose(), "rediss://u:p@redis.example:6380/2");
        assert_eq!(c.runner_id(), "op-7");
        assert_eq!(c.jobs_namespace(), "jobs");
        assert_eq!(c.lease_namespace(), "leases");
        assert_eq!(
            (
                c.stream_key.as_str(),
                c.consumer_group.as_str(),
                c.dead_letter_stream.as_str()
            ),
            ("s", "g", "d")
        );
        assert_eq!(c.max_deliveries, 9);
        assert_eq!(c.claim_min_idle(), Duration::from_secs(30));
        assert_eq!(c.dead_letter_maxlen, 77);
        assert_eq!(c.output_ttl(), Some(Duration::from_secs(60)));
        assert_eq!(
            c.redis_ca_file.as_deref(),
            Some(std::path::Path::new("/etc/redis-ca/ca.crt"))
        );
        assert_eq!(c.redis_ca_secret_name.as_deref(), Some("redis-ca"));
        assert_eq!(c.redis_ca_secret_key, "ca.pem");
        assert_eq!(
            c.limits(),
            Limits {
                per_user: 4,
                global: 20
            }
        );
        assert_eq!(c.max_queued, 50);
        assert_eq!(c.max_queued_per_user(), Some(7));
        assert_eq!(c.plan_limits().unwrap().get("pro"), Some(4));
        assert_eq!(c.job_timeout, 120);
        assert_eq!(c.retention(), Duration::from_secs(10));
        assert_eq!(c.pending_timeout(), Duration::from_secs(11));
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9090");
        assert!(!c.leader_election);
        assert_eq!(c.lease_name, "lease-x");
        assert_eq!(c.lease_duration(), Duration::from_secs(20));
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(!c.cleanup_after_job);

        let j = c.job_config().unwrap();
        assert_eq!(j.image, "registry.example/runner:1");
        assert_eq!(j.image_pull_policy, "Always");
        assert_eq!(j.image_pull_secrets, ["pull-a", "pull-b"]);
        assert_eq!(j.service_account, "sa");
        assert_eq!(j.resources.cpu_request, Some(Quantity("1".into())));
        assert_eq!(j.resources.cpu_limit, Some(Quantity("4".into())));
        assert_eq!(j.resources.memory_request, Some(Quantity("1Gi".into())));
        assert_eq!(j.resources.memory_limit, Some(Quantity("4Gi".into())));
        assert_eq!(j.work_size_limit, Some(Quantity("20Gi".into())));
        assert_eq!(j.tmp_size_limit, Some(Quantity("2Gi".into())));
        assert_eq!(
            j.node_selector,
            Some(BTreeMap::from([("pool".to_owned(), "jobs".to_owned())]))
        );
        let tol = &j.tolerations.as_ref().unwrap()[0];
        assert_eq!(
            (
                tol.key.as_deref(),
                tol.operator.as_deref(),
                tol.effect.as_deref()
            ),
            (Some("jobs"), Some("Exists"), Some("NoSchedule"))
        );
        let terms = &j
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms[0].match_expressions.as_ref().unwrap()[0].key, "k");
        assert_eq!(j.priority_class_name.as_deref(), Some("low"));
        assert_eq!(j.agent.as_ref().unwrap().env_from_secrets, ["agent-keys"]);
        assert_eq!(j.default_timeout_seconds, 120);
        assert_eq!(j.ttl_seconds_after_finished, 60);
        assert_eq!(j.termination_grace_period_seconds, 5);
        assert_eq!(
            j.redis_secret,
            SecretKeyRef {
                name: "r-sec".into(),
                key: "redis-url".into()
            }
        );
        assert_eq!(
            j.encryption_key_secret,
            SecretKeyRef {
                name: "e-sec".into(),
                key: "ENCRYPTION_KEY".into()
            }
        );
        assert_eq!(j.temp_dir, "/data/work");
        assert!(!j.cleanup_after_job);
        assert_eq!(j.git_author_name, "Bot");
        assert_eq!(j.git_author_email, "bot@example.com");
        assert_eq!(j.git_clone_depth, 0);
        let a = j.agent.as_ref().unwrap();
        assert_eq!(a.command, "agent --fast");
        assert_eq!(a.image, "registry.example/agent:3");
        assert_eq!(a.uid, 2000);
        assert_eq!(a.resources.cpu_request, Some(Quantity("100m".into())));
        assert_eq!(a.resources.cpu_limit, Some(Quantity("3".into())));
        assert_eq!(a.resources.memory_request, Some(Quantity("128Mi".into())));
        assert_eq!(a.resources.memory_limit, Some(Quantity("3Gi".into())));
        assert_eq!(a.extra_env["MODEL"], "m");
        assert!(j.allow_insecure_http);
        assert!(!j.open_pull_requests);
        assert_eq!(
            j.git_ca,
            Some(ConfigMapKeyRef {
                name: "git-ca".into(),
                key: "bundle.pem".into()
            })
        );
    }

    #[test]
    fn flags_override_env() {
        let c = parse_with_env(
            &["--max-jobs-per-user", "7", "--leader-election=true"],
            &[
                ("REDIS_URL", "redis://r"),
                ("MAX_JOBS_PER_USER", "2"),
                ("LEADER_ELECTION", "false"),
            ],
        )
        .unwrap();
        assert_eq!(c.max_jobs_per_user, 7);
        assert!(c.leader_election);
    }

    #[test]
    fn runner_id_and_namespace_fallbacks() {
        assert_eq!(
            test_config(&[("POD_NAME", "op-abc"), ("HOSTNAME", "h")]).runner_id(),
            "op-abc"
        );
        assert_eq!(test_config(&[("HOSTNAME", "h")]).runner_id(), "h");
        assert_eq!(
            test_config(&[("RUNNER_ID", ""), ("POD_NAME", "")]).runner_id(),
            "runner-1"
        );
        let c = test_config(&[("POD_NAMESPACE", "ops")]);
        assert_eq!(c.jobs_namespace(), "ops");
        assert_eq!(c.lease_namespace(), "ops");
        let c = test_config(&[("JOBS_NAMESPACE", "jobs")]);
        assert_eq!(c.lease_namespace(), "jobs");
        let c = test_config(&[("JOBS_NAMESPACE", "jobs"), ("POD_NAMESPACE", "ops")]);
        assert_eq!((c.jobs_namespace(), c.lease_namespace()), ("jobs", "ops"));
    }

    #[test]
    fn booleans_accept_common_spellings() {
        for (v, want) in [
            ("true", true),
            ("1", true),
            ("yes", true),
            ("on", true),
            ("false", false),
            ("0", false),
            ("no", false),
            ("off", false),
        ] {
            let c = test_config(&[("LEADER_ELECTION", v), ("CLEANUP_AFTER_JOB", v)]);
            assert_eq!(
                (c.leader_election, c.cleanup_after_job),
                (want, want),
                "{v}"
            );
        }
        assert!(
            parse_with_env(
                &[],
                &[("REDIS_URL", "redis://r"), ("LEADER_ELECTION", "maybe")]
            )
            .is_err()
        );
    }

    #[test]
    fn zero_and_malformed_numbers_are_rejected_by_clap() {
        for (k, v) in [
            ("MAX_CONCURRENT_JOBS", "0"),
            ("MAX_JOBS_PER_USER", "0"),
            ("MAX_QUEUED", "0"),
            ("JOB_TIMEOUT", "0"),
            ("MAX_DELIVERIES", "0"),
            ("CLAIM_MIN_IDLE_SECONDS", "0"),
            ("RETENTION_SECONDS", "0"),
            ("PENDING_TIMEOUT_SECONDS", "0"),
            ("LEASE_DURATION_SECONDS", "0"),
            ("JOB_TTL_SECONDS", "-1"),
            ("RUNNER_TERMINATION_GRACE_SECONDS", "-1"),
            ("MAX_CONCURRENT_JOBS", "ten"),
            ("GIT_CLONE_DEPTH", "-1"),
            ("METRICS_ADDR", "localhost"),
            ("LOG_FORMAT", "xml"),
            ("RUNNER_IMAGE_PULL_POLICY", "Sometimes"),
        ] {
            let err = parse_with_env(&[], &[("REDIS_URL", "redis://r"), (k, v)]).unwrap_err();
            let flag = format!("--{}", k.to_lowercase().replace('_', "-"));
            assert!(err.to_string().contains(&flag), "{k}={v}: {err}");
        }
        // JOB_TTL_SECONDS=0 (delete immediately) is allowed.
        assert_eq!(test_config(&[("JOB_TTL_SECONDS", "0")]).job_ttl_seconds, 0);
    }

    fn config_error(env: &[(&str, &str)]) -> (&'static str, String) {
        match test_config(env).validate() {
            Err(Error::InvalidConfig { setting, reason }) => (setting, reason),
            other => panic!("expected InvalidConfig for {env:?}, got {other:?}"),
        }
    }

    #[test]
    fn malformed_json_names_the_setting() {
        for setting in [
            "RUNNER_NODE_SELECTOR",
            "RUNNER_TOLERATIONS",
            "RUNNER_AFFINITY",
        ] {
            let (s, reason) = config_error(&[(setting, "{not json")]);
            assert_eq!(s, setting);
            assert!(reason.contains("malformed JSON"), "{reason}");
            let e = test_config(&[(setting, "{not json")])
                .job_config()
                .unwrap_err();
            assert!(e.to_string().contains(setting), "{e}");
        }
        // Well-formed JSON of the wrong shape.
        assert_eq!(
            config_error(&[("RUNNER_NODE_SELECTOR", r#"{"a":1}"#)]).0,
            "RUNNER_NODE_SELECTOR"
        );
        assert_eq!(
            config_error(&[("RUNNER_NODE_SELECTOR", r#"["a"]"#)]).0,
            "RUNNER_NODE_SELECTOR"
        );
        assert_eq!(
            config_error(&[("RUNNER_TOLERATIONS", r#"{"key":"a"}"#)]).0,
            "RUNNER_TOLERATIONS"
        );
        assert_eq!(
            config_error(&[("RUNNER_AFFINITY", r#"[1]"#)]).0,
            "RUNNER_AFFINITY"
        );
        // Blank means unset.
        let j = test_job_config(&[
            ("RUNNER_NODE_SELECTOR", ""),
            ("RUNNER_TOLERATIONS", "  "),
            ("RUNNER_AFFINITY", ""),
        ]);
        assert_eq!(
            (j.node_selector, j.tolerations, j.affinity),
            (None, None, None)
        );
        // Empty collections are kept (an explicit empty list is still valid).
        let j = test_job_config(&[("RUNNER_NODE_SELECTOR", "{}"), ("RUNNER_TOLERATIONS", "[]")]);
        assert_eq!(j.node_selector, Some(BTreeMap::new()));
        assert_eq!(j.tolerations, Some(vec![]));
    }

    #[test]
    fn malformed_settings_name_the_setting() {
        let cases: &[(&str, &str)] = &[
            ("RUNNER_CPU_REQUEST", "lots"),
            ("RUNNER_CPU_LIMIT", "2 cores"),
            ("RUNNER_MEMORY_REQUEST", "512MB"),
            ("RUNNER_MEMORY_LIMIT", "-1Gi"),
            ("RUNNER_EPHEMERAL_STORAGE", "10G i"),
            ("RUNNER_TMP_SIZE_LIMIT", "x"),
            ("RUNNER_IMAGE", ""),
            ("RUNNER_IMAGE", "a b"),
            ("RUNNER_SERVICE_ACCOUNT", "Bad_SA"),
            ("RUNNER_PRIORITY_CLASS", "Low!"),
            ("RUNNER_IMAGE_PULL_SECRETS", "ok,Not_OK"),
            ("RUNNER_ENV_FROM_SECRETS", "UPPER"),
            ("REDIS_SECRET_NAME", "no/slash"),
            ("REDIS_SECRET_KEY", "a/b"),
            ("ENCRYPTION_KEY_SECRET_NAME", ""),
            ("ENCRYPTION_KEY_SECRET_KEY", ".."),
            ("TEMP_DIR", "work"),
            ("TEMP_DIR", "/"),
            ("TEMP_DIR", "/tmp"),
            ("TEMP_DIR", "/tmp/"),
            ("TEMP_DIR", "/a/../b"),
            ("TEMP_DIR", "/a//b"),
            ("TEMP_DIR", "/var/run/secrets/repobox/encryption-key"),
            ("JOBS_NAMESPACE", "Bad"),
            ("LEASE_NAMESPACE", "bad_ns"),
            ("LEASE_NAME", "Bad Lease"),
            ("STREAM_KEY", " "),
            ("CONSUMER_GROUP", ""),
            ("DEAD_LETTER_STREAM", "jobs:stream"),
        ];
        for (k, v) in cases {
            let (setting, _) = config_error(&[(k, v)]);
            assert_eq!(&setting, k, "{k}={v:?}");
        }
    }

    #[test]
    fn request_above_limit_is_rejected() {
        let (s, reason) = config_error(&[("RUNNER_CPU_REQUEST", "3"), ("RUNNER_CPU_LIMIT", "2")]);
        assert_eq!(s, "RUNNER_CPU_REQUEST");
        assert!(reason.contains("RUNNER_CPU_LIMIT"), "{reason}");
        let (s, _) = config_error(&[
            ("RUNNER_MEMORY_REQUEST", "3Gi"),
            ("RUNNER_MEMORY_LIMIT", "2048Mi"),
        ]);
        assert_eq!(s, "RUNNER_MEMORY_REQUEST");
        // Equal, different units.
        test_job_config(&[
            ("RUNNER_MEMORY_REQUEST", "2048Mi"),
            ("RUNNER_MEMORY_LIMIT", "2Gi"),
        ]);
        test_job_config(&[("RUNNER_CPU_REQUEST", "2000m"), ("RUNNER_CPU_LIMIT", "2")]);
    }

    #[test]
    fn empty_resources_mean_unset() {
        let j = test_job_config(&[
            ("RUNNER_CPU_REQUEST", ""),
            ("RUNNER_CPU_LIMIT", ""),
            ("RUNNER_MEMORY_REQUEST", ""),
            ("RUNNER_MEMORY_LIMIT", ""),
            ("RUNNER_EPHEMERAL_STORAGE_REQUEST", ""),
            ("RUNNER_EPHEMERAL_STORAGE", ""),
            ("RUNNER_TMP_SIZE_LIMIT", ""),
            ("RUNNER_PRIORITY_CLASS", ""),
            ("AGENT_COMMAND", " "),
            ("RUNNER_IMAGE_PULL_SECRETS", ""),
        ]);
        assert_eq!(j.resources, RunnerResources::default());
        assert_eq!((j.work_size_limit, j.tmp_size_limit), (None, None));
        assert_eq!(j.priority_class_name, None);
        assert_eq!(j.agent, None);
        assert!(j.image_pull_secrets.is_empty());
    }

    #[test]
    fn redis_url_validation_and_masking() {
        for ok in [
            "redis://h",
            "rediss://h:6380",
            "redis+unix:///sock",
            "unix:///s",
            "redis://:pw@h/0",
        ] {
            test_config(&[("REDIS_URL", ok)]).validate().unwrap();
        }
        let (s, reason) = config_error(&[("REDIS_URL", "http://:secretpw@h")]);
        assert_eq!(s, "REDIS_URL");
        assert!(!reason.contains("secretpw"));
        let (s, _) = config_error(&[("REDIS_URL", "localhost:6379")]);
        assert_eq!(s, "REDIS_URL");

        let cases = [
            (
                "redis://user:secretpw@host:6379/0",
                "redis://user:****@host:6379/0",
            ),
            ("redis://:secretpw@host", "redis://:****@host"),
            ("rediss://secretpw@host", "rediss://****@host"),
            ("redis://host:6379", "redis://host:6379"),
            ("redis://u:p@ss@host/x@y", "redis://u:****@host/x@y"),
            ("not a url", "not a url"),
        ];
        for (url, want) in cases {
            assert_eq!(RedisUrl::from(url.to_owned()).masked(), want, "{url}");
        }
    }

    #[test]
    fn debug_never_prints_the_redis_password() {
        let c = test_config(&[("REDIS_URL", "redis://default:hunter2secret@redis:6379")]);
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2secret"), "{dbg}");
        assert!(dbg.contains("redis://default:****@redis:6379"), "{dbg}");
        assert!(!format!("{}", c.redis_url).contains("hunter2secret"));
        assert!(!format!("{:#?}", c).contains("hunter2secret"));
    }

    #[test]
    fn help_hides_the_redis_url_value() {
        let cmd = Config::command();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "redis_url")
            .unwrap();
        assert!(arg.is_hide_env_values_set());
    }

    #[test]
    fn quantities() {
        let cases: &[(&str, Option<f64>)] = &[
            ("0", Some(0.0)),
            ("1", Some(1.0)),
            ("500m", Some(0.5)),
            ("2", Some(2.0)),
            ("1.5", Some(1.5)),
            (".5", Some(0.5)),
            ("5.", Some(5.0)),
            ("+1", Some(1.0)),
            ("-1", Some(-1.0)),
            ("1k", Some(1e3)),
            ("1M", Some(1e6)),
            ("1G", Some(1e9)),
            ("1T", Some(1e12)),
            ("1P", Some(1e15)),
            ("1E", Some(1e18)),
            ("1Ki", Some(1024.0)),
            ("512Mi", Some(512.0 * 1024.0 * 1024.0)),
            ("2Gi", Some(2.0 * 1024f64.powi(3))),
            ("1Ti", Some(1024f64.powi(4))),
            ("1Pi", Some(1024f64.powi(5))),
            ("1Ei", Some(1024f64.powi(6))),
            ("1e3", Some(1e3)),
            ("1E-3", Some(1e-3)),
            ("1e+2", Some(1e2)),
            ("", None),
            ("m", None),
            ("Gi", None),
            (".", None),
            ("1..2", None),
            ("1.2.3", None),
            ("1 Gi", None),
            ("1GB", None),
            ("1gi", None),
            ("1K", None),
            ("1e", None),
            ("1e1.5", None),
            ("--1", None),
            ("0x10", None),
        ];
        for (s, want) in cases {
            let got = parse_quantity(s);
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() <= w.abs() * 1e-12, "{s}: {g} != {w}"),
                (g, w) => assert_eq!(g, *w, "{s}"),
            }
        }
    }

    #[test]
    fn name_validators() {
        assert!(is_dns1123_subdomain("a.b-c.d"));
        assert!(!is_dns1123_subdomain(""));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(!is_dns1123_subdomain(".a"));
        assert!(!is_dns1123_subdomain("A"));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
        assert!(is_secret_key("ENCRYPTION_KEY"));
        assert!(is_secret_key(".dot-file_1"));
        assert!(!is_secret_key(""));
        assert!(!is_secret_key("."));
        assert!(!is_secret_key(".."));
        assert!(!is_secret_key("a/b"));
        assert!(!is_secret_key("a b"));
    }

    #[test]
    fn config_parses_from_real_argv_without_env_dependence_in_required_args() {
        // `Config::try_parse_from` is what `main` uses (through the `run` subcommand); with the
        // URL given as a flag it must succeed whatever the process environment holds.
        let c = Config::try_parse_from(["repobox-operator", "--redis-url", "redis://flag"]);
        assert_eq!(
            c.map(|c| c.redis_url.expose().to_owned()).ok().as_deref(),
            Some("redis://flag")
        );
    }

    #[test]
    fn redis_retention_settings() {
        let c = test_config(&[]);
        assert_eq!(c.dead_letter_maxlen, 10_000);
        assert_eq!(c.output_ttl(), Some(Duration::from_secs(7 * 24 * 3600)));
        let c = test_config(&[("DEAD_LETTER_MAXLEN", "50"), ("OUTPUT_TTL_SECONDS", "0")]);
        assert_eq!(c.dead_letter_maxlen, 50);
        assert_eq!(c.output_ttl(), None, "0 keeps the output forever");
        let c = test_config(&[("OUTPUT_TTL_SECONDS", "90")]);
        assert_eq!(c.output_ttl(), Some(Duration::from_secs(90)));
        assert!(
            parse_with_env(
                &[],
                &[("REDIS_URL", "redis://x"), ("DEAD_LETTER_MAXLEN", "0")]
            )
            .is_err()
        );
        assert!(
            parse_with_env(
                &[],
                &[("REDIS_URL", "redis://x"), ("OUTPUT_TTL_SECONDS", "-1")]
            )
            .is_err()
        );
    }

    #[test]
    fn redis_tls_settings() {
        let c = test_config(&[]);
        assert_eq!(c.redis_ca_file, None);
        assert_eq!(c.redis_ca_secret_name, None);
        assert_eq!(c.redis_ca_secret_key, "ca.crt");
        let ok = test_config(&[
            ("REDIS_URL", "rediss://op:pw@redis:6380"),
            ("REDIS_CA_FILE", "/etc/repobox/redis-ca/ca.crt"),
            ("REDIS_CA_SECRET_NAME", "redis-ca"),
        ]);
        ok.validate().unwrap();
        let plain = test_config(&[("REDIS_CA_FILE", "/ca.crt")]);
        let err = plain.validate().unwrap_err().to_string();
        assert!(err.contains("REDIS_CA_FILE"), "{err}");
        let bad = test_config(&[("REDIS_CA_SECRET_NAME", "Not_A_Name")]);
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("REDIS_CA_SECRET_NAME"), "{err}");
        let bad = test_config(&[
            ("REDIS_CA_SECRET_NAME", "redis-ca"),
            ("REDIS_CA_SECRET_KEY", "a/b"),
        ]);
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("REDIS_CA_SECRET_KEY"), "{err}");
    }
}
