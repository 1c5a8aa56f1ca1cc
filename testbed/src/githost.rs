//! A smart-HTTP git host that checks credentials the way GitHub and GitLab do.
//!
//! The runner clones and pushes with a user's token sent as HTTP basic credentials with user name
//! `oauth2` (see the contract). To test that end to end — right token works, wrong token is an
//! authentication failure, a rotated token is picked up, a rejected push is reported — we need a
//! host that real `git` talks to. [`GitHost`] is that host:
//!
//! - bare repositories live in a temporary directory;
//! - a small axum server on `127.0.0.1:<port>` checks `Authorization: Basic
//!   base64("oauth2:" + token)` on every request and answers `401` with a `WWW-Authenticate`
//!   challenge otherwise (so git reports "Authentication failed");
//! - authenticated requests are handed to the real `git http-backend` as a CGI program, so the
//!   protocol (v0/v2, gzip bodies, chunked pushes, hooks) is exactly git's own.
//!
//! The HTTP server runs on its own thread with its own tokio runtime. That keeps it serving even
//! when a test blocks its own runtime (for instance a `#[tokio::test]` on the default
//! current-thread runtime that runs `git` through `std::process::Command`): a server spawned
//! on the test's runtime would deadlock there.
//!
//! The repository helpers (`create_repo`, `branch_sha`, ...) run the git CLI directly on the
//! bare repositories (never through HTTP). They are synchronous on purpose: they are short,
//! local and usable from any context, sync or async.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use repobox_testbed::githost::GitHost;
//! let host = GitHost::start("ghp_secret").await?;
//! host.create_repo("acme/api", &[("README.md", "# api\n")])?;
//! let url = host.url("acme/api"); // http://127.0.0.1:PORT/acme/api.git
//! # let _ = url; Ok(()) }
//! ```

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use futures::StreamExt as _;
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::forge::{Forge, ForgeKind};

/// The user name the contract prescribes for token authentication.
pub const USERNAME: &str = "oauth2";

/// The realm in our `WWW-Authenticate` challenge.
pub const REALM: &str = "repobox-test";

/// Author and committer of the commits the helpers create.
pub const AUTHOR_NAME: &str = "Repobox Testbed";
/// E-mail of [`AUTHOR_NAME`].
pub const AUTHOR_EMAIL: &str = "testbed@repobox.invalid";

/// Upper bound on the CGI header block; `git http-backend` writes a handful of short lines.
const MAX_CGI_HEADER: usize = 64 * 1024;

/// One HTTP request seen by the host, for assertions such as "the runner authenticated" or
/// "it pushed exactly once". It deliberately holds no header and never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method, e.g. `GET` or `POST`.
    pub method: String,
    /// Request path, e.g. `/acme/api.git/info/refs`.
    pub path: String,
    /// Raw query string without `?`, e.g. `service=git-upload-pack`.
    pub query: Option<String>,
    /// HTTP status code of the response.
    pub status: u16,
    /// Whether the request carried the right credentials.
    pub authorized: bool,
}

/// State shared between the [`GitHost`] handle and the server thread.
struct Shared {
    /// The `Authorization` header value we accept, precomputed; rotated by `set_token`.
    expected_auth: RwLock<String>,
    log: Mutex<Vec<RequestRecord>>,
    /// `GIT_PROJECT_ROOT`: the directory holding `<name>.git`.
    repos: PathBuf,
    /// `HOME` for every git process, so the machine's `~/.gitconfig` never leaks in.
    home: PathBuf,
    /// `true` while fetches are held ([`GitHost::hold_fetches`]).
    fetch_gate: tokio::sync::watch::Sender<bool>,
    /// Fetch requests that were held.
    fetches_held: std::sync::atomic::AtomicUsize,
}

/// A running git host. The server stops and the repositories are deleted on drop.
pub struct GitHost {
    shared: Arc<Shared>,
    port: u16,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// The GitHub / GitLab API double on the same host and port, when started with one.
    forge: Option<Forge>,
    /// Keeps `repos/` and `home/` alive; declared last so it is removed after the server stops.
    _dir: TempDir,
}

