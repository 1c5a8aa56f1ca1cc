//! Pure status derivation: what a batch/v1 Job (and, for failures, its pod) says about a run,
//! how a failure is explained to the user, and the RepoboxJob status for a phase.
//!
//! Timestamps come in as arguments and are only used for *new* transitions, so computing the
//! same status twice gives the same object and the controller never writes status in a loop.

use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::model::crd::{
    RepoboxJob, RepoboxJobPhase, RepoboxJobStatus, condition_types, duration_between,
    new_condition, reasons, set_condition,
};

/// What a Job says about its run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Created; its pod is not running (yet).
    Pending,
    /// Its pod runs and is ready.
    Running,
    /// The `Complete` condition is true: the runner exited 0.
    Succeeded,
    /// The `Failed` condition is true, with the job controller's reason and message.
    Failed {
        /// The `Failed` condition's reason, e.g. `DeadlineExceeded`.
        reason: String,
        /// The `Failed` condition's message.
        message: String,
    },
}

/// Reads the Job's terminal conditions (`Complete`/`Failed`: both 1.28 and newer write them;
/// the 1.31+ interim conditions `SuccessCriteriaMet`/`FailureTarget` are ignored so the pod
/// has terminated when we act) and otherwise its `ready` count.
pub fn job_state(job: &Job) -> JobState {
    job_state_of(job.status.as_ref())
}

/// [`job_state`] from the Job's status alone.
pub fn job_state_of(status: Option<&JobStatus>) -> JobState {
    let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or(&[]);
    for c in conditions {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" => return JobState::Succeeded,
            "Failed" => {
                return JobState::Failed {
                    reason: c.reason.clone().unwrap_or_default(),
                    message: c.message.clone().unwrap_or_default(),
                };
            }
            _ => {}
        }
    }
    if status.and_then(|s| s.ready).unwrap_or(0) > 0 {
        JobState::Running
    } else {
        JobState::Pending
    }
}

/// The phase a running Job shows for an admitted RepoboxJob in `current`, or `None` to keep
/// the current one. Phases never go backwards: between the pod's exit and the Job's terminal
/// condition the Job reports no ready pod, and a `Running` job must not look `Starting` again.
pub fn progress_phase(current: RepoboxJobPhase, state: &JobState) -> Option<RepoboxJobPhase> {
    let next = match state {
        JobState::Pending => RepoboxJobPhase::Starting,
        JobState::Running => RepoboxJobPhase::Running,
        JobState::Succeeded | JobState::Failed { .. } => return None,
    };
    if current.is_terminal() || current > next {
        None
    } else {
        Some(next)
    }
}

/// The facts about a runner pod that explain a failure or a long wait.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// `terminated.reason` of the runner container, e.g. `OOMKilled`, `Error`.
    pub terminated_reason: Option<String>,
    /// `terminated.exitCode` of the runner container.
    pub exit_code: Option<i32>,
    /// `waiting.reason`, e.g. `ImagePullBackOff`, `ErrImagePull`, `CreateContainerConfigError`.
    pub waiting_reason: Option<String>,
    /// The `PodScheduled=False` reason and message, e.g. `Unschedulable`.
    pub unschedulable: Option<String>,
    /// A `DisruptionTarget=True` condition's reason (eviction, preemption, node drain).
    pub disruption: Option<String>,
}

