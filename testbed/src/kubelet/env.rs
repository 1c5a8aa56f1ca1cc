//! A container's environment as the kubelet builds it: service variables, `envFrom`, then `env`
//! (values, Secret/ConfigMap keys, field refs), with `$(VAR)` expansion. The lookups of Secrets and
//! ConfigMaps happen first ([`Sources::fetch`]); resolution itself is pure.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret};
use kube::api::Api;

/// Facts about the pod that `fieldRef`s and downward API files read.
#[derive(Debug, Clone, Default)]
pub(crate) struct PodFacts {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node_name: String,
    pub service_account: String,
    pub pod_ip: String,
    pub host_ip: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Secrets and ConfigMaps by name; `None`: it does not exist.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sources {
    pub secrets: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
    pub config_maps: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
}

impl Sources {
    /// Read every Secret and ConfigMap the container's env refers to.
    pub(crate) async fn fetch(
        client: &kube::Client,
        namespace: &str,
        containers: &[&Container],
    ) -> Result<Self> {
        let mut secret_names = BTreeSet::new();
        let mut cm_names = BTreeSet::new();
        for c in containers {
            let (s, m) = referenced(c);
            secret_names.extend(s);
            cm_names.extend(m);
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let mut out = Sources::default();
        for name in secret_names {
            let s = secrets
                .get_opt(&name)
                .await
                .with_context(|| format!("get secret {namespace}/{name}"))?;
            out.secrets.insert(name, s.as_ref().map(secret_data));
        }
        for name in cm_names {
            let c = cms
                .get_opt(&name)
                .await
                .with_context(|| format!("get configmap {namespace}/{name}"))?;
            out.config_maps
                .insert(name, c.as_ref().map(config_map_data));
        }
        Ok(out)
    }
}

/// A Secret's keys, `stringData` included (the emulator keeps it as written).
pub(crate) fn secret_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (k, v) in secret.data.clone().unwrap_or_default() {
        out.insert(k, v.0);
    }
    for (k, v) in secret.string_data.clone().unwrap_or_default() {
        out.insert(k, v.into_bytes());
    }
    out
}

/// A ConfigMap's keys, `binaryData` included.
pub(crate) fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (k, v) in cm.binary_data.clone().unwrap_or_default() {
        out.insert(k, v.0);
    }
    for (k, v) in cm.data.clone().unwrap_or_default() {
        out.insert(k, v.into_bytes());
    }
    out
}

/// The Secret and ConfigMap names a container's env refers to.
pub(crate) fn referenced(c: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut secrets, mut cms) = (BTreeSet::new(), BTreeSet::new());
    for from in c.env_from.iter().flatten() {
        if let Some(s) = &from.secret_ref {
            secrets.insert(s.name.clone());
        }
        if let Some(m) = &from.config_map_ref {
            cms.insert(m.name.clone());
        }
    }
    for var in c.env.iter().flatten() {
        if let Some(from) = &var.value_from {
            if let Some(s) = &from.secret_key_ref {
                secrets.insert(s.name.clone());
            }
            if let Some(m) = &from.config_map_key_ref {
                cms.insert(m.name.clone());
            }
        }
    }
    (secrets, cms)
}

/// The value of a `fieldRef` (env or downward API).
pub(crate) fn field_value(path: &str, facts: &PodFacts) -> Result<String, String> {
    let quoted = |rest: &str| -> Option<String> {
        rest.strip_prefix("['")
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => facts.name.clone(),
        "metadata.namespace" => facts.namespace.clone(),
        "metadata.uid" => facts.uid.clone(),
        "spec.nodeName" => facts.node_name.clone(),
        "spec.serviceAccountName" => facts.service_account.clone(),
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
        "metadata.labels" => kv_lines(&facts.labels),
        "metadata.annotations" => kv_lines(&facts.annotations),
        other => {
            if let Some(k) = other.strip_prefix("metadata.labels").and_then(quoted) {
                facts.labels.get(&k).cloned().unwrap_or_default()
            } else if let Some(k) = other.strip_prefix("metadata.annotations").and_then(quoted) {
                facts.annotations.get(&k).cloned().unwrap_or_default()
            } else {
                return Err(format!("unsupported fieldRef {other}"));
            }
        }
    })
}

/// Labels/annotations as the downward API writes them: `key="value"` lines.
fn kv_lines(map: &BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={v:?}\n"))
        .collect::<String>()
}

/// Expand `$(VAR)` references the way Kubernetes does: a defined variable is replaced, an
/// undefined one stays as written, `$$` is an escaped `$`.
pub(crate) fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Why an env could not be built: the kubelet shows `CreateContainerConfigError` and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError(pub String);

