//! Quota admission: which queued RepoboxJobs may start now.
//!
//! A pure function of the queue, the admitted jobs and the limits, so the controller can call it
//! on every pass (leader only) and act on the result, and so every rule is unit-tested here.
//!
//! Rules (the contract's "Quotas" section, plus fairness):
//!
//! * at most `per_user` jobs of one user and `global` jobs in all are admitted at once; jobs
//!   admitted in this decision count immediately;
//! * per-user FIFO: a user's jobs are admitted in stream order (`streamEntryId` compared
//!   numerically as `(milliseconds, sequence)`, then the object name), so a later job never starts
//!   before an earlier one of the same user;
//! * fairness: when the global limit is the bottleneck, users take turns. Admission proceeds in
//!   rounds; in each round every user with per-user headroom and queued work gets one slot. Within
//!   a round, users with fewer admitted jobs go first, then users whose oldest queued job is older
//!   (by the FIFO order above), then by user id (for determinism). One user's burst therefore
//!   cannot starve the others;
//! * work conserving: a job waits with [`WaitReason::ClusterQuotaExceeded`] only when the cluster
//!   is full, and with [`WaitReason::UserQuotaExceeded`] only when its user is full;
//! * a limit of 0 admits nothing (the configuration rejects 0, this is defence in depth);
//!   admitted counts above a limit (after the limit was lowered) admit nothing more for that
//!   user / the cluster, and nothing is ever stopped;
//! * per-pass [`Overrides`] (quota tiers and pause, read from Redis by the dispatcher each pass):
//!   a user's own running limit replaces `per_user` for that user; a paused user's jobs, or
//!   every job while admission is paused, wait with [`WaitReason::Paused`] and take no slot.
//!   Pausing never stops an admitted job.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use kube::ResourceExt;

use crate::model::crd::{RepoboxJob, RepoboxJobPhase, reasons};

/// A Redis stream entry id, ordered numerically: the contract's [`EntryId`], under the name
/// the admission code uses.
///
/// [`EntryId`]: repobox_contract::EntryId
use repobox_contract::EntryId;

/// A queued job waiting for admission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The RepoboxJob name (unique in the namespace).
    pub name: String,
    /// The owner, as in `spec.userId`.
    pub user: String,
    /// The job's position in the stream (`spec.streamEntryId`).
    pub stream_id: EntryId,
}

impl Candidate {
    /// A candidate from a RepoboxJob's name, user and `streamEntryId` string (malformed ids sort
    /// last, see [`EntryId::parse_or_max`]).
    pub fn new(name: impl Into<String>, user: impl Into<String>, stream_entry_id: &str) -> Self {
        Candidate {
            name: name.into(),
            user: user.into(),
            stream_id: EntryId::parse_or_max(stream_entry_id),
        }
    }

    /// The FIFO order: stream id, then name as a tiebreak.
    fn order(&self, other: &Self) -> Ordering {
        self.stream_id
            .cmp(&other.stream_id)
            .then_with(|| self.name.cmp(&other.name))
    }
}

/// An admitted job that has not finished (phase `Starting` or `Running`): it holds a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotHolder {
    /// The RepoboxJob name.
    pub name: String,
    /// The owner.
    pub user: String,
}

impl SlotHolder {
    /// An admitted job.
    pub fn new(name: impl Into<String>, user: impl Into<String>) -> Self {
        SlotHolder {
            name: name.into(),
            user: user.into(),
        }
    }
}

/// The quota limits (`MAX_JOBS_PER_USER`, `MAX_CONCURRENT_JOBS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum admitted jobs per user.
    pub per_user: usize,
    /// Maximum admitted jobs in all.
    pub global: usize,
}

/// What a pass knows beyond the static [`Limits`]: per-user limits (tiers) and pauses.
/// The default changes nothing, so [`decide`] is [`decide_with`] and `Overrides::default()`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Running limits of users whose limit is not `Limits::per_user` (from their plan or a
    /// per-user value in Redis).
    pub per_user: BTreeMap<String, usize>,
    /// Users whose queued jobs are held (`runner:paused_users`).
    pub paused_users: BTreeSet<String>,
    /// Admission is paused for everyone (`runner:paused`).
    pub paused: bool,
}

