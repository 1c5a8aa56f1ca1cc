//! The forge double against the documented GitHub and GitLab behaviour, through raw HTTP/1.1
//! (no client library between the test and the wire).

use std::collections::HashMap;

use repobox_testbed::forge::{AuthScheme, Fault, ForgeKind};
use repobox_testbed::githost::GitHost;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "ghp_forgeDoubleToken0123456789";

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Value,
}

/// One request on a fresh connection; `headers` as (name, value).
async fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, String)>,
) -> Reply {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some((ctype, b)) = &body {
        req.push_str(&format!(
            "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some((_, b)) = &body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

const UA: (&str, &str) = ("User-Agent", "forge-test");

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

#[tokio::test]
async fn github_endpoints_auth_validation_and_pagination() {
    let host = GitHost::start_with_forge(TOKEN, ForgeKind::GitHub)
        .await
        .unwrap();
    host.create_repo("acme/api", &[("README.md", "x\n")])
        .unwrap();
    host.create_branch("acme/api", "feature", &[("F.md", "f\n")])
        .unwrap();
    host.create_branch_at("acme/api", "same", "main").unwrap();
    let port = host.port();
    let forge = host.forge().unwrap().clone();
    let auth = bearer();

    let r = send(port, "GET", "/api/v3/repos/acme/api", &[UA], None).await;
    assert_eq!(
        (r.status, r.body["message"].as_str()),
        (401, Some("Requires authentication"))
    );
    let r = send(
        port,
        "GET",
        "/api/v3/repos/acme/api",
        &[UA, ("Authorization", "Bearer nope")],
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.body["message"].as_str()),
        (401, Some("Bad credentials"))
    );
    let r = send(
        port,
        "GET",
        "/api/v3/repos/acme/api",
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, 403, "GitHub requires a User-Agent");
    let legacy = format!("token {TOKEN}");
    let r = send(
        port,
        "GET",
        "/api/v3/repos/acme/api",
        &[UA, ("Authorization", &legacy)],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["default_branch"], "main");
    assert_eq!(r.body["full_name"], "acme/api");
    let r = send(
        port,
        "GET",
        "/api/v3/repos/acme/nope",
        &[UA, ("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.body["message"].as_str()),
        (404, Some("Not Found"))
    );

    let create = |head: &str, base: &str| {
        Some((
            "application/json",
            json!({"title": "T", "head": head, "base": base, "body": "B"}).to_string(),
        ))
    };
    let h = [UA, ("Authorization", auth.as_str())];
    let r = send(
        port,
        "POST",
        "/api/v3/repos/acme/api/pulls",
        &h,
        create("missing", "main"),
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["errors"][0]["field"], "head");
    let r = send(
        port,
        "POST",
        "/api/v3/repos/acme/api/pulls",
        &h,
        create("same", "main"),
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.body["errors"][0]["message"],
        "No commits between main and same"
    );
    let r = send(
        port,
        "POST",
        "/api/v3/repos/acme/api/pulls",
        &h,
        create("acme:feature", "main"),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["number"], 1);
    assert_eq!(r.body["head"]["ref"], "feature");
    assert_eq!(r.body["base"]["ref"], "main");
    assert_eq!(r.body["html_url"], forge.web_url("acme/api", 1));
    assert!(r.headers["location"].ends_with("/api/v3/repos/acme/api/pulls/1"));
    let r = send(
        port,
        "POST",
        "/api/v3/repos/acme/api/pulls",
        &h,
        create("feature", "main"),
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["message"], "Validation Failed");
    assert_eq!(
        r.body["errors"][0]["message"],
        "A pull request already exists for acme:feature."
    );

    // Filters and pages: three open requests of `feature`, two per page.
    forge.seed("acme/api", "feature", "dev", "x");
    forge.seed("acme/api", "feature", "rel", "y");
    forge.seed("acme/api", "other", "main", "z");
    let closed = forge.seed("acme/api", "feature", "old", "w");
    forge.close("acme/api", closed);
    let list = "/api/v3/repos/acme/api/pulls?state=open&head=acme%3Afeature&per_page=2";
    let r = send(port, "GET", list, &h, None).await;
    assert_eq!(r.status, 200);
    let numbers: Vec<u64> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2]);
    let link = &r.headers["link"];
    assert!(
        link.contains("rel=\"next\"") && link.contains("rel=\"last\""),
        "{link}"
    );
    let next = link
        .split(',')
        .find(|l| l.contains("rel=\"next\""))
        .unwrap();
    let next = next
        .trim()
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap();
    let path = next.strip_prefix(&host.base_url()).unwrap();
    assert!(
        path.contains("head=acme%3Afeature") && path.contains("page=2"),
        "{path}"
    );
    let r = send(port, "GET", path, &h, None).await;
    let numbers: Vec<u64> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [3]);
    assert!(!r.headers["link"].contains("rel=\"next\""));
    // One page: no Link header at all, as GitHub does.
    let r = send(
        port,
        "GET",
        "/api/v3/repos/acme/api/pulls?head=acme%3Aother",
        &h,
        None,
    )
    .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    assert!(!r.headers.contains_key("link"));

    // Everything was recorded, without the token.
    let reqs = forge.requests();
    assert_eq!(reqs.len(), 12);
    assert_eq!(reqs[0].auth, AuthScheme::None);
    assert_eq!(
        (reqs[1].auth, reqs[1].authorized),
        (AuthScheme::Bearer, false)
    );
    assert_eq!(
        (reqs[3].auth, reqs[3].authorized),
        (AuthScheme::Token, true)
    );
    assert_eq!(reqs[7].body.as_ref().unwrap()["head"], "acme:feature");
    assert!(!format!("{reqs:?}").contains(TOKEN));
    // The git side is untouched by API calls.
    assert!(host.requests().is_empty());
}

#[tokio::test]
async fn gitlab_endpoints_auth_conflict_and_pagination() {
    let host = GitHost::start_with_forge(TOKEN, ForgeKind::GitLab)
        .await
        .unwrap();
    host.create_repo("grp/sub/proj", &[("README.md", "x\n")])
        .unwrap();
    host.create_branch("grp/sub/proj", "feature", &[("F.md", "f\n")])
        .unwrap();
    let port = host.port();
    let forge = host.forge().unwrap().clone();
    let project = "/api/v4/projects/grp%2Fsub%2Fproj";

    let r = send(port, "GET", project, &[], None).await;
    assert_eq!(
        (r.status, r.body["message"].as_str()),
        (401, Some("401 Unauthorized"))
    );
    let r = send(port, "GET", project, &[("PRIVATE-TOKEN", "nope")], None).await;
    assert_eq!(r.status, 401);
    let r = send(port, "GET", project, &[("PRIVATE-TOKEN", TOKEN)], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["path_with_namespace"], "grp/sub/proj");
    assert_eq!(r.body["default_branch"], "main");
    let id = r.body["id"].as_u64().unwrap();
    // The numeric id and an OAuth-style Bearer header work too.
    let auth = bearer();
    let r = send(
        port,
        "GET",
        &format!("/api/v4/projects/{id}"),
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!((r.status, r.body["id"].as_u64()), (200, Some(id)));
    let r = send(
        port,
        "GET",
        "/api/v4/projects/grp%2Fnope",
        &[("PRIVATE-TOKEN", TOKEN)],
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.body["message"].as_str()),
        (404, Some("404 Project Not Found"))
    );

    let h = [("PRIVATE-TOKEN", TOKEN)];
    let mrs = format!("{project}/merge_requests");
    let form = |title: &str| {
        Some((
            "application/x-www-form-urlencoded",
            format!("source_branch=feature&target_branch=main&title={title}&description=d"),
        ))
    };
    let r = send(port, "POST", &mrs, &h, form("")).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (400, Some("title is missing"))
    );
    let r = send(port, "POST", &mrs, &h, form("Add%20F")).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["iid"], 1);
    assert_eq!(r.body["title"], "Add F");
    assert_eq!(r.body["state"], "opened");
    assert_eq!(r.body["web_url"], forge.web_url("grp/sub/proj", 1));
    let r = send(port, "POST", &mrs, &h, form("again")).await;
    assert_eq!(r.status, 409);
    assert_eq!(
        r.body["message"][0],
        "Another open merge request already exists for this source branch: !1"
    );
    let json_body = Some((
        "application/json",
        json!({"source_branch": "nope", "target_branch": "main", "title": "t"}).to_string(),
    ));
    let r = send(port, "POST", &mrs, &h, json_body).await;
    assert_eq!(r.status, 422);

    forge.seed("grp/sub/proj", "feature", "dev", "x");
    forge.seed("grp/sub/proj", "feature", "rel", "y");
    let r = send(
        port,
        "GET",
        &format!("{mrs}?state=opened&source_branch=feature&per_page=2"),
        &h,
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    assert_eq!(r.body[0]["iid"], 3, "newest first");
    assert_eq!(
        (
            r.headers["x-page"].as_str(),
            r.headers["x-next-page"].as_str(),
            r.headers["x-total"].as_str(),
            r.headers["x-total-pages"].as_str()
        ),
        ("1", "2", "3", "2")
    );
    assert!(r.headers["link"].contains("rel=\"next\""));
    let r = send(
        port,
        "GET",
        &format!("{mrs}?state=opened&source_branch=feature&per_page=2&page=2"),
        &h,
        None,
    )
    .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    assert_eq!(r.headers["x-next-page"], "");

    let reqs = forge.requests();
    assert_eq!(reqs[2].auth, AuthScheme::PrivateToken);
    assert_eq!(reqs[3].auth, AuthScheme::Bearer);
    assert_eq!(
        reqs[6].body.as_ref().unwrap()["title"],
        "Add F",
        "form bodies are recorded"
    );
    assert!(!format!("{reqs:?}").contains(TOKEN));
}

#[tokio::test]
async fn faults_before_and_after_the_request_takes_effect() {
    let host = GitHost::start_with_forge(TOKEN, ForgeKind::GitHub)
        .await
        .unwrap();
    host.create_repo("acme/api", &[("README.md", "x\n")])
        .unwrap();
    host.create_branch("acme/api", "feature", &[("F.md", "f\n")])
        .unwrap();
    let forge = host.forge().unwrap().clone();
    let auth = bearer();
    let h = [UA, ("Authorization", auth.as_str())];
    let body = || {
        Some((
            "application/json",
            json!({"title": "T", "head": "feature", "base": "main"}).to_string(),
        ))
    };
    forge.fail_next("POST", Fault::Before(503));
    let r = send(
        host.port(),
        "POST",
        "/api/v3/repos/acme/api/pulls",
        &h,
        body(),
    )
    .await;
    assert_eq!(r.status, 503);
    assert!(forge.pull_requests().is_empty());
    forge.fail_next("POST", Fault::After(502));
    // A GET in between does not consume the POST's fault.
    let r = send(host.port(), "GET", "/api/v3/repos/acme/api", &h, None).await;
    assert_eq!(r.status, 200);
    let r = send(
        host.port(),
        "POST",
        "/api/v3/repos/acme/api/pulls",
        &h,
        body(),
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(
        forge.pull_requests().len(),
        1,
        "created, though the answer was lost"
    );
    // Token rotation reaches the API too.
    host.set_token("ghp_rotatedToken0123456789");
    let r = send(host.port(), "GET", "/api/v3/repos/acme/api", &h, None).await;
    assert_eq!(r.status, 401);
}
