//! Nothing of a control plane outlives its owner: dropping an owned one stops every process and
//! removes its directory, and the shared one (never dropped) dies with the test process, even
//! one that panics. A separate test binary from `control_plane.rs`, so that one binary never
//! runs two control planes at once; the two tests here take turns for the same reason.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use repobox_testbed::control_plane::ControlPlane;

/// One control plane at a time on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether `pid` is a live process (a zombie waiting for a reaper counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Polls until no pid is alive and `dir` is gone (the kernel's death signal and the cleanup
/// sentinel act asynchronously after the owner process ended).
async fn wait_all_gone(pids: &[(String, u32)], dir: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<_> = pids.iter().filter(|(_, pid)| alive(*pid)).collect();
        if left.is_empty() && !dir.exists() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "after {timeout:?}: still running {left:?}; directory {} exists: {}",
                dir.display(),
                dir.exists()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn drop_stops_every_process_and_removes_the_directory() -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(cp) = ControlPlane::start().await? else {
        return Ok(());
    };
    let pids = cp.pids();
    let dir = cp.dir().to_path_buf();
    let names: Vec<&str> = pids.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "cleanup-sentinel",
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler"
        ]
    );
    for (name, pid) in &pids {
        assert!(alive(*pid), "{name} ({pid}) is not running before the drop");
    }
    assert!(cp.log_path("kube-apiserver").is_file());

    let stopping = Instant::now();
    drop(cp);
    eprintln!("teardown took {:?}", stopping.elapsed());
    // Drop reaps every child before it returns: no polling needed.
    for (name, pid) in &pids {
        assert!(!alive(*pid), "{name} ({pid}) survived the drop");
    }
    assert!(!dir.exists(), "{} survived the drop", dir.display());
    Ok(())
}

#[tokio::test]
async fn the_shared_control_plane_dies_with_a_panicking_test_process() -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    if ControlPlane::assets().is_none() {
        ControlPlane::print_skip();
        return Ok(());
    }
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "--ignored",
            "--exact",
            "start_shared_then_panic",
            "--nocapture",
        ])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(101), "{stdout}\n{stderr}");
    assert!(stderr.contains("panicked"), "{stderr}");

    let mut pids = Vec::new();
    let mut dir = None;
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("CHILD-PID ") {
            let (name, pid) = rest.split_once(' ').context("CHILD-PID line")?;
            pids.push((name.to_string(), pid.parse()?));
        } else if let Some(rest) = line.strip_prefix("CHILD-DIR ") {
            dir = Some(PathBuf::from(rest));
        }
    }
    let dir = dir.with_context(|| format!("no CHILD-DIR line in:\n{stdout}"))?;
    assert_eq!(pids.len(), 5, "{stdout}");
    wait_all_gone(&pids, &dir, Duration::from_secs(15)).await
}

/// Run by the test above in a child process: starts the shared control plane, reports what it
/// spawned and panics without dropping anything.
#[tokio::test]
#[ignore = "a helper: the_shared_control_plane_dies_with_a_panicking_test_process runs it"]
async fn start_shared_then_panic() {
    let cp = match ControlPlane::shared().await {
        Ok(Some(cp)) => cp,
        Ok(None) => return,
        Err(e) => panic!("start: {e:#}"),
    };
    for (name, pid) in cp.pids() {
        println!("CHILD-PID {name} {pid}");
    }
    println!("CHILD-DIR {}", cp.dir().display());
    panic!("the test process ends here, with the control plane still running");
}
