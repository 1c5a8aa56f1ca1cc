//! A real Kubernetes control plane for tests, benches and the demo: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler on free loopback ports, with fresh certificates,
//! in a temporary directory.
//!
//! The Kubernetes binaries come from the directory named by `REPOBOX_K8S_ASSETS` (like envtest's
//! `KUBEBUILDER_ASSETS`); `etcd` comes from `PATH` (Debian's `etcd-server`). When the variable is
//! unset, [`ControlPlane::start`] and [`ControlPlane::shared`] print one `SKIPPED` line and return
//! `None`, so a test can say it did not run instead of passing silently.
//!
//! Nothing outlives the test process. Every component is spawned from one long-lived thread with
//! `PR_SET_PDEATHSIG` (SIGKILL), in its own process group: the kernel kills it when the test
//! process ends, however it ends (a panic, `exit`, SIGKILL). The death signal follows the thread
//! that forked, which is why the spawning is not done from a test's thread or runtime worker,
//! both of which end long before the process. A small `sh` sentinel removes the temporary
//! directory once the test process is gone (it waits for EOF on a pipe only the test process
//! holds), which covers the [`ControlPlane::shared`] singleton that is never dropped. An owned
//! [`ControlPlane`] is torn down on drop: SIGTERM to each process group, SIGKILL after a grace
//! period, every child reaped, the directory removed.
//!
//! No kubelet runs: pods stay `Pending` unless a test plays the kubelet. Built-in controllers
//! (Job, garbage collector, service accounts, namespaces, ...) and admission (RBAC, Pod Security)
//! are the real ones.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use repobox_testbed::control_plane::ControlPlane;
//! let Some(cp) = ControlPlane::shared().await? else { return Ok(()) }; // printed SKIPPED
//! let ns = cp.namespace("my-test").await?;
//! let client = cp.client()?;
//! # let _ = (ns, client); Ok(()) }
//! ```

mod pki;

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::config::Kubeconfig;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tempfile::TempDir;

use pki::{CertAndKey, Pki};

/// The environment variable naming the directory with `kube-apiserver`,
/// `kube-controller-manager` and `kube-scheduler`.
pub const ASSETS_ENV: &str = "REPOBOX_K8S_ASSETS";

/// What a test prints (once) when it cannot run because [`ASSETS_ENV`] is unset.
pub const SKIP_MESSAGE: &str =
    "SKIPPED: set REPOBOX_K8S_ASSETS=/path/to/kube-binaries to run this test";

/// etcd is taken from `PATH` (Debian's `etcd-server` package, 3.4).
const ETCD_BINARY: &str = "etcd";

/// Generous: the machines have two cores shared with cargo builds; an idle one needs about 3 s
/// for the apiserver and 8 s for everything.
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
const CONTROLLERS_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// One readiness probe may not hang the wait loop.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pacing between readiness probes (readiness itself is decided by the probe's answer).
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// SIGTERM → SIGKILL on teardown.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// A start is retried with new ports when a component lost the race for one.
const START_ATTEMPTS: usize = 3;
/// Lines of a component's log quoted in a start error.
const LOG_TAIL_LINES: usize = 30;
/// Lifetime of the ServiceAccount tokens handed out (long enough for a bench).
const TOKEN_SECONDS: i64 = 24 * 3600;

/// A running control plane. Dropping it stops every process and removes its directory; the drop
/// blocks the thread for the shutdown (about 1 s, at most the SIGTERM grace of 5 s).
pub struct ControlPlane {
    // Field order matters: the processes stop before the directory they write into is removed.
    processes: Processes,
    dir: TempDir,
    server_url: String,
    ca_pem: String,
    admin: kube::Config,
    started_in: Duration,
    audit_log: Option<PathBuf>,
}

