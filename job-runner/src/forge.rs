//! The pull / merge request after the push: GitHub (github.com and Enterprise) and GitLab
//! (gitlab.com and self-hosted).
//!
//! After a successful push the runner opens a request from `repobox/{id8}` into the job's
//! `baseBranch` (else the repository's default branch), or finds the one already open for that
//! head branch (a retried job, a lost response), and records `prUrl` / `prNumber`. A failure here
//! never loses the pushed branch: the job still succeeds, with `prError` saying why.
//!
//! **The token only goes where git already sends it.** The API base is derived from the same
//! provider record that vouched for the repository's host ([`target`]): the repository URL's own
//! scheme and host plus `/api/v3` (GitHub Enterprise) or `/api/v4` (GitLab), and
//! `https://api.github.com` for `github.com`. Redirects are followed only to that same origin
//! (GitLab's `PRIVATE-TOKEN` is a custom header an HTTP client would carry across hosts), and so
//! are pagination links. TLS trusts `GIT_SSL_CAINFO` alone when it is set, as git does, else the
//! system roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` honoured); `http://` only with
//! `ALLOW_INSECURE_HTTP`, which the repository URL already had to pass.
//!
//! **Why a thin `reqwest` client rather than `octocrab` and the `gitlab` crate.** The runner needs
//! three calls per forge (the repository's default branch, the open requests of a head branch,
//! create) and their documented error shapes. Measured on this machine: a trivial program making
//! those calls, the workspace's release profile, a fresh target directory each, `-j2` on 2 cores
//! shared with other builds (so the times are rough):
//!
//! | client (features) | crates | release build | stripped binary |
//! | --- | --- | --- | --- |
//! | none: tokio + serde_json + rustls (baseline) | 34 | 86 s | 1.0 MiB |
//! | `reqwest` 0.13 (`rustls-no-provider`) | 122 | 174 s | 2.4 MiB |
//! | `octocrab` 0.54 (`default-client`, `rustls`, `rustls-ring`, `timeout`), GitHub only | 152 | 495 s | 3.1 MiB |
//! | `gitlab` 0.1905 (default), GitLab only | 173 | 465 s | 3.7 MiB |
//!
//! Both crates would be needed (each covers one forge), on top of each other, for three calls
//! each; `gitlab` also brings `graphql_client` and `cron`, `octocrab` tower's retry, timeout and
//! redirect layers. The thin client is a few hundred lines over `reqwest`, which shares hyper
//! and rustls with the rest of the tree and uses the ring provider the process already installs;
//! it keeps full control of where the token goes (redirects, pagination) and of the error
//! messages. The runner's release binary grew from 3.27 MiB to 4.00 MiB (+0.73 MiB).

use std::path::Path;
use std::time::Duration;

use repobox_contract::transitions::PullRequestFields;
use repobox_contract::urls::{ProviderHost, RepoUrl};
use repobox_contract::{Masker, Token};
use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::error::{Error, Result};
use crate::output::OutputHandle;

/// The longest title: GitHub allows 256 characters and GitLab 255; a first line of a prompt
/// longer than this is a paragraph, not a title.
pub const MAX_TITLE_CHARS: usize = 100;
/// How much of the prompt goes into the body (GitHub's limit is 65,536 characters).
pub const MAX_PROMPT_CHARS: usize = 8_000;
/// Changed files listed in the body; the rest are counted.
pub const MAX_FILES_LISTED: usize = 50;
/// Pages of open requests read before giving up (100 per page).
const MAX_PAGES: usize = 20;
/// The largest API response read.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Attempts of one call when the forge is unreachable or answers 429/502/503/504.
const ATTEMPTS: u32 = 3;
/// Per-request limits: a forge that hangs must not hold the pod until its deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole step: a forge that answers slowly to every retry must not hold the job's success.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Which API the provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// github.com or GitHub Enterprise.
    GitHub,
    /// gitlab.com or a self-hosted GitLab.
    GitLab,
}

impl Kind {
    /// The forge's name, as shown in the job's output.
    pub fn name(self) -> &'static str {
        match self {
            Self::GitHub => "GitHub",
            Self::GitLab => "GitLab",
        }
    }

    /// What users call the request on this forge.
    pub fn request_name(self) -> &'static str {
        match self {
            Self::GitHub => "pull request",
            Self::GitLab => "merge request",
        }
    }

    /// How a request's number is written (`#12`, `!12`).
    fn sigil(self) -> char {
        match self {
            Self::GitHub => '#',
            Self::GitLab => '!',
        }
    }
}

/// Where the API is and which project to ask about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Which API to speak.
    pub kind: Kind,
    /// The API root, e.g. `https://api.github.com/` or `https://gitlab.example.com/api/v4`.
    pub api: Url,
    /// `owner/repo` (GitHub) or `group/subgroup/project` (GitLab).
    pub project: String,
}

