//! What the operator's Job and the job-runner must agree on about the runner pod's layout: the
//! shared work volume's two subdirectories. A rename here is one change for both. The pod's
//! environment variables are in [`crate::runner_env`].

/// The work tree: a subdirectory of the work volume (`TEMP_DIR`), shared with the agent.
pub const TREE_SUBDIR: &str = "tree";
/// The hand-off directory: a subdirectory of the work volume, shared with the agent.
pub const HANDOFF_SUBDIR: &str = "handoff";
