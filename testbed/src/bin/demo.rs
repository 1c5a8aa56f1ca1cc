//! `repobox-demo`: the whole Repobox runner side working on one machine, with no cluster.
//!
//! Starts a real `redis-server`, a local smart-HTTP git host with a sample repository, and a
//! Kubernetes API: when `REPOBOX_K8S_ASSETS` names the Kubernetes binaries, a REAL control plane
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler; the real Job controller) with
//! the test bed's kubelet running the pods as isolated local processes; otherwise the Kubernetes
//! API emulator and the cluster simulator. Either way each Job's pod runs the real
//! `repobox-job-runner`, and the real `repobox-operator` binary runs as a child process. It submits five jobs for two users exactly as the web app does, prints a
//! `kubectl get repoboxjobs`-style table every time a RepoboxJob changes (driven by a watch), and
//! finally shows the pushed branches, the job records and one job's output from Redis.
//!
//! It doubles as a smoke test: the exit code is 0 only when every job succeeded, its branch is on
//! the git host at the recorded commit, and the quotas were never exceeded. Run it with
//! `make demo` (`scripts/demo.sh`), which installs what is missing and builds the binaries first.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, CustomResourceExt, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis::AsyncCommands;
use repobox_contract::{EncryptionKey, keys, mask_token};
use repobox_operator::model::crd::{RepoboxJob, RepoboxJobPhase};
use repobox_testbed::control_plane::ControlPlane;
use repobox_testbed::emulator::Emulator;
use repobox_testbed::forge::ForgeKind;
use repobox_testbed::githost::GitHost;
use repobox_testbed::kubelet::{Kubelet, KubeletConfig, NodeSettings};
use repobox_testbed::redis_server::RedisServer;
use repobox_testbed::simulator::{ClusterSimulator, SimulatorConfig};
use repobox_testbed::webapp::{self, NewJob};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

/// The namespace of the RepoboxJobs, Jobs and Secrets.
const NS: &str = "repobox";
/// The sample repository on the local git host.
const REPO: &str = "acme/webshop";
/// The users' git token (the local git host accepts exactly this one). Never printed in full.
const TOKEN: &str = "ghp_demoToken0123456789abcdefGHIJ";
/// The 32-byte `ENCRYPTION_KEY` shared by the web app and the runners, as 64 hex characters.
const KEY_HEX: &str = "9c1f0e2d3b4a59687f8e9d0c1b2a39485f6e7d8c9b0a1928374655647382910a";
const MAX_JOBS_PER_USER: usize = 2;
const MAX_CONCURRENT_JOBS: usize = 3;
/// The agent: waits a little (so the quotas are visible), then makes a visible change.
const AGENT_COMMAND: &str = r#"sleep 2; printf '\n## %s\n\n%s\n' "$REPOBOX_BRANCH" "$(cat "$REPOBOX_PROMPT_FILE")" >> CHANGES.md; echo "demo agent: recorded the request in CHANGES.md""#;
/// Everything, including start-up and cleanup of a stuck run, ends within this.
const HARD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the five jobs may take from submission to the last terminal phase.
const JOBS_TIMEOUT: Duration = Duration::from_secs(180);
/// Start-up waits (CRD established, operator ready).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Watch events arriving this soon after another are shown in the same table.
const COALESCE: Duration = Duration::from_millis(250);

/// The jobs the demo submits: (user, prompt), in submission order.
const JOBS: [(&str, &str); 5] = [
    ("alice", "Add a /healthz endpoint to the shop server"),
    ("alice", "Fix the typo in the README"),
    ("alice", "Add type hints to shop.py"),
    ("bob", "Add an Apache-2.0 LICENSE file"),
    ("bob", "Document the environment variables in the README"),
];

