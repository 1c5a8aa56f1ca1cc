//! The admission loop: the one place that decides which queued RepoboxJobs start.
//!
//! Admission needs a view of every job at once (quotas are per user and cluster-wide), so it
//! runs as a single task rather than inside per-object reconciles: reconciles and finished jobs
//! `poke` it, and each pass reads the controller's cache, applies the pure
//! [`quota::decide`], creates the Jobs of the admitted and writes the waiting reason of the
//! others. Counts come from the cluster's state, never from a counter that could leak; a restart
//! re-derives them. Jobs admitted by this process but not yet visible in the cache are kept in
//! an overlay, so a lagging cache can never admit a job twice or exceed a limit. The intake
//! hands over the RepoboxJobs it has just created ([`Arrivals`]), so a job can be admitted
//! before the watch brings it; and jobs whose stream entry comes after one the intake is still
//! turning into a RepoboxJob wait for it, so the order of admission is the order of the stream.
//!
//! Each pass also reads, in one Redis round trip, what can change without a redeploy (see
//! `tiers` and `pause`): the global pause, and for the users with queued jobs their pause and
//! their `runner:user_limits` value (HMGET of those users only). Nothing read is kept beyond
//! the pass, and while any job waits a pass runs at least every [`WAITING_PASS`], so a new
//! limit or a resume applies within a second. If Redis cannot be read the pass fails and admits
//! nothing: a pause that cannot be checked is treated as in force.
//!
//! A pass only decides: the admitted enter the overlay at once and their Jobs are created by
//! background tasks (bounded), so the next pass can admit jobs that arrived meanwhile instead
//! of waiting for the slowest create of a batch. The `Admitted` Event is published after the
//! Job exists, outside the create slots, at a lower concurrency, and only while no job waits
//! for a create slot: in a burst the API server's time goes to the creates first (the
//! reconciler holds back its first `Starting` explanation likewise, see [`Wakeup`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use repobox_contract::EntryId;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Result;
use crate::decide::quota::{self, Overrides, SlotHolder, WaitReason};
use crate::decide::tiers;
use crate::error::Category;
use crate::model::crd::{RepoboxJob, RepoboxJobPhase, reasons};
use crate::model::labels::MANAGED_BY_SELECTOR;
use crate::run::arrivals::Arrivals;
use crate::run::context::{Context, LIST_PAGE, Wakeup};
use crate::run::metrics::UserJobs;

/// How often a pass runs even without a poke (a safety net, not the mechanism).
const IDLE_PASS: Duration = Duration::from_secs(15);
/// How often a pass runs while jobs wait: limits and pauses live in Redis, which sends no
/// notification, and a change must apply within a second.
pub const WAITING_PASS: Duration = Duration::from_secs(1);
/// Job creates in flight (the concurrency of a well-tuned client; more only queues at the
/// API server).
const CREATE_CONCURRENCY: usize = 32;
/// `Admitted` Events in flight: informational, so they yield to the creates in a burst.
const EVENT_CONCURRENCY: usize = 4;
/// Users remembered as warned about an unusable limit; beyond it the memory starts over (a
/// repeated Warning is harmless, unbounded memory is not).
const WARNED_CAP: usize = 10_000;
/// Passes are paced by their own cost: after a pass that computed for `d` (its waits for Redis
/// and the API server not counted), the next starts no sooner
/// than `PASS_GAP_FACTOR × d` later, so admission uses at most 1/(1 + factor) of a core however
/// fast pokes come (a burst pokes for every job). A pass over a few hundred jobs takes a tenth
/// of a millisecond, so in steady load the gap is far below a create's round trip.
const PASS_GAP_FACTOR: u32 = 4;
/// The longest gap pacing imposes (a pass over a very large cache).
const MAX_PASS_GAP: Duration = Duration::from_millis(50);
/// How long shutdown waits for the Job creates in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct State {
    /// Admitted (Job created) but still `Queued` in the cache: RepoboxJob name → `spec.userId`
    /// (empty until the cache shows the RepoboxJob: a label only holds a hash of the id).
    overlay: HashMap<String, String>,
    /// The last value written to `runner:user:{id}:running`.
    published: BTreeMap<String, usize>,
    /// Whether every `runner:user:*:running` key in Redis (also those another leader wrote)
    /// was set from this process's view since it took the lease.
    swept: bool,
    /// The per-user gauges last published (`repobox_user_jobs`).
    user_jobs: BTreeMap<String, UserJobs>,
    /// The unusable-limit problem last reported per user, so a Warning is published once per
    /// change rather than on every pass.
    warned: HashMap<String, String>,
}

