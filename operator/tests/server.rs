//! `/metrics`, `/healthz` and `/readyz` over real HTTP/1.1 on a loopback socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use repobox_operator::run::metrics::Metrics;
use repobox_operator::run::server::{self, Health, OPENMETRICS_CONTENT_TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Response {
    status: u16,
    content_type: Option<String>,
    body: String,
}

/// One `GET` with `Connection: close`, read to the end.
async fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    tokio::time::timeout(TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let raw = String::from_utf8(raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").context("no header end")?;
        let mut lines = head.lines();
        let status_line = lines.next().context("no status line")?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .context("no status code")?
            .parse()?;
        let content_type = lines.find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        });
        Ok(Response {
            status,
            content_type,
            body: body.to_owned(),
        })
    })
    .await
    .context("HTTP request timed out")?
}

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<repobox_operator::Result<()>>,
}

async fn start(health: Arc<Health>, metrics: Arc<Metrics>) -> Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve_listener(
        listener,
        health,
        metrics,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Running { addr, stop, task })
}

#[tokio::test]
async fn probes_follow_the_health_flags() -> Result<()> {
    let health = Arc::new(Health::default());
    let server = start(health.clone(), Arc::new(Metrics::new())).await?;
    let addr = server.addr;

    let r = get(addr, "/readyz").await?;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "redis: unreachable\n");
    assert_eq!(
        get(addr, "/healthz").await?.status,
        200,
        "Redis down is not a liveness failure"
    );

    health.set_redis_ok(true);
    let r = get(addr, "/readyz").await?;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "ok\n"),
        "a standby is ready"
    );

    health.set_leader(true);
    let r = get(addr, "/readyz").await?;
    assert_eq!((r.status, r.body.as_str()), (503, "cache: not synced\n"));
    health.set_cache_synced(true);
    assert_eq!(get(addr, "/readyz").await?.status, 200);

    health.set_redis_ok(false);
    assert_eq!(get(addr, "/readyz").await?.status, 503);
    assert_eq!(get(addr, "/healthz").await?.status, 200);
    health.set_redis_ok(true);

    health.set_shutting_down();
    let r = get(addr, "/readyz").await?;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "shutdown: in progress\n")
    );
    assert_eq!(get(addr, "/healthz").await?.status, 200);

    assert_eq!(get(addr, "/nope").await?.status, 404);

    let _ = server.stop.send(());
    tokio::time::timeout(TIMEOUT, server.task).await???;
    Ok(())
}

#[tokio::test]
async fn metrics_are_served_as_openmetrics() -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    metrics.job_finished("failed");
    metrics.set_leader(true);
    let server = start(Arc::new(Health::default()), metrics.clone()).await?;

    let r = get(server.addr, "/metrics").await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
    assert!(
        r.body
            .contains("repobox_jobs_finished_total{outcome=\"failed\"} 1\n"),
        "{}",
        r.body
    );
    assert!(r.body.contains("repobox_leader 1\n"), "{}", r.body);
    assert!(r.body.ends_with("# EOF\n"), "{}", r.body);

    metrics.set_leader(false);
    let r = get(server.addr, "/metrics").await?;
    assert!(r.body.contains("repobox_leader 0\n"), "{}", r.body);

    let _ = server.stop.send(());
    tokio::time::timeout(TIMEOUT, server.task).await???;
    Ok(())
}

#[tokio::test]
async fn healthz_fails_when_the_leader_loops_stop_ticking() -> Result<()> {
    let health = Arc::new(Health::new(Duration::from_millis(300)));
    let server = start(health.clone(), Arc::new(Metrics::new())).await?;
    let addr = server.addr;

    // A standby runs no loops: never stalled.
    assert_eq!(get(addr, "/healthz").await?.status, 200);
    health.set_leader(true);

    // Keep ticking for a while: the probe stays green across several stall timeouts.
    let ticking = tokio::time::Instant::now();
    while ticking.elapsed() < Duration::from_secs(1) {
        health.tick();
        assert_eq!(get(addr, "/healthz").await?.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Stop ticking: the probe turns red once the stall timeout has passed.
    let stopped = tokio::time::Instant::now();
    let body = loop {
        let r = get(addr, "/healthz").await?;
        if r.status == 503 {
            break r.body;
        }
        if stopped.elapsed() > TIMEOUT {
            bail!("/healthz never failed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(stopped.elapsed() >= Duration::from_millis(250));
    assert!(body.starts_with("stalled: "), "{body}");

    // One tick brings it back.
    health.tick();
    assert_eq!(get(addr, "/healthz").await?.status, 200);

    let _ = server.stop.send(());
    tokio::time::timeout(TIMEOUT, server.task).await???;
    Ok(())
}

#[tokio::test]
async fn serve_reports_a_bind_failure() -> Result<()> {
    let taken = TcpListener::bind("127.0.0.1:0").await?;
    let addr = taken.local_addr()?;
    let err = server::serve(
        addr,
        Arc::new(Health::default()),
        Arc::new(Metrics::new()),
        std::future::pending(),
    )
    .await
    .err()
    .context("binding a taken port succeeded")?;
    assert_eq!(err.metric_label(), "MetricsServer");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    Ok(())
}
