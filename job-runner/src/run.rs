//! The job flow, start to finish.
//!
//! read job → take it (`pending` → `running`, atomically) → read provider → check the
//! repository host is the provider's → decrypt token → clone (into the runner's private git
//! directory) → check the branch is free → branch → hand the work tree to the agent → commit →
//! push (to the job's URL and branch only) → record outcome.
//! Every step's output streams to `job:{id}:output`; a failure anywhere ends the job as
//! `failed` with a one-line reason; SIGTERM stops the current child and leaves the terminal
//! status to the operator, which knows why the pod was stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use repobox_contract::record::step;
use repobox_contract::runner_env;
use repobox_contract::transitions::{self, Finish, FinishOutcome, PullRequestFields, StartOutcome};
use repobox_contract::{
    JobRecord, JobStatus, Masker, ProviderRecord, RecordError, Token, keys, time,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use repobox_contract::urls::{ProviderHost, RepoUrl};

use crate::config::Config;
use crate::error::Result;
use crate::forge;
use crate::git::{self, Git, Op};
use crate::handoff::{AgentEnd, RunnerSide, Start};
use crate::output::{Output, OutputHandle};
use crate::process::{self, Finished, Stdout};

/// The largest prompt the runner hands to an agent.
pub const MAX_PROMPT_BYTES: usize = 1024 * 1024;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Changes committed and pushed; the pull / merge request step's result with them.
    Pushed {
        /// The pushed branch ([`repobox_contract::keys::job_branch`]).
        branch: String,
        /// The pushed commit.
        commit_sha: String,
        /// What the pull / merge request step recorded.
        pull_request: PullRequestFields,
    },
    /// The agent changed nothing; the job succeeded without a push.
    NoChanges,
    /// The job failed; the reason is in the record's `error`.
    Failed(String),
    /// The job had already ended; nothing was done.
    AlreadyTerminal(JobStatus),
    /// Another runner holds the job; nothing was done.
    AlreadyRunning(String),
    /// Stopped by a signal; the operator records the terminal status.
    Cancelled,
}

impl Outcome {
    /// The process exit code: 0 when nothing went wrong, 1 for a failed job, 143 (like a
    /// shell's SIGTERM death) when stopped.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Pushed { .. }
            | Self::NoChanges
            | Self::AlreadyTerminal(_)
            | Self::AlreadyRunning(_) => 0,
            Self::Failed(_) => 1,
            Self::Cancelled => 143,
        }
    }
}

/// Why a step stopped the flow.
enum Stop {
    Failed(String),
    Cancelled,
}

/// Runs the job. `handoff` is the hand-off directory the agent container waits in (prepared
/// by `main` before anything else, so the agent learns at once when the runner dies); `None`
/// runs a local agent wrapper, if an agent command is set.
pub async fn run(
    cfg: &Config,
    handoff: Option<RunnerSide>,
    cancel: CancellationToken,
) -> Result<Outcome> {
    let span = tracing::info_span!(
        "job",
        runner_id = %cfg.runner_id,
        job_id = %cfg.job_id,
        user_id = tracing::field::Empty,
    );
    run_job(cfg, handoff, cancel, span.clone())
        .instrument(span)
        .await
}

/// Where one job's files go. The tree and the hand-off directory are shared with the agent;
/// `private` (the git directory, the commit message) never is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The work tree (shared with the agent).
    pub tree: PathBuf,
    /// The hand-off directory (shared with the agent).
    pub handoff: PathBuf,
    /// Runner-only: the git directory and the commit message.
    pub private: PathBuf,
    /// Directories removed after the job (when `CLEANUP_AFTER_JOB`).
    pub cleanup: Vec<PathBuf>,
}

impl Layout {
    /// In a pod (`agent_container`), fixed paths on the pod's volumes: the agent container
    /// knows them too. Locally, fresh directories per run.
    pub fn for_job(cfg: &Config) -> Layout {
        use repobox_contract::pod::{HANDOFF_SUBDIR, TREE_SUBDIR};
        if cfg.agent_container {
            // A directory of the runner's own inside the private volume: the volume's root
            // belongs to root (the kubelet makes it, `fsGroup`-owned), so the runner cannot
            // narrow its mode; a subdirectory it creates, it can.
            let private = cfg.private_dir.join("runner");
            return Layout {
                tree: cfg.temp_dir.join(TREE_SUBDIR),
                handoff: cfg.temp_dir.join(HANDOFF_SUBDIR),
                cleanup: vec![cfg.temp_dir.join(TREE_SUBDIR), private.clone()],
                private,
            };
        }
        let name = format!(
            "{}-{}",
            dir_name(&cfg.job_id),
            hex::encode(rand::random::<[u8; 4]>())
        );
        let work = cfg.temp_dir.join(&name);
        let private = if cfg.private_dir == cfg.temp_dir {
            work.join("private")
        } else {
            cfg.private_dir.join(&name)
        };
        Layout {
            tree: work.join(TREE_SUBDIR),
            handoff: work.join(HANDOFF_SUBDIR),
            cleanup: vec![work, private.clone()],
            private,
        }
    }

