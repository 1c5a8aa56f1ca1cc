//! Arrivals: the stream entries the intake has read whose RepoboxJobs the cache does not show
//! yet, so the dispatcher keeps admission in stream order.
//!
//! The intake handles its batches concurrently, so the RepoboxJob of a later entry can reach
//! the API server, and the cache, before the one of an earlier entry. Admitting from the cache
//! alone would then let a user's second job take the slot their first job was owed (and a later
//! user take a cluster slot an earlier one was owed). The dispatcher therefore holds back every
//! queued job whose entry comes after the oldest entry still on its way ([`Pending::floor`]).
//!
//! The RepoboxJob the intake just created is also handed over here ([`Arrivals::created`]), so
//! the dispatcher can admit it at once rather than one watch event later: on a busy API server
//! that hop is tens of milliseconds at the tail, on the path from XADD to the Job.
//!
//! An entry leaves when its RepoboxJob is in the cache, when it turned out to make none (a bad
//! or dead-lettered entry, or an error that leaves it pending for a later delivery), or after
//! [`HOLD_LIMIT`], so nothing can hold admission back for longer than that.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::ResourceExt;
use repobox_contract::EntryId;
use tokio::time::Instant;
use tracing::warn;

use crate::model::crd::RepoboxJob;
use crate::run::context::Wakeup;

/// The longest an entry holds later ones back: well beyond a create plus a watch event on a
/// healthy API server, short enough that a lost update costs little.
pub const HOLD_LIMIT: Duration = Duration::from_secs(10);

/// One entry on its way.
#[derive(Debug, Clone)]
struct Arrival {
    /// The RepoboxJob's name, once it was created (or found to exist).
    name: Option<String>,
    /// The RepoboxJob as the create returned it (not when it existed already).
    object: Option<Arc<RepoboxJob>>,
    /// When the intake read the entry.
    since: Instant,
}

/// What the dispatcher learns from the entries on their way ([`Arrivals::pending`]).
#[derive(Debug, Default)]
pub struct Pending {
    /// The oldest entry still on its way whose RepoboxJob is not known yet: queued jobs with
    /// later entries wait for it.
    pub floor: Option<EntryId>,
    /// RepoboxJobs just created that the cache does not show yet, oldest entry first.
    pub fresh: Vec<Arc<RepoboxJob>>,
}

/// See the module doc. Shared by the intake (which records) and the dispatcher (which reads).
pub struct Arrivals {
    on_the_way: Mutex<BTreeMap<EntryId, Arrival>>,
    wakeup: Wakeup,
}

