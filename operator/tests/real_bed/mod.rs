//! The operator's test bed on a REAL Kubernetes control plane (kube-apiserver,
//! kube-controller-manager, kube-scheduler from `REPOBOX_K8S_ASSETS`; see
//! `repobox_testbed::control_plane`), the reference the emulator bed (`common`) is checked
//! against.
//!
//! Per test: a namespace enforcing Pod Security `restricted`, a Node of its own (the runner pods
//! are pinned to it through the chart's `runner.nodeSelector`, so parallel tests never run each
//! other's pods), the test bed's kubelet (isolated containers when root), a real `redis-server`
//! WITH a password and the git host. The chart is rendered with the real Helm library
//! (`tests/chart/render.py`); its ServiceAccounts, Roles, RoleBindings and Secrets are applied as
//! `helm install` would, and the operator runs in-process with the Deployment's environment
//! (turned into flags), authenticated as the chart's ServiceAccount (TokenRequest). The Job
//! controller, garbage collector, RBAC, Pod Security admission and CRD validation are the real
//! ones.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use clap::{CommandFactory, Parser};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use repobox_operator::config::Config;
use repobox_operator::model::crd::{RepoboxJob, RepoboxJobPhase};
use repobox_testbed::bed::{self, BedBuilder, ClusterKind};
use repobox_testbed::control_plane::ControlPlane;
use repobox_testbed::forge::ForgeKind;
use repobox_testbed::kubelet::{Kubelet, KubeletConfig, KubeletEvent, NodeSettings};
use repobox_testbed::webapp::NewJob;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "ghp_realClusterToken1234567890abcdef";
pub const KEY_HEX: &str = "5d2c1b0a39485766f5e4d3c2b1a0918273645546372819a0b1c2d3e4f5061728";
/// The Redis password; the runner Secret holds the URL with it.
pub const REDIS_PASSWORD: &str = "realRedisPassw0rd-e2e";
/// Generous: two cores shared with builds, etcd and the controllers.
pub const WAIT: Duration = Duration::from_secs(120);
/// The Helm release name the chart is rendered with.
const RELEASE: &str = "repobox";
/// The label pinning a test's runner pods to its own Node.
const NODE_LABEL: &str = "repobox.dev/e2e-node";

/// One test's world on the shared control plane: the test bed's [`bed::Bed`] (its fields
/// through `Deref`; `ns` is the test's namespace = release namespace = lease namespace) plus
/// the chart and the in-process operator.
pub struct RealBed {
    bed: bed::Bed,
    /// Admin client, for the test's own reads and for what `helm install` / `kubectl` do.
    pub admin: Client,
    /// A client authenticated as the chart's operator ServiceAccount.
    pub operator_client: Client,
    pub node: String,
    /// The operator Deployment's environment as the chart renders it (secrets resolved).
    chart_env: Vec<(String, String)>,
    /// The chart's operator ServiceAccount.
    pub service_account: String,
    /// The chart's Lease name.
    pub lease_name: String,
    operator: Option<(JoinHandle<repobox_operator::Result<()>>, CancellationToken)>,
    pub operator_starts: usize,
    pub metrics_addr: Option<std::net::SocketAddr>,
}

repobox_testbed::deref_to_bed!(RealBed, bed);

/// Deep merge of Helm values (`over` wins; objects merge key by key).
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

impl RealBed {
    /// A bed whose chart is rendered with the bed's values merged with `values`; `None` (after
    /// the one SKIPPED line naming `REPOBOX_K8S_ASSETS`) when there is no control plane.
    pub async fn new(test: &str, values: Value) -> Option<Self> {
        Self::build(test, values, true).await
    }

    /// A bed without nodes: runner pods only fit nodes labelled [`RealBed::pool_label`], which
    /// the caller's autoscaler (see [`RealBed::autoscaler`]) adds.
    pub async fn without_nodes(test: &str, values: Value) -> Option<Self> {
        Self::build(test, values, false).await
    }

    /// The node label (key, value) runner pods of this bed select.
    pub fn pool_label(&self) -> (String, String) {
        (NODE_LABEL.to_owned(), self.node.clone())
    }

