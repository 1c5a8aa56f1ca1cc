//! The Job controller part: one Job's pod attempts, its status and its end (Kubernetes 1.31+
//! condition order: `SuccessCriteriaMet`/`FailureTarget` first, then `Complete`/`Failed`).
//!
//! The decisions (terminal Jobs, deadline, podFailurePolicy, backoff) are pure functions so that
//! they are unit-tested without an API server; [`run_job`] only applies them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::pod::run_pod;
use super::{Shared, SimEvent, Stop};
use crate::kubelet::{ContainerExit, now};

/// The Job's `backoffLimit` when the spec has none (the API server's default).
const DEFAULT_BACKOFF_LIMIT: i32 = 6;
const DEADLINE_MESSAGE: &str = "Job was active longer than specified deadline";
const BACKOFF_MESSAGE: &str = "Job has reached the specified backoff limit";
const COMPLETE_MESSAGE: &str = "Reached expected number of succeeded pods";

/// How one pod attempt ended.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Outcome {
    /// The pod's phase is `Succeeded`.
    pub succeeded: bool,
    /// The exit code that decided the pod's fate (the first failing container, else the first).
    pub code: i32,
    pub reason: String,
    /// The pod's `DisruptionTarget` reason, if any.
    pub disruption: Option<String>,
    /// Every exit, init containers first.
    pub exits: Vec<ContainerExit>,
    pub deadline: bool,
    pub deleted: bool,
}

/// What the Job controller does after a pod attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Next {
    /// The Job or its pod was deleted: stop following it.
    Deleted,
    /// The pod succeeded: the Job completes.
    Complete,
    /// The Job fails with this count of failed pods, reason and message.
    Fail {
        failed: i32,
        reason: &'static str,
        message: String,
    },
    /// A podFailurePolicy `Ignore` rule matched: a new pod, the failure not counted.
    Ignore,
    /// A new pod; `failed` pods so far.
    Retry { failed: i32 },
}

