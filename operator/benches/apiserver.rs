//! Operator benchmark on a real Kubernetes API server (`REPOBOX_K8S_ASSETS`): etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler from `testbed::control_plane`,
//! with the apiserver's audit log on so that writes are counted where they land.
//!
//! Phases (each in a namespace of its own, with a fresh redis-server where Redis is used):
//!
//! 1. **Limit**: a plain kube-rs client, authenticated like the operator (a ServiceAccount
//!    token), creates `BENCH_JOBS` RepoboxJobs, then their `BENCH_JOBS` Jobs, then
//!    `BENCH_JOBS` RepoboxJob + Job pairs (the Job after its RepoboxJob, as the operator must),
//!    always `IN_FLIGHT` (32) requests in flight. The objects are the operator's own (the
//!    intake's RepoboxJob, `job_builder::job_for`'s Job).
//! 2. **Steady**: the operator (in-process, `app::run_with_client`, leader election on, quotas
//!    high) gets `BENCH_RATE` (20) jobs/s for `BENCH_STEADY_SECONDS` (10) s; watchers record when
//!    each RepoboxJob and Job first appears: p50/p99 XADD → RepoboxJob and XADD → Job. Run
//!    `BENCH_ROUNDS` (3) times, each next to the plain client's pairs started at the same rate
//!    (the RepoboxJob create sent → the Job seen by the same watcher: the floor the machine
//!    sets that round); the verdict is on the median p99.
//! 3. **Burst**: `BENCH_JOBS` (1,000) jobs from 50 users XADDed as fast as the web app's writes
//!    go; time from the first XADD until every Job exists, as a rate and as a ratio of the plain
//!    client's pair rate measured in the same round. `BENCH_ROUNDS` (3) rounds, each the plain
//!    client's `BENCH_JOBS` pairs and the operator's burst back to back, in alternating order;
//!    the verdict is on the median ratio. (On a 2-core machine shared with the control plane
//!    the plain client's own rate varied by 1.7× between runs, so one pair of runs says
//!    little.)
//! 4. **Happy path**: `BENCH_HAPPY_JOBS` (20) jobs at 2/s run to `Succeeded`; a fake kubelet
//!    plays the node (the scheduler binds the pods to a registered Node; the fake kubelet writes
//!    pod status Running, records success in Redis as the job-runner would, holds the pod
//!    running for `BENCH_RUN_SECONDS` (3) s, then writes Succeeded; the real Job controller
//!    completes the Job). The operator's writes are counted in the audit log by its user.
//! 5. **Memory**: the release `repobox-operator` binary (a child process, `KUBECONFIG` of its
//!    ServiceAccount) starts against `BENCH_MEMORY_OBJECTS` (10,000) finished RepoboxJobs and
//!    their Jobs; its own `VmHWM`/`VmRSS` from `/proc`.
//! 6. **Cost**: `BENCH_COST_REQUESTS` (400) requests of each kind the operator sends per job
//!    (RepoboxJob create, status write, Event, pod list), 8 in flight, in three interleaved
//!    repeats: the apiserver + etcd CPU one takes (their idle use subtracted), the median of
//!    the repeats. The status write is measured as the operator sends it (server-side apply)
//!    and, for comparison, as a JSON merge patch.
//!
//! Between phases the bench waits until the built-in controllers (rate limited to 20 requests/s
//! each, their defaults) have worked off the previous phase's Jobs, so every phase starts on a
//! quiet apiserver. A Node with a heartbeat (its Lease) is registered at the start, so pods are
//! bound once and then stay quietly `Pending` (no kubelet runs them, outside phase 4).
//!
//! Run: `REPOBOX_K8S_ASSETS=/path/to/kube-binaries cargo bench -p repobox-operator --bench
//! apiserver`. Without the variable it prints one SKIPPED line and exits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, CustomResourceExt, Resource, ResourceExt};
use redis::aio::MultiplexedConnection;
use repobox_contract::EncryptionKey;
use repobox_contract::transitions::{self, Finish};
use repobox_operator::config::Config;
use repobox_operator::decide::job_config::JobConfig;
use repobox_operator::model::crd::{
    RepoboxJob, RepoboxJobPhase, RepoboxJobStatus, condition_types, new_condition,
};
use repobox_operator::model::labels::FIELD_MANAGER;
use repobox_operator::model::names::object_name;
use repobox_testbed::bed;
use repobox_testbed::control_plane::{ControlPlane, Options};
use repobox_testbed::redis_server::RedisServer;
use repobox_testbed::webapp::{self, NewJob};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "ghp_benchmarkTokenABCDEFGHIJKLMNOP";
const KEY_HEX: &str = "3b1f2e4d5c6a7980a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
const REPO: &str = "https://github.com/acme/api.git";
const USERS: usize = 50;
/// Requests in flight for the plain client (the limit measurement).
const IN_FLIGHT: usize = 32;
const WAIT: Duration = Duration::from_secs(120);
const MIB: f64 = 1024.0 * 1024.0;
/// The Node the scheduler binds every runner pod to.
const NODE: &str = "bench-node";
/// The operator's ServiceAccount (its writes are told apart by this identity).
const OPERATOR_SA: &str = "repobox-operator";
const PLAIN_SA: &str = "plain-client";

/// Every write (any verb that changes state) at `Metadata` level, and the reads (get, list) of
/// ServiceAccounts (the operator, the controllers); not watches.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    verbs: ["create", "update", "patch", "delete", "deletecollection"]
  - level: Metadata
    verbs: ["get", "list"]
    userGroups: ["system:serviceaccounts"]
  - level: None
"#;

/// Verbs that change state.
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn user(u: usize) -> String {
    format!("user-{u:02}")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The cluster: control plane, CRD, identities, the Node.

struct Cluster {
    cp: ControlPlane,
    admin: Client,
    system_ns: String,
    operator_kube: kube::Config,
    plain_kube: kube::Config,
    operator_user: String,
    audit: PathBuf,
    heartbeat: JoinHandle<()>,
}

impl Cluster {
    async fn start() -> Result<Option<Self>> {
        let options = Options {
            audit_policy: Some(AUDIT_POLICY.to_owned()),
        };
        let Some(cp) = ControlPlane::start_configured(&options).await? else {
            return Ok(None);
        };
        eprintln!("control plane up in {}", ms(cp.started_in()));
        let admin = cp.client()?;
        bed::install_crd(&admin, &RepoboxJob::crd(), WAIT).await?;

        // The operator and the plain client authenticate the same way (ServiceAccount tokens),
        // so the limit is measured on equal terms; cluster-admin keeps RBAC out of the picture.
        let system_ns = cp.namespace("bench-system").await?;
        for sa in [OPERATOR_SA, PLAIN_SA] {
            Api::<ServiceAccount>::namespaced(admin.clone(), &system_ns)
                .create(
                    &PostParams::default(),
                    &ServiceAccount {
                        metadata: ObjectMeta {
                            name: Some(sa.into()),
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                )
                .await?;
            Api::<ClusterRoleBinding>::all(admin.clone())
                .create(
                    &PostParams::default(),
                    &ClusterRoleBinding {
                        metadata: ObjectMeta {
                            name: Some(format!("bench-{sa}")),
                            ..Default::default()
                        },
                        role_ref: RoleRef {
                            api_group: "rbac.authorization.k8s.io".into(),
                            kind: "ClusterRole".into(),
                            name: "cluster-admin".into(),
                        },
                        subjects: Some(vec![Subject {
                            kind: "ServiceAccount".into(),
                            name: sa.into(),
                            namespace: Some(system_ns.clone()),
                            ..Default::default()
                        }]),
                    },
                )
                .await?;
        }
        let operator_kube = cp.service_account_config(&system_ns, OPERATOR_SA).await?;
        let plain_kube = cp.service_account_config(&system_ns, PLAIN_SA).await?;
        let operator_user = format!("system:serviceaccount:{system_ns}:{OPERATOR_SA}");
        let audit = cp
            .audit_log_path()
            .context("the control plane has no audit log")?
            .to_owned();
        register_node(&admin).await?;
        let heartbeat = tokio::spawn(node_heartbeat(admin.clone()));
        Ok(Some(Self {
            cp,
            admin,
            system_ns,
            operator_kube,
            plain_kube,
            operator_user,
            audit,
            heartbeat,
        }))
    }

    /// A namespace with what the runner pods reference (their ServiceAccount, the two Secrets).
    async fn namespace(&self, prefix: &str, redis_url: &str) -> Result<String> {
        let ns = self.cp.namespace(prefix).await?;
        bed::create_runner_service_account(&self.admin, &ns).await?;
        bed::create_runner_secrets(&self.admin, &ns, redis_url, KEY_HEX).await?;
        Ok(ns)
    }

    fn audit_len(&self) -> Result<u64> {
        Ok(std::fs::metadata(&self.audit)?.len())
    }

    /// Waits until the built-in controllers have worked off earlier phases: fewer than 10
    /// writes/s (any client) for two seconds in a row. Bounded; returns the time it took.
    async fn settle(&self) -> Result<Duration> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(300);
        let mut quiet = 0;
        let mut offset = self.audit_len()?;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let written = count_lines(&self.audit, offset)?;
            offset = self.audit_len()?;
            if written < 10 {
                quiet += 1;
                if quiet >= 2 {
                    return Ok(started.elapsed());
                }
            } else {
                quiet = 0;
            }
        }
        eprintln!("note: the control plane did not settle within 300 s");
        Ok(started.elapsed())
    }

    /// Waits until `user` made no write in `ns` for `quiet` (bounded by 120 s).
    async fn quiet_for(&self, ns: &str, user: &str, from: u64, quiet: Duration) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last_count = usize::MAX;
        let mut since = Instant::now();
        while Instant::now() < deadline {
            let n = read_audit(&self.audit, from)?
                .iter()
                .filter(|e| {
                    e.namespace == ns
                        && e.user == user
                        && e.resource != "leases"
                        && WRITE_VERBS.contains(&e.verb.as_str())
                })
                .count();
            if n != last_count {
                last_count = n;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!("note: the operator kept writing in {ns} for 120 s");
        Ok(())
    }
}

async fn register_node(admin: &Client) -> Result<()> {
    let now = jiff::Timestamp::now().to_string();
    let resources = json!({
        "cpu": "100000", "memory": "1000Ti", "pods": "100000", "ephemeral-storage": "10000Ti"
    });
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE,
            "labels": {
                "kubernetes.io/hostname": NODE,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64"
            }
        },
    }))?;
    let nodes: Api<Node> = Api::all(admin.clone());
    nodes.create(&PostParams::default(), &node).await?;
    nodes
        .patch_status(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "status": {
                    "capacity": resources,
                    "allocatable": resources,
                    "conditions": [{
                        "type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "the benchmark's fake kubelet",
                        "lastHeartbeatTime": now, "lastTransitionTime": now
                    }]
                }
            })),
        )
        .await?;
    Ok(())
}

