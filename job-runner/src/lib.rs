//! `repobox-job-runner`: the executor inside each Repobox Job's pod.
//!
//! It reads `job:{JOB_ID}` from Redis, takes the job atomically (`pending` → `running`),
//! decrypts the user's git token, clones, branches, runs the agent step, commits, pushes,
//! streams every output line to `job:{id}:output` and records the outcome.
//!
//! The same binary is the agent container's entrypoint (`repobox-job-runner agent`, see
//! [`agent`] and [`handoff`]) and its own installer (`repobox-job-runner install DIR`, run by
//! the pod's init container so an agent image of any kind can start the wrapper).

#![warn(missing_docs)]

pub mod agent;
pub mod askpass;
pub mod config;
pub mod error;
pub mod forge;
pub mod git;
pub mod handoff;
pub mod output;
pub mod process;
pub mod run;
pub mod telemetry;
