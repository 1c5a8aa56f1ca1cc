//! The operator's integration test bed: real redis-server, a real smart-HTTP git host, the
//! Kubernetes API emulator, and the cluster simulator running the real job-runner for each Job.
//! The operator runs in-process, unchanged, with a client pointed at the emulator.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use clap::Parser;
use kube::CustomResourceExt;
use kube::api::Api;
use redis::AsyncCommands;
use repobox_operator::config::Config;
use repobox_operator::model::crd::{RepoboxJob, RepoboxJobPhase};
use repobox_testbed::bed::{self, BedBuilder, ClusterKind};
use repobox_testbed::emulator::Emulator;
use repobox_testbed::forge::ForgeKind;
use repobox_testbed::simulator::{ClusterSimulator, SimulatorConfig};
use repobox_testbed::webapp::{self, NewJob};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const NS: &str = "repobox";
pub const TOKEN: &str = "ghp_operatorTestToken1234567890abcd";
pub const KEY_HEX: &str = "3b1f2e4d5c6a7980a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
pub const WAIT: Duration = Duration::from_secs(60);

/// The test bed's [`bed::Bed`] (Redis, git host, emulator, simulator; its fields through
/// `Deref`) plus the in-process operator.
pub struct Bed {
    bed: bed::Bed,
    operator: Option<(JoinHandle<repobox_operator::Result<()>>, CancellationToken)>,
    pub operator_starts: usize,
    /// `/metrics` of the running operator.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

repobox_testbed::deref_to_bed!(Bed, bed);

impl Bed {
    pub async fn new(sim_env: &[(&str, &str)]) -> Self {
        Self::new_with(sim_env, |_| {}).await
    }

    /// A bed whose cluster simulator is adjusted by `tweak` (pending pods, image pull errors).
    pub async fn new_with(
        sim_env: &[(&str, &str)],
        tweak: impl FnOnce(&mut SimulatorConfig),
    ) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let mut sim_cfg = SimulatorConfig {
            max_grace_period: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        tweak(&mut sim_cfg);
        let bed = BedBuilder::new(ClusterKind::Emulator, TOKEN, KEY_HEX)
            .namespace(NS)
            // With the GitHub Enterprise API double: jobs that push open a pull request.
            .forge(ForgeKind::GitHub)
            .repo("acme/api", &[("README.md", "# api\n")])
            .crd(RepoboxJob::crd())
            .timeout(WAIT)
            .runner_secrets()
            .runner_env(&[("ALLOW_INSECURE_HTTP", "true")])
            .runner_env(sim_env)
            .simulator(sim_cfg)
            .start()
            .await
            .unwrap()
            .expect("the emulator bed always starts");
        Self {
            bed,
            operator: None,
            operator_starts: 0,
            metrics_addr: None,
        }
    }

    /// The API emulator.
    pub fn emu(&self) -> &Emulator {
        self.cluster.emulator().expect("the emulator bed")
    }

    /// The cluster simulator running the Jobs.
    pub fn sim(&self) -> &ClusterSimulator {
        self.bed
            .sim
            .as_ref()
            .expect("the emulator bed runs the simulator")
    }

    /// The operator's configuration for this bed, plus `extra` flags.
    pub fn config(&self, extra: &[&str]) -> Config {
        let runner_id = format!("operator-{}", self.operator_starts);
        let mut args = vec!["repobox-operator".to_owned()];
        args.extend(self.operator_args(&runner_id, bed::free_addr()));
        args.extend(
            [
                "--leader-election",
                "true",
                "--lease-duration-seconds",
                "6",
                "--claim-min-idle-seconds",
                "1",
                "--log-format",
                "text",
            ]
            .map(str::to_owned),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        Config::try_parse_from(args).unwrap()
    }

    pub fn start_operator(&mut self, extra: &[&str]) {
        let cfg = self.config(extra);
        self.metrics_addr = Some(cfg.metrics_addr);
        self.operator_starts += 1;
        let stop = CancellationToken::new();
        let client = self.client.clone();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            repobox_operator::app::run_with_client(cfg, client, token).await
        });
        self.operator = Some((handle, stop));
    }

    /// Kills the operator without any shutdown: the task is aborted mid-flight.
    pub async fn kill_operator(&mut self) {
        if let Some((handle, _)) = self.operator.take() {
            handle.abort();
            let _ = handle.await;
        }
    }

    /// Stops the operator gracefully and returns its result.
    pub async fn stop_operator(&mut self) -> repobox_operator::Result<()> {
        let (handle, stop) = self.operator.take().expect("operator running");
        stop.cancel();
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("operator stops")
            .expect("no panic")
    }