/// The container's environment: `base` first (service variables and the kubelet's own), then
/// `envFrom`, then `env` (later names win; `env` values are expanded against what came before).
pub(crate) fn resolve_env(
    base: Vec<(String, String)>,
    c: &Container,
    facts: &PodFacts,
    sources: &Sources,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(slot) = env.iter_mut().find(|(name, _)| *name == k) {
            slot.1 = v;
        } else {
            env.push((k, v));
        }
    };
    for (k, v) in base {
        set(&mut env, k, v);
    }
    let lossy = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(sr) = &from.secret_ref {
            match sources.secrets.get(&sr.name).cloned().flatten() {
                Some(data) => {
                    for (k, v) in data {
                        set(&mut env, format!("{prefix}{k}"), lossy(&v));
                    }
                }
                None if sr.optional == Some(true) => {}
                None => return Err(ConfigError(format!("secret \"{}\" not found", sr.name))),
            }
        }
        if let Some(cr) = &from.config_map_ref {
            match sources.config_maps.get(&cr.name).cloned().flatten() {
                Some(data) => {
                    for (k, v) in data {
                        set(&mut env, format!("{prefix}{k}"), lossy(&v));
                    }
                }
                None if cr.optional == Some(true) => {}
                None => {
                    return Err(ConfigError(format!("configmap \"{}\" not found", cr.name)));
                }
            }
        }
    }
    for var in c.env.iter().flatten() {
        let value = if let Some(v) = &var.value {
            let known = env.clone();
            expand(v, |name| {
                known
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            })
        } else if let Some(from) = &var.value_from {
            if let Some(sk) = &from.secret_key_ref {
                let data = sources.secrets.get(&sk.name).cloned().flatten();
                match data.as_ref().and_then(|d| d.get(&sk.key)) {
                    Some(v) => lossy(v),
                    None if sk.optional == Some(true) => continue,
                    None if data.is_none() => {
                        return Err(ConfigError(format!("secret \"{}\" not found", sk.name)));
                    }
                    None => {
                        return Err(ConfigError(format!(
                            "couldn't find key {} in Secret {}/{}",
                            sk.key, facts.namespace, sk.name
                        )));
                    }
                }
            } else if let Some(ck) = &from.config_map_key_ref {
                let data = sources.config_maps.get(&ck.name).cloned().flatten();
                match data.as_ref().and_then(|d| d.get(&ck.key)) {
                    Some(v) => lossy(v),
                    None if ck.optional == Some(true) => continue,
                    None if data.is_none() => {
                        return Err(ConfigError(format!("configmap \"{}\" not found", ck.name)));
                    }
                    None => {
                        return Err(ConfigError(format!(
                            "couldn't find key {} in ConfigMap {}/{}",
                            ck.key, facts.namespace, ck.name
                        )));
                    }
                }
            } else if let Some(f) = &from.field_ref {
                field_value(&f.field_path, facts).map_err(ConfigError)?
            } else {
                return Err(ConfigError(format!(
                    "unsupported valueFrom for env {}",
                    var.name
                )));
            }
        } else {
            String::new()
        };
        set(&mut env, var.name.clone(), value);
    }
    Ok(env)
}

/// `command` + `args` with `$(VAR)` expanded against the container's environment.
pub(crate) fn expand_argv(c: &Container, env: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let command = c
        .command
        .iter()
        .flatten()
        .map(|s| expand(s, lookup))
        .collect();
    let args = c.args.iter().flatten().map(|s| expand(s, lookup)).collect();
    (command, args)
}

