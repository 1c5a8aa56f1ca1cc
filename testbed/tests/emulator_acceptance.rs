//! Acceptance tests for the Kubernetes API emulator: kube-rs drives it exactly as an operator
//! would (CRD install, typed CRUD, watchers, a Controller, SSA, status subresource, GC,
//! finalizers, optimistic concurrency, fault injection, Leases and Events).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, CustomResource, CustomResourceExt, Resource, ResourceExt};
use repobox_testbed::emulator::Emulator;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_secs(15);
const NS: &str = "default";

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[kube(
    group = "test.repobox.dev",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus",
    shortname = "wg"
)]
pub struct WidgetSpec {
    size: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, Default, PartialEq)]
pub struct WidgetStatus {
    phase: Option<String>,
}

async fn setup() -> (Emulator, Client) {
    let emulator = Emulator::start().await.expect("start the emulator");
    let client = emulator.client().expect("client");
    (emulator, client)
}

async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Widget::crd())
        .await
        .expect("create the CRD");
    let established = await_condition(
        crds,
        "widgets.test.repobox.dev",
        conditions::is_crd_established(),
    );
    tokio::time::timeout(TIMEOUT, established)
        .await
        .expect("CRD established in time")
        .expect("await_condition");
}

fn widget(name: &str, size: i32) -> Widget {
    Widget::new(name, WidgetSpec { size })
}

fn owner_ref<K: Resource<DynamicType = ()>>(obj: &K) -> OwnerReference {
    obj.controller_owner_ref(&()).expect("owner ref")
}

fn api_code<T: std::fmt::Debug>(result: kube::Result<T>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test]
async fn crd_registration_crud_and_server_metadata() {
    let (_emu, client) = setup().await;
    install_crd(&client).await;

    // Discovery knows the new kind (kubectl and dynamic clients depend on it).
    let gvk = kube::api::GroupVersionKind::gvk("test.repobox.dev", "v1", "Widget");
    let (ar, caps) = kube::discovery::pinned_kind(&client, &gvk)
        .await
        .expect("discover Widget");
    assert_eq!(ar.plural, "widgets");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);

    let widgets: Api<Widget> = Api::namespaced(client.clone(), NS);
    let a = widgets
        .create(&PostParams::default(), &widget("a", 1))
        .await
        .expect("create a");
    let b = widgets
        .create(&PostParams::default(), &widget("b", 2))
        .await
        .expect("create b");
    assert!(a.uid().is_some_and(|u| !u.is_empty()));
    assert_ne!(a.uid(), b.uid());
    let rv_a: u64 = a.resource_version().expect("rv").parse().expect("numeric");
    let rv_b: u64 = b.resource_version().expect("rv").parse().expect("numeric");
    assert!(rv_b > rv_a, "one global counter: {rv_a} then {rv_b}");
    assert_eq!(a.meta().generation, Some(1));
    assert!(a.meta().creation_timestamp.is_some());
    assert!(
        a.status.is_none(),
        "status is dropped on create with a status subresource"
    );

    let got = widgets.get("a").await.expect("get a");
    assert_eq!(got.spec.size, 1);
    let list = widgets.list(&ListParams::default()).await.expect("list");
    assert_eq!(list.items.len(), 2);
    let list_rv: u64 = list
        .metadata
        .resource_version
        .expect("list rv")
        .parse()
        .expect("numeric list rv");
    assert!(list_rv >= rv_b);

    // Pagination with limit/continue.
    let page = widgets
        .list(&ListParams::default().limit(1))
        .await
        .expect("page 1");
    assert_eq!(page.items.len(), 1);
    let token = page.metadata.continue_.clone().expect("continue token");
    let page2 = widgets
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(page2.items.len(), 1);
    assert_ne!(page.items[0].name_any(), page2.items[0].name_any());
    assert!(page2.metadata.continue_.is_none());

    // Creating an existing name is 409 AlreadyExists.
    let (code, reason) = api_code(
        widgets
            .create(&PostParams::default(), &widget("a", 9))
            .await,
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
    // A missing object is 404 NotFound.
    let (code, reason) = api_code(widgets.get("nope").await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
}

#[tokio::test]
async fn watcher_sees_applied_deleted_and_survives_relist() {
    let (emu, client) = setup().await;
    install_crd(&client).await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), NS);
    widgets
        .create(&PostParams::default(), &widget("before", 1))
        .await
        .expect("create before");

    let (tx, mut rx) = mpsc::unbounded_channel();
    let stream = watcher(widgets.clone(), watcher::Config::default());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Ok(event) = event
                && tx.send(event).is_err()
            {
                break;
            }
        }
    });

    let mut next_matching = async |pred: &dyn Fn(&Event<Widget>) -> bool| loop {
        let event = within("watch event", rx.recv()).await.expect("stream open");
        if pred(&event) {
            return event;
        }
    };
    next_matching(&|e| matches!(e, Event::InitApply(w) if w.name_any() == "before")).await;
    next_matching(&|e| matches!(e, Event::InitDone)).await;

    widgets
        .create(&PostParams::default(), &widget("live", 1))
        .await
        .expect("create live");
    next_matching(&|e| matches!(e, Event::Apply(w) if w.name_any() == "live")).await;
    widgets
        .delete("live", &DeleteParams::default())
        .await
        .expect("delete live");
    next_matching(&|e| matches!(e, Event::Delete(w) if w.name_any() == "live")).await;

    // Expire every watch: the watcher reconnects, gets 410 Gone, relists and carries on.
    emu.expire_watches().await.expect("expire watches");
    next_matching(&|e| matches!(e, Event::Init)).await;
    next_matching(&|e| matches!(e, Event::InitDone)).await;
    widgets
        .create(&PostParams::default(), &widget("after", 1))
        .await
        .expect("create after");
    next_matching(&|e| matches!(e, Event::Apply(w) if w.name_any() == "after")).await;
    task.abort();

    let log = emu.requests().await.expect("request log");
    assert!(
        log.iter()
            .any(|r| r.method == "GET" && r.query.contains("watch=true"))
    );
}

