//! The operator's integration test bed: real redis-server, a real smart-HTTP git host, the
//! Kubernetes API emulator, and the cluster simulator running the real job-runner for each Job.
//! The operator runs in-process, unchanged, with a client pointed at the emulator.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, CustomResourceExt};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use repobox_contract::EncryptionKey;
use repobox_operator::config::Config;
use repobox_operator::model::crd::{RepoboxJob, RepoboxJobPhase};
use repobox_testbed::emulator::Emulator;
use repobox_testbed::forge::ForgeKind;
use repobox_testbed::githost::GitHost;
use repobox_testbed::redis_server::RedisServer;
use repobox_testbed::simulator::{ClusterSimulator, SimulatorConfig};
use repobox_testbed::webapp::{self, NewJob};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const NS: &str = "repobox";
pub const TOKEN: &str = "ghp_operatorTestToken1234567890abcd";
pub const KEY_HEX: &str = "3b1f2e4d5c6a7980a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Bed {
    pub redis: RedisServer,
    pub git: GitHost,
    pub emu: Emulator,
    pub client: Client,
    pub sim: ClusterSimulator,
    pub key: EncryptionKey,
    pub con: MultiplexedConnection,
    operator: Option<(JoinHandle<repobox_operator::Result<()>>, CancellationToken)>,
    pub operator_starts: usize,
    /// `/metrics` of the running operator.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

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
        let redis = RedisServer::start().await.unwrap();
        // With the GitHub Enterprise API double: jobs that push open a pull request.
        let git = GitHost::start_with_forge(TOKEN, ForgeKind::GitHub)
            .await
            .unwrap();
        git.create_repo("acme/api", &[("README.md", "# api\n")])
            .unwrap();
        let emu = Emulator::start().await.unwrap();
        let client = emu.client().unwrap();

        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.create(&PostParams::default(), &RepoboxJob::crd())
            .await
            .unwrap();
        tokio::time::timeout(
            WAIT,
            await_condition(
                crds,
                "repoboxjobs.repobox.dev",
                conditions::is_crd_established(),
            ),
        )
        .await
        .unwrap()
        .unwrap();

        let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
        for (name, key, value) in [
            ("repobox-redis", "url", redis.url()),
            ("repobox-encryption-key", "key", KEY_HEX.to_owned()),
        ] {
            let s = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                string_data: Some(BTreeMap::from([(key.to_owned(), value)])),
                ..Default::default()
            };
            secrets.create(&PostParams::default(), &s).await.unwrap();
        }

        let mut extra_env = vec![("ALLOW_INSECURE_HTTP".to_owned(), "true".to_owned())];
        extra_env.extend(sim_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let runner = repobox_testbed::job_runner_binary().unwrap();
        let mut sim_cfg = SimulatorConfig {
            namespace: Some(NS.into()),
            binaries: HashMap::from([("repobox-job-runner".to_owned(), runner)]),
            max_grace_period: Some(Duration::from_secs(5)),
            extra_env,
            ..Default::default()
        };
        tweak(&mut sim_cfg);
        let sim = ClusterSimulator::start(client.clone(), sim_cfg)
            .await
            .unwrap();
        let con = redis.connection().await;
        Self {
            redis,
            git,
            emu,
            client,
            sim,
            key: EncryptionKey::parse(KEY_HEX).unwrap(),
            con,
            operator: None,
            operator_starts: 0,
            metrics_addr: None,
        }
    }

    /// The operator's configuration for this bed, plus `extra` flags.
    pub fn config(&self, extra: &[&str]) -> Config {
        let metrics = format!("127.0.0.1:{}", repobox_testbed::free_port());
        let runner_id = format!("operator-{}", self.operator_starts);
        let mut args = vec![
            "repobox-operator",
            "--redis-url",
            self.redis_url(),
            "--jobs-namespace",
            NS,
            "--runner-id",
            &runner_id,
            "--metrics-addr",
            &metrics,
            "--leader-election",
            "true",
            "--lease-duration-seconds",
            "6",
            "--claim-min-idle-seconds",
            "1",
            "--log-format",
            "text",
        ];
        args.extend_from_slice(extra);
        Config::try_parse_from(args).unwrap()
    }

    fn redis_url(&self) -> &'static str {
        Box::leak(self.redis.url().into_boxed_str())
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
        let mut j = NewJob::new(
            id,
            user,
            &self.git.url("acme/api"),
            &format!("Change for {id}"),
        );
        j.provider_id = "gh".into();
        j
    }

    /// What the web app does: job hash, provider hash, XADD.
    pub async fn submit(&mut self, job: &NewJob) -> String {
        webapp::create_provider(
            &mut self.con,
            &job.user_id,
            &job.provider_id,
            &self.key,
            TOKEN,
            &self.git.base_url(),
        )
        .await
        .unwrap();
        webapp::submit(&mut self.con, job).await.unwrap()
    }

    pub fn rjs(&self) -> Api<RepoboxJob> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub async fn record(&mut self, job_id: &str) -> HashMap<String, String> {
        self.con.hgetall(format!("job:{job_id}")).await.unwrap()
    }

    /// Waits until the RepoboxJob `name` satisfies `pred` (watch events, no polling).
    pub async fn wait_rj(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&RepoboxJob) -> bool,
    ) -> RepoboxJob {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = watcher(self.rjs(), cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        let found = tokio::time::timeout(WAIT, async {
            while let Some(ev) = stream.next().await {
                if let Ok(rj) = ev
                    && pred(&rj)
                {
                    return rj;
                }
            }
            panic!("watch ended")
        })
        .await;
        match found {
            Ok(rj) => rj,
            Err(_) => {
                let now = self.rjs().get_opt(name).await.ok().flatten();
                panic!(
                    "timed out waiting for {name} to be {what}; it is {:?}",
                    now.map(|r| r.status)
                );
            }
        }
    }

    pub async fn wait_phase(&self, name: &str, phase: RepoboxJobPhase) -> RepoboxJob {
        self.wait_rj(name, phase.as_str(), |rj| rj.phase() == phase)
            .await
    }

    /// Waits until the RepoboxJob is gone.
    pub async fn wait_gone(&self, name: &str) {
        let api = self.rjs();
        let Some(uid) = api
            .get_opt(name)
            .await
            .unwrap()
            .and_then(|rj| rj.metadata.uid)
        else {
            return;
        };
        tokio::time::timeout(
            WAIT,
            await_condition(api, name, conditions::is_deleted(&uid)),
        )
        .await
        .expect("deleted in time")
        .unwrap();
    }
}

impl Bed {
    /// `runner:user:{user}:running` is written by the admission pass after a change; there is
    /// no event to await in Redis, so this polls briefly (bounded).
    pub async fn eventually_counter(&mut self, user: &str, want: &str) {
        let key = format!("runner:user:{user}:running");
        for _ in 0..500 {
            let v: Option<String> = self.con.get(&key).await.unwrap();
            if v.as_deref() == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let v: Option<String> = self.con.get(&key).await.unwrap();
        panic!("{key} is {v:?}, expected {want}");
    }
}

impl Bed {
    /// One sample from the operator's `/metrics` (plain HTTP/1.0 over a TcpStream).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr?;
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
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
        webapp::create_provider(
            &mut self.con,
            &job.user_id,
            &job.provider_id,
            &self.key,
            TOKEN,
            &self.git.base_url(),
        )
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
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr?;
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        let code = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_owned();
        Some((code, body))
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
