//! A real `redis-server` process on a free loopback port.
//!
//! Tests of the runner side talk to Redis exactly as production does (streams, consumer groups,
//! hashes), so they run against the real server rather than a mock: behaviour such as `XAUTOCLAIM`
//! edge cases, `NOAUTH` errors or a connection dropped by a restart only shows up with the real thing.
//!
//! Each [`RedisServer`] owns its own temporary working directory and runs with persistence turned
//! off (`--save "" --appendonly no`), so instances never share state and leave nothing behind.
//! The process is killed (and reaped) when the value is dropped.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use repobox_testbed::redis_server::RedisServer;
//! let redis = RedisServer::start().await?;
//! let mut con = redis.connection().await;
//! let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut con).await?;
//! # Ok(()) }
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The binary we run; Debian's `redis-server` package installs it on `PATH`.
const REDIS_BINARY: &str = "redis-server";

/// How long a fresh server may take to answer `PING`. Generous because CI machines with two
/// cores can be slow while cargo is compiling in parallel.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often we pick a new port when the one we chose was taken between `free_port()` and the
/// server's `bind` (a genuine race when many tests start servers in parallel).
const PORT_ATTEMPTS: usize = 5;

/// Options for starting a [`RedisServer`]; obtain one with [`RedisServer::builder`].
#[derive(Debug, Clone, Default)]
pub struct RedisServerBuilder {
    password: Option<String>,
}

impl RedisServerBuilder {
    /// Require this password (`--requirepass`), to test that the runner passes credentials
    /// from its Redis URL. [`RedisServer::url`] then includes the password.
    pub fn requirepass(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Starts the server and waits until it answers `PING`.
    pub async fn start(self) -> anyhow::Result<RedisServer> {
        ensure_binary_available()?;
        let dir = tempfile::Builder::new()
            .prefix("repobox-redis-")
            .tempdir()
            .context("create a temporary directory for redis-server")?;
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = crate::free_port();
            match spawn_and_wait(port, self.password.as_deref(), dir.path()).await {
                Ok(child) => {
                    return Ok(RedisServer {
                        child: Some(child),
                        port,
                        password: self.password,
                        dir,
                    });
                }
                Err(SpawnError::PortTaken(e)) => last_error = Some(e),
                Err(SpawnError::Other(e)) => return Err(e),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no attempt was made"))
            .context(format!(
                "redis-server could not bind a free port in {PORT_ATTEMPTS} attempts"
            )))
    }
}

/// A running `redis-server` owned by a test. Killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    /// `None` between [`RedisServer::stop`] and [`RedisServer::restart`].
    child: Option<Child>,
    port: u16,
    password: Option<String>,
    /// Working directory (`--dir`) and log file; removed when the server is dropped.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server without a password on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::builder().start().await
    }

    /// Starts a server that requires `password` (shorthand for the builder).
    pub async fn start_with_password(password: &str) -> anyhow::Result<Self> {
        Self::builder().requirepass(password).start().await
    }

    /// Options for a server, e.g. `RedisServer::builder().requirepass("s3cret").start()`.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// The port the server listens on (stays the same across [`RedisServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL to give to the code under test: `redis://127.0.0.1:PORT/`, or
    /// `redis://:PASSWORD@127.0.0.1:PORT/` (password percent-encoded) when one is required.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{}@127.0.0.1:{}/", percent_encode(pw), self.port),
            None => self.url_without_password(),
        }
    }

    /// The URL without credentials, for tests that check an unauthenticated client is refused.
    pub fn url_without_password(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The process id while the server runs; `None` after [`RedisServer::stop`].
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// A connection authenticated as [`RedisServer::url`] says.
    ///
    /// This panics on failure on purpose: it is a test fixture, and a test that cannot reach
    /// its own Redis has nothing sensible to do but fail. Use [`RedisServer::try_connection`]
    /// to handle the error instead.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        match self.try_connection().await {
            Ok(con) => con,
            Err(e) => panic!("connect to the test redis-server: {e:#}"),
        }
    }

    /// Like [`RedisServer::connection`], but returns the error.
    pub async fn try_connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url()).context("parse the redis URL")?;
        client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connect to redis-server on port {}", self.port))
    }

    /// Kills the server and waits for it to exit. Clients see their connections drop.
    /// Calling it on a stopped server does nothing.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL rather than SHUTDOWN: nothing is persisted anyway, and it is what a
            // crashed or evicted Redis pod looks like to the runner.
            let _ = child.kill().await;
        }
    }

    /// Stops the server (if running) and starts a new one on the SAME port, so clients holding
    /// the URL can reconnect. Data is lost (persistence is off), like a restarted Redis pod
    /// without a volume.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        // No port retry here: the whole point is to come back on the same port. Redis sets
        // SO_REUSEADDR, so the old connections in TIME_WAIT do not block the bind.
        let child = spawn_and_wait(self.port, self.password.as_deref(), self.dir.path())
            .await
            .map_err(SpawnError::into_anyhow)
            .with_context(|| format!("restart redis-server on port {}", self.port))?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `kill_on_drop` would send SIGKILL too, but it does not reap the process; kill and
            // reap here so that "pid gone" holds as soon as the value is dropped.
            let _ = child.start_kill();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
    }
}

