//! Intake: `jobs:stream` → RepoboxJob.
//!
//! Entries are read with XREADGROUP (consumer = this pod's name) on a connection of their own,
//! because the read blocks. An entry is acknowledged only once its RepoboxJob exists
//! (AlreadyExists counts: it is a redelivery), so a crash at any point loses nothing. Entries a
//! dead consumer left pending are reclaimed with XAUTOCLAIM; one delivered more than
//! `MAX_DELIVERIES` times goes to the dead-letter stream and its job is marked failed. Bad
//! entries are acknowledged and, where a job hash exists, marked failed with a specific error;
//! none of them stops the loop. While `MAX_QUEUED` RepoboxJobs wait, reading pauses: entries
//! wait safely in Redis.
//!
//! `MAX_QUEUED_PER_USER` is different: backpressure protects the cluster, this cap protects the
//! other users. A user's entry that would make more than that many of their RepoboxJobs queued
//! is refused: the job is marked failed with an error saying why and the entry acknowledged
//! (it must not block the stream for everyone). The count is the one `MAX_QUEUED` uses (the
//! cache plus the jobs created here that it does not show yet), reserved under a lock so the
//! concurrent entries of one batch cannot all slip under the cap; a redelivered entry whose
//! RepoboxJob exists is never refused.
//!
//! While the runner side is paused (`pause`), the intake reads nothing: entries stay in the
//! stream and pending ones stay pending (no reclaim, so no delivery is counted against
//! `MAX_DELIVERIES`). A read already blocking when the pause begins may still deliver what
//! arrives in its last `BLOCK_MS`; those jobs wait queued with reason `Paused`.
//!
//! Redis must not grow without bound: the dead-letter stream is capped (`DEAD_LETTER_MAXLEN`,
//! approximate), and after each reclaim pass the entries every consumer group of the stream has
//! acknowledged are trimmed (`XTRIM MINID`, see [`trim_floor`]); entries still pending or never
//! delivered are kept.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use redis::aio::MultiplexedConnection;
use redis::streams::{
    StreamAutoClaimOptions, StreamId, StreamInfoGroupsReply, StreamMaxlen, StreamPendingCountReply,
    StreamPendingReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, AsyncConnectionConfig, Value};
use repobox_contract::{JobStatus, keys};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::error::{is_conflict, is_invalid};
use crate::model::crd::{RepoboxJob, RepoboxJobPhase, RepoboxJobSpec};
use crate::model::labels::{
    FIELD_MANAGER, FINALIZER, LABEL_JOB_ID, LABEL_MANAGED_BY, LABEL_USER, MANAGED_BY,
};
use crate::model::names::{display_repo, label_value, object_name};
use crate::run::arrivals::Arrivals;
use crate::run::context::Wakeup;
use crate::run::metrics::Metrics;
use crate::run::records::JobRecords;
use crate::run::server::Health;
use crate::{Error, Result};
use repobox_contract::EntryId;

/// The first error among the batches already handled, if any (finished tasks are collected).
fn finished(in_flight: &mut JoinSet<Result<()>>) -> Option<Result<()>> {
    while let Some(done) = in_flight.try_join_next() {
        match done {
            Ok(Err(e)) => return Some(Err(e)),
            Ok(Ok(())) => {}
            Err(e) => warn!(error = %e, "a batch handler panicked; its entries stay pending"),
        }
    }
    None
}

/// Entries read per XREADGROUP / XAUTOCLAIM call.
const BATCH: usize = 100;
/// How long one XREADGROUP blocks; bounds how fast shutdown and backpressure are noticed.
const BLOCK_MS: usize = 2000;
/// Batches handled at once while the next one is read: at a steady trickle each read returns
/// one entry, so a slow create no longer holds up the entries behind it.
const MAX_BATCHES_IN_FLIGHT: usize = 32;
/// Entries handled at once across all batches (each is a Redis read and an API create): the
/// concurrency of a well-tuned client. Slots are granted in stream order (the semaphore is
/// fair), so the RepoboxJobs are created, and admitted, in about that order; without the bound a
/// burst put thousands of creates in flight and the API server answered many with errors.
pub const ENTRY_CONCURRENCY: usize = 32;