/// Renews the Node's Lease every 10 s (what a kubelet does), so the node lifecycle controller
/// never marks it unreachable and evicts the pods bound to it.
async fn node_heartbeat(admin: Client) {
    let leases: Api<Lease> = Api::namespaced(admin, "kube-node-lease");
    loop {
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": { "name": NODE },
            "spec": {
                "holderIdentity": NODE,
                "leaseDurationSeconds": 40,
                "renewTime": MicroTime(jiff::Timestamp::now()),
            }
        });
        if let Err(e) = leases
            .patch(
                NODE,
                &PatchParams::apply("bench-kubelet").force(),
                &Patch::Apply(&lease),
            )
            .await
        {
            eprintln!("note: node heartbeat failed: {e}");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// CPU time, from /proc (clock ticks of 10 ms: Linux's USER_HZ).

/// User + system CPU time of a process.
fn cpu_of(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The machine's CPU pressure: total time in which some runnable task waited for a CPU
/// (`/proc/pressure/cpu`, `some`), zero where the kernel has no PSI.
fn cpu_stall() -> Duration {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|text| {
            let some = text.lines().find(|l| l.starts_with("some "))?;
            let total = some
                .split_whitespace()
                .find_map(|f| f.strip_prefix("total="))?;
            total.parse::<u64>().ok()
        })
        .map(Duration::from_micros)
        .unwrap_or_default()
}

/// CPU used by the apiserver + etcd, and by this process (the plain client or the in-process
/// operator, plus the bench's watchers); and how long tasks waited for a CPU meanwhile.
#[derive(Clone, Copy)]
struct Cpu {
    server: Duration,
    bench: Duration,
    stall: Duration,
    at: Instant,
    /// Zero for a reading, the time between the two for a difference.
    span: Duration,
}

impl Cpu {
    fn now(cluster: &Cluster) -> Self {
        let server = cluster
            .cp
            .pids()
            .iter()
            .filter(|(name, _)| *name == "kube-apiserver" || *name == "etcd")
            .map(|(_, pid)| cpu_of(*pid))
            .sum();
        Self {
            server,
            bench: cpu_of(std::process::id()),
            stall: cpu_stall(),
            at: Instant::now(),
            span: Duration::ZERO,
        }
    }

    /// The use between the reading `start` and this one.
    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            server: self.server.saturating_sub(start.server),
            bench: self.bench.saturating_sub(start.bench),
            stall: self.stall.saturating_sub(start.stall),
            at: self.at,
            span: self.at.saturating_duration_since(start.at),
        }
    }

    fn per_job(&self, jobs: usize) -> String {
        let span = self.span.as_secs_f64().max(f64::EPSILON);
        format!(
            "apiserver+etcd {:.2} ms CPU per job, this process {:.2} ms; \
             some task waited for a CPU {:.0} % of the time (PSI)",
            self.server.as_secs_f64() * 1000.0 / jobs as f64,
            self.bench.as_secs_f64() * 1000.0 / jobs as f64,
            self.stall.as_secs_f64() * 100.0 / span
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The audit log.

/// One write, as the apiserver logged it.
#[derive(Debug, Clone)]
struct Write {
    user: String,
    verb: String,
    resource: String,
    subresource: String,
    namespace: String,
    name: String,
    code: u16,
    /// When the apiserver received the request.
    received: Option<jiff::Timestamp>,
    /// Received → response complete, inside the apiserver.
    server_time: Duration,
}

fn count_lines(path: &Path, from: u64) -> Result<u64> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    Ok(BufReader::new(f).lines().count() as u64)
}

/// The completed writes logged from byte offset `from` on.
fn read_audit(path: &Path, from: u64) -> Result<Vec<Write>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue; // a line being written right now
        };
        if v["stage"] != "ResponseComplete" {
            continue;
        }
        let s = |p: &str| {
            v.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let time = |p: &str| s(p).parse::<jiff::Timestamp>().ok();
        let received = time("/requestReceivedTimestamp");
        let server_time = match (received, time("/stageTimestamp")) {
            (Some(a), Some(b)) => b.duration_since(a).unsigned_abs(),
            _ => Duration::ZERO,
        };
        out.push(Write {
            user: s("/user/username"),
            verb: s("/verb"),
            resource: s("/objectRef/resource"),
            subresource: s("/objectRef/subresource"),
            namespace: s("/objectRef/namespace"),
            name: s("/objectRef/name"),
            received,
            server_time,
            code: v
                .pointer("/responseStatus/code")
                .and_then(Value::as_u64)
                .unwrap_or(0) as u16,
        });
    }
    Ok(out)
}

/// The operator's writes in one namespace, by kind.
struct WriteCount {
    by_class: BTreeMap<String, usize>,
    /// Requests answered with a non-2xx status, by kind and status code.
    failed: BTreeMap<String, usize>,
    /// Other clients' writes in the namespace (the job controller, the scheduler), by user.
    others: BTreeMap<String, usize>,
}

impl WriteCount {
    fn from(writes: &[Write], ns: &str, operator: &str) -> Self {
        let mut by_class = BTreeMap::new();
        let mut others = BTreeMap::new();
        let mut failed = BTreeMap::new();
        for w in writes.iter().filter(|w| w.namespace == ns) {
            if w.user != operator {
                let who = w.user.rsplit(':').next().unwrap_or(&w.user).to_owned();
                *others
                    .entry(format!("{who}: {} {}", w.verb, w.path()))
                    .or_default() += 1;
                continue;
            }
            *by_class
                .entry(format!("{} {}", w.verb, w.path()))
                .or_default() += 1;
            if w.code >= 300 {
                *failed
                    .entry(format!("{} {} {}", w.verb, w.path(), w.code))
                    .or_default() += 1;
            }
        }
        Self {
            by_class,
            failed,
            others,
        }
    }

    fn sum(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.by_class
            .iter()
            .filter(|(c, _)| pred(c))
            .map(|(_, n)| n)
            .sum()
    }

    /// Writes to RepoboxJobs and Jobs (the objects the operator owns).
    fn objects(&self) -> usize {
        self.sum(|c| is_write(c) && (c.contains(" repoboxjobs") || c.contains(" jobs")))
    }

    fn events(&self) -> usize {
        self.sum(|c| is_write(c) && c.contains(" events"))
    }

    /// GETs and LISTs.
    fn reads(&self) -> usize {
        self.sum(|c| !is_write(c))
    }