/// Reads a runner pod's status into [`PodFacts`].
pub fn pod_facts(pod: &Pod) -> PodFacts {
    let mut facts = PodFacts::default();
    let Some(status) = pod.status.as_ref() else {
        return facts;
    };
    for c in status.conditions.as_deref().unwrap_or(&[]) {
        if c.type_ == "PodScheduled" && c.status == "False" {
            facts.unschedulable = Some(match (&c.reason, &c.message) {
                (Some(r), Some(m)) => format!("{r}: {m}"),
                (Some(r), None) => r.clone(),
                (None, Some(m)) => m.clone(),
                (None, None) => "Unschedulable".to_owned(),
            });
        }
        if c.type_ == "DisruptionTarget" && c.status == "True" {
            facts.disruption = Some(
                c.reason
                    .clone()
                    .unwrap_or_else(|| "DisruptionTarget".into()),
            );
        }
    }
    // The runner container's exit decides; an agent container killed for memory explains the
    // failure the runner then reports, and any container stuck waiting (an agent image that
    // cannot be pulled) explains a pod that never runs.
    let mut oom_elsewhere = false;
    for cs in status.container_statuses.as_deref().unwrap_or(&[]) {
        let Some(state) = cs.state.as_ref() else {
            continue;
        };
        let is_runner = cs.name == crate::model::pod_layout::CONTAINER_NAME;
        if let Some(t) = &state.terminated {
            if is_runner {
                facts.terminated_reason = t.reason.clone();
                facts.exit_code = Some(t.exit_code);
            } else if t.reason.as_deref() == Some("OOMKilled") {
                oom_elsewhere = true;
            }
        }
        if let Some(w) = &state.waiting
            && (is_runner || facts.waiting_reason.is_none())
        {
            facts.waiting_reason = w.reason.clone();
        }
    }
    if oom_elsewhere && facts.terminated_reason.as_deref() != Some("OOMKilled") {
        facts.terminated_reason = Some("OOMKilled".into());
    }
    facts
}

/// How long a pod waited for a node after its Job was created (`PodScheduled` turning true),
/// and from then until `now`, when it is seen running. `None` where a time is unknown or the
/// clocks disagree.
pub fn start_times(
    pod: &Pod,
    job_created: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) -> (Option<std::time::Duration>, Option<std::time::Duration>) {
    let scheduled = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or(&[])
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0);
    let between = |from: Option<jiff::Timestamp>, to: Option<jiff::Timestamp>| {
        let d = to?.duration_since(from?);
        (!d.is_negative()).then(|| d.unsigned_abs())
    };
    (
        between(job_created, scheduled),
        between(scheduled, Some(now)),
    )
}

/// A failure the executor could not record itself: the RepoboxJob reason and the one-line
/// `error` for the job record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explained {
    /// The RepoboxJob reason ([`crate::model::crd::reasons`]).
    pub reason: &'static str,
    /// The job record's one-line `error`.
    pub error: String,
}

/// Explains a failed Job in the user's terms.
pub fn explain_job_failure(
    job_reason: &str,
    job_message: &str,
    timeout_seconds: i64,
    pod: Option<&PodFacts>,
) -> Explained {
    if job_reason == "DeadlineExceeded" {
        return Explained {
            reason: reasons::DEADLINE_EXCEEDED,
            error: format!("timed out after {timeout_seconds} s"),
        };
    }
    let disrupted = pod.and_then(|p| p.disruption.as_deref());
    if (job_reason == "PodFailurePolicy" && job_message.contains("DisruptionTarget"))
        || disrupted.is_some()
    {
        let why = disrupted.map(|d| format!(" ({d})")).unwrap_or_default();
        return Explained {
            reason: reasons::EVICTED,
            error: format!(
                "the runner pod was evicted or preempted before the job finished{why}; submit the job again"
            ),
        };
    }
    if let Some(p) = pod {
        if p.terminated_reason.as_deref() == Some("OOMKilled") {
            return Explained {
                reason: reasons::OOM_KILLED,
                error: "the runner ran out of memory (OOMKilled); the runner memory limit is too low for this repository".into(),
            };
        }
        if let Some(code) = p.exit_code {
            return Explained {
                reason: reasons::JOB_FAILED,
                error: format!("the job runner exited with code {code} without recording a result"),
            };
        }
    }
    Explained {
        reason: reasons::JOB_FAILED,
        error: if job_message.is_empty() {
            format!("the Job failed ({job_reason})")
        } else {
            format!("the Job failed ({job_reason}): {job_message}")
        },
    }
}

/// Explains a pod that has been pending longer than allowed.
pub fn explain_pending(pending_seconds: u64, pod: Option<&PodFacts>) -> Explained {
    match pod {
        Some(PodFacts {
            waiting_reason: Some(w),
            ..
        }) if w.contains("ImagePull") || w == "ErrImageNeverPull" || w == "InvalidImageName" => {
            Explained {
                reason: reasons::PENDING_TOO_LONG,
                error: format!(
                    "the runner image could not be pulled ({w}) within {pending_seconds} s"
                ),
            }
        }
        Some(PodFacts {
            unschedulable: Some(u),
            ..
        }) => Explained {
            reason: reasons::UNSCHEDULABLE,
            error: format!("no node could run the job within {pending_seconds} s ({u})"),
        },
        Some(PodFacts {
            waiting_reason: Some(w),
            ..
        }) => Explained {
            reason: reasons::PENDING_TOO_LONG,
            error: format!("the runner did not start within {pending_seconds} s ({w})"),
        },
        _ => Explained {
            reason: reasons::PENDING_TOO_LONG,
            error: format!("the runner did not start within {pending_seconds} s"),
        },
    }
}

