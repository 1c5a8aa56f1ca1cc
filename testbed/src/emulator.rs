//! Launcher for the stateful Kubernetes API emulator (`tests/emulator`, built on kmock).
//!
//! No real kube-apiserver can run on the development machines or in CI, so every test that
//! needs Kubernetes starts its own emulator process: nothing leaks between tests, and the
//! process is killed when the [`Emulator`] is dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long a cold emulator may take to print its ready line (Python imports are slow on CI).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a venv installation may take (it downloads from PyPI).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// One request the emulator served (control endpoints under `/_emulator/` are not recorded).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RequestRecord {
    /// HTTP method, upper case.
    pub method: String,
    /// URL path without the query.
    pub path: String,
    /// The raw query string (may be empty).
    pub query: String,
    /// The HTTP status answered.
    pub status: u16,
}

impl RequestRecord {
    /// Whether this request changed (or tried to change) state: POST, PUT, PATCH, DELETE.
    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }
}

#[derive(Serialize)]
struct FaultSpec<'a> {
    method: Option<&'a str>,
    path_regex: &'a str,
    status: u16,
    count: Option<u32>,
}

/// A running emulator process with its URL and a kubeconfig file pointing at it.
pub struct Emulator {
    child: Child,
    url: String,
    port: u16,
    dir: tempfile::TempDir,
}

impl Emulator {
    /// Start a fresh emulator on a free loopback port (installing the venv first if needed).
    pub async fn start() -> Result<Emulator> {
        let python = ensure_python().await?;
        let script = crate::workspace_root().join("tests").join("emulator");
        let port = crate::free_port();
        let mut child = Command::new(&python)
            .arg(&script)
            .arg("--port")
            .arg(port.to_string())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {} {}", python.display(), script.display()))?;
        let stdout = child.stdout.take().context("emulator stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("REPOBOX-EMULATOR READY ") {
                    let url = rest
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("url="))
                        .context("ready line without url=")?;
                    return Ok::<String, anyhow::Error>(url.to_string());
                }
            }
            bail!("the emulator exited before it was ready")
        })
        .await
        .context("the emulator did not become ready in time")??;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let dir = tempfile::Builder::new()
            .prefix("repobox-emulator-")
            .tempdir()
            .context("create the emulator temp dir")?;
        let emulator = Emulator {
            child,
            url,
            port,
            dir,
        };
        std::fs::write(emulator.kubeconfig_path(), emulator.kubeconfig_yaml())
            .context("write the emulator kubeconfig")?;
        Ok(emulator)
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where a kubeconfig for this emulator was written (for `kubectl --kubeconfig`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A kubeconfig document for this emulator (plain HTTP, no auth, namespace `default`).
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {url}\n\
             contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\n\
             current-context: emulator\nusers:\n- name: emulator\n  user: {{}}\n",
            url = self.url
        )
    }

    /// A kube config for this emulator (no auth), to customise before building a client.
    pub fn config(&self) -> Result<kube::Config> {
        Ok(kube::Config::new(self.url.parse().context("emulator url")?))
    }

    /// A kube client for this emulator, with kube's default retries (429/503/504 are retried
    /// up to 15 times, honouring `Retry-After`, as against a real cluster).
    pub fn client(&self) -> Result<kube::Client> {
        kube::Client::try_from(self.config()?).context("build a kube client for the emulator")
    }

    /// A kube client that surfaces every error status at once (no transparent retries).
    pub fn client_without_retry(&self) -> Result<kube::Client> {
        let mut config = self.config()?;
        config.default_retry = false;
        kube::Client::try_from(config).context("build a kube client for the emulator")
    }

    /// The next `count` requests matching `method` (None = any) and `path_regex` (searched in the
    /// path) are answered with `status` and a Kubernetes `Status` body (429 adds `Retry-After: 1`).
    pub async fn inject_fault(
        &self,
        method: Option<&str>,
        path_regex: &str,
        status: u16,
        count: u32,
    ) -> Result<()> {
        let spec = FaultSpec {
            method,
            path_regex,
            status,
            count: Some(count),
        };
        self.control(
            "POST",
            "/_emulator/faults",
            Some(serde_json::to_vec(&spec)?),
        )
        .await?;
        Ok(())
    }

    /// Drop all fault rules that have not been used up yet.
    pub async fn clear_faults(&self) -> Result<()> {
        self.control("DELETE", "/_emulator/faults", None).await?;
        Ok(())
    }

    /// Every request served so far (oldest first), to count API calls in tests.
    pub async fn requests(&self) -> Result<Vec<RequestRecord>> {
        let body = self.control("GET", "/_emulator/requests", None).await?;
        serde_json::from_slice(&body).context("decode the emulator request log")
    }

    /// Forget the request log (e.g. after a test's setup phase).
    pub async fn clear_requests(&self) -> Result<()> {
        self.control("DELETE", "/_emulator/requests", None).await?;
        Ok(())
    }

    /// End every open watch and make all current resourceVersions too old: watchers that
    /// resume get `410 Gone` and must relist (to test relist handling).
    pub async fn expire_watches(&self) -> Result<()> {
        self.control("POST", "/_emulator/expire", None).await?;
        Ok(())
    }

    /// Object counts, watcher count and the current resourceVersion (for benchmarks and debugging).
    pub async fn stats(&self) -> Result<serde_json::Value> {
        let body = self.control("GET", "/_emulator/stats", None).await?;
        serde_json::from_slice(&body).context("decode the emulator stats")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stop the emulator now (it is also killed on drop).
    pub async fn shutdown(mut self) -> Result<()> {
        self.child.kill().await.context("kill the emulator")?;
        Ok(())
    }

    /// A minimal HTTP/1.1 exchange with the control endpoints (no extra HTTP client dependency).
    async fn control(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .context("connect to the emulator")?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
             Content-Length: {len}\r\nConnection: close\r\n\r\n",
            port = self.port,
            len = body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("malformed HTTP response from the emulator")?;
        let head = String::from_utf8_lossy(&response[..split]).to_string();
        let status_ok = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .is_some_and(|code| code.starts_with('2'));
        let mut payload = response[split + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            payload = dechunk(&payload)?;
        }
        if !status_ok {
            bail!(
                "emulator {method} {path} failed: {head}: {}",
                String::from_utf8_lossy(&payload)
            );
        }
        Ok(payload)
    }
}