    /// Starts a cluster-autoscaler model for this bed's namespace over the bed's kubelet, with
    /// `groups` labelled so that this bed's runner pods fit them.
    pub async fn autoscaler(
        &self,
        mut cfg: repobox_testbed::autoscaler::AutoscalerConfig,
    ) -> repobox_testbed::autoscaler::Autoscaler {
        let (key, value) = self.pool_label();
        for g in &mut cfg.groups {
            g.labels.insert(key.clone(), value.clone());
        }
        cfg.namespaces = vec![self.ns.clone()];
        // The tests of a binary share the control plane, and Nodes are cluster-wide.
        cfg.node_prefix = format!("{}-", self.ns);
        repobox_testbed::autoscaler::Autoscaler::start(
            self.admin.clone(),
            self.kubelet().handle(),
            cfg,
        )
        .await
        .expect("autoscaler")
    }

    async fn build(test: &str, values: Value, with_node: bool) -> Option<Self> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let bed = BedBuilder::new(ClusterKind::SharedControlPlane, TOKEN, KEY_HEX)
            .namespace(&format!("e2e-{test}"))
            .create_namespace(&[("pod-security.kubernetes.io/enforce", "restricted")])
            .crd(RepoboxJob::crd())
            .timeout(WAIT)
            .redis_password(REDIS_PASSWORD)
            // With the GitHub Enterprise API double: jobs that push open a pull request.
            .forge(ForgeKind::GitHub)
            .repo("acme/api", &[("README.md", "# api\n")])
            .start()
            .await
            .expect("test bed")?;
        let cp = bed.cluster.control_plane().expect("a control plane");
        let admin = bed.client.clone();
        let ns = bed.ns.clone();

        // The chart, rendered for this namespace and pinned to this test's Node.
        let node = format!("node-{ns}");
        let mut all = json!({
            "redis": {"url": bed.redis.url()},
            "encryptionKey": {"value": KEY_HEX},
            "leaderElection": {"leaseDurationSeconds": 6},
            "config": {"claimMinIdleSeconds": 1, "logFormat": "text", "logLevel": "info"},
            "runner": {
                "nodeSelector": {NODE_LABEL: node},
                "terminationGracePeriodSeconds": 5,
            },
        });
        merge(&mut all, &values);
        let objects = render_chart(&ns, &all).await;
        let (chart_env, service_account, lease_name) = apply_chart(&admin, &ns, &objects).await;
        let operator_client = cp
            .service_account_client(&ns, &service_account)
            .await
            .expect("ServiceAccount client");