impl std::fmt::Debug for GitHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hand-written so the expected credentials can never end up in a Debug print.
        f.debug_struct("GitHost")
            .field("port", &self.port)
            .field("repos", &self.shared.repos)
            .finish_non_exhaustive()
    }
}

impl GitHost {
    /// Starts a host that accepts `oauth2:{token}` and serves no repository yet.
    pub async fn start(token: &str) -> anyhow::Result<GitHost> {
        Self::start_inner(token, None).await
    }

    /// Starts a host that also serves the `kind` forge API (see [`crate::forge`]) under
    /// `/api/v3` (GitHub Enterprise) or `/api/v4` (GitLab), accepting the same token.
    pub async fn start_with_forge(token: &str, kind: ForgeKind) -> anyhow::Result<GitHost> {
        Self::start_inner(token, Some(Forge::new(kind, token))).await
    }

    /// The forge API double, when started with one.
    pub fn forge(&self) -> Option<&Forge> {
        self.forge.as_ref()
    }

    async fn start_inner(token: &str, forge: Option<Forge>) -> anyhow::Result<GitHost> {
        ensure_git()?;
        let dir = tempfile::Builder::new()
            .prefix("repobox-githost-")
            .tempdir()
            .context("create the git host's temporary directory")?;
        let repos = dir.path().join("repos");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&repos).context("create the repositories directory")?;
        std::fs::create_dir_all(&home).context("create the git HOME directory")?;

        // Binding port 0 is race-free: the port is ours from here on, and connections made
        // before the accept loop runs wait in the backlog.
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("bind the git host's HTTP port")?;
        listener
            .set_nonblocking(true)
            .context("make the listener non-blocking")?;
        let port = listener
            .local_addr()
            .context("read the git host's port")?
            .port();

