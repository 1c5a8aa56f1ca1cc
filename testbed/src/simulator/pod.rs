//! The pod part: one pod per attempt, created from the Job's template and bound to the
//! kubelet's node (or held `Pending`), then followed on the kubelet to its end. Running the
//! containers, their env, volumes and pod status are the kubelet's ([`crate::kubelet`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use rand::Rng;
use serde_json::json;
use tokio::sync::mpsc;

use super::job::{Outcome, patch_status};
use super::{NODE_NAME, PodFailure, Shared, SimEvent, SimulatorConfig, Stop};
use crate::kubelet::{ContainerExit, Fault, KubeletEvent, now};

/// The Job's pods are held `Pending` (unschedulable): every pod, or the Job (or its template)
/// carries the hold label.
pub(super) fn is_held(cfg: &SimulatorConfig, job: &Job) -> bool {
    let template_labels = job
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.as_ref());
    cfg.hold_pending
        || cfg.hold_pending_label.as_ref().is_some_and(|(k, v)| {
            job.labels().get(k) == Some(v) || template_labels.and_then(|l| l.get(k)) == Some(v)
        })
}

/// The pod the job controller creates for one attempt: the template with the job labels, owned
/// by the Job; bound to the kubelet's node unless `held` (never scheduled).
pub(super) fn pod_for(job: &Job, uid: &str, pod_name: &str, held: bool) -> Result<Pod> {
    let ns = job.namespace().unwrap_or_default();
    let job_name = job.name_any();
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let tmeta = template.metadata.clone().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = tmeta.labels.clone().unwrap_or_default();
    labels.insert("job-name".into(), job_name.clone());
    labels.insert("batch.kubernetes.io/job-name".into(), job_name.clone());
    labels.insert("controller-uid".into(), uid.to_string());
    labels.insert("batch.kubernetes.io/controller-uid".into(), uid.to_string());
    let pod_spec = template.spec.clone().unwrap_or_default();
    let mut spec_json = serde_json::to_value(&pod_spec).context("pod spec")?;
    if !held {
        spec_json["nodeName"] = json!(NODE_NAME);
    }
    let pod_json = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod_name, "namespace": ns, "labels": labels,
            "annotations": tmeta.annotations.clone().unwrap_or_default(),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid,
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": spec_json,
    });
    serde_json::from_value(pod_json).context("build the pod")
}

/// How a pod the kubelet finished ended, and the exit that decided it (the first failing
/// container, else the first failing init container, else the first container). A pod that
/// "succeeded" after the deadline stopped it counts as failed; a failure without a non-zero code
/// counts as 1.
pub(super) fn finished(
    phase: &str,
    disruption: Option<String>,
    init: Vec<ContainerExit>,
    containers: Vec<ContainerExit>,
    deleted: bool,
    deadline_hit: bool,
) -> (Outcome, Option<ContainerExit>) {
    let decisive = containers
        .iter()
        .find(|c| c.exit_code != 0)
        .or_else(|| init.iter().find(|c| c.exit_code != 0))
        .or_else(|| containers.first())
        .cloned();
    let succeeded = phase == "Succeeded" && !deadline_hit;
    let code = decisive.as_ref().map_or(137, |c| c.exit_code);
    let reason = decisive
        .as_ref()
        .map_or_else(|| "Error".to_string(), |c| c.reason.clone());
    let out = Outcome {
        succeeded,
        code: if succeeded || code != 0 { code } else { 1 },
        reason,
        disruption,
        exits: init.into_iter().chain(containers).collect(),
        deadline: deadline_hit,
        deleted,
    };
    (out, decisive)
}

/// A pod held `Pending` failed without running: `code`/`reason` on its first container.
fn held_failure(
    container: &str,
    code: i32,
    reason: &str,
    disruption: Option<&str>,
    deadline: bool,
) -> Outcome {
    Outcome {
        succeeded: false,
        code,
        reason: reason.into(),
        disruption: disruption.map(str::to_string),
        exits: vec![ContainerExit {
            name: container.to_string(),
            exit_code: code,
            signal: None,
            reason: reason.into(),
        }],
        deadline,
        deleted: false,
    }
}

