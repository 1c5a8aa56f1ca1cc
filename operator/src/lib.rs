//! The Repobox operator: turns entries of the Redis stream `jobs:stream` into `RepoboxJob`
//! custom resources, admits them under per-user and global quotas, runs each as a batch/v1 Job
//! and records the outcome.
//!
//! The pure parts live in their own modules so they can be tested exhaustively:
//! [`crd`] (the custom resource), [`names`] (Kubernetes-safe names), [`config`] (settings),
//! [`admission`] (quota decisions) and [`job_builder`] (RepoboxJob → Job).

pub mod admission;
pub mod admitter;
pub mod app;
pub mod config;
pub mod crd;
pub mod error;
pub mod intake;
pub mod job_builder;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod outcome;
pub mod pause;
pub mod reconcile;
pub mod retry;
pub mod scheduling;
pub mod server;
pub mod status;
pub mod telemetry;
pub mod tiers;

pub use error::{Error, Result};