/// Optional settings of a control plane; the default is what [`ControlPlane::start`] runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// An audit policy (YAML, `audit.k8s.io/v1` `Policy`). When set, the apiserver writes its
    /// audit log (JSON lines) to [`ControlPlane::audit_log_path`] in blocking mode: an entry is
    /// on disk before the response is sent, so counting requests needs no flush wait.
    pub audit_policy: Option<String>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server_url", &self.server_url)
            .field("dir", &self.dir.path())
            .field("pids", &self.pids())
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// The directory named by `REPOBOX_K8S_ASSETS`, if set and not empty.
    pub fn assets() -> Option<PathBuf> {
        std::env::var_os(ASSETS_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    }

    /// Prints [`SKIP_MESSAGE`] with the current test's name, straight to the process's stderr so
    /// that libtest's output capture does not hide it when the test passes.
    pub fn print_skip() {
        let test = std::thread::current()
            .name()
            .map(|n| format!(" [{n}]"))
            .unwrap_or_default();
        let _ = writeln!(io::stderr(), "{SKIP_MESSAGE}{test}");
    }

    /// Starts a control plane owned by the caller, or prints the SKIPPED line and returns `None`
    /// when `REPOBOX_K8S_ASSETS` is unset.
    pub async fn start() -> Result<Option<ControlPlane>> {
        Self::start_configured(&Options::default()).await
    }

    /// [`ControlPlane::start`] with `options` (e.g. an audit log, for benchmarks that count
    /// requests at the apiserver).
    pub async fn start_configured(options: &Options) -> Result<Option<ControlPlane>> {
        match Self::assets() {
            Some(assets) => Self::start_with_options(&assets, options).await.map(Some),
            None => {
                Self::print_skip();
                Ok(None)
            }
        }
    }

    /// The one control plane of this test process, started by the first caller; later callers
    /// (on any runtime) wait for it. `None` (after printing the SKIPPED line) when
    /// `REPOBOX_K8S_ASSETS` is unset. A failed start is remembered, so every test reports it
    /// at once instead of starting again. Never dropped: its processes die with the test
    /// process (see the module documentation).
    pub async fn shared() -> Result<Option<&'static ControlPlane>> {
        static SHARED: tokio::sync::OnceCell<Result<ControlPlane, String>> =
            tokio::sync::OnceCell::const_new();
        let Some(assets) = Self::assets() else {
            Self::print_skip();
            return Ok(None);
        };
        let started = SHARED
            .get_or_init(|| async move {
                Self::start_with(&assets)
                    .await
                    .map_err(|e| format!("{e:#}"))
            })
            .await;
        match started {
            Ok(cp) => Ok(Some(cp)),
            Err(e) => bail!("the shared control plane did not start: {e}"),
        }
    }

    /// Starts a control plane with the Kubernetes binaries in `assets`.
    pub async fn start_with(assets: &Path) -> Result<ControlPlane> {
        Self::start_with_options(assets, &Options::default()).await
    }

    /// Starts a control plane with the Kubernetes binaries in `assets` and `options`.
    pub async fn start_with_options(assets: &Path, options: &Options) -> Result<ControlPlane> {
        let binaries = Binaries::find(assets)?;
        let mut attempt = 1;
        loop {
            match start_once(&binaries, options).await {
                Ok(cp) => return Ok(cp),
                Err(e) if attempt < START_ATTEMPTS && e.downcast_ref::<PortTaken>().is_some() => {
                    tracing::warn!(attempt, "control plane lost a port race, retrying: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A new admin client (`system:masters`). A fresh one per call, bound to the caller's tokio
    /// runtime, so that tests with their own runtimes can share one control plane.
    pub fn client(&self) -> Result<kube::Client> {
        kube::Client::try_from(self.admin.clone()).context("build the admin client")
    }

    /// The admin client's configuration, to adjust (timeouts, retries) before building a client.
    pub fn config(&self) -> kube::Config {
        self.admin.clone()
    }

    /// An admin kubeconfig file (certificates embedded), for kubectl-like tools.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The apiserver's URL, e.g. `https://127.0.0.1:41234`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The cluster CA (PEM) that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// How long [`ControlPlane::start`] took, certificates to a working scheduler.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The temporary directory: certificates, kubeconfigs, etcd data, one log per component.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The log file of `component` (`etcd`, `kube-apiserver`, `kube-controller-manager`,
    /// `kube-scheduler`).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.dir.path().join(format!("{component}.log"))
    }

    /// The apiserver's audit log (JSON lines), when started with [`Options::audit_policy`].
    pub fn audit_log_path(&self) -> Option<&Path> {
        self.audit_log.as_deref()
    }

    /// The process ids this control plane spawned, by component (the directory-cleanup
    /// sentinel included).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.processes
            .0
            .iter()
            .map(|c| (c.name, c.child.id()))
            .collect()
    }

    /// A configuration that authenticates as ServiceAccount `namespace/name` with a token from
    /// the TokenRequest API, so the code under test runs with that account's real RBAC.
    pub async fn service_account_config(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<kube::Config> {
        let yaml = self
            .service_account_kubeconfig_yaml(namespace, name)
            .await?;
        config_from_yaml(&yaml)
            .with_context(|| format!("kube config for ServiceAccount {namespace}/{name}"))
    }

    /// A client authenticated as ServiceAccount `namespace/name` (see
    /// [`ControlPlane::service_account_config`]).
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<kube::Client> {
        let config = self.service_account_config(namespace, name).await?;
        kube::Client::try_from(config)
            .with_context(|| format!("build a client for ServiceAccount {namespace}/{name}"))
    }

    /// Writes a kubeconfig for ServiceAccount `namespace/name` (a TokenRequest token) into the
    /// control plane's directory and returns its path, e.g. for `KUBECONFIG` of a child process.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let yaml = self
            .service_account_kubeconfig_yaml(namespace, name)
            .await?;
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-sa-{namespace}-{name}"));
        write_private(&path, yaml.as_bytes())?;
        Ok(path)
    }

    /// Creates a namespace named `{prefix}-{random}` and waits for its `default` ServiceAccount
    /// (pods cannot be created before it exists). Returns the name.
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        self.namespace_with_labels(prefix, &[]).await
    }

    /// [`ControlPlane::namespace`] with labels, e.g.
    /// `("pod-security.kubernetes.io/enforce", "restricted")`.
    pub async fn namespace_with_labels(
        &self,
        prefix: &str,
        labels: &[(&str, &str)],
    ) -> Result<String> {
        let client = self.client()?;
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        let ns = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                labels: (!labels.is_empty()).then_some(labels),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("create a namespace named {prefix}-*"))?;
        let name = created
            .metadata
            .name
            .context("the created namespace has no name")?;
        let accounts = Api::<ServiceAccount>::namespaced(client, &name);
        let deadline = Instant::now() + CONTROLLERS_READY_TIMEOUT;
        loop {
            if accounts.get_opt("default").await?.is_some() {
                return Ok(name);
            }
            if Instant::now() >= deadline {
                bail!(
                    "ServiceAccount {name}/default did not appear within {CONTROLLERS_READY_TIMEOUT:?}"
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn service_account_kubeconfig_yaml(&self, namespace: &str, name: &str) -> Result<String> {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                // Empty: the apiserver's own audience (`--api-audiences`).
                audiences: Vec::new(),
                expiration_seconds: Some(TOKEN_SECONDS),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let response = Api::<ServiceAccount>::namespaced(self.client()?, namespace)
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("request a token for ServiceAccount {namespace}/{name}"))?;
        let token = response
            .status
            .context("the TokenRequest came back without a status")?
            .token;
        Ok(kubeconfig_yaml(
            &self.server_url,
            &self.ca_pem,
            &format!("system:serviceaccount:{namespace}:{name}"),
            Credentials::Token(&token),
            namespace,
        ))
    }
}

/// The three Kubernetes binaries and etcd, checked before anything starts.
struct Binaries {
    etcd: PathBuf,
    apiserver: PathBuf,
    controller_manager: PathBuf,
    scheduler: PathBuf,
}

impl Binaries {
    fn find(assets: &Path) -> Result<Binaries> {
        let in_assets = |name: &str| -> Result<PathBuf> {
            let path = assets.join(name);
            if !path.is_file() {
                bail!(
                    "{} not found: {ASSETS_ENV} must name a directory with kube-apiserver, \
                     kube-controller-manager and kube-scheduler (`kubernetes/server/bin/` of the \
                     official kubernetes-server-linux-amd64.tar.gz)",
                    path.display()
                );
            }
            Ok(path)
        };
        let path = std::env::var_os("PATH").unwrap_or_default();
        let etcd = std::env::split_paths(&path)
            .map(|dir| dir.join(ETCD_BINARY))
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "`{ETCD_BINARY}` is not on PATH; the control plane needs it \
                     (Debian/Ubuntu: `apt-get install etcd-server`)"
                )
            })?;
        Ok(Binaries {
            etcd,
            apiserver: in_assets("kube-apiserver")?,
            controller_manager: in_assets("kube-controller-manager")?,
            scheduler: in_assets("kube-scheduler")?,
        })
    }
}

