//! The middle test tier: the reconciler and the dispatcher against a mocked Kubernetes API
//! (`tower-test`, as kube-rs's controller-rs does in its `fixtures.rs`) and a real Redis.
//!
//! Each test lists, in order, the exact requests the code under test must make (method, path,
//! the query parameters that matter, the body fields that matter) with the answers the API
//! server would give. A [`Scenario`] answers them and fails on a request out of order, on an
//! unexpected one, on a missing one and on any request made after the last expected one (it
//! waits until every client is dropped). The unit tests of `decide` cover the decisions and
//! the emulator and control-plane suites cover the whole; this tier pins which API calls a
//! situation costs, so a restructuring of the loops that changes them fails here first.

mod dispatcher;
mod reconcile;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use redis::aio::ConnectionManager;
use repobox_testbed::redis_server::RedisServer;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock::{self, Handle};

use crate::model::crd::{RepoboxJob, RepoboxJobPhase, RepoboxJobStatus};
use crate::run::context::{CachedJob, Context, Wakeup};
use crate::run::metrics::Metrics;
use crate::run::records::JobRecords;
use crate::run::server::Health;

/// The jobs namespace of every test.
pub(crate) const NS: &str = "repobox";

/// How long a scenario waits for each request (and for the clients to go after the last):
/// the only time bound of these tests.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// An answer built from the request's JSON body.
type Answer = Box<dyn FnOnce(&Value) -> (StatusCode, Value) + Send>;

/// One request the code under test must make next, and the answer it gets.
pub(crate) struct Expect {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    body: Option<Value>,
    answer: Answer,
}

impl Expect {
    fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            query: Vec::new(),
            body: None,
            answer: Box::new(|_| (StatusCode::OK, json!({}))),
        }
    }

    pub(crate) fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path)
    }

    pub(crate) fn post(path: impl Into<String>) -> Self {
        Self::new(Method::POST, path)
    }

    pub(crate) fn patch(path: impl Into<String>) -> Self {
        Self::new(Method::PATCH, path)
    }

    pub(crate) fn delete(path: impl Into<String>) -> Self {
        Self::new(Method::DELETE, path)
    }

    /// The query must carry `key=value` (other parameters are not checked).
    pub(crate) fn query(mut self, key: &str, value: &str) -> Self {
        self.query.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The JSON body must include `expected` (see [`includes`]).
    pub(crate) fn body(mut self, expected: Value) -> Self {
        self.body = Some(expected);
        self
    }

    /// Answers 200 with `value`.
    pub(crate) fn reply(self, value: Value) -> Self {
        self.answer_with(move |_| (StatusCode::OK, value))
    }

    /// Answers 201 with the request's body (what a create returns).
    pub(crate) fn created(self) -> Self {
        self.answer_with(|body| (StatusCode::CREATED, body.clone()))
    }

    /// Answers 200 with a `Status` of success (what a delete may return).
    pub(crate) fn deleted(self) -> Self {
        self.reply(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        )
    }

    /// Answers 200 with `rj` carrying the status the request applied (a status patch).
    pub(crate) fn status_applied(self, rj: &RepoboxJob) -> Self {
        let mut object = serde_json::to_value(rj).expect("a RepoboxJob serializes");
        self.answer_with(move |body| {
            object["status"] = body["status"].clone();
            (StatusCode::OK, object)
        })
    }

    pub(crate) fn answer_with(
        mut self,
        answer: impl FnOnce(&Value) -> (StatusCode, Value) + Send + 'static,
    ) -> Self {
        self.answer = Box::new(answer);
        self
    }

    fn describe(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// Why `got` is not this request (empty when it is).
    fn mismatch(&self, got: &Seen) -> String {
        if got.method != self.method || got.path != self.path {
            return format!("  {}: another method or path", self.describe());
        }
        for (k, v) in &self.query {
            if got.query.get(k) != Some(v) {
                return format!("  {}: no query {k}={v}", self.describe());
            }
        }
        match &self.body {
            Some(expected) if !includes(&got.body, expected) => format!(
                "  {}: the body does not include\n{}",
                self.describe(),
                pretty(expected)
            ),
            _ => String::new(),
        }
    }
}

/// A request the mocked API server received.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: Value,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {:?}", self.method, self.path, self.query)
    }
}

