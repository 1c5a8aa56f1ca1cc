//! The git CLI, with credentials that never touch the URL, argv, `.git/config` or output.
//!
//! git asks for credentials through `GIT_ASKPASS`, which points at this very binary; the
//! binary answers from `REPOBOX_GIT_TOKEN`, an environment variable set only on the git
//! child (see [`crate::askpass`]). System and global git config are ignored, so no
//! credential helper of the host can store the token, and only the http(s) transports
//! are allowed.
//!
//! The agent may have written anything into the work tree, so nothing there steers git: the
//! git directory lives in the runner's private directory (never inside the tree, and in a pod
//! on a volume the agent does not mount) and is named explicitly (`GIT_DIR`, `GIT_WORK_TREE`)
//! on every call, hooks point at `/dev/null`, fsmonitor is off, and the push names the job's
//! URL and branch explicitly instead of a remote.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use repobox_contract::Token;
use tokio::process::Command;

use crate::askpass;

/// Variables a child may inherit from the executor's environment; everything else
/// (the encryption key, the Redis URL, ...) is withheld.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// Applies the inherited allowlist to a command whose environment was cleared.
pub fn inherit_env(cmd: &mut Command) {
    for name in INHERITED_ENV {
        if let Some(v) = std::env::var_os(name) {
            cmd.env(name, v);
        }
    }
}

/// How git is invoked for one job.
#[derive(Clone)]
pub struct Git {
    /// The git executable (`GIT_BIN`).
    pub bin: PathBuf,
    /// The runner's git directory and the work tree, once the clone exists.
    repo: Option<(PathBuf, PathBuf)>,
    ca_file: Option<PathBuf>,
    token: Token,
    askpass_program: OsString,
    author_name: String,
    author_email: String,
    allow_http: bool,
}

impl Git {
    /// A git for one job: `token` is answered through `askpass_program` (git's `GIT_ASKPASS`) and
    /// never appears on a command line; `allow_http` admits `http://` remotes.
    pub fn new(
        bin: PathBuf,
        token: Token,
        askpass_program: OsString,
        author_name: String,
        author_email: String,
        allow_http: bool,
    ) -> Self {
        Self {
            bin,
            repo: None,
            ca_file: None,
            token,
            askpass_program,
            author_name,
            author_email,
            allow_http,
        }
    }

    /// The same git, trusting `ca_file` for the git host's certificate.
    pub fn with_ca_file(mut self, ca_file: Option<PathBuf>) -> Self {
        self.ca_file = ca_file;
        self
    }

    /// The same git, bound to the runner's git directory and the work tree.
    pub fn in_repo(&self, git_dir: PathBuf, work_tree: PathBuf) -> Self {
        let mut g = self.clone();
        g.repo = Some((git_dir, work_tree));
        g
    }

    /// A git command in `dir`. `with_credentials` decides whether the askpass answer is
    /// available to it: only the commands that talk to the remote get the token.
    pub fn command(&self, dir: &Path, with_credentials: bool) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(dir).env_clear();
        inherit_env(&mut cmd);
        if let Some((git_dir, work_tree)) = &self.repo {
            cmd.env("GIT_DIR", git_dir).env("GIT_WORK_TREE", work_tree);
        }
        if let Some(ca) = &self.ca_file {
            cmd.env("GIT_SSL_CAINFO", ca);
        }
        cmd.env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("LC_ALL", "C")
            .env("GIT_AUTHOR_NAME", &self.author_name)
            .env("GIT_AUTHOR_EMAIL", &self.author_email)
            .env("GIT_COMMITTER_NAME", &self.author_name)
            .env("GIT_COMMITTER_EMAIL", &self.author_email)
            // Repository discovery never climbs out of the directory git runs in.
            .env("GIT_CEILING_DIRECTORIES", dir)
            .env(
                "GIT_ALLOW_PROTOCOL",
                if self.allow_http {
                    "https:http"
                } else {
                    "https"
                },
            )
            // No credential helper may see (and store) the token.
            .args(["-c", "credential.helper="])
            .args([
                "-c",
                "protocol.allow=never",
                "-c",
                "protocol.https.allow=always",
            ])
            // Nothing in the work tree or the repository runs code: no hooks, no fsmonitor,
            // no submodule recursion.
            .args([
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "core.fsmonitor=false",
                "-c",
                "submodule.recurse=false",
                "-c",
                "push.recurseSubmodules=no",
                "-c",
                "advice.addEmbeddedRepo=false",
            ]);
        if self.allow_http {
            cmd.args(["-c", "protocol.http.allow=always"]);
        }
        if with_credentials {
            cmd.env("GIT_ASKPASS", &self.askpass_program)
                .env(askpass::MODE_VAR, "1")
                .env(askpass::TOKEN_VAR, self.token.expose());
        }
        cmd
    }
}

