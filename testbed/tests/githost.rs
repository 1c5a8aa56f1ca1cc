//! The `GitHost` fixture against the real git client.
//!
//! Credentials reach git the way a careful runner would give them: through `GIT_ASKPASS`, never
//! in the URL. Every git call runs with `GIT_TERMINAL_PROMPT=0` and a clean environment so that
//! nothing on this machine (credential helpers, `~/.gitconfig`) can make a test pass by accident.

use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine as _;
use repobox_testbed::githost::{AUTHOR_EMAIL, AUTHOR_NAME, GitHost, RequestRecord};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "ghp_testTokenAbCdEf0123456789";

/// A client side: a temp dir with an askpass script and an empty HOME.
struct Client {
    dir: TempDir,
    askpass: PathBuf,
}

impl Client {
    fn new() -> Client {
        let dir = tempfile::tempdir().expect("client temp dir");
        let askpass = dir.path().join("askpass.sh");
        // git asks for the user name first, then the password; answer `oauth2` and `$TOKEN`.
        std::fs::write(
            &askpass,
            "#!/bin/sh\ncase \"$1\" in\n  Username*) echo oauth2 ;;\n  *) echo \"$TOKEN\" ;;\nesac\n",
        )
        .expect("write askpass");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o755))
            .expect("chmod askpass");
        std::fs::create_dir_all(dir.path().join("home")).expect("client HOME");
        Client { dir, askpass }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A git command with a clean environment and `token` available to the askpass script.
    fn command(&self, token: &str, cwd: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("git");
        cmd.current_dir(cwd)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path().join("home"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", &self.askpass)
            .env("TOKEN", token)
            .env("LC_ALL", "C")
            .env("GIT_AUTHOR_NAME", "Repobox Bot")
            .env("GIT_AUTHOR_EMAIL", "bot@repobox.invalid")
            .env("GIT_COMMITTER_NAME", "Repobox Bot")
            .env("GIT_COMMITTER_EMAIL", "bot@repobox.invalid");
        cmd
    }

    async fn git(&self, token: &str, cwd: &Path, args: &[&str]) -> Output {
        self.command(token, cwd)
            .args(args)
            .output()
            .await
            .expect("run git")
    }

    /// Runs git and fails the test with its stderr when it does not succeed.
    async fn git_ok(&self, token: &str, cwd: &Path, args: &[&str]) -> String {
        let out = self.git(token, cwd, args).await;
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    async fn clone(&self, token: &str, url: &str, into: &str) -> Output {
        self.git(token, self.dir.path(), &["clone", "--quiet", url, into])
            .await
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn clone_with_the_right_token_gets_the_files() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo(
        "acme/api",
        &[("README.md", "# api\n"), ("src/main.rs", "fn main() {}\n")],
    )
    .expect("create repo");
    assert_eq!(
        host.url("acme/api"),
        format!("http://127.0.0.1:{}/acme/api.git", host.port())
    );

    let client = Client::new();
    let out = client.clone(TOKEN, &host.url("acme/api"), "api").await;
    assert!(out.status.success(), "clone failed: {}", stderr(&out));
    let work = client.path("api");
    assert_eq!(
        std::fs::read_to_string(work.join("README.md")).expect("README"),
        "# api\n"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("src/main.rs")).expect("main.rs"),
        "fn main() {}\n"
    );
    let branch = client
        .git_ok(TOKEN, &work, &["rev-parse", "--abbrev-ref", "HEAD"])
        .await;
    assert_eq!(branch.trim(), "main", "HEAD of the remote is main");
    let head = client.git_ok(TOKEN, &work, &["rev-parse", "HEAD"]).await;
    assert_eq!(
        Some(head.trim().to_owned()),
        host.branch_sha("acme/api", "main")
    );
    assert_eq!(
        host.commit_author("acme/api", "main").expect("author"),
        format!("{AUTHOR_NAME} <{AUTHOR_EMAIL}>")
    );

    // git first tries without credentials, gets the challenge, then authenticates.
    let log = host.requests();
    assert!(
        log.iter().any(|r| !r.authorized && r.status == 401),
        "an unauthenticated probe was challenged: {log:?}"
    );
    let served: Vec<&RequestRecord> = log.iter().filter(|r| r.authorized).collect();
    assert!(
        served.iter().any(|r| r.method == "GET"
            && r.path == "/acme/api.git/info/refs"
            && r.query.as_deref() == Some("service=git-upload-pack")
            && r.status == 200),
        "ref advertisement served: {log:?}"
    );
    assert!(
        served
            .iter()
            .any(|r| r.method == "POST" && r.path == "/acme/api.git/git-upload-pack"),
        "pack served: {log:?}"
    );
}

#[tokio::test]
async fn wrong_token_is_an_authentication_failure() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    let client = Client::new();
    let out = client
        .clone("ghp_wrongToken", &host.url("repo"), "repo")
        .await;
    assert!(!out.status.success(), "clone with a wrong token must fail");
    assert!(
        stderr(&out).contains("Authentication failed"),
        "git reports an authentication failure: {}",
        stderr(&out)
    );
    assert!(!client.path("repo").join("a.txt").exists());
    assert!(host.requests().iter().all(|r| !r.authorized));
}

