//! One test bed set-up for the operator's integration tests, its benchmarks and the demo:
//! redis-server, the git host, a Kubernetes API (the emulator, an own real control plane or the
//! process-wide shared one), the CRD, the runner's Secrets, and what runs the pods (the cluster
//! simulator or the kubelet). They used to copy these steps; now they describe their bed with
//! [`BedBuilder`] and keep only what is theirs.
//!
//! The test bed does not depend on the operator: the CRD comes in as a value
//! ([`BedBuilder::crd`]) and the operator runs in the caller's process (from
//! [`Bed::operator_args`]) or as its binary, by path ([`OperatorProcess`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use repobox_contract::EncryptionKey;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::control_plane::ControlPlane;
use crate::emulator::Emulator;
use crate::forge::ForgeKind;
use crate::githost::GitHost;
use crate::kubelet::{Kubelet, KubeletConfig};
use crate::redis_server::RedisServer;
use crate::simulator::{ClusterSimulator, SimulatorConfig};
use crate::webapp::{self, NewJob};

/// The Secret holding the runner's Redis URL (key `url`), as the chart names it.
pub const REDIS_SECRET: &str = "repobox-redis";
/// The Secret holding the encryption key (key `key`), as the chart names it.
pub const KEY_SECRET: &str = "repobox-encryption-key";
/// The runner pods' ServiceAccount, as the chart names it.
pub const RUNNER_SERVICE_ACCOUNT: &str = "repobox-runner";
/// The job-runner's container command, mapped to the workspace's binary.
pub const JOB_RUNNER: &str = "repobox-job-runner";

/// `Deref`/`DerefMut` from a caller's bed type (its field `$field`) to [`Bed`], so that the
/// caller's tests read `bed.redis`, `bed.git`, `bed.con` as before.
#[macro_export]
macro_rules! deref_to_bed {
    ($ty:ty, $field:ident) => {
        impl ::std::ops::Deref for $ty {
            type Target = $crate::bed::Bed;
            fn deref(&self) -> &$crate::bed::Bed {
                &self.$field
            }
        }
        impl ::std::ops::DerefMut for $ty {
            fn deref_mut(&mut self) -> &mut $crate::bed::Bed {
                &mut self.$field
            }
        }
    };
}

/// Which Kubernetes API the bed talks to.
#[derive(Debug, Clone)]
pub enum ClusterKind {
    /// The API emulator (a Python process), fresh for this bed.
    Emulator,
    /// A real control plane of its own from these Kubernetes binaries.
    ControlPlane(PathBuf),
    /// The process-wide shared real control plane ([`ControlPlane::shared`]); the bed gets a
    /// namespace of its own named after [`BedBuilder::namespace`].
    SharedControlPlane,
}

/// The running Kubernetes API.
pub enum Cluster {
    Emulator(Box<Emulator>),
    ControlPlane(Box<ControlPlane>),
    Shared(&'static ControlPlane),
}

/// What the bed should look like; [`BedBuilder::start`] starts it.
#[derive(Debug, Clone)]
pub struct BedBuilder {
    cluster: ClusterKind,
    ns: String,
    create_namespace: bool,
    namespace_labels: Vec<(String, String)>,
    token: String,
    forge: Option<ForgeKind>,
    repos: Vec<(String, Vec<(String, String)>)>,
    redis_password: Option<String>,
    key_hex: String,
    crd: Option<Box<CustomResourceDefinition>>,
    runner_secrets: bool,
    runner_service_account: bool,
    runner_env: Vec<(String, String)>,
    simulator: Option<SimulatorConfig>,
    kubelet: Option<KubeletConfig>,
    job_runner: Option<PathBuf>,
    timeout: Duration,
}

impl BedBuilder {
    /// A bed on `cluster` whose git host accepts `token` and whose runners share `key_hex`.
    pub fn new(cluster: ClusterKind, token: &str, key_hex: &str) -> Self {
        Self {
            cluster,
            ns: "repobox".into(),
            create_namespace: false,
            namespace_labels: Vec::new(),
            token: token.into(),
            forge: None,
            repos: Vec::new(),
            redis_password: None,
            key_hex: key_hex.into(),
            crd: None,
            runner_secrets: false,
            runner_service_account: false,
            runner_env: Vec::new(),
            simulator: None,
            kubelet: None,
            job_runner: None,
            timeout: Duration::from_secs(60),
        }
    }

    /// The jobs namespace (default `repobox`); on the shared control plane the prefix of a
    /// fresh `{ns}-{random}` one.
    pub fn namespace(mut self, ns: &str) -> Self {
        self.ns = ns.into();
        self
    }