/// Five characters like the job controller's pod name suffixes.
fn random_suffix() -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// Create one pod for the Job and follow it on the kubelet to its end.
pub(super) async fn run_pod(
    shared: &Arc<Shared>,
    job: &Job,
    uid: &str,
    deadline: Option<tokio::time::Instant>,
    stop: &mut mpsc::UnboundedReceiver<Stop>,
) -> Result<Outcome> {
    let ns = job.namespace().unwrap_or_default();
    let job_name = job.name_any();
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let pod_name = format!("{job_name}-{}", random_suffix());
    let held = is_held(&shared.cfg, job);
    let pod = pod_for(job, uid, &pod_name, held)?;
    // Follow the kubelet from before the pod exists: no event can be missed.
    let mut cursor = shared.kubelet.cursor();
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create Pod {pod_name}"))?;
    if let Some(run) = shared.lock().runs.get_mut(uid) {
        run.pod = Some(pod_name.clone());
    }
    shared.emit(SimEvent::PodCreated {
        namespace: ns.clone(),
        job: job_name.clone(),
        pod: pod_name.clone(),
    });
    let first_container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone())
        .context("pod template without containers")?;
    if held {
        return hold(
            shared,
            &pods,
            &ns,
            &job_name,
            &pod_name,
            &first_container,
            deadline,
            stop,
        )
        .await;
    }

    let jobs: Api<Job> = Api::namespaced(shared.client.clone(), &ns);
    let (mut started, mut deadline_hit, mut pull_reported) = (false, false, false);
    loop {
        let sleep = async {
            match deadline {
                Some(d) if !deadline_hit => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = cursor.next() => {
                let Some(ev) = ev else { bail!("the kubelet stopped") };
                let ours = |namespace: &str, pod: &str| namespace == ns && pod == pod_name;
                match ev {
                    KubeletEvent::ImagePullError { namespace, pod, .. }
                        if ours(&namespace, &pod) && !pull_reported =>
                    {
                        pull_reported = true;
                        shared.emit(SimEvent::PodPending {
                            namespace, job: job_name.clone(), pod, reason: "ErrImagePull".into(),
                        });
                    }
                    KubeletEvent::PodRunning { namespace, pod, pid } if ours(&namespace, &pod) => {
                        started = true;
                        patch_status(&jobs, &job_name, json!({"active": 1, "ready": 1})).await?;
                        shared.emit(SimEvent::PodStarted { namespace, job: job_name.clone(), pod, pid });
                    }
                    KubeletEvent::Sigterm { namespace, pod, .. } if ours(&namespace, &pod) => {
                        shared.emit(SimEvent::Sigterm { namespace, job: job_name.clone(), pod });
                    }
                    KubeletEvent::Error { namespace, pod, message } if ours(&namespace, &pod) => {
                        shared.emit(SimEvent::Error {
                            namespace, job: job_name.clone(), message: format!("pod {pod}: {message}"),
                        });
                    }
                    KubeletEvent::PodFinished {
                        namespace, pod, phase, disruption, init, containers, deleted, ..
                    } if ours(&namespace, &pod) => {
                        let (out, decisive) =
                            finished(&phase, disruption, init, containers, deleted, deadline_hit);
                        if started {
                            shared.emit(SimEvent::PodExited {
                                namespace: ns.clone(),
                                job: job_name.clone(),
                                pod: pod_name.clone(),
                                code: decisive.as_ref().and_then(|c| c.signal.is_none().then_some(c.exit_code)),
                                signal: decisive.as_ref().and_then(|c| c.signal),
                            });
                        }
                        if deleted {
                            shared.emit(SimEvent::Stopped { namespace: ns, job: job_name, pod: pod_name });
                        }
                        return Ok(out);
                    }
                    _ => {}
                }
            }
            s = stop.recv() => match s {
                Some(Stop::Fail(f)) => {
                    let fault = match f {
                        PodFailure::OomKilled => Fault::OomKill { container: None },
                        PodFailure::Evicted => Fault::Evict,
                    };
                    if let Err(e) = shared.kubelet.fault(&ns, &pod_name, fault) {
                        shared.emit(SimEvent::Error { namespace: ns.clone(), job: job_name.clone(), message: format!("{e:#}") });
                    }
                }
                Some(Stop::Deleted) | None => {
                    // The kubelet stops the containers when the pod goes.
                    match pods.delete(&pod_name, &DeleteParams::background()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => shared.emit(SimEvent::Error { namespace: ns.clone(), job: job_name.clone(), message: format!("delete pod {pod_name}: {e}") }),
                    }
                }
            },
            _ = sleep => {
                // The Job's deadline: stop the pod and keep it, Failed.
                deadline_hit = true;
                if let Err(e) = shared.kubelet.fault(&ns, &pod_name, Fault::Terminate) {
                    shared.emit(SimEvent::Error { namespace: ns.clone(), job: job_name.clone(), message: format!("{e:#}") });
                }
            }
        }
    }
}

