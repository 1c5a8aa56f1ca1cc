//! Pure decisions: functions of observed state and settings, no I/O, each unit-tested
//! exhaustively. The loops in [`crate::run`] gather the inputs, call these and carry out
//! what they return.

pub mod job_builder;
pub mod job_config;
pub mod plan;
pub mod quota;
pub mod retry;
pub mod scheduling;
pub mod status;
pub mod tiers;