impl Overrides {
    /// The running limit of `user`.
    pub fn limit_of(&self, user: &str, limits: Limits) -> usize {
        self.per_user.get(user).copied().unwrap_or(limits.per_user)
    }

    /// Whether `user`'s queued jobs are held.
    pub fn holds(&self, user: &str) -> bool {
        self.paused || self.paused_users.contains(user)
    }
}

/// Why a job is still waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WaitReason {
    /// The user has as many jobs admitted as their limit allows.
    UserQuotaExceeded,
    /// The cluster has `global` jobs admitted.
    ClusterQuotaExceeded,
    /// Admission is paused, for everyone or for this user.
    Paused,
}

impl WaitReason {
    /// The reason string for `status.reason` and the `Admitted=False` condition.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::UserQuotaExceeded => reasons::USER_QUOTA_EXCEEDED,
            WaitReason::ClusterQuotaExceeded => reasons::CLUSTER_QUOTA_EXCEEDED,
            WaitReason::Paused => reasons::PAUSED,
        }
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job left waiting by a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// The RepoboxJob name.
    pub name: String,
    /// Which limit holds it back.
    pub reason: WaitReason,
}

/// The result of [`decide`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Names to admit now, in the order they were granted (create their Jobs in this order).
    pub admit: Vec<String>,
    /// Every other queued job with its reason, in stream order (so the index is a fair "position
    /// in queue" for a status message).
    pub waiting: Vec<Waiting>,
}

/// Splits RepoboxJobs into admission candidates and slot holders, by phase:
///
/// * `Starting` / `Running` jobs hold a slot ([`SlotHolder`]) until they reach a terminal phase,
///   even when cancelled or being deleted (their pod may still run);
/// * `Queued` jobs (including those without a status) are [`Candidate`]s, unless cancellation
///   was requested or they are being deleted: those must never start;
/// * terminal jobs are neither.
pub fn partition<'a>(
    jobs: impl IntoIterator<Item = &'a RepoboxJob>,
) -> (Vec<Candidate>, Vec<SlotHolder>) {
    let mut queued = Vec::new();
    let mut running = Vec::new();
    for rj in jobs {
        let phase = rj.phase();
        if phase.is_admitted() {
            running.push(SlotHolder::new(rj.name_any(), rj.spec.user_id.clone()));
        } else if phase == RepoboxJobPhase::Queued
            && !rj.spec.cancel_requested()
            && rj.metadata.deletion_timestamp.is_none()
        {
            queued.push(Candidate::new(
                rj.name_any(),
                rj.spec.user_id.clone(),
                &rj.spec.stream_entry_id,
            ));
        }
    }
    (queued, running)
}

/// Decides which queued jobs start now. See the module documentation for the rules.
///
/// `queued` may be in any order. Candidates whose name is also in `running` (the controller saw
/// them admitted) and repeated names are ignored: they appear in neither list of the result.
/// Every other candidate appears exactly once, in `admit` or in `waiting`.
///
/// ```
/// use repobox_operator::decide::quota::{Candidate, Limits, SlotHolder, decide};
///
/// let queued = [
///     Candidate::new("a-1", "alice", "100-0"),
///     Candidate::new("a-2", "alice", "101-0"),
///     Candidate::new("b-1", "bob", "102-0"),
/// ];
/// let running = [SlotHolder::new("a-0", "alice")];
/// let d = decide(&queued, &running, Limits { per_user: 2, global: 3 });
/// // alice has one slot left, bob one; the global limit allows two more. Users take turns,
/// // fewest running first: bob, then alice.
/// assert_eq!(d.admit, ["b-1", "a-1"]);
/// assert_eq!(d.waiting.len(), 1);
/// assert_eq!(d.waiting[0].name, "a-2");
/// ```
pub fn decide(queued: &[Candidate], running: &[SlotHolder], limits: Limits) -> Decision {
    decide_with(queued, running, limits, &Overrides::default())
}