/// Which git operation failed, to explain the failure in the user's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `git clone`.
    Clone,
    /// `git ls-remote` (whether the branch exists on the remote).
    LsRemote,
    /// `git push`.
    Push,
    /// A local command (checkout, add, commit, ...): no network involved.
    Local,
}

/// Turns git's stderr into the one-line `error` a user reads. `stderr` must already be
/// masked; `repo` is the display URL (no credentials).
pub fn explain_failure(
    op: Op,
    repo: &str,
    branch: &str,
    base_branch: Option<&str>,
    stderr: &[String],
) -> String {
    let all = stderr.join("\n");
    let has = |needle: &str| {
        all.to_ascii_lowercase()
            .contains(&needle.to_ascii_lowercase())
    };
    if has("authentication failed")
        || has("could not read username")
        || has("could not read password")
        || has("invalid username or password")
        || has("http basic: access denied")
        || has("the requested url returned error: 401")
        || has("the requested url returned error: 403")
        || has("permission to") && has("denied")
    {
        return format!(
            "authentication failed for {repo}: the git provider token was refused (expired, revoked or lacking access)"
        );
    }
    if has("repository not found")
        || has("the requested url returned error: 404")
        || has("does not appear to be a git repository")
        || has("not found") && op == Op::Clone && !has("remote branch")
    {
        return format!("repository not found: {repo}");
    }
    if let Some(base) = base_branch
        && (has("remote branch") && has("not found"))
    {
        return format!("base branch `{base}` not found in {repo}");
    }
    if has("could not resolve host") {
        return format!("could not resolve the git host of {repo}");
    }
    if has("failed to connect") || has("connection refused") || has("connection timed out") {
        return format!("could not connect to the git host of {repo}");
    }
    if op == Op::Push {
        if has("[rejected]")
            && (has("fetch first") || has("non-fast-forward") || has("already exists"))
        {
            return format!("branch {branch} already exists on the remote");
        }
        let detail = remote_message(stderr);
        return match detail {
            Some(msg) => format!("push rejected by {repo}: {msg}"),
            None => format!("push rejected by {repo}: {}", last_line(stderr)),
        };
    }
    if op == Op::Local && has("permission denied") {
        return format!(
            "the runner cannot read what the agent left in the work tree ({}); files must stay readable by the pod's group",
            last_line(stderr)
        );
    }
    let what = match op {
        Op::Clone => "git clone",
        Op::LsRemote => "git ls-remote",
        Op::Push => "git push",
        Op::Local => "git",
    };
    format!("{what} failed: {}", last_line(stderr))
}

