//! Node registration and heartbeats, as the v1.28 kubelet does them: the Node with capacity,
//! addresses, node info and a `Ready` condition, then every interval a renewed Lease in
//! `kube-node-lease` (what the node lifecycle controller reads first) and a fresh
//! `lastHeartbeatTime` on the conditions.

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::{NodeSettings, now};

/// How long a Lease stays valid without renewal (the kubelet's default).
const LEASE_DURATION_SECONDS: i32 = 40;

/// The kubelet's node conditions; `Ready=False` (`KubeletNotReady`, the shutdown manager's
/// error as the message) while the node shuts down.
fn conditions(heartbeat: &str, transition: &str, shutting_down: bool) -> Value {
    let c = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": heartbeat, "lastTransitionTime": transition})
    };
    json!([
        c(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        c(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        c(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        if shutting_down {
            c("Ready", "False", "KubeletNotReady", "node is shutting down")
        } else {
            c(
                "Ready",
                "True",
                "KubeletReady",
                "kubelet is posting ready status",
            )
        },
    ])
}

/// The Node's status at registration.
pub(crate) fn node_status(settings: &NodeSettings, node_ip: &str, t: &str) -> Value {
    let resources = json!({
        "cpu": settings.cpu, "memory": settings.memory,
        "ephemeral-storage": settings.ephemeral_storage, "pods": settings.pods,
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let machine_id = std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({
        "capacity": resources, "allocatable": resources,
        "conditions": conditions(t, t, false),
        "addresses": [{"type": "InternalIP", "address": node_ip},
                      {"type": "Hostname", "address": settings.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": machine_id, "systemUUID": machine_id, "bootID": boot_id,
            "kernelVersion": kernel, "osImage": "repobox test bed",
            "containerRuntimeVersion": "repobox-kubelet://0.1.0",
            "kubeletVersion": "v1.28.7", "kubeProxyVersion": "v1.28.7",
            "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
        },
    })
}

/// Create (or take over) the Node and its Lease.
pub(crate) async fn register(
    client: &Client,
    settings: &NodeSettings,
    node_ip: &str,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let name = &settings.name;
    let mut labels = settings.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), "amd64".into());
    let t = now();
    let status = node_status(settings, node_ip, &t);
    let node = match nodes.get_opt(name).await.context("get Node")? {
        Some(n) => n,
        None => {
            // Status is sent on create (a real API server keeps it) and patched below (the
            // emulator drops it on create).
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels},
                "spec": {"taints": settings.taints},
                "status": status,
            }))
            .context("build Node")?;
            nodes
                .create(&PostParams::default(), &node)
                .await
                .with_context(|| format!("create Node {name}"))?
        }
    };
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .with_context(|| format!("Node {name} status"))?;
    renew_lease(client, name, node.uid().as_deref()).await
}

/// Renew the node's Lease (creating it when missing).
pub(crate) async fn renew_lease(client: &Client, name: &str, node_uid: Option<&str>) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renew = MicroTime(jiff::Timestamp::now());
    let patch = json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                                "renewTime": renew}});
    match leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let mut lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": patch["spec"]});
            if let Some(uid) = node_uid {
                lease["metadata"]["ownerReferences"] =
                    json!([{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]);
            }
            let lease: Lease = serde_json::from_value(lease).context("build Lease")?;
            leases
                .create(&PostParams::default(), &lease)
                .await
                .with_context(|| format!("create Lease kube-node-lease/{name}"))?;
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("renew Lease kube-node-lease/{name}")),
    }
}

/// One heartbeat: the Lease, then the conditions' `lastHeartbeatTime` (and `Ready=False` once
/// the node is shutting down).
pub(crate) async fn heartbeat(
    client: &Client,
    settings: &NodeSettings,
    shutting_down: bool,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .get_opt(&settings.name)
        .await
        .context("get Node")?
        .with_context(|| format!("Node {} is gone", settings.name))?;
    renew_lease(client, &settings.name, node.uid().as_deref()).await?;
    let ready = if shutting_down { "False" } else { "True" };
    let transition = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == ready))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_else(now);
    nodes
        .patch_status(
            &settings.name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"conditions": conditions(&now(), &transition, shutting_down)}}),
            ),
        )
        .await
        .with_context(|| format!("Node {} heartbeat", settings.name))?;
    Ok(())
}
