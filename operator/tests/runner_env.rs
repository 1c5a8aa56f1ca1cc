//! The operator ↔ runner environment contract, end to end: the Job the operator builds must set
//! what the job-runner reads, and nothing it does not.
//!
//! The Job's containers get their environment the way the kubelet would give it to them
//! (`secretKeyRef`, `fieldRef`, mounted Secret and ConfigMap files under a temporary root), and
//! the runner's own parsers (`Config::from_lookup`, `AgentConfig::from_lookup`) read it through
//! a lookup that records every name they ask for. Renaming a variable on one side only, or a new
//! setting on one side only, fails here.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use repobox_contract::pod::HANDOFF_SUBDIR;
use repobox_contract::runner_env as renv;
use repobox_job_runner::agent::AgentConfig;
use repobox_job_runner::config::{Config as RunnerConfig, LogFormat};
use repobox_operator::config::Config;
use repobox_operator::decide::job_builder::job_for;
use repobox_operator::decide::job_config::JobConfig;
use repobox_operator::model::crd::{RepoboxJob, RepoboxJobSpec, RepoboxJobStatus};

/// Names the runner asks for that the operator deliberately leaves unset (so the runner's own
/// default applies), each with the reason. Every entry must be asked for and not set.
const LEFT_TO_RUNNER_DEFAULTS: &[(&str, &str)] = &[
    (
        renv::ENCRYPTION_KEY,
        "the key never goes into a Job: ENCRYPTION_KEY_FILE names the mounted Secret",
    ),
    (
        renv::AGENT_COMMAND,
        "local agent only: in a pod the agent runs in its own container",
    ),
    (renv::AGENT_ENV, "local agent only"),
    (
        renv::AGENT_START_TIMEOUT_SECONDS,
        "the runner's default; the operator has no setting for it",
    ),
    (
        renv::OUTPUT_FLUSH_LINES,
        "the live events' bounds are the defaults; only lower values are allowed",
    ),
    (renv::OUTPUT_FLUSH_BYTES, "as OUTPUT_FLUSH_LINES"),
    (renv::OUTPUT_FLUSH_MS, "as OUTPUT_FLUSH_LINES"),
    (
        renv::OUTPUT_MAX_BYTES,
        "the runner's default; the operator has no setting for it",
    ),
    (
        renv::KILL_GRACE_SECONDS,
        "the runner's default, well inside the pod's termination grace",
    ),
    (renv::GIT_BIN, "the image's git, on PATH"),
];

/// Names the builder sets in the runner container that the runner's `Config` does not read,
/// each with the reason. Every entry must be set and not asked for.
const SET_FOR_THE_CONTAINER: &[(&str, &str)] = &[
    (
        renv::HOME,
        "for git and the children the runner starts: the root file system is read-only",
    ),
    (
        renv::JOB_TIMEOUT,
        "for information: the Job's activeDeadlineSeconds is what stops the pod",
    ),
];

/// Names the agent wrapper asks for that the operator leaves to its defaults.
const LEFT_TO_WRAPPER_DEFAULTS: &[(&str, &str)] = &[
    (renv::KILL_GRACE_SECONDS, "the wrapper's default"),
    (
        renv::AGENT_WAIT_SECONDS,
        "the wrapper's default (the runner claims the hand-off at once)",
    ),
];

/// Names the builder sets in the agent container that the wrapper's config does not read.
const SET_FOR_THE_AGENT: &[(&str, &str)] = &[
    (
        renv::HOME,
        "for the agent: its root file system is read-only",
    ),
    (
        renv::LOG_FORMAT,
        "read by the binary's log set-up before any configuration",
    ),
];

const KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const REDIS_URL: &str = "redis://:hunter2@redis.repobox.svc:6379/0";
const POD_NAME: &str = "job-1-r2-x7k2p";
const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

/// The operator's settings from flags only (the test process's environment is ignored).
fn operator_config(flags: &[&str]) -> JobConfig {
    let cmd = Config::command().mut_args(|a| a.env(None));
    let argv = std::iter::once("repobox-operator").chain(flags.iter().copied());
    let matches = cmd.try_get_matches_from(argv).expect("flags parse");
    Config::from_arg_matches(&matches)
        .expect("config")
        .job_config()
        .expect("job config")
}