/// A component exited because its port was taken between `free_port()` and its bind.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PortTaken(String);

/// The loopback ports of one start, all different.
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
}

impl Ports {
    fn pick() -> Ports {
        let mut taken = Vec::with_capacity(5);
        let mut next = || loop {
            let port = crate::free_port();
            if !taken.contains(&port) {
                taken.push(port);
                return port;
            }
        };
        Ports {
            etcd_client: next(),
            etcd_peer: next(),
            apiserver: next(),
            controller_manager: next(),
            scheduler: next(),
        }
    }
}

async fn start_once(bin: &Binaries, options: &Options) -> Result<ControlPlane> {
    let began = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("repobox-k8s-")
        .tempdir()
        .context("create the control plane's temporary directory")?;
    let d = dir.path();
    let pki = Pki::generate()?;
    let files = PkiFiles::write(d, &pki)?;
    let ports = Ports::pick();
    let server_url = format!("https://127.0.0.1:{}", ports.apiserver);

    let kubeconfig = |user: &str, creds: &CertAndKey| {
        kubeconfig_yaml(
            &server_url,
            &pki.ca_pem,
            user,
            Credentials::Cert(creds),
            "default",
        )
    };
    let admin_yaml = kubeconfig("admin", &pki.admin);
    write_private(&d.join("kubeconfig"), admin_yaml.as_bytes())?;
    let cm_kubeconfig = d.join("kube-controller-manager.kubeconfig");
    write_private(
        &cm_kubeconfig,
        kubeconfig("kube-controller-manager", &pki.controller_manager).as_bytes(),
    )?;
    let scheduler_kubeconfig = d.join("kube-scheduler.kubeconfig");
    write_private(
        &scheduler_kubeconfig,
        kubeconfig("kube-scheduler", &pki.scheduler).as_bytes(),
    )?;
    let admin = config_from_yaml(&admin_yaml).context("the admin kube config")?;

    let mut processes = Processes(Vec::new());
    processes.spawn_cleanup_sentinel(d)?;

    let etcd_client_url = format!("http://127.0.0.1:{}", ports.etcd_client);
    let etcd_peer_url = format!("http://127.0.0.1:{}", ports.etcd_peer);
    let etcd_data = d.join("etcd");
    processes.spawn(
        "etcd",
        &bin.etcd,
        d,
        &[
            "--name=default".into(),
            format!("--data-dir={}", etcd_data.display()),
            format!("--listen-client-urls={etcd_client_url}"),
            format!("--advertise-client-urls={etcd_client_url}"),
            format!("--listen-peer-urls={etcd_peer_url}"),
            format!("--initial-advertise-peer-urls={etcd_peer_url}"),
            format!("--initial-cluster=default={etcd_peer_url}"),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ],
    )?;

    let issuer = "https://kubernetes.default.svc.cluster.local";
    let p = |path: &Path| path.display().to_string();
    let mut audit_args = Vec::new();
    let audit_log = match &options.audit_policy {
        Some(policy) => {
            let policy_file = d.join("audit-policy.yaml");
            write_private(&policy_file, policy.as_bytes())?;
            let log = d.join("audit.log");
            audit_args.extend([
                format!("--audit-policy-file={}", p(&policy_file)),
                format!("--audit-log-path={}", p(&log)),
                "--audit-log-format=json".into(),
                "--audit-log-mode=blocking".into(),
                // No rotation: a reader of the log sees every entry in one file.
                "--audit-log-maxsize=100000".into(),
            ]);
            Some(log)
        }
        None => None,
    };
    let apiserver_args = [
        format!("--etcd-servers={etcd_client_url}"),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", ports.apiserver),
        "--advertise-address=127.0.0.1".into(),
        // The `kubernetes` Endpoints may not point at a loopback address: without this the
        // reconciler logs an error every 10 s.
        "--endpoint-reconciler-type=none".into(),
        format!("--tls-cert-file={}", p(&files.apiserver_cert)),
        format!("--tls-private-key-file={}", p(&files.apiserver_key)),
        format!("--client-ca-file={}", p(&files.ca)),
        "--authorization-mode=Node,RBAC".into(),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        format!("--service-account-issuer={issuer}"),
        format!("--api-audiences={issuer}"),
        format!("--service-account-key-file={}", p(&files.sa_pub)),
        format!("--service-account-signing-key-file={}", p(&files.sa_key)),
        // So that a privileged pod meets Pod Security admission, not a blanket refusal.
        "--allow-privileged=true".into(),
        // The front-proxy settings silence "missing requestheader-client-ca-file" in the
        // controller-manager and scheduler, which read them from the apiserver.
        format!(
            "--requestheader-client-ca-file={}",
            p(&files.front_proxy_ca)
        ),
        format!(
            "--requestheader-allowed-names={}",
            pki::FRONT_PROXY_CLIENT_CN
        ),
        "--requestheader-username-headers=X-Remote-User".into(),
        "--requestheader-group-headers=X-Remote-Group".into(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
        format!(
            "--proxy-client-cert-file={}",
            p(&files.front_proxy_client_cert)
        ),
        format!(
            "--proxy-client-key-file={}",
            p(&files.front_proxy_client_key)
        ),
        "--profiling=false".into(),
    ];
    let apiserver_args: Vec<String> = apiserver_args.into_iter().chain(audit_args).collect();
    processes.spawn("kube-apiserver", &bin.apiserver, d, &apiserver_args)?;

    let client = kube::Client::try_from(admin.clone()).context("build the admin client")?;
    let readyz = || {
        let client = client.clone();
        async move { get_ok(&client, "/readyz").await }
    };
    processes
        .wait_until(
            "kube-apiserver /readyz",
            "kube-apiserver",
            APISERVER_READY_TIMEOUT,
            readyz,
        )
        .await?;
    let apiserver_ready = began.elapsed();

    processes.spawn(
        "kube-controller-manager",
        &bin.controller_manager,
        d,
        &[
            format!("--kubeconfig={}", p(&cm_kubeconfig)),
            format!("--authentication-kubeconfig={}", p(&cm_kubeconfig)),
            format!("--authorization-kubeconfig={}", p(&cm_kubeconfig)),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.controller_manager),
            format!("--service-account-private-key-file={}", p(&files.sa_key)),
            format!("--root-ca-file={}", p(&files.ca)),
            "--use-service-account-credentials=true".into(),
            "--controllers=*".into(),
            "--leader-elect=false".into(),
            "--profiling=false".into(),
        ],
    )?;
    processes.spawn(
        "kube-scheduler",
        &bin.scheduler,
        d,
        &[
            format!("--kubeconfig={}", p(&scheduler_kubeconfig)),
            format!("--authentication-kubeconfig={}", p(&scheduler_kubeconfig)),
            format!("--authorization-kubeconfig={}", p(&scheduler_kubeconfig)),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.scheduler),
            "--leader-elect=false".into(),
            "--profiling=false".into(),
        ],
    )?;

    // The `default` ServiceAccount of `default` is created by the controller-manager's
    // serviceaccount controller: its existence proves the controllers run.
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), "default");
    let default_account = || {
        let accounts = accounts.clone();
        async move { matches!(accounts.get_opt("default").await, Ok(Some(_))) }
    };
    processes
        .wait_until(
            "ServiceAccount default/default (created by the controller-manager)",
            "kube-controller-manager",
            CONTROLLERS_READY_TIMEOUT,
            default_account,
        )
        .await?;

    // The scheduler serves /healthz anonymously on its own self-signed certificate.
    let mut scheduler_config =
        kube::Config::new(format!("https://127.0.0.1:{}", ports.scheduler).parse()?);
    scheduler_config.accept_invalid_certs = true;
    let scheduler =
        kube::Client::try_from(scheduler_config).context("build the scheduler health client")?;
    let scheduler_healthy = || {
        let scheduler = scheduler.clone();
        async move { get_ok(&scheduler, "/healthz").await }
    };
    processes
        .wait_until(
            "kube-scheduler /healthz",
            "kube-scheduler",
            CONTROLLERS_READY_TIMEOUT,
            scheduler_healthy,
        )
        .await?;

    let started_in = began.elapsed();
    tracing::info!(
        url = %server_url,
        apiserver_ready_ms = apiserver_ready.as_millis(),
        started_ms = started_in.as_millis(),
        "control plane ready"
    );
    Ok(ControlPlane {
        processes,
        dir,
        server_url,
        ca_pem: pki.ca_pem,
        admin,
        started_in,
        audit_log,
    })
}

