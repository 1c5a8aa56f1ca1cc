//! The job-runner's environment: every variable `repobox-job-runner` (runner, agent wrapper)
//! reads, and the defaults it applies when one is unset. The operator's Job builder writes
//! these names and takes its own defaults for them from here, so a rename or a new default is
//! one change for both binaries; `operator/tests/runner_env.rs` proves the builder and the
//! runner's `Config` agree.
//!
//! Output batch defaults are the live events' bounds ([`crate::events`]`::MAX_BATCH_*`).

// ----- The runner (`repobox-job-runner` without a subcommand) -----

/// The job to run (`job:{JOB_ID}`). Required.
pub const JOB_ID: &str = "JOB_ID";
/// The Redis URL; may hold a password, so the Job takes it from a Secret. Required.
pub const REDIS_URL: &str = "REDIS_URL";
/// The token encryption key itself (local runs); set this or [`ENCRYPTION_KEY_FILE`].
pub const ENCRYPTION_KEY: &str = "ENCRYPTION_KEY";
/// The path of a file holding the encryption key: what the Job uses (a mounted Secret), so
/// the key is never part of the pod's environment.
pub const ENCRYPTION_KEY_FILE: &str = "ENCRYPTION_KEY_FILE";
/// This runner's id, written to the job's `runnerId` (the pod name in a Job).
pub const RUNNER_ID: &str = "RUNNER_ID";
/// Fallback for [`RUNNER_ID`]: the container runtime sets it to the pod name.
pub const HOSTNAME: &str = "HOSTNAME";
/// The runner id when neither [`RUNNER_ID`] nor [`HOSTNAME`] is set (local runs).
pub const DEFAULT_RUNNER_ID: &str = "runner-1";
/// The attempt this runner pod is (1 for the first; the operator runs a job again after an
/// infrastructure disruption).
pub const JOB_ATTEMPT: &str = "JOB_ATTEMPT";
/// The attempt when [`JOB_ATTEMPT`] is unset.
pub const DEFAULT_JOB_ATTEMPT: u32 = 1;
/// The work volume: the tree and the hand-off directory are its subdirectories
/// ([`crate::pod`]).
pub const TEMP_DIR: &str = "TEMP_DIR";
/// The runner's own [`TEMP_DIR`] default (local runs; the operator passes its own, `/work`).
pub const DEFAULT_TEMP_DIR: &str = "/tmp/repobox";
/// The runner-only directory (git directory, commit message); defaults to [`TEMP_DIR`].
pub const PRIVATE_DIR: &str = "PRIVATE_DIR";
/// The agent runs in a sibling container: the runner hands the checkout over instead of
/// starting the agent itself.
pub const AGENT_CONTAINER: &str = "AGENT_CONTAINER";
/// How long the agent container may take to pick the checkout up (its image may be pulling).
pub const AGENT_START_TIMEOUT_SECONDS: &str = "AGENT_START_TIMEOUT_SECONDS";
/// Default of [`AGENT_START_TIMEOUT_SECONDS`].
pub const DEFAULT_AGENT_START_TIMEOUT_SECONDS: u64 = 600;
/// A CA bundle for the git host (and its API), e.g. an in-cluster host's private CA.
pub const GIT_SSL_CAINFO: &str = "GIT_SSL_CAINFO";
/// The CA (PEM) a `rediss://` Redis is verified with, instead of the system roots.
pub const REDIS_CA_FILE: &str = "REDIS_CA_FILE";
/// Delete the work tree after the job.
pub const CLEANUP_AFTER_JOB: &str = "CLEANUP_AFTER_JOB";
/// Default of [`CLEANUP_AFTER_JOB`].
pub const DEFAULT_CLEANUP_AFTER_JOB: bool = true;
/// Commit author (and committer) name.
pub const GIT_AUTHOR_NAME: &str = "GIT_AUTHOR_NAME";
/// Default of [`GIT_AUTHOR_NAME`].
pub const DEFAULT_GIT_AUTHOR_NAME: &str = "Repobox";
/// Commit author (and committer) e-mail.
pub const GIT_AUTHOR_EMAIL: &str = "GIT_AUTHOR_EMAIL";
/// Default of [`GIT_AUTHOR_EMAIL`].
pub const DEFAULT_GIT_AUTHOR_EMAIL: &str = "repobox@users.noreply.repobox.dev";
/// `git clone --depth`; `0` clones the full history.
pub const GIT_CLONE_DEPTH: &str = "GIT_CLONE_DEPTH";
/// Default of [`GIT_CLONE_DEPTH`].
pub const DEFAULT_GIT_CLONE_DEPTH: u32 = 1;
/// The git binary.
pub const GIT_BIN: &str = "GIT_BIN";
/// Default of [`GIT_BIN`] (looked up on `PATH`).
pub const DEFAULT_GIT_BIN: &str = "git";
/// Without [`AGENT_CONTAINER`]: the agent command, run locally through the agent wrapper
/// (development). For the agent wrapper: the command it runs (required).
pub const AGENT_COMMAND: &str = "AGENT_COMMAND";
/// Local agent only: comma-separated names of extra variables handed to it.
pub const AGENT_ENV: &str = "AGENT_ENV";
/// Allow `http://` repository URLs; the token then crosses the network in clear.
pub const ALLOW_INSECURE_HTTP: &str = "ALLOW_INSECURE_HTTP";
/// Default of [`ALLOW_INSECURE_HTTP`]: https only.
pub const DEFAULT_ALLOW_INSECURE_HTTP: bool = false;
/// Open (or find) a pull / merge request after a push; a job can only turn it off.
pub const OPEN_PULL_REQUESTS: &str = "OPEN_PULL_REQUESTS";
/// Default of [`OPEN_PULL_REQUESTS`].
pub const DEFAULT_OPEN_PULL_REQUESTS: bool = true;
/// Lines per output batch (at most `events::MAX_BATCH_LINES`, the default).
pub const OUTPUT_FLUSH_LINES: &str = "OUTPUT_FLUSH_LINES";
/// Bytes per output batch as JSON (at most `events::MAX_BATCH_BYTES`, the default).
pub const OUTPUT_FLUSH_BYTES: &str = "OUTPUT_FLUSH_BYTES";
/// Milliseconds a batch may wait (at most `events::MAX_BATCH_DELAY`, the default).
pub const OUTPUT_FLUSH_MS: &str = "OUTPUT_FLUSH_MS";
/// Total output bytes pushed for one job; one truncation line follows when reached.
pub const OUTPUT_MAX_BYTES: &str = "OUTPUT_MAX_BYTES";
/// Default of [`OUTPUT_MAX_BYTES`]: 1 MiB.
pub const DEFAULT_OUTPUT_MAX_BYTES: usize = 1024 * 1024;
/// How long a stopped git/agent child gets between SIGTERM and SIGKILL (the agent wrapper
/// reads it too).
pub const KILL_GRACE_SECONDS: &str = "KILL_GRACE_SECONDS";
/// Default of [`KILL_GRACE_SECONDS`].
pub const DEFAULT_KILL_GRACE_SECONDS: u64 = 5;
/// Log format, `json` (the default) or `text`, for every subcommand.
pub const LOG_FORMAT: &str = "LOG_FORMAT";
/// Log level filter when `RUST_LOG` is unset.
pub const LOG_LEVEL: &str = "LOG_LEVEL";
/// Default of [`LOG_LEVEL`].
pub const DEFAULT_LOG_LEVEL: &str = "info";