/// The admission loop (see the module doc): its wake-up, its state between passes and the
/// bounds on its background creates and Events.
pub struct Dispatcher {
    wakeup: Wakeup,
    /// Entries the intake read whose RepoboxJobs the cache does not show yet.
    arrivals: Arc<Arrivals>,
    state: Mutex<State>,
    creates: Semaphore,
    events: Semaphore,
    /// Set on shutdown: creates not started yet are dropped (the next leader re-derives them).
    stopping: AtomicBool,
    /// Whether the last pass left jobs waiting (they get a pass every [`WAITING_PASS`]).
    waiting: AtomicBool,
}

impl Dispatcher {
    /// A dispatcher woken by `wakeup` (the context's [`Context::dispatch`]).
    pub fn new(wakeup: Wakeup) -> Self {
        Self {
            arrivals: Arc::new(Arrivals::new(wakeup.clone())),
            wakeup,
            state: Mutex::default(),
            creates: Semaphore::new(CREATE_CONCURRENCY),
            events: Semaphore::new(EVENT_CONCURRENCY),
            stopping: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
        }
    }
}

impl Dispatcher {
    /// Where the intake records the entries it read (see [`Arrivals`]).
    pub fn arrivals(&self) -> Arc<Arrivals> {
        Arc::clone(&self.arrivals)
    }

    /// Asks for a pass soon; many pokes before the pass runs coalesce into one.
    pub fn poke(&self) {
        self.wakeup.poke();
    }

    /// Runs passes until cancelled. The first pass seeds the overlay with the Jobs that exist,
    /// so a restart between "Job created" and "status written" is counted correctly.
    pub async fn run(self: Arc<Self>, ctx: Arc<Context>, cancel: CancellationToken) {
        if let Err(e) = self.seed(&ctx).await {
            warn!(error = %e, "could not list existing Jobs; relying on the cache");
        }
        // When the last pass ended and how long it computed (pacing, see `PASS_GAP_FACTOR`).
        let mut last = (tokio::time::Instant::now(), Duration::ZERO);
        loop {
            let idle = if self.waiting.load(Ordering::Relaxed) {
                WAITING_PASS
            } else {
                IDLE_PASS
            };
            tokio::select! {
                _ = cancel.cancelled() => return self.drain().await,
                _ = self.wakeup.notified() => {}
                _ = tokio::time::sleep(idle) => {}
            }
            // Pokes arriving meanwhile coalesce into this pass.
            tokio::select! {
                _ = cancel.cancelled() => return self.drain().await,
                _ = tokio::time::sleep_until(last.0 + pass_gap(last.1)) => {}
            }
            if !ctx.store_ready() {
                tracing::debug!("admission waits for the cache");
                continue;
            }
            let started = tokio::time::Instant::now();
            let computing = match self.pass(&ctx).await {
                Ok(computing) => computing,
                Err(e) => {
                    warn!(error = %e, "admission pass failed; retrying on the next trigger");
                    ctx.metrics.reconcile_failed(e.metric_label());
                    Duration::ZERO
                }
            };
            ctx.metrics.admission_pass(started.elapsed());
            last = (tokio::time::Instant::now(), computing);
        }
    }

    async fn seed(&self, ctx: &Context) -> Result<()> {
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        // Metadata only, in pages: with thousands of Jobs a full list would be the operator's
        // peak memory.
        let mut params = ListParams::default()
            .labels(MANAGED_BY_SELECTOR)
            .limit(LIST_PAGE);
        loop {
            let page = jobs.list_metadata(&params).await?;
            let mut state = self.state.lock().await;
            for job in &page.items {
                // The user comes from the RepoboxJob's spec in the pass: the `repobox.dev/user`
                // label is a hash for ids such as `user@example.com`, and counting by it would
                // give that user extra slots.
                state
                    .overlay
                    .insert(slot_holder(&job.metadata), String::new());
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(()),
            }
        }
    }