#[tokio::test]
async fn rotated_token_replaces_the_old_one() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    host.set_token("ghp_rotated");
    let client = Client::new();
    let old = client.clone(TOKEN, &host.url("repo"), "old").await;
    assert!(!old.status.success(), "the old token no longer works");
    assert!(
        stderr(&old).contains("Authentication failed"),
        "{}",
        stderr(&old)
    );
    let new = client.clone("ghp_rotated", &host.url("repo"), "new").await;
    assert!(new.status.success(), "new token works: {}", stderr(&new));
}

#[tokio::test]
async fn unknown_repository_is_not_found() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("exists", &[("a.txt", "a\n")])
        .expect("create repo");
    let client = Client::new();
    let out = client.clone(TOKEN, &host.url("missing"), "missing").await;
    assert!(!out.status.success(), "clone of a missing repo must fail");
    let err = stderr(&out);
    assert!(
        err.contains("not found") || err.contains("404"),
        "git reports not found: {err}"
    );
    assert!(
        host.requests()
            .iter()
            .any(|r| r.authorized && r.status == 404 && r.path.starts_with("/missing.git/")),
        "404 after authentication: {:?}",
        host.requests()
    );
}

/// Raw HTTP/1.1 request, to check exact status codes and headers.
async fn raw_get(port: u16, path: &str, authorization: Option<&str>) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if let Some(auth) = authorization {
        req.push_str(&format!("Authorization: {auth}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("send");
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp).await.expect("read");
    String::from_utf8_lossy(&resp).into_owned()
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test]
async fn http_status_codes_and_challenge() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    let refs = "/repo.git/info/refs?service=git-upload-pack";

    let none = raw_get(host.port(), refs, None).await;
    assert!(none.starts_with("HTTP/1.1 401"), "{none}");
    assert!(
        none.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"repobox-test\""),
        "{none}"
    );

    let wrong = raw_get(host.port(), refs, Some(&basic("oauth2", "nope"))).await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let wrong_user = raw_get(host.port(), refs, Some(&basic("someone", TOKEN))).await;
    assert!(
        wrong_user.starts_with("HTTP/1.1 401"),
        "user must be oauth2: {wrong_user}"
    );
    let unknown_unauth = raw_get(
        host.port(),
        "/missing.git/info/refs?service=git-upload-pack",
        None,
    )
    .await;
    assert!(
        unknown_unauth.starts_with("HTTP/1.1 401"),
        "credentials are checked before existence: {unknown_unauth}"
    );

    let ok = raw_get(host.port(), refs, Some(&basic("oauth2", TOKEN))).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.contains("application/x-git-upload-pack-advertisement"),
        "CGI Content-Type forwarded: {ok}"
    );
    assert!(ok.contains("refs/heads/main"), "refs advertised: {ok}");

    let unknown = raw_get(
        host.port(),
        "/missing.git/info/refs?service=git-upload-pack",
        Some(&basic("oauth2", TOKEN)),
    )
    .await;
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");

    // A path inside an existing repo that http-backend does not serve: its own Status header.
    let bogus = raw_get(
        host.port(),
        "/repo.git/no-such-endpoint",
        Some(&basic("oauth2", TOKEN)),
    )
    .await;
    assert!(
        bogus.starts_with("HTTP/1.1 404"),
        "CGI Status mapped: {bogus}"
    );

    let statuses: Vec<u16> = host.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![401, 401, 401, 401, 200, 404, 404]);
}