/// Why a spawn attempt failed: a lost port race is retried with another port, anything else
/// is reported at once.
enum SpawnError {
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

impl SpawnError {
    fn into_anyhow(self) -> anyhow::Error {
        match self {
            SpawnError::PortTaken(e) | SpawnError::Other(e) => e,
        }
    }
}

impl From<anyhow::Error> for SpawnError {
    fn from(e: anyhow::Error) -> Self {
        SpawnError::Other(e)
    }
}

/// Fails with an installation hint when `redis-server` is not on `PATH`, instead of a bare
/// "No such file or directory" from the spawn.
fn ensure_binary_available() -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| dir.join(REDIS_BINARY).is_file());
    if !found {
        bail!(
            "`{REDIS_BINARY}` is not on PATH; the test bed needs a real Redis \
             (Debian/Ubuntu: `apt-get install redis-server`)"
        );
    }
    Ok(())
}

/// Spawns `redis-server` on `port` and waits until it answers `PING` (or `NOAUTH`, which also
/// proves it is up when a password is required).
async fn spawn_and_wait(
    port: u16,
    password: Option<&str>,
    dir: &Path,
) -> Result<Child, SpawnError> {
    let log_path = dir.join(format!("redis-{port}.log"));
    let log = File::create(&log_path).context("create the redis-server log file")?;
    let log_err = log.try_clone().context("duplicate the log file handle")?;

    let mut cmd = Command::new(REDIS_BINARY);
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--dir")
        .arg(dir)
        .arg("--daemonize")
        .arg("no");
    if let Some(pw) = password {
        cmd.arg("--requirepass").arg(pw);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| {
        format!("spawn {REDIS_BINARY} (is it installed? `apt-get install redis-server`)")
    })?;

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("poll redis-server")? {
            let log = read_log(&log_path);
            let err =
                anyhow::anyhow!("redis-server exited with {status} before it was ready:\n{log}");
            return Err(if log.contains("Address already in use") {
                SpawnError::PortTaken(err)
            } else {
                SpawnError::Other(err)
            });
        }
        if ping(port).await {
            // The answer could come from someone else who took the port; make sure our
            // process is still the one alive.
            if child.try_wait().context("poll redis-server")?.is_none() {
                return Ok(child);
            }
            continue;
        }
        if Instant::now() >= deadline {
            let _ = child.kill().await;
            let log = read_log(&log_path);
            return Err(SpawnError::Other(anyhow::anyhow!(
                "redis-server on port {port} did not answer PING within {READY_TIMEOUT:?}:\n{log}"
            )));
        }
        // Pacing between connection attempts while the server boots (not synchronisation:
        // readiness is decided by the PING answer above).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One readiness probe: a raw RESP `PING`; `+PONG` or a `NOAUTH` error both mean "up".
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 128];
        let n = stream.read(&mut buf).await.ok()?;
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        Some(reply.starts_with("+PONG") || reply.starts_with("-NOAUTH"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn read_log(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(log unreadable: {e})"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so any password fits in the
/// userinfo part of the URL (redis-rs percent-decodes it).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