/// What became of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Its RepoboxJob exists (created now or before).
    Created {
        /// The RepoboxJob's name.
        name: String,
    },
    /// A bad entry, acknowledged; `reason` is the metric label.
    Bad {
        /// The metric label, e.g. `no_job_id`.
        reason: &'static str,
        /// What was wrong, for the log.
        detail: String,
    },
    /// Delivered too often: moved to the dead-letter stream.
    DeadLettered,
}

/// The intake loop (see the module doc): what it reads with and where it writes.
pub struct Intake {
    /// The operator's settings (stream, group, limits).
    pub cfg: Arc<Config>,
    /// The Kubernetes client (creates RepoboxJobs).
    pub client: Client,
    /// For the blocking XREADGROUP connection and the one entries are acknowledged on.
    pub redis: redis::Client,
    /// The job records (bad entries are marked failed there).
    pub outcomes: JobRecords,
    /// The RepoboxJob cache (how many are queued).
    pub store: Store<RepoboxJob>,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness (Redis reached) and the loop's liveness ticks.
    pub health: Arc<Health>,
    /// Names created (or reserved to be created) here that the cache may not show yet, with
    /// their user (see `Intake::queued_now` and [`user_queue_verdict`]).
    pub created: std::sync::Mutex<HashMap<String, String>>,
    /// The entries read and not yet in the cache, so the dispatcher keeps stream order.
    pub arrivals: Arc<Arrivals>,
    /// [`ENTRY_CONCURRENCY`] slots for handling entries.
    pub slots: Semaphore,
    /// The dispatcher's handle: entries waiting for a slot count as admissions waiting, so
    /// informational writes wait in a burst (see [`Wakeup`]).
    pub dispatch: Wakeup,
}

impl Intake {
    fn consumer(&self) -> &str {
        self.cfg.runner_id()
    }