        let shared = Arc::new(Shared {
            expected_auth: RwLock::new(expected_authorization(token)),
            log: Mutex::new(Vec::new()),
            repos,
            home,
            fetch_gate: tokio::sync::watch::Sender::new(false),
            fetches_held: std::sync::atomic::AtomicUsize::new(0),
        });

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("githost")
            .enable_all()
            .build()
            .context("build the git host's runtime")?;
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let mut app = Router::new();
        if let Some(forge) = &forge {
            forge.attach(
                shared.repos.clone(),
                shared.home.clone(),
                format!("http://127.0.0.1:{port}"),
            );
            app = app.nest(forge.kind().prefix(), forge.router());
        }
        let app = app
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let thread = std::thread::Builder::new()
            .name(format!("githost-{port}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("git host listener: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        result = axum::serve(listener, app).into_future() => {
                            if let Err(e) = result {
                                tracing::error!("git host server: {e}");
                            }
                        }
                        _ = shutdown_rx => {}
                    }
                });
                // Dropping the runtime here cancels in-flight connections; their CGI children
                // are killed through `kill_on_drop`.
                drop(runtime);
            })
            .context("spawn the git host thread")?;

        Ok(GitHost {
            shared,
            port,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
            forge,
            _dir: dir,
        })
    }

    /// The port the HTTP server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The clone URL of repository `name`: `http://127.0.0.1:PORT/<name>.git`.
    /// `name` may contain slashes (`acme/api`), like a GitHub or GitLab path.
    pub fn url(&self, name: &str) -> String {
        format!("{}/{}.git", self.base_url(), name.trim_matches('/'))
    }

    /// Accept `oauth2:{new}` from now on (and no longer the old token), to test token rotation.
    pub fn set_token(&self, new: &str) {
        let mut guard = self
            .shared
            .expected_auth
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = expected_authorization(new);
        if let Some(forge) = &self.forge {
            forge.set_token(new);
        }
    }

    /// Every request served so far, oldest first. Never contains credentials.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock_log(&self.shared).clone()
    }

    /// Forgets the request log, e.g. between the setup and the part of a test that counts.
    pub fn clear_requests(&self) {
        lock_log(&self.shared).clear();
    }

    /// Stops the HTTP server; later connections are refused. The repositories stay readable
    /// through the helpers until the host is dropped. Calling it twice does nothing.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Joining blocks; do it off the async worker. The runtime shuts down promptly
            // because in-flight tasks are cancelled, not awaited.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Path of the bare repository `<name>.git` on disk.
    pub fn repo_path(&self, name: &str) -> PathBuf {
        self.shared
            .repos
            .join(format!("{}.git", name.trim_matches('/')))
    }

    /// Creates the bare repository `<name>.git` whose `main` branch (and `HEAD`) holds one
    /// commit with `files` (`(path, content)`; paths may contain directories).
    pub fn create_repo(&self, name: &str, files: &[(&str, &str)]) -> anyhow::Result<()> {
        let repo = self.init_bare(name)?;
        let mut stream = String::new();
        let now = unix_now();
        push_commit(
            &mut stream,
            "refs/heads/main",
            now,
            "Initial commit",
            None,
            files.iter().map(|(p, c)| (*p, *c)),
        );
        self.fast_import(&repo, &stream)
    }

    /// Adds branch `branch` to repository `name`: one commit on top of `main` that writes
    /// `files` (a base branch that differs from the default branch).
    pub fn create_branch(
        &self,
        name: &str,
        branch: &str,
        files: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let repo = self.existing_repo(name)?;
        if self.branch_sha(name, branch).is_some() {
            bail!("branch {branch} already exists in {name}");
        }
        let mut stream = String::new();
        push_commit(
            &mut stream,
            &format!("refs/heads/{branch}"),
            unix_now(),
            &format!("Add files on {branch}"),
            Some("refs/heads/main^0"),
            files.iter().map(|(p, c)| (*p, *c)),
        );
        self.fast_import(&repo, &stream)
    }

    /// Creates (or moves) branch `branch` to point at `rev`, e.g. `create_branch_at(name,
    /// "repobox/abcd1234", "main")` to test "the branch already exists on the remote".
    pub fn create_branch_at(&self, name: &str, branch: &str, rev: &str) -> anyhow::Result<()> {
        let repo = self.existing_repo(name)?;
        let sha = self.rev_parse(name, rev)?;
        self.git_in(&repo, ["update-ref", &format!("refs/heads/{branch}"), &sha])?;
        Ok(())
    }

    /// Creates repository `name` with `files` files at the tip of `main` and `commits` commits
    /// of history, for benchmarks. The first commit adds every file; each later commit edits a
    /// few of them. Built from one `git fast-import` stream, so 2,000 files x 500 commits takes
    /// a second or two rather than minutes of `git commit`.
    pub fn create_large_repo(
        &self,
        name: &str,
        files: usize,
        commits: usize,
    ) -> anyhow::Result<()> {
        if commits == 0 {
            bail!("a repository needs at least one commit");
        }
        let repo = self.init_bare(name)?;
        let path_of = |i: usize| format!("src/module_{:03}/file_{:05}.rs", i / 100, i);
        let content_of = |i: usize, version: usize| {
            let mut s = format!("// file {i}, version {version}\n");
            for line in 0..40 {
                let _ = writeln!(
                    s,
                    "pub fn f_{i}_{line}(x: u64) -> u64 {{ x.wrapping_mul({}) ^ {} }}",
                    line + 3,
                    version * 31 + line
                );
            }
            s
        };

        // Fixed, increasing timestamps make the history (and its SHAs) reproducible.
        let start = 1_700_000_000u64;
        let mut stream = String::new();
        let all: Vec<(String, String)> =
            (0..files).map(|i| (path_of(i), content_of(i, 0))).collect();
        push_commit(
            &mut stream,
            "refs/heads/main",
            start,
            "Initial import",
            None,
            all.iter().map(|(p, c)| (p.as_str(), c.as_str())),
        );
        for c in 1..commits {
            let changed: Vec<(String, String)> = if files == 0 {
                Vec::new()
            } else {
                // A few files per commit, spread over the tree.
                (0..3)
                    .map(|k| (c * 7 + k * 131) % files)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .map(|i| (path_of(i), content_of(i, c)))
                    .collect()
            };
            push_commit(
                &mut stream,
                "refs/heads/main",
                start + c as u64 * 60,
                &format!("Change {c}"),
                None,
                changed.iter().map(|(p, c)| (p.as_str(), c.as_str())),
            );
        }
        self.fast_import(&repo, &stream)
    }

    /// Installs a `pre-receive` hook in `name` that prints `message` and exits 1, so every
    /// push is rejected (git shows `remote: <message>` and `[remote rejected]`).
    pub fn reject_pushes(&self, name: &str, message: &str) -> anyhow::Result<()> {
        let repo = self.existing_repo(name)?;
        let hooks = repo.join("hooks");
        std::fs::create_dir_all(&hooks).context("create the hooks directory")?;
        // The message goes through a file so that no quoting of it in shell is needed.
        std::fs::write(hooks.join("reject-message"), format!("{message}\n"))
            .context("write the rejection message")?;
        let hook = hooks.join("pre-receive");
        std::fs::write(
            &hook,
            "#!/bin/sh\ncat \"$(dirname \"$0\")/reject-message\" >&2\nexit 1\n",
        )
        .context("write the pre-receive hook")?;
        make_executable(&hook)
    }

    /// Holds every fetch (clone, ls-remote: the `git-upload-pack` POSTs) of every repository
    /// until [`GitHost::release_fetches`], so a test can stop a runner in the middle of its
    /// clone. [`GitHost::fetches_held`] counts the requests held so far.
    pub fn hold_fetches(&self) {
        self.shared.fetch_gate.send_replace(true);
    }

    /// How many fetch requests [`GitHost::hold_fetches`] has held.
    pub fn fetches_held(&self) -> usize {
        self.shared
            .fetches_held
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits up to `timeout` until [`GitHost::hold_fetches`] holds a fetch; `false` on timeout.
    pub async fn wait_fetch_held(&self, timeout: std::time::Duration) -> bool {
        poll_until(timeout, || self.fetches_held() > 0).await
    }

    /// Lets held fetches (and later ones) through.
    pub fn release_fetches(&self) {
        self.shared.fetch_gate.send_replace(false);
    }

    /// Installs a `pre-receive` hook in `name` that holds every push (before any ref moves)
    /// until [`GitHost::release_pushes`], so a test can stop a runner in the middle of its push.
    /// [`GitHost::push_held`] tells when a push reached the hook.
    pub fn hold_pushes(&self, name: &str) -> anyhow::Result<()> {
        let repo = self.existing_repo(name)?;
        let hooks = repo.join("hooks");
        std::fs::create_dir_all(&hooks).context("create the hooks directory")?;
        std::fs::write(hooks.join("hold"), "").context("write the hold file")?;
        let _ = std::fs::remove_file(hooks.join("held"));
        let hook = hooks.join("pre-receive");
        std::fs::write(
            &hook,
            "#!/bin/sh\nd=\"$(dirname \"$0\")\"\ntouch \"$d/held\"\n\
             while [ -e \"$d/hold\" ]; do sleep 0.05; done\ncat >/dev/null\nexit 0\n",
        )
        .context("write the pre-receive hook")?;
        make_executable(&hook)
    }

    /// Whether a push to `name` is being held by [`GitHost::hold_pushes`] (or was).
    pub fn push_held(&self, name: &str) -> bool {
        self.existing_repo(name)
            .is_ok_and(|r| r.join("hooks").join("held").exists())
    }

    /// Waits up to `timeout` until a push to `name` reached the hook; `false` on timeout.
    pub async fn wait_push_held(&self, name: &str, timeout: std::time::Duration) -> bool {
        poll_until(timeout, || self.push_held(name)).await
    }

    /// Lets held pushes (and later ones) through.
    pub fn release_pushes(&self, name: &str) -> anyhow::Result<()> {
        let hooks = self.existing_repo(name)?.join("hooks");
        match std::fs::remove_file(hooks.join("hold")) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context("remove the hold file"),
        }
    }

    /// Removes the hook installed by [`GitHost::reject_pushes`].
    pub fn accept_pushes(&self, name: &str) -> anyhow::Result<()> {
        let hook = self.existing_repo(name)?.join("hooks").join("pre-receive");
        match std::fs::remove_file(&hook) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context("remove the pre-receive hook"),
        }
    }

    /// The commit `branch` points at, or `None` when the branch (or the repository) does not exist.
    pub fn branch_sha(&self, name: &str, branch: &str) -> Option<String> {
        let repo = self.existing_repo(name).ok()?;
        self.git_in(
            &repo,
            [
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("refs/heads/{branch}^{{commit}}"),
            ],
        )
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
    }

    /// Content of `path` at `rev` (a branch, tag or SHA), or `None` when either does not exist
    /// (or the content is not UTF-8).
    pub fn file_at(&self, name: &str, rev: &str, path: &str) -> Option<String> {
        let repo = self.existing_repo(name).ok()?;
        self.git_in(&repo, ["cat-file", "blob", &format!("{rev}:{path}")])
            .ok()
    }

    /// Full message of commit `rev`, without the trailing newline.
    pub fn commit_message(&self, name: &str, rev: &str) -> anyhow::Result<String> {
        let repo = self.existing_repo(name)?;
        let out = self.git_in(&repo, ["log", "-1", "--format=%B", rev, "--"])?;
        Ok(out.trim_end_matches('\n').to_owned())
    }

    /// Author of commit `rev` as `Name <email>`.
    pub fn commit_author(&self, name: &str, rev: &str) -> anyhow::Result<String> {
        let repo = self.existing_repo(name)?;
        let out = self.git_in(&repo, ["log", "-1", "--format=%an <%ae>", rev, "--"])?;
        Ok(out.trim_end().to_owned())
    }

    /// Names of the branches of `name` (`main`, `repobox/abcd1234`, ...), sorted; empty when
    /// the repository does not exist.
    pub fn branches(&self, name: &str) -> Vec<String> {
        let Ok(repo) = self.existing_repo(name) else {
            return Vec::new();
        };
        self.git_in(
            &repo,
            ["for-each-ref", "--format=%(refname:strip=2)", "refs/heads/"],
        )
        .map(|out| out.lines().map(str::to_owned).collect())
        .unwrap_or_default()
    }

    /// Number of commits reachable from `rev`.
    pub fn commit_count(&self, name: &str, rev: &str) -> anyhow::Result<usize> {
        let repo = self.existing_repo(name)?;
        let out = self.git_in(&repo, ["rev-list", "--count", rev, "--"])?;
        out.trim()
            .parse()
            .with_context(|| format!("parse `git rev-list --count` output {out:?}"))
    }

    /// Paths of all files in the tree of `rev`, sorted.
    pub fn files_at(&self, name: &str, rev: &str) -> anyhow::Result<Vec<String>> {
        let repo = self.existing_repo(name)?;
        let out = self.git_in(&repo, ["ls-tree", "-r", "--name-only", rev])?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// The full SHA of `rev` in repository `name`.
    pub fn rev_parse(&self, name: &str, rev: &str) -> anyhow::Result<String> {
        let repo = self.existing_repo(name)?;
        let out = self.git_in(
            &repo,
            ["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
        )?;
        Ok(out.trim().to_owned())
    }

    fn existing_repo(&self, name: &str) -> anyhow::Result<PathBuf> {
        check_repo_name(name)?;
        let repo = self.repo_path(name);
        if !repo.is_dir() {
            bail!("repository {name} does not exist on the git host");
        }
        Ok(repo)
    }

    /// `git init --bare` with `main` as `HEAD` and pushes over HTTP enabled.
    fn init_bare(&self, name: &str) -> anyhow::Result<PathBuf> {
        check_repo_name(name)?;
        let repo = self.repo_path(name);
        if repo.exists() {
            bail!("repository {name} already exists on the git host");
        }
        let parent = repo
            .parent()
            .context("repository path has no parent directory")?;
        std::fs::create_dir_all(parent).context("create the repository's parent directory")?;
        let mut init = self.git();
        init.args(["init", "--quiet", "--bare", "--initial-branch=main"])
            .arg(&repo);
        run(init, None)?;
        self.git_in(&repo, ["config", "http.receivepack", "true"])?;
        Ok(repo)
    }

    fn fast_import(&self, repo: &Path, stream: &str) -> anyhow::Result<()> {
        let mut cmd = self.git();
        cmd.arg("--git-dir")
            .arg(repo)
            .args(["fast-import", "--quiet", "--done"]);
        let mut input = stream.to_owned();
        input.push_str("done\n");
        run(cmd, Some(input.as_bytes()))?;
        Ok(())
    }

    /// A `git` command with a clean environment (see [`git_env_vars`]).
    fn git(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("git");
        cmd.env_clear().envs(git_env_vars(&self.shared.home));
        cmd
    }

    fn git_in<I, S>(&self, repo: &Path, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.git();
        cmd.arg("--git-dir").arg(repo).args(args);
        run(cmd, None)
    }
}

impl Drop for GitHost {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Quick: the server thread only has to cancel its tasks and drop its runtime.
            let _ = thread.join();
        }
    }
}