struct Ctx {
    client: Client,
    seen: mpsc::UnboundedSender<String>,
}

#[derive(Debug)]
enum ReconcileError {
    Kube(kube::Error),
}

impl std::fmt::Display for ReconcileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReconcileError::Kube(e) => write!(f, "{e}"),
        }
    }
}
impl std::error::Error for ReconcileError {}

async fn reconcile(w: Arc<Widget>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let cms: Api<ConfigMap> =
        Api::namespaced(ctx.client.clone(), &w.namespace().unwrap_or_default());
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("{}-cm", w.name_any()), "ownerReferences": [owner_ref(w.as_ref())]},
        "data": {"size": w.spec.size.to_string()},
    });
    cms.patch(
        &format!("{}-cm", w.name_any()),
        &PatchParams::apply("widget-controller").force(),
        &Patch::Apply(cm),
    )
    .await
    .map_err(ReconcileError::Kube)?;
    let _ = ctx.seen.send(w.name_any());
    Ok(Action::await_change())
}

fn error_policy(_w: Arc<Widget>, _e: &ReconcileError, _ctx: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_millis(200))
}

#[tokio::test]
async fn controller_reconciles_each_object_and_owned_changes() {
    let (_emu, client) = setup().await;
    install_crd(&client).await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), NS);
    for name in ["w1", "w2", "w3"] {
        widgets
            .create(&PostParams::default(), &widget(name, 3))
            .await
            .expect("create widget");
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        seen: tx,
    });
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let controller = Controller::new(widgets.clone(), watcher::Config::default())
        .owns(cms.clone(), watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {});
    let task = tokio::spawn(controller);

    let mut counts: HashMap<String, usize> = HashMap::new();
    while counts.len() < 3 {
        let name = within("first reconciles", rx.recv()).await.expect("open");
        *counts.entry(name).or_default() += 1;
    }
    for name in ["w1-cm", "w2-cm", "w3-cm"] {
        let cm = cms.get(name).await.expect("owned configmap exists");
        assert_eq!(cm.owner_references()[0].name, name.trim_end_matches("-cm"));
    }
    // A change to an owned ConfigMap triggers its owner's reconcile.
    cms.patch(
        "w2-cm",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"size": "tampered"}})),
    )
    .await
    .expect("tamper");
    // The controller heals it (the watch on owned objects maps the change back to "w2").
    let healed = within(
        "owner reconcile heals the configmap",
        await_condition(cms.clone(), "w2-cm", |cm: Option<&ConfigMap>| {
            cm.and_then(|c| c.data.as_ref())
                .and_then(|d| d.get("size"))
                .is_some_and(|s| s == "3")
        }),
    )
    .await
    .expect("await")
    .expect("exists");
    assert_eq!(healed.data.expect("data")["size"], "3");
    task.abort();
}