/// A pod that is never scheduled: `PodScheduled=False`, until a failure, deletion or deadline.
#[allow(clippy::too_many_arguments)]
async fn hold(
    shared: &Arc<Shared>,
    pods: &Api<Pod>,
    ns: &str,
    job_name: &str,
    pod_name: &str,
    container: &str,
    deadline: Option<tokio::time::Instant>,
    stop: &mut mpsc::UnboundedReceiver<Stop>,
) -> Result<Outcome> {
    patch_status(
        pods,
        pod_name,
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
          "reason": "Unschedulable", "lastProbeTime": null, "lastTransitionTime": now(),
          "message": "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."}]}),
    )
    .await?;
    shared.emit(SimEvent::PodPending {
        namespace: ns.to_string(),
        job: job_name.to_string(),
        pod: pod_name.to_string(),
        reason: "Unschedulable".into(),
    });
    let sleep_until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        s = stop.recv() => match s {
            Some(Stop::Fail(PodFailure::Evicted)) => {
                mark_pod_failed(pods, pod_name, container, 137, "Error", Some("EvictionByEvictionAPI")).await?;
                Ok(held_failure(container, 137, "Error", Some("EvictionByEvictionAPI"), false))
            }
            Some(Stop::Fail(PodFailure::OomKilled)) => {
                mark_pod_failed(pods, pod_name, container, 137, "OOMKilled", None).await?;
                Ok(held_failure(container, 137, "OOMKilled", None, false))
            }
            Some(Stop::Deleted) | None => {
                let _ = pods.delete(pod_name, &DeleteParams::default()).await;
                shared.emit(SimEvent::Stopped { namespace: ns.to_string(), job: job_name.to_string(), pod: pod_name.to_string() });
                Ok(Outcome { deleted: true, code: 137, reason: "Error".into(), ..Outcome::default() })
            }
        },
        _ = sleep_until => {
            mark_pod_failed(pods, pod_name, container, 137, "Error", None).await?;
            Ok(held_failure(container, 137, "Error", None, true))
        }
    }
}