/// Every part the demo starts, so that cleanup can stop whatever was started.
#[derive(Default)]
struct Parts {
    dir: Option<tempfile::TempDir>,
    redis: Option<RedisServer>,
    git: Option<GitHost>,
    emu: Option<Emulator>,
    sim: Option<ClusterSimulator>,
    control_plane: Option<ControlPlane>,
    kubelet: Option<Kubelet>,
    operator: Option<Child>,
    operator_log: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let started = Instant::now();
    let mut parts = Parts::default();
    let result = tokio::select! {
        r = tokio::time::timeout(HARD_TIMEOUT, run(&mut parts, started)) => r.unwrap_or_else(|_| {
            Err(anyhow!("the demo did not finish within {}s", HARD_TIMEOUT.as_secs()))
        }),
        name = shutdown_signal() => Err(anyhow!("interrupted by {name}")),
    };
    if let Err(e) = &result {
        eprintln!("\nERROR: {e:#}");
        if let Some(log) = &parts.operator_log {
            print_log_tail(log, 40);
        }
    }
    section("Cleaning up");
    let keep = result.is_err() && parts.operator_log.is_some();
    parts.cleanup(keep).await;
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            println!(
                "\nDEMO PASSED in {secs:.1}s: all {} jobs succeeded and their branches were pushed.",
                JOBS.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nDEMO FAILED after {secs:.1}s: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(parts: &mut Parts, started: Instant) -> Result<()> {
    let assets = ControlPlane::assets();
    if let Some(assets) = &assets {
        println!(
            "Repobox demo: the operator and the job-runner on a REAL Kubernetes control plane"
        );
        println!(
            "================================================================================="
        );
        println!(
            "Control plane: the real kube-apiserver, kube-controller-manager (Job controller,"
        );
        println!(
            "garbage collector) and kube-scheduler from REPOBOX_K8S_ASSETS={},",
            assets.display()
        );
        println!(
            "with etcd. No real kubelet: the test bed's kubelet registers a Node and runs each"
        );
        println!("pod's containers as isolated local processes of the real repobox-job-runner.");
    } else {
        println!("Repobox demo: the operator and the job-runner on an EMULATED Kubernetes cluster");
        println!(
            "================================================================================="
        );
        println!(
            "No real Kubernetes cluster is used (set REPOBOX_K8S_ASSETS to the directory of the"
        );
        println!("kube-apiserver, kube-controller-manager and kube-scheduler binaries for a real");
        println!(
            "control plane). The API server is the test bed's stateful Kubernetes API emulator"
        );
        println!(
            "(a Python process that stores objects and serves watches), and a cluster simulator"
        );
        println!(
            "plays the Job controller and the kubelet: it runs each Job's container as a local"
        );
        println!("process of the real repobox-job-runner binary.");
    }
    println!("Redis, the git host, the operator and the job-runner are the real programs;");
    println!("everything runs on 127.0.0.1 and is removed at the end.");

    let dir = tempfile::Builder::new()
        .prefix("repobox-demo-")
        .tempdir()
        .context("create the demo's temporary directory")?;
    let dir_path = dir.path().to_path_buf();
    parts.dir = Some(dir);
    let (operator_bin, runner_bin) = binaries()?;

    section("1. Redis");
    let redis = parts.redis.insert(RedisServer::start().await.context(
        "start redis-server (install it with `apt-get install redis-server` or run `make demo`)",
    )?);
    let redis_url = redis.url();
    let mut con = redis.connection().await;
    println!("redis-server (real) listening at {redis_url}");

    section("2. Git host with a sample repository");
    let git = parts
        .git
        .insert(GitHost::start_with_forge(TOKEN, ForgeKind::GitHub).await?);
    let files = sample_files();
    git.create_repo(REPO, &files)?;
    let repo_url = git.url(REPO);
    println!("smart-HTTP git host (real `git http-backend`, basic auth oauth2:<token>),");
    println!("with the GitHub Enterprise API double at /api/v3 (pull requests, Bearer token)");
    println!("repository {repo_url}, branch main:");
    for (path, content) in &files {
        println!("  {path:<18} {} lines", content.lines().count());
    }

    // The local git host speaks plain HTTP; production git hosts are HTTPS only.
    let runner_env = vec![("ALLOW_INSECURE_HTTP".to_owned(), "true".to_owned())];
    let (client, kubeconfig) = if let Some(assets) = &assets {
        section("3. Real Kubernetes control plane and the test bed's kubelet");
        let cp = parts.control_plane.insert(
            ControlPlane::start_with(assets)
                .await
                .context("start the control plane from REPOBOX_K8S_ASSETS")?,
        );
        let client = cp.client()?;
        println!(
            "control plane at {} started in {:.1}s (kube-apiserver, kube-controller-manager, kube-scheduler v1.28 + etcd), kubeconfig {}",
            cp.server_url(),
            cp.started_in().as_secs_f64(),
            cp.kubeconfig_path().display()
        );
        install_crd(&client).await?;
        create_namespace_and_secrets(&client, &redis_url, true).await?;
        let kubelet = Kubelet::start(
            client.clone(),
            KubeletConfig {
                nodes: vec![NodeSettings::new("demo-node")],
                binaries: HashMap::from([("repobox-job-runner".to_owned(), runner_bin.clone())]),
                api_server: Some(cp.server_url().to_owned()),
                max_grace_period: Some(Duration::from_secs(5)),
                extra_env: runner_env,
                ..Default::default()
            },
        )
        .await
        .context("start the kubelet")?;
        println!(
            "kubelet: Node demo-node registered; pods run {} as local processes ({})",
            runner_bin.display(),
            if kubelet.isolates() {
                "isolated: own mount/PID namespaces and users per container"
            } else {
                "NOT isolated: not running as root"
            }
        );
        parts.kubelet = Some(kubelet);
        (client, cp.kubeconfig_path())
    } else {
        section("3. Emulated Kubernetes API and cluster simulator");
        let emu = parts.emu.insert(
            Emulator::start()
                .await
                .context("start the Kubernetes API emulator (needs the .venv: run `make demo`)")?,
        );
        let kubeconfig = emu.kubeconfig_path();
        let client = emu.client()?;
        println!(
            "API emulator at {}, kubeconfig {}",
            emu.url(),
            kubeconfig.display()
        );
        install_crd(&client).await?;
        create_namespace_and_secrets(&client, &redis_url, false).await?;
        let sim = ClusterSimulator::start(
            client.clone(),
            SimulatorConfig {
                namespace: Some(NS.into()),
                binaries: HashMap::from([("repobox-job-runner".to_owned(), runner_bin.clone())]),
                max_grace_period: Some(Duration::from_secs(5)),
                extra_env: runner_env,
                ..Default::default()
            },
        )
        .await?;
        parts.sim = Some(sim);
        println!(
            "cluster simulator: Jobs in namespace {NS} run {} as local processes",
            runner_bin.display()
        );
        (client, kubeconfig)
    };

    section("4. The operator (real binary, child process)");
    let log_path = dir_path.join("operator.log");
    let metrics_addr = format!("127.0.0.1:{}", repobox_testbed::free_port());
    let args = [
        "--redis-url",
        &redis_url,
        "--jobs-namespace",
        NS,
        "--runner-id",
        "demo-operator",
        "--metrics-addr",
        &metrics_addr,
        "--max-jobs-per-user",
        &MAX_JOBS_PER_USER.to_string(),
        "--max-concurrent-jobs",
        &MAX_CONCURRENT_JOBS.to_string(),
        "--agent-command",
        AGENT_COMMAND,
        "--log-format",
        "text",
        "--log-level",
        "info",
    ]
    .map(str::to_owned);
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let child = Command::new(&operator_bin)
        .args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", operator_bin.display()))?;
    parts.operator_log = Some(log_path.clone());
    let operator = parts.operator.insert(child);
    println!(
        "KUBECONFIG={} {} \\\n    --redis-url {} --jobs-namespace {NS} --metrics-addr {metrics_addr} \\\n    \
         --max-jobs-per-user {MAX_JOBS_PER_USER} --max-concurrent-jobs {MAX_CONCURRENT_JOBS} --log-format text \\\n    \
         --agent-command {}",
        kubeconfig.display(),
        operator_bin.display(),
        redis_url,
        shell_quote(AGENT_COMMAND),
    );
    println!("operator log: {}", log_path.display());
    wait_ready(operator, &metrics_addr).await?;
    println!("operator ready (/readyz on {metrics_addr} answers 200)");

    section("5. Submitting jobs the way the web app does");
    let key = EncryptionKey::parse(KEY_HEX).context("the demo key")?;
    let api: Api<RepoboxJob> = Api::namespaced(client.clone(), NS);
    // The watch starts before the first XADD, so every phase is seen.
    let mut changes = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut submitted: Vec<NewJob> = Vec::new();
    for user in ["alice", "bob"] {
        let git_base = parts.git.as_ref().context("git host")?.base_url();
        webapp::create_provider(&mut con, user, "github-1", &key, TOKEN, &git_base).await?;
        let encrypted: String = con
            .hget(keys::git_provider(user, "github-1"), "encryptedToken")
            .await?;
        println!(
            "HSET {} type github baseUrl {git_base} encryptedToken {}…  (token {} encrypted with AES-256-GCM, iv:tag:ciphertext)",
            keys::git_provider(user, "github-1"),
            &encrypted[..encrypted.len().min(24)],
            mask_token(TOKEN),
        );
    }
    for (user, prompt) in JOBS {
        let id = uuid_v4();
        let job = NewJob::new(&id, user, &repo_url, prompt);
        let entry = webapp::submit(&mut con, &job).await?;
        println!(
            "HSET job:{id} userId {user} repoUrl … prompt {prompt:?} status pending; XADD {} → {entry}",
            keys::JOBS_STREAM
        );
        submitted.push(job);
    }
    println!(
        "\nQuotas: at most {MAX_JOBS_PER_USER} jobs per user and {MAX_CONCURRENT_JOBS} in all run at once; the others wait in Queued."
    );

    section(
        "6. RepoboxJobs (a table like `kubectl get repoboxjobs -n repobox`, printed on every change)",
    );
    let jobs = follow(&mut changes, submitted.len(), started).await?;
    drop(changes);

    section(if assets.is_some() {
        "7. kubectl against the control plane"
    } else {
        "7. kubectl against the emulator"
    });
    run_kubectl(&kubeconfig, &dir_path, assets.is_some()).await;

    section("8. Branches on the git host");
    let git = parts.git.as_ref().context("git host")?;
    for branch in git.branches(REPO) {
        let sha = git.rev_parse(REPO, &branch)?;
        let message = git.commit_message(REPO, &branch)?;
        let subject = message.lines().next().unwrap_or_default();
        println!("{branch:<18} {}  {subject}", &sha[..12]);
    }

    section("9. Job records in Redis (job:{id})");
    let mut problems = Vec::new();
    println!(
        "{:<38} {:<6} {:<8} {:<18} {:<14} {:<6} ERROR",
        "JOB", "USER", "STATUS", "BRANCH", "COMMIT", "PR"
    );
    let mut records = Vec::new();
    for job in &submitted {
        let rec: HashMap<String, String> = con.hgetall(keys::job(&job.id)).await?;
        let get = |k: &str| rec.get(k).cloned().unwrap_or_default();
        let (status, branch, sha, error) =
            (get("status"), get("branch"), get("commitSha"), get("error"));
        let (pr_number, pr_error) = (get("prNumber"), get("prError"));
        let pr = if pr_number.is_empty() {
            String::new()
        } else {
            format!("#{pr_number}")
        };
        println!(
            "{:<38} {:<6} {:<8} {:<18} {:<14} {:<6} {}",
            job.id,
            job.user_id,
            status,
            or_dash(&branch),
            or_dash(&sha[..sha.len().min(12)]),
            or_dash(&pr),
            or_dash(if error.is_empty() { &pr_error } else { &error })
        );
        if !branch.is_empty() && pr_number.is_empty() {
            problems.push(format!(
                "job {}: pushed {branch} but opened no pull request ({pr_error})",
                job.id
            ));
        }
        records.push((job.id.clone(), status, branch, sha));
    }
    for (id, status, branch, sha) in &records {
        if status != "success" {
            problems.push(format!("job {id} has status {status:?}, expected success"));
        } else if git.branch_sha(REPO, branch).as_deref() != Some(sha.as_str()) {
            problems.push(format!(
                "job {id}: branch {branch:?} is not on the git host at commit {sha}"
            ));
        }
    }

    if let Some(job) = submitted.first() {
        section(&format!(
            "10. Output of job {} ({})",
            job.id,
            keys::job_output(&job.id)
        ));
        let lines: Vec<String> = con.lrange(keys::job_output(&job.id), 0, 19).await?;
        let total: usize = con.llen(keys::job_output(&job.id)).await?;
        for line in &lines {
            println!("  {line}");
        }
        if total > lines.len() {
            println!("  … ({} more lines)", total - lines.len());
        }
        if let Some(branch) = records.first().map(|r| &r.2)
            && let Some(changes) = git.file_at(REPO, branch, "CHANGES.md")
        {
            println!("\nCHANGES.md on {branch} (the agent's change):");
            for line in changes.lines() {
                println!("  {line}");
            }
        }
    }

    for rj in jobs.values() {
        if rj.phase() != RepoboxJobPhase::Succeeded {
            problems.push(format!("RepoboxJob {} ended {}", rj.name_any(), rj.phase()));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// The operator and job-runner binaries built next to this one.
fn binaries() -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context("locate the demo binary")?;
    let dir = exe.parent().context("the demo binary's directory")?;
    let operator = dir.join("repobox-operator");
    let runner = dir.join("repobox-job-runner");
    for bin in [&operator, &runner] {
        ensure!(
            bin.is_file(),
            "{} is missing: build it first with `cargo build -p repobox-operator -p repobox-job-runner -p repobox-testbed --bins` (or run `make demo`)",
            bin.display()
        );
    }
    Ok((operator, runner))
}

fn sample_files() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "README.md",
            "# webshop\n\nA tiny shop server used by the Repobox demo.\n\nRun it with `python3 src/shop.py`.\nTeh prices are in cents.\n",
        ),
        ("CHANGES.md", "# Changes\n"),
        (
            "src/shop.py",
            "from http.server import BaseHTTPRequestHandler, HTTPServer\n\nPRICES = {\"apple\": 50, \"pear\": 70}\n\n\nclass Shop(BaseHTTPRequestHandler):\n    def do_GET(self):\n        item = self.path.strip(\"/\")\n        price = PRICES.get(item)\n        self.send_response(200 if price else 404)\n        self.end_headers()\n        self.wfile.write(str(price).encode())\n\n\nif __name__ == \"__main__\":\n    HTTPServer((\"127.0.0.1\", 8000), Shop).serve_forever()\n",
        ),
        ("requirements.txt", "# no dependencies\n"),
    ]
}

/// Installs the RepoboxJob CRD (what `kubectl apply -f crds/` does) and waits until it is served.
async fn install_crd(client: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &RepoboxJob::crd())
        .await
        .context("create the RepoboxJob CRD")?;
    tokio::time::timeout(
        STARTUP_TIMEOUT,
        await_condition(
            crds,
            "repoboxjobs.repobox.dev",
            conditions::is_crd_established(),
        ),
    )
    .await
    .context("the CRD was not established in time")??;
    println!("CustomResourceDefinition repoboxjobs.repobox.dev created and established");
    Ok(())
}