/// The first `remote: ...` line a server hook printed, if any.
fn remote_message(stderr: &[String]) -> Option<String> {
    stderr
        .iter()
        .filter_map(|l| l.trim().strip_prefix("remote:"))
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

fn last_line(stderr: &[String]) -> String {
    stderr
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .map(|l| {
            l.trim_start_matches("fatal: ")
                .trim_start_matches("error: ")
                .to_owned()
        })
        .unwrap_or_else(|| "no error output".to_owned())
}

/// The commit message: the prompt's first line (bounded), then the job id as a trailer.
pub fn commit_message(prompt: &str, job_id: &str) -> String {
    let first = prompt
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("Repobox changes");
    let mut subject: String = first.chars().take(72).collect();
    if first.chars().count() > 72 {
        subject.truncate(subject.trim_end().len());
        subject.push('…');
    }
    format!("{subject}\n\nRepobox-Job: {job_id}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_owned).collect()
    }

    const REPO: &str = "https://git.example.com/acme/api.git";

    #[test]
    fn explains_auth_failures() {
        for stderr in [
            "fatal: Authentication failed for 'https://git.example.com/acme/api.git/'",
            "fatal: could not read Username for 'https://git.example.com': terminal prompts disabled",
            "remote: HTTP Basic: Access denied\nfatal: Authentication failed",
            "fatal: unable to access '...': The requested URL returned error: 403",
        ] {
            let e = explain_failure(Op::Clone, REPO, "repobox/x", None, &lines(stderr));
            assert!(
                e.starts_with("authentication failed for https://git.example.com/acme/api.git"),
                "{e}"
            );
        }
    }

    #[test]
    fn explains_missing_repo_and_branch() {
        let e = explain_failure(
            Op::Clone,
            REPO,
            "b",
            None,
            &lines("remote: Repository not found.\nfatal: repository '...' not found"),
        );
        assert_eq!(e, format!("repository not found: {REPO}"));
        let e = explain_failure(
            Op::Clone,
            REPO,
            "b",
            Some("dev"),
            &lines(
                "warning: Could not find remote branch dev to clone.\nfatal: Remote branch dev not found in upstream origin",
            ),
        );
        assert_eq!(e, format!("base branch `dev` not found in {REPO}"));
    }

    #[test]
    fn explains_push_failures() {
        let e = explain_failure(
            Op::Push,
            REPO,
            "repobox/abc",
            None,
            &lines(
                " ! [rejected]        repobox/abc -> repobox/abc (fetch first)\nerror: failed to push some refs",
            ),
        );
        assert_eq!(e, "branch repobox/abc already exists on the remote");
        let e = explain_failure(
            Op::Push,
            REPO,
            "b",
            None,
            &lines(
                "remote: protected branch policy forbids this\n ! [remote rejected] b -> b (pre-receive hook declined)",
            ),
        );
        assert_eq!(
            e,
            format!("push rejected by {REPO}: protected branch policy forbids this")
        );
        let e = explain_failure(Op::Push, REPO, "b", None, &lines("error: something odd"));
        assert_eq!(e, format!("push rejected by {REPO}: something odd"));
    }

    #[test]
    fn explains_network_and_unknown_failures() {
        let e = explain_failure(
            Op::Clone,
            REPO,
            "b",
            None,
            &lines("fatal: unable to access: Could not resolve host: git.example.com"),
        );
        assert_eq!(e, format!("could not resolve the git host of {REPO}"));
        let e = explain_failure(
            Op::Clone,
            REPO,
            "b",
            None,
            &lines("fatal: unable to access: Failed to connect to x port 443"),
        );
        assert_eq!(e, format!("could not connect to the git host of {REPO}"));
        let e = explain_failure(Op::Local, REPO, "b", None, &lines("fatal: bad object HEAD"));
        assert_eq!(e, "git failed: bad object HEAD");
        let e = explain_failure(Op::Local, REPO, "b", None, &[]);
        assert_eq!(e, "git failed: no error output");
    }

    #[test]
    fn url_policy_is_the_contract_one() {
        use repobox_contract::urls::RepoUrl;
        assert!(RepoUrl::parse("https://h/a.git", false).is_ok());
        assert!(RepoUrl::parse("HTTPS://h/a.git", false).is_ok());
        assert!(
            RepoUrl::parse("http://h/a.git", false)
                .unwrap_err()
                .to_string()
                .contains("https")
        );
        assert!(RepoUrl::parse("http://h/a.git", true).is_ok());
        for bad in [
            "ssh://h/a",
            "git@h:a.git",
            "file:///etc",
            "ext::sh -c x",
            "",
        ] {
            assert!(RepoUrl::parse(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn commit_messages() {
        assert_eq!(
            commit_message("\n  Fix the bug\nmore", "j1"),
            "Fix the bug\n\nRepobox-Job: j1\n"
        );
        assert_eq!(
            commit_message("", "j1"),
            "Repobox changes\n\nRepobox-Job: j1\n"
        );
        let long = "word ".repeat(30);
        let m = commit_message(&long, "j");
        let subject = m.lines().next().unwrap();
        assert!(
            subject.chars().count() <= 73 && subject.ends_with('…'),
            "{subject}"
        );
    }
}