async fn mark_pod_failed(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    code: i32,
    reason: &str,
    disruption: Option<&str>,
) -> Result<()> {
    let fin = now();
    let mut conditions = vec![
        json!({"type": "Ready", "status": "False", "reason": "PodFailed", "lastTransitionTime": fin}),
        json!({"type": "ContainersReady", "status": "False", "reason": "PodFailed", "lastTransitionTime": fin}),
    ];
    if let Some(d) = disruption {
        conditions.push(
            json!({"type": "DisruptionTarget", "status": "True", "reason": d,
            "message": "Eviction API: evicting", "lastTransitionTime": fin}),
        );
    }
    patch_status(
        pods,
        pod,
        json!({"phase": "Failed", "conditions": conditions,
           "containerStatuses": [{"name": container, "ready": false, "started": false, "restartCount": 0,
             "image": "", "imageID": "",
             "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": fin}}}]}),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(labels: serde_json::Value, template_labels: serde_json::Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": "build", "namespace": "ns", "labels": labels},
            "spec": {"template": {
                "metadata": {"labels": template_labels, "annotations": {"a": "b"}},
                "spec": {"restartPolicy": "Never",
                         "containers": [{"name": "main", "image": "runner:1"}]}}},
        }))
        .expect("job")
    }

    fn exit(name: &str, code: i32, signal: Option<i32>, reason: &str) -> ContainerExit {
        ContainerExit {
            name: name.into(),
            exit_code: code,
            signal,
            reason: reason.into(),
        }
    }

    #[test]
    fn held_by_the_switch_or_a_label_on_the_job_or_its_template() {
        let plain = job(json!({}), json!({}));
        assert!(!is_held(&SimulatorConfig::default(), &plain));
        let all = SimulatorConfig {
            hold_pending: true,
            ..SimulatorConfig::default()
        };
        assert!(is_held(&all, &plain));
        let by_label = SimulatorConfig {
            hold_pending_label: Some(("hold".into(), "yes".into())),
            ..SimulatorConfig::default()
        };
        assert!(!is_held(&by_label, &plain));
        assert!(is_held(&by_label, &job(json!({"hold": "yes"}), json!({}))));
        assert!(is_held(&by_label, &job(json!({}), json!({"hold": "yes"}))));
        assert!(!is_held(&by_label, &job(json!({"hold": "no"}), json!({}))));
    }

    #[test]
    fn the_pod_carries_the_job_labels_and_owner() {
        let j = job(json!({}), json!({"app": "runner"}));
        let pod = pod_for(&j, "uid-1", "build-abcde", false).expect("pod");
        assert_eq!(pod.metadata.name.as_deref(), Some("build-abcde"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("ns"));
        let labels = pod.metadata.labels.clone().expect("labels");
        for (k, v) in [
            ("app", "runner"),
            ("job-name", "build"),
            ("batch.kubernetes.io/job-name", "build"),
            ("controller-uid", "uid-1"),
            ("batch.kubernetes.io/controller-uid", "uid-1"),
        ] {
            assert_eq!(labels.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert_eq!(
            pod.metadata
                .annotations
                .clone()
                .expect("annotations")
                .get("a")
                .map(String::as_str),
            Some("b")
        );
        let owner = &pod.metadata.owner_references.clone().expect("owner")[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Job", "uid-1"));
        assert_eq!(owner.controller, Some(true));
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some(NODE_NAME));
        assert_eq!(spec.containers[0].name, "main");
        let held = pod_for(&j, "uid-1", "build-abcde", true).expect("pod");
        assert_eq!(held.spec.expect("spec").node_name, None);
    }

    #[test]
    fn the_first_failing_container_decides() {
        let (out, decisive) = finished(
            "Failed",
            None,
            vec![exit("init", 0, None, "Completed")],
            vec![
                exit("main", 0, None, "Completed"),
                exit("side", 3, None, "Error"),
            ],
            false,
            false,
        );
        assert_eq!(decisive.map(|c| c.name), Some("side".into()));
        assert!(!out.succeeded);
        assert_eq!((out.code, out.reason.as_str()), (3, "Error"));
        let names: Vec<_> = out.exits.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["init", "main", "side"], "init containers first");

        // A failed init container decides when no regular container failed.
        let (out, decisive) = finished(
            "Failed",
            None,
            vec![exit("init", 2, None, "Error")],
            Vec::new(),
            false,
            false,
        );
        assert_eq!(decisive.map(|c| c.name), Some("init".into()));
        assert_eq!(out.code, 2);
    }

    #[test]
    fn success_and_its_exceptions() {
        let ok = || vec![exit("main", 0, None, "Completed")];
        let (out, _) = finished("Succeeded", None, Vec::new(), ok(), false, false);
        assert!(out.succeeded);
        assert_eq!((out.code, out.reason.as_str()), (0, "Completed"));
        // Past the deadline a clean exit still fails the attempt, with code 1.
        let (out, _) = finished("Succeeded", None, Vec::new(), ok(), false, true);
        assert!(!out.succeeded && out.deadline);
        assert_eq!(out.code, 1);
        // A failed pod whose containers all exited 0 (e.g. evicted) counts as code 1.
        let (out, _) = finished(
            "Failed",
            Some("EvictionByEvictionAPI".into()),
            Vec::new(),
            ok(),
            false,
            false,
        );
        assert_eq!(out.code, 1);
        assert_eq!(out.disruption.as_deref(), Some("EvictionByEvictionAPI"));
    }

    #[test]
    fn no_container_ran_means_137_error() {
        let (out, decisive) = finished("Failed", None, Vec::new(), Vec::new(), true, false);
        assert!(decisive.is_none());
        assert_eq!((out.code, out.reason.as_str()), (137, "Error"));
        assert!(out.deleted);
    }

    #[test]
    fn a_signal_keeps_its_exit_code() {
        let (out, decisive) = finished(
            "Failed",
            None,
            Vec::new(),
            vec![exit("main", 137, Some(9), "OOMKilled")],
            false,
            false,
        );
        assert_eq!(decisive.and_then(|c| c.signal), Some(9));
        assert_eq!((out.code, out.reason.as_str()), (137, "OOMKilled"));
    }

    #[test]
    fn a_held_pod_fails_on_its_first_container() {
        let out = held_failure("main", 137, "OOMKilled", None, false);
        assert_eq!(out.exits, vec![exit("main", 137, None, "OOMKilled")]);
        assert!(!out.succeeded && !out.deleted && !out.deadline);
        let out = held_failure("main", 137, "Error", Some("EvictionByEvictionAPI"), true);
        assert_eq!(out.disruption.as_deref(), Some("EvictionByEvictionAPI"));
        assert!(out.deadline);
    }

    #[test]
    fn suffixes_look_like_the_job_controller_s() {
        let s = random_suffix();
        assert_eq!(s.len(), 5);
        assert!(
            s.bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b)),
            "{s}"
        );
    }
}
