//! Operator benchmark: stream intake throughput, XADD → RepoboxJob / Job latency, API writes
//! per job on the happy path, and the operator's memory with 10,000 RepoboxJobs cached.
//!
//! Everything is real except Kubernetes: a real redis-server, the project's Kubernetes API
//! emulator (a Python process), the operator unchanged (in-process for phases 1–2, the release
//! binary as a child process for phase 3), and for phase 2 the cluster simulator running the real
//! job-runner against a local smart-HTTP git host.
//!
//! 1. Burst: `BENCH_JOBS` (default 1,000) entries across 50 users are XADDed as fast as the web
//!    app's writes go; admission limits are high so nothing waits; Jobs stay pending (no
//!    simulator). A watcher on RepoboxJobs and one on Jobs record when each name first appears.
//!    Then a paced run: `BENCH_PACED_JOBS` (default 200) at `BENCH_RATE` (default 20) jobs/s.
//! 2. Happy path: `BENCH_HAPPY_JOBS` (default 20) jobs run to `Succeeded`; every write request
//!    the emulator served is classified by path (operator objects, events, Lease renewals, and
//!    the simulator's own Pod / Job-status writes, which a real cluster's controllers make).
//! 3. Memory: 10,000 terminal RepoboxJobs (finished jobs kept for the 24 h retention) are
//!    created through the API, then the release operator binary is started against them and
//!    its own `VmHWM` / `VmRSS` are read from `/proc/<pid>/status`; a baseline is taken from a
//!    first instance on an empty namespace.
//!
//! Goals: p99 XADD → Job ≤ 50 ms, ≥ 100 jobs/s, ≤ 4 API writes per job, ≤ 64 MiB RSS at 10k.
//!
//! Run: `cargo build --release -p repobox-job-runner && cargo bench -p repobox-operator --bench
//! throughput` (phase 2 needs the job-runner binary; it is skipped with a note otherwise).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{CustomResourceExt, ResourceExt};
use repobox_operator::config::Config;
use repobox_operator::model::crd::{RepoboxJob, RepoboxJobPhase, RepoboxJobSpec, RepoboxJobStatus};
use repobox_operator::model::labels::FINALIZER;
use repobox_operator::model::names::object_name;
use repobox_testbed::bed::{self, BedBuilder, ClusterKind, OperatorProcess, Output};
use repobox_testbed::emulator::{Emulator, RequestRecord};
use repobox_testbed::simulator::SimulatorConfig;
use repobox_testbed::webapp::{self, NewJob};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NS: &str = "repobox";
const TOKEN: &str = "ghp_benchmarkTokenABCDEFGHIJKLMNOP";
const KEY_HEX: &str = "3b1f2e4d5c6a7980a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
const USERS: usize = 50;
const WAIT: Duration = Duration::from_secs(60);
const MEMORY_OBJECTS: usize = 10_000;
const MIB: f64 = 1024.0 * 1024.0;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The bed: redis-server, the emulator, the CRD and the two Secrets.

struct Bed {
    bed: bed::Bed,
}

repobox_testbed::deref_to_bed!(Bed, bed);

impl Bed {
    async fn new() -> Result<Self> {
        Self::with(|b| b).await
    }

    /// The bed, adjusted by `tweak` (a simulator, a repository).
    async fn with(tweak: impl FnOnce(BedBuilder) -> BedBuilder) -> Result<Self> {
        let builder = BedBuilder::new(ClusterKind::Emulator, TOKEN, KEY_HEX)
            .namespace(NS)
            .crd(RepoboxJob::crd())
            .timeout(WAIT)
            .runner_secrets();
        let bed = tweak(builder).start().await?.context("the emulator bed")?;
        Ok(Self { bed })
    }

    fn emu(&self) -> &Emulator {
        self.cluster.emulator().expect("the emulator bed")
    }

