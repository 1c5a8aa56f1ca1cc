//! The typed runner settings the Job builder takes: everything about a runner Job that does not
//! come from the RepoboxJob itself. [`crate::config`] validates the operator's settings into
//! these; the builder never sees a raw setting.

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

/// A reference to one key of a Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyRef {
    /// The Secret's name (same namespace as the Job).
    pub name: String,
    /// The key within the Secret.
    pub key: String,
}

/// Resource requests and limits of a container; `None` means "not set".
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RunnerResources {
    /// CPU request.
    pub cpu_request: Option<Quantity>,
    /// CPU limit.
    pub cpu_limit: Option<Quantity>,
    /// Memory request.
    pub memory_request: Option<Quantity>,
    /// Memory limit.
    pub memory_limit: Option<Quantity>,
    /// `ephemeral-storage` request.
    pub ephemeral_storage_request: Option<Quantity>,
    /// `ephemeral-storage` limit.
    pub ephemeral_storage_limit: Option<Quantity>,
}

/// The validated, typed settings [`crate::decide::job_builder::job_for`] needs: everything about a runner
/// Job that does not come from the RepoboxJob itself.
#[derive(Clone, Debug, PartialEq)]
pub struct JobConfig {
    /// Runner image.
    pub image: String,
    /// `imagePullPolicy`: `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: String,
    /// `imagePullSecrets` names.
    pub image_pull_secrets: Vec<String>,
    /// `serviceAccountName`.
    pub service_account: String,
    /// The runner container's resources.
    pub resources: RunnerResources,
    /// The agent container, when an agent command is set.
    pub agent: Option<AgentConfig>,
    /// `sizeLimit` of the work-tree `emptyDir`.
    pub work_size_limit: Option<Quantity>,
    /// `sizeLimit` of the `/tmp` `emptyDir`.
    pub tmp_size_limit: Option<Quantity>,
    /// `nodeSelector`.
    pub node_selector: Option<BTreeMap<String, String>>,
    /// `tolerations`.
    pub tolerations: Option<Vec<Toleration>>,
    /// `affinity`.
    pub affinity: Option<Affinity>,
    /// `priorityClassName`.
    pub priority_class_name: Option<String>,
    /// Runner pod annotations: the do-not-disrupt pair (`RUNNER_DO_NOT_DISRUPT`) and
    /// `RUNNER_POD_ANNOTATIONS`.
    pub pod_annotations: BTreeMap<String, String>,
    /// `activeDeadlineSeconds` when the RepoboxJob does not override it.
    pub default_timeout_seconds: i64,
    /// `ttlSecondsAfterFinished`.
    pub ttl_seconds_after_finished: i32,
    /// `terminationGracePeriodSeconds`.
    pub termination_grace_period_seconds: i64,
    /// Where the runner's `REDIS_URL` comes from.
    pub redis_secret: SecretKeyRef,
    /// Where the runner's encryption key comes from.
    pub encryption_key_secret: SecretKeyRef,
    /// The work directory: the runner's `TEMP_DIR` (not `/tmp`, see `pod_layout::TMP_DIR`), an
    /// `emptyDir` mount path.
    pub work_dir: String,
    /// `CLEANUP_AFTER_JOB`.
    pub cleanup_after_job: bool,
    /// `GIT_AUTHOR_NAME`.
    pub git_author_name: String,
    /// `GIT_AUTHOR_EMAIL`.
    pub git_author_email: String,
    /// `GIT_CLONE_DEPTH`.
    pub git_clone_depth: u32,
    /// `ALLOW_INSECURE_HTTP`.
    pub allow_insecure_http: bool,
    /// `OPEN_PULL_REQUESTS`.
    pub open_pull_requests: bool,
    /// The git host's CA bundle (a ConfigMap key), when set.
    pub git_ca: Option<ConfigMapKeyRef>,
    /// The Redis CA (a Secret key) the runner verifies `rediss://` with, when set.
    pub redis_ca: Option<SecretKeyRef>,
}

/// A reference to one key of a ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigMapKeyRef {
    /// The ConfigMap's name (same namespace as the Job).
    pub name: String,
    /// The key within the ConfigMap.
    pub key: String,
}

/// The agent container: hostile code's home, with nothing of the runner's.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// `AGENT_COMMAND`.
    pub command: String,
    /// `AGENT_IMAGE`, defaulting to the runner image.
    pub image: String,
    /// `AGENT_UID` (also its group).
    pub uid: i64,
    /// The agent container's resources.
    pub resources: RunnerResources,
    /// `AGENT_EXTRA_ENV`, in name order.
    pub extra_env: BTreeMap<String, String>,
    /// Secrets referenced with `envFrom` (`RUNNER_ENV_FROM_SECRETS`).
    pub env_from_secrets: Vec<String>,
}
