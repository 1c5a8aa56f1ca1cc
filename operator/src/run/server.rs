//! The operator's HTTP endpoints: `/metrics`, `/healthz` (liveness) and `/readyz` (readiness).
//!
//! The two probes answer different questions, and mixing them up restart-loops pods:
//!
//! - **`/healthz`** fails only when restarting the process would help: when the work loops are
//!   wedged (no [`Health::tick`] for longer than the stall timeout while this replica is the
//!   leader). It does *not* fail because Redis or the API server is unreachable: a restart does
//!   not fix a remote outage, and every replica restarting at once makes it worse.
//! - **`/readyz`** reports whether the process can do its work now: Redis reachable, the
//!   controller's cache synced (leader only), not shutting down. The operator serves no traffic,
//!   so readiness matters for rollouts (`maxUnavailable`) and for alerting.
//!
//! A paused runner side (`repobox-operator pause`) stays ready, since pausing is deliberate and
//! must not block rollouts or page anyone; `/readyz` adds a `paused: <reason>` line to its
//! body so whoever looks can see why nothing starts.
//!
//! A standby replica (leader election on, Lease held by another pod) is ready: it holds no work,
//! runs no controller and so has no cache to sync, and it must count as available for a rolling
//! update to proceed. It still needs Redis to be ready, since it must be able to take over.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::run::metrics::Metrics;

/// The content type of the OpenMetrics text format that [`Metrics::encode`] produces.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The default stall timeout of `/healthz`: generous, because a false positive kills a healthy
/// leader (and its in-flight reconciliations) while a real wedge is rare.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Process health shared between the work loops (which set it) and the probe handlers (which
/// read it). All fields are atomics, so setting a flag never blocks a loop.
#[derive(Debug)]
pub struct Health {
    redis_ok: AtomicBool,
    cache_synced: AtomicBool,
    leader: AtomicBool,
    shutting_down: AtomicBool,
    /// Reference point for `last_tick_ms` (an `Instant` cannot be stored in an atomic).
    started: Instant,
    /// Milliseconds after `started` of the last [`Health::tick`].
    last_tick_ms: AtomicU64,
    stall_timeout: Duration,
    /// The pause reason while `runner:paused` is set (see `pause::watch`); a watch channel so
    /// the intake can await the resume instead of polling.
    paused: tokio::sync::watch::Sender<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(DEFAULT_STALL_TIMEOUT)
    }
}

impl Health {
    /// Starts with nothing ready (Redis not yet reached, cache not synced, not leader) and a
    /// fresh tick; `/healthz` fails after `stall_timeout` without a tick while leader.
    pub fn new(stall_timeout: Duration) -> Self {
        Health {
            redis_ok: AtomicBool::new(false),
            cache_synced: AtomicBool::new(false),
            leader: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            stall_timeout,
            paused: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Records the global pause (`Some(reason)`) or its end; returns whether it changed.
    pub fn set_paused(&self, reason: Option<String>) -> bool {
        self.paused.send_if_modified(|current| {
            if *current == reason {
                false
            } else {
                *current = reason;
                true
            }
        })
    }

    /// The pause reason, while paused.
    pub fn paused(&self) -> Option<String> {
        self.paused.borrow().clone()
    }

    /// A receiver that sees every change of the pause (for awaiting the resume).
    pub fn pause_changes(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.paused.subscribe()
    }

    /// Lines `/readyz` adds to its body whatever the verdict: today only the pause.
    pub fn readiness_detail(&self) -> Vec<String> {
        self.paused()
            .map(|reason| format!("paused: {}", one_line(&reason)))
            .into_iter()
            .collect()
    }

    /// Whether the last Redis command or ping succeeded. Set by whoever owns the connection,
    /// on standby replicas too (they need Redis to take over).
    pub fn set_redis_ok(&self, ok: bool) {
        self.redis_ok.store(ok, Ordering::Relaxed);
    }

    /// Whether the controller's reflector has completed its initial list (reset it on a relist
    /// if the cache is cleared). Only the leader runs the controller, so only it needs this.
    pub fn set_cache_synced(&self, synced: bool) {
        self.cache_synced.store(synced, Ordering::Relaxed);
    }

    /// Whether this replica holds the Lease and so runs the work loops. With leader election
    /// disabled, set it to `true` at start-up: it switches on the stall check of `/healthz` and
    /// the cache check of `/readyz`, both of which only make sense where the loops run.
    /// Becoming leader counts as a tick, so a new leader gets a full stall timeout to start.
    pub fn set_leader(&self, leader: bool) {
        if leader {
            self.tick();
        }
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// Shutdown has begun: `/readyz` fails from now on. Set it first on SIGTERM, before
    /// releasing the Lease and stopping the loops.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// A work loop made progress. Every loop that must keep running calls this each iteration,
    /// including idle ones (a blocking stream read that timed out) and failing ones (a Redis
    /// reconnect attempt): a loop that is retrying is not wedged. Call it at least a few times
    /// per stall timeout.
    pub fn tick(&self) {
        self.last_tick_ms
            .fetch_max(self.elapsed_ms(), Ordering::Relaxed);
    }

    /// See [`Health::set_redis_ok`].
    pub fn redis_ok(&self) -> bool {
        self.redis_ok.load(Ordering::Relaxed)
    }

    /// See [`Health::set_cache_synced`].
    pub fn cache_synced(&self) -> bool {
        self.cache_synced.load(Ordering::Relaxed)
    }

    /// See [`Health::set_leader`].
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// See [`Health::set_shutting_down`].
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Time since the last tick.
    pub fn since_last_tick(&self) -> Duration {
        let last = self.last_tick_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.elapsed_ms().saturating_sub(last))
    }

    /// Liveness: `Err(reason)` when the loops are wedged (leader and no tick for longer than
    /// the stall timeout). Remote outages never make this fail.
    pub fn liveness(&self) -> std::result::Result<(), String> {
        if !self.is_leader() {
            return Ok(());
        }
        let since = self.since_last_tick();
        if since > self.stall_timeout {
            return Err(format!(
                "stalled: no loop progress for {}s (limit {}s)",
                since.as_secs(),
                self.stall_timeout.as_secs()
            ));
        }
        Ok(())
    }

    /// Readiness: `Err(list)` naming everything that is not ready, e.g.
    /// `["redis: unreachable"]`. The cache only counts on the leader (see the module docs).
    pub fn readiness(&self) -> std::result::Result<(), Vec<&'static str>> {
        let mut not_ready = Vec::new();
        if self.shutting_down() {
            not_ready.push("shutdown: in progress");
        }
        if !self.redis_ok() {
            not_ready.push("redis: unreachable");
        }
        if self.is_leader() && !self.cache_synced() {
            not_ready.push("cache: not synced");
        }
        if not_ready.is_empty() {
            Ok(())
        } else {
            Err(not_ready)
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// The router with the three endpoints (exposed for embedding and tests).
pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { health, metrics })
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        state.metrics.encode(),
    )
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.health.liveness() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(reason) => {
            tracing::warn!(%reason, "liveness probe failing");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
        }
    }
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let (code, mut body) = match state.health.readiness() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(not_ready) => {
            let mut body = String::new();
            for item in not_ready {
                let _ = writeln!(body, "{item}");
            }
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    };
    for line in state.health.readiness_detail() {
        let _ = writeln!(body, "{line}");
    }
    (code, body)
}

