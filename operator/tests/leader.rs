//! Lease-based leader election against the Kubernetes API emulator.
//!
//! Lease durations are 2 s (renew every ~0.67 s, poll/retry every 0.4 s, renew deadline
//! ~1.33 s). Every wait is bounded by a timeout; where a test asserts that something does *not*
//! happen, it waits a bounded time for it and expects the timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, PostParams};
use repobox_operator::run::leader::{LeaderElector, Leadership};
use repobox_operator::run::metrics::Metrics;
use repobox_operator::run::server::Health;
use repobox_testbed::emulator::Emulator;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const NS: &str = "default";
const LEASE: &str = "repobox-operator";
const LEASE_DURATION: Duration = Duration::from_secs(2);
/// Upper bound for anything that should happen within a lease duration or two.
const GENEROUS: Duration = Duration::from_secs(10);

fn elector(client: &Client, identity: &str) -> Result<LeaderElector> {
    Ok(LeaderElector::new(
        client.clone(),
        NS,
        LEASE,
        identity,
        LEASE_DURATION,
    )?)
}

async fn lease(client: &Client) -> Result<Lease> {
    Ok(Api::<Lease>::namespaced(client.clone(), NS)
        .get(LEASE)
        .await?)
}

async fn holder(client: &Client) -> Result<Option<String>> {
    Ok(lease(client)
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// An `acquire` running in a task, cancellable through `cancel`.
struct Candidate {
    cancel: oneshot::Sender<()>,
    task: JoinHandle<repobox_operator::Result<Option<Leadership>>>,
}

fn spawn_acquire(elector: LeaderElector) -> Candidate {
    let (cancel, cancelled) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        elector
            .acquire(async move {
                let _ = cancelled.await;
            })
            .await
    });
    Candidate { cancel, task }
}

/// Waits up to `within` for the candidate to become leader.
async fn leads(candidate: &mut Candidate, within: Duration) -> Result<Leadership> {
    timeout(within, &mut candidate.task)
        .await
        .context("did not become leader in time")???
        .context("acquire returned None without being cancelled")
}

/// Asserts the candidate is still waiting after `for_`.
async fn still_waiting(candidate: &mut Candidate, for_: Duration) -> Result<()> {
    ensure!(
        timeout(for_, &mut candidate.task).await.is_err(),
        "the candidate became leader (or failed) while the Lease was held"
    );
    Ok(())
}

async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> Result<T> {
    timeout(limit, f)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

#[tokio::test]
async fn first_acquires_second_blocks_until_release() -> Result<()> {
    let emu = Emulator::start().await?;
    let client = emu.client()?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());

    let a = elector(&client, "pod-a")?
        .with_metrics(metrics.clone())
        .with_health(health.clone());
    let leader_a = within(GENEROUS, "pod-a to lead", a.acquire(std::future::pending()))
        .await??
        .context("acquire returned None")?;
    assert!(!leader_a.is_lost());
    assert!(health.is_leader());
    assert!(metrics.encode().contains("repobox_leader 1\n"));

    let spec = lease(&client).await?.spec.context("no spec")?;
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(spec.lease_duration_seconds, Some(2));
    assert_eq!(spec.lease_transitions, Some(0));
    assert!(spec.acquire_time.is_some() && spec.renew_time.is_some());
    assert_eq!(spec.strategy, None, "no 1.31+ fields: works on 1.28");

    // pod-b blocks for longer than a lease duration: pod-a keeps renewing.
    let mut b = spawn_acquire(elector(&client, "pod-b")?);
    still_waiting(&mut b, LEASE_DURATION * 2).await?;
    assert!(!leader_a.is_lost());
    let renewed = lease(&client).await?.spec.context("no spec")?;
    assert_ne!(renewed.renew_time, spec.renew_time, "pod-a renewed");
    assert_eq!(
        renewed.acquire_time, spec.acquire_time,
        "renewal keeps acquireTime"
    );

    // Release: pod-b takes over at its next poll, well before a lease duration.
    let released = Instant::now();
    within(GENEROUS, "release", leader_a.release()).await??;
    assert!(!health.is_leader());
    assert!(metrics.encode().contains("repobox_leader 0\n"));
    let leader_b = leads(&mut b, GENEROUS).await?;
    let took = released.elapsed();
    assert!(
        took < LEASE_DURATION,
        "takeover after release took {took:?}"
    );
    assert_eq!(holder(&client).await?.as_deref(), Some("pod-b"));
    let spec = lease(&client).await?.spec.context("no spec")?;
    assert_eq!(spec.lease_transitions, Some(1));
    assert!(!leader_b.is_lost());
    within(GENEROUS, "release", leader_b.release()).await??;
    assert_eq!(holder(&client).await?, None);
    Ok(())
}

