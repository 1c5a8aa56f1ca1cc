//! What the operator's Job and the job-runner must agree on about the runner pod's layout: the
//! shared work volume's two subdirectories and the agent container's hand-off settings. A
//! rename here is one change for both.

/// The work tree: a subdirectory of the work volume (`TEMP_DIR`), shared with the agent.
pub const TREE_SUBDIR: &str = "tree";
/// The hand-off directory: a subdirectory of the work volume, shared with the agent.
pub const HANDOFF_SUBDIR: &str = "handoff";

/// Runner setting: the attempt this runner pod is (1 for the first; the operator runs a job
/// again after an infrastructure disruption).
pub const ENV_JOB_ATTEMPT: &str = "JOB_ATTEMPT";
/// Runner setting: the agent runs in a sibling container.
pub const ENV_AGENT_CONTAINER: &str = "AGENT_CONTAINER";
/// Runner setting: the runner-only directory (git directory, commit message).
pub const ENV_PRIVATE_DIR: &str = "PRIVATE_DIR";
/// Agent wrapper setting: the hand-off directory.
pub const ENV_HANDOFF_DIR: &str = "HANDOFF_DIR";
/// Agent wrapper setting: the agent command.
pub const ENV_AGENT_COMMAND: &str = "AGENT_COMMAND";