/// Derives the API root and the project from the provider record and the repository URL. The
/// repository must be on the provider's host (checked again here, so this function alone
/// guarantees the token goes nowhere else); the API shares its scheme and host, except that
/// `github.com` is served by `api.github.com`. A `baseUrl` path (GitLab under a relative URL
/// root) prefixes both the project path and the API.
pub fn target(kind: Option<&str>, base_url: Option<&str>, repo: &RepoUrl) -> Result<Target> {
    let host =
        ProviderHost::from_provider(kind, base_url).map_err(|e| Error::Forge(e.to_string()))?;
    host.check(repo).map_err(|e| Error::Forge(e.to_string()))?;
    let kind = match kind.map(|k| k.trim().to_ascii_lowercase()).as_deref() {
        Some("gitlab") => Kind::GitLab,
        _ => Kind::GitHub,
    };
    let repo_url = Url::parse(repo.as_str())
        .map_err(|_| Error::Forge(format!("repository URL `{repo}` is not a valid URL")))?;
    // The web root's path: `https://example.com/gitlab/` → `/gitlab`.
    let root = base_url
        .and_then(|b| Url::parse(b.trim()).ok())
        .map(|u| u.path().trim_end_matches('/').to_owned())
        .unwrap_or_default();
    let path = repo_url.path();
    let rel = path
        .strip_prefix(root.as_str())
        .filter(|rest| root.is_empty() || rest.starts_with('/'))
        .ok_or_else(|| {
            Error::Forge(format!(
                "repository path `{path}` is not under the provider's base URL path `{root}`"
            ))
        })?;
    let project = rel.trim_matches('/');
    let project = project.strip_suffix(".git").unwrap_or(project).to_owned();
    let segments: Vec<&str> = project.split('/').collect();
    let well_formed = segments
        .iter()
        .all(|s| !s.is_empty() && *s != "." && *s != "..");
    let shape_ok = match kind {
        Kind::GitHub => segments.len() == 2,
        Kind::GitLab => segments.len() >= 2,
    };
    if !well_formed || !shape_ok {
        let want = match kind {
            Kind::GitHub => "owner/repository",
            Kind::GitLab => "group/project",
        };
        return Err(Error::Forge(format!(
            "cannot tell the {} project from `{repo}` (expected {want})",
            kind.name()
        )));
    }
    let api = if kind == Kind::GitHub && host.authority == "github.com" {
        Url::parse("https://api.github.com/").map_err(|e| Error::Forge(e.to_string()))?
    } else {
        let mut api = repo_url.clone();
        let suffix = match kind {
            Kind::GitHub => "api/v3",
            Kind::GitLab => "api/v4",
        };
        api.set_path(&format!("{root}/{suffix}"));
        api
    };
    Ok(Target { kind, api, project })
}

/// Whether to open a request, from the runner's setting and the job's `openPullRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Open a request (or find the one already open).
    Open,
    /// Not opened; the reason is shown in the job's output.
    Skip(&'static str),
}

/// The setting is a switch for the whole installation; a job may only turn it off. A value the
/// runner does not understand falls back to the default and is reported (second element).
pub fn decide(enabled: bool, job_field: Option<&str>) -> (Decision, Option<String>) {
    if !enabled {
        return (
            Decision::Skip("turned off for this installation (OPEN_PULL_REQUESTS=false)"),
            None,
        );
    }
    match job_field.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("1" | "true" | "yes" | "on") => (Decision::Open, None),
        Some("0" | "false" | "no" | "off") => (
            Decision::Skip("turned off for this job (openPullRequest=false)"),
            None,
        ),
        Some(_) => (
            Decision::Open,
            Some(format!(
                "ignoring openPullRequest=`{}` (expected true or false)",
                job_field.unwrap_or_default().trim()
            )),
        ),
    }
}

/// The title: the prompt's first non-blank line, bounded; `Repobox job {id}` without one.
pub fn title(prompt: &str, job_id: &str) -> String {
    match prompt.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => bounded(line, MAX_TITLE_CHARS),
        None => format!("Repobox job {job_id}"),
    }
}

/// `text` cut to `max` characters, the last being `…` when cut.
fn bounded(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// One changed path of the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedFile {
    /// `A` added, `M` modified, `D` deleted, `T` type changed.
    pub status: char,
    /// The path in the repository.
    pub path: String,
}

/// Parses `git diff-tree -z --name-status` output (`S\0path\0` pairs). Odd or empty input
/// yields what could be read.
pub fn parse_name_status(raw: &[u8]) -> Vec<ChangedFile> {
    let mut out = Vec::new();
    let mut fields = raw.split(|b| *b == 0).filter(|f| !f.is_empty());
    while let (Some(status), Some(path)) = (fields.next(), fields.next()) {
        out.push(ChangedFile {
            status: status.first().map(|b| char::from(*b)).unwrap_or('?'),
            path: String::from_utf8_lossy(path).into_owned(),
        });
    }
    out
}

/// The body: the prompt (bounded), what changed (files, commit) and the job id.
pub fn body(prompt: &str, job_id: &str, commit: &str, files: &[ChangedFile]) -> String {
    let mut b = String::new();
    let prompt = prompt.trim();
    if !prompt.is_empty() {
        b.push_str(&bounded(prompt, MAX_PROMPT_CHARS));
        b.push_str("\n\n---\n\n");
    }
    b.push_str(&format!(
        "**Changes** in commit {commit}: {} file{}\n\n",
        files.len(),
        if files.len() == 1 { "" } else { "s" }
    ));
    for f in files.iter().take(MAX_FILES_LISTED) {
        let what = match f.status {
            'A' => "added",
            'D' => "deleted",
            'M' => "modified",
            'T' => "type changed",
            _ => "changed",
        };
        // Backticks in a path would end the code span early; show them as quotes.
        b.push_str(&format!("- {what} `{}`\n", f.path.replace('`', "'")));
    }
    if files.len() > MAX_FILES_LISTED {
        b.push_str(&format!(
            "- … and {} more\n",
            files.len() - MAX_FILES_LISTED
        ));
    }
    b.push_str(&format!("\nOpened by Repobox for job `{job_id}`.\n"));
    b
}

/// Whether a failed call is worth repeating: the forge was unreachable (`None`), overloaded or
/// rate limited. A repeated create is safe: a duplicate is refused as "already exists" and the
/// existing request is then found.
pub fn retryable(status: Option<u16>) -> bool {
    matches!(status, None | Some(429 | 502 | 503 | 504))
}