#[tokio::test]
async fn server_side_apply_create_update_and_status_isolation() {
    let (_emu, client) = setup().await;
    install_crd(&client).await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), NS);
    let pp = PatchParams::apply("repobox-test").force();
    let applied = widgets
        .patch(
            "ssa",
            &pp,
            &Patch::Apply(json!({
                "apiVersion": "test.repobox.dev/v1", "kind": "Widget",
                "metadata": {"name": "ssa", "labels": {"a": "1"}}, "spec": {"size": 1},
            })),
        )
        .await
        .expect("apply create");
    assert_eq!(applied.spec.size, 1);
    assert_eq!(applied.meta().generation, Some(1));
    let updated = widgets
        .patch(
            "ssa",
            &pp,
            &Patch::Apply(json!({
                "apiVersion": "test.repobox.dev/v1", "kind": "Widget",
                "metadata": {"name": "ssa"}, "spec": {"size": 2},
            })),
        )
        .await
        .expect("apply update");
    assert_eq!(updated.spec.size, 2);
    assert_eq!(updated.meta().generation, Some(2));
    assert_eq!(updated.uid(), applied.uid());

    // A status write changes only status, and not the generation.
    let st = widgets
        .patch_status(
            "ssa",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 99}, "status": {"phase": "Running"}})),
        )
        .await
        .expect("patch status");
    assert_eq!(st.spec.size, 2);
    assert_eq!(
        st.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );
    assert_eq!(st.meta().generation, Some(2));
    // Status by server-side apply too (what operators commonly do).
    let st = widgets
        .patch_status(
            "ssa",
            &pp,
            &Patch::Apply(json!({
                "apiVersion": "test.repobox.dev/v1", "kind": "Widget",
                "status": {"phase": "Done"},
            })),
        )
        .await
        .expect("apply status");
    assert_eq!(
        st.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Done")
    );
    assert_eq!(st.meta().generation, Some(2));

    // A main-resource write ignores .status and bumps generation on spec change only.
    let main = widgets
        .patch(
            "ssa",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 5}, "status": {"phase": "Hacked"}})),
        )
        .await
        .expect("patch main");
    assert_eq!(main.spec.size, 5);
    assert_eq!(
        main.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Done")
    );
    assert_eq!(main.meta().generation, Some(3));
    let labelled = widgets
        .patch(
            "ssa",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"b": "2"}}})),
        )
        .await
        .expect("patch labels");
    assert_eq!(
        labelled.meta().generation,
        Some(3),
        "metadata changes keep generation"
    );

    // JSON patch is supported too.
    let jp = serde_json::from_value(json!([
        {"op": "replace", "path": "/spec/size", "value": 7}
    ]))
    .expect("json patch");
    let patched = widgets
        .patch("ssa", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .expect("json patch");
    assert_eq!(patched.spec.size, 7);

    // Applying without a field manager is rejected like a real apiserver does.
    let (code, _) = api_code(
        widgets
            .patch(
                "ssa",
                &PatchParams::default(),
                &Patch::Apply(json!({"spec": {"size": 1}})),
            )
            .await,
    );
    assert_eq!(code, 422);
}