    /// One admission decision over the whole cache. Returns the time spent computing (the
    /// parts that grow with the cache; Redis and API calls excluded), which paces the next
    /// pass.
    pub async fn pass(self: &Arc<Self>, ctx: &Arc<Context>) -> Result<Duration> {
        let mut state = self.state.lock().await;
        let mut computing = Duration::ZERO;
        let mut since = std::time::Instant::now();
        let mut all = ctx.store.state();
        // The intake's newest RepoboxJobs count before the cache shows them (stream order kept:
        // nothing after an entry whose RepoboxJob is not known yet).
        let pending = {
            let cached: HashSet<&str> = all.iter().map(|rj| rj.name_ref()).collect();
            self.arrivals
                .pending(|n| cached.contains(n), tokio::time::Instant::now())
        };
        all.extend(pending.fresh);
        // Borrowed, not cloned: a pass runs for nearly every poke of a burst.
        let by_name: HashMap<&str, &Arc<RepoboxJob>> =
            all.iter().map(|rj| (rj.name_ref(), rj)).collect();
        tracing::debug!(
            objects = all.len(),
            overlay = state.overlay.len(),
            "admission pass"
        );

        // The overlay only bridges the gap until the cache shows the admission.
        state.overlay.retain(|name, _| {
            by_name.get(name.as_str()).is_some_and(|rj| {
                rj.phase() == RepoboxJobPhase::Queued && rj.metadata.deletion_timestamp.is_none()
            })
        });
        // Quotas count `spec.userId`, never a label.
        for (name, user) in &mut state.overlay {
            if let Some(rj) = by_name.get(name.as_str()) {
                user.clone_from(&rj.spec.user_id);
            }
        }
        let (mut queued, mut running) = quota::partition(all.iter().map(Arc::as_ref));
        queued.retain(|c| !state.overlay.contains_key(&c.name));
        let held = match pending.floor {
            Some(floor) => {
                let before = queued.len();
                queued.retain(|c| c.stream_id < floor);
                before - queued.len()
            }
            None => 0,
        };
        if held > 0 {
            tracing::debug!(
                held,
                "queued jobs wait for an earlier entry to reach the cache"
            );
        }
        running.extend(
            state
                .overlay
                .iter()
                .map(|(n, u)| SlotHolder::new(n.clone(), u.clone())),
        );

        let limits = ctx.cfg.limits();
        // Tiers and pauses: the Redis values of the users that have queued jobs.
        let mut users: Vec<&str> = queued.iter().map(|c| c.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        computing += since.elapsed();
        let inputs = ctx.outcomes.pass_inputs(&users).await?;
        since = std::time::Instant::now();
        let plans = ctx.cfg.plan_limits().unwrap_or_default();
        // Only the users with queued jobs are resolved: the others' stream ids need no parsing.
        let newest = tiers::newest_plans(all.iter().filter_map(|rj| {
            let phase = rj.phase();
            let relevant = (phase == RepoboxJobPhase::Queued || phase.is_admitted())
                && users.binary_search(&rj.spec.user_id.as_str()).is_ok();
            relevant.then(|| {
                (
                    rj.spec.user_id.as_str(),
                    EntryId::parse_or_max(&rj.spec.stream_entry_id),
                    rj.spec.plan.as_deref(),
                )
            })
        }));
        let resolved: BTreeMap<&str, tiers::Resolved> = users
            .iter()
            .map(|u| {
                let r = tiers::resolve(
                    inputs.user_limits.get(*u).map(String::as_str),
                    newest.get(u).copied().flatten(),
                    &plans,
                    ctx.cfg.quotas.max_jobs_per_user,
                );
                (*u, r)
            })
            .collect();
        let overrides = Overrides {
            per_user: resolved
                .iter()
                .map(|(u, r)| ((*u).to_owned(), r.limit as usize))
                .collect(),
            paused_users: inputs.paused_users.keys().cloned().collect(),
            paused: inputs.paused.is_some(),
        };
        let decision = quota::decide_with(&queued, &running, limits, &overrides);
        computing += since.elapsed();
        self.report_problems(ctx, &mut state, &resolved, &queued, &by_name)
            .await;
        let mut by_plan: BTreeMap<String, i64> = BTreeMap::new();
        for r in resolved.values() {
            *by_plan.entry(r.plan.clone()).or_default() += 1;
        }
        ctx.metrics.set_users_by_plan(&by_plan);

        // The admitted hold their slots from now on (the overlay); their Jobs are created in
        // the background, in admission order (the semaphore is fair).
        for name in &decision.admit {
            let Some(rj) = by_name.get(name.as_str()).copied() else {
                continue;
            };
            state.overlay.insert(name.clone(), rj.spec.user_id.clone());
            running.push(SlotHolder::new(name.clone(), rj.spec.user_id.clone()));
            tokio::spawn(Arc::clone(self).admit(Arc::clone(ctx), Arc::clone(rj)));
        }

        // Tell the waiting why they wait (only when that changed).
        let mut admitted_of: HashMap<&str, usize> = HashMap::new();
        for r in &running {
            *admitted_of.entry(r.user.as_str()).or_default() += 1;
        }
        for w in &decision.waiting {
            let Some(rj) = by_name.get(w.name.as_str()) else {
                continue;
            };
            let user = rj.spec.user_id.as_str();
            let message = match w.reason {
                WaitReason::Paused => match (&inputs.paused, inputs.paused_users.get(user)) {
                    (Some(reason), _) => format!("waiting: paused: {}", one_line(reason)),
                    (None, reason) => format!(
                        "waiting: paused for user {user}: {}",
                        one_line(reason.map_or("", String::as_str))
                    ),
                },
                WaitReason::UserQuotaExceeded => match resolved.get(user) {
                    Some(r) => tiers::user_quota_message(
                        user,
                        admitted_of.get(user).copied().unwrap_or(0),
                        r,
                    ),
                    None => format!("waiting: user {user} has reached its running limit"),
                },
                WaitReason::ClusterQuotaExceeded => {
                    format!(
                        "waiting: all {} cluster slots are in use (MAX_CONCURRENT_JOBS)",
                        limits.global
                    )
                }
            };
            if let Err(e) = ctx.ensure_queued(rj, w.reason.as_str(), &message).await {
                warn!(job = %w.name, error = %e, "writing the queued status failed");
            }
        }

        // Gauges and dashboard counters from the same view.
        since = std::time::Instant::now();
        let mut per_user: BTreeMap<String, usize> = BTreeMap::new();
        for r in &running {
            *per_user.entry(r.user.clone()).or_default() += 1;
        }
        // Held-back jobs need a pass soon too (an entry that never shows up expires).
        self.waiting
            .store(!decision.waiting.is_empty() || held > 0, Ordering::Relaxed);
        ctx.metrics
            .set_queue(decision.waiting.len() as i64, running.len() as i64);
        let mut depth: BTreeMap<String, UserJobs> = BTreeMap::new();
        for (user, n) in &per_user {
            depth.entry(user.clone()).or_default().running = *n as i64;
        }
        for w in &decision.waiting {
            if let Some(rj) = by_name.get(w.name.as_str()) {
                depth.entry(rj.spec.user_id.clone()).or_default().queued += 1;
            }
        }
        // Unchanged in most passes; each update escapes and looks up every user's series.
        if state.user_jobs != depth {
            ctx.metrics.set_user_jobs(&depth);
            state.user_jobs = depth;
        }
        // Runner pods waiting for a node, as their RepoboxJobs say (see `scheduling`).
        let waiting_for_node = all
            .iter()
            .filter(|rj| {
                rj.phase() == RepoboxJobPhase::Starting
                    && rj
                        .status
                        .as_ref()
                        .and_then(|s| s.reason.as_deref())
                        .is_some_and(|r| {
                            r == reasons::WAITING_FOR_NODE || r == reasons::UNSCHEDULABLE
                        })
            })
            .count();
        ctx.metrics
            .set_pods_waiting_for_node(waiting_for_node as i64);
        computing += since.elapsed();
        if !state.swept {
            // Keys another leader published (or this one before a restart) are corrected too:
            // every user with a key and nothing admitted is set to 0.
            match ctx.outcomes.user_running_ids().await {
                Ok(users) => {
                    for user in users {
                        state.published.remove(&user);
                        per_user.entry(user).or_default();
                    }
                    state.swept = true;
                }
                Err(e) => warn!(error = %e, "listing the per-user running counters failed"),
            }
        }
        let known_users: Vec<String> = state.published.keys().cloned().collect();
        for user in known_users {
            per_user.entry(user).or_default();
        }
        for (user, count) in per_user {
            if state.published.get(&user) != Some(&count) {
                match ctx.outcomes.set_user_running(&user, count).await {
                    Ok(()) => {
                        state.published.insert(user, count);
                    }
                    Err(e) => warn!(error = %e, "updating the per-user running counter failed"),
                }
            }
        }
        Ok(computing)
    }
}

impl Dispatcher {
    /// Publishes each new unusable-limit problem once per user and value: a warning log, the counter, and a
    /// Warning Event on the user's oldest queued job (`kubectl get events` shows it). Users
    /// whose problem went away are forgotten, so a relapse is reported again.
    async fn report_problems(
        &self,
        ctx: &Context,
        state: &mut State,
        resolved: &BTreeMap<&str, tiers::Resolved>,
        queued: &[quota::Candidate],
        by_name: &HashMap<&str, &Arc<RepoboxJob>>,
    ) {
        // Users without queued jobs this pass were not resolved: what was reported stands.
        state
            .warned
            .retain(|user, problem| match resolved.get(user.as_str()) {
                Some(r) => r.problem.as_ref() == Some(problem),
                None => true,
            });
        if state.warned.len() > WARNED_CAP {
            state.warned.clear();
        }
        for (user, r) in resolved {
            let Some(problem) = &r.problem else {
                continue;
            };
            if state.warned.get(*user) == Some(problem) {
                continue;
            }
            state.warned.insert((*user).to_owned(), problem.clone());
            ctx.metrics.invalid_limit();
            let note = format!("{problem}; user {user} gets {} (plan {})", r.limit, r.plan);
            warn!(user = %user, problem = %problem, limit = r.limit, "unusable limit; using the fallback");
            let oldest = queued.iter().filter(|c| c.user == *user).min_by(|a, b| {
                a.stream_id
                    .cmp(&b.stream_id)
                    .then_with(|| a.name.cmp(&b.name))
            });
            if let Some(rj) = oldest.and_then(|c| by_name.get(c.name.as_str())) {
                ctx.publish(
                    rj,
                    Event {
                        type_: EventType::Warning,
                        reason: reasons::INVALID_LIMIT.into(),
                        note: Some(note),
                        action: "Admit".into(),
                        secondary: None,
                    },
                )
                .await;
            }
        }
    }
}

/// The least time between the end of a pass that computed for `computing` and the start of
/// the next.
fn pass_gap(computing: Duration) -> Duration {
    (computing * PASS_GAP_FACTOR).min(MAX_PASS_GAP)
}

/// Text from Redis for a status message: one line, bounded.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

/// The RepoboxJob a Job holds a slot for: its controller owner, else the RepoboxJob of the
/// same name (the builder names the Job after it).
fn slot_holder(job: &ObjectMeta) -> String {
    job.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "RepoboxJob")
        .map(|o| o.name.clone())
        .or_else(|| job.name.clone())
        .unwrap_or_default()
}