    /// Runs until cancelled, reconnecting to Redis with exponential backoff.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.session(&cancel, &mut delay).await {
                Ok(()) => return,
                Err(e) => {
                    self.health.set_redis_ok(false);
                    // Waiting for Redis is progress, not a wedged loop: liveness stays green.
                    self.health.tick();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "intake lost Redis; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                    self.metrics.redis_reconnected();
                }
            }
        }
    }

    /// One connection's life: create the group, drain our own pending entries, then read and
    /// reclaim until cancelled or Redis fails.
    async fn session(
        self: &Arc<Self>,
        cancel: &CancellationToken,
        delay: &mut Duration,
    ) -> Result<()> {
        // The blocking read must not be cut short by a response timeout.
        let cfg = AsyncConnectionConfig::new().set_response_timeout(None);
        let mut con = self
            .redis
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?;
        self.ensure_group(&mut con).await?;
        self.health.set_redis_ok(true);
        *delay = Duration::from_millis(200);
        info!(consumer = %self.consumer(), stream = %self.cfg.redis.stream_key, "intake connected");

        if !self.wait_unpaused(cancel).await {
            return Ok(());
        }
        // Entries this consumer read but never acknowledged (a previous life of this pod).
        self.read(&mut con, "0", 0, BATCH).await?;
        // The blocking XREADGROUP holds `con`; handled batches are acknowledged on their own
        // connection, so the next read never waits for the previous batch's creates.
        let ack_con = self.redis.get_multiplexed_async_connection().await?;
        let mut in_flight: JoinSet<Result<()>> = JoinSet::new();
        let entries_in_flight = Arc::new(AtomicUsize::new(0));
        let claim_every = (self.cfg.claim_min_idle() / 2).max(Duration::from_secs(1));
        let mut next_claim = tokio::time::Instant::now();
        let result = loop {
            // A batch that could not be acknowledged ends the session (Redis is gone).
            if let Some(Err(e)) = finished(&mut in_flight) {
                break Err(e);
            }
            if cancel.is_cancelled() || !self.wait_unpaused(cancel).await {
                break Ok(());
            }
            let Some(room) = self.wait_for_room(cancel, &entries_in_flight).await else {
                break Ok(());
            };
            if tokio::time::Instant::now() >= next_claim {
                if let Err(e) = self.reclaim(&mut con).await {
                    break Err(e);
                }
                // Hygiene, never a reason to stop reading (e.g. an ACL without XTRIM).
                match trim_acknowledged(&mut con, &self.cfg.redis.stream_key).await {
                    Ok(0) => {}
                    Ok(n) => debug!(entries = n, "trimmed acknowledged stream entries"),
                    Err(e) => warn!(error = %e, "trimming acknowledged stream entries failed"),
                }
                next_claim = tokio::time::Instant::now() + claim_every;
            }
            let entries = tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                r = self.read_entries(&mut con, ">", BLOCK_MS, room) => match r {
                    Ok(entries) => entries,
                    Err(e) => break Err(e),
                },
            };
            self.health.tick();
            if entries.is_empty() {
                continue;
            }
            // Handled in the background: the next read does not wait for this batch's creates.
            let n = entries.len();
            entries_in_flight.fetch_add(n, Ordering::Relaxed);
            let (this, mut ack, counter) = (
                Arc::clone(self),
                ack_con.clone(),
                Arc::clone(&entries_in_flight),
            );
            in_flight.spawn(async move {
                let r = this.handle_batch(&mut ack, entries, &HashMap::new()).await;
                counter.fetch_sub(n, Ordering::Relaxed);
                r
            });
            // Bounded: a slow API server slows the reads down rather than piling up batches.
            while in_flight.len() >= MAX_BATCHES_IN_FLIGHT {
                if let Some(Ok(Err(e))) = in_flight.join_next().await {
                    warn!(error = %e, "acknowledging a handled batch failed; its entries stay pending");
                }
            }
        };
        // Entries being handled are acknowledged before the session ends (those that fail
        // stay pending, as always).
        while let Some(done) = in_flight.join_next().await {
            if let Ok(Err(e)) = done {
                warn!(error = %e, "acknowledging a handled batch failed; its entries stay pending");
            }
        }
        result
    }

    async fn ensure_group(&self, con: &mut MultiplexedConnection) -> Result<()> {
        let created: redis::RedisResult<()> = con
            .xgroup_create_mkstream(
                &self.cfg.redis.stream_key,
                &self.cfg.redis.consumer_group,
                "0",
            )
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Backpressure: waits until fewer than `MAX_QUEUED` RepoboxJobs are queued and returns
    /// how many entries may be read now (`None` when cancelled while waiting). Jobs this intake
    /// created that the cache does not show yet count as queued, so the cap holds exactly.
    async fn wait_for_room(
        &self,
        cancel: &CancellationToken,
        in_flight: &AtomicUsize,
    ) -> Option<usize> {
        let cap = self.cfg.quotas.max_queued as usize;
        let mut paused = false;
        loop {
            // Entries being handled will be queued jobs too.
            let queued = self.queued_now() + in_flight.load(Ordering::Relaxed);
            if queued < cap {
                if paused {
                    info!(queued, cap, "queue below the cap; reading the stream again");
                    self.metrics.set_intake_paused(false);
                }
                return Some((cap - queued).min(BATCH));
            }
            if !paused {
                info!(queued, cap, "MAX_QUEUED reached; pausing the stream intake");
                self.metrics.set_intake_paused(true);
                paused = true;
            }
            self.health.tick();
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// While paused (see `pause::watch`), waits for the resume; `false` when cancelled.
    async fn wait_unpaused(&self, cancel: &CancellationToken) -> bool {
        let mut changes = self.health.pause_changes();
        let Some(reason) = changes.borrow_and_update().clone() else {
            return true;
        };
        info!(reason = %reason, "paused: the intake reads no new entries");
        loop {
            // Waiting on purpose is progress: liveness stays green.
            self.health.tick();
            let resumed = tokio::time::timeout(Duration::from_secs(10), async {
                changes.wait_for(Option::is_none).await.is_ok()
            });
            tokio::select! {
                _ = cancel.cancelled() => return false,
                r = resumed => if r.unwrap_or(false) {
                    info!("resumed: the intake reads the stream again");
                    return true;
                }
            }
        }
    }

    /// Queued RepoboxJobs: those the cache shows, plus those created here and not cached yet.
    fn queued_now(&self) -> usize {
        let state = self.store.state();
        let mut unseen = self.created.lock().unwrap_or_else(|p| p.into_inner());
        // Borrowed names: this runs for every read, and the cache keeps finished jobs for a day.
        let cached: std::collections::HashSet<&str> =
            state.iter().map(|rj| rj.name_ref()).collect();
        unseen.retain(|name, _| !cached.contains(name.as_str()));
        state
            .iter()
            .filter(|rj| rj.phase() == RepoboxJobPhase::Queued)
            .count()
            + unseen.len()
    }

    /// Reads a batch (`>` new entries, `0` our own pending ones) and handles it.
    async fn read(
        &self,
        con: &mut MultiplexedConnection,
        from: &str,
        block_ms: usize,
        count: usize,
    ) -> Result<()> {
        let entries = self.read_entries(con, from, block_ms, count).await?;
        let deliveries = if from == ">" {
            HashMap::new()
        } else {
            self.delivery_counts(con, &entries).await?
        };
        self.handle_batch(con, entries, &deliveries).await
    }

    /// Reads a batch without handling it.
    async fn read_entries(
        &self,
        con: &mut MultiplexedConnection,
        from: &str,
        block_ms: usize,
        count: usize,
    ) -> Result<Vec<StreamId>> {
        let mut opts = StreamReadOptions::default()
            .group(&self.cfg.redis.consumer_group, self.consumer())
            .count(count.max(1));
        if block_ms > 0 {
            opts = opts.block(block_ms);
        }
        let reply: Option<StreamReadReply> = con
            .xread_options(&[&self.cfg.redis.stream_key], &[from], &opts)
            .await?;
        let entries: Vec<StreamId> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        // Before anything is handled: a later batch's jobs must not be admitted first.
        self.arrivals.read(entries.iter().map(|e| e.id.as_str()));
        Ok(entries)
    }

    /// Claims entries idle longer than `CLAIM_MIN_IDLE_SECONDS` from any consumer.
    async fn reclaim(&self, con: &mut MultiplexedConnection) -> Result<()> {
        let min_idle = self.cfg.claim_min_idle().as_millis() as usize;
        let mut start = "0-0".to_owned();
        loop {
            let reply: redis::streams::StreamAutoClaimReply = con
                .xautoclaim_options(
                    &self.cfg.redis.stream_key,
                    &self.cfg.redis.consumer_group,
                    self.consumer(),
                    min_idle,
                    &start,
                    StreamAutoClaimOptions::default().count(BATCH),
                )
                .await?;
            if !reply.claimed.is_empty() {
                info!(
                    entries = reply.claimed.len(),
                    "reclaimed entries a consumer left pending"
                );
                self.arrivals
                    .read(reply.claimed.iter().map(|e| e.id.as_str()));
                let deliveries = self.delivery_counts(con, &reply.claimed).await?;
                self.handle_batch(con, reply.claimed, &deliveries).await?;
            }
            if reply.next_stream_id == "0-0" || reply.next_stream_id.is_empty() {
                return Ok(());
            }
            start = reply.next_stream_id;
        }
    }

    /// How often each entry was delivered (XPENDING), for the poison-entry limit.
    async fn delivery_counts(
        &self,
        con: &mut MultiplexedConnection,
        entries: &[StreamId],
    ) -> Result<HashMap<String, usize>> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(HashMap::new());
        };
        let reply: StreamPendingCountReply = con
            .xpending_count(
                &self.cfg.redis.stream_key,
                &self.cfg.redis.consumer_group,
                &first.id,
                &last.id,
                entries.len(),
            )
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|p| (p.id, p.times_delivered))
            .collect())
    }

    async fn handle_batch(
        &self,
        con: &mut MultiplexedConnection,
        entries: Vec<StreamId>,
        deliveries: &HashMap<String, usize>,
    ) -> Result<()> {
        let mut acks: Vec<String> = Vec::with_capacity(entries.len());
        let results = futures::future::join_all(entries.iter().map(|e| async move {
            let count = deliveries.get(&e.id).copied().unwrap_or(1);
            let result = self.handle_with_retry(e, count).await;
            // At once, not after the whole batch: a bad entry must not hold later jobs back.
            match &result {
                Ok(Handled::Created { name }) => self.arrivals.exists(&e.id, name),
                _ => self.arrivals.dropped(&e.id),
            }
            result
        }))
        .await;
        for (entry, result) in entries.iter().zip(results) {
            match result {
                Ok(handled) => {
                    match &handled {
                        Handled::Created { name } => {
                            debug!(entry = %entry.id, job = %name, "entry accepted");
                        }
                        Handled::Bad { reason, detail } => {
                            warn!(entry = %entry.id, reason, detail = %detail, "bad stream entry acknowledged");
                            self.metrics.bad_entry(reason);
                        }
                        Handled::DeadLettered => self.metrics.bad_entry("dead_letter"),
                    }
                    acks.push(entry.id.clone());
                }
                // Left pending: retried by XAUTOCLAIM, dead-lettered after MAX_DELIVERIES.
                Err(e) => {
                    warn!(entry = %entry.id, error = %e, "entry not accepted yet; it stays pending");
                }
            }
        }
        if !acks.is_empty() {
            let _: usize = con
                .xack(
                    &self.cfg.redis.stream_key,
                    &self.cfg.redis.consumer_group,
                    &acks,
                )
                .await?;
        }
        Ok(())
    }

    /// Transient failures (API errors, Redis hiccups) are retried a few times in place.
    async fn handle_with_retry(&self, entry: &StreamId, deliveries: usize) -> Result<Handled> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let attempt_result = {
                // Never closed: a `None` is never seen.
                let _slot = self.dispatch.create_slot(&self.slots).await;
                self.handle(entry, deliveries).await
            };
            match attempt_result {
                Ok(h) => return Ok(h),
                Err(e) if attempt < 4 => {
                    debug!(entry = %entry.id, error = %e, attempt, "retrying entry");
                    tokio::time::sleep(delay).await;
                    delay *= 3;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Turns one entry into a RepoboxJob (or a recorded bad entry).
    pub async fn handle(&self, entry: &StreamId, deliveries: usize) -> Result<Handled> {
        let field = |name: &str| match entry.map.get(name) {
            Some(Value::BulkString(b)) => {
                Some(String::from_utf8_lossy(b).trim().to_owned()).filter(|s| !s.is_empty())
            }
            Some(Value::SimpleString(s)) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
            _ => None,
        };
        let job_id = field("jobId");
        if deliveries > self.cfg.redis.max_deliveries as usize {
            self.dead_letter(entry, job_id.as_deref(), deliveries)
                .await?;
            return Ok(Handled::DeadLettered);
        }
        let Some(job_id) = job_id else {
            return Ok(Handled::Bad {
                reason: "no_job_id",
                detail: "the entry has no jobId field".into(),
            });
        };
        let Some(mut record) = self.outcomes.record_fields(&job_id).await? else {
            return Ok(Handled::Bad {
                reason: "no_job_hash",
                detail: format!("{} does not exist", keys::job(&job_id)),
            });
        };
        let Some(user_id) =
            field("userId").or_else(|| record.get("userId").cloned().filter(|s| !s.is_empty()))
        else {
            self.outcomes
                .fail(
                    &job_id,
                    "the job has no userId (neither in the stream entry nor in the job record)",
                )
                .await?;
            return Ok(Handled::Bad {
                reason: "no_user_id",
                detail: format!("job {job_id} has no userId"),
            });
        };
        if let Some(status) = record.get("status").and_then(|s| JobStatus::parse(s))
            && status.is_terminal()
        {
            self.outcomes.expire_output(&job_id).await;
            return Ok(Handled::Bad {
                reason: "terminal",
                detail: format!("job {job_id} is already {status}"),
            });
        }

        // The stream entry's plan wins over the job record's (the newer word of the web app).
        if let Some(plan) = field("plan") {
            record.insert("plan".into(), plan);
        }
        let rj = repobox_job(&job_id, &user_id, &entry.id, &record);
        let name = rj.name_any();
        let api: Api<RepoboxJob> = Api::namespaced(self.client.clone(), self.cfg.jobs_namespace());
        if let Some(cap) = self.cfg.max_queued_per_user()
            && let Reservation::Full(queued) = self.reserve(&name, &user_id, cap)
        {
            // A redelivery of an accepted job (cache not caught up) is not a new job.
            if api.get_opt(&name).await?.is_some() {
                return Ok(Handled::Created { name });
            }
            let error = format!(
                "too many queued jobs: user {user_id} already has {queued} jobs waiting to start \
                 (MAX_QUEUED_PER_USER is {cap}); submit it again once some have started"
            );
            self.outcomes.fail(&job_id, &error).await?;
            return Ok(Handled::Bad {
                reason: "user_queue_full",
                detail: error,
            });
        }
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let result = api.create(&params, &rj).await;
        if matches!(&result, Err(e) if !is_conflict(e)) {
            // Not created: the reservation (if any) goes, a retry makes a new one.
            self.unreserve(&name);
        }
        match result {
            Ok(created) => {
                // Handed to the dispatcher at once: it need not wait for the watch event.
                self.arrivals.created(&entry.id, created);
                self.created
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), user_id.clone());
                let latency = EntryId::parse_or_max(&entry.id).ms;
                let now_ms = jiff::Timestamp::now().as_millisecond().max(0) as u64;
                self.metrics
                    .job_received(Duration::from_millis(now_ms.saturating_sub(latency)));
                Ok(Handled::Created { name })
            }
            Err(e) if is_conflict(&e) => Ok(Handled::Created { name }),
            // The API server refused the object itself (validation): retrying cannot help.
            Err(e) if is_invalid(&e) => {
                let why = match &e {
                    kube::Error::Api(s) => s.message.clone(),
                    other => other.to_string(),
                };
                let error = format!("the job could not be accepted: {why}");
                self.outcomes.fail(&job_id, &error).await?;
                Ok(Handled::Bad {
                    reason: "invalid",
                    detail: error,
                })
            }
            Err(e) => Err(Error::Kube(e)),
        }
    }

    /// Reserves a queue place for `name` of `user` under `MAX_QUEUED_PER_USER` = `cap`.
    fn reserve(&self, name: &str, user: &str, cap: usize) -> Reservation {
        let state = self.store.state();
        let cached: Vec<(&str, &str, bool)> = state
            .iter()
            .map(|rj| {
                (
                    rj.name_ref(),
                    rj.spec.user_id.as_str(),
                    rj.phase() == RepoboxJobPhase::Queued,
                )
            })
            .collect();
        let mut unseen = self.created.lock().unwrap_or_else(|p| p.into_inner());
        user_queue_verdict(name, user, cap, &cached, &mut unseen)
    }

    /// Drops the reservation of a RepoboxJob that was not created.
    fn unreserve(&self, name: &str) {
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Moves a poison entry to the dead-letter stream and fails its job.
    async fn dead_letter(
        &self,
        entry: &StreamId,
        job_id: Option<&str>,
        deliveries: usize,
    ) -> Result<()> {
        let mut con = self.redis.get_multiplexed_async_connection().await?;
        let mut fields: Vec<(String, String)> = entry
            .map
            .iter()
            .filter_map(|(k, v)| match v {
                Value::BulkString(b) => Some((k.clone(), String::from_utf8_lossy(b).into_owned())),
                _ => None,
            })
            .collect();
        fields.push(("originalId".into(), entry.id.clone()));
        fields.push(("deliveries".into(), deliveries.to_string()));
        fields.push((
            "reason".into(),
            format!("delivered {deliveries} times without being accepted"),
        ));
        if let Some(job_id) = job_id {
            self.outcomes
                .fail(job_id, &format!("the job could not be started after {deliveries} attempts and was moved to the dead-letter stream"))
                .await?;
        }
        let maxlen = usize::try_from(self.cfg.redis.dead_letter_maxlen).unwrap_or(usize::MAX);
        let _: Option<String> = con
            .xadd_maxlen(
                &self.cfg.redis.dead_letter_stream,
                StreamMaxlen::Approx(maxlen),
                "*",
                &fields,
            )
            .await?;
        warn!(entry = %entry.id, deliveries, "poison entry moved to the dead-letter stream");
        Ok(())
    }
}

