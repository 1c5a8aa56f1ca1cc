//! The batch/v1 Job that runs one RepoboxJob: a pure function of the RepoboxJob and the typed
//! runner settings, so every field is unit-tested and the controller only has to apply it.
//!
//! Design points:
//!
//! * The Job has the RepoboxJob's name and namespace and is owned by it (controller reference,
//!   `blockOwnerDeletion`), so deleting the RepoboxJob deletes the Job and its pod, and the
//!   controller can watch Jobs and map them back to their owner.
//! * Exactly one attempt (`backoffLimit: 0`, `restartPolicy: Never`): a job pushes a branch, so a
//!   blind retry could push twice; retries are the user's decision.
//! * A pod failure policy fails the Job at once, first on a `DisruptionTarget` pod condition
//!   (eviction, preemption, node drain: the Job's `Failed` condition then has reason
//!   `PodFailurePolicy` and a message naming rule 0), then on any non-zero exit of the runner.
//! * No secret value is ever part of the Job: the Redis URL is a `secretKeyRef`, the encryption
//!   key a `secret` volume, agent credentials `envFrom` Secrets. The job's git token is read by
//!   the runner from Redis and decrypted in memory.
//! * The pod meets the Pod Security `restricted` profile and mounts no API token.
//! * The agent (hostile code, whatever the prompt makes it run) has a container of its own:
//!   another uid, its own `/tmp`, only the work tree and the hand-off directory of the shared
//!   volume (as `subPath` mounts, so it cannot swap the directories themselves), no key
//!   volume, no Redis URL, no process of the runner's in sight (`shareProcessNamespace:
//!   false`). An init container copies the runner binary (the agent wrapper) into a volume the
//!   agent image runs it from, and creates the two shared directories group-writable (the
//!   pod's `fsGroup`). Works on Kubernetes 1.28 without native sidecars.
//! * Only fields Kubernetes 1.28 serves are set (no `podReplacementPolicy`, `successPolicy`,
//!   `backoffLimitPerIndex`, `managedBy`, …); a test checks the serialized object.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, KeyToPath, LocalObjectReference, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecretEnvSource,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::decide::job_config::{AgentConfig, JobConfig, RunnerResources};
use crate::error::{Error, Result};
use crate::model::crd::RepoboxJob;
use crate::model::names::{is_dns1123_label, is_label_value, label_value};

use crate::model::labels::*;
use crate::model::pod_layout::*;
use repobox_contract::runner_env as renv;

/// The labels of a runner Job and its pods.
pub fn labels(rj: &RepoboxJob) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
        (LABEL_INSTANCE.to_owned(), instance_label(&rj.name_any())),
        (LABEL_COMPONENT.to_owned(), COMPONENT.to_owned()),
        (LABEL_PART_OF.to_owned(), PART_OF.to_owned()),
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_JOB_ID.to_owned(), label_value(&rj.spec.job_id)),
        (LABEL_USER.to_owned(), label_value(&rj.spec.user_id)),
    ])
}

/// The `app.kubernetes.io/instance` value: the RepoboxJob (and Job) name itself whenever it is a
/// valid label value — always, for names [`job_for`] accepts — so selecting by instance finds the
/// object of that name; otherwise its [`label_value`].
fn instance_label(name: &str) -> String {
    if is_label_value(name) {
        name.to_owned()
    } else {
        label_value(name)
    }
}

/// The attempt at `rj` the next Job runs: `status.attempt`, 1 for the first.
pub fn attempt(rj: &RepoboxJob) -> u32 {
    rj.status
        .as_ref()
        .and_then(|s| s.attempt)
        .filter(|a| *a >= 1)
        .unwrap_or(1)
}

/// The Job of attempt `attempt` at the RepoboxJob `name`: the RepoboxJob's own name first
/// (so `kubectl get job <name>` finds it), then `<name>-r<attempt>`, the name shortened to keep
/// within 63 characters. Attempts have their own Jobs, so a new attempt never waits for the
/// old Job to go and the old one stays to be inspected until its TTL.
pub fn job_name(name: &str, attempt: u32) -> String {
    if attempt <= 1 {
        return name.to_owned();
    }
    let suffix = format!("-r{attempt}");
    let keep = name
        .len()
        .min(crate::model::names::MAX_LABEL_LEN - suffix.len());
    let stem = name[..keep].trim_end_matches('-');
    format!("{stem}{suffix}")
}

/// The effective timeout (`activeDeadlineSeconds`): the RepoboxJob's override or the default.
/// Every attempt has all of it: time lost to a disruption is not the user's.
pub fn timeout_seconds(rj: &RepoboxJob, cfg: &JobConfig) -> i64 {
    rj.spec
        .timeout_seconds
        .unwrap_or(cfg.default_timeout_seconds)
}

/// The full path of the encryption key file in the runner (`ENCRYPTION_KEY_FILE`).
pub fn encryption_key_file(cfg: &JobConfig) -> String {
    format!("{ENCRYPTION_KEY_DIR}/{}", cfg.encryption_key_secret.key)
}

/// Builds the Job for `rj`.
///
/// Errors when `rj` lacks what a server-side object always has (name, namespace, uid: the owner
/// reference needs the uid), when its name is not a DNS-1123 label of at most 63 characters
/// (Job names become pod label values), or when `spec.timeoutSeconds` is not positive.
pub fn job_for(rj: &RepoboxJob, cfg: &JobConfig) -> Result<Job> {
    let name = rj
        .metadata
        .name
        .clone()
        .ok_or_else(|| Error::MissingObjectKey {
            kind: "RepoboxJob",
            name: String::new(),
            field: "metadata.name",
        })?;
    let namespace = rj
        .metadata
        .namespace
        .clone()
        .ok_or_else(|| Error::MissingObjectKey {
            kind: "RepoboxJob",
            name: name.clone(),
            field: "metadata.namespace",
        })?;
    let mut owner = rj
        .controller_owner_ref(&())
        .ok_or_else(|| Error::MissingObjectKey {
            kind: "RepoboxJob",
            name: name.clone(),
            field: "metadata.uid",
        })?;
    // Foreground deletion of the RepoboxJob waits for the Job (and so for its pod).
    owner.block_owner_deletion = Some(true);
    if !is_dns1123_label(&name) {
        return Err(Error::InvalidSpec {
            name,
            reason: "the name must be a DNS-1123 label of at most 63 characters to name a Job"
                .into(),
        });
    }
    let timeout = timeout_seconds(rj, cfg);
    if timeout < 1 {
        return Err(Error::InvalidSpec {
            name,
            reason: format!("spec.timeoutSeconds must be at least 1, not {timeout}"),
        });
    }

    let labels = labels(rj);
    let attempt = attempt(rj);

    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(&name, attempt)),
            namespace: Some(namespace),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            active_deadline_seconds: Some(timeout),
            backoff_limit: Some(0),
            ttl_seconds_after_finished: Some(cfg.ttl_seconds_after_finished),
            pod_failure_policy: Some(pod_failure_policy()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: (!cfg.pod_annotations.is_empty())
                        .then(|| cfg.pod_annotations.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(rj, cfg, timeout)),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// Fail the Job, without retry, on a disruption (rule 0) or on any non-zero runner exit (rule 1).
fn pod_failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
                on_exit_codes: None,
            },
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(CONTAINER_NAME.into()),
                    operator: "NotIn".into(),
                    values: vec![0],
                }),
                on_pod_conditions: None,
            },
        ],
    }
}

