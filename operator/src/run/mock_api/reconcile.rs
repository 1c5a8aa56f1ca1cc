//! `reconcile` in each key situation: exactly which requests it makes.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::{Bed, Expect, Step, ago, cached_job, paths, pod_list, repobox_job};
use crate::model::crd::{RepoboxJob, RepoboxJobPhase, reasons};
use crate::model::labels::FINALIZER;
use crate::run::reconcile::reconcile;

const RJ: &str = "job-1";
const USER: &str = "alice";

/// A status apply of the operator's field manager that includes `status`.
fn status_patch(rj: &RepoboxJob, status: Value) -> Step {
    Expect::patch(paths::status(RJ))
        .query("fieldManager", "repobox-operator")
        .query("force", "true")
        .body(json!({
            "apiVersion": "repobox.dev/v1alpha1",
            "kind": "RepoboxJob",
            "status": status,
        }))
        .status_applied(rj)
        .into()
}

/// An events.k8s.io Event on the RepoboxJob.
fn event(type_: &str, reason: &str, action: &str) -> Step {
    Expect::post(paths::events())
        .body(json!({
            "type": type_,
            "reason": reason,
            "action": action,
            "reportingController": "repobox-operator",
            "regarding": {"kind": "RepoboxJob", "name": RJ, "namespace": super::NS},
        }))
        .created()
        .into()
}

/// The pods of the Job `RJ`, answered with `pods`.
fn pod_list_of_job(pods: Vec<Value>) -> Step {
    Expect::get(paths::pods())
        .query("labelSelector", &format!("job-name={RJ}"))
        // From the watch cache, never a quorum read from etcd.
        .query("resourceVersion", "0")
        .query("resourceVersionMatch", "NotOlderThan")
        .reply(pod_list(pods))
        .into()
}

fn pod(status: Value) -> Value {
    json!({
        "metadata": {"name": format!("{RJ}-abcde"), "namespace": super::NS, "uid": "pod-uid"},
        "status": status,
    })
}

/// `rj` with the status the `n`th request (a status patch) applied.
fn with_applied_status(rj: &RepoboxJob, seen: &[super::Seen], n: usize) -> RepoboxJob {
    let mut rj = rj.clone();
    rj.status = Some(serde_json::from_value(seen[n].body["status"].clone()).expect("a status"));
    rj
}

async fn run(rj: &RepoboxJob, bed: &Bed) -> Action {
    reconcile(Arc::new(rj.clone()), bed.ctx.clone())
        .await
        .expect("reconcile succeeds")
}

#[tokio::test]
async fn a_queued_job_without_a_job_pokes_the_dispatcher_and_calls_no_api() {
    let (bed, api) = Bed::new(&[]).await;
    let rj = repobox_job(RJ, USER, RepoboxJobPhase::Queued);
    let scenario = api.expect(vec![]);
    assert_eq!(run(&rj, &bed).await, Action::await_change());
    assert!(bed.dispatcher_poked());
    bed.finish(scenario).await;
}

#[tokio::test]
async fn a_job_without_the_finalizer_only_gets_it() {
    let (bed, api) = Bed::new(&[]).await;
    let mut rj = repobox_job(RJ, USER, RepoboxJobPhase::Queued);
    rj.metadata.finalizers = None;
    let mut finalized = rj.clone();
    finalized.metadata.finalizers = Some(vec![FINALIZER.into()]);
    let scenario = api.expect(vec![
        Expect::patch(paths::repobox_job(RJ))
            .body(json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ]))
            .reply(serde_json::to_value(&finalized).expect("json"))
            .into(),
    ]);
    assert_eq!(run(&rj, &bed).await, Action::await_change());
    assert!(!bed.dispatcher_poked());
    bed.finish(scenario).await;
}

#[tokio::test]
async fn a_pod_starting_within_the_debounce_calls_no_api() {
    let (mut bed, api) = Bed::new(&[]).await;
    let rj = repobox_job(RJ, USER, RepoboxJobPhase::Queued);
    bed.cache_job(&cached_job(RJ, Duration::ZERO, json!({"active": 1})));
    let scenario = api.expect(vec![]);
    let action = run(&rj, &bed).await;
    assert_ne!(action, Action::await_change());
    bed.finish(scenario).await;
}