/// The outcome of [`user_queue_verdict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// The job exists already (cached or created here): a redelivery, never refused.
    Known,
    /// A place was reserved (the name is now in `unseen`).
    Reserved,
    /// The user already has this many jobs queued, at least the cap.
    Full(usize),
}

/// Whether job `name` of `user` fits under `cap` queued jobs per user (pure). `cached` is the
/// cache as (name, user, is queued); `unseen` the names created or reserved here with their
/// user: names the cache now shows are dropped from it, and a reservation is added to it.
pub fn user_queue_verdict(
    name: &str,
    user: &str,
    cap: usize,
    cached: &[(&str, &str, bool)],
    unseen: &mut HashMap<String, String>,
) -> Reservation {
    if unseen.contains_key(name) || cached.iter().any(|(n, _, _)| *n == name) {
        return Reservation::Known;
    }
    if !unseen.is_empty() {
        let names: std::collections::HashSet<&str> = cached.iter().map(|(n, _, _)| *n).collect();
        unseen.retain(|n, _| !names.contains(n.as_str()));
    }
    let queued = cached
        .iter()
        .filter(|(_, u, queued)| *queued && *u == user)
        .count()
        + unseen.values().filter(|u| *u == user).count();
    if queued >= cap {
        return Reservation::Full(queued);
    }
    unseen.insert(name.to_owned(), user.to_owned());
    Reservation::Reserved
}