/// The exact header value a correct client sends.
fn expected_authorization(token: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{token}"));
    format!("Basic {encoded}")
}

/// Whether the request carries `oauth2:{token}`. Decodes rather than comparing strings so that
/// a lower-case `basic` scheme or padding-free base64 from some client still counts.
fn is_authorized(headers: &HeaderMap, expected: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, credentials)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let decode = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(s.trim()))
            .ok()
    };
    let expected = expected.strip_prefix("Basic ").and_then(decode);
    match (decode(credentials), expected) {
        (Some(got), Some(want)) => got == want,
        _ => false,
    }
}

fn lock_log(shared: &Shared) -> std::sync::MutexGuard<'_, Vec<RequestRecord>> {
    shared
        .log
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The one handler: authenticate, find the repository, run `git http-backend`, log.
async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);

    let authorized = {
        let expected = shared
            .expected_auth
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        is_authorized(req.headers(), &expected)
    };

    let response = if !authorized {
        plain(StatusCode::UNAUTHORIZED, "authentication required\n", true)
    } else if !repo_exists(&shared.repos, &path) {
        plain(StatusCode::NOT_FOUND, "repository not found\n", false)
    } else {
        if method == "POST" && path.ends_with("/git-upload-pack") && *shared.fetch_gate.borrow() {
            shared
                .fetches_held
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut gate = shared.fetch_gate.subscribe();
            let _ = gate.wait_for(|held| !held).await;
        }
        match run_backend(&shared, req).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::error!("git http-backend: {e:#}");
                plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "git http-backend failed\n",
                    false,
                )
            }
        }
    };

    lock_log(&shared).push(RequestRecord {
        method,
        path,
        query,
        status: response.status().as_u16(),
        authorized,
    });
    response
}

