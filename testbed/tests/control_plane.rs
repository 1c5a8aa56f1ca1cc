//! The real control plane fixture: one control plane for this test binary
//! ([`ControlPlane::shared`]), each test in its own namespace. Needs `REPOBOX_K8S_ASSETS`;
//! without it every test prints the SKIPPED line and returns.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use repobox_testbed::control_plane::{ASSETS_ENV, ControlPlane, SKIP_MESSAGE};
use serde_json::json;

/// How long the tests wait for a controller or the RBAC cache to act.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `probe` until it returns `Some`, failing after [`CONVERGE_TIMEOUT`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {CONVERGE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A container that satisfies the `restricted` Pod Security level.
fn restricted_container() -> serde_json::Value {
    json!({
        "name": "main",
        "image": "registry.example/runner:1",
        "command": ["true"],
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "runAsNonRoot": true,
            "seccompProfile": { "type": "RuntimeDefault" }
        }
    })
}

fn forbidden_message(result: kube::Result<impl std::fmt::Debug>) -> Result<String> {
    match result {
        Err(kube::Error::Api(status)) if status.is_forbidden() => Ok(status.message.clone()),
        other => bail!("expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn control_plane_starts_and_admin_lists_namespaces() -> Result<()> {
    let Some(cp) = ControlPlane::shared().await? else {
        return Ok(());
    };
    eprintln!(
        "control plane at {} started in {:?}",
        cp.server_url(),
        cp.started_in()
    );
    assert!(cp.server_url().starts_with("https://127.0.0.1:"));
    assert!(cp.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));

    let names: Vec<String> = Api::<Namespace>::all(cp.client()?)
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter_map(|ns| ns.metadata.name)
        .collect();
    for expected in ["default", "kube-system", "kube-public"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    // The admin kubeconfig file works on its own, as kubectl would use it.
    let kubeconfig = Kubeconfig::read_from(cp.kubeconfig_path())?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        cp.server_url()
    );
    let client = kube::Client::try_from(config)?;
    let version = client.apiserver_version().await?;
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "28")
    );
    Ok(())
}

#[tokio::test]
async fn restricted_namespace_rejects_privileged_pod_and_accepts_restricted_one() -> Result<()> {
    let Some(cp) = ControlPlane::shared().await? else {
        return Ok(());
    };
    let ns = cp
        .namespace_with_labels(
            "psa",
            &[("pod-security.kubernetes.io/enforce", "restricted")],
        )
        .await?;
    let pods = Api::<Pod>::namespaced(cp.client()?, &ns);

    let privileged: Pod = serde_json::from_value(json!({
        "metadata": { "name": "privileged" },
        "spec": { "containers": [{
            "name": "main",
            "image": "registry.example/runner:1",
            "securityContext": { "privileged": true }
        }]}
    }))?;
    let message = forbidden_message(pods.create(&PostParams::default(), &privileged).await)?;
    assert!(
        message.contains("violates PodSecurity \"restricted:latest\""),
        "rejected, but not by Pod Security admission: {message}"
    );

    let restricted: Pod = serde_json::from_value(json!({
        "metadata": { "name": "restricted" },
        "spec": { "containers": [restricted_container()] }
    }))?;
    let created = pods.create(&PostParams::default(), &restricted).await?;
    assert_eq!(created.metadata.namespace.as_deref(), Some(ns.as_str()));
    assert!(pods.get_opt("privileged").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn job_controller_creates_a_pod_owned_by_the_job_and_scheduler_sees_it() -> Result<()> {
    let Some(cp) = ControlPlane::shared().await? else {
        return Ok(());
    };
    let ns = cp
        .namespace_with_labels(
            "job",
            &[("pod-security.kubernetes.io/enforce", "restricted")],
        )
        .await?;
    let client = cp.client()?;
    let job: Job = serde_json::from_value(json!({
        "metadata": { "name": "probe" },
        "spec": {
            "backoffLimit": 0,
            "template": { "spec": {
                "restartPolicy": "Never",
                "containers": [restricted_container()]
            }}
        }
    }))?;
    let job = Api::<Job>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &job)
        .await?;
    let job_uid = job.metadata.uid.context("job uid")?;

    let pods = Api::<Pod>::namespaced(client, &ns);
    let selector = ListParams::default().labels("batch.kubernetes.io/job-name=probe");
    let pod = eventually("the Job controller creates a pod", || {
        let pods = pods.clone();
        let selector = selector.clone();
        async move { Ok(pods.list(&selector).await?.items.into_iter().next()) }
    })
    .await?;
    let owner = pod
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|o| o.controller == Some(true))
        .context("the pod has no controller owner")?;
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("Job", "probe", job_uid.as_str())
    );

    // No Node exists: the real scheduler marks the pod unschedulable, and it stays Pending.
    let pod_name = pod.metadata.name.context("pod name")?;
    let reason = eventually("the scheduler reports the pod unschedulable", || {
        let pods = pods.clone();
        let pod_name = pod_name.clone();
        async move {
            let pod = pods.get(&pod_name).await?;
            let status = pod.status.unwrap_or_default();
            Ok(status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .and_then(|c| c.reason)
                .map(|reason| (reason, status.phase)))
        }
    })
    .await?;
    assert_eq!(
        reason,
        ("Unschedulable".to_string(), Some("Pending".to_string()))
    );
    Ok(())
}

