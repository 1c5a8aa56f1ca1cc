//! The test bed: real parts for the tests and the demo.
//!
//! - [`bed`]: the set-up the operator's tests, benchmarks and the demo share (all of the below,
//!   put together).
//! - [`redis_server`]: a real `redis-server` on a free loopback port, stopped on drop.
//! - [`githost`]: bare repositories served over smart HTTP by `git http-backend`,
//!   behind a small HTTP server that checks basic credentials.
//! - [`forge`]: the GitHub / GitLab pull and merge request API, served by the git host.
//! - [`control_plane`]: a real control plane (etcd, kube-apiserver, controller-manager,
//!   scheduler) from `REPOBOX_K8S_ASSETS`, with fresh certificates; SKIPPED when unset.
//! - [`emulator`]: the stateful Kubernetes API emulator (kmock, extended in `tests/emulator`).
//! - [`kubelet`]: registers Nodes and runs the pods bound to them as local processes, isolated
//!   in their own namespaces when running as root; works against the emulator or a real API server.
//!   Nodes join, leave and shut down gracefully at runtime.
//! - [`autoscaler`]: a cluster-autoscaler model over the kubelet: node groups grown for
//!   unschedulable pods and shrunk when idle, with CA's events; drains and spot reclaims.
//! - [`events`]: core/v1 Events as client-go's recorder writes them.
//! - [`simulator`]: plays job controller and kubelet for the Jobs in the emulator.
//! - [`tls_proxy`]: a TLS front (fresh CA) for the git host and its forge API.
//! - [`webapp`]: writes jobs and providers into Redis the way the web app does.

pub mod autoscaler;
pub mod bed;
pub mod control_plane;
pub mod emulator;
pub mod events;
pub mod forge;
pub mod githost;
pub mod kubelet;
pub mod redis_server;
pub mod simulator;
pub mod tls_proxy;
pub mod webapp;

use std::net::TcpListener;
use std::path::PathBuf;

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

/// The workspace root (where the top-level `Cargo.toml` lives).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testbed lives one level below the workspace root")
        .to_path_buf()
}

/// The `repobox-job-runner` binary the workspace built (the cluster simulator runs it for each
/// Job). `cargo test --workspace` builds it; `make test` builds it first explicitly.
pub fn job_runner_binary() -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    for profile in ["debug", "release"] {
        let path = target.join(profile).join("repobox-job-runner");
        if path.is_file() {
            return Ok(path);
        }
    }
    anyhow::bail!(
        "repobox-job-runner is not built under {}: run `cargo build -p repobox-job-runner` first",
        target.display()
    )
}