#[tokio::test]
async fn push_of_a_new_branch_lands_in_the_bare_repo() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    let client = Client::new();
    let out = client.clone(TOKEN, &host.url("repo"), "work").await;
    assert!(out.status.success(), "clone: {}", stderr(&out));
    let work = client.path("work");

    std::fs::write(work.join("b.txt"), "new file\n").expect("write b.txt");
    // Big enough (3 MiB, incompressible) that git sends the pack with chunked encoding
    // (above http.postBuffer), which exercises the streaming body path of the host.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let big: Vec<u8> = (0..3 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(work.join("big.bin"), &big).expect("write big.bin");
    client.git_ok(TOKEN, &work, &["add", "-A"]).await;
    client
        .git_ok(
            TOKEN,
            &work,
            &["commit", "--quiet", "-m", "Add b\n\nBody line."],
        )
        .await;
    let local = client.git_ok(TOKEN, &work, &["rev-parse", "HEAD"]).await;

    assert_eq!(host.branch_sha("repo", "repobox/abcd1234"), None);
    client
        .git_ok(
            TOKEN,
            &work,
            &[
                "push",
                "--quiet",
                "origin",
                "HEAD:refs/heads/repobox/abcd1234",
            ],
        )
        .await;

    assert_eq!(
        host.branch_sha("repo", "repobox/abcd1234"),
        Some(local.trim().to_owned())
    );
    assert_eq!(
        host.file_at("repo", "repobox/abcd1234", "b.txt").as_deref(),
        Some("new file\n")
    );
    assert_eq!(
        host.file_at("repo", "main", "b.txt"),
        None,
        "main untouched"
    );
    assert_eq!(
        host.commit_message("repo", "repobox/abcd1234")
            .expect("message"),
        "Add b\n\nBody line."
    );
    assert_eq!(
        host.commit_author("repo", "repobox/abcd1234")
            .expect("author"),
        "Repobox Bot <bot@repobox.invalid>"
    );
    assert_eq!(
        host.branches("repo"),
        vec!["main".to_owned(), "repobox/abcd1234".to_owned()]
    );
    assert!(
        host.requests().iter().any(|r| r.authorized
            && r.method == "POST"
            && r.path == "/repo.git/git-receive-pack"
            && r.status == 200),
        "receive-pack served: {:?}",
        host.requests()
    );
}

#[tokio::test]
async fn rejected_push_shows_the_message() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    host.reject_pushes("repo", "pushes are frozen: protected by policy")
        .expect("install hook");
    let client = Client::new();
    let out = client.clone(TOKEN, &host.url("repo"), "work").await;
    assert!(out.status.success(), "clone still works: {}", stderr(&out));
    let work = client.path("work");
    std::fs::write(work.join("b.txt"), "b\n").expect("write");
    client.git_ok(TOKEN, &work, &["add", "-A"]).await;
    client
        .git_ok(TOKEN, &work, &["commit", "--quiet", "-m", "b"])
        .await;

    let out = client
        .git(TOKEN, &work, &["push", "origin", "HEAD:refs/heads/feature"])
        .await;
    assert!(!out.status.success(), "push must be rejected");
    let err = stderr(&out);
    assert!(
        err.contains("pushes are frozen: protected by policy"),
        "hook message visible: {err}"
    );
    assert!(err.contains("pre-receive hook declined"), "{err}");
    assert_eq!(host.branch_sha("repo", "feature"), None);

    host.accept_pushes("repo").expect("remove hook");
    client
        .git_ok(
            TOKEN,
            &work,
            &["push", "--quiet", "origin", "HEAD:refs/heads/feature"],
        )
        .await;
    assert!(host.branch_sha("repo", "feature").is_some());
}