impl Arrivals {
    /// Empty; `wakeup` asks the dispatcher for a pass when an entry leaves without a RepoboxJob.
    pub fn new(wakeup: Wakeup) -> Self {
        Self {
            on_the_way: Mutex::default(),
            wakeup,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<EntryId, Arrival>> {
        self.on_the_way.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries just read, before they are handled (a later read must not overtake them).
    pub fn read<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let now = Instant::now();
        let mut map = self.lock();
        for id in ids {
            map.entry(EntryId::parse_or_max(id)).or_insert(Arrival {
                name: None,
                object: None,
                since: now,
            });
        }
    }

    /// The entry's RepoboxJob was just created: the dispatcher may admit it before the cache
    /// shows it, and it leaves once the cache does.
    pub fn created(&self, id: &str, rj: RepoboxJob) {
        if let Some(a) = self.lock().get_mut(&EntryId::parse_or_max(id)) {
            a.name = Some(rj.name_any());
            a.object = Some(Arc::new(rj));
        } else {
            return;
        }
        self.wakeup.poke();
    }

    /// The entry's RepoboxJob exists as `name` (created before: a redelivery): it leaves once
    /// the cache shows it.
    pub fn exists(&self, id: &str, name: &str) {
        if let Some(a) = self.lock().get_mut(&EntryId::parse_or_max(id)) {
            a.name.get_or_insert_with(|| name.to_owned());
        }
    }

    /// The RepoboxJob `name` as its create returned it, while the cache does not show it.
    pub fn fresh(&self, name: &str) -> Option<Arc<RepoboxJob>> {
        self.lock()
            .values()
            .filter_map(|a| a.object.as_ref())
            .find(|rj| rj.metadata.name.as_deref() == Some(name))
            .cloned()
    }

    /// The entry made no RepoboxJob (bad, dead-lettered, or left pending): it holds nothing back.
    pub fn dropped(&self, id: &str) {
        if self.lock().remove(&EntryId::parse_or_max(id)).is_some() {
            self.wakeup.poke();
        }
    }

    /// The entries on their way, as the dispatcher needs them (see [`Pending`]). `cached`
    /// says whether the cache shows a RepoboxJob name. Entries whose RepoboxJob is cached, or
    /// that were read more than [`HOLD_LIMIT`] before `now`, are forgotten here.
    pub fn pending(&self, cached: impl Fn(&str) -> bool, now: Instant) -> Pending {
        let mut map = self.lock();
        map.retain(|id, a| {
            if a.name.as_deref().is_some_and(&cached) {
                return false;
            }
            let expired = now.saturating_duration_since(a.since) > HOLD_LIMIT;
            if expired {
                warn!(
                    entry = ?id,
                    job = a.name.as_deref().unwrap_or(""),
                    "a stream entry's RepoboxJob did not reach the cache in time; admitting later jobs anyway"
                );
            }
            !expired
        });
        Pending {
            floor: map
                .iter()
                .find(|(_, a)| a.object.is_none())
                .map(|(id, _)| *id),
            fresh: map.values().filter_map(|a| a.object.clone()).collect(),
        }
    }

    /// How many entries are on their way.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no entry is on its way.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn id(s: &str) -> EntryId {
        EntryId::parse_or_max(s)
    }

    fn arrivals() -> Arrivals {
        Arrivals::new(Wakeup::default())
    }

    /// The RepoboxJob of job `job_id` (entry `entry`) as the intake creates it.
    fn rj(job_id: &str, entry: &str) -> RepoboxJob {
        crate::run::intake::repobox_job(job_id, "alice", entry, &HashMap::new())
    }

    fn floor(a: &Arrivals, cached: impl Fn(&str) -> bool) -> Option<EntryId> {
        a.pending(cached, Instant::now()).floor
    }

    fn fresh(a: &Arrivals) -> Vec<String> {
        let p = a.pending(|_| false, Instant::now());
        p.fresh.iter().map(|rj| rj.name_any()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_is_the_oldest_entry_on_its_way_in_numeric_order() {
        let a = arrivals();
        assert_eq!(floor(&a, |_| false), None);
        // "999-0" sorts after "1000-0" as a string; the floor is numeric.
        a.read(["1000-0", "999-0", "1000-1"]);
        assert_eq!(floor(&a, |_| false), Some(id("999-0")));
        a.dropped("999-0");
        assert_eq!(floor(&a, |_| false), Some(id("1000-0")));
        assert_eq!(a.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_created_job_is_handed_over_until_the_cache_shows_it() {
        let a = arrivals();
        a.read(["5-0", "6-0", "7-0"]);
        let first = rj("job-a", "5-0");
        let name = first.name_any();
        a.created("5-0", first);
        // Known to the dispatcher now: it holds nothing back, "6-0" does.
        assert_eq!(floor(&a, |_| false), Some(id("6-0")));
        assert_eq!(fresh(&a), std::slice::from_ref(&name));
        assert!(a.fresh(&name).is_some());
        // A redelivery of an existing job: its name is known, its object is not, so it holds.
        a.exists("6-0", "job-b");
        assert_eq!(floor(&a, |_| false), Some(id("6-0")));
        assert_eq!(floor(&a, |n| n == "job-b"), Some(id("7-0")));
        // Once cached, the created one is no longer handed over.
        let p = a.pending(|n| n == name, Instant::now());
        assert!(p.fresh.is_empty());
        assert!(a.fresh(&name).is_none());
        assert_eq!(p.floor, Some(id("7-0")));
        a.dropped("7-0");
        assert!(a.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_jobs_come_oldest_entry_first() {
        let a = arrivals();
        a.read(["9-0", "10-0"]);
        let (late, early) = (rj("job-late", "10-0"), rj("job-early", "9-0"));
        let names = [early.name_any(), late.name_any()];
        a.created("10-0", late);
        a.created("9-0", early);
        assert_eq!(fresh(&a), names);
        assert_eq!(floor(&a, |_| false), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_holds_at_most_the_hold_limit() {
        let a = arrivals();
        a.read(["5-0"]);
        tokio::time::advance(HOLD_LIMIT).await;
        assert_eq!(floor(&a, |_| false), Some(id("5-0")));
        a.read(["7-0"]);
        a.created("7-0", rj("job-7", "7-0"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(floor(&a, |_| false), None);
        assert_eq!(fresh(&a).len(), 1);
        tokio::time::advance(HOLD_LIMIT).await;
        assert!(
            fresh(&a).is_empty(),
            "a fresh job the cache never shows is dropped too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_redelivery_keeps_its_first_read_time_and_unknown_ids_change_nothing() {
        let a = arrivals();
        a.read(["5-0"]);
        tokio::time::advance(HOLD_LIMIT).await;
        a.read(["5-0"]);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(floor(&a, |_| false), None);
        a.created("9-9", rj("never-read", "9-9"));
        a.exists("9-9", "never-read");
        a.dropped("9-9");
        assert!(a.is_empty());
    }

    #[tokio::test]
    async fn a_creation_or_a_drop_wakes_the_dispatcher() {
        let wakeup = Wakeup::default();
        let a = Arrivals::new(wakeup.clone());
        let woken = || futures::FutureExt::now_or_never(wakeup.notified()).is_some();
        a.read(["5-0", "6-0"]);
        assert!(!woken());
        a.created("5-0", rj("job-5", "5-0"));
        assert!(woken(), "poked on a creation");
        a.dropped("6-0");
        assert!(woken(), "poked on a drop");
        a.dropped("6-0");
        assert!(!woken(), "not for an entry it did not know");
    }
}