    /// Creates the namespace (the emulator needs none; a fresh control plane does), with
    /// `labels` (e.g. Pod Security `restricted`). The shared control plane always gets one.
    pub fn create_namespace(mut self, labels: &[(&str, &str)]) -> Self {
        self.create_namespace = true;
        self.namespace_labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self
    }

    /// The git host also serves this pull / merge request API.
    pub fn forge(mut self, kind: ForgeKind) -> Self {
        self.forge = Some(kind);
        self
    }

    /// A repository on the git host (`owner/name`) with these files on `main`.
    pub fn repo(mut self, name: &str, files: &[(&str, &str)]) -> Self {
        let files = files
            .iter()
            .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
            .collect();
        self.repos.push((name.into(), files));
        self
    }

    /// Redis requires this password (it is part of [`RedisServer::url`]).
    pub fn redis_password(mut self, password: &str) -> Self {
        self.redis_password = Some(password.into());
        self
    }

    /// Installs this CRD (the operator's `RepoboxJob::crd()`) and waits until it is served.
    pub fn crd(mut self, crd: CustomResourceDefinition) -> Self {
        self.crd = Some(Box::new(crd));
        self
    }

    /// Creates the Secrets the runner Jobs reference ([`REDIS_SECRET`], [`KEY_SECRET`]).
    pub fn runner_secrets(mut self) -> Self {
        self.runner_secrets = true;
        self
    }

    /// Creates the runner ServiceAccount ([`RUNNER_SERVICE_ACCOUNT`]; a real API server's
    /// admission refuses the runner pods without it).
    pub fn runner_service_account(mut self) -> Self {
        self.runner_service_account = true;
        self
    }

    /// Extra environment for every runner process (the simulator's or the kubelet's).
    pub fn runner_env(mut self, env: &[(&str, &str)]) -> Self {
        self.runner_env
            .extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self
    }

    /// Runs the Jobs with the cluster simulator (emulator only). The bed sets its namespace,
    /// maps [`JOB_RUNNER`] and appends [`BedBuilder::runner_env`].
    pub fn simulator(mut self, cfg: SimulatorConfig) -> Self {
        self.simulator = Some(cfg);
        self
    }

    /// Runs the pods with the kubelet. The bed sets `api_server` on a real control plane, maps
    /// [`JOB_RUNNER`] and appends [`BedBuilder::runner_env`].
    pub fn kubelet(mut self, cfg: KubeletConfig) -> Self {
        self.kubelet = Some(cfg);
        self
    }

    /// The job-runner binary (default: the workspace's, [`crate::job_runner_binary`]).
    pub fn job_runner(mut self, path: PathBuf) -> Self {
        self.job_runner = Some(path);
        self
    }