/// The next request, or the next few in any order (the dispatcher creates Jobs concurrently).
pub(crate) enum Step {
    One(Expect),
    AnyOrder(Vec<Expect>),
}

impl From<Expect> for Step {
    fn from(e: Expect) -> Self {
        Step::One(e)
    }
}

/// The next `expects.len()` requests, in any order; each is matched to the first expectation
/// it satisfies.
pub(crate) fn any_order(expects: Vec<Expect>) -> Step {
    Step::AnyOrder(expects)
}

/// The mocked API server's end of the client.
pub(crate) struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// A client whose every request goes to the returned [`ApiServer`].
pub(crate) fn mock_client() -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, NS), ApiServer(handle))
}

impl ApiServer {
    /// Starts answering `steps` in order.
    pub(crate) fn expect(self, steps: Vec<Step>) -> Scenario {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let result = serve(self.0, steps, log).await;
            // Shown with the failing test's output even when the code under test fails first
            // (on the error the dropped request gave it).
            if let Err(e) = &result {
                eprintln!("mocked API server: {e}");
            }
            result
        });
        Scenario { task, seen }
    }
}

/// The requests of one test, being answered.
pub(crate) struct Scenario {
    task: JoinHandle<Result<(), String>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Scenario {
    /// The requests answered so far.
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until every expected request was made and every client is gone (drop the
    /// context first), and returns the requests; panics on any deviation.
    pub(crate) async fn finish(self) -> Vec<Seen> {
        let Scenario { task, seen } = self;
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(e) => panic!("the mocked API server failed: {e}"),
        }
        seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn made(seen: &Log) -> String {
    seen.lock()
        .map(|s| s.iter().map(|r| format!("\n  {r}")).collect::<String>())
        .unwrap_or_default()
}

async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    steps: Vec<Step>,
    seen: Log,
) -> Result<(), String> {
    let mut i = 0;
    for step in steps {
        let mut pending = match step {
            Step::One(e) => vec![e],
            Step::AnyOrder(es) => es,
        };
        while !pending.is_empty() {
            let want = pending
                .iter()
                .map(Expect::describe)
                .collect::<Vec<_>>()
                .join(" | ");
            let (request, send) =
                match tokio::time::timeout(STEP_TIMEOUT, handle.next_request()).await {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        return Err(format!(
                            "request {i} ({want}) was never made; the clients are gone. Made:{}",
                            made(&seen)
                        ));
                    }
                    Err(_) => {
                        return Err(format!(
                            "request {i} ({want}) was not made within {STEP_TIMEOUT:?}. Made:{}",
                            made(&seen)
                        ));
                    }
                };
            let got = read(request).await?;
            if let Ok(mut s) = seen.lock() {
                s.push(got.clone());
            }
            let mismatches: Vec<String> = pending.iter().map(|e| e.mismatch(&got)).collect();
            let Some(at) = mismatches.iter().position(String::is_empty) else {
                return Err(format!(
                    "request {i}: got {got}\n{}\nbut expected {want}:\n{}\nMade:{}",
                    pretty(&got.body),
                    mismatches.join("\n"),
                    made(&seen)
                ));
            };
            let step = pending.remove(at);
            let (status, value) = (step.answer)(&got.body);
            let bytes = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(bytes))
                .map_err(|e| e.to_string())?;
            send.send_response(response);
            i += 1;
        }
    }
    match tokio::time::timeout(STEP_TIMEOUT, handle.next_request()).await {
        Ok(None) => Ok(()),
        Ok(Some((request, _))) => {
            let got = read(request).await?;
            Err(format!(
                "unexpected request after the expected ones: {got}\n{}\nMade before:{}",
                pretty(&got.body),
                made(&seen)
            ))
        }
        Err(_) => Err(format!(
            "the clients were still alive {STEP_TIMEOUT:?} after the last expected request \
             (drop the context before finishing the scenario). Made:{}",
            made(&seen)
        )),
    }
}

