//! `Dispatcher::pass`: one Job per admitted job, a `Queued` reason for the others, and
//! nothing more.

use std::sync::Arc;

use serde_json::json;

use super::{Bed, Expect, any_order, paths, repobox_job};
use crate::model::crd::{RepoboxJob, RepoboxJobPhase, reasons};
use crate::run::dispatcher::Dispatcher;

/// The Job POST of the RepoboxJob `name`: named after it, controlled by it.
fn job_create(name: &str) -> Expect {
    Expect::post(paths::jobs())
        .query("fieldManager", "repobox-operator")
        .body(json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": super::NS,
                "ownerReferences": [{
                    "apiVersion": "repobox.dev/v1alpha1",
                    "kind": "RepoboxJob",
                    "name": name,
                    "uid": format!("uid-{name}"),
                    "controller": true,
                }],
            },
        }))
        .created()
}

fn admitted_event(name: &str) -> Expect {
    Expect::post(paths::events())
        .body(json!({
            "type": "Normal",
            "reason": reasons::ADMITTED,
            "action": "Admit",
            "note": format!("quota slot granted; Job {name} created"),
            "regarding": {"kind": "RepoboxJob", "name": name},
        }))
        .created()
}

async fn user_running(bed: &Bed, user: &str) -> Option<String> {
    let mut con = bed.con.clone();
    redis::AsyncCommands::get(&mut con, repobox_contract::keys::user_running(user))
        .await
        .expect("GET")
}

#[tokio::test]
async fn under_quota_each_admitted_job_gets_one_job() {
    let (mut bed, api) = Bed::new(&[]).await;
    let jobs: Vec<RepoboxJob> = [("job-1", "alice"), ("job-2", "bob")]
        .into_iter()
        .map(|(name, user)| repobox_job(name, user, RepoboxJobPhase::Queued))
        .collect();
    for rj in &jobs {
        bed.cache(rj);
    }
    // The creates run concurrently: their order is not fixed, each Job's Event follows it.
    let scenario = api.expect(vec![any_order(vec![
        job_create("job-1"),
        job_create("job-2"),
        admitted_event("job-1"),
        admitted_event("job-2"),
    ])]);
    let dispatcher = Arc::new(Dispatcher::new(bed.ctx.dispatch.clone()));
    dispatcher.pass(&bed.ctx).await.expect("a pass");
    assert_eq!(user_running(&bed, "alice").await.as_deref(), Some("1"));
    assert_eq!(user_running(&bed, "bob").await.as_deref(), Some("1"));
    let seen = bed.finish(scenario).await;
    for name in ["job-1", "job-2"] {
        let at = |path: &str| {
            seen.iter()
                .position(|s| s.path == path && s.body.to_string().contains(name))
        };
        let (job, event) = (at(&paths::jobs()), at(&paths::events()));
        assert!(
            job.is_some() && job < event,
            "{name}: its Job, then its Event"
        );
    }
}

#[tokio::test]
async fn over_the_user_quota_a_job_waits_with_its_reason_and_no_job() {
    let (mut bed, api) = Bed::new(&[("MAX_JOBS_PER_USER", "1")]).await;
    let running = repobox_job("job-1", "alice", RepoboxJobPhase::Running);
    let queued = repobox_job("job-2", "alice", RepoboxJobPhase::Queued);
    bed.cache(&running);
    bed.cache(&queued);
    let scenario = api.expect(vec![
        Expect::patch(paths::status("job-2"))
            .query("fieldManager", "repobox-operator")
            .query("force", "true")
            .body(json!({
                "kind": "RepoboxJob",
                "status": {
                    "phase": "Queued",
                    "reason": reasons::USER_QUOTA_EXCEEDED,
                    "conditions": [{
                        "type": "Admitted", "status": "False",
                        "reason": reasons::USER_QUOTA_EXCEEDED,
                    }],
                },
            }))
            .status_applied(&queued)
            .into(),
        Expect::post(paths::events())
            .body(json!({
                "type": "Normal",
                "reason": reasons::USER_QUOTA_EXCEEDED,
                "action": "Queue",
                "regarding": {"kind": "RepoboxJob", "name": "job-2"},
            }))
            .created()
            .into(),
        // The second pass sees that status in the cache: nothing to write.
    ]);
    let dispatcher = Arc::new(Dispatcher::new(bed.ctx.dispatch.clone()));
    dispatcher.pass(&bed.ctx).await.expect("a pass");
    let mut waiting = queued.clone();
    waiting.status =
        Some(serde_json::from_value(scenario.seen()[0].body["status"].clone()).expect("a status"));
    bed.cache(&waiting);
    dispatcher.pass(&bed.ctx).await.expect("a second pass");
    assert_eq!(user_running(&bed, "alice").await.as_deref(), Some("1"));
    bed.finish(scenario).await;
}

#[tokio::test]
async fn a_job_whose_earlier_entry_is_still_on_its_way_waits_for_it() {
    let (mut bed, api) = Bed::new(&[("MAX_JOBS_PER_USER", "1")]).await;
    let mut first = repobox_job("job-1", "alice", RepoboxJobPhase::Queued);
    first.spec.stream_entry_id = "1-0".into();
    let mut second = repobox_job("job-2", "alice", RepoboxJobPhase::Queued);
    second.spec.stream_entry_id = "2-0".into();
    let dispatcher = Arc::new(Dispatcher::new(bed.ctx.dispatch.clone()));
    let arrivals = dispatcher.arrivals();
    // The intake read both entries; the second job was created first.
    arrivals.read(["1-0", "2-0"]);
    arrivals.created("2-0", second.clone());
    // Once job-1 is there it takes alice's one slot, and job-2 waits with its reason.
    let scenario = api.expect(vec![any_order(vec![
        job_create("job-1"),
        admitted_event("job-1"),
        Expect::patch(paths::status("job-2")).status_applied(&second),
        Expect::post(paths::events())
            .body(json!({"reason": reasons::USER_QUOTA_EXCEEDED, "regarding": {"name": "job-2"}}))
            .created(),
    ])]);
    // Before it is, a pass admits nothing and writes nothing: job-2 is owed nothing yet.
    dispatcher.pass(&bed.ctx).await.expect("a pass");
    assert!(scenario.seen().is_empty(), "{:?}", scenario.seen());
    assert_eq!(user_running(&bed, "alice").await, None);

    // Handed over by the intake, before the cache shows either: admitted from that.
    arrivals.created("1-0", first.clone());
    dispatcher.pass(&bed.ctx).await.expect("a second pass");
    assert_eq!(arrivals.len(), 2, "neither reached the cache yet");
    bed.cache(&first);
    bed.cache(&second);
    assert!(
        arrivals
            .pending(
                |n| n == "job-1" || n == "job-2",
                tokio::time::Instant::now()
            )
            .fresh
            .is_empty()
    );
    assert!(arrivals.is_empty(), "both entries reached the cache");
    assert_eq!(user_running(&bed, "alice").await.as_deref(), Some("1"));
    bed.finish(scenario).await;
}