    /// The operator's flags (production defaults, leader election on), plus `extra`.
    fn args(&self, runner_id: &str, extra: &[&str]) -> Vec<String> {
        let mut args = self.operator_args(runner_id, bed::free_addr());
        args.extend(["--leader-election", "true", "--log-format", "json"].map(str::to_owned));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn start_operator(&self, extra: &[&str]) -> Result<InProcess> {
        let mut argv = vec!["repobox-operator".to_owned()];
        argv.extend(self.args("bench-operator", extra));
        let cfg = Config::try_parse_from(argv)?;
        let stop = CancellationToken::new();
        let client = self.client.clone();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            repobox_operator::app::run_with_client(cfg, client, token).await
        });
        Ok(InProcess { handle, stop })
    }

    async fn providers(&mut self) -> Result<()> {
        let key = self.key.clone();
        for u in 0..USERS {
            webapp::create_provider(
                &mut self.con,
                &user(u),
                "gh",
                &key,
                TOKEN,
                "https://github.com",
            )
            .await?;
        }
        Ok(())
    }

    /// What the web app does on "Run": the job hash, then XADD. Returns the XADD time.
    async fn submit(&mut self, id: &str, user: &str, repo_url: &str) -> Result<Instant> {
        let mut job = NewJob::new(id, user, repo_url, &format!("Change for {id}"));
        job.provider_id = "gh".into();
        webapp::create_job(&mut self.con, &job).await?;
        let at = Instant::now();
        webapp::enqueue(&mut self.con, &job).await?;
        Ok(at)
    }

    /// Waits until the emulator's resourceVersion stops moving for a second (bounded).
    async fn quiesce(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        let mut stable = 0;
        while Instant::now() < deadline {
            let rv = self.emu().stats().await?["resourceVersion"].clone();
            if last.as_ref() == Some(&rv) {
                stable += 1;
                if stable >= 4 {
                    return Ok(());
                }
            } else {
                stable = 0;
                last = Some(rv);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!("note: the emulator did not go quiet within 60 s");
        Ok(())
    }
}

struct InProcess {
    handle: JoinHandle<repobox_operator::Result<()>>,
    stop: CancellationToken,
}

impl InProcess {
    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .context("the operator did not stop")???;
        Ok(())
    }
}

fn user(u: usize) -> String {
    format!("user-{u:02}")
}

// ---------------------------------------------------------------------------------------------
// First-seen times, from watchers.

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, Instant>>>);

impl Seen {
    fn get(&self, name: &str) -> Option<Instant> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    fn insert(&self, name: String, at: Instant) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name)
            .or_insert(at);
    }

    /// Waits (polling every 5 ms; bounded) until every name has been seen.
    async fn wait_all(&self, names: &[String], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = names.iter().filter(|n| self.get(n).is_none()).count();
            if missing == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{missing} of {} objects never appeared", names.len());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Starts a watcher recording when each object name first appears; returns once the initial
/// list is done.
async fn watch_seen<K>(api: Api<K>) -> Result<(Seen, JoinHandle<()>)>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let seen = Seen::default();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let handle = tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut tx = Some(tx);
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = stream.next().await {
                let now = Instant::now();
                match ev {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        seen.insert(o.name_any(), now);
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    _ => {}
                }
            }
        }
    });
    tokio::time::timeout(WAIT, rx)
        .await
        .context("the watcher's initial list did not finish")??;
    Ok((seen, handle))
}

// ---------------------------------------------------------------------------------------------
// Statistics.

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