async fn read(request: Request<Body>) -> Result<Seen, String> {
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.map_err(|e| e.to_string())?;
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    let query = url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    Ok(Seen {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query,
        body,
    })
}

/// Whether `actual` includes `expected`: objects by their listed keys (recursively), arrays
/// element by element with the same length, anything else by equality.
pub(crate) fn includes(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e
            .iter()
            .all(|(k, ev)| a.get(k).is_some_and(|av| includes(av, ev))),
        (Value::Array(a), Value::Array(e)) => {
            a.len() == e.len() && a.iter().zip(e).all(|(av, ev)| includes(av, ev))
        }
        _ => actual == expected,
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// A context over the mocked API and a real Redis, with caches the test fills.
pub(crate) struct Bed {
    pub ctx: Arc<Context>,
    /// Kept for the bed's lifetime (the server stops when dropped).
    _redis: RedisServer,
    pub con: ConnectionManager,
    rjs: Writer<RepoboxJob>,
    jobs: Writer<CachedJob>,
}

impl Bed {
    /// A bed with the settings `env` (as environment variables) on top of the defaults.
    pub(crate) async fn new(env: &[(&str, &str)]) -> (Self, ApiServer) {
        let redis = RedisServer::start().await.expect("redis-server starts");
        let con = redis::Client::open(redis.url())
            .expect("a redis URL")
            .get_connection_manager()
            .await
            .expect("a redis connection");
        let mut all = vec![("JOBS_NAMESPACE", NS)];
        all.extend_from_slice(env);
        let cfg = crate::config::tests::test_config(&all);
        let job_cfg = cfg.job_config().expect("a job config");
        let (client, api) = mock_client();
        let (store, rjs): (Store<RepoboxJob>, _) = reflector::store();
        let (jobs_store, jobs) = reflector::store();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "repobox-operator".into(),
                instance: Some("test".into()),
            },
        );
        let ctx = Arc::new(Context::new(
            client,
            Arc::new(cfg),
            job_cfg,
            JobRecords::new(con.clone()),
            store,
            jobs_store,
            Wakeup::default(),
            Arc::new(Metrics::new()),
            recorder,
            Arc::new(Health::new(Duration::from_secs(60))),
        ));
        let bed = Self {
            ctx,
            _redis: redis,
            con,
            rjs,
            jobs,
        };
        (bed, api)
    }

    /// Puts `rj` in the RepoboxJob cache (as the watch would).
    pub(crate) fn cache(&mut self, rj: &RepoboxJob) {
        self.rjs
            .apply_watcher_event(&watcher::Event::Apply(rj.clone()));
    }

    /// Puts `job` in the Job cache (as the watch would).
    pub(crate) fn cache_job(&mut self, job: &CachedJob) {
        self.jobs
            .apply_watcher_event(&watcher::Event::Apply(job.clone()));
    }

    /// Whether the dispatcher was poked since the last call.
    pub(crate) fn dispatcher_poked(&self) -> bool {
        futures::FutureExt::now_or_never(self.ctx.dispatch.notified()).is_some()
    }

    /// `job:{jobId}` as Redis holds it.
    pub(crate) async fn record(&self, job_id: &str) -> HashMap<String, String> {
        let mut con = self.con.clone();
        redis::AsyncCommands::hgetall(&mut con, repobox_contract::keys::job(job_id))
            .await
            .expect("HGETALL")
    }

    /// A `job:{jobId}` record as the web app writes it, moved to `running` as a runner does.
    pub(crate) async fn running_record(&self, job_id: &str, user: &str) {
        let mut con = self.con.clone();
        let key = repobox_contract::keys::job(job_id);
        let now = repobox_contract::time::now();
        let _: () = redis::AsyncCommands::hset_multiple(
            &mut con,
            &key,
            &[
                ("id", job_id),
                ("status", "pending"),
                ("userId", user),
                ("providerId", "p1"),
                ("repoUrl", "https://github.com/acme/api.git"),
                ("createdAt", now.as_str()),
            ],
        )
        .await
        .expect("HSET");
        repobox_contract::transitions::start(&mut con, job_id, "runner-1", 1, &now)
            .await
            .expect("start");
    }

    /// Drops the context (and with it every client) and waits for `scenario` to end.
    pub(crate) async fn finish(self, scenario: Scenario) -> Vec<Seen> {
        drop(self.ctx);
        scenario.finish().await
    }
}