/// `KUBERNETES_SERVICE_HOST`/`PORT` (and the docker-link style variables the kubelet also sets)
/// for an API server URL such as `https://127.0.0.1:6443`.
pub(crate) fn service_env(api_server: &str) -> Option<Vec<(String, String)>> {
    let (scheme, rest) = api_server.split_once("://")?;
    let authority = rest.split('/').next()?;
    let default_port = if scheme == "https" { "443" } else { "80" };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6.split_once(']')?;
        (
            h.to_string(),
            tail.strip_prefix(':').unwrap_or(default_port).to_string(),
        )
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.to_string()),
            None => (authority.to_string(), default_port.to_string()),
        }
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    let addr = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    Some(vec![
        ("KUBERNETES_SERVICE_HOST".into(), host.clone()),
        ("KUBERNETES_SERVICE_PORT".into(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.clone()),
        ("KUBERNETES_PORT".into(), format!("tcp://{addr}:{port}")),
        (
            format!("KUBERNETES_PORT_{port}_TCP"),
            format!("tcp://{addr}:{port}"),
        ),
        (format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
        (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.clone()),
        (format!("KUBERNETES_PORT_{port}_TCP_ADDR"), host),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).expect("container")
    }

    fn facts() -> PodFacts {
        PodFacts {
            name: "p-1".into(),
            namespace: "ns".into(),
            uid: "u-1".into(),
            node_name: "node-a".into(),
            service_account: "default".into(),
            pod_ip: "127.0.0.1".into(),
            host_ip: "127.0.0.1".into(),
            labels: BTreeMap::from([("app".into(), "x".into())]),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn expansion_matches_kubernetes() {
        let lookup = |n: &str| (n == "A").then(|| "1".to_string());
        assert_eq!(expand("x$(A)y", lookup), "x1y");
        assert_eq!(expand("$(B)", lookup), "$(B)");
        assert_eq!(expand("$$(A)", lookup), "$(A)");
        assert_eq!(expand("a$b$", lookup), "a$b$");
        assert_eq!(expand("$(A", lookup), "$(A");
        assert_eq!(expand("$(A)$(A)", lookup), "11");
    }

    #[test]
    fn env_order_sources_and_refs() {
        let c = container(json!({"name": "c",
            "envFrom": [{"secretRef": {"name": "s"}, "prefix": "S_"}, {"configMapRef": {"name": "m"}}],
            "env": [
                {"name": "PLAIN", "value": "v-$(KEY)"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
                {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k", "optional": true}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "BASE", "value": "override"}]}));
        let mut sources = Sources::default();
        sources.secrets.insert(
            "s".into(),
            Some(BTreeMap::from([("token".into(), b"t0k".to_vec())])),
        );
        sources.secrets.insert("gone".into(), None);
        sources.config_maps.insert(
            "m".into(),
            Some(BTreeMap::from([("KEY".into(), b"from-cm".to_vec())])),
        );
        let env =
            resolve_env(vec![("BASE".into(), "b".into())], &c, &facts(), &sources).expect("env");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("S_token"), Some("t0k"));
        assert_eq!(get("KEY"), Some("from-cm"));
        assert_eq!(get("PLAIN"), Some("v-from-cm"));
        assert_eq!(get("TOKEN"), Some("t0k"));
        assert_eq!(get("OPT"), None);
        assert_eq!(get("NODE"), Some("node-a"));
        assert_eq!(get("APP"), Some("x"));
        assert_eq!(get("BASE"), Some("override"));
        assert_eq!(
            env[0].0, "BASE",
            "a later definition keeps the first position"
        );
    }

    #[test]
    fn missing_refs_are_config_errors() {
        let c = container(json!({"name": "c", "env": [
            {"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "nope"}}}]}));
        let mut sources = Sources::default();
        sources.secrets.insert("s".into(), Some(BTreeMap::new()));
        let err = resolve_env(vec![], &c, &facts(), &sources).expect_err("missing key");
        assert_eq!(err.0, "couldn't find key nope in Secret ns/s");
        sources.secrets.insert("s".into(), None);
        let err = resolve_env(vec![], &c, &facts(), &sources).expect_err("missing secret");
        assert_eq!(err.0, "secret \"s\" not found");
        let c = container(json!({"name": "c", "env": [
            {"name": "T", "valueFrom": {"fieldRef": {"fieldPath": "spec.nope"}}}]}));
        assert!(resolve_env(vec![], &c, &facts(), &sources).is_err());
    }

    #[test]
    fn argv_is_expanded() {
        let c = container(
            json!({"name": "c", "command": ["run", "$(DIR)"], "args": ["--x=$(N)", "$$(N)"]}),
        );
        let env = vec![("DIR".into(), "/w".into()), ("N".into(), "3".into())];
        let (cmd, args) = expand_argv(&c, &env);
        assert_eq!(cmd, ["run", "/w"]);
        assert_eq!(args, ["--x=3", "$(N)"]);
    }

    #[test]
    fn service_env_from_urls() {
        let env = service_env("https://127.0.0.1:6443").expect("env");
        assert_eq!(
            env[0],
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into())
        );
        assert_eq!(env[1], ("KUBERNETES_SERVICE_PORT".into(), "6443".into()));
        assert!(env.contains(&("KUBERNETES_PORT".into(), "tcp://127.0.0.1:6443".into())));
        let env = service_env("https://[::1]/").expect("v6");
        assert_eq!(env[0].1, "::1");
        assert_eq!(env[1].1, "443");
        assert!(service_env("not a url").is_none());
    }
}
