//! Wiring: health/metrics server, Redis, leader election, then the controller, the admission
//! loop and the stream intake, and their orderly shutdown.
//!
//! Only the leader consumes the stream, admits and reconciles; a standby replica serves its
//! probes and waits for the Lease. Shutdown (SIGTERM) stops the intake first (entries stay in
//! Redis), lets in-flight reconciles finish, then releases the Lease so a standby takes over
//! at once.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::run::context::{Context, Wakeup};
use crate::run::dispatcher::Dispatcher;
use crate::run::intake::Intake;
use crate::run::leader::LeaderElector;
use crate::run::metrics::Metrics;
use crate::run::reconcile;
use crate::run::records::JobRecords;
use crate::run::server::{self, Health};
use crate::{Error, Result};

/// Runs the operator with a client from the environment (in-cluster or kubeconfig).
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<()> {
    let client = Client::try_default().await?;
    run_with_client(cfg, client, shutdown).await
}

/// Runs the operator until `shutdown` fires (or leadership is lost, which is an error so the
/// pod restarts as a standby).
pub async fn run_with_client(
    cfg: Config,
    client: Client,
    shutdown: CancellationToken,
) -> Result<()> {
    cfg.validate()?;
    let job_cfg = cfg.job_config()?;
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(Duration::from_secs(120)));

    // The server outlives the work: probes keep answering (503) while shutting down.
    let server_stop = CancellationToken::new();
    let server = {
        let (addr, health, metrics, stop) = (
            cfg.metrics_addr,
            health.clone(),
            metrics.clone(),
            server_stop.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) =
                server::serve(addr, health, metrics, async move { stop.cancelled().await }).await
            {
                warn!(error = %e, "the metrics/health server stopped");
            }
        })
    };

    let redis = redis_client(&cfg)?;
    let Some(manager) = connect_redis(&redis, &health, &metrics, &shutdown).await else {
        server_stop.cancel();
        return Ok(());
    };
    let outcomes = JobRecords::new(manager.clone()).with_output_ttl(cfg.output_ttl());
    metrics.set_plan_limits(&cfg.plan_limits()?, cfg.quotas.max_jobs_per_user);

    // Every replica, standbys included, shows the pause in /readyz and /metrics.
    let wakeup = Wakeup::default();
    let dispatcher = Arc::new(Dispatcher::new(wakeup.clone()));
    let pause_stop = CancellationToken::new();
    // Known before the intake can start, so a restart while paused reads nothing.
    crate::run::pause::refresh(&mut manager.clone(), &health, &metrics).await;
    let pause_task = tokio::spawn(crate::run::pause::watch(
        manager,
        health.clone(),
        metrics.clone(),
        wakeup.clone(),
        pause_stop.clone(),
    ));

    let leadership = if cfg.lease.leader_election {
        let elector = LeaderElector::from_config(client.clone(), &cfg)?
            .with_metrics(metrics.clone())
            .with_health(health.clone());
        info!(identity = %cfg.runner_id(), lease = %cfg.lease.lease_name, "waiting for leadership");
        let cancelled = shutdown.clone();
        match elector
            .acquire(async move { cancelled.cancelled().await })
            .await?
        {
            Some(l) => Some(l),
            None => {
                pause_stop.cancel();
                server_stop.cancel();
                return Ok(());
            }
        }
    } else {
        None
    };
    info!(identity = %cfg.runner_id(), "leading: starting intake, admission and the controller");

    let work = shutdown.child_token();
    if let Some(l) = &leadership {
        let lost = l.lost();
        let work = work.clone();
        tokio::spawn(async move {
            lost.await;
            work.cancel();
        });
    }

    let (store, writer) = reflector::store();
    let (jobs, job_writer) = reflector::store();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "repobox-operator".into(),
            instance: Some(cfg.runner_id().to_owned()),
        },
    );
    let ctx = Arc::new(Context::new(
        client.clone(),
        cfg.clone(),
        job_cfg,
        outcomes.clone(),
        store.clone(),
        jobs,
        wakeup,
        metrics.clone(),
        recorder,
        health.clone(),
    ));
    health.set_leader(true);

    let intake = Arc::new(Intake {
        cfg: cfg.clone(),
        client: client.clone(),
        redis,
        outcomes,
        store,
        metrics: metrics.clone(),
        health: health.clone(),
        created: Default::default(),
        arrivals: dispatcher.arrivals(),
        slots: tokio::sync::Semaphore::new(crate::run::intake::ENTRY_CONCURRENCY),
        dispatch: ctx.dispatch.clone(),
    });
    let intake_stop = work.child_token();
    let intake_task = tokio::spawn({
        let stop = intake_stop.clone();
        async move { intake.run(stop).await }
    });
    let dispatcher_task = tokio::spawn(dispatcher.clone().run(ctx.clone(), work.child_token()));

    // The controller runs until `work` is cancelled; it then finishes in-flight reconciles.
    let controller_stop = CancellationToken::new();
    let controller = tokio::spawn(reconcile::run(
        ctx.clone(),
        writer,
        job_writer,
        controller_stop.clone(),
    ));
    work.cancelled().await;
    health.set_shutting_down();
    info!("stopping: intake first, then the controller");
    intake_stop.cancel();
    let _ = intake_task.await;
    controller_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), controller).await;
    let _ = dispatcher_task.await;

    let lost = leadership.as_ref().is_some_and(|l| l.is_lost()) && !shutdown.is_cancelled();
    if let Some(l) = leadership
        && !lost
        && let Err(e) = l.release().await
    {
        warn!(error = %e, "releasing the Lease failed; a standby takes over when it expires");
    }
    pause_stop.cancel();
    let _ = pause_task.await;
    server_stop.cancel();
    let _ = server.await;
    if lost {
        return Err(Error::LeadershipLost);
    }
    info!("stopped");
    Ok(())
}

/// The Redis client. With `REDIS_CA_FILE`, TLS connections trust that CA (PEM) instead of the
/// system roots.
pub fn redis_client(cfg: &Config) -> Result<redis::Client> {
    repobox_contract::redis_client(
        cfg.redis.redis_url.expose(),
        cfg.redis.redis_ca_file.as_deref(),
    )
    .map_err(|e| Error::InvalidConfig {
        setting: match e {
            repobox_contract::RedisClientError::CaFile { .. } => "REDIS_CA_FILE",
            _ => "REDIS_URL",
        },
        reason: e.to_string(),
    })
}

/// Connects the shared (auto-reconnecting) Redis connection, retrying with backoff until it
/// works or shutdown is requested. Readiness stays false meanwhile.
async fn connect_redis(
    redis: &redis::Client,
    health: &Health,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Option<ConnectionManager> {
    let mut delay = Duration::from_millis(200);
    loop {
        match ConnectionManager::new(redis.clone()).await {
            Ok(m) => {
                health.set_redis_ok(true);
                return Some(m);
            }
            Err(e) => {
                health.set_redis_ok(false);
                metrics.redis_reconnected();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Redis unreachable");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}