/// Decode an HTTP/1.1 chunked body.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk header")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// The interpreter to run the emulator with: `REPOBOX_EMULATOR_PYTHON`, else the workspace venv,
/// created and filled from `tests/emulator/requirements.txt` when it lacks kmock.
async fn ensure_python() -> Result<PathBuf> {
    if let Some(python) = std::env::var_os("REPOBOX_EMULATOR_PYTHON") {
        return Ok(PathBuf::from(python));
    }
    let root = crate::workspace_root();
    let python = root.join(".venv").join("bin").join("python");
    if has_kmock(&python).await {
        return Ok(python);
    }
    // Parallel tests race to create the venv: the first one installs, the others wait.
    let lock = root.join(".venv.lock");
    let _guard = DirLock::acquire(&lock, INSTALL_TIMEOUT).await?;
    if has_kmock(&python).await {
        return Ok(python);
    }
    let requirements = root.join("tests").join("emulator").join("requirements.txt");
    run(
        Command::new(std::env::var("PYTHON3").unwrap_or_else(|_| "python3".into()))
            .args(["-m", "venv"])
            .arg(root.join(".venv")),
    )
    .await
    .context("create the emulator venv (python3 -m venv .venv)")?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "-r"])
        .arg(&requirements))
    .await
    .context("install tests/emulator/requirements.txt into .venv")?;
    if !has_kmock(&python).await {
        bail!(
            "kmock is still missing from {} after installing",
            python.display()
        );
    }
    Ok(python)
}

async fn has_kmock(python: &Path) -> bool {
    python.exists()
        && Command::new(python)
            .args(["-c", "import kmock, aiohttp, jsonpatch"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
}

async fn run(cmd: &mut Command) -> Result<()> {
    let status = tokio::time::timeout(INSTALL_TIMEOUT, cmd.status())
        .await
        .map_err(|_| anyhow!("timed out"))??;
    if !status.success() {
        bail!("exited with {status}");
    }
    Ok(())
}

/// A cross-process lock: `mkdir` is atomic. A lock older than the install timeout is stale.
struct DirLock(PathBuf);

impl DirLock {
    async fn acquire(path: &Path, timeout: Duration) -> Result<DirLock> {
        let start = Instant::now();
        loop {
            match std::fs::create_dir(path) {
                Ok(()) => return Ok(DirLock(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > timeout);
                    if stale {
                        let _ = std::fs::remove_dir(path);
                        continue;
                    }
                    if start.elapsed() > timeout {
                        bail!("timed out waiting for {}", path.display());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("create {}", path.display())),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