#[tokio::test]
async fn service_account_gets_exactly_what_its_role_grants() -> Result<()> {
    let Some(cp) = ControlPlane::shared().await? else {
        return Ok(());
    };
    let ns = cp.namespace("rbac").await?;
    let admin = cp.client()?;
    let account: ServiceAccount =
        serde_json::from_value(json!({ "metadata": { "name": "operator" } }))?;
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &account)
        .await?;

    let as_operator = cp.service_account_client(&ns, "operator").await?;
    let configmaps = Api::<ConfigMap>::namespaced(as_operator, &ns);
    let message = forbidden_message(configmaps.list(&ListParams::default()).await)?;
    assert!(
        message.contains(&format!("system:serviceaccount:{ns}:operator")),
        "403 names someone else: {message}"
    );

    let role: Role = serde_json::from_value(json!({
        "metadata": { "name": "read-configmaps" },
        "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"] }]
    }))?;
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "operator-reads-configmaps" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps" },
        "subjects": [{ "kind": "ServiceAccount", "name": "operator", "namespace": ns }]
    }))?;
    Api::<RoleBinding>::namespaced(admin, &ns)
        .create(&PostParams::default(), &binding)
        .await?;

    let listed = eventually("the RoleBinding takes effect", || {
        let configmaps = configmaps.clone();
        async move {
            match configmaps.list(&ListParams::default()).await {
                // The root-CA publisher may not have reached this new namespace yet.
                Ok(list) if list.items.is_empty() => Ok(None),
                Ok(list) => Ok(Some(list.items.len())),
                Err(kube::Error::Api(s)) if s.is_forbidden() => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await?;
    // The namespace's `kube-root-ca.crt`, published by the controller-manager.
    assert!(
        listed >= 1,
        "expected kube-root-ca.crt, got {listed} ConfigMaps"
    );

    // The grant is read-only.
    let cm: ConfigMap = serde_json::from_value(json!({ "metadata": { "name": "x" } }))?;
    forbidden_message(configmaps.create(&PostParams::default(), &cm).await)?;

    // The kubeconfig form authenticates as the same account.
    let path = cp.service_account_kubeconfig(&ns, "operator").await?;
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&path)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    assert_eq!(config.default_namespace, ns);
    let from_file = Api::<ConfigMap>::namespaced(kube::Client::try_from(config)?, &ns);
    from_file.get("kube-root-ca.crt").await?;
    forbidden_message(from_file.create(&PostParams::default(), &cm).await)?;
    Ok(())
}

/// Runs one test of this binary in a child process without `REPOBOX_K8S_ASSETS`, with
/// libtest's output capture on, and checks that the SKIPPED line still reaches the terminal.
#[test]
fn without_assets_the_tests_say_skipped() -> Result<()> {
    let test = "control_plane_starts_and_admin_lists_namespaces";
    let output = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", test, "--test-threads=1"])
        .env_remove(ASSETS_ENV)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{stdout}");
    let skipped: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(SKIP_MESSAGE))
        .collect();
    assert_eq!(skipped, [format!("{SKIP_MESSAGE} [{test}]")], "{stderr}");
    Ok(())
}