/// Where one consumer group stands in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupPosition {
    /// The group's `last-delivered-id`: later entries were never delivered to it.
    pub last_delivered: EntryId,
    /// The smallest id the group has pending (delivered, not acknowledged), if any.
    pub oldest_pending: Option<EntryId>,
}

/// The `XTRIM … MINID` bound below which every group of the stream has acknowledged every
/// entry: each group's oldest pending entry, or just past its last delivered one when nothing is
/// pending, and the smallest of those over all groups. `None` (trim nothing) without groups.
pub fn trim_floor(groups: &[GroupPosition]) -> Option<EntryId> {
    groups
        .iter()
        .map(|g| match g.oldest_pending {
            Some(p) => p.min(g.last_delivered),
            None => next_id(g.last_delivered),
        })
        .min()
}

/// The smallest id after `id`.
fn next_id(id: EntryId) -> EntryId {
    match id.seq.checked_add(1) {
        Some(seq) => EntryId { ms: id.ms, seq },
        None => EntryId {
            ms: id.ms.saturating_add(1),
            seq: 0,
        },
    }
}

/// Trims the entries of `stream` that every consumer group has acknowledged (exact
/// `XTRIM MINID`, so a pending or undelivered entry is never removed); returns how many went.
/// An id that does not parse stops the trim: keeping entries is always safe.
pub async fn trim_acknowledged(con: &mut MultiplexedConnection, stream: &str) -> Result<usize> {
    let exists: bool = con.exists(stream).await?;
    if !exists {
        return Ok(0);
    }
    let info: StreamInfoGroupsReply = con.xinfo_groups(stream).await?;
    let mut positions = Vec::with_capacity(info.groups.len());
    for group in &info.groups {
        let Ok(last_delivered) = group.last_delivered_id.parse::<EntryId>() else {
            return Ok(0);
        };
        let oldest_pending = if group.pending == 0 {
            None
        } else {
            match con.xpending(stream, &group.name).await? {
                StreamPendingReply::Data(d) => match d.start_id.parse::<EntryId>() {
                    Ok(id) => Some(id),
                    Err(_) => return Ok(0),
                },
                // Acknowledged since XINFO: nothing pending any more.
                _ => None,
            }
        };
        positions.push(GroupPosition {
            last_delivered,
            oldest_pending,
        });
    }
    let Some(floor) = trim_floor(&positions) else {
        return Ok(0);
    };
    if floor <= (EntryId { ms: 0, seq: 1 }) {
        return Ok(0);
    }
    let trimmed: usize = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg("=")
        .arg(floor.to_string())
        .query_async(con)
        .await?;
    Ok(trimmed)
}

