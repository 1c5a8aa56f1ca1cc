//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's `leaderelection`
//! package does it (kube-rs has none built in).
//!
//! Only the leader reads the stream and runs the controller: two replicas admitting jobs from
//! two caches could both start the last free slot of a user. Standbys wait and take over when
//! the leader stops renewing.
//!
//! The protocol, all through optimistic concurrency on the Lease's `resourceVersion`:
//!
//! - **Acquire.** Read the Lease (create it if absent; `AlreadyExists` means another replica
//!   created it first). It is free when `holderIdentity` is empty, held by us (a restart with the
//!   same identity), or expired. Then write our record with a `replace` carrying the
//!   `resourceVersion` we read: a `409 Conflict` means another replica wrote first and won.
//! - **Expiry is judged by the local clock only.** Remote `renewTime` values come from another
//!   machine's clock and are never compared with ours. Instead, a standby remembers when *it*
//!   last saw the record change (monotonic [`Instant`]) and considers the Lease expired once it
//!   has not changed for the record's `leaseDurationSeconds`. Clock skew between nodes therefore
//!   cannot cause a premature takeover; only clock *rate* differences matter, and those are tiny.
//! - **Renew.** The leader rewrites `renewTime` every `renew_period` (lease / 3) and, after a
//!   failed attempt, retries every `retry_period` (lease / 5, also the standbys' polling
//!   period). It gives up leadership when no renewal has succeeded for `renew_deadline`
//!   (2/3 of the lease, client-go's 10 s of 15 s). That deadline is deliberately *shorter* than
//!   the lease: a standby may take over one lease duration after it last saw a change, so the
//!   old leader must stop working before then, with a margin for the `lost` signal to reach the
//!   loops. The deadline is measured from the *start* of the last successful write, which is
//!   never later than any standby's observation of it.
//! - **Release.** On graceful shutdown the leader writes an empty holder with
//!   `leaseDurationSeconds: 1`, so a standby takes over at its next poll instead of waiting out
//!   the lease.
//!
//! Intended use in `main`: `acquire` (standby until it returns), start the leader-only loops,
//! then wait for either [`Leadership::lost`] — stop the loops and exit non-zero, so the pod
//! restarts as a clean standby rather than risk two leaders — or shutdown: stop the loops first,
//! then [`Leadership::release`]. With `LEADER_ELECTION=false` none of this runs and `main` sets
//! the leader flags itself.
//!
//! Fields newer than Kubernetes 1.28 (`strategy`, `preferredHolder`, coordinated leader election)
//! are never set; whatever another writer put there is carried over untouched.
//!
//! # Why not a crate (evaluated November 2026, against kube 5 / k8s-openapi 0.29)
//!
//! What the operator needs: fencing on loss (give up after a renew deadline shorter than the
//! lease, even while the API server is unreachable), release on shutdown, expiry that does not
//! trust other nodes' clocks, a cancellable wait as a standby, and hooks for the
//! `repobox_leader` gauge and the probes. kube-runtime 5.0.0 has no leader election.
//!
//! - `kube-lease-manager` 0.13.1 (2026-11-02; kube ^5, k8s-openapi ^0.29: the only one on our
//!   versions, and maintained). No fencing: a failed renewal is logged and retried with backoff
//!   while the state stays "leader"; it only turns false once a read succeeds and shows another
//!   holder, so an old leader cut off from the API server keeps working past the lease. Expiry
//!   compares the remote `renewTime` with the local wall clock (skew tolerated up to `grace`).
//!   Renewals are strategic-merge patches without a `resourceVersion` precondition; exclusion
//!   rests on server-side-apply field ownership of `holderIdentity` (our API emulator has no
//!   field ownership, so it could not be tested there). Bad parameters panic.
//! - `kube-leader-election` 0.44.0 (2026-06-16; kube ^4): a second kube in the tree, so its
//!   `Lease` is not ours. Only a `try_acquire_or_renew` step (no renew loop, no deadline);
//!   acquisition is an unconditional merge patch, so two racing candidates can both "win";
//!   wall-clock expiry; its README says "without fencing".
//! - `kube-coordinate` 2.0.0-rc.0 (2025-11-20, a release candidate; kube ^2; last stable 0.2.1
//!   for kube <= 1): closest in design (a client-go port with local-clock expiry and a renew
//!   deadline) but a second, old kube in the tree.
//! - `kubert` 0.25.0 (2025-07-12; kube-client 1.1.x, k8s-openapi ^0.25): its `lease` module
//!   comes with kubert's runtime, an old kube, and wall-clock expiry.
//!
//! Adopting `kube-lease-manager` would still need our own deadline watchdog around it (it
//! exposes no "last successful renewal"), so it would not remove the hard part of this module.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::config::Config;
use crate::error::{Error, Result, is_conflict, is_not_found};
use crate::run::metrics::Metrics;
use crate::run::server::Health;