#[tokio::test]
async fn branches_for_base_branch_and_existing_branch_tests() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    host.create_branch(
        "repo",
        "develop",
        &[("dev.txt", "dev\n"), ("a.txt", "changed\n")],
    )
    .expect("create develop");
    host.create_branch_at("repo", "repobox/abcd1234", "main")
        .expect("create branch at main");
    assert!(
        host.create_branch("repo", "develop", &[]).is_err(),
        "an existing branch is not silently replaced"
    );

    let main = host.branch_sha("repo", "main").expect("main");
    let develop = host.branch_sha("repo", "develop").expect("develop");
    assert_ne!(main, develop);
    assert_eq!(
        host.branch_sha("repo", "repobox/abcd1234"),
        Some(main.clone())
    );
    assert_eq!(host.rev_parse("repo", "develop~1").expect("parent"), main);
    assert_eq!(
        host.file_at("repo", "develop", "dev.txt").as_deref(),
        Some("dev\n")
    );
    assert_eq!(
        host.file_at("repo", "develop", "a.txt").as_deref(),
        Some("changed\n")
    );
    assert_eq!(
        host.file_at("repo", "main", "a.txt").as_deref(),
        Some("a\n")
    );
    assert_eq!(host.file_at("repo", "main", "dev.txt"), None);
    assert_eq!(
        host.branches("repo"),
        vec![
            "develop".to_owned(),
            "main".to_owned(),
            "repobox/abcd1234".to_owned()
        ]
    );
    assert!(host.branches("nope").is_empty());
    assert_eq!(host.branch_sha("nope", "main"), None);

    let client = Client::new();
    let out = client
        .git(
            TOKEN,
            client.dir.path(),
            &[
                "clone",
                "--quiet",
                "--branch",
                "develop",
                &host.url("repo"),
                "dev",
            ],
        )
        .await;
    assert!(out.status.success(), "clone develop: {}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(client.path("dev").join("dev.txt")).expect("dev.txt"),
        "dev\n"
    );
    let remote_heads = client
        .git_ok(
            TOKEN,
            &client.path("dev"),
            &["ls-remote", "--heads", "origin"],
        )
        .await;
    assert!(
        remote_heads.contains("refs/heads/repobox/abcd1234"),
        "{remote_heads}"
    );
}

#[tokio::test]
async fn large_repo_has_the_requested_shape_and_clones() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_large_repo("big", 2000, 500)
        .expect("create large repo");
    assert_eq!(host.commit_count("big", "main").expect("count"), 500);
    assert_eq!(host.files_at("big", "main").expect("files").len(), 2000);
    assert_eq!(host.branches("big"), vec!["main".to_owned()]);

    let client = Client::new();
    let out = client.clone(TOKEN, &host.url("big"), "big").await;
    assert!(out.status.success(), "clone large repo: {}", stderr(&out));
    let tracked = client
        .git_ok(TOKEN, &client.path("big"), &["ls-files"])
        .await;
    assert_eq!(tracked.lines().count(), 2000);
    let count = client
        .git_ok(TOKEN, &client.path("big"), &["rev-list", "--count", "HEAD"])
        .await;
    assert_eq!(count.trim(), "500");

    // A fetch with a real negotiation (many "have" lines) after a new commit on the host.
    host.create_branch("big", "next", &[("NEW.md", "new\n")])
        .expect("branch on large repo");
    client
        .git_ok(TOKEN, &client.path("big"), &["fetch", "--quiet", "origin"])
        .await;
    let fetched = client
        .git_ok(TOKEN, &client.path("big"), &["rev-parse", "origin/next"])
        .await;
    assert_eq!(
        Some(fetched.trim().to_owned()),
        host.branch_sha("big", "next")
    );
}