/// A Job with a `Complete` or `Failed` condition is done: nothing to run.
pub(super) fn is_terminal(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

/// When `activeDeadlineSeconds` (counted from `start`) expires, if set.
pub(super) fn deadline_of(
    spec: &JobSpec,
    start: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    spec.active_deadline_seconds
        .map(|s| start + Duration::from_secs(u64::try_from(s).unwrap_or(0)))
}

/// The job controller's decision after a pod attempt, with `failed` pods counted before it:
/// deletion, deadline, success, then podFailurePolicy (`policy`, asked only for a failed pod),
/// then the backoff limit.
pub(super) fn next_step(
    out: &Outcome,
    failed: i32,
    backoff_limit: i32,
    policy: impl FnOnce() -> Option<(String, String)>,
) -> Next {
    if out.deleted {
        return Next::Deleted;
    }
    if out.deadline {
        return Next::Fail {
            failed: failed + 1,
            reason: "DeadlineExceeded",
            message: DEADLINE_MESSAGE.to_owned(),
        };
    }
    if out.succeeded {
        return Next::Complete;
    }
    match policy() {
        Some((action, message)) if action == "FailJob" => {
            return Next::Fail {
                failed: failed + 1,
                reason: "PodFailurePolicy",
                message,
            };
        }
        Some((action, _)) if action == "Ignore" => return Next::Ignore,
        _ => {}
    }
    let failed = failed + 1;
    if failed > backoff_limit {
        Next::Fail {
            failed,
            reason: "BackoffLimitExceeded",
            message: BACKOFF_MESSAGE.to_owned(),
        }
    } else {
        Next::Retry { failed }
    }
}

/// The first matching `podFailurePolicy` rule: (action, message for the Job condition).
pub(super) fn match_failure_policy(
    job: &Job,
    out: &Outcome,
    ns: &str,
    pod: &str,
) -> Option<(String, String)> {
    let rules = job
        .spec
        .as_ref()?
        .pod_failure_policy
        .as_ref()?
        .rules
        .clone();
    for (i, rule) in rules.iter().enumerate() {
        if let Some(codes) = &rule.on_exit_codes {
            let hit = out.exits.iter().find(|e| {
                let named = codes.container_name.as_ref().is_none_or(|n| *n == e.name);
                let listed = codes.values.contains(&e.exit_code);
                named
                    && match codes.operator.as_str() {
                        "In" => listed,
                        "NotIn" => !listed && e.exit_code != 0,
                        _ => false,
                    }
            });
            if let Some(e) = hit {
                return Some((
                    rule.action.clone(),
                    format!(
                        "Container {} for pod {ns}/{pod} failed with exit code {} matching {} rule at index {i}",
                        e.name, e.exit_code, rule.action
                    ),
                ));
            }
        }
        if let Some(conds) = &rule.on_pod_conditions
            && out.disruption.is_some()
            && conds
                .iter()
                .any(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        {
            return Some((
                rule.action.clone(),
                format!(
                    "Pod {ns}/{pod} has condition DisruptionTarget matching {} rule at index {i}",
                    rule.action
                ),
            ));
        }
    }
    None
}

/// A Job condition with status `True`, stamped now.
fn condition(type_: &str, reason: &str, message: &str) -> Value {
    let t = now();
    json!({"type": type_, "status": "True", "reason": reason, "message": message,
           "lastProbeTime": t, "lastTransitionTime": t})
}

/// Runs the Job's pods one after another until it completes, fails or goes away.
pub(super) async fn run_job(
    shared: &Arc<Shared>,
    job: &Job,
    mut stop: mpsc::UnboundedReceiver<Stop>,
) -> Result<()> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let uid = job.uid().context("job uid")?;
    let jobs: Api<Job> = Api::namespaced(shared.client.clone(), &ns);
    let spec = job.spec.clone().context("job spec")?;
    let backoff_limit = spec.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT);
    let deadline = deadline_of(&spec, tokio::time::Instant::now());
    patch_job_status(
        &jobs,
        &name,
        json!({"startTime": now(), "active": 1, "ready": 0, "uncountedTerminatedPods": {}}),
    )
    .await?;
    let mut failed = 0;
    loop {
        let out = run_pod(shared, job, &uid, deadline, &mut stop).await?;
        tracing::debug!(job = %name, code = out.code, reason = %out.reason, "simulated pod ended");
        // podFailurePolicy first, like the job controller.
        let policy = || {
            let pod_name = shared
                .lock()
                .runs
                .get(&uid)
                .and_then(|r| r.pod.clone())
                .unwrap_or_default();
            match_failure_policy(job, &out, &ns, &pod_name)
        };
        match next_step(&out, failed, backoff_limit, policy) {
            Next::Deleted => {
                shared.lock().runs.remove(&uid);
                return Ok(());
            }
            Next::Complete => {
                patch_job_status(
                    &jobs,
                    &name,
                    json!({"active": 0, "ready": 0, "succeeded": 1,
                           "conditions": [condition("SuccessCriteriaMet", "CompletionsReached", COMPLETE_MESSAGE)]}),
                )
                .await?;
                patch_job_status(
                    &jobs,
                    &name,
                    json!({"completionTime": now(), "conditions": [
                        condition("SuccessCriteriaMet", "CompletionsReached", COMPLETE_MESSAGE),
                        condition("Complete", "CompletionsReached", COMPLETE_MESSAGE)]}),
                )
                .await?;
                shared.lock().runs.remove(&uid);
                shared.emit(SimEvent::JobComplete {
                    namespace: ns,
                    job: name,
                });
                return Ok(());
            }
            Next::Fail {
                failed,
                reason,
                message,
            } => {
                if out.deadline {
                    shared.emit(SimEvent::DeadlineExceeded {
                        namespace: ns.clone(),
                        job: name.clone(),
                    });
                }
                return finish_failed(shared, &jobs, &ns, &name, &uid, failed, reason, &message)
                    .await;
            }
            Next::Ignore => {
                patch_job_status(&jobs, &name, json!({"active": 1, "ready": 0})).await?;
            }
            Next::Retry { failed: now_failed } => {
                failed = now_failed;
                patch_job_status(
                    &jobs,
                    &name,
                    json!({"active": 1, "ready": 0, "failed": failed}),
                )
                .await?;
            }
        }
    }
}