fn pod_spec(rj: &RepoboxJob, cfg: &JobConfig, timeout: i64) -> PodSpec {
    let mut containers = vec![runner_container(rj, cfg, timeout)];
    let mut init_containers = None;
    if let Some(agent) = &cfg.agent {
        containers.push(agent_container(cfg, agent));
        init_containers = Some(vec![install_container(cfg)]);
    }
    PodSpec {
        init_containers,
        containers,
        restart_policy: Some("Never".into()),
        service_account_name: Some(cfg.service_account.clone()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        share_process_namespace: Some(false),
        termination_grace_period_seconds: Some(cfg.termination_grace_period_seconds),
        node_selector: cfg.node_selector.clone(),
        tolerations: cfg.tolerations.clone(),
        affinity: cfg.affinity.clone(),
        priority_class_name: cfg.priority_class_name.clone(),
        image_pull_secrets: (!cfg.image_pull_secrets.is_empty()).then(|| {
            cfg.image_pull_secrets
                .iter()
                .map(|n| LocalObjectReference { name: n.clone() })
                .collect()
        }),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUNNER_UID),
            run_as_group: Some(RUNNER_UID),
            fs_group: Some(RUNNER_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(volumes(cfg)),
        ..PodSpec::default()
    }
}

fn empty_dir(name: &str, size_limit: Option<Quantity>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: None,
            size_limit,
        }),
        ..Volume::default()
    }
}

fn volumes(cfg: &JobConfig) -> Vec<Volume> {
    let mut volumes = vec![
        empty_dir(WORK_VOLUME, cfg.work_size_limit.clone()),
        empty_dir(STATE_VOLUME, cfg.work_size_limit.clone()),
        empty_dir(TMP_VOLUME, cfg.tmp_size_limit.clone()),
        Volume {
            name: ENCRYPTION_KEY_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(cfg.encryption_key_secret.name.clone()),
                items: Some(vec![KeyToPath {
                    key: cfg.encryption_key_secret.key.clone(),
                    path: cfg.encryption_key_secret.key.clone(),
                    mode: None,
                }]),
                default_mode: Some(ENCRYPTION_KEY_MODE),
                optional: Some(false),
            }),
            ..Volume::default()
        },
    ];
    if cfg.agent.is_some() {
        volumes.push(empty_dir(AGENT_TMP_VOLUME, cfg.tmp_size_limit.clone()));
        volumes.push(empty_dir(
            TOOLS_VOLUME,
            Some(Quantity(TOOLS_SIZE_LIMIT.into())),
        ));
    }
    if let Some(ca) = &cfg.git_ca {
        volumes.push(Volume {
            name: GIT_CA_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ca.name.clone(),
                items: Some(vec![KeyToPath {
                    key: ca.key.clone(),
                    path: ca.key.clone(),
                    mode: None,
                }]),
                default_mode: Some(0o444),
                optional: Some(false),
            }),
            ..Volume::default()
        });
    }
    if let Some(ca) = &cfg.redis_ca {
        volumes.push(Volume {
            name: REDIS_CA_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ca.name.clone()),
                items: Some(vec![KeyToPath {
                    key: ca.key.clone(),
                    path: ca.key.clone(),
                    mode: None,
                }]),
                default_mode: Some(0o444),
                optional: Some(false),
            }),
            ..Volume::default()
        });
    }
    volumes
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_from(name: &str, source: EnvVarSource) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(source),
    }
}

fn mount(volume: &str, path: impl Into<String>, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn resource_requirements(r: &RunnerResources) -> Option<ResourceRequirements> {
    let quantities = |pairs: [(&str, &Option<Quantity>); 3]| -> BTreeMap<String, Quantity> {
        pairs
            .into_iter()
            .filter_map(|(k, q)| q.clone().map(|q| (k.to_owned(), q)))
            .collect()
    };
    let requests = quantities([
        ("cpu", &r.cpu_request),
        ("memory", &r.memory_request),
        ("ephemeral-storage", &r.ephemeral_storage_request),
    ]);
    let limits = quantities([
        ("cpu", &r.cpu_limit),
        ("memory", &r.memory_limit),
        ("ephemeral-storage", &r.ephemeral_storage_limit),
    ]);
    (!requests.is_empty() || !limits.is_empty()).then(|| ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    })
}

/// Restricted: no privilege escalation, read-only root, no capabilities; `uid` when the
/// container runs as someone other than the pod's default user.
fn restricted(uid: Option<i64>) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: uid,
        run_as_group: uid,
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

/// The path of a shared subdirectory of the work volume.
fn work_subdir(cfg: &JobConfig, sub: &str) -> String {
    format!("{}/{sub}", cfg.work_dir)
}

fn runner_container(rj: &RepoboxJob, cfg: &JobConfig, timeout: i64) -> Container {
    let mut env_vars = vec![
        env(renv::JOB_ID, rj.spec.job_id.clone()),
        env(renv::JOB_ATTEMPT, attempt(rj).to_string()),
        env_from(
            renv::RUNNER_ID,
            EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    api_version: None,
                    field_path: "metadata.name".into(),
                }),
                ..EnvVarSource::default()
            },
        ),
        env_from(
            renv::REDIS_URL,
            EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: cfg.redis_secret.name.clone(),
                    key: cfg.redis_secret.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            },
        ),
        env(renv::ENCRYPTION_KEY_FILE, encryption_key_file(cfg)),
        env(renv::TEMP_DIR, cfg.work_dir.clone()),
        env(renv::PRIVATE_DIR, PRIVATE_DIR),
        env(renv::HOME, TMP_DIR),
        env(renv::JOB_TIMEOUT, timeout.to_string()),
        env(renv::CLEANUP_AFTER_JOB, cfg.cleanup_after_job.to_string()),
        env(renv::GIT_AUTHOR_NAME, cfg.git_author_name.clone()),
        env(renv::GIT_AUTHOR_EMAIL, cfg.git_author_email.clone()),
        env(renv::GIT_CLONE_DEPTH, cfg.git_clone_depth.to_string()),
        // Always explicit: the runner's own default must not decide what the operator was told.
        env(renv::OPEN_PULL_REQUESTS, cfg.open_pull_requests.to_string()),
    ];
    if cfg.agent.is_some() {
        env_vars.push(env(renv::AGENT_CONTAINER, "true"));
    }
    if cfg.allow_insecure_http {
        env_vars.push(env(renv::ALLOW_INSECURE_HTTP, "true"));
    }
    if let Some(ca) = &cfg.git_ca {
        env_vars.push(env(
            renv::GIT_SSL_CAINFO,
            format!("{GIT_CA_DIR}/{}", ca.key),
        ));
    }
    if let Some(ca) = &cfg.redis_ca {
        env_vars.push(env(
            renv::REDIS_CA_FILE,
            format!("{REDIS_CA_DIR}/{}", ca.key),
        ));
    }
    env_vars.push(env(renv::LOG_FORMAT, "json"));

    let mut mounts = vec![
        mount(WORK_VOLUME, cfg.work_dir.clone(), false),
        mount(STATE_VOLUME, PRIVATE_DIR, false),
        mount(TMP_VOLUME, TMP_DIR, false),
        mount(ENCRYPTION_KEY_VOLUME, ENCRYPTION_KEY_DIR, true),
    ];
    if cfg.git_ca.is_some() {
        mounts.push(mount(GIT_CA_VOLUME, GIT_CA_DIR, true));
    }
    if cfg.redis_ca.is_some() {
        mounts.push(mount(REDIS_CA_VOLUME, REDIS_CA_DIR, true));
    }
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec![RUNNER_COMMAND.into()]),
        env: Some(env_vars),
        resources: resource_requirements(&cfg.resources),
        volume_mounts: Some(mounts),
        security_context: Some(restricted(None)),
        ..Container::default()
    }
}

