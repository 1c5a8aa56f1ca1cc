//! The side effects: the shared [`context::Context`] (API clients, caches, the Redis job
//! records), the loops that use it — [`intake`] (stream → RepoboxJob), [`dispatcher`]
//! (queued → Job under the quotas), [`reconcile`] (Job → status and outcome) — and what runs
//! beside them (leader election, pause, the metrics/health server).

pub mod arrivals;
pub mod context;
pub mod dispatcher;
pub mod intake;
pub mod leader;
pub mod metrics;
#[cfg(test)]
mod mock_api;
pub mod pause;
pub mod reconcile;
pub mod records;
pub mod server;
pub mod telemetry;