/// [`decide`] with per-user limits and pauses (see [`Overrides`]).
pub fn decide_with(
    queued: &[Candidate],
    running: &[SlotHolder],
    limits: Limits,
    overrides: &Overrides,
) -> Decision {
    // Nothing queued, nothing to decide (most passes in steady load): skip the maps below.
    if queued.is_empty() {
        return Decision::default();
    }
    let running_names: BTreeSet<&str> = running.iter().map(|r| r.name.as_str()).collect();
    let mut admitted: BTreeMap<&str, usize> = BTreeMap::new();
    for r in running {
        *admitted.entry(r.user.as_str()).or_default() += 1;
    }
    let mut free = limits.global.saturating_sub(running.len());

    // The queue in FIFO order, without duplicates or already-admitted jobs.
    let mut ordered: Vec<&Candidate> = queued.iter().collect();
    ordered.sort_by(|a, b| a.order(b));
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    ordered.retain(|c| !running_names.contains(c.name.as_str()) && seen.insert(c.name.as_str()));

    // Per-user queues, each in FIFO order.
    // Held users take no turn at all.
    let mut queues: BTreeMap<&str, VecDeque<&Candidate>> = BTreeMap::new();
    for c in ordered.iter().filter(|c| !overrides.holds(&c.user)) {
        queues.entry(c.user.as_str()).or_default().push_back(c);
    }

    let mut admit: Vec<String> = Vec::new();
    let mut admitted_now: BTreeSet<&str> = BTreeSet::new();
    while free > 0 {
        // Users with headroom and queued work, in turn order for this round.
        let mut round: Vec<(usize, EntryId, &str, &str)> = queues
            .iter()
            .filter_map(|(user, q)| {
                let count = admitted.get(user).copied().unwrap_or(0);
                let head = q.front()?;
                (count < overrides.limit_of(user, limits)).then_some((
                    count,
                    head.stream_id,
                    head.name.as_str(),
                    *user,
                ))
            })
            .collect();
        if round.is_empty() {
            break;
        }
        round.sort();
        for (_, _, _, user) in round {
            if free == 0 {
                break;
            }
            let Some(job) = queues.get_mut(user).and_then(VecDeque::pop_front) else {
                continue;
            };
            *admitted.entry(user).or_default() += 1;
            free -= 1;
            admitted_now.insert(job.name.as_str());
            admit.push(job.name.clone());
        }
    }

    let waiting = ordered
        .iter()
        .filter(|c| !admitted_now.contains(c.name.as_str()))
        .map(|c| {
            let user_full = admitted.get(c.user.as_str()).copied().unwrap_or(0)
                >= overrides.limit_of(&c.user, limits);
            Waiting {
                name: c.name.clone(),
                reason: if overrides.holds(&c.user) {
                    WaitReason::Paused
                } else if user_full {
                    WaitReason::UserQuotaExceeded
                } else {
                    WaitReason::ClusterQuotaExceeded
                },
            }
        })
        .collect();

    Decision { admit, waiting }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn c(name: &str, user: &str, id: &str) -> Candidate {
        Candidate::new(name, user, id)
    }

    fn r(name: &str, user: &str) -> SlotHolder {
        SlotHolder::new(name, user)
    }

    fn limits(per_user: usize, global: usize) -> Limits {
        Limits { per_user, global }
    }

    fn reason_of(d: &Decision, name: &str) -> Option<WaitReason> {
        d.waiting.iter().find(|w| w.name == name).map(|w| w.reason)
    }

    #[test]
    fn empty_inputs() {
        assert_eq!(decide(&[], &[], limits(3, 10)), Decision::default());
        assert_eq!(
            decide(&[], &[r("a", "u")], limits(3, 10)),
            Decision::default()
        );
    }

    #[test]
    fn admits_within_limits() {
        let q = [c("a", "u1", "1-0"), c("b", "u2", "2-0")];
        let d = decide(&q, &[], limits(3, 10));
        assert_eq!(d.admit, ["a", "b"]);
        assert!(d.waiting.is_empty());
    }

    #[test]
    fn per_user_limit_counts_running_and_newly_admitted() {
        let q = [
            c("a", "u", "1-0"),
            c("b", "u", "2-0"),
            c("c", "u", "3-0"),
            c("d", "u", "4-0"),
        ];
        let d = decide(&q, &[r("x", "u")], limits(3, 10));
        assert_eq!(d.admit, ["a", "b"]);
        assert_eq!(
            d.waiting,
            vec![
                Waiting {
                    name: "c".into(),
                    reason: WaitReason::UserQuotaExceeded
                },
                Waiting {
                    name: "d".into(),
                    reason: WaitReason::UserQuotaExceeded
                },
            ]
        );
    }

    #[test]
    fn global_limit() {
        let q = [
            c("a", "u1", "1-0"),
            c("b", "u2", "2-0"),
            c("c", "u3", "3-0"),
        ];
        let d = decide(&q, &[r("x", "u4")], limits(3, 3));
        assert_eq!(d.admit, ["a", "b"]);
        assert_eq!(reason_of(&d, "c"), Some(WaitReason::ClusterQuotaExceeded));
    }

    #[test]
    fn per_user_fifo_orders_numerically_then_by_name() {
        // Given out of order, with ids that sort wrongly as strings, and a name tiebreak.
        let q = [
            c("late", "u", "1000-0"),
            c("early", "u", "999-0"),
            c("tie-b", "u", "5-1"),
            c("tie-a", "u", "5-1"),
        ];
        let d = decide(&q, &[], limits(2, 10));
        assert_eq!(d.admit, ["tie-a", "tie-b"]);
        let waiting: Vec<&str> = d.waiting.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(waiting, ["early", "late"]);
    }

    #[test]
    fn malformed_ids_go_last_for_their_user() {
        let q = [c("bad", "u", "oops"), c("good", "u", "99999999999999-0")];
        let d = decide(&q, &[], limits(1, 10));
        assert_eq!(d.admit, ["good"]);
        assert_eq!(reason_of(&d, "bad"), Some(WaitReason::UserQuotaExceeded));
    }

    #[test]
    fn round_robin_when_global_limit_binds() {
        // u1 has a burst of 5 older jobs; u2 and u3 each one newer job.
        let mut q: Vec<Candidate> = (0..5)
            .map(|i| c(&format!("u1-{i}"), "u1", &format!("{i}-0")))
            .collect();
        q.push(c("u2-0", "u2", "10-0"));
        q.push(c("u3-0", "u3", "11-0"));
        let d = decide(&q, &[], limits(10, 4));
        assert_eq!(d.admit, ["u1-0", "u2-0", "u3-0", "u1-1"]);
        assert_eq!(
            reason_of(&d, "u1-2"),
            Some(WaitReason::ClusterQuotaExceeded)
        );
    }

    #[test]
    fn users_with_fewer_admitted_go_first() {
        // u1 already runs 2; u2 none. Only one slot: u2 gets it even though u1's job is older.
        let q = [c("a", "u1", "1-0"), c("b", "u2", "2-0")];
        let d = decide(&q, &[r("x", "u1"), r("y", "u1")], limits(5, 3));
        assert_eq!(d.admit, ["b"]);
        assert_eq!(reason_of(&d, "a"), Some(WaitReason::ClusterQuotaExceeded));
    }

    #[test]
    fn ties_broken_by_oldest_queued_job_then_user() {
        let q = [c("b", "u2", "2-0"), c("a", "u1", "3-0")];
        let d = decide(&q, &[], limits(5, 1));
        assert_eq!(d.admit, ["b"]);
        // Equal ids and names differ: name then user order.
        let q = [c("same", "u2", "2-0"), c("same2", "u1", "2-0")];
        let d = decide(&q, &[], limits(5, 1));
        assert_eq!(d.admit, ["same"]);
    }

    #[test]
    fn rounds_follow_current_counts() {
        // u1 runs 1, u2 runs 0, 4 free slots, everyone has plenty queued.
        let mut q = Vec::new();
        for i in 0..5 {
            q.push(c(&format!("a{i}"), "u1", &format!("{i}-0")));
            q.push(c(&format!("b{i}"), "u2", &format!("{}-0", 100 + i)));
        }
        let d = decide(&q, &[r("x", "u1")], limits(10, 5));
        // Round 1: u2 (0 admitted) then u1 (1). Round 2: u2 (1) vs u1 (2): u2 first again.
        assert_eq!(d.admit, ["b0", "a0", "b1", "a1"]);
    }

    #[test]
    fn fairness_two_users_hundred_each() {
        let mut q = Vec::new();
        for i in 0..100 {
            q.push(c(&format!("a{i:03}"), "alice", &format!("{i}-0")));
            q.push(c(&format!("b{i:03}"), "bob", &format!("{}-0", 1000 + i)));
        }
        let d = decide(&q, &[], limits(10, 10));
        let alice = d.admit.iter().filter(|n| n.starts_with('a')).count();
        let bob = d.admit.iter().filter(|n| n.starts_with('b')).count();
        assert_eq!((alice, bob), (5, 5));
        assert_eq!(d.waiting.len(), 190);
        assert!(
            d.waiting
                .iter()
                .all(|w| w.reason == WaitReason::ClusterQuotaExceeded)
        );
    }

    #[test]
    fn zero_limits_admit_nothing() {
        let q = [c("a", "u1", "1-0"), c("b", "u2", "2-0")];
        let d = decide(&q, &[], limits(0, 10));
        assert!(d.admit.is_empty());
        assert!(
            d.waiting
                .iter()
                .all(|w| w.reason == WaitReason::UserQuotaExceeded)
        );
        let d = decide(&q, &[], limits(3, 0));
        assert!(d.admit.is_empty());
        assert!(
            d.waiting
                .iter()
                .all(|w| w.reason == WaitReason::ClusterQuotaExceeded)
        );
    }

    #[test]
    fn over_limit_after_lowering_admits_nothing_more() {
        let running: Vec<SlotHolder> = (0..5).map(|i| r(&format!("r{i}"), "u1")).collect();
        let q = [c("a", "u1", "1-0"), c("b", "u2", "2-0")];
        // Per-user limit lowered to 2 while u1 runs 5: u1 waits, u2 still admitted.
        let d = decide(&q, &running, limits(2, 10));
        assert_eq!(d.admit, ["b"]);
        assert_eq!(reason_of(&d, "a"), Some(WaitReason::UserQuotaExceeded));
        // Global limit lowered to 3 while 5 run: nothing admitted.
        let d = decide(&q, &running, limits(10, 3));
        assert!(d.admit.is_empty());
        assert_eq!(reason_of(&d, "a"), Some(WaitReason::ClusterQuotaExceeded));
        assert_eq!(reason_of(&d, "b"), Some(WaitReason::ClusterQuotaExceeded));
    }

    #[test]
    fn user_full_reason_wins_over_cluster_full() {
        // Both limits reached: a job whose user is full reports the user quota.
        let q = [c("a", "u1", "1-0"), c("b", "u2", "2-0")];
        let d = decide(&q, &[r("x", "u1")], limits(1, 1));
        assert_eq!(reason_of(&d, "a"), Some(WaitReason::UserQuotaExceeded));
        assert_eq!(reason_of(&d, "b"), Some(WaitReason::ClusterQuotaExceeded));
    }

    #[test]
    fn duplicates_and_already_running_are_ignored() {
        let q = [
            c("a", "u", "1-0"),
            c("a", "u", "1-0"),
            c("x", "u", "0-5"),
            c("b", "u", "2-0"),
        ];
        let d = decide(&q, &[r("x", "u")], limits(3, 10));
        assert_eq!(d.admit, ["a", "b"]);
        assert!(d.waiting.is_empty());
    }

    #[test]
    fn waiting_is_in_stream_order() {
        let q = [
            c("c", "u2", "3-0"),
            c("a", "u1", "1-0"),
            c("b", "u1", "2-0"),
            c("d", "u3", "4-0"),
        ];
        let d = decide(&q, &[], limits(1, 1));
        assert_eq!(d.admit, ["a"]);
        let names: Vec<&str> = d.waiting.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "d"]);
        assert_eq!(reason_of(&d, "b"), Some(WaitReason::UserQuotaExceeded));
    }

    #[test]
    fn contract_defaults_three_per_user_ten_total() {
        let mut q = Vec::new();
        for u in 0..5 {
            for i in 0..4 {
                q.push(c(
                    &format!("u{u}-{i}"),
                    &format!("u{u}"),
                    &format!("{i}-{u}"),
                ));
            }
        }
        let d = decide(&q, &[], limits(3, 10));
        assert_eq!(d.admit.len(), 10);
        // Two full rounds of 5 users: every user has exactly 2.
        for u in 0..5 {
            let n = d
                .admit
                .iter()
                .filter(|n| n.starts_with(&format!("u{u}-")))
                .count();
            assert_eq!(n, 2, "u{u}");
        }
    }

    #[test]
    fn partition_by_phase() {
        use crate::model::crd::{RepoboxJobSpec, RepoboxJobStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let job = |name: &str, phase: Option<RepoboxJobPhase>, cancel: bool, deleting: bool| {
            let mut rj = RepoboxJob::new(
                name,
                RepoboxJobSpec {
                    job_id: name.into(),
                    user_id: format!("user-{name}"),
                    repo: String::new(),
                    stream_entry_id: "7-1".into(),
                    provider_id: None,
                    base_branch: None,
                    timeout_seconds: None,
                    cancel: cancel.then_some(true),
                    plan: None,
                },
            );
            rj.status = phase.map(|p| RepoboxJobStatus {
                phase: Some(p),
                ..RepoboxJobStatus::default()
            });
            if deleting {
                rj.metadata.deletion_timestamp =
                    Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
            }
            rj
        };
        use RepoboxJobPhase::*;
        let jobs = [
            job("fresh", None, false, false),
            job("queued", Some(Queued), false, false),
            job("queued-cancelled", Some(Queued), true, false),
            job("queued-deleting", Some(Queued), false, true),
            job("starting", Some(Starting), false, false),
            job("running-cancelled", Some(Running), true, false),
            job("running-deleting", Some(Running), false, true),
            job("succeeded", Some(Succeeded), false, false),
            job("failed", Some(Failed), false, false),
            job("cancelled", Some(Cancelled), true, false),
        ];
        let (q, r) = partition(&jobs);
        assert_eq!(
            q,
            vec![
                c("fresh", "user-fresh", "7-1"),
                c("queued", "user-queued", "7-1")
            ]
        );
        assert_eq!(q[0].stream_id, EntryId { ms: 7, seq: 1 });
        let running: Vec<&str> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            running,
            ["starting", "running-cancelled", "running-deleting"]
        );
        assert_eq!(r[0].user, "user-starting");
    }

    fn overrides(per_user: &[(&str, usize)], paused_users: &[&str], paused: bool) -> Overrides {
        Overrides {
            per_user: per_user.iter().map(|(u, n)| (u.to_string(), *n)).collect(),
            paused_users: paused_users.iter().map(|u| u.to_string()).collect(),
            paused,
        }
    }

    #[test]
    fn per_user_limits_replace_the_default_for_their_user() {
        // free (1) and pro (3) users with 4 jobs each; default 2.
        let mut q = Vec::new();
        for i in 0..4 {
            q.push(c(&format!("f{i}"), "free", &format!("{i}-0")));
            q.push(c(&format!("p{i}"), "pro", &format!("{i}-1")));
            q.push(c(&format!("d{i}"), "dflt", &format!("{i}-2")));
        }
        let ov = overrides(&[("free", 1), ("pro", 3)], &[], false);
        let d = decide_with(&q, &[], limits(2, 100), &ov);
        let count = |p: char| d.admit.iter().filter(|n| n.starts_with(p)).count();
        assert_eq!((count('f'), count('p'), count('d')), (1, 3, 2));
        assert_eq!(reason_of(&d, "f1"), Some(WaitReason::UserQuotaExceeded));
        assert_eq!(reason_of(&d, "p3"), Some(WaitReason::UserQuotaExceeded));
        // Running jobs count against the user's own limit.
        let d = decide_with(&q, &[r("x", "pro"), r("y", "pro")], limits(2, 100), &ov);
        assert_eq!(d.admit.iter().filter(|n| n.starts_with('p')).count(), 1);
        // An override of 0 holds the user's jobs with the quota reason (defence in depth).
        let d = decide_with(
            &q,
            &[],
            limits(2, 100),
            &overrides(&[("free", 0)], &[], false),
        );
        assert_eq!(reason_of(&d, "f0"), Some(WaitReason::UserQuotaExceeded));
    }

    #[test]
    fn global_pause_admits_nothing_and_says_paused() {
        let q = [c("a", "u1", "1-0"), c("b", "u2", "2-0")];
        let d = decide_with(
            &q,
            &[r("x", "u3")],
            limits(3, 10),
            &overrides(&[], &[], true),
        );
        assert!(d.admit.is_empty());
        assert_eq!(d.waiting.len(), 2);
        assert!(d.waiting.iter().all(|w| w.reason == WaitReason::Paused));
    }

    #[test]
    fn paused_users_wait_and_take_no_slot() {
        let q = [
            c("a", "held", "1-0"),
            c("b", "other", "2-0"),
            c("c", "other", "3-0"),
        ];
        let d = decide_with(&q, &[], limits(3, 2), &overrides(&[], &["held"], false));
        // The held user's older job does not use one of the two cluster slots.
        assert_eq!(d.admit, ["b", "c"]);
        assert_eq!(reason_of(&d, "a"), Some(WaitReason::Paused));
        // Paused wins over a full user or cluster.
        let d = decide_with(
            &q,
            &[r("x", "held")],
            limits(1, 1),
            &overrides(&[], &["held"], false),
        );
        assert_eq!(reason_of(&d, "a"), Some(WaitReason::Paused));
        assert_eq!(reason_of(&d, "b"), Some(WaitReason::ClusterQuotaExceeded));
    }

    #[test]
    fn default_overrides_change_nothing() {
        let q = [
            c("a", "u1", "1-0"),
            c("b", "u1", "2-0"),
            c("c", "u2", "3-0"),
        ];
        let running = [r("x", "u1")];
        assert_eq!(
            decide(&q, &running, limits(2, 3)),
            decide_with(&q, &running, limits(2, 3), &Overrides::default())
        );
        let ov = overrides(&[("u1", 5)], &["u2"], false);
        assert_eq!(ov.limit_of("u1", limits(2, 3)), 5);
        assert_eq!(ov.limit_of("u9", limits(2, 3)), 2);
        assert!(ov.holds("u2") && !ov.holds("u1"));
        assert!(overrides(&[], &[], true).holds("anyone"));
    }

    #[test]
    fn wait_reason_strings() {
        assert_eq!(WaitReason::Paused.as_str(), "Paused");
        assert_eq!(WaitReason::UserQuotaExceeded.as_str(), "UserQuotaExceeded");
        assert_eq!(
            WaitReason::ClusterQuotaExceeded.to_string(),
            "ClusterQuotaExceeded"
        );
    }

    /// Checks every invariant of a decision; used by the property tests.
    fn check_invariants(
        queued: &[Candidate],
        running: &[SlotHolder],
        l: Limits,
        d: &Decision,
    ) -> Result<(), TestCaseError> {
        check_invariants_with(queued, running, l, &Overrides::default(), d)
    }

    fn check_invariants_with(
        queued: &[Candidate],
        running: &[SlotHolder],
        l: Limits,
        ov: &Overrides,
        d: &Decision,
    ) -> Result<(), TestCaseError> {
        let by_name: HashMap<&str, &Candidate> =
            queued.iter().map(|c| (c.name.as_str(), c)).collect();
        let mut count: HashMap<&str, usize> = HashMap::new();
        for r in running {
            *count.entry(r.user.as_str()).or_default() += 1;
        }
        let before = count.clone();
        // Every admitted job was queued, at most once.
        let mut seen = BTreeSet::new();
        for n in &d.admit {
            prop_assert!(by_name.contains_key(n.as_str()));
            prop_assert!(seen.insert(n.clone()), "admitted twice: {}", n);
            prop_assert!(
                !ov.holds(&by_name[n.as_str()].user),
                "held user admitted: {}",
                n
            );
            *count.entry(by_name[n.as_str()].user.as_str()).or_default() += 1;
        }
        // Limits: nothing admitted beyond them (counts already over a limit stay as they were).
        for (user, n) in &count {
            let was = before.get(user).copied().unwrap_or(0);
            prop_assert!(
                *n <= ov.limit_of(user, l).max(was),
                "user {} has {}",
                user,
                n
            );
        }
        let total = running.len() + d.admit.len();
        prop_assert!(total <= l.global.max(running.len()));
        // Every queued job is either admitted or waiting, exactly once.
        prop_assert_eq!(d.admit.len() + d.waiting.len(), by_name.len());
        for w in &d.waiting {
            prop_assert!(!seen.contains(&w.name));
            let user = by_name[w.name.as_str()].user.as_str();
            let n = count.get(user).copied().unwrap_or(0);
            let limit = ov.limit_of(user, l);
            match w.reason {
                WaitReason::Paused => prop_assert!(ov.holds(user)),
                WaitReason::UserQuotaExceeded => {
                    prop_assert!(!ov.holds(user));
                    prop_assert!(n >= limit);
                }
                WaitReason::ClusterQuotaExceeded => {
                    prop_assert!(!ov.holds(user));
                    prop_assert!(n < limit);
                    prop_assert!(total >= l.global, "work conserving");
                }
            }
        }
        // Per-user FIFO: every admitted job is older than every waiting job of the same user.
        for w in &d.waiting {
            let wc = by_name[w.name.as_str()];
            for a in &d.admit {
                let ac = by_name[a.as_str()];
                if ac.user == wc.user {
                    prop_assert!(
                        ac.order(wc) == Ordering::Less,
                        "{} admitted before older {}",
                        a,
                        w.name
                    );
                }
            }
        }
        // Admission order within a user is FIFO too.
        let mut last: HashMap<&str, &Candidate> = HashMap::new();
        for a in &d.admit {
            let ac = by_name[a.as_str()];
            if let Some(prev) = last.insert(ac.user.as_str(), ac) {
                prop_assert!(prev.order(ac) == Ordering::Less);
            }
        }
        Ok(())
    }

    fn scenario() -> impl Strategy<Value = (Vec<Candidate>, Vec<SlotHolder>, Limits)> {
        let queued = prop::collection::vec((0u8..6, 0u64..50, 0u64..3), 0..60).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (u, ms, seq))| {
                    c(
                        &format!("q{i}"),
                        &format!("user{u}"),
                        &format!("{ms}-{seq}"),
                    )
                })
                .collect::<Vec<_>>()
        });
        let running = prop::collection::vec(0u8..6, 0..15).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, u)| r(&format!("r{i}"), &format!("user{u}")))
                .collect::<Vec<_>>()
        });
        (queued, running, 0usize..6, 0usize..15)
            .prop_map(|(q, r, per_user, global)| (q, r, Limits { per_user, global }))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn invariants_hold((queued, running, l) in scenario()) {
            let d = decide(&queued, &running, l);
            check_invariants(&queued, &running, l, &d)?;
        }

        #[test]
        fn invariants_hold_with_overrides(
            (queued, running, l) in scenario(),
            user_limits in prop::collection::btree_map(0u8..6, 0usize..6, 0..6),
            held in prop::collection::btree_set(0u8..6, 0..3),
            paused in prop::bool::weighted(0.1),
        ) {
            let ov = Overrides {
                per_user: user_limits.into_iter().map(|(u, n)| (format!("user{u}"), n)).collect(),
                paused_users: held.into_iter().map(|u| format!("user{u}")).collect(),
                paused,
            };
            let d = decide_with(&queued, &running, l, &ov);
            check_invariants_with(&queued, &running, l, &ov, &d)?;
            if paused {
                prop_assert!(d.admit.is_empty());
            }
        }

        #[test]
        fn deterministic_and_order_independent((queued, running, l) in scenario(), seed in any::<u64>()) {
            let d = decide(&queued, &running, l);
            prop_assert_eq!(&d, &decide(&queued, &running, l));
            // Shuffling the input does not change the decision.
            let mut shuffled = queued.clone();
            let n = shuffled.len();
            if n > 1 {
                let mut s = seed;
                for i in (1..n).rev() {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let j = (s >> 33) as usize % (i + 1);
                    shuffled.swap(i, j);
                }
            }
            prop_assert_eq!(&d, &decide(&shuffled, &running, l));
        }

        #[test]
        fn fairness_with_equal_bursts(users in 2usize..6, per_user in 1usize..10, global in 1usize..30) {
            let mut q = Vec::new();
            for u in 0..users {
                for i in 0..50u64 {
                    // Older users' jobs all come first: a burst each.
                    q.push(c(&format!("u{u}-{i}"), &format!("u{u}"), &format!("{}-0", u as u64 * 1000 + i)));
                }
            }
            let d = decide(&q, &[], Limits { per_user, global });
            let counts: Vec<usize> = (0..users)
                .map(|u| d.admit.iter().filter(|n| n.starts_with(&format!("u{u}-"))).count())
                .collect();
            let max = counts.iter().copied().max().unwrap_or(0);
            let min = counts.iter().copied().min().unwrap_or(0);
            prop_assert!(max - min <= 1, "{:?}", counts);
            prop_assert_eq!(d.admit.len(), global.min(users * per_user));
        }
    }
}