#[tokio::test]
async fn a_job_pending_past_the_debounce_shows_starting_once() {
    let (mut bed, api) = Bed::new(&[]).await;
    let rj = repobox_job(RJ, USER, RepoboxJobPhase::Queued);
    bed.cache_job(&cached_job(
        RJ,
        Duration::from_secs(5),
        json!({"active": 1}),
    ));
    let pending = pod(json!({"phase": "Pending"}));
    let scenario = api.expect(vec![
        pod_list_of_job(vec![pending.clone()]),
        status_patch(
            &rj,
            json!({"phase": "Starting", "reason": reasons::JOB_CREATED, "jobName": RJ}),
        ),
        // The second reconcile, with that status: the pod is looked at, nothing written.
        pod_list_of_job(vec![pending]),
    ]);
    run(&rj, &bed).await;
    let started = with_applied_status(&rj, &scenario.seen(), 1);
    run(&started, &bed).await;
    bed.finish(scenario).await;
}

#[tokio::test]
async fn a_pod_waiting_for_a_node_shows_why_with_an_event() {
    let (mut bed, api) = Bed::new(&[]).await;
    let rj = repobox_job(RJ, USER, RepoboxJobPhase::Queued);
    bed.cache_job(&cached_job(
        RJ,
        Duration::from_secs(5),
        json!({"active": 1}),
    ));
    let unschedulable = pod(json!({
        "phase": "Pending",
        "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient cpu.",
        }],
    }));
    let scale_up = json!({
        "metadata": {"name": "e1", "namespace": super::NS},
        "involvedObject": {"kind": "Pod", "name": format!("{RJ}-abcde")},
        "reason": "TriggeredScaleUp",
        "message": "pod triggered scale-up: [{pool 0->1 (max: 3)}]",
        "firstTimestamp": ago(Duration::from_secs(3)),
        "lastTimestamp": ago(Duration::from_secs(3)),
    });
    let scenario = api.expect(vec![
        pod_list_of_job(vec![unschedulable]),
        Expect::get(paths::core_events())
            .query(
                "fieldSelector",
                &format!(
                    "involvedObject.kind=Pod,involvedObject.name={RJ}-abcde,involvedObject.uid=pod-uid"
                ),
            )
            .query("resourceVersion", "0")
            .reply(json!({
                "apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": [scale_up],
            }))
            .into(),
        status_patch(
            &rj,
            json!({"phase": "Starting", "reason": reasons::WAITING_FOR_NODE, "jobName": RJ}),
        ),
        event("Normal", reasons::WAITING_FOR_NODE, "Schedule"),
    ]);
    run(&rj, &bed).await;
    bed.finish(scenario).await;
}

#[tokio::test]
async fn a_running_job_shows_running_once() {
    let (mut bed, api) = Bed::new(&[]).await;
    let rj = repobox_job(RJ, USER, RepoboxJobPhase::Starting);
    bed.cache_job(&cached_job(
        RJ,
        Duration::from_secs(5),
        json!({"active": 1, "ready": 1}),
    ));
    let scenario = api.expect(vec![
        status_patch(
            &rj,
            json!({"phase": "Running", "reason": reasons::POD_RUNNING, "jobName": RJ}),
        ),
        event("Normal", reasons::POD_RUNNING, "Run"),
        // Once per attempt, for the start metrics.
        pod_list_of_job(vec![pod(json!({"phase": "Running"}))]),
        // The second reconcile, with that status: the status is up to date, nothing is made.
    ]);
    assert_eq!(run(&rj, &bed).await, Action::await_change());
    let running = with_applied_status(&rj, &scenario.seen(), 0);
    assert_eq!(run(&running, &bed).await, Action::await_change());
    bed.finish(scenario).await;
}