#[tokio::test]
async fn label_selectors_on_list_and_watch() {
    let (_emu, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stream = watcher(cms.clone(), watcher::Config::default().labels("app=a"));
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(Ok(event)) = stream.next().await {
            if let Event::Apply(cm) = event
                && tx.send(cm.name_any()).is_err()
            {
                break;
            }
        }
    });
    for (name, labels) in [
        ("one", json!({"app": "a", "tier": "x"})),
        ("two", json!({"app": "b", "tier": "y"})),
        ("three", json!({"app": "a", "tier": "z", "gone": "yes"})),
    ] {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels}
        }))
        .expect("cm");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create cm");
    }
    let names = |list: kube::api::ObjectList<ConfigMap>| {
        let mut v: Vec<String> = list.items.iter().map(|c| c.name_any()).collect();
        v.sort();
        v
    };
    let q = |sel: &str| ListParams::default().labels(sel);
    assert_eq!(
        names(cms.list(&q("app=a")).await.expect("eq")),
        ["one", "three"]
    );
    assert_eq!(names(cms.list(&q("app!=a")).await.expect("neq")), ["two"]);
    assert_eq!(
        names(cms.list(&q("tier in (x,y)")).await.expect("in")),
        ["one", "two"]
    );
    assert_eq!(
        names(cms.list(&q("tier notin (x,y)")).await.expect("notin")),
        ["three"]
    );
    assert_eq!(
        names(cms.list(&q("gone")).await.expect("exists")),
        ["three"]
    );
    assert_eq!(
        names(cms.list(&q("app=a,!gone")).await.expect("not exists")),
        ["one"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().fields("metadata.name=two"))
                .await
                .expect("field")
        ),
        ["two"]
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(
            within("selected watch events", rx.recv())
                .await
                .expect("open"),
        );
    }
    seen.sort();
    assert_eq!(seen, ["one", "three"]);
    // A later unmatched change is not delivered; the next matched one is.
    cms.patch(
        "two",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .expect("patch two");
    cms.patch(
        "one",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .expect("patch one");
    assert_eq!(within("next", rx.recv()).await.expect("open"), "one");
    task.abort();
}

#[tokio::test]
async fn owner_deletion_cascades_to_jobs_and_jobs_orphan_pods_by_default() {
    let (_emu, client) = setup().await;
    install_crd(&client).await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), NS);
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let owner = widgets
        .create(&PostParams::default(), &widget("owner", 1))
        .await
        .expect("owner");
    let job = |name: &str| -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": name, "ownerReferences": [owner_ref(&owner)]},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox"}]}}},
        }))
        .expect("job")
    };
    let j1 = jobs
        .create(&PostParams::default(), &job("owned-job"))
        .await
        .expect("job");
    assert_eq!(j1.meta().generation, Some(1));

    widgets
        .delete("owner", &DeleteParams::default())
        .await
        .expect("delete owner");
    within(
        "job cascade",
        await_condition(
            jobs.clone(),
            "owned-job",
            conditions::is_deleted(&j1.uid().expect("uid")),
        ),
    )
    .await
    .expect("await");

    // batch/v1 Jobs orphan their pods unless a propagationPolicy is given (like the real API).
    let lone: Job = serde_json::from_value(json!({
        "metadata": {"name": "lone"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "m", "image": "x"}]}}},
    }))
    .expect("job");
    let lone = jobs
        .create(&PostParams::default(), &lone)
        .await
        .expect("lone job");
    let pod_of = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "ownerReferences": [owner_ref(&lone)]},
            "spec": {"containers": [{"name": "m", "image": "x"}]},
        }))
        .expect("pod")
    };
    pods.create(&PostParams::default(), &pod_of("orphan-me"))
        .await
        .expect("pod");
    jobs.delete("lone", &DeleteParams::default())
        .await
        .expect("delete job");
    let orphan = pods.get("orphan-me").await.expect("pod survives");
    assert!(orphan.owner_references().is_empty());

    let lone2 = jobs
        .create(
            &PostParams::default(),
            &serde_json::from_value::<Job>(json!({
                "metadata": {"name": "lone2"},
                "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "m", "image": "x"}]}}},
            }))
            .expect("job"),
        )
        .await
        .expect("lone2");
    let mut p: Pod = pod_of("goes-too");
    p.metadata.owner_references = Some(vec![owner_ref(&lone2)]);
    let p = pods.create(&PostParams::default(), &p).await.expect("pod");
    jobs.delete("lone2", &DeleteParams::background())
        .await
        .expect("delete job");
    within(
        "pod cascade",
        await_condition(
            pods.clone(),
            "goes-too",
            conditions::is_deleted(&p.uid().expect("uid")),
        ),
    )
    .await
    .expect("await");
}

