//! A forge test double: the GitHub and GitLab REST endpoints the runner uses to open a pull /
//! merge request, served by the [`crate::githost::GitHost`] on the same host and port as the
//! repositories (so the runner's "the token only goes to the git host" rule holds in tests as
//! it does for GitHub Enterprise and self-hosted GitLab).
//!
//! Implemented with the documented request and response shapes and status codes:
//!
//! | GitHub (`/api/v3`) | GitLab (`/api/v4`) |
//! | --- | --- |
//! | `GET /repos/{owner}/{repo}` → `default_branch` | `GET /projects/{id}` (`group%2Fproject`) → `id`, `default_branch` |
//! | `GET /repos/{owner}/{repo}/pulls?state&head=owner:branch&base&per_page&page` | `GET /projects/{id}/merge_requests?state&source_branch&target_branch&per_page&page` |
//! | `POST /repos/{owner}/{repo}/pulls` `{title, head, base, body}` → 201 | `POST /projects/{id}/merge_requests` `{source_branch, target_branch, title, description}` → 201 |
//! | 422 `Validation Failed` + "A pull request already exists for owner:branch." / head or base `invalid` / "No commits between …" | 409 `["Another open merge request already exists for this source branch: !N"]`, 400 `{"error": "title is missing"}` |
//! | 401 `Bad credentials` / `Requires authentication`; 403 without `User-Agent`; 404 `Not Found` | 401 `401 Unauthorized`; 404 `404 Project Not Found` |
//! | auth: `Authorization: Bearer …` (or `token …`) | auth: `PRIVATE-TOKEN: …` (or `Authorization: Bearer …`) |
//!
//! Lists paginate like the real APIs: `per_page` (defaults 30 / 20, at most 100, and at most
//! [`Forge::set_max_per_page`] so tests can force several pages), a `Link` header with
//! `rel="next"` etc., and GitLab's `X-Page` / `X-Next-Page` / `X-Total` headers. Branches and the
//! default branch are read from the git host's bare repositories. Every request is recorded
//! ([`Forge::requests`]) without any header value; [`Forge::fail_next`] injects a failure, before
//! or after the request takes effect (a lost response).
//!
//! Approximations: one user (`repobox-test`), no forks, no drafts, no labels or assignees; only
//! the fields the runner or a test reads are in the objects, plus the usual identifying ones.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::githost::git_env_vars;

/// Which API the double speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeKind {
    GitHub,
    GitLab,
}

impl ForgeKind {
    /// Where the API is mounted on the git host (GitHub Enterprise's and GitLab's paths).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::GitHub => "/api/v3",
            Self::GitLab => "/api/v4",
        }
    }

    /// The provider `type` the web app writes for this forge.
    pub fn provider_type(self) -> &'static str {
        match self {
            Self::GitHub => "github",
            Self::GitLab => "gitlab",
        }
    }
}

/// How a request authenticated, as seen by the double (never the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthScheme {
    None,
    /// `Authorization: Bearer …`
    Bearer,
    /// `Authorization: token …` (GitHub's older form)
    Token,
    /// `PRIVATE-TOKEN: …` (GitLab)
    PrivateToken,
    /// Any other `Authorization` scheme.
    Other,
}

/// One API request, for assertions. Holds no header value and never the token.
#[derive(Debug, Clone, PartialEq)]
pub struct ForgeRequest {
    pub method: String,
    /// The full path as sent, e.g. `/api/v4/projects/acme%2Fapi/merge_requests`.
    pub path: String,
    pub query: Option<String>,
    pub status: u16,
    pub auth: AuthScheme,
    /// Whether the credentials were the right token.
    pub authorized: bool,
    pub user_agent: Option<String>,
    /// The JSON body of a POST.
    pub body: Option<Value>,
}

/// A pull / merge request held by the double.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    /// `owner/repo` or `group/project`.
    pub project: String,
    /// GitHub `number`, GitLab `iid`.
    pub number: u64,
    pub title: String,
    pub body: String,
    pub head: String,
    pub base: String,
    pub open: bool,
}