#[tokio::test]
async fn standby_takes_over_after_the_leader_stops_renewing() -> Result<()> {
    let emu = Emulator::start().await?;
    let client = emu.client()?;

    let leader_a = within(
        GENEROUS,
        "pod-a to lead",
        elector(&client, "pod-a")?.acquire(std::future::pending()),
    )
    .await??
    .context("acquire returned None")?;
    let mut b = spawn_acquire(elector(&client, "pod-b")?);
    still_waiting(&mut b, LEASE_DURATION).await?;

    // pod-a dies: no release, no more renewals.
    let died = Instant::now();
    drop(leader_a);
    let leader_b = leads(&mut b, GENEROUS).await?;
    let took = died.elapsed();
    // pod-a's last renewal was at most one renew period before it died, so pod-b waits at
    // least a lease duration minus that.
    assert!(
        took >= LEASE_DURATION - LEASE_DURATION / 3 - Duration::from_millis(100),
        "took over after {took:?}, before the lease expired"
    );
    assert_eq!(holder(&client).await?.as_deref(), Some("pod-b"));
    assert_eq!(
        lease(&client).await?.spec.and_then(|s| s.lease_transitions),
        Some(1)
    );
    drop(leader_b);
    Ok(())
}

#[tokio::test]
async fn racing_acquirers_yield_exactly_one_leader() -> Result<()> {
    let emu = Emulator::start().await?;
    let client = emu.client()?;

    for round in 0..3 {
        let mut candidates = Vec::new();
        for i in 0..4 {
            candidates.push(spawn_acquire(elector(
                &client,
                &format!("pod-{round}-{i}"),
            )?));
        }
        // The first to finish is the leader...
        let (first, winner, _) = within(
            GENEROUS,
            "a leader",
            futures::future::select_all(candidates.iter_mut().map(|c| &mut c.task)),
        )
        .await?;
        let leadership = first??.context("the winner returned None")?;
        candidates.remove(winner);
        let winner_id = format!("pod-{round}-{winner}");
        assert_eq!(holder(&client).await?.as_deref(), Some(winner_id.as_str()));
        // ...and nobody else gets it while it renews.
        for c in &mut candidates {
            still_waiting(c, LEASE_DURATION / 2).await?;
        }
        ensure!(!leadership.is_lost());
        // Cancelled candidates return None.
        for c in candidates {
            let _ = c.cancel.send(());
            let got = within(GENEROUS, "cancelled acquire", c.task).await???;
            ensure!(got.is_none(), "a cancelled candidate returned leadership");
        }
        within(GENEROUS, "release", leadership.release()).await??;
    }

    // The races above were real: some writes lost with 409 (create AlreadyExists or replace
    // Conflict), which is how optimistic concurrency picked the single winner.
    let conflicts = emu
        .requests()
        .await?
        .iter()
        .filter(|r| r.is_write() && r.status == 409)
        .count();
    assert!(
        conflicts >= 1,
        "no write lost a race: {conflicts} conflicts"
    );
    Ok(())
}

