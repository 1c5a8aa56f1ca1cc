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
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{CustomResourceExt, ResourceExt};
use redis::AsyncCommands;
use repobox_contract::{EntryId, keys, mask_token};
use repobox_operator::model::crd::{RepoboxJob, RepoboxJobPhase};
use repobox_testbed::bed::{self, Bed, BedBuilder, ClusterKind, OperatorProcess, Output, Stopped};
use repobox_testbed::control_plane::ControlPlane;
use repobox_testbed::forge::ForgeKind;
use repobox_testbed::kubelet::{KubeletConfig, NodeSettings};
use repobox_testbed::simulator::SimulatorConfig;
use repobox_testbed::webapp::{self, NewJob};
use tokio::process::Command;
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
    bed: Option<Bed>,
    operator: Option<OperatorProcess>,
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

    // The local git host speaks plain HTTP; production git hosts are HTTPS only.
    let files = sample_files();
    let builder = BedBuilder::new(
        match &assets {
            Some(assets) => ClusterKind::ControlPlane(assets.clone()),
            None => ClusterKind::Emulator,
        },
        TOKEN,
        KEY_HEX,
    )
    .namespace(NS)
    .forge(ForgeKind::GitHub)
    .repo(REPO, &files)
    .crd(RepoboxJob::crd())
    .runner_secrets()
    .runner_service_account()
    .job_runner(runner_bin.clone())
    .runner_env(&[("ALLOW_INSECURE_HTTP", "true")])
    .timeout(STARTUP_TIMEOUT);
    let builder = if assets.is_some() {
        builder
            .create_namespace(&[("pod-security.kubernetes.io/enforce", "restricted")])
            .kubelet(KubeletConfig {
                nodes: vec![NodeSettings::new("demo-node")],
                max_grace_period: Some(Duration::from_secs(5)),
                ..Default::default()
            })
    } else {
        builder.create_namespace(&[]).simulator(SimulatorConfig {
            max_grace_period: Some(Duration::from_secs(5)),
            ..Default::default()
        })
    };
    let bed = parts.bed.insert(
        builder
            .start()
            .await
            .context("start the test bed (`make demo` installs redis-server and the .venv)")?
            .context("no cluster")?,
    );

    let mut con = bed.con.clone();

    section("1. Redis");
    let redis_url = bed.redis.url();
    println!("redis-server (real) listening at {redis_url}");

    section("2. Git host with a sample repository");
    let repo_url = bed.git.url(REPO);
    println!("smart-HTTP git host (real `git http-backend`, basic auth oauth2:<token>),");
    println!("with the GitHub Enterprise API double at /api/v3 (pull requests, Bearer token)");
    println!("repository {repo_url}, branch main:");
    for (path, content) in &files {
        println!("  {path:<18} {} lines", content.lines().count());
    }

    let client = bed.client.clone();
    let kubeconfig = bed.cluster.kubeconfig_path();
    let crd_line = "CustomResourceDefinition repoboxjobs.repobox.dev created and established";
    let ns_line = "namespace {NS}; Secrets repobox-redis (url) and repobox-encryption-key (key) and ServiceAccount repobox-runner created";
    let ns_line = ns_line.replace("{NS}", NS);
    if let (Some(cp), Some(kubelet)) = (bed.cluster.control_plane(), &bed.kubelet) {
        section("3. Real Kubernetes control plane and the test bed's kubelet");
        println!(
            "control plane at {} started in {:.1}s (kube-apiserver, kube-controller-manager, kube-scheduler v1.28 + etcd), kubeconfig {}",
            cp.server_url(),
            cp.started_in().as_secs_f64(),
            kubeconfig.display()
        );
        println!("{crd_line}");
        println!("{ns_line}");
        println!(
            "kubelet: Node demo-node registered; pods run {} as local processes ({})",
            runner_bin.display(),
            if kubelet.isolates() {
                "isolated: own mount/PID namespaces and users per container"
            } else {
                "NOT isolated: not running as root"
            }
        );
    } else if let Some(emu) = bed.cluster.emulator() {
        section("3. Emulated Kubernetes API and cluster simulator");
        println!(
            "API emulator at {}, kubeconfig {}",
            emu.url(),
            kubeconfig.display()
        );
        println!("{crd_line}");
        println!("{ns_line}");
        println!(
            "cluster simulator: Jobs in namespace {NS} run {} as local processes",
            runner_bin.display()
        );
    }

    section("4. The operator (real binary, child process)");
    let log_path = dir_path.join("operator.log");
    let metrics_addr = bed::free_addr();
    let mut args = bed.operator_args("demo-operator", metrics_addr);
    args.extend(
        [
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
        .map(str::to_owned),
    );
    let child = OperatorProcess::spawn(
        &operator_bin,
        &args,
        &kubeconfig,
        &Output::File(log_path.clone()),
        false,
    )?;
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
    operator.wait_ready(metrics_addr, STARTUP_TIMEOUT).await?;
    println!("operator ready (/readyz on {metrics_addr} answers 200)");

    section("5. Submitting jobs the way the web app does");
    let api: Api<RepoboxJob> = Api::namespaced(client.clone(), NS);
    // The watch starts before the first XADD, so every phase is seen.
    let mut changes = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut submitted: Vec<NewJob> = Vec::new();
    for user in ["alice", "bob"] {
        let git_base = bed.git.base_url();
        bed.create_provider(user, "github-1").await?;
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
    let git = &bed.git;
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
            "{} is missing: build it first with `cargo build -p repobox-operator -p repobox-job-runner -p repobox-demo --bins` (or run `make demo`)",
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
    list.sort_by_key(|rj| EntryId::parse_or_max(&rj.spec.stream_entry_id));
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
        if let Some(operator) = self.operator.take() {
            match operator.stop(Duration::from_secs(30)).await {
                Stopped::Terminated(status) => {
                    println!("operator stopped after SIGTERM ({status})");
                }
                Stopped::Killed => println!("operator did not stop within 30s of SIGTERM: killed"),
                Stopped::AlreadyExited => println!("operator had already exited"),
            }
        }
        if let Some(bed) = self.bed.take() {
            bed.shutdown(|stopped| println!("{stopped}")).await;
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