/// The periods derived from the lease duration (see the module docs for why these ratios).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Timing {
    lease_duration: Duration,
    renew_period: Duration,
    retry_period: Duration,
    renew_deadline: Duration,
}

impl Timing {
    fn new(lease_duration: Duration) -> Timing {
        Timing {
            lease_duration,
            renew_period: lease_duration / 3,
            retry_period: lease_duration / 5,
            renew_deadline: lease_duration * 2 / 3,
        }
    }
}

/// Where the leader state is mirrored: the `repobox_leader` gauge and the probes' view.
#[derive(Clone, Default)]
struct Hooks {
    metrics: Option<Arc<Metrics>>,
    health: Option<Arc<Health>>,
}

impl Hooks {
    fn set_leader(&self, leader: bool) {
        if let Some(m) = &self.metrics {
            m.set_leader(leader);
        }
        if let Some(h) = &self.health {
            h.set_leader(leader);
        }
    }
}

/// The Lease object and who we are: everything needed to read and write the record.
#[derive(Clone)]
struct LeaseLock {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    /// `leaseDurationSeconds` we write (the lease duration in whole seconds).
    duration_seconds: i32,
}

impl LeaseLock {
    /// `namespace/name`, for logs and errors.
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn is_ours(&self, spec: &LeaseSpec) -> bool {
        spec.holder_identity.as_deref() == Some(self.identity.as_str())
    }

    /// Our record, taking over from (or renewing) `prev`: like client-go, `acquireTime` and
    /// `leaseTransitions` are kept on renewal and bumped on a change of holder.
    fn record(&self, prev: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        let prev = prev.cloned();
        let renewing = prev.as_ref().is_some_and(|p| self.is_ours(p));
        let (acquire_time, lease_transitions) = match &prev {
            Some(p) if renewing => (
                p.acquire_time.clone().unwrap_or_else(|| now.clone()),
                p.lease_transitions.unwrap_or(0),
            ),
            Some(p) => (
                now.clone(),
                p.lease_transitions.unwrap_or(0).saturating_add(1),
            ),
            None => (now.clone(), 0),
        };
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration_seconds),
            acquire_time: Some(acquire_time),
            renew_time: Some(now),
            lease_transitions: Some(lease_transitions),
            ..prev.unwrap_or_default()
        }
    }

    fn error(&self, source: kube::Error) -> Error {
        Error::Lease {
            lease: self.key(),
            source,
        }
    }
}

/// The Lease record as last seen by a candidate, and when (local monotonic clock).
struct Observed {
    spec: LeaseSpec,
    at: Instant,
}

/// What one acquisition attempt found.
enum Attempt {
    /// We hold the Lease now; the object as written (boxed: it is large and rare).
    Acquired(Box<Lease>),
    /// Another identity holds it (empty: it won a create or write race against us).
    Held { holder: String },
}

/// What one renewal attempt found.
enum Renewal {
    Renewed,
    /// Another writer changed the Lease twice between our read and write: retry later.
    Contended,
    /// The Lease is no longer ours.
    Lost(String),
}

/// Waits until this replica holds the Lease; see the module docs for the protocol.
pub struct LeaderElector {
    lock: LeaseLock,
    timing: Timing,
    hooks: Hooks,
}

impl fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderElector")
            .field("lease", &self.lock.key())
            .field("identity", &self.lock.identity)
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

