//! Why a runner pod is not running yet, from its `PodScheduled` condition and the Events the
//! scheduler and the cluster autoscaler put on it.
//!
//! The cluster-autoscaler tells about each unschedulable pod it looked at: `TriggeredScaleUp`
//! (a node group grows for it: wait, a node is coming) or `NotTriggerScaleUp` (no group can
//! fit it, or the fitting groups are at their maximum: nothing is coming). Karpenter and
//! clusters without an autoscaler leave only the scheduler's `FailedScheduling`. The operator
//! shows which one applies in the RepoboxJob's reason, and fails a job the autoscaler has
//! given up on after a short grace instead of at the end of `PENDING_TIMEOUT_SECONDS`.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Event;

use crate::model::crd::reasons;

/// The cluster-autoscaler's Event reason: a scale-up was triggered for the pod.
pub const TRIGGERED_SCALE_UP: &str = "TriggeredScaleUp";
/// The cluster-autoscaler's Event reason: no scale-up can help the pod.
pub const NOT_TRIGGER_SCALE_UP: &str = "NotTriggerScaleUp";
/// The scheduler's Event reason: no node fits the pod now.
pub const FAILED_SCHEDULING: &str = "FailedScheduling";

/// An Event on the pod, reduced to what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    /// The Event's reason, e.g. [`FAILED_SCHEDULING`].
    pub reason: String,
    /// The Event's message.
    pub message: String,
    /// The first occurrence (repeated Events are aggregated into one object).
    pub first: Option<Timestamp>,
    /// The latest occurrence.
    pub last: Option<Timestamp>,
}

impl PodEvent {
    /// From a core/v1 Event, as written by `client-go`'s recorders (old style: first/last
    /// timestamps and a count) or by `events.k8s.io/v1` (an `eventTime` and a `series`).
    pub fn from_event(e: &Event) -> Self {
        let event_time = e.event_time.as_ref().map(|t| t.0);
        let first = e.first_timestamp.as_ref().map(|t| t.0).or(event_time);
        let last = e
            .series
            .as_ref()
            .and_then(|s| s.last_observed_time.as_ref())
            .map(|t| t.0)
            .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
            .or(first);
        PodEvent {
            reason: e.reason.clone().unwrap_or_default(),
            message: e.message.clone().unwrap_or_default(),
            first,
            last,
        }
    }
}

/// Where a pending runner pod stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// Scheduled (or not known to be unschedulable): nothing to say about nodes.
    NotForNode,
    /// The autoscaler is adding a node for the pod.
    ForNode {
        /// What the autoscaler said it is doing.
        message: String,
    },
    /// No node fits the pod now. `hopeless_since` is set when the autoscaler said that no
    /// scale-up can help (and has not triggered one since).
    Unschedulable {
        /// The scheduler's message, with the autoscaler's when it refused.
        message: String,
        /// Since when the autoscaler has said that no scale-up can help, if it has.
        hopeless_since: Option<Timestamp>,
    },
}

impl Waiting {
    /// The RepoboxJob reason while waiting, if the pod waits for a node.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Waiting::NotForNode => None,
            Waiting::ForNode { .. } => Some(reasons::WAITING_FOR_NODE),
            Waiting::Unschedulable { .. } => Some(reasons::UNSCHEDULABLE),
        }
    }

    /// The RepoboxJob message while waiting.
    pub fn message(&self) -> Option<&str> {
        match self {
            Waiting::NotForNode => None,
            Waiting::ForNode { message } | Waiting::Unschedulable { message, .. } => Some(message),
        }
    }

    /// The error to fail the job with once the autoscaler has said for longer than `grace`
    /// (at `now`) that no node will come.
    pub fn give_up(&self, now: Timestamp, grace: Duration) -> Option<String> {
        let Waiting::Unschedulable {
            message,
            hopeless_since: Some(since),
        } = self
        else {
            return None;
        };
        let waited = now.duration_since(*since);
        (waited.as_secs() >= 0 && waited.unsigned_abs() >= grace).then(|| {
            format!(
                "no node can run the job and the cluster autoscaler will not add one: {message}"
            )
        })
    }
}