        // The kubelet after the bed: its Node is named after the namespace the bed created.
        let mut bed = bed;
        let mut settings = NodeSettings::new(&node);
        settings.labels.insert(NODE_LABEL.into(), node.clone());
        let kubelet = bed
            .start_kubelet(KubeletConfig {
                nodes: if with_node {
                    vec![settings]
                } else {
                    Vec::new()
                },
                max_grace_period: Some(Duration::from_secs(5)),
                heartbeat_interval: Duration::from_secs(5),
                ..KubeletConfig::default()
            })
            .await
            .expect("kubelet");
        if !kubelet.isolates() {
            eprintln!(
                "NOTE [{test}]: not root (or no namespaces): the kubelet runs containers WITHOUT \
                 isolation (no own mounts, users or PIDs); the operator's behaviour is still tested"
            );
        }
        Some(Self {
            bed,
            admin,
            operator_client,
            node,
            chart_env,
            service_account,
            lease_name,
            operator: None,
            operator_starts: 0,
            metrics_addr: None,
        })
    }

    /// The kubelet running this bed's pods.
    pub fn kubelet(&self) -> &Kubelet {
        self.bed
            .kubelet
            .as_ref()
            .expect("the real bed runs a kubelet")
    }

    /// The shared control plane.
    pub fn cp(&self) -> &ControlPlane {
        self.cluster.control_plane().expect("a control plane")
    }

    /// The operator's configuration: the chart's Deployment environment as flags, the Downward
    /// API fields resolved as the kubelet would (`POD_NAME` = `pod`), then `overrides`
    /// (`("--flag", "value")`, replacing the chart's value). The git host speaks plain HTTP,
    /// hence `--allow-insecure-http` (not a chart value).
    pub fn config(&self, pod: &str, overrides: &[(&str, &str)]) -> Config {
        let cmd = Config::command();
        let flag_of: HashMap<String, String> = cmd
            .get_arguments()
            .filter_map(|a| {
                let env = a.get_env()?.to_str()?.to_owned();
                Some((env, format!("--{}", a.get_long()?)))
            })
            .collect();
        let metrics = format!("127.0.0.1:{}", repobox_testbed::free_port());
        let mut flags: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in &self.chart_env {
            let value = match value.as_str() {
                "fieldRef:metadata.name" => pod.to_owned(),
                "fieldRef:metadata.namespace" => self.ns.clone(),
                v => v.to_owned(),
            };
            if value.is_empty() {
                continue; // empty = unset for every optional setting
            }
            let flag = flag_of
                .get(name)
                .unwrap_or_else(|| panic!("the chart sets {name}, which the operator lacks"));
            flags.insert(flag.clone(), value);
        }
        flags.insert("--metrics-addr".into(), metrics);
        flags.insert("--allow-insecure-http".into(), "true".into());
        for (k, v) in overrides {
            flags.insert((*k).to_owned(), (*v).to_owned());
        }
        let mut args = vec!["repobox-operator".to_owned()];
        for (k, v) in flags {
            args.push(k);
            args.push(v);
        }
        Config::try_parse_from(args).expect("the chart's settings parse")
    }

    /// Starts an operator as pod `repobox-operator-{n}` with the chart's settings.
    pub fn start_operator(&mut self, overrides: &[(&str, &str)]) {
        let pod = format!("repobox-operator-{}", self.operator_starts);
        let cfg = self.config(&pod, overrides);
        self.metrics_addr = Some(cfg.metrics_addr);
        self.operator_starts += 1;
        let stop = CancellationToken::new();
        let client = self.operator_client.clone();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            repobox_operator::app::run_with_client(cfg, client, token).await
        });
        self.operator = Some((handle, stop));
    }

    /// A second replica (own pod name, same ServiceAccount), handled by the caller.
    pub fn spawn_replica(
        &self,
        pod: &str,
    ) -> (JoinHandle<repobox_operator::Result<()>>, CancellationToken) {
        let cfg = self.config(pod, &[]);
        let stop = CancellationToken::new();
        let client = self.operator_client.clone();
        let token = stop.clone();
        (
            tokio::spawn(async move {
                repobox_operator::app::run_with_client(cfg, client, token).await
            }),
            stop,
        )
    }

    /// Kills the operator without any shutdown: the task is aborted mid-flight.
    pub async fn kill_operator(&mut self) {
        if let Some((handle, _)) = self.operator.take() {
            handle.abort();
            let _ = handle.await;
        }
    }

    /// Stops the operator gracefully and returns its result.
    pub async fn stop_operator(&mut self) -> repobox_operator::Result<()> {
        let (handle, stop) = self.operator.take().expect("operator running");
        stop.cancel();
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("operator stops")
            .expect("no panic")
    }

    /// Stops the operator, removes the namespace (the real namespace controller deletes
    /// everything in it) and the Node. The processes (kubelet, Redis, git) stop on drop.
    pub async fn finish(mut self) {
        if self.operator.is_some() {
            self.stop_operator()
                .await
                .expect("the operator ends cleanly");
        }
        self.kubelet().stop();
        let _ = Api::<Namespace>::all(self.admin.clone())
            .delete(&self.ns, &DeleteParams::default())
            .await;
        let _ = Api::<Node>::all(self.admin.clone())
            .delete(&self.node, &DeleteParams::default())
            .await;
    }

    pub fn job(&self, id: &str, user: &str) -> NewJob {
        self.bed.job("acme/api", id, user, "gh")
    }

    /// What the web app does: job hash, provider hash, XADD.
    pub async fn submit(&mut self, job: &NewJob) -> String {
        self.bed.submit(job).await.expect("submit")
    }

    pub fn rjs(&self) -> Api<RepoboxJob> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    pub fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    pub async fn record(&mut self, job_id: &str) -> HashMap<String, String> {
        self.bed.record(job_id).await.expect("hgetall")
    }

    /// Waits until the RepoboxJob `name` satisfies `pred` (watch events, no polling).
    pub async fn wait_rj(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&RepoboxJob) -> bool,
    ) -> RepoboxJob {
        match bed::wait_object(&self.rjs(), name, WAIT, pred).await {
            Ok(rj) => rj,
            Err(now) => {
                self.diagnose();
                panic!(
                    "timed out waiting for {name} to be {what}; it is {:?}",
                    now.map(|r| r.status)
                );
            }
        }
    }

    /// Waits until the runner of `job_id` recorded `want` as its step (Redis has no event for a
    /// hash field, so this polls).
    pub async fn wait_step(&mut self, job_id: &str, want: &str) {
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            let rec = self.record(job_id).await;
            if rec.get("step").map(String::as_str) == Some(want) {
                return;
            }
            if tokio::time::Instant::now() > until {
                self.diagnose();
                panic!("the runner of {job_id} never reached the {want} step: {rec:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_phase(&self, name: &str, phase: RepoboxJobPhase) -> RepoboxJob {
        self.wait_rj(name, phase.as_str(), |rj| rj.phase() == phase)
            .await
    }

    /// Prints what the kubelet saw in this namespace (errors, exits) and every container's
    /// output, to explain a failed wait. Test secrets only; the runner masks the token.
    pub fn diagnose(&self) {
        let mut pods: Vec<String> = Vec::new();
        for e in self.kubelet().history() {
            if let KubeletEvent::ContainerStarted { namespace, pod, .. } = &e
                && *namespace == self.ns
                && !pods.contains(pod)
            {
                pods.push(pod.clone());
            }
            match &e {
                KubeletEvent::Error { namespace, .. }
                | KubeletEvent::ContainerExited { namespace, .. }
                | KubeletEvent::PodFinished { namespace, .. }
                    if *namespace == self.ns =>
                {
                    eprintln!("kubelet: {e:?}");
                }
                _ => {}
            }
        }
        for pod in pods {
            eprintln!(
                "--- output of pod {pod}:\n{}",
                self.kubelet().pod_logs(&pod)
            );
        }
    }

    /// Waits until the RepoboxJob is gone.
    pub async fn wait_gone(&self, name: &str) {
        bed::wait_deleted(&self.rjs(), name, WAIT)
            .await
            .expect("deleted in time");
    }

    /// Waits (watch) until the Job `name` has condition `type_` = True; returns the Job.
    pub async fn wait_job_condition(&self, name: &str, type_: &str) -> Job {
        let has = |j: &Job| {
            j.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
        };
        bed::wait_object(&self.jobs(), name, WAIT, has)
            .await
            .unwrap_or_else(|_| panic!("Job {name} never got condition {type_}"))
    }

    /// Waits until no pod of Job `job` exists any more (bounded polling of the API: the garbage
    /// collector and the kubelet finish deletions asynchronously).
    pub async fn wait_no_pods(&self, job: &str) {
        let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            let left = self.pods().list(&lp).await.expect("list pods").items;
            if left.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "pods of {job} still exist: {:?}",
                left.iter().map(|p| p.name_any()).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The pods the kubelet started (each pod once), in start order.
    pub fn pods_started(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for e in self.kubelet().history() {
            if let KubeletEvent::PodRunning { namespace, pod, .. } = e
                && namespace == self.ns
                && !seen.contains(&pod)
            {
                seen.push(pod);
            }
        }
        seen
    }

    /// `runner:user:{user}:running` is written by the admission pass after a change; there is
    /// no event to await in Redis, so this polls briefly (bounded).
    pub async fn eventually_counter(&mut self, user: &str, want: &str) {
        self.bed
            .eventually_counter(user, want, Duration::from_secs(20))
            .await
            .expect("counter");
    }

    /// Merge-patches a RepoboxJob's spec as a user with `kubectl patch` would (admin).
    pub async fn patch_spec(&self, name: &str, spec: Value) -> kube::Result<RepoboxJob> {
        self.rjs()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
    }
}

/// The chart's objects, rendered by the real Helm library in the workspace venv
/// (`tests/chart/render.py`; `make deps` installs it).
async fn render_chart(ns: &str, values: &Value) -> Vec<Value> {
    let root = repobox_testbed::workspace_root();
    let python = root.join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `make deps` (the chart is rendered with the Helm SDK in .venv)",
        python.display()
    );
    let mut child = tokio::process::Command::new(&python)
        .arg(root.join("tests/chart/render.py"))
        .args([RELEASE, ns])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run tests/chart/render.py");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(values.to_string().as_bytes())
            .await
            .expect("write values");
    }
    let out = child.wait_with_output().await.expect("render");
    // The values hold the Redis password and the key: never echo them, only Helm's stderr.
    assert!(
        out.status.success(),
        "rendering the chart failed (run `make deps` if helm_python is missing): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("render.py prints a JSON array")
}

/// Applies what `helm install` would that matters without a real Deployment: ServiceAccounts,
/// Roles, RoleBindings, Secrets. Returns the operator container's environment (secretKeyRefs
/// resolved from the rendered Secrets, fieldRefs as `fieldRef:<path>`), the operator's
/// ServiceAccount and the Lease name.
async fn apply_chart(
    admin: &Client,
    ns: &str,
    objects: &[Value],
) -> (Vec<(String, String)>, String, String) {
    let pp = PostParams {
        field_manager: Some("helm".into()),
        ..Default::default()
    };
    let mut secrets: HashMap<(String, String), String> = HashMap::new();
    let mut deployment = None;
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or_default();
        let obj_ns = o["metadata"]["namespace"].as_str().unwrap_or(ns);
        assert_eq!(obj_ns, ns, "everything in the release namespace: {o}");
        match kind {
            "ServiceAccount" => {
                let sa: ServiceAccount = serde_json::from_value(o.clone()).expect("SA");
                Api::<ServiceAccount>::namespaced(admin.clone(), ns)
                    .create(&pp, &sa)
                    .await
                    .expect("create ServiceAccount");
            }
            "Role" => {
                let r: Role = serde_json::from_value(o.clone()).expect("Role");
                Api::<Role>::namespaced(admin.clone(), ns)
                    .create(&pp, &r)
                    .await
                    .expect("create Role");
            }
            "RoleBinding" => {
                let r: RoleBinding = serde_json::from_value(o.clone()).expect("RoleBinding");
                Api::<RoleBinding>::namespaced(admin.clone(), ns)
                    .create(&pp, &r)
                    .await
                    .expect("create RoleBinding");
            }
            "Secret" => {
                let s: Secret = serde_json::from_value(o.clone()).expect("Secret");
                for (k, v) in s.string_data.clone().unwrap_or_default() {
                    secrets.insert((s.name_any(), k), v);
                }
                Api::<Secret>::namespaced(admin.clone(), ns)
                    .create(&pp, &s)
                    .await
                    .expect("create Secret");
            }
            "Deployment" => deployment = Some(o.clone()),
            // NetworkPolicies need a CNI, the Service and PDB a real Deployment: not applied.
            _ => {}
        }
    }
    let dep = deployment.expect("the chart renders a Deployment");
    let pod = &dep["spec"]["template"]["spec"];
    let sa = pod["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName")
        .to_owned();
    let container = pod["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "operator"))
        .expect("operator container");
    let mut env = Vec::new();
    let mut lease = String::new();
    for e in container["env"].as_array().expect("env") {
        let name = e["name"].as_str().expect("env name").to_owned();
        let value = if let Some(v) = e.get("value") {
            v.as_str().expect("env value is a string").to_owned()
        } else if let Some(r) = e.pointer("/valueFrom/secretKeyRef") {
            let key = (
                r["name"].as_str().expect("secret name").to_owned(),
                r["key"].as_str().expect("secret key").to_owned(),
            );
            secrets
                .get(&key)
                .unwrap_or_else(|| panic!("{name} refers to a Secret the chart did not render"))
                .clone()
        } else if let Some(p) = e.pointer("/valueFrom/fieldRef/fieldPath") {
            format!("fieldRef:{}", p.as_str().expect("fieldPath"))
        } else {
            panic!("unsupported env source for {name}")
        };
        if name == "LEASE_NAME" {
            lease = value.clone();
        }
        env.push((name, value));
    }
    (env, sa, lease)
}

/// An agent command that blocks until the test opens the gate, so runners hold their quota
/// slots exactly as long as the test needs. The gate is a TCP listener on loopback that the test
/// holds from the start (pods share the host's network; an isolated container sees none of the
/// host's files): agents connect and wait for a line, which [`HostGate::open`] sends to every
/// waiting and every later connection. Holding the port throughout means no other process can
/// take it and open the gate by accident.
pub struct HostGate {
    port: u16,
    open: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl HostGate {
    pub fn new() -> Self {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the gate");
        let port = listener.local_addr().expect("gate address").port();
        let open = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let state = open.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let state = state.clone();
                std::thread::spawn(move || {
                    let (lock, cvar) = &*state;
                    let mut is_open = lock.lock().expect("gate lock");
                    while !*is_open {
                        is_open = cvar.wait(is_open).expect("gate wait");
                    }
                    let mut conn = conn;
                    let _ = conn.write_all(b"go\n");
                });
            }
        });
        Self { port, open }
    }

    /// The agent: waits for the gate's line (bash's `/dev/tcp`), then runs `then`.
    pub fn agent(&self, then: &str) -> String {
        format!(
            "until bash -c 'exec 3<>/dev/tcp/127.0.0.1/{}; read -r line <&3; [ \"$line\" = go ]' 2>/dev/null; do sleep 0.1; done; {then}",
            self.port
        )
    }

    /// Opens the gate for good.
    pub fn open(&self) {
        let (lock, cvar) = &*self.open;
        *lock.lock().expect("gate lock") = true;
        cvar.notify_all();
    }
}

/// Every field of `v` as text (to check no secret is there).
pub fn to_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serialize")
}