fn plain(status: StatusCode, body: &'static str, challenge: bool) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if challenge {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"repobox-test\""),
        );
    }
    resp
}

/// Whether the URL path names an existing `<name>.git` directory: everything up to the first
/// segment ending in `.git`. Paths with `..` never match.
fn repo_exists(repos: &Path, path: &str) -> bool {
    let mut rel = PathBuf::new();
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        if segment == "." || segment == ".." {
            return false;
        }
        rel.push(segment);
        if segment.ends_with(".git") {
            return repos.join(&rel).is_dir();
        }
    }
    false
}

/// Runs `git http-backend` as a CGI program for an authenticated request.
async fn run_backend(shared: &Shared, req: Request) -> anyhow::Result<Response> {
    let (parts, body) = req.into_parts();
    let header_str = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };

    let mut cmd = tokio::process::Command::new("git");
    cmd.env_clear().envs(git_env_vars(&shared.home));
    cmd.arg("http-backend")
        .env("GIT_PROJECT_ROOT", &shared.repos)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", parts.uri.path())
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("REMOTE_USER", USERNAME)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1");
    if let Some(v) = header_str("content-type") {
        cmd.env("CONTENT_TYPE", v);
    }
    if let Some(v) = header_str("content-length") {
        cmd.env("CONTENT_LENGTH", v);
    }
    if let Some(v) = header_str("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", v);
    }
    if let Some(v) = header_str("git-protocol") {
        cmd.env("GIT_PROTOCOL", v);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawn git http-backend")?;

    // Feed the body concurrently with reading the output: for a large push git http-backend
    // may write before it has read everything, and a sequential copy would deadlock once both
    // pipe buffers are full.
    let mut stdin = child.stdin.take().context("http-backend stdin")?;
    tokio::spawn(async move {
        let mut data = body.into_data_stream();
        while let Some(chunk) = data.next().await {
            let Ok(chunk) = chunk else { break };
            if stdin.write_all(&chunk).await.is_err() {
                // The backend stopped reading (error or early exit); its output tells the client.
                break;
            }
        }
        let _ = stdin.shutdown().await;
    });

    // Collect stderr on the side (a full stderr pipe would block the backend too).
    let mut stderr = child.stderr.take().context("http-backend stderr")?;
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        if !buf.is_empty() {
            tracing::debug!("git http-backend stderr: {}", String::from_utf8_lossy(&buf));
        }
    });

    let mut stdout = child.stdout.take().context("http-backend stdout")?;
    let (head, rest) = read_cgi_head(&mut stdout).await?;
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::OK;
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .with_context(|| format!("bad CGI Status header {value:?}"))?;
            *response.status_mut() = code;
        } else if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }

    // Stream the rest of stdout as the body; the child (and its kill-on-drop guard) lives in the
    // stream state so an aborted download kills the backend, and it is reaped at EOF.
    let first = (!rest.is_empty()).then(|| Ok::<Bytes, std::io::Error>(Bytes::from(rest)));
    let tail = futures::stream::unfold(Some((stdout, child)), |state| async move {
        let (mut stdout, mut child) = state?;
        let mut buf = vec![0u8; 64 * 1024];
        match stdout.read(&mut buf).await {
            Ok(0) => {
                let _ = child.wait().await;
                None
            }
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some((stdout, child))))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let stream = futures::stream::iter(first).chain(tail);
    *response.body_mut() = Body::from_stream(stream);
    Ok(response)
}

