//! The watches: Jobs start runs, deleted Jobs and pods stop them.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{mpsc, watch};

use super::job::{is_terminal, run_job};
use super::{Run, Shared, SimEvent, Stop};

/// Follows Jobs and their pods until `stop` changes or the watches end.
pub(super) async fn main_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let client = shared.client.clone();
    let (jobs, pods): (Api<Job>, Api<Pod>) = match &shared.cfg.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let job_events =
        watcher::watcher(jobs, watcher::Config::default()).map(|e| Either::Job(Box::new(e)));
    let pod_events = watcher::watcher(
        pods,
        watcher::Config::default().labels("batch.kubernetes.io/controller-uid"),
    )
    .map(|e| Either::Pod(Box::new(e)));
    let mut events = std::pin::pin!(futures::stream::select(job_events, pod_events));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            next = events.next() => match next {
                Some(Either::Job(e)) => match *e {
                    Ok(Event::Apply(job) | Event::InitApply(job)) => on_job(&shared, job),
                    Ok(Event::Delete(job)) => on_job_deleted(&shared, job).await,
                    Ok(_) => {}
                    Err(e) => watch_error(e).await,
                },
                Some(Either::Pod(e)) => match *e {
                    Ok(Event::Delete(pod)) => on_pod_gone(&shared, &pod),
                    Ok(Event::Apply(pod)) if pod.metadata.deletion_timestamp.is_some() => {
                        on_pod_gone(&shared, &pod);
                    }
                    Ok(_) => {}
                    Err(e) => watch_error(e).await,
                },
                None => break,
            },
        }
    }
    let runs: Vec<_> = shared.lock().runs.drain().collect();
    for (_, run) in runs {
        let _ = run.stop.send(Stop::Deleted);
    }
}

/// A failing watch is retried by the watcher itself; pause so a dead API is not hammered.
async fn watch_error(e: watcher::Error) {
    tracing::debug!(error = %e, "simulator watch error");
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Jobs and pods merged into one stream (boxed: the events are large).
enum Either {
    Job(Box<std::result::Result<Event<Job>, watcher::Error>>),
    Pod(Box<std::result::Result<Event<Pod>, watcher::Error>>),
}

fn on_job(shared: &Arc<Shared>, job: Job) {
    let Some(uid) = job.uid() else { return };
    if job.metadata.deletion_timestamp.is_some() {
        if let Some(run) = shared.lock().runs.get(&uid) {
            let _ = run.stop.send(Stop::Deleted);
        }
        return;
    }
    let mut state = shared.lock();
    if state.runs.contains_key(&uid) || is_terminal(&job) {
        return;
    }
    // A Job started by someone else (e.g. a previous simulator) is not ours to run.
    if job.status.as_ref().is_some_and(|s| s.start_time.is_some()) {
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    state.runs.insert(
        uid.clone(),
        Run {
            job: job.name_any(),
            pod: None,
            stop: tx,
        },
    );
    let task_shared = shared.clone();
    let task = tokio::spawn(async move {
        let shared = task_shared;
        let ns = job.namespace().unwrap_or_default();
        let name = job.name_any();
        if let Err(e) = run_job(&shared, &job, rx).await {
            shared.emit(SimEvent::Error {
                namespace: ns,
                job: name,
                message: format!("{e:#}"),
            });
        }
    });
    state.tasks.retain(|t| !t.is_finished());
    state.tasks.push(task);
}

async fn on_job_deleted(shared: &Arc<Shared>, job: Job) {
    let Some(uid) = job.uid() else { return };
    let (pod, stop) = {
        let state = shared.lock();
        match state.runs.get(&uid) {
            Some(run) => (run.pod.clone(), run.stop.clone()),
            None => return,
        }
    };
    let ns = job.namespace().unwrap_or_default();
    // The emulator's garbage collector runs before the DELETED event: the pod is either gone
    // (background propagation) or orphaned (batch/v1 default), as on a real cluster.
    if let Some(pod_name) = pod {
        let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
        if let Ok(Some(p)) = pods.get_opt(&pod_name).await
            && p.metadata.deletion_timestamp.is_none()
            && !p.owner_references().iter().any(|r| r.uid == uid)
        {
            shared.lock().runs.remove(&uid);
            shared.emit(SimEvent::PodOrphaned {
                namespace: ns,
                job: job.name_any(),
                pod: pod_name,
            });
            return;
        }
    }
    let _ = stop.send(Stop::Deleted);
}

fn on_pod_gone(shared: &Arc<Shared>, pod: &Pod) {
    let state = shared.lock();
    if let Some(run) = state
        .runs
        .values()
        .find(|r| r.pod.as_deref() == Some(pod.name_any().as_str()))
    {
        let _ = run.stop.send(Stop::Deleted);
    }
}