/// Fields a phase change may carry besides phase, reason and message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// `jobName`: the Job of the current attempt, once created.
    pub job_name: Option<String>,
    /// When the job was admitted (its Job's creation); `now` when unknown.
    pub start_time: Option<Time>,
    /// `branch`: what the executor pushed.
    pub branch: Option<String>,
    /// `commitSha`: the pushed commit.
    pub commit_sha: Option<String>,
    /// A new attempt (see [`crate::decide::retry`]).
    pub attempt: Option<u32>,
    /// When the new attempt's Job is created.
    pub next_attempt_time: Option<Time>,
    /// The pull / merge request step's outcome (`prUrl`, `prNumber`, `prError`).
    pub pr_url: Option<String>,
    /// `prNumber`.
    pub pr_number: Option<i64>,
    /// `prError`.
    pub pr_error: Option<String>,
}

/// The status a RepoboxJob should have in `phase`, built from its current status so that
/// unchanged conditions and timestamps stay as they were. `now` is used only for what
/// changes in this transition.
pub fn with_phase(
    rj: &RepoboxJob,
    phase: RepoboxJobPhase,
    reason: &str,
    message: &str,
    extras: Extras,
    now: &Time,
) -> RepoboxJobStatus {
    let mut s = rj.status.clone().unwrap_or_default();
    let generation = rj.metadata.generation;
    s.phase = Some(phase);
    s.reason = Some(reason.to_owned());
    s.message = Some(message.to_owned());
    s.observed_generation = generation;
    if s.queued_at.is_none() {
        s.queued_at = rj
            .metadata
            .creation_timestamp
            .clone()
            .or_else(|| Some(now.clone()));
    }
    if extras.job_name.is_some() {
        s.job_name = extras.job_name;
    }
    if extras.branch.is_some() {
        s.branch = extras.branch;
    }
    if extras.commit_sha.is_some() {
        s.commit_sha = extras.commit_sha;
    }
    if extras.attempt.is_some() {
        s.attempt = extras.attempt;
    }
    if extras.next_attempt_time.is_some() {
        s.next_attempt_time = extras.next_attempt_time;
    }
    if extras.pr_url.is_some() {
        s.pr_url = extras.pr_url;
    }
    if extras.pr_number.is_some() {
        s.pr_number = extras.pr_number;
    }
    if extras.pr_error.is_some() {
        s.pr_error = extras.pr_error;
    }

    let cond = |type_: &str, status: bool, reason: &str, message: &str| {
        new_condition(type_, status, reason, message, generation, now.clone())
    };
    match phase {
        RepoboxJobPhase::Queued => {
            set_condition(
                &mut s.conditions,
                cond(condition_types::ADMITTED, false, reason, message),
            );
        }
        RepoboxJobPhase::Starting | RepoboxJobPhase::Running => {
            if s.start_time.is_none() {
                s.start_time = extras.start_time.clone().or_else(|| Some(now.clone()));
            }
            set_condition(
                &mut s.conditions,
                cond(
                    condition_types::ADMITTED,
                    true,
                    reasons::ADMITTED,
                    "a quota slot was granted and the Job created",
                ),
            );
        }
        RepoboxJobPhase::Succeeded | RepoboxJobPhase::Failed | RepoboxJobPhase::Cancelled => {
            if s.completion_time.is_none() {
                s.completion_time = Some(now.clone());
            }
            let from = s.start_time.clone().or_else(|| s.queued_at.clone());
            if let (Some(from), Some(to)) = (from, s.completion_time.clone()) {
                s.duration = Some(duration_between(&from, &to));
            }
            let (ok_type, ok) = if phase == RepoboxJobPhase::Succeeded {
                (condition_types::COMPLETE, true)
            } else {
                (condition_types::FAILED, true)
            };
            set_condition(&mut s.conditions, cond(ok_type, ok, reason, message));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::crd::{RepoboxJobSpec, find_condition};
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
        PodCondition, PodStatus,
    };
    use kube::api::ObjectMeta;

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn rj() -> RepoboxJob {
        let mut rj = RepoboxJob::new(
            "job-1",
            RepoboxJobSpec {
                job_id: "job-1".into(),
                user_id: "u".into(),
                repo: "https://h/r.git".into(),
                stream_entry_id: "1-0".into(),
                provider_id: None,
                base_branch: None,
                timeout_seconds: None,
                cancel: None,
                plan: None,
            },
        );
        rj.metadata = ObjectMeta {
            name: Some("job-1".into()),
            generation: Some(1),
            creation_timestamp: Some(t("2026-01-01T00:00:00Z")),
            ..Default::default()
        };
        rj
    }

    fn job_with(conditions: Vec<(&str, &str, &str, &str)>, ready: i32) -> Job {
        Job {
            status: Some(JobStatus {
                ready: Some(ready),
                conditions: Some(
                    conditions
                        .into_iter()
                        .map(|(ty, st, r, m)| JobCondition {
                            type_: ty.into(),
                            status: st.into(),
                            reason: Some(r.into()),
                            message: Some(m.into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn job_states() {
        assert_eq!(job_state(&Job::default()), JobState::Pending);
        assert_eq!(job_state(&job_with(vec![], 0)), JobState::Pending);
        assert_eq!(job_state(&job_with(vec![], 1)), JobState::Running);
        assert_eq!(
            job_state(&job_with(
                vec![
                    ("SuccessCriteriaMet", "True", "x", ""),
                    ("Complete", "True", "", "")
                ],
                0
            )),
            JobState::Succeeded
        );
        // Interim condition only: the pod is still terminating.
        assert_eq!(
            job_state(&job_with(
                vec![("FailureTarget", "True", "DeadlineExceeded", "")],
                1
            )),
            JobState::Running
        );
        assert_eq!(
            job_state(&job_with(
                vec![("Failed", "True", "DeadlineExceeded", "too long")],
                0
            )),
            JobState::Failed {
                reason: "DeadlineExceeded".into(),
                message: "too long".into()
            }
        );
        assert_eq!(
            job_state(&job_with(vec![("Failed", "False", "x", "")], 1)),
            JobState::Running
        );
    }

    fn pod(
        conds: Vec<(&str, &str, &str)>,
        terminated: Option<(&str, i32)>,
        waiting: Option<&str>,
    ) -> Pod {
        Pod {
            status: Some(PodStatus {
                conditions: Some(
                    conds
                        .into_iter()
                        .map(|(ty, st, r)| PodCondition {
                            type_: ty.into(),
                            status: st.into(),
                            reason: Some(r.into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                container_statuses: Some(vec![ContainerStatus {
                    name: "runner".into(),
                    state: Some(ContainerState {
                        terminated: terminated.map(|(r, c)| ContainerStateTerminated {
                            reason: Some(r.into()),
                            exit_code: c,
                            ..Default::default()
                        }),
                        waiting: waiting.map(|w| ContainerStateWaiting {
                            reason: Some(w.into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn start_times_from_the_scheduled_condition() {
        let at = |s: i64| jiff::Timestamp::from_second(1_800_000_000 + s).unwrap();
        let pod = |cond: Option<(&str, i64)>| Pod {
            status: Some(PodStatus {
                conditions: cond.map(|(status, t)| {
                    vec![PodCondition {
                        type_: "PodScheduled".into(),
                        status: status.into(),
                        last_transition_time: Some(Time(at(t))),
                        ..PodCondition::default()
                    }]
                }),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        let second = std::time::Duration::from_secs;
        assert_eq!(
            start_times(&pod(Some(("True", 30))), Some(at(0)), at(35)),
            (Some(second(30)), Some(second(5)))
        );
        // Not scheduled, or no condition: nothing to measure.
        assert_eq!(
            start_times(&pod(Some(("False", 30))), Some(at(0)), at(35)),
            (None, None)
        );
        assert_eq!(start_times(&pod(None), Some(at(0)), at(35)), (None, None));
        // Unknown creation; skewed clocks give no negative figures.
        assert_eq!(
            start_times(&pod(Some(("True", 30))), None, at(20)),
            (None, None)
        );
        assert_eq!(
            start_times(&pod(Some(("True", 30))), Some(at(40)), at(50)),
            (None, Some(second(20)))
        );
    }

    #[test]
    fn failures_are_explained() {
        assert_eq!(
            explain_job_failure(
                "DeadlineExceeded",
                "Job was active longer than specified deadline",
                3600,
                None
            ),
            Explained {
                reason: reasons::DEADLINE_EXCEEDED,
                error: "timed out after 3600 s".into()
            }
        );
        let e = explain_job_failure(
            "PodFailurePolicy",
            "Pod default/x has condition DisruptionTarget matching FailJob rule at index 0",
            60,
            None,
        );
        assert_eq!(e.reason, reasons::EVICTED);
        let evicted = pod_facts(&pod(
            vec![("DisruptionTarget", "True", "EvictionByEvictionAPI")],
            Some(("Error", 143)),
            None,
        ));
        let e = explain_job_failure("BackoffLimitExceeded", "", 60, Some(&evicted));
        assert_eq!(e.reason, reasons::EVICTED);
        assert!(e.error.contains("EvictionByEvictionAPI"));
        let oom = pod_facts(&pod(vec![], Some(("OOMKilled", 137)), None));
        assert_eq!(
            explain_job_failure("BackoffLimitExceeded", "", 60, Some(&oom)).reason,
            reasons::OOM_KILLED
        );
        let exited = pod_facts(&pod(vec![], Some(("Error", 3)), None));
        let e = explain_job_failure(
            "PodFailurePolicy",
            "Container runner for pod x failed with exit code 3 matching FailJob rule at index 1",
            60,
            Some(&exited),
        );
        assert_eq!(
            e,
            Explained {
                reason: reasons::JOB_FAILED,
                error: "the job runner exited with code 3 without recording a result".into()
            }
        );
        let e = explain_job_failure(
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
            60,
            None,
        );
        assert_eq!(
            e.error,
            "the Job failed (BackoffLimitExceeded): Job has reached the specified backoff limit"
        );
    }

    /// A pod whose runner container is as given and whose agent container is in `agent`.
    fn two_container_pod(runner: Option<(&str, i32)>, agent: ContainerState) -> Pod {
        let mut p = pod(vec![], runner, None);
        let statuses = p
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap();
        let mut agent_status = statuses[0].clone();
        agent_status.name = "agent".into();
        agent_status.state = Some(agent);
        // The agent is listed after the runner, as in the pod spec.
        statuses.push(agent_status);
        p
    }

    fn terminated(reason: &str, code: i32) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                reason: Some(reason.into()),
                exit_code: code,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_runner_container_decides_and_an_agent_oom_explains() {
        let f = pod_facts(&two_container_pod(
            Some(("Error", 3)),
            terminated("Completed", 0),
        ));
        assert_eq!(
            f.exit_code,
            Some(3),
            "the agent's exit 0 does not hide the runner's"
        );
        assert_eq!(f.terminated_reason.as_deref(), Some("Error"));
        let f = pod_facts(&two_container_pod(
            Some(("Error", 1)),
            terminated("OOMKilled", 137),
        ));
        assert_eq!(f.exit_code, Some(1));
        assert_eq!(f.terminated_reason.as_deref(), Some("OOMKilled"));
        assert_eq!(
            explain_job_failure("PodFailurePolicy", "", 60, Some(&f)).reason,
            reasons::OOM_KILLED
        );
        let f = pod_facts(&two_container_pod(None, terminated("Completed", 0)));
        assert_eq!(f.exit_code, None);
        // An agent image that cannot be pulled explains a pod that never runs.
        let p = two_container_pod(
            None,
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ErrImagePull".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert_eq!(
            pod_facts(&p).waiting_reason.as_deref(),
            Some("ErrImagePull")
        );
    }

    #[test]
    fn pending_is_explained() {
        let pull = pod_facts(&pod(vec![], None, Some("ImagePullBackOff")));
        let e = explain_pending(600, Some(&pull));
        assert_eq!(e.reason, reasons::PENDING_TOO_LONG);
        assert!(e.error.contains("ImagePullBackOff") && e.error.contains("600 s"));
        let unsched = pod_facts(&pod(
            vec![("PodScheduled", "False", "Unschedulable")],
            None,
            None,
        ));
        assert_eq!(
            explain_pending(60, Some(&unsched)).reason,
            reasons::UNSCHEDULABLE
        );
        assert_eq!(
            explain_pending(60, None).error,
            "the runner did not start within 60 s"
        );
    }

    #[test]
    fn phases_build_stable_statuses() {
        let mut r = rj();
        let t1 = t("2026-01-01T00:00:05Z");
        let queued = with_phase(
            &r,
            RepoboxJobPhase::Queued,
            reasons::USER_QUOTA_EXCEEDED,
            "2 ahead",
            Extras::default(),
            &t1,
        );
        assert_eq!(queued.queued_at, Some(t("2026-01-01T00:00:00Z")));
        let adm = find_condition(&queued.conditions, condition_types::ADMITTED).unwrap();
        assert_eq!(
            (adm.status.as_str(), adm.reason.as_str()),
            ("False", reasons::USER_QUOTA_EXCEEDED)
        );
        r.status = Some(queued.clone());
        // The same transition later changes nothing: no status churn.
        let again = with_phase(
            &r,
            RepoboxJobPhase::Queued,
            reasons::USER_QUOTA_EXCEEDED,
            "2 ahead",
            Extras::default(),
            &t("2026-01-01T00:09:00Z"),
        );
        assert_eq!(again, queued);

        let t2 = t("2026-01-01T00:01:00Z");
        let starting = with_phase(
            &r,
            RepoboxJobPhase::Starting,
            reasons::JOB_CREATED,
            "m",
            Extras {
                job_name: Some("job-1".into()),
                ..Default::default()
            },
            &t2,
        );
        assert_eq!(starting.start_time, Some(t2.clone()));
        assert_eq!(starting.job_name.as_deref(), Some("job-1"));
        assert_eq!(
            find_condition(&starting.conditions, condition_types::ADMITTED)
                .unwrap()
                .status,
            "True"
        );
        r.status = Some(starting);
        let t3 = t("2026-01-01T00:02:23Z");
        let done = with_phase(
            &r,
            RepoboxJobPhase::Succeeded,
            reasons::SUCCEEDED,
            "pushed",
            Extras {
                branch: Some("repobox/job-1".into()),
                commit_sha: Some("abc".into()),
                pr_url: Some("https://gitlab.example.com/g/p/-/merge_requests/4".into()),
                pr_number: Some(4),
                ..Default::default()
            },
            &t3,
        );
        assert_eq!(
            (
                done.pr_url.as_deref(),
                done.pr_number,
                done.pr_error.as_deref()
            ),
            (
                Some("https://gitlab.example.com/g/p/-/merge_requests/4"),
                Some(4),
                None
            )
        );
        assert_eq!(done.completion_time, Some(t3));
        assert_eq!(done.duration.as_deref(), Some("1m23s"));
        assert_eq!(done.start_time, Some(t2), "start time kept");
        assert_eq!(done.job_name.as_deref(), Some("job-1"), "job name kept");
        assert_eq!(
            find_condition(&done.conditions, condition_types::COMPLETE)
                .unwrap()
                .status,
            "True"
        );
        assert_eq!(done.observed_generation, Some(1));
    }

    #[test]
    fn failures_and_cancellations_set_the_failed_condition() {
        let r = rj();
        let now = t("2026-01-01T00:00:30Z");
        for (phase, reason) in [
            (RepoboxJobPhase::Failed, reasons::DEADLINE_EXCEEDED),
            (RepoboxJobPhase::Cancelled, reasons::CANCELLED),
        ] {
            let s = with_phase(&r, phase, reason, "m", Extras::default(), &now);
            let c = find_condition(&s.conditions, condition_types::FAILED).unwrap();
            assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", reason));
            assert_eq!(
                s.duration.as_deref(),
                Some("30s"),
                "never started: measured from queueing"
            );
            assert!(find_condition(&s.conditions, condition_types::COMPLETE).is_none());
        }
    }
}