/// `FailureTarget`, then `Failed`, as the job controller writes them.
#[allow(clippy::too_many_arguments)]
async fn finish_failed(
    shared: &Arc<Shared>,
    jobs: &Api<Job>,
    ns: &str,
    name: &str,
    uid: &str,
    failed: i32,
    reason: &str,
    message: &str,
) -> Result<()> {
    patch_job_status(
        jobs,
        name,
        json!({"active": 0, "ready": 0, "failed": failed,
               "conditions": [condition("FailureTarget", reason, message)]}),
    )
    .await?;
    patch_job_status(
        jobs,
        name,
        json!({"conditions": [condition("FailureTarget", reason, message),
                              condition("Failed", reason, message)]}),
    )
    .await?;
    shared.lock().runs.remove(uid);
    shared.emit(SimEvent::JobFailed {
        namespace: ns.to_string(),
        job: name.to_string(),
        reason: reason.to_string(),
    });
    Ok(())
}

/// Merge-patches the status of `name` (a Job or a Pod).
pub(super) async fn patch_status<K>(api: &Api<K>, name: &str, status: Value) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .with_context(|| format!("patch {} {name} status", K::kind(&())))?;
    Ok(())
}

async fn patch_job_status(jobs: &Api<Job>, name: &str, status: Value) -> Result<()> {
    patch_status(jobs, name, status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(spec: Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j", "namespace": "ns"}, "spec": spec}))
            .expect("job")
    }

    fn exit(name: &str, code: i32) -> ContainerExit {
        ContainerExit {
            name: name.into(),
            exit_code: code,
            signal: None,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
        }
    }

    fn failed_with(exits: Vec<ContainerExit>) -> Outcome {
        Outcome {
            code: exits
                .iter()
                .map(|e| e.exit_code)
                .find(|c| *c != 0)
                .unwrap_or(1),
            reason: "Error".into(),
            exits,
            ..Outcome::default()
        }
    }

    fn with_policy(rules: Value) -> Job {
        job(json!({"template": {"spec": {"containers": []}}, "podFailurePolicy": {"rules": rules}}))
    }

    #[test]
    fn terminal_only_with_a_true_complete_or_failed_condition() {
        let with = |conds: Value| -> Job {
            serde_json::from_value(
                json!({"metadata": {"name": "j"}, "status": {"conditions": conds}}),
            )
            .expect("job")
        };
        assert!(!is_terminal(&job(json!({"template": {}}))));
        assert!(!is_terminal(&with(
            json!([{"type": "FailureTarget", "status": "True"}])
        )));
        assert!(!is_terminal(&with(
            json!([{"type": "Complete", "status": "False"}])
        )));
        assert!(is_terminal(&with(
            json!([{"type": "Complete", "status": "True"}])
        )));
        assert!(is_terminal(&with(
            json!([{"type": "Failed", "status": "True"}])
        )));
    }

    #[test]
    fn deadline_counts_from_the_start() {
        let start = tokio::time::Instant::now();
        let spec = |d: Value| {
            job(json!({"template": {}, "activeDeadlineSeconds": d}))
                .spec
                .expect("spec")
        };
        assert_eq!(
            deadline_of(&spec(json!(30)), start),
            Some(start + Duration::from_secs(30))
        );
        assert_eq!(deadline_of(&spec(json!(null)), start), None);
        // A negative value (invalid on a real API server) expires at once.
        assert_eq!(deadline_of(&spec(json!(-5)), start), Some(start));
    }

    #[test]
    fn deletion_wins_over_everything() {
        let out = Outcome {
            deleted: true,
            deadline: true,
            succeeded: true,
            ..Outcome::default()
        };
        assert_eq!(
            next_step(&out, 3, 0, || panic!("policy not asked")),
            Next::Deleted
        );
    }

    #[test]
    fn deadline_fails_the_job_and_counts_the_pod() {
        let out = Outcome {
            deadline: true,
            ..Outcome::default()
        };
        assert_eq!(
            next_step(&out, 2, 6, || panic!("policy not asked")),
            Next::Fail {
                failed: 3,
                reason: "DeadlineExceeded",
                message: DEADLINE_MESSAGE.into()
            }
        );
    }

    #[test]
    fn success_completes_without_asking_the_policy() {
        let out = Outcome {
            succeeded: true,
            ..Outcome::default()
        };
        assert_eq!(
            next_step(&out, 0, 0, || panic!("policy not asked")),
            Next::Complete
        );
    }

    #[test]
    fn policy_actions_come_before_the_backoff_limit() {
        let out = failed_with(vec![exit("main", 3)]);
        let fail = || Some(("FailJob".to_owned(), "why".to_owned()));
        assert_eq!(
            next_step(&out, 0, 6, fail),
            Next::Fail {
                failed: 1,
                reason: "PodFailurePolicy",
                message: "why".into()
            }
        );
        let ignore = || Some(("Ignore".to_owned(), String::new()));
        assert_eq!(next_step(&out, 5, 0, ignore), Next::Ignore);
        // `Count` is the default handling.
        let count = || Some(("Count".to_owned(), String::new()));
        assert_eq!(next_step(&out, 0, 1, count), Next::Retry { failed: 1 });
    }

    #[test]
    fn backoff_limit_is_exceeded_after_limit_plus_one_failures() {
        let out = failed_with(vec![exit("main", 1)]);
        assert_eq!(next_step(&out, 0, 1, || None), Next::Retry { failed: 1 });
        assert_eq!(
            next_step(&out, 1, 1, || None),
            Next::Fail {
                failed: 2,
                reason: "BackoffLimitExceeded",
                message: BACKOFF_MESSAGE.into()
            }
        );
        assert_eq!(
            next_step(&out, 0, 0, || None),
            Next::Fail {
                failed: 1,
                reason: "BackoffLimitExceeded",
                message: BACKOFF_MESSAGE.into()
            }
        );
    }

    #[test]
    fn exit_code_rules_match_in_and_not_in() {
        let j = with_policy(json!([
            {"action": "Ignore", "onExitCodes": {"containerName": "sidecar", "operator": "In", "values": [3]}},
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [3, 4]}},
        ]));
        let (action, msg) =
            match_failure_policy(&j, &failed_with(vec![exit("main", 3)]), "ns", "p")
                .expect("match");
        assert_eq!(action, "FailJob");
        assert_eq!(
            msg,
            "Container main for pod ns/p failed with exit code 3 matching FailJob rule at index 1"
        );
        let (action, _) =
            match_failure_policy(&j, &failed_with(vec![exit("sidecar", 3)]), "ns", "p")
                .expect("match");
        assert_eq!(action, "Ignore");
        assert_eq!(
            match_failure_policy(&j, &failed_with(vec![exit("main", 5)]), "ns", "p"),
            None
        );

        let not_in = with_policy(json!([
            {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [42]}},
        ]));
        // NotIn never matches a zero exit (the init container that succeeded).
        let out = failed_with(vec![exit("init", 0), exit("main", 42)]);
        assert_eq!(match_failure_policy(&not_in, &out, "ns", "p"), None);
        let out = failed_with(vec![exit("init", 0), exit("main", 7)]);
        let (action, msg) = match_failure_policy(&not_in, &out, "ns", "p").expect("match");
        assert_eq!(action, "FailJob");
        assert!(
            msg.contains("Container main") && msg.contains("exit code 7"),
            "{msg}"
        );
        // An unknown operator matches nothing.
        let odd = with_policy(json!([
            {"action": "FailJob", "onExitCodes": {"operator": "Maybe", "values": [1]}},
        ]));
        assert_eq!(
            match_failure_policy(&odd, &failed_with(vec![exit("main", 1)]), "ns", "p"),
            None
        );
    }

    #[test]
    fn pod_condition_rules_match_a_disruption_only() {
        let j = with_policy(json!([
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]));
        let mut out = failed_with(vec![exit("main", 137)]);
        assert_eq!(match_failure_policy(&j, &out, "ns", "p"), None);
        out.disruption = Some("EvictionByEvictionAPI".into());
        assert_eq!(
            match_failure_policy(&j, &out, "ns", "p"),
            Some((
                "Ignore".to_owned(),
                "Pod ns/p has condition DisruptionTarget matching Ignore rule at index 0"
                    .to_owned()
            ))
        );
        assert_eq!(
            match_failure_policy(&job(json!({"template": {}})), &out, "ns", "p"),
            None
        );
    }
}
