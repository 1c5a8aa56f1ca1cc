//! The settings' tests; `test_config` and `test_job_config` serve the other modules' tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::*;
use crate::decide::job_config::{ConfigMapKeyRef, JobConfig, RunnerResources, SecretKeyRef};
use crate::decide::quota::Limits;

/// Parses `args` with `env` as the environment, ignoring the real process environment (so
/// tests are hermetic and need no `set_var`). Environment values are injected as flags placed
/// before `args`, which keeps clap's precedence (flag over environment over default).
pub(crate) fn parse_with_env(
    args: &[&str],
    env: &[(&str, &str)],
) -> std::result::Result<Config, clap::Error> {
    let mut cmd = Config::command();
    let mut argv: Vec<String> = vec!["repobox-operator".into()];
    for arg in cmd.get_arguments() {
        let (Some(name), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        if let Some((_, v)) = env.iter().find(|(k, _)| std::ffi::OsStr::new(k) == name) {
            argv.push(format!("--{long}={v}"));
        }
    }
    argv.extend(args.iter().map(|s| s.to_string()));
    cmd = cmd.mut_args(|a| a.env(None)).args_override_self(true);
    let matches = cmd.try_get_matches_from(argv)?;
    Config::from_arg_matches(&matches)
}

/// A config with only the required setting, as the tests of other modules need.
pub(crate) fn test_config(env: &[(&str, &str)]) -> Config {
    let mut all = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "REDIS_URL") {
        all.push(("REDIS_URL", "redis://localhost:6379"));
    }
    match parse_with_env(&[], &all) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

pub(crate) fn test_job_config(env: &[(&str, &str)]) -> JobConfig {
    test_config(env).job_config().unwrap()
}

#[test]
fn clap_definition_is_consistent() {
    Config::command().debug_assert();
}

#[test]
fn every_flag_has_its_env_var() {
    let cmd = Config::command();
    let mut pairs: Vec<(String, String)> = cmd
        .get_arguments()
        .filter(|a| a.get_id() != "help" && a.get_id() != "version")
        .map(|a| {
            let long = a.get_long().unwrap_or_default().to_owned();
            let env = a
                .get_env()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default();
            (long, env)
        })
        .collect();
    pairs.sort();
    for (long, env) in &pairs {
        assert_eq!(
            &long.replace('-', "_").to_uppercase(),
            env,
            "--{long} must read {env}"
        );
    }
    let envs: Vec<&str> = pairs.iter().map(|(_, e)| e.as_str()).collect();
    for required in [
        "REDIS_URL",
        "RUNNER_ID",
        "MAX_CONCURRENT_JOBS",
        "MAX_JOBS_PER_USER",
        "JOB_TIMEOUT",
        "JOBS_NAMESPACE",
        "STREAM_KEY",
        "CONSUMER_GROUP",
        "DEAD_LETTER_STREAM",
        "MAX_DELIVERIES",
        "CLAIM_MIN_IDLE_SECONDS",
        "MAX_QUEUED",
        "MAX_QUEUED_PER_USER",
        "PLAN_LIMITS",
        "RETENTION_SECONDS",
        "PENDING_TIMEOUT_SECONDS",
        "METRICS_ADDR",
        "LEADER_ELECTION",
        "LEASE_NAME",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "RUNNER_IMAGE",
        "RUNNER_IMAGE_PULL_POLICY",
        "RUNNER_SERVICE_ACCOUNT",
        "RUNNER_CPU_REQUEST",
        "RUNNER_CPU_LIMIT",
        "RUNNER_MEMORY_REQUEST",
        "RUNNER_MEMORY_LIMIT",
        "RUNNER_EPHEMERAL_STORAGE",
        "RUNNER_NODE_SELECTOR",
        "RUNNER_TOLERATIONS",
        "RUNNER_AFFINITY",
        "RUNNER_PRIORITY_CLASS",
        "JOB_TTL_SECONDS",
        "RUNNER_TERMINATION_GRACE_SECONDS",
        "REDIS_SECRET_NAME",
        "REDIS_SECRET_KEY",
        "ENCRYPTION_KEY_SECRET_NAME",
        "ENCRYPTION_KEY_SECRET_KEY",
        "TEMP_DIR",
        "CLEANUP_AFTER_JOB",
        "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL",
        "GIT_CLONE_DEPTH",
        "AGENT_COMMAND",
        "POD_NAME",
        "POD_NAMESPACE",
        "HOSTNAME",
    ] {
        assert!(envs.contains(&required), "{required} missing");
    }
}

#[test]
fn invalid_plan_limits_are_refused_at_start_up() {
    for bad in ["{", r#"{"free": 0}"#, r#"{"default": 2}"#] {
        let err = test_config(&[("PLAN_LIMITS", bad)]).validate().unwrap_err();
        assert!(err.to_string().contains("PLAN_LIMITS"), "{err}");
    }
    test_config(&[("PLAN_LIMITS", r#"{"free": 1}"#)])
        .validate()
        .unwrap();
}

#[test]
fn redis_url_is_required() {
    let err = parse_with_env(&[], &[]).unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    assert!(err.to_string().contains("--redis-url"));
}

#[test]
fn defaults() {
    let c = test_config(&[]);
    assert_eq!(c.redis.redis_url.expose(), "redis://localhost:6379");
    assert_eq!(c.runner_id(), "runner-1");
    assert_eq!(c.quotas.max_concurrent_jobs, 10);
    assert_eq!(c.quotas.max_jobs_per_user, 3);
    assert_eq!(
        c.limits(),
        Limits {
            per_user: 3,
            global: 10
        }
    );
    assert_eq!(c.quotas.job_timeout, 3600);
    assert_eq!(c.job_timeout(), Duration::from_secs(3600));
    assert_eq!(c.jobs_namespace(), "default");
    assert_eq!(c.lease_namespace(), "default");
    assert_eq!(c.redis.stream_key, "jobs:stream");
    assert_eq!(c.redis.consumer_group, "jobs:stream:runners");
    assert_eq!(c.redis.dead_letter_stream, "jobs:stream:dead");
    assert_eq!(c.redis.max_deliveries, 5);
    assert_eq!(c.claim_min_idle(), Duration::from_secs(60));
    assert_eq!(c.quotas.max_queued, 500);
    assert_eq!(c.max_queued_per_user(), None);
    assert_eq!(
        c.plan_limits().unwrap(),
        crate::decide::tiers::PlanLimits::default()
    );
    assert_eq!(c.retention(), Duration::from_secs(86400));
    assert_eq!(c.pending_timeout(), Duration::from_secs(600));
    assert_eq!(
        c.metrics_addr,
        "0.0.0.0:8080".parse::<SocketAddr>().unwrap()
    );
    assert!(c.lease.leader_election);
    assert_eq!(c.lease.lease_name, "repobox-operator");
    assert_eq!(c.lease_duration(), Duration::from_secs(15));
    assert_eq!(c.log_level, "info");
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.runner_pod.runner_image, DEFAULT_RUNNER_IMAGE);
    assert!(DEFAULT_RUNNER_IMAGE.ends_with(env!("CARGO_PKG_VERSION")));
    assert_eq!(c.runner_pod.runner_image_pull_policy, "IfNotPresent");
    assert!(c.runner_pod.runner_image_pull_secrets.is_empty());
    assert_eq!(c.runner_pod.runner_service_account, "repobox-runner");
    assert_eq!(c.runner_pod.runner_cpu_request, "250m");
    assert_eq!(c.runner_pod.runner_cpu_limit, "1");
    assert_eq!(c.runner_pod.runner_memory_request, "256Mi");
    assert_eq!(c.runner_pod.runner_memory_limit, "1Gi");
    assert_eq!(c.agent.agent_image, None);
    assert_eq!(c.agent.agent_uid, 65533);
    assert_eq!(c.agent.agent_cpu_request, "500m");
    assert_eq!(c.agent.agent_cpu_limit, "2");
    assert_eq!(c.agent.agent_memory_request, "512Mi");
    assert_eq!(c.agent.agent_memory_limit, "2Gi");
    assert_eq!(c.agent.agent_extra_env, None);
    assert!(!c.runner_env.allow_insecure_http);
    assert!(c.runner_env.open_pull_requests);
    assert_eq!(c.runner_env.git_ca_configmap, None);
    assert_eq!(c.runner_env.git_ca_key, "ca.crt");
    assert_eq!(c.runner_pod.runner_ephemeral_storage, "10Gi");
    assert_eq!(c.runner_pod.runner_tmp_size_limit, "1Gi");
    assert_eq!(c.runner_pod.runner_node_selector, None);
    assert_eq!(c.runner_pod.runner_tolerations, None);
    assert_eq!(c.runner_pod.runner_affinity, None);
    assert_eq!(c.runner_pod.runner_priority_class, None);
    assert!(c.agent.runner_env_from_secrets.is_empty());
    assert_eq!(c.runner_pod.job_ttl_seconds, 3600);
    assert_eq!(c.runner_pod.runner_termination_grace_seconds, 30);
    assert_eq!(c.runner_pod.redis_secret_name, "repobox-redis");
    assert_eq!(c.runner_pod.redis_secret_key, "url");
    assert_eq!(
        c.runner_pod.encryption_key_secret_name,
        "repobox-encryption-key"
    );
    assert_eq!(c.runner_pod.encryption_key_secret_key, "key");
    assert_eq!(c.runner_env.temp_dir, "/work");
    assert!(c.runner_env.cleanup_after_job);
    assert_eq!(c.runner_env.git_author_name, "Repobox");
    assert_eq!(
        c.runner_env.git_author_email,
        "repobox@users.noreply.repobox.dev"
    );
    assert_eq!(c.runner_env.git_clone_depth, 1);
    assert_eq!(c.agent.agent_command, None);
    c.validate().unwrap();
}

#[test]
fn default_job_config() {
    let j = test_job_config(&[]);
    assert_eq!(
        j,
        JobConfig {
            image: DEFAULT_RUNNER_IMAGE.into(),
            image_pull_policy: "IfNotPresent".into(),
            image_pull_secrets: vec![],
            service_account: "repobox-runner".into(),
            resources: RunnerResources {
                cpu_request: Some(Quantity("250m".into())),
                cpu_limit: Some(Quantity("1".into())),
                memory_request: Some(Quantity("256Mi".into())),
                memory_limit: Some(Quantity("1Gi".into())),
                ephemeral_storage_request: Some(Quantity("2Gi".into())),
                ephemeral_storage_limit: None,
            },
            agent: None,
            work_size_limit: Some(Quantity("10Gi".into())),
            tmp_size_limit: Some(Quantity("1Gi".into())),
            node_selector: None,
            tolerations: None,
            affinity: None,
            priority_class_name: None,
            pod_annotations: BTreeMap::from([
                (
                    "cluster-autoscaler.kubernetes.io/safe-to-evict".into(),
                    "false".into()
                ),
                ("karpenter.sh/do-not-disrupt".into(), "true".into()),
            ]),
            default_timeout_seconds: 3600,
            ttl_seconds_after_finished: 3600,
            termination_grace_period_seconds: 30,
            redis_secret: SecretKeyRef {
                name: "repobox-redis".into(),
                key: "url".into()
            },
            encryption_key_secret: SecretKeyRef {
                name: "repobox-encryption-key".into(),
                key: "key".into()
            },
            work_dir: "/work".into(),
            cleanup_after_job: true,
            git_author_name: "Repobox".into(),
            git_author_email: "repobox@users.noreply.repobox.dev".into(),
            git_clone_depth: 1,
            allow_insecure_http: false,
            open_pull_requests: true,
            git_ca: None,
            redis_ca: None,
        }
    );
}

#[test]
fn autoscaling_settings() {
    let j = test_job_config(&[
        ("RUNNER_EPHEMERAL_STORAGE_REQUEST", "5Gi"),
        ("RUNNER_EPHEMERAL_STORAGE_LIMIT", "20Gi"),
        ("RUNNER_DO_NOT_DISRUPT", "false"),
        (
            "RUNNER_POD_ANNOTATIONS",
            r#"{"example.com/team":"repobox","sidecar.istio.io/inject":"false"}"#,
        ),
    ]);
    assert_eq!(
        j.resources.ephemeral_storage_request,
        Some(Quantity("5Gi".into()))
    );
    assert_eq!(
        j.resources.ephemeral_storage_limit,
        Some(Quantity("20Gi".into()))
    );
    assert_eq!(
        j.pod_annotations,
        BTreeMap::from([
            ("example.com/team".into(), "repobox".into()),
            ("sidecar.istio.io/inject".into(), "false".into()),
        ]),
        "without do-not-disrupt only the extra annotations"
    );
    let j = test_job_config(&[
        ("RUNNER_EPHEMERAL_STORAGE_REQUEST", ""),
        (
            "RUNNER_POD_ANNOTATIONS",
            r#"{"karpenter.sh/do-not-disrupt":"false"}"#,
        ),
    ]);
    assert_eq!(j.resources.ephemeral_storage_request, None);
    assert_eq!(
        j.pod_annotations["karpenter.sh/do-not-disrupt"], "true",
        "RUNNER_DO_NOT_DISRUPT wins over an extra annotation"
    );

    for (env, setting) in [
        (
            vec![("RUNNER_EPHEMERAL_STORAGE_REQUEST", "lots")],
            "RUNNER_EPHEMERAL_STORAGE_REQUEST",
        ),
        (
            vec![
                ("RUNNER_EPHEMERAL_STORAGE_REQUEST", "4Gi"),
                ("RUNNER_EPHEMERAL_STORAGE_LIMIT", "1Gi"),
            ],
            "RUNNER_EPHEMERAL_STORAGE_REQUEST",
        ),
        (
            vec![
                ("AGENT_COMMAND", "a"),
                ("AGENT_EPHEMERAL_STORAGE_LIMIT", "1x"),
            ],
            "AGENT_EPHEMERAL_STORAGE_LIMIT",
        ),
        (
            vec![("RUNNER_POD_ANNOTATIONS", r#"{"bad key!":"x"}"#)],
            "RUNNER_POD_ANNOTATIONS",
        ),
        (
            vec![("RUNNER_POD_ANNOTATIONS", r#"["not","an","object"]"#)],
            "RUNNER_POD_ANNOTATIONS",
        ),
    ] {
        let err = test_config(&env).job_config().unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig { setting: s, .. } if *s == setting),
            "{env:?}: {err}"
        );
    }
}

#[test]
fn retry_and_unschedulable_settings() {
    let c = test_config(&[]);
    assert_eq!(c.unschedulable_grace(), Duration::from_secs(60));
    assert_eq!(
        c.retry_policy(),
        crate::decide::retry::RetryPolicy {
            max_retries: 2,
            backoff: Duration::from_secs(10)
        }
    );
    let c = test_config(&[
        ("UNSCHEDULABLE_GRACE_SECONDS", "5"),
        ("MAX_DISRUPTION_RETRIES", "0"),
        ("DISRUPTION_RETRY_BACKOFF_SECONDS", "1"),
    ]);
    assert_eq!(c.unschedulable_grace(), Duration::from_secs(5));
    assert_eq!(c.retry_policy().max_retries, 0);
    assert_eq!(c.retry_policy().backoff, Duration::from_secs(1));
}

#[test]
fn agent_container_settings() {
    let j = test_job_config(&[("AGENT_COMMAND", "agent --fast")]);
    let a = j.agent.expect("an agent command gives an agent container");
    assert_eq!(a.command, "agent --fast");
    assert_eq!(a.image, DEFAULT_RUNNER_IMAGE, "the runner image by default");
    assert_eq!(a.uid, 65533);
    assert_eq!(
        a.resources,
        RunnerResources {
            cpu_request: Some(Quantity("500m".into())),
            cpu_limit: Some(Quantity("2".into())),
            memory_request: Some(Quantity("512Mi".into())),
            memory_limit: Some(Quantity("2Gi".into())),
            ephemeral_storage_request: Some(Quantity("1Gi".into())),
            ephemeral_storage_limit: None,
        }
    );
    assert!(a.extra_env.is_empty() && a.env_from_secrets.is_empty());

    let a = test_job_config(&[
        ("AGENT_COMMAND", "x"),
        ("AGENT_IMAGE", "registry.example/agent:2"),
        ("AGENT_UID", "1000"),
        ("AGENT_CPU_REQUEST", "1"),
        ("AGENT_MEMORY_LIMIT", ""),
        ("AGENT_EXTRA_ENV", r#"{"MODEL":"large","B_2":""}"#),
        ("RUNNER_ENV_FROM_SECRETS", "agent-keys"),
    ])
    .agent
    .unwrap();
    assert_eq!(a.image, "registry.example/agent:2");
    assert_eq!(a.uid, 1000);
    assert_eq!(a.resources.cpu_request, Some(Quantity("1".into())));
    assert_eq!(a.resources.memory_limit, None);
    assert_eq!(
        a.extra_env.into_iter().collect::<Vec<_>>(),
        [
            ("B_2".to_owned(), String::new()),
            ("MODEL".to_owned(), "large".to_owned())
        ]
    );
    assert_eq!(a.env_from_secrets, ["agent-keys"]);

    for (k, v) in [
        ("AGENT_UID", "65532"),
        ("AGENT_IMAGE", "a b"),
        ("AGENT_EXTRA_ENV", "[1]"),
        ("AGENT_EXTRA_ENV", r#"{"1X":"y"}"#),
        ("AGENT_EXTRA_ENV", r#"{"HANDOFF_DIR":"/x"}"#),
        ("AGENT_CPU_REQUEST", "3"),
    ] {
        let e = test_config(&[("AGENT_COMMAND", "x"), (k, v)])
            .job_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains(k), "{k}: {e}");
    }
}

#[test]
fn git_transport_settings() {
    let j = test_job_config(&[
        ("ALLOW_INSECURE_HTTP", "true"),
        ("GIT_CA_CONFIGMAP", "git-ca"),
    ]);
    assert!(j.allow_insecure_http);
    assert_eq!(
        j.git_ca,
        Some(ConfigMapKeyRef {
            name: "git-ca".into(),
            key: "ca.crt".into()
        })
    );
    for env in [
        [("GIT_CA_CONFIGMAP", "Bad_Name"), ("GIT_CA_KEY", "ca.crt")],
        [("GIT_CA_CONFIGMAP", "ok"), ("GIT_CA_KEY", " ")],
    ] {
        let k = if env[0].1 == "ok" { env[1].0 } else { env[0].0 };
        let e = test_config(&env).job_config().unwrap_err().to_string();
        assert!(e.contains(k), "{k}: {e}");
    }
}

#[test]
fn every_env_override() {
    let env = [
        ("REDIS_URL", "rediss://u:p@redis.example:6380/2"),
        ("RUNNER_ID", "op-7"),
        ("POD_NAME", "pod-x"),
        ("HOSTNAME", "host-x"),
        ("POD_NAMESPACE", "ops"),
        ("STREAM_KEY", "s"),
        ("CONSUMER_GROUP", "g"),
        ("DEAD_LETTER_STREAM", "d"),
        ("MAX_DELIVERIES", "9"),
        ("CLAIM_MIN_IDLE_SECONDS", "30"),
        ("DEAD_LETTER_MAXLEN", "77"),
        ("OUTPUT_TTL_SECONDS", "60"),
        ("REDIS_CA_FILE", "/etc/redis-ca/ca.crt"),
        ("REDIS_CA_SECRET_NAME", "redis-ca"),
        ("REDIS_CA_SECRET_KEY", "ca.pem"),
        ("MAX_CONCURRENT_JOBS", "20"),
        ("MAX_JOBS_PER_USER", "4"),
        ("MAX_QUEUED", "50"),
        ("MAX_QUEUED_PER_USER", "7"),
        ("PLAN_LIMITS", r#"{"free": 1, "pro": 4}"#),
        ("JOB_TIMEOUT", "120"),
        ("RETENTION_SECONDS", "10"),
        ("PENDING_TIMEOUT_SECONDS", "11"),
        ("JOBS_NAMESPACE", "jobs"),
        ("METRICS_ADDR", "127.0.0.1:9090"),
        ("LEADER_ELECTION", "false"),
        ("LEASE_NAME", "lease-x"),
        ("LEASE_NAMESPACE", "leases"),
        ("LEASE_DURATION_SECONDS", "20"),
        ("LOG_LEVEL", "debug"),
        ("LOG_FORMAT", "text"),
        ("RUNNER_IMAGE", "registry.example/runner:1"),
        ("RUNNER_IMAGE_PULL_POLICY", "Always"),
        ("RUNNER_IMAGE_PULL_SECRETS", "pull-a,pull-b"),
        ("RUNNER_SERVICE_ACCOUNT", "sa"),
        ("RUNNER_CPU_REQUEST", "1"),
        ("RUNNER_CPU_LIMIT", "4"),
        ("RUNNER_MEMORY_REQUEST", "1Gi"),
        ("RUNNER_MEMORY_LIMIT", "4Gi"),
        ("RUNNER_EPHEMERAL_STORAGE_REQUEST", "3Gi"),
        ("RUNNER_EPHEMERAL_STORAGE_LIMIT", "30Gi"),
        ("RUNNER_DO_NOT_DISRUPT", "false"),
        ("RUNNER_POD_ANNOTATIONS", r#"{"a.example/b":"c"}"#),
        ("UNSCHEDULABLE_GRACE_SECONDS", "30"),
        ("MAX_DISRUPTION_RETRIES", "1"),
        ("DISRUPTION_RETRY_BACKOFF_SECONDS", "2"),
        ("RUNNER_EPHEMERAL_STORAGE", "20Gi"),
        ("RUNNER_TMP_SIZE_LIMIT", "2Gi"),
        ("RUNNER_NODE_SELECTOR", r#"{"pool":"jobs"}"#),
        (
            "RUNNER_TOLERATIONS",
            r#"[{"key":"jobs","operator":"Exists","effect":"NoSchedule"}]"#,
        ),
        (
            "RUNNER_AFFINITY",
            r#"{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"k","operator":"In","values":["v"]}]}]}}}"#,
        ),
        ("RUNNER_PRIORITY_CLASS", "low"),
        ("RUNNER_ENV_FROM_SECRETS", "agent-keys"),
        ("JOB_TTL_SECONDS", "60"),
        ("RUNNER_TERMINATION_GRACE_SECONDS", "5"),
        ("REDIS_SECRET_NAME", "r-sec"),
        ("REDIS_SECRET_KEY", "redis-url"),
        ("ENCRYPTION_KEY_SECRET_NAME", "e-sec"),
        ("ENCRYPTION_KEY_SECRET_KEY", "ENCRYPTION_KEY"),
        ("TEMP_DIR", "/data/work/"),
        ("CLEANUP_AFTER_JOB", "0"),
        ("GIT_AUTHOR_NAME", "Bot"),
        ("GIT_AUTHOR_EMAIL", "bot@example.com"),
        ("GIT_CLONE_DEPTH", "0"),
        ("AGENT_COMMAND", "agent --fast"),
        ("AGENT_IMAGE", "registry.example/agent:3"),
        ("AGENT_UID", "2000"),
        ("AGENT_CPU_REQUEST", "100m"),
        ("AGENT_CPU_LIMIT", "3"),
        ("AGENT_MEMORY_REQUEST", "128Mi"),
        ("AGENT_MEMORY_LIMIT", "3Gi"),
        ("AGENT_EPHEMERAL_STORAGE_REQUEST", "512Mi"),
        ("AGENT_EPHEMERAL_STORAGE_LIMIT", "4Gi"),
        ("AGENT_EXTRA_ENV", r#"{"MODEL":"m"}"#),
        ("ALLOW_INSECURE_HTTP", "true"),
        ("OPEN_PULL_REQUESTS", "false"),
        ("GIT_CA_CONFIGMAP", "git-ca"),
        ("GIT_CA_KEY", "bundle.pem"),
    ];
    // Guard against a setting added without being covered here.
    let covered: Vec<&str> = env.iter().map(|(k, _)| *k).collect();
    for a in Config::command().get_arguments() {
        if let Some(e) = a.get_env() {
            assert!(covered.contains(&e.to_str().unwrap()), "{e:?} not covered");
        }
    }
    let c = parse_with_env(&[], &env).unwrap();
    c.validate().unwrap();
    assert_eq!(
        c.redis.redis_url.expose(),
        "rediss://u:p@redis.example:6380/2"
    );
    assert_eq!(c.runner_id(), "op-7");
    assert_eq!(c.jobs_namespace(), "jobs");
    assert_eq!(c.lease_namespace(), "leases");
    assert_eq!(
        (
            c.redis.stream_key.as_str(),
            c.redis.consumer_group.as_str(),
            c.redis.dead_letter_stream.as_str()
        ),
        ("s", "g", "d")
    );
    assert_eq!(c.redis.max_deliveries, 9);
    assert_eq!(c.claim_min_idle(), Duration::from_secs(30));
    assert_eq!(c.redis.dead_letter_maxlen, 77);
    assert_eq!(c.output_ttl(), Some(Duration::from_secs(60)));
    assert_eq!(
        c.redis.redis_ca_file.as_deref(),
        Some(std::path::Path::new("/etc/redis-ca/ca.crt"))
    );
    assert_eq!(c.redis.redis_ca_secret_name.as_deref(), Some("redis-ca"));
    assert_eq!(c.redis.redis_ca_secret_key, "ca.pem");
    assert_eq!(
        c.limits(),
        Limits {
            per_user: 4,
            global: 20
        }
    );
    assert_eq!(c.quotas.max_queued, 50);
    assert_eq!(c.max_queued_per_user(), Some(7));
    assert_eq!(c.plan_limits().unwrap().get("pro"), Some(4));
    assert_eq!(c.quotas.job_timeout, 120);
    assert_eq!(c.retention(), Duration::from_secs(10));
    assert_eq!(c.pending_timeout(), Duration::from_secs(11));
    assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9090");
    assert!(!c.lease.leader_election);
    assert_eq!(c.lease.lease_name, "lease-x");
    assert_eq!(c.lease_duration(), Duration::from_secs(20));
    assert_eq!(c.log_level, "debug");
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(!c.runner_env.cleanup_after_job);

    let j = c.job_config().unwrap();
    assert_eq!(j.image, "registry.example/runner:1");
    assert_eq!(j.image_pull_policy, "Always");
    assert_eq!(j.image_pull_secrets, ["pull-a", "pull-b"]);
    assert_eq!(j.service_account, "sa");
    assert_eq!(j.resources.cpu_request, Some(Quantity("1".into())));
    assert_eq!(j.resources.cpu_limit, Some(Quantity("4".into())));
    assert_eq!(j.resources.memory_request, Some(Quantity("1Gi".into())));
    assert_eq!(j.resources.memory_limit, Some(Quantity("4Gi".into())));
    assert_eq!(j.work_size_limit, Some(Quantity("20Gi".into())));
    assert_eq!(j.tmp_size_limit, Some(Quantity("2Gi".into())));
    assert_eq!(
        j.node_selector,
        Some(BTreeMap::from([("pool".to_owned(), "jobs".to_owned())]))
    );
    let tol = &j.tolerations.as_ref().unwrap()[0];
    assert_eq!(
        (
            tol.key.as_deref(),
            tol.operator.as_deref(),
            tol.effect.as_deref()
        ),
        (Some("jobs"), Some("Exists"), Some("NoSchedule"))
    );
    let terms = &j
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms;
    assert_eq!(terms[0].match_expressions.as_ref().unwrap()[0].key, "k");
    assert_eq!(j.priority_class_name.as_deref(), Some("low"));
    assert_eq!(j.agent.as_ref().unwrap().env_from_secrets, ["agent-keys"]);
    assert_eq!(j.default_timeout_seconds, 120);
    assert_eq!(j.ttl_seconds_after_finished, 60);
    assert_eq!(j.termination_grace_period_seconds, 5);
    assert_eq!(
        j.redis_secret,
        SecretKeyRef {
            name: "r-sec".into(),
            key: "redis-url".into()
        }
    );
    assert_eq!(
        j.encryption_key_secret,
        SecretKeyRef {
            name: "e-sec".into(),
            key: "ENCRYPTION_KEY".into()
        }
    );
    assert_eq!(j.work_dir, "/data/work");
    assert!(!j.cleanup_after_job);
    assert_eq!(j.git_author_name, "Bot");
    assert_eq!(j.git_author_email, "bot@example.com");
    assert_eq!(j.git_clone_depth, 0);
    let a = j.agent.as_ref().unwrap();
    assert_eq!(a.command, "agent --fast");
    assert_eq!(a.image, "registry.example/agent:3");
    assert_eq!(a.uid, 2000);
    assert_eq!(a.resources.cpu_request, Some(Quantity("100m".into())));
    assert_eq!(a.resources.cpu_limit, Some(Quantity("3".into())));
    assert_eq!(a.resources.memory_request, Some(Quantity("128Mi".into())));
    assert_eq!(a.resources.memory_limit, Some(Quantity("3Gi".into())));
    assert_eq!(a.extra_env["MODEL"], "m");
    assert!(j.allow_insecure_http);
    assert!(!j.open_pull_requests);
    assert_eq!(
        j.git_ca,
        Some(ConfigMapKeyRef {
            name: "git-ca".into(),
            key: "bundle.pem".into()
        })
    );
}

#[test]
fn flags_override_env() {
    let c = parse_with_env(
        &["--max-jobs-per-user", "7", "--leader-election=true"],
        &[
            ("REDIS_URL", "redis://r"),
            ("MAX_JOBS_PER_USER", "2"),
            ("LEADER_ELECTION", "false"),
        ],
    )
    .unwrap();
    assert_eq!(c.quotas.max_jobs_per_user, 7);
    assert!(c.lease.leader_election);
}

#[test]
fn runner_id_and_namespace_fallbacks() {
    assert_eq!(
        test_config(&[("POD_NAME", "op-abc"), ("HOSTNAME", "h")]).runner_id(),
        "op-abc"
    );
    assert_eq!(test_config(&[("HOSTNAME", "h")]).runner_id(), "h");
    assert_eq!(
        test_config(&[("RUNNER_ID", ""), ("POD_NAME", "")]).runner_id(),
        "runner-1"
    );
    let c = test_config(&[("POD_NAMESPACE", "ops")]);
    assert_eq!(c.jobs_namespace(), "ops");
    assert_eq!(c.lease_namespace(), "ops");
    let c = test_config(&[("JOBS_NAMESPACE", "jobs")]);
    assert_eq!(c.lease_namespace(), "jobs");
    let c = test_config(&[("JOBS_NAMESPACE", "jobs"), ("POD_NAMESPACE", "ops")]);
    assert_eq!((c.jobs_namespace(), c.lease_namespace()), ("jobs", "ops"));
}

#[test]
fn booleans_accept_common_spellings() {
    for (v, want) in [
        ("true", true),
        ("1", true),
        ("yes", true),
        ("on", true),
        ("false", false),
        ("0", false),
        ("no", false),
        ("off", false),
    ] {
        let c = test_config(&[("LEADER_ELECTION", v), ("CLEANUP_AFTER_JOB", v)]);
        assert_eq!(
            (c.lease.leader_election, c.runner_env.cleanup_after_job),
            (want, want),
            "{v}"
        );
    }
    assert!(
        parse_with_env(
            &[],
            &[("REDIS_URL", "redis://r"), ("LEADER_ELECTION", "maybe")]
        )
        .is_err()
    );
}

#[test]
fn zero_and_malformed_numbers_are_rejected_by_clap() {
    for (k, v) in [
        ("MAX_CONCURRENT_JOBS", "0"),
        ("MAX_JOBS_PER_USER", "0"),
        ("MAX_QUEUED", "0"),
        ("JOB_TIMEOUT", "0"),
        ("MAX_DELIVERIES", "0"),
        ("CLAIM_MIN_IDLE_SECONDS", "0"),
        ("RETENTION_SECONDS", "0"),
        ("PENDING_TIMEOUT_SECONDS", "0"),
        ("LEASE_DURATION_SECONDS", "0"),
        ("JOB_TTL_SECONDS", "-1"),
        ("RUNNER_TERMINATION_GRACE_SECONDS", "-1"),
        ("MAX_CONCURRENT_JOBS", "ten"),
        ("GIT_CLONE_DEPTH", "-1"),
        ("METRICS_ADDR", "localhost"),
        ("LOG_FORMAT", "xml"),
        ("RUNNER_IMAGE_PULL_POLICY", "Sometimes"),
    ] {
        let err = parse_with_env(&[], &[("REDIS_URL", "redis://r"), (k, v)]).unwrap_err();
        let flag = format!("--{}", k.to_lowercase().replace('_', "-"));
        assert!(err.to_string().contains(&flag), "{k}={v}: {err}");
    }
    // JOB_TTL_SECONDS=0 (delete immediately) is allowed.
    assert_eq!(
        test_config(&[("JOB_TTL_SECONDS", "0")])
            .runner_pod
            .job_ttl_seconds,
        0
    );
}

fn config_error(env: &[(&str, &str)]) -> (&'static str, String) {
    match test_config(env).validate() {
        Err(Error::InvalidConfig { setting, reason }) => (setting, reason),
        other => panic!("expected InvalidConfig for {env:?}, got {other:?}"),
    }
}

#[test]
fn malformed_json_names_the_setting() {
    for setting in [
        "RUNNER_NODE_SELECTOR",
        "RUNNER_TOLERATIONS",
        "RUNNER_AFFINITY",
    ] {
        let (s, reason) = config_error(&[(setting, "{not json")]);
        assert_eq!(s, setting);
        assert!(reason.contains("malformed JSON"), "{reason}");
        let e = test_config(&[(setting, "{not json")])
            .job_config()
            .unwrap_err();
        assert!(e.to_string().contains(setting), "{e}");
    }
    // Well-formed JSON of the wrong shape.
    assert_eq!(
        config_error(&[("RUNNER_NODE_SELECTOR", r#"{"a":1}"#)]).0,
        "RUNNER_NODE_SELECTOR"
    );
    assert_eq!(
        config_error(&[("RUNNER_NODE_SELECTOR", r#"["a"]"#)]).0,
        "RUNNER_NODE_SELECTOR"
    );
    assert_eq!(
        config_error(&[("RUNNER_TOLERATIONS", r#"{"key":"a"}"#)]).0,
        "RUNNER_TOLERATIONS"
    );
    assert_eq!(
        config_error(&[("RUNNER_AFFINITY", r#"[1]"#)]).0,
        "RUNNER_AFFINITY"
    );
    // Blank means unset.
    let j = test_job_config(&[
        ("RUNNER_NODE_SELECTOR", ""),
        ("RUNNER_TOLERATIONS", "  "),
        ("RUNNER_AFFINITY", ""),
    ]);
    assert_eq!(
        (j.node_selector, j.tolerations, j.affinity),
        (None, None, None)
    );
    // Empty collections are kept (an explicit empty list is still valid).
    let j = test_job_config(&[("RUNNER_NODE_SELECTOR", "{}"), ("RUNNER_TOLERATIONS", "[]")]);
    assert_eq!(j.node_selector, Some(BTreeMap::new()));
    assert_eq!(j.tolerations, Some(vec![]));
}

#[test]
fn malformed_settings_name_the_setting() {
    let cases: &[(&str, &str)] = &[
        ("RUNNER_CPU_REQUEST", "lots"),
        ("RUNNER_CPU_LIMIT", "2 cores"),
        ("RUNNER_MEMORY_REQUEST", "512MB"),
        ("RUNNER_MEMORY_LIMIT", "-1Gi"),
        ("RUNNER_EPHEMERAL_STORAGE", "10G i"),
        ("RUNNER_TMP_SIZE_LIMIT", "x"),
        ("RUNNER_IMAGE", ""),
        ("RUNNER_IMAGE", "a b"),
        ("RUNNER_SERVICE_ACCOUNT", "Bad_SA"),
        ("RUNNER_PRIORITY_CLASS", "Low!"),
        ("RUNNER_IMAGE_PULL_SECRETS", "ok,Not_OK"),
        ("RUNNER_ENV_FROM_SECRETS", "UPPER"),
        ("REDIS_SECRET_NAME", "no/slash"),
        ("REDIS_SECRET_KEY", "a/b"),
        ("ENCRYPTION_KEY_SECRET_NAME", ""),
        ("ENCRYPTION_KEY_SECRET_KEY", ".."),
        ("TEMP_DIR", "work"),
        ("TEMP_DIR", "/"),
        ("TEMP_DIR", "/tmp"),
        ("TEMP_DIR", "/tmp/"),
        ("TEMP_DIR", "/a/../b"),
        ("TEMP_DIR", "/a//b"),
        ("TEMP_DIR", "/var/run/secrets/repobox/encryption-key"),
        ("JOBS_NAMESPACE", "Bad"),
        ("LEASE_NAMESPACE", "bad_ns"),
        ("LEASE_NAME", "Bad Lease"),
        ("STREAM_KEY", " "),
        ("CONSUMER_GROUP", ""),
        ("DEAD_LETTER_STREAM", "jobs:stream"),
    ];
    for (k, v) in cases {
        let (setting, _) = config_error(&[(k, v)]);
        assert_eq!(&setting, k, "{k}={v:?}");
    }
}

#[test]
fn request_above_limit_is_rejected() {
    let (s, reason) = config_error(&[("RUNNER_CPU_REQUEST", "3"), ("RUNNER_CPU_LIMIT", "2")]);
    assert_eq!(s, "RUNNER_CPU_REQUEST");
    assert!(reason.contains("RUNNER_CPU_LIMIT"), "{reason}");
    let (s, _) = config_error(&[
        ("RUNNER_MEMORY_REQUEST", "3Gi"),
        ("RUNNER_MEMORY_LIMIT", "2048Mi"),
    ]);
    assert_eq!(s, "RUNNER_MEMORY_REQUEST");
    // Equal, different units.
    test_job_config(&[
        ("RUNNER_MEMORY_REQUEST", "2048Mi"),
        ("RUNNER_MEMORY_LIMIT", "2Gi"),
    ]);
    test_job_config(&[("RUNNER_CPU_REQUEST", "2000m"), ("RUNNER_CPU_LIMIT", "2")]);
}

#[test]
fn empty_resources_mean_unset() {
    let j = test_job_config(&[
        ("RUNNER_CPU_REQUEST", ""),
        ("RUNNER_CPU_LIMIT", ""),
        ("RUNNER_MEMORY_REQUEST", ""),
        ("RUNNER_MEMORY_LIMIT", ""),
        ("RUNNER_EPHEMERAL_STORAGE_REQUEST", ""),
        ("RUNNER_EPHEMERAL_STORAGE", ""),
        ("RUNNER_TMP_SIZE_LIMIT", ""),
        ("RUNNER_PRIORITY_CLASS", ""),
        ("AGENT_COMMAND", " "),
        ("RUNNER_IMAGE_PULL_SECRETS", ""),
    ]);
    assert_eq!(j.resources, RunnerResources::default());
    assert_eq!((j.work_size_limit, j.tmp_size_limit), (None, None));
    assert_eq!(j.priority_class_name, None);
    assert_eq!(j.agent, None);
    assert!(j.image_pull_secrets.is_empty());
}

#[test]
fn redis_url_validation_and_masking() {
    for ok in [
        "redis://h",
        "rediss://h:6380",
        "redis+unix:///sock",
        "unix:///s",
        "redis://:pw@h/0",
    ] {
        test_config(&[("REDIS_URL", ok)]).validate().unwrap();
    }
    let (s, reason) = config_error(&[("REDIS_URL", "http://:secretpw@h")]);
    assert_eq!(s, "REDIS_URL");
    assert!(!reason.contains("secretpw"));
    let (s, _) = config_error(&[("REDIS_URL", "localhost:6379")]);
    assert_eq!(s, "REDIS_URL");

    // The cases live with `mask_password`; this is the same function.
    let cases = [
        (
            "redis://user:secretpw@host:6379/0",
            "redis://user:****@host:6379/0",
        ),
        ("rediss://secretpw@host", "rediss://****@host"),
    ];
    for (url, want) in cases {
        assert_eq!(RedisUrl::from(url.to_owned()).masked(), want, "{url}");
    }
}

#[test]
fn debug_never_prints_the_redis_password() {
    let c = test_config(&[("REDIS_URL", "redis://default:hunter2secret@redis:6379")]);
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("hunter2secret"), "{dbg}");
    assert!(dbg.contains("redis://default:****@redis:6379"), "{dbg}");
    assert!(!format!("{}", c.redis.redis_url).contains("hunter2secret"));
    assert!(!format!("{c:#?}").contains("hunter2secret"));
}

#[test]
fn help_hides_the_redis_url_value() {
    let cmd = Config::command();
    let arg = cmd
        .get_arguments()
        .find(|a| a.get_id() == "redis_url")
        .unwrap();
    assert!(arg.is_hide_env_values_set());
}

#[test]
fn config_parses_from_real_argv_without_env_dependence_in_required_args() {
    // `Config::try_parse_from` is what `main` uses (through the `run` subcommand); with the
    // URL given as a flag it must succeed whatever the process environment holds.
    let c = Config::try_parse_from(["repobox-operator", "--redis-url", "redis://flag"]);
    assert_eq!(
        c.map(|c| c.redis.redis_url.expose().to_owned())
            .ok()
            .as_deref(),
        Some("redis://flag")
    );
}

#[test]
fn redis_retention_settings() {
    let c = test_config(&[]);
    assert_eq!(c.redis.dead_letter_maxlen, 10_000);
    assert_eq!(c.output_ttl(), Some(Duration::from_secs(7 * 24 * 3600)));
    let c = test_config(&[("DEAD_LETTER_MAXLEN", "50"), ("OUTPUT_TTL_SECONDS", "0")]);
    assert_eq!(c.redis.dead_letter_maxlen, 50);
    assert_eq!(c.output_ttl(), None, "0 keeps the output forever");
    let c = test_config(&[("OUTPUT_TTL_SECONDS", "90")]);
    assert_eq!(c.output_ttl(), Some(Duration::from_secs(90)));
    assert!(
        parse_with_env(
            &[],
            &[("REDIS_URL", "redis://x"), ("DEAD_LETTER_MAXLEN", "0")]
        )
        .is_err()
    );
    assert!(
        parse_with_env(
            &[],
            &[("REDIS_URL", "redis://x"), ("OUTPUT_TTL_SECONDS", "-1")]
        )
        .is_err()
    );
}

#[test]
fn redis_tls_settings() {
    let c = test_config(&[]);
    assert_eq!(c.redis.redis_ca_file, None);
    assert_eq!(c.redis.redis_ca_secret_name, None);
    assert_eq!(c.redis.redis_ca_secret_key, "ca.crt");
    let ok = test_config(&[
        ("REDIS_URL", "rediss://op:pw@redis:6380"),
        ("REDIS_CA_FILE", "/etc/repobox/redis-ca/ca.crt"),
        ("REDIS_CA_SECRET_NAME", "redis-ca"),
    ]);
    ok.validate().unwrap();
    let plain = test_config(&[("REDIS_CA_FILE", "/ca.crt")]);
    let err = plain.validate().unwrap_err().to_string();
    assert!(err.contains("REDIS_CA_FILE"), "{err}");
    let bad = test_config(&[("REDIS_CA_SECRET_NAME", "Not_A_Name")]);
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("REDIS_CA_SECRET_NAME"), "{err}");
    let bad = test_config(&[
        ("REDIS_CA_SECRET_NAME", "redis-ca"),
        ("REDIS_CA_SECRET_KEY", "a/b"),
    ]);
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("REDIS_CA_SECRET_KEY"), "{err}");
}