/// A failure to inject into the next request with a given method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status (with a JSON message) without doing anything.
    Before(u16),
    /// Do the request, then answer this status instead (the client never learns it worked).
    After(u16),
}

#[derive(Default)]
struct Data {
    requests: Vec<ForgeRequest>,
    pulls: Vec<PullRequest>,
    max_per_page: Option<usize>,
    faults: VecDeque<(Method, Fault)>,
}

/// Where the repositories are, set when the git host mounts the double.
struct Attached {
    repos: PathBuf,
    home: PathBuf,
    web: String,
}

struct Inner {
    kind: ForgeKind,
    token: RwLock<String>,
    attached: OnceLock<Attached>,
    data: Mutex<Data>,
}

/// The double's handle; clones share the state.
#[derive(Clone)]
pub struct Forge {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Forge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forge")
            .field("kind", &self.inner.kind)
            .finish_non_exhaustive()
    }
}

impl Forge {
    /// A double that accepts `token`; serve it with [`crate::githost::GitHost::start_with_forge`].
    pub fn new(kind: ForgeKind, token: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                token: RwLock::new(token.to_owned()),
                attached: OnceLock::new(),
                data: Mutex::new(Data::default()),
            }),
        }
    }

    pub fn kind(&self) -> ForgeKind {
        self.inner.kind
    }

    /// Called by the git host: where the bare repositories are and its web URL.
    pub(crate) fn attach(&self, repos: PathBuf, home: PathBuf, web: String) {
        let _ = self.inner.attached.set(Attached { repos, home, web });
    }

    /// The API routes, to nest under [`ForgeKind::prefix`].
    pub(crate) fn router<S>(&self) -> Router<S> {
        Router::new().fallback(handle).with_state(self.clone())
    }

    /// Accept `token` from now on (and no longer the old one).
    pub fn set_token(&self, token: &str) {
        *self
            .inner
            .token
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = token.to_owned();
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.inner
            .data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every API request so far, oldest first.
    pub fn requests(&self) -> Vec<ForgeRequest> {
        self.data().requests.clone()
    }

    /// Every pull / merge request, in creation order.
    pub fn pull_requests(&self) -> Vec<PullRequest> {
        self.data().pulls.clone()
    }

    /// Adds an open request (as if opened earlier by someone or an earlier attempt); its number.
    pub fn seed(&self, project: &str, head: &str, base: &str, title: &str) -> u64 {
        let mut d = self.data();
        let number = next_number(&d.pulls, project);
        d.pulls.push(PullRequest {
            project: project.to_owned(),
            number,
            title: title.to_owned(),
            body: String::new(),
            head: head.to_owned(),
            base: base.to_owned(),
            open: true,
        });
        number
    }

    /// Closes request `number` of `project`.
    pub fn close(&self, project: &str, number: u64) {
        for p in &mut self.data().pulls {
            if p.project == project && p.number == number {
                p.open = false;
            }
        }
    }

    /// Lists return at most `n` items per page, whatever `per_page` asks.
    pub fn set_max_per_page(&self, n: usize) {
        self.data().max_per_page = Some(n.max(1));
    }

    /// The next request with `method` gets `fault`.
    pub fn fail_next(&self, method: &str, fault: Fault) {
        let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        self.data().faults.push_back((method, fault));
    }

    /// The web URL of request `number`, as the API reports it.
    pub fn web_url(&self, project: &str, number: u64) -> String {
        let web = self
            .inner
            .attached
            .get()
            .map(|a| a.web.clone())
            .unwrap_or_default();
        match self.inner.kind {
            ForgeKind::GitHub => format!("{web}/{project}/pull/{number}"),
            ForgeKind::GitLab => format!("{web}/{project}/-/merge_requests/{number}"),
        }
    }
}

