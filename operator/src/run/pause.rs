//! Pause and resume: a switch platform engineers flip during maintenance, kept in Redis.
//!
//! The state lives in Redis (`runner:paused`, a hash whose `reason` field means "paused", and
//! `runner:paused_users`, userId → reason) rather than in a cluster object: every replica and
//! every operator version after a restart or a leader change reads the same Redis the intake
//! and admission already depend on, the `repobox-operator pause` command needs no extra RBAC
//! (it runs in the operator pod with the operator's Redis credentials), and the web app could
//! show it too. A hash rather than a plain string lets `resume` be `HDEL`, so the operator's
//! Redis ACL needs no `DEL`.
//!
//! While paused: the intake reads no new entries (they stay in the stream, pending ones stay
//! pending), admission starts nothing and every queued RepoboxJob shows reason `Paused` with
//! the reason text; running jobs finish. A paused user only has their queued jobs held
//! (admission reads `runner:paused_users` each pass); the intake keeps accepting their entries.
//!
//! [`watch`] runs on every replica (standbys too, so their `/metrics` and `/readyz` tell the
//! truth): it reads the state every [`WATCH_EVERY`] (Redis has no change notification without
//! keyspace events, which managed Redis often disables), publishes it to `/readyz`, the
//! `repobox_paused` gauges and the intake (through [`Health::set_paused`]), and pokes admission
//! on a change so a resume starts jobs within a pass. A Redis error keeps the last known state:
//! a blip must not unpause.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionLike;
use repobox_contract::{keys, time};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Result;
use crate::run::context::Wakeup;
use crate::run::metrics::Metrics;
use crate::run::server::Health;

/// How often [`watch`] reads the pause state.
pub const WATCH_EVERY: Duration = Duration::from_millis(500);

/// The pause state as stored in Redis.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PauseState {
    /// The reason while everything is paused.
    pub reason: Option<String>,
    /// When the global pause began (RFC 3339), if recorded.
    pub since: Option<String>,
    /// How many users are paused one by one.
    pub users: usize,
}

/// Reads the pause state (two commands, one round trip).
pub async fn read(con: &mut impl ConnectionLike) -> Result<PauseState> {
    let (reason, since, users): (Option<String>, Option<String>, usize) = redis::pipe()
        .hget(keys::PAUSED, keys::PAUSED_REASON_FIELD)
        .hget(keys::PAUSED, keys::PAUSED_SINCE_FIELD)
        .hlen(keys::PAUSED_USERS)
        .query_async(con)
        .await?;
    Ok(PauseState {
        reason,
        since,
        users,
    })
}

/// Pauses everything (`user` = `None`) or one user, with `reason` shown on queued jobs.
pub async fn pause(
    con: &mut (impl ConnectionLike + Send + Sync),
    user: Option<&str>,
    reason: &str,
) -> Result<()> {
    let reason = reason.trim();
    let reason = if reason.is_empty() { "paused" } else { reason };
    match user {
        None => {
            // HSET with two pairs (not HMSET): the operator's ACL grants HSET.
            let _: () = redis::cmd("HSET")
                .arg(keys::PAUSED)
                .arg(keys::PAUSED_REASON_FIELD)
                .arg(reason)
                .arg(keys::PAUSED_SINCE_FIELD)
                .arg(time::now())
                .query_async(con)
                .await?;
        }
        Some(user) => {
            let _: () = con.hset(keys::PAUSED_USERS, user, reason).await?;
        }
    }
    Ok(())
}

/// Resumes everything (`user` = `None`: the global pause only; users paused one by one stay
/// paused) or one user. Resuming what is not paused is a no-op.
pub async fn resume(
    con: &mut (impl ConnectionLike + Send + Sync),
    user: Option<&str>,
) -> Result<()> {
    match user {
        None => {
            let _: () = con
                .hdel(
                    keys::PAUSED,
                    &[keys::PAUSED_REASON_FIELD, keys::PAUSED_SINCE_FIELD],
                )
                .await?;
        }
        Some(user) => {
            let _: () = con.hdel(keys::PAUSED_USERS, user).await?;
        }
    }
    Ok(())
}

/// The one-line summary the commands print.
pub fn describe(state: &PauseState) -> String {
    let global = match (&state.reason, &state.since) {
        (Some(r), Some(s)) => format!("paused since {s}: {r}"),
        (Some(r), None) => format!("paused: {r}"),
        (None, _) => "running (not paused)".to_owned(),
    };
    format!("{global}; {} user(s) paused one by one", state.users)
}

/// Reads the state once into `health` and `metrics`; `None` (state kept) on a Redis error.
pub async fn refresh(
    con: &mut redis::aio::ConnectionManager,
    health: &Health,
    metrics: &Metrics,
) -> Option<PauseState> {
    match read(con).await {
        Ok(state) => {
            metrics.set_paused(state.reason.is_some(), state.users as i64);
            if health.set_paused(state.reason.clone()) {
                match &state.reason {
                    Some(r) => info!(reason = %r, "paused: no intake, no admission"),
                    None => info!("resumed"),
                }
            }
            Some(state)
        }
        Err(e) => {
            warn!(error = %e, "reading the pause state failed; keeping the last one");
            None
        }
    }
}

/// Keeps `health` and `metrics` in step with Redis until cancelled; pokes the dispatcher when the
/// state changes. See the module documentation.
pub async fn watch(
    mut con: redis::aio::ConnectionManager,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    dispatch: Wakeup,
    cancel: CancellationToken,
) {
    let mut last: Option<PauseState> = None;
    loop {
        if let Some(state) = refresh(&mut con, &health, &metrics).await
            && last.as_ref() != Some(&state)
        {
            dispatch.poke();
            last = Some(state);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_the_state() {
        assert_eq!(
            describe(&PauseState::default()),
            "running (not paused); 0 user(s) paused one by one"
        );
        assert_eq!(
            describe(&PauseState {
                reason: Some("db upgrade".into()),
                since: Some("2026-01-01T00:00:00.000Z".into()),
                users: 2
            }),
            "paused since 2026-01-01T00:00:00.000Z: db upgrade; 2 user(s) paused one by one"
        );
        assert_eq!(
            describe(&PauseState {
                reason: Some("x".into()),
                since: None,
                users: 0
            }),
            "paused: x; 0 user(s) paused one by one"
        );
    }
}