    /// The bare git directory, in `private`: never in the tree the agent writes to.
    pub fn git_dir(&self) -> PathBuf {
        self.private.join("repo.git")
    }
}

async fn connect(cfg: &Config, cancel: &CancellationToken) -> Result<MultiplexedConnection> {
    let client = repobox_contract::redis_client(&cfg.redis_url, cfg.redis_ca_file.as_deref())?;
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match client.get_multiplexed_async_connection().await {
            Ok(con) => return Ok(con),
            Err(e) if attempt < 5 && !cancel.is_cancelled() => {
                warn!(error = %e, attempt, "redis not reachable yet, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(e.into()),
                }
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn run_job(
    cfg: &Config,
    handoff: Option<RunnerSide>,
    cancel: CancellationToken,
    span: tracing::Span,
) -> Result<Outcome> {
    let started = Instant::now();
    let mut con = connect(cfg, &cancel).await?;

    let hash: std::collections::HashMap<String, String> =
        con.hgetall(keys::job(&cfg.job_id)).await?;
    let record = match JobRecord::from_hash(&cfg.job_id, hash) {
        Ok(r) => r,
        Err(e @ RecordError::Missing { .. }) => return Err(e.into()),
        // The hash exists but is unusable: say so in the record instead of dying silently.
        Err(e) => {
            let msg = format!("invalid job record: {e}");
            return finish(&mut con, cfg, Finish::failed(time::now(), &msg))
                .await
                .map(|_| Outcome::Failed(msg));
        }
    };
    span.record("user_id", record.user_id.as_str());
    if record.status.is_terminal() {
        info!(status = %record.status, "job already finished; nothing to do");
        return Ok(Outcome::AlreadyTerminal(record.status));
    }

    if cfg.attempt > 1 {
        info!(
            attempt = cfg.attempt,
            "running the job again after a disruption"
        );
    }
    match transitions::start(
        &mut con,
        &cfg.job_id,
        &cfg.runner_id,
        cfg.attempt,
        &time::now(),
    )
    .await?
    {
        StartOutcome::Started => info!("job started"),
        StartOutcome::AlreadyTerminal(s) => {
            info!(status = %s, "job already finished; nothing to do");
            return Ok(Outcome::AlreadyTerminal(s));
        }
        StartOutcome::AlreadyRunning { runner_id } => {
            warn!(holder = %runner_id, "job is already running elsewhere; not starting it twice");
            return Ok(Outcome::AlreadyRunning(runner_id));
        }
        StartOutcome::Superseded { attempt } => {
            warn!(current = %attempt, "the job moved on to another attempt; not running this one");
            return Ok(Outcome::AlreadyRunning(format!("attempt {attempt}")));
        }
        StartOutcome::Missing => {
            return Err(RecordError::Missing {
                key: keys::job(&cfg.job_id),
            }
            .into());
        }
        StartOutcome::InvalidStatus(s) => {
            let msg = format!("job:{} has an unknown status `{s}`", cfg.job_id);
            finish(&mut con, cfg, Finish::failed(time::now(), &msg)).await?;
            return Ok(Outcome::Failed(msg));
        }
    }

    // The token, or the reason there is none: the repository URL must be usable and on the
    // provider's host before the token is even decrypted. The masker knows the token before
    // any line leaves the process.
    let prepared = match RepoUrl::parse(&record.repo_url, cfg.allow_insecure_http) {
        Ok(url) => fetch_token(&mut con, cfg, &record, &url)
            .await
            .map(|(t, provider)| (t, provider, url)),
        Err(e) => Err(e.to_string()),
    };
    let mut masker = Masker::new();
    if let Ok((t, _, _)) = &prepared {
        masker.add(t.expose());
    }
    let masker = Arc::new(masker);
    let output = Output::start(con.clone(), &cfg.job_id, masker.clone(), cfg.output.clone());
    let out = output.handle();
    out.note(&format!(
        "Repobox job {} on runner {}",
        cfg.job_id, cfg.runner_id
    ))
    .await;

    let layout = Layout::for_job(cfg);
    let result = match prepared {
        Err(msg) => Err(Stop::Failed(msg)),
        Ok((token, provider, url)) => {
            let job = Job {
                api_token: token.clone(),
                provider,
                repo_url: url.clone(),
                cfg,
                record: &record,
                out: out.clone(),
                masker: masker.clone(),
                con: con.clone(),
                cancel: &cancel,
                git: Git::new(
                    cfg.git_bin.clone(),
                    token,
                    std::env::current_exe()
                        .map(|p| p.into_os_string())
                        .unwrap_or_else(|_| "repobox-job-runner".into()),
                    cfg.git_author_name.clone(),
                    cfg.git_author_email.clone(),
                    cfg.allow_insecure_http,
                )
                .with_ca_file(cfg.git_ca_file.clone()),
                display_url: url.to_string(),
                branch: keys::job_branch(&cfg.job_id),
                layout: layout.clone(),
                handoff,
            };
            job.execute().await
        }
    };

    let (outcome, fin) = match result {
        Ok(Some(Pushed {
            branch,
            commit_sha,
            pull_request,
        })) => {
            out.note(&format!("Done: pushed {branch} at {commit_sha}"))
                .await;
            (
                Outcome::Pushed {
                    branch: branch.clone(),
                    commit_sha: commit_sha.clone(),
                    pull_request: pull_request.clone(),
                },
                Some(
                    Finish::success(time::now(), Some(branch), Some(commit_sha))
                        .with_pull_request(pull_request),
                ),
            )
        }
        Ok(None) => {
            out.note("Done: the agent made no changes, so nothing was committed or pushed")
                .await;
            (
                Outcome::NoChanges,
                Some(Finish::success(time::now(), None, None)),
            )
        }
        Err(Stop::Failed(msg)) => {
            let msg = masker.mask(&msg).into_owned();
            out.note(&format!("Failed: {msg}")).await;
            (
                Outcome::Failed(msg.clone()),
                Some(Finish::failed(time::now(), msg)),
            )
        }
        Err(Stop::Cancelled) => {
            out.note("Stopped: the runner received a termination signal (cancelled, timed out or evicted)").await;
            (Outcome::Cancelled, None)
        }
    };

    if cfg.cleanup_after_job {
        for dir in &layout.cleanup {
            if let Err(e) = tokio::fs::remove_dir_all(dir).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                // In a pod the agent's files may not be the runner's to delete; the volume
                // goes with the pod.
                warn!(error = %e, dir = %dir.display(), "could not remove a job directory");
            }
        }
    }

    drop(out);
    // All output is in Redis before the status says the job ended.
    let stats = output.close().await;
    if let Some(fin) = fin {
        finish(&mut con, cfg, fin).await?;
    }
    info!(
        outcome = ?outcome_label(&outcome),
        duration_ms = started.elapsed().as_millis() as u64,
        output_lines = stats.lines_pushed,
        output_truncated = stats.truncated,
        peak_rss_kib = crate::telemetry::peak_rss_kib().unwrap_or(0),
        "job finished"
    );
    Ok(outcome)
}

fn outcome_label(o: &Outcome) -> &'static str {
    match o {
        Outcome::Pushed { .. } => "pushed",
        Outcome::NoChanges => "no_changes",
        Outcome::Failed(_) => "failed",
        Outcome::AlreadyTerminal(_) => "already_terminal",
        Outcome::AlreadyRunning(_) => "already_running",
        Outcome::Cancelled => "cancelled",
    }
}

/// Writes the terminal status, retrying briefly: the push already happened, and losing
/// its record would make the operator report a failure.
async fn finish(con: &mut MultiplexedConnection, cfg: &Config, fin: Finish) -> Result<()> {
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=5 {
        match transitions::finish(con, &cfg.job_id, &fin).await {
            Ok(FinishOutcome::Finished) => return Ok(()),
            Ok(FinishOutcome::AlreadyTerminal(s)) => {
                warn!(status = %s, "job was ended elsewhere first (e.g. cancelled); keeping that status");
                return Ok(());
            }
            Ok(FinishOutcome::Missing) => {
                return Err(RecordError::Missing {
                    key: keys::job(&cfg.job_id),
                }
                .into());
            }
            Err(e) if attempt < 5 => {
                warn!(error = %e, attempt, "recording the outcome failed, retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads the provider record, checks that the repository is on the provider's host, and only
/// then decrypts the token; the error is the user-facing reason.
async fn fetch_token(
    con: &mut MultiplexedConnection,
    cfg: &Config,
    record: &JobRecord,
    repo: &RepoUrl,
) -> std::result::Result<(Token, ProviderRecord), String> {
    let key = keys::git_provider(&record.user_id, &record.provider_id);
    let hash: std::collections::HashMap<String, String> = con
        .hgetall(&key)
        .await
        .map_err(|e| format!("could not read the git provider: {e}"))?;
    let provider = ProviderRecord::from_hash(&record.user_id, &record.provider_id, hash).map_err(
        |e| match e {
            RecordError::Missing { .. } => format!(
                "git provider `{}` not found for user `{}` ({key} does not exist)",
                record.provider_id, record.user_id
            ),
            other => format!("git provider is unusable: {other}"),
        },
    )?;
    ProviderHost::from_provider(provider.kind.as_deref(), provider.base_url.as_deref())
        .and_then(|host| host.check(repo))
        .map_err(|e| e.to_string())?;
    cfg.encryption_key
        .decrypt(&provider.encrypted_token)
        .map(|t| (t, provider))
        .map_err(|e| format!("token decryption failed: {e}"))
}

/// A directory name from the job id: safe characters only, bounded length.
fn dir_name(job_id: &str) -> String {
    let s: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() { "job".to_owned() } else { s }
}

/// One job's execution context.
struct Job<'a> {
    cfg: &'a Config,
    record: &'a JobRecord,
    out: OutputHandle,
    masker: Arc<Masker>,
    /// Records the step reached (`step` in the job hash).
    con: MultiplexedConnection,
    cancel: &'a CancellationToken,
    git: Git,
    display_url: String,
    branch: String,
    layout: Layout,
    /// For the pull / merge request after the push (see [`forge`]).
    provider: ProviderRecord,
    repo_url: RepoUrl,
    api_token: Token,
    /// The agent container's hand-off directory, when the agent runs in one.
    handoff: Option<RunnerSide>,
}

/// Creates `dir` with `mode` (the umask would narrow it). A directory that already exists (a
/// volume's root, or one the pod's init container made) is left as it is: it may not be ours to
/// change.
async fn make_dir(dir: &Path, mode: u32) -> std::result::Result<(), Stop> {
    use std::os::unix::fs::PermissionsExt;
    if tokio::fs::metadata(dir).await.is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    tokio::fs::create_dir_all(dir)
        .await
        .and(tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).await)
        .map_err(|e| Stop::Failed(format!("cannot create {}: {e}", dir.display())))
}

/// What a job that pushed leaves behind.
struct Pushed {
    branch: String,
    commit_sha: String,
    pull_request: PullRequestFields,
}

impl Job<'_> {
    /// Runs the steps; `Some` when something was pushed.
    async fn execute(mut self) -> std::result::Result<Option<Pushed>, Stop> {
        let tree = self.layout.tree.clone();
        let git_dir = self.layout.git_dir();
        // The tree is shared with the agent (group-writable, the pod's group); the private
        // directory is the runner's alone.
        make_dir(&tree, 0o2775).await?;
        make_dir(&self.layout.private, 0o700).await?;
        let tree_id = dir_identity(&tree)
            .map_err(|e| Stop::Failed(format!("cannot inspect the work tree: {e}")))?;

        self.reach(step::CLONING).await?;
        // Clone, bare, into the private directory: the git directory never enters the tree.
        let mut args: Vec<String> = vec!["clone".into(), "--bare".into()];
        if self.cfg.clone_depth > 0 {
            args.push(format!("--depth={}", self.cfg.clone_depth));
        }
        if let Some(base) = &self.record.base_branch {
            args.push("--branch".into());
            args.push(base.clone());
        }
        args.extend([
            "--".into(),
            self.display_url.clone(),
            git_dir.to_string_lossy().into_owned(),
        ]);
        let base_label = self
            .record
            .base_branch
            .as_deref()
            .unwrap_or("default branch");
        self.out
            .note(&format!("Cloning {} ({base_label})", self.display_url))
            .await;
        // The job's branch must not exist yet. Asking the remote costs a round trip, so it
        // runs alongside the clone rather than after it, and still fails the job before the
        // agent spends any time.
        let ls_remote = [
            "ls-remote".to_owned(),
            "--heads".to_owned(),
            "--".to_owned(),
            self.display_url.clone(),
            format!("refs/heads/{}", self.branch),
        ];
        let private = self.layout.private.clone();
        let (cloned, listed) = tokio::join!(
            self.git_step(&self.git, &private, &args, true, Op::Clone, Stdout::Stream),
            self.git_step(
                &self.git,
                &private,
                &ls_remote,
                true,
                Op::LsRemote,
                Stdout::Capture
            ),
        );
        cloned?;
        if !listed?.stdout.trim().is_empty() {
            return Err(Stop::Failed(format!(
                "branch {} already exists on the remote",
                self.branch
            )));
        }
        // From here on git works on the private git directory and the shared tree.
        let repo = self.git.in_repo(git_dir, tree.clone());
        for args in [
            vec!["reset", "-q", "--hard"],
            vec!["checkout", "-q", "-b", self.branch.as_str()],
        ] {
            let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
            self.git_step(&repo, &private, &args, false, Op::Local, Stdout::Stream)
                .await?;
        }
        self.out
            .note(&format!("Created branch {}", self.branch))
            .await;

        // Agent.
        self.reach(step::AGENT).await?;
        self.run_agent(&tree).await?;

        // The agent had the tree: it must still be the directory the runner made (not a
        // symlink to something only the runner can read).
        if dir_identity(&tree).ok() != Some(tree_id) {
            return Err(Stop::Failed(
                "the work tree was replaced during the agent step; nothing was committed".into(),
            ));
        }

        // Commit when the tree changed.
        self.reach(step::COMMITTING).await?;
        self.git_step(
            &repo,
            &private,
            &["add".into(), "-A".into()],
            false,
            Op::Local,
            Stdout::Stream,
        )
        .await?;
        // `diff --cached --quiet` exits 1 when the index differs from HEAD: cheaper than
        // `status`, which would scan the tree for untracked files again.
        if self.cancel.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        let mut diff = repo.command(&private, false);
        diff.args(["diff", "--cached", "--quiet"]);
        let changed = process::run(
            diff,
            &self.out,
            Stdout::Capture,
            self.cancel,
            self.cfg.kill_grace,
        )
        .await
        .map_err(|e| Stop::Failed(format!("cannot run git: {e}")))?;
        if changed.cancelled {
            return Err(Stop::Cancelled);
        }
        match changed.status.code() {
            Some(0) => return Ok(None),
            Some(1) => {}
            _ => {
                let tail: Vec<String> = changed
                    .stderr_tail
                    .iter()
                    .map(|l| self.masker.mask(l).into_owned())
                    .collect();
                return Err(Stop::Failed(git::explain_failure(
                    Op::Local,
                    &self.display_url,
                    &self.branch,
                    None,
                    &tail,
                )));
            }
        }
        let message = git::commit_message(&self.record.prompt, &self.cfg.job_id);
        let msg_file = private.join("commit-message.txt");
        tokio::fs::write(&msg_file, &message)
            .await
            .map_err(|e| Stop::Failed(format!("cannot write the commit message: {e}")))?;
        self.git_step(
            &repo,
            &private,
            &[
                "commit".into(),
                "-q".into(),
                "--no-verify".into(),
                "-F".into(),
                msg_file.to_string_lossy().into_owned(),
            ],
            false,
            Op::Local,
            Stdout::Stream,
        )
        .await?;
        let sha = self
            .git_step(
                &repo,
                &private,
                &["rev-parse".into(), "HEAD".into()],
                false,
                Op::Local,
                Stdout::Capture,
            )
            .await?
            .stdout
            .trim()
            .to_owned();
        self.out
            .note(&format!(
                "Committed {}: {}",
                short(&sha),
                message.lines().next().unwrap_or_default()
            ))
            .await;

        // Push: the job's URL and the job's branch, named explicitly (no remote, no pushurl).
        // The step is recorded first: once it says `pushing`, the operator never runs the job
        // again, so a branch is never pushed by two attempts.
        self.reach(step::PUSHING).await?;
        self.out
            .note(&format!("Pushing {} to {}", self.branch, self.display_url))
            .await;
        let refspec = format!("refs/heads/{0}:refs/heads/{0}", self.branch);
        self.git_step(
            &repo,
            &private,
            &[
                "push".into(),
                "--no-verify".into(),
                "--".into(),
                self.display_url.clone(),
                refspec,
            ],
            true,
            Op::Push,
            Stdout::Stream,
        )
        .await?;

        // After the push, its own step that never fails the job.
        let pull_request = self.pull_request(&repo, &private, &sha).await;
        Ok(Some(Pushed {
            branch: self.branch.clone(),
            commit_sha: sha,
            pull_request,
        }))
    }

    /// Opens (or finds) the pull / merge request of the pushed branch; see [`forge`].
    async fn pull_request(&self, repo: &Git, dir: &Path, sha: &str) -> PullRequestFields {
        // What the commit changed, for the request's body; a failure only shortens the body.
        let mut diff = repo.command(dir, false);
        diff.args([
            "diff-tree",
            "-r",
            "-z",
            "--no-commit-id",
            "--no-renames",
            "--name-status",
            "HEAD",
        ]);
        let files = match diff.output().await {
            Ok(o) if o.status.success() => forge::parse_name_status(&o.stdout),
            _ => Vec::new(),
        };
        let step = forge::AfterPush {
            enabled: self.cfg.open_pull_requests,
            job_field: self.record.open_pull_request.as_deref(),
            provider_kind: self.provider.kind.as_deref(),
            provider_base_url: self.provider.base_url.as_deref(),
            repo: &self.repo_url,
            token: &self.api_token,
            ca_file: self.cfg.git_ca_file.as_deref(),
            job_id: &self.cfg.job_id,
            prompt: &self.record.prompt,
            head: &self.branch,
            base: self.record.base_branch.as_deref(),
            commit: sha,
            files: &files,
        };
        forge::after_push(&step, &self.out, &self.masker, self.cancel).await
    }

    /// Records that the job reached `name` before the step starts. The write must succeed: the
    /// operator decides from it whether a job whose pod was lost can run again.
    async fn reach(&mut self, name: &'static str) -> std::result::Result<(), Stop> {
        if self.cancel.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        match transitions::set_step(
            &mut self.con,
            &self.cfg.job_id,
            &self.cfg.runner_id,
            name,
            &time::now(),
        )
        .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(Stop::Failed(
                "the job is no longer held by this runner (it ended or moved to another attempt)"
                    .into(),
            )),
            Err(e) => Err(Stop::Failed(format!(
                "cannot record the {name} step in Redis: {e}"
            ))),
        }
    }

    async fn git_step(
        &self,
        git: &Git,
        dir: &Path,
        args: &[String],
        with_credentials: bool,
        op: Op,
        stdout: Stdout,
    ) -> std::result::Result<Finished, Stop> {
        if self.cancel.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        let started = Instant::now();
        let mut cmd = git.command(dir, with_credentials);
        cmd.args(args);
        let done = process::run(cmd, &self.out, stdout, self.cancel, self.cfg.kill_grace)
            .await
            .map_err(|e| Stop::Failed(format!("cannot run git ({}): {e}", git.bin.display())))?;
        tracing::debug!(step = %args[0], duration_ms = started.elapsed().as_millis() as u64, "git step finished");
        if done.cancelled {
            return Err(Stop::Cancelled);
        }
        if !done.status.success() {
            let tail: Vec<String> = done
                .stderr_tail
                .iter()
                .map(|l| self.masker.mask(l).into_owned())
                .collect();
            return Err(Stop::Failed(git::explain_failure(
                op,
                &self.display_url,
                &self.branch,
                self.record.base_branch.as_deref(),
                &tail,
            )));
        }
        if op == Op::Clone {
            info!(
                duration_ms = started.elapsed().as_millis() as u64,
                "git clone completed"
            );
        }
        Ok(done)
    }

    /// Hands the tree to the agent and follows it to its end. Locally (no agent container)
    /// the runner starts the agent wrapper itself, with an environment cleared of everything
    /// but the allowlist and `AGENT_ENV`; in a pod the agent container is already waiting.
    async fn run_agent(&mut self, tree: &Path) -> std::result::Result<(), Stop> {
        let local_command = if self.cfg.agent_container {
            None
        } else {
            match &self.cfg.agent_command {
                Some(c) => Some(c.clone()),
                None => return Ok(()),
            }
        };
        if self.record.prompt.len() > MAX_PROMPT_BYTES {
            return Err(Stop::Failed(format!(
                "the prompt is {} bytes; the limit is {MAX_PROMPT_BYTES} bytes",
                self.record.prompt.len()
            )));
        }
        let mut side = match self.handoff.take() {
            Some(side) => side,
            None => RunnerSide::prepare(&self.layout.handoff)
                .map_err(|e| Stop::Failed(format!("cannot prepare the agent hand-off: {e}")))?,
        };
        let prompt_file = side
            .write_prompt(&self.record.prompt)
            .map_err(|e| Stop::Failed(format!("cannot write the prompt file: {e}")))?;
        let mut wrapper = match local_command {
            Some(command) => Some(self.spawn_local_agent(&command, side.dir())?),
            None => None,
        };
        side.start(&Start {
            job_id: self.cfg.job_id.clone(),
            repo_url: self.display_url.clone(),
            branch: self.branch.clone(),
            work_tree: tree.to_owned(),
            prompt_file,
        })
        .map_err(|e| Stop::Failed(format!("cannot hand the work tree to the agent: {e}")))?;
        self.out.note("Running the agent").await;
        let started = Instant::now();
        let end = side
            .follow(&self.out, self.cancel, self.cfg.agent_start_timeout)
            .await;
        if let Some(child) = wrapper.as_mut() {
            // The wrapper exits on its own once it reported; it is stopped on cancellation.
            if end == AgentEnd::Cancelled {
                let _ = child.start_kill();
            }
            let _ = child.wait().await;
        }
        drop(side);
        info!(
            duration_ms = started.elapsed().as_millis() as u64,
            end = ?end,
            "agent finished"
        );
        match end {
            AgentEnd::Exited { code: Some(0), .. } => Ok(()),
            AgentEnd::Exited {
                code: Some(code), ..
            } => Err(Stop::Failed(format!("agent exited with code {code}"))),
            AgentEnd::Exited {
                signal: Some(sig), ..
            } => Err(Stop::Failed(format!("agent was killed by signal {sig}"))),
            AgentEnd::Exited { .. } => Err(Stop::Failed("agent failed".into())),
            AgentEnd::StartFailed(msg) => Err(Stop::Failed(msg)),
            AgentEnd::NeverStarted(t) => Err(Stop::Failed(format!(
                "the agent container did not start within {} s (is its image pullable?)",
                t.as_secs()
            ))),
            AgentEnd::Vanished => Err(Stop::Failed(
                "the agent stopped before it finished (its container was killed: out of memory?)"
                    .into(),
            )),
            AgentEnd::Cancelled => Err(Stop::Cancelled),
        }
    }

    /// Starts `repobox-job-runner agent` as a child: its environment holds only the
    /// allowlist, the `AGENT_ENV` names and what the wrapper needs.
    fn spawn_local_agent(
        &self,
        command: &str,
        handoff: &Path,
    ) -> std::result::Result<tokio::process::Child, Stop> {
        let exe = std::env::current_exe()
            .map_err(|e| Stop::Failed(format!("cannot find the runner binary: {e}")))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("agent").env_clear();
        git::inherit_env(&mut cmd);
        for name in &self.cfg.agent_env {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        cmd.env(runner_env::HANDOFF_DIR, handoff)
            .env(runner_env::AGENT_COMMAND, command)
            .env(
                runner_env::KILL_GRACE_SECONDS,
                self.cfg.kill_grace.as_secs().to_string(),
            )
            .env(runner_env::LOG_FORMAT, "text")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd.spawn()
            .map_err(|e| Stop::Failed(format!("cannot start the agent: {e}")))
    }
}

/// Device and inode of a directory that must not be swapped for a symlink.
fn dir_identity(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    Ok((m.dev(), m.ino()))
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_are_safe() {
        assert_eq!(dir_name("abc-123_X"), "abc-123_X");
        assert_eq!(dir_name("../../etc"), "______etc");
        assert_eq!(dir_name(""), "job");
        assert_eq!(dir_name(&"a".repeat(100)).len(), 64);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Outcome::NoChanges.exit_code(), 0);
        assert_eq!(Outcome::AlreadyTerminal(JobStatus::Success).exit_code(), 0);
        assert_eq!(Outcome::Failed("x".into()).exit_code(), 1);
        assert_eq!(Outcome::Cancelled.exit_code(), 143);
    }
}