/// A RepoboxJob as intake creates it (with the finalizer), in [`NS`], created a minute ago,
/// in `phase` (no status for `Queued`, as intake leaves it).
pub(crate) fn repobox_job(job_id: &str, user: &str, phase: RepoboxJobPhase) -> RepoboxJob {
    let mut rj = crate::run::intake::repobox_job(
        job_id,
        user,
        "1-0",
        &HashMap::from([
            (
                "repoUrl".to_owned(),
                "https://github.com/acme/api.git".to_owned(),
            ),
            ("providerId".to_owned(), "p1".to_owned()),
        ]),
    );
    rj.metadata.namespace = Some(NS.into());
    rj.metadata.uid = Some(format!("uid-{job_id}"));
    rj.metadata.generation = Some(1);
    rj.metadata.creation_timestamp = Some(ago(Duration::from_secs(60)));
    if phase != RepoboxJobPhase::Queued {
        rj.status = Some(RepoboxJobStatus {
            phase: Some(phase),
            job_name: Some(rj.name_any()),
            ..Default::default()
        });
    }
    rj
}

/// A Job of the cache, created `age` ago, with the given `status` (JSON of batch/v1 JobStatus).
pub(crate) fn cached_job(name: &str, age: Duration, status: Value) -> CachedJob {
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": format!("job-uid-{name}"),
            "creationTimestamp": ago(age),
        },
        "status": status,
    }))
    .expect("a cached Job")
}

/// The time `d` ago.
pub(crate) fn ago(d: Duration) -> Time {
    let d = jiff::SignedDuration::try_from(d).unwrap_or_default();
    Time(jiff::Timestamp::now() - d)
}

/// A pod list with the given pods (JSON).
pub(crate) fn pod_list(pods: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods})
}

/// Paths of the resources the operator uses.
pub(crate) mod paths {
    use super::NS;

    pub(crate) fn repobox_job(name: &str) -> String {
        format!("/apis/repobox.dev/v1alpha1/namespaces/{NS}/repoboxjobs/{name}")
    }

    pub(crate) fn status(name: &str) -> String {
        format!("{}/status", repobox_job(name))
    }

    pub(crate) fn jobs() -> String {
        format!("/apis/batch/v1/namespaces/{NS}/jobs")
    }

    pub(crate) fn job(name: &str) -> String {
        format!("{}/{name}", jobs())
    }

    pub(crate) fn pods() -> String {
        format!("/api/v1/namespaces/{NS}/pods")
    }

    pub(crate) fn core_events() -> String {
        format!("/api/v1/namespaces/{NS}/events")
    }

    pub(crate) fn events() -> String {
        format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")
    }
}

#[test]
fn includes_is_a_recursive_subset() {
    let a = json!({"a": 1, "b": {"c": [1, {"d": 2, "e": 3}], "f": null}});
    assert!(includes(&a, &json!({"b": {"c": [1, {"d": 2}]}})));
    assert!(includes(&a, &json!({"b": {"f": null}})));
    assert!(!includes(&a, &json!({"b": {"c": [1]}})));
    assert!(!includes(&a, &json!({"a": 2})));
    assert!(!includes(&a, &json!({"g": null})));
}