/// Text from Redis on one line of a probe body (newlines would forge probe lines).
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

/// Binds `addr` and serves the endpoints until `shutdown` completes, then finishes in-flight
/// requests and returns. Pass e.g. `token.cancelled_owned()` or a `ctrl_c` future.
///
/// Stop this server last: the kubelet keeps probing during shutdown, and `/readyz` should
/// answer 503 (after [`Health::set_shutting_down`]) rather than refuse connections.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::MetricsServer { addr, source })?;
    serve_listener(listener, health, metrics, shutdown).await
}

/// [`serve`] on an already bound listener (tests bind port 0 and read the address back,
/// which avoids racing another process for a "free" port).
pub async fn serve_listener(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|source| Error::MetricsServer {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(health, metrics))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| Error::MetricsServer { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lists_what_is_missing() {
        let h = Health::default();
        assert_eq!(h.readiness(), Err(vec!["redis: unreachable"]));
        h.set_leader(true);
        assert_eq!(
            h.readiness(),
            Err(vec!["redis: unreachable", "cache: not synced"])
        );
        h.set_redis_ok(true);
        h.set_cache_synced(true);
        assert_eq!(h.readiness(), Ok(()));
        h.set_leader(false);
        h.set_cache_synced(false);
        assert_eq!(h.readiness(), Ok(()), "a standby needs no cache");
        h.set_shutting_down();
        assert_eq!(h.readiness(), Err(vec!["shutdown: in progress"]));
    }

    #[test]
    fn pause_is_detail_not_unreadiness() {
        let h = Health::default();
        h.set_redis_ok(true);
        let mut changes = h.pause_changes();
        assert!(h.readiness_detail().is_empty());
        assert!(h.set_paused(Some("db\nmigration".into())));
        assert!(!h.set_paused(Some("db\nmigration".into())), "unchanged");
        assert!(changes.has_changed().unwrap());
        assert_eq!(h.readiness(), Ok(()), "paused on purpose is still ready");
        assert_eq!(h.readiness_detail(), ["paused: db migration"]);
        assert_eq!(h.paused().as_deref(), Some("db\nmigration"));
        changes.mark_unchanged();
        assert!(h.set_paused(None));
        assert!(changes.has_changed().unwrap());
        assert!(h.readiness_detail().is_empty());
        assert_eq!(one_line(&"x".repeat(500)).len(), 200);
    }

    #[test]
    fn liveness_ignores_redis_and_standby() {
        let h = Health::new(Duration::ZERO);
        h.set_redis_ok(false);
        assert_eq!(h.liveness(), Ok(()), "standby: no loops to stall");
        h.set_leader(true);
        // With a zero timeout any elapsed millisecond is a stall; wait for one to pass.
        while h.since_last_tick().is_zero() {
            std::thread::yield_now();
        }
        assert!(h.liveness().is_err());
        let h = Health::new(DEFAULT_STALL_TIMEOUT);
        h.set_leader(true);
        h.tick();
        assert_eq!(h.liveness(), Ok(()));
    }
}
