//! Pod status as the v1.28 kubelet computes it: the phase from the container states, the
//! conditions it owns, and the container statuses. Pure, so the rules are unit-tested.

use serde_json::{Value, json};

/// The conditions this kubelet owns; any other condition on the pod (`PodScheduled` from the
/// scheduler, `DisruptionTarget` from the Eviction API, ...) is kept as it is.
const OWNED: [&str; 3] = ["Initialized", "Ready", "ContainersReady"];

/// One container's state, as in `ContainerStatus.state`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: Option<String>,
        finished_at: String,
    },
}

impl CState {
    pub(crate) fn waiting(reason: &str) -> Self {
        CState::Waiting {
            reason: reason.to_string(),
            message: None,
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        matches!(self, CState::Running { .. })
    }

    pub(crate) fn is_terminated(&self) -> bool {
        matches!(self, CState::Terminated { .. })
    }

    pub(crate) fn exit_code(&self) -> Option<i32> {
        match self {
            CState::Terminated { exit_code, .. } => Some(*exit_code),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            CState::Waiting { reason, message } => {
                let mut w = json!({"reason": reason});
                if let Some(m) = message {
                    w["message"] = json!(m);
                }
                json!({"waiting": w})
            }
            CState::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            CState::Terminated {
                exit_code,
                signal,
                reason,
                message,
                started_at,
                finished_at,
            } => {
                let mut t =
                    json!({"exitCode": exit_code, "reason": reason, "finishedAt": finished_at});
                if let Some(s) = signal {
                    t["signal"] = json!(s);
                }
                if let Some(m) = message {
                    t["message"] = json!(m);
                }
                if let Some(s) = started_at {
                    t["startedAt"] = json!(s);
                }
                json!({"terminated": t})
            }
        }
    }
}

/// A container as the status shows it.
#[derive(Debug, Clone)]
pub(crate) struct ContainerView {
    pub name: String,
    pub image: String,
    pub container_id: Option<String>,
    pub state: CState,
}

impl ContainerView {
    fn to_json(&self, ready: bool) -> Value {
        let pulled = !matches!(&self.state, CState::Waiting { reason, .. }
            if reason == "ErrImagePull" || reason == "ImagePullBackOff");
        let mut v = json!({
            "name": self.name,
            "image": self.image,
            "imageID": if pulled { format!("repobox-kubelet://{}", self.image) } else { String::new() },
            "ready": ready,
            "started": self.state.is_running(),
            "restartCount": 0,
            "state": self.state.to_json(),
        });
        if let Some(id) = &self.container_id {
            v["containerID"] = json!(id);
        }
        v
    }
}

/// Everything the kubelet knows about a pod that shows in its status.
#[derive(Debug, Clone)]
pub(crate) struct PodView {
    pub init: Vec<ContainerView>,
    pub containers: Vec<ContainerView>,
    pub restart_policy: String,
    pub start_time: String,
    pub host_ip: String,
    pub pod_ip: String,
    /// A pod-level outcome that overrides the computed phase: (reason, message), phase Failed
    /// (e.g. `DeadlineExceeded`).
    pub failed: Option<(String, String)>,
    /// Force phase `Failed` without a pod reason (a stop that keeps the pod, e.g. an emulated
    /// eviction or a Job deadline on the emulator).
    pub force_failed: bool,
    /// Extra conditions the kubelet sets itself: (type, reason, message), status True.
    pub extra_conditions: Vec<(String, String, String)>,
    /// Nothing will run any more (every container ended or the pod was stopped): the phase is
    /// computed as for restartPolicy Never, as the 1.27+ kubelet does for terminal pods.
    pub terminal: bool,
}

/// The pod phase, following the kubelet's `getPhase` for restart policies Never/OnFailure/Always
/// (this kubelet never restarts containers, so only the first run counts).
pub(crate) fn pod_phase(
    init: &[ContainerView],
    containers: &[ContainerView],
    restart_policy: &str,
) -> &'static str {
    let mut pending_init = 0;
    let mut failed_init = 0;
    for c in init {
        match c.state.exit_code() {
            Some(0) => {}
            Some(_) => failed_init += 1,
            None => pending_init += 1,
        }
    }
    if failed_init > 0 {
        return if restart_policy == "Never" {
            "Failed"
        } else {
            "Pending"
        };
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in containers {
        match &c.state {
            CState::Running { .. } => running += 1,
            CState::Waiting { .. } => waiting += 1,
            CState::Terminated { exit_code, .. } => {
                stopped += 1;
                if *exit_code == 0 {
                    succeeded += 1;
                }
            }
        }
    }
    if pending_init > 0 || waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped > 0 {
        return match restart_policy {
            "Always" => "Running",
            _ if stopped == succeeded => "Succeeded",
            "OnFailure" => "Running",
            _ => "Failed",
        };
    }
    "Pending"
}

/// The conditions the kubelet owns, as (type, status, reason, message).
pub(crate) fn owned_conditions(
    phase: &str,
    init: &[ContainerView],
    containers: &[ContainerView],
) -> Vec<(String, String, Option<String>, Option<String>)> {
    let incomplete: Vec<&str> = init
        .iter()
        .filter(|c| c.state.exit_code() != Some(0))
        .map(|c| c.name.as_str())
        .collect();
    let initialized = if incomplete.is_empty() {
        ("Initialized".into(), "True".into(), None, None)
    } else {
        (
            "Initialized".into(),
            "False".into(),
            Some("ContainersNotInitialized".into()),
            Some(format!(
                "containers with incomplete status: [{}]",
                incomplete.join(" ")
            )),
        )
    };
    let unready: Vec<&str> = containers
        .iter()
        .filter(|c| !c.state.is_running())
        .map(|c| c.name.as_str())
        .collect();
    let (status, reason, message) = if phase == "Succeeded" {
        ("False", Some("PodCompleted".to_string()), None)
    } else if unready.is_empty() && phase == "Running" {
        ("True", None, None)
    } else {
        (
            "False",
            Some("ContainersNotReady".to_string()),
            Some(format!(
                "containers with unready status: [{}]",
                unready.join(" ")
            )),
        )
    };
    vec![
        initialized,
        (
            "Ready".into(),
            status.into(),
            reason.clone(),
            message.clone(),
        ),
        ("ContainersReady".into(), status.into(), reason, message),
    ]
}

/// Merge the desired conditions into the pod's current ones: conditions owned by others are
/// kept, a condition whose status did not change keeps its `lastTransitionTime`, and
/// `PodScheduled` is added when the pod was bound without a scheduler.
pub(crate) fn merge_conditions(
    existing: &[Value],
    desired: &[(String, String, Option<String>, Option<String>)],
    now: &str,
) -> Vec<Value> {
    let type_of = |c: &Value| c["type"].as_str().unwrap_or_default().to_string();
    let mut out: Vec<Value> = Vec::new();
    if !existing.iter().any(|c| type_of(c) == "PodScheduled") {
        out.push(
            json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null,
                        "lastTransitionTime": now}),
        );
    }
    let desired_types: Vec<&str> = desired.iter().map(|d| d.0.as_str()).collect();
    for c in existing {
        let t = type_of(c);
        if !OWNED.contains(&t.as_str()) && !desired_types.contains(&t.as_str()) {
            out.push(c.clone());
        }
    }
    for (type_, status, reason, message) in desired {
        let previous = existing.iter().find(|c| type_of(c) == *type_);
        let transition = match previous {
            Some(p) if p["status"].as_str() == Some(status.as_str()) => p
                .get("lastTransitionTime")
                .cloned()
                .unwrap_or_else(|| json!(now)),
            _ => json!(now),
        };
        let mut c = json!({"type": type_, "status": status, "lastProbeTime": null,
                           "lastTransitionTime": transition});
        if let Some(r) = reason {
            c["reason"] = json!(r);
        }
        if let Some(m) = message {
            c["message"] = json!(m);
        }
        out.push(c);
    }
    out
}

