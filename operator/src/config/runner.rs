//! The runner pods: the runner container (image, resources, placement, Secrets), the agent
//! container, and the settings passed through to the runner's environment.
//!
//! These are raw strings as the environment gives them; [`super::Config::job_config`] turns them
//! into the typed [`crate::decide::job_config::JobConfig`] the Job builder takes.

use clap::builder::BoolishValueParser;
use repobox_contract::runner_env;

/// Default runner image: the job-runner image released with this operator version, so the two
/// binaries that share the Redis contract always match.
pub const DEFAULT_RUNNER_IMAGE: &str = concat!(
    "ghcr.io/repobox/repobox-job-runner:",
    env!("CARGO_PKG_VERSION")
);

/// The runner pod and its runner container (help heading "Runner pods").
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct RunnerPodSettings {
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
}

/// The agent container (help heading "Agent container"); without `AGENT_COMMAND` there is none.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct AgentSettings {
    /// The agent command, run with `sh -c` in the agent container (unset: no agent container,
    /// the job commits nothing). Must not contain a secret: it is visible in the Job; use
    /// `RUNNER_ENV_FROM_SECRETS` for credentials.
    #[arg(long, env = "AGENT_COMMAND")]
    pub agent_command: Option<String>,

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

    /// Comma-separated Secret names whose keys become environment variables of the agent
    /// container (`envFrom`), e.g. the agent's API key. The operator only references them; the
    /// runner container never sees them.
    #[arg(long, env = "RUNNER_ENV_FROM_SECRETS", value_delimiter = ',')]
    pub runner_env_from_secrets: Vec<String>,
}

/// Settings passed through to the runner container's environment (help heading "Passed to the
/// runner").
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct RunnerEnvSettings {
    /// The runner's work directory (an `emptyDir`), passed as `TEMP_DIR`.
    #[arg(long, env = "TEMP_DIR", default_value = "/work")]
    pub temp_dir: String,

    /// Passed to the runner: delete the work tree after the job.
    #[arg(long, env = "CLEANUP_AFTER_JOB", default_value_t = runner_env::DEFAULT_CLEANUP_AFTER_JOB, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub cleanup_after_job: bool,

    /// Passed to the runner: commit author name.
    #[arg(long, env = "GIT_AUTHOR_NAME", default_value = runner_env::DEFAULT_GIT_AUTHOR_NAME)]
    pub git_author_name: String,

    /// Passed to the runner: commit author e-mail.
    #[arg(
        long,
        env = "GIT_AUTHOR_EMAIL",
        default_value = runner_env::DEFAULT_GIT_AUTHOR_EMAIL
    )]
    pub git_author_email: String,

    /// Passed to the runner: `git clone --depth` (0: full clone).
    #[arg(long, env = "GIT_CLONE_DEPTH", default_value_t = runner_env::DEFAULT_GIT_CLONE_DEPTH)]
    pub git_clone_depth: u32,

    /// Passed to the runner: allow `http://` repository URLs (an in-cluster git host without
    /// TLS). The token then crosses the network in clear.
    #[arg(long, env = "ALLOW_INSECURE_HTTP", default_value_t = runner_env::DEFAULT_ALLOW_INSECURE_HTTP, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub allow_insecure_http: bool,

    /// Passed to the runner: after a push, open (or find) a pull / merge request from the
    /// job's branch into its base branch. A job can only turn it off (`openPullRequest=false`).
    #[arg(long, env = "OPEN_PULL_REQUESTS", default_value_t = runner_env::DEFAULT_OPEN_PULL_REQUESTS, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub open_pull_requests: bool,

    /// A ConfigMap holding the CA bundle of the git host (a private CA), mounted into the
    /// runner container and passed to git as `GIT_SSL_CAINFO`.
    #[arg(long, env = "GIT_CA_CONFIGMAP")]
    pub git_ca_configmap: Option<String>,

    /// The key of the CA bundle in `GIT_CA_CONFIGMAP`.
    #[arg(long, env = "GIT_CA_KEY", default_value = "ca.crt")]
    pub git_ca_key: String,
}