/// The namespace (enforcing Pod Security `restricted` on a real API server) and the two
/// Secrets the runner Jobs reference.
async fn create_namespace_and_secrets(client: &Client, redis_url: &str, real: bool) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            labels: real.then(|| {
                BTreeMap::from([(
                    "pod-security.kubernetes.io/enforce".to_owned(),
                    "restricted".to_owned(),
                )])
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .context("create the namespace")?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    for (name, key, value) in [
        ("repobox-redis", "url", redis_url),
        ("repobox-encryption-key", "key", KEY_HEX),
    ] {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([(key.to_owned(), value.to_owned())])),
            ..Default::default()
        };
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .with_context(|| format!("create Secret {name}"))?;
    }
    // The runner pods' identity, as the chart creates it: without it a real API server's
    // ServiceAccount admission refuses the Job controller's pods.
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("repobox-runner".into()),
            ..Default::default()
        },
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &account)
        .await
        .context("create ServiceAccount repobox-runner")?;
    println!(
        "namespace {NS}; Secrets repobox-redis (url) and repobox-encryption-key (key) and ServiceAccount repobox-runner created"
    );
    Ok(())
}

/// Waits until the operator's `/readyz` answers 200, failing early if the process exits.
async fn wait_ready(operator: &mut Child, addr: &str) -> Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(status) = operator.try_wait()? {
            bail!("the operator exited during start-up ({status})");
        }
        let last = match http_get(addr, "/readyz").await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("{code}: {}", body.trim()),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "the operator was not ready within {}s (last /readyz: {last})",
                STARTUP_TIMEOUT.as_secs()
            );
        }
        // The operator has no readiness event to await from outside: poll its probe briefly.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A minimal HTTP/1.1 GET: (status, body).