/// Every optional feature on, every pass-through setting off its default.
const FULL: &[&str] = &[
    "--redis-url=redis://operator-only:6379",
    "--temp-dir=/work",
    "--cleanup-after-job=false",
    "--git-author-name=Repobox Bot",
    "--git-author-email=bot@example.com",
    "--git-clone-depth=0",
    "--agent-command=claude -p \"$(cat $REPOBOX_PROMPT_FILE)\"",
    "--agent-image=agent:1",
    r#"--agent-extra-env={"AGENT_MODE":"ci"}"#,
    "--runner-env-from-secrets=agent-keys",
    "--allow-insecure-http=true",
    "--open-pull-requests=false",
    "--git-ca-configmap=git-ca",
    "--git-ca-key=bundle.pem",
    "--redis-ca-secret-name=redis-ca",
    "--job-timeout=900",
];

fn repobox_job(attempt: u32) -> RepoboxJob {
    let mut rj = RepoboxJob::new(
        "job-1",
        RepoboxJobSpec {
            job_id: "job-1".into(),
            user_id: "user-1".into(),
            repo: "https://git.example.com/acme/api.git".into(),
            stream_entry_id: "1700000000000-0".into(),
            provider_id: Some("p1".into()),
            base_branch: Some("main".into()),
            timeout_seconds: None,
            cancel: None,
            plan: None,
        },
    );
    rj.metadata.namespace = Some("jobs".into());
    rj.metadata.uid = Some("6f1c0d9e-1111-2222-3333-444455556666".into());
    rj.status = Some(RepoboxJobStatus {
        attempt: Some(attempt),
        ..RepoboxJobStatus::default()
    });
    rj
}

fn pod(job: &Job) -> &PodSpec {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

fn container<'a>(job: &'a Job, name: &str) -> &'a Container {
    let p = pod(job);
    p.containers
        .iter()
        .chain(p.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// What the kubelet would do for one container: mount its volumes under `root` (Secret and
/// ConfigMap items as files) and resolve its `env`, rewriting paths under a mount to `root`.
struct Kubelet<'a> {
    root: &'a Path,
    cfg: &'a JobConfig,
}

impl Kubelet<'_> {
    /// The content of a Secret or ConfigMap key the Job refers to: only those the test knows.
    fn data(&self, name: &str, key: &str) -> String {
        let cfg = self.cfg;
        let known = [
            (&cfg.redis_secret.name, &cfg.redis_secret.key, REDIS_URL),
            (
                &cfg.encryption_key_secret.name,
                &cfg.encryption_key_secret.key,
                KEY_HEX,
            ),
        ];
        if let Some((_, _, v)) = known.iter().find(|(n, k, _)| *n == name && *k == key) {
            return (*v).to_owned();
        }
        let ca = cfg.git_ca.as_ref().map(|c| (&c.name, &c.key));
        let redis_ca = cfg.redis_ca.as_ref().map(|c| (&c.name, &c.key));
        if [ca, redis_ca]
            .into_iter()
            .flatten()
            .any(|(n, k)| n == name && k == key)
        {
            return PEM.to_owned();
        }
        panic!("the Job refers to {name}/{key}, which this test does not know: add it");
    }

    /// Mounts the container's volumes; returns (mount path, host path) pairs.
    fn mount(&self, job: &Job, c: &Container) -> Vec<(String, PathBuf)> {
        let volumes = pod(job).volumes.as_ref().expect("volumes");
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let v = volumes
                .iter()
                .find(|v| v.name == m.name)
                .unwrap_or_else(|| panic!("mount of a missing volume {}", m.name));
            let dir = self.root.join(&v.name);
            std::fs::create_dir_all(&dir).expect("volume dir");
            let items = v
                .secret
                .as_ref()
                .map(|s| (s.secret_name.clone().unwrap_or_default(), s.items.clone()))
                .or_else(|| {
                    v.config_map
                        .as_ref()
                        .map(|c| (c.name.clone(), c.items.clone()))
                });
            if let Some((source, items)) = items {
                for item in items.into_iter().flatten() {
                    std::fs::write(dir.join(&item.path), self.data(&source, &item.key))
                        .expect("item file");
                }
            }
            let host = match &m.sub_path {
                Some(sub) => dir.join(sub),
                None => dir,
            };
            std::fs::create_dir_all(&host).expect("mount dir");
            mounts.push((m.mount_path.clone(), host));
        }
        mounts
    }

    /// The container's environment, `envFrom` aside (the agent's own Secrets).
    fn env(&self, job: &Job, c: &Container) -> BTreeMap<String, String> {
        let mounts = self.mount(job, c);
        let host_path = |value: &str| -> String {
            let found = mounts
                .iter()
                .filter(|(m, _)| {
                    value == m.as_str()
                        || value.starts_with(&format!("{}/", m.trim_end_matches('/')))
                })
                .max_by_key(|(m, _)| m.len());
            match found {
                Some((m, host)) => {
                    let rest = value[m.len()..].trim_start_matches('/');
                    host.join(rest).to_string_lossy().into_owned()
                }
                None => value.to_owned(),
            }
        };
        let mut env = BTreeMap::new();
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), None) => host_path(v),
                (None, Some(from)) => {
                    if let Some(s) = &from.secret_key_ref {
                        self.data(&s.name, &s.key)
                    } else if let Some(f) = &from.field_ref {
                        assert_eq!(f.field_path, "metadata.name", "{}", e.name);
                        POD_NAME.to_owned()
                    } else {
                        panic!("{}: resolve this kind of source in the test", e.name);
                    }
                }
                other => panic!("{}: {other:?}", e.name),
            };
            assert!(
                env.insert(e.name.clone(), value).is_none(),
                "{} is set twice",
                e.name
            );
        }
        env
    }
}