// ----- Set by the operator for the container's processes; the runner does not read them -----

/// The home directory of git and the agent (the root file system is read-only).
pub const HOME: &str = "HOME";
/// The Job's deadline in seconds (`activeDeadlineSeconds`), for information: the Job itself
/// stops the pod; the runner does not read it.
pub const JOB_TIMEOUT: &str = "JOB_TIMEOUT";

// ----- The agent wrapper (`repobox-job-runner agent`); also AGENT_COMMAND, KILL_GRACE_SECONDS,
// LOG_FORMAT -----

/// The hand-off directory shared with the runner. Required.
pub const HANDOFF_DIR: &str = "HANDOFF_DIR";
/// How long the wrapper waits for the runner to appear at all.
pub const AGENT_WAIT_SECONDS: &str = "AGENT_WAIT_SECONDS";
/// Default of [`AGENT_WAIT_SECONDS`].
pub const DEFAULT_AGENT_WAIT_SECONDS: u64 = 600;

// ----- What the agent wrapper gives the agent (the operator keeps them out of its extra env) -----

/// The job id.
pub const REPOBOX_JOB_ID: &str = "REPOBOX_JOB_ID";
/// The file holding the prompt.
pub const REPOBOX_PROMPT_FILE: &str = "REPOBOX_PROMPT_FILE";
/// The repository URL (without credentials).
pub const REPOBOX_REPO_URL: &str = "REPOBOX_REPO_URL";
/// The job's branch.
pub const REPOBOX_BRANCH: &str = "REPOBOX_BRANCH";
/// The work tree the agent runs in.
pub const REPOBOX_WORK_TREE: &str = "REPOBOX_WORK_TREE";
/// Every variable the wrapper sets for the agent.
pub const AGENT_VARS: &[&str] = &[
    REPOBOX_JOB_ID,
    REPOBOX_PROMPT_FILE,
    REPOBOX_REPO_URL,
    REPOBOX_BRANCH,
    REPOBOX_WORK_TREE,
];