/// The phase this view results in.
pub(crate) fn phase_of(view: &PodView) -> &'static str {
    if view.failed.is_some() || view.force_failed {
        return "Failed";
    }
    let policy = if view.terminal {
        "Never"
    } else {
        view.restart_policy.as_str()
    };
    pod_phase(&view.init, &view.containers, policy)
}

/// The full `status` object to write, given the pod's current conditions.
pub(crate) fn pod_status(view: &PodView, existing_conditions: &[Value], now: &str) -> Value {
    let phase = phase_of(view);
    let mut desired = owned_conditions(phase, &view.init, &view.containers);
    for (type_, reason, message) in &view.extra_conditions {
        desired.push((
            type_.clone(),
            "True".into(),
            Some(reason.clone()),
            Some(message.clone()),
        ));
    }
    let conditions = merge_conditions(existing_conditions, &desired, now);
    let ready_all = phase == "Running";
    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": view.host_ip,
        "podIP": view.pod_ip,
        "podIPs": [{"ip": view.pod_ip}],
        "startTime": view.start_time,
        "containerStatuses": view.containers.iter()
            .map(|c| c.to_json(ready_all && c.state.is_running()))
            .collect::<Vec<_>>(),
    });
    if !view.init.is_empty() {
        status["initContainerStatuses"] = view
            .init
            .iter()
            .map(|c| c.to_json(c.state.exit_code() == Some(0)))
            .collect();
    }
    if let Some((reason, message)) = &view.failed {
        status["reason"] = json!(reason);
        status["message"] = json!(message);
    }
    status
}

