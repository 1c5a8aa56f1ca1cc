//! core/v1 Events written the way client-go's `EventRecorder` writes them: the name is the
//! involved object's name and the time in hex nanoseconds, the namespace is the object's (or
//! `default` for cluster-scoped objects such as Nodes), `source.component` names the writer, and
//! a repeat of an identical event bumps `count` and `lastTimestamp` instead of adding one.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Event, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

/// The reference an event's `involvedObject` carries.
pub(crate) fn reference<K>(obj: &K) -> ObjectReference
where
    K: Resource<DynamicType = ()>,
{
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: obj.meta().name.clone(),
        namespace: obj.meta().namespace.clone(),
        uid: obj.meta().uid.clone(),
        resource_version: obj.meta().resource_version.clone(),
        field_path: None,
    }
}

/// Where an event lives and what it is called, as the recorder names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventName {
    pub namespace: String,
    pub name: String,
}

/// The name a new event about `object` gets at `now` (`<object>.<hex unix nanos>`).
pub(crate) fn event_name(object: &ObjectReference, now: jiff::Timestamp) -> EventName {
    let namespace = object
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let nanos = u128::try_from(now.as_nanosecond()).unwrap_or(0);
    EventName {
        namespace,
        name: format!("{}.{nanos:x}", object.name.as_deref().unwrap_or_default()),
    }
}

/// What one event says.
#[derive(Debug, Clone)]
pub(crate) struct EventSpec<'a> {
    pub object: &'a ObjectReference,
    /// `Normal` or `Warning`.
    pub type_: &'a str,
    pub reason: &'a str,
    pub message: &'a str,
    pub component: &'a str,
    /// `source.host` (the kubelet sets its node name; the cluster autoscaler none).
    pub host: Option<&'a str>,
}

/// Create a new event named `at`.
pub(crate) async fn create(client: &Client, at: &EventName, spec: &EventSpec<'_>) -> Result<()> {
    let now = Time(jiff::Timestamp::now());
    let mut source = json!({"component": spec.component});
    if let Some(h) = spec.host {
        source["host"] = json!(h);
    }
    let event: Event = serde_json::from_value(json!({
        "metadata": {"name": at.name, "namespace": at.namespace},
        "involvedObject": spec.object,
        "reason": spec.reason,
        "message": spec.message,
        "type": spec.type_,
        "source": source,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }))
    .context("build Event")?;
    let api: Api<Event> = Api::namespaced(client.clone(), &at.namespace);
    api.create(&PostParams::default(), &event)
        .await
        .with_context(|| format!("create Event {}/{}", at.namespace, at.name))?;
    Ok(())
}

/// A repeat of the event named `at`: `count` and `lastTimestamp`, as the recorder patches them.
/// Returns false when that event is gone (the caller creates a new one).
pub(crate) async fn bump(client: &Client, at: &EventName, count: i32) -> Result<bool> {
    let api: Api<Event> = Api::namespaced(client.clone(), &at.namespace);
    let patch = json!({"count": count, "lastTimestamp": Time(jiff::Timestamp::now())});
    match api
        .patch(&at.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e).with_context(|| format!("patch Event {}/{}", at.namespace, at.name)),
    }
}

/// Events about one object with a given reason, oldest first (for tests and the operator).
pub async fn list_for(
    client: &Client,
    namespace: &str,
    object_name: &str,
    reason: &str,
) -> Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let lp = kube::api::ListParams::default().fields(&format!(
        "involvedObject.name={object_name},reason={reason}"
    ));
    let mut events = api.list(&lp).await.context("list Events")?.items;
    events.sort_by_key(|e| (e.first_timestamp.clone().map(|t| t.0), e.name_any()));
    Ok(events)
}