async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await??;
    let text = String::from_utf8_lossy(&response);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP response")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok((code, body.to_owned()))
}

/// Follows the RepoboxJobs through the watch until `expected` of them are in a terminal phase,
/// printing the table whenever a visible column changed. Checks the quotas along the way.
async fn follow(
    changes: &mut (impl futures::Stream<Item = Result<RepoboxJob, watcher::Error>> + Unpin),
    expected: usize,
    started: Instant,
) -> Result<BTreeMap<String, RepoboxJob>> {
    let deadline = tokio::time::Instant::now() + JOBS_TIMEOUT;
    let mut jobs: BTreeMap<String, RepoboxJob> = BTreeMap::new();
    let mut shown: Vec<Vec<String>> = Vec::new();
    let mut states: HashMap<String, String> = HashMap::new();
    let mut waited = std::collections::BTreeSet::<String>::new();
    let (mut max_total, mut max_user) = (0usize, BTreeMap::<String, usize>::new());
    loop {
        let first = match tokio::time::timeout_at(deadline, changes.next()).await {
            Err(_) => {
                print_table(&jobs);
                bail!(
                    "not all jobs finished within {}s (see the table above)",
                    JOBS_TIMEOUT.as_secs()
                )
            }
            Ok(None) => bail!("the RepoboxJob watch ended"),
            Ok(Some(event)) => event,
        };
        // Updates come in bursts (one admission pass patches several jobs): gather what arrives
        // within a short window after the first one, so that one burst prints one table.
        let mut batch = vec![first];
        let window = tokio::time::Instant::now() + COALESCE;
        while let Ok(Some(event)) = tokio::time::timeout_at(window, changes.next()).await {
            batch.push(event);
        }
        // Every intermediate state is kept in the transition lines.
        let mut transitions: Vec<(String, String, Vec<String>)> = Vec::new();
        for event in batch {
            let rj = match event {
                Ok(rj) => rj,
                Err(e) => {
                    eprintln!("watch error (the watcher retries): {e}");
                    continue;
                }
            };
            let name = rj.name_any();
            let now = state(&rj);
            let before = states.insert(name.clone(), now.clone());
            if before.as_ref() != Some(&now) {
                if now.contains("QuotaExceeded") {
                    waited.insert(name.clone());
                }
                match transitions.iter_mut().find(|t| t.0 == name) {
                    Some(t) => t.2.push(now),
                    None => transitions.push((
                        name.clone(),
                        rj.spec.user_id.clone(),
                        before.into_iter().chain([now]).collect(),
                    )),
                }
            }
            jobs.insert(name, rj);
            // Concurrency after every single update, not just per burst.
            let admitted: Vec<&RepoboxJob> = jobs
                .values()
                .filter(|rj| rj.phase().is_admitted())
                .collect();
            max_total = max_total.max(admitted.len());
            for user in ["alice", "bob"] {
                let n = admitted.iter().filter(|rj| rj.spec.user_id == user).count();
                let m = max_user.entry(user.to_owned()).or_default();
                *m = (*m).max(n);
            }
        }

        let rows = rows(&jobs, None);
        if rows != shown {
            println!("\n[{:>5.1}s]", started.elapsed().as_secs_f64());
            for (name, user, chain) in &transitions {
                println!("  {} ({user}): {}", short(name), chain.join(" → "));
            }
            print_table(&jobs);
            shown = rows;
        }
        if jobs.len() >= expected && jobs.values().all(|rj| rj.phase().is_terminal()) {
            break;
        }
    }

    println!();
    let peak_users = max_user
        .iter()
        .map(|(u, n)| format!("{u} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "Peak concurrency seen by the watch: {max_total} jobs in all (limit {MAX_CONCURRENT_JOBS}); per user: {peak_users} (limit {MAX_JOBS_PER_USER})."
    );
    if waited.is_empty() {
        println!("No job had to wait for a quota slot this time.");
    } else {
        println!(
            "{} of {} jobs waited in Queued for a quota slot (UserQuotaExceeded / ClusterQuotaExceeded).",
            waited.len(),
            jobs.len()
        );
    }
    ensure!(
        max_total <= MAX_CONCURRENT_JOBS,
        "{max_total} jobs were admitted at once, more than MAX_CONCURRENT_JOBS={MAX_CONCURRENT_JOBS}"
    );
    if let Some((user, n)) = max_user.iter().find(|(_, n)| **n > MAX_JOBS_PER_USER) {
        bail!(
            "{n} of {user}'s jobs were admitted at once, more than MAX_JOBS_PER_USER={MAX_JOBS_PER_USER}"
        );
    }
    Ok(jobs)
}

/// `Queued (UserQuotaExceeded)`, `Running (PodRunning)`, `Succeeded`; `new` before the
/// operator wrote a status.
fn state(rj: &RepoboxJob) -> String {
    let status = rj.status.clone().unwrap_or_default();
    match (status.phase, status.reason) {
        (None, _) => "new".to_owned(),
        (Some(p), Some(r)) if r != p.as_str() => format!("{p} ({r})"),
        (Some(p), _) => p.to_string(),
    }
}

/// The first block of a UUID, for the transition lines.
fn short(name: &str) -> &str {
    name.split('-').next().unwrap_or(name)
}

const COLUMNS: [&str; 9] = [
    "NAME", "USER", "REPO", "PHASE", "REASON", "BRANCH", "PR", "DURATION", "AGE",
];

/// The CRD's printer columns for each RepoboxJob in arrival (stream entry) order. Without
/// `now`, AGE is left out (to compare tables regardless of the clock).
fn rows(jobs: &BTreeMap<String, RepoboxJob>, now: Option<jiff::Timestamp>) -> Vec<Vec<String>> {
    let mut list: Vec<&RepoboxJob> = jobs.values().collect();
    list.sort_by_key(|rj| entry_order(&rj.spec.stream_entry_id));
    list.into_iter()
        .map(|rj| {
            let status = rj.status.clone().unwrap_or_default();
            let none = |v: Option<String>| v.unwrap_or_else(|| "<none>".into());
            let mut row = vec![
                rj.name_any(),
                rj.spec.user_id.clone(),
                rj.spec.repo.clone(),
                none(status.phase.map(|p| p.to_string())),
                none(status.reason),
                none(status.branch),
                none(status.pr_url),
                none(status.duration),
            ];
            if let Some(now) = now {
                let created = rj.metadata.creation_timestamp.as_ref().map(|t| t.0);
                row.push(created.map_or("<unknown>".into(), |c| human_age(c, now)));
            }
            row
        })
        .collect()
}

fn entry_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(u64::MAX), seq.parse().unwrap_or(0))
}

