//! Infrastructure disruptions are retried, user failures are not.
//!
//! A runner pod lost to an eviction, a preemption, a node drain or a node shutdown (the pod's
//! `DisruptionTarget` condition, which the Job's pod failure policy turns into a failed Job at
//! once) did nothing wrong: the job runs again as a new attempt, in a Job of its own, keeping
//! its quota slot, a bounded number of times with a growing wait. Only while it is safe: once
//! the runner recorded the `pushing` step the remote may already hold the branch, and running
//! again could push twice, so the job fails with a message that says so.

use std::time::Duration;

use repobox_contract::record::step;

use crate::decide::status::Explained;
use crate::model::crd::reasons;

/// The longest wait before a retry, however many came before.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// `MAX_DISRUPTION_RETRIES` and `DISRUPTION_RETRY_BACKOFF_SECONDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `MAX_DISRUPTION_RETRIES`: how many times a disrupted job runs again.
    pub max_retries: u32,
    /// `DISRUPTION_RETRY_BACKOFF_SECONDS`: the first wait before a retry (it doubles, up to five
    /// minutes).
    pub backoff: Duration,
}

/// What kind of disruption, from the `DisruptionTarget` condition's reason (the metric label).
pub fn kind(disruption_reason: Option<&str>) -> &'static str {
    match disruption_reason {
        Some("EvictionByEvictionAPI") => "eviction",
        Some("PreemptionByScheduler" | "PreemptionByKubeScheduler") => "preemption",
        Some("TerminationByKubelet" | "DeletionByTaintManager" | "DeletionByPodGC") => {
            "node_shutdown"
        }
        _ => "other",
    }
}

/// What happened to the pod, in words, from the `DisruptionTarget` condition's reason.
pub fn describe(disruption_reason: Option<&str>) -> String {
    let reason = disruption_reason.unwrap_or("DisruptionTarget");
    let what = match kind(disruption_reason) {
        "eviction" => "evicted",
        "preemption" => "preempted",
        "node_shutdown" => "stopped with its node",
        _ => "evicted or preempted",
    };
    format!("{what} ({reason})")
}

/// The decision after a disruption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterDisruption {
    /// Run the job again.
    Retry {
        /// The attempt to run next.
        attempt: u32,
        /// How long to wait before its Job is created.
        delay: Duration,
        /// The RepoboxJob message and the line appended to the job's output.
        message: String,
    },
    /// Do not: the retries are used up, or the push may have started.
    Fail(Explained),
}

