//! URLs both binaries must judge the same way: the Redis URL (one validator for the operator,
//! the chart's values and the runner) and the repository URL (credentials, query strings and
//! fragments never travel further than the job hash; the host must be the provider's).

use std::fmt;

use url::Url;

/// Schemes the `redis` crate connects to, and so the only ones either binary accepts.
pub const REDIS_SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "valkey",
    "valkeys",
    "redis+unix",
    "valkey+unix",
    "unix",
];

/// Why a URL was refused. Messages never contain a password or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// No `scheme://` at all.
    #[error(
        "expected a URL such as redis://host:6379 (schemes: redis, rediss, valkey, valkeys, redis+unix, valkey+unix, unix)"
    )]
    NotAUrl,
    /// A scheme the `redis` crate does not connect to (the scheme is not secret, so it is named).
    #[error(
        "unsupported scheme `{0}` (expected redis, rediss, valkey, valkeys, redis+unix, valkey+unix or unix)"
    )]
    RedisScheme(String),
    /// The `redis` crate cannot read it; the URL is shown with its password masked.
    #[error("`{0}` is not a valid Redis URL")]
    BadRedisUrl(String),
    /// Not parseable as a URL (shown sanitized, as every repository URL in these errors).
    #[error("repository URL `{0}` is not a valid URL")]
    BadRepoUrl(String),
    /// `http://` where only `https://` is allowed.
    #[error("repository URL `{0}` must use https; plain http would send the token in clear")]
    InsecureRepoUrl(String),
    /// Any other scheme (`ssh://`, `git://`, `file://`, ...).
    #[error("unsupported repository URL `{0}`: only https:// clone URLs are supported")]
    RepoScheme(String),
    /// A URL without a host.
    #[error("repository URL `{0}` has no host")]
    NoHost(String),
}

/// Checks a Redis URL the way the `redis` crate will read it, without ever echoing it.
pub fn check_redis_url(url: &str) -> Result<(), UrlError> {
    let url = url.trim();
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(UrlError::NotAUrl);
    };
    let scheme = scheme.to_ascii_lowercase();
    if !REDIS_SCHEMES.contains(&scheme.as_str()) {
        return Err(UrlError::RedisScheme(scheme));
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|_| UrlError::BadRedisUrl(mask_password(url)))
}

/// `url` with any password replaced by `****` (for messages about URLs that may hold one).
///
/// Text, not a parsed URL, so a URL too broken to parse (or without its scheme) is masked too. User info without a
/// colon is masked whole: `redis://secret@host` is how a password is often written by mistake.
///
/// ```
/// use repobox_contract::urls::mask_password;
///
/// assert_eq!(mask_password("redis://user:pw@host:6379/0"), "redis://user:****@host:6379/0");
/// assert_eq!(mask_password("rediss://pw@host"), "rediss://****@host");
/// assert_eq!(mask_password("redis://host:6379"), "redis://host:6379");
/// ```
pub fn mask_password(url: &str) -> String {
    // Without a scheme (a mistake, but it may still hold a password) the authority starts at 0.
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    // The last `@` of the authority: a password may hold `@` itself.
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let masked = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:****"),
        None => "****".to_owned(),
    };
    format!("{}{masked}{}", &url[..scheme_end], &rest[at..])
}

/// A repository URL that is safe to show and to clone: https (or http when allowed), with a
/// host, and without user info, query string or fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoUrl(Url);

impl RepoUrl {
    /// Parses and cleans `raw`. `allow_http` admits `http://` (an in-cluster git host).
    pub fn parse(raw: &str, allow_http: bool) -> Result<Self, UrlError> {
        let shown = sanitize_url(raw);
        let mut url = Url::parse(raw.trim()).map_err(|_| UrlError::BadRepoUrl(shown.clone()))?;
        match url.scheme() {
            "https" => {}
            "http" if allow_http => {}
            "http" => return Err(UrlError::InsecureRepoUrl(shown)),
            _ => return Err(UrlError::RepoScheme(shown)),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(UrlError::NoHost(shown));
        }
        strip(&mut url);
        Ok(Self(url))
    }

    /// The host and, when not the scheme's default, the port (`gitlab.example.com:8443`),
    /// lower-cased: what [`ProviderHost`] compares.
    pub fn authority(&self) -> String {
        authority(&self.0)
    }

