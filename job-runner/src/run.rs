//! The job flow, start to finish.
//!
//! read job → take it (`pending` → `running`, atomically) → read provider → decrypt token
//! → clone → check the branch is free → branch → agent → commit → push → record outcome.
//! Every step's output streams to `job:{id}:output`; a failure anywhere ends the job as
//! `failed` with a one-line reason; SIGTERM stops the current child and leaves the terminal
//! status to the operator, which knows why the pod was stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use repobox_contract::transitions::{self, Finish, FinishOutcome, StartOutcome};
use repobox_contract::{
    JobRecord, JobStatus, Masker, ProviderRecord, RecordError, Token, keys, time,
};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::config::Config;
use crate::error::Result;
use crate::git::{self, Git, Op};
use crate::output::{Output, OutputHandle};
use crate::process::{self, Finished, Stdout};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Changes committed and pushed.
    Pushed { branch: String, commit_sha: String },
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

pub async fn run(cfg: &Config, cancel: CancellationToken) -> Result<Outcome> {
    let span = tracing::info_span!(
        "job",
        runner_id = %cfg.runner_id,
        job_id = %cfg.job_id,
        user_id = tracing::field::Empty,
    );
    run_job(cfg, cancel, span.clone()).instrument(span).await
}

async fn connect(cfg: &Config, cancel: &CancellationToken) -> Result<MultiplexedConnection> {
    let client = redis::Client::open(cfg.redis_url.as_str())?;
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

async fn run_job(cfg: &Config, cancel: CancellationToken, span: tracing::Span) -> Result<Outcome> {
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

    match transitions::start(&mut con, &cfg.job_id, &cfg.runner_id, &time::now()).await? {
        StartOutcome::Started => info!("job started"),
        StartOutcome::AlreadyTerminal(s) => {
            info!(status = %s, "job already finished; nothing to do");
            return Ok(Outcome::AlreadyTerminal(s));
        }
        StartOutcome::AlreadyRunning { runner_id } => {
            warn!(holder = %runner_id, "job is already running elsewhere; not starting it twice");
            return Ok(Outcome::AlreadyRunning(runner_id));
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

    // The token, or the reason there is none. The masker knows the token before any
    // line leaves the process.
    let token = fetch_token(&mut con, cfg, &record).await;
    let mut masker = Masker::new();
    if let Ok(t) = &token {
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

    let work = cfg.temp_dir.join(format!(
        "{}-{}",
        dir_name(&cfg.job_id),
        hex::encode(rand::random::<[u8; 4]>())
    ));
    let result = match token {
        Err(msg) => Err(Stop::Failed(msg)),
        Ok(token) => {
            let job = Job {
                cfg,
                record: &record,
                out: out.clone(),
                masker: masker.clone(),
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
                ),
                display_url: git::strip_userinfo(&record.repo_url),
                branch: keys::job_branch(&cfg.job_id),
                work: work.clone(),
            };
            job.execute().await
        }
    };

    let (outcome, fin) = match result {
        Ok(Some((branch, commit_sha))) => {
            out.note(&format!("Done: pushed {branch} at {commit_sha}"))
                .await;
            (
                Outcome::Pushed {
                    branch: branch.clone(),
                    commit_sha: commit_sha.clone(),
                },
                Some(Finish::success(time::now(), Some(branch), Some(commit_sha))),
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

    if cfg.cleanup_after_job
        && let Err(e) = tokio::fs::remove_dir_all(&work).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(error = %e, dir = %work.display(), "could not remove the work tree");
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

/// Reads the provider record and decrypts its token; the error is the user-facing reason.
async fn fetch_token(
    con: &mut MultiplexedConnection,
    cfg: &Config,
    record: &JobRecord,
) -> std::result::Result<Token, String> {
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
    cfg.encryption_key
        .decrypt(&provider.encrypted_token)
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
    cancel: &'a CancellationToken,
    git: Git,
    display_url: String,
    branch: String,
    work: PathBuf,
}

impl Job<'_> {
    /// Runs the steps; `Some((branch, sha))` when something was pushed.
    async fn execute(&self) -> std::result::Result<Option<(String, String)>, Stop> {
        git::check_url(&self.display_url, self.cfg.allow_insecure_http).map_err(Stop::Failed)?;
        tokio::fs::create_dir_all(&self.work)
            .await
            .map_err(|e| Stop::Failed(format!("cannot create the work directory: {e}")))?;
        let repo = self.work.join("repo");

        // Clone.
        let mut args: Vec<String> = vec!["clone".into()];
        if self.cfg.clone_depth > 0 {
            args.push(format!("--depth={}", self.cfg.clone_depth));
        }
        if let Some(base) = &self.record.base_branch {
            args.push("--branch".into());
            args.push(base.clone());
        }
        args.extend(["--".into(), self.display_url.clone(), "repo".into()]);
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
        let (cloned, listed) = tokio::join!(
            self.git_step(&self.work, &args, true, Op::Clone, Stdout::Stream),
            self.git_step(&self.work, &ls_remote, true, Op::LsRemote, Stdout::Capture),
        );
        cloned?;
        if !listed?.stdout.trim().is_empty() {
            return Err(Stop::Failed(format!(
                "branch {} already exists on the remote",
                self.branch
            )));
        }
        self.git_step(
            &repo,
            &[
                "checkout".into(),
                "-q".into(),
                "-b".into(),
                self.branch.clone(),
            ],
            false,
            Op::Local,
            Stdout::Stream,
        )
        .await?;
        self.out
            .note(&format!("Created branch {}", self.branch))
            .await;

        // Agent.
        if let Some(command) = &self.cfg.agent_command {
            self.run_agent(command, &repo).await?;
        }

        // Commit when the tree changed.
        self.git_step(
            &repo,
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
        let mut diff = self.git.command(&repo, false);
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
        let msg_file = self.work.join("commit-message.txt");
        tokio::fs::write(&msg_file, &message)
            .await
            .map_err(|e| Stop::Failed(format!("cannot write the commit message: {e}")))?;
        self.git_step(
            &repo,
            &[
                "commit".into(),
                "-q".into(),
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

        // Push.
        self.out
            .note(&format!("Pushing {} to {}", self.branch, self.display_url))
            .await;
        let refspec = format!("refs/heads/{0}:refs/heads/{0}", self.branch);
        self.git_step(
            &repo,
            &["push".into(), "origin".into(), refspec],
            true,
            Op::Push,
            Stdout::Stream,
        )
        .await?;
        Ok(Some((self.branch.clone(), sha)))
    }

    async fn git_step(
        &self,
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
        let mut cmd = self.git.command(dir, with_credentials);
        cmd.args(args);
        let done = process::run(cmd, &self.out, stdout, self.cancel, self.cfg.kill_grace)
            .await
            .map_err(|e| {
                Stop::Failed(format!("cannot run git ({}): {e}", self.git.bin.display()))
            })?;
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

    async fn run_agent(&self, command: &str, repo: &Path) -> std::result::Result<(), Stop> {
        let prompt_file = self.work.join("prompt.txt");
        tokio::fs::write(&prompt_file, &self.record.prompt)
            .await
            .map_err(|e| Stop::Failed(format!("cannot write the prompt file: {e}")))?;
        self.out.note("Running the agent").await;
        let started = Instant::now();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(command).current_dir(repo).env_clear();
        git::inherit_env(&mut cmd);
        for name in &self.cfg.agent_env {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        cmd.env("REPOBOX_JOB_ID", &self.cfg.job_id)
            .env("REPOBOX_PROMPT", &self.record.prompt)
            .env("REPOBOX_PROMPT_FILE", &prompt_file)
            .env("REPOBOX_REPO_URL", &self.display_url)
            .env("REPOBOX_BRANCH", &self.branch)
            .env("REPOBOX_WORK_TREE", repo);
        let done = process::run(
            cmd,
            &self.out,
            Stdout::Stream,
            self.cancel,
            self.cfg.kill_grace,
        )
        .await
        .map_err(|e| Stop::Failed(format!("cannot start the agent: {e}")))?;
        info!(
            duration_ms = started.elapsed().as_millis() as u64,
            code = done.status.code(),
            "agent finished"
        );
        if done.cancelled {
            return Err(Stop::Cancelled);
        }
        if !done.status.success() {
            use std::os::unix::process::ExitStatusExt;
            return Err(Stop::Failed(
                match (done.status.code(), done.status.signal()) {
                    (Some(code), _) => format!("agent exited with code {code}"),
                    (None, Some(sig)) => format!("agent was killed by signal {sig}"),
                    _ => "agent failed".to_owned(),
                },
            ));
        }
        Ok(())
    }
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