impl LeaderElector {
    /// An elector for the Lease `namespace/lease_name` competing as `identity` (unique per
    /// replica: the pod name). `lease_duration` is rounded up to whole seconds, the Lease's
    /// resolution; renewals run every third of it, retries and standby polls every fifth.
    pub fn new(
        client: Client,
        namespace: &str,
        lease_name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Result<Self> {
        if identity.is_empty() {
            return Err(Error::LeaderElection("the identity is empty".into()));
        }
        if lease_name.is_empty() || namespace.is_empty() {
            return Err(Error::LeaderElection(
                "the Lease name and namespace must not be empty".into(),
            ));
        }
        let mut seconds = lease_duration.as_secs();
        if lease_duration.subsec_nanos() > 0 {
            seconds += 1;
        }
        let duration_seconds =
            i32::try_from(seconds)
                .ok()
                .filter(|s| *s >= 1)
                .ok_or_else(|| {
                    Error::LeaderElection(format!(
                        "the lease duration must be 1 s to {} s, not {lease_duration:?}",
                        i32::MAX
                    ))
                })?;
        Ok(LeaderElector {
            lock: LeaseLock {
                api: Api::namespaced(client, namespace),
                namespace: namespace.to_owned(),
                name: lease_name.to_owned(),
                identity: identity.to_owned(),
                duration_seconds,
            },
            timing: Timing::new(Duration::from_secs(seconds)),
            hooks: Hooks::default(),
        })
    }

    /// An elector from the settings: `LEASE_NAMESPACE`, `LEASE_NAME`, `RUNNER_ID` as the
    /// identity and `LEASE_DURATION_SECONDS`.
    pub fn from_config(client: Client, config: &Config) -> Result<Self> {
        Self::new(
            client,
            config.lease_namespace(),
            &config.lease.lease_name,
            config.runner_id(),
            config.lease_duration(),
        )
    }

    /// Mirror leadership into the `repobox_leader` gauge.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.hooks.metrics = Some(metrics);
        self
    }

    /// Mirror leadership into [`Health::set_leader`] (it switches the leader-only probe checks).
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.hooks.health = Some(health);
        self
    }

    /// This replica's identity (`holderIdentity` when leading).
    pub fn identity(&self) -> &str {
        &self.lock.identity
    }

    /// How long a Lease stays valid without renewal (whole seconds).
    pub fn lease_duration(&self) -> Duration {
        self.timing.lease_duration
    }

    /// How often the leader renews (lease / 3).
    pub fn renew_period(&self) -> Duration {
        self.timing.renew_period
    }

    /// How often a standby polls, and the leader retries a failed renewal (lease / 5).
    pub fn retry_period(&self) -> Duration {
        self.timing.retry_period
    }

    /// How long renewals may fail before leadership counts as lost (lease × 2/3).
    pub fn renew_deadline(&self) -> Duration {
        self.timing.renew_deadline
    }

    /// Waits until this identity holds the Lease and returns the [`Leadership`], whose task
    /// keeps renewing it; returns `None` as soon as `cancel` completes (pass e.g.
    /// `token.cancelled()` or a signal future).
    ///
    /// API errors (including a missing RBAC grant on `leases`) are logged and retried every
    /// `retry_period`: a standby has nothing better to do, and the API server or RBAC may come
    /// right. The `Result` is for problems no retry can fix; at present all of those are caught
    /// by [`LeaderElector::new`]. If `cancel` completes while a write is in flight and that write
    /// wins, the Lease stays held until it expires (standbys wait one lease duration).
    pub async fn acquire(&self, cancel: impl Future<Output = ()>) -> Result<Option<Leadership>> {
        tokio::pin!(cancel);
        let mut observed: Option<Observed> = None;
        let mut last_holder: Option<String> = None;
        loop {
            let start = Instant::now();
            let attempt = tokio::select! {
                biased;
                () = &mut cancel => return Ok(None),
                r = timeout(self.timing.renew_deadline, self.try_acquire(&mut observed)) => r,
            };
            match attempt {
                Ok(Ok(Attempt::Acquired(lease))) => {
                    let spec = lease.spec.clone().unwrap_or_default();
                    tracing::info!(
                        lease = %self.lock.key(),
                        identity = %self.lock.identity,
                        transitions = spec.lease_transitions.unwrap_or(0),
                        "acquired the leader Lease"
                    );
                    return Ok(Some(Leadership::start(
                        self.lock.clone(),
                        self.timing,
                        self.hooks.clone(),
                        *lease,
                        start,
                    )));
                }
                Ok(Ok(Attempt::Held { holder })) => {
                    if last_holder.as_deref() != Some(holder.as_str()) {
                        tracing::info!(
                            lease = %self.lock.key(),
                            holder = %holder,
                            "the leader Lease is held by another replica; standing by"
                        );
                        last_holder = Some(holder);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.lock.key(), error = %e, "leader election attempt failed; retrying");
                }
                Err(_) => {
                    tracing::warn!(lease = %self.lock.key(), "leader election attempt timed out; retrying");
                }
            }
            tokio::select! {
                biased;
                () = &mut cancel => return Ok(None),
                () = sleep(self.timing.retry_period) => {}
            }
        }
    }

    /// One read-(create|replace) round (client-go's `tryAcquireOrRenew`).
    async fn try_acquire(
        &self,
        observed: &mut Option<Observed>,
    ) -> std::result::Result<Attempt, kube::Error> {
        let lock = &self.lock;
        let Some(current) = lock.api.get_opt(&lock.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(lock.name.clone()),
                    namespace: Some(lock.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(lock.record(None)),
            };
            return match lock.api.create(&PostParams::default(), &lease).await {
                Ok(created) => Ok(Attempt::Acquired(Box::new(created))),
                Err(e) if is_conflict(&e) => Ok(Attempt::Held {
                    holder: String::new(),
                }),
                Err(e) => Err(e),
            };
        };
        // Taken after the read returned: a later observation time only delays a takeover.
        let now = Instant::now();
        let spec = current.spec.clone().unwrap_or_default();
        let seen_at = match observed {
            Some(o) if o.spec == spec => o.at,
            _ => {
                *observed = Some(Observed {
                    spec: spec.clone(),
                    at: now,
                });
                now
            }
        };
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if !holder.is_empty() && holder != lock.identity {
            // The holder's own duration counts (it may be configured differently from ours);
            // a missing or nonsensical one falls back to ours.
            let valid_for = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.timing.lease_duration, Duration::from_secs);
            if now < seen_at + valid_for {
                return Ok(Attempt::Held { holder });
            }
            tracing::info!(lease = %lock.key(), previous = %holder, "the leader Lease expired; taking over");
        }
        let mut next = current;
        next.spec = Some(lock.record(Some(&spec)));
        match lock
            .api
            .replace(&lock.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => Ok(Attempt::Acquired(Box::new(written))),
            Err(e) if is_conflict(&e) => Ok(Attempt::Held { holder }),
            Err(e) => Err(e),
        }
    }
}