/// `GET path` answered with a 2xx within [`PROBE_TIMEOUT`].
async fn get_ok(client: &kube::Client, path: &str) -> bool {
    let Ok(request) = http::Request::get(path).body(Vec::new()) else {
        return false;
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, client.request_text(request)).await,
        Ok(Ok(_))
    )
}

/// Where the certificate files of one start were written.
struct PkiFiles {
    ca: PathBuf,
    apiserver_cert: PathBuf,
    apiserver_key: PathBuf,
    front_proxy_ca: PathBuf,
    front_proxy_client_cert: PathBuf,
    front_proxy_client_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

impl PkiFiles {
    fn write(dir: &Path, pki: &Pki) -> Result<PkiFiles> {
        let d = dir.join("pki");
        std::fs::create_dir(&d).context("create the pki directory")?;
        let files = PkiFiles {
            ca: d.join("ca.crt"),
            apiserver_cert: d.join("apiserver.crt"),
            apiserver_key: d.join("apiserver.key"),
            front_proxy_ca: d.join("front-proxy-ca.crt"),
            front_proxy_client_cert: d.join("front-proxy-client.crt"),
            front_proxy_client_key: d.join("front-proxy-client.key"),
            sa_key: d.join("sa.key"),
            sa_pub: d.join("sa.pub"),
        };
        for (path, content) in [
            (&files.ca, &pki.ca_pem),
            (&files.apiserver_cert, &pki.apiserver.cert_pem),
            (&files.apiserver_key, &pki.apiserver.key_pem),
            (&files.front_proxy_ca, &pki.front_proxy_ca_pem),
            (
                &files.front_proxy_client_cert,
                &pki.front_proxy_client.cert_pem,
            ),
            (
                &files.front_proxy_client_key,
                &pki.front_proxy_client.key_pem,
            ),
            (&files.sa_key, &pki.service_account_key_pem),
            (&files.sa_pub, &pki.service_account_pub_pem),
        ] {
            write_private(path, content.as_bytes())?;
        }
        Ok(files)
    }
}

/// Writes a file only the owner can read (keys and tokens live in these files).
fn write_private(path: &Path, content: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(content)
        .with_context(|| format!("write {}", path.display()))
}

enum Credentials<'a> {
    Cert(&'a CertAndKey),
    Token(&'a str),
}

/// A kubeconfig with one cluster, user and context, every credential embedded.
fn kubeconfig_yaml(
    server: &str,
    ca_pem: &str,
    user: &str,
    credentials: Credentials<'_>,
    namespace: &str,
) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user_fields = match credentials {
        Credentials::Cert(c) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&c.cert_pem),
            b64(&c.key_pem)
        ),
        Credentials::Token(token) => format!("    token: {token}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: repobox-test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: \"{user}\"\n  user:\n{user_fields}\
         contexts:\n- name: repobox-test\n  context:\n    cluster: repobox-test\n    user: \"{user}\"\n    namespace: {namespace}\n\
         current-context: repobox-test\n",
        ca = b64(ca_pem),
    )
}