/// kubectl's short ages: `42s`, `3m12s`, `15m`, `2h`.
fn human_age(created: jiff::Timestamp, now: jiff::Timestamp) -> String {
    let s = now.as_second().saturating_sub(created.as_second()).max(0);
    match s {
        0..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..7200 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn print_table(jobs: &BTreeMap<String, RepoboxJob>) {
    let rows = rows(jobs, Some(jiff::Timestamp::now()));
    let mut widths: Vec<usize> = COLUMNS.iter().map(|c| c.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 < widths.len() {
                let _ = write!(l, "{cell:<w$}   ", w = widths[i]);
            } else {
                l.push_str(cell);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut COLUMNS.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

/// Runs a real `kubectl` against the emulator when one is installed.
async fn run_kubectl(kubeconfig: &Path, dir: &Path, real: bool) {
    let Some(kubectl) = find_in_path("kubectl") else {
        println!(
            "kubectl is not installed: the tables above are rendered by the demo from the CRD's"
        );
        println!(
            "printer columns (the same columns `kubectl get repoboxjobs` shows on a real cluster)."
        );
        return;
    };
    let custom = "NAME:.metadata.name,USER:.spec.userId,REPO:.spec.repo,PHASE:.status.phase,\
                  REASON:.status.reason,BRANCH:.status.branch,PR:.status.prUrl,\
                  DURATION:.status.duration,COMMIT:.status.commitSha";
    if real {
        println!("The real API server renders the CRD's printer columns for plain `kubectl get`:");
    } else {
        println!(
            "The emulator does not serve the server-side Table format, so plain `kubectl get` shows\n\
             NAME and AGE only and the tables above were rendered by the demo from the CRD's printer\n\
             columns. `-o custom-columns` asks kubectl to render the same columns itself:"
        );
    }
    let cache = dir.join("kube-cache");
    for extra in [
        vec![],
        vec!["-o".to_owned(), format!("custom-columns={custom}")],
    ] {
        let mut args = vec![
            "--kubeconfig".to_owned(),
            kubeconfig.display().to_string(),
            "--cache-dir".to_owned(),
            cache.display().to_string(),
            "get".to_owned(),
            "repoboxjobs".to_owned(),
            "-n".to_owned(),
            NS.to_owned(),
        ];
        args.extend(extra.iter().cloned());
        let shown = if extra.is_empty() {
            String::new()
        } else {
            " -o custom-columns=NAME:.metadata.name,USER:.spec.userId,…".to_owned()
        };
        println!(
            "\n$ kubectl --kubeconfig {} get repoboxjobs -n {NS}{shown}",
            kubeconfig.display()
        );
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new(&kubectl)
                .args(&args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await;
        match output {
            Ok(Ok(out)) => {
                print!("{}", String::from_utf8_lossy(&out.stdout));
                let err = String::from_utf8_lossy(&out.stderr);
                if !out.status.success() || !err.trim().is_empty() {
                    println!("(kubectl: {}; {})", out.status, err.trim());
                }
            }
            Ok(Err(e)) => println!("(could not run kubectl: {e})"),
            Err(_) => println!("(kubectl did not answer within 30s)"),
        }
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A random RFC 4122 version-4 UUID, like the web app's `crypto.randomUUID()`.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn section(title: &str) {
    println!("\n--- {title}");
}

fn print_log_tail(path: &Path, n: usize) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("\nLast lines of the operator log ({}):", path.display());
    for line in &lines[lines.len().saturating_sub(n)..] {
        eprintln!("  {line}");
    }
}

async fn shutdown_signal() -> &'static str {
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

impl Parts {
    /// Stops everything that was started, newest first. On failure the temporary directory
    /// (with the operator log) is kept for inspection.
    async fn cleanup(&mut self, keep_dir: bool) {
        if let Some(mut child) = self.operator.take() {
            match child.id() {
                Some(pid) => {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
                        Ok(Ok(status)) => println!("operator stopped after SIGTERM ({status})"),
                        _ => {
                            let _ = child.kill().await;
                            println!("operator did not stop within 30s of SIGTERM: killed");
                        }
                    }
                }
                None => println!("operator had already exited"),
            }
        }
        if let Some(sim) = self.sim.take() {
            sim.shutdown().await;
            println!("cluster simulator stopped");
        }
        if let Some(kubelet) = self.kubelet.take() {
            kubelet.shutdown().await;
            println!("kubelet stopped");
        }
        if let Some(cp) = self.control_plane.take() {
            // Dropping it stops every process and removes its directory (blocks about 1 s).
            tokio::task::block_in_place(|| drop(cp));
            println!("control plane stopped");
        }
        if let Some(emu) = self.emu.take() {
            let _ = emu.shutdown().await;
            println!("API emulator stopped");
        }
        if let Some(mut redis) = self.redis.take() {
            redis.stop().await;
            println!("redis-server stopped");
        }
        if let Some(mut git) = self.git.take() {
            git.stop().await;
            drop(git);
            println!("git host stopped");
        }
        if let Some(dir) = self.dir.take() {
            if keep_dir {
                let path = dir.keep();
                println!("kept {} for inspection (operator.log)", path.display());
            } else {
                let path = dir.path().display().to_string();
                match dir.close() {
                    Ok(()) => println!("removed {path}"),
                    Err(e) => println!("could not remove {path}: {e}"),
                }
            }
        }
    }
}