/// Held leadership. A background task renews the Lease; watch [`Leadership::lost`] and stop
/// all leader work when it fires. Call [`Leadership::release`] on graceful shutdown; dropping
/// it stops renewing without releasing (a standby then waits out the lease).
pub struct Leadership {
    lock: LeaseLock,
    timing: Timing,
    hooks: Hooks,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("lease", &self.lock.key())
            .field("identity", &self.lock.identity)
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

impl Leadership {
    fn start(
        lock: LeaseLock,
        timing: Timing,
        hooks: Hooks,
        lease: Lease,
        written: Instant,
    ) -> Self {
        hooks.set_leader(true);
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(renew_loop(
            lock.clone(),
            timing,
            hooks.clone(),
            lease,
            written,
            tx,
        ));
        Leadership {
            lock,
            timing,
            hooks,
            lost: rx,
            task,
        }
    }

    /// Completes when leadership is over: renewal failed for the renew deadline, another
    /// holder took the Lease, or the Lease was deleted (also when this `Leadership` is released
    /// or dropped). `'static`, so it can be moved into a task or a `select!`.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.lost.clone();
        async move {
            // An error means the renew task is gone, which also ends leadership.
            let _ = rx.wait_for(|lost| *lost).await;
        }
    }

    /// Whether leadership is already lost (see [`Leadership::lost`]).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow() || self.task.is_finished()
    }

    /// Stops renewing and hands the Lease back (empty holder, `leaseDurationSeconds: 1`) so a
    /// standby takes over at its next poll. Does nothing if the Lease is no longer ours. Call
    /// it after the leader's work has stopped, so two replicas never work at once. Gives up
    /// after one lease duration: by then the Lease has expired anyway.
    pub async fn release(mut self) -> Result<()> {
        self.task.abort();
        // The task ends at its next await point; waiting makes sure no renewal races our write.
        let _ = (&mut self.task).await;
        self.hooks.set_leader(false);
        let lock = self.lock.clone();
        match timeout(self.timing.lease_duration, release_lease(&lock)).await {
            Ok(result) => result,
            Err(_) => Err(Error::LeaderElection(format!(
                "releasing Lease {} timed out",
                lock.key()
            ))),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
        self.hooks.set_leader(false);
    }
}