struct Latencies {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn latencies(xadd: &[(String, Instant)], seen: &Seen) -> Latencies {
    let mut v: Vec<Duration> = xadd
        .iter()
        .filter_map(|(name, at)| seen.get(name).map(|s| s.saturating_duration_since(*at)))
        .collect();
    v.sort();
    Latencies {
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        max: v.last().copied().unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Write classification.

/// Who made a write, by path: the operator's objects, its events, its Lease, or the cluster
/// simulator (Pods and Job status, which a real cluster's job controller and kubelet write).
fn classify(r: &RequestRecord) -> Option<&'static str> {
    if !r.is_write() {
        return None;
    }
    let p = r.path.as_str();
    let m = r.method.as_str();
    Some(if p.contains("/leases") {
        "Lease (leader election)"
    } else if p.contains("/events") {
        "Event create"
    } else if p.contains("/repoboxjobs") {
        if p.ends_with("/status") {
            "RepoboxJob status patch"
        } else if m == "POST" {
            "RepoboxJob create"
        } else if m == "DELETE" {
            "RepoboxJob delete"
        } else {
            "RepoboxJob update (finalizer)"
        }
    } else if p.contains("/pods") {
        "Pod (simulator)"
    } else if p.contains("/jobs") {
        if p.ends_with("/status") {
            "Job status (simulator)"
        } else if m == "POST" {
            "Job create"
        } else if m == "DELETE" {
            "Job delete"
        } else {
            "Job update"
        }
    } else {
        "other"
    })
}

fn is_operator_object_write(class: &str) -> bool {
    (class.starts_with("RepoboxJob") || class.starts_with("Job ")) && !class.contains("simulator")
}

struct WriteCount {
    by_class: BTreeMap<&'static str, usize>,
    failed: usize,
}

impl WriteCount {
    fn from(requests: &[RequestRecord]) -> Self {
        let mut by_class = BTreeMap::new();
        let mut failed = 0;
        for r in requests {
            if let Some(c) = classify(r) {
                *by_class.entry(c).or_insert(0) += 1;
                if r.status >= 300 {
                    failed += 1;
                }
            }
        }
        Self { by_class, failed }
    }

    fn objects(&self) -> usize {
        self.by_class
            .iter()
            .filter(|(c, _)| is_operator_object_write(c))
            .map(|(_, n)| n)
            .sum()
    }

    fn events(&self) -> usize {
        self.by_class.get("Event create").copied().unwrap_or(0)
    }