/// A lookup over `env` that remembers every name asked for.
struct Recorder<'a> {
    env: &'a BTreeMap<String, String>,
    asked: RefCell<BTreeSet<String>>,
}

impl<'a> Recorder<'a> {
    fn new(env: &'a BTreeMap<String, String>) -> Self {
        Self {
            env,
            asked: RefCell::new(BTreeSet::new()),
        }
    }

    fn get(&self, name: &str) -> Option<String> {
        self.asked.borrow_mut().insert(name.to_owned());
        self.env.get(name).cloned()
    }

    fn asked(&self) -> BTreeSet<String> {
        self.asked.borrow().clone()
    }
}

/// Both directions: what is asked is set or deliberately left to a default; what is set is
/// asked or deliberately set for something else. The lists themselves must stay accurate.
fn assert_agree(
    who: &str,
    asked: &BTreeSet<String>,
    set: &BTreeSet<String>,
    left_to_defaults: &[(&str, &str)],
    set_for_other_reasons: &[(&str, &str)],
) {
    let defaults: BTreeSet<&str> = left_to_defaults.iter().map(|(n, _)| *n).collect();
    let others: BTreeSet<&str> = set_for_other_reasons.iter().map(|(n, _)| *n).collect();
    for name in asked {
        assert!(
            set.contains(name) || defaults.contains(name.as_str()),
            "the {who} reads {name}, but the operator's Job does not set it: set it in \
             job_builder, or list it as left to the {who}'s default (and say why)"
        );
    }
    for name in set {
        assert!(
            asked.contains(name) || others.contains(name.as_str()),
            "the operator's Job sets {name}, but the {who} does not read it (renamed on one side?)"
        );
    }
    for name in defaults {
        assert!(
            asked.contains(name),
            "{name} is listed as left to the {who}'s default, but the {who} does not read it"
        );
        assert!(
            !set.contains(name),
            "{name} is listed as left to the {who}'s default, but the Job sets it"
        );
    }
    for name in others {
        assert!(
            set.contains(name),
            "{name} is listed as set by the Job, but it is not"
        );
        assert!(
            !asked.contains(name),
            "{name} is listed as not read by the {who}, but it is"
        );
    }
}