async fn release_lease(lock: &LeaseLock) -> Result<()> {
    // Three tries: a conflict here only means someone touched the object between our read and
    // write (we stopped renewing, so it is not us).
    for _ in 0..3 {
        let Some(mut lease) = lock
            .api
            .get_opt(&lock.name)
            .await
            .map_err(|e| lock.error(e))?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if !lock.is_ours(spec) {
            return Ok(());
        }
        let now = MicroTime(jiff::Timestamp::now());
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now.clone());
        spec.acquire_time = Some(now);
        match lock
            .api
            .replace(&lock.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                tracing::info!(lease = %lock.key(), "released the leader Lease");
                return Ok(());
            }
            Err(e) if is_conflict(&e) => continue,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(lock.error(e)),
        }
    }
    Err(Error::LeaderElection(format!(
        "releasing Lease {}: conflicting writes",
        lock.key()
    )))
}

/// Renews until leadership is lost, then fires `lost`. `last_ok` is when the last successful
/// write *started* (see the module docs).
async fn renew_loop(
    lock: LeaseLock,
    timing: Timing,
    hooks: Hooks,
    mut current: Lease,
    mut last_ok: Instant,
    lost: watch::Sender<bool>,
) {
    let mut failing = false;
    let reason = loop {
        let deadline = last_ok + timing.renew_deadline;
        let next = if failing {
            Instant::now() + timing.retry_period
        } else {
            last_ok + timing.renew_period
        };
        sleep_until(next.min(deadline)).await;
        let start = Instant::now();
        if start >= deadline {
            break format!(
                "no successful renewal for {}s",
                timing.renew_deadline.as_secs_f32()
            );
        }
        match timeout(deadline - start, renew(&lock, &mut current)).await {
            Ok(Ok(Renewal::Renewed)) => {
                if failing {
                    tracing::info!(lease = %lock.key(), "renewing the leader Lease again");
                }
                last_ok = start;
                failing = false;
            }
            Ok(Ok(Renewal::Lost(reason))) => break reason,
            Ok(Ok(Renewal::Contended)) => {
                tracing::warn!(lease = %lock.key(), "leader Lease renewal lost a write race; retrying");
                failing = true;
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = %lock.key(), error = %e, "leader Lease renewal failed; retrying");
                failing = true;
            }
            // The deadline has passed; the next round reports it.
            Err(_) => failing = true,
        }
    };
    tracing::warn!(lease = %lock.key(), %reason, "lost the leader Lease");
    hooks.set_leader(false);
    let _ = lost.send(true);
}

/// One renewal. `current` is the Lease as we last wrote or read it; a conflict re-reads it to
/// tell "someone else took it" from "someone touched an unrelated field".
async fn renew(lock: &LeaseLock, current: &mut Lease) -> std::result::Result<Renewal, kube::Error> {
    for _ in 0..2 {
        let spec = current.spec.clone().unwrap_or_default();
        if !lock.is_ours(&spec) {
            return Ok(Renewal::Lost(format!(
                "the Lease is now held by {:?}",
                spec.holder_identity.unwrap_or_default()
            )));
        }
        let mut next = current.clone();
        next.spec = Some(lock.record(Some(&spec)));
        match lock
            .api
            .replace(&lock.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                *current = written;
                return Ok(Renewal::Renewed);
            }
            Err(e) if is_not_found(&e) => {
                return Ok(Renewal::Lost("the Lease was deleted".into()));
            }
            Err(e) if is_conflict(&e) => match lock.api.get_opt(&lock.name).await? {
                Some(fresh) => *current = fresh,
                None => return Ok(Renewal::Lost("the Lease was deleted".into())),
            },
            Err(e) => return Err(e),
        }
    }
    Ok(Renewal::Contended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_follows_the_lease_duration() {
        let t = Timing::new(Duration::from_secs(15));
        assert_eq!(t.renew_period, Duration::from_secs(5));
        assert_eq!(t.retry_period, Duration::from_secs(3));
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
        assert!(t.renew_period < t.renew_deadline && t.renew_deadline < t.lease_duration);
    }
}