/// Copies the agent wrapper into the tools volume and creates the shared directories, as the
/// runner's user (the pod's `fsGroup` makes them group-writable for the agent).
fn install_container(cfg: &JobConfig) -> Container {
    Container {
        name: INSTALL_CONTAINER_NAME.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec![
            RUNNER_COMMAND.into(),
            "install".into(),
            TOOLS_DIR.into(),
            work_subdir(cfg, TREE_SUBDIR),
            work_subdir(cfg, HANDOFF_SUBDIR),
        ]),
        env: Some(vec![env(renv::LOG_FORMAT, "json")]),
        resources: resource_requirements(&cfg.resources),
        volume_mounts: Some(vec![
            mount(TOOLS_VOLUME, TOOLS_DIR, false),
            mount(WORK_VOLUME, cfg.work_dir.clone(), false),
        ]),
        security_context: Some(restricted(None)),
        ..Container::default()
    }
}

/// The agent: its own uid, only the tree and the hand-off directory of the work volume, its
/// own `/tmp`, its own environment.
fn agent_container(cfg: &JobConfig, agent: &AgentConfig) -> Container {
    let mut env_vars = vec![
        env(renv::HANDOFF_DIR, work_subdir(cfg, HANDOFF_SUBDIR)),
        env(renv::AGENT_COMMAND, agent.command.clone()),
        env(renv::HOME, TMP_DIR),
        env(renv::LOG_FORMAT, "json"),
    ];
    env_vars.extend(agent.extra_env.iter().map(|(k, v)| env(k, v.clone())));
    let sub_mount = |sub: &str| VolumeMount {
        sub_path: Some(sub.into()),
        ..mount(WORK_VOLUME, work_subdir(cfg, sub), false)
    };
    Container {
        name: AGENT_CONTAINER_NAME.into(),
        image: Some(agent.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec![AGENT_WRAPPER.into(), "agent".into()]),
        working_dir: Some(work_subdir(cfg, TREE_SUBDIR)),
        env: Some(env_vars),
        env_from: (!agent.env_from_secrets.is_empty()).then(|| {
            agent
                .env_from_secrets
                .iter()
                .map(|n| EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name: n.clone(),
                        optional: Some(false),
                    }),
                    ..EnvFromSource::default()
                })
                .collect()
        }),
        resources: resource_requirements(&agent.resources),
        volume_mounts: Some(vec![
            sub_mount(TREE_SUBDIR),
            sub_mount(HANDOFF_SUBDIR),
            mount(AGENT_TMP_VOLUME, TMP_DIR, false),
            mount(TOOLS_VOLUME, TOOLS_DIR, true),
        ]),
        security_context: Some(restricted(Some(agent.uid))),
        ..Container::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::test_job_config;
    use crate::model::crd::RepoboxJobSpec;
    use serde_json::{Value, json};
    use std::collections::BTreeSet;

    fn rj(job_id: &str, user_id: &str) -> RepoboxJob {
        let mut rj = RepoboxJob::new(
            &crate::model::names::object_name(job_id),
            RepoboxJobSpec {
                job_id: job_id.into(),
                user_id: user_id.into(),
                repo: "https://github.com/acme/api.git".into(),
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
        rj
    }

    fn build(rj: &RepoboxJob, env: &[(&str, &str)]) -> Job {
        job_for(rj, &test_job_config(env)).unwrap()
    }

    fn pod(job: &Job) -> &PodSpec {
        job.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    fn runner(job: &Job) -> &Container {
        &pod(job).containers[0]
    }

    fn env_map(job: &Job) -> Vec<(String, Value)> {
        runner(job)
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| {
                let v = match (&e.value, &e.value_from) {
                    (Some(v), None) => json!(v),
                    (None, Some(from)) => serde_json::to_value(from).unwrap(),
                    other => panic!("{}: {other:?}", e.name),
                };
                (e.name.clone(), v)
            })
            .collect()
    }

    #[test]
    fn metadata_and_owner_reference() {
        let job = build(&rj("job-1", "user-1"), &[]);
        assert_eq!(job.metadata.name.as_deref(), Some("job-1"));
        assert_eq!(job.metadata.namespace.as_deref(), Some("jobs"));
        let owners = job.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        let o = &owners[0];
        assert_eq!(o.api_version, "repobox.dev/v1alpha1");
        assert_eq!(o.kind, "RepoboxJob");
        assert_eq!(o.name, "job-1");
        assert_eq!(o.uid, "6f1c0d9e-1111-2222-3333-444455556666");
        assert_eq!(o.controller, Some(true));
        assert_eq!(o.block_owner_deletion, Some(true));
        assert!(job.metadata.annotations.is_none());
        assert!(job.status.is_none());
    }

    #[test]
    fn labels_on_job_and_pod() {
        let job = build(&rj("job-1", "user-1"), &[]);
        let want = BTreeMap::from([
            (
                "app.kubernetes.io/name".to_owned(),
                "repobox-job-runner".to_owned(),
            ),
            ("app.kubernetes.io/instance".to_owned(), "job-1".to_owned()),
            ("app.kubernetes.io/component".to_owned(), "job".to_owned()),
            ("app.kubernetes.io/part-of".to_owned(), "repobox".to_owned()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "repobox-operator".to_owned(),
            ),
            ("repobox.dev/job-id".to_owned(), "job-1".to_owned()),
            ("repobox.dev/user".to_owned(), "user-1".to_owned()),
        ]);
        assert_eq!(job.metadata.labels.as_ref(), Some(&want));
        let tmpl = job
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap();
        assert_eq!(tmpl.labels.as_ref(), Some(&want));
        // The watch selector matches the labels.
        let (k, v) = MANAGED_BY_SELECTOR.split_once('=').unwrap();
        assert_eq!(want.get(k).map(String::as_str), Some(v));
    }

    #[test]
    fn odd_ids_give_valid_labels() {
        let r = rj(
            "Job_ID/with spaces and a very long tail ..................................",
            "user@example.com",
        );
        let job = build(&r, &[]);
        let labels = job.metadata.labels.as_ref().unwrap();
        for (k, v) in labels {
            assert!(crate::model::names::is_label_value(v), "{k}={v}");
        }
        assert_eq!(
            labels[LABEL_USER],
            crate::model::names::label_value("user@example.com")
        );
        assert_ne!(labels[LABEL_USER], "user@example.com");
        assert_eq!(
            labels[LABEL_JOB_ID],
            crate::model::names::label_value(&r.spec.job_id)
        );
        assert!(is_dns1123_label(job.metadata.name.as_deref().unwrap()));
        // The plain JOB_ID env var carries the real id.
        assert_eq!(
            env_map(&job)[0],
            ("JOB_ID".to_owned(), json!(r.spec.job_id))
        );
    }

    #[test]
    fn instance_label_is_the_name_even_when_hash_shaped() {
        // `object_name` of an id that needed changing ends in `-<10 hex>`; the instance label
        // must still equal the name.
        let r = rj("Needs_Changing", "u");
        let name = r.metadata.name.clone().unwrap();
        assert_ne!(name, "Needs_Changing");
        let job = build(&r, &[]);
        assert_eq!(job.metadata.labels.as_ref().unwrap()[LABEL_INSTANCE], name);
        assert_eq!(job.metadata.name.as_deref(), Some(name.as_str()));
        assert_eq!(instance_label("Bad Name"), label_value("Bad Name"));
    }

    #[test]
    fn job_spec_fields() {
        let job = build(&rj("job-1", "u"), &[]);
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(3600));
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(spec.ttl_seconds_after_finished, Some(3600));
        assert_eq!(
            spec.selector, None,
            "the Job controller generates the selector"
        );
        assert_eq!(spec.manual_selector, None);
        assert_eq!(spec.parallelism, None);
        assert_eq!(spec.completions, None);
        assert_eq!(spec.suspend, None);
        let pfp = serde_json::to_value(spec.pod_failure_policy.as_ref().unwrap()).unwrap();
        assert_eq!(
            pfp,
            json!({"rules": [
                {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {"action": "FailJob", "onExitCodes": {"containerName": "runner", "operator": "NotIn", "values": [0]}}
            ]})
        );
        let tmpl = spec.template.metadata.as_ref().unwrap();
        assert_eq!(
            tmpl.annotations,
            Some(BTreeMap::from([
                (
                    "cluster-autoscaler.kubernetes.io/safe-to-evict".to_owned(),
                    "false".to_owned()
                ),
                ("karpenter.sh/do-not-disrupt".to_owned(), "true".to_owned())
            ]))
        );
    }

    #[test]
    fn disruption_annotations_and_disk_requests_follow_the_settings() {
        let job = build(
            &rj("job-1", "u"),
            &[
                ("RUNNER_DO_NOT_DISRUPT", "false"),
                ("RUNNER_POD_ANNOTATIONS", r#"{"example.com/owner":"ci"}"#),
                ("RUNNER_EPHEMERAL_STORAGE_REQUEST", "3Gi"),
                ("RUNNER_EPHEMERAL_STORAGE_LIMIT", "12Gi"),
                ("AGENT_COMMAND", "agent"),
                ("AGENT_EPHEMERAL_STORAGE_REQUEST", "4Gi"),
                ("AGENT_EPHEMERAL_STORAGE_LIMIT", "8Gi"),
            ],
        );
        let tmpl = job
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap();
        assert_eq!(
            tmpl.annotations,
            Some(BTreeMap::from([(
                "example.com/owner".to_owned(),
                "ci".to_owned()
            )]))
        );
        let p = pod(&job);
        let disk = |name: &str| {
            let c = p.containers.iter().find(|c| c.name == name).unwrap();
            let r = c.resources.as_ref().unwrap();
            (
                r.requests.as_ref().unwrap()["ephemeral-storage"].0.clone(),
                r.limits.as_ref().unwrap()["ephemeral-storage"].0.clone(),
            )
        };
        assert_eq!(disk("runner"), ("3Gi".to_owned(), "12Gi".to_owned()));
        assert_eq!(disk("agent"), ("4Gi".to_owned(), "8Gi".to_owned()));

        // Neither annotation at all: no annotations map.
        let job = build(&rj("job-1", "u"), &[("RUNNER_DO_NOT_DISRUPT", "false")]);
        let tmpl = job
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap();
        assert_eq!(tmpl.annotations, None);
    }

    #[test]
    fn each_attempt_has_its_own_job_and_knows_its_number() {
        assert_eq!(job_name("rbj-1", 0), "rbj-1");
        assert_eq!(job_name("rbj-1", 1), "rbj-1");
        assert_eq!(job_name("rbj-1", 2), "rbj-1-r2");
        assert_eq!(job_name("rbj-1", 10), "rbj-1-r10");
        let long = format!("{}-x", "a".repeat(60));
        let n = job_name(&long, 3);
        assert_eq!(n, format!("{}-r3", "a".repeat(60)));
        assert!(
            is_dns1123_label(&n),
            "a trailing '-' is trimmed before the suffix"
        );
        for attempt in 2..=11 {
            let n = job_name(&"b".repeat(63), attempt);
            assert!(n.len() <= 63 && is_dns1123_label(&n), "{n}");
        }

        let mut r = rj("job-1", "u");
        assert_eq!(attempt(&r), 1);
        r.status = Some(crate::model::crd::RepoboxJobStatus {
            attempt: Some(3),
            ..Default::default()
        });
        assert_eq!(attempt(&r), 3);
        let job = build(&r, &[]);
        assert_eq!(job.metadata.name.as_deref(), Some("job-1-r3"));
        let env = env_map(&job);
        assert!(env.contains(&("JOB_ATTEMPT".to_owned(), json!("3"))));
    }

    #[test]
    fn timeout_override_and_default() {
        let mut r = rj("job-1", "u");
        assert_eq!(
            build(&r, &[("JOB_TIMEOUT", "120")])
                .spec
                .unwrap()
                .active_deadline_seconds,
            Some(120)
        );
        r.spec.timeout_seconds = Some(45);
        let job = build(&r, &[("JOB_TIMEOUT", "120")]);
        assert_eq!(job.spec.as_ref().unwrap().active_deadline_seconds, Some(45));
        assert!(env_map(&job).contains(&("JOB_TIMEOUT".to_owned(), json!("45"))));
        r.spec.timeout_seconds = Some(0);
        let err = job_for(&r, &test_job_config(&[])).unwrap_err();
        assert!(matches!(err, Error::InvalidSpec { .. }), "{err}");
        r.spec.timeout_seconds = Some(-5);
        assert!(job_for(&r, &test_job_config(&[])).is_err());
    }

    #[test]
    fn pod_spec_fields() {
        let job = build(&rj("job-1", "u"), &[]);
        let p = pod(&job);
        assert_eq!(p.containers.len(), 1);
        assert!(p.init_containers.is_none());
        assert_eq!(p.restart_policy.as_deref(), Some("Never"));
        assert_eq!(p.service_account_name.as_deref(), Some("repobox-runner"));
        assert_eq!(p.automount_service_account_token, Some(false));
        assert_eq!(p.enable_service_links, Some(false));
        assert_eq!(p.share_process_namespace, Some(false));
        assert_eq!(p.termination_grace_period_seconds, Some(30));
        assert_eq!(p.node_selector, None);
        assert_eq!(p.tolerations, None);
        assert_eq!(p.affinity, None);
        assert_eq!(p.priority_class_name, None);
        assert_eq!(p.image_pull_secrets, None);
        assert_eq!(p.host_network, None);
        let sc = serde_json::to_value(p.security_context.as_ref().unwrap()).unwrap();
        assert_eq!(
            sc,
            json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                   "seccompProfile": {"type": "RuntimeDefault"}})
        );
        let vols = serde_json::to_value(p.volumes.as_ref().unwrap()).unwrap();
        assert_eq!(
            vols,
            json!([
                {"name": "work", "emptyDir": {"sizeLimit": "10Gi"}},
                {"name": "state", "emptyDir": {"sizeLimit": "10Gi"}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                {"name": "encryption-key", "secret": {
                    "secretName": "repobox-encryption-key",
                    "items": [{"key": "key", "path": "key"}],
                    "defaultMode": 256, "optional": false}}
            ])
        );
    }

    #[test]
    fn container_fields() {
        let job = build(&rj("job-1", "u"), &[]);
        let c = runner(&job);
        assert_eq!(c.name, "runner");
        assert_eq!(
            c.image.as_deref(),
            Some(crate::config::DEFAULT_RUNNER_IMAGE)
        );
        assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(c.command, Some(vec!["repobox-job-runner".to_owned()]));
        assert_eq!(c.args, None);
        assert_eq!(c.env_from, None);
        assert_eq!(c.ports, None);
        assert_eq!(
            serde_json::to_value(c.resources.as_ref().unwrap()).unwrap(),
            json!({"requests": {"cpu": "250m", "memory": "256Mi", "ephemeral-storage": "2Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
        );
        assert_eq!(
            serde_json::to_value(c.volume_mounts.as_ref().unwrap()).unwrap(),
            json!([
                {"name": "work", "mountPath": "/work"},
                {"name": "state", "mountPath": "/var/lib/repobox"},
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "encryption-key", "mountPath": "/var/run/secrets/repobox/encryption-key", "readOnly": true}
            ])
        );
        assert_eq!(
            serde_json::to_value(c.security_context.as_ref().unwrap()).unwrap(),
            json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true,
                   "capabilities": {"drop": ["ALL"]}})
        );
    }

    #[test]
    fn container_env() {
        let job = build(&rj("job-1", "u"), &[]);
        let want: Vec<(String, Value)> = [
            ("JOB_ID", json!("job-1")),
            ("JOB_ATTEMPT", json!("1")),
            (
                "RUNNER_ID",
                json!({"fieldRef": {"fieldPath": "metadata.name"}}),
            ),
            (
                "REDIS_URL",
                json!({"secretKeyRef": {"name": "repobox-redis", "key": "url", "optional": false}}),
            ),
            (
                "ENCRYPTION_KEY_FILE",
                json!("/var/run/secrets/repobox/encryption-key/key"),
            ),
            ("TEMP_DIR", json!("/work")),
            ("PRIVATE_DIR", json!("/var/lib/repobox")),
            ("HOME", json!("/tmp")),
            ("JOB_TIMEOUT", json!("3600")),
            ("CLEANUP_AFTER_JOB", json!("true")),
            ("GIT_AUTHOR_NAME", json!("Repobox")),
            (
                "GIT_AUTHOR_EMAIL",
                json!("repobox@users.noreply.repobox.dev"),
            ),
            ("GIT_CLONE_DEPTH", json!("1")),
            ("OPEN_PULL_REQUESTS", json!("true")),
            ("LOG_FORMAT", json!("json")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(env_map(&job), want);
    }

    #[test]
    fn optional_settings_present() {
        let env = [
            ("RUNNER_IMAGE", "registry.example/runner:2"),
            ("RUNNER_IMAGE_PULL_POLICY", "Always"),
            ("RUNNER_IMAGE_PULL_SECRETS", "pull"),
            ("RUNNER_SERVICE_ACCOUNT", "sa"),
            ("RUNNER_CPU_LIMIT", ""),
            ("RUNNER_MEMORY_REQUEST", "1Gi"),
            ("RUNNER_EPHEMERAL_STORAGE", ""),
            ("RUNNER_TMP_SIZE_LIMIT", "100Mi"),
            ("RUNNER_NODE_SELECTOR", r#"{"pool":"jobs"}"#),
            (
                "RUNNER_TOLERATIONS",
                r#"[{"key":"jobs","operator":"Exists","effect":"NoSchedule"}]"#,
            ),
            (
                "RUNNER_AFFINITY",
                r#"{"nodeAffinity":{"preferredDuringSchedulingIgnoredDuringExecution":[{"weight":1,"preference":{"matchExpressions":[{"key":"k","operator":"Exists"}]}}]}}"#,
            ),
            ("RUNNER_PRIORITY_CLASS", "batch-low"),
            ("RUNNER_ENV_FROM_SECRETS", "agent-keys,other"),
            ("JOB_TTL_SECONDS", "0"),
            ("RUNNER_TERMINATION_GRACE_SECONDS", "10"),
            ("REDIS_SECRET_NAME", "rs"),
            ("REDIS_SECRET_KEY", "REDIS_URL"),
            ("ENCRYPTION_KEY_SECRET_NAME", "es"),
            ("ENCRYPTION_KEY_SECRET_KEY", "ENCRYPTION_KEY"),
            ("TEMP_DIR", "/data/w"),
            ("CLEANUP_AFTER_JOB", "false"),
            ("GIT_AUTHOR_NAME", "Bot"),
            ("GIT_AUTHOR_EMAIL", "bot@example.com"),
            ("GIT_CLONE_DEPTH", "0"),
            ("AGENT_COMMAND", "agent run"),
        ];
        let job = build(&rj("job-1", "u"), &env);
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.ttl_seconds_after_finished, Some(0));
        let p = pod(&job);
        assert_eq!(p.service_account_name.as_deref(), Some("sa"));
        assert_eq!(p.termination_grace_period_seconds, Some(10));
        assert_eq!(p.priority_class_name.as_deref(), Some("batch-low"));
        assert_eq!(
            p.node_selector,
            Some(BTreeMap::from([("pool".to_owned(), "jobs".to_owned())]))
        );
        assert_eq!(
            serde_json::to_value(p.tolerations.as_ref().unwrap()).unwrap(),
            json!([{"key": "jobs", "operator": "Exists", "effect": "NoSchedule"}])
        );
        assert_eq!(
            serde_json::to_value(p.affinity.as_ref().unwrap()).unwrap(),
            json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [{"key": "k", "operator": "Exists"}]}}]}})
        );
        assert_eq!(
            serde_json::to_value(p.image_pull_secrets.as_ref().unwrap()).unwrap(),
            json!([{"name": "pull"}])
        );
        let vols = serde_json::to_value(p.volumes.as_ref().unwrap()).unwrap();
        assert_eq!(vols[0], json!({"name": "work", "emptyDir": {}}));
        assert_eq!(vols[1], json!({"name": "state", "emptyDir": {}}));
        assert_eq!(
            vols[2],
            json!({"name": "tmp", "emptyDir": {"sizeLimit": "100Mi"}})
        );
        assert_eq!(vols[3]["secret"]["secretName"], "es");
        assert_eq!(
            vols[3]["secret"]["items"],
            json!([{"key": "ENCRYPTION_KEY", "path": "ENCRYPTION_KEY"}])
        );
        assert_eq!(
            vols[4],
            json!({"name": "agent-tmp", "emptyDir": {"sizeLimit": "100Mi"}})
        );

        let c = runner(&job);
        assert_eq!(c.image.as_deref(), Some("registry.example/runner:2"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(
            serde_json::to_value(c.resources.as_ref().unwrap()).unwrap(),
            json!({"requests": {"cpu": "250m", "memory": "1Gi", "ephemeral-storage": "2Gi"}, "limits": {"memory": "1Gi"}})
        );
        // Agent credentials go to the agent container only.
        assert_eq!(c.env_from, None);
        let agent = &p.containers[1];
        assert_eq!(
            serde_json::to_value(agent.env_from.as_ref().unwrap()).unwrap(),
            json!([{"secretRef": {"name": "agent-keys", "optional": false}}, {"secretRef": {"name": "other", "optional": false}}])
        );
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/data/w");
        let env = env_map(&job);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(
            get("REDIS_URL"),
            Some(json!({"secretKeyRef": {"name": "rs", "key": "REDIS_URL", "optional": false}}))
        );
        assert_eq!(
            get("ENCRYPTION_KEY_FILE"),
            Some(json!(
                "/var/run/secrets/repobox/encryption-key/ENCRYPTION_KEY"
            ))
        );
        assert_eq!(get("TEMP_DIR"), Some(json!("/data/w")));
        assert_eq!(get("CLEANUP_AFTER_JOB"), Some(json!("false")));
        assert_eq!(get("GIT_AUTHOR_NAME"), Some(json!("Bot")));
        assert_eq!(get("GIT_AUTHOR_EMAIL"), Some(json!("bot@example.com")));
        assert_eq!(get("GIT_CLONE_DEPTH"), Some(json!("0")));
        // The runner hands over to the agent container; the command is the agent's.
        assert_eq!(get("AGENT_COMMAND"), None);
        assert_eq!(get("AGENT_CONTAINER"), Some(json!("true")));
        assert_eq!(env[env.len() - 1].0, "LOG_FORMAT");
        let agent_env = serde_json::to_value(agent.env.as_ref().unwrap()).unwrap();
        assert!(
            agent_env
                .as_array()
                .unwrap()
                .contains(&json!({"name": "AGENT_COMMAND", "value": "agent run"}))
        );
        assert_eq!(
            serde_json::to_value(&agent.volume_mounts).unwrap()[0],
            json!({"name": "work", "mountPath": "/data/w/tree", "subPath": "tree"})
        );
    }

    #[test]
    fn agent_runs_in_its_own_container_without_the_runners_secrets() {
        let job = build(
            &rj("job-1", "u"),
            &[
                ("AGENT_COMMAND", "agent --go"),
                ("AGENT_IMAGE", "registry.example/agent:1"),
                ("AGENT_EXTRA_ENV", r#"{"MODEL":"large"}"#),
                ("RUNNER_ENV_FROM_SECRETS", "agent-keys"),
            ],
        );
        let p = pod(&job);
        assert_eq!(p.share_process_namespace, Some(false));
        assert_eq!(p.automount_service_account_token, Some(false));
        let names: Vec<&str> = p.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["runner", "agent"], "the runner starts first");

        // The init container installs the wrapper and makes the shared directories.
        let init = &p.init_containers.as_ref().unwrap()[0];
        assert_eq!(
            serde_json::to_value(init).unwrap(),
            json!({
                "name": "install",
                "image": crate::config::DEFAULT_RUNNER_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "command": ["repobox-job-runner", "install", "/repobox/bin", "/work/tree", "/work/handoff"],
                "env": [{"name": "LOG_FORMAT", "value": "json"}],
                "resources": {"requests": {"cpu": "250m", "memory": "256Mi", "ephemeral-storage": "2Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
                "volumeMounts": [
                    {"name": "tools", "mountPath": "/repobox/bin"},
                    {"name": "work", "mountPath": "/work"}
                ],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}}
            })
        );

        let agent = &p.containers[1];
        assert_eq!(
            serde_json::to_value(agent).unwrap(),
            json!({
                "name": "agent",
                "image": "registry.example/agent:1",
                "imagePullPolicy": "IfNotPresent",
                "command": ["/repobox/bin/repobox-job-runner", "agent"],
                "workingDir": "/work/tree",
                "env": [
                    {"name": "HANDOFF_DIR", "value": "/work/handoff"},
                    {"name": "AGENT_COMMAND", "value": "agent --go"},
                    {"name": "HOME", "value": "/tmp"},
                    {"name": "LOG_FORMAT", "value": "json"},
                    {"name": "MODEL", "value": "large"}
                ],
                "envFrom": [{"secretRef": {"name": "agent-keys", "optional": false}}],
                "resources": {"requests": {"cpu": "500m", "memory": "512Mi", "ephemeral-storage": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
                "volumeMounts": [
                    {"name": "work", "mountPath": "/work/tree", "subPath": "tree"},
                    {"name": "work", "mountPath": "/work/handoff", "subPath": "handoff"},
                    {"name": "agent-tmp", "mountPath": "/tmp"},
                    {"name": "tools", "mountPath": "/repobox/bin", "readOnly": true}
                ],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "runAsNonRoot": true, "runAsUser": 65533, "runAsGroup": 65533,
                    "capabilities": {"drop": ["ALL"]}}
            })
        );
        // Nothing of the runner's reaches the agent: no key volume, no private volume, no
        // Redis URL, no runner env.
        let agent_json = serde_json::to_string(agent).unwrap();
        for runner_only in [
            "encryption-key",
            "\"state\"",
            "REDIS_URL",
            "ENCRYPTION_KEY",
            "JOB_ID",
            "repobox-redis",
            "/var/lib/repobox",
        ] {
            assert!(
                !agent_json.contains(runner_only),
                "{runner_only} in the agent container"
            );
        }
        let vols = serde_json::to_value(p.volumes.as_ref().unwrap()).unwrap();
        assert_eq!(
            vols[4],
            json!({"name": "agent-tmp", "emptyDir": {"sizeLimit": "1Gi"}})
        );
        assert_eq!(
            vols[5],
            json!({"name": "tools", "emptyDir": {"sizeLimit": "128Mi"}})
        );
        // The pod failure policy still judges the runner container.
        let rule = &job
            .spec
            .as_ref()
            .unwrap()
            .pod_failure_policy
            .as_ref()
            .unwrap()
            .rules[1];
        assert_eq!(
            rule.on_exit_codes
                .as_ref()
                .unwrap()
                .container_name
                .as_deref(),
            Some("runner")
        );
    }

    #[test]
    fn the_pull_request_setting_reaches_the_runner_only() {
        for (value, want) in [
            (None, "true"),
            (Some("false"), "false"),
            (Some("true"), "true"),
        ] {
            let mut settings = vec![("AGENT_COMMAND", "x")];
            if let Some(v) = value {
                settings.push(("OPEN_PULL_REQUESTS", v));
            }
            let job = build(&rj("job-1", "u"), &settings);
            let env = env_map(&job);
            assert!(
                env.contains(&("OPEN_PULL_REQUESTS".to_owned(), json!(want))),
                "{value:?}: {env:?}"
            );
            // The agent container never learns it (nor anything else of the runner's).
            assert!(
                !serde_json::to_string(&pod(&job).containers[1])
                    .unwrap()
                    .contains("OPEN_PULL_REQUESTS")
            );
        }
    }

    #[test]
    fn git_host_settings_reach_the_runner_only() {
        let job = build(
            &rj("job-1", "u"),
            &[
                ("ALLOW_INSECURE_HTTP", "true"),
                ("GIT_CA_CONFIGMAP", "git-ca"),
                ("GIT_CA_KEY", "bundle.pem"),
                ("AGENT_COMMAND", "x"),
            ],
        );
        let env = env_map(&job);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("ALLOW_INSECURE_HTTP"), Some(json!("true")));
        assert_eq!(
            get("GIT_SSL_CAINFO"),
            Some(json!("/var/run/secrets/repobox/git-ca/bundle.pem"))
        );
        let p = pod(&job);
        let vols = serde_json::to_value(p.volumes.as_ref().unwrap()).unwrap();
        assert_eq!(
            vols.as_array().unwrap().last().unwrap(),
            &json!({"name": "git-ca", "configMap": {"name": "git-ca",
                "items": [{"key": "bundle.pem", "path": "bundle.pem"}], "defaultMode": 292, "optional": false}})
        );
        assert_eq!(
            serde_json::to_value(runner(&job).volume_mounts.as_ref().unwrap().last().unwrap())
                .unwrap(),
            json!({"name": "git-ca", "mountPath": "/var/run/secrets/repobox/git-ca", "readOnly": true})
        );
        assert!(
            !serde_json::to_string(&p.containers[1])
                .unwrap()
                .contains("git-ca")
        );
        // The Redis CA too, for the runner only.
        let job = build(
            &rj("job-1", "u"),
            &[("REDIS_CA_SECRET_NAME", "redis-ca"), ("AGENT_COMMAND", "x")],
        );
        let env = env_map(&job);
        assert!(env.contains(&(
            "REDIS_CA_FILE".to_owned(),
            json!("/var/run/secrets/repobox/redis-ca/ca.crt")
        )));
        let p = pod(&job);
        assert_eq!(
            serde_json::to_value(p.volumes.as_ref().unwrap().last().unwrap()).unwrap(),
            json!({"name": "redis-ca", "secret": {"secretName": "redis-ca",
                "items": [{"key": "ca.crt", "path": "ca.crt"}], "defaultMode": 292, "optional": false}})
        );
        assert!(
            !serde_json::to_string(&p.containers[1])
                .unwrap()
                .contains("redis-ca")
        );
        // Off by default.
        let env = env_map(&build(&rj("job-1", "u"), &[]));
        assert!(!env.iter().any(|(n, _)| {
            n == "ALLOW_INSECURE_HTTP" || n == "GIT_SSL_CAINFO" || n == "REDIS_CA_FILE"
        }));
    }

    #[test]
    fn no_resources_at_all() {
        let env = [
            ("RUNNER_CPU_REQUEST", ""),
            ("RUNNER_CPU_LIMIT", ""),
            ("RUNNER_MEMORY_REQUEST", ""),
            ("RUNNER_MEMORY_LIMIT", ""),
            ("RUNNER_EPHEMERAL_STORAGE_REQUEST", ""),
        ];
        let job = build(&rj("job-1", "u"), &env);
        assert_eq!(runner(&job).resources, None);
    }

    #[test]
    fn missing_uid_namespace_or_name_is_an_error() {
        let cfg = test_job_config(&[]);
        let mut r = rj("job-1", "u");
        r.metadata.uid = None;
        match job_for(&r, &cfg) {
            Err(Error::MissingObjectKey { field, name, .. }) => {
                assert_eq!(field, "metadata.uid");
                assert_eq!(name, "job-1");
            }
            other => panic!("{other:?}"),
        }
        let mut r = rj("job-1", "u");
        r.metadata.namespace = None;
        assert!(matches!(
            job_for(&r, &cfg),
            Err(Error::MissingObjectKey {
                field: "metadata.namespace",
                ..
            })
        ));
        let mut r = rj("job-1", "u");
        r.metadata.name = None;
        assert!(matches!(
            job_for(&r, &cfg),
            Err(Error::MissingObjectKey {
                field: "metadata.name",
                ..
            })
        ));
    }

    #[test]
    fn names_that_cannot_name_a_job_are_rejected() {
        let cfg = test_job_config(&[]);
        for bad in ["a".repeat(64), "Upper".to_owned(), "dotted.name".to_owned()] {
            let mut r = rj("job-1", "u");
            r.metadata.name = Some(bad.clone());
            assert!(
                matches!(job_for(&r, &cfg), Err(Error::InvalidSpec { .. })),
                "{bad}"
            );
        }
        let mut r = rj("job-1", "u");
        r.metadata.name = Some("a".repeat(63));
        assert!(job_for(&r, &cfg).is_ok());
    }

    #[test]
    fn deterministic() {
        let r = rj("job-1", "u");
        let cfg = test_job_config(&[]);
        assert_eq!(job_for(&r, &cfg).unwrap(), job_for(&r, &cfg).unwrap());
    }

    #[test]
    fn no_secret_value_in_the_job() {
        // Whatever secret material exists lives in Redis or Secrets; the Job only names Secrets.
        let cfg = test_job_config(&[]);
        let mut r = rj("job-1", "u");
        r.spec.repo = "https://github.com/acme/api.git".into();
        let json = serde_json::to_string(&job_for(&r, &cfg).unwrap()).unwrap();
        assert!(!json.contains("redis://"), "{json}");
        assert!(!json.contains("oauth2"), "{json}");
        assert!(
            !json.contains("github.com"),
            "the repo URL is not needed by the Job: {json}"
        );
        // Every env var is either a plain non-secret value or a reference.
        let job = job_for(&r, &cfg).unwrap();
        for e in runner(&job).env.as_ref().unwrap() {
            if e.name == "REDIS_URL" {
                assert!(e.value.is_none());
                assert!(e.value_from.as_ref().unwrap().secret_key_ref.is_some());
            }
            assert!(!e.name.contains("TOKEN"), "{}", e.name);
            assert_ne!(e.name, "ENCRYPTION_KEY");
        }
    }

    /// Field names Kubernetes 1.28 does not serve in batch/v1 Job and core/v1 PodSpec/Container
    /// (added later, or alpha in 1.28 and dropped when the feature gate is off).
    const NOT_SERVED_IN_1_28: &[&str] = &[
        "podReplacementPolicy",
        "successPolicy",
        "backoffLimitPerIndex",
        "maxFailedIndexes",
        "managedBy",
        "appArmorProfile",
        "supplementalGroupsPolicy",
        "seLinuxChangePolicy",
        "resizePolicy",
        "hostUsers",
        "resourceClaims",
        "schedulingGates",
        "stopSignal",
        "hostnameOverride",
        "restartPolicyRules",
        "fileKeyRef",
        "recursiveReadOnly",
        "image",
    ];

    /// Every object key in `v`, with the path to it, skipping the values of free-form maps
    /// (labels, annotations, nodeSelector, resource lists) whose keys are data, not fields.
    fn keys(v: &Value, path: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    out.push(format!("{path}.{k}"));
                    let free_form = matches!(
                        k.as_str(),
                        "labels"
                            | "annotations"
                            | "nodeSelector"
                            | "requests"
                            | "limits"
                            | "matchLabels"
                    );
                    if !free_form {
                        keys(child, &format!("{path}.{k}"), out);
                    }
                }
            }
            Value::Array(a) => {
                for child in a {
                    keys(child, &format!("{path}[]"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn only_fields_kubernetes_1_28_serves() {
        let env = [
            ("RUNNER_NODE_SELECTOR", r#"{"pool":"jobs"}"#),
            (
                "RUNNER_TOLERATIONS",
                r#"[{"key":"jobs","operator":"Exists"}]"#,
            ),
            (
                "RUNNER_AFFINITY",
                r#"{"podAntiAffinity":{"preferredDuringSchedulingIgnoredDuringExecution":[{"weight":1,"podAffinityTerm":{"topologyKey":"kubernetes.io/hostname","labelSelector":{"matchLabels":{"app":"x"}}}}]}}"#,
            ),
            ("RUNNER_PRIORITY_CLASS", "low"),
            ("RUNNER_IMAGE_PULL_SECRETS", "pull"),
            ("RUNNER_ENV_FROM_SECRETS", "agent"),
            ("AGENT_COMMAND", "a"),
            ("AGENT_EXTRA_ENV", r#"{"A":"b"}"#),
            ("GIT_CA_CONFIGMAP", "ca"),
        ];
        let mut r = rj("job-1", "u");
        r.spec.timeout_seconds = Some(10);
        let v = serde_json::to_value(build(&r, &env)).unwrap();
        let mut all = Vec::new();
        keys(&v, "", &mut all);
        for path in &all {
            let field = path.rsplit('.').next().unwrap();
            // `image` is fine on a container; only the 1.31+ image *volume* source is not.
            if field == "image" && path.to_ascii_lowercase().ends_with("containers[].image") {
                continue;
            }
            assert!(
                !NOT_SERVED_IN_1_28.contains(&field),
                "{path} is not served by Kubernetes 1.28"
            );
        }

        // And an allowlist: the exact set of paths this builder emits, all long served.
        let allowed: BTreeSet<&str> = [
            ".apiVersion",
            ".kind",
            ".metadata",
            ".metadata.name",
            ".metadata.namespace",
            ".metadata.labels",
            ".metadata.ownerReferences",
            ".metadata.ownerReferences[].apiVersion",
            ".metadata.ownerReferences[].kind",
            ".metadata.ownerReferences[].name",
            ".metadata.ownerReferences[].uid",
            ".metadata.ownerReferences[].controller",
            ".metadata.ownerReferences[].blockOwnerDeletion",
            ".spec",
            ".spec.activeDeadlineSeconds",
            ".spec.backoffLimit",
            ".spec.ttlSecondsAfterFinished",
            ".spec.podFailurePolicy",
            ".spec.podFailurePolicy.rules",
            ".spec.podFailurePolicy.rules[].action",
            ".spec.podFailurePolicy.rules[].onPodConditions",
            ".spec.podFailurePolicy.rules[].onPodConditions[].type",
            ".spec.podFailurePolicy.rules[].onPodConditions[].status",
            ".spec.podFailurePolicy.rules[].onExitCodes",
            ".spec.podFailurePolicy.rules[].onExitCodes.containerName",
            ".spec.podFailurePolicy.rules[].onExitCodes.operator",
            ".spec.podFailurePolicy.rules[].onExitCodes.values",
            ".spec.template",
            ".spec.template.metadata",
            ".spec.template.metadata.labels",
            ".spec.template.metadata.annotations",
            ".spec.template.spec",
        ]
        .into_iter()
        .collect();
        let pod_prefix = ".spec.template.spec";
        let pod_allowed: BTreeSet<&str> = [
            "",
            ".containers",
            ".restartPolicy",
            ".serviceAccountName",
            ".automountServiceAccountToken",
            ".enableServiceLinks",
            ".terminationGracePeriodSeconds",
            ".nodeSelector",
            ".tolerations",
            ".tolerations[].key",
            ".tolerations[].operator",
            ".affinity",
            ".priorityClassName",
            ".imagePullSecrets",
            ".imagePullSecrets[].name",
            ".securityContext",
            ".securityContext.runAsNonRoot",
            ".securityContext.runAsUser",
            ".securityContext.runAsGroup",
            ".securityContext.fsGroup",
            ".securityContext.seccompProfile",
            ".securityContext.seccompProfile.type",
            ".volumes",
            ".volumes[].name",
            ".volumes[].emptyDir",
            ".volumes[].emptyDir.sizeLimit",
            ".volumes[].secret",
            ".volumes[].secret.secretName",
            ".volumes[].secret.items",
            ".volumes[].secret.items[].key",
            ".volumes[].secret.items[].path",
            ".volumes[].secret.defaultMode",
            ".volumes[].secret.optional",
            ".containers[].name",
            ".containers[].image",
            ".containers[].imagePullPolicy",
            ".containers[].command",
            ".containers[].env",
            ".containers[].env[].name",
            ".containers[].env[].value",
            ".containers[].env[].valueFrom",
            ".containers[].env[].valueFrom.fieldRef",
            ".containers[].env[].valueFrom.fieldRef.fieldPath",
            ".containers[].env[].valueFrom.secretKeyRef",
            ".containers[].env[].valueFrom.secretKeyRef.name",
            ".containers[].env[].valueFrom.secretKeyRef.key",
            ".containers[].env[].valueFrom.secretKeyRef.optional",
            ".containers[].envFrom",
            ".containers[].envFrom[].secretRef",
            ".containers[].envFrom[].secretRef.name",
            ".containers[].envFrom[].secretRef.optional",
            ".containers[].resources",
            ".containers[].resources.requests",
            ".containers[].resources.limits",
            ".containers[].volumeMounts",
            ".containers[].volumeMounts[].name",
            ".containers[].volumeMounts[].mountPath",
            ".containers[].volumeMounts[].readOnly",
            ".containers[].securityContext",
            ".containers[].securityContext.allowPrivilegeEscalation",
            ".containers[].securityContext.readOnlyRootFilesystem",
            ".containers[].securityContext.runAsNonRoot",
            ".containers[].securityContext.capabilities",
            ".containers[].securityContext.capabilities.drop",
            ".containers[].securityContext.runAsUser",
            ".containers[].securityContext.runAsGroup",
            ".containers[].workingDir",
            ".containers[].volumeMounts[].subPath",
            ".initContainers",
            ".shareProcessNamespace",
            ".volumes[].configMap",
            ".volumes[].configMap.name",
            ".volumes[].configMap.items",
            ".volumes[].configMap.items[].key",
            ".volumes[].configMap.items[].path",
            ".volumes[].configMap.defaultMode",
            ".volumes[].configMap.optional",
        ]
        .into_iter()
        .collect();
        for path in &all {
            if path.starts_with(&format!("{pod_prefix}.affinity.")) {
                continue; // user-supplied affinity: its content is the administrator's choice
            }
            // Init containers use the same (long served) container fields.
            let path = &path.replace(".initContainers[]", ".containers[]");
            let ok = allowed.contains(path.as_str())
                || path
                    .strip_prefix(pod_prefix)
                    .is_some_and(|rest| pod_allowed.contains(rest));
            assert!(ok, "unexpected field {path}");
        }
    }

    #[test]
    fn label_helpers() {
        let r = rj("job-1", "u");
        assert_eq!(labels(&r).len(), 7);
        assert_eq!(
            timeout_seconds(&r, &test_job_config(&[("JOB_TIMEOUT", "5")])),
            5
        );
        assert_eq!(
            encryption_key_file(&test_job_config(&[])),
            "/var/run/secrets/repobox/encryption-key/key"
        );
        assert_eq!(
            POD_FAILURE_POLICY_REASON,
            crate::model::crd::reasons::POD_FAILURE_POLICY
        );
    }
}
