//! The runner-pod settings, validated into the typed [`JobConfig`] the Job builder takes: every
//! malformed value is an [`crate::Error::InvalidConfig`] naming its variable, at start-up rather
//! than on the first Job the API server rejects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{Config, invalid, non_empty, secret_ref};
use crate::decide::job_config::{AgentConfig, ConfigMapKeyRef, JobConfig, RunnerResources};
use crate::error::Result;
use crate::model::names::{is_dns1123_subdomain, is_qualified_name, parse_quantity};

/// The annotations that keep autoscalers from scaling in a node under a running job.
pub const DO_NOT_DISRUPT: [(&str, &str); 2] = [
    ("cluster-autoscaler.kubernetes.io/safe-to-evict", "false"),
    ("karpenter.sh/do-not-disrupt", "true"),
];

impl Config {
    /// The typed runner Job settings, or the first malformed one.
    pub fn job_config(&self) -> Result<JobConfig> {
        if self.runner_pod.runner_image.trim().is_empty()
            || self
                .runner_pod
                .runner_image
                .chars()
                .any(char::is_whitespace)
        {
            return Err(invalid(
                "RUNNER_IMAGE",
                "must be a non-empty image reference without spaces",
            ));
        }
        let names = |setting: &'static str, list: &[String]| -> Result<Vec<String>> {
            list.iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if is_dns1123_subdomain(s) {
                        Ok(s.to_owned())
                    } else {
                        Err(invalid(
                            setting,
                            format!("{s:?} is not a valid Secret name"),
                        ))
                    }
                })
                .collect()
        };
        let image_pull_secrets = names(
            "RUNNER_IMAGE_PULL_SECRETS",
            &self.runner_pod.runner_image_pull_secrets,
        )?;
        let env_from_secrets = names(
            "RUNNER_ENV_FROM_SECRETS",
            &self.agent.runner_env_from_secrets,
        )?;
        if !is_dns1123_subdomain(&self.runner_pod.runner_service_account) {
            return Err(invalid(
                "RUNNER_SERVICE_ACCOUNT",
                format!(
                    "{:?} is not a valid ServiceAccount name",
                    self.runner_pod.runner_service_account
                ),
            ));
        }

        let resources = resources(
            [
                "RUNNER_CPU_REQUEST",
                "RUNNER_CPU_LIMIT",
                "RUNNER_MEMORY_REQUEST",
                "RUNNER_MEMORY_LIMIT",
                "RUNNER_EPHEMERAL_STORAGE_REQUEST",
                "RUNNER_EPHEMERAL_STORAGE_LIMIT",
            ],
            [
                &self.runner_pod.runner_cpu_request,
                &self.runner_pod.runner_cpu_limit,
                &self.runner_pod.runner_memory_request,
                &self.runner_pod.runner_memory_limit,
                &self.runner_pod.runner_ephemeral_storage_request,
                &self.runner_pod.runner_ephemeral_storage_limit,
            ],
        )?;
        let agent = match non_empty(&self.agent.agent_command) {
            None => None,
            Some(command) => Some(self.agent_config(command, env_from_secrets)?),
        };
        let git_ca = match non_empty(&self.runner_env.git_ca_configmap) {
            None => None,
            Some(name) if !is_dns1123_subdomain(name) => {
                return Err(invalid(
                    "GIT_CA_CONFIGMAP",
                    format!("{name:?} is not a valid ConfigMap name"),
                ));
            }
            Some(_) if self.runner_env.git_ca_key.trim().is_empty() => {
                return Err(invalid("GIT_CA_KEY", "must not be empty"));
            }
            Some(name) => Some(ConfigMapKeyRef {
                name: name.to_owned(),
                key: self.runner_env.git_ca_key.trim().to_owned(),
            }),
        };

        let node_selector: Option<BTreeMap<String, String>> = json_setting(
            "RUNNER_NODE_SELECTOR",
            &self.runner_pod.runner_node_selector,
        )?;
        let tolerations: Option<Vec<Toleration>> =
            json_setting("RUNNER_TOLERATIONS", &self.runner_pod.runner_tolerations)?;
        let affinity: Option<Affinity> =
            json_setting("RUNNER_AFFINITY", &self.runner_pod.runner_affinity)?;

        let mut pod_annotations: BTreeMap<String, String> = json_setting(
            "RUNNER_POD_ANNOTATIONS",
            &self.runner_pod.runner_pod_annotations,
        )?
        .unwrap_or_default();
        if let Some(bad) = pod_annotations.keys().find(|k| !is_qualified_name(k)) {
            return Err(invalid(
                "RUNNER_POD_ANNOTATIONS",
                format!("{bad:?} is not a valid annotation key"),
            ));
        }
        if self.runner_pod.runner_do_not_disrupt {
            for (k, v) in DO_NOT_DISRUPT {
                pod_annotations.insert(k.to_owned(), v.to_owned());
            }
        }

        let priority_class_name =
            non_empty(&self.runner_pod.runner_priority_class).map(str::to_owned);
        if let Some(pc) = &priority_class_name
            && !is_dns1123_subdomain(pc)
        {
            return Err(invalid(
                "RUNNER_PRIORITY_CLASS",
                format!("{pc:?} is not a valid PriorityClass name"),
            ));
        }

        let redis_secret = secret_ref(
            ("REDIS_SECRET_NAME", &self.runner_pod.redis_secret_name),
            ("REDIS_SECRET_KEY", &self.runner_pod.redis_secret_key),
        )?;
        let encryption_key_secret = secret_ref(
            (
                "ENCRYPTION_KEY_SECRET_NAME",
                &self.runner_pod.encryption_key_secret_name,
            ),
            (
                "ENCRYPTION_KEY_SECRET_KEY",
                &self.runner_pod.encryption_key_secret_key,
            ),
        )?;

        let temp_dir = self.runner_env.temp_dir.trim_end_matches('/').to_owned();
        if !temp_dir.starts_with('/')
            || temp_dir.split('/').any(|c| c == ".." || c == ".")
            || temp_dir.contains("//")
            || [
                crate::model::pod_layout::TMP_DIR,
                crate::model::pod_layout::ENCRYPTION_KEY_DIR,
                crate::model::pod_layout::PRIVATE_DIR,
                crate::model::pod_layout::TOOLS_DIR,
                crate::model::pod_layout::GIT_CA_DIR,
            ]
            .contains(&temp_dir.as_str())
        {
            return Err(invalid(
                "TEMP_DIR",
                format!(
                    "{:?} must be an absolute, normalised path other than /, /tmp and the pod's other mounts",
                    self.runner_env.temp_dir
                ),
            ));
        }

        Ok(JobConfig {
            image: self.runner_pod.runner_image.trim().to_owned(),
            image_pull_policy: self.runner_pod.runner_image_pull_policy.clone(),
            image_pull_secrets,
            service_account: self.runner_pod.runner_service_account.clone(),
            resources,
            agent,
            work_size_limit: quantity(
                "RUNNER_EPHEMERAL_STORAGE",
                &self.runner_pod.runner_ephemeral_storage,
            )?,
            tmp_size_limit: quantity(
                "RUNNER_TMP_SIZE_LIMIT",
                &self.runner_pod.runner_tmp_size_limit,
            )?,
            node_selector,
            tolerations,
            affinity,
            priority_class_name,
            pod_annotations,
            default_timeout_seconds: i64::from(self.quotas.job_timeout),
            ttl_seconds_after_finished: self.runner_pod.job_ttl_seconds,
            termination_grace_period_seconds: self.runner_pod.runner_termination_grace_seconds,
            redis_secret,
            encryption_key_secret,
            work_dir: temp_dir,
            cleanup_after_job: self.runner_env.cleanup_after_job,
            git_author_name: self.runner_env.git_author_name.clone(),
            git_author_email: self.runner_env.git_author_email.clone(),
            git_clone_depth: self.runner_env.git_clone_depth,
            allow_insecure_http: self.runner_env.allow_insecure_http,
            open_pull_requests: self.runner_env.open_pull_requests,
            git_ca,
            redis_ca: match non_empty(&self.redis.redis_ca_secret_name) {
                None => None,
                Some(name) => Some(secret_ref(
                    ("REDIS_CA_SECRET_NAME", name),
                    ("REDIS_CA_SECRET_KEY", &self.redis.redis_ca_secret_key),
                )?),
            },
        })
    }

    /// The agent container's settings (`AGENT_*`, `RUNNER_ENV_FROM_SECRETS`).
    fn agent_config(&self, command: &str, env_from_secrets: Vec<String>) -> Result<AgentConfig> {
        let image = match non_empty(&self.agent.agent_image) {
            None => self.runner_pod.runner_image.trim().to_owned(),
            Some(i) if i.chars().any(char::is_whitespace) => {
                return Err(invalid(
                    "AGENT_IMAGE",
                    "must be an image reference without spaces",
                ));
            }
            Some(i) => i.to_owned(),
        };
        if self.agent.agent_uid == crate::model::pod_layout::RUNNER_UID {
            return Err(invalid(
                "AGENT_UID",
                format!(
                    "must differ from the runner's uid {}: the agent must not be able to read the runner's files",
                    crate::model::pod_layout::RUNNER_UID
                ),
            ));
        }
        let extra_env: BTreeMap<String, String> =
            json_setting("AGENT_EXTRA_ENV", &self.agent.agent_extra_env)?.unwrap_or_default();
        for name in extra_env.keys() {
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(invalid(
                    "AGENT_EXTRA_ENV",
                    format!("{name:?} is not a valid environment variable name"),
                ));
            }
            if crate::model::pod_layout::AGENT_RESERVED_ENV.contains(&name.as_str()) {
                return Err(invalid(
                    "AGENT_EXTRA_ENV",
                    format!("{name} is set by the operator"),
                ));
            }
        }
        Ok(AgentConfig {
            command: command.to_owned(),
            image,
            uid: self.agent.agent_uid,
            resources: resources(
                [
                    "AGENT_CPU_REQUEST",
                    "AGENT_CPU_LIMIT",
                    "AGENT_MEMORY_REQUEST",
                    "AGENT_MEMORY_LIMIT",
                    "AGENT_EPHEMERAL_STORAGE_REQUEST",
                    "AGENT_EPHEMERAL_STORAGE_LIMIT",
                ],
                [
                    &self.agent.agent_cpu_request,
                    &self.agent.agent_cpu_limit,
                    &self.agent.agent_memory_request,
                    &self.agent.agent_memory_limit,
                    &self.agent.agent_ephemeral_storage_request,
                    &self.agent.agent_ephemeral_storage_limit,
                ],
            )?,
            extra_env,
            env_from_secrets,
        })
    }
}