#[tokio::test]
async fn request_log_never_contains_the_token() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    let client = Client::new();
    let ok = client.clone(TOKEN, &host.url("repo"), "ok").await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    let bad = client
        .clone("ghp_wrongToken", &host.url("repo"), "bad")
        .await;
    assert!(!bad.status.success());

    let log = host.requests();
    assert!(log.iter().any(|r| r.authorized));
    assert!(log.iter().any(|r| !r.authorized));
    let dump = format!("{log:?} {host:?}");
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{TOKEN}"));
    for secret in [TOKEN, "ghp_wrongToken", encoded.as_str(), "Basic "] {
        assert!(!dump.contains(secret), "log leaks {secret:?}: {dump}");
    }

    host.clear_requests();
    assert!(host.requests().is_empty());
}

/// The server has its own runtime, so a test that blocks its (current-thread) runtime with a
/// synchronous git call still gets served instead of deadlocking.
#[tokio::test]
async fn blocking_git_client_on_a_current_thread_runtime() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    let client = Client::new();
    let out = std::process::Command::new("git")
        .current_dir(client.dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", client.path("home"))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", &client.askpass)
        .env("TOKEN", TOKEN)
        .args(["clone", "--quiet", &host.url("repo"), "sync"])
        .output()
        .expect("run git");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(client.path("sync").join("a.txt").is_file());
}

#[tokio::test]
async fn stop_refuses_new_connections() {
    let mut host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    let port = host.port();
    host.stop().await;
    // Usually the connection is refused. On a busy machine another process may already have
    // been given the freed port, so the real check is that nobody answers as our git host.
    if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        let req = format!(
            "GET /repo.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: {}\r\nConnection: close\r\n\r\n",
            basic("oauth2", TOKEN)
        );
        let _ = stream.write_all(req.as_bytes()).await;
        let mut resp = Vec::new();
        let _ = stream.read_to_end(&mut resp).await;
        assert!(
            !String::from_utf8_lossy(&resp).contains("refs/heads/main"),
            "the stopped host still serves git"
        );
    }
    // The helpers still read the repositories until the host is dropped.
    assert!(host.branch_sha("repo", "main").is_some());
    let client = Client::new();
    let out = client.clone(TOKEN, &host.url("repo"), "gone").await;
    assert!(!out.status.success());
}

#[tokio::test]
async fn invalid_names_are_refused() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    assert!(host.create_repo("../escape", &[]).is_err());
    assert!(host.create_repo("repo.git", &[]).is_err());
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    assert!(
        host.create_repo("repo", &[]).is_err(),
        "no silent overwrite"
    );
    assert!(host.create_large_repo("empty", 10, 0).is_err());
}

/// git compresses fetch requests larger than 1 KiB (`Content-Encoding: gzip`); the host must
/// pass that on to `git http-backend` or the clone breaks. Forty branches with distinct tips
/// make the clone's "want" list large enough.
#[tokio::test]
async fn gzip_request_bodies_are_understood() {
    let host = GitHost::start(TOKEN).await.expect("start git host");
    host.create_repo("repo", &[("a.txt", "a\n")])
        .expect("create repo");
    for i in 0..40 {
        let content = format!("branch {i}\n");
        host.create_branch("repo", &format!("topic/{i:02}"), &[("topic.txt", &content)])
            .expect("create branch");
    }
    let client = Client::new();
    let trace = client.path("curl-trace.txt");
    let out = client
        .command(TOKEN, client.dir.path())
        .env("GIT_TRACE_CURL", &trace)
        .env("GIT_TRACE_CURL_NO_DATA", "1")
        .args([
            "clone",
            "--quiet",
            "--no-single-branch",
            &host.url("repo"),
            "work",
        ])
        .output()
        .await
        .expect("run git");
    assert!(out.status.success(), "clone: {}", stderr(&out));
    let trace = std::fs::read_to_string(&trace).expect("read curl trace");
    assert!(
        trace
            .to_ascii_lowercase()
            .contains("content-encoding: gzip"),
        "the clone sent a gzip body (otherwise this test proves nothing)"
    );
    let remote = client
        .git_ok(
            TOKEN,
            &client.path("work"),
            &["rev-parse", "origin/topic/39"],
        )
        .await;
    assert_eq!(
        Some(remote.trim().to_owned()),
        host.branch_sha("repo", "topic/39")
    );
}