    fn print(&self, jobs: usize) {
        for (class, n) in &self.by_class {
            println!(
                "    {class:<32} {n:>6}  ({:.2} per job)",
                *n as f64 / jobs as f64
            );
        }
        if self.failed > 0 {
            println!(
                "    (of these, {} answered with a non-2xx status)",
                self.failed
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 1: burst and paced intake.

struct Phase1 {
    jobs: usize,
    submit_time: Duration,
    rj_rate: f64,
    job_rate: f64,
    rj_lat: Latencies,
    job_lat: Latencies,
    writes: WriteCount,
    requests_per_s: f64,
    paced_jobs: usize,
    paced_rate: f64,
    paced_rj_lat: Latencies,
    paced_job_lat: Latencies,
}

async fn phase1() -> Result<Phase1> {
    let jobs = env_usize("BENCH_JOBS", 1000);
    let paced_jobs = env_usize("BENCH_PACED_JOBS", 200);
    let paced_rate = env_usize("BENCH_RATE", 20).max(1) as f64;
    let repo = "https://github.com/acme/api.git";
    let mut bed = Bed::new().await?;
    bed.providers().await?;
    let (rjs, rj_watch) = watch_seen(Api::<RepoboxJob>::namespaced(bed.client.clone(), NS)).await?;
    let (jobs_seen, job_watch) = watch_seen(Api::<Job>::namespaced(bed.client.clone(), NS)).await?;
    let op = bed.start_operator(&[
        "--max-concurrent-jobs",
        "100000",
        "--max-jobs-per-user",
        "100000",
        "--max-queued",
        "100000",
    ])?;

    // Warm-up: one job through to its Job, so leadership, the consumer group and the caches
    // are in place before the clock starts.
    bed.submit("warmup-0", &user(0), repo).await?;
    jobs_seen
        .wait_all(&[object_name("warmup-0")], WAIT)
        .await
        .context("warm-up job")?;
    bed.quiesce().await?;
    bed.emu().clear_requests().await?;

    // The burst.
    eprintln!("phase 1: XADDing {jobs} jobs across {USERS} users");
    let mut xadd = Vec::with_capacity(jobs);
    let started = Instant::now();
    for i in 0..jobs {
        let id = format!("tp{i:06}-bench");
        let at = bed.submit(&id, &user(i % USERS), repo).await?;
        xadd.push((object_name(&id), at));
    }
    let submit_time = started.elapsed();
    let names: Vec<String> = xadd.iter().map(|(n, _)| n.clone()).collect();
    let budget = Duration::from_secs(60 + jobs as u64 / 5);
    rjs.wait_all(&names, budget).await?;
    jobs_seen.wait_all(&names, budget).await?;
    let first = xadd.first().map(|(_, t)| *t).context("no jobs")?;
    let last_of = |seen: &Seen| {
        names
            .iter()
            .filter_map(|n| seen.get(n))
            .max()
            .unwrap_or(first)
    };
    let rj_span = last_of(&rjs).duration_since(first);
    let job_span = last_of(&jobs_seen).duration_since(first);
    bed.quiesce().await?;
    let requests = bed.emu().requests().await?;
    let writes = WriteCount::from(&requests);
    let requests_per_s = requests.len() as f64 / job_span.as_secs_f64();
    let rj_lat = latencies(&xadd, &rjs);
    let job_lat = latencies(&xadd, &jobs_seen);

    // Paced: well below capacity, so latency is not queueing behind the burst.
    eprintln!("phase 1: {paced_jobs} jobs paced at {paced_rate} jobs/s");
    let mut paced = Vec::with_capacity(paced_jobs);
    let period = Duration::from_secs_f64(1.0 / paced_rate);
    let mut tick = tokio::time::interval(period);
    for i in 0..paced_jobs {
        tick.tick().await;
        let id = format!("pc{i:06}-bench");
        let at = bed.submit(&id, &user(i % USERS), repo).await?;
        paced.push((object_name(&id), at));
    }
    let names: Vec<String> = paced.iter().map(|(n, _)| n.clone()).collect();
    rjs.wait_all(&names, WAIT).await?;
    jobs_seen.wait_all(&names, WAIT).await?;
    let paced_rj_lat = latencies(&paced, &rjs);
    let paced_job_lat = latencies(&paced, &jobs_seen);

    op.stop().await?;
    rj_watch.abort();
    job_watch.abort();
    Ok(Phase1 {
        jobs,
        submit_time,
        rj_rate: jobs as f64 / rj_span.as_secs_f64(),
        job_rate: jobs as f64 / job_span.as_secs_f64(),
        rj_lat,
        job_lat,
        writes,
        requests_per_s,
        paced_jobs,
        paced_rate,
        paced_rj_lat,
        paced_job_lat,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 2: the happy path, all the way to Succeeded.

struct Phase2 {
    jobs: usize,
    writes: WriteCount,
    elapsed: Duration,
}

async fn phase2() -> Result<Option<Phase2>> {
    let jobs = env_usize("BENCH_HAPPY_JOBS", 20);
    let runner = match repobox_testbed::job_runner_binary() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("phase 2 skipped: {e}");
            return Ok(None);
        }
    };
    let agent = "echo 'from the agent' > AGENT.md";
    let mut bed = Bed::with(|b| {
        b.repo("acme/api", &[("README.md", "# api\n")])
            .job_runner(runner)
            .runner_env(&[("ALLOW_INSECURE_HTTP", "true"), ("AGENT_COMMAND", agent)])
            .simulator(SimulatorConfig {
                max_grace_period: Some(Duration::from_secs(5)),
                ..Default::default()
            })
    })
    .await?;
    bed.providers().await?;
    let op = bed.start_operator(&[
        "--max-concurrent-jobs",
        "100000",
        "--max-jobs-per-user",
        "100000",
        "--agent-command",
        agent,
    ])?;
    // Leadership first (the Lease is created once, at startup: not per job).
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(bed.client.clone(), NS);
    let deadline = Instant::now() + WAIT;
    while leases.get_opt("repobox-operator").await?.is_none() {
        if Instant::now() > deadline {
            bail!("the operator never took the Lease");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bed.quiesce().await?;
    bed.emu().clear_requests().await?;

    eprintln!("phase 2: {jobs} jobs to Succeeded (real job-runner, local git host)");
    let api = Api::<RepoboxJob>::namespaced(bed.client.clone(), NS);
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    let started = Instant::now();
    let url = bed.git.url("acme/api");
    let mut names = HashSet::new();
    for i in 0..jobs {
        let id = format!("hp{i:06}-bench");
        bed.submit(&id, &user(i % 5), &url).await?;
        names.insert(object_name(&id));
    }
    let mut done = HashSet::new();
    tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(rj) = stream.try_next().await? {
            let name = rj.name_any();
            if !names.contains(&name) {
                continue;
            }
            match rj.phase() {
                RepoboxJobPhase::Succeeded => {
                    done.insert(name);
                    if done.len() == names.len() {
                        return Ok(());
                    }
                }
                p if p.is_terminal() => {
                    bail!("{name} ended {p}: {:?}", rj.status.and_then(|s| s.message))
                }
                _ => {}
            }
        }
        bail!("the watch ended")
    })
    .await
    .context("jobs did not all succeed in time")??;
    let elapsed = started.elapsed();
    bed.quiesce().await?;
    let writes = WriteCount::from(&bed.emu().requests().await?);
    op.stop().await?;
    if let Some(sim) = bed.sim.take() {
        sim.shutdown().await;
    }
    Ok(Some(Phase2 {
        jobs,
        writes,
        elapsed,
    }))
}

// ---------------------------------------------------------------------------------------------
// Phase 3: memory of the release binary with 10,000 RepoboxJobs cached.

struct Phase3 {
    objects: usize,
    create_time: Duration,
    baseline_rss: u64,
    baseline_hwm: u64,
    loaded_rss: u64,
    loaded_hwm: u64,
    cache_time: Duration,
}

fn proc_status_bytes(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?;
    Ok(kib * 1024)
}

/// A finished job as the operator leaves it: finalizer, Succeeded status, completed an hour
/// ago (the retention period is 24 h, so it stays cached).
fn terminal_rj(i: usize) -> (RepoboxJob, serde_json::Value) {
    let id = format!("mem{i:06}-done");
    let name = object_name(&id);
    let mut rj = RepoboxJob::new(
        &name,
        RepoboxJobSpec {
            job_id: id.clone(),
            user_id: user(i % USERS),
            repo: "github.com/acme/api".into(),
            stream_entry_id: format!("{}-0", 1_790_000_000_000u64 + i as u64),
            provider_id: Some("gh".into()),
            base_branch: None,
            timeout_seconds: None,
            cancel: None,
            plan: None,
        },
    );
    rj.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
    let done = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600);
    let started = done - jiff::SignedDuration::from_secs(83);
    let status = RepoboxJobStatus {
        phase: Some(RepoboxJobPhase::Succeeded),
        reason: Some("Succeeded".into()),
        message: Some(format!("pushed repobox/{}", &id[..8])),
        conditions: Vec::new(),
        job_name: Some(name),
        queued_at: Some(Time(started)),
        start_time: Some(Time(started)),
        completion_time: Some(Time(done)),
        branch: Some(format!("repobox/{}", &id[..8])),
        commit_sha: Some(format!("{:040x}", i as u128 * 0x9e37_79b9_7f4a_7c15)),
        // A finished job's status carries its pull request, as most will.
        pr_url: Some(format!("https://github.com/acme/api/pull/{i}")),
        pr_number: Some(i as i64),
        pr_error: None,
        duration: Some("1m23s".into()),
        observed_generation: Some(1),
        ..RepoboxJobStatus::default()
    };
    (rj, json!({ "status": status }))
}

struct Child {
    process: OperatorProcess,
    pid: u32,
}

impl Child {
    fn start(bed: &Bed, lease: &str) -> Result<Self> {
        let exe = env!("CARGO_BIN_EXE_repobox-operator");
        let mut args = bed.args(&format!("mem-{lease}"), &[]);
        args.extend(["--lease-name".to_owned(), lease.to_owned()]);
        let process = OperatorProcess::spawn(
            Path::new(exe),
            &args,
            &bed.cluster.kubeconfig_path(),
            &Output::Null,
            true,
        )?;
        let pid = process.pid();
        Ok(Self { process, pid })
    }

    /// Samples VmRSS for `for_` and returns (max VmRSS, VmHWM).
    async fn sample(&mut self, for_: Duration) -> Result<(u64, u64)> {
        let end = Instant::now() + for_;
        let mut rss = 0;
        while Instant::now() < end {
            if let Some(status) = self.process.try_wait()? {
                bail!("the operator exited: {status}");
            }
            rss = rss.max(proc_status_bytes(self.pid, "VmRSS:")?);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok((rss, proc_status_bytes(self.pid, "VmHWM:")?))
    }
}

async fn phase3() -> Result<Phase3> {
    let objects = env_usize("BENCH_MEMORY_OBJECTS", MEMORY_OBJECTS);
    let repo = "https://github.com/acme/api.git";
    let mut bed = Bed::new().await?;
    bed.providers().await?;
    let (jobs_seen, job_watch) = watch_seen(Api::<Job>::namespaced(bed.client.clone(), NS)).await?;

    // Baseline: the binary leading an empty namespace, after one job went through.
    let mut base = Child::start(&bed, "repobox-operator-a")?;
    bed.submit("probe-a", &user(0), repo).await?;
    jobs_seen
        .wait_all(&[object_name("probe-a")], WAIT)
        .await
        .context("baseline probe job")?;
    bed.quiesce().await?;
    let (baseline_rss, baseline_hwm) = base.sample(Duration::from_secs(3)).await?;
    base.process.kill().await?;

    eprintln!("phase 3: creating {objects} terminal RepoboxJobs through the API");
    let api = Api::<RepoboxJob>::namespaced(bed.client.clone(), NS);
    let started = Instant::now();
    futures::stream::iter(0..objects)
        .map(|i| {
            let api = api.clone();
            async move {
                let (rj, status) = terminal_rj(i);
                let name = rj.name_any();
                api.create(&PostParams::default(), &rj).await?;
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    let create_time = started.elapsed();

    // The loaded instance: it lists all of them at startup. Admission needs the complete
    // initial list, so the probe's Job appearing means the cache is full.
    let started = Instant::now();
    let mut loaded = Child::start(&bed, "repobox-operator-b")?;
    bed.submit("probe-b", &user(1), repo).await?;
    jobs_seen
        .wait_all(&[object_name("probe-b")], Duration::from_secs(120))
        .await
        .context("loaded probe job")?;
    let cache_time = started.elapsed();
    bed.quiesce().await?;
    let (loaded_rss, loaded_hwm) = loaded.sample(Duration::from_secs(5)).await?;
    loaded.process.kill().await?;
    job_watch.abort();
    Ok(Phase3 {
        objects,
        create_time,
        baseline_rss,
        baseline_hwm,
        loaded_rss,
        loaded_hwm,
        cache_time,
    })
}

// ---------------------------------------------------------------------------------------------

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

#[tokio::main]
async fn main() -> Result<()> {
    let p1 = phase1().await.context("phase 1 (throughput)")?;
    let p2 = phase2().await.context("phase 2 (happy path)")?;
    let p3 = phase3().await.context("phase 3 (memory)")?;

    println!();
    println!("== Phase 1: burst of {} jobs, 50 users ==", p1.jobs);
    println!(
        "  web-app writes (job hash + XADD) took {} ({:.0} entries/s offered)",
        ms(p1.submit_time),
        p1.jobs as f64 / p1.submit_time.as_secs_f64()
    );
    println!(
        "  RepoboxJobs: {:.0}/s; Jobs: {:.0}/s (N / first XADD → last created)",
        p1.rj_rate, p1.job_rate
    );
    println!(
        "  XADD → RepoboxJob: p50 {}, p99 {}, max {}",
        ms(p1.rj_lat.p50),
        ms(p1.rj_lat.p99),
        ms(p1.rj_lat.max)
    );
    println!(
        "  XADD → Job:        p50 {}, p99 {}, max {}",
        ms(p1.job_lat.p50),
        ms(p1.job_lat.p99),
        ms(p1.job_lat.max)
    );
    println!(
        "  emulator served {:.0} requests/s (all clients) during the burst",
        p1.requests_per_s
    );
    println!("  writes until every Job exists and statuses settle (no simulator):");
    p1.writes.print(p1.jobs);
    println!(
        "== Phase 1b: {} jobs paced at {:.0}/s ==",
        p1.paced_jobs, p1.paced_rate
    );
    println!(
        "  XADD → RepoboxJob: p50 {}, p99 {}, max {}",
        ms(p1.paced_rj_lat.p50),
        ms(p1.paced_rj_lat.p99),
        ms(p1.paced_rj_lat.max)
    );
    println!(
        "  XADD → Job:        p50 {}, p99 {}, max {}",
        ms(p1.paced_job_lat.p50),
        ms(p1.paced_job_lat.p99),
        ms(p1.paced_job_lat.max)
    );
    if let Some(p2) = &p2 {
        println!(
            "== Phase 2: happy path, {} jobs to Succeeded in {} ==",
            p2.jobs,
            ms(p2.elapsed)
        );
        p2.writes.print(p2.jobs);
    }
    println!(
        "== Phase 3: {} terminal RepoboxJobs (created in {}) ==",
        p3.objects,
        ms(p3.create_time)
    );
    println!(
        "  baseline (empty namespace): VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        p3.baseline_rss as f64 / MIB,
        p3.baseline_hwm as f64 / MIB
    );
    println!(
        "  loaded: VmRSS {:.1} MiB, VmHWM {:.1} MiB (cache full {} after start)",
        p3.loaded_rss as f64 / MIB,
        p3.loaded_hwm as f64 / MIB,
        ms(p3.cache_time)
    );

    println!();
    println!("| measure | goal | measured | |\n| --- | --- | --- | --- |");
    let row = |m: &str, g: &str, v: String, ok: bool| {
        println!("| {m} | {g} | {v} | {} |", verdict(ok));
    };
    row(
        "p99 XADD → Job, paced",
        "≤ 50 ms",
        ms(p1.paced_job_lat.p99),
        p1.paced_job_lat.p99 <= Duration::from_millis(50),
    );
    row(
        "p99 XADD → Job, burst",
        "≤ 50 ms",
        ms(p1.job_lat.p99),
        p1.job_lat.p99 <= Duration::from_millis(50),
    );
    row(
        "entries → RepoboxJobs, burst",
        "≥ 100 jobs/s",
        format!("{:.0} jobs/s", p1.rj_rate),
        p1.rj_rate >= 100.0,
    );
    row(
        "entries → Jobs, burst",
        "≥ 100 jobs/s",
        format!("{:.0} jobs/s", p1.job_rate),
        p1.job_rate >= 100.0,
    );
    if let Some(p2) = &p2 {
        let per = |n: usize| n as f64 / p2.jobs as f64;
        let objects = per(p2.writes.objects());
        let events = per(p2.writes.events());
        row(
            "operator object writes per job, happy path",
            "≤ 4",
            format!("{objects:.2} (+ {events:.2} Events)"),
            objects <= 4.0,
        );
        row(
            "operator writes per job incl. Events",
            "≤ 4",
            format!("{:.2}", objects + events),
            objects + events <= 4.0,
        );
    }
    row(
        "operator VmHWM, 10k RepoboxJobs cached",
        "≤ 64 MiB",
        format!(
            "{:.1} MiB (baseline {:.1} MiB)",
            p3.loaded_hwm as f64 / MIB,
            p3.baseline_hwm as f64 / MIB
        ),
        p3.loaded_hwm as f64 <= 64.0 * MIB,
    );
    Ok(())
}