/// Reads the CGI header block (up to the first empty line, `\r\n` or `\n` line ends).
/// Returns the headers as text and whatever body bytes came along in the same reads.
async fn read_cgi_head<R: AsyncRead + Unpin>(out: &mut R) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some((end, sep)) = find_header_end(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let rest = buf[end + sep..].to_vec();
            return Ok((head, rest));
        }
        if buf.len() > MAX_CGI_HEADER {
            bail!("git http-backend wrote more than {MAX_CGI_HEADER} bytes of headers");
        }
        let n = out
            .read(&mut chunk)
            .await
            .context("read git http-backend output")?;
        if n == 0 {
            bail!(
                "git http-backend ended before its headers were complete: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Position and length of the blank line that ends CGI headers.
fn find_header_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The environment of every git process the host runs (helpers and `http-backend`), to be
/// applied after `env_clear()`: nothing from the machine's or the user's configuration
/// (`GIT_CONFIG_NOSYSTEM`, a private `HOME`), no inherited `GIT_DIR` & co., a fixed identity and
/// the C locale so messages are stable.
pub(crate) fn git_env_vars(home: &Path) -> Vec<(&'static str, OsString)> {
    vec![
        ("PATH", std::env::var_os("PATH").unwrap_or_default()),
        ("HOME", home.into()),
        ("XDG_CONFIG_HOME", home.join(".config").into()),
        ("GIT_CONFIG_NOSYSTEM", "1".into()),
        ("GIT_TERMINAL_PROMPT", "0".into()),
        ("LC_ALL", "C".into()),
        ("GIT_AUTHOR_NAME", AUTHOR_NAME.into()),
        ("GIT_AUTHOR_EMAIL", AUTHOR_EMAIL.into()),
        ("GIT_COMMITTER_NAME", AUTHOR_NAME.into()),
        ("GIT_COMMITTER_EMAIL", AUTHOR_EMAIL.into()),
    ]
}

/// Runs a git command to completion; the error carries git's stderr.
fn run(mut cmd: std::process::Command, input: Option<&[u8]>) -> anyhow::Result<String> {
    let described = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {described}"))?;
    // Write stdin from another thread: fast-import streams are megabytes and git may fill
    // its stdout/stderr pipes meanwhile.
    let writer = match (input, child.stdin.take()) {
        (Some(data), Some(mut stdin)) => {
            let data = data.to_vec();
            Some(std::thread::spawn(move || stdin.write_all(&data)))
        }
        _ => None,
    };
    let output = child
        .wait_with_output()
        .with_context(|| format!("wait for {described}"))?;
    if let Some(writer) = writer {
        match writer.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) if output.status.success() => {
                return Err(e).with_context(|| format!("write the input of {described}"));
            }
            _ => {}
        }
    }
    if !output.status.success() {
        bail!(
            "{described} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("{described} printed non-UTF-8"))
}

/// Appends one commit to a fast-import stream. `from` starts a new branch at that revision;
/// without it the commit follows the previous one on `branch` in the same stream (or is a root).
fn push_commit<'a>(
    stream: &mut String,
    branch: &str,
    time: u64,
    message: &str,
    from: Option<&str>,
    files: impl Iterator<Item = (&'a str, &'a str)>,
) {
    let ident = format!("{AUTHOR_NAME} <{AUTHOR_EMAIL}> {time} +0000");
    let _ = writeln!(stream, "commit {branch}");
    let _ = writeln!(stream, "author {ident}");
    let _ = writeln!(stream, "committer {ident}");
    let _ = writeln!(stream, "data {}\n{message}", message.len());
    if let Some(from) = from {
        let _ = writeln!(stream, "from {from}");
    }
    for (path, content) in files {
        let _ = writeln!(stream, "M 100644 inline {}", quote_path(path));
        let _ = writeln!(stream, "data {}\n{content}", content.len());
    }
    stream.push('\n');
}

/// Quotes a path for fast-import when it contains characters that would end it early.
fn quote_path(path: &str) -> String {
    if !path.contains([' ', '"', '\\', '\n']) {
        return path.to_owned();
    }
    let mut out = String::from("\"");
    for c in path.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Rejects names that would escape the repositories directory or confuse the URL layout.
fn check_repo_name(name: &str) -> anyhow::Result<()> {
    let trimmed = name.trim_matches('/');
    let path = Path::new(trimmed);
    let ok = !trimmed.is_empty()
        && !trimmed.ends_with(".git")
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(s) if !s.to_string_lossy().ends_with(".git")));
    if !ok {
        bail!("invalid repository name {name:?} (use e.g. `api` or `acme/api`, without .git)");
    }
    Ok(())
}

fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut perms = std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(path, perms).with_context(|| format!("chmod {}", path.display()))
}

fn ensure_git() -> anyhow::Result<()> {
    let mut cmd = std::process::Command::new("git");
    cmd.arg("--version");
    run(cmd, None)
        .context("the git host needs `git` on PATH (Debian/Ubuntu: `apt-get install git`)")?;
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks `done` every 50 ms until it holds (`true`) or `timeout` passes (`false`). For marks
/// that only a git child process leaves (the push hook's file), which nothing can await.
async fn poll_until(timeout: std::time::Duration, done: impl Fn() -> bool) -> bool {
    let until = tokio::time::Instant::now() + timeout;
    while !done() {
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    true
}
