//! The runner pod's layout: container names, mount paths, volume names, the runner's uid and
//! the agent's reserved environment. The job builder assembles the pod from these; the
//! settings validate against them (e.g. a work directory must not shadow a mount).

pub use repobox_contract::pod::{HANDOFF_SUBDIR, TREE_SUBDIR};
use repobox_contract::runner_env as renv;

/// The runner container's name (referenced by the pod failure policy's exit-code rule).
pub const CONTAINER_NAME: &str = "runner";
/// The agent container's name.
pub const AGENT_CONTAINER_NAME: &str = "agent";
/// The init container that installs the agent wrapper and creates the shared directories.
pub const INSTALL_CONTAINER_NAME: &str = "install";

/// The runner container's command: the `repobox-job-runner` binary of the job-runner crate, on
/// the image's `PATH`. Set explicitly so that an image whose entrypoint differs still runs the
/// executor.
pub const RUNNER_COMMAND: &str = "repobox-job-runner";

/// Directory the encryption key Secret is mounted at; the file is the Secret key's name.
pub const ENCRYPTION_KEY_DIR: &str = "/var/run/secrets/repobox/encryption-key";

/// The writable `/tmp` (also `HOME`): the root file system is read-only.
pub const TMP_DIR: &str = "/tmp";

/// The runner's private directory (`PRIVATE_DIR`: the git directory, the commit message), on a
/// volume only the runner container mounts.
pub const PRIVATE_DIR: &str = "/var/lib/repobox";

/// Where the init container installs the agent wrapper, mounted read-only in the agent.
pub const TOOLS_DIR: &str = "/repobox/bin";

/// The agent wrapper the agent container runs.
pub const AGENT_WRAPPER: &str = "/repobox/bin/repobox-job-runner";

/// The git host's CA bundle, mounted in the runner when configured.
pub const GIT_CA_DIR: &str = "/var/run/secrets/repobox/git-ca";

/// The Redis CA, mounted in the runner when configured.
pub const REDIS_CA_DIR: &str = "/var/run/secrets/repobox/redis-ca";

/// Environment variables of the agent container that the operator sets itself (or the agent
/// wrapper sets for the agent).
pub const AGENT_RESERVED_ENV: &[&str] = &[
    renv::HANDOFF_DIR,
    renv::AGENT_COMMAND,
    renv::HOME,
    renv::LOG_FORMAT,
    renv::KILL_GRACE_SECONDS,
    renv::REPOBOX_JOB_ID,
    renv::REPOBOX_PROMPT_FILE,
    renv::REPOBOX_REPO_URL,
    renv::REPOBOX_BRANCH,
    renv::REPOBOX_WORK_TREE,
];

/// UID, GID and fsGroup of the runner (the distroless `nonroot` user).
pub const RUNNER_UID: i64 = 65532;

/// Volume names.
pub const WORK_VOLUME: &str = "work";
/// The `/tmp` volume.
pub const TMP_VOLUME: &str = "tmp";
/// The runner's private volume ([`PRIVATE_DIR`]).
pub const STATE_VOLUME: &str = "state";
/// The agent's `/tmp`.
pub const AGENT_TMP_VOLUME: &str = "agent-tmp";
/// The agent wrapper's volume ([`TOOLS_DIR`]).
pub const TOOLS_VOLUME: &str = "tools";
/// The git host's CA bundle.
pub const GIT_CA_VOLUME: &str = "git-ca";
/// The Redis CA.
pub const REDIS_CA_VOLUME: &str = "redis-ca";
/// Size limit of the tools volume (one binary).
pub const TOOLS_SIZE_LIMIT: &str = "128Mi";
/// The encryption key volume.
pub const ENCRYPTION_KEY_VOLUME: &str = "encryption-key";

/// Mode of the mounted encryption key: owner read only (the kubelet adds group read for the
/// pod's `fsGroup`, which is how the non-root runner reads it).
pub const ENCRYPTION_KEY_MODE: i32 = 0o400;

/// The Job's reason when its pod failure policy failed it (as the Job controller writes it).
pub const POD_FAILURE_POLICY_REASON: &str = "PodFailurePolicy";