/// The readable part of a forge's error body: GitHub's `message` and `errors[]`, GitLab's
/// `message` (a string, a list, or a map of field → messages) or `error`. Bounded.
pub fn forge_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut parts: Vec<String> = Vec::new();
    fn collect(v: &serde_json::Value, prefix: &str, parts: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => parts.push(format!("{prefix}{s}")),
            serde_json::Value::Array(items) => {
                for i in items {
                    collect(i, prefix, parts);
                }
            }
            serde_json::Value::Object(map) => {
                // A GitHub error object: its message, else its code and field.
                if let Some(m) = map.get("message").and_then(|m| m.as_str()) {
                    parts.push(format!("{prefix}{m}"));
                } else if let Some(code) = map.get("code").and_then(|c| c.as_str()) {
                    let field = map.get("field").and_then(|f| f.as_str()).unwrap_or("");
                    parts.push(format!("{prefix}{field} {code}").trim().to_owned());
                } else {
                    // A GitLab map of field → messages.
                    for (k, v) in map {
                        collect(v, &format!("{prefix}{k} "), parts);
                    }
                }
            }
            _ => {}
        }
    }
    for key in ["message", "error", "errors"] {
        if let Some(x) = v.get(key) {
            collect(x, "", &mut parts);
        }
    }
    parts.retain(|p| !p.trim().is_empty());
    parts.dedup();
    if parts.is_empty() {
        None
    } else {
        Some(bounded(&parts.join("; "), 300))
    }
}

/// A refused create: GitHub's 422 and GitLab's 409 "already exists" mean the request is there.
pub fn already_exists(status: u16, message: Option<&str>) -> bool {
    matches!(status, 409 | 422)
        && message.is_some_and(|m| m.to_ascii_lowercase().contains("already exists"))
}

/// The one-line explanation of an API answer `status`, for `prError`.
pub fn explain(kind: Kind, project: &str, status: u16, message: Option<&str>) -> String {
    let name = kind.name();
    let said = message.map(|m| format!(": {m}")).unwrap_or_default();
    match status {
        401 => format!(
            "the {name} API refused the token ({status}{said}); it may be expired, revoked or not valid for the API"
        ),
        403 | 429 if message.is_some_and(|m| m.to_ascii_lowercase().contains("rate limit")) => {
            format!("the {name} API rate limit was reached ({status}{said})")
        }
        403 => format!(
            "the token may not open a {} in {project} ({status}{said})",
            kind.request_name()
        ),
        404 => format!(
            "{project} was not found through the {name} API ({status}{said}); the token may lack the API scope"
        ),
        409 | 422 => format!(
            "{name} refused the {} ({status}{said})",
            kind.request_name()
        ),
        300..=399 => format!(
            "the {name} API answered with a redirect ({status}) to another place; not followed"
        ),
        _ => format!("the {name} API answered {status}{said}"),
    }
}

/// The next page from a `Link` header (`<url>; rel="next"`), if any.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim().to_ascii_lowercase();
            p == "rel=\"next\"" || p == "rel=next"
        });
        let url = url.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| url.to_owned())
    })
}

/// Whether `next` may be fetched with the token: same scheme, host and port as the API, and
/// under its path.
pub fn same_origin(api: &Url, next: &Url) -> bool {
    api.scheme() == next.scheme()
        && api.host_str() == next.host_str()
        && api.port_or_known_default() == next.port_or_known_default()
        && next.path().starts_with(api.path().trim_end_matches('/'))
}

/// A request the runner opened or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// GitHub `number` or GitLab `iid`: recorded as `prNumber`.
    pub number: u64,
    /// Its web URL: recorded as `prUrl`.
    pub url: String,
    /// Found already open for the head branch rather than created now.
    pub existing: bool,
    /// The branch it merges into.
    pub base: String,
}

/// An open request as either forge lists it, reduced to what the runner compares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    number: u64,
    url: String,
    head: String,
    base: String,
    /// The head is in the same project (not a fork with a same-named branch).
    same_project: bool,
}

#[derive(Deserialize)]
struct GhRepo {
    default_branch: Option<String>,
}

#[derive(Deserialize)]
struct GhRef {
    #[serde(rename = "ref")]
    name: String,
    repo: Option<GhRefRepo>,
}

#[derive(Deserialize)]
struct GhRefRepo {
    full_name: Option<String>,
}

#[derive(Deserialize)]
struct GhPull {
    number: u64,
    html_url: String,
    head: GhRef,
    base: GhRef,
}

#[derive(Deserialize)]
struct GlProject {
    default_branch: Option<String>,
}

#[derive(Deserialize)]
struct GlMerge {
    iid: u64,
    web_url: String,
    source_branch: String,
    target_branch: String,
    source_project_id: Option<u64>,
    project_id: Option<u64>,
}

/// Of the open requests for the head branch, the one into `base`, else the first: a request the
/// user retargeted is still this branch's request, and a second one would be noise.
fn pick(listed: &[Listed], head: &str, base: Option<&str>) -> Option<Listed> {
    let mine: Vec<&Listed> = listed
        .iter()
        .filter(|l| l.head == head && l.same_project)
        .collect();
    mine.iter()
        .find(|l| Some(l.base.as_str()) == base)
        .or_else(|| mine.first())
        .map(|l| (*l).clone())
}

/// A call's answer: status, headers, body (bounded).
struct Answer {
    status: u16,
    link: Option<String>,
    body: Vec<u8>,
}

