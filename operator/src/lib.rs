//! The Repobox operator: turns entries of the Redis stream `jobs:stream` into `RepoboxJob`
//! custom resources, admits them under per-user and global quotas, runs each as a batch/v1 Job
//! and records the outcome.
//!
//! The modules form a one-way graph; each layer uses only the layers before it:
//!
//! ```text
//! model → decide → config → run → app
//! ```
//!
//! * [`model`]: the custom resource, names, labels, the runner pod's layout.
//! * [`decide`]: pure decisions (quota, tiers, status, retry, scheduling, the Job builder),
//!   unit-tested exhaustively.
//! * [`config`]: the settings, one clap group per concern (Redis, quotas, lease, runner pods),
//!   validated into the inputs the decisions take.
//! * [`run`]: the side effects — the shared context, the intake, dispatcher and reconcile
//!   loops, leader election, pause, the metrics/health server.
//! * [`app`]: wires it all together; `main.rs` is the command line.
//!
//! [`error`] is used by every layer. Test modules may reach across layers.

#![warn(missing_docs)]

pub mod app;
pub mod config;
pub mod decide;
pub mod error;
pub mod model;
pub mod run;

pub use error::{Error, Result};