fn config_from_yaml(yaml: &str) -> Result<kube::Config> {
    let kubeconfig = Kubeconfig::from_yaml(yaml).context("parse the generated kubeconfig")?;
    kube::Config::try_from(kubeconfig).context("load the generated kubeconfig")
}

/// One spawned process, its output going to `{dir}/{name}.log`.
struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// Every process of one control plane; stopped (and reaped) on drop.
struct Processes(Vec<Component>);

impl Processes {
    /// Spawns `program args` with its output in `{dir}/{name}.log`, in its own process group,
    /// killed by the kernel when the test process ends.
    fn spawn(
        &mut self,
        name: &'static str,
        program: &Path,
        dir: &Path,
        args: &[String],
    ) -> Result<()> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().context("duplicate a log file handle")?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let parent = std::process::id();
        // SAFETY: between fork and exec only async-signal-safe calls: prctl(2) and getppid(2),
        // and an io::Error built from a raw errno (no allocation).
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The test process may have died before the death signal was armed.
                if u32::try_from(nix::unistd::getppid().as_raw()).ok() != Some(parent) {
                    return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
                }
                Ok(())
            });
        }
        let child =
            spawn_from_launcher(cmd).with_context(|| format!("spawn {}", program.display()))?;
        self.0.push(Component { name, child, log });
        Ok(())
    }

    /// A `sh` that removes `dir` once the test process is gone: it reads a pipe whose only
    /// writer is this process, so EOF means the process ended, however it ended. The death
    /// signal kills the components at the same moment, hence the retries while they go.
    fn spawn_cleanup_sentinel(&mut self, dir: &Path) -> Result<()> {
        const SCRIPT: &str = r#"read _ignored
i=0
while [ "$i" -lt 100 ]; do
  rm -rf "$1" 2>/dev/null
  [ -e "$1" ] || exit 0
  i=$((i + 1))
  sleep 0.1
done
exit 1"#;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("repobox-k8s-cleanup")
            .arg(dir)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = spawn_from_launcher(cmd).context("spawn the cleanup sentinel (sh)")?;
        self.0.push(Component {
            name: "cleanup-sentinel",
            child,
            log: PathBuf::new(),
        });
        Ok(())
    }

    /// Polls `probe` until it holds, failing early (with the log's tail) when any process
    /// exits, and on timeout with the tail of `blame`'s log.
    async fn wait_until<F, Fut>(
        &mut self,
        what: &str,
        blame: &str,
        timeout: Duration,
        mut probe: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running(what)?;
            if probe().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self
                    .0
                    .iter()
                    .find(|c| c.name == blame)
                    .map(|c| c.log.clone())
                    .unwrap_or_default();
                bail!(
                    "{what} not ready within {timeout:?}; last lines of {}:\n{}",
                    log.display(),
                    tail(&log, LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Fails when a process has exited, quoting the end of its log.
    fn check_running(&mut self, what: &str) -> Result<()> {
        for c in &mut self.0 {
            let status = c
                .child
                .try_wait()
                .with_context(|| format!("poll {}", c.name))?;
            if let Some(status) = status {
                let log = tail(&c.log, LOG_TAIL_LINES);
                let message = format!(
                    "{} exited ({status}) while waiting for {what}; last lines of {}:\n{log}",
                    c.name,
                    c.log.display()
                );
                if log.contains("address already in use") {
                    return Err(PortTaken(message).into());
                }
                bail!(message);
            }
        }
        Ok(())
    }

    /// SIGTERM to every process group, SIGKILL to what is left after [`STOP_GRACE`], all reaped.
    fn stop(&mut self) {
        let signal_all = |components: &mut Vec<Component>, signal: Signal| {
            for c in components.iter_mut() {
                if matches!(c.child.try_wait(), Ok(None))
                    && let Ok(pid) = i32::try_from(c.child.id())
                {
                    let _ = killpg(Pid::from_raw(pid), signal);
                }
            }
        };
        signal_all(&mut self.0, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline
            && self
                .0
                .iter_mut()
                .any(|c| matches!(c.child.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        signal_all(&mut self.0, Signal::SIGKILL);
        for c in &mut self.0 {
            let _ = c.child.wait();
        }
        self.0.clear();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a log file (or why it could not be read).
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(log unreadable: {e})"),
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process: `PR_SET_PDEATHSIG` fires when
/// the thread that forked exits, and test threads and runtime workers exit early.
fn spawn_from_launcher(cmd: Command) -> io::Result<Child> {
    static LAUNCHER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let launcher = LAUNCHER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("repobox-k8s-launcher".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| tx)
    });
    let Some(launcher) = launcher else {
        return Err(io::Error::other(
            "the process launcher thread could not start",
        ));
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    launcher
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the process launcher thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the process launcher thread did not answer"))?
}