/// The API client of one job: the token goes only to [`Target::api`]'s origin.
pub struct Client {
    http: reqwest::Client,
    target: Target,
    auth: (header::HeaderName, HeaderValue),
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `target`, authenticating with `token` (GitHub: `Authorization: Bearer`;
    /// GitLab: `PRIVATE-TOKEN`), trusting `ca_file` alone when given, else the system roots.
    pub fn new(target: Target, token: &Token, ca_file: Option<&Path>) -> Result<Self> {
        let roots: Vec<reqwest::Certificate> = match ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::Forge(format!("cannot read the CA bundle {}: {e}", path.display()))
                })?;
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    Error::Forge(format!("cannot read the CA bundle {}: {e}", path.display()))
                })?
            }
            None => rustls_native_certs::load_native_certs()
                .certs
                .into_iter()
                .filter_map(|c| reqwest::Certificate::from_der(c.as_ref()).ok())
                .collect(),
        };
        let origin = target.api.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() < 5 && same_origin(&origin, attempt.url()) {
                attempt.follow()
            } else {
                attempt.stop()
            }
        });
        let mut headers = HeaderMap::new();
        match target.kind {
            Kind::GitHub => {
                headers.insert(
                    header::ACCEPT,
                    HeaderValue::from_static("application/vnd.github+json"),
                );
                headers.insert(
                    "x-github-api-version",
                    HeaderValue::from_static("2022-11-28"),
                );
            }
            Kind::GitLab => {
                headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            }
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("repobox-job-runner/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .tls_certs_only(roots)
            .redirect(redirects)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| Error::Forge(format!("cannot set up the API client: {e}")))?;
        let auth = match target.kind {
            Kind::GitHub => (
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {}", token.expose())),
            ),
            Kind::GitLab => (
                header::HeaderName::from_static("private-token"),
                HeaderValue::from_str(token.expose()),
            ),
        };
        let (name, value) = (auth.0, auth.1);
        let mut value =
            value.map_err(|_| Error::Forge("the token is not valid in an HTTP header".into()))?;
        value.set_sensitive(true);
        Ok(Self {
            http,
            target,
            auth: (name, value),
        })
    }

    /// Where the client sends its requests.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// `{api}/{segments...}`; each segment is percent-encoded on its own (a GitLab project
    /// path becomes one `group%2Fproject` segment).
    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.target.api.clone();
        if let Ok(mut path) = u.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        u
    }

    /// One call with retries; the answer whatever its status, or why there was none.
    async fn call(
        &self,
        method: reqwest::Method,
        url: &Url,
        json: Option<&serde_json::Value>,
    ) -> Result<Answer> {
        let mut delay = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .header(self.auth.0.clone(), self.auth.1.clone());
            if let Some(body) = json {
                req = req
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(serde_json::to_vec(body).unwrap_or_default());
            }
            let result = match req.send().await {
                Ok(resp) => read_answer(resp).await,
                Err(e) => Err(transport(self.target.kind, url, &e)),
            };
            let status = result.as_ref().ok().map(|a| a.status);
            let again = attempt < ATTEMPTS
                && match &result {
                    Ok(a) => retryable(Some(a.status)),
                    Err(_) => retryable(None),
                };
            if !again {
                return result;
            }
            tracing::warn!(attempt, status, url = %url, "forge API call failed, retrying");
            tokio::time::sleep(delay).await;
            delay *= 2;
            attempt += 1;
        }
    }

    /// Fails with the explanation unless `answer` has status `want`.
    fn expect(&self, answer: &Answer, want: u16) -> Result<()> {
        if answer.status == want {
            return Ok(());
        }
        let msg = forge_message(&answer.body);
        Err(Error::Forge(explain(
            self.target.kind,
            &self.target.project,
            answer.status,
            msg.as_deref(),
        )))
    }

    fn parse<T: for<'de> Deserialize<'de>>(&self, answer: &Answer) -> Result<T> {
        serde_json::from_slice(&answer.body).map_err(|e| {
            Error::Forge(format!(
                "the {} API answered something unexpected: {e}",
                self.target.kind.name()
            ))
        })
    }

    /// The repository's default branch.
    async fn default_branch(&self) -> Result<String> {
        let url = match self.target.kind {
            Kind::GitHub => {
                let (owner, repo) = self.owner_repo();
                self.url(&["repos", owner, repo])
            }
            Kind::GitLab => self.url(&["projects", &self.target.project]),
        };
        let answer = self.call(reqwest::Method::GET, &url, None).await?;
        self.expect(&answer, 200)?;
        let branch = match self.target.kind {
            Kind::GitHub => self.parse::<GhRepo>(&answer)?.default_branch,
            Kind::GitLab => self.parse::<GlProject>(&answer)?.default_branch,
        };
        branch.filter(|b| !b.is_empty()).ok_or_else(|| {
            Error::Forge(format!(
                "{} has no default branch to open a {} into",
                self.target.project,
                self.target.kind.request_name()
            ))
        })
    }

    fn owner_repo(&self) -> (&str, &str) {
        self.target
            .project
            .split_once('/')
            .unwrap_or((self.target.project.as_str(), ""))
    }

    /// The open requests whose head is `head`, every page (same origin only).
    async fn list_open(&self, head: &str) -> Result<Vec<Listed>> {
        let mut url = match self.target.kind {
            Kind::GitHub => {
                let (owner, repo) = self.owner_repo();
                let mut u = self.url(&["repos", owner, repo, "pulls"]);
                u.query_pairs_mut()
                    .append_pair("state", "open")
                    .append_pair("head", &format!("{owner}:{head}"))
                    .append_pair("per_page", "100");
                u
            }
            Kind::GitLab => {
                let mut u = self.url(&["projects", &self.target.project, "merge_requests"]);
                u.query_pairs_mut()
                    .append_pair("state", "opened")
                    .append_pair("source_branch", head)
                    .append_pair("per_page", "100");
                u
            }
        };
        let mut all = Vec::new();
        for _ in 0..MAX_PAGES {
            let answer = self.call(reqwest::Method::GET, &url, None).await?;
            self.expect(&answer, 200)?;
            match self.target.kind {
                Kind::GitHub => {
                    for p in self.parse::<Vec<GhPull>>(&answer)? {
                        let same_project = p
                            .head
                            .repo
                            .as_ref()
                            .and_then(|r| r.full_name.as_deref())
                            .is_none_or(|n| n.eq_ignore_ascii_case(&self.target.project));
                        all.push(Listed {
                            number: p.number,
                            url: p.html_url,
                            head: p.head.name,
                            base: p.base.name,
                            same_project,
                        });
                    }
                }
                Kind::GitLab => {
                    for m in self.parse::<Vec<GlMerge>>(&answer)? {
                        all.push(Listed {
                            number: m.iid,
                            url: m.web_url,
                            head: m.source_branch,
                            base: m.target_branch,
                            same_project: m.source_project_id == m.project_id,
                        });
                    }
                }
            }
            let Some(next) = answer.link.as_deref().and_then(next_link) else {
                return Ok(all);
            };
            let next = Url::parse(&next).map_err(|_| {
                Error::Forge(format!(
                    "the {} API sent an unreadable pagination link",
                    self.target.kind.name()
                ))
            })?;
            if !same_origin(&self.target.api, &next) {
                return Err(Error::Forge(format!(
                    "the {} API sent a pagination link to another host ({}); not followed",
                    self.target.kind.name(),
                    next.host_str().unwrap_or("?")
                )));
            }
            url = next;
        }
        Ok(all)
    }

    /// Creates the request; `Ok(None)` when the forge says it already exists.
    async fn create(
        &self,
        head: &str,
        base: &str,
        title: &str,
        body: &str,
    ) -> Result<Option<Opened>> {
        let (url, payload) = match self.target.kind {
            Kind::GitHub => {
                let (owner, repo) = self.owner_repo();
                (
                    self.url(&["repos", owner, repo, "pulls"]),
                    serde_json::json!({"title": title, "head": head, "base": base, "body": body}),
                )
            }
            Kind::GitLab => (
                self.url(&["projects", &self.target.project, "merge_requests"]),
                serde_json::json!({
                    "source_branch": head, "target_branch": base,
                    "title": title, "description": body,
                }),
            ),
        };
        let answer = self
            .call(reqwest::Method::POST, &url, Some(&payload))
            .await?;
        if answer.status != 201 {
            let msg = forge_message(&answer.body);
            if already_exists(answer.status, msg.as_deref()) {
                return Ok(None);
            }
            self.expect(&answer, 201)?;
        }
        let (number, url) = match self.target.kind {
            Kind::GitHub => {
                let p = self.parse::<GhPull>(&answer)?;
                (p.number, p.html_url)
            }
            Kind::GitLab => {
                let m = self.parse::<GlMerge>(&answer)?;
                (m.iid, m.web_url)
            }
        };
        Ok(Some(Opened {
            number,
            url,
            existing: false,
            base: base.to_owned(),
        }))
    }

    /// Finds the open request for `head` (preferring one into `base`; the default branch when
    /// `None`), else opens one into `base`.
    pub async fn open(
        &self,
        head: &str,
        base: Option<&str>,
        title: &str,
        body: &str,
    ) -> Result<Opened> {
        let found = |l: Listed| Opened {
            number: l.number,
            url: l.url,
            existing: true,
            base: l.base,
        };
        let base = match base {
            Some(b) => b.to_owned(),
            None => self.default_branch().await?,
        };
        if let Some(l) = pick(&self.list_open(head).await?, head, Some(&base)) {
            return Ok(found(l));
        }
        if let Some(opened) = self.create(head, &base, title, body).await? {
            return Ok(opened);
        }
        // Created meanwhile (an earlier attempt whose answer was lost, another runner).
        pick(&self.list_open(head).await?, head, Some(&base))
            .map(found)
            .ok_or_else(|| {
                Error::Forge(format!(
                    "{} says a {} for {head} already exists, but lists none open",
                    self.target.kind.name(),
                    self.target.kind.request_name()
                ))
            })
    }
}