#[test]
fn the_job_sets_what_the_runner_reads_and_nothing_else() {
    let cfg = operator_config(FULL);
    let job = job_for(&repobox_job(2), &cfg).expect("job_for");
    let root = tempfile::tempdir().expect("tempdir");
    let kubelet = Kubelet {
        root: root.path(),
        cfg: &cfg,
    };

    // The runner container.
    let env = kubelet.env(
        &job,
        container(&job, repobox_operator::model::pod_layout::CONTAINER_NAME),
    );
    let rec = Recorder::new(&env);
    let runner = RunnerConfig::from_lookup(|n| rec.get(n)).expect("the runner accepts its Job");
    let set: BTreeSet<String> = env.keys().cloned().collect();
    assert_agree(
        "runner",
        &rec.asked(),
        &set,
        LEFT_TO_RUNNER_DEFAULTS,
        SET_FOR_THE_CONTAINER,
    );

    // And the values arrive as the operator was told.
    assert_eq!(runner.job_id, "job-1");
    assert_eq!(runner.attempt, 2);
    assert_eq!(runner.runner_id, POD_NAME);
    assert_eq!(runner.redis_url, REDIS_URL);
    assert!(!runner.cleanup_after_job);
    assert_eq!(runner.git_author_name, "Repobox Bot");
    assert_eq!(runner.git_author_email, "bot@example.com");
    assert_eq!(runner.clone_depth, 0);
    assert!(runner.agent_container);
    assert_eq!(runner.agent_command, None);
    assert!(runner.allow_insecure_http);
    assert!(!runner.open_pull_requests);
    assert_eq!(runner.log_format, LogFormat::Json);
    // The work and private directories are the volumes mounted there, and the CA paths name
    // the mounted keys.
    assert_eq!(
        runner.temp_dir,
        root.path()
            .join(repobox_operator::model::pod_layout::WORK_VOLUME)
    );
    assert_eq!(
        runner.private_dir,
        root.path()
            .join(repobox_operator::model::pod_layout::STATE_VOLUME)
    );
    for ca in [&runner.git_ca_file, &runner.redis_ca_file] {
        let ca = ca.as_ref().expect("CA file set");
        assert_eq!(
            std::fs::read_to_string(ca).expect("mounted CA"),
            PEM,
            "{}",
            ca.display()
        );
    }

    // The agent container: the wrapper's settings, and the hand-off directory is the one the
    // runner prepares.
    let agent_c = container(
        &job,
        repobox_operator::model::pod_layout::AGENT_CONTAINER_NAME,
    );
    let env = kubelet.env(&job, agent_c);
    let rec = Recorder::new(&env);
    let agent = AgentConfig::from_lookup(|n| rec.get(n)).expect("the wrapper accepts its Job");
    assert_eq!(agent.command, "claude -p \"$(cat $REPOBOX_PROMPT_FILE)\"");
    assert_eq!(agent.handoff_dir, runner.temp_dir.join(HANDOFF_SUBDIR));
    let extra: BTreeSet<&str> = cfg
        .agent
        .as_ref()
        .expect("agent on")
        .extra_env
        .keys()
        .map(String::as_str)
        .collect();
    let set: BTreeSet<String> = env
        .keys()
        .filter(|k| !extra.contains(k.as_str()))
        .cloned()
        .collect();
    assert_agree(
        "agent wrapper",
        &rec.asked(),
        &set,
        LEFT_TO_WRAPPER_DEFAULTS,
        SET_FOR_THE_AGENT,
    );

    // The install container: only the log format, which every subcommand reads.
    let env = kubelet.env(
        &job,
        container(
            &job,
            repobox_operator::model::pod_layout::INSTALL_CONTAINER_NAME,
        ),
    );
    assert_eq!(env.keys().collect::<Vec<_>>(), [renv::LOG_FORMAT]);
}

/// Without the optional features the Job leaves their variables out, and the runner's defaults
/// for them are the operator's "off".
#[test]
fn optional_features_off_are_the_runner_defaults() {
    let cfg = operator_config(&["--redis-url=redis://operator-only:6379"]);
    let job = job_for(&repobox_job(1), &cfg).expect("job_for");
    let root = tempfile::tempdir().expect("tempdir");
    let kubelet = Kubelet {
        root: root.path(),
        cfg: &cfg,
    };
    let env = kubelet.env(
        &job,
        container(&job, repobox_operator::model::pod_layout::CONTAINER_NAME),
    );
    let optional = [
        renv::AGENT_CONTAINER,
        renv::ALLOW_INSECURE_HTTP,
        renv::GIT_SSL_CAINFO,
        renv::REDIS_CA_FILE,
    ];
    for name in optional {
        assert!(!env.contains_key(name), "{name}");
    }
    let runner = RunnerConfig::from_lookup(|n| env.get(n).cloned()).expect("config");
    assert!(!runner.agent_container);
    assert!(!runner.allow_insecure_http);
    assert_eq!(runner.git_ca_file, None);
    assert_eq!(runner.redis_ca_file, None);
    // The operator's own defaults for what it always passes are the runner's.
    assert_eq!(runner.attempt, renv::DEFAULT_JOB_ATTEMPT);
    assert_eq!(runner.cleanup_after_job, renv::DEFAULT_CLEANUP_AFTER_JOB);
    assert_eq!(runner.git_author_name, renv::DEFAULT_GIT_AUTHOR_NAME);
    assert_eq!(runner.git_author_email, renv::DEFAULT_GIT_AUTHOR_EMAIL);
    assert_eq!(runner.clone_depth, renv::DEFAULT_GIT_CLONE_DEPTH);
    assert_eq!(runner.open_pull_requests, renv::DEFAULT_OPEN_PULL_REQUESTS);
    // ...and so are the runner's when nothing is passed.
    let bare = BTreeMap::from([
        (renv::JOB_ID, "j"),
        (renv::REDIS_URL, REDIS_URL),
        (renv::ENCRYPTION_KEY, KEY_HEX),
    ]);
    let own = RunnerConfig::from_lookup(|n| bare.get(n).map(|v| v.to_string())).expect("bare");
    assert_eq!(own.cleanup_after_job, runner.cleanup_after_job);
    assert_eq!(own.git_author_name, runner.git_author_name);
    assert_eq!(own.git_author_email, runner.git_author_email);
    assert_eq!(own.clone_depth, runner.clone_depth);
    assert_eq!(own.open_pull_requests, runner.open_pull_requests);
}