    fn print(&self, jobs: usize) {
        self.print_own(jobs);
        println!("    other clients in the namespace (not the operator's):");
        for (class, n) in &self.others {
            println!(
                "      {class:<46} {n:>6}  ({:.2} per job)",
                *n as f64 / jobs as f64
            );
        }
    }

    /// The operator's requests only.
    fn print_own(&self, jobs: usize) {
        for (class, n) in &self.by_class {
            println!(
                "    {class:<36} {n:>6}  ({:.2} per job)",
                *n as f64 / jobs as f64
            );
        }
        for (class, n) in &self.failed {
            println!("    (of these, {n} answered: {class})");
        }
    }
}

/// Whether a class ("verb resource") is a write.
fn is_write(class: &str) -> bool {
    class
        .split(' ')
        .next()
        .is_some_and(|verb| WRITE_VERBS.contains(&verb))
}

impl Write {
    fn path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
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

#[derive(Clone, Copy)]
struct Latencies {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl std::fmt::Display for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {}, p99 {}, max {}",
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )
    }
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
// Phase 1: the plain client's limit.

struct Limit {
    jobs: usize,
    rj_rate: f64,
    job_rate: f64,
    pair_rate: f64,
    pair_latency: Latencies,
    pair_cpu: Cpu,
    /// Pairs started at the steady phase's rate: the latency floor of two creates in a row.
    paced: usize,
    paced_latency: Latencies,
}

fn job_config(redis_url: &str, ns: &str) -> Result<JobConfig> {
    let cfg = Config::try_parse_from([
        "repobox-operator",
        "--redis-url",
        redis_url,
        "--jobs-namespace",
        ns,
    ])?;
    Ok(cfg.job_config()?)
}

/// The RepoboxJob the intake would create for job `i`.
fn intake_rj(prefix: &str, i: usize) -> RepoboxJob {
    let id = format!("{prefix}{i:06}-bench");
    let record = HashMap::from([
        ("repoUrl".to_owned(), REPO.to_owned()),
        ("providerId".to_owned(), "gh".to_owned()),
    ]);
    let entry = format!("{}-{i}", 1_790_000_000_000u64);
    repobox_operator::run::intake::repobox_job(&id, &user(i % USERS), &entry, &record)
}

fn post() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// The watchers every phase runs on `ns` (their fan-out costs the apiserver too): when each
/// Job was first seen, and both watches' tasks.
async fn bench_watches(cluster: &Cluster, ns: &str) -> Result<(Seen, [JoinHandle<()>; 2])> {
    let (_, rjs) = watch_seen(Api::<RepoboxJob>::namespaced(cluster.admin.clone(), ns)).await?;
    let (jobs_seen, jobs) = watch_seen(Api::<Job>::namespaced(cluster.admin.clone(), ns)).await?;
    Ok((jobs_seen, [rjs, jobs]))
}

/// What [`pairs`] measured.
struct Pairs {
    /// Pairs per second.
    rate: f64,
    /// One pair, as the client saw it: the RepoboxJob create sent → the Job create answered.
    latency: Latencies,
    /// The RepoboxJob create sent → the Job first seen by a watcher: what the operator's
    /// XADD → Job is measured with, minus the operator.
    seen: Latencies,
    cpu: Cpu,
}

/// Creates `n` RepoboxJob + Job pairs (each Job right after its RepoboxJob) in a fresh
/// namespace: `IN_FLIGHT` pairs at a time, or started at `rate` per second.
async fn pairs(
    cluster: &Cluster,
    client: &Client,
    prefix: &str,
    n: usize,
    rate: Option<f64>,
) -> Result<Pairs> {
    let url = "redis://127.0.0.1:1";
    let ns = cluster.namespace(&format!("bench-{prefix}"), url).await?;
    // The same watchers as in the operator's phases.
    let (jobs_seen, watches) = bench_watches(cluster, &ns).await?;
    let cfg = job_config(url, &ns)?;
    let rjs: Api<RepoboxJob> = Api::namespaced(client.clone(), &ns);
    let jobs_api: Api<Job> = Api::namespaced(client.clone(), &ns);
    let starts: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let pair = |i: usize| {
        let (rjs, jobs_api, cfg, prefix, starts) = (
            rjs.clone(),
            jobs_api.clone(),
            cfg.clone(),
            prefix.to_owned(),
            Arc::clone(&starts),
        );
        async move {
            let began = Instant::now();
            let rj = rjs.create(&post(), &intake_rj(&prefix, i)).await?;
            let job = repobox_operator::decide::job_builder::job_for(&rj, &cfg)?;
            starts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((job.name_any(), began));
            jobs_api.create(&post(), &job).await?;
            Ok::<_, anyhow::Error>(began.elapsed())
        }
    };
    // Warm-up, as the operator gets one: the client's connections and the apiserver's
    // handlers for both kinds exist before the clock starts.
    futures::stream::iter(1_000_000..1_000_000 + IN_FLIGHT)
        .map(&pair)
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    starts.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let cpu_start = Cpu::now(cluster);
    let started = Instant::now();
    let times: Vec<Duration> = match rate {
        None => {
            futures::stream::iter(0..n)
                .map(&pair)
                .buffer_unordered(IN_FLIGHT)
                .try_collect()
                .await?
        }
        Some(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                tick.tick().await;
                tasks.push(tokio::spawn(pair(i)));
            }
            let mut times = Vec::with_capacity(n);
            for t in tasks {
                times.push(t.await??);
            }
            times
        }
    };
    let elapsed = started.elapsed();
    let cpu = Cpu::now(cluster).since(cpu_start);
    let starts = std::mem::take(&mut *starts.lock().unwrap_or_else(|p| p.into_inner()));
    let names: Vec<String> = starts.iter().map(|(n, _)| n.clone()).collect();
    jobs_seen.wait_all(&names, WAIT).await?;
    for w in watches {
        w.abort();
    }
    Ok(Pairs {
        rate: n as f64 / elapsed.as_secs_f64(),
        latency: latencies_of(times),
        seen: latencies(&starts, &jobs_seen),
        cpu,
    })
}