async fn read_answer(resp: reqwest::Response) -> Result<Answer> {
    let status = resp.status().as_u16();
    let link = resp
        .headers()
        .get(header::LINK)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let url = resp.url().clone();
    let mut resp = resp;
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(Error::Forge(format!(
                        "the answer from {} is larger than {MAX_RESPONSE_BYTES} bytes",
                        url.host_str().unwrap_or("the forge")
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(Error::Forge(format!("reading the answer failed: {e}"))),
        }
    }
    Ok(Answer { status, link, body })
}

/// A transport failure, said without the URL's query (it never holds the token anyway).
fn transport(kind: Kind, url: &Url, e: &reqwest::Error) -> Error {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    let origin = url.origin().ascii_serialization();
    Error::Forge(format!(
        "cannot reach the {} API at {origin}: {what}{}",
        kind.name(),
        if cause.is_empty() {
            String::new()
        } else {
            format!(" ({cause})")
        }
    ))
}

/// What the step needs from the job.
pub struct AfterPush<'a> {
    /// `OPEN_PULL_REQUESTS`: the installation's switch.
    pub enabled: bool,
    /// The job's `openPullRequest` field, as written.
    pub job_field: Option<&'a str>,
    /// The provider's `type`.
    pub provider_kind: Option<&'a str>,
    /// The provider's `baseUrl`.
    pub provider_base_url: Option<&'a str>,
    /// The cleaned repository URL (it names the project).
    pub repo: &'a RepoUrl,
    /// The provider's token, for the API.
    pub token: &'a Token,
    /// `GIT_SSL_CAINFO`: the git host's CA serves its API too.
    pub ca_file: Option<&'a Path>,
    /// Named in the request's body (and its title when the prompt has none).
    pub job_id: &'a str,
    /// The job's prompt: the request's title and body.
    pub prompt: &'a str,
    /// The pushed branch.
    pub head: &'a str,
    /// The job's `baseBranch`; `None`: the repository's default branch.
    pub base: Option<&'a str>,
    /// The pushed commit.
    pub commit: &'a str,
    /// What the commit changed, listed in the body.
    pub files: &'a [ChangedFile],
}