/// Decides where the pod stands. `unschedulable` is the pod's `PodScheduled=False` reason and
/// message, if it has that condition; `events` are the Events on the pod in any order.
pub fn waiting(unschedulable: Option<&str>, events: &[PodEvent]) -> Waiting {
    let Some(scheduler) = unschedulable else {
        return Waiting::NotForNode;
    };
    let latest = |reason: &str| {
        events
            .iter()
            .filter(|e| e.reason == reason)
            .max_by_key(|e| e.last)
    };
    let triggered = latest(TRIGGERED_SCALE_UP);
    let refused = latest(NOT_TRIGGER_SCALE_UP);
    let scheduler_message = latest(FAILED_SCHEDULING)
        .map(|e| e.message.as_str())
        .filter(|m| !m.is_empty())
        .unwrap_or(scheduler);
    match (triggered, refused) {
        // The most recent word of the autoscaler counts: a scale-up triggered after a refusal
        // (a group was raised, a node freed) means a node is coming.
        (Some(t), r) if r.is_none_or(|r| t.last >= r.last) => Waiting::ForNode {
            message: format!(
                "waiting for a node the cluster autoscaler is adding ({})",
                t.message
            ),
        },
        (t, Some(r)) => Waiting::Unschedulable {
            message: format!("{scheduler_message}; {}", r.message),
            hopeless_since: [r.first, t.and_then(|t| t.last)]
                .into_iter()
                .flatten()
                .max(),
        },
        _ => Waiting::Unschedulable {
            message: scheduler_message.to_owned(),
            hopeless_since: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::EventSeries;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn ev(reason: &str, message: &str, first: i64, last: i64) -> PodEvent {
        PodEvent {
            reason: reason.into(),
            message: message.into(),
            first: Some(ts(first)),
            last: Some(ts(last)),
        }
    }

    const SCHED: &str = "Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.";

    #[test]
    fn a_scheduled_pod_does_not_wait_for_a_node() {
        let events = [ev(NOT_TRIGGER_SCALE_UP, "x", 0, 1)];
        assert_eq!(waiting(None, &events), Waiting::NotForNode);
        assert_eq!(Waiting::NotForNode.reason(), None);
        assert_eq!(Waiting::NotForNode.give_up(ts(999), Duration::ZERO), None);
    }

    #[test]
    fn without_an_autoscaler_the_scheduler_explains_and_the_job_waits_out_its_timeout() {
        let w = waiting(Some(SCHED), &[]);
        assert_eq!(
            w,
            Waiting::Unschedulable {
                message: SCHED.into(),
                hopeless_since: None
            }
        );
        assert_eq!(w.reason(), Some(reasons::UNSCHEDULABLE));
        assert_eq!(w.give_up(ts(100_000), Duration::ZERO), None);
        // The scheduler's latest event is more specific than the condition.
        let w = waiting(
            Some("Unschedulable"),
            &[
                ev(FAILED_SCHEDULING, "0/2 nodes: old", 0, 1),
                ev(FAILED_SCHEDULING, "0/3 nodes: new", 2, 5),
            ],
        );
        assert_eq!(w.message(), Some("0/3 nodes: new"));
    }

    #[test]
    fn a_triggered_scale_up_means_waiting_for_a_node_and_never_giving_up() {
        let events = [
            ev(FAILED_SCHEDULING, SCHED, 0, 0),
            ev(
                TRIGGERED_SCALE_UP,
                "pod triggered scale-up: [{pool-a 0->1 (max: 3)}]",
                1,
                1,
            ),
        ];
        let w = waiting(Some("Unschedulable"), &events);
        assert_eq!(w.reason(), Some(reasons::WAITING_FOR_NODE));
        assert_eq!(
            w.message(),
            Some(
                "waiting for a node the cluster autoscaler is adding (pod triggered scale-up: [{pool-a 0->1 (max: 3)}])"
            )
        );
        assert_eq!(w.give_up(ts(100_000), Duration::ZERO), None);
    }

    #[test]
    fn a_refusal_gives_up_after_the_grace_counted_from_its_first_occurrence() {
        let refusal = "pod didn't trigger scale-up: 1 max node group size reached";
        let events = [ev(NOT_TRIGGER_SCALE_UP, refusal, 10, 40)];
        let w = waiting(Some(SCHED), &events);
        assert_eq!(w.reason(), Some(reasons::UNSCHEDULABLE));
        assert_eq!(w.message(), Some(format!("{SCHED}; {refusal}").as_str()));
        let grace = Duration::from_secs(60);
        assert_eq!(w.give_up(ts(69), grace), None);
        let error = w.give_up(ts(70), grace).unwrap();
        assert_eq!(
            error,
            format!(
                "no node can run the job and the cluster autoscaler will not add one: {SCHED}; {refusal}"
            )
        );
        // A clock behind the event never gives up early.
        assert_eq!(w.give_up(ts(0), Duration::ZERO), None);
    }

    #[test]
    fn the_latest_word_of_the_autoscaler_counts() {
        let up = "pod triggered scale-up: [{pool 1->2 (max: 2)}]";
        let no = "pod didn't trigger scale-up: 1 max node group size reached";
        // Refused, then triggered: a node is coming.
        let w = waiting(
            Some(SCHED),
            &[
                ev(NOT_TRIGGER_SCALE_UP, no, 0, 5),
                ev(TRIGGERED_SCALE_UP, up, 6, 6),
            ],
        );
        assert_eq!(w.reason(), Some(reasons::WAITING_FOR_NODE));
        // Triggered, then refused (the group filled up meanwhile): the grace starts at the
        // last scale-up, not at an older first refusal.
        let w = waiting(
            Some(SCHED),
            &[
                ev(NOT_TRIGGER_SCALE_UP, no, 0, 20),
                ev(TRIGGERED_SCALE_UP, up, 6, 10),
            ],
        );
        assert_eq!(
            w,
            Waiting::Unschedulable {
                message: format!("{SCHED}; {no}"),
                hopeless_since: Some(ts(10)),
            }
        );
        // Same time: the scale-up wins (never fail while one may be in progress).
        let w = waiting(
            Some(SCHED),
            &[
                ev(NOT_TRIGGER_SCALE_UP, no, 3, 3),
                ev(TRIGGERED_SCALE_UP, up, 3, 3),
            ],
        );
        assert_eq!(w.reason(), Some(reasons::WAITING_FOR_NODE));
    }

    #[test]
    fn events_of_both_api_styles_are_read() {
        let old = Event {
            reason: Some(NOT_TRIGGER_SCALE_UP.into()),
            message: Some("m".into()),
            first_timestamp: Some(Time(ts(1))),
            last_timestamp: Some(Time(ts(9))),
            count: Some(4),
            ..Event::default()
        };
        assert_eq!(
            PodEvent::from_event(&old),
            ev(NOT_TRIGGER_SCALE_UP, "m", 1, 9)
        );
        let new = Event {
            reason: Some(FAILED_SCHEDULING.into()),
            message: Some("s".into()),
            event_time: Some(MicroTime(ts(2))),
            series: Some(EventSeries {
                count: Some(3),
                last_observed_time: Some(MicroTime(ts(7))),
            }),
            ..Event::default()
        };
        assert_eq!(PodEvent::from_event(&new), ev(FAILED_SCHEDULING, "s", 2, 7));
        let single = Event {
            reason: Some(TRIGGERED_SCALE_UP.into()),
            event_time: Some(MicroTime(ts(3))),
            ..Event::default()
        };
        assert_eq!(
            PodEvent::from_event(&single),
            ev(TRIGGERED_SCALE_UP, "", 3, 3)
        );
        assert_eq!(
            PodEvent::from_event(&Event::default()),
            PodEvent {
                reason: String::new(),
                message: String::new(),
                first: None,
                last: None
            }
        );
    }
}