#[tokio::test]
async fn a_succeeded_job_takes_the_runners_record_and_keeps_its_job() {
    let (mut bed, api) = Bed::new(&[]).await;
    bed.running_record(RJ, USER).await;
    let mut con = bed.con.clone();
    let fin = repobox_contract::transitions::Finish::success(
        repobox_contract::time::now(),
        Some("repobox/job-1".into()),
        Some("0123abcd".into()),
    );
    repobox_contract::transitions::finish(&mut con, RJ, &fin)
        .await
        .expect("finish");
    let rj = repobox_job(RJ, USER, RepoboxJobPhase::Running);
    bed.cache_job(&cached_job(
        RJ,
        Duration::from_secs(30),
        json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}),
    ));
    let scenario = api.expect(vec![
        status_patch(
            &rj,
            json!({
                "phase": "Succeeded",
                "reason": reasons::SUCCEEDED,
                "message": "pushed repobox/job-1",
                "branch": "repobox/job-1",
                "commitSha": "0123abcd",
                "jobName": RJ,
            }),
        ),
        event("Normal", reasons::SUCCEEDED, "Finish"),
    ]);
    let action = run(&rj, &bed).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(86400)));
    assert!(bed.dispatcher_poked());
    assert_eq!(bed.record(RJ).await["status"], "success");
    let seen = bed.finish(scenario).await;
    assert!(seen[0].body["status"]["completionTime"].is_string());
}

#[tokio::test]
async fn spec_cancel_deletes_the_job_and_records_cancelled() {
    let (mut bed, api) = Bed::new(&[]).await;
    bed.running_record(RJ, USER).await;
    let mut rj = repobox_job(RJ, USER, RepoboxJobPhase::Running);
    rj.spec.cancel = Some(true);
    bed.cache_job(&cached_job(
        RJ,
        Duration::from_secs(30),
        json!({"active": 1, "ready": 1}),
    ));
    let scenario = api.expect(vec![
        Expect::delete(paths::job(RJ))
            .body(json!({"propagationPolicy": "Background"}))
            .deleted()
            .into(),
        status_patch(
            &rj,
            json!({"phase": "Cancelled", "reason": reasons::CANCELLED, "jobName": RJ}),
        ),
        event("Warning", reasons::CANCELLED, "Finish"),
    ]);
    let action = run(&rj, &bed).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(86400)));
    assert!(bed.dispatcher_poked());
    let record = bed.record(RJ).await;
    assert_eq!(record["status"], "cancelled");
    assert_eq!(record["error"], "cancelled: spec.cancel was set");
    bed.finish(scenario).await;
}

#[tokio::test]
async fn deleting_an_unfinished_job_cancels_it_then_releases_the_finalizer() {
    let (bed, api) = Bed::new(&[]).await;
    bed.running_record(RJ, USER).await;
    let mut rj = repobox_job(RJ, USER, RepoboxJobPhase::Running);
    rj.metadata.deletion_timestamp = Some(ago(Duration::from_secs(1)));
    let scenario = api.expect(vec![
        Expect::delete(paths::job(RJ))
            .body(json!({"propagationPolicy": "Background"}))
            .deleted()
            .into(),
        Expect::patch(paths::repobox_job(RJ))
            .body(json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ]))
            .reply(serde_json::to_value(&rj).expect("json"))
            .into(),
    ]);
    assert_eq!(run(&rj, &bed).await, Action::await_change());
    assert!(bed.dispatcher_poked());
    assert_eq!(bed.record(RJ).await["status"], "cancelled");
    bed.finish(scenario).await;
}

#[tokio::test]
async fn an_admitted_job_missing_from_the_cache_is_confirmed_gone_before_it_fails() {
    let (bed, api) = Bed::new(&[]).await;
    bed.running_record(RJ, USER).await;
    let rj = repobox_job(RJ, USER, RepoboxJobPhase::Running);
    let scenario = api.expect(vec![
        Expect::get(paths::job(RJ))
            .answer_with(|_| {
                (
                    StatusCode::NOT_FOUND,
                    json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "NotFound", "code": 404,
                        "message": "jobs.batch \"job-1\" not found",
                    }),
                )
            })
            .into(),
        status_patch(
            &rj,
            json!({"phase": "Failed", "reason": reasons::JOB_MISSING, "jobName": RJ}),
        ),
        event("Warning", reasons::JOB_MISSING, "Finish"),
    ]);
    run(&rj, &bed).await;
    let record = bed.record(RJ).await;
    assert_eq!(record["status"], "failed");
    assert_eq!(
        record["error"],
        "the Job was deleted before the job finished"
    );
    bed.finish(scenario).await;
}