/// Opens or finds the request after a push and says so in the output; the fields to record.
/// Never fails: an error becomes `prError` (masked), and a stop request ends the step.
pub async fn after_push(
    step: &AfterPush<'_>,
    out: &OutputHandle,
    masker: &Masker,
    cancel: &CancellationToken,
) -> PullRequestFields {
    let (decision, warning) = decide(step.enabled, step.job_field);
    if let Some(w) = warning {
        out.note(&w).await;
    }
    if let Decision::Skip(why) = decision {
        out.note(&format!("No pull request: {why}")).await;
        return PullRequestFields::default();
    }
    let result = async {
        let target = target(step.provider_kind, step.provider_base_url, step.repo)?;
        let client = Client::new(target, step.token, step.ca_file)?;
        let kind = client.target().kind;
        let title = title(step.prompt, step.job_id);
        let body = masker
            .mask(&body(step.prompt, step.job_id, step.commit, step.files))
            .into_owned();
        let title = masker.mask(&title).into_owned();
        out.note(&format!(
            "Opening a {} for {} into {}",
            kind.request_name(),
            step.head,
            step.base.unwrap_or("the default branch")
        ))
        .await;
        tokio::select! {
            r = tokio::time::timeout(STEP_TIMEOUT, client.open(step.head, step.base, &title, &body)) => match r {
                Ok(r) => r.map(|o| (kind, o)),
                Err(_) => Err(Error::Forge(format!(
                    "the {} API did not finish within {} s", kind.name(), STEP_TIMEOUT.as_secs()
                ))),
            },
            _ = cancel.cancelled() => Err(Error::Forge(format!(
                "stopped before the {} was opened", kind.request_name()
            ))),
        }
    }
    .await;
    match result {
        Ok((kind, o)) => {
            let verb = if o.existing {
                "Found the open"
            } else {
                "Opened"
            };
            out.note(&format!(
                "{verb} {} {}{} into {}: {}",
                kind.request_name(),
                kind.sigil(),
                o.number,
                o.base,
                o.url
            ))
            .await;
            PullRequestFields {
                url: Some(o.url),
                number: Some(o.number),
                error: None,
            }
        }
        Err(e) => {
            let msg = masker.mask(&e.to_string()).into_owned();
            let kind = match step.provider_kind.map(str::trim) {
                Some(k) if k.eq_ignore_ascii_case("gitlab") => Kind::GitLab,
                _ => Kind::GitHub,
            };
            out.note(&format!(
                "Could not open a {} (the branch is pushed): {msg}",
                kind.request_name()
            ))
            .await;
            PullRequestFields {
                url: None,
                number: None,
                error: Some(msg),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(u: &str) -> RepoUrl {
        RepoUrl::parse(u, true).unwrap()
    }

    fn t(kind: Option<&str>, base: Option<&str>, u: &str) -> Result<Target> {
        target(kind, base, &repo(u))
    }

    #[test]
    fn github_dot_com_is_served_by_api_github_com() {
        for base in [
            None,
            Some(""),
            Some("https://github.com"),
            Some("https://api.github.com/"),
        ] {
            let tg = t(Some("github"), base, "https://github.com/acme/api.git").unwrap();
            assert_eq!(tg.kind, Kind::GitHub);
            assert_eq!(tg.api.as_str(), "https://api.github.com/", "{base:?}");
            assert_eq!(tg.project, "acme/api");
        }
        // A missing type is GitHub, as everywhere else.
        assert_eq!(
            t(None, None, "https://github.com/acme/api")
                .unwrap()
                .project,
            "acme/api"
        );
    }

    #[test]
    fn enterprise_and_self_hosted_apis_live_on_the_git_host() {
        let tg = t(
            Some("github"),
            Some("https://ghe.example.com/"),
            "https://ghe.example.com/acme/api.git",
        )
        .unwrap();
        assert_eq!(tg.api.as_str(), "https://ghe.example.com/api/v3");
        let tg = t(
            Some("GitLab"),
            Some("https://gitlab.example.com"),
            "https://gitlab.example.com/group/sub/proj.git",
        )
        .unwrap();
        assert_eq!(tg.kind, Kind::GitLab);
        assert_eq!(tg.api.as_str(), "https://gitlab.example.com/api/v4");
        assert_eq!(tg.project, "group/sub/proj");
        assert_eq!(
            t(Some("gitlab"), None, "https://gitlab.com/a/b.git")
                .unwrap()
                .api
                .as_str(),
            "https://gitlab.com/api/v4"
        );
        // A port and plain http (ALLOW_INSECURE_HTTP) carry over from the repository URL.
        let tg = t(
            Some("gitlab"),
            Some("http://127.0.0.1:8080"),
            "http://127.0.0.1:8080/a/b.git",
        )
        .unwrap();
        assert_eq!(tg.api.as_str(), "http://127.0.0.1:8080/api/v4");
        // A relative URL root prefixes both.
        let tg = t(
            Some("gitlab"),
            Some("https://example.com/gitlab/"),
            "https://example.com/gitlab/g/p.git",
        )
        .unwrap();
        assert_eq!(tg.api.as_str(), "https://example.com/gitlab/api/v4");
        assert_eq!(tg.project, "g/p");
        // GitHub Enterprise named by its api. host: the API on the web host, like git.
        let tg = t(
            Some("github"),
            Some("https://api.ghe.example.com"),
            "https://ghe.example.com/o/r",
        )
        .unwrap();
        assert_eq!(tg.api.as_str(), "https://ghe.example.com/api/v3");
    }

    #[test]
    fn the_api_is_never_on_another_host_than_the_repository() {
        // What the runner already refuses before decrypting, refused here too.
        assert!(t(Some("github"), None, "https://evil.example/acme/api.git").is_err());
        assert!(
            t(
                Some("gitlab"),
                Some("https://gitlab.example.com"),
                "https://gitlab.example.com.evil/a/b.git"
            )
            .is_err()
        );
        assert!(t(Some("bitbucket"), None, "https://bitbucket.org/a/b.git").is_err());
        // Whatever the inputs, the API's host is the repository's (or api.github.com).
        for (k, b, u) in [
            (
                Some("github"),
                Some("http://127.0.0.1:9"),
                "http://127.0.0.1:9/a/b.git",
            ),
            (
                Some("gitlab"),
                Some("https://g.example"),
                "https://g.example/a/b/c",
            ),
            (Some("github"), None, "https://github.com/a/b"),
        ] {
            let tg = t(k, b, u).unwrap();
            let r = Url::parse(u).unwrap();
            let ok = tg.api.host_str() == r.host_str() && tg.api.port() == r.port()
                || tg.api.as_str() == "https://api.github.com/";
            assert!(ok, "{u} → {}", tg.api);
        }
    }

    #[test]
    fn project_paths_must_have_the_forge_s_shape() {
        for bad in [
            "https://github.com/acme.git",
            "https://github.com/a/b/c.git",
            "https://github.com/",
            "https://github.com/a//b",
        ] {
            let e = t(Some("github"), None, bad).unwrap_err().to_string();
            assert!(e.contains("owner/repository"), "{bad}: {e}");
        }
        assert!(t(Some("gitlab"), None, "https://gitlab.com/solo.git").is_err());
        assert!(
            t(
                Some("gitlab"),
                Some("https://example.com/gitlab"),
                "https://example.com/other/g/p.git"
            )
            .is_err()
        );
        assert_eq!(
            t(Some("github"), None, "https://github.com/acme/api/")
                .unwrap()
                .project,
            "acme/api"
        );
    }

    #[test]
    fn decisions_cover_every_combination() {
        use Decision::*;
        for field in [None, Some("true"), Some("false"), Some("garbage")] {
            assert!(matches!(decide(false, field), (Skip(_), None)), "{field:?}");
        }
        for on in [
            None,
            Some(""),
            Some(" "),
            Some("true"),
            Some("TRUE"),
            Some("1"),
            Some("yes"),
            Some("on"),
        ] {
            assert_eq!(decide(true, on), (Open, None), "{on:?}");
        }
        for off in [
            Some("false"),
            Some(" False "),
            Some("0"),
            Some("no"),
            Some("off"),
        ] {
            assert!(
                matches!(decide(true, off), (Skip(r), None) if r.contains("this job")),
                "{off:?}"
            );
        }
        let (d, w) = decide(true, Some("maybe"));
        assert_eq!(d, Open);
        assert!(w.unwrap().contains("`maybe`"));
    }

    #[test]
    fn titles_are_the_first_line_bounded() {
        assert_eq!(title("Fix the bug\n\nDetails", "j1"), "Fix the bug");
        assert_eq!(title("\n\n   Indented first   \nx", "j1"), "Indented first");
        assert_eq!(title("", "j1"), "Repobox job j1");
        assert_eq!(title(" \n\t\n", "j1"), "Repobox job j1");
        let long = "é".repeat(300);
        let tt = title(&long, "j");
        assert_eq!(tt.chars().count(), MAX_TITLE_CHARS);
        assert!(tt.ends_with('…'));
        assert_eq!(
            title(&"x".repeat(MAX_TITLE_CHARS), "j").chars().count(),
            MAX_TITLE_CHARS
        );
    }

    #[test]
    fn bodies_hold_prompt_changes_and_job() {
        let files = parse_name_status(b"A\0new.md\0M\0src/lib.rs\0D\0old`name\0");
        assert_eq!(
            files,
            [
                ChangedFile {
                    status: 'A',
                    path: "new.md".into()
                },
                ChangedFile {
                    status: 'M',
                    path: "src/lib.rs".into()
                },
                ChangedFile {
                    status: 'D',
                    path: "old`name".into()
                },
            ]
        );
        let b = body("Do it\nplease", "job-9", "abc123", &files);
        assert!(b.starts_with("Do it\nplease\n\n---\n\n"), "{b}");
        assert!(b.contains("commit abc123: 3 files"), "{b}");
        assert!(
            b.contains("- added `new.md`\n- modified `src/lib.rs`\n- deleted `old'name`\n"),
            "{b}"
        );
        assert!(b.ends_with("Opened by Repobox for job `job-9`.\n"), "{b}");
        // No prompt: no empty section; one file: singular.
        let b = body("  ", "j", "s", &files[..1]);
        assert!(b.starts_with("**Changes** in commit s: 1 file\n"), "{b}");
        // Bounded: a huge prompt and many files.
        let many: Vec<ChangedFile> = (0..120)
            .map(|i| ChangedFile {
                status: 'A',
                path: format!("f{i}"),
            })
            .collect();
        let b = body(&"p".repeat(100_000), "j", "s", &many);
        assert!(b.contains("- … and 70 more\n"));
        assert!(b.chars().count() < MAX_PROMPT_CHARS + 2_000);
        assert!(!b.contains("`f50`"));
    }

    #[test]
    fn name_status_parsing_tolerates_odd_input() {
        assert!(parse_name_status(b"").is_empty());
        assert!(parse_name_status(b"A\0").is_empty());
        assert_eq!(parse_name_status(b"T\0l\0X").len(), 1);
        assert_eq!(
            parse_name_status(b"M\0\xff\xfe\0")[0].path,
            "\u{fffd}\u{fffd}"
        );
    }

    #[test]
    fn retry_only_what_may_pass_next_time() {
        for s in [None, Some(429), Some(502), Some(503), Some(504)] {
            assert!(retryable(s), "{s:?}");
        }
        for s in [200, 201, 301, 400, 401, 403, 404, 409, 422, 500] {
            assert!(!retryable(Some(s)), "{s}");
        }
    }

    #[test]
    fn forge_messages_in_every_documented_shape() {
        // GitHub 422 with an error object, and with a string error.
        let gh = br#"{"message":"Validation Failed","errors":[{"resource":"PullRequest","code":"custom","message":"A pull request already exists for acme:repobox/a1b2c3d4."}],"documentation_url":"x"}"#;
        assert_eq!(
            forge_message(gh).unwrap(),
            "Validation Failed; A pull request already exists for acme:repobox/a1b2c3d4."
        );
        let gh2 = br#"{"message":"Validation Failed","errors":[{"resource":"PullRequest","field":"base","code":"invalid"}]}"#;
        assert_eq!(
            forge_message(gh2).unwrap(),
            "Validation Failed; base invalid"
        );
        assert_eq!(
            forge_message(br#"{"message":"Bad credentials"}"#).unwrap(),
            "Bad credentials"
        );
        // GitLab: a list, a map, `error`.
        let gl = br#"{"message":["Another open merge request already exists for this source branch: !4"]}"#;
        assert_eq!(
            forge_message(gl).unwrap(),
            "Another open merge request already exists for this source branch: !4"
        );
        let gl2 = br#"{"message":{"title":["can't be blank"]}}"#;
        assert_eq!(forge_message(gl2).unwrap(), "title can't be blank");
        assert_eq!(
            forge_message(br#"{"error":"title is missing"}"#).unwrap(),
            "title is missing"
        );
        // Not JSON, or nothing readable.
        assert_eq!(forge_message(b"<html>502</html>"), None);
        assert_eq!(forge_message(b"{}"), None);
        let long = format!(r#"{{"message":"{}"}}"#, "m".repeat(1000));
        assert_eq!(forge_message(long.as_bytes()).unwrap().chars().count(), 300);
    }

    #[test]
    fn already_exists_is_recognised_on_both_forges() {
        assert!(already_exists(
            422,
            Some("Validation Failed; A pull request already exists for a:b.")
        ));
        assert!(already_exists(
            409,
            Some("Another open merge request already exists for this source branch: !4")
        ));
        assert!(!already_exists(
            422,
            Some("Validation Failed; No commits between main and x")
        ));
        assert!(!already_exists(422, None));
        assert!(!already_exists(400, Some("already exists")));
    }

    #[test]
    fn explanations_name_the_cause() {
        let e = explain(Kind::GitHub, "acme/api", 401, Some("Bad credentials"));
        assert!(
            e.contains("refused the token (401: Bad credentials)"),
            "{e}"
        );
        let e = explain(Kind::GitLab, "g/p", 403, Some("403 Forbidden"));
        assert!(e.contains("may not open a merge request in g/p"), "{e}");
        let e = explain(
            Kind::GitHub,
            "a/b",
            403,
            Some("API rate limit exceeded for user"),
        );
        assert!(e.contains("rate limit"), "{e}");
        let e = explain(Kind::GitHub, "a/b", 429, Some("secondary rate limit"));
        assert!(e.contains("rate limit"), "{e}");
        let e = explain(Kind::GitLab, "g/p", 404, Some("404 Project Not Found"));
        assert!(
            e.starts_with("g/p was not found through the GitLab API"),
            "{e}"
        );
        let e = explain(
            Kind::GitHub,
            "a/b",
            422,
            Some("Validation Failed; No commits"),
        );
        assert_eq!(
            e,
            "GitHub refused the pull request (422: Validation Failed; No commits)"
        );
        let e = explain(Kind::GitHub, "a/b", 302, None);
        assert!(e.contains("redirect"), "{e}");
        assert_eq!(
            explain(Kind::GitLab, "g/p", 500, None),
            "the GitLab API answered 500"
        );
    }

    #[test]
    fn link_headers_and_origins() {
        let gh = r#"<https://api.github.com/repositories/1/pulls?page=2>; rel="next", <https://api.github.com/repositories/1/pulls?page=5>; rel="last""#;
        assert_eq!(
            next_link(gh).as_deref(),
            Some("https://api.github.com/repositories/1/pulls?page=2")
        );
        let last_only = r#"<https://x/a?page=1>; rel="first", <https://x/a?page=3>; rel="last""#;
        assert_eq!(next_link(last_only), None);
        assert_eq!(next_link(""), None);
        assert_eq!(next_link("garbage"), None);
        assert_eq!(next_link("<u>;rel=next").as_deref(), Some("u"));

        let api = Url::parse("https://gitlab.example.com/api/v4").unwrap();
        let ok = Url::parse("https://gitlab.example.com/api/v4/projects/1/merge_requests?page=2")
            .unwrap();
        assert!(same_origin(&api, &ok));
        for bad in [
            "http://gitlab.example.com/api/v4/x",
            "https://gitlab.example.com:8443/api/v4/x",
            "https://evil.example/api/v4/x",
            "https://gitlab.example.com/other",
        ] {
            assert!(!same_origin(&api, &Url::parse(bad).unwrap()), "{bad}");
        }
        let gh = Url::parse("https://api.github.com/").unwrap();
        assert!(same_origin(
            &gh,
            &Url::parse("https://api.github.com:443/repositories/1").unwrap()
        ));
    }

    #[test]
    fn picking_prefers_the_base_then_any_open_request_of_the_branch() {
        let l = |n: u64, head: &str, base: &str, same: bool| Listed {
            number: n,
            url: format!("u{n}"),
            head: head.into(),
            base: base.into(),
            same_project: same,
        };
        let listed = [
            l(1, "repobox/x", "dev", false),
            l(2, "other", "main", true),
            l(3, "repobox/x", "release", true),
            l(4, "repobox/x", "main", true),
        ];
        assert_eq!(pick(&listed, "repobox/x", Some("main")).unwrap().number, 4);
        assert_eq!(pick(&listed, "repobox/x", Some("dev")).unwrap().number, 3);
        assert_eq!(pick(&listed, "repobox/x", None).unwrap().number, 3);
        assert_eq!(pick(&listed, "repobox/y", None), None);
        assert_eq!(pick(&[], "repobox/x", Some("main")), None);
    }

    #[test]
    fn gitlab_project_paths_are_one_encoded_segment() {
        repobox_contract::install_tls_provider();
        let tg = t(
            Some("gitlab"),
            Some("https://g.example"),
            "https://g.example/grp/sub/p.git",
        )
        .unwrap();
        let c = Client::new(tg, &Token::new("glpat-0123456789abcdef".into()), None).unwrap();
        assert_eq!(
            c.url(&["projects", "grp/sub/p", "merge_requests"]).as_str(),
            "https://g.example/api/v4/projects/grp%2Fsub%2Fp/merge_requests"
        );
        assert!(!format!("{c:?}").contains("glpat-0123456789abcdef"));
    }

    #[test]
    fn an_unreadable_ca_bundle_is_a_clear_error() {
        repobox_contract::install_tls_provider();
        let tg = t(Some("github"), None, "https://github.com/a/b").unwrap();
        let e = Client::new(
            tg,
            &Token::new("x".into()),
            Some(Path::new("/nonexistent/ca.pem")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot read the CA bundle /nonexistent/ca.pem"),
            "{e}"
        );
    }
}