#[tokio::test]
async fn a_conflict_on_the_write_means_not_leader_yet() -> Result<()> {
    let emu = Emulator::start().await?;
    let client = emu.client()?;
    // A released Lease, free for anyone.
    let a = within(
        GENEROUS,
        "pod-a to lead",
        elector(&client, "pod-a")?.acquire(std::future::pending()),
    )
    .await??
    .context("acquire returned None")?;
    within(GENEROUS, "release", a.release()).await??;

    // pod-b's first write loses a race (409): it must retry, then win.
    emu.clear_requests().await?;
    emu.inject_fault(Some("PUT"), "/leases/repobox-operator$", 409, 1)
        .await?;
    let b = within(
        GENEROUS,
        "pod-b to lead",
        elector(&client, "pod-b")?.acquire(std::future::pending()),
    )
    .await??
    .context("acquire returned None")?;
    let puts: Vec<u16> = emu
        .requests()
        .await?
        .iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.status)
        .collect();
    assert_eq!(puts, [409, 200]);
    assert_eq!(holder(&client).await?.as_deref(), Some("pod-b"));
    drop(b);
    Ok(())
}

#[tokio::test]
async fn lost_fires_when_someone_else_takes_the_lease() -> Result<()> {
    let emu = Emulator::start().await?;
    let client = emu.client()?;
    let metrics = Arc::new(Metrics::new());
    let leadership = within(
        GENEROUS,
        "pod-a to lead",
        elector(&client, "pod-a")?
            .with_metrics(metrics.clone())
            .acquire(std::future::pending()),
    )
    .await??
    .context("acquire returned None")?;
    let lost = leadership.lost();

    // An intruder overwrites the holder (as a misconfigured second deployment might).
    let api = Api::<Lease>::namespaced(client.clone(), NS);
    let mut l = api.get(LEASE).await?;
    if let Some(spec) = l.spec.as_mut() {
        spec.holder_identity = Some("intruder".into());
    }
    api.replace(LEASE, &PostParams::default(), &l).await?;

    within(LEASE_DURATION, "lost() to fire", lost).await?;
    assert!(leadership.is_lost());
    assert!(metrics.encode().contains("repobox_leader 0\n"));
    // Releasing a lost Lease leaves the new holder alone.
    within(GENEROUS, "release", leadership.release()).await??;
    assert_eq!(holder(&client).await?.as_deref(), Some("intruder"));
    Ok(())
}

#[tokio::test]
async fn lost_fires_when_renewals_keep_failing() -> Result<()> {
    let emu = Emulator::start().await?;
    let client = emu.client_without_retry()?;
    let leadership = within(
        GENEROUS,
        "pod-a to lead",
        elector(&client, "pod-a")?.acquire(std::future::pending()),
    )
    .await??
    .context("acquire returned None")?;
    let lost = leadership.lost();
    // The API server starts failing every renewal.
    let failing = Instant::now();
    emu.inject_fault(Some("PUT"), "/leases/", 500, 1000).await?;
    within(GENEROUS, "lost() to fire", lost).await?;
    let took = failing.elapsed();
    // Before a standby could take over (one lease duration after the last renewal).
    assert!(took < LEASE_DURATION, "gave up after {took:?}");
    assert!(leadership.is_lost());
    Ok(())
}

#[tokio::test]
async fn acquire_returns_none_when_cancelled_and_rejects_bad_settings() -> Result<()> {
    let emu = Emulator::start().await?;
    let client = emu.client()?;
    let a = within(
        GENEROUS,
        "pod-a to lead",
        elector(&client, "pod-a")?.acquire(std::future::pending()),
    )
    .await??
    .context("acquire returned None")?;
    let mut b = spawn_acquire(elector(&client, "pod-b")?);
    still_waiting(&mut b, Duration::from_millis(500)).await?;
    let _ = b.cancel.send(());
    let got = within(GENEROUS, "cancelled acquire", b.task).await???;
    ensure!(got.is_none());
    drop(a);

    for (identity, duration) in [("", LEASE_DURATION), ("x", Duration::ZERO)] {
        match LeaderElector::new(client.clone(), NS, LEASE, identity, duration) {
            Err(e) => assert_eq!(e.metric_label(), "LeaderElection"),
            Ok(_) => bail!("accepted identity {identity:?} with duration {duration:?}"),
        }
    }
    let e = LeaderElector::new(client, NS, LEASE, "x", Duration::from_millis(1500))?;
    assert_eq!(e.lease_duration(), Duration::from_secs(2), "rounded up");
    Ok(())
}
