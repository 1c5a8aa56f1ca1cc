//! A minimal private start-up of the real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler) for the kubelet tests, shared by every test of the
//! binary: started once, on a thread that lives as long as the test process, with
//! `PR_SET_PDEATHSIG` so the processes die with it. Certificates come from `openssl`.
//!
//! The binaries are found through `REPOBOX_K8S_ASSETS`; when it is unset, [`assets`] returns None
//! and the tests print a SKIPPED line.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where the control plane lives.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    pub dir: PathBuf,
    pub url: String,
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// An admin client (system:masters).
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(cfg)?)
    }
}

/// The directory of the Kubernetes binaries, if the tests may use them.
pub fn assets() -> Option<PathBuf> {
    std::env::var_os("REPOBOX_K8S_ASSETS").map(PathBuf::from)
}

static CP: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
static CP_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Registered with `atexit`: the test harness leaves through `exit`, the processes die with
/// the process (PR_SET_PDEATHSIG); their etcd data (~120 MB) must not stay behind.
extern "C" fn remove_dir_at_exit() {
    if let Some(d) = CP_DIR.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Directories of earlier runs whose test process is gone (killed before `exit`).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let is_ours = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("repobox-cp-"));
        let owner = std::fs::read_to_string(path.join("owner.pid")).ok();
        let alive = owner
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if is_ours && !alive {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// The shared control plane (started on first use; blocking).
pub fn shared(assets: &Path) -> Result<ControlPlane> {
    CP.get_or_init(|| {
        let assets = assets.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        // The processes are children of this thread, which never ends: PR_SET_PDEATHSIG fires
        // when the test process exits.
        std::thread::spawn(move || {
            let _ = tx.send(start(&assets).map_err(|e| format!("{e:#}")));
            loop {
                std::thread::park();
            }
        });
        rx.recv()
            .unwrap_or_else(|_| Err("control plane thread died".into()))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A key and a certificate signed by the test CA.
fn cert(dir: &Path, name: &str, subject: &str, ext: &str) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.ext")), ext)?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    )
}

fn kubeconfig(dir: &Path, name: &str, url: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.kubeconfig"));
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {d}/ca.crt\nusers:\n- name: {name}\n  user:\n    client-certificate: {d}/{name}.crt\n    client-key: {d}/{name}.key\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\ncurrent-context: test\n"
        ),
    )?;
    Ok(path)
}

fn spawn(dir: &Path, name: &str, program: &Path, args: &[String]) -> Result<()> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::libc::prctl(
                nix::libc::PR_SET_PDEATHSIG,
                nix::libc::SIGKILL as nix::libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("start {}", program.display()))?;
    Ok(())
}

fn start(assets: &Path) -> Result<ControlPlane> {
    sweep_stale();
    let dir = tempfile::Builder::new()
        .prefix("repobox-cp-")
        .tempdir()?
        .keep();
    std::fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
    if CP_DIR.set(dir.clone()).is_ok() {
        // SAFETY: registers a plain extern "C" function.
        unsafe {
            nix::libc::atexit(remove_dir_at_exit);
        }
    }
    let started = Instant::now();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=repobox-test-ca",
        ],
    )?;
    cert(
        &dir,
        "apiserver",
        "/CN=kube-apiserver",
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n",
    )?;
    for (name, subject) in [
        ("admin", "/O=system:masters/CN=admin"),
        ("controller-manager", "/CN=system:kube-controller-manager"),
        ("scheduler", "/CN=system:kube-scheduler"),
    ] {
        cert(&dir, name, subject, "extendedKeyUsage=clientAuth\n")?;
    }
    openssl(&dir, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;

    let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    spawn(
        &dir,
        "etcd",
        Path::new("/usr/bin/etcd"),
        &[
            format!("--data-dir={}/etcd", dir.display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
        ],
    )?;
    let d = dir.display();
    let url = format!("https://127.0.0.1:{api_port}");
    let issuer = "https://kubernetes.default.svc.cluster.local";
    spawn(
        &dir,
        "kube-apiserver",
        &assets.join("kube-apiserver"),
        &[
            format!("--etcd-servers={etcd_url}"),
            format!("--secure-port={api_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--tls-cert-file={d}/apiserver.crt"),
            format!("--tls-private-key-file={d}/apiserver.key"),
            format!("--client-ca-file={d}/ca.crt"),
            "--authorization-mode=Node,RBAC".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            format!("--service-account-issuer={issuer}"),
            format!("--service-account-key-file={d}/sa.pub"),
            format!("--service-account-signing-key-file={d}/sa.key"),
            format!("--api-audiences={issuer}"),
        ],
    )?;
    let admin = kubeconfig(&dir, "admin", &url)?;
    let cm = kubeconfig(&dir, "controller-manager", &url)?;
    let sched = kubeconfig(&dir, "scheduler", &url)?;
    wait_ready(&dir, &url)?;
    spawn(
        &dir,
        "kube-controller-manager",
        &assets.join("kube-controller-manager"),
        &[
            format!("--kubeconfig={}", cm.display()),
            format!("--authentication-kubeconfig={}", cm.display()),
            format!("--authorization-kubeconfig={}", cm.display()),
            format!("--service-account-private-key-file={d}/sa.key"),
            format!("--root-ca-file={d}/ca.crt"),
            "--use-service-account-credentials".into(),
            "--controllers=*".into(),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
        ],
    )?;
    spawn(
        &dir,
        "kube-scheduler",
        &assets.join("kube-scheduler"),
        &[
            format!("--kubeconfig={}", sched.display()),
            format!("--authentication-kubeconfig={}", sched.display()),
            format!("--authorization-kubeconfig={}", sched.display()),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
        ],
    )?;
    println!(
        "control plane at {url} ({}), up in {:.1} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ControlPlane {
        dir,
        url,
        kubeconfig: admin,
    })
}

/// Poll `/readyz` with the admin certificate until the API server answers `ok`.
fn wait_ready(dir: &Path, url: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(60);
    let d = dir.display();
    loop {
        let out = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "2",
                "--cacert",
                &format!("{d}/ca.crt"),
                "--cert",
                &format!("{d}/admin.crt"),
                "--key",
                &format!("{d}/admin.key"),
                &format!("{url}/readyz"),
            ])
            .output()
            .context("curl")?;
        if out.stdout == b"ok" {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "kube-apiserver not ready after 60 s; see {}/kube-apiserver.log",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
