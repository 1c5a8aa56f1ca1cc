//! Pod volumes as host directories: emptyDir (0777, or group-owned by `fsGroup` with setgid, as
//! the kubelet does), secret, configMap, downwardAPI and projected (service-account token through
//! the TokenRequest API, `kube-root-ca.crt`, namespace) written as files with their modes, and
//! hostPath. Each volume lives in `<pod dir>/volumes/<name>`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, PodSpec, Secret, ServiceAccount, Volume,
};
use kube::api::{Api, PostParams};
use serde_json::json;

use super::env::{PodFacts, config_map_data, field_value, secret_data};

/// A materialised volume.
#[derive(Debug, Clone)]
pub(crate) struct HostVolume {
    pub path: PathBuf,
    /// Secret, configMap, downwardAPI and projected volumes are always mounted read-only.
    pub read_only: bool,
}

/// What writing a pod's volumes needs.
pub(crate) struct VolumeCtx<'a> {
    pub client: &'a kube::Client,
    pub facts: &'a PodFacts,
    pub fs_group: Option<u32>,
}

/// One file of a secret/configMap/downwardAPI/projected volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeFile {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// The mode a volume file gets: the item's mode, else the volume's `defaultMode`, else 0644;
/// with an `fsGroup` the group can read it too (the kubelet's ownership pass adds 0440).
pub(crate) fn file_mode(
    item: Option<i32>,
    default_mode: Option<i32>,
    fs_group: Option<u32>,
) -> u32 {
    let m = u32::try_from(item.or(default_mode).unwrap_or(0o644)).unwrap_or(0o644) & 0o777;
    if fs_group.is_some() { m | 0o440 } else { m }
}

/// A relative item path that stays inside the volume.
pub(crate) fn safe_rel(path: &str) -> Result<&str> {
    let p = Path::new(path);
    if path.is_empty()
        || p.is_absolute()
        || p.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        bail!("invalid volume item path {path:?}");
    }
    Ok(path)
}

/// The files for a set of keys: all of them, or the listed `items`.
pub(crate) fn key_files(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    fs_group: Option<u32>,
    what: &str,
) -> Result<Vec<VolumeFile>> {
    match items {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|i| {
                let value = data
                    .get(&i.key)
                    .with_context(|| format!("{what}: key {} not found", i.key))?;
                Ok(VolumeFile {
                    path: safe_rel(&i.path)?.to_string(),
                    data: value.clone(),
                    mode: file_mode(i.mode, default_mode, fs_group),
                })
            })
            .collect(),
        _ => data
            .iter()
            .map(|(k, v)| {
                Ok(VolumeFile {
                    path: safe_rel(k)?.to_string(),
                    data: v.clone(),
                    mode: file_mode(None, default_mode, fs_group),
                })
            })
            .collect(),
    }
}

fn downward_files(
    items: &[DownwardAPIVolumeFile],
    facts: &PodFacts,
    default_mode: Option<i32>,
    fs_group: Option<u32>,
) -> Result<Vec<VolumeFile>> {
    items
        .iter()
        .map(|i| {
            let value = match &i.field_ref {
                Some(f) => field_value(&f.field_path, facts).map_err(anyhow::Error::msg)?,
                None => bail!("downwardAPI item {}: only fieldRef is supported", i.path),
            };
            Ok(VolumeFile {
                path: safe_rel(&i.path)?.to_string(),
                data: value.into_bytes(),
                mode: file_mode(i.mode, default_mode, fs_group),
            })
        })
        .collect()
}

/// Write the files of one volume into `dir` (which is created), group-owned by `fs_group`.
pub(crate) fn write_files(dir: &Path, files: &[VolumeFile], fs_group: Option<u32>) -> Result<()> {
    create_dir(dir, 0o755, fs_group)?;
    for f in files {
        let file = dir.join(&f.path);
        if let Some(parent) = file.parent()
            && parent != dir
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
            set_ownership(parent, 0o755, fs_group)?;
        }
        std::fs::write(&file, &f.data).with_context(|| format!("write {}", file.display()))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(f.mode))
            .with_context(|| format!("chmod {}", file.display()))?;
        if let Some(g) = fs_group {
            std::os::unix::fs::chown(&file, None, Some(g))
                .with_context(|| format!("chown {}", file.display()))?;
        }
    }
    Ok(())
}

/// Create a directory with `mode`; with an `fsGroup`, group-owned by it and setgid so files
/// created inside inherit the group.
pub(crate) fn create_dir(dir: &Path, mode: u32, fs_group: Option<u32>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    set_ownership(dir, mode, fs_group)
}