/// Requests and limits from four settings (cpu request, cpu limit, memory request, memory
/// limit), each request within its limit.
fn resources(settings: [&'static str; 6], values: [&str; 6]) -> Result<RunnerResources> {
    let r = RunnerResources {
        cpu_request: quantity(settings[0], values[0])?,
        cpu_limit: quantity(settings[1], values[1])?,
        memory_request: quantity(settings[2], values[2])?,
        memory_limit: quantity(settings[3], values[3])?,
        ephemeral_storage_request: quantity(settings[4], values[4])?,
        ephemeral_storage_limit: quantity(settings[5], values[5])?,
    };
    request_within_limit(settings[0], &r.cpu_request, settings[1], &r.cpu_limit)?;
    request_within_limit(settings[2], &r.memory_request, settings[3], &r.memory_limit)?;
    request_within_limit(
        settings[4],
        &r.ephemeral_storage_request,
        settings[5],
        &r.ephemeral_storage_limit,
    )?;
    Ok(r)
}

/// Parses a JSON setting into `T`; unset or blank gives `None`.
fn json_setting<T: serde::de::DeserializeOwned>(
    setting: &'static str,
    value: &Option<String>,
) -> Result<Option<T>> {
    match non_empty(value) {
        None => Ok(None),
        Some(s) => serde_json::from_str(s)
            .map(Some)
            .map_err(|e| invalid(setting, format!("malformed JSON: {e}"))),
    }
}

/// A Kubernetes quantity setting; empty means unset. Negative quantities are rejected.
fn quantity(setting: &'static str, value: &str) -> Result<Option<Quantity>> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    match parse_quantity(value) {
        Some(v) if v >= 0.0 => Ok(Some(Quantity(value.to_owned()))),
        Some(_) => Err(invalid(setting, format!("{value:?} must not be negative"))),
        None => Err(invalid(
            setting,
            format!("{value:?} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 2Gi)"),
        )),
    }
}

fn request_within_limit(
    request_setting: &'static str,
    request: &Option<Quantity>,
    limit_setting: &'static str,
    limit: &Option<Quantity>,
) -> Result<()> {
    if let (Some(req), Some(lim)) = (request, limit)
        && let (Some(r), Some(l)) = (parse_quantity(&req.0), parse_quantity(&lim.0))
        && r > l
    {
        return Err(invalid(
            request_setting,
            format!("{} exceeds {limit_setting} ({})", req.0, lim.0),
        ));
    }
    Ok(())
}