    /// The cleaned URL: what is stored, shown and cloned.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

fn strip(url: &mut Url) {
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
}

fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

/// Removes user info, query string and fragment from any URL-like text, parseable or not,
/// keeping the rest as written: what may be shown in Redis, logs, events and the RepoboxJob. A
/// clone URL may embed an access token in any of them (`https://oauth2:TOKEN@host/…`,
/// `?private_token=…`). Text without a scheme is treated alike (`user@host:path` → `host:path`).
///
/// ```
/// use repobox_contract::urls::sanitize_url;
///
/// assert_eq!(
///     sanitize_url("https://oauth2:TOKEN@gitlab.example.com/acme/api.git?private_token=T#x"),
///     "https://gitlab.example.com/acme/api.git"
/// );
/// // Unparseable text is cleaned too: an error message may quote whatever the user wrote.
/// assert_eq!(sanitize_url("git@github.com:acme/api.git"), "github.com:acme/api.git");
/// ```
pub fn sanitize_url(raw: &str) -> String {
    let url = raw.trim();
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let Some(i) = url.find("://") else {
        // No scheme: nothing tells where a host starts, so anything before an `@` goes.
        return url.rfind('@').map_or(url, |at| &url[at + 1..]).to_owned();
    };
    let (scheme, rest) = url.split_at(i + 3);
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(i) => &authority[i + 1..],
        None => authority,
    };
    format!("{scheme}{host}{path}")
}

/// The git host a provider record allows its token to be sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderHost {
    /// Lower-cased host, with `:port` when the base URL names one.
    pub authority: String,
}

/// Why a provider cannot vouch for a repository URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderHostError {
    /// A `type` other than `github` / `gitlab`.
    #[error("git provider type `{0}` is not supported (expected github or gitlab)")]
    UnknownType(String),
    /// A `baseUrl` that is not an http(s) URL with a host.
    #[error("git provider baseUrl `{0}` is not a valid http(s) URL")]
    BadBaseUrl(String),
    /// The repository is on another host than the provider's: its token must not go there.
    #[error(
        "repository host `{repo}` is not the git provider's host `{provider}`: the token is only sent to its own provider"
    )]
    HostMismatch {
        /// The repository URL's host, with `:port` when not the default.
        repo: String,
        /// The host the provider record allows.
        provider: String,
    },
}

impl ProviderHost {
    /// From the provider hash's `type` and `baseUrl`: the base URL's host when given (GitHub
    /// Enterprise, self-hosted GitLab), else `github.com` / `gitlab.com`. A missing type is
    /// treated as `github`, as the web app's default.
    pub fn from_provider(
        kind: Option<&str>,
        base_url: Option<&str>,
    ) -> Result<Self, ProviderHostError> {
        let kind = kind.map(|k| k.trim().to_ascii_lowercase());
        let default_host = match kind.as_deref() {
            None | Some("" | "github") => "github.com",
            Some("gitlab") => "gitlab.com",
            Some(other) => return Err(ProviderHostError::UnknownType(other.to_owned())),
        };
        match base_url.map(str::trim).filter(|b| !b.is_empty()) {
            None => Ok(Self {
                authority: default_host.to_owned(),
            }),
            Some(base) => {
                let url = Url::parse(base)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                    .ok_or_else(|| ProviderHostError::BadBaseUrl(sanitize_url(base)))?;
                let mut authority = authority(&url);
                // GitHub Enterprise's API lives on `api.<host>` or `<host>/api/v3`; git is on
                // the web host. `api.github.com` means github.com.
                if let Some(web) = authority.strip_prefix("api.") {
                    authority = web.to_owned();
                }
                Ok(Self { authority })
            }
        }
    }