#[tokio::test]
async fn finalizers_delay_deletion_until_removed() {
    let (_emu, client) = setup().await;
    install_crd(&client).await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), NS);
    let mut w = widget("fin", 1);
    w.metadata.finalizers = Some(vec!["test.repobox.dev/cleanup".into()]);
    let w = widgets
        .create(&PostParams::default(), &w)
        .await
        .expect("create");
    let res = widgets
        .delete("fin", &DeleteParams::default())
        .await
        .expect("delete");
    let marked = res
        .left()
        .expect("object returned while finalizers pending");
    assert!(marked.meta().deletion_timestamp.is_some());
    let still = widgets.get("fin").await.expect("still there");
    assert!(still.meta().deletion_timestamp.is_some());
    widgets
        .patch(
            "fin",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("remove finalizer");
    within(
        "gone after finalizer removal",
        await_condition(
            widgets.clone(),
            "fin",
            conditions::is_deleted(&w.uid().expect("uid")),
        ),
    )
    .await
    .expect("await");
    let (code, _) = api_code(widgets.get("fin").await);
    assert_eq!(code, 404);
    // Without finalizers, delete removes at once.
    widgets
        .create(&PostParams::default(), &widget("quick", 1))
        .await
        .expect("create");
    let res = widgets
        .delete("quick", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(res.is_right(), "a Status when removed at once");
}

#[tokio::test]
async fn replace_with_stale_resource_version_conflicts() {
    let (_emu, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "cas"}, "data": {"v": "1"}}))
            .expect("cm");
    let created = cms
        .create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let mut fresh = created.clone();
    fresh.data = Some([("v".to_string(), "2".to_string())].into());
    let replaced = cms
        .replace("cas", &PostParams::default(), &fresh)
        .await
        .expect("replace with the current rv");
    assert_ne!(replaced.resource_version(), created.resource_version());
    let mut stale = created.clone();
    stale.data = Some([("v".to_string(), "3".to_string())].into());
    let (code, reason) = api_code(cms.replace("cas", &PostParams::default(), &stale).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        cms.get("cas").await.expect("get").data.expect("data")["v"],
        "2"
    );
}