fn set_ownership(dir: &Path, mode: u32, fs_group: Option<u32>) -> Result<()> {
    let mode = match fs_group {
        Some(g) => {
            std::os::unix::fs::chown(dir, None, Some(g))
                .with_context(|| format!("chown {}", dir.display()))?;
            mode | 0o2000
        }
        None => mode,
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// Materialise every volume of the pod under `pod_dir/volumes`.
pub(crate) async fn materialise(
    ctx: &VolumeCtx<'_>,
    spec: &PodSpec,
    pod_dir: &Path,
) -> Result<HashMap<String, HostVolume>> {
    let mut out = HashMap::new();
    for vol in spec.volumes.iter().flatten() {
        let dir = pod_dir.join("volumes").join(&vol.name);
        let hv = materialise_one(ctx, vol, &dir)
            .await
            .with_context(|| format!("volume {:?}", vol.name))?;
        out.insert(vol.name.clone(), hv);
    }
    Ok(out)
}

async fn materialise_one(ctx: &VolumeCtx<'_>, vol: &Volume, dir: &Path) -> Result<HostVolume> {
    let ns = &ctx.facts.namespace;
    let fs_group = ctx.fs_group;
    let ro = |path: &Path| HostVolume {
        path: path.to_path_buf(),
        read_only: true,
    };
    if vol.empty_dir.is_some() {
        create_dir(dir, 0o777, fs_group)?;
        return Ok(HostVolume {
            path: dir.to_path_buf(),
            read_only: false,
        });
    }
    if let Some(hp) = &vol.host_path {
        let path = PathBuf::from(&hp.path);
        match hp.type_.as_deref() {
            Some("DirectoryOrCreate") => std::fs::create_dir_all(&path)?,
            Some("FileOrCreate") if !path.exists() => {
                std::fs::write(&path, b"")?;
            }
            _ if !path.exists() => bail!("hostPath {} does not exist", path.display()),
            _ => {}
        }
        return Ok(HostVolume {
            path,
            read_only: false,
        });
    }
    if let Some(sv) = &vol.secret {
        let name = sv.secret_name.clone().unwrap_or_default();
        let files = match get_secret(ctx.client, ns, &name).await? {
            Some(data) => key_files(
                &data,
                sv.items.as_deref(),
                sv.default_mode,
                fs_group,
                &format!("secret {ns}/{name}"),
            )?,
            None if sv.optional == Some(true) => Vec::new(),
            None => bail!("secret \"{name}\" not found"),
        };
        write_files(dir, &files, fs_group)?;
        return Ok(ro(dir));
    }
    if let Some(cv) = &vol.config_map {
        let files = match get_config_map(ctx.client, ns, &cv.name).await? {
            Some(data) => key_files(
                &data,
                cv.items.as_deref(),
                cv.default_mode,
                fs_group,
                &format!("configmap {ns}/{}", cv.name),
            )?,
            None if cv.optional == Some(true) => Vec::new(),
            None => bail!("configmap \"{}\" not found", cv.name),
        };
        write_files(dir, &files, fs_group)?;
        return Ok(ro(dir));
    }
    if let Some(dv) = &vol.downward_api {
        let files = downward_files(
            dv.items.as_deref().unwrap_or_default(),
            ctx.facts,
            dv.default_mode,
            fs_group,
        )?;
        write_files(dir, &files, fs_group)?;
        return Ok(ro(dir));
    }
    if let Some(pv) = &vol.projected {
        let mut files = Vec::new();
        for source in pv.sources.iter().flatten() {
            if let Some(s) = &source.secret {
                match get_secret(ctx.client, ns, &s.name).await? {
                    Some(data) => files.extend(key_files(
                        &data,
                        s.items.as_deref(),
                        pv.default_mode,
                        fs_group,
                        &format!("secret {ns}/{}", s.name),
                    )?),
                    None if s.optional == Some(true) => {}
                    None => bail!("secret \"{}\" not found", s.name),
                }
            }
            if let Some(c) = &source.config_map {
                match get_config_map(ctx.client, ns, &c.name).await? {
                    Some(data) => files.extend(key_files(
                        &data,
                        c.items.as_deref(),
                        pv.default_mode,
                        fs_group,
                        &format!("configmap {ns}/{}", c.name),
                    )?),
                    None if c.optional == Some(true) => {}
                    None => bail!("configmap \"{}\" not found", c.name),
                }
            }
            if let Some(d) = &source.downward_api {
                files.extend(downward_files(
                    d.items.as_deref().unwrap_or_default(),
                    ctx.facts,
                    pv.default_mode,
                    fs_group,
                )?);
            }
            if let Some(t) = &source.service_account_token {
                let token = request_token(
                    ctx,
                    t.audience.as_deref(),
                    t.expiration_seconds.unwrap_or(3600),
                )
                .await?;
                files.push(VolumeFile {
                    path: safe_rel(&t.path)?.to_string(),
                    data: token.into_bytes(),
                    mode: file_mode(None, pv.default_mode, fs_group),
                });
            }
        }
        write_files(dir, &files, fs_group)?;
        return Ok(ro(dir));
    }
    bail!(
        "unsupported volume type (this kubelet handles emptyDir, hostPath, secret, configMap, downwardAPI, projected)"
    )
}

async fn get_secret(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await
        .with_context(|| format!("get secret {ns}/{name}"))?
        .as_ref()
        .map(secret_data))
}

async fn get_config_map(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await
        .with_context(|| format!("get configmap {ns}/{name}"))?
        .as_ref()
        .map(config_map_data))
}