    /// Whether `repo` is on this host; the error says which hosts differ.
    pub fn check(&self, repo: &RepoUrl) -> Result<(), ProviderHostError> {
        let repo = repo.authority();
        if repo == self.authority {
            Ok(())
        } else {
            Err(ProviderHostError::HostMismatch {
                repo,
                provider: self.authority.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_accepted_by_both_binaries() {
        for ok in [
            "redis://127.0.0.1:6379",
            "redis://:pw@h:6379/2",
            "rediss://u:p@h:6380",
            "valkey://h",
            "valkeys://h:6380",
            "redis+unix:///run/redis.sock",
            "valkey+unix:///run/valkey.sock",
            "unix:///run/redis.sock",
            "  redis://h  ",
        ] {
            assert_eq!(check_redis_url(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_redis_url("localhost:6379"), Err(UrlError::NotAUrl));
        assert_eq!(
            check_redis_url("http://h"),
            Err(UrlError::RedisScheme("http".into()))
        );
        let e = check_redis_url("redis://:hunter2@[bad").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(mask_password("redis://:pw@h:1/0"), "redis://:****@h:1/0");
        assert_eq!(mask_password("redis://h:1"), "redis://h:1");
        assert!(!mask_password("redis://u:hunter2@[x").contains("hunter2"));
        for (url, want) in [
            (
                "redis://user:secretpw@host:6379/0",
                "redis://user:****@host:6379/0",
            ),
            ("redis://:secretpw@host", "redis://:****@host"),
            ("rediss://secretpw@host", "rediss://****@host"),
            ("redis://u:p@ss@host/x@y", "redis://u:****@host/x@y"),
            ("redis://host/x@y", "redis://host/x@y"),
            ("not a url", "not a url"),
            ("u:secretpw@host", "u:****@host"),
        ] {
            assert_eq!(mask_password(url), want, "{url}");
        }
    }

    #[test]
    fn repo_urls_are_cleaned() {
        let u = RepoUrl::parse(
            "https://oauth2:ghp_x@GitHub.com/acme/api.git?token=ghp_y#frag",
            false,
        )
        .unwrap();
        assert_eq!(u.as_str(), "https://github.com/acme/api.git");
        assert_eq!(u.authority(), "github.com");
        let u = RepoUrl::parse("https://git.example.com:8443/a/b.git", false).unwrap();
        assert_eq!(u.authority(), "git.example.com:8443");
        let u = RepoUrl::parse("https://git.example.com:443/a/b.git", false).unwrap();
        assert_eq!(u.authority(), "git.example.com", "default port is no port");
    }

    #[test]
    fn repo_url_errors_never_show_credentials_or_queries() {
        for (raw, allow_http) in [
            ("http://u:pw1@h/a.git?t=tok1", false),
            ("ssh://git:pw1@h/a.git?t=tok1", true),
            ("https://u:pw1@/a.git#tok1", true),
            ("https//u:pw1@h/a.git?tok1", true),
        ] {
            let e = RepoUrl::parse(raw, allow_http).unwrap_err().to_string();
            assert!(!e.contains("pw1") && !e.contains("tok1"), "{raw}: {e}");
        }
        assert!(matches!(
            RepoUrl::parse("http://h/a.git", false),
            Err(UrlError::InsecureRepoUrl(_))
        ));
        assert!(RepoUrl::parse("http://h/a.git", true).is_ok());
        assert!(matches!(
            RepoUrl::parse("ssh://git@h/a.git", true),
            Err(UrlError::RepoScheme(_))
        ));
        assert!(matches!(
            RepoUrl::parse("file:///tmp/x", true),
            Err(UrlError::RepoScheme(_))
        ));
    }

    #[test]
    fn sanitize_handles_unparseable_text() {
        assert_eq!(sanitize_url("https://u:p@h/a.git?x=1#y"), "https://h/a.git");
        assert_eq!(sanitize_url("weird://u:p@h h/a?x"), "weird://h h/a");
        assert_eq!(sanitize_url("no-scheme?q=1"), "no-scheme");
        assert_eq!(sanitize_url("git@host:acme/api.git"), "host:acme/api.git");
        assert_eq!(
            sanitize_url("https://tok@host"),
            "https://host",
            "kept as written"
        );
    }

    #[test]
    fn provider_hosts() {
        let host = |k: Option<&str>, b: Option<&str>| {
            ProviderHost::from_provider(k, b).map(|h| h.authority)
        };
        assert_eq!(host(Some("github"), None).unwrap(), "github.com");
        assert_eq!(host(None, None).unwrap(), "github.com");
        assert_eq!(host(Some("GitLab"), None).unwrap(), "gitlab.com");
        assert_eq!(
            host(Some("gitlab"), Some("https://GitLab.Example.com/")).unwrap(),
            "gitlab.example.com"
        );
        assert_eq!(
            host(Some("github"), Some("https://api.github.com")).unwrap(),
            "github.com"
        );
        assert_eq!(
            host(Some("github"), Some("http://127.0.0.1:8080")).unwrap(),
            "127.0.0.1:8080"
        );
        assert!(matches!(
            host(Some("bitbucket"), None),
            Err(ProviderHostError::UnknownType(_))
        ));
        assert!(matches!(
            host(Some("gitlab"), Some("gitlab.example.com")),
            Err(ProviderHostError::BadBaseUrl(_))
        ));
    }

    #[test]
    fn host_must_match() {
        let gh = ProviderHost::from_provider(Some("github"), None).unwrap();
        assert!(
            gh.check(&RepoUrl::parse("https://github.com/a/b.git", false).unwrap())
                .is_ok()
        );
        assert!(
            gh.check(&RepoUrl::parse("https://GITHUB.com/a/b.git", false).unwrap())
                .is_ok()
        );
        let e = gh
            .check(&RepoUrl::parse("https://evil.example/a/b.git", false).unwrap())
            .unwrap_err();
        assert_eq!(
            e,
            ProviderHostError::HostMismatch {
                repo: "evil.example".into(),
                provider: "github.com".into()
            }
        );
        // A look-alike subdomain or a port is a different host.
        assert!(
            gh.check(&RepoUrl::parse("https://github.com.evil.example/a", false).unwrap())
                .is_err()
        );
        assert!(
            gh.check(&RepoUrl::parse("https://github.com:8443/a", false).unwrap())
                .is_err()
        );
    }
}