#[tokio::test]
async fn injected_faults_reach_the_client() {
    let (emu, client) = setup().await;
    let raw = emu.client_without_retry().expect("client");
    let cms: Api<ConfigMap> = Api::namespaced(raw, NS);
    let cm = |name: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("cm")
    };
    for status in [500u16, 409, 429] {
        emu.inject_fault(Some("POST"), "/api/v1/namespaces/.*/configmaps", status, 1)
            .await
            .expect("inject");
        let (code, _) = api_code(cms.create(&PostParams::default(), &cm("x")).await);
        assert_eq!(code, status);
    }
    // Used up: the next request goes through.
    cms.create(&PostParams::default(), &cm("x"))
        .await
        .expect("after faults");

    // kube's default client retries 429 (honouring Retry-After) and then succeeds.
    let retrying: Api<ConfigMap> = Api::namespaced(client, NS);
    emu.inject_fault(Some("POST"), "/configmaps$", 429, 1)
        .await
        .expect("inject");
    retrying
        .create(&PostParams::default(), &cm("y"))
        .await
        .expect("retried");
    // A cleared fault does not fire.
    emu.inject_fault(None, "/configmaps", 500, 5)
        .await
        .expect("inject");
    emu.clear_faults().await.expect("clear");
    retrying.get("y").await.expect("no fault after clear");

    let log = emu.requests().await.expect("log");
    let posts: Vec<u16> = log
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/configmaps"))
        .map(|r| r.status)
        .collect();
    assert_eq!(posts, [500, 409, 429, 201, 429, 201]);
    assert!(log.iter().filter(|r| r.is_write()).count() >= 6);
}

#[tokio::test]
async fn leases_and_events() {
    let (_emu, client) = setup().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "repobox-operator"},
        "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15},
    }))
    .expect("lease");
    let created = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create lease");
    let mut renewed = created.clone();
    let spec = renewed.spec.as_mut().expect("spec");
    spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
    spec.holder_identity = Some("pod-b".into());
    let replaced = leases
        .replace("repobox-operator", &PostParams::default(), &renewed)
        .await
        .expect("replace lease");
    assert_eq!(
        replaced.spec.expect("spec").holder_identity.as_deref(),
        Some("pod-b")
    );
    // A second contender with the old version loses.
    let (code, _) = api_code(
        leases
            .replace("repobox-operator", &PostParams::default(), &created)
            .await,
    );
    assert_eq!(code, 409);

    let events: Api<CoreEvent> = Api::namespaced(client.clone(), NS);
    let ev: CoreEvent = serde_json::from_value(json!({
        "metadata": {"generateName": "widget-"},
        "involvedObject": {"kind": "Widget", "name": "w", "namespace": NS},
        "reason": "Started", "message": "started", "type": "Normal",
    }))
    .expect("event");
    let posted = events
        .create(&PostParams::default(), &ev)
        .await
        .expect("post event");
    assert!(posted.name_any().starts_with("widget-"));
    assert_eq!(
        events
            .list(&ListParams::default().fields("involvedObject.name=w"))
            .await
            .expect("list")
            .items
            .len(),
        1
    );

    // kube's Recorder posts events.k8s.io/v1 Events.
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "repobox-test".into(),
            instance: None,
        },
    );
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "ev-target", "namespace": NS}}))
            .expect("cm");
    recorder
        .publish(
            &kube::runtime::events::Event {
                type_: kube::runtime::events::EventType::Normal,
                reason: "Tested".into(),
                note: Some("it works".into()),
                action: "Test".into(),
                secondary: None,
            },
            &cm.object_ref(&()),
        )
        .await
        .expect("publish");
    let new_events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, NS);
    let listed = new_events.list(&ListParams::default()).await.expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].reason.as_deref(), Some("Tested"));
}

#[tokio::test]
async fn many_objects_stay_fast() {
    let (emu, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let started = std::time::Instant::now();
    futures::stream::iter(0..500)
        .map(|i| {
            let cms = cms.clone();
            async move {
                let cm: ConfigMap =
                    serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}}))
                        .expect("cm");
                cms.create(&PostParams::default(), &cm).await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("bulk create");
    let elapsed = started.elapsed();
    let all = cms.list(&ListParams::default()).await.expect("list");
    assert_eq!(all.items.len(), 500);
    assert!(
        elapsed < Duration::from_secs(10),
        "500 creates took {elapsed:?}"
    );
    let stats = emu.stats().await.expect("stats");
    assert_eq!(stats["objects"]["/configmaps"], 500);
}