/// Decides what follows a disruption of `attempt` (1 for the first). `step` is what the runner
/// recorded before it was stopped; `what` says what happened, e.g. `evicted
/// (EvictionByEvictionAPI)`.
pub fn after_disruption(
    attempt: u32,
    policy: RetryPolicy,
    recorded_step: Option<&str>,
    what: &str,
) -> AfterDisruption {
    let attempt = attempt.max(1);
    if !step::retry_safe(recorded_step) {
        let at = recorded_step.unwrap_or_default();
        return AfterDisruption::Fail(Explained {
            reason: reasons::EVICTED,
            error: format!(
                "the runner pod was {what} during the {at} step, so the branch may have been \
                 pushed; the job is not run again to avoid pushing twice: check the branch, then \
                 submit the job again"
            ),
        });
    }
    let retries_done = attempt - 1;
    if retries_done >= policy.max_retries {
        let tries = if attempt == 1 {
            "no retries are allowed (MAX_DISRUPTION_RETRIES=0)".to_owned()
        } else {
            format!("after {attempt} attempts")
        };
        return AfterDisruption::Fail(Explained {
            reason: reasons::EVICTED,
            error: format!(
                "the runner pod was {what} before the job finished, {tries}; submit the job again"
            ),
        });
    }
    let factor = 1u32.checked_shl(retries_done).unwrap_or(u32::MAX);
    let delay = policy.backoff.saturating_mul(factor).min(MAX_BACKOFF);
    let next = attempt + 1;
    let total = policy.max_retries + 1;
    let during = recorded_step
        .filter(|s| !s.is_empty())
        .map(|s| format!(" during the {s} step"))
        .unwrap_or_default();
    AfterDisruption::Retry {
        attempt: next,
        delay,
        message: format!(
            "the runner pod was {what}{during}; running the job again (attempt {next} of \
             {total}) in {} s",
            delay.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_retries: 2,
        backoff: Duration::from_secs(10),
    };

    #[test]
    fn disruption_kinds() {
        assert_eq!(kind(Some("EvictionByEvictionAPI")), "eviction");
        assert_eq!(kind(Some("PreemptionByScheduler")), "preemption");
        assert_eq!(kind(Some("PreemptionByKubeScheduler")), "preemption");
        assert_eq!(kind(Some("TerminationByKubelet")), "node_shutdown");
        assert_eq!(kind(Some("DeletionByTaintManager")), "node_shutdown");
        assert_eq!(kind(Some("DeletionByPodGC")), "node_shutdown");
        assert_eq!(kind(Some("Something")), "other");
        assert_eq!(kind(None), "other");
    }

    #[test]
    fn disruptions_in_words() {
        assert_eq!(
            describe(Some("EvictionByEvictionAPI")),
            "evicted (EvictionByEvictionAPI)"
        );
        assert_eq!(
            describe(Some("PreemptionByScheduler")),
            "preempted (PreemptionByScheduler)"
        );
        assert_eq!(
            describe(Some("TerminationByKubelet")),
            "stopped with its node (TerminationByKubelet)"
        );
        assert_eq!(describe(None), "evicted or preempted (DisruptionTarget)");
    }

    #[test]
    fn retries_before_the_push_with_a_doubling_wait_then_gives_up() {
        for s in [
            None,
            Some(""),
            Some(step::CLONING),
            Some(step::AGENT),
            Some(step::COMMITTING),
        ] {
            assert!(
                matches!(
                    after_disruption(1, POLICY, s, "evicted"),
                    AfterDisruption::Retry { attempt: 2, .. }
                ),
                "{s:?}"
            );
        }
        assert_eq!(
            after_disruption(
                1,
                POLICY,
                Some(step::AGENT),
                "evicted (EvictionByEvictionAPI)"
            ),
            AfterDisruption::Retry {
                attempt: 2,
                delay: Duration::from_secs(10),
                message: "the runner pod was evicted (EvictionByEvictionAPI) during the agent \
                          step; running the job again (attempt 2 of 3) in 10 s"
                    .into(),
            }
        );
        assert_eq!(
            after_disruption(2, POLICY, None, "lost"),
            AfterDisruption::Retry {
                attempt: 3,
                delay: Duration::from_secs(20),
                message: "the runner pod was lost; running the job again (attempt 3 of 3) in 20 s"
                    .into(),
            }
        );
        assert_eq!(
            after_disruption(3, POLICY, None, "lost"),
            AfterDisruption::Fail(Explained {
                reason: reasons::EVICTED,
                error: "the runner pod was lost before the job finished, after 3 attempts; \
                        submit the job again"
                    .into(),
            })
        );
        // Attempt 0 (never written) counts as the first.
        assert!(matches!(
            after_disruption(0, POLICY, None, "lost"),
            AfterDisruption::Retry { attempt: 2, .. }
        ));
    }

    #[test]
    fn never_after_the_push_started() {
        for s in [step::PUSHING, "pull_request", "anything-new"] {
            let AfterDisruption::Fail(e) = after_disruption(1, POLICY, Some(s), "evicted") else {
                panic!("{s} must not be retried");
            };
            assert_eq!(e.reason, reasons::EVICTED);
            assert!(
                e.error.contains(&format!("during the {s} step")),
                "{}",
                e.error
            );
            assert!(e.error.contains("avoid pushing twice"));
        }
    }

    #[test]
    fn zero_retries_and_long_backoffs_are_bounded() {
        let none = RetryPolicy {
            max_retries: 0,
            backoff: Duration::from_secs(10),
        };
        let AfterDisruption::Fail(e) = after_disruption(1, none, None, "preempted") else {
            panic!("no retries allowed");
        };
        assert!(e.error.contains("MAX_DISRUPTION_RETRIES=0"), "{}", e.error);
        let slow = RetryPolicy {
            max_retries: 40,
            backoff: Duration::from_secs(200),
        };
        for attempt in [2, 10, 33, 39] {
            let AfterDisruption::Retry { delay, .. } = after_disruption(attempt, slow, None, "x")
            else {
                panic!("retry expected");
            };
            assert_eq!(delay, MAX_BACKOFF, "attempt {attempt}");
        }
    }
}