    /// How long start-up waits (the CRD being served) may take; default 60 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts everything, in order: cluster, namespace, CRD, Redis, git host, Secrets, then the
    /// simulator or kubelet. `Ok(None)` on the shared control plane without
    /// `REPOBOX_K8S_ASSETS` (after the one SKIPPED line). What started before a failure stops
    /// when it is dropped.
    pub async fn start(self) -> Result<Option<Bed>> {
        let cluster = match &self.cluster {
            ClusterKind::Emulator => {
                Cluster::Emulator(Box::new(Emulator::start().await.context(
                    "start the Kubernetes API emulator (needs the .venv: `make deps`)",
                )?))
            }
            ClusterKind::ControlPlane(assets) => Cluster::ControlPlane(Box::new(
                ControlPlane::start_with(assets)
                    .await
                    .context("start the control plane")?,
            )),
            ClusterKind::SharedControlPlane => match ControlPlane::shared().await? {
                Some(cp) => Cluster::Shared(cp),
                None => {
                    ControlPlane::print_skip();
                    return Ok(None);
                }
            },
        };
        let client = cluster.client()?;
        let labels: Vec<(&str, &str)> = self
            .namespace_labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let ns = match &cluster {
            Cluster::Shared(cp) => cp.namespace_with_labels(&self.ns, &labels).await?,
            _ => {
                if self.create_namespace {
                    create_namespace(&client, &self.ns, &labels).await?;
                }
                self.ns.clone()
            }
        };
        if let Some(crd) = &self.crd {
            install_crd(&client, crd, self.timeout).await?;
        }

        let redis = match &self.redis_password {
            Some(pw) => RedisServer::start_with_password(pw).await,
            None => RedisServer::start().await,
        }
        .context("start redis-server (install it with `apt-get install redis-server`)")?;
        let git = match self.forge {
            Some(kind) => GitHost::start_with_forge(&self.token, kind).await,
            None => GitHost::start(&self.token).await,
        }
        .context("start the git host")?;
        for (name, files) in &self.repos {
            let files: Vec<(&str, &str)> = files
                .iter()
                .map(|(p, c)| (p.as_str(), c.as_str()))
                .collect();
            git.create_repo(name, &files)?;
        }
        if self.runner_secrets {
            create_runner_secrets(&client, &ns, &redis.url(), &self.key_hex).await?;
        }
        if self.runner_service_account {
            create_runner_service_account(&client, &ns).await?;
        }

        let runner = match (&self.simulator, &self.kubelet, &self.job_runner) {
            (None, None, _) => None,
            (_, _, Some(path)) => Some(path.clone()),
            _ => Some(crate::job_runner_binary()?),
        };
        let binaries = |mut map: HashMap<String, PathBuf>| {
            if let Some(r) = &runner {
                map.entry(JOB_RUNNER.to_owned())
                    .or_insert_with(|| r.clone());
            }
            map
        };
        let sim = match self.simulator {
            Some(mut cfg) => {
                if !matches!(cluster, Cluster::Emulator(_)) {
                    bail!("the cluster simulator runs on the emulator only");
                }
                cfg.namespace = Some(ns.clone());
                cfg.binaries = binaries(cfg.binaries);
                cfg.extra_env.extend(self.runner_env.iter().cloned());
                Some(ClusterSimulator::start(client.clone(), cfg).await?)
            }
            None => None,
        };
        let con = redis.try_connection().await?;
        let mut bed = Bed {
            ns,
            key: EncryptionKey::parse(&self.key_hex).map_err(|e| anyhow!("the bed's key: {e}"))?,
            token: self.token,
            redis,
            git,
            client,
            cluster,
            sim,
            kubelet: None,
            con,
        };
        if let Some(mut cfg) = self.kubelet {
            cfg.binaries = binaries(cfg.binaries);
            cfg.extra_env.extend(self.runner_env.iter().cloned());
            bed.start_kubelet(cfg).await?;
        }
        Ok(Some(bed))
    }
}

/// A started bed. Every process stops when it is dropped; [`Bed::shutdown`] stops them in
/// order and says what it stopped.
pub struct Bed {
    /// The jobs namespace.
    pub ns: String,
    pub key: EncryptionKey,
    /// The git host's token (the users' providers hold it encrypted).
    pub token: String,
    pub redis: RedisServer,
    pub git: GitHost,
    /// An admin client of the cluster.
    pub client: Client,
    pub cluster: Cluster,
    pub sim: Option<ClusterSimulator>,
    pub kubelet: Option<Kubelet>,
    /// A connection to [`Bed::redis`], for what the web app writes.
    pub con: MultiplexedConnection,
}

impl Cluster {
    /// An admin client.
    pub fn client(&self) -> Result<Client> {
        match self {
            Cluster::Emulator(emu) => emu.client(),
            Cluster::ControlPlane(cp) => cp.client(),
            Cluster::Shared(cp) => cp.client(),
        }
    }

    /// The admin kubeconfig (for a child process or kubectl).
    pub fn kubeconfig_path(&self) -> PathBuf {
        match self {
            Cluster::Emulator(emu) => emu.kubeconfig_path(),
            Cluster::ControlPlane(cp) => cp.kubeconfig_path(),
            Cluster::Shared(cp) => cp.kubeconfig_path(),
        }
    }

    pub fn emulator(&self) -> Option<&Emulator> {
        match self {
            Cluster::Emulator(emu) => Some(emu),
            _ => None,
        }
    }

    pub fn control_plane(&self) -> Option<&ControlPlane> {
        match self {
            Cluster::Emulator(_) => None,
            Cluster::ControlPlane(cp) => Some(cp),
            Cluster::Shared(cp) => Some(cp),
        }
    }
}

impl Bed {
    /// Starts the kubelet for this bed's pods (replacing none: call it once). On a real control
    /// plane `api_server` is set; [`JOB_RUNNER`] is mapped to the workspace's binary unless
    /// `cfg` maps it.
    pub async fn start_kubelet(&mut self, mut cfg: KubeletConfig) -> Result<&Kubelet> {
        if self.kubelet.is_some() {
            bail!("the bed already runs a kubelet");
        }
        if let Some(cp) = self.cluster.control_plane() {
            cfg.api_server = Some(cp.server_url().to_owned());
        }
        if !cfg.binaries.contains_key(JOB_RUNNER) {
            cfg.binaries
                .insert(JOB_RUNNER.to_owned(), crate::job_runner_binary()?);
        }
        let kubelet = Kubelet::start(self.client.clone(), cfg)
            .await
            .context("start the kubelet")?;
        Ok(self.kubelet.insert(kubelet))
    }