async fn limit(cluster: &Cluster, jobs: usize, rate: f64, paced: usize) -> Result<Limit> {
    let client = Client::try_from(cluster.plain_kube.clone())?;
    let url = "redis://127.0.0.1:1";

    // RepoboxJobs alone, then their Jobs alone.
    let ns = cluster.namespace("bench-limit-a", url).await?;
    let (_, watches) = bench_watches(cluster, &ns).await?;
    let cfg = job_config(url, &ns)?;
    let rjs: Api<RepoboxJob> = Api::namespaced(client.clone(), &ns);
    let jobs_api: Api<Job> = Api::namespaced(client.clone(), &ns);
    futures::stream::iter(1_000_000..1_000_000 + IN_FLIGHT)
        .map(|i| {
            let (rjs, jobs_api, cfg) = (rjs.clone(), jobs_api.clone(), &cfg);
            async move {
                let rj = rjs.create(&post(), &intake_rj("lw", i)).await?;
                let job = repobox_operator::decide::job_builder::job_for(&rj, cfg)?;
                jobs_api.create(&post(), &job).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    eprintln!("limit: {jobs} RepoboxJobs, then {jobs} Jobs, {IN_FLIGHT} in flight");
    let started = Instant::now();
    let created: Vec<RepoboxJob> = futures::stream::iter(0..jobs)
        .map(|i| {
            let rjs = rjs.clone();
            async move { rjs.create(&post(), &intake_rj("la", i)).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect()
        .await?;
    let rj_rate = jobs as f64 / started.elapsed().as_secs_f64();
    let built: Vec<Job> = created
        .iter()
        .map(|rj| repobox_operator::decide::job_builder::job_for(rj, &cfg))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    futures::stream::iter(built)
        .map(|job| {
            let jobs_api = jobs_api.clone();
            async move { jobs_api.create(&post(), &job).await.map(|_| ()) }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    let job_rate = jobs as f64 / started.elapsed().as_secs_f64();
    for w in watches {
        w.abort();
    }
    eprintln!("limit: settling ({:?})", cluster.settle().await?);

    eprintln!("limit: {jobs} RepoboxJob + Job pairs, {IN_FLIGHT} in flight");
    let Pairs {
        rate: pair_rate,
        latency: pair_latency,
        cpu: pair_cpu,
        ..
    } = pairs(cluster, &client, "limit-b", jobs, None).await?;
    eprintln!("limit: settling ({:?})", cluster.settle().await?);
    eprintln!("limit: {paced} pairs started at {rate}/s");
    let paced_latency = pairs(cluster, &client, "limit-c", paced, Some(rate))
        .await?
        .latency;
    eprintln!("limit: settling ({:?})", cluster.settle().await?);
    Ok(Limit {
        jobs,
        rj_rate,
        job_rate,
        pair_rate,
        pair_latency,
        pair_cpu,
        paced,
        paced_latency,
    })
}

// ---------------------------------------------------------------------------------------------
// The operator in-process, and a phase's bed.

struct InProcess {
    handle: JoinHandle<repobox_operator::Result<()>>,
    stop: CancellationToken,
    /// Where its `/metrics` are served.
    metrics: String,
}

impl InProcess {
    /// The value of each metric line (`name value`, no labels) whose name is in `names`.
    async fn scrape(&self, names: &[&str]) -> Result<HashMap<String, f64>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut con = tokio::net::TcpStream::connect(&self.metrics).await?;
        con.write_all(
            format!(
                "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.metrics
            )
            .as_bytes(),
        )
        .await?;
        let mut body = String::new();
        con.read_to_string(&mut body).await?;
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(n, _)| names.contains(n))
            .filter_map(|(n, v)| Some((n.to_owned(), v.trim().parse().ok()?)))
            .collect())
    }
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

/// One phase's namespace, redis-server and watchers.
struct Bed {
    ns: String,
    redis: RedisServer,
    con: MultiplexedConnection,
    rjs: Seen,
    jobs: Seen,
    watches: Vec<JoinHandle<()>>,
}

impl Bed {
    async fn new(cluster: &Cluster, prefix: &str) -> Result<Self> {
        let redis = RedisServer::start().await?;
        let ns = cluster.namespace(prefix, &redis.url()).await?;
        let mut con = redis.try_connection().await?;
        let key = EncryptionKey::parse(KEY_HEX)?;
        for u in 0..USERS {
            webapp::create_provider(&mut con, &user(u), "gh", &key, TOKEN, "https://github.com")
                .await?;
        }
        let (rjs, w1) =
            watch_seen(Api::<RepoboxJob>::namespaced(cluster.admin.clone(), &ns)).await?;
        let (jobs, w2) = watch_seen(Api::<Job>::namespaced(cluster.admin.clone(), &ns)).await?;
        Ok(Self {
            ns,
            redis,
            con,
            rjs,
            jobs,
            watches: vec![w1, w2],
        })
    }

    fn start_operator(&self, cluster: &Cluster, extra: &[&str]) -> Result<InProcess> {
        let metrics = format!("127.0.0.1:{}", repobox_testbed::free_port());
        let mut argv: Vec<String> = [
            "repobox-operator",
            "--redis-url",
            &self.redis.url(),
            "--jobs-namespace",
            &self.ns,
            "--runner-id",
            "bench-operator",
            "--metrics-addr",
            &metrics,
            "--leader-election",
            "true",
            "--max-concurrent-jobs",
            "100000",
            "--max-jobs-per-user",
            "100000",
            "--max-queued",
            "100000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(extra.iter().map(|s| s.to_string()));
        let cfg = Config::try_parse_from(argv)?;
        let client = Client::try_from(cluster.operator_kube.clone())?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            repobox_operator::app::run_with_client(cfg, client, token).await
        });
        Ok(InProcess {
            handle,
            stop,
            metrics,
        })
    }

    /// What the web app does on "Run": the job hash, then XADD. Returns the XADD time.
    async fn submit(&mut self, id: &str, user: &str) -> Result<Instant> {
        let mut job = NewJob::new(id, user, REPO, &format!("Change for {id}"));
        job.provider_id = "gh".into();
        webapp::create_job(&mut self.con, &job).await?;
        let at = Instant::now();
        webapp::enqueue(&mut self.con, &job).await?;
        Ok(at)
    }

    /// One job through to its Job, so leadership, the consumer group, the caches and the
    /// client's connections are in place before the clock starts; then the operator's writes
    /// for it (the debounced `Starting` status) are waited out.
    async fn warm_up(&mut self, cluster: &Cluster) -> Result<()> {
        let from = cluster.audit_len()?;
        self.submit("warmup-0", &user(0)).await?;
        self.jobs
            .wait_all(&[object_name("warmup-0")], WAIT)
            .await
            .context("warm-up job")?;
        cluster
            .quiet_for(
                &self.ns,
                &cluster.operator_user,
                from,
                Duration::from_secs(3),
            )
            .await
    }

    fn stop_watches(&self) {
        for w in &self.watches {
            w.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 2 and 3: steady and burst.

struct Run {
    jobs: usize,
    submit_time: Duration,
    rj_rate: f64,
    job_rate: f64,
    rj_lat: Latencies,
    job_lat: Latencies,
    writes: WriteCount,
    /// The operator's requests received before its last Job create: what competed with the
    /// creates while the clock ran.
    window: WriteCount,
    /// CPU from the first XADD until every Job exists.
    cpu: Cpu,
    /// Admission passes until the operator went quiet, their total time, and reconciliations.
    passes: (f64, f64, f64),
    breakdown: Breakdown,
}

/// Where a job's XADD → Job time goes, from the audit log's timestamps: XADD → the apiserver
/// receives the RepoboxJob create (the intake), the create inside the apiserver, its response →
/// the Job create received (watch delivery + admission), the Job create inside the apiserver.
struct Breakdown {
    intake: Latencies,
    rj_server: Latencies,
    admission: Latencies,
    job_server: Latencies,
}

fn latencies_of(mut v: Vec<Duration>) -> Latencies {
    v.sort();
    Latencies {
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        max: v.last().copied().unwrap_or_default(),
    }
}

fn breakdown(
    writes: &[Write],
    ns: &str,
    user: &str,
    xadd: &HashMap<String, jiff::Timestamp>,
) -> Breakdown {
    let creates = |resource: &str| -> HashMap<&str, &Write> {
        writes
            .iter()
            .filter(|w| {
                w.namespace == ns
                    && w.user == user
                    && w.verb == "create"
                    && w.resource == resource
                    && w.code < 300
            })
            .map(|w| (w.name.as_str(), w))
            .collect()
    };
    let (rjs, jobs) = (creates("repoboxjobs"), creates("jobs"));
    let (mut intake, mut rj_server, mut admission, mut job_server) =
        (vec![], vec![], vec![], vec![]);
    let span = |a: jiff::Timestamp, b: jiff::Timestamp| b.duration_since(a).unsigned_abs();
    for (name, at) in xadd {
        let (Some(rj), Some(job)) = (rjs.get(name.as_str()), jobs.get(name.as_str())) else {
            continue;
        };
        let (Some(r1), Some(r2)) = (rj.received, job.received) else {
            continue;
        };
        let rj_done = r1 + rj.server_time;
        intake.push(span(*at, r1));
        rj_server.push(rj.server_time);
        admission.push(span(rj_done, r2));
        job_server.push(job.server_time);
    }
    Breakdown {
        intake: latencies_of(intake),
        rj_server: latencies_of(rj_server),
        admission: latencies_of(admission),
        job_server: latencies_of(job_server),
    }
}

/// Submits `jobs` jobs (paced at `rate` per second, or as fast as Redis takes them when
/// `None`) and measures until every Job exists.
async fn operator_run(
    cluster: &Cluster,
    prefix: &str,
    jobs: usize,
    rate: Option<f64>,
) -> Result<Run> {
    let mut bed = Bed::new(cluster, &format!("bench-{prefix}")).await?;
    let op = bed.start_operator(cluster, &[])?;
    bed.warm_up(cluster).await?;
    let from = cluster.audit_len()?;

    eprintln!(
        "{prefix}: {jobs} jobs from {USERS} users, {}",
        rate.map(|r| format!("{r}/s"))
            .unwrap_or_else(|| "as fast as possible".into())
    );
    let mut xadd = Vec::with_capacity(jobs);
    let mut xadd_wall = HashMap::with_capacity(jobs);
    let mut tick = rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
    let cpu_start = Cpu::now(cluster);
    let started = Instant::now();
    for i in 0..jobs {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let id = format!("{prefix}{i:06}-bench");
        let wall = jiff::Timestamp::now();
        let at = bed.submit(&id, &user(i % USERS)).await?;
        xadd.push((object_name(&id), at));
        xadd_wall.insert(object_name(&id), wall);
    }
    let submit_time = started.elapsed();
    let names: Vec<String> = xadd.iter().map(|(n, _)| n.clone()).collect();
    let budget = Duration::from_secs(120 + jobs as u64 / 5);
    bed.rjs.wait_all(&names, budget).await?;
    bed.jobs.wait_all(&names, budget).await?;
    let cpu = Cpu::now(cluster).since(cpu_start);
    let first = xadd.first().map(|(_, t)| *t).context("no jobs")?;
    let last_of = |seen: &Seen| {
        names
            .iter()
            .filter_map(|n| seen.get(n))
            .max()
            .unwrap_or(first)
    };
    let rj_span = last_of(&bed.rjs).duration_since(first);
    let job_span = last_of(&bed.jobs).duration_since(first);
    let rj_lat = latencies(&xadd, &bed.rjs);
    let job_lat = latencies(&xadd, &bed.jobs);
    cluster
        .quiet_for(
            &bed.ns,
            &cluster.operator_user,
            from,
            Duration::from_secs(4),
        )
        .await?;
    let audit = read_audit(&cluster.audit, from)?;
    let writes = WriteCount::from(&audit, &bed.ns, &cluster.operator_user);
    let last_job = audit
        .iter()
        .filter(|w| {
            w.namespace == bed.ns
                && w.user == cluster.operator_user
                && w.verb == "create"
                && w.resource == "jobs"
        })
        .filter_map(|w| w.received)
        .max();
    let in_window: Vec<Write> = audit
        .iter()
        .filter(|w| {
            w.received
                .zip(last_job)
                .is_some_and(|(at, last)| at <= last)
        })
        .cloned()
        .collect();
    let window = WriteCount::from(&in_window, &bed.ns, &cluster.operator_user);
    let breakdown = breakdown(&audit, &bed.ns, &cluster.operator_user, &xadd_wall);
    let (count, sum, reconciles) = (
        "repobox_admission_pass_duration_seconds_count",
        "repobox_admission_pass_duration_seconds_sum",
        "repobox_reconciliations_total",
    );
    let scraped = op.scrape(&[count, sum, reconciles]).await?;
    let got = |name: &str| scraped.get(name).copied().unwrap_or_default();
    let passes = (got(count), got(sum), got(reconciles));
    op.stop().await?;
    bed.stop_watches();
    Ok(Run {
        cpu,
        breakdown,
        jobs,
        submit_time,
        rj_rate: jobs as f64 / rj_span.as_secs_f64(),
        job_rate: jobs as f64 / job_span.as_secs_f64(),
        rj_lat,
        job_lat,
        writes,
        window,
        passes,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 4: the happy path, with a fake kubelet.

struct Happy {
    jobs: usize,
    elapsed: Duration,
    writes: WriteCount,
    starting: usize,
}

/// Plays the kubelet for pods bound to [`NODE`] in `ns`: Running (ready), the runner's Redis
/// record (`running` → `success`), `run_for` later Succeeded.
async fn fake_kubelet(client: Client, ns: String, con: MultiplexedConnection, run_for: Duration) {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let mut handled = HashSet::new();
    let mut stream = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(ev) = stream.next().await {
        let Ok(pod) = ev else { continue };
        let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE);
        if !bound || !handled.insert(pod.name_any()) {
            continue;
        }
        let (pods, mut con) = (pods.clone(), con.clone());
        tokio::spawn(async move {
            if let Err(e) = run_pod(&pods, &mut con, &pod, run_for).await {
                eprintln!("note: the fake kubelet failed on {}: {e:#}", pod.name_any());
            }
        });
    }
}

async fn run_pod(
    pods: &Api<Pod>,
    con: &mut MultiplexedConnection,
    pod: &Pod,
    run_for: Duration,
) -> Result<()> {
    let name = pod.name_any();
    let spec = pod.spec.as_ref().context("no pod spec")?;
    let job_id = spec
        .containers
        .iter()
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == "JOB_ID")
        .and_then(|e| e.value.clone())
        .context("no JOB_ID in the pod")?;
    let started = jiff::Timestamp::now().to_string();
    let condition = |type_: &str, status: &str| json!({ "type": type_, "status": status, "lastTransitionTime": started });
    let statuses = |state: Value, ready: bool| -> Vec<Value> {
        spec.containers
            .iter()
            .map(|c| {
                json!({
                    "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                    "ready": ready, "started": ready, "restartCount": 0, "state": state
                })
            })
            .collect()
    };
    let running = json!({ "status": {
        "phase": "Running",
        "startTime": started,
        "conditions": [
            condition("PodScheduled", "True"), condition("Initialized", "True"),
            condition("ContainersReady", "True"), condition("Ready", "True"),
        ],
        "containerStatuses": statuses(json!({ "running": { "startedAt": started } }), true),
    }});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&running))
        .await?;
    transitions::start(con, &job_id, &name, 1, &started).await?;
    tokio::time::sleep(run_for).await; // the agent's work
    let finished = jiff::Timestamp::now().to_string();
    let branch = format!("repobox/{}", &job_id[..8.min(job_id.len())]);
    transitions::finish(
        con,
        &job_id,
        &Finish::success(finished.clone(), Some(branch), Some("0".repeat(40))),
    )
    .await?;
    let done = |type_: &str| json!({ "type": type_, "status": "False", "reason": "PodCompleted", "lastTransitionTime": finished });
    let succeeded = json!({ "status": {
        "phase": "Succeeded",
        "conditions": [
            condition("PodScheduled", "True"), condition("Initialized", "True"),
            done("ContainersReady"), done("Ready"),
        ],
        "containerStatuses": statuses(json!({ "terminated": {
            "exitCode": 0, "reason": "Completed", "startedAt": started, "finishedAt": finished
        }}), false),
    }});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&succeeded))
        .await?;
    Ok(())
}

async fn happy(cluster: &Cluster, jobs: usize) -> Result<Happy> {
    let run_for = Duration::from_secs(env_usize("BENCH_RUN_SECONDS", 3) as u64);
    let mut bed = Bed::new(cluster, "bench-happy").await?;
    let kubelet = tokio::spawn(fake_kubelet(
        cluster.admin.clone(),
        bed.ns.clone(),
        bed.redis.try_connection().await?,
        run_for,
    ));
    let starting_seen = Seen::default();
    let phase_watch = tokio::spawn({
        let (api, seen) = (
            Api::<RepoboxJob>::namespaced(cluster.admin.clone(), &bed.ns),
            starting_seen.clone(),
        );
        async move {
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(ev) = stream.next().await {
                if let Ok(rj) = ev
                    && rj.phase() == RepoboxJobPhase::Starting
                {
                    seen.insert(rj.name_any(), Instant::now());
                }
            }
        }
    });
    let op = bed.start_operator(cluster, &[])?;
    bed.warm_up(cluster).await?;
    // The warm-up job runs to the end too; its writes stay out of the count.
    let api = Api::<RepoboxJob>::namespaced(cluster.admin.clone(), &bed.ns);
    wait_succeeded(&api, &[object_name("warmup-0")]).await?;
    cluster
        .quiet_for(
            &bed.ns,
            &cluster.operator_user,
            cluster.audit_len()?,
            Duration::from_secs(2),
        )
        .await?;
    let from = cluster.audit_len()?;

    eprintln!("happy path: {jobs} jobs at 2/s to Succeeded (fake kubelet, {run_for:?} each)");
    let started = Instant::now();
    let mut names = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for i in 0..jobs {
        tick.tick().await;
        let id = format!("hp{i:06}-bench");
        bed.submit(&id, &user(i % USERS)).await?;
        names.push(object_name(&id));
    }
    wait_succeeded(&api, &names).await?;
    let elapsed = started.elapsed();
    cluster
        .quiet_for(
            &bed.ns,
            &cluster.operator_user,
            from,
            Duration::from_secs(4),
        )
        .await?;
    let writes = WriteCount::from(
        &read_audit(&cluster.audit, from)?,
        &bed.ns,
        &cluster.operator_user,
    );
    // How many went through `Starting` (a pod not running 2 s after its Job was created).
    let starting = names
        .iter()
        .filter(|n| starting_seen.get(n).is_some())
        .count();
    op.stop().await?;
    kubelet.abort();
    phase_watch.abort();
    bed.stop_watches();
    Ok(Happy {
        jobs,
        elapsed,
        writes,
        starting,
    })
}

async fn wait_succeeded(api: &Api<RepoboxJob>, names: &[String]) -> Result<()> {
    let want: HashSet<&String> = names.iter().collect();
    let mut done = HashSet::new();
    let mut stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(rj) = stream.try_next().await? {
            let name = rj.name_any();
            if !want.contains(&name) {
                continue;
            }
            match rj.phase() {
                RepoboxJobPhase::Succeeded => {
                    done.insert(name);
                    if done.len() == want.len() {
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
    .context("jobs did not all succeed in time")?
}

// ---------------------------------------------------------------------------------------------
// Phase 5: memory of the release binary.

struct Memory {
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

struct Child {
    child: tokio::process::Child,
    pid: u32,
}

impl Child {
    fn start(bed: &Bed, kubeconfig: &Path, lease: &str, wrapped: bool) -> Result<Self> {
        // Diagnostics: another build of the binary (e.g. with symbols) and, for the loaded
        // instance, a wrapper such as `heaptrack -o /tmp/op` (VmHWM is then the wrapper's).
        let exe = std::env::var("BENCH_OPERATOR_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_repobox-operator").to_owned());
        let wrapper = std::env::var("BENCH_OPERATOR_WRAPPER")
            .ok()
            .filter(|_| wrapped)
            .unwrap_or_default();
        let mut argv: Vec<String> = wrapper.split_whitespace().map(str::to_owned).collect();
        argv.push(exe);
        let metrics = format!("127.0.0.1:{}", repobox_testbed::free_port());
        let child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .args([
                "--redis-url",
                &bed.redis.url(),
                "--jobs-namespace",
                &bed.ns,
                "--runner-id",
                lease,
                "--metrics-addr",
                &metrics,
                "--lease-name",
                lease,
            ])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .context("spawn the operator binary")?;
        let pid = child.id().context("the operator exited at once")?;
        Ok(Self { child, pid })
    }

    /// Stops the process group (a wrapper's child too): SIGTERM, SIGKILL after 15 s.
    async fn kill(mut self) -> Result<()> {
        let signal = |sig: &str| {
            let _ = std::process::Command::new("kill")
                .args([sig, "--", &format!("-{}", self.pid)])
                .status();
        };
        signal("-TERM");
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            signal("-KILL");
            self.child.wait().await?;
        }
        Ok(())
    }

    /// Samples VmRSS for `for_` and returns (max VmRSS, VmHWM).
    async fn sample(&mut self, for_: Duration) -> Result<(u64, u64)> {
        let end = Instant::now() + for_;
        let mut rss = 0;
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait()? {
                bail!("the operator exited: {status}");
            }
            rss = rss.max(proc_status_bytes(self.pid, "VmRSS:")?);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok((rss, proc_status_bytes(self.pid, "VmHWM:")?))
    }
}

/// The `Admitted` condition as the operator leaves it on a job whose Job exists.
fn admitted_condition(rj: &RepoboxJob, at: Time) -> Condition {
    new_condition(
        condition_types::ADMITTED,
        true,
        "Admitted",
        format!("Job {} created", rj.name_any()),
        Some(1),
        at,
    )
}

/// A finished job as the operator leaves it (finalizer, `Succeeded`, completed an hour ago:
/// kept for the 24 h retention), and the status to write.
fn finished_rj(i: usize) -> (RepoboxJob, Value) {
    let rj = intake_rj("mem", i);
    let id = rj.spec.job_id.clone();
    let done = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600);
    let started = done - jiff::SignedDuration::from_secs(83);
    let status = RepoboxJobStatus {
        phase: Some(RepoboxJobPhase::Succeeded),
        reason: Some("Succeeded".into()),
        message: Some(format!("pushed repobox/{}", &id[..8])),
        // As the operator leaves them: Admitted and Complete, with their messages.
        conditions: vec![
            admitted_condition(&rj, Time(done)),
            new_condition(
                condition_types::COMPLETE,
                true,
                "Succeeded",
                format!("pushed repobox/{}", &id[..8]),
                Some(1),
                Time(done),
            ),
        ],
        job_name: Some(rj.name_any()),
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

async fn memory(cluster: &Cluster, objects: usize) -> Result<Memory> {
    let bed = Bed::new(cluster, "bench-memory").await?;
    let mut bed = bed;
    let kubeconfig = cluster
        .cp
        .service_account_kubeconfig(&cluster.system_ns, OPERATOR_SA)
        .await?;

    // Baseline: the binary leading an empty namespace, after one job went through.
    let mut base = Child::start(&bed, &kubeconfig, "repobox-operator-a", false)?;
    bed.submit("probe-a", &user(0)).await?;
    bed.jobs
        .wait_all(&[object_name("probe-a")], WAIT)
        .await
        .context("baseline probe job")?;
    tokio::time::sleep(Duration::from_secs(3)).await; // past the debounced Starting write
    let (baseline_rss, baseline_hwm) = base.sample(Duration::from_secs(3)).await?;
    base.kill().await?;

    eprintln!("memory: creating {objects} finished RepoboxJobs and their Jobs");
    let client = Client::try_from(cluster.plain_kube.clone())?;
    let rjs: Api<RepoboxJob> = Api::namespaced(client.clone(), &bed.ns);
    let jobs: Api<Job> = Api::namespaced(client, &bed.ns);
    let cfg = job_config(&bed.redis.url(), &bed.ns)?;
    let started = Instant::now();
    futures::stream::iter(0..objects)
        .map(|i| {
            let (rjs, jobs, cfg) = (rjs.clone(), jobs.clone(), &cfg);
            async move {
                let (rj, status) = finished_rj(i);
                let created = rjs.create(&post(), &rj).await?;
                rjs.patch_status(
                    &rj.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&status),
                )
                .await?;
                // Suspended: the Job controller creates no pods for them (10,000 pending pods
                // would keep the controllers busy for many minutes); the object is the same.
                let mut job = repobox_operator::decide::job_builder::job_for(&created, cfg)?;
                if let Some(spec) = job.spec.as_mut() {
                    spec.suspend = Some(true);
                }
                jobs.create(&post(), &job).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    let create_time = started.elapsed();

    // The loaded instance lists all of them at startup. Admission waits for the complete
    // initial list, so the probe's Job appearing means the cache is full.
    let started = Instant::now();
    let mut loaded = Child::start(&bed, &kubeconfig, "repobox-operator-b", true)?;
    bed.submit("probe-b", &user(1)).await?;
    bed.jobs
        .wait_all(&[object_name("probe-b")], Duration::from_secs(300))
        .await
        .context("loaded probe job")?;
    let cache_time = started.elapsed();
    let (loaded_rss, loaded_hwm) = loaded.sample(Duration::from_secs(5)).await?;
    loaded.kill().await?;
    bed.stop_watches();
    Ok(Memory {
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
// Phase 6: what each kind of request costs the apiserver.

/// The apiserver + etcd CPU per request of one kind (their idle use subtracted).
struct Cost {
    kind: String,
    /// The median of the repeats (for one run: its own figure).
    per_request: Duration,
    /// Each repeat's figure.
    each: Vec<Duration>,
    errors: usize,
}

/// Sends `n` requests made by `request`, `COST_IN_FLIGHT` at a time, and charges the
/// apiserver + etcd CPU they used above its idle use (read over the 2 s before) to them.
async fn cost_of<F, Fut>(cluster: &Cluster, kind: &str, n: usize, request: F) -> Result<Cost>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    const COST_IN_FLIGHT: usize = 8;
    let idle_from = Cpu::now(cluster);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = Cpu::now(cluster).since(idle_from);
    let idle_rate = idle.server.as_secs_f64() / idle.span.as_secs_f64();
    let start = Cpu::now(cluster);
    let results: Vec<Result<()>> = futures::stream::iter(0..n)
        .map(request)
        .buffer_unordered(COST_IN_FLIGHT)
        .collect()
        .await;
    let used = Cpu::now(cluster).since(start);
    let errors: Vec<&anyhow::Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(e) = errors.first() {
        eprintln!("cost: {kind}: {} failed, the first: {e:#}", errors.len());
    }
    let net = used.server.as_secs_f64() - idle_rate * used.span.as_secs_f64();
    Ok(Cost {
        kind: kind.to_owned(),
        per_request: Duration::from_secs_f64(net.max(0.0) / n as f64),
        each: Vec::new(),
        errors: errors.len(),
    })
}

/// A `Starting` status as the reconciler writes it for a pod that waits for a node; `round`
/// changes its message, so every write changes the object.
fn starting_status(rj: &RepoboxJob, round: usize) -> RepoboxJobStatus {
    let now = Time(jiff::Timestamp::now());
    let message = format!(
        "the runner pod waits for a node (round {round}): 0/3 nodes are available: 3 \
         Insufficient cpu"
    );
    RepoboxJobStatus {
        phase: Some(RepoboxJobPhase::Starting),
        reason: Some("WaitingForNode".into()),
        message: Some(message.clone()),
        conditions: vec![
            admitted_condition(rj, now.clone()),
            new_condition(
                "Ready",
                false,
                "WaitingForNode",
                message,
                Some(1),
                now.clone(),
            ),
        ],
        job_name: Some(rj.name_any()),
        queued_at: Some(now),
        observed_generation: Some(1),
        ..RepoboxJobStatus::default()
    }
}

/// The kinds of request [`costs`] measures, in the order of a job's life.
#[derive(Clone, Copy)]
enum CostKind {
    Create,
    StatusApply,
    StatusMerge,
    Event,
    PodList,
}

impl CostKind {
    const ALL: [CostKind; 5] = [
        Self::Create,
        Self::StatusApply,
        Self::StatusMerge,
        Self::Event,
        Self::PodList,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Create => "RepoboxJob create",
            Self::StatusApply => "status write, server-side apply (as the operator)",
            Self::StatusMerge => "status write, JSON merge patch",
            Self::Event => "Event create",
            Self::PodList => "pod list by label, from the watch cache",
        }
    }

    /// One request of this kind about `rj` (a status write changes the status by `round`).
    async fn send(self, api: &CostApis, rj: &RepoboxJob, round: usize) -> Result<()> {
        let status = || starting_status(rj, round);
        match self {
            Self::Create => drop(api.rjs.create(&post(), rj).await?),
            Self::StatusApply => {
                let body = json!({
                    "apiVersion": RepoboxJob::api_version(&()),
                    "kind": RepoboxJob::kind(&()),
                    "status": status(),
                });
                let params = PatchParams::apply(FIELD_MANAGER).force();
                let patch = Patch::Apply(body);
                drop(
                    api.rjs
                        .patch_status(&rj.name_any(), &params, &patch)
                        .await?,
                );
            }
            Self::StatusMerge => {
                let patch = Patch::Merge(json!({ "status": status() }));
                let params = PatchParams::default();
                drop(
                    api.rjs
                        .patch_status(&rj.name_any(), &params, &patch)
                        .await?,
                );
            }
            Self::Event => {
                let event = kube::runtime::events::Event {
                    type_: kube::runtime::events::EventType::Normal,
                    reason: "Admitted".into(),
                    note: Some(format!("quota slot granted; Job {} created", rj.name_any())),
                    action: "Admit".into(),
                    secondary: None,
                };
                let mut reference = rj.object_ref(&());
                reference.namespace = Some(api.ns.clone());
                api.recorder.publish(&event, &reference).await?;
            }
            Self::PodList => {
                let params = kube::api::ListParams::default()
                    .labels(&format!("job-name={}", rj.name_any()))
                    .match_any();
                drop(api.pods.list(&params).await?);
            }
        }
        Ok(())
    }
}

/// What [`CostKind::send`] sends with: the plain client's APIs in the cost phase's namespace.
struct CostApis {
    ns: String,
    rjs: Api<RepoboxJob>,
    pods: Api<Pod>,
    recorder: kube::runtime::events::Recorder,
}

/// Each kind of request the operator sends per job, `n` of each in each of `COST_REPEATS`
/// interleaved repeats (drift in the API server's own work, its garbage collection above
/// all, then falls on every kind), from the plain client's identity: what the apiserver and
/// etcd spend on one, the median of the repeats. The status write is measured as the
/// operator sends it (server-side apply) and as a JSON merge patch of the same status.
async fn costs(cluster: &Cluster, n: usize) -> Result<Vec<Cost>> {
    const COST_REPEATS: usize = 3;
    let client = Client::try_from(cluster.plain_kube.clone())?;
    let ns = cluster
        .namespace("bench-cost", "redis://127.0.0.1:1")
        .await?;
    let api = CostApis {
        rjs: Api::namespaced(client.clone(), &ns),
        pods: Api::namespaced(client.clone(), &ns),
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "repobox-operator".into(),
                instance: Some("bench".into()),
            },
        ),
        ns,
    };
    let mut measured: Vec<Vec<Cost>> = CostKind::ALL.iter().map(|_| Vec::new()).collect();
    for repeat in 0..COST_REPEATS {
        let objects: Vec<RepoboxJob> = (0..n)
            .map(|i| intake_rj(&format!("co{repeat}"), i))
            .collect();
        for (k, kind) in CostKind::ALL.into_iter().enumerate() {
            let (api, objects) = (&api, &objects);
            let cost = cost_of(cluster, kind.label(), n, |i| {
                kind.send(api, &objects[i], repeat * 2 + k)
            })
            .await?;
            measured[k].push(cost);
        }
    }
    Ok(measured
        .into_iter()
        .zip(CostKind::ALL)
        .map(|(runs, kind)| Cost {
            kind: kind.label().to_owned(),
            per_request: Duration::from_secs_f64(median(
                runs.iter().map(|c| c.per_request.as_secs_f64()),
            )),
            each: runs.iter().map(|c| c.per_request).collect(),
            errors: runs.iter().map(|c| c.errors).sum(),
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------

/// What a round of the steady or the burst phase runs.
struct Phase {
    name: &'static str,
    /// The operator's job ids start with it (the plain client's with its first letter + `p`).
    prefix: &'static str,
    jobs: usize,
    /// Jobs (and pairs) per second; `None`: as fast as possible.
    rate: Option<f64>,
}

impl Phase {
    /// Whether the plain client runs first in round `r`: in odd burst rounds and in even
    /// steady rounds.
    fn plain_first(&self, r: usize) -> bool {
        (r % 2 == 1) == self.rate.is_none()
    }
}

/// Round `r` of `phase`: the operator's run and the plain client's pairs, back to back on the
/// same control plane, in an order that alternates between rounds (the plain client first in
/// odd burst rounds and in even steady rounds), each followed by a settle. Drift in the
/// machine's speed then falls on both sides.
async fn round(cluster: &Cluster, phase: &Phase, r: usize) -> Result<(Run, Pairs)> {
    let client = Client::try_from(cluster.plain_kube.clone())?;
    let plain_first = phase.plain_first(r);
    let (name, jobs) = (phase.name, phase.jobs);
    let mut plain = None;
    let mut op = None;
    for plain_now in [plain_first, !plain_first] {
        if plain_now {
            eprintln!("{name} {r}: {jobs} plain pairs");
            let prefix = format!("{}p{r}", &phase.prefix[..1]);
            plain = Some(
                pairs(cluster, &client, &prefix, jobs, phase.rate)
                    .await
                    .context("plain pairs")?,
            );
        } else {
            let prefix = format!("{}{r}", phase.prefix);
            op = Some(
                operator_run(cluster, &prefix, jobs, phase.rate)
                    .await
                    .context(name)?,
            );
        }
        eprintln!("{name} {r}: settling ({:?})", cluster.settle().await?);
    }
    match (op, plain) {
        (Some(op), Some(plain)) => Ok((op, plain)),
        _ => bail!("a {name} round is missing a measurement"),
    }
}

/// One burst round: the operator's run and the plain client's pairs next to it.
struct BurstRound {
    /// Whether the plain client ran first this round (the order alternates).
    plain_first: bool,
    plain_rate: f64,
    plain_cpu: Cpu,
    op: Run,
}

impl BurstRound {
    /// The operator's Jobs/s as a share of the plain client's pairs/s.
    fn ratio(&self) -> f64 {
        self.op.job_rate / self.plain_rate
    }
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn print_run(title: &str, r: &Run) {
    println!("== {title} ==");
    println!(
        "  web-app writes (job hash + XADD) took {} ({:.0} entries/s offered)",
        ms(r.submit_time),
        r.jobs as f64 / r.submit_time.as_secs_f64()
    );
    println!(
        "  RepoboxJobs: {:.0}/s; Jobs: {:.0}/s (N / first XADD → last seen)",
        r.rj_rate, r.job_rate
    );
    println!("  XADD → RepoboxJob: {}", r.rj_lat);
    println!("  XADD → Job:        {}", r.job_lat);
    let b = &r.breakdown;
    println!("  where it goes (audit timestamps):");
    println!(
        "    XADD → RepoboxJob create received (intake): {}",
        b.intake
    );
    println!(
        "    RepoboxJob create inside the apiserver:      {}",
        b.rj_server
    );
    println!(
        "    its response → Job create received:          {}",
        b.admission
    );
    println!(
        "    Job create inside the apiserver:             {}",
        b.job_server
    );
    println!("  CPU until every Job existed: {}", r.cpu.per_job(r.jobs));
    println!(
        "  from the operator's start until it went quiet: {:.0} admission passes taking {} in \
         all; {:.0} reconciliations",
        r.passes.0,
        ms(Duration::from_secs_f64(r.passes.1)),
        r.passes.2
    );
    println!(
        "  the operator's requests (audit log), until it went quiet: {:.2} object writes, \
         {:.2} Events, {:.2} reads per job",
        r.writes.objects() as f64 / r.jobs as f64,
        r.writes.events() as f64 / r.jobs as f64,
        r.writes.reads() as f64 / r.jobs as f64,
    );
    r.writes.print(r.jobs);
    println!("  of these, received before the last Job create (while the clock ran):");
    r.window.print_own(r.jobs);
}

#[tokio::main]
async fn main() -> Result<()> {
    let Some(cluster) = Cluster::start().await? else {
        return Ok(()); // the SKIPPED line is printed
    };
    let jobs = env_usize("BENCH_JOBS", 1000);
    let rate = env_usize("BENCH_RATE", 20).max(1) as f64;
    let steady_jobs = env_usize("BENCH_STEADY_SECONDS", 10) * rate as usize;
    let happy_jobs = env_usize("BENCH_HAPPY_JOBS", 20);
    let memory_objects = env_usize("BENCH_MEMORY_OBJECTS", 10_000);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let phases = std::env::var("BENCH_PHASES")
        .unwrap_or_else(|_| "limit,steady,burst,happy,memory,cost".into());
    let on = |p: &str| phases.split(',').any(|x| x.trim() == p);

    println!("load average at start: {}", loadavg());
    let limit = if on("limit") {
        Some(
            limit(&cluster, jobs, rate, steady_jobs)
                .await
                .context("limit")?,
        )
    } else {
        None
    };
    // Each round runs the plain client next to the operator (see `round`): for the steady
    // phase its pairs at the same rate, for the burst its pairs with `IN_FLIGHT` in flight.
    let mut steady = Vec::new();
    if on("steady") {
        let phase = Phase {
            name: "steady",
            prefix: "st",
            jobs: steady_jobs,
            rate: Some(rate),
        };
        for r in 1..=rounds {
            steady.push(round(&cluster, &phase, r).await?);
        }
    }
    let mut burst = Vec::new();
    if on("burst") {
        let phase = Phase {
            name: "burst",
            prefix: "bu",
            jobs,
            rate: None,
        };
        for r in 1..=rounds {
            let (op, plain) = round(&cluster, &phase, r).await?;
            burst.push(BurstRound {
                plain_first: phase.plain_first(r),
                plain_rate: plain.rate,
                plain_cpu: plain.cpu,
                op,
            });
        }
    }
    let happy = if on("happy") {
        Some(happy(&cluster, happy_jobs).await.context("happy path")?)
    } else {
        None
    };
    let memory = if on("memory") {
        Some(memory(&cluster, memory_objects).await.context("memory")?)
    } else {
        None
    };
    let costs = if on("cost") {
        let n = env_usize("BENCH_COST_REQUESTS", 400).max(1);
        costs(&cluster, n).await.context("cost")?
    } else {
        Vec::new()
    };
    println!("load average at the end: {}", loadavg());

    println!();
    if let Some(l) = &limit {
        println!(
            "== Limit: plain kube-rs client, {IN_FLIGHT} in flight, {} objects ==",
            l.jobs
        );
        println!("  RepoboxJobs alone: {:.0}/s", l.rj_rate);
        println!("  Jobs alone:        {:.0}/s", l.job_rate);
        println!(
            "  RepoboxJob + Job pairs: {:.0}/s (one pair: {})",
            l.pair_rate, l.pair_latency
        );
        println!("    CPU: {}", l.pair_cpu.per_job(l.jobs));
        println!(
            "  {} pairs started at {rate:.0}/s: one pair {}",
            l.paced, l.paced_latency
        );
    }
    for (i, (r, plain)) in steady.iter().enumerate() {
        print_run(
            &format!("Steady, round {}: {} jobs at {rate:.0}/s", i + 1, r.jobs),
            r,
        );
        println!(
            "  the same round's plain client, pairs at {rate:.0}/s: RepoboxJob create sent → \
             Job seen by a watcher {}; the pair's own round trips {}",
            plain.seen, plain.latency
        );
    }
    for (i, b) in burst.iter().enumerate() {
        print_run(
            &format!("Burst, round {}: {} jobs, {USERS} users", i + 1, b.op.jobs),
            &b.op,
        );
        println!(
            "  the same round's plain client ({}): {:.0} pairs/s; CPU: {}",
            if b.plain_first { "before" } else { "after" },
            b.plain_rate,
            b.plain_cpu.per_job(b.op.jobs)
        );
        println!("  ratio: {:.0} %", b.ratio() * 100.0);
    }
    if let Some(h) = &happy {
        println!(
            "== Happy path: {} jobs to Succeeded in {} ({} went through Starting) ==",
            h.jobs,
            ms(h.elapsed),
            h.starting
        );
        h.writes.print(h.jobs);
    }
    if let Some(m) = &memory {
        println!(
            "== Memory: {} finished RepoboxJobs + their Jobs (created in {}) ==",
            m.objects,
            ms(m.create_time)
        );
        println!(
            "  baseline (empty namespace): VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            m.baseline_rss as f64 / MIB,
            m.baseline_hwm as f64 / MIB
        );
        println!(
            "  loaded: VmRSS {:.1} MiB, VmHWM {:.1} MiB (cache full {} after start)",
            m.loaded_rss as f64 / MIB,
            m.loaded_hwm as f64 / MIB,
            ms(m.cache_time)
        );
    }
    if !costs.is_empty() {
        println!("== Cost: apiserver + etcd CPU per request (idle use subtracted) ==");
        for c in &costs {
            let errors = match c.errors {
                0 => String::new(),
                n => format!(" ({n} failed)"),
            };
            let each: Vec<String> = c.each.iter().map(|d| ms(*d)).collect();
            println!(
                "  {:<52} {} (repeats: {}){errors}",
                c.kind,
                ms(c.per_request),
                each.join(", ")
            );
        }
    }

    println!();
    println!("| measure | goal | measured | |\n| --- | --- | --- | --- |");
    let row = |m: &str, g: &str, v: String, ok: bool| {
        println!("| {m} | {g} | {v} | {} |", verdict(ok));
    };
    if !steady.is_empty() {
        let secs = |d: Duration| d.as_secs_f64();
        let p99 = median(steady.iter().map(|(r, _)| secs(r.job_lat.p99)));
        let floor = median(steady.iter().map(|(_, p)| secs(p.seen.p99)));
        let each: Vec<String> = steady
            .iter()
            .map(|(r, p)| format!("{} vs {}", ms(r.job_lat.p99), ms(p.seen.p99)))
            .collect();
        row(
            "p99 XADD → Job, steady (median of the rounds; vs the plain client's pair → Job seen)",
            "≤ 50 ms",
            format!(
                "{} (plain client {}; rounds: {}; p50 {})",
                ms(Duration::from_secs_f64(p99)),
                ms(Duration::from_secs_f64(floor)),
                each.join(", "),
                ms(Duration::from_secs_f64(median(
                    steady.iter().map(|(r, _)| secs(r.job_lat.p50))
                )))
            ),
            p99 <= 0.050,
        );
    }
    if !burst.is_empty() {
        let ratio = median(burst.iter().map(BurstRound::ratio));
        let each: Vec<String> = burst
            .iter()
            .map(|b| {
                format!(
                    "{:.0} % ({:.0} vs {:.0}/s)",
                    b.ratio() * 100.0,
                    b.op.job_rate,
                    b.plain_rate
                )
            })
            .collect();
        row(
            "burst: Jobs/s vs the same round's plain pairs/s (median of the rounds)",
            "≥ 80 %",
            format!("{:.0} % (rounds: {})", ratio * 100.0, each.join(", ")),
            ratio >= 0.8,
        );
    }
    if let Some(h) = &happy {
        let per = |n: usize| n as f64 / h.jobs as f64;
        row(
            "operator object writes per job, happy path",
            "≤ 4",
            format!(
                "{:.2} (+ {:.2} Events)",
                per(h.writes.objects()),
                per(h.writes.events())
            ),
            per(h.writes.objects()) <= 4.0,
        );
    }
    if let Some(r) = burst.last().map(|b| &b.op) {
        let per = |n: usize| n as f64 / r.jobs as f64;
        row(
            "operator object writes per job, burst (pods stay pending)",
            "≤ 4",
            format!(
                "{:.2} (+ {:.2} Events)",
                per(r.writes.objects()),
                per(r.writes.events())
            ),
            per(r.writes.objects()) <= 4.0,
        );
    }
    if let Some(m) = &memory {
        row(
            "operator VmHWM, 10k RepoboxJobs + Jobs",
            "≤ 64 MiB",
            format!(
                "{:.1} MiB (baseline {:.1} MiB)",
                m.loaded_hwm as f64 / MIB,
                m.baseline_hwm as f64 / MIB
            ),
            m.loaded_hwm as f64 <= 64.0 * MIB,
        );
    }
    cluster.heartbeat.abort();
    Ok(())
}