/// The `terminated.reason` for an exit: what a container runtime reports.
pub(crate) fn exit_reason(exit_code: i32, oom_killed: bool) -> &'static str {
    if oom_killed {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, state: CState) -> ContainerView {
        ContainerView {
            name: name.into(),
            image: "img".into(),
            container_id: None,
            state,
        }
    }
    fn term(code: i32) -> CState {
        CState::Terminated {
            exit_code: code,
            signal: None,
            reason: exit_reason(code, false).into(),
            message: None,
            started_at: None,
            finished_at: "t".into(),
        }
    }
    fn run() -> CState {
        CState::Running {
            started_at: "t".into(),
        }
    }

    #[test]
    fn phase_follows_the_kubelet() {
        let w = CState::waiting("ContainerCreating");
        assert_eq!(pod_phase(&[], &[c("a", w.clone())], "Never"), "Pending");
        assert_eq!(pod_phase(&[], &[c("a", run())], "Never"), "Running");
        // One done, one still running: Running.
        assert_eq!(
            pod_phase(&[], &[c("a", term(0)), c("b", run())], "Never"),
            "Running"
        );
        // One waiting (image pull) while another runs: Pending.
        assert_eq!(
            pod_phase(&[], &[c("a", run()), c("b", w.clone())], "Never"),
            "Pending"
        );
        assert_eq!(
            pod_phase(&[], &[c("a", term(0)), c("b", term(0))], "Never"),
            "Succeeded"
        );
        assert_eq!(
            pod_phase(&[], &[c("a", term(0)), c("b", term(1))], "Never"),
            "Failed"
        );
        assert_eq!(pod_phase(&[], &[c("a", term(1))], "OnFailure"), "Running");
        assert_eq!(pod_phase(&[], &[c("a", term(0))], "Always"), "Running");
        // Init containers gate everything.
        assert_eq!(
            pod_phase(&[c("i", run())], &[c("a", w.clone())], "Never"),
            "Pending"
        );
        assert_eq!(
            pod_phase(&[c("i", term(2))], &[c("a", w.clone())], "Never"),
            "Failed"
        );
        assert_eq!(
            pod_phase(&[c("i", term(2))], &[c("a", w)], "OnFailure"),
            "Pending"
        );
        assert_eq!(
            pod_phase(&[c("i", term(0))], &[c("a", run())], "Never"),
            "Running"
        );
    }

    #[test]
    fn conditions_name_the_containers_and_keep_others() {
        let init = [c("install", run())];
        let containers = [
            c("runner", CState::waiting("PodInitializing")),
            c("agent", CState::waiting("PodInitializing")),
        ];
        let owned = owned_conditions("Pending", &init, &containers);
        assert_eq!(owned[0].1, "False");
        assert_eq!(
            owned[0].3.as_deref(),
            Some("containers with incomplete status: [install]")
        );
        assert_eq!(
            owned[1].3.as_deref(),
            Some("containers with unready status: [runner agent]")
        );

        let existing = vec![
            json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": "t0"}),
            json!({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}),
            json!({"type": "Initialized", "status": "False", "lastTransitionTime": "t0"}),
        ];
        let merged = merge_conditions(&existing, &owned, "t1");
        let types: Vec<&str> = merged.iter().filter_map(|c| c["type"].as_str()).collect();
        assert_eq!(
            types,
            [
                "PodScheduled",
                "DisruptionTarget",
                "Initialized",
                "Ready",
                "ContainersReady"
            ]
        );
        // Unchanged status keeps its transition time; new ones get now.
        assert_eq!(merged[2]["lastTransitionTime"], "t0");
        assert_eq!(merged[3]["lastTransitionTime"], "t1");
        // A pod bound without a scheduler gets PodScheduled.
        let merged = merge_conditions(&[], &owned, "t1");
        assert_eq!(merged[0]["type"], "PodScheduled");
    }

    #[test]
    fn status_json_has_what_a_kubelet_writes() {
        let view = PodView {
            init: vec![c("install", term(0))],
            containers: vec![c("runner", run()), c("agent", run())],
            restart_policy: "Never".into(),
            start_time: "t0".into(),
            host_ip: "127.0.0.1".into(),
            pod_ip: "127.0.0.1".into(),
            failed: None,
            force_failed: false,
            extra_conditions: vec![],
            terminal: false,
        };
        let s = pod_status(&view, &[], "t1");
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["containerStatuses"][1]["ready"], true);
        assert_eq!(s["containerStatuses"][1]["started"], true);
        assert_eq!(
            s["initContainerStatuses"][0]["state"]["terminated"]["reason"],
            "Completed"
        );
        assert_eq!(s["podIPs"][0]["ip"], "127.0.0.1");
        let ready = s["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(ready["status"], "True");

        let mut failed = view.clone();
        failed.failed = Some((
            "DeadlineExceeded".into(),
            "Pod was active on the node longer than the specified deadline".into(),
        ));
        let s = pod_status(&failed, &[], "t1");
        assert_eq!(
            (s["phase"].as_str(), s["reason"].as_str()),
            (Some("Failed"), Some("DeadlineExceeded"))
        );

        let mut always = view.clone();
        always.restart_policy = "Always".into();
        always.containers = vec![c("runner", term(0)), c("agent", term(1))];
        assert_eq!(phase_of(&always), "Running", "would be restarted");
        always.terminal = true;
        assert_eq!(phase_of(&always), "Failed", "stopped for good");

        let mut done = view;
        done.containers = vec![c("runner", term(0)), c("agent", term(0))];
        let s = pod_status(&done, &[], "t1");
        assert_eq!(s["phase"], "Succeeded");
        let ready = s["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(ready["reason"], "PodCompleted");
    }
}