fn finished(completed: Duration) -> RepoboxJob {
    let mut rj = repobox_job(RJ, USER, RepoboxJobPhase::Succeeded);
    if let Some(s) = rj.status.as_mut() {
        s.completion_time = Some(ago(completed));
    }
    rj
}

#[tokio::test]
async fn a_finished_job_past_retention_is_deleted() {
    let (bed, api) = Bed::new(&[("RETENTION_SECONDS", "3600")]).await;
    let rj = finished(Duration::from_secs(7200));
    let scenario = api.expect(vec![
        Expect::delete(paths::repobox_job(RJ))
            .body(json!({"propagationPolicy": "Background"}))
            .deleted()
            .into(),
    ]);
    assert_eq!(run(&rj, &bed).await, Action::await_change());
    bed.finish(scenario).await;
}

#[tokio::test]
async fn a_finished_job_within_retention_calls_no_api() {
    let (bed, api) = Bed::new(&[("RETENTION_SECONDS", "3600")]).await;
    let rj = finished(Duration::from_secs(60));
    let scenario = api.expect(vec![]);
    let action = run(&rj, &bed).await;
    assert_ne!(action, Action::await_change());
    assert!(!bed.dispatcher_poked());
    bed.finish(scenario).await;
}

#[tokio::test]
async fn a_job_past_its_deadline_without_a_record_is_explained_and_recorded_failed() {
    let (mut bed, api) = Bed::new(&[]).await;
    bed.running_record(RJ, USER).await;
    let rj = repobox_job(RJ, USER, RepoboxJobPhase::Running);
    bed.cache_job(&cached_job(
        RJ,
        Duration::from_secs(3700),
        json!({"failed": 1, "conditions": [{
            "type": "Failed", "status": "True", "reason": "DeadlineExceeded",
            "message": "Job was active longer than specified deadline",
        }]}),
    ));
    let scenario = api.expect(vec![
        // The pod explains the failure (OOM, eviction, or the deadline as here).
        pod_list_of_job(vec![]),
        status_patch(
            &rj,
            json!({"phase": "Failed", "reason": reasons::DEADLINE_EXCEEDED, "jobName": RJ}),
        ),
        event("Warning", reasons::DEADLINE_EXCEEDED, "Finish"),
    ]);
    run(&rj, &bed).await;
    assert!(bed.dispatcher_poked());
    assert_eq!(bed.record(RJ).await["status"], "failed");
    bed.finish(scenario).await;
}

#[tokio::test]
async fn an_evicted_runner_is_run_again_in_a_new_job() {
    let (mut bed, api) = Bed::new(&[("DISRUPTION_RETRY_BACKOFF_SECONDS", "0")]).await;
    bed.running_record(RJ, USER).await;
    let rj = repobox_job(RJ, USER, RepoboxJobPhase::Running);
    bed.cache_job(&cached_job(
        RJ,
        Duration::from_secs(60),
        json!({"failed": 1, "conditions": [{
            "type": "Failed", "status": "True", "reason": "PodFailurePolicy",
            "message": "Container runner for pod repobox/job-1-abcde failed with exit code 143 \
                        matching FailJob rule at index 0; DisruptionTarget",
        }]}),
    ));
    let evicted = pod(json!({
        "phase": "Failed",
        "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
    }));
    let retry = "job-1-r2";
    let scenario = api.expect(vec![
        pod_list_of_job(vec![evicted]),
        status_patch(
            &rj,
            json!({"phase": "Starting", "reason": reasons::RETRYING, "attempt": 2, "jobName": retry}),
        ),
        event("Warning", reasons::RETRYING, "Retry"),
        // The next reconcile: the new attempt's Job is not cached; the API confirms, then it
        // is created.
        Expect::get(paths::job(retry))
            .answer_with(|_| {
                (
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                           "status": "Failure", "reason": "NotFound", "code": 404}),
                )
            })
            .into(),
        Expect::post(paths::jobs())
            .query("fieldManager", "repobox-operator")
            .body(json!({"metadata": {"name": retry, "ownerReferences": [{"name": RJ}]}}))
            .created()
            .into(),
    ]);
    run(&rj, &bed).await;
    assert_eq!(bed.record(RJ).await["attempt"], "2");
    let retrying = with_applied_status(&rj, &scenario.seen(), 1);
    run(&retrying, &bed).await;
    bed.finish(scenario).await;
}