    /// The operator's connection flags for this bed: `--redis-url`, `--jobs-namespace`,
    /// `--runner-id`, `--metrics-addr`. Callers add their own (leader election, quotas, ...).
    pub fn operator_args(&self, runner_id: &str, metrics_addr: SocketAddr) -> Vec<String> {
        [
            "--redis-url",
            &self.redis.url(),
            "--jobs-namespace",
            &self.ns,
            "--runner-id",
            runner_id,
            "--metrics-addr",
            &metrics_addr.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// A job as the web app creates it for `user` on repository `repo` of the git host, with
    /// provider `provider`.
    pub fn job(&self, repo: &str, id: &str, user: &str, provider: &str) -> NewJob {
        let mut j = NewJob::new(id, user, &self.git.url(repo), &format!("Change for {id}"));
        j.provider_id = provider.into();
        j
    }

    /// What the web app does for a user's git provider: the provider hash with the bed's token
    /// encrypted, pointing at the git host.
    pub async fn create_provider(&mut self, user: &str, provider: &str) -> Result<()> {
        webapp::create_provider(
            &mut self.con,
            user,
            provider,
            &self.key,
            &self.token,
            &self.git.base_url(),
        )
        .await?;
        Ok(())
    }

    /// What the web app does on "Run": provider hash, job hash, XADD. Returns the entry id.
    pub async fn submit(&mut self, job: &NewJob) -> Result<String> {
        self.create_provider(&job.user_id, &job.provider_id).await?;
        Ok(webapp::submit(&mut self.con, job).await?)
    }

    /// The job's record (`job:{id}`).
    pub async fn record(&mut self, job_id: &str) -> Result<HashMap<String, String>> {
        Ok(self.con.hgetall(format!("job:{job_id}")).await?)
    }

    /// Waits (bounded polling: Redis sends no event for a plain key the bed can await) until
    /// `runner:user:{user}:running` is `want`.
    pub async fn eventually_counter(
        &mut self,
        user: &str,
        want: &str,
        timeout: Duration,
    ) -> Result<()> {
        let key = format!("runner:user:{user}:running");
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let v: Option<String> = self.con.get(&key).await?;
            if v.as_deref() == Some(want) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                bail!("{key} is {v:?}, expected {want}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops everything, the runners first, and tells `report` each part it stopped.
    pub async fn shutdown(self, mut report: impl FnMut(&str)) {
        let Bed {
            redis,
            git,
            cluster,
            sim,
            kubelet,
            ..
        } = self;
        if let Some(sim) = sim {
            sim.shutdown().await;
            report("cluster simulator stopped");
        }
        if let Some(kubelet) = kubelet {
            kubelet.shutdown().await;
            report("kubelet stopped");
        }
        match cluster {
            Cluster::ControlPlane(cp) => {
                // Dropping it stops every process and removes its directory (blocks about 1 s).
                tokio::task::block_in_place(|| drop(cp));
                report("control plane stopped");
            }
            Cluster::Emulator(emu) => {
                let _ = (*emu).shutdown().await;
                report("API emulator stopped");
            }
            Cluster::Shared(_) => {}
        }
        let mut redis = redis;
        redis.stop().await;
        report("redis-server stopped");
        let mut git = git;
        git.stop().await;
        drop(git);
        report("git host stopped");
    }
}

/// Creates `crd` (what `kubectl apply -f crds/` does; one that exists already, as on a shared
/// control plane, is kept) and waits until it is served.
pub async fn install_crd(
    client: &Client,
    crd: &CustomResourceDefinition,
    timeout: Duration,
) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    match crds.create(&PostParams::default(), crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e).with_context(|| format!("create the CRD {name}")),
    }
    tokio::time::timeout(
        timeout,
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .with_context(|| format!("the CRD {name} was not established in time"))??;
    Ok(())
}

/// Creates namespace `ns` with `labels`.
pub async fn create_namespace(client: &Client, ns: &str, labels: &[(&str, &str)]) -> Result<()> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(ns.into()),
            labels: (!labels.is_empty()).then_some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("create the namespace {ns}"))?;
    Ok(())
}

/// The two Secrets the runner Jobs reference: [`REDIS_SECRET`] (`url`) and [`KEY_SECRET`]
/// (`key`). The values are never part of an error.
pub async fn create_runner_secrets(
    client: &Client,
    ns: &str,
    redis_url: &str,
    key_hex: &str,
) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (name, key, value) in [
        (REDIS_SECRET, "url", redis_url),
        (KEY_SECRET, "key", key_hex),
    ] {
        let s = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([(key.to_owned(), value.to_owned())])),
            ..Default::default()
        };
        secrets
            .create(&PostParams::default(), &s)
            .await
            .with_context(|| format!("create Secret {name}"))?;
    }
    Ok(())
}