/// The RepoboxJob for a stream entry (pure).
pub fn repobox_job(
    job_id: &str,
    user_id: &str,
    entry_id: &str,
    record: &HashMap<String, String>,
) -> RepoboxJob {
    let get = |k: &str| record.get(k).filter(|v| !v.is_empty()).cloned();
    let plan = record
        .get("plan")
        .map(|p| p.trim())
        .filter(|p| !p.is_empty());
    let name = object_name(job_id);
    let mut rj = RepoboxJob::new(
        &name,
        RepoboxJobSpec {
            job_id: job_id.to_owned(),
            user_id: user_id.to_owned(),
            repo: get("repoUrl").map(|u| display_repo(&u)).unwrap_or_default(),
            stream_entry_id: entry_id.to_owned(),
            provider_id: get("providerId"),
            base_branch: get("baseBranch"),
            timeout_seconds: None,
            cancel: None,
            plan: plan.map(str::to_owned),
        },
    );
    rj.metadata = ObjectMeta {
        name: Some(name),
        labels: Some(BTreeMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_JOB_ID.to_owned(), label_value(job_id)),
            (LABEL_USER.to_owned(), label_value(user_id)),
        ])),
        // Created with the finalizer: no extra write to add it.
        finalizers: Some(vec![FINALIZER.to_owned()]),
        ..Default::default()
    };
    rj
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_repobox_job_from_an_entry() {
        let record = HashMap::from([
            (
                "repoUrl".to_owned(),
                "https://oauth2:tok@github.com/acme/api.git".to_owned(),
            ),
            ("providerId".to_owned(), "gh".to_owned()),
            ("baseBranch".to_owned(), String::new()),
        ]);
        let rj = repobox_job("Job_1", "user@example.com", "1700000000000-3", &record);
        assert_eq!(rj.name_any(), object_name("Job_1"));
        assert_eq!(
            rj.spec.repo, "https://github.com/acme/api.git",
            "credentials never reach the spec"
        );
        assert_eq!(rj.spec.stream_entry_id, "1700000000000-3");
        assert_eq!(rj.spec.provider_id.as_deref(), Some("gh"));
        assert_eq!(rj.spec.base_branch, None);
        assert_eq!(rj.finalizers(), [FINALIZER]);
        assert_eq!(rj.labels()[LABEL_USER], label_value("user@example.com"));
        assert_eq!(rj.labels()[LABEL_MANAGED_BY], MANAGED_BY);
    }

    #[test]
    fn per_user_queue_cap() {
        let cached = vec![
            ("q1", "ann", true),
            ("r1", "ann", false), // admitted: not queued
            ("q2", "bob", true),
        ];
        let mut unseen = HashMap::from([("u1".to_owned(), "ann".to_owned())]);
        // ann: q1 + u1 queued = 2 < 3: reserved, and counted from now on.
        assert_eq!(
            user_queue_verdict("n1", "ann", 3, &cached, &mut unseen),
            Reservation::Reserved
        );
        assert_eq!(unseen["n1"], "ann");
        assert_eq!(
            user_queue_verdict("n2", "ann", 3, &cached, &mut unseen),
            Reservation::Full(3)
        );
        assert!(!unseen.contains_key("n2"));
        // Other users are unaffected.
        assert_eq!(
            user_queue_verdict("n3", "bob", 3, &cached, &mut unseen),
            Reservation::Reserved
        );
        // Known names (cached or reserved) are redeliveries, whatever the count.
        assert_eq!(
            user_queue_verdict("q1", "ann", 1, &cached, &mut unseen),
            Reservation::Known
        );
        assert_eq!(
            user_queue_verdict("n1", "ann", 1, &cached, &mut unseen),
            Reservation::Known
        );
        // Once the cache shows a reserved name, it is counted once, not twice.
        let mut cached2 = cached.clone();
        cached2.push(("u1", "ann", true));
        assert_eq!(
            user_queue_verdict("n4", "ann", 3, &cached2, &mut unseen),
            Reservation::Full(3),
            "q1, u1 (cached, no longer unseen), n1 (reserved)"
        );
        assert_eq!(
            user_queue_verdict("n4", "ann", 4, &cached2, &mut unseen),
            Reservation::Reserved
        );
    }

    fn id(ms: u64, seq: u64) -> EntryId {
        EntryId { ms, seq }
    }

    #[test]
    fn trim_floor_keeps_pending_and_undelivered_entries() {
        assert_eq!(trim_floor(&[]), None, "no group: not ours to trim");
        // Nothing pending: everything up to and including the last delivered entry goes.
        let idle = GroupPosition {
            last_delivered: id(5, 2),
            oldest_pending: None,
        };
        assert_eq!(trim_floor(&[idle]), Some(id(5, 3)));
        // The oldest pending entry stays.
        let busy = GroupPosition {
            last_delivered: id(9, 0),
            oldest_pending: Some(id(4, 1)),
        };
        assert_eq!(trim_floor(&[busy]), Some(id(4, 1)));
        // The group furthest behind decides.
        let behind = GroupPosition {
            last_delivered: id(2, 0),
            oldest_pending: None,
        };
        assert_eq!(trim_floor(&[idle, busy, behind]), Some(id(2, 1)));
        // A group that never read anything keeps the whole stream.
        let fresh = GroupPosition {
            last_delivered: id(0, 0),
            oldest_pending: None,
        };
        assert_eq!(trim_floor(&[idle, fresh]), Some(id(0, 1)));
        // The sequence overflows into the next millisecond.
        let edge = GroupPosition {
            last_delivered: id(7, u64::MAX),
            oldest_pending: None,
        };
        assert_eq!(trim_floor(&[edge]), Some(id(8, 0)));
    }
}
