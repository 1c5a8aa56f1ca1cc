//! Arrivals: the stream entries the intake has read whose RepoboxJobs the cache does not show
//! yet, so the dispatcher keeps admission in stream order.
//!
//! The intake handles its batches concurrently, so the RepoboxJob of a later entry can reach
//! the API server, and the cache, before the one of an earlier entry. Admitting from the cache
//! alone would then let a user's second job take the slot their first job was owed (and a later
//! user take a cluster slot an earlier one was owed). The dispatcher therefore holds back every
//! queued job whose entry comes after the oldest entry still on its way ([`Arrivals::floor`]).
//!
//! An entry leaves when its RepoboxJob is in the cache, when it turned out to make none (a bad
//! or dead-lettered entry, or an error that leaves it pending for a later delivery), or after
//! [`HOLD_LIMIT`], so nothing can hold admission back for longer than that.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use repobox_contract::EntryId;
use tokio::time::Instant;
use tracing::warn;

use crate::run::context::Wakeup;

/// The longest an entry holds later ones back: well beyond a create plus a watch event on a
/// healthy API server, short enough that a lost update costs little.
pub const HOLD_LIMIT: Duration = Duration::from_secs(10);

/// One entry on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Arrival {
    /// The RepoboxJob's name, once it was created (or found to exist).
    name: Option<String>,
    /// When the intake read the entry.
    since: Instant,
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
                since: now,
            });
        }
    }

    /// The entry's RepoboxJob exists as `name`: it leaves once the cache shows it.
    pub fn created(&self, id: &str, name: &str) {
        if let Some(a) = self.lock().get_mut(&EntryId::parse_or_max(id)) {
            a.name = Some(name.to_owned());
        }
    }

    /// The entry made no RepoboxJob (bad, dead-lettered, or left pending): it holds nothing back.
    pub fn dropped(&self, id: &str) {
        if self.lock().remove(&EntryId::parse_or_max(id)).is_some() {
            self.wakeup.poke();
        }
    }

    /// The oldest entry still on its way, if any: queued jobs with later entries wait for it.
    /// `cached` says whether the cache shows a RepoboxJob name. Entries whose RepoboxJob is cached,
    /// or that were read more than [`HOLD_LIMIT`] before `now`, are forgotten here.
    pub fn floor(&self, cached: impl Fn(&str) -> bool, now: Instant) -> Option<EntryId> {
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
        map.keys().next().copied()
    }

    /// How many entries are on their way (for tests and the debug log).
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
    use super::*;

    fn id(s: &str) -> EntryId {
        EntryId::parse_or_max(s)
    }

    fn arrivals() -> Arrivals {
        Arrivals::new(Wakeup::default())
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_is_the_oldest_entry_on_its_way_in_numeric_order() {
        let a = arrivals();
        assert_eq!(a.floor(|_| false, Instant::now()), None);
        // "999-0" sorts after "1000-0" as a string; the floor is numeric.
        a.read(["1000-0", "999-0", "1000-1"]);
        assert_eq!(a.floor(|_| false, Instant::now()), Some(id("999-0")));
        a.dropped("999-0");
        assert_eq!(a.floor(|_| false, Instant::now()), Some(id("1000-0")));
        assert_eq!(a.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_created_entry_holds_until_the_cache_shows_its_job() {
        let a = arrivals();
        a.read(["5-0", "6-0"]);
        a.created("5-0", "job-a");
        // Created, not cached yet: it still holds "6-0" (and everything after it) back.
        assert_eq!(a.floor(|_| false, Instant::now()), Some(id("5-0")));
        // Another name in the cache changes nothing.
        assert_eq!(a.floor(|n| n == "job-b", Instant::now()), Some(id("5-0")));
        assert_eq!(a.floor(|n| n == "job-a", Instant::now()), Some(id("6-0")));
        // Not created yet: a cached job of the same name does not release it (no name known).
        assert_eq!(a.floor(|_| true, Instant::now()), Some(id("6-0")));
        a.created("6-0", "job-b");
        assert_eq!(a.floor(|_| true, Instant::now()), None);
        assert!(a.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_holds_at_most_the_hold_limit() {
        let a = arrivals();
        a.read(["5-0"]);
        tokio::time::advance(HOLD_LIMIT).await;
        assert_eq!(a.floor(|_| false, Instant::now()), Some(id("5-0")));
        a.read(["7-0"]);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(a.floor(|_| false, Instant::now()), Some(id("7-0")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_redelivery_keeps_its_first_read_time_and_unknown_ids_change_nothing() {
        let a = arrivals();
        a.read(["5-0"]);
        tokio::time::advance(HOLD_LIMIT).await;
        a.read(["5-0"]);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(a.floor(|_| false, Instant::now()), None);
        a.created("9-9", "never-read");
        a.dropped("9-9");
        assert!(a.is_empty());
    }

    #[tokio::test]
    async fn dropping_an_entry_wakes_the_dispatcher() {
        let wakeup = Wakeup::default();
        let a = Arrivals::new(wakeup.clone());
        a.read(["5-0"]);
        a.dropped("5-0");
        tokio::time::timeout(Duration::from_secs(5), wakeup.notified())
            .await
            .expect("the dispatcher was poked");
    }
}