fn next_number(pulls: &[PullRequest], project: &str) -> u64 {
    pulls
        .iter()
        .filter(|p| p.project == project)
        .map(|p| p.number)
        .max()
        .unwrap_or(0)
        + 1
}

/// A stable numeric project id (GitLab's `id`), from the path.
fn project_id(project: &str) -> u64 {
    project
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        % 1_000_000
}

/// Percent-decodes one path segment (`acme%2Fapi` → `acme/api`).
fn decode(segment: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: u16, body: Value) -> Response {
    let mut resp = axum::Json(body).into_response();
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

/// What the route needs from the request.
struct Call {
    method: Method,
    /// Path segments after the API prefix, decoded.
    segments: Vec<String>,
    query: Vec<(String, String)>,
    body: Option<Value>,
    /// GitLab also takes form bodies.
    form: Vec<(String, String)>,
}

impl Call {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .chain(self.form.iter())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A field of the JSON body, else of the form body.
    fn field(&self, name: &str) -> Option<String> {
        self.body
            .as_ref()
            .and_then(|b| b.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .or_else(|| {
                self.form
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            })
    }
}

async fn handle(
    State(forge): State<Forge>,
    OriginalUri(uri): OriginalUri,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let kind = forge.inner.kind;
    let (auth, authorized) = check_auth(kind, &headers, &forge.inner.token);
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let json_body: Option<Value> = serde_json::from_slice(&body).ok();
    let form: Vec<(String, String)> = if json_body.is_none() && !body.is_empty() {
        url::form_urlencoded::parse(&body).into_owned().collect()
    } else {
        Vec::new()
    };
    let rel = uri
        .path()
        .strip_prefix(kind.prefix())
        .unwrap_or(uri.path())
        .to_owned();
    let call = Call {
        method: method.clone(),
        segments: rel
            .split('/')
            .filter(|s| !s.is_empty())
            .map(decode)
            .collect(),
        query: uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default(),
        body: json_body.clone(),
        form,
    };

    let fault = {
        let mut d = forge.data();
        let pos = d.faults.iter().position(|(m, _)| *m == method);
        pos.and_then(|i| d.faults.remove(i)).map(|(_, f)| f)
    };
    let response = match fault {
        Some(Fault::Before(status)) => {
            json_response(status, json!({"message": "injected failure"}))
        }
        _ if !authorized => unauthorized(kind, auth),
        _ if kind == ForgeKind::GitHub && user_agent.is_none() => json_response(
            403,
            json!({"message": "Request forbidden by administrative rules. Please make sure your request has a User-Agent header (https://docs.github.com/en/rest/overview/resources-in-the-rest-api#user-agent-required). Check https://developer.github.com for other possible causes."}),
        ),
        _ => {
            let served = match kind {
                ForgeKind::GitHub => github(&forge, &call).await,
                ForgeKind::GitLab => gitlab(&forge, &call).await,
            };
            match fault {
                Some(Fault::After(status)) => json_response(
                    status,
                    json!({"message": "injected failure after the fact"}),
                ),
                _ => served,
            }
        }
    };

    forge.data().requests.push(ForgeRequest {
        method: method.as_str().to_owned(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        status: response.status().as_u16(),
        auth,
        authorized,
        user_agent,
        body: json_body.or_else(|| {
            (!call.form.is_empty()).then(|| {
                Value::Object(
                    call.form
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect(),
                )
            })
        }),
    });
    response
}

/// The scheme used and whether the value is the token, per the forge's documented headers.
fn check_auth(kind: ForgeKind, headers: &HeaderMap, token: &RwLock<String>) -> (AuthScheme, bool) {
    let token = token
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let private = headers.get("private-token").and_then(|v| v.to_str().ok());
    if kind == ForgeKind::GitLab
        && let Some(v) = private
    {
        return (AuthScheme::PrivateToken, v == token);
    }
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return (
            if private.is_some() {
                AuthScheme::PrivateToken
            } else {
                AuthScheme::None
            },
            false,
        );
    };
    let (scheme, credential) = value.trim().split_once(' ').unwrap_or((value, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => (AuthScheme::Bearer, credential.trim() == token),
        "token" if kind == ForgeKind::GitHub => (AuthScheme::Token, credential.trim() == token),
        "token" => (AuthScheme::Token, false),
        _ => (AuthScheme::Other, false),
    }
}

fn unauthorized(kind: ForgeKind, auth: AuthScheme) -> Response {
    match kind {
        ForgeKind::GitHub if auth == AuthScheme::None => json_response(
            401,
            json!({"message": "Requires authentication", "documentation_url": "https://docs.github.com/rest"}),
        ),
        ForgeKind::GitHub => json_response(
            401,
            json!({"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest", "status": "401"}),
        ),
        ForgeKind::GitLab => json_response(401, json!({"message": "401 Unauthorized"})),
    }
}

fn not_found(kind: ForgeKind) -> Response {
    match kind {
        ForgeKind::GitHub => json_response(
            404,
            json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest", "status": "404"}),
        ),
        ForgeKind::GitLab => json_response(404, json!({"message": "404 Project Not Found"})),
    }
}

/// A git command on the bare repository of `project`; its trimmed stdout, or `None`.
async fn git(forge: &Forge, project: &str, args: &[&str]) -> Option<String> {
    let a = forge.inner.attached.get()?;
    let repo = a.repos.join(format!("{project}.git"));
    let out = tokio::process::Command::new("git")
        .env_clear()
        .envs(git_env_vars(&a.home))
        .arg("--git-dir")
        .arg(&repo)
        .args(args)
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn repo_exists(forge: &Forge, project: &str) -> bool {
    let valid = project
        .split('/')
        .all(|s| !s.is_empty() && s != "." && s != ".." && !s.ends_with(".git"));
    valid
        && forge
            .inner
            .attached
            .get()
            .is_some_and(|a| a.repos.join(format!("{project}.git")).is_dir())
}

async fn branch_sha(forge: &Forge, project: &str, branch: &str) -> Option<String> {
    git(
        forge,
        project,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("refs/heads/{branch}^{{commit}}"),
        ],
    )
    .await
    .filter(|s| !s.is_empty())
}

async fn default_branch(forge: &Forge, project: &str) -> Option<String> {
    git(forge, project, &["symbolic-ref", "--short", "HEAD"]).await
}

/// Commits on `head` that `base` lacks.
async fn ahead(forge: &Forge, project: &str, base: &str, head: &str) -> usize {
    git(
        forge,
        project,
        &[
            "rev-list",
            "--count",
            &format!("refs/heads/{base}..refs/heads/{head}"),
        ],
    )
    .await
    .and_then(|s| s.parse().ok())
    .unwrap_or(0)
}

/// One page of `items` and the pagination headers (GitHub's `Link`; GitLab's `X-*` too).
fn paginate(
    forge: &Forge,
    call: &Call,
    path: &str,
    items: Vec<Value>,
    default_per_page: usize,
) -> Response {
    let max = forge.data().max_per_page.unwrap_or(100).min(100);
    let per_page = call
        .param("per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(default_per_page)
        .clamp(1, 100)
        .min(max);
    let page = call
        .param("page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let total = items.len();
    let pages = total.div_ceil(per_page).max(1);
    let slice: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let web = forge
        .inner
        .attached
        .get()
        .map(|a| a.web.clone())
        .unwrap_or_default();
    // The other query parameters stay; page and per_page are set.
    let link_to = |p: usize| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &call.query {
            if k != "page" && k != "per_page" {
                q.append_pair(k, v);
            }
        }
        q.append_pair("per_page", &per_page.to_string())
            .append_pair("page", &p.to_string());
        format!("{web}{}{path}?{}", forge.inner.kind.prefix(), q.finish())
    };
    let mut links = Vec::new();
    if page < pages {
        links.push(format!("<{}>; rel=\"next\"", link_to(page + 1)));
    }
    if page > 1 {
        links.push(format!("<{}>; rel=\"prev\"", link_to(page - 1)));
    }
    links.push(format!("<{}>; rel=\"first\"", link_to(1)));
    links.push(format!("<{}>; rel=\"last\"", link_to(pages)));
    let mut resp = json_response(200, Value::Array(slice));
    let h = resp.headers_mut();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    // GitHub sends Link only when there is more than one page.
    if forge.inner.kind == ForgeKind::GitLab || pages > 1 {
        set("link", links.join(", "));
    }
    if forge.inner.kind == ForgeKind::GitLab {
        set("x-page", page.to_string());
        set("x-per-page", per_page.to_string());
        set("x-total", total.to_string());
        set("x-total-pages", pages.to_string());
        set(
            "x-next-page",
            if page < pages {
                (page + 1).to_string()
            } else {
                String::new()
            },
        );
        set(
            "x-prev-page",
            if page > 1 {
                (page - 1).to_string()
            } else {
                String::new()
            },
        );
    }
    resp
}

fn github_pull(forge: &Forge, p: &PullRequest, api: &str) -> Value {
    let (owner, name) = p.project.split_once('/').unwrap_or((&p.project, ""));
    let repo = json!({
        "id": project_id(&p.project), "name": name, "full_name": p.project,
        "owner": {"login": owner}, "private": true,
    });
    json!({
        "url": format!("{api}/repos/{}/pulls/{}", p.project, p.number),
        "id": project_id(&p.project) * 1000 + p.number,
        "number": p.number,
        "state": if p.open { "open" } else { "closed" },
        "title": p.title,
        "body": p.body,
        "html_url": forge.web_url(&p.project, p.number),
        "user": {"login": "repobox-test"},
        "draft": false,
        "head": {"label": format!("{owner}:{}", p.head), "ref": p.head, "repo": repo.clone()},
        "base": {"label": format!("{owner}:{}", p.base), "ref": p.base, "repo": repo},
    })
}

async fn github(forge: &Forge, call: &Call) -> Response {
    let kind = ForgeKind::GitHub;
    let segs: Vec<&str> = call.segments.iter().map(String::as_str).collect();
    let web = forge
        .inner
        .attached
        .get()
        .map(|a| a.web.clone())
        .unwrap_or_default();
    let api = format!("{web}{}", kind.prefix());
    match (call.method.clone(), segs.as_slice()) {
        (Method::GET, ["repos", owner, repo]) => {
            let project = format!("{owner}/{repo}");
            if !repo_exists(forge, &project) {
                return not_found(kind);
            }
            let default = default_branch(forge, &project).await;
            json_response(
                200,
                json!({
                    "id": project_id(&project), "name": repo, "full_name": project,
                    "owner": {"login": owner}, "private": true,
                    "html_url": format!("{web}/{project}"),
                    "default_branch": default,
                }),
            )
        }
        (Method::GET, ["repos", owner, repo, "pulls"]) => {
            let project = format!("{owner}/{repo}");
            if !repo_exists(forge, &project) {
                return not_found(kind);
            }
            let state = call.param("state").unwrap_or("open");
            let head = call.param("head");
            let base = call.param("base");
            let items: Vec<Value> = forge
                .data()
                .pulls
                .iter()
                .filter(|p| p.project == project)
                .filter(|p| match state {
                    "all" => true,
                    "closed" => !p.open,
                    _ => p.open,
                })
                // `head` is `user:ref-name`; the user is the repository's owner here (no forks).
                .filter(|p| head.is_none_or(|h| h == format!("{owner}:{}", p.head)))
                .filter(|p| base.is_none_or(|b| b == p.base))
                .map(|p| github_pull(forge, p, &api))
                .collect();
            paginate(forge, call, &format!("/repos/{project}/pulls"), items, 30)
        }
        (Method::POST, ["repos", owner, repo, "pulls"]) => {
            let project = format!("{owner}/{repo}");
            if !repo_exists(forge, &project) {
                return not_found(kind);
            }
            let invalid = |field: &str| {
                json_response(
                    422,
                    json!({"message": "Validation Failed", "errors": [
                        {"resource": "PullRequest", "field": field, "code": "invalid"}],
                        "documentation_url": "https://docs.github.com/rest/pulls/pulls#create-a-pull-request"}),
                )
            };
            let (Some(head), Some(base)) = (call.field("head"), call.field("base")) else {
                return invalid(if call.field("head").is_none() {
                    "head"
                } else {
                    "base"
                });
            };
            let Some(title) = call.field("title").filter(|t| !t.is_empty()) else {
                return invalid("title");
            };
            // `owner:branch` names the same repository's branch.
            let head = head
                .strip_prefix(&format!("{owner}:"))
                .map(str::to_owned)
                .unwrap_or(head);
            if branch_sha(forge, &project, &head).await.is_none() {
                return invalid("head");
            }
            if branch_sha(forge, &project, &base).await.is_none() {
                return invalid("base");
            }
            if ahead(forge, &project, &base, &head).await == 0 {
                return json_response(
                    422,
                    json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest",
                        "code": "custom", "message": format!("No commits between {base} and {head}")}]}),
                );
            }
            let mut d = forge.data();
            if d.pulls
                .iter()
                .any(|p| p.project == project && p.open && p.head == head && p.base == base)
            {
                return json_response(
                    422,
                    json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest",
                        "code": "custom", "message": format!("A pull request already exists for {owner}:{head}.")}],
                        "documentation_url": "https://docs.github.com/rest/pulls/pulls#create-a-pull-request"}),
                );
            }
            let p = PullRequest {
                project: project.clone(),
                number: next_number(&d.pulls, &project),
                title,
                body: call.field("body").unwrap_or_default(),
                head,
                base,
                open: true,
            };
            d.pulls.push(p.clone());
            drop(d);
            let body = github_pull(forge, &p, &api);
            let mut resp = json_response(201, body);
            if let Ok(v) =
                HeaderValue::from_str(&format!("{api}/repos/{project}/pulls/{}", p.number))
            {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        _ => not_found(kind),
    }
}