    pub fn job(&self, id: &str, user: &str) -> NewJob {
        self.bed.job("acme/api", id, user, "gh")
    }

    /// What the web app does: job hash, provider hash, XADD.
    pub async fn submit(&mut self, job: &NewJob) -> String {
        self.bed.submit(job).await.unwrap()
    }

    pub fn rjs(&self) -> Api<RepoboxJob> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub async fn record(&mut self, job_id: &str) -> HashMap<String, String> {
        self.bed.record(job_id).await.unwrap()
    }

    /// Waits until the RepoboxJob `name` satisfies `pred` (watch events, no polling).
    pub async fn wait_rj(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&RepoboxJob) -> bool,
    ) -> RepoboxJob {
        bed::wait_object(&self.rjs(), name, WAIT, pred)
            .await
            .unwrap_or_else(|now| {
                panic!(
                    "timed out waiting for {name} to be {what}; it is {:?}",
                    now.map(|r| r.status)
                )
            })
    }

    pub async fn wait_phase(&self, name: &str, phase: RepoboxJobPhase) -> RepoboxJob {
        self.wait_rj(name, phase.as_str(), |rj| rj.phase() == phase)
            .await
    }

    /// Waits until the RepoboxJob is gone.
    pub async fn wait_gone(&self, name: &str) {
        bed::wait_deleted(&self.rjs(), name, WAIT)
            .await
            .expect("deleted in time");
    }
}

impl Bed {
    /// `runner:user:{user}:running` is written by the admission pass after a change; there is
    /// no event to await in Redis, so this polls briefly (bounded).
    pub async fn eventually_counter(&mut self, user: &str, want: &str) {
        self.bed
            .eventually_counter(user, want, Duration::from_secs(10))
            .await
            .unwrap();
    }
}

impl Bed {
    /// One sample from the operator's `/metrics`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = bed::http_get(self.metrics_addr?, "/metrics").await.ok()?;
        body.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.trim().split(' ').next()?.parse().ok())
        })
    }

    /// Waits (bounded polling of `/metrics`: there is no event to await) for a sample value.
    pub async fn eventually_metric(&self, series: &str, want: f64) {
        for _ in 0..500 {
            if self.metric(series).await == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "{series} is {:?}, expected {want}",
            self.metric(series).await
        );
    }
}

/// An agent command that blocks until the test opens the gate, so runners hold their quota
/// slots exactly as long as the test needs.
pub struct Gate {
    dir: tempfile::TempDir,
}

impl Gate {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn file(&self) -> std::path::PathBuf {
        self.dir.path().join("go")
    }

    /// The agent: waits for the gate, then runs `then` (may be empty).
    pub fn agent(&self, then: &str) -> String {
        format!(
            "while [ ! -e {} ]; do sleep 0.05; done; {then}",
            self.file().display()
        )
    }

    pub fn open(&self) {
        std::fs::write(self.file(), "").unwrap();
    }
}

/// Every field a RepoboxJob status serializes, as text (to check no secret is there).
pub fn to_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

impl Bed {
    /// What the web app does for a user on `plan`: the job hash with its optional `plan` field,
    /// then the XADD.
    pub async fn submit_with_plan(&mut self, job: &NewJob, plan: &str) -> String {
        self.bed
            .create_provider(&job.user_id, &job.provider_id)
            .await
            .unwrap();
        webapp::create_job(&mut self.con, job).await.unwrap();
        let _: () = self
            .con
            .hset(format!("job:{}", job.id), "plan", plan)
            .await
            .unwrap();
        webapp::enqueue(&mut self.con, job).await.unwrap()
    }

    /// Waits (bounded polling: Redis sends no event for a hash write the test can await
    /// without subscribing first) until `job:{id}` has `status` = `want`.
    pub async fn eventually_status(&mut self, job_id: &str, want: &str) -> HashMap<String, String> {
        for _ in 0..500 {
            let rec = self.record(job_id).await;
            if rec.get("status").map(String::as_str) == Some(want) {
                return rec;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "job:{job_id} is {:?}, expected {want}",
            self.record(job_id).await
        );
    }

    /// The operator's `/readyz` status code and body.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        bed::http_get(self.metrics_addr?, "/readyz").await.ok()
    }

    /// Runs the real `repobox-operator` binary with `args` against this bed's Redis (as
    /// `kubectl exec deploy/repobox-operator -- repobox-operator …` would) and returns stdout.
    pub async fn operator_cli(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_repobox-operator"))
            .args(args)
            .env("REDIS_URL", self.redis.url())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "repobox-operator {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