/// The runner pods' identity, as the chart creates it (no token mounted).
pub async fn create_runner_service_account(client: &Client, ns: &str) -> Result<()> {
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(RUNNER_SERVICE_ACCOUNT.into()),
            ..Default::default()
        },
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &account)
        .await
        .with_context(|| format!("create ServiceAccount {RUNNER_SERVICE_ACCOUNT}"))?;
    Ok(())
}

/// Waits (a watch, no polling) until object `name` satisfies `pred`. On timeout the error
/// carries the object as it is then, for the caller's message.
pub async fn wait_object<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&K) -> bool,
) -> std::result::Result<K, Box<Option<K>>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api.clone(), cfg)
        .default_backoff()
        .applied_objects()
        .boxed();
    let found = tokio::time::timeout(timeout, async {
        while let Some(ev) = stream.next().await {
            if let Ok(obj) = ev
                && pred(&obj)
            {
                return Some(obj);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(obj)) => Ok(obj),
        _ => Err(Box::new(api.get_opt(name).await.ok().flatten())),
    }
}

/// Waits until object `name` is gone (at once when it does not exist).
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let Some(uid) = api.get_opt(name).await?.and_then(|o| o.uid()) else {
        return Ok(());
    };
    tokio::time::timeout(
        timeout,
        await_condition(api.clone(), name, conditions::is_deleted(&uid)),
    )
    .await
    .with_context(|| format!("{name} was not deleted in time"))??;
    Ok(())
}

/// A minimal HTTP/1.1 GET against the operator's probe / metrics server: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await??;
    let text = String::from_utf8_lossy(&response);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP response")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok((code, body.to_owned()))
}

/// A loopback address with a port that was free a moment ago (for `--metrics-addr`).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::free_port()))
}

/// Where an operator process's output goes.
#[derive(Debug, Clone)]
pub enum Output {
    Null,
    /// Stdout and stderr appended to this file.
    File(PathBuf),
}

/// The operator binary as a child process (killed on drop), as a Deployment would run it.
#[derive(Debug)]
pub struct OperatorProcess {
    child: Child,
    pid: u32,
}

impl OperatorProcess {
    /// Starts `binary args…` with `KUBECONFIG=kubeconfig` and without the caller's `RUST_LOG`
    /// when `clear_rust_log` (the operator's flags decide its logging).
    pub fn spawn(
        binary: &Path,
        args: &[String],
        kubeconfig: &Path,
        output: &Output,
        clear_rust_log: bool,
    ) -> Result<Self> {
        let (stdout, stderr) = match output {
            Output::Null => (Stdio::null(), Stdio::null()),
            Output::File(path) => {
                let log = std::fs::File::create(path)
                    .with_context(|| format!("create {}", path.display()))?;
                (Stdio::from(log.try_clone()?), Stdio::from(log))
            }
        };
        let mut cmd = Command::new(binary);
        cmd.args(args).env("KUBECONFIG", kubeconfig);
        if clear_rust_log {
            cmd.env_remove("RUST_LOG");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id().context("the operator exited at once")?;
        Ok(Self { child, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status, if the process has ended.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits until `/readyz` on `metrics_addr` answers 200 (polling: the operator has no
    /// readiness event to await from outside), failing early if the process exits.
    pub async fn wait_ready(&mut self, metrics_addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!("the operator exited during start-up ({status})");
            }
            let last = match http_get(metrics_addr, "/readyz").await {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("{code}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the operator was not ready within {}s (last /readyz: {last})",
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL, then waits for the process.
    pub async fn kill(&mut self) -> Result<()> {
        Ok(self.child.kill().await?)
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) -> Stopped {
        if let Ok(Some(_)) = self.child.try_wait() {
            return Stopped::AlreadyExited;
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => Stopped::Terminated(status),
            _ => {
                let _ = self.child.kill().await;
                Stopped::Killed
            }
        }
    }
}

/// How [`OperatorProcess::stop`] ended the process.
#[derive(Debug)]
pub enum Stopped {
    AlreadyExited,
    /// It exited after SIGTERM with this status.
    Terminated(ExitStatus),
    /// It outlived the grace period and was killed.
    Killed,
}