impl Dispatcher {
    /// Takes a job whose Job could not be created out of the overlay, so a pass decides on it
    /// again.
    async fn forget(&self, name: &str) {
        self.state.lock().await.overlay.remove(name);
    }

    /// On shutdown: waits (bounded) for the creates in flight, so no Job is created after the
    /// operator stopped; creates still waiting for a slot are dropped.
    async fn drain(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let all = CREATE_CONCURRENCY as u32;
        if tokio::time::timeout(DRAIN_TIMEOUT, self.creates.acquire_many(all))
            .await
            .is_err()
        {
            warn!("Job creates still in flight at shutdown");
        }
    }
}

impl Dispatcher {
    /// Creates the Job of an admitted RepoboxJob, then publishes the `Admitted` Event. A transient
    /// failure frees the slot and retries through a later pass; an invalid spec fails the job.
    async fn admit(self: Arc<Self>, ctx: Arc<Context>, rj: Arc<RepoboxJob>) {
        let name = rj.name_any();
        let result = {
            let Some(_slot) = self.wakeup.create_slot(&self.creates).await else {
                return; // never closed
            };
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            // Deleted or cancelled while waiting for a slot: the reconciler has handled it.
            let current = ctx
                .store
                .get(&ObjectRef::from_obj(rj.as_ref()))
                .or_else(|| self.arrivals.fresh(&name));
            if current.is_none_or(|c| {
                c.metadata.deletion_timestamp.is_some() || c.spec.cancel_requested()
            }) {
                self.forget(&name).await;
                self.poke();
                return;
            }
            ctx.create_job(&rj).await
        };
        match result {
            Ok(()) => {
                let waited = rj
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| jiff::Timestamp::now().duration_since(t.0).unsigned_abs())
                    .unwrap_or_default();
                ctx.metrics.job_admitted(waited);
                info!(job = %name, user = %rj.spec.user_id, waited_ms = waited.as_millis() as u64, "job admitted");
                // Informational: it waits while other jobs wait for their creates.
                self.wakeup.admissions_drained().await;
                let Ok(_slot) = self.events.acquire().await else {
                    return;
                };
                ctx.publish(
                    &rj,
                    Event {
                        type_: EventType::Normal,
                        reason: reasons::ADMITTED.into(),
                        note: Some(format!("quota slot granted; Job {name} created")),
                        action: "Admit".into(),
                        secondary: None,
                    },
                )
                .await;
            }
            // Permanent (an invalid spec, a Job the API server rejects): it can never run.
            Err(e) if e.category() == Category::Permanent => {
                self.forget(&name).await;
                ctx.fail_permanently(&rj, reasons::INVALID_SPEC, &e.to_string())
                    .await;
            }
            Err(e) => {
                warn!(job = %name, error = %e, "creating the Job failed; retrying");
                ctx.metrics.reconcile_failed(e.metric_label());
                self.forget(&name).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.poke();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::job_builder;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    #[test]
    fn passes_are_paced_by_their_cost_up_to_a_bound() {
        let ms = Duration::from_millis;
        assert_eq!(pass_gap(Duration::ZERO), Duration::ZERO);
        assert_eq!(
            pass_gap(Duration::from_micros(100)),
            Duration::from_micros(400)
        );
        assert_eq!(pass_gap(ms(2)), ms(8));
        // A pass computing for d leaves at least 4 d idle: at most a fifth of a core.
        let d = ms(3);
        assert!(d.as_secs_f64() / (d + pass_gap(d)).as_secs_f64() <= 0.2 + 1e-9);
        assert_eq!(pass_gap(ms(12)), ms(48));
        assert_eq!(pass_gap(ms(13)), MAX_PASS_GAP);
        assert_eq!(pass_gap(Duration::from_secs(5)), MAX_PASS_GAP);
    }

    fn job(name: &str, owners: Vec<OwnerReference>) -> Job {
        let mut job = Job::default();
        job.metadata.name = Some(name.into());
        job.metadata.owner_references = Some(owners);
        job
    }

    fn owner(kind: &str, name: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "repobox.dev/v1alpha1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: "u".into(),
            controller: Some(controller),
            ..Default::default()
        }
    }

    #[test]
    fn a_job_holds_the_slot_of_its_controlling_repobox_job() {
        let j = job(
            "job-x",
            vec![
                owner("ConfigMap", "other", true),
                owner("RepoboxJob", "not-controller", false),
                owner("RepoboxJob", "rbj-1", true),
            ],
        );
        assert_eq!(slot_holder(&j.metadata), "rbj-1");
        assert_eq!(slot_holder(&job("rbj-2", vec![]).metadata), "rbj-2");
    }

    #[test]
    fn built_jobs_map_back_to_their_repobox_job() {
        let mut rj = crate::run::intake::repobox_job(
            "Job@1",
            "user@example.com",
            "1-0",
            &HashMap::from([(
                "repoUrl".to_owned(),
                "https://github.com/a/b.git".to_owned(),
            )]),
        );
        rj.metadata.uid = Some("uid-1".into());
        rj.metadata.namespace = Some("jobs".into());
        let cfg = crate::config::tests::test_job_config(&[]);
        let built = job_builder::job_for(&rj, &cfg).unwrap();
        assert_eq!(slot_holder(&built.metadata), rj.name_any());
        // The label is not the user id: counting by it was the bug.
        assert_ne!(
            built.labels()[crate::model::labels::LABEL_USER],
            rj.spec.user_id
        );
    }
}
