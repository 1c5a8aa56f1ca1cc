//! `repobox-job-runner`: the executor inside each Repobox Job's pod.
//!
//! It reads `job:{JOB_ID}` from Redis, takes the job atomically (`pending` → `running`),
//! decrypts the user's git token, clones, branches, runs the agent step, commits, pushes,
//! streams every output line to `job:{id}:output` and records the outcome.

pub mod askpass;
pub mod config;
pub mod error;
pub mod git;
pub mod output;
pub mod process;
pub mod run;
pub mod telemetry;