/// A token for the pod's service account, bound to the pod, as the kubelet requests it.
async fn request_token(
    ctx: &VolumeCtx<'_>,
    audience: Option<&str>,
    expiration: i64,
) -> Result<String> {
    let facts = ctx.facts;
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &facts.namespace);
    let audiences: Vec<&str> = audience.filter(|a| !a.is_empty()).into_iter().collect();
    let req: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": audiences, "expirationSeconds": expiration,
                 "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                    "name": facts.name, "uid": facts.uid}}}))
    .context("build the TokenRequest")?;
    let resp = api
        .create_token_request(&facts.service_account, &PostParams::default(), &req)
        .await
        .with_context(|| {
            format!(
                "TokenRequest for service account {}/{}",
                facts.namespace, facts.service_account
            )
        })?;
    resp.status
        .map(|s| s.token)
        .context("TokenRequest answered without a token")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn modes() {
        assert_eq!(file_mode(None, None, None), 0o644);
        assert_eq!(file_mode(None, Some(0o400), None), 0o400);
        assert_eq!(file_mode(Some(0o600), Some(0o400), None), 0o600);
        assert_eq!(file_mode(None, Some(0o400), Some(2000)), 0o440);
        assert_eq!(
            file_mode(None, Some(0o4777), None),
            0o777,
            "no special bits"
        );
    }

    #[test]
    fn item_paths_stay_inside() {
        assert!(safe_rel("a/b").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(safe_rel(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_files_select_items() {
        let data = BTreeMap::from([
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec()),
        ]);
        let all = key_files(&data, None, Some(0o400), None, "s").expect("all");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].mode, 0o400);
        let items: Vec<KeyToPath> =
            serde_json::from_value(json!([{"key": "b", "path": "sub/bee", "mode": 0o600}]))
                .expect("items");
        let some = key_files(&data, Some(&items), None, None, "s").expect("items");
        assert_eq!(
            some,
            [VolumeFile {
                path: "sub/bee".into(),
                data: b"2".to_vec(),
                mode: 0o600
            }]
        );
        let missing: Vec<KeyToPath> =
            serde_json::from_value(json!([{"key": "c", "path": "c"}])).expect("items");
        assert!(key_files(&data, Some(&missing), None, None, "s").is_err());
    }

    #[test]
    fn files_and_dirs_get_modes_and_group() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("v");
        let files = [VolumeFile {
            path: "d/key".into(),
            data: b"x".to_vec(),
            mode: 0o440,
        }];
        // Our own primary group is always a group we may chown to.
        let gid = std::fs::metadata(tmp.path()).expect("meta").gid();
        write_files(&dir, &files, Some(gid)).expect("write");
        let meta = std::fs::metadata(dir.join("d/key")).expect("meta");
        assert_eq!(meta.mode() & 0o7777, 0o440);
        assert_eq!(meta.gid(), gid);
        let dmeta = std::fs::metadata(&dir).expect("meta");
        assert_eq!(dmeta.mode() & 0o7777, 0o2755, "setgid directory");
        create_dir(&tmp.path().join("e"), 0o777, None).expect("emptyDir");
        let emeta = std::fs::metadata(tmp.path().join("e")).expect("meta");
        assert_eq!(emeta.mode() & 0o7777, 0o777);
    }
}