fn gitlab_merge(forge: &Forge, p: &PullRequest) -> Value {
    let id = project_id(&p.project);
    json!({
        "id": id * 1000 + p.number,
        "iid": p.number,
        "project_id": id,
        "title": p.title,
        "description": p.body,
        "state": if p.open { "opened" } else { "closed" },
        "source_branch": p.head,
        "target_branch": p.base,
        "source_project_id": id,
        "target_project_id": id,
        "author": {"username": "repobox-test"},
        "draft": false,
        "web_url": forge.web_url(&p.project, p.number),
        "references": {"short": format!("!{}", p.number)},
    })
}

async fn gitlab(forge: &Forge, call: &Call) -> Response {
    let kind = ForgeKind::GitLab;
    let segs: Vec<&str> = call.segments.iter().map(String::as_str).collect();
    let web = forge
        .inner
        .attached
        .get()
        .map(|a| a.web.clone())
        .unwrap_or_default();
    // `:id` is the URL-encoded path (one segment) or the numeric id.
    let resolve = |id: &str| -> Option<String> {
        if repo_exists(forge, id) {
            return Some(id.to_owned());
        }
        let n: u64 = id.parse().ok()?;
        forge.inner.attached.get().and_then(|a| {
            walk_projects(&a.repos)
                .into_iter()
                .find(|p| project_id(p) == n)
        })
    };
    match (call.method.clone(), segs.as_slice()) {
        (Method::GET, ["projects", id]) => {
            let Some(project) = resolve(id) else {
                return not_found(kind);
            };
            let default = default_branch(forge, &project).await;
            json_response(
                200,
                json!({
                    "id": project_id(&project), "path_with_namespace": project,
                    "web_url": format!("{web}/{project}"), "default_branch": default,
                }),
            )
        }
        (Method::GET, ["projects", id, "merge_requests"]) => {
            let Some(project) = resolve(id) else {
                return not_found(kind);
            };
            let state = call.param("state").unwrap_or("all");
            let source = call.param("source_branch");
            let target = call.param("target_branch");
            let items: Vec<Value> = forge
                .data()
                .pulls
                .iter()
                .filter(|p| p.project == project)
                .filter(|p| match state {
                    "opened" => p.open,
                    "closed" => !p.open,
                    _ => true,
                })
                .filter(|p| source.is_none_or(|s| s == p.head))
                .filter(|p| target.is_none_or(|t| t == p.base))
                .rev() // newest first, as GitLab orders by created_at desc
                .map(|p| gitlab_merge(forge, p))
                .collect();
            let path = format!(
                "/projects/{}/merge_requests",
                url::form_urlencoded::byte_serialize(project.as_bytes()).collect::<String>()
            );
            paginate(forge, call, &path, items, 20)
        }
        (Method::POST, ["projects", id, "merge_requests"]) => {
            let Some(project) = resolve(id) else {
                return not_found(kind);
            };
            for field in ["source_branch", "target_branch", "title"] {
                if call.field(field).is_none_or(|v| v.is_empty()) {
                    return json_response(400, json!({"error": format!("{field} is missing")}));
                }
            }
            let head = call.field("source_branch").unwrap_or_default();
            let base = call.field("target_branch").unwrap_or_default();
            if head == base {
                return json_response(
                    422,
                    json!({"message": ["You can't use same project/branch for source and target"]}),
                );
            }
            if branch_sha(forge, &project, &head).await.is_none() {
                return json_response(
                    422,
                    json!({"message": [format!("Source branch \"{head}\" does not exist")]}),
                );
            }
            if branch_sha(forge, &project, &base).await.is_none() {
                return json_response(
                    422,
                    json!({"message": [format!("Target branch \"{base}\" does not exist")]}),
                );
            }
            let mut d = forge.data();
            if let Some(existing) = d
                .pulls
                .iter()
                .find(|p| p.project == project && p.open && p.head == head && p.base == base)
            {
                return json_response(
                    409,
                    json!({"message": [format!(
                        "Another open merge request already exists for this source branch: !{}",
                        existing.number
                    )]}),
                );
            }
            let p = PullRequest {
                project: project.clone(),
                number: next_number(&d.pulls, &project),
                title: call.field("title").unwrap_or_default(),
                body: call.field("description").unwrap_or_default(),
                head,
                base,
                open: true,
            };
            d.pulls.push(p.clone());
            drop(d);
            json_response(201, gitlab_merge(forge, &p))
        }
        _ => not_found(kind),
    }
}

/// Project paths (`group/project`) of every bare repository under `repos`.
fn walk_projects(repos: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![repos.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if !path.is_dir() {
                continue;
            }
            match path
                .strip_prefix(repos)
                .ok()
                .and_then(|r| r.to_str())
                .and_then(|r| r.strip_suffix(".git"))
            {
                Some(project) => out.push(project.to_owned()),
                None => stack.push(path),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_and_ids() {
        assert_eq!(decode("acme%2Fapi"), "acme/api");
        assert_eq!(decode("a%2fb%20c"), "a/b c");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(project_id("acme/api"), project_id("acme/api"));
        assert_ne!(project_id("acme/api"), project_id("acme/web"));
    }

    #[test]
    fn numbers_are_per_project() {
        let f = Forge::new(ForgeKind::GitHub, "t");
        assert_eq!(f.seed("a/b", "x", "main", "t"), 1);
        assert_eq!(f.seed("a/b", "y", "main", "t"), 2);
        assert_eq!(f.seed("c/d", "x", "main", "t"), 1);
        f.close("a/b", 1);
        assert!(!f.pull_requests()[0].open);
    }
}
